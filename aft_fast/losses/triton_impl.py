"""The `triton` backend of the fused operators (see `backends.py` for the three functions).

Unlike the CPU chunk loop, nothing here is chunked: the kernels keep every logits tile in registers,
so memory beyond inputs and gradients is O(T) whatever the size of the batch (`chunk_size` is
accepted for the common signature and ignored). `aft_forward` runs four launches:
    linear_logprob_fwd   per-token log-prob and log-sum-exp (one product: hidden @ weight^T)
    segment sums         index_add over tokens, then L_vft on the host (tiny)
    group_loss_fwd       every group's loss and d(loss)/d(sum), one program per group
    linear_logprob_bwd   recomputed logits -> grad_hidden, grad_weight, grad_bias (three products)
Tokens whose d(loss)/d(logp) is zero (groups without pairs, candidates in mode vft) are dropped
before the backward launch, as STYLE.md asks for ignored tokens.

GRAD_FILTER picks the backward's tile skipping (kernels/linear_logprob_bwd.py): "exact" (default:
only tiles whose products would add exact zeros), "cce" (Cut Cross-Entropy's threshold: faster on
peaked distributions, approximate) or "off"; the environment variable AFT_FAST_GRAD_FILTER sets it
at import.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from aft_fast.kernels.group_loss import group_loss_fwd
from aft_fast.kernels.linear_logprob import linear_logprob_fwd
from aft_fast.kernels.linear_logprob_bwd import linear_logprob_bwd
from aft_fast.losses.chunked import AFTResult
from aft_fast.losses.objectives import GroupPlan, LossConfig

GRAD_FILTER: str = os.environ.get("AFT_FAST_GRAD_FILTER", "exact")


def _cast(grads, hidden, weight, bias) -> tuple:
    pairs = zip(grads, (hidden, weight, bias), strict=True)
    return tuple(None if g is None else g.to(like.dtype) for g, like in pairs)


def logprob_forward(hidden, weight, bias, rows, targets, chunk_size: int):
    """(logp [T], lse [T]) fp32."""
    return linear_logprob_fwd(hidden, weight, bias, rows, targets)


def logprob_backward(hidden, weight, bias, rows, targets, lse, coef, need, chunk_size: int):
    """Gradients of sum_t coef[t] * logp[t] in the inputs' dtypes (None where need[i] is False)."""
    keep = coef != 0
    if not bool(keep.all()):  # drop the tokens that cannot contribute before the launch
        rows, targets, lse, coef = rows[keep], targets[keep], lse[keep], coef[keep]
    grads = linear_logprob_bwd(hidden, weight, bias, rows, targets, lse, coef, need=tuple(need),
                               grad_filter=GRAD_FILTER)
    return _cast(grads, hidden, weight, bias)


def group_csr(plan: GroupPlan) -> dict[str, torch.Tensor]:
    """The plan as CSR by group: [G + 1] offsets into members, pairs and top-rank candidates.

    The plan's pair and top arrays are already sorted by group; members are ordered here.
    """
    G = plan.num_groups

    def offsets(keys: torch.Tensor) -> torch.Tensor:
        ptr = torch.zeros(G + 1, dtype=torch.int64, device=keys.device)
        ptr[1:] = torch.cumsum(torch.bincount(keys, minlength=G), 0)
        return ptr

    return dict(
        member_ptr=offsets(plan.seg_group),
        member_seg=torch.argsort(plan.seg_group, stable=True),
        pair_ptr=offsets(plan.pair_group),
        pair_i=plan.pair_i.contiguous(),
        pair_j=plan.pair_j.contiguous(),
        top_ptr=offsets(plan.top_group),
        top_seg=plan.top_seg.contiguous(),
    )


def objective_with_grad(
    sums: torch.Tensor, counts: torch.Tensor, plan: GroupPlan, cfg: LossConfig, ref_logp: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, L_vft, L_align, d(loss)/d(sums) [S]) for sums [S] fp32: `objectives.objective` with its
    gradient, the align part computed by the group-loss kernel."""
    zero = sums.new_zeros(())
    dsum = torch.zeros_like(sums)
    vft = zero
    if plan.ref_tokens:
        vft = -sums[plan.ref_seg].sum() / plan.ref_tokens
        dsum[plan.ref_seg] = -cfg.w_vft / plan.ref_tokens
    align = zero
    if cfg.mode != "vft" and plan.num_valid and plan.pair_i.numel():
        group_loss, dalign = group_loss_fwd(
            sums, counts, ref_logp, **group_csr(plan), mode=cfg.base,
            boundary_constraint=cfg.boundary_constraint, beta=cfg.beta, dpo_beta=cfg.dpo_beta,
            pro_tau=cfg.pro_tau, scale=cfg.w_align / plan.num_valid,
        )
        align = group_loss.sum() / plan.num_valid
        dsum += dalign
    return cfg.w_vft * vft + cfg.w_align * align, vft, align, dsum


def aft_forward(
    hidden, weight, bias, rows, targets, segments, counts, plan: GroupPlan, cfg: LossConfig,
    ref_logp, need: tuple[bool, bool, bool], chunk_size: int,
) -> AFTResult:
    """Loss, its parts, per-segment sums and (where `need`) the gradients for d(loss) = 1."""
    logp, lse = linear_logprob_fwd(hidden, weight, bias, rows, targets)
    sums = torch.zeros(counts.numel(), dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, segments, logp)
    loss, vft, align, dsum = objective_with_grad(sums, counts.float(), plan, cfg, ref_logp)
    grads = (None, None, None)
    if any(need):
        grads = logprob_backward(hidden, weight, bias, rows, targets, lse, dsum[segments], need, chunk_size)
    return AFTResult(loss=loss, vft=vft, align=align, sums=sums, grads=grads)


IMPL = SimpleNamespace(logprob_forward=logprob_forward, logprob_backward=logprob_backward,
                       aft_forward=aft_forward)
