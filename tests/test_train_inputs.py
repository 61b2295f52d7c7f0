"""Bad input fails before any training starts, with a message that says what and where: a malformed
data line (file:line), a missing model folder, a tokenizer/model vocab mismatch, an empty or unusable
candidate file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aft_fast.data.synthetic import generate_problems
from aft_fast.train.config import InputError, TrainConfig
from aft_fast.train.engine import Dist
from aft_fast.train.pipeline import Summary, prepare
from tests._train_support import make_assets, run_python

DIST = Dist(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    return make_assets(tmp_path_factory.mktemp("assets"), n_groups=4)


def _gsm8k(path: Path, n: int = 6, bad_line: int | None = None) -> Path:
    lines = [
        json.dumps({"question": p.question, "answer": p.reference}) for p in generate_problems(n, seed=2)
    ]
    if bad_line is not None:
        lines[bad_line - 1] = '{"question": "How many?", "answer": "no final answer line"'
    path.write_text("\n".join(lines) + "\n")
    return path


def _prepare(tmp_path: Path, **kw):
    return prepare(TrainConfig(run_dir=str(tmp_path / "run"), **kw), DIST, Summary())


def test_malformed_data_line_stops_train_py_before_training(tmp_path):
    data = _gsm8k(tmp_path / "train.jsonl", bad_line=3)
    run_dir = tmp_path / "run"
    r = run_python(
        [f"--train_data={data}", f"--test_data={data}", f"--run_dir={run_dir}", "--vft_steps=2"], timeout=120
    )
    assert r.returncode == 2, r.stdout[-3000:]
    assert f"error: {data}:3: bad JSON" in r.stdout
    assert "Traceback" not in r.stdout
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "vft").exists()


def test_bad_field_names_file_and_line(tmp_path):
    data = _gsm8k(tmp_path / "train.jsonl")
    lines = data.read_text().splitlines()
    lines[4] = json.dumps({"question": "q", "answer": "no answer line"})
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=rf"{data}:5: answer's last line must be '#### <number>'"):
        _prepare(tmp_path, stage="vft", train_data=str(data))


def test_missing_model_folder(tmp_path):
    data = _gsm8k(tmp_path / "train.jsonl")
    with pytest.raises(InputError, match=r"model folder .*/nowhere does not exist"):
        _prepare(tmp_path, stage="vft", train_data=str(data), model=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="has no config.json"):
        _prepare(tmp_path, stage="sample", train_data=str(data), vft_model=str(tmp_path / "empty"))


def test_vocab_mismatch(tmp_path, assets):
    from transformers import AutoModelForCausalLM

    small = AutoModelForCausalLM.from_pretrained(assets["model"])
    small.resize_token_embeddings(300)  # fewer rows than the tokenizer's 384 tokens
    small.save_pretrained(tmp_path / "small")
    data = _gsm8k(tmp_path / "train.jsonl")
    with pytest.raises(
        InputError, match=r"vocab mismatch: the tokenizer has \d+ tokens but the model .* has 300"
    ):
        _prepare(
            tmp_path,
            stage="vft",
            train_data=str(data),
            model=str(tmp_path / "small"),
            tokenizer=str(assets["tokenizer"]),
        )


def test_candidate_files(tmp_path, assets):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(InputError, match=rf"{empty}:1: empty file"):
        _prepare(tmp_path, stage="aft", vft_model=str(assets["model"]), candidates=str(empty))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(assets["candidates"].read_text().splitlines()[0] + '\n{"id": "x"}\n')
    with pytest.raises(InputError, match=rf"{broken}:2: missing field 'question'"):
        _prepare(tmp_path, stage="aft", vft_model=str(assets["model"]), candidates=str(broken))
    with pytest.raises(InputError, match="needs ref_logp on every candidate"):
        _prepare(
            tmp_path,
            stage="aft",
            vft_model=str(assets["model"]),
            candidates=str(assets["candidates"]),
            mode="dpo",
        )
    ok = _prepare(tmp_path, stage="aft", vft_model=str(assets["model"]), candidates=str(assets["candidates"]))
    assert ok.groups and ok.start_model == assets["model"]
