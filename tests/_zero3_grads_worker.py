"""Worker for tests/test_train_distributed.py::test_fused_loss_gradients_under_zero3, started with
`deepspeed --num_gpus 2`: one ZeRO-3 forward and backward of AFTModel on rank r's micro batch
items[r * micro:(r + 1) * micro] in the given layout; rank 0 saves every parameter's full gradient, the
losses and whether the LM head was partitioned (empty outside forward)."""

import sys

import deepspeed
import torch
from _train_support import zero3_rank  # the script's own folder, tests/, is on sys.path

from aft_fast.data.collate import collate
from aft_fast.models import attention
from aft_fast.models.forward import AFTModel
from aft_fast.train.engine import build_engine, shutdown_distributed

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
model_dir, candidates, out_path, mode, micro, layout = *args[:4], int(args[4]), args[5]

dist, tok, items, config, lm = zero3_rank(model_dir, candidates, micro, grad_clip=1.0)
attention.prepare(lm, layout, dist.device)
head = lm.get_output_embeddings().weight
partitioned = {
    "empty_outside_forward": head.numel() == 0,
    "local_numel": head.ds_tensor.numel(),
    "full_numel": head.ds_numel,
    "tied": head is lm.get_input_embeddings().weight,
}
engine = build_engine(
    AFTModel(lm, mode=mode, beta=0.5),
    config,
    lr=1e-3,
    steps=1,
    warmup_ratio=0.0,
    min_lr_ratio=1.0,
    weight_decay=0.0,
)
my_items = items[dist.rank * micro : (dist.rank + 1) * micro]
batch = collate(my_items, pad_id=tok.pad_token_id, max_length=160, layout=layout)
out = engine(**batch.tensors())
engine.backward(out["loss"])
# safe_get_full_grad is collective: every rank gathers, rank 0 keeps the result.
grads = {name: deepspeed.utils.safe_get_full_grad(p).detach().clone() for name, p in lm.named_parameters()}
losses = [None] * dist.world_size
deepspeed.comm.all_gather_object(losses, out["loss"].item())
if dist.rank == 0:
    torch.save({"grads": grads, "losses": losses, "partitioned": partitioned}, out_path)
shutdown_distributed()
