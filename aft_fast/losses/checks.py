"""Argument checks of the public API: every bad input becomes a ValueError that names the argument.

Nothing reaches a kernel unchecked: index ranges are verified here, so a C++ or Triton kernel never
reads out of bounds and never returns a silently wrong answer.
"""

from __future__ import annotations

import math
import sys

import torch

from aft_fast.constants import BACKENDS, train_mode
from aft_fast.ops.logit_options import LogitOptions
from aft_fast.options import LossOptions


def _fail(name: str, problem: str) -> None:
    raise ValueError(f"{name}: {problem}")


def _tensor(name: str, value, ndim: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        _fail(name, f"expected a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        _fail(name, f"expected {ndim}-D, got shape {tuple(value.shape)}")
    return value


def _index(name: str, value, length: int | None, device: torch.device, upper: int | None, what: str):
    t = _tensor(name, value, 1)
    if t.dtype != torch.int64:
        _fail(name, f"expected dtype torch.int64, got {t.dtype}")
    if t.device != device:
        _fail(name, f"on {t.device}, but hidden is on {device}")
    if length is not None and t.numel() != length:
        _fail(name, f"expected length {length}, got {t.numel()}")
    if upper is not None and t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= upper:
            _fail(name, f"values must lie in [0, {upper}) ({what}), found min {lo} and max {hi}")
    return t


def check_projection(hidden, weight, bias) -> None:
    """hidden [N, H] and weight [V, H], floating, same dtype and device; bias [V] or None."""
    _tensor("hidden", hidden, 2)
    _tensor("weight", weight, 2)
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not t.is_floating_point():
            _fail(name, f"expected a floating dtype, got {t.dtype}")
        if t.numel() == 0:
            _fail(name, f"is empty (shape {tuple(t.shape)})")
    if weight.dtype != hidden.dtype:
        _fail("weight", f"dtype {weight.dtype} differs from hidden's {hidden.dtype}")
    if weight.device != hidden.device:
        _fail("weight", f"on {weight.device}, but hidden is on {hidden.device}")
    if weight.shape[1] != hidden.shape[1]:
        _fail("weight", f"shape {tuple(weight.shape)} does not match hidden size H={hidden.shape[1]}")
    if bias is not None:
        _tensor("bias", bias, 1)
        if bias.shape[0] != weight.shape[0] or bias.dtype != weight.dtype or bias.device != weight.device:
            _fail("bias", f"expected [{weight.shape[0]}] {weight.dtype} on {weight.device}, "
                  f"got {tuple(bias.shape)} {bias.dtype} on {bias.device}")


def check_tokens(hidden, weight, rows, targets, segments, num_segments: int) -> torch.Tensor:
    """rows, targets, segments [T] int64 in range; every segment has a token. Returns counts [S]."""
    device = hidden.device
    rows = _index("rows", rows, None, device, hidden.shape[0], "rows of hidden")
    if rows.numel() == 0:
        _fail("rows", "no scored tokens (T = 0)")
    _index("targets", targets, rows.numel(), device, weight.shape[0], "token ids of the vocabulary")
    if not isinstance(num_segments, int) or num_segments < 1:
        _fail("num_segments", f"expected a positive int, got {num_segments!r}")
    _index("segments", segments, rows.numel(), device, num_segments, "segment ids")
    counts = torch.bincount(segments, minlength=num_segments)
    empty = (counts == 0).nonzero().flatten()
    if empty.numel():
        _fail("segments", f"segment {int(empty[0])} has no scored tokens ({empty.numel()} such segments)")
    return counts


def check_options(*, chunk_size, backend: str) -> None:
    if backend not in BACKENDS:
        _fail("backend", f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        _fail("chunk_size", f"expected a positive int or None, got {chunk_size!r}")


def check_logit_options(logit_scale, softcap, temperature) -> LogitOptions:
    """The logit post-processing options (docs/design.md section 2) as LogitOptions."""

    def finite(name, value) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            _fail(name, f"expected a finite number, got {value!r}")
        return float(value)

    logit_scale = finite("logit_scale", logit_scale)
    if softcap is not None:
        softcap = finite("softcap", softcap)
        if softcap <= 0:
            _fail("softcap", f"expected a positive soft cap or None, got {softcap!r}")
    temperature = finite("temperature", temperature)
    if temperature <= 0:
        _fail("temperature", f"expected a positive number, got {temperature!r}")
    return LogitOptions(logit_scale, softcap, temperature)


def check_keep_probs(keep_probs) -> int:
    """linear_logprob's keep_probs (False, True or a byte budget) as a byte budget."""
    if isinstance(keep_probs, bool):
        return sys.maxsize if keep_probs else 0
    if not isinstance(keep_probs, int) or keep_probs < 0:
        _fail("keep_probs", f"expected True, False or a byte budget (an int >= 0), got {keep_probs!r}")
    return keep_probs


def check_groups(hidden, group, label, is_reference, ref_logp, options: LossOptions) -> None:
    """Segment metadata [S], and ref_logp against the mode (the options checked themselves when built)."""
    group = _index("group", group, None, hidden.device, None, "")
    num_segments = group.numel()
    if num_segments == 0:
        _fail("group", "no segments (S = 0)")
    _index("label", label, num_segments, hidden.device, None, "")
    _tensor("is_reference", is_reference, 1)
    if is_reference.dtype != torch.bool or is_reference.numel() != num_segments:
        _fail("is_reference", f"expected [{num_segments}] torch.bool, got {tuple(is_reference.shape)} "
              f"{is_reference.dtype}")
    if is_reference.device != hidden.device:
        _fail("is_reference", f"on {is_reference.device}, but hidden is on {hidden.device}")
    if train_mode(options.mode).needs_ref_logp and ref_logp is None:
        _fail("ref_logp", f"mode {options.mode!r} needs the reference model's summed log-prob of each "
              "segment")
    if ref_logp is not None:
        _tensor("ref_logp", ref_logp, 1)
        if ref_logp.numel() != num_segments or not ref_logp.is_floating_point():
            got = f"{tuple(ref_logp.shape)} {ref_logp.dtype}"
            _fail("ref_logp", f"expected [{num_segments}] floating, got {got}")
        if ref_logp.device != hidden.device:
            _fail("ref_logp", f"on {ref_logp.device}, but hidden is on {hidden.device}")
        if not bool(torch.isfinite(ref_logp).all()):
            _fail("ref_logp", "contains NaN or infinite values")
