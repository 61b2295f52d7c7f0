"""The loss layer's part of a chunked `aft_forward` (the `GroupObjective` of aft_fast/ops/backend.py):
which segments can have a gradient at all, and the group loss of a unit of whole groups with its
d(loss)/d(sums) by autograd on `objectives.objective` (the CPU backends; the triton backend runs its
group-loss kernel instead).
"""

from __future__ import annotations

import torch

from aft_fast.losses.objectives import GroupPlan, objective
from aft_fast.options import LossOptions


def live_segments(plan: GroupPlan, cfg: LossOptions, num_segments: int) -> torch.Tensor:
    """[S] bool: the segments whose d(loss)/d(sum) can be nonzero, from labels alone. A superset: a
    segment marked False has an exactly zero gradient (references when w_vft = 0, candidates in groups
    without pairs or in mode vft, and in dcl the candidates that only ever play j, whose score is
    detached)."""
    live = torch.zeros(num_segments, dtype=torch.bool, device=plan.seg_group.device)
    if cfg.w_vft != 0 and plan.ref_tokens:
        live[plan.ref_seg] = True
    if cfg.mode != "vft" and cfg.w_align != 0 and plan.num_valid:
        live[plan.pair_i] = True
        if cfg.base != "dcl":
            live[plan.pair_j] = True
    return live


class TorchObjective:
    """The group loss of a unit as `objectives.objective` on its slice of the plan, d(loss)/d(sums) by
    autograd (the CPU backends). unit() returns that [S] gradient, or None when nothing in the unit's
    groups reaches the loss; result() the totals (loss, L_vft, L_align)."""

    def __init__(self, counts, plan: GroupPlan, cfg: LossOptions, ref_logp, need_grad: bool):
        self.counts, self.plan, self.cfg, self.ref_logp = counts, plan, cfg, ref_logp
        self.need_grad = need_grad
        self.total = [torch.zeros((), dtype=torch.float32, device=counts.device) for _ in range(3)]

    def unit(self, sums: torch.Tensor, g0: int, g1: int) -> torch.Tensor | None:
        with torch.enable_grad():
            leaf = sums.detach().requires_grad_(self.need_grad)
            parts = objective(leaf, self.counts, self.plan.slice_groups(g0, g1), self.cfg, self.ref_logp)
        for acc, part in zip(self.total, parts, strict=True):
            acc += part.detach()
        if not (self.need_grad and parts[0].requires_grad):
            return None  # nothing in these groups reaches the loss: skip the two gradient products
        (dsum,) = torch.autograd.grad(parts[0], leaf)
        return dsum

    def result(self, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(self.total)
