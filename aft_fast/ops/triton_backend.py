"""The `triton` backend of the fused operators: `TritonBackend`, whose methods are the three of
`aft_fast.ops.backend.Backend`, the host code around the Triton kernels (kernels/), and
`GroupKernelObjective`, the group loss of its calls (the group-loss kernel).

`aft_forward` has two strategies, picked by STRATEGY (the environment variable AFT_FAST_TRITON_STRATEGY
sets it at import; the benchmark sets the attribute):

"chunked" (default): the chunk loop (`chunk_loop.ChunkLoop`) with the engine of `aft_fast.ops.triton_chunks`.
Chunks hold whole groups (a 512 MiB logits buffer in the input dtype, grown to 1 GiB for a large
group), so each chunk's group loss, and with it every token's d(loss)/d(logp), is known once its
log-probs are, and the gradient is formed in the same pass: three cuBLAS products per chunk (logits,
grad_hidden, grad_weight) around two memory-bound Triton row kernels, and the group-loss kernel on the
chunk's groups (`GroupKernelObjective`, no host sync in the loop). A group larger than the buffer is
split and takes a recomputing second pass (four products for its tokens only). Rows whose gradient is
zero by construction go last in their chunk and skip the gradient products. Memory beyond inputs and
fp32 gradient accumulators: the buffer, O(chunk x H) and O(T).

"fused": nothing is chunked; the kernels keep every logits tile in registers, so memory beyond inputs
and gradients is O(T) whatever the size of the batch (`chunk_size` is ignored). Four launches:
    linear_logprob_fwd   per-token log-prob and log-sum-exp (one product: hidden @ weight^T)
    segment sums         index_add over tokens, then L_vft on the host (tiny)
    group loss           every group's loss and d(loss)/d(sum), one program per group (the same
                         `GroupKernelObjective`, on all groups at once)
    linear_logprob_bwd   recomputed logits -> grad_hidden, grad_weight, grad_bias (three products)
Tokens whose d(loss)/d(logp) is zero (groups without pairs, candidates in mode vft) are dropped before the
backward launch, as for every ignored token (docs/design.md section 3). `linear_logprob` runs
these fused kernels too (its gradient is only known after the caller's loss: four products), except for
the tokens whose logits keep_probs keeps: those take the chunked strategy's cuBLAS products and row
kernels, their logits computed once in forward and kept in the input dtype, so backward does two products
for them (see `logprob_forward`).

The chunked strategy does three products where the fused one does four (its floor is 4/3 of the
matmul floor), runs them in cuBLAS, and adds memory-bound passes of ~6 bytes per bf16 logit; so it is
the default. The fused one needs no [chunk, V] buffer.

GRAD_FILTER picks the fused backward's tile skipping (kernels/linear_logprob_bwd.py): "exact" (default:
only tiles whose products would add exact zeros), "cce" (Cut Cross-Entropy's threshold: faster on
peaked distributions, approximate) or "off"; the environment variable AFT_FAST_GRAD_FILTER sets it
at import.
"""

from __future__ import annotations

import os

import torch
import triton

from aft_fast.kernels import group_loss
from aft_fast.kernels.chunk_softmax import chunk_softmax_fwd
from aft_fast.kernels.linear_logprob import check_inputs, linear_logprob_fwd
from aft_fast.kernels.linear_logprob_bwd import linear_logprob_bwd
from aft_fast.ops import triton_chunks
from aft_fast.ops.backend import AFTCall, AFTResult, GroupObjective, LogProbCall, MaybeGrads, Need
from aft_fast.ops.chunk_loop import ChunkLoop, Grads
from aft_fast.ops.logit_options import IDENTITY, LogitOptions
from aft_fast.options import GroupPlan

GRAD_FILTER: str = os.environ.get("AFT_FAST_GRAD_FILTER", "exact")
STRATEGIES = ("chunked", "fused")
STRATEGY: str = os.environ.get("AFT_FAST_TRITON_STRATEGY", "chunked")


def _cast(grads, hidden, weight, bias) -> MaybeGrads:
    g_hidden, g_weight, g_bias = (
        None if g is None else g.to(like.dtype) for g, like in zip(grads, (hidden, weight, bias), strict=True)
    )
    return g_hidden, g_weight, g_bias


def kept_tokens(vocab: int, tokens: int, dtype: torch.dtype, keep_bytes: int) -> int:
    """How many tokens, from the first, keep their logits within keep_bytes (V logits each in `dtype`)."""
    return min(tokens, keep_bytes // (vocab * torch.finfo(dtype).bits // 8))


def _fused_grads(
    hidden, weight, bias, rows, targets, lse, coef, need: Need, post: LogitOptions = IDENTITY
) -> MaybeGrads:
    """fp32 gradients of sum_t coef[t] * logp[t] by the fused `linear_logprob_bwd` (recomputed logits)."""
    live = coef != 0
    if not bool(live.all()):  # drop the tokens that cannot contribute before the launch
        rows, targets, lse, coef = rows[live], targets[live], lse[live], coef[live]
    return linear_logprob_bwd(
        hidden,
        weight,
        bias,
        rows,
        targets,
        lse,
        coef,
        need=tuple(need),
        grad_filter=GRAD_FILTER,
        **post.kernel_kwargs(),
    )


def _kept_grads(
    hidden,
    weight,
    bias,
    rows,
    targets,
    lse,
    coef,
    logits,
    need,
    grads: Grads | None,
    post: LogitOptions = IDENTITY,
) -> Grads:
    """Gradients of sum_t coef[t] * logp[t] over the n kept tokens (rows, targets, lse, coef [n]) from
    their logits [n, V], added into the fp32 `grads` (None: new accumulators). The logits are left as
    they are (a second backward reads them again): slices of a chunk of the tokens with coef != 0 are
    gathered into the engine's buffer, which `chunk_softmax_bwd` turns into the logits' gradient for the
    two products (`triton_chunks.Chunks.grad`, fp32 accumulation)."""
    live = torch.nonzero(coef != 0).squeeze(1)  # host sync: the tokens that can contribute
    m = live.numel()
    size = triton_chunks.chunk_size(weight.shape[0], m, 0, logits.dtype)
    engine = triton_chunks.Chunks(hidden, weight, bias, size, post)
    if grads is None:
        grads = Grads(*engine.make_grads(need))
    else:
        engine.weight_written = True  # grad_weight already holds the other tokens' part: add to it
    index = torch.arange(size, device=rows.device)  # coef_index of a slice: its own coefficients
    for a in range(0, m, size):
        sel = live[a : a + size]
        c = sel.numel()
        buf = torch.index_select(logits, 0, sel, out=engine.buf[:c])
        sel_rows = rows[sel]
        state = (hidden.index_select(0, sel_rows), buf, lse[sel])
        engine.grad(state, c, coef[sel], index[:c], targets[sel], sel_rows, grads)
    engine.finish(grads)
    return grads


def group_csr(plan: GroupPlan, members: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The plan as CSR by group: [G + 1] offsets into members, pairs and top-rank candidates.

    members: [S] bool, the segments listed as members (default: all). The plan's pair and top arrays
    are already sorted by group; members are ordered here.
    """
    G = plan.num_groups

    def offsets(keys: torch.Tensor) -> torch.Tensor:
        ptr = torch.zeros(G + 1, dtype=torch.int64, device=keys.device)
        ptr[1:] = torch.cumsum(torch.bincount(keys, minlength=G), 0)
        return ptr

    member_seg = torch.argsort(plan.seg_group, stable=True)
    if members is not None:
        member_seg = member_seg[members[member_seg]]
    return dict(
        member_ptr=offsets(plan.seg_group[member_seg]),
        member_seg=member_seg,
        pair_ptr=offsets(plan.pair_group),
        pair_i=plan.pair_i.contiguous(),
        pair_j=plan.pair_j.contiguous(),
        top_ptr=offsets(plan.top_group),
        top_seg=plan.top_seg.contiguous(),
    )


class GroupKernelObjective:
    """The group loss of a triton call (a `GroupObjective`): the group-loss kernel (kernels/group_loss.py)
    on each unit's groups, writing their candidates' d(loss)/d(sum) into one [S] buffer that already holds
    the references' constant -w_vft / ref_tokens; the losses are summed once at the end. Block sizes are
    fixed once per call (one host sync), so a unit launches one kernel and syncs nothing. The fused
    strategy runs it on all groups at once."""

    def __init__(self, call: AFTCall):
        plan, options, counts = call.plan, call.options, call.counts
        f32 = dict(dtype=torch.float32, device=counts.device)
        self.plan, self.options = plan, options
        self.counts = counts.to(torch.float32).contiguous()
        self.dsum = torch.zeros(counts.numel(), **f32)
        if plan.ref_tokens:
            self.dsum[plan.ref_seg] = -options.w_vft / plan.ref_tokens
        self.group_loss = torch.zeros(plan.num_groups, **f32)
        self.active = options.mode != "vft" and plan.num_valid > 0 and plan.pair_i.numel() > 0
        if not self.active:
            return
        if options.base == "dpo" and call.ref_logp is None:
            raise ValueError("ref_logp: mode 'dpo' needs the reference log-prob of each segment")
        candidates = torch.ones(counts.numel(), dtype=torch.bool, device=counts.device)
        candidates[plan.ref_seg] = False  # references are not members: their dsum entry stays put
        self.csr = group_csr(plan, candidates)
        widths = torch.stack(
            [
                (p[1:] - p[:-1]).max()
                for p in (self.csr["member_ptr"], self.csr["pair_ptr"], self.csr["top_ptr"])
            ]
        )
        most_members, most_pairs, most_tops = (max(1, int(n)) for n in widths.tolist())
        block_m = triton.next_power_of_2(most_members)
        block_p = min(triton.next_power_of_2(most_pairs), max(1, group_loss.MAX_TILE // block_m))
        self.blocks = (block_m, block_p, triton.next_power_of_2(most_tops))
        self.ref = None if call.ref_logp is None else call.ref_logp.to(torch.float32).contiguous()

    def unit(self, sums: torch.Tensor, g0: int, g1: int) -> torch.Tensor:
        """Launches the kernel on groups g0..g1-1 only: the CSR offsets from g0 on give it group-local
        program ids; it writes group_loss[g0:g1] and dsum of those groups' members."""
        if self.active:
            options, csr = self.options, self.csr
            group_loss.launch_group_loss(
                g1 - g0,
                sums,
                self.counts,
                sums if self.ref is None else self.ref,  # ref: unread unless dpo
                csr["member_ptr"][g0:],
                csr["member_seg"],
                csr["pair_ptr"][g0:],
                csr["pair_i"],
                csr["pair_j"],
                csr["top_ptr"][g0:],
                csr["top_seg"],
                self.group_loss[g0:],
                self.dsum,
                mode=group_loss.MODES[options.base],
                has_bc=options.boundary_constraint,
                beta=options.beta,
                dpo_beta=options.dpo_beta,
                inv_tau=1.0 / options.pro_tau,
                scale=options.w_align / self.plan.num_valid,
                blocks=self.blocks,
            )
        return self.dsum

    def result(self, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        plan, options = self.plan, self.options
        zero = sums.new_zeros(())
        vft = -sums[plan.ref_seg].sum() / plan.ref_tokens if plan.ref_tokens else zero
        align = self.group_loss.sum() / plan.num_valid if self.active else zero
        return options.w_vft * vft + options.w_align * align, vft, align


class TritonBackend(ChunkLoop):
    """The `Backend` of the Triton kernels. Its methods read STRATEGY and GRAD_FILTER, module attributes
    that a benchmark or a test may set, at each call."""

    SKIP_DEAD = True  # the loop orders rows without gradient last in their chunk; the engine skips them

    chunk_size = staticmethod(triton_chunks.chunk_size)  # the loop's sizing: a buffer in the input dtype

    def engine(self, hidden, weight, bias, chunk_size: int, post: LogitOptions) -> triton_chunks.Chunks:
        return triton_chunks.Chunks(hidden, weight, bias, chunk_size, post)

    def logprob_forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, call: LogProbCall
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(logp [T], lse [T]) fp32, and `kept`: the logits [n, V] in the input dtype of the first n tokens
        that fit in keep_bytes (`kept_tokens`), or nothing.

        The kept tokens' logits are one cuBLAS product written straight into the kept tensor, their logp
        and lse the row kernel `chunk_softmax_fwd` on it; the other tokens take the fused
        `linear_logprob_fwd`, which keeps no logits (`chunk_size` is unused: the fused kernels need no
        chunks).
        """
        rows, targets, keep_bytes = call.rows, call.targets, call.keep_bytes
        kw = call.post.kernel_kwargs()  # the kept logits are z: the kernels apply the post-processing on read
        n = kept_tokens(weight.shape[0], rows.numel(), weight.dtype, keep_bytes) if keep_bytes else 0
        if n == 0:
            logp, lse = linear_logprob_fwd(hidden, weight, bias, rows, targets, **kw)
            return logp, lse, []
        check_inputs(hidden, weight, bias, rows, targets)
        h = hidden.index_select(0, rows[:n])
        logits = torch.empty(n, weight.shape[0], dtype=weight.dtype, device=weight.device)
        if bias is None:
            torch.mm(h, weight.t(), out=logits)
        else:
            torch.addmm(bias, h, weight.t(), out=logits)
        del h
        logp, lse = chunk_softmax_fwd(logits, targets[:n], **kw)
        if n < rows.numel():
            rest = linear_logprob_fwd(hidden, weight, bias, rows[n:], targets[n:], **kw)
            logp, lse = (torch.cat([kept, other]) for kept, other in zip((logp, lse), rest, strict=True))
        return logp, lse, [logits]

    def logprob_backward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        call: LogProbCall,
        lse: torch.Tensor,
        coef: torch.Tensor,
        need: Need,
        logp: torch.Tensor,
        kept: tuple[torch.Tensor, ...] | list[torch.Tensor] = (),
    ) -> MaybeGrads:
        """Gradients of sum_t coef[t] * logp[t] in the inputs' dtypes (None where need[i] is False).

        kept: `logprob_forward`'s; its n tokens take two products from their logits (`_kept_grads`), the
        others the fused `linear_logprob_bwd`, whose fp32 gradients then accumulate the kept tokens' part
        (one fp32 accumulator per input in either case).
        """
        rows, targets, post = call.rows, call.targets, call.post
        if not kept:
            fused = _fused_grads(hidden, weight, bias, rows, targets, lse, coef, need, post)
            return _cast(fused, hidden, weight, bias)
        n = kept[0].shape[0]
        grads = None
        if n < rows.numel():
            grads = Grads(
                *_fused_grads(hidden, weight, bias, rows[n:], targets[n:], lse[n:], coef[n:], need, post)
            )
        grads = _kept_grads(
            hidden, weight, bias, rows[:n], targets[:n], lse[:n], coef[:n], kept[0], need, grads, post
        )
        return grads.cast_like(hidden, weight, bias)

    def aft_forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        call: AFTCall,
        need: Need,
        objective: GroupObjective,
    ) -> AFTResult:
        """Loss, its parts, per-segment sums and (where `need`) the gradients for d(loss) = 1, the group loss
        from `objective` (`GroupKernelObjective` as the loss layer builds it for this backend).

        STRATEGY "chunked": the chunk loop, chunk_size None sized by `triton_chunks.chunk_size`. "fused"
        (chunk_size unused): the fused forward kernel, the group loss of all groups, the fused backward.
        """
        if STRATEGY not in STRATEGIES:
            raise ValueError(
                f"AFT_FAST_TRITON_STRATEGY: expected one of {', '.join(STRATEGIES)}, got {STRATEGY!r}"
            )
        check_inputs(hidden, weight, bias, call.rows, call.targets)
        if STRATEGY == "chunked":
            return super().aft_forward(hidden, weight, bias, call, need, objective)
        rows, targets, kw = call.rows, call.targets, call.post.kernel_kwargs()
        logp, lse = linear_logprob_fwd(hidden, weight, bias, rows, targets, **kw)
        sums = torch.zeros(call.counts.numel(), dtype=torch.float32, device=hidden.device)
        sums.index_add_(0, call.segments, logp)
        dsum = objective.unit(sums, 0, call.plan.num_groups)
        loss, vft, align = objective.result(sums)
        grads: MaybeGrads = (None, None, None)
        if any(need):
            dsum = torch.zeros_like(sums) if dsum is None else dsum  # None: no group reaches the loss
            coef = dsum[call.segments]
            grads = _cast(
                _fused_grads(hidden, weight, bias, rows, targets, lse, coef, need, call.post),
                hidden,
                weight,
                bias,
            )
        return AFTResult(loss=loss, vft=vft, align=align, sums=sums, grads=grads)
