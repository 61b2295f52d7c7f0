"""Worker for tests/test_lora_distributed.py, started with `deepspeed --num_gpus 2`: LoRA adapters (PEFT,
random A and B so every adapter has a gradient at once) on the partitioned tiny Llama under ZeRO-3, AFTModel
with the fused loss. Rank r trains on items[r * micro:(r + 1) * micro] (the first step) and then on the
following micro batches. Rank 0 saves: the adapters before the first step, their full gradients after the
first backward, the losses, the gradients the frozen parameters got, Adam's state size summed over ranks,
the names of frozen parameters that changed after the last step, and the adapters after it."""

import sys

import deepspeed
import torch
from _train_support import zero3_rank  # the script's own folder, tests/, is on sys.path
from safetensors.torch import load_file

from aft_fast.data.collate import collate
from aft_fast.models import attention
from aft_fast.models.adapters import LoraSettings, adapter_state_dict, add_lora
from aft_fast.models.forward import AFTModel
from aft_fast.train.engine import build_engine, shutdown_distributed

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
model_dir, candidates, out_path, micro, steps = *args[:3], int(args[3]), int(args[4])

dist, tok, items, config, lm = zero3_rank(model_dir, candidates, micro, grad_clip=0.0)
attention.prepare(lm, "shared", dist.device)
peft = add_lora(lm, LoraSettings(r=4, alpha=8.0, init_weights=False), base=model_dir, seed=0)
before = adapter_state_dict(peft)
engine = build_engine(
    AFTModel(peft, mode="bcl", beta=0.5),
    config,
    lr=1e-2,
    steps=steps,
    warmup_ratio=0.0,
    min_lr_ratio=1.0,
    weight_decay=0.1,
)
losses, grads, frozen_grads = [], {}, []
for step in range(steps):
    start = (step * dist.world_size + dist.rank) * micro
    batch = collate(items[start : start + micro], pad_id=tok.pad_token_id, max_length=160, layout="shared")
    out = engine(**batch.tensors())
    engine.backward(out["loss"])
    if step == 0:
        # safe_get_full_grad is collective: every rank gathers, rank 0 keeps the result.
        for name, p in peft.named_parameters():
            g = deepspeed.utils.safe_get_full_grad(p)
            if p.requires_grad:
                grads[name] = g.detach().clone()
            elif g is not None:
                frozen_grads.append(name)
    step_losses = [None] * dist.world_size
    deepspeed.comm.all_gather_object(step_losses, out["loss"].item())
    losses.append(step_losses)
    engine.step()

# Adam's moments live in the optimizer's state, one pair per fp32 partition of trainable parameters.
state = engine.optimizer.optimizer.state
local = sum(t.numel() for s in state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
moments = torch.tensor([float(local)])
deepspeed.comm.all_reduce(moments)

# Every frozen parameter (the whole base, LM head included) against the checkpoint on disk, bit for bit.
disk = load_file(f"{model_dir}/model.safetensors")
changed, frozen_numel = [], 0
for name, p in peft.named_parameters():
    if p.requires_grad:
        continue
    frozen_numel += p.ds_numel if hasattr(p, "ds_numel") else p.numel()
    with deepspeed.zero.GatheredParameters([p]):
        key = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if dist.rank == 0 and not torch.equal(p.detach().cpu(), disk[key]):
            changed.append(name)
after = adapter_state_dict(peft)
if dist.rank == 0:
    torch.save(
        {
            "before": before,
            "after": after,
            "grads": grads,
            "losses": losses,
            "frozen_grads": frozen_grads,
            "moments": int(moments.item()),
            "frozen_numel": frozen_numel,
            "changed": changed,
            "head_requires_grad": lm.get_output_embeddings().weight.requires_grad,
        },
        out_path,
    )
shutdown_distributed()
