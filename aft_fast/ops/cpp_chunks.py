"""Thin wrappers over the C++ chunk ops `torch.ops.aft_fast.*` (csrc/), same signatures as
`aft_fast.ops.torch_chunks`, plus their fake (shape-only) implementations for torch.compile."""

from __future__ import annotations

import torch

try:
    import aft_fast._C as _C  # noqa: F401  (loading the module registers the ops)

    AVAILABLE = True
    BUILD_ERROR = None
except ImportError as exc:  # not built: backend "auto" falls back to torch
    AVAILABLE = False
    BUILD_ERROR = str(exc)


# The chunk ops take a soft cap (`cap`: logits = cap * tanh(y), see csrc/ops.h).
SOFTCAP = True


def chunk_logprob(h, weight, bias, targets, buf, lse=None, segments=None, sums=None, keep=None,
                  keep_scale=None, cap=None):
    return torch.ops.aft_fast.chunk_logprob(h, weight, bias, targets, buf, lse, segments, sums, keep,
                                            keep_scale, cap)


def chunk_grad(probs, coef, targets, h, weight, rows, grad_hidden, grad_weight, grad_bias) -> None:
    torch.ops.aft_fast.chunk_grad(probs, coef, targets, h, weight, rows, grad_hidden, grad_weight, grad_bias)


def chunk_grad_kept(keep, keep_scale, logp, buf, coef, targets, h, weight, rows, grad_hidden, grad_weight,
                    grad_bias) -> None:
    torch.ops.aft_fast.chunk_grad_kept(keep, keep_scale, logp, buf, coef, targets, h, weight, rows,
                                       grad_hidden, grad_weight, grad_bias)


def gemm(a, b, out, accumulate: bool = False) -> None:
    """out = a @ b (out += a @ b when accumulate), fp32, by the library the chunk ops use
    (cpu_info()["gemm"]: oneDNN where it runs and agrees with ATen, else ATen's mm)."""
    torch.ops.aft_fast.gemm(a, b, out, accumulate)


if AVAILABLE:

    @torch.library.register_fake("aft_fast::chunk_logprob")
    def _(h, weight, bias, targets, buf, lse, segments, sums, keep=None, keep_scale=None, cap=None):
        return h.new_empty(h.shape[0], dtype=torch.float32), h.new_empty(h.shape[0], dtype=torch.float32)

    @torch.library.register_fake("aft_fast::chunk_grad")
    def _(probs, coef, targets, h, weight, rows, grad_hidden, grad_weight, grad_bias):
        return None

    @torch.library.register_fake("aft_fast::gemm")
    def _(a, b, out, accumulate):
        return None

    @torch.library.register_fake("aft_fast::chunk_grad_kept")
    def _(keep, keep_scale, logp, buf, coef, targets, h, weight, rows, grad_hidden, grad_weight, grad_bias):
        return None


def build_info() -> dict:
    """The levels compiled, ATen's parallel backend, and the run-time choices (see cpu_info)."""
    return _C.build_info() if AVAILABLE else {"error": BUILD_ERROR}


def cpu_info() -> dict:
    """What the C++ ops run in this process, chosen once at their first use, and why:

    gemm / gemm_reason: "onednn" when oneDNN's fp32 matmul ran the probe products and matched ATen's mm,
        else "aten" and why (forced by AFT_FAST_CPU_GEMM=aten, oneDNN refused or disagreed, symbol not
        found); onednn_symbol: whether libtorch exports it.
    cpu_capability / cpu_capability_reason: the SIMD level of the row loops ("default", "avx2",
        "avx512"): the highest one compiled (cpu_capabilities_compiled) that the CPU runs
        (cpu_capability_best, from cpu_features) and ATen runs (aten_cpu_capability), unless
        AFT_FAST_CPU_CAPABILITY forces a lower one.
    summary: all that in one line, for a log.
    """
    if not AVAILABLE:
        return {"error": BUILD_ERROR, "summary": f"cpp backend not built ({BUILD_ERROR})"}
    info = dict(_C.cpu_info())
    info["summary"] = (f"cpp backend: SIMD {info['cpu_capability']} ({info['cpu_capability_reason']}), "
                       f"GEMM {info['gemm_reason']}")
    return info
