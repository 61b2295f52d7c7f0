"""Forward of the fused linear log-prob: per-token log p(target | hidden[row]) without the logits.

Each program takes BLOCK_B scored tokens and one contiguous range ("split") of the vocabulary. It
walks the split tile by tile: logits tile = hidden[rows] @ weight[tile]^T in registers, then a
running max / sum of exponentials and the target's logit when the tile holds it. Only the split's
log-sum-exp ([splits, T] fp32) and the target logit ([T] fp32) reach global memory; the host folds
the splits with one logsumexp. Splitting the vocabulary gives the GPU enough programs when T is small.

Shapes: N hidden rows, H hidden size, V vocab, T scored tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils
from ._utils import logits_tile, process_logits, swizzle


@triton.jit
def _linear_logprob_fwd_kernel(
    hidden, weight, bias, rows, targets, lse_part, target_logit,
    T, V, H, split_v, num_splits, stride_h, stride_w, t_bucket, logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_B: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    pid_b, pid_s = swizzle(pid, tl.cdiv(T, BLOCK_B), num_splits, GROUP_B)

    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = offs_b < T
    row = tl.load(rows + offs_b, mask=bmask, other=0)
    target = tl.load(targets + offs_b, mask=bmask, other=-1)

    v_start = pid_s * split_v
    v_end = tl.minimum(v_start + split_v, V)
    run_max = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    tgt = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        vmask = offs_v < v_end
        logits = logits_tile(hidden, weight, bias, row, bmask, offs_v, vmask, H, stride_h, stride_w,
                             HAS_BIAS, DOT_F32, PRECISION, BLOCK_B, BLOCK_V, BLOCK_D)
        logits, _ = process_logits(logits, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
        tgt += tl.sum(tl.where(offs_v[None, :] == target[:, None], logits, 0.0), axis=1)
        logits = tl.where(vmask[None, :], logits, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))  # finite: every tile has a column
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        run_max = new_max

    tl.store(lse_part + pid_s * T + offs_b, run_max + tl.log(run_sum), mask=bmask)
    # Exactly one split holds each target: that program writes its logit.
    tl.store(target_logit + offs_b, tgt, mask=bmask & (target >= v_start) & (target < v_end))


# Indexed by "operands are fp32".
_fwd_tuned = tuple(_utils.tuned(_linear_logprob_fwd_kernel, configs, key=["V", "H", "t_bucket"])
                   for configs in (_utils.FWD_CONFIGS, _utils.FWD_CONFIGS_F32))


def _num_splits(tokens: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """(split_v, num_splits): enough programs to fill the GPU when the token count is small."""
    if _utils.INTERPRETED:
        split_v = _utils.INTERPRET_SPLIT_V
    else:
        programs = 8 * torch.cuda.get_device_properties(device).multi_processor_count
        token_blocks = triton.cdiv(tokens, 128)
        splits = max(1, min(triton.cdiv(programs, token_blocks), triton.cdiv(vocab, _utils.SPLIT_V_MULTIPLE)))
        split_v = _utils.SPLIT_V_MULTIPLE * triton.cdiv(triton.cdiv(vocab, splits), _utils.SPLIT_V_MULTIPLE)
    return split_v, triton.cdiv(vocab, split_v)


def linear_logprob_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    targets: torch.Tensor,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    config: dict | None = None,
    split_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (logp [T], lse [T]), fp32, of log_softmax(logits)[targets], logits the post-processed
    z = hidden[rows] @ weight^T + bias (`_utils.process_logits`: softcap * tanh(logit_scale * z / softcap)
    / temperature), transformed in registers, tile by tile.

    hidden [N, H] and weight [V, H] (fp32, bf16 or fp16, one dtype), bias [V] or None; rows [T] and
    targets [T] int64, already range-checked by the caller. `config` (BLOCK_B, BLOCK_V, BLOCK_D,
    GROUP_B, num_warps, num_stages) and `split_v` (vocab columns per program) override the defaults.
    """
    check_inputs(hidden, weight, bias, rows, targets)
    hidden, weight, rows, targets = (t.contiguous() for t in (hidden, weight, rows, targets))
    bias = None if bias is None else bias.contiguous()
    T, (V, H) = rows.numel(), weight.shape
    if T == 0:
        empty = torch.empty(0, dtype=torch.float32, device=hidden.device)
        return empty, empty.clone()
    if split_v is None:
        split_v, num_splits = _num_splits(T, V, hidden.device)
    else:
        num_splits = triton.cdiv(V, split_v)
    lse_part = torch.empty(num_splits, T, dtype=torch.float32, device=hidden.device)
    target_logit = torch.empty(T, dtype=torch.float32, device=hidden.device)
    post = _utils.logit_args(logit_scale, softcap, temperature)
    args = (hidden, weight, bias, rows, targets, lse_part, target_logit,
            T, V, H, split_v, num_splits, hidden.stride(0), weight.stride(0), _utils.size_bucket(T),
            post["logit_scale"], post["softcap"], post["inv_temperature"])
    flags = dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=post["HAS_SOFTCAP"], DOT_F32=_utils.INTERPRETED,
                 PRECISION=_utils.dot_precision(hidden.dtype))
    if config is None and not _utils.INTERPRETED:
        def grid(meta):
            return (triton.cdiv(T, meta["BLOCK_B"]) * num_splits,)

        _fwd_tuned[hidden.dtype == torch.float32][grid](*args, **flags)
    else:
        meta = _utils.config_kwargs(config or _utils.INTERPRET_FWD)
        _linear_logprob_fwd_kernel[(triton.cdiv(T, meta["BLOCK_B"]) * num_splits,)](*args, **flags, **meta)
    lse = torch.logsumexp(lse_part, dim=0) if num_splits > 1 else lse_part[0]
    return target_logit - lse, lse


def check_inputs(hidden, weight, bias, rows, targets) -> None:
    """dtypes and ranks the kernels rely on (value ranges are the public API's job)."""
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"hidden: the triton kernels take float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise ValueError(f"weight: dtype {weight.dtype} (bias {None if bias is None else bias.dtype}) "
                         f"differs from hidden's {hidden.dtype}")
    for name, t in (("rows", rows), ("targets", targets)):
        if t.dtype != torch.int64 or t.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D int64 tensor, got {t.dtype} {tuple(t.shape)}")
    if targets.numel() != rows.numel():
        raise ValueError(f"targets: length {targets.numel()} differs from rows' {rows.numel()}")
