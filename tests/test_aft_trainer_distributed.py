"""AFTTrainer and TRL's DPOTrainer under accelerate with 2 CPU processes (gloo): DDP, and DeepSpeed ZeRO-3
with every parameter partitioned (so a fused loss must see the LM head gathered in forward and backward).

AFTTrainer: two SGD steps land where the plain reference says, each moving the weights by the mean over
ranks of the reference AFT loss gradient of that rank's groups. DPOTrainer under ZeRO-3: aft-fast's fused
head (patch_trl) trains as TRL's own head does, loss, metrics and weights."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra: pip install -e '.[trl]'")
from safetensors.torch import load_file  # noqa: E402

from aft_fast.data.candidates import write_candidates  # noqa: E402
from tests._integration_support import (  # noqa: E402
    LR,  # tests/_aft_trainer_worker.py's
    make_groups,
    make_tokenizer,
    reference_step,
    tiny_llama,
)
from tests._train_support import PYTHON, ROOT, _run, check, clean_env, free_port  # noqa: E402

ACCELERATE = [PYTHON, "-m", "accelerate.commands.launch"]


def launch_worker(tmp_path, candidates: str, task: str, timeout: float):
    """tests/_aft_trainer_worker.py on 2 CPU processes under accelerate, the tokenizer in tmp_path/tokenizer:
    returns its output folder, tmp_path/out."""
    out = tmp_path / "out"
    cmd = [
        *ACCELERATE,
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(ROOT / "tests" / "_aft_trainer_worker.py"),
        str(out),
        str(tmp_path / "tokenizer"),
        candidates,
        task,
    ]
    check(_run(cmd, clean_env(PYTHONPATH=str(ROOT)), timeout=timeout))
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["ddp", "zero3"])
def test_two_processes_train_as_the_reference_says(tmp_path, backend):
    tokenizer = make_tokenizer(tmp_path / "tokenizer")
    write_candidates(tmp_path / "c.jsonl", make_groups(8))
    out = launch_worker(tmp_path, str(tmp_path / "c.jsonl"), backend, timeout=400)
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["steps"] == 2
    assert result["distributed_type"].endswith("DEEPSPEED" if backend == "zero3" else "MULTI_CPU")

    items = [torch.load(out / f"items_rank{r}.pt", weights_only=False) for r in range(2)]
    assert all(len(per_rank) == 2 for per_rank in items)
    prompts = [tuple(g.prompt) for per_rank in items for step in per_rank for g in step]
    assert len(prompts) == len(set(prompts)) == 8  # each rank, each step: groups of its own
    model = tiny_llama(len(tokenizer), tie=True)
    for step in range(2):
        losses, grads = zip(
            *(reference_step(model, items[r][step], tokenizer, mode="bcl") for r in range(2)), strict=True
        )
        assert result["losses"][step] == pytest.approx(sum(losses) / 2, rel=1e-5), step  # the mean over ranks
        with torch.no_grad():
            for name, p in model.named_parameters():
                p -= LR * (grads[0][name] + grads[1][name]) / 2
    saved = load_file(str(out / "model.safetensors"))
    for name, p in model.named_parameters():
        torch.testing.assert_close(
            saved[name], p.detach(), rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.distributed
def test_dpo_under_zero3_same_with_either_head(tmp_path):
    make_tokenizer(tmp_path / "tokenizer")
    out = launch_worker(tmp_path, "-", "dpo-zero3", timeout=500)
    result = json.loads((out / "result.json").read_text())
    assert result["distributed_type"].endswith("DEEPSPEED")
    assert result["heads"] == {"trl": "trl/trainer/utils.py", "aft_fast": "aft_fast/integrations/trl.py"}
    ours, theirs = result["logs"]["aft_fast"], result["logs"]["trl"]
    assert len(ours) == len(theirs) == 2 and ours[1]["loss"] != ours[0]["loss"]
    for mine, other in zip(ours, theirs, strict=True):
        assert mine.keys() == other.keys()
        for key in mine:
            assert mine[key] == pytest.approx(other[key], rel=1e-5, abs=1e-5), key
    a, b = (load_file(str(out / head / "model.safetensors")) for head in ("aft_fast", "trl"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
