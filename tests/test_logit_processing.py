"""The logit post-processing of the operator (docs/design.md section 2): with z = h W^T + b,
logits = softcap * tanh(logit_scale * z / softcap) / temperature (softcap None: no tanh).

The reference is checked against an independent, unfused statement of the formula (and fp64 gradcheck);
every backend of linear_logprob and aft_loss against the reference, values and gradients, for each option
alone and all together, in fp32 and bf16, with the tolerance rule of tests/conftest.py; bad options are
refused with an error that names them.
"""

from __future__ import annotations

import math

import pytest
import torch

import aft_fast
from aft_fast.reference import aft_loss_ref, linear_logprob_ref
from tests.conftest import ATOL, Problem, backends_under_test, make_problem

BACKENDS = backends_under_test()
AFT_NAMES = ["loss", "scores", "grad_hidden", "grad_weight", "grad_bias"]
# Each option alone, then all three together. Logits of the test problems have |z| up to ~10, so a soft
# cap of 4 saturates the largest ones (tanh' down to ~0.01) while most stay in the curved part.
OPTIONS = {
    "scale": dict(logit_scale=0.37),
    "softcap": dict(softcap=4.0),
    "temperature": dict(temperature=0.6),
    "together": dict(logit_scale=1.7, softcap=4.0, temperature=1.3),
}


def _leaves(p: Problem):
    return tuple(None if t is None else t.detach().clone().requires_grad_()
                 for t in (p.hidden, p.weight, p.bias))


def _logprob_run(fn, p: Problem, upstream: torch.Tensor, **kw):
    """(sums, grad_hidden, grad_weight, grad_bias) of sum(upstream * fn(...))."""
    h, w, b = _leaves(p)
    sums = fn(h, w, bias=b, rows=p.rows, targets=p.targets, segments=p.segments,
              num_segments=upstream.numel(), **kw)
    (sums * upstream.to(sums.dtype)).sum().backward()
    return sums.detach(), h.grad, w.grad, None if b is None else b.grad


def _aft_run(fn, p: Problem, **kw):
    """(loss, scores, grad_hidden, grad_weight, grad_bias) of fn's loss."""
    h, w, b = _leaves(p)
    out = fn(h, w, bias=b, **p.index_kwargs(), **kw)
    out.loss.backward()
    return out.loss.detach(), out.scores, h.grad, w.grad, None if b is None else b.grad


def _assert_within_rule(ours, ref, gold, dtype, names):
    """STYLE rule: max|ours - gold| <= 2 * max|ref - gold| + ATOL[dtype], per output."""
    for name, a, r, g in zip(names, ours, ref, gold, strict=True):
        if g is None:
            assert a is None, name
            continue
        assert a.dtype == r.dtype, f"{name}: dtype {a.dtype}, the reference's {r.dtype}"
        err = float((a.double() - g.double()).abs().max())
        err_ref = float((r.double() - g.double()).abs().max())
        assert err <= 2 * err_ref + ATOL[dtype], f"{name}: {err:.3g} > 2 * {err_ref:.3g} + {ATOL[dtype]}"


# ---------------------------------------------------------------------------------------------------------
# The reference


def test_reference_matches_the_unfused_formula():
    """linear_logprob_ref against the formula written out by hand in fp64: explicit exp and sum (no
    log_softmax), the tanh in the order Hugging Face's Gemma-2 applies it (z / c, tanh, * c)."""
    p = make_problem(seed=5, bias=True, dtype=torch.float64)
    s, c, t = 1.7, 4.0, 1.3
    z = p.hidden[p.rows] @ p.weight.T + p.bias
    logits = torch.tanh((z * s) / c) * c / t
    logp = logits[torch.arange(len(p.rows)), p.targets] - torch.log(torch.exp(logits).sum(1))
    S = p.group.numel()
    expected = torch.zeros(S, dtype=torch.float64)
    for i, seg in enumerate(p.segments.tolist()):
        expected[seg] += logp[i]
    ours = linear_logprob_ref(p.hidden, p.weight, bias=p.bias, rows=p.rows, targets=p.targets,
                              segments=p.segments,
                              num_segments=S, logit_scale=s, softcap=c, temperature=t)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    # The options change the scores (the test above could fail).
    plain = linear_logprob_ref(p.hidden, p.weight, bias=p.bias, rows=p.rows, targets=p.targets,
                               segments=p.segments, num_segments=S)
    assert float((plain - expected).abs().max()) > 1.0


def test_reference_gradients_by_finite_differences():
    p = make_problem(seed=6, bias=True, dtype=torch.float64, members=[[2, 3], [1, 2]], hidden_size=6,
                     vocab=11)
    S = p.group.numel()

    def f(h, w, b):
        return linear_logprob_ref(h, w, bias=b, rows=p.rows, targets=p.targets, segments=p.segments,
                                  num_segments=S, **OPTIONS["together"])

    assert torch.autograd.gradcheck(f, _leaves(p))


# ---------------------------------------------------------------------------------------------------------
# Every backend against the reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_logprob_options(backend, option, dtype):
    kw = OPTIONS[option]
    p = make_problem(seed=9, bias=True, dtype=dtype)
    upstream = torch.randn(p.group.numel(), generator=torch.Generator().manual_seed(0))
    upstream[::4] = 0  # segments the caller's loss does not use
    gold = _logprob_run(linear_logprob_ref, p.to(dtype=torch.float64), upstream, **kw)
    ref = _logprob_run(linear_logprob_ref, p, upstream, **kw)
    ours = _logprob_run(aft_fast.linear_logprob, p, upstream, backend=backend, chunk_size=10, **kw)
    _assert_within_rule(ours, ref, gold, dtype, ["sums", "grad_hidden", "grad_weight", "grad_bias"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_linear_logprob_options_keep_probs(backend, option):
    """keep_probs with the options: the kept path gives the reference's values and gradients too."""
    kw = OPTIONS[option]
    p = make_problem(seed=10, bias=True)
    upstream = torch.randn(p.group.numel(), generator=torch.Generator().manual_seed(1))
    ref = _logprob_run(linear_logprob_ref, p, upstream, **kw)
    ours = _logprob_run(aft_fast.linear_logprob, p, upstream, backend=backend, chunk_size=10, keep_probs=True,
                        **kw)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(ours[1:], ref[1:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["bcl", "dpo"])
def test_aft_loss_options(backend, option, dtype, mode):
    kw = dict(OPTIONS[option], mode=mode, beta=0.5, ref_logp=None)
    p = make_problem(seed=3, ranked=mode == "dpo", bias=mode == "bcl", dtype=dtype)
    if mode == "dpo":
        kw["ref_logp"] = p.ref_logp
    gold = _aft_run(aft_loss_ref, p.to(dtype=torch.float64), **kw)
    ref = _aft_run(aft_loss_ref, p, **kw)
    # chunk_size 8 splits groups (a second, recomputing pass), None holds whole groups (one pass).
    for chunk_size in (8, None) if backend != "triton" else (None,):
        ours = _aft_run(aft_fast.aft_loss, p, backend=backend, chunk_size=chunk_size, **kw)
        _assert_within_rule(ours, ref, gold, dtype, AFT_NAMES)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("option", list(OPTIONS))
def test_triton_fused_strategy_options(monkeypatch, option):
    """The triton backend's fused strategy (logits tiles in registers) takes the options too."""
    from aft_fast.ops import triton_backend

    monkeypatch.setattr(triton_backend, "STRATEGY", "fused")
    kw = dict(OPTIONS[option], mode="bcl", beta=0.5)
    p = make_problem(seed=4, bias=True)
    gold = _aft_run(aft_loss_ref, p.to(dtype=torch.float64), **kw)
    ref = _aft_run(aft_loss_ref, p, **kw)
    ours = _aft_run(aft_fast.aft_loss, p, backend="triton", **kw)
    _assert_within_rule(ours, ref, gold, torch.float32, AFT_NAMES)


def test_defaults_are_the_plain_logits():
    p = make_problem(seed=7)
    S = p.group.numel()
    args = dict(rows=p.rows, targets=p.targets, segments=p.segments, num_segments=S)
    plain = aft_fast.linear_logprob(p.hidden, p.weight, **args, backend="torch")
    same = aft_fast.linear_logprob(p.hidden, p.weight, **args, backend="torch", logit_scale=1.0, softcap=None,
                                   temperature=1.0)
    assert torch.equal(plain, same)


def test_module_forwards_the_options():
    p = make_problem(seed=8)
    loss_fn = aft_fast.AFTLoss(mode="bcl", softcap=4.0, logit_scale=1.7, temperature=1.3, backend="torch")
    assert "softcap=4.0" in repr(loss_fn)
    out = loss_fn(p.hidden, p.weight, **p.index_kwargs())
    ref = aft_loss_ref(p.hidden, p.weight, **p.index_kwargs(), mode="bcl", **OPTIONS["together"])
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,value", [
    ("logit_scale", math.inf), ("logit_scale", "2"), ("softcap", 0.0), ("softcap", -3.0),
    ("softcap", math.nan),
    ("temperature", 0.0), ("temperature", -1.0), ("temperature", math.inf),
])
def test_bad_options_are_refused_by_name(name, value):
    p = make_problem(seed=0)
    with pytest.raises(ValueError, match=f"^{name}: "):
        aft_fast.aft_loss(p.hidden, p.weight, **p.index_kwargs(), backend="torch", **{name: value})
    with pytest.raises(ValueError, match=f"^{name}: "):
        aft_fast.linear_logprob(p.hidden, p.weight, rows=p.rows, targets=p.targets, segments=p.segments,
                                num_segments=p.group.numel(), backend="torch", **{name: value})


def test_auto_backend_takes_a_soft_cap():
    """backend "auto" on the CPU (cpp where built) takes a soft cap too."""
    p = make_problem(seed=12)
    args = dict(rows=p.rows, targets=p.targets, segments=p.segments, num_segments=p.group.numel())
    auto = aft_fast.linear_logprob(p.hidden, p.weight, **args, softcap=4.0)
    ref = linear_logprob_ref(p.hidden, p.weight, **args, softcap=4.0)
    torch.testing.assert_close(auto, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("strategy", ["chunked", "fused"])
def test_triton_on_cuda(monkeypatch, dtype, strategy):
    """The compiled kernels (not the interpreter) with all three options: aft_loss in both strategies and
    linear_logprob, values and gradients within the tolerance rule."""
    from aft_fast.ops import triton_backend

    monkeypatch.setattr(triton_backend, "STRATEGY", strategy)
    kw = dict(OPTIONS["together"], mode="bcl", beta=0.5)
    p = make_problem(seed=13, bias=True, dtype=dtype).to(device="cuda")
    gold = _aft_run(aft_loss_ref, p.to(dtype=torch.float64), **kw)
    ref = _aft_run(aft_loss_ref, p, **kw)
    ours = _aft_run(aft_fast.aft_loss, p, backend="triton", **kw)
    _assert_within_rule(ours, ref, gold, dtype, AFT_NAMES)
    upstream = torch.randn(p.group.numel(), generator=torch.Generator().manual_seed(2)).cuda()
    lp = dict(OPTIONS["together"])
    gold = _logprob_run(linear_logprob_ref, p.to(dtype=torch.float64), upstream, **lp)
    ref = _logprob_run(linear_logprob_ref, p, upstream, **lp)
    ours = _logprob_run(aft_fast.linear_logprob, p, upstream, backend="triton", **lp)
    _assert_within_rule(ours, ref, gold, dtype, ["sums", "grad_hidden", "grad_weight", "grad_bias"])


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("V", [301, 16, 1])
@pytest.mark.parametrize("given_lse", [False, True], ids=["lse", "recompute"])
def test_cpp_linear_logprob_soft_cap_op_matches_torch_primitive(V, given_lse):
    """The C++ chunk op's soft cap (its SIMD row loops: vector body and tails) against the torch primitive:
    log-probs, log-sum-exp, the buffer it leaves for chunk_grad, and the gradients; opcheck on its schema."""
    from aft_fast.ops import cpp_chunks, torch_chunks

    g = torch.Generator().manual_seed(V)
    h, w = torch.randn(7, 12, generator=g), torch.randn(V, 12, generator=g)
    b = torch.randn(V, generator=g)
    targets = torch.randint(0, V, (7,), generator=g)
    lse = None
    if given_lse:
        lse = torch_chunks.chunk_logprob(h, w, b, targets, torch.empty(7, V), cap=2.5)[1]
    outs = []
    for prims in (torch_chunks, cpp_chunks):
        buf = torch.empty(7, V)
        logp, out_lse = prims.chunk_logprob(h, w, b, targets, buf, lse, cap=2.5)
        gh, gw, gb = torch.zeros(6, 12), torch.zeros_like(w), torch.zeros(V)
        left = buf.clone()
        rows = torch.tensor([0, 2, 2, 5, 1, 0, 3])
        prims.chunk_grad(buf, torch.linspace(-1, 2, 7), targets, h, w, rows, gh, gw, gb)
        outs.append((logp, out_lse, left, gh, gw, gb))
    for a, c in zip(*outs, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    torch.library.opcheck(torch.ops.aft_fast.chunk_logprob.default,
                          (h, w, b, targets, torch.empty(7, V), None, None, None, None, None, 2.5),
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match="cap: expected a positive soft cap"):
        cpp_chunks.chunk_logprob(h, w, b, targets, torch.empty(7, V), cap=-1.0)
