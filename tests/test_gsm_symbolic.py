"""reasoning-gym's gsm_symbolic as a data source (aft_fast/data/gsm_symbolic.py): four GSM8K JSONL splits
that our reader reads as they are, no question in two splits, test_ood from templates that train never
sees, the same files for the same seed, and the pipeline writing them for --task gsm_symbolic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aft_fast.data.formats import read_examples
from aft_fast.data.gsm_symbolic import SPLITS, heldout_templates, write_gsm_symbolic
from aft_fast.data.steps import read_steps

pytest.importorskip("reasoning_gym")


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gsm_symbolic")
    write_gsm_symbolic(out, n_train=120, n_test=30, seed=3, heldout=12)
    return out


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_splits_read_as_gsm8k(splits):
    sizes = {s: len(read_examples(splits / f"{s}.jsonl", "gsm8k")) for s in SPLITS}
    assert sizes == {"train": 120, "validation": 30, "test": 30, "test_ood": 30}
    for ex in read_examples(splits / "train.jsonl"):
        assert ex.kind == "number" and ex.reference.endswith(f"#### {ex.gold}")
    manifest = json.loads((splits / "manifest.json").read_text())
    assert manifest["sizes"] == sizes and manifest["source"].startswith("reasoning-gym ")


def test_no_question_in_two_splits_and_ood_templates_held_out(splits):
    records = {s: _records(splits / f"{s}.jsonl") for s in SPLITS}
    questions = [r["question"] for s in SPLITS for r in records[s]]
    assert len(set(questions)) == len(questions)
    seen = {s: {r["template"] for r in records[s]} for s in SPLITS}
    manifest = json.loads((splits / "manifest.json").read_text())
    held = set(manifest["templates"]["held_out"])
    assert len(held) == 12 and seen["test_ood"] <= held
    assert not held & (seen["train"] | seen["validation"] | seen["test"])
    assert len(seen["train"]) > 20  # the in-distribution splits mix many templates


def test_references_hold_no_false_step(splits):
    for s in SPLITS:
        for r in _records(splits / f"{s}.jsonl"):
            assert all(step.ok for step in read_steps(r["answer"])), r["answer"]


def test_same_seed_same_files(splits, tmp_path):
    write_gsm_symbolic(tmp_path, n_train=120, n_test=30, seed=3, heldout=12)
    for s in SPLITS:
        assert (tmp_path / f"{s}.jsonl").read_bytes() == (splits / f"{s}.jsonl").read_bytes()
    other = tmp_path / "other"
    write_gsm_symbolic(other, n_train=120, n_test=30, seed=4, heldout=12)
    assert (other / "test.jsonl").read_bytes() != (splits / "test.jsonl").read_bytes()
    assert heldout_templates(list(range(85)), 12) == heldout_templates(list(range(85)), 12)
    with pytest.raises(ValueError, match="heldout_templates"):
        heldout_templates(list(range(85)), 85)


def test_pipeline_writes_the_task(tmp_path):
    import torch

    from aft_fast.train.config import TrainConfig
    from aft_fast.train.engine import Dist
    from aft_fast.train.pipeline import _read_data

    cfg = TrainConfig(
        run_dir=str(tmp_path), task="gsm_symbolic", synthetic_train=16, synthetic_test=4, label="verified"
    )
    dist = Dist(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    train, test = _read_data(cfg, dist)
    assert (len(train), len(test)) == (16, 4)
    assert sorted(p.name for p in (tmp_path / "data").glob("*.jsonl")) == sorted(f"{s}.jsonl" for s in SPLITS)
