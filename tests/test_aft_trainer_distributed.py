"""AFTTrainer under accelerate with 2 CPU processes (gloo): DDP, and DeepSpeed ZeRO-3 with every parameter
partitioned (so the fused loss must see the LM head gathered in forward and backward). Two SGD steps land
where the plain reference says: each step moves the weights by the mean over ranks of the reference AFT loss
gradient of that rank's groups."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra: pip install -e '.[trl]'")
from safetensors.torch import load_file  # noqa: E402

from aft_fast.data.candidates import write_candidates  # noqa: E402
from tests._integration_support import make_groups, make_tokenizer, reference_step, tiny_llama  # noqa: E402
from tests._train_support import PYTHON, ROOT, _run, check, clean_env, free_port  # noqa: E402

LR = 0.5  # tests/_aft_trainer_worker.py's
ACCELERATE = [PYTHON, "-m", "accelerate.commands.launch"]


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["ddp", "zero3"])
def test_two_processes_train_as_the_reference_says(tmp_path, backend):
    tokenizer = make_tokenizer(tmp_path / "tokenizer")
    write_candidates(tmp_path / "c.jsonl", make_groups(8))
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
        str(tmp_path / "c.jsonl"),
        backend,
    ]
    check(_run(cmd, clean_env(PYTHONPATH=str(ROOT)), timeout=400))
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
