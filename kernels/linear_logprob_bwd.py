"""Backward of the fused linear log-prob: gradients for d(loss)/d(logp[t]) = coef[t].

One program per (token block, vocab block) tile, as in Cut Cross-Entropy: recompute the logits tile
from the saved log-sum-exp, form coef * (onehot(target) - softmax) in registers, round it to the
input dtype (as autograd does before the weight products), then stream its two products over H into
fp32 accumulators with atomic adds:
    grad_hidden[rows[t]] += grad_tile @ weight[tile]    (rows repeat under prompt sharing: the
                                                         atomics add every use of a row)
    grad_weight[tile]    += grad_tile^T @ hidden[rows]
Summation order across tiles is not fixed, so results may differ between runs in the last bits.

Tile skipping ("grad filter"): "exact" skips a tile only when its rounded gradient is all zeros (its
products would add exact zeros: bit-identical); "cce" uses Cut Cross-Entropy's threshold, skipping a
tile when every |onehot - softmax| < eps(dtype) / 32, which is faster on peaked distributions but
drops real gradient mass on high-entropy rows; "off" computes every tile.

Shapes: N hidden rows, H hidden size, V vocab, T scored tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils
from ._utils import logits_tile, process_logits, swizzle
from .chunk_softmax import _round_to_bf16
from .linear_logprob import check_inputs

FILTERS = {"off": 0, "exact": 1, "cce": 2}


@triton.jit
def _linear_logprob_bwd_kernel(
    hidden, weight, bias, rows, targets, lse, coef, grad_hidden, grad_weight, grad_bias,
    T, V, H, stride_h, stride_w, filter_eps, t_bucket, logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_GRAD_HIDDEN: tl.constexpr,
    HAS_GRAD_WEIGHT: tl.constexpr, HAS_GRAD_BIAS: tl.constexpr, FILTER: tl.constexpr, DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_B: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    pid_b, pid_v = swizzle(pid, tl.cdiv(T, BLOCK_B), tl.cdiv(V, BLOCK_V), GROUP_B)

    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = offs_b < T
    row = tl.load(rows + offs_b, mask=bmask, other=0)
    target = tl.load(targets + offs_b, mask=bmask, other=-1)
    lse_b = tl.load(lse + offs_b, mask=bmask, other=0.0)
    coef_b = tl.load(coef + offs_b, mask=bmask, other=0.0)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    vmask = offs_v < V

    logits = logits_tile(hidden, weight, bias, row, bmask, offs_v, vmask, H, stride_h, stride_w,
                         HAS_BIAS, DOT_F32, PRECISION, BLOCK_B, BLOCK_V, BLOCK_D)
    logits, dz = process_logits(logits, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
    prob = tl.exp(logits - lse_b[:, None])
    dlogp = tl.where(offs_v[None, :] == target[:, None], 1.0 - prob, -prob)  # d logp / d logit
    dlogp = tl.where(bmask[:, None] & vmask[None, :], dlogp * dz, 0.0)  # ... / d z (the post-processing)
    if FILTER == 2:
        if tl.max(tl.abs(dlogp)) < filter_eps:
            return
    grad = dlogp * coef_b[:, None]
    if ROUND_BF16:  # the interpreter's cast truncates; compiled code rounds to nearest, as autograd does
        grad = _round_to_bf16(grad)
    grad = grad.to(hidden.dtype.element_ty)
    if FILTER == 1:
        if tl.max(tl.abs(grad.to(tl.float32))) == 0.0:
            return
    if DOT_F32:
        grad = grad.to(tl.float32)

    if HAS_GRAD_HIDDEN:
        for k0 in range(0, H, BLOCK_D):
            offs_d = k0 + tl.arange(0, BLOCK_D)
            dmask = offs_d < H
            w = tl.load(weight + offs_v[:, None] * stride_w + offs_d[None, :],
                        mask=vmask[:, None] & dmask[None, :], other=0.0)
            if DOT_F32:
                w = w.to(tl.float32)
            part = tl.dot(grad, w, input_precision=PRECISION)
            tl.atomic_add(grad_hidden + row[:, None] * H + offs_d[None, :], part,
                          mask=bmask[:, None] & dmask[None, :], sem="relaxed")
    if HAS_GRAD_WEIGHT:
        grad_t = tl.trans(grad)
        for k0 in range(0, H, BLOCK_D):
            offs_d = k0 + tl.arange(0, BLOCK_D)
            dmask = offs_d < H
            h = tl.load(hidden + row[:, None] * stride_h + offs_d[None, :],
                        mask=bmask[:, None] & dmask[None, :], other=0.0)
            if DOT_F32:
                h = h.to(tl.float32)
            part = tl.dot(grad_t, h, input_precision=PRECISION)
            tl.atomic_add(grad_weight + offs_v[:, None] * H + offs_d[None, :], part,
                          mask=vmask[:, None] & dmask[None, :], sem="relaxed")
    if HAS_GRAD_BIAS:
        tl.atomic_add(grad_bias + offs_v, tl.sum(grad.to(tl.float32), axis=0), mask=vmask, sem="relaxed")


# Indexed by "operands are fp32". The tuning runs add into the outputs: they are zeroed after each.
_bwd_tuned = tuple(
    _utils.tuned(_linear_logprob_bwd_kernel, configs, key=["V", "H", "t_bucket"],
                 reset_to_zero=["grad_hidden", "grad_weight", "grad_bias"])
    for configs in (_utils.BWD_CONFIGS, _utils.BWD_CONFIGS_F32)
)


def linear_logprob_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    coef: torch.Tensor,
    *,
    need: tuple[bool, bool, bool] = (True, True, True),
    grad_filter: str = "exact",
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    config: dict | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """fp32 (grad_hidden [N, H], grad_weight [V, H], grad_bias [V]) of sum_t coef[t] * logp[t].

    lse [T] fp32 from `linear_logprob_fwd` with the same logit options (logit_scale, softcap,
    temperature: the post-processing, whose derivative multiplies each tile); coef [T] fp32. `need`
    (hidden, weight, bias) selects the gradients (None for the others, and for bias when there is none).
    `grad_filter`: exact | cce | off (module docstring). `config` overrides the block sizes as in
    `linear_logprob_fwd`.
    """
    check_inputs(hidden, weight, bias, rows, targets)
    if grad_filter not in FILTERS:
        raise ValueError(f"grad_filter: expected one of {', '.join(FILTERS)}, got {grad_filter!r}")
    for name, t in (("lse", lse), ("coef", coef)):
        if t.dtype != torch.float32 or t.shape != rows.shape:
            raise ValueError(f"{name}: expected [{rows.numel()}] float32, got {tuple(t.shape)} {t.dtype}")
    hidden, weight, rows, targets, lse, coef = (
        t.contiguous() for t in (hidden, weight, rows, targets, lse, coef))
    bias = None if bias is None else bias.contiguous()
    T, (V, H) = rows.numel(), weight.shape
    f32 = dict(dtype=torch.float32, device=hidden.device)
    grads = (
        torch.zeros(hidden.shape, **f32) if need[0] else None,
        torch.zeros(weight.shape, **f32) if need[1] else None,
        torch.zeros(V, **f32) if need[2] and bias is not None else None,
    )
    if T == 0 or all(g is None for g in grads):
        return grads
    dummy = torch.zeros(1, **f32)  # stands in for an unneeded output (never written)
    post = _utils.logit_args(logit_scale, softcap, temperature)
    args = (hidden, weight, bias, rows, targets, lse, coef, *(dummy if g is None else g for g in grads),
            T, V, H, hidden.stride(0), weight.stride(0), torch.finfo(hidden.dtype).eps / 32,
            _utils.size_bucket(T), post["logit_scale"], post["softcap"], post["inv_temperature"])
    flags = dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=post["HAS_SOFTCAP"],
                 HAS_GRAD_HIDDEN=grads[0] is not None, HAS_GRAD_WEIGHT=grads[1] is not None,
                 HAS_GRAD_BIAS=grads[2] is not None,
                 FILTER=FILTERS[grad_filter], DOT_F32=_utils.INTERPRETED,
                 ROUND_BF16=_utils.INTERPRETED and hidden.dtype == torch.bfloat16,
                 PRECISION=_utils.dot_precision(hidden.dtype))
    if config is None and not _utils.INTERPRETED:
        def grid(meta):
            return (triton.cdiv(T, meta["BLOCK_B"]) * triton.cdiv(V, meta["BLOCK_V"]),)

        _bwd_tuned[hidden.dtype == torch.float32][grid](*args, **flags)
    else:
        meta = _utils.config_kwargs(config or _utils.INTERPRET_BWD)
        grid = (triton.cdiv(T, meta["BLOCK_B"]) * triton.cdiv(V, meta["BLOCK_V"]),)
        _linear_logprob_bwd_kernel[grid](*args, **flags, **meta)
    return grads
