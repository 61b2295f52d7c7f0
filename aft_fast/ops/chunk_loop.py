"""The chunk loop of the fused operator (docs/design.md section 3), shared by the chunked backends:
`ChunkLoop.aft_forward`, and `ChunkedBackend`, the `Backend` of a module of CPU chunk primitives, whose
methods are the loops of `aft_loss` and `linear_logprob`.

An engine runs one chunk of scored tokens at a time through one reused [chunk, V] buffer; nothing of
size [T, V] is ever allocated:
  `_Chunks` (here) drives two CPU chunk primitives (`aft_fast.ops.torch_chunks` or the C++ ops):
      `chunk_logprob` (logits -> log-sum-exp and target log-prob, leaving probabilities in the buffer)
      and `chunk_grad` (probabilities -> d(loss)/d(logits) -> grad_hidden, grad_weight), in fp32.
  `aft_fast.ops.triton_chunks.Chunks` (the triton backend's chunked strategy) keeps the inputs and the
      buffer in their dtype: cuBLAS products with fp32 accumulation, Triton row kernels.
The logit post-processing (`post`, aft_fast/ops/logit_options.py) reaches `_Chunks` as a scale of the
chunk's hidden rows and the bias (pre_scale) and a soft cap that the primitives apply (cap), the triton
engine as arguments of its row kernels. The engine's contract is `ChunkEngine` below.

`ChunkLoop.aft_forward` orders the scored tokens by group and packs whole groups into chunks. For such a
chunk the group loss, and so each token's d(loss)/d(logp), is known as soon as its log-probs are: the
gradient is formed in the same pass (three matrix products). A group larger than a chunk is split and
takes a second, recomputing pass (four products). The group loss of a unit comes from the caller
(`aft_fast.ops.backend.GroupObjective`): the loss layer's autograd on the plan's slice
(`aft_fast.losses.objectives.TorchObjective`) or the triton backend's group-loss kernel
(`aft_fast.ops.triton_backend.GroupKernelObjective`). A backend that subclasses `ChunkLoop` brings its
engine (`engine`), its sizing (`chunk_size`) and whether its engine skips dead rows (`SKIP_DEAD`: rows
whose gradient is zero by construction then go last in their chunk and take no gradient product).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from aft_fast.ops.backend import AFTCall, AFTResult, ChunkPrims, GroupObjective, LogProbCall, MaybeGrads, Need
from aft_fast.ops.logit_options import IDENTITY, LogitOptions
from aft_fast.options import GroupPlan

# One [chunk, V] fp32 buffer of about this many bytes (64 MiB: 512 tokens at V = 32000) ...
CHUNK_BYTES = 64 * 2**20
# ... grown up to this much so that a chunk holds a whole group: then the group's gradient is formed
# in the same pass (three products instead of four).
MAX_CHUNK_BYTES = 256 * 2**20


def default_chunk_size(vocab: int, tokens: int) -> int:
    """Tokens per chunk: a power of two filling CHUNK_BYTES, at least 32, at most the token count."""
    size = 1 << max(5, (CHUNK_BYTES // (4 * vocab)).bit_length() - 1)
    return max(1, min(size, tokens))


def group_chunk_size(vocab: int, tokens: int, largest_group: int) -> int:
    """The default chunk, grown to the largest group's token count within MAX_CHUNK_BYTES."""
    base = default_chunk_size(vocab, tokens)
    cap = max(base, MAX_CHUNK_BYTES // (4 * vocab))
    return min(max(base, largest_group), cap, tokens)


@dataclass
class Grads:
    """fp32 gradient accumulators; None where the input needs no gradient."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    @classmethod
    def zeros(cls, hidden, weight, bias, need: Need) -> Grads:
        f32 = torch.float32
        return cls(
            torch.zeros(hidden.shape, dtype=f32, device=hidden.device) if need[0] else None,
            torch.zeros(weight.shape, dtype=f32, device=weight.device) if need[1] else None,
            torch.zeros(bias.shape, dtype=f32, device=bias.device) if bias is not None and need[2] else None,
        )

    @property
    def any(self) -> bool:
        return self.hidden is not None or self.weight is not None or self.bias is not None

    def cast_like(self, hidden, weight, bias) -> MaybeGrads:
        def cast(g, like):
            return None if g is None else g.to(like.dtype)

        return cast(self.hidden, hidden), cast(self.weight, weight), cast(self.bias, bias)


EngineState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # the chunk's rows, buffer and logp or lse


class ChunkEngine(Protocol):
    """One call's chunk engine: its inputs and one reused [chunk, V] buffer (`_Chunks` here,
    `aft_fast.ops.triton_chunks.Chunks` for triton)."""

    def make_grads(self, need: Need) -> MaybeGrads:
        """The gradient accumulators (fp32; None where not `need`)."""
        ...

    def logprob(
        self,
        rows: torch.Tensor,
        targets: torch.Tensor,
        segments: torch.Tensor | None = None,
        sums: torch.Tensor | None = None,
        lse: torch.Tensor | None = None,
    ) -> tuple[EngineState, torch.Tensor]:
        """(state for `grad`, lse [c]) of one chunk; with `sums`, logp is added into sums[segments]; with
        `lse` (a recompute) it is not recomputed."""
        ...

    def grad(
        self,
        state: EngineState,
        live: int,
        dsum: torch.Tensor,
        segments: torch.Tensor,
        targets: torch.Tensor,
        rows: torch.Tensor,
        grads: Grads,
    ) -> None:
        """Gradients of the chunk's first `live` rows for coef = dsum[segments]."""
        ...

    def finish(self, grads: Grads) -> None: ...


class _Chunks:
    """The engine of the CPU prims: inputs upcast to fp32 once, one reused [chunk, V] fp32 buffer that
    `chunk_logprob` leaves holding the probabilities and `chunk_grad` turns into the gradient."""

    def __init__(
        self, prims: ChunkPrims, hidden, weight, bias, chunk_size: int, post: LogitOptions = IDENTITY
    ):
        self.prims = prims
        self.hidden = hidden
        self.weight = weight.float()
        # y = pre * z: folded into h and the bias; the primitives see y and apply the soft cap (cap).
        self.pre, self.cap = post.pre_scale, post.cap
        self.bias = None if bias is None else bias.float() * self.pre if self.pre != 1.0 else bias.float()
        self.buf = torch.empty(chunk_size, weight.shape[0], dtype=torch.float32, device=weight.device)

    def make_grads(self, need: Need) -> MaybeGrads:
        g = Grads.zeros(self.hidden, self.weight, self.bias, need)
        return g.hidden, g.weight, g.bias

    def rows_of(self, rows):
        """pre_scale * hidden[rows] in fp32: the chunk's [c, H] operand."""
        h = self.hidden.index_select(0, rows).float()  # a new tensor: scaled in place
        return h.mul_(self.pre) if self.pre != 1.0 else h

    def logprob(self, rows, targets, segments=None, sums=None, lse=None):
        """(state, lse) of one chunk, state = (h, probs, logp), probs a view of the shared buffer; with
        `sums`, logp is added into sums[segments]. With `lse` (a recompute) it is not recomputed."""
        h = self.rows_of(rows)
        probs = self.buf[: rows.numel()]
        cap = {} if self.cap is None else {"cap": self.cap}  # only prims that take a soft cap see one
        logp, lse = self.prims.chunk_logprob(h, self.weight, self.bias, targets, probs, lse, **cap)
        if sums is not None:
            sums.index_add_(0, segments, logp)
        return (h, probs, logp), lse

    def logprob_keep(self, rows, targets):
        """(logp, lse, keep, keep_scale) of one chunk, its probabilities kept in a new fp16 [c, V]
        tensor (p = keep * keep_scale) for `grad_kept`. Not with a soft cap (see `logprob_forward`)."""
        assert self.cap is None, "kept probabilities carry no soft-cap derivative"
        h = self.rows_of(rows)
        c, V = rows.numel(), self.weight.shape[0]
        keep = torch.empty(c, V, dtype=torch.float16, device=self.weight.device)
        keep_scale = torch.empty(c, dtype=torch.float32, device=self.weight.device)
        logp, lse = self.prims.chunk_logprob(
            h, self.weight, self.bias, targets, self.buf[:c], keep=keep, keep_scale=keep_scale
        )
        return logp, lse, keep, keep_scale

    def grad_kept(self, keep, keep_scale, logp, coef, targets, rows, grads: Grads) -> None:
        """Gradients of one chunk from its kept probabilities: the two gradient products, no recompute."""
        h = self.rows_of(rows)
        self.prims.chunk_grad_kept(
            keep,
            keep_scale,
            logp,
            self.buf[: rows.numel()],
            coef,
            targets,
            h,
            self.weight,
            rows,
            grads.hidden,
            grads.weight,
            grads.bias,
        )

    def grad_rows(self, state, coef, targets, rows, grads: Grads) -> None:
        h, probs, _ = state
        if self.cap is not None:  # d logits / d y = cap * (1 - tanh^2): the tanh part is in probs
            coef = coef * self.cap
        self.prims.chunk_grad(
            probs, coef, targets, h, self.weight, rows, grads.hidden, grads.weight, grads.bias
        )

    def grad(self, state, live: int, dsum, segments, targets, rows, grads: Grads) -> None:
        """Gradients of the first `live` rows (all of them here) for coef = dsum[segments]."""
        h, probs, logp = state
        state = (h[:live], probs[:live], logp[:live])
        self.grad_rows(state, dsum[segments[:live]], targets[:live], rows[:live], grads)

    def finish(self, grads: Grads) -> None:
        """grad_hidden and grad_bias take d y / d z = pre_scale (grad_weight has it from h)."""
        if self.pre != 1.0:
            for g in (grads.hidden, grads.bias):
                if g is not None:
                    g.mul_(self.pre)


def kept_chunks(vocab: int, tokens: int, chunk_size: int, keep_bytes: int) -> int:
    """How many chunks, from the first, keep their probabilities within keep_bytes: 2 bytes a logit
    (fp16) and 4 a token (its scale)."""
    per_token = 2 * vocab + 4
    kept_tokens = min(tokens, keep_bytes // per_token)
    return kept_tokens // chunk_size + (kept_tokens == tokens and tokens % chunk_size != 0)


def _take(t: torch.Tensor, pick: torch.Tensor | None) -> torch.Tensor:
    return t if pick is None else t.index_select(0, pick)


def _pack_groups(group_tokens: list[int], chunk_size: int) -> list[tuple[int, int, int, int]]:
    """Greedy runs of whole groups of at most chunk_size tokens: (group0, group1, token0, token1)."""
    units, g0, t0, tokens = [], 0, 0, 0
    for g, n in enumerate(group_tokens):
        if tokens and tokens + n > chunk_size:
            units.append((g0, g, t0, t0 + tokens))
            g0, t0, tokens = g, t0 + tokens, 0
        tokens += n
    units.append((g0, len(group_tokens), t0, t0 + tokens))
    return units


@dataclass(frozen=True)
class Unit:
    """Groups g0..g1-1, whose tokens are t0..t1-1 of the chunk order; the first `live` of them can have a
    nonzero gradient. A unit of at most chunk_size tokens is one chunk (single pass); a larger one is a
    single group, split into chunks and scored in two passes."""

    g0: int
    g1: int
    t0: int
    t1: int
    live: int


def plan_chunks(
    plan: GroupPlan,
    segments: torch.Tensor,
    chunk_size: int | None,
    sizing: Callable[[int], int] | None,
    live_seg: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[Unit], int]:
    """(order [T], units, chunk_size): the scored tokens ordered by group, whole groups packed into units.

    chunk_size None: sizing(largest group's token count). With live_seg [S] (engines that skip dead
    rows), each unit's tokens are ordered live first, so that its live rows are a prefix. Host syncs:
    one, for the per-group token counts.
    """
    tok_group = plan.seg_group[segments]
    G = plan.num_groups
    if live_seg is None:
        group_tokens = group_live = torch.bincount(tok_group, minlength=G).tolist()
    else:
        tok_live = live_seg[segments]
        group_tokens, group_live = torch.stack(
            [torch.bincount(tok_group, minlength=G), torch.bincount(tok_group[tok_live], minlength=G)]
        ).tolist()
    if chunk_size is None:
        assert sizing is not None  # a chunk size or a way to find one
        chunk_size = sizing(max(group_tokens, default=0))
    chunk_size = max(1, chunk_size)
    units = [
        Unit(g0, g1, t0, t1, sum(group_live[g0:g1]))
        for g0, g1, t0, t1 in _pack_groups(group_tokens, chunk_size)
    ]
    if live_seg is None:
        return torch.argsort(tok_group, stable=True), units, chunk_size
    groups_per_unit = torch.tensor([u.g1 - u.g0 for u in units])
    unit_of_group = torch.repeat_interleave(torch.arange(len(units)), groups_per_unit)
    key = unit_of_group.to(tok_group.device)[tok_group] * 2 + (~tok_live).long()
    return torch.argsort(key, stable=True), units, chunk_size


class ChunkLoop(abc.ABC):
    """`aft_forward` as the chunk loop, for the backends that run it: a subclass brings its engine
    (`engine`), its default chunk (`chunk_size`) and `SKIP_DEAD` (see the module docstring)."""

    SKIP_DEAD = False  # every row takes part in the gradient products

    @abc.abstractmethod
    def engine(self, hidden, weight, bias, chunk_size: int, post: LogitOptions) -> ChunkEngine:
        """The products and row kernels one chunk runs on (torch, cpp or triton)."""

    def chunk_size(self, vocab: int, tokens: int, largest_group: int, dtype: torch.dtype) -> int:
        """Tokens per chunk when the call gives none: the default, grown to hold the largest group."""
        return group_chunk_size(vocab, tokens, largest_group)

    def aft_forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        call: AFTCall,
        need: Need,
        objective: GroupObjective,
    ) -> AFTResult:
        """Loss, its parts, per-segment sums, and (where `need`) the gradients, all in one call: the scored
        tokens in units of whole groups, each unit's group loss from `objective` once its sums are final.
        call.chunk_size None: `chunk_size`, so that chunks hold whole groups where memory allows."""
        vocab, tokens = weight.shape[0], call.rows.numel()
        live_seg = call.plan.live_segments(call.options) if self.SKIP_DEAD and any(need) else None

        def sizing(largest: int) -> int:
            return self.chunk_size(vocab, tokens, largest, weight.dtype)

        order, units, chunk_size = plan_chunks(call.plan, call.segments, call.chunk_size, sizing, live_seg)
        rows, targets, segments = call.rows[order], call.targets[order], call.segments[order]

        chunks = self.engine(hidden, weight, bias, chunk_size, call.post)
        grads = Grads(*chunks.make_grads(need))
        sums = torch.zeros(call.counts.numel(), dtype=torch.float32, device=hidden.device)
        state = None
        for unit in units:
            spans = [(a, min(a + chunk_size, unit.t1)) for a in range(unit.t0, unit.t1, chunk_size)]
            one_pass = len(spans) == 1
            lses = []
            for a, b in spans:
                state, lse = chunks.logprob(rows[a:b], targets[a:b], segments[a:b], sums)
                lses.append(lse)
            dsum = objective.unit(sums, unit.g0, unit.g1)
            if dsum is None or not grads.any:
                continue
            for (a, b), lse in zip(spans, lses, strict=True):
                live = min(max(unit.t0 + unit.live - a, 0), b - a)  # the unit's live rows are its first ones
                if live == 0:
                    continue
                if not one_pass:  # recompute the logits of this chunk's live rows
                    state, _ = chunks.logprob(rows[a : a + live], targets[a : a + live], lse=lse[:live])
                assert state is not None
                chunks.grad(state, live, dsum, segments[a:b], targets[a:b], rows[a:b], grads)

        chunks.finish(grads)
        del chunks, state  # free the [chunk, V] buffer before the gradients are cast
        loss, vft, align = objective.result(sums)
        return AFTResult(loss, vft, align, sums=sums, grads=grads.cast_like(hidden, weight, bias))


class ChunkedBackend(ChunkLoop):
    """The `Backend` of a module of CPU chunk primitives (`ChunkPrims`: torch_chunks, cpp_chunks), run by
    the engine `_Chunks`: `aft_forward` is the chunk loop above, `logprob_forward` and `logprob_backward`
    the two passes of `linear_logprob`."""

    def __init__(self, prims: ChunkPrims):
        self.prims = prims

    def engine(self, hidden, weight, bias, chunk_size: int, post: LogitOptions) -> _Chunks:
        return _Chunks(self.prims, hidden, weight, bias, chunk_size, post)

    def logprob_forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, call: LogProbCall
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Per-token (logp [T], lse [T]) in fp32, one chunk of tokens at a time, and `kept`: for the first
        chunks that fit in keep_bytes, their probabilities (keep fp16 [c, V], keep_scale [c]), flat. With a
        soft cap nothing is kept (the gradient needs each logit's tanh, which kept probabilities lack):
        backward recomputes."""
        rows, targets, chunk_size, post = call.rows, call.targets, call.chunk_size, call.post
        chunks = self.engine(hidden, weight, bias, chunk_size, post)
        T = rows.numel()
        logp = torch.empty(T, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        n_kept = kept_chunks(weight.shape[0], T, chunk_size, call.keep_bytes) if post.cap is None else 0
        kept: list[torch.Tensor] = []
        for i, start in enumerate(range(0, T, chunk_size)):
            sl = slice(start, start + chunk_size)
            if i < n_kept:
                logp[sl], lse[sl], keep, keep_scale = chunks.logprob_keep(rows[sl], targets[sl])
                kept += [keep, keep_scale]
            else:
                state, lse[sl] = chunks.logprob(rows[sl], targets[sl])
                logp[sl] = state[2]
        return logp, lse, kept

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
        """Gradients for d(loss)/d(logp) = coef [T]: from the kept probabilities of the first chunks (two
        products each), recomputing the other chunks' logits from `lse` (three). Tokens with coef 0 (a
        segment the caller's loss does not use) are left out of every product; a chunk of them is skipped."""
        rows, targets, chunk_size = call.rows, call.targets, call.chunk_size
        chunks = self.engine(hidden, weight, bias, chunk_size, call.post)
        grads = Grads.zeros(hidden, weight, bias, need)
        live = coef != 0
        every = bool(live.all())
        for i, start in enumerate(range(0, rows.numel(), chunk_size)):
            sl = slice(start, start + chunk_size)
            pick = None  # positions within the chunk that take part, None: all of them
            if not every:
                pick = live[sl].nonzero().squeeze(1)
                if pick.numel() == 0:
                    continue
                if pick.numel() == live[sl].numel():
                    pick = None

            c_rows, c_targets, c_coef = (_take(t[sl], pick) for t in (rows, targets, coef))
            if 2 * i < len(kept):
                keep, keep_scale = (_take(t, pick) for t in kept[2 * i : 2 * i + 2])
                chunks.grad_kept(keep, keep_scale, _take(logp[sl], pick), c_coef, c_targets, c_rows, grads)
            else:
                state, _ = chunks.logprob(c_rows, c_targets, lse=_take(lse[sl], pick))
                chunks.grad_rows(state, c_coef, c_targets, c_rows, grads)
        chunks.finish(grads)
        return grads.cast_like(hidden, weight, bias)
