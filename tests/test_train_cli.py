"""`aft-fast train|sample|eval`: the console script runs train.py's stages in one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from aft_fast.data.synthetic import generate_problems
from tests._train_support import ROOT, clean_env, make_assets

AFT_FAST = str(Path(sys.executable).with_name("aft-fast"))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [AFT_FAST, *args], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=180
    )


def test_usage_and_unknown_command():
    r = _run()
    assert r.returncode == 2 and "aft-fast train" in r.stderr and "aft-fast eval" in r.stderr
    assert _run("--help").returncode == 0
    r = _run("train", "--stage=eval")
    assert r.returncode == 2 and "--stage must be one of all, vft, aft" in r.stderr


def test_eval_command_writes_predictions_and_table(tmp_path):
    assets = make_assets(tmp_path / "assets", n_groups=2)
    test = tmp_path / "test.jsonl"
    test.write_text(
        "".join(
            json.dumps({"question": p.question, "answer": p.reference}) + "\n"
            for p in generate_problems(5, seed=9)
        )
    )
    run_dir = tmp_path / "run"
    r = _run(
        "eval",
        f"--eval_model={assets['model']}",
        f"--test_data={test}",
        f"--run_dir={run_dir}",
        "--max_new_tokens=8",
        "--gen_batch_size=2",
        "--progress=false",
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "| eval |" in r.stdout and "greedy accuracy" in r.stdout
    preds = [json.loads(line) for line in (run_dir / "predictions_eval.jsonl").read_text().splitlines()]
    assert len(preds) == 5 and all({"gold", "pred", "correct", "output"} <= p.keys() for p in preds)
    r = _run("eval", f"--eval_model={tmp_path / 'missing'}", f"--test_data={test}", f"--run_dir={run_dir}")
    assert r.returncode == 2 and "does not exist" in r.stderr
