"""Row-wise softmax work of the chunked path, in place on a [c, V] logits buffer.

The chunked strategy of the triton backend (`aft_fast/ops/triton_chunks.py`) computes a chunk's
logits with cuBLAS into one reused buffer (in the input dtype: bf16 logits, as eager PyTorch rounds
them), then needs only row-wise passes over it, which these two kernels do with fp32 math in
registers:
    chunk_softmax_fwd   one read of each row: online max and sum of exponentials -> lse [c], the
                        target's logit -> logp [c]; optionally logp added into per-segment sums
    chunk_softmax_bwd   one read and one write of each row, in place: logits -> coef * (onehot - p),
                        p = exp(logit - lse), rounded to the buffer's dtype (as autograd rounds the
                        fp32 log_softmax gradient before the bf16 products)
The buffer then feeds the two gradient products (cuBLAS again). Both kernels are memory-bound: a
program takes BLOCK_B rows (1 on a GPU, where a row of V = 128256 is work enough; more under the
interpreter, whose cost is per program) and walks them BLOCK_V columns a step (configs in `_utils.py`).
Each spends one exp per element, which keeps it under the SFU's rate at HBM speed.

Shapes: c rows of the chunk (scored tokens), V vocab, S segments.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils
from ._utils import process_logits


@triton.jit
def _chunk_softmax_fwd_kernel(
    logits, targets, segments, sums, lse, logp, C, V, stride_z, logit_scale, softcap, inv_temperature,
    HAS_SUMS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < C
    base = logits + rows[:, None] * stride_z
    offs = tl.arange(0, BLOCK_V)
    run_max = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        mask = rmask[:, None] & (cols < V)[None, :]
        x = tl.load(base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x, _ = process_logits(x, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
        x = tl.where(mask, x, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(x, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows of -inf so far (and masked rows)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        run_max = new_max
    row_lse = run_max + tl.log(tl.where(rmask, run_sum, 1.0))
    target = tl.load(targets + rows, mask=rmask, other=0)
    target_z = tl.load(logits + rows * stride_z + target, mask=rmask, other=0.0).to(tl.float32)
    target_logit, _ = process_logits(target_z, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
    row_logp = target_logit - row_lse
    tl.store(lse + rows, row_lse, mask=rmask)
    tl.store(logp + rows, row_logp, mask=rmask)
    if HAS_SUMS:
        seg = tl.load(segments + rows, mask=rmask, other=0)
        tl.atomic_add(sums + seg, row_logp, mask=rmask, sem="relaxed")


@triton.jit
def _round_to_bf16(x):
    """fp32 x rounded to the nearest bf16 (ties to even), still as fp32: then casting is exact. Compiled
    code rounds this way itself; the interpreter truncates instead (triton 3.9's `cast_impl`)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits += 0x7FFF + ((bits >> 16) & 1)
    return ((bits >> 16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _chunk_softmax_bwd_kernel(
    logits, targets, lse, coef, coef_index, C, V, stride_z, logit_scale, softcap, inv_temperature,
    HAS_SOFTCAP: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < C
    base = logits + rows[:, None] * stride_z
    offs = tl.arange(0, BLOCK_V)
    scale = tl.load(coef + tl.load(coef_index + rows, mask=rmask, other=0), mask=rmask, other=0.0)
    row_lse = tl.load(lse + rows, mask=rmask, other=0.0)
    target = tl.load(targets + rows, mask=rmask, other=-1)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        mask = rmask[:, None] & (cols < V)[None, :]
        x = tl.load(base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x, dz = process_logits(x, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
        onehot = tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
        grad = scale[:, None] * (onehot - tl.exp(x - row_lse[:, None])) * dz
        if ROUND_BF16:
            grad = _round_to_bf16(grad)
        tl.store(base + cols[None, :], grad.to(logits.dtype.element_ty), mask=mask)


def _check_rows(logits: torch.Tensor, **index: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits: expected a 2-D buffer with contiguous rows, got shape "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits: expected float32, bfloat16 or float16, got {logits.dtype}")
    for name, t in index.items():
        if t.dtype != torch.int64 or t.shape != (logits.shape[0],):
            raise ValueError(f"{name}: expected [{logits.shape[0]}] int64, got {tuple(t.shape)} {t.dtype}")


def _launch_kwargs(config: dict | None) -> dict:
    return _utils.config_kwargs(config or (_utils.INTERPRET_CHUNK_ROW if _utils.INTERPRETED
                                           else _utils.CHUNK_ROW_CONFIG))


def chunk_softmax_fwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    segments: torch.Tensor | None = None,
    sums: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp [c], lse [c]) fp32 of log_softmax(logits)[targets], reading the buffer once. The buffer holds
    z = h W^T + b; the post-processing (logit_scale, softcap, temperature: `_utils.process_logits`) is
    applied in registers as it is read.

    logits [c, V] (fp32, bf16 or fp16; rows contiguous, any row stride); targets [c] int64 in [0, V).
    With segments [c] int64 and sums [S] fp32, also sums[segments[t]] += logp[t] (atomic adds).
    `config` (BLOCK_B, BLOCK_V, num_warps, num_stages) overrides `_utils.CHUNK_ROW_CONFIG`.
    """
    _check_rows(logits, targets=targets)
    if (segments is None) != (sums is None):
        raise ValueError("segments and sums: give both or neither")
    if segments is not None:
        _check_rows(logits, segments=segments)
        if sums.dtype != torch.float32 or sums.dim() != 1 or not sums.is_contiguous():
            raise ValueError(f"sums: expected a contiguous 1-D float32 tensor, got {sums.dtype}")
    c, V = logits.shape
    lse = torch.empty(c, dtype=torch.float32, device=logits.device)
    logp = torch.empty_like(lse)
    if c == 0:
        return logp, lse
    targets = targets.contiguous()
    has_sums = sums is not None
    meta = _launch_kwargs(config)
    post = _utils.logit_args(logit_scale, softcap, temperature)
    _chunk_softmax_fwd_kernel[(triton.cdiv(c, meta["BLOCK_B"]),)](
        logits, targets, segments.contiguous() if has_sums else targets, sums if has_sums else lse,
        lse, logp, c, V, logits.stride(0), **post, HAS_SUMS=has_sums, **meta)
    return logp, lse


def chunk_softmax_bwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    coef: torch.Tensor,
    coef_index: torch.Tensor,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    config: dict | None = None,
) -> None:
    """In place: logits[t] <- coef[coef_index[t]] * (onehot(targets[t]) - softmax(logits[t])), the
    gradient of sum_t coef[coef_index[t]] * logp[t] with respect to the logits, in the buffer's dtype.

    logits [c, V] as in `chunk_softmax_fwd`, holding the same logits that gave lse [c] fp32; coef [S]
    fp32 (e.g. d(loss)/d(segment sum)); coef_index [c] int64 in [0, S) (e.g. each token's segment).
    With logit options (as given to `chunk_softmax_fwd`) softmax is that of the processed logits, and the
    gradient is with respect to z: times d logits / d z.
    """
    _check_rows(logits, targets=targets, coef_index=coef_index)
    for name, t in (("lse", lse), ("coef", coef)):
        if t.dtype != torch.float32 or t.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D float32 tensor, got {tuple(t.shape)} {t.dtype}")
    if lse.numel() != logits.shape[0]:
        raise ValueError(f"lse: expected length {logits.shape[0]}, got {lse.numel()}")
    c, V = logits.shape
    if c == 0:
        return
    meta = _launch_kwargs(config)
    _chunk_softmax_bwd_kernel[(triton.cdiv(c, meta["BLOCK_B"]),)](
        logits, targets.contiguous(), lse.contiguous(), coef.contiguous(), coef_index.contiguous(),
        c, V, logits.stride(0), **_utils.logit_args(logit_scale, softcap, temperature),
        ROUND_BF16=_utils.INTERPRETED and logits.dtype == torch.bfloat16, **meta)
