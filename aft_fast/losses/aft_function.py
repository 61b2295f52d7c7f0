"""AFTLossFunction: the fused operator as one autograd Function.

The loss is a scalar, so its gradients are formed during forward (chunk by chunk, see
aft_fast/ops/chunk_loop.py) and backward only scales them by the incoming gradient. The Function holds one
frozen `AFTCall` (the checked call: tokens, plan, options; aft_fast/ops/backend.py), picks the group loss
that suits the backend (`group_objective`) and hands both to the backend.
"""

from __future__ import annotations

import torch

from aft_fast.losses.group_objective import TorchObjective
from aft_fast.ops.backend import AFTCall, GroupObjective
from aft_fast.ops.dispatch import get_backend


def group_objective(call: AFTCall, need_grad: bool) -> GroupObjective:
    """The group loss of `call`: the triton backend's group-loss kernel, else autograd on the loss math
    (the CPU backends). need_grad: whether d(loss)/d(sums) is wanted (the kernel forms it anyway)."""
    if call.backend == "triton":
        from aft_fast.ops.triton_backend import GroupKernelObjective  # imports triton: only when it runs

        return GroupKernelObjective(call)
    return TorchObjective(call, need_grad)


class AFTLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, call: AFTCall):
        need = (bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]), bool(ctx.needs_input_grad[2]))
        objective = group_objective(call, any(need))
        result = get_backend(call.backend).aft_forward(hidden, weight, bias, call, need, objective)
        scores = result.sums / call.counts
        ctx.save_for_backward(*result.grads)
        ctx.mark_non_differentiable(scores, result.vft, result.align)
        return result.loss, scores, result.vft, result.align

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grads = ctx.saved_tensors
        if torch.ne(grad_loss, 1.0):
            grads = tuple(None if g is None else g * grad_loss.to(g.dtype) for g in grads)
        return (*grads, None)
