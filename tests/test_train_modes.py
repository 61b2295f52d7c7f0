"""The aft stage's modes (aft_fast.constants.TRAIN_MODES): the table, the items vft and rft train on, the
constraint diagnostics against hand-computed values, beta_from_spread, and vft / rft / bcl from the
command line with their metrics in metrics.jsonl."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from aft_fast.constants import MODES, TRAIN_MODES, train_mode
from aft_fast.data.candidates import Candidate, CandidateGroup
from aft_fast.losses.objectives import build_plan, objective
from aft_fast.options import LossOptions
from aft_fast.train.aft import encode_items, positives
from aft_fast.train.config import InputError, load_config
from aft_fast.train.diagnostics import group_boundary, pair_stats, score_spread
from tests._train_support import ROOT, check, losses, make_assets, run_python

# ---------------------------------------------------------------------------------------------------------
# The table.


def test_mode_table_rows():
    assert set(TRAIN_MODES) == set(MODES) | {"rft"}
    assert (TRAIN_MODES["vft"].loss, TRAIN_MODES["vft"].trains_on) == ("vft", "references")
    assert (TRAIN_MODES["rft"].loss, TRAIN_MODES["rft"].trains_on) == ("vft", "positives+references")
    assert {m for m, t in TRAIN_MODES.items() if t.boundary} == {"bcl", "dpo+bc", "rrhf+bc", "pro+bc"}
    assert {m for m, t in TRAIN_MODES.items() if t.needs_ref_logp} == {"dpo", "dpo+bc"}
    assert {m for m, t in TRAIN_MODES.items() if not t.ranking} == {"vft", "rft"}
    assert not TRAIN_MODES["vft"].uses_candidates and TRAIN_MODES["rft"].uses_candidates
    for name, t in TRAIN_MODES.items():
        assert t.name == name and t.loss in MODES
    with pytest.raises(ValueError, match="mode: 'ppo' is not one of vft, rft"):
        train_mode("ppo")


def test_config_accepts_every_train_mode_and_refuses_others():
    for name in TRAIN_MODES:
        assert load_config([f"--mode={name}"]).mode == name
    with pytest.raises(InputError, match="mode: 'sft' is not one of"):
        load_config(["--mode=sft"])
    with pytest.raises(InputError, match="beta_from_spread: must be >= 0"):
        load_config(["--beta_from_spread=-1"])


TRAINER = ["aft.py", "vft.py", "loop.py"]


@pytest.mark.parametrize("name", TRAINER)
def test_trainer_reads_the_table_not_mode_names(name):
    """No string tests on mode names in the trainer: facts about a mode come from TRAIN_MODES."""
    source = (ROOT / "aft_fast" / "train" / name).read_text()
    assert not re.search(r"mode\w*\.(startswith|endswith)\(", source)
    assert not re.search(r"mode\w*\s*(==|!=|in)\s*[\"'(\[]", source)


# ---------------------------------------------------------------------------------------------------------
# What vft and rft train on.


class _Tok:
    """Tokens are characters; enough for encode_group / encode_chain."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [3 + ord(c) % 50 for c in text]


def _group(gid: str, reference: str | None, texts: list[tuple[str, bool]]) -> CandidateGroup:
    return CandidateGroup(gid, f"q{gid}", "5", "number", reference, [Candidate(t, c) for t, c in texts])


def test_rft_trains_on_the_reference_and_the_positives():
    tok = _Tok()
    g = _group("a", "ref #### 5", [("ref #### 5", True), ("other #### 5", True), ("bad #### 4", False),
                                   ("other #### 5", True), ("third #### 5", True)])
    assert positives(g) == ["other #### 5", "third #### 5"]  # the reference and repeats kept once
    (item,) = encode_items(train_mode("rft"), [g], tok)
    want = ["ref #### 5", "other #### 5", "third #### 5"]
    assert item.members == [tok.encode(t) + [2] for t in want]
    assert item.is_reference == [True, True, True] and item.label == [1, 1, 1]
    (vft,) = encode_items(train_mode("vft"), [g], tok)
    assert vft.members == [tok.encode("ref #### 5") + [2]] and vft.is_reference == [True]
    (bcl,) = encode_items(train_mode("bcl"), [g], tok)
    assert bcl.is_reference == [True] + [False] * 5 and bcl.label == [1, 1, 1, 0, 1, 1]


def test_rft_ranked_feedback_and_groups_without_candidates():
    tok = _Tok()
    ranked = CandidateGroup("r", "q", "5", "number", None, [Candidate("x", rank=2), Candidate("y", rank=3),
                                                           Candidate("z", rank=3)])
    assert positives(ranked) == ["y", "z"]
    empty = _group("e", "ref", [])
    only_neg = _group("n", None, [("bad", False)])
    items = encode_items(train_mode("rft"), [ranked, empty, only_neg], tok)
    assert [len(i.members) for i in items] == [2]  # no candidates: skipped; nothing to train on: skipped
    with pytest.raises(InputError, match="mode vft: group 'n' has no reference"):
        encode_items(train_mode("vft"), [only_neg], tok)


# ---------------------------------------------------------------------------------------------------------
# Diagnostics on a hand-made score set.

# Group 0: reference, positives -0.10 and -0.20, negatives -0.50 and -0.05. Group 1: reference, positive
# -0.30, negative -0.90. Group 2: two positives only (no pair). With beta 0.2: B0 = -0.20 - 0.2 = -0.40,
# B1 = -0.30 - 0.2 = -0.50.
SCORES = torch.tensor(
    [-0.01, -0.10, -0.20, -0.50, -0.05, -0.02, -0.30, -0.90, -0.4, -0.6], dtype=torch.float64
)
GROUP = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2])
LABEL = torch.tensor([1, 1, 1, 0, 0, 1, 1, 0, 1, 1])
IS_REF = torch.tensor([True, False, False, False, False, True, False, False, False, False])


def test_pair_stats_by_hand():
    st = pair_stats(SCORES, GROUP, LABEL, IS_REF, beta=0.2)
    # pairs (margin): (-0.10, -0.50) 0.40, (-0.10, -0.05) -0.05, (-0.20, -0.50) 0.30, (-0.20, -0.05) -0.15,
    # (-0.30, -0.90) 0.60
    assert st.pairs == 5 and st.right == 3
    assert st.margin_sum == pytest.approx(0.40 - 0.05 + 0.30 - 0.15 + 0.60)
    # negatives: -0.50 - B0 = -0.10 (below), -0.05 - B0 = 0.35, -0.90 - B1 = -0.40 (below)
    assert st.negatives == 3 and st.below == 2
    assert st.neg_gap_sum == pytest.approx(-0.10 + 0.35 - 0.40)
    b = group_boundary(SCORES, GROUP, LABEL, IS_REF, 0.2)
    assert b[:5].tolist() == pytest.approx([-0.40] * 5) and b[5:8].tolist() == pytest.approx([-0.50] * 3)
    assert torch.isinf(b[8:]).all()
    no_b = pair_stats(SCORES, GROUP, LABEL, IS_REF, beta=None)
    assert (no_b.neg_gap_sum, no_b.below, no_b.margin_sum) == (0.0, 0, st.margin_sum)


def test_boundary_is_where_the_bcl_loss_lets_a_negative_rest():
    """bcl's gradient on a lowest-rank candidate vanishes exactly at s_n = B: the diagnostics' B is the
    loss's B (ranked labels, several top-rank candidates)."""
    group = torch.tensor([0, 0, 0, 0, 0, 0])
    label = torch.tensor([3, 3, 3, 2, 1, 1])
    is_ref = torch.tensor([True, False, False, False, False, False])
    counts = torch.tensor([4.0, 3, 5, 2, 6, 4], dtype=torch.float64)
    scores = torch.tensor([-0.1, -0.3, -0.2, -0.6, -0.9, -0.4], dtype=torch.float64)
    beta = 0.25
    b = float(group_boundary(scores, group, label, is_ref, beta)[4])
    assert b == pytest.approx(-0.3 - beta)
    plan = build_plan(group, label, is_ref, counts)
    for shift, sign in ((0.0, 0), (0.05, 1), (-0.05, -1)):
        s = scores.clone()
        s[4] = b + shift
        sums = (s * counts).requires_grad_()
        objective(sums, counts, plan, LossOptions(mode="bcl", beta=beta, w_vft=0.0))[0].backward()
        g = float(sums.grad[4])
        if sign == 0:
            assert abs(g) < 1e-12
        else:  # above B the loss pushes s_n down (positive gradient), below B it pulls it up
            assert math.copysign(1, g) == sign


def test_score_spread_by_hand():
    # Group means -2 and 2: squared deviations 1 + 1 and 4 + 0 + 4; 1 + 2 degrees of freedom.
    assert score_spread([[-1.0, -3.0], [0.0, 2.0, 4.0], [7.0]]) == pytest.approx(math.sqrt(10 / 3))
    with pytest.raises(ValueError, match="beta_from_spread"):
        score_spread([[1.0], []])


# ---------------------------------------------------------------------------------------------------------
# From the command line.


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    return make_assets(tmp_path_factory.mktemp("modes"), n_groups=8)


def _aft(assets: dict[str, Path], run_dir: Path, *extra: str):
    return run_python(
        [
            "--stage=aft",
            f"--vft_model={assets['model']}",
            f"--candidates={assets['candidates']}",
            f"--run_dir={run_dir}",
            "--aft_steps=2",
            "--aft_batch_size=4",
            "--aft_micro_batch_size=4",
            "--max_length=160",
            "--log_every=1",
            "--save_every=0",
            "--progress=false",
            "--tensorboard=false",
            *extra,
        ],
        timeout=900,  # seconds on an idle machine; minutes when its 2 cores are shared
    )


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["vft", "rft"])
def test_vft_and_rft_train_from_the_cli(assets, tmp_path, mode):
    r = _aft(assets, tmp_path, f"--mode={mode}")
    check(r)
    assert f"mode {mode} (loss vft)" in r.stdout
    assert len(losses(tmp_path, "aft")) == 2
    recs = _records(tmp_path)
    assert all(rec["train/align_loss"] == 0.0 and "train/grad_ratio" not in rec for rec in recs)
    assert (tmp_path / "aft" / "model.safetensors").is_file()


def test_bcl_logs_the_constraint_diagnostics(assets, tmp_path):
    r = _aft(assets, tmp_path, "--mode=bcl", "--beta_from_spread=2")
    check(r)
    m = re.search(r"beta ([0-9.e-]+) = 2 x the VFT model's score spread ([0-9.e-]+)", r.stdout)
    assert m, r.stdout[-3000:]
    beta, spread = float(m.group(1)), float(m.group(2))
    assert beta == pytest.approx(2 * spread, rel=1e-3) and spread > 0
    recs = [rec for rec in _records(tmp_path) if rec["stage"] == "aft"]
    assert [rec["step"] for rec in recs] == [1, 2]
    for rec in recs:
        assert rec["train/beta"] == pytest.approx(beta, rel=1e-3)
        assert 0.0 <= rec["train/neg_below_boundary"] <= 1.0
        assert rec["train/grad_align"] > 0 and rec["train/grad_vft"] > 0
        assert rec["train/grad_ratio"] == pytest.approx(rec["train/grad_align"] / rec["train/grad_vft"])
        assert {"train/margin", "train/neg_minus_boundary"} <= rec.keys()
    state = json.loads((tmp_path / "aft" / "trainer_state.json").read_text())
    assert state["config"]["beta"] == pytest.approx(beta, rel=1e-3)


def test_pipeline_summary_compares_aft_with_vft():
    from aft_fast.train.config import TrainConfig
    from aft_fast.train.pipeline import compare_line

    cfg = TrainConfig(mode="bcl", label="verified")
    values = {"eval_vft/accuracy": 0.5, "eval_aft/accuracy": 0.565, "aft/beta": 0.05}
    assert compare_line(cfg, values) == (
        "AFT (bcl, beta 0.05, label verified) vs VFT: greedy accuracy 50.0% -> 56.5% "
        "(+6.5 points, above the VFT model)"
    )
    down = compare_line(TrainConfig(mode="rft"), {"eval_vft/accuracy": 0.6, "eval_aft/accuracy": 0.55})
    assert down.endswith("60.0% -> 55.0% (-5.0 points, below the VFT model)")
    assert "(rft, label answer)" in down
    assert compare_line(cfg, {"eval_vft/accuracy": 0.5}) is None  # aft not evaluated in this run


def test_pipeline_summary_says_how_far_one_seed_can_be_trusted():
    from aft_fast.train.pipeline import trust_line

    line = trust_line({"eval_vft/questions": 200, "eval_vft/accuracy": 0.5, "eval_aft/accuracy": 0.9})
    # sqrt(0.5 * 0.5 / 200) = 3.5 points: the larger of the two errors
    assert line.startswith(
        "One seed on 200 test questions: each accuracy has a binomial standard error of ±3.5 "
    )
    assert trust_line({"eval_vft/questions": 200, "eval_vft/accuracy": 0.5}) is None
