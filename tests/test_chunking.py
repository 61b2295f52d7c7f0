"""The chunk loop's plan: whole groups per chunk by default (one pass), a recompute pass otherwise."""

from __future__ import annotations

import types

import torch

from aft_fast.losses.objectives import TorchObjective, build_plan
from aft_fast.ops import chunk_loop, torch_chunks
from aft_fast.ops.backend import AFTCall
from aft_fast.options import LossOptions
from tests.conftest import make_problem


def _counting_prims():
    calls = {"logprob": 0, "grad": 0}

    def chunk_logprob(*args, **kwargs):
        calls["logprob"] += 1
        return torch_chunks.chunk_logprob(*args, **kwargs)

    def chunk_grad(*args, **kwargs):
        calls["grad"] += 1
        return torch_chunks.chunk_grad(*args, **kwargs)

    return types.SimpleNamespace(chunk_logprob=chunk_logprob, chunk_grad=chunk_grad), calls


def _run(p, chunk_size):
    prims, calls = _counting_prims()
    counts = torch.bincount(p.segments, minlength=p.group.numel()).float()
    plan = build_plan(p.group, p.label, p.is_reference, counts)
    call = AFTCall(p.rows, p.targets, p.segments, counts, plan, LossOptions(), None, "torch", chunk_size)
    result = chunk_loop.ChunkedBackend(prims).aft_forward(p.hidden, p.weight, None, call, (True, True, False),
                                                          TorchObjective(call, need_grad=True))
    return result, calls


def test_pack_groups_keeps_groups_whole():
    expected = [(0, 2, 0, 7), (2, 3, 7, 9), (3, 4, 9, 18), (4, 5, 18, 19)]
    assert chunk_loop._pack_groups([3, 4, 2, 9, 1], 8) == expected


def test_default_chunk_grows_to_hold_the_largest_group():
    # V = 200k: the 64 MiB default would be 64 tokens, smaller than these ~150-token groups.
    p = make_problem(seed=0, vocab=200_000, hidden_size=4, members=[[40, 30, 35], [50, 20, 45, 30]])
    assert chunk_loop.default_chunk_size(200_000, p.rows.numel()) < 150
    result, calls = _run(p, None)
    assert calls["logprob"] == calls["grad"]  # every chunk held whole groups: one pass each
    small, small_calls = _run(p, 32)
    assert small_calls["logprob"] > small_calls["grad"]  # groups split: a recomputing second pass
    torch.testing.assert_close(result.loss, small.loss)
    for a, b in zip(result.grads, small.grads, strict=True):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_chunks_are_capped_by_memory():
    V = 1_000_000
    assert chunk_loop.group_chunk_size(V, 10_000, 5_000) * V * 4 <= chunk_loop.MAX_CHUNK_BYTES
