"""The loss family of docs/design.md section 2, vectorized over [S] segment sums.

This is the cheap half of the fused operator and the one place its math is written for the CPU
backends: given each segment's summed log-prob it returns L = w_vft * L_vft + w_align * L_align,
and autograd on these few small tensors gives d(loss)/d(sum) for the heavy pass.

Everything that depends only on labels (which candidate pairs exist, which groups count, which
candidates hold the top rank) is built once per call by `build_plan` into a `GroupPlan` (typed in
aft_fast/options.py, where the backends read it), sorted by group, so the fused chunk loop can take the
slice of the plan that belongs to the groups of one chunk. `TorchObjective` is that autograd, unit by
unit: the group loss (`aft_fast.ops.backend.GroupObjective`) that the CPU backends run (the triton backend
runs its group-loss kernel instead, `GroupKernelObjective` in aft_fast/ops/triton_backend.py;
`aft_fast.losses.aft_function.group_objective` picks one of the two).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aft_fast.ops.backend import AFTCall
from aft_fast.options import GroupPlan, LossOptions, candidate_pairs


def build_plan(
    group: torch.Tensor, label: torch.Tensor, is_reference: torch.Tensor, counts: torch.Tensor
) -> GroupPlan:
    """Enumerate the pairs of every group from labels alone. group, label [S] int64; counts [S]."""
    uniq, seg_group = torch.unique(group, return_inverse=True)
    num_groups = uniq.numel()
    order = torch.argsort(seg_group, stable=True)
    pair_i, pair_j = candidate_pairs(group, label, is_reference)  # sorted by group
    pair_group = seg_group[pair_i]
    candidate = ~is_reference
    valid = torch.bincount(pair_group, minlength=num_groups) > 0

    # The top rank of each group is the highest label among its candidates.
    floor = label.min() - 1
    top_rank = torch.full((num_groups,), int(floor), dtype=label.dtype, device=label.device)
    top_rank = top_rank.scatter_reduce(0, seg_group, torch.where(candidate, label, floor), "amax")
    is_top = candidate & (label == top_rank[seg_group]) & valid[seg_group]
    top_seg = order[is_top[order]]
    ref_seg = order[is_reference[order]]
    return GroupPlan(
        num_groups=num_groups,
        num_valid=int(valid.sum()),
        ref_tokens=int(counts[is_reference].sum()),
        seg_group=seg_group,
        pair_i=pair_i,
        pair_j=pair_j,
        pair_group=pair_group,
        top_seg=top_seg,
        top_group=seg_group[top_seg],
        ref_seg=ref_seg,
        ref_group=seg_group[ref_seg],
    )


def _log1p_sum_exp(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Per bucket: log(1 + sum of exp(values) in that bucket). Empty buckets give 0."""
    shift = torch.zeros(size, dtype=values.dtype, device=values.device)
    shift = shift.scatter_reduce(0, index, values.detach(), "amax")  # includes the 0 of the "1 +"
    total = torch.exp(-shift).index_add(0, index, torch.exp(values - shift[index]))
    return shift + torch.log(total)


def objective(
    sums: torch.Tensor,
    counts: torch.Tensor,
    plan: GroupPlan,
    cfg: LossOptions,
    ref_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, L_vft part, L_align part) of the groups in `plan`, from sums [S] and counts [S].

    On a slice of the plan this is that slice's share: the shares of all slices add up to the loss.
    """
    zero = sums.new_zeros(())
    vft = -sums[plan.ref_seg].sum() / plan.ref_tokens if plan.ref_tokens else zero
    align = zero
    if cfg.mode != "vft" and plan.num_valid and plan.pair_i.numel():
        align = _group_losses(sums, counts, plan, cfg, ref_logp).sum() / plan.num_valid
    return cfg.w_vft * vft + cfg.w_align * align, vft, align


def _group_losses(
    sums: torch.Tensor, counts: torch.Tensor, plan: GroupPlan, cfg: LossOptions, ref_logp: torch.Tensor | None
) -> torch.Tensor:
    """[G] loss of each group (0 for groups outside the plan's pairs)."""
    scores = sums / counts
    G, pg = plan.num_groups, plan.pair_group
    si, sj = scores[plan.pair_i], scores[plan.pair_j]
    base = cfg.base

    threshold = None
    if base == "bcl" or cfg.boundary_constraint:
        # B = min over the top rank - beta; T_ij = sg(2B - s_i) (stop-gradient as a whole).
        top = torch.full((G,), float("inf"), dtype=scores.dtype, device=scores.device)
        top = top.scatter_reduce(0, plan.top_group, scores[plan.top_seg].detach(), "amin")
        threshold = (2 * (top[pg] - cfg.beta) - si).detach()

    if base == "align":
        loss = _log1p_sum_exp(sj - si, pg, G)
    elif base == "dcl":
        loss = _log1p_sum_exp(sj.detach() - si, pg, G)
    elif base == "bcl":
        loss = _log1p_sum_exp(torch.cat([sj - si, threshold - sj]), torch.cat([pg, pg]), G)
    elif base == "dpo":
        assert ref_logp is not None  # checked at the API (dpo modes need it)
        delta = sums - ref_logp.to(sums.dtype)
        pair_loss = -F.logsigmoid(cfg.dpo_beta * (delta[plan.pair_i] - delta[plan.pair_j]))
        num_pairs = torch.bincount(pg, minlength=G).clamp(min=1).to(sums.dtype)
        loss = sums.new_zeros(G).index_add(0, pg, pair_loss) / num_pairs
    elif base == "rrhf":
        loss = sums.new_zeros(G).index_add(0, pg, torch.relu(sj - si))
    elif base == "pro":
        # Each candidate i above its group's lowest rank: -log softmax of s_i/tau over {i} + {j below i}.
        z = scores / cfg.pro_tau
        zj = z[plan.pair_j]
        shift = z.detach().scatter_reduce(0, plan.pair_i, zj.detach(), "amax")
        total = torch.exp(z - shift).index_add(0, plan.pair_i, torch.exp(zj - shift[plan.pair_i]))
        upper = torch.bincount(plan.pair_i, minlength=z.numel()) > 0
        per_candidate = torch.where(upper, shift + torch.log(total) - z, torch.zeros_like(z))
        loss = sums.new_zeros(G).index_add(0, plan.seg_group, per_candidate)
    else:
        raise ValueError(f"mode: unknown mode {cfg.mode!r}")

    if cfg.boundary_constraint:
        loss = loss + _log1p_sum_exp(threshold - sj, pg, G)
    return loss


class TorchObjective:
    """The group loss of a unit as `objective` on its slice of the plan, d(loss)/d(sums) by
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
