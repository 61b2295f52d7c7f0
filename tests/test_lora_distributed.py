"""LoRA adapters under DeepSpeed ZeRO-3 on the CPU (gloo, 2 processes): adapter gradients of the fused loss
against an unfused PEFT reference, a frozen base (bit for bit), optimizer state for the adapters alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from aft_fast.data.candidates import read_candidates
from aft_fast.data.collate import collate, encode_group
from aft_fast.models.adapters import LoraSettings, lora_config
from aft_fast.models.forward import forward_hidden
from aft_fast.models.loading import load_tokenizer
from aft_fast.reference import aft_loss_ref
from tests._train_support import (
    check,
    launch,
    make_assets,
)

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
