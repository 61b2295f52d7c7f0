"""LoRA adapters under DeepSpeed ZeRO-3 on the CPU (gloo, 2 processes): adapter gradients of the fused loss
against an unfused PEFT reference, a frozen base (bit for bit), optimizer state for the adapters alone; the
trainer with --lora_r: PEFT adapter folders, resume after a kill, the adapter loaded with peft and the merged
export scoring alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file as safetensors_weights
from transformers import AutoModelForCausalLM

from aft_fast.data.candidates import read_candidates
from aft_fast.data.collate import collate, encode_group
from aft_fast.eval.evaluate import score_groups
from aft_fast.models.adapters import LoraSettings, lora_config
from aft_fast.models.folders import TRAINER_STATE
from aft_fast.models.forward import forward_hidden
from aft_fast.models.loading import load_replica, load_tokenizer
from aft_fast.reference import aft_loss_ref
from aft_fast.train.checkpoint import latest_tag
from tests._train_support import (
    aft_stage_args,
    assert_weights_close,
    check,
    clean_env,
    launch,
    losses,
    make_assets,
    run_python,
)
from tests.test_prompts import CHAT_TEMPLATE

pytestmark = pytest.mark.distributed

MICRO, STEPS = 3, 3
TIMEOUT = 900  # seconds per launch: generous, CI machines start DeepSpeed slowly when loaded


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    return make_assets(tmp_path_factory.mktemp("assets"), n_groups=18)


@pytest.fixture(scope="module")
def worker(assets, tmp_path_factory) -> dict:
    """_lora_worker.py on 2 ranks: LoRA r=4 (A and B random) on every linear layer, 3 ZeRO-3 steps."""
    out = tmp_path_factory.mktemp("lora_worker") / "out.pt"
    args = [str(assets["model"]), str(assets["candidates"]), str(out), str(MICRO), str(STEPS)]
    check(launch(2, args, script="tests/_lora_worker.py", timeout=TIMEOUT))
    return torch.load(out)


def test_adapter_gradients_equal_unfused_peft_reference(assets, worker):
    """The first step's adapter gradients (ZeRO-3, LM head partitioned, tied and frozen; prompts shared)
    equal autograd's through full logits on an ordinary PEFT model with the same adapters, one padded row
    per member, the two ranks' losses averaged as data parallelism does."""
    tok = load_tokenizer(assets["model"])
    lm = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32)
    model = get_peft_model(lm, lora_config(LoraSettings(r=4, alpha=8.0, init_weights=False)))
    missing, unexpected = model.load_state_dict(worker["before"], strict=False)
    assert not unexpected and all(".lora_" not in k for k in missing)
    items = [encode_group(g, tok) for g in read_candidates(assets["candidates"])]
    rank_losses = []
    for rank in range(2):
        b = collate(items[rank * MICRO : (rank + 1) * MICRO], pad_id=tok.pad_token_id, max_length=160)
        head = lm.get_output_embeddings().weight
        ref = aft_loss_ref(
            forward_hidden(model, b), head, **b.token_index(), **b.group_inputs(), mode="bcl", beta=0.5
        )
        rank_losses.append(ref.loss)
    torch.stack(rank_losses).mean().backward()
    assert worker["losses"][0] == pytest.approx([x.item() for x in rank_losses], rel=1e-5)
    ref_grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert (
        ref_grads.keys() == worker["grads"].keys() and len(ref_grads) == 4 * 7 * 2
    )  # layers x linears x A, B
    for name, g in ref_grads.items():
        torch.testing.assert_close(
            worker["grads"][name], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )
    assert all(g.abs().max() > 1e-4 for g in ref_grads.values())  # every adapter really gets a gradient


def test_base_stays_frozen_bit_for_bit(worker):
    assert worker["frozen_grads"] == [] and worker["head_requires_grad"] is False
    assert worker["changed"] == []  # every base parameter equals the checkpoint after 3 optimizer steps
    moved = [k for k in worker["before"] if not torch.equal(worker["before"][k], worker["after"][k])]
    assert sorted(moved) == sorted(worker["before"])  # ... while every adapter trained


def test_optimizer_state_is_the_adapters_alone(worker):
    """Adam keeps two moments per trainable element: twice the adapters' size (summed over the ranks'
    partitions), nothing for the 1.84M frozen base parameters."""
    adapter_numel = sum(v.numel() for v in worker["before"].values())
    assert worker["moments"] == 2 * adapter_numel
    assert adapter_numel < 0.05 * worker["frozen_numel"]


# ---------------------------------------------------------------------------------------------------------
# The trainer with --lora_r: adapter folders, resume, merged export, every stage.

AFT_STEPS = 4


def lora_args(assets: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    return aft_stage_args(assets, run_dir, AFT_STEPS, 6, 3, "5e-3", "--lora_r=4", "--lora_alpha=8", *extra)


@pytest.fixture(scope="module")
def lora_run(assets, tmp_path_factory) -> Path:
    """The uninterrupted reference: 2 processes, LoRA r=4 on every linear layer, a merged export."""
    run_dir = tmp_path_factory.mktemp("lora_run")
    check(launch(2, lora_args(assets, run_dir, "--merge_adapters"), timeout=TIMEOUT))
    return run_dir


def test_stage_output_is_a_peft_adapter_folder(assets, lora_run):
    out = lora_run / "aft"
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    adapter = safetensors_weights(out / "adapter_model.safetensors")
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    config = json.loads((out / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == assets["model"].resolve()
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert json.loads((out / TRAINER_STATE).read_text())["steps"] == AFT_STEPS
    assert any(v.abs().max() > 0 for k, v in adapter.items() if ".lora_B." in k)  # B starts at 0: it trained


def test_resume_after_kill_gives_the_same_adapters(assets, lora_run, tmp_path):
    env = clean_env(AFT_FAST_KILL_AT="aft:3")
    killed = launch(2, lora_args(assets, tmp_path, "--save_every=2"), env=env, timeout=TIMEOUT)
    assert killed.returncode != 0, "the run was meant to be killed after step 3"
    assert latest_tag(tmp_path / "checkpoints" / "aft") == "step0000002" and not (tmp_path / "aft").exists()
    check(launch(2, lora_args(assets, tmp_path, "--save_every=2", "--resume"), timeout=TIMEOUT))
    ours, ref = losses(tmp_path, "aft"), losses(lora_run, "aft")
    assert sorted(ours) == sorted(ref) == list(range(1, AFT_STEPS + 1))
    for step in ref:
        assert ours[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), f"loss at step {step}"
    assert_weights_close(
        safetensors_weights(tmp_path / "aft" / "adapter_model.safetensors"),
        safetensors_weights(lora_run / "aft" / "adapter_model.safetensors"),
        rtol=1e-4,
        atol=1e-6,
    )


def test_saved_adapter_loads_with_peft_and_scores_alike(assets, lora_run):
    """PeftModel.from_pretrained on the base (what a user does), the merged export and the trainer's own
    loading (sample and eval) give the same scores; the base alone scores otherwise."""
    tok = load_tokenizer(assets["model"])
    groups = read_candidates(assets["candidates"])[:6]
    cpu = torch.device("cpu")

    def scores(model) -> list[float]:
        return [s for r in score_groups(model, tok, groups, batch_size=3, progress=False) for s in r.scores]

    base = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32)
    with_peft = scores(PeftModel.from_pretrained(base, lora_run / "aft").eval())
    merged = scores(AutoModelForCausalLM.from_pretrained(lora_run / "aft_merged", dtype=torch.float32).eval())
    ours = scores(load_replica(lora_run / "aft", cpu, torch.float32))
    assert with_peft == pytest.approx(merged, rel=1e-5, abs=1e-5)
    assert with_peft == pytest.approx(ours, rel=1e-5, abs=1e-5)
    plain = scores(load_replica(assets["model"], cpu, torch.float32))
    assert max(abs(a - b) for a, b in zip(plain, with_peft, strict=True)) > 1e-3


def test_pipeline_with_adapters_and_chat_prompts(assets, tmp_path):
    """--stage all with LoRA in vft and aft and chat prompts: each training stage writes an adapter folder
    (aft's on top of vft's) and its merged export; sample, its dpo reference pass and eval load base plus
    adapters; the run records its prompt format, and a later stage asking for another one is refused."""
    tok = load_tokenizer(assets["tokenizer"])
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(tmp_path / "chat_tokenizer")
    run_dir = tmp_path / "run"
    common = [f"--run_dir={run_dir}", "--synthetic_train=48", "--synthetic_test=6", "--progress=false"]
    result = launch(
        2,
        [
            *common,
            f"--model={assets['model']}",
            f"--tokenizer={tmp_path / 'chat_tokenizer'}",
            "--prompt_format=chat",
            "--lora_r=4",
            "--lora_alpha=8",
            "--merge_adapters",
            "--vft_steps=3",
            "--vft_batch_size=8",
            "--vft_micro_batch_size=4",
            "--vft_lr=5e-3",
            "--aft_steps=2",
            "--aft_batch_size=4",
            "--aft_micro_batch_size=2",
            "--sample_limit=8",
            "--num_samples=3",
            "--eval_samples=2",
            "--max_new_tokens=16",
            "--mode=dpo",
            "--log_every=1",
            "--save_every=0",
            "--tensorboard=false",
        ],
        timeout=2 * TIMEOUT,
    )
    check(result)
    for stage in ("vft", "eval_vft", "sample", "aft", "eval_aft"):
        assert f"| {stage} |" in result.stdout
    assert "LoRA r=4 alpha=8" in result.stdout
    base_of = {
        s: Path(json.loads((run_dir / s / "adapter_config.json").read_text())["base_model_name_or_path"])
        for s in ("vft", "aft")
    }
    assert base_of == {"vft": assets["model"].resolve(), "aft": (run_dir / "vft").resolve()}
    for s in ("vft", "aft"):
        assert (run_dir / f"{s}_merged" / "model.safetensors").is_file()
        assert json.loads((run_dir / s / TRAINER_STATE).read_text())["config"]["prompt_format"] == "chat"
    assert all(
        c.ref_logp is not None for g in read_candidates(run_dir / "candidates.jsonl") for c in g.candidates
    )
    # The merged aft export equals base + vft adapter + aft adapter, as the trainer loads it.
    ids = torch.tensor([tok.encode("Question: 2 + 2?", add_special_tokens=False)])
    with torch.no_grad():
        ours = load_replica(run_dir / "aft", torch.device("cpu"), torch.float32)(input_ids=ids).logits
        exported = AutoModelForCausalLM.from_pretrained(run_dir / "aft_merged")(input_ids=ids).logits
    torch.testing.assert_close(ours, exported, rtol=1e-5, atol=1e-5)

    plain = run_python(
        [
            f"--run_dir={tmp_path / 'plain'}",
            "--stage=sample",
            f"--vft_model={run_dir / 'vft'}",
            *common[1:],
        ],
        timeout=TIMEOUT,
    )  # prompt_format plain, the default
    assert plain.returncode != 0
    assert "was trained with prompt_format chat" in plain.stdout and "Traceback" not in plain.stdout
