"""The C++ ops themselves: torch.library.opcheck, and equality with the torch chunk primitives."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import aft_fast
from aft_fast.ops import cpp_chunks, torch_chunks

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not cpp_chunks.AVAILABLE, reason="C++ extension not built")


def _chunk(seed=0, c=7, H=12, V=301, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(c, H, generator=g)
    w = torch.randn(V, H, generator=g) / 2
    b = torch.randn(V, generator=g) if bias else None
    targets = torch.randint(0, V, (c,), generator=g)
    return h, w, b, targets


def test_opcheck():
    h, w, b, targets = _chunk()
    buf = torch.empty(h.shape[0], w.shape[0])
    segs, sums = torch.tensor([0, 0, 1, 1, 1, 2, 2]), torch.zeros(3)
    torch.library.opcheck(torch.ops.aft_fast.chunk_logprob.default, (h, w, b, targets, buf, None, segs, sums),
                          test_utils=("test_schema", "test_faketensor"))
    probs = torch.softmax(torch.randn(7, w.shape[0]), -1)
    rows = torch.tensor([0, 2, 2, 5, 1, 0, 3])
    args = (probs, torch.randn(7), targets, h, w, rows, torch.zeros(6, 12), torch.zeros_like(w),
            torch.zeros(w.shape[0]))
    torch.library.opcheck(torch.ops.aft_fast.chunk_grad.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("V", [301, 16, 1])
def test_matches_torch_primitives(bias, V):
    h, w, b, targets = _chunk(seed=V, V=V, bias=bias)
    outs = []
    for prims in (torch_chunks, cpp_chunks):
        buf = torch.empty(h.shape[0], V)
        logp, lse = prims.chunk_logprob(h, w, b, targets, buf)
        coef = torch.linspace(-1, 2, h.shape[0])
        rows = torch.tensor([0, 2, 2, 5, 1, 0, 3])
        gh, gw, gb = torch.zeros(6, h.shape[1]), torch.zeros_like(w), torch.zeros(V)
        prims.chunk_grad(buf, coef, targets, h, w, rows, gh, gw, gb)
        outs.append((logp, lse, gh, gw, gb))
    for a, c in zip(*outs, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_recompute_with_given_lse_and_segment_sums():
    h, w, b, targets = _chunk(seed=3)
    buf = torch.empty(h.shape[0], w.shape[0])
    logp, lse = cpp_chunks.chunk_logprob(h, w, b, targets, buf)
    probs = buf.clone()
    segs, sums = torch.tensor([0, 0, 1, 1, 1, 2, 2]), torch.zeros(3)
    logp2, lse2 = cpp_chunks.chunk_logprob(h, w, b, targets, buf, lse, segs, sums)
    torch.testing.assert_close(buf, probs)
    torch.testing.assert_close(logp2, logp)
    torch.testing.assert_close(sums, torch.zeros(3).index_add(0, segs, logp))
    torch.testing.assert_close(buf.sum(1), torch.ones(h.shape[0]))


def _kept(prims, h, w, b, targets):
    c, V = h.shape[0], w.shape[0]
    keep, keep_scale = torch.empty(c, V, dtype=torch.float16), torch.empty(c)
    logp, lse = prims.chunk_logprob(h, w, b, targets, torch.empty(c, V), keep=keep, keep_scale=keep_scale)
    return logp, lse, keep, keep_scale


def test_opcheck_kept():
    h, w, b, targets = _chunk()
    c, V = h.shape[0], w.shape[0]
    keep, keep_scale = torch.empty(c, V, dtype=torch.float16), torch.empty(c)
    torch.library.opcheck(torch.ops.aft_fast.chunk_logprob.default,
                          (h, w, b, targets, torch.empty(c, V), None, None, None, keep, keep_scale),
                          test_utils=("test_schema", "test_faketensor"))
    logp, _, keep, keep_scale = _kept(cpp_chunks, h, w, b, targets)
    rows = torch.tensor([0, 2, 2, 5, 1, 0, 3])
    args = (keep, keep_scale, logp, torch.empty(c, V), torch.randn(c), targets, h, w, rows,
            torch.zeros(6, 12), torch.zeros_like(w), torch.zeros(V))
    torch.library.opcheck(torch.ops.aft_fast.chunk_grad_kept.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("V", [301, 64, 16, 1])  # 64: whole fp16 vectors; 301, 16, 1: scalar tails
def test_kept_probabilities_match_torch_primitives(bias, V):
    """chunk_logprob(keep=...) keeps the softmax (p = keep * keep_scale) and gives the same log-probs;
    chunk_grad_kept gives chunk_grad's gradients: in C++ and in the torch primitives alike."""
    h, w, b, targets = _chunk(seed=V + 1, V=V, bias=bias)
    c = h.shape[0]
    coef = torch.linspace(-1, 2, c)
    rows = torch.tensor([0, 2, 2, 5, 1, 0, 3])
    buf = torch.empty(c, V)
    logp_ref, lse_ref = torch_chunks.chunk_logprob(h, w, b, targets, buf)
    probs = buf.clone()
    ref = [torch.zeros(6, h.shape[1]), torch.zeros_like(w), torch.zeros(V)]
    torch_chunks.chunk_grad(buf, coef, targets, h, w, rows, *ref)
    for prims in (torch_chunks, cpp_chunks):
        logp, lse, keep, keep_scale = _kept(prims, h, w, b, targets)
        torch.testing.assert_close(logp, logp_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse, lse_ref, rtol=1e-5, atol=1e-6)
        assert keep.dtype == torch.float16 and float(keep.float().max()) <= 2.0**15 * (1 + 2**-10)
        torch.testing.assert_close(keep.float() * keep_scale[:, None], probs, rtol=2**-10, atol=1e-7)
        grads = [torch.zeros(6, h.shape[1]), torch.zeros_like(w), torch.zeros(V)]
        prims.chunk_grad_kept(keep, keep_scale, logp, torch.empty(c, V), coef, targets, h, w, rows, *grads)
        for name, a, r in zip(["hidden", "weight", "bias"], grads, ref, strict=True):
            torch.testing.assert_close(a, r, rtol=1e-3, atol=1e-3 * float(r.abs().max()),
                                       msg=lambda m, n=name: f"{n}: {m}")


def test_kept_target_probability_near_one_keeps_its_gradient():
    """A target with p = 1 - 1e-3 has gradient coef * 1e-3 on its logit: taken from the fp32 log-prob
    (error ~1e-4), not from fp16, whose spacing near 1 (2^-11) would put 1 - p off by up to 25%."""
    V = 40
    h = torch.ones(1, 1)
    w = torch.full((V, 1), -math.log((V - 1) * (1 - 1e-3) / 1e-3))
    w[3] = 0.0  # p[3] = 1 - 1e-3, the others share 1e-3
    targets = torch.tensor([3])
    logp, _, keep, keep_scale = _kept(cpp_chunks, h, w, None, targets)
    g = torch.zeros(V, 1)
    cpp_chunks.chunk_grad_kept(keep, keep_scale, logp, torch.empty(1, V), torch.ones(1), targets, h, w,
                               torch.tensor([0]), None, g, None)
    torch.testing.assert_close(g[3], torch.tensor([1e-3]), rtol=1e-3, atol=0)
    torch.testing.assert_close(g[:3].sum() + g[4:].sum(), torch.tensor(-1e-3), rtol=1e-3, atol=0)


def test_kept_ops_check_their_arguments():
    h, w, b, targets = _chunk()
    c, V = h.shape[0], w.shape[0]
    buf = torch.empty(c, V)
    with pytest.raises(RuntimeError, match="keep: expected a contiguous float16"):
        cpp_chunks.chunk_logprob(h, w, b, targets, buf, keep=torch.empty(c, V), keep_scale=torch.empty(c))
    with pytest.raises(RuntimeError, match="keep and keep_scale: give both"):
        cpp_chunks.chunk_logprob(h, w, b, targets, buf, keep=torch.empty(c, V, dtype=torch.float16))
    _, lse = cpp_chunks.chunk_logprob(h, w, b, targets, buf)
    with pytest.raises(RuntimeError, match="keep: a recompute"):
        cpp_chunks.chunk_logprob(h, w, b, targets, buf, lse, keep=torch.empty(c, V, dtype=torch.float16),
                                 keep_scale=torch.empty(c))
    logp, _, keep, keep_scale = _kept(cpp_chunks, h, w, b, targets)
    with pytest.raises(RuntimeError, match="keep: expected a contiguous float16"):
        cpp_chunks.chunk_grad_kept(keep[:, :-1], keep_scale, logp, buf, torch.ones(c), targets, h, w,
                                   torch.zeros(c, dtype=torch.long), None, None, None)
    with pytest.raises(RuntimeError, match="targets: token id outside"):
        cpp_chunks.chunk_grad_kept(keep, keep_scale, logp, buf, torch.ones(c), targets + V, h, w,
                                   torch.zeros(c, dtype=torch.long), None, None, None)


def logprob_grads() -> list[torch.Tensor]:
    """[grad_hidden, grad_weight] of a small cpp linear_logprob (also run in a subprocess below)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    kw = dict(rows=torch.arange(40), targets=torch.randint(0, 50, (40,), generator=g),
              segments=torch.arange(40) // 10, num_segments=4)
    aft_fast.linear_logprob(h, w, **kw, backend="cpp", chunk_size=16).sum().backward()
    return [h.grad, w.grad]


def test_gemm_matches_torch_mm_and_aten_fallback_gives_the_same_loss():
    """The products of the chunk ops (oneDNN where its probe passed) equal torch.mm to fp32 rounding, and
    AFT_FAST_CPU_GEMM=aten switches them to ATen's mm with the same results."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(37, 50, generator=g), torch.randn(61, 50, generator=g)
    out = torch.empty(37, 61)
    cpp_chunks.gemm(a, b.t(), out)
    torch.testing.assert_close(out, a @ b.t(), rtol=1e-5, atol=1e-5)
    acc = torch.ones(61, 50)
    cpp_chunks.gemm(out.t(), a, acc, accumulate=True)
    torch.testing.assert_close(acc, 1 + out.t() @ a, rtol=1e-5, atol=1e-4)
    script = (
        "import sys, torch\n"
        "from aft_fast.ops import cpp_chunks\n"
        "from tests.test_cpp_ops import logprob_grads\n"
        "assert cpp_chunks.build_info()['gemm'] == 'aten', cpp_chunks.build_info()['gemm']\n"
        "torch.save(logprob_grads(), sys.argv[1])\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/grads.pt"
        env = {**os.environ, "AFT_FAST_CPU_GEMM": "aten"}
        subprocess.run([sys.executable, "-c", script, path], check=True, env=env, cwd=ROOT)
        aten_grads = torch.load(path)
    grads = logprob_grads()
    torch.testing.assert_close(grads[0], aten_grads[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], aten_grads[1], rtol=1e-5, atol=1e-6)
