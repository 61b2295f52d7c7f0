"""The loss layer's group loss of an `aft_forward` (a `GroupObjective`, aft_fast/ops/backend.py) for the CPU
backends: autograd on `objectives.objective` over the plan's slice of each unit. (The triton backend runs
its group-loss kernel instead, `GroupKernelObjective` in aft_fast/ops/triton_backend.py;
`aft_fast.losses.aft_function` picks one of the two.)
"""

from __future__ import annotations

import torch

from aft_fast.losses.objectives import objective
from aft_fast.ops.backend import AFTCall


class TorchObjective:
    """The group loss of a unit as `objectives.objective` on its slice of the plan, d(loss)/d(sums) by
    autograd (the CPU backends). unit() returns that [S] gradient, or None when nothing in the unit's
    groups reaches the loss; result() the totals (loss, L_vft, L_align)."""

    def __init__(self, call: AFTCall, need_grad: bool):
        self.call = call
        self.need_grad = need_grad
        self.total = [torch.zeros((), dtype=torch.float32, device=call.counts.device) for _ in range(3)]

    def unit(self, sums: torch.Tensor, g0: int, g1: int) -> torch.Tensor | None:
        call = self.call
        with torch.enable_grad():
            leaf = sums.detach().requires_grad_(self.need_grad)
            parts = objective(leaf, call.counts, call.plan.slice_groups(g0, g1), call.options, call.ref_logp)
        for acc, part in zip(self.total, parts, strict=True):
            acc += part.detach()
        if not (self.need_grad and parts[0].requires_grad):
            return None  # nothing in these groups reaches the loss: skip the two gradient products
        (dsum,) = torch.autograd.grad(parts[0], leaf)
        return dsum

    def result(self, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss, vft, align = self.total
        return loss, vft, align
