"""benchmarks/gpu_check.sh without a GPU: its step machinery (time limits, the summary, the archive), the
pipeline config it trains with, bench_step's tiny shape, and the goals table it ends with.

The whole `bash benchmarks/gpu_check.sh --dry-run` takes about 5 minutes on 2 cores: here each part runs
alone (`--steps`), the pipeline's stages being covered by tests/test_train_distributed.py."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from benchmarks import _common, bench_gpu

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def gpu_check(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHON=sys.executable, **(env or {})))


def summary_rows(out: Path) -> dict[str, str]:
    """step -> status, from gpu_check_summary.md."""
    rows = {}
    for line in (out / "gpu_check_summary.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[1] != "status":  # not the header
            rows[cells[0]] = cells[1]
    return rows


def test_dry_run_env_and_step(tmp_path):
    """The env step and bench_step at its tiny CPU shape: results written, summarized and archived."""
    out, archive = tmp_path / "out", tmp_path / "results.tgz"
    proc = gpu_check("--dry-run", "--steps", "env,step,goals", "--archive", str(archive), str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert summary_rows(out) == {"env": "ok", "step": "ok"}
    assert "no CUDA device visible" in (out / "gpu_check_env.log").read_text()
    with (out / "bench_step.csv").open() as f:
        timed = {r["provider"] for r in csv.DictReader(f) if r["metric"] == "time"}
    assert timed == {"naive", "padded", "packed", "shared"}
    goals = (out / "gpu_check_goals.md").read_text()
    assert "shared-layout training step" in goals and "not the goal's setting" in goals  # a CPU run
    with tarfile.open(archive) as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"gpu_check_summary.md", "bench_step.md", "bench_step.csv", "gpu_check_step.log"} <= names


def test_time_budget_skips_and_kills(tmp_path):
    """A step gets what is left of GPU_CHECK_SECONDS: with almost nothing left it is skipped, and the
    check fails; an unknown step name is refused before anything runs."""
    out = tmp_path / "out"
    proc = gpu_check("--dry-run", "--steps", "env,bench", str(out), env={"GPU_CHECK_SECONDS": "5"})
    assert proc.returncode == 1
    assert summary_rows(out) == {"env": "SKIPPED (no time left)"}
    bad = gpu_check("--dry-run", "--steps", "env,nope", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "unknown step nope" in bad.stderr


def test_pipeline_config_loads():
    """The config and flags the GPU run passes to train.py are valid (an unknown key would stop it)."""
    from aft_fast.train.config import load_config

    cfg = load_config(["--config", str(ROOT / "configs" / "gpu_check_tiny.yaml"), "--deepspeed_config",
                       str(ROOT / "configs" / "ds_zero3_gpu_bf16.json"), "--loss_backend=triton",
                       "--vft_micro_batch_size=32", "--run_dir=/tmp/unused"])
    assert (cfg.layout, cfg.vft_steps, cfg.aft_steps, cfg.mode) == ("shared", 30, 20, "bcl")
    ds = json.loads((ROOT / "configs" / "ds_zero3_gpu_bf16.json").read_text())
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 3


def _loss_rows(shape: dict, times: dict, memory: dict, gpu: str = "NVIDIA H200") -> list[dict]:
    env = dict(gpu=gpu, torch="2.11.0", triton="3.6.0", git_sha="x", timestamp="2026-12-01T00:00:00+00:00")
    config = json.dumps(shape, sort_keys=True)
    base = dict(op="aft_loss", mode="fwd_bwd", x_name="T", x_value=shape["tokens"], config_json=config, **env)
    rows = [dict(base, provider=p, metric="time", unit="ms", p50=t, p20=t, p80=t) for p, t in times.items()]
    rows += [dict(base, provider=p, metric="peak_memory_added", unit="MiB", p50=m, p20=m, p80=m)
             for p, m in memory.items()]
    return rows


def _step_rows(times: dict, gpu: str = "NVIDIA H200") -> list[dict]:
    env = dict(gpu=gpu, torch="2.11.0", triton="3.6.0", git_sha="x", timestamp="2026-12-01T00:00:00+00:00")
    config = json.dumps(dict(model="llama_1b", device="cuda"))
    return [dict(op="aft_step", provider=p, mode="fwd_bwd", metric="time", unit="ms", x_name="groups",
                 x_value=8, config_json=config, p50=t, p20=t, p80=t, **env) for p, t in times.items()]


def _verdicts(text: str) -> list[str]:
    return [line.rstrip("|").rsplit("|", 1)[-1].strip() for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| goal")]


@pytest.mark.parametrize("good", [True, False])
def test_goals_table(tmp_path, good):
    """The goals read off the CSVs: the best exact triton provider against the floor, eager's memory, CCE
    and TRL, and the shared step against the padded one; each met or not by the numbers given here."""
    shape = bench_gpu.GOAL_SHAPE
    triton = 110.0 if good else 130.0  # ms; the floor takes 100
    times = dict(floor=100.0, triton_chunked=triton, triton_fused=triton + 5, eager=300.0, cce=120.0,
                 trl=150.0)
    memory = dict(triton_chunked=100.0 if good else 900.0, triton_fused=50.0, eager=10000.0)
    _common.append_csv(tmp_path / "bench_gpu.csv", _loss_rows(shape, times, memory))
    steps = dict(padded=300.0, shared=150.0 if good else 250.0)
    _common.append_csv(tmp_path / "bench_step.csv", _step_rows(steps))
    text = bench_gpu.goals_report(tmp_path)
    assert "best exact triton provider: triton_chunked" in text
    if good:  # 1.10x the floor, 1.0% of eager's memory, 120 and 150 ms against 110, 2x the padded step
        assert _verdicts(text) == ["met"] * 5
        assert "1.10x the floor" in text and "1.0% of eager's" in text and "2.00x the padded step" in text
    else:  # 1.30x, 9%, slower than CCE (120 < 130), faster than TRL (150 > 130), 1.2x the padded step
        assert _verdicts(text) == ["NOT met", "NOT met", "NOT met", "met", "NOT met"]


def test_goals_table_elsewhere(tmp_path):
    """Results at another shape (a dry run's) are shown but judged against nothing; missing ones are said."""
    shape = dict(tokens=96, hidden=32, vocab=300, k=3, dtype="fp32")
    _common.append_csv(tmp_path / "bench_gpu.csv", _loss_rows(shape, dict(floor=1.0, triton_chunked=2.0), {},
                                                                gpu="cpu: test x2"))
    text = bench_gpu.goals_report(tmp_path)
    assert "T=96, H=32, V=300" in text
    assert _verdicts(text) == ["n/a (not the goal's setting)", "", "", "", ""]
    assert text.count("not measured") == 4
