"""The fused operator's one entry and its autograd Function (docs/design.md section 3).

`aft_loss_with` is `aft_fast.aft_loss` for a caller that already holds its loss options as one frozen
`LossOptions` (`AFTModel`, `AFTLoss`; `aft_loss` builds one from its keywords and calls it): it checks
the call and builds one frozen `AFTCall` (the checked call: tokens, plan, options; aft_fast/ops/backend.py).
`AFTLossFunction` holds that call, picks the group loss that suits the backend (`group_objective`) and
hands both to the backend. The loss is a scalar, so its gradients are formed during forward (chunk by
chunk, see aft_fast/ops/chunk_loop.py) and backward only scales them by the incoming gradient.
"""

from __future__ import annotations

import torch

from aft_fast.losses import checks
from aft_fast.losses.objectives import TorchObjective, build_plan
from aft_fast.ops.backend import AFTCall, GroupObjective
from aft_fast.ops.dispatch import get_backend, resolve_backend
from aft_fast.options import LossOptions
from aft_fast.outputs import AFTOutput


def aft_loss_with(
    options: LossOptions, hidden: torch.Tensor, weight: torch.Tensor, *,
    rows: torch.Tensor, targets: torch.Tensor, segments: torch.Tensor,
    group: torch.Tensor, label: torch.Tensor, is_reference: torch.Tensor,
    ref_logp: torch.Tensor | None = None, bias: torch.Tensor | None = None, backend: str = "auto",
    chunk_size: int | None = None,
    logit_scale: float = 1.0, softcap: float | None = None, temperature: float = 1.0,
) -> AFTOutput:
    """`aft_fast.aft_loss` with its six loss options given whole, as `options` (checked when it was built);
    every other argument as there."""
    checks.check_projection(hidden, weight, bias)
    checks.check_options(chunk_size=chunk_size, backend=backend)
    checks.check_groups(hidden, group, label, is_reference, ref_logp, options)
    counts = checks.check_tokens(hidden, weight, rows, targets, segments, group.numel())
    post = checks.check_logit_options(logit_scale, softcap, temperature)
    call = AFTCall(
        rows=rows, targets=targets, segments=segments, counts=counts.to(torch.float32),
        plan=build_plan(group, label, is_reference, counts), options=options, ref_logp=ref_logp,
        backend=resolve_backend(backend, hidden.device), chunk_size=chunk_size, post=post,
    )
    loss, scores, vft, align = AFTLossFunction.apply(hidden, weight, bias, call)
    return AFTOutput(loss=loss, scores=scores, vft_loss=vft, align_loss=align)


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
