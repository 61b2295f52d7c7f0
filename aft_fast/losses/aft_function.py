"""AFTLossFunction: the fused operator as one autograd Function.

The loss is a scalar, so its gradients are formed during forward (chunk by chunk, see
aft_fast/ops/chunk_loop.py) and backward only scales them by the incoming gradient. The backend runs the
chunks; this layer brings the plan, the options and the group loss (aft_fast/losses/group_objective.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aft_fast.losses.group_objective import TorchObjective, live_segments
from aft_fast.losses.objectives import build_plan
from aft_fast.ops.dispatch import get_backend
from aft_fast.ops.logit_options import IDENTITY, LogitOptions
from aft_fast.options import LossOptions


@dataclass(frozen=True)
class AFTInputs:
    rows: torch.Tensor
    targets: torch.Tensor
    segments: torch.Tensor
    group: torch.Tensor
    label: torch.Tensor
    is_reference: torch.Tensor
    counts: torch.Tensor
    ref_logp: torch.Tensor | None
    cfg: LossOptions
    backend: str
    chunk_size: int | None
    post: LogitOptions = IDENTITY  # the logit post-processing (logit_scale, softcap, temperature)


class AFTLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, inputs: AFTInputs):
        counts = inputs.counts.to(torch.float32)
        plan = build_plan(inputs.group, inputs.label, inputs.is_reference, inputs.counts)
        need = tuple(ctx.needs_input_grad[:3])
        result = get_backend(inputs.backend).aft_forward(
            hidden, weight, bias, inputs.rows, inputs.targets, inputs.segments, counts, plan,
            inputs.cfg, inputs.ref_logp, need, inputs.chunk_size, objective=TorchObjective,
            live_seg=live_segments(plan, inputs.cfg, counts.numel()) if any(need) else None, post=inputs.post,
        )
        scores = result.sums / counts
        ctx.save_for_backward(*result.grads)
        ctx.mark_non_differentiable(scores, result.vft, result.align)
        return result.loss, scores, result.vft, result.align

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grads = ctx.saved_tensors
        if torch.ne(grad_loss, 1.0):
            grads = tuple(None if g is None else g * grad_loss.to(g.dtype) for g in grads)
        return (*grads, None)
