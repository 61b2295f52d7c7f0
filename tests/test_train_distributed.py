"""DeepSpeed ZeRO-3 on the CPU (gloo), real launches: gradients of the fused loss on the partitioned LM
head, 2 ranks vs 1 process, resume after a kill, 2 nodes on loopback, and the whole pipeline.

One 2-process AFT run (`two_ranks`) is the reference that the 1-process, resumed and 2-node runs must
reproduce: same micro batches (the step plan is a function of seed and step), same losses per step,
same final weights within float tolerance (the reductions differ only in summation order).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from aft_fast.data.candidates import read_candidates
from aft_fast.data.collate import collate, encode_group
from aft_fast.models.folders import TRAINER_STATE
from aft_fast.models.forward import forward_hidden
from aft_fast.models.loading import load_tokenizer
from aft_fast.reference import aft_loss_ref
from aft_fast.train.checkpoint import latest_tag
from tests._train_support import (
    aft_stage_args,
    assert_weights_close,
    check,
    clean_env,
    launch,
    launch_two_nodes,
    losses,
    make_assets,
    run_python,
    weights,
)

pytestmark = pytest.mark.distributed

STEPS = 6


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    return make_assets(tmp_path_factory.mktemp("assets"))


def aft_args(assets: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    # 24 groups, 8 per step: 3 steps per epoch, so 6 steps also cross an epoch boundary.
    return aft_stage_args(assets, run_dir, STEPS, 8, 4, "1e-3", *extra)


@pytest.fixture(scope="module")
def two_ranks(assets, tmp_path_factory) -> Path:
    """The reference: 2 processes x micro batch 4, no accumulation."""
    run_dir = tmp_path_factory.mktemp("two_ranks")
    check(launch(2, aft_args(assets, run_dir)))
    return run_dir


def _assert_same_run(run_dir: Path, ref_dir: Path) -> None:
    ours, ref = losses(run_dir, "aft"), losses(ref_dir, "aft")
    assert sorted(ours) == list(range(1, STEPS + 1)) == sorted(ref)
    for step in ref:
        assert ours[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), f"loss at step {step}"
    assert json.loads((run_dir / "aft" / TRAINER_STATE).read_text())["steps"] == STEPS
    assert_weights_close(weights(run_dir / "aft"), weights(ref_dir / "aft"), rtol=1e-4, atol=1e-6)


def test_training_changes_the_model(assets, two_ranks):
    # Guards the comparisons below against a run that silently trains nothing.
    start, end = weights(assets["model"]), weights(two_ranks / "aft")
    assert all(not torch.equal(start[k], end[k]) for k in start)
    assert losses(two_ranks, "aft", "train/assess_acc")  # candidates were scored and ranked


def test_two_ranks_match_one_process(assets, two_ranks, tmp_path):
    """1 process (no launcher) with accumulation 2 sees the same micro batches as 2 ranks; gradient
    checkpointing (on here only) recomputes activations without changing the math."""
    check(run_python(aft_args(assets, tmp_path, "--gradient_checkpointing")))
    _assert_same_run(tmp_path, two_ranks)


def test_resume_after_kill_matches_uninterrupted(assets, two_ranks, tmp_path):
    killed = launch(2, aft_args(assets, tmp_path, "--save_every=2"), env=clean_env(AFT_FAST_KILL_AT="aft:3"))
    assert killed.returncode != 0, "the run was meant to be killed after step 3"
    ckpt = tmp_path / "checkpoints" / "aft"
    assert latest_tag(ckpt) == "step0000002"  # step 3 was lost with the kill
    assert not (tmp_path / "aft").exists()
    (ckpt / ".tmp-step0000004").mkdir()  # a half-written checkpoint must be ignored
    check(launch(2, aft_args(assets, tmp_path, "--save_every=2", "--resume")))
    _assert_same_run(tmp_path, two_ranks)
    assert not (ckpt / ".tmp-step0000004").exists()


def test_the_path_of_a_cpu_without_avx512_trains_the_same(assets, two_ranks, tmp_path):
    """What an AVX2-only CPU runs, forced on this machine: ATen and the row loops at AVX2, and oneDNN
    refusing its fp32 products the way it throws there, so the probe falls back to ATen's mm. The 2-rank
    run says so in its log and reproduces the default path's losses and weights (only summation orders
    differ)."""
    env = clean_env(
        ATEN_CPU_CAPABILITY="avx2", AFT_FAST_CPU_CAPABILITY="avx2", AFT_FAST_SIMULATE_ONEDNN_REFUSAL="1"
    )
    result = launch(2, aft_args(assets, tmp_path), env=env)
    check(result)
    assert "cpp backend: SIMD avx2" in result.stdout and "GEMM aten" in result.stdout, result.stdout[-3000:]
    ours, ref = losses(tmp_path, "aft"), losses(two_ranks, "aft")
    assert sorted(ours) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        assert ours[step] == pytest.approx(ref[step], rel=1e-4, abs=1e-6), f"loss at step {step}"
    assert_weights_close(weights(tmp_path / "aft"), weights(two_ranks / "aft"), rtol=1e-3, atol=1e-5)


def test_two_nodes_on_loopback_match_one_node(assets, two_ranks, tmp_path):
    results = launch_two_nodes(aft_args(assets, tmp_path / "run"), tmp_path / "hostfile")
    for r in results:
        check(r)
    _assert_same_run(tmp_path / "run", two_ranks)


def test_fused_loss_gradients_under_zero3(assets, tmp_path):
    """Full gradients after one ZeRO-3 backward (LM head partitioned and tied to the embedding, prompts
    shared) equal those of the unfused reference loss (full logits, autograd) on an ordinary model with
    one padded row per member."""
    micro = 3
    out = tmp_path / "grads.pt"
    check(
        launch(
            2,
            [str(assets["model"]), str(assets["candidates"]), str(out), "bcl", str(micro), "shared"],
            script="tests/_zero3_grads_worker.py",
        )
    )
    got = torch.load(out)
    part = got["partitioned"]
    assert part["tied"] and part["empty_outside_forward"] and part["local_numel"] < part["full_numel"]

    tok = load_tokenizer(assets["model"])
    lm = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32)
    items = [encode_group(g, tok) for g in read_candidates(assets["candidates"])]
    rank_losses = []
    for rank in range(2):
        b = collate(items[rank * micro : (rank + 1) * micro], pad_id=tok.pad_token_id, max_length=160)
        ref = aft_loss_ref(
            forward_hidden(lm, b),
            lm.get_output_embeddings().weight,
            **b.token_index(),
            **b.group_inputs(),
            mode="bcl",
            beta=0.5,
        )
        rank_losses.append(ref.loss)
    torch.stack(rank_losses).mean().backward()  # data parallelism averages the ranks' gradients
    assert got["losses"] == pytest.approx([x.item() for x in rank_losses], rel=1e-5)
    names = dict(lm.named_parameters())
    assert names.keys() == got["grads"].keys()
    for name, p in names.items():
        torch.testing.assert_close(
            got["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )
    head = got["grads"]["model.embed_tokens.weight"]
    assert head.abs().max() > 1e-3


def test_pipeline_all_stages(tmp_path):
    """--stage all on a tiny embedded task (dpo, so the reference log-prob pass runs too): every output
    lands where the README says, and the summary table has every row."""
    run_dir = tmp_path / "run"
    result = launch(
        2,
        [
            f"--run_dir={run_dir}",
            "--synthetic_train=64",
            "--synthetic_test=8",
            "--vft_steps=4",
            "--vft_batch_size=8",
            "--vft_micro_batch_size=4",
            "--aft_steps=2",
            "--aft_batch_size=4",
            "--aft_micro_batch_size=2",
            "--sample_limit=8",
            "--num_samples=3",
            "--max_new_tokens=24",
            "--mode=dpo",
            "--save_every=2",
            "--log_every=1",
            "--progress=false",
        ],
    )
    check(result)
    for stage in ("setup", "vft", "eval_vft", "sample", "aft", "eval_aft", "total"):
        assert f"| {stage} |" in result.stdout
    for path in (
        "tokenizer",
        "init",
        "vft/model.safetensors",
        "aft/model.safetensors",
        "candidates.jsonl",
        "metrics.jsonl",
        "summary.md",
        "summary.json",
        "config.yaml",
        "predictions_eval_vft.jsonl",
    ):
        assert (run_dir / path).exists(), path
    assert list((run_dir / "tensorboard" / "vft").glob("events.*"))
    groups = read_candidates(run_dir / "candidates.jsonl")
    assert len(groups) == 8
    assert all(
        1 <= len(g.candidates) <= 3
        and all(c.correct is not None and c.ref_logp is not None for c in g.candidates)
        for g in groups
    )
    assert len(losses(run_dir, "vft")) == 4 and len(losses(run_dir, "aft")) == 2
    assert latest_tag(run_dir / "checkpoints" / "vft") == "step0000002"
