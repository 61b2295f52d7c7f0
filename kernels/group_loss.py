"""The group loss of docs/design.md section 2: one program per group, loss and d(loss)/d(sum) together.

The layout is CSR by group (pointer arrays [G + 1]): the group's segments (`member_*`), its candidate
pairs (i, j) with label[i] > label[j] (`pair_*`) and its top-rank candidates (`top_*`). A program keeps
its members in one block and walks its pairs in blocks of BLOCK_P; a pair's gradient reaches its two
members through [BLOCK_P, BLOCK_M] incidence masks (a reduction, not atomics), so each segment's
gradient is written once, by the program of its group.

Per group, with s = sum / count, B = min over the top rank of s - beta, T_ij = sg(2B - s_i):
    align  log(1 + sum exp(s_j - s_i))            dcl   the same with sg(s_j)
    bcl    log(1 + sum exp(s_j - s_i) + sum exp(T_ij - s_j))
    dpo    mean of -log sigmoid(b * ((S_i - R_i) - (S_j - R_j))), S = sum, R = reference sum
    rrhf   sum of max(0, s_j - s_i)
    pro    sum over i with a pair of logsumexp(s_i/tau, s_j/tau for its pairs) - s_i/tau
    +bc    adds log(1 + sum exp(T_ij - s_j))
Two passes over the pairs: the log-sum-exp (online max and sum), then the gradient weights.

Shapes: S segments, G groups, P pairs, K top-rank candidates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MODES = {"align": 0, "dcl": 1, "bcl": 2, "dpo": 3, "rrhf": 4, "pro": 5}
# Largest [BLOCK_P, BLOCK_M] incidence tile: bounds registers whatever the group size.
MAX_TILE = 4096


@triton.jit
def _log1p(x):
    """log(1 + x) accurate for small x (no log1p in tl.math, and the interpreter has no libdevice)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _lse_update(run_max, run_sum, x, mask):
    """Online log-sum-exp: fold the masked values x into (run_max, run_sum)."""
    x = tl.where(mask, x, float("-inf"))
    new_max = tl.maximum(run_max, tl.max(x, axis=0))
    return new_max, run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)


@triton.jit
def _pair_block(start, end, pair_i, pair_j, sums, counts, BLOCK_P: tl.constexpr):
    """Segments, scores and sums of the pairs start .. start + BLOCK_P (masked at end)."""
    offs = start + tl.arange(0, BLOCK_P)
    mask = offs < end
    seg_i = tl.load(pair_i + offs, mask=mask, other=-2)  # -2 matches no member (members use -1)
    seg_j = tl.load(pair_j + offs, mask=mask, other=-2)
    sum_i = tl.load(sums + seg_i, mask=mask, other=0.0)
    sum_j = tl.load(sums + seg_j, mask=mask, other=0.0)
    s_i = sum_i / tl.load(counts + seg_i, mask=mask, other=1.0)
    s_j = sum_j / tl.load(counts + seg_j, mask=mask, other=1.0)
    return mask, seg_i, seg_j, sum_i, sum_j, s_i, s_j


@triton.jit
def _group_loss_fwd_kernel(
    sums, counts, ref_logp, member_ptr, member_seg, pair_ptr, pair_i, pair_j, top_ptr, top_seg,
    group_loss, dsum, beta, dpo_beta, inv_tau, scale,
    MODE: tl.constexpr, HAS_BC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    m0 = tl.load(member_ptr + g)
    offs_m = tl.arange(0, BLOCK_M)
    mmask = offs_m < tl.load(member_ptr + g + 1) - m0
    seg = tl.load(member_seg + m0 + offs_m, mask=mmask, other=-1)
    count_m = tl.load(counts + seg, mask=mmask, other=1.0)
    s_m = tl.load(sums + seg, mask=mmask, other=0.0) / count_m
    p0 = tl.load(pair_ptr + g)
    p1 = tl.load(pair_ptr + g + 1)

    boundary = 0.0  # B: 2B - s_i is the threshold of bcl and +bc; no gradient flows through it
    if MODE == 2 or HAS_BC:
        k0 = tl.load(top_ptr + g)
        k1 = tl.load(top_ptr + g + 1)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < k1
        tseg = tl.load(top_seg + offs_k, mask=kmask, other=0)
        top_s = tl.load(sums + tseg, mask=kmask, other=0.0) / tl.load(counts + tseg, mask=kmask, other=1.0)
        boundary = tl.where(k1 > k0, tl.min(tl.where(kmask, top_s, float("inf")), axis=0) - beta, 0.0)

    # Pass 1: the log-sum-exps. The "1 +" of log(1 + sum) is the starting (max 0, sum 1).
    run_max = 0.0
    run_sum = 1.0
    bc_max = 0.0
    bc_sum = 1.0
    pro_max = s_m * inv_tau  # per member i: logsumexp over {z_i} and the z_j of its pairs
    pro_sum = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
    upper = tl.zeros((BLOCK_M,), dtype=tl.int32)  # members that play i in some pair
    if MODE <= 2 or MODE == 5 or HAS_BC:
        for start in range(p0, p1, BLOCK_P):
            pmask, seg_i, seg_j, sum_i, sum_j, s_i, s_j = _pair_block(
                start, p1, pair_i, pair_j, sums, counts, BLOCK_P)
            if MODE <= 2:
                run_max, run_sum = _lse_update(run_max, run_sum, s_j - s_i, pmask)
            if MODE == 2:
                run_max, run_sum = _lse_update(run_max, run_sum, 2.0 * boundary - s_i - s_j, pmask)
            if HAS_BC:
                bc_max, bc_sum = _lse_update(bc_max, bc_sum, 2.0 * boundary - s_i - s_j, pmask)
            if MODE == 5:
                is_i = seg_i[:, None] == seg[None, :]
                z_j = tl.where(is_i, s_j[:, None] * inv_tau, float("-inf"))
                new_max = tl.maximum(pro_max, tl.max(z_j, axis=0))
                pro_sum = pro_sum * tl.exp(pro_max - new_max) + tl.sum(tl.exp(z_j - new_max[None, :]), axis=0)
                pro_max = new_max
                upper = tl.maximum(upper, tl.max(is_i.to(tl.int32), axis=0))
    lse = run_max + tl.log(run_sum)
    bc_lse = bc_max + tl.log(bc_sum)

    loss = 0.0
    dscore = tl.zeros((BLOCK_M,), dtype=tl.float32)  # d(group loss) / d(score) of each member
    dsum_direct = tl.zeros((BLOCK_M,), dtype=tl.float32)  # d(group loss) / d(sum) (dpo)
    if MODE <= 2:
        loss += lse
    if HAS_BC:
        loss += bc_lse
    pro_lse = pro_max + tl.log(pro_sum)
    if MODE == 5:
        has_pairs = (upper > 0) & mmask
        loss += tl.sum(tl.where(has_pairs, pro_lse - s_m * inv_tau, 0.0), axis=0)
        dscore += tl.where(has_pairs, tl.exp(s_m * inv_tau - pro_lse) - 1.0, 0.0) * inv_tau
    num_pairs = tl.maximum(p1 - p0, 1).to(tl.float32)

    # Pass 2: each pair's d(loss)/d(s_i) and d(loss)/d(s_j), reduced onto the members.
    for start in range(p0, p1, BLOCK_P):
        pmask, seg_i, seg_j, sum_i, sum_j, s_i, s_j = _pair_block(
            start, p1, pair_i, pair_j, sums, counts, BLOCK_P)
        g_i = tl.zeros((BLOCK_P,), dtype=tl.float32)
        g_j = tl.zeros((BLOCK_P,), dtype=tl.float32)
        if MODE <= 2:
            w = tl.exp(tl.where(pmask, s_j - s_i - lse, float("-inf")))
            g_i -= w
            if MODE != 1:  # dcl stops the gradient of s_j
                g_j += w
        if MODE == 2:
            g_j -= tl.exp(tl.where(pmask, 2.0 * boundary - s_i - s_j - lse, float("-inf")))
        if HAS_BC:
            g_j -= tl.exp(tl.where(pmask, 2.0 * boundary - s_i - s_j - bc_lse, float("-inf")))
        if MODE == 4:
            hinge = pmask & (s_j > s_i)
            loss += tl.sum(tl.where(hinge, s_j - s_i, 0.0), axis=0)
            g_i -= tl.where(hinge, 1.0, 0.0)
            g_j += tl.where(hinge, 1.0, 0.0)
        is_i = seg_i[:, None] == seg[None, :]
        is_j = seg_j[:, None] == seg[None, :]
        if MODE == 5:
            lse_i = tl.sum(tl.where(is_i, pro_lse[None, :], 0.0), axis=1)
            g_j += tl.exp(tl.where(pmask, s_j * inv_tau - lse_i, float("-inf"))) * inv_tau
        if MODE == 3:
            ref_i = tl.load(ref_logp + seg_i, mask=pmask, other=0.0)
            ref_j = tl.load(ref_logp + seg_j, mask=pmask, other=0.0)
            margin = dpo_beta * ((sum_i - ref_i) - (sum_j - ref_j))
            e = tl.exp(-tl.abs(margin))
            # -log sigmoid(m) = max(-m, 0) + log(1 + exp(-|m|)); its slope is -sigmoid(-m)
            loss += tl.sum(tl.where(pmask, tl.maximum(-margin, 0.0) + _log1p(e), 0.0), axis=0) / num_pairs
            slope = -tl.where(margin > 0, e / (1.0 + e), 1.0 / (1.0 + e)) * dpo_beta / num_pairs
            slope = tl.where(pmask, slope, 0.0)
            dsum_direct += tl.sum(tl.where(is_i, slope[:, None], 0.0), axis=0)
            dsum_direct -= tl.sum(tl.where(is_j, slope[:, None], 0.0), axis=0)
        dscore += tl.sum(tl.where(is_i, g_i[:, None], 0.0), axis=0)
        dscore += tl.sum(tl.where(is_j, g_j[:, None], 0.0), axis=0)

    tl.store(group_loss + g, loss)
    tl.store(dsum + seg, scale * (dscore / count_m + dsum_direct), mask=mmask)


def group_loss_fwd(
    sums: torch.Tensor,
    counts: torch.Tensor,
    ref_logp: torch.Tensor | None,
    member_ptr: torch.Tensor,
    member_seg: torch.Tensor,
    pair_ptr: torch.Tensor,
    pair_i: torch.Tensor,
    pair_j: torch.Tensor,
    top_ptr: torch.Tensor,
    top_seg: torch.Tensor,
    *,
    mode: str,
    boundary_constraint: bool,
    beta: float,
    dpo_beta: float,
    pro_tau: float,
    scale: float,
    block_p: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(group_loss [G], dsum [S]) fp32: each group's loss and scale * d(sum of group losses)/d(sums).

    sums, counts [S] fp32; ref_logp [S] (mode dpo) or None; *_ptr [G + 1] int64 CSR offsets into
    member_seg [S], pair_i/pair_j [P] and top_seg [K] (int64 segment ids, grouped by group). mode is the
    base mode (align | dcl | bcl | dpo | rrhf | pro); boundary_constraint adds the +bc term.
    `block_p` overrides the pair block (tests use it to force several blocks per group).
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if mode == "dpo" and ref_logp is None:
        raise ValueError("ref_logp: mode 'dpo' needs the reference log-prob of each segment")
    num_groups = member_ptr.numel() - 1
    widths = torch.stack([(p[1:] - p[:-1]).max() for p in (member_ptr, pair_ptr, top_ptr)])
    most_members, most_pairs, most_tops = (max(1, int(n)) for n in widths.tolist())
    block_m = triton.next_power_of_2(most_members)
    if block_p is None:
        block_p = min(triton.next_power_of_2(most_pairs), max(1, MAX_TILE // block_m))
    group_loss = torch.empty(num_groups, dtype=torch.float32, device=sums.device)
    dsum = torch.zeros_like(sums, dtype=torch.float32)
    ref = sums if ref_logp is None else ref_logp.to(torch.float32).contiguous()  # unread unless dpo
    launch_group_loss(
        num_groups, sums.float().contiguous(), counts.float().contiguous(), ref, member_ptr, member_seg,
        pair_ptr, pair_i, pair_j, top_ptr, top_seg, group_loss, dsum, mode=MODES[mode],
        has_bc=bool(boundary_constraint), beta=float(beta), dpo_beta=float(dpo_beta),
        inv_tau=1.0 / float(pro_tau), scale=float(scale),
        blocks=(block_m, block_p, triton.next_power_of_2(most_tops)),
    )
    return group_loss, dsum


def launch_group_loss(
    num_groups: int, sums, counts, ref_logp, member_ptr, member_seg, pair_ptr, pair_i, pair_j, top_ptr,
    top_seg, group_loss_out, dsum, *, mode: int, has_bc: bool, beta: float, dpo_beta: float,
    inv_tau: float, scale: float, blocks: tuple[int, int, int],
) -> None:
    """Launch the kernel on groups 0..num_groups-1 of the CSR offsets given (a view from group g0 on
    gives group-local program ids), with block sizes (BLOCK_M, BLOCK_P, BLOCK_K) chosen by the caller:
    no host sync, so a chunked caller can run it per chunk. `mode` is the MODES code."""
    block_m, block_p, block_k = blocks
    _group_loss_fwd_kernel[(num_groups,)](
        sums, counts, ref_logp, member_ptr, member_seg, pair_ptr, pair_i, pair_j, top_ptr, top_seg,
        group_loss_out, dsum, beta, dpo_beta, inv_tau, scale,
        MODE=mode, HAS_BC=has_bc, BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_K=block_k,
        num_warps=4 if block_m * block_p >= 1024 else 1,
    )
