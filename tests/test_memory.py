"""No backend allocates a [T, V] buffer: the largest single allocation stays O(chunk x V)."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import aft_fast
from aft_fast.reference import aft_loss_ref, linear_logprob_ref
from tests.conftest import backends_under_test

T, V, H, CHUNK = 2048, 4096, 32, 64


def _logprob_inputs():
    """hidden [T + 1, H], weight [V, H] (leaves) and the token keywords: segments of 16 tokens."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T + 1, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    kw = dict(rows=torch.arange(T), targets=torch.randint(0, V, (T,), generator=g),
              segments=torch.arange(T) // 16, num_segments=T // 16)
    return hidden, weight, kw


def _largest_allocation(fn) -> int:
    hidden, weight, kw = _logprob_inputs()
    S = kw.pop("num_segments")
    kw.update(group=torch.arange(S) // 4, label=torch.arange(S) % 2, is_reference=torch.arange(S) % 4 == 0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(hidden, weight, **kw).loss.backward()
    return max(e.cpu_memory_usage for e in prof.events())


def test_probe_sees_the_full_logits_of_the_reference():
    assert _largest_allocation(aft_loss_ref) >= T * V * 4


@pytest.mark.parametrize("backend", [b for b in backends_under_test() if b != "triton"])
def test_fused_backends_stay_within_a_chunk(backend):
    largest = _largest_allocation(lambda h, w, **kw: aft_fast.aft_loss(h, w, **kw, backend=backend,
                                                                      chunk_size=CHUNK))
    assert largest <= 2 * CHUNK * V * 4, f"{largest / 2**20:.1f} MiB in one allocation"


CPU_FUSED = [b for b in backends_under_test() if b != "triton"]


def _profile_linear_logprob(backend, keep_probs, upstream=None):
    hidden, weight, kw = _logprob_inputs()
    if upstream is None:
        upstream = torch.linspace(-1, 1, kw["num_segments"] + 1)[1:]  # never 0
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        sums = aft_fast.linear_logprob(hidden, weight, **kw, backend=backend, chunk_size=CHUNK,
                                       keep_probs=keep_probs)
        (sums * upstream).sum().backward()
    events = prof.events()
    # The C++ ops mark each product "aft_fast::gemm" (oneDNN's matmul is no ATen op); torch's are ATen's.
    names = ("aft_fast::gemm",) if backend == "cpp" else ("aten::mm", "aten::addmm", "aten::addmm_")
    products = sum(e.name in names for e in events)
    return products, max(e.cpu_memory_usage for e in events)


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_linear_logprob_products_and_largest_allocation(backend):
    """Without keep_probs: four [chunk, H] x [H, V]-sized products a chunk (the backward recomputes the
    logits) and no allocation beyond O(chunk x V); with it, three a chunk (no recompute)."""
    chunks = T // CHUNK
    products, largest = _profile_linear_logprob(backend, keep_probs=False)
    assert products == 4 * chunks
    assert largest <= 2 * CHUNK * V * 4, f"{largest / 2**20:.1f} MiB in one allocation"
    products, _ = _profile_linear_logprob(backend, keep_probs=True)
    assert products == 3 * chunks


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_keep_probs_stays_within_its_budget(backend):
    from aft_fast.ops.backend import LogProbCall
    from aft_fast.ops.dispatch import get_backend

    hidden, weight, kw = _logprob_inputs()
    per_chunk = CHUNK * (2 * V + 4)  # fp16 probabilities and an fp32 scale a token
    impl = get_backend(backend)
    for budget, expect in ((0, 0), (per_chunk - 1, 0), (5 * per_chunk + 7, 5), (10**15, T // CHUNK)):
        call = LogProbCall(**kw, backend=backend, chunk_size=CHUNK, keep_bytes=budget)
        _, _, kept = impl.logprob_forward(hidden.detach(), weight.detach(), None, call)
        assert len(kept) == 2 * expect
        assert sum(t.numel() * t.element_size() for t in kept) <= max(budget, 0)


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("keep", [False, True])
def test_linear_logprob_skips_tokens_without_gradient(backend, keep):
    """Segments the caller's loss does not use (upstream 0) take no part in the backward products: the
    first half of the chunks is skipped, and the gradients equal those of the reference."""
    S, chunks = T // 16, T // CHUNK
    upstream = torch.linspace(-1, 1, S)
    upstream[: S // 2] = 0  # the first T/2 tokens
    products, _ = _profile_linear_logprob(backend, keep, upstream)
    assert products == (4 if not keep else 3) * chunks - (3 if not keep else 2) * (chunks // 2)
    hidden, weight, kw = _logprob_inputs()
    (aft_fast.linear_logprob(hidden, weight, **kw, backend=backend, chunk_size=CHUNK, keep_probs=keep)
     * upstream).sum().backward()
    ours = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (linear_logprob_ref(hidden, weight, **kw) * upstream).sum().backward()
    torch.testing.assert_close(ours[0], hidden.grad, rtol=1e-3, atol=1e-3 * float(hidden.grad.abs().max()))
    torch.testing.assert_close(ours[1], weight.grad, rtol=1e-3, atol=1e-3 * float(weight.grad.abs().max()))


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_keep_probs_keeps_nothing_without_a_backward(backend, monkeypatch):
    """Under no_grad (scoring, sampling) keep_probs has no backward to serve: nothing is kept."""
    from aft_fast.ops import chunk_loop

    budgets = []
    forward = chunk_loop.ChunkedBackend.logprob_forward

    def spy(self, hidden, weight, bias, call):
        budgets.append(call.keep_bytes)
        return forward(self, hidden, weight, bias, call)

    monkeypatch.setattr(chunk_loop.ChunkedBackend, "logprob_forward", spy)
    hidden, weight, kw = _logprob_inputs()
    with torch.no_grad():
        aft_fast.linear_logprob(hidden, weight, **kw, backend=backend, chunk_size=CHUNK, keep_probs=True)
    aft_fast.linear_logprob(hidden, weight, **kw, backend=backend, chunk_size=CHUNK, keep_probs=True)
    assert budgets[0] == 0 and budgets[1] > 0
