"""The triton backend against the unfused reference: kernels one by one, then the public API.

Runs on CUDA tensors where CUDA is present, else on CPU tensors under the Triton interpreter (which
tests/conftest.py switches on). The shared suites (test_aft_loss.py, test_checks.py) also run the
triton backend under the interpreter; this file adds what they do not reach: explicit block sizes
(several vocab splits, tiles cut by V, T and H), repeated rows within one tile, every mode in bf16, the
group-loss kernel with several pair blocks per group, the gradient filters, the chunked strategy's row
kernels, engine and chunk plan (whole groups, live rows first, one pass unless a group exceeds the cap),
every mode with groups packed and split, the fused strategy, linear_logprob's keep_probs (kept logits,
all or part of the tokens, two backward passes), a compile check for sm_90 without a GPU,
and (marked gpu) the realistic shape H=4096, V=128256, T=8192 with both strategies.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aft_fast
from aft_fast.constants import MODES
from aft_fast.losses.objectives import build_plan
from aft_fast.ops.dispatch import resolve_backend, triton_backend_available, triton_runs_on
from aft_fast.options import LossOptions
from aft_fast.reference import aft_loss_ref, group_loss_ref, linear_logprob_ref
from tests.conftest import ATOL, make_problem

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
RUNS = triton_backend_available() and triton_runs_on(DEVICE)
needs_backend = pytest.mark.skipif(not RUNS, reason="triton cannot run here (no CUDA, TRITON_INTERPRET!=1)")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not (RUNS and DEVICE.type == "cuda"), reason="needs a CUDA device")

# Token and H blocks of 16, vocab tiles of 32; with split_v=48 (forward) a vocab split ends inside a
# tile, and V=123 cuts the last one.
SMALL = dict(BLOCK_B=16, BLOCK_V=32, BLOCK_D=16, GROUP_B=3, num_warps=4, num_stages=2)


def _close_to_gold(ours, low, gold, atol, what):
    """The tolerance rule of docs/design.md section 8: max|ours - gold| <= 2 * max|ref - gold| + atol,
    ref = the reference in the low dtype, gold = the reference on the same (rounded) inputs upcast to
    fp64, so that input rounding, which every backend shares, does not enter the bound."""
    err = (ours.double() - gold.double()).abs().max()
    err_ref = (low.double() - gold.double()).abs().max()
    assert err <= 2 * err_ref + atol, f"{what}: error {float(err):.3g} > 2 * {float(err_ref):.3g} + {atol}"


def _token_problem(dtype, *, bias, seed=0, T=47, N=20, V=123, H=40):
    """Random tokens whose rows repeat, also inside one block of 16 tokens."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 2 / H**0.5
    b = torch.randn(V, generator=g) if bias else None
    rows = torch.randint(0, N, (T,), generator=g)
    rows[:5] = 3  # one row predicting five tokens of a block (prompt sharing)
    targets = torch.randint(0, V, (T,), generator=g)
    coef = torch.randn(T, generator=g)
    coef[::7] = 0.0
    tensors = [None if t is None else t.to(DEVICE, dtype) for t in (hidden, weight, b)]
    return tensors, rows.to(DEVICE), targets.to(DEVICE), coef


def _ref_logp_and_grads(hidden, weight, bias, rows, targets, coef, need=(True, True, True)):
    """Per-token log-probs of the reference and the gradients of sum(coef * logp)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(n)
              for t, n in zip((hidden, weight, bias), need, strict=True)]
    T = rows.numel()
    logp = linear_logprob_ref(leaves[0], leaves[1], rows=rows, targets=targets,
                              segments=torch.arange(T, device=rows.device), num_segments=T, bias=leaves[2])
    if any(n and t is not None for t, n in zip(leaves, need, strict=True)):
        (logp * coef.to(logp)).sum().backward()
    return logp.detach(), [None if t is None or not t.requires_grad else t.grad for t in leaves]


@needs_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("blocks", ["default", "small"])
def test_forward_kernel(dtype, bias, blocks):
    from aft_fast.kernels.linear_logprob import linear_logprob_fwd

    (hidden, weight, b), rows, targets, _ = _token_problem(dtype, bias=bias)
    kw = dict(config=SMALL, split_v=48) if blocks == "small" else {}
    logp, lse = linear_logprob_fwd(hidden, weight, b, rows, targets, **kw)
    assert logp.dtype == lse.dtype == torch.float32 and logp.shape == rows.shape
    no_grad = (False, False, False)
    ref, _ = _ref_logp_and_grads(hidden, weight, b, rows, targets, torch.zeros(rows.numel()), need=no_grad)
    if dtype == torch.float32:
        torch.testing.assert_close(logp, ref, rtol=1e-5, atol=2e-5)
    else:
        gold, _ = _ref_logp_and_grads(*(None if t is None else t.double() for t in (hidden, weight, b)),
                                      rows, targets, torch.zeros(rows.numel()), need=no_grad)
        _close_to_gold(logp, ref, gold, ATOL[dtype], "logp")
    assert bool((logp <= 1e-4).all()) and bool(torch.isfinite(lse).all())


@needs_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("need", [(True, True, True), (True, False, False), (False, True, True)],
                         ids=["all", "hidden", "weight+bias"])
@pytest.mark.parametrize("blocks", ["default", "small"])
def test_backward_kernel(dtype, need, blocks):
    from aft_fast.kernels.linear_logprob import linear_logprob_fwd
    from aft_fast.kernels.linear_logprob_bwd import linear_logprob_bwd

    (hidden, weight, b), rows, targets, coef = _token_problem(dtype, bias=True, seed=1)
    config = SMALL if blocks == "small" else None
    _, lse = linear_logprob_fwd(hidden, weight, b, rows, targets)
    coef = coef.to(DEVICE)
    grads = linear_logprob_bwd(hidden, weight, b, rows, targets, lse, coef, need=need, config=config)
    _, ref = _ref_logp_and_grads(hidden, weight, b, rows, targets, coef, need=need)
    if dtype == torch.bfloat16:
        wide = (t.double() for t in (hidden, weight, b))
        _, gold = _ref_logp_and_grads(*wide, rows, targets, coef, need=need)
    for name, ours, r, n in zip(["grad_hidden", "grad_weight", "grad_bias"], grads, ref, need, strict=True):
        if not n:
            assert ours is None, name
            continue
        assert ours.dtype == torch.float32 and ours.shape == r.shape, name
        if dtype == torch.float32:
            torch.testing.assert_close(ours, r, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
        else:
            _close_to_gold(ours, r, gold[["grad_hidden", "grad_weight", "grad_bias"].index(name)],
                           ATOL[dtype], name)


@needs_backend
def test_grad_filters():
    """'exact' skips only tiles whose rounded gradient is zero: same result as 'off'. 'cce' skips more
    (here: tiles of tiny but representable probability), so it must differ, though only slightly."""
    from aft_fast.kernels.linear_logprob import linear_logprob_fwd
    from aft_fast.kernels.linear_logprob_bwd import linear_logprob_bwd

    (hidden, weight, b), rows, targets, coef = _token_problem(torch.bfloat16, bias=True, seed=2, V=96)
    b[32:64] = -30.0  # probability ~1e-13: bf16 still represents it, CCE's threshold drops it
    b[64:] = -300.0  # probability exp(-300): zero in fp32, so the rounded gradient is exactly zero
    targets = targets % 32
    _, lse = linear_logprob_fwd(hidden, weight, b, rows, targets)
    run = {f: linear_logprob_bwd(hidden, weight, b, rows, targets, lse, coef.to(DEVICE), grad_filter=f,
                                 config=SMALL) for f in ("off", "exact", "cce")}
    for off, exact in zip(run["off"], run["exact"], strict=True):
        if DEVICE.type == "cpu":  # the interpreter adds in a fixed order: skipping zeros changes nothing
            assert torch.equal(off, exact)
        else:
            torch.testing.assert_close(exact, off, rtol=1e-6, atol=1e-7)
    assert not torch.equal(run["cce"][1], run["off"][1])
    torch.testing.assert_close(run["cce"][0], run["off"][0], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="^grad_filter:"):
        linear_logprob_bwd(hidden, weight, b, rows, targets, lse, coef.to(DEVICE), grad_filter="fast")


def _segment_problem(seed: int, ranked: bool, members=None):
    p = make_problem(seed=seed, ranked=ranked, members=members)
    S = p.group.numel()
    counts = torch.bincount(p.segments, minlength=S).float()
    sums = -(torch.rand(S, generator=torch.Generator().manual_seed(seed)) * 3 + 0.1) * counts
    return p, sums, counts


@needs_backend
@pytest.mark.parametrize("ranked", [False, True], ids=["binary", "ranked"])
@pytest.mark.parametrize("mode", MODES)
def test_group_loss_kernel(mode, ranked):
    """Loss parts and d(loss)/d(sums) of the kernel path (all groups at once, as the fused strategy runs
    it) against autograd through the reference."""
    from aft_fast.ops.backend import AFTCall
    from aft_fast.ops.triton_backend import GroupKernelObjective

    p, sums, counts = _segment_problem(21 + ranked, ranked)
    cfg = LossOptions(mode=mode, beta=0.3, w_vft=0.7, w_align=1.3, dpo_beta=0.2, pro_tau=0.8)
    plan = build_plan(*(t.to(DEVICE) for t in (p.group, p.label, p.is_reference)), counts.to(DEVICE))
    no_tokens = torch.zeros(0, dtype=torch.int64, device=DEVICE)  # the group loss reads none
    call = AFTCall(no_tokens, no_tokens, no_tokens, counts.to(DEVICE), plan, cfg, p.ref_logp.to(DEVICE),
                   "triton")
    objective = GroupKernelObjective(call)
    dsum = objective.unit(sums.to(DEVICE), 0, plan.num_groups)
    loss, vft, align = objective.result(sums.to(DEVICE))

    leaf = sums.double().requires_grad_()
    ref_vft = -leaf[p.is_reference].sum() / counts[p.is_reference].sum()
    ref_align = torch.zeros((), dtype=torch.float64)
    if mode != "vft":
        ref_align = group_loss_ref(leaf, counts.double(), p.group, p.label, p.is_reference, mode=mode,
                                   beta=0.3, ref_logp=p.ref_logp.double(), dpo_beta=0.2, pro_tau=0.8)
    (0.7 * ref_vft + 1.3 * ref_align).backward()
    torch.testing.assert_close(vft.cpu().double(), ref_vft.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(align.cpu().double(), ref_align.detach(), rtol=1e-5, atol=1e-6)
    ref_loss = (0.7 * ref_vft + 1.3 * ref_align).detach()
    torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dsum.cpu().double(), leaf.grad, rtol=1e-5, atol=1e-7)


@needs_backend
@pytest.mark.parametrize("mode", ["bcl", "dpo+bc", "pro+bc", "rrhf", "dcl", "align"])
def test_group_loss_kernel_pair_blocks(mode):
    """Groups with more pairs than one block (BLOCK_P = 2 and 4): the online log-sum-exp across blocks."""
    from aft_fast.kernels.group_loss import group_loss_fwd
    from aft_fast.ops.triton_backend import group_csr

    members = [[2, 3, 1, 4, 2, 2, 3, 1, 2, 5, 1, 2], [3, 1, 2], [1, 1]]  # 12 ranked candidates: many pairs
    p, sums, counts = _segment_problem(31, True, members=members)
    plan = build_plan(*(t.to(DEVICE) for t in (p.group, p.label, p.is_reference)), counts.to(DEVICE))
    cfg = LossOptions(mode=mode, beta=0.4, dpo_beta=0.3, pro_tau=1.7)
    leaf = sums.double().requires_grad_()
    ref = group_loss_ref(leaf, counts.double(), p.group, p.label, p.is_reference, mode=mode, beta=0.4,
                         ref_logp=p.ref_logp.double(), dpo_beta=0.3, pro_tau=1.7)
    ref.backward()
    for block_p in (2, 4):
        group_loss, dsum = group_loss_fwd(
            sums.to(DEVICE), counts.to(DEVICE), p.ref_logp.to(DEVICE), **group_csr(plan), mode=cfg.base,
            boundary_constraint=cfg.boundary_constraint, beta=0.4, dpo_beta=0.3, pro_tau=1.7,
            scale=1.0 / plan.num_valid, block_p=block_p)
        align = group_loss.sum().cpu().double() / plan.num_valid
        torch.testing.assert_close(align, ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dsum.cpu().double(), leaf.grad, rtol=1e-5, atol=1e-7)


def _run_api(fn, p, **kw):
    leaves = [None if t is None else t.detach().clone().requires_grad_()
              for t in (p.hidden, p.weight, p.bias)]
    out = fn(leaves[0], leaves[1], bias=leaves[2], **p.index_kwargs(), **kw)
    out.loss.backward()
    return [out.loss.detach(), out.scores, *(None if t is None else t.grad for t in leaves)]


def _mode_kwargs(mode, p):
    return dict(mode=mode, beta=0.5, w_vft=0.8, ref_logp=p.ref_logp if mode.startswith("dpo") else None)


# fp32 on CPU is in test_aft_loss.py (shared suite); on CUDA it is here.
API_DTYPES = [torch.bfloat16] + ([torch.float32] if DEVICE.type == "cuda" else [])


@needs_backend
@pytest.mark.parametrize("dtype", API_DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("ranked", [False, True], ids=["binary", "ranked"])
@pytest.mark.parametrize("mode", MODES)
def test_aft_loss_matches_reference(mode, ranked, dtype):
    """Every mode through aft_fast.aft_loss(backend="triton"): loss, scores, grads of hidden, weight, bias."""
    p = make_problem(seed=41 + ranked, ranked=ranked, bias=True).to(DEVICE)
    kw = _mode_kwargs(mode, p)
    low = p.to(dtype=dtype)
    ours = _run_api(aft_fast.aft_loss, low, backend="triton", **kw)
    ref = _run_api(aft_loss_ref, low, **kw)
    names = ["loss", "scores", "grad_hidden", "grad_weight", "grad_bias"]
    if dtype == torch.float32:
        for name, a, r in zip(names, ours, ref, strict=True):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        return
    gold = _run_api(aft_loss_ref, low.to(dtype=torch.float64), **kw)  # the rounded inputs, computed exactly
    for name, a, r, g in zip(names, ours, ref, gold, strict=True):
        assert a.dtype == (torch.float32 if name in ("loss", "scores") else dtype), name
        _close_to_gold(a, r, g, ATOL[dtype], name)


@needs_backend
def test_linear_logprob_api_and_auto_backend():
    p = make_problem(seed=43, bias=True).to(DEVICE)
    S = p.group.numel()
    kw = dict(rows=p.rows, targets=p.targets, segments=p.segments, num_segments=S)
    upstream = torch.randn(S, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def run(fn, **extra):
        h, w, b = (t.detach().clone().requires_grad_() for t in (p.hidden, p.weight, p.bias))
        sums = fn(h, w, bias=b, **kw, **extra)
        (sums * upstream).sum().backward()
        return sums.detach(), h.grad, w.grad, b.grad

    ours, ref = run(aft_fast.linear_logprob, backend="triton"), run(linear_logprob_ref)
    for a, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
    # auto takes triton for CUDA tensors, never for CPU ones (the interpreter is for tests only)
    assert (resolve_backend("auto", DEVICE) == "triton") == (DEVICE.type == "cuda")


def _kept_logits(sums: torch.Tensor) -> torch.Tensor | None:
    """The logits that linear_logprob's forward kept for backward (saved after hidden, weight, bias, lse,
    logp), or None."""
    saved = sums.grad_fn.saved_tensors
    assert len(saved) in (5, 6)
    return saved[5] if len(saved) == 6 else None


@needs_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("keep", ["all", "part"])
def test_linear_logprob_keep_probs(monkeypatch, dtype, keep):
    """keep_probs on triton: the first n tokens that fit the budget keep their logits (one [n, V] tensor in
    the input dtype), so their backward recomputes nothing: the fused backward sees only the other tokens
    whose upstream gradient is nonzero, and the kept ones go through the chunk engine in slices of 16
    rows. Sums and gradients match the reference (bias, rows repeated by prompt sharing, a zero upstream
    gradient on every fourth segment)."""
    from aft_fast.ops import triton_backend
    from aft_fast.ops import triton_chunks as tc

    p = make_problem(seed=45, bias=True).to(DEVICE)
    low = p.to(dtype=dtype)
    T, V, S = p.rows.numel(), p.weight.shape[0], p.group.numel()
    row_bytes = V * torch.finfo(dtype).bits // 8
    n = T if keep == "all" else 40
    keep_probs = True if keep == "all" else (n + 1) * row_bytes - 1
    monkeypatch.setattr(tc, "CHUNK_BYTES", 16 * row_bytes)
    upstream = torch.randn(S, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    upstream[::4] = 0.0
    fused_tokens = []
    fused_bwd = triton_backend.linear_logprob_bwd

    def counting(hidden, weight, bias, rows, *args, **kw):
        fused_tokens.append(rows.numel())
        return fused_bwd(hidden, weight, bias, rows, *args, **kw)

    monkeypatch.setattr(triton_backend, "linear_logprob_bwd", counting)

    def run(fn, prob, **extra):
        h, w, b = (t.detach().clone().requires_grad_() for t in (prob.hidden, prob.weight, prob.bias))
        sums = fn(h, w, bias=b, rows=p.rows, targets=p.targets, segments=p.segments, num_segments=S, **extra)
        if fn is aft_fast.linear_logprob:
            logits = _kept_logits(sums)
            assert logits.shape == (n, V) and logits.dtype == dtype
        (sums * upstream).sum().backward()
        return [sums.detach(), h.grad, w.grad, b.grad]

    ours = run(aft_fast.linear_logprob, low, backend="triton", keep_probs=keep_probs)
    assert fused_tokens == ([] if n == T else [int((upstream[p.segments[n:]] != 0).sum())])
    ref = run(linear_logprob_ref, low)
    names = ["sums", "grad_hidden", "grad_weight", "grad_bias"]
    if dtype == torch.float32:
        for name, a, r in zip(names, ours, ref, strict=True):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
        return
    gold = run(linear_logprob_ref, low.to(dtype=torch.float64))
    for name, a, r, g in zip(names, ours, ref, gold, strict=True):
        assert a.dtype == (torch.float32 if name == "sums" else dtype), name
        _close_to_gold(a, r, g, ATOL[dtype], name)


@needs_backend
@pytest.mark.parametrize("keep", ["all", "part"])
def test_linear_logprob_keep_probs_backward_twice(keep):
    """Backward leaves the kept logits as they are: a second backward (retain_graph=True) gives the same
    gradients, and the kept tensor is unchanged."""
    p = make_problem(seed=46, bias=True).to(DEVICE)
    S, V = p.group.numel(), p.weight.shape[0]
    leaves = [t.detach().clone().requires_grad_() for t in (p.hidden, p.weight, p.bias)]
    sums = aft_fast.linear_logprob(leaves[0], leaves[1], bias=leaves[2], rows=p.rows, targets=p.targets,
                                   segments=p.segments, num_segments=S, backend="triton",
                                   keep_probs=True if keep == "all" else 30 * V * 4)
    logits = _kept_logits(sums)
    assert logits.shape[0] == (p.rows.numel() if keep == "all" else 30)
    before = logits.clone()
    upstream = torch.randn(S, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    loss = (sums * upstream).sum()
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves)
    assert torch.equal(logits, before)
    for name, a, b in zip(["grad_hidden", "grad_weight", "grad_bias"], first, second, strict=True):
        # equal up to the order of the atomic adds on a GPU
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


@needs_backend
def test_unsupported_dtype_names_hidden():
    p = make_problem(seed=44).to(DEVICE, torch.float64)
    with pytest.raises(ValueError, match="^hidden:"):
        aft_fast.aft_loss(p.hidden, p.weight, **p.index_kwargs(), backend="triton")


# --- the chunked strategy (aft_fast/ops/triton_chunks.py, kernels/chunk_softmax.py) ----------------

@needs_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("blocks", ["default", "row"])
def test_chunk_softmax_kernels(dtype, blocks):
    """The two row kernels on a [T, V] logits buffer, against the reference with an identity head (whose
    hidden gradient is then the logits gradient): logp and per-segment sums, then the in-place gradient
    for per-segment coefficients. V = 123 ends in a partial block, T = 47 in a partial row block; rows
    past the chunk stay untouched. "row": one row per program, as on a GPU."""
    from aft_fast.kernels.chunk_softmax import chunk_softmax_bwd, chunk_softmax_fwd

    (hidden, weight, b), rows, targets, coef = _token_problem(dtype, bias=True, seed=4)
    T, V = rows.numel(), weight.shape[0]
    config = None if blocks == "default" else dict(BLOCK_B=1, BLOCK_V=32, num_warps=4, num_stages=2)
    logits = torch.nn.functional.linear(hidden[rows], weight, b)  # the logits eager computes, in dtype
    buf = torch.full((T + 3, V), 7.0, dtype=dtype, device=DEVICE)
    buf[:T] = logits
    seg = torch.arange(T, device=DEVICE) % 6
    coef_table = torch.randn(6, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    sums = torch.zeros(6, dtype=torch.float32, device=DEVICE)

    logp, lse = chunk_softmax_fwd(buf[:T], targets, segments=seg, sums=sums, config=config)
    chunk_softmax_bwd(buf[:T], targets, lse, coef_table, seg, config=config)

    eye = torch.eye(V, dtype=dtype, device=DEVICE)
    index = torch.arange(T, device=DEVICE)
    ref_logp, (ref_grad, _, _) = _ref_logp_and_grads(logits, eye, None, index, targets, coef_table[seg],
                                                     need=(True, False, False))
    ref_sums = torch.zeros(6, dtype=torch.float32, device=DEVICE).index_add_(0, seg, ref_logp.float())
    if dtype == torch.float32:
        torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(buf[:T], ref_grad, rtol=1e-4, atol=1e-6)
    else:
        gold_logp, (gold_grad, _, _) = _ref_logp_and_grads(
            logits.double(), eye.double(), None, index, targets, coef_table[seg], need=(True, False, False))
        _close_to_gold(logp, ref_logp, gold_logp, ATOL[dtype], "logp")
        _close_to_gold(buf[:T], ref_grad, gold_grad, ATOL[dtype], "grad_logits")
        # Rounded to nearest as autograd rounds, not truncated (a bias that the max error above hides):
        # the mean error is PyTorch's own.
        mean_err, ref_mean = ((t.double() - gold_grad).abs().mean() for t in (buf[:T], ref_grad))
        assert mean_err <= 1.1 * ref_mean, f"grad_logits: mean error {mean_err:.3g} vs {ref_mean:.3g}"
    assert bool((buf[T:] == 7.0).all()), "rows past the chunk were written"

    # A row whose first block is all -inf (a masked vocabulary entry): finite lse, as logsumexp gives.
    buf = logits[:2].clone()
    buf[0, :40] = float("-inf")
    _, lse = chunk_softmax_fwd(buf, targets[:2], config=config)
    torch.testing.assert_close(lse, torch.logsumexp(buf.float(), dim=1), rtol=1e-5, atol=1e-5)


@needs_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("need", [(True, True, True), (False, True, False)], ids=["all", "weight"])
def test_chunk_engine(dtype, need):
    """triton_chunks.Chunks on two chunks whose live rows are a prefix (25 of 30, 12 of 17): the sums,
    and the fp32 gradients of sum(coef * logp) over the live rows only, against the reference. Rows
    repeat inside a chunk; the first chunk writes the uninitialized grad_weight, the second adds."""
    from aft_fast.ops.chunk_loop import Grads
    from aft_fast.ops.triton_chunks import Chunks

    (hidden, weight, b), rows, targets, coef = _token_problem(dtype, bias=True, seed=3)
    T = rows.numel()
    coef = coef.to(DEVICE)
    seg = torch.arange(T, device=DEVICE)
    spans, live = [(0, 30), (30, T)], [25, 12]
    keep = torch.ones(T, device=DEVICE)
    for (a, e), n in zip(spans, live, strict=True):
        keep[a + n : e] = 0.0

    engine = Chunks(hidden, weight, b, 30)
    grads = Grads(*engine.make_grads(need))
    sums = torch.zeros(T, dtype=torch.float32, device=DEVICE)
    for (a, e), n in zip(spans, live, strict=True):
        state, _ = engine.logprob(rows[a:e], targets[a:e], seg[a:e], sums)
        engine.grad(state, n, coef, seg[a:e], targets[a:e], rows[a:e], grads)
    engine.finish(grads)

    ref_logp, ref = _ref_logp_and_grads(hidden, weight, b, rows, targets, coef * keep, need=need)
    ours = (grads.hidden, grads.weight, grads.bias)
    names = ["grad_hidden", "grad_weight", "grad_bias"]
    if dtype == torch.float32:
        torch.testing.assert_close(sums, ref_logp, rtol=1e-5, atol=2e-5)
        for name, a, r in zip(names, ours, ref, strict=True):
            if r is None:
                assert a is None, name
                continue
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    else:
        wide = [t.double() for t in (hidden, weight, b)]
        gold_logp, gold = _ref_logp_and_grads(*wide, rows, targets, coef * keep, need=need)
        _close_to_gold(sums, ref_logp, gold_logp, ATOL[dtype], "sums")
        for name, a, r, g in zip(names, ours, ref, gold, strict=True):
            if r is None:
                assert a is None, name
                continue
            assert a.dtype == torch.float32, name
            _close_to_gold(a, r, g, ATOL[dtype], name)

    idle = Chunks(hidden, weight, b, 30)  # no live row anywhere: grad_weight must come back zero
    grads = Grads(*idle.make_grads((False, True, False)))
    idle.finish(grads)
    assert bool((grads.weight == 0).all())


def _expected_live(p, mode: str) -> set[int]:
    """Segments with a possibly nonzero gradient, from docs/design.md section 2 read off the labels: the
    references (w_vft = 1), and in the align modes the candidates in a pair, only as i under dcl."""
    live = {s for s in range(p.group.numel()) if bool(p.is_reference[s])}
    if mode == "vft":
        return live
    for i in range(p.group.numel()):
        for j in range(p.group.numel()):
            if (i != j and int(p.group[i]) == int(p.group[j]) and not bool(p.is_reference[i])
                    and not bool(p.is_reference[j]) and int(p.label[i]) > int(p.label[j])):
                live |= {i} if mode == "dcl" else {i, j}
    return live


@pytest.mark.parametrize("mode", ["vft", "dcl", "bcl"])
def test_chunk_plan_whole_groups_live_rows_first(mode):
    """The chunk plan of engines that skip dead rows: a permutation of the tokens; units of whole groups,
    at most a chunk each unless a single group; each unit's live tokens (those of live segments) first."""
    from aft_fast.ops.chunk_loop import plan_chunks

    p = make_problem(seed=11, ranked=True)
    S = p.group.numel()
    counts = torch.bincount(p.segments, minlength=S).float()
    plan = build_plan(p.group, p.label, p.is_reference, counts)
    live_seg = plan.live_segments(LossOptions(mode=mode))
    assert set(torch.nonzero(live_seg).flatten().tolist()) == _expected_live(p, mode)

    order, units, chunk = plan_chunks(plan, p.segments, 12, None, live_seg)
    assert chunk == 12 and sorted(order.tolist()) == list(range(p.rows.numel()))
    all_groups = plan.seg_group[p.segments]
    tok_group = all_groups[order]
    tok_live = live_seg[p.segments[order]]
    assert units[0].t0 == 0 and units[-1].t1 == order.numel()
    for u, nxt in zip(units, units[1:] + [None], strict=True):
        assert nxt is None or (nxt.t0 == u.t1 and nxt.g0 == u.g1)
        groups = tok_group[u.t0 : u.t1]
        assert bool(((groups >= u.g0) & (groups < u.g1)).all())
        assert int(((all_groups >= u.g0) & (all_groups < u.g1)).sum()) == u.t1 - u.t0  # whole groups
        assert u.t1 - u.t0 <= 12 or u.g1 - u.g0 == 1
        assert tok_live[u.t0 : u.t0 + u.live].all() and not tok_live[u.t0 + u.live : u.t1].any()


def test_chunk_budget():
    """GPU chunk sizing: CHUNK_BYTES of logits in the input dtype (no power-of-two rounding), grown to
    the largest group up to MAX_CHUNK_BYTES, never more than the tokens."""
    from aft_fast.ops import triton_chunks as tc

    V, T = 128256, 8192
    base = tc.CHUNK_BYTES // (2 * V)
    assert tc.chunk_size(V, T, 700, torch.bfloat16) == base
    assert tc.chunk_size(V, T, 700, torch.float32) == tc.CHUNK_BYTES // (4 * V)
    assert tc.chunk_size(V, T, base + 100, torch.bfloat16) == base + 100
    assert tc.chunk_size(V, T, 10 * base, torch.bfloat16) == tc.MAX_CHUNK_BYTES // (2 * V)
    assert tc.chunk_size(V, 300, 100, torch.bfloat16) == 300


@needs_backend
@pytest.mark.parametrize("cap_rows", [40, 30], ids=["groups_fit", "group_split"])
def test_chunked_single_pass_unless_a_group_exceeds_the_cap(monkeypatch, cap_rows):
    """chunk_size None with a small byte budget (20 logit rows, grown up to cap_rows for a large group):
    the groups (19, 16, 13, 10 and 35 tokens) are scored in one pass each when the largest fits under the
    cap, and only the 35-token group is recomputed when it does not. Both match the reference."""
    from aft_fast.ops import triton_backend
    from aft_fast.ops import triton_chunks as tc

    monkeypatch.setattr(triton_backend, "STRATEGY", "chunked")
    p = make_problem(seed=12).to(DEVICE)
    row = p.weight.shape[0] * 4
    monkeypatch.setattr(tc, "CHUNK_BYTES", 20 * row)
    monkeypatch.setattr(tc, "MAX_CHUNK_BYTES", cap_rows * row)
    calls = {"first": 0, "recompute": 0}
    logprob = tc.Chunks.logprob

    def counting(self, rows, targets, segments=None, sums=None, lse=None):
        calls["first" if lse is None else "recompute"] += 1
        return logprob(self, rows, targets, segments, sums, lse)

    monkeypatch.setattr(tc.Chunks, "logprob", counting)
    ours = _run_api(aft_fast.aft_loss, p, backend="triton", mode="bcl")
    if cap_rows == 40:  # chunk 35: [19 + 16], [13 + 10], [35]
        assert calls == {"first": 3, "recompute": 0}
    else:  # chunk 30: [19], [16 + 13], [10], [35 = 30 + 5] twice
        assert calls == {"first": 5, "recompute": 2}
    ref = _run_api(aft_loss_ref, p, mode="bcl")
    for name, a, r in zip(["loss", "scores", "grad_hidden", "grad_weight"], ours, ref, strict=False):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


CHUNKED_CASES = [(mode, ranked, {}) for mode in MODES for ranked in (False, True)] + [
    ("dcl", True, dict(w_vft=0.0)), ("bcl", False, dict(w_align=0.0)), ("align", True, dict(w_vft=0.0))]


@needs_backend
@pytest.mark.parametrize("mode,ranked,weights", CHUNKED_CASES,
                         ids=[f"{m}-{'ranked' if r else 'binary'}{'-' + ','.join(w) if w else ''}"
                              for m, r, w in CHUNKED_CASES])
def test_chunked_groups_packed_and_split(monkeypatch, mode, ranked, weights):
    """chunk_size 32 on groups of 19, 16, 13, 10 and 35 tokens: units of one group, of two groups, and
    the 35-token group split in two passes; dead rows (groups without pairs, dcl's j, references when
    w_vft = 0) skipped. Loss, scores and every gradient against the reference, fp32."""
    from aft_fast.ops import triton_backend

    monkeypatch.setattr(triton_backend, "STRATEGY", "chunked")
    p = make_problem(seed=51 + ranked, ranked=ranked, bias=ranked).to(DEVICE)
    kw = {**_mode_kwargs(mode, p), **weights}
    ours = _run_api(aft_fast.aft_loss, p, backend="triton", chunk_size=32, **kw)
    ref = _run_api(aft_loss_ref, p, **kw)
    names = ["loss", "scores", "grad_hidden", "grad_weight", "grad_bias"]
    for name, a, r in zip(names, ours, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@needs_backend
@pytest.mark.parametrize("mode", ["vft", "bcl", "dpo+bc", "pro+bc"])
def test_fused_strategy(monkeypatch, mode):
    """The fused strategy (no [chunk, V] buffer, four products) still matches the reference in bf16."""
    from aft_fast.ops import triton_backend

    monkeypatch.setattr(triton_backend, "STRATEGY", "fused")
    p = make_problem(seed=61, ranked=True, bias=True).to(DEVICE)
    kw = _mode_kwargs(mode, p)
    low = p.to(dtype=torch.bfloat16)
    ours = _run_api(aft_fast.aft_loss, low, backend="triton", **kw)
    ref = _run_api(aft_loss_ref, low, **kw)
    gold = _run_api(aft_loss_ref, low.to(dtype=torch.float64), **kw)
    for name, a, r, g in zip(["loss", "scores", "grad_hidden", "grad_weight", "grad_bias"], ours, ref, gold,
                             strict=True):
        _close_to_gold(a, r, g, ATOL[torch.bfloat16], name)
    monkeypatch.setattr(triton_backend, "STRATEGY", "fast")
    with pytest.raises(ValueError, match="^AFT_FAST_TRITON_STRATEGY:"):
        aft_fast.aft_loss(low.hidden, low.weight, **low.index_kwargs(), backend="triton")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None
                    or importlib.util.find_spec("triton.backends.nvidia") is None,
                    reason="needs triton with its NVIDIA backend")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the tests above compile and run the kernels")
def test_kernels_compile_for_sm90():
    """The interpreter never runs Triton's compiler: compile every kernel variant for sm_90 (H100/H200)
    in a process without TRITON_INTERPRET, which works without a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = Path(__file__).with_name("triton_aot_check.py")
    proc = subprocess.run([sys.executable, str(script), "--arch", "90"], env=env, capture_output=True,
                          text=True, timeout=600, cwd=script.parent.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout


# --- realistic shape, CUDA only -------------------------------------------------------------------

def _realistic_problem(tokens=8192, k=6, hidden_size=4096, vocab=128256):
    """Groups of one 5-token reference and k candidates of ragged length, exactly `tokens` scored tokens."""
    lengths, members, total = [97, 120, 85, 133, 101, 110, 64, 142], [], 0
    while total < tokens:
        if tokens - total <= 5:  # no room for a reference and a candidate: lengthen the last candidate
            members[-1][-1] += tokens - total
            break
        group = []
        total += 5  # make_problem's reference chain
        for c in range(k):
            n = min(lengths[(len(members) + c) % len(lengths)], tokens - total)
            if n == 0:
                break
            group.append(n)
            total += n
        members.append(group)
    p = make_problem(seed=7, ranked=False, members=members, hidden_size=hidden_size, vocab=vocab)
    assert p.rows.numel() == tokens
    return p


@gpu
@needs_cuda
def test_mm_f32_tiers(monkeypatch):
    """The chunked strategy's fp32-accumulating products, each tier this PyTorch offers (cuBLAS addmm
    into an fp32 addend, fp32-output mm slices, input-dtype slices): write then accumulate, against fp64."""
    from aft_fast.ops import triton_chunks as tc

    available = tc._fp32_out_products()
    print(f"fp32-output cuBLAS products: mm={available[0]} addmm={available[1]}")
    g = torch.Generator(device=DEVICE).manual_seed(0)
    a = torch.randn(2500, 700, generator=g, device=DEVICE).to(torch.bfloat16)
    b = torch.randn(700, 96, generator=g, device=DEVICE).to(torch.bfloat16)
    exact = 2 * (a.double() @ b.double())
    monkeypatch.setattr(tc, "_SLICE_ROWS", 1024)  # three slices, the last partial
    for tier in [(False, False), (True, False), (True, True)]:
        if tier > available:
            continue
        monkeypatch.setattr(tc, "_fp32_out_products", lambda tier=tier: tier)
        out = tc.mm_f32(a, b)
        tc.mm_f32(a, b, out=out, accumulate=True)
        # fp32 accumulation: far below one bf16 rounding of the result; input-dtype products: about one
        bound = 2.0**-8 if tier == (False, False) else 2.0**-14
        assert float((out.double() - exact).abs().max() / exact.abs().max()) < bound, tier


_REALISTIC_GOLD: dict = {}


def _realistic_gold(low, kw) -> tuple[list, list]:
    """(gold, max|ref - gold|) of loss, scores and both gradients at the realistic shape, computed once
    for the strategies that the test runs (gold: the reference on the bf16 inputs in fp64)."""
    if not _REALISTIC_GOLD:
        ref = _run_api(aft_loss_ref, low, **kw)[:4]
        gold = _run_api(aft_loss_ref, low.to(dtype=torch.float64), **kw)[:4]
        _REALISTIC_GOLD["gold"] = gold
        _REALISTIC_GOLD["err_ref"] = [(r.double() - g).abs().max() for r, g in zip(ref, gold, strict=True)]
    return _REALISTIC_GOLD["gold"], _REALISTIC_GOLD["err_ref"]


@gpu
@needs_cuda
@pytest.mark.parametrize("strategy", ["chunked", "fused"])
def test_realistic_shape_bf16(monkeypatch, strategy):
    """bf16, H=4096, V=128256, T=8192 in groups of 6, each strategy: values and gradients within PyTorch's
    own bf16 error, and no [T, V] allocation (the reference needs several)."""
    from aft_fast.ops import triton_backend

    monkeypatch.setattr(triton_backend, "STRATEGY", strategy)
    p = _realistic_problem().to(DEVICE)
    kw = dict(mode="bcl", beta=1.0)
    low = p.to(dtype=torch.bfloat16)
    hidden, weight = (t.detach().clone().requires_grad_() for t in (low.hidden, low.weight))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = aft_fast.aft_loss(hidden, weight, **low.index_kwargs(), backend="auto", **kw)
    out.loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    ours = [out.loss.detach(), out.scores, hidden.grad, weight.grad]
    # Beyond the inputs: fp32 accumulators and bf16 copies of both gradients (6 bytes per element),
    # then O(T) vectors; the chunked strategy frees its 512 MiB logits buffer before the copies, and
    # holds it only next to the fp32 accumulators. One bf16 [T, V] logits tensor alone would be
    # T * V * 2 bytes.
    grads_bytes = 6 * (hidden.numel() + weight.numel())
    logits_bytes = p.rows.numel() * p.weight.shape[0] * 2
    assert extra < grads_bytes + logits_bytes // 8, f"{extra / 2**20:.0f} MiB beyond the inputs"
    del out, hidden, weight
    gold, err_ref = _realistic_gold(low, kw)
    names = ["loss", "scores", "grad_hidden", "grad_weight"]
    for name, a, g, e in zip(names, ours, gold, err_ref, strict=True):
        err = (a.double() - g).abs().max()
        assert err <= 2 * e + ATOL[torch.bfloat16], f"{name}: error {float(err):.3g} > 2 * {float(e):.3g}"
