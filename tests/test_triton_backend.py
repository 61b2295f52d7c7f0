"""The triton backend against the unfused reference: kernels one by one, then the public API.

Runs on CUDA tensors where CUDA is present, else on CPU tensors under the Triton interpreter (which
tests/conftest.py switches on). The shared suites (test_aft_loss.py, test_checks.py) also run the
triton backend under the interpreter; this file adds what they do not reach: explicit block sizes
(several vocab splits, tiles cut by V, T and H), repeated rows within one tile, every mode in bf16, the
group-loss kernel with several pair blocks per group, the gradient filters, a compile check for sm_90
without a GPU, and (marked gpu) the realistic shape H=4096, V=128256, T=8192.
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
from aft_fast.losses.objectives import LossConfig, build_plan
from aft_fast.ops.dispatch import resolve_backend, triton_backend_available, triton_runs_on
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
    """STYLE.md 5: max|ours - gold| <= 2 * max|ref - gold| + atol, ref = the reference in the low dtype,
    gold = the reference on the same (rounded) inputs upcast to fp64, so that input rounding, which
    every backend shares, does not enter the bound."""
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
    """Loss parts and d(loss)/d(sums) of the kernel path against autograd through the reference."""
    from aft_fast.losses.triton_impl import objective_with_grad

    p, sums, counts = _segment_problem(21 + ranked, ranked)
    cfg = LossConfig(mode=mode, beta=0.3, w_vft=0.7, w_align=1.3, dpo_beta=0.2, pro_tau=0.8)
    plan = build_plan(*(t.to(DEVICE) for t in (p.group, p.label, p.is_reference)), counts.to(DEVICE))
    loss, vft, align, dsum = objective_with_grad(sums.to(DEVICE), counts.to(DEVICE), plan, cfg,
                                                 p.ref_logp.to(DEVICE))

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
    from aft_fast.losses.triton_impl import group_csr, group_loss_fwd

    members = [[2, 3, 1, 4, 2, 2, 3, 1, 2, 5, 1, 2], [3, 1, 2], [1, 1]]  # 12 ranked candidates: many pairs
    p, sums, counts = _segment_problem(31, True, members=members)
    plan = build_plan(*(t.to(DEVICE) for t in (p.group, p.label, p.is_reference)), counts.to(DEVICE))
    cfg = LossConfig(mode=mode, beta=0.4, dpo_beta=0.3, pro_tau=1.7)
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


@needs_backend
def test_unsupported_dtype_names_hidden():
    p = make_problem(seed=44).to(DEVICE, torch.float64)
    with pytest.raises(ValueError, match="^hidden:"):
        aft_fast.aft_loss(p.hidden, p.weight, **p.index_kwargs(), backend="triton")


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
def test_realistic_shape_bf16():
    """bf16, H=4096, V=128256, T=8192 in groups of 6: values and gradients within PyTorch's own bf16 error,
    and no [T, V] allocation (the reference needs several)."""
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
    # then O(T) vectors. One bf16 [T, V] logits tensor alone would be T * V * 2 bytes.
    grads_bytes = 6 * (hidden.numel() + weight.numel())
    logits_bytes = p.rows.numel() * p.weight.shape[0] * 2
    assert extra < grads_bytes + logits_bytes // 8, f"{extra / 2**20:.0f} MiB beyond the inputs"
    del out, hidden, weight
    ref = _run_api(aft_loss_ref, low, **kw)[:4]
    gold = _run_api(aft_loss_ref, low.to(dtype=torch.float64), **kw)[:4]
    for name, a, r, g in zip(["loss", "scores", "grad_hidden", "grad_weight"], ours, ref, gold, strict=True):
        _close_to_gold(a, r, g, ATOL[torch.bfloat16], name)
