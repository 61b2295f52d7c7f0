"""Every backend of aft_loss and linear_logprob against the unfused reference, values and gradients."""

from __future__ import annotations

import pytest
import torch

import aft_fast
from aft_fast.constants import MODES
from aft_fast.reference import aft_loss_ref, linear_logprob_ref
from tests.conftest import ATOL, Problem, backends_under_test, make_problem

BACKENDS = backends_under_test()


def _run(fn, p: Problem, **kw):
    """(loss, scores, grad_hidden, grad_weight, grad_bias) of fn on fresh leaves of p's tensors."""
    hidden = p.hidden.detach().clone().requires_grad_()
    weight = p.weight.detach().clone().requires_grad_()
    bias = None if p.bias is None else p.bias.detach().clone().requires_grad_()
    out = fn(hidden, weight, bias=bias, **p.index_kwargs(), **kw)
    out.loss.backward()
    return out.loss.detach(), out.scores, hidden.grad, weight.grad, None if bias is None else bias.grad


def _mode_kwargs(mode: str, p: Problem) -> dict:
    return dict(mode=mode, beta=0.5, ref_logp=p.ref_logp if mode.startswith("dpo") else None)


def _assert_fp32_close(ours, ref):
    names = ["loss", "scores", "grad_hidden", "grad_weight", "grad_bias"]
    for name, a, b in zip(names, ours, ref, strict=True):
        if b is None:
            assert a is None, name
            continue
        rtol, atol = (1e-4, 1e-6) if name in ("loss", "scores") else (1e-3, 1e-6)
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ranked", [False, True], ids=["binary", "ranked"])
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference_fp32(backend, mode, ranked):
    p = make_problem(seed=1 + ranked, ranked=ranked, bias=ranked)
    kw = _mode_kwargs(mode, p)
    ref = _run(aft_loss_ref, p, **kw)
    # chunk_size 8 splits groups (second, recomputing pass); 32 holds whole groups (single pass).
    # The triton backend sizes its own chunks (in bytes of its dtype): its chunk paths are tested in
    # tests/test_triton_backend.py, one size is enough here.
    for chunk_size in (8, 32, None) if backend != "triton" else (None,):
        ours = _run(aft_fast.aft_loss, p, backend=backend, chunk_size=chunk_size, **kw)
        _assert_fp32_close(ours, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["vft", "bcl", "dpo+bc", "pro", "rrhf"])
def test_bf16_within_pytorch_error(backend, mode):
    p = make_problem(seed=3, ranked=True)
    kw = _mode_kwargs(mode, p)
    low = p.to(dtype=torch.bfloat16)
    gold = _run(aft_loss_ref, low.to(dtype=torch.float64), **kw)  # the same rounded inputs, exact math
    ref = _run(aft_loss_ref, low, **kw)
    ours = _run(aft_fast.aft_loss, low, backend=backend, chunk_size=16, **kw)
    assert ours[2].dtype == torch.bfloat16 and ours[3].dtype == torch.bfloat16
    for name, a, r, g in zip(["loss", "scores", "grad_hidden", "grad_weight"], ours, ref, gold, strict=False):
        err_ours = (a.double() - g.double()).abs().max()
        err_ref = (r.double() - g.double()).abs().max()
        assert err_ours <= 2 * err_ref + ATOL[torch.bfloat16], f"{name}: {err_ours} > 2 * {err_ref}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_parts_and_scores(backend):
    """loss = w_vft * L_vft + w_align * L_align; scores are per-token means of each segment."""
    p = make_problem(seed=4)
    out = aft_fast.aft_loss(p.hidden, p.weight, **p.index_kwargs(), mode="bcl", w_vft=0.3, w_align=2.0,
                            backend=backend)
    ref = aft_loss_ref(p.hidden, p.weight, **p.index_kwargs(), mode="bcl", w_vft=0.3, w_align=2.0)
    torch.testing.assert_close(out.vft_loss, ref.vft_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.align_loss, ref.align_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.loss, 0.3 * out.vft_loss + 2.0 * out.align_loss, rtol=1e-5, atol=1e-6)
    assert out.scores.dtype == torch.float32 and not out.scores.requires_grad
    assert bool((out.scores < 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_without_pairs_add_nothing(backend):
    """All-positive and all-negative groups do not count in L_align's mean, but do in L_vft."""
    p = make_problem(seed=5, members=[[3, 4], [2, 5, 1]])  # group 0: labels 0,1; group 1 labels 0,1,0
    p.label[p.group == p.group[-1]] = 1  # group 1 becomes all positive
    base = aft_fast.aft_loss(p.hidden, p.weight, **p.index_kwargs(), mode="align", backend=backend)
    only = make_problem(seed=5, members=[[3, 4], [2, 5, 1]])
    keep = only.group == only.group[0]
    sub_tokens = keep[only.segments]
    sub = aft_fast.aft_loss(
        only.hidden, only.weight, rows=only.rows[sub_tokens], targets=only.targets[sub_tokens],
        segments=only.segments[sub_tokens], group=only.group[keep], label=only.label[keep],
        is_reference=only.is_reference[keep], mode="align", backend="torch")
    torch.testing.assert_close(base.align_loss, sub.align_loss, rtol=1e-5, atol=1e-7)
    assert base.vft_loss != sub.vft_loss  # both reference chains still count for L_vft


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_pairs_anywhere_gives_zero_align(backend):
    p = make_problem(seed=6, members=[[2, 3]])
    p.label[:] = 1
    out = aft_fast.aft_loss(p.hidden.requires_grad_(), p.weight, **p.index_kwargs(), mode="bcl",
                            backend=backend)
    assert float(out.align_loss) == 0.0
    torch.testing.assert_close(out.loss, out.vft_loss)
    out.loss.backward()
    assert torch.isfinite(p.hidden.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_scales_by_incoming_gradient(backend):
    p = make_problem(seed=7)
    h = p.hidden.clone().requires_grad_()
    (3.5 * aft_fast.aft_loss(h, p.weight, **p.index_kwargs(), backend=backend).loss).backward()
    h2 = p.hidden.clone().requires_grad_()
    aft_fast.aft_loss(h2, p.weight, **p.index_kwargs(), backend=backend).loss.backward()
    torch.testing.assert_close(h.grad, 3.5 * h2.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_and_no_grad(backend):
    p = make_problem(seed=8)
    h = p.hidden.clone().requires_grad_()
    out = aft_fast.aft_loss(h, p.weight, **p.index_kwargs(), backend=backend)
    out.loss.backward()
    ref_h = p.hidden.clone().requires_grad_()
    aft_loss_ref(ref_h, p.weight, **p.index_kwargs()).loss.backward()
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-3, atol=1e-6)
    with torch.no_grad():
        out = aft_fast.aft_loss(p.hidden, p.weight, **p.index_kwargs(), backend=backend)
    assert not out.loss.requires_grad


def _logprob_run(fn, p: Problem, upstream, **extra):
    """(sums, grad_hidden, grad_weight, grad_bias) of sum(upstream * fn(...)) on fresh leaves."""
    h, w, b = (t.detach().clone().requires_grad_() for t in (p.hidden, p.weight, p.bias))
    sums = fn(h, w, bias=b, rows=p.rows, targets=p.targets, segments=p.segments,
              num_segments=upstream.numel(), **extra)
    (sums * upstream).sum().backward()
    return sums.detach(), h.grad, w.grad, b.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_logprob(backend, dtype):
    p = make_problem(seed=9, bias=True, dtype=dtype)
    upstream = torch.randn(p.group.numel(), generator=torch.Generator().manual_seed(0))
    ours = _logprob_run(aft_fast.linear_logprob, p, upstream, backend=backend, chunk_size=10)
    if dtype == torch.float32:
        ref = _logprob_run(linear_logprob_ref, p, upstream)
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    else:
        gold = _logprob_run(linear_logprob_ref, p.to(dtype=torch.float64), upstream)  # p: rounded bf16 inputs
        ref = _logprob_run(linear_logprob_ref, p, upstream)
        for a, r, g in zip(ours, ref, gold, strict=True):
            err, err_ref = (a.double() - g).abs().max(), (r.double() - g).abs().max()
            assert err <= 2 * err_ref + ATOL[dtype]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])  # triton: test_triton_backend.py
@pytest.mark.parametrize("keep", [False, True, "part"])
@pytest.mark.parametrize("scale", [1.0, 8.0], ids=["flat", "peaked"])
def test_linear_logprob_keep_probs(backend, keep, scale):
    """Kept probabilities (fp16, per-row scale) give the reference's sums as without keeping, and its
    gradients to 1e-3 of each gradient's largest entry (fp16 rounds each probability by up to 2^-11,
    so entries that cancel lose that much of the terms' size, not of their own), also when most
    probabilities are near 0 or 1 (scale 8)."""
    p = make_problem(seed=11, bias=True, scale=scale)
    S, V, chunk = p.group.numel(), p.weight.shape[0], 10
    upstream = torch.randn(S, generator=torch.Generator().manual_seed(0))
    upstream[::4] = 0  # segments the loss does not use: left out of the backward, chunks mixed
    if keep == "part":  # a budget that holds two chunks and a half: two keep, the others recompute
        keep = int(2.5 * chunk * (2 * V + 4))
    ours = _logprob_run(aft_fast.linear_logprob, p, upstream, backend=backend, chunk_size=chunk,
                        keep_probs=keep)
    ref = _logprob_run(linear_logprob_ref, p, upstream)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-4, atol=1e-5)
    for name, a, b in zip(["grad_hidden", "grad_weight", "grad_bias"], ours[1:], ref[1:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()),
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_keep_probs_budget_counts_whole_chunks():
    from aft_fast.ops.chunk_loop import kept_chunks

    V, T, c = 100, 95, 10
    per_chunk = c * (2 * V + 4)
    assert kept_chunks(V, T, c, 0) == 0
    assert kept_chunks(V, T, c, per_chunk - 1) == 0
    assert kept_chunks(V, T, c, 3 * per_chunk + per_chunk // 2) == 3
    assert kept_chunks(V, T, c, T * (2 * V + 4)) == 10  # the last chunk holds 5 tokens
    assert kept_chunks(V, T, c, 10**18) == 10


def test_module_forwards_options():
    p = make_problem(seed=10)
    loss_fn = aft_fast.AFTLoss(mode="dcl", beta=0.7, w_vft=0.5, backend="torch")
    assert "mode='dcl'" in repr(loss_fn)
    out = loss_fn(p.hidden, p.weight, **p.index_kwargs())
    ref = aft_loss_ref(p.hidden, p.weight, **p.index_kwargs(), mode="dcl", beta=0.7, w_vft=0.5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-4, atol=1e-6)


def test_auto_backend_on_cpu_is_cpp_when_built():
    from aft_fast.ops import cpp_chunks
    from aft_fast.ops.dispatch import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == ("cpp" if cpp_chunks.AVAILABLE else "torch")
