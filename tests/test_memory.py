"""No backend allocates a [T, V] buffer: the largest single allocation stays O(chunk x V)."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import aft_fast
from aft_fast.reference import aft_loss_ref
from tests.conftest import backends_under_test

T, V, H, CHUNK = 2048, 4096, 32, 64


def _largest_allocation(fn) -> int:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T + 1, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    S = T // 16
    kw = dict(rows=torch.arange(T), targets=torch.randint(0, V, (T,), generator=g),
              segments=torch.arange(T) // 16, group=torch.arange(S) // 4, label=torch.arange(S) % 2,
              is_reference=torch.arange(S) % 4 == 0)
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
