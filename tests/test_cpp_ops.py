"""The C++ ops themselves: torch.library.opcheck, and equality with the torch chunk primitives."""

from __future__ import annotations

import pytest
import torch

from aft_fast.ops import cpp_chunks, torch_chunks

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
    torch.library.opcheck(torch.ops.aft_fast.chunk_grad.default, args, test_utils=("test_schema", "test_faketensor"))


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
    for a, c in zip(*outs):
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
