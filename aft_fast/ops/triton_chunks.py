"""Chunk primitives of the triton backend's chunked strategy (CUDA; CPU tensors under the interpreter).

The loop is `aft_fast.ops.chunk_loop.ChunkLoop.aft_forward`, shared with the CPU backends; `Chunks` is its
engine here (the triton backend skips dead rows: the loop orders them last, `grad` leaves them out).
Per chunk of scored tokens (rows of `hidden`, in the input dtype throughout):
    h       = hidden[rows]                                    gather, input dtype      [c, H]
    buf     = h @ weight^T (+ bias)                           cuBLAS, input dtype      [c, V]
    logp, lse, sums[seg] += logp                              chunk_softmax_fwd (one read of buf)
    ... the chunk's group loss gives coef = d(loss)/d(sum) per segment (no host sync) ...
    buf     = coef * (onehot - softmax) on the live rows      chunk_softmax_bwd (in place)
    grad_hidden[rows] += buf @ weight                         cuBLAS, fp32 out, index_add (rows repeat)
    grad_weight       += buf^T @ h                            cuBLAS, bf16 operands, fp32 accumulator
So three products per chunk, all in the input dtype with fp32 accumulation: no fp32 copy of the [V, H]
weight, one reused [chunk, V] buffer in the input dtype (2 bytes a logit in bf16), and fp32 gradient
accumulators. Rows whose d(loss)/d(logp) is zero by construction (groups without pairs, mode vft, ...)
are ordered last in their chunk by the loop and skipped by the two gradient products.

grad_weight accumulates with `torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`: cuBLAS bf16
products into an fp32 C, read and written in the epilogue (the first chunk writes it with `mm`, so it
is never zero-filled). Where a PyTorch build lacks that (checked once per process, see `mm_f32`),
slices of `mm(out_dtype=float32)` are added instead, or at worst input-dtype products (with a
warning). On CPU (tests) the operands are upcast: the same fp32 accumulation of exactly representable
products.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from aft_fast.kernels import chunk_softmax
from aft_fast.ops.logit_options import IDENTITY, LogitOptions

# The [chunk, V] buffer: about this many bytes (512 MiB: 2093 bf16 tokens at V = 128256, 4% of eager's
# ~12.6 GB peak at T = 8192) ...
CHUNK_BYTES = int(os.environ.get("AFT_FAST_TRITON_CHUNK_MIB", "512")) * 2**20
# ... grown to this much when one group needs it, so that it is still scored in a single pass.
MAX_CHUNK_BYTES = 2 * CHUNK_BYTES
# Rows per product of the fallback accumulation (bounds its temporary to 8192 x H).
_SLICE_ROWS = 8192


def chunk_size(vocab: int, tokens: int, largest_group: int, dtype: torch.dtype) -> int:
    """Tokens per chunk: CHUNK_BYTES of logits in `dtype` (no power-of-two rounding: chunks pack whole
    groups, so every token of the budget counts), grown to the largest group within MAX_CHUNK_BYTES,
    at most the token count."""
    row = vocab * torch.finfo(dtype).bits // 8
    base = max(1, CHUNK_BYTES // row)
    return max(1, min(max(base, largest_group), max(base, MAX_CHUNK_BYTES // row), tokens))


@functools.cache
def _fp32_out_products() -> tuple[bool, bool]:
    """What this PyTorch's CUDA build offers for bf16 x bf16 products with fp32 output: (mm with
    out_dtype=float32, addmm with out_dtype=float32 adding into an fp32 `out` in place). Checked once,
    on values that bf16 output or accumulation would round."""
    a = torch.full((1, 2), 2.0**-5, dtype=torch.bfloat16, device="cuda")  # a @ a^T = 2^-9
    try:
        mm = torch.mm(a, a.t(), out_dtype=torch.float32)
        has_mm = mm.dtype == torch.float32 and float(mm) == 2.0**-9
    except (RuntimeError, TypeError, NotImplementedError):
        has_mm = False
    try:
        acc = torch.ones(1, 1, dtype=torch.float32, device="cuda")
        torch.addmm(acc, a, a.t(), out_dtype=torch.float32, out=acc)
        has_addmm = float(acc) == 1.0 + 2.0**-9  # 1 in bf16
    except (RuntimeError, TypeError, NotImplementedError):
        has_addmm = False
    if not has_mm:
        warnings.warn("aft_fast: this PyTorch has no bf16 x bf16 -> fp32 cuBLAS product (mm out_dtype); "
                      "the chunked triton strategy rounds each chunk's gradient products to bf16/fp16 "
                      "before adding them in fp32", stacklevel=3)
    return has_mm, has_addmm


def mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None, accumulate: bool = False):
    """a @ b into fp32 `out` (added to it when `accumulate`) for a [m, k] and b [k, n] of one dtype
    (fp32, bf16 or fp16), with fp32 accumulation of the products and no temporary of out's size."""
    f32 = torch.float32
    if out is None:
        out = torch.empty(a.shape[0], b.shape[1], dtype=f32, device=a.device)
    if a.dtype == f32:
        return out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    if a.device.type != "cuda":
        # CPU (tests): upcast. Products of bf16/fp16 values are exact in fp32, so this is the fp32
        # accumulation that cuBLAS does with out_dtype=float32.
        return out.addmm_(a.to(f32), b.to(f32)) if accumulate else torch.mm(a.to(f32), b.to(f32), out=out)
    has_mm, has_addmm = _fp32_out_products()
    if has_addmm and accumulate:  # cuBLAS reads and writes the fp32 accumulator in its epilogue
        return torch.addmm(out, a, b, out_dtype=f32, out=out)
    if has_mm and not accumulate:
        return torch.mm(a, b, out_dtype=f32, out=out)
    # Slices of rows of a: fp32 products (or, without them, input-dtype ones) added into out.
    for r0 in range(0, a.shape[0], _SLICE_ROWS):
        rows = slice(r0, r0 + _SLICE_ROWS)
        part = torch.mm(a[rows], b, out_dtype=f32) if has_mm else torch.mm(a[rows], b)
        out[rows].add_(part) if accumulate else out[rows].copy_(part)
    return out


class Chunks:
    """The chunk engine of `chunk_loop.aft_forward` for the triton backend (see the module docstring).

    One instance per call: holds the inputs, one [chunk, V] buffer in the input dtype, and whether the
    fp32 grad_weight accumulator has been written yet (the first product overwrites it, so it is never
    zero-filled and read back).
    """

    def __init__(self, hidden, weight, bias, size: int, post: LogitOptions = IDENTITY):
        self.post = post.kernel_kwargs()  # applied by the row kernels as they read the buffer
        self.hidden = hidden
        self.weight = weight.contiguous()
        self.bias = None if bias is None else bias.contiguous()
        self.buf = torch.empty(size, weight.shape[0], dtype=weight.dtype, device=weight.device)
        self.weight_written = False

    def make_grads(self, need: tuple[bool, bool, bool]) -> tuple:
        """fp32 accumulators (hidden, weight, bias): grad_weight uninitialized (see `finish`), the
        others zero; None where not needed."""
        f32 = dict(dtype=torch.float32, device=self.weight.device)
        w, b = self.weight, self.bias
        return (
            torch.zeros(self.hidden.shape, **f32) if need[0] else None,
            torch.empty(w.shape, **f32) if need[1] else None,
            torch.zeros(b.shape, **f32) if b is not None and need[2] else None,
        )

    def logprob(self, rows, targets, segments=None, sums=None, lse=None):
        """Logits of one chunk into the buffer; with `lse` None also (lse, logp), logp added into
        sums[segments]. Returns (state for `grad`, lse [c] fp32)."""
        c = rows.numel()
        h = self.hidden.index_select(0, rows)
        buf = self.buf[:c]
        if self.bias is None:
            torch.mm(h, self.weight.t(), out=buf)
        else:
            torch.addmm(self.bias, h, self.weight.t(), out=buf)
        if lse is None:
            _, lse = chunk_softmax.chunk_softmax_fwd(buf, targets, segments=segments, sums=sums, **self.post)
        return (h, buf, lse), lse

    def grad(self, state, live: int, dsum, segments, targets, rows, grads) -> None:
        """Gradients of the first `live` rows of the chunk, coef = dsum[segments] (fp32 [S])."""
        h, buf, lse = state
        if live == 0:
            return
        g, h = buf[:live], h[:live]
        chunk_softmax.chunk_softmax_bwd(g, targets[:live], lse[:live], dsum, segments[:live], **self.post)
        if grads.hidden is not None:  # rows repeat (prompt sharing): accumulate every use
            part = mm_f32(g, self.weight)
            if part.is_cuda:
                grads.hidden.index_add_(0, rows[:live], part)  # fp32 atomics
            else:
                grads.hidden.index_put_((rows[:live],), part, accumulate=True)  # index_add_ is slow on CPU
        if grads.weight is not None:
            mm_f32(g.t(), h, out=grads.weight, accumulate=self.weight_written)
            self.weight_written = True
        if grads.bias is not None:
            grads.bias.add_(g.sum(0, dtype=torch.float32))

    def finish(self, grads) -> None:
        if grads.weight is not None and not self.weight_written:
            grads.weight.zero_()  # no live row anywhere: the gradient is zero

