"""The chunk loop of the fused operator (DESIGN.md section 3) for the CPU backends.

A backend supplies two chunk primitives (`aft_fast.ops.torch_chunks` or the C++ ops):
`chunk_logprob` (logits -> log-sum-exp and target log-prob, leaving probabilities in a reused
[chunk, V] buffer) and `chunk_grad` (probabilities -> d(loss)/d(logits) -> grad_hidden, grad_weight).
Nothing of size [T, V] is ever allocated.

`aft_forward` orders the scored tokens by group and packs whole groups into chunks. For such a chunk
the group loss, and so each token's d(loss)/d(logp), is known as soon as its log-probs are: the
gradient is formed in the same pass (three matrix products). A group larger than a chunk is split
and takes a second, recomputing pass (four products).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from aft_fast.losses.objectives import GroupPlan, LossConfig, objective

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
    def zeros(cls, hidden, weight, bias, need: tuple[bool, bool, bool]) -> Grads:
        f32 = torch.float32
        return cls(
            torch.zeros(hidden.shape, dtype=f32, device=hidden.device) if need[0] else None,
            torch.zeros(weight.shape, dtype=f32, device=weight.device) if need[1] else None,
            torch.zeros(bias.shape, dtype=f32, device=bias.device) if bias is not None and need[2] else None,
        )

    @property
    def any(self) -> bool:
        return self.hidden is not None or self.weight is not None or self.bias is not None

    def cast_like(self, hidden, weight, bias) -> tuple:
        def cast(g, like):
            return None if g is None else g.to(like.dtype)

        return cast(self.hidden, hidden), cast(self.weight, weight), cast(self.bias, bias)


class _Chunks:
    """Upcast inputs and one reused [chunk, V] buffer for the loops below."""

    def __init__(self, prims: ModuleType, hidden, weight, bias, chunk_size: int):
        self.prims = prims
        self.hidden = hidden
        self.weight = weight.float()
        self.bias = None if bias is None else bias.float()
        self.buf = torch.empty(chunk_size, weight.shape[0], dtype=torch.float32, device=weight.device)

    def logprob(self, rows, targets, lse=None):
        """(h, probs, logp, lse) of one chunk; probs is a view of the shared buffer."""
        h = self.hidden.index_select(0, rows).float()
        probs = self.buf[: rows.numel()]
        logp, lse = self.prims.chunk_logprob(h, self.weight, self.bias, targets, probs, lse)
        return h, probs, logp, lse

    def grad(self, probs, coef, targets, h, rows, grads: Grads) -> None:
        self.prims.chunk_grad(probs, coef, targets, h, self.weight, rows, grads.hidden, grads.weight, grads.bias)


def logprob_forward(prims, hidden, weight, bias, rows, targets, chunk_size: int):
    """Per-token (logp [T], lse [T]) in fp32, one chunk of tokens at a time."""
    chunks = _Chunks(prims, hidden, weight, bias, chunk_size)
    logp = torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(logp)
    for start in range(0, rows.numel(), chunk_size):
        sl = slice(start, start + chunk_size)
        _, _, logp[sl], lse[sl] = chunks.logprob(rows[sl], targets[sl])
    return logp, lse


def logprob_backward(prims, hidden, weight, bias, rows, targets, lse, coef, need, chunk_size: int):
    """Gradients for d(loss)/d(logp) = coef [T], recomputing each chunk's logits from `lse`."""
    chunks = _Chunks(prims, hidden, weight, bias, chunk_size)
    grads = Grads.zeros(hidden, weight, bias, need)
    for start in range(0, rows.numel(), chunk_size):
        sl = slice(start, start + chunk_size)
        h, probs, _, _ = chunks.logprob(rows[sl], targets[sl], lse[sl])
        chunks.grad(probs, coef[sl], targets[sl], h, rows[sl], grads)
    return grads.cast_like(hidden, weight, bias)


@dataclass
class AFTResult:
    loss: torch.Tensor
    vft: torch.Tensor
    align: torch.Tensor
    sums: torch.Tensor
    grads: tuple  # (grad_hidden, grad_weight, grad_bias) for d(loss) = 1, in the inputs' dtypes


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


def aft_forward(
    prims, hidden, weight, bias, rows, targets, segments, counts, plan: GroupPlan, cfg: LossConfig,
    ref_logp, need: tuple[bool, bool, bool], chunk_size: int | None,
) -> AFTResult:
    """Loss, its parts, per-segment sums, and (when `need`) the gradients, all in one call.

    chunk_size None: `group_chunk_size`, so that chunks hold whole groups where memory allows.
    """
    tok_group = plan.seg_group[segments]
    order = torch.argsort(tok_group, stable=True)
    rows, targets, segments = rows[order], targets[order], segments[order]
    group_tokens = torch.bincount(tok_group, minlength=plan.num_groups).tolist()
    if chunk_size is None:
        chunk_size = group_chunk_size(weight.shape[0], rows.numel(), max(group_tokens))

    chunks = _Chunks(prims, hidden, weight, bias, chunk_size)
    grads = Grads.zeros(hidden, weight, bias, need)
    sums = torch.zeros(counts.numel(), dtype=torch.float32, device=hidden.device)
    total = [torch.zeros((), dtype=torch.float32, device=hidden.device) for _ in range(3)]

    for g0, g1, t0, t1 in _pack_groups(group_tokens, chunk_size):
        spans = [slice(a, min(a + chunk_size, t1)) for a in range(t0, t1, chunk_size)]
        one_pass = len(spans) == 1
        kept = None
        lses = []
        for sl in spans:
            kept = chunks.logprob(rows[sl], targets[sl])
            sums.index_add_(0, segments[sl], kept[2])
            lses.append(kept[3])

        with torch.enable_grad():
            leaf = sums.detach().requires_grad_(grads.any)
            parts = objective(leaf, counts, plan.slice_groups(g0, g1), cfg, ref_logp)
        for acc, part in zip(total, parts):
            acc += part.detach()
        if not (grads.any and parts[0].requires_grad):
            continue  # nothing in these groups reaches the loss: skip the two gradient products
        (dsum,) = torch.autograd.grad(parts[0], leaf)

        for sl, lse in zip(spans, lses):
            if one_pass:
                h, probs, _, _ = kept
            else:
                h, probs, _, _ = chunks.logprob(rows[sl], targets[sl], lse)
            chunks.grad(probs, dsum[segments[sl]], targets[sl], h, rows[sl], grads)

    return AFTResult(*total, sums=sums, grads=grads.cast_like(hidden, weight, bias))
