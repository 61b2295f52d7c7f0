"""The C++ ops' run-time CPU choices: the SIMD level of the row loops and the GEMM library.

Both are made once per process, so each forced choice runs in a fresh one, with the environment
variables a user would set (AFT_FAST_CPU_CAPABILITY, AFT_FAST_CPU_GEMM) or the test-only refusal
(AFT_FAST_SIMULATE_ONEDNN_REFUSAL). The cpp reference tests run on every SIMD level this machine
executes and on both GEMM paths, so an AVX-512 machine also checks what an AVX2-only one runs.
What the machine runs is read from /proc/cpuinfo and torch, not from the code under test.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aft_fast.ops import cpp_chunks

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not cpp_chunks.AVAILABLE, reason="C++ extension not built")

LEVELS = ["default", "avx2", "avx512"]
X86 = platform.machine().lower() in ("x86_64", "amd64")
# The features each level's compiler flags use (CMakeLists.txt).
NEEDS = {"avx2": {"avx2", "fma", "f16c"}, "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                                                     "avx512dq"}}
CHOICE_VARS = ("AFT_FAST_CPU_CAPABILITY", "AFT_FAST_CPU_GEMM", "AFT_FAST_SIMULATE_ONEDNN_REFUSAL")


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def runnable_levels() -> list[str]:
    """The levels this machine executes: those its CPU has the features for, up to ATen's own level."""
    if not X86:
        return ["default"]
    flags = cpu_flags()
    aten = torch.backends.cpu.get_cpu_capability().lower()  # "avx512", "avx2", "default" or "no avx"
    top = LEVELS.index(aten) if aten in LEVELS else 0
    return [lv for lv in LEVELS[: top + 1] if NEEDS.get(lv, set()) <= flags]


def child_env(**values: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CHOICE_VARS}
    env.update(values)
    return env


def run_child(code: str, **values: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=child_env(**values), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


INFO = "import json; from aft_fast.ops import cpp_chunks; print(json.dumps(cpp_chunks.cpu_info()))"


def cpu_info_in(**values: str) -> tuple[dict, str]:
    proc = run_child(INFO, **values)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.skipif(not (X86 and Path("/proc/cpuinfo").exists()), reason="x86 Linux: /proc/cpuinfo flags")
def test_cpu_features_are_those_the_kernel_reports():
    flags = cpu_flags()
    features = cpp_chunks.cpu_info()["cpu_features"]
    assert set(features) == set().union(*NEEDS.values())
    assert features == {f: f in flags for f in features}


def test_without_variables_the_best_level_runs_and_gemm_is_probed():
    info, _ = cpu_info_in()
    assert info["cpu_capabilities_compiled"] == (LEVELS if X86 else ["default"])
    assert info["cpu_capability"] == runnable_levels()[-1], info["cpu_capability_reason"]
    assert "forced" not in info["cpu_capability_reason"]
    if info["gemm"] == "onednn":
        assert info["onednn_symbol"] and info["gemm_reason"].startswith("onednn: ")
    else:
        assert info["gemm"] == "aten" and info["gemm_reason"].startswith("aten: ")
        assert "forced" not in info["gemm_reason"]


@pytest.mark.parametrize("level", LEVELS)
def test_forced_level_is_reported_or_clamped(level):
    """A level the machine runs is taken as asked; one above it is clamped to the best, with a warning."""
    info, stderr = cpu_info_in(AFT_FAST_CPU_CAPABILITY=level.upper())  # any case
    runnable = runnable_levels()
    if level in runnable:
        assert info["cpu_capability"] == level
        assert info["cpu_capability_reason"] == f"forced by AFT_FAST_CPU_CAPABILITY={level}"
    else:
        assert info["cpu_capability"] == runnable[-1]
        assert f"clamped to {runnable[-1]}" in info["cpu_capability_reason"]
        assert "AFT_FAST_CPU_CAPABILITY" in stderr


@pytest.mark.skipif(not X86, reason="ATEN_CPU_CAPABILITY caps the x86 levels")
def test_aten_capability_caps_the_level():
    info, stderr = cpu_info_in(ATEN_CPU_CAPABILITY="default")
    assert info["aten_cpu_capability"] == "default" and info["cpu_capability"] == "default"
    assert "ATen runs default" in info["cpu_capability_reason"]
    info, stderr = cpu_info_in(ATEN_CPU_CAPABILITY="default", AFT_FAST_CPU_CAPABILITY="avx2")
    assert info["cpu_capability"] == "default"
    assert "clamped to default" in info["cpu_capability_reason"] and "clamped to default" in stderr


@pytest.mark.parametrize(("var", "value", "message"), [
    ("AFT_FAST_CPU_CAPABILITY", "sse4",
     "AFT_FAST_CPU_CAPABILITY: expected default, avx2 or avx512, got 'sse4'"),
    ("AFT_FAST_CPU_GEMM", "mkl", "AFT_FAST_CPU_GEMM: expected 'aten' (ATen's mm) or 'auto'"),
], ids=["level", "gemm"])
def test_a_bad_value_is_a_clear_error(var, value, message):
    code = ("import torch\nfrom aft_fast.ops import cpp_chunks\n"
            "cpp_chunks.chunk_logprob(torch.ones(2, 3), torch.ones(4, 3), None,"
            " torch.zeros(2, dtype=torch.long), torch.empty(2, 4))\n")
    proc = run_child(code, **{var: value})
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


# A small linear_logprob through the cpp backend against the reference, values and gradients; then
# the process's choices.
CHECK = """
import json, torch, aft_fast
from aft_fast.ops import cpp_chunks
from aft_fast.reference import linear_logprob_ref
g = torch.Generator().manual_seed(0)
h = torch.randn(40, 16, generator=g, requires_grad=True)
w = torch.randn(50, 16, generator=g, requires_grad=True)
kw = dict(rows=torch.arange(40), targets=torch.randint(0, 50, (40,), generator=g),
          segments=torch.arange(40) // 10, num_segments=4)
up = torch.randn(4, generator=g)
outs = []
for fn in (lambda: aft_fast.linear_logprob(h, w, **kw, backend="cpp", chunk_size=16),
           lambda: linear_logprob_ref(h, w, **kw)):
    h.grad = w.grad = None
    y = fn()
    (y * up).sum().backward()
    outs.append([y.detach(), h.grad, w.grad])
for a, b in zip(*outs):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
a, b = torch.randn(37, 50, generator=g), torch.randn(61, 50, generator=g)
out = torch.empty(37, 61)
cpp_chunks.gemm(a, b.t(), out)
torch.testing.assert_close(out, a @ b.t(), rtol=1e-5, atol=1e-5)
print(json.dumps(cpp_chunks.cpu_info()))
"""


@pytest.mark.parametrize(("simulate", "reason"), [
    ("1", "aten: oneDNN refused: mkldnn_matmul: simulated refusal"),
    ("wrong", "aten: oneDNN disagreed with ATen's mm"),
], ids=["refused", "disagreed"])
def test_gemm_probe_falls_back_to_aten_when_onednn_refuses_or_disagrees(simulate, reason):
    """The AVX2-only case: oneDNN's matmul throws for fp32 (simulated here); the probe catches it, ATen's
    mm runs the products, and the loss still matches the reference."""
    proc = run_child(CHECK, AFT_FAST_SIMULATE_ONEDNN_REFUSAL=simulate)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["gemm"] == "aten"
    if cpp_chunks.cpu_info()["onednn_symbol"]:
        assert info["gemm_reason"].startswith(reason), info["gemm_reason"]
    else:  # a libtorch without the symbol never reaches the probe
        assert info["gemm_reason"].startswith("aten: symbol not found")


def _combinations() -> list[tuple[str, str]]:
    """(level, gemm) pairs other than this machine's own choice, which the plain test run covers."""
    best = runnable_levels()[-1]
    return [(lv, g) for lv in runnable_levels() for g in ("auto", "aten") if (lv, g) != (best, "auto")]


@pytest.mark.parametrize(("level", "gemm"), _combinations())
def test_cpp_reference_suite_on_each_level_and_gemm(level, gemm):
    """A representative subset of the cpp reference suite: every C++ op against the torch primitives
    (vector tails, bias, kept probabilities), and the loss and log-probs against aft_fast.reference (also
    with the logit post-processing: the soft cap's row loops)."""
    files = ["tests/test_cpp_ops.py", "tests/test_aft_loss.py", "tests/test_logit_processing.py"]
    expr = "(test_cpp_ops and not aten_fallback) or (cpp and (bcl or linear_logprob or frozen))"
    env = dict(AFT_FAST_CPU_CAPABILITY=level, AFT_FAST_CPU_GEMM=gemm)
    info, _ = cpu_info_in(**env)
    assert info["cpu_capability"] == level
    assert info["gemm"] == ("aten" if gemm == "aten" else cpp_chunks.cpu_info()["gemm"])
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files,
                           "-k", expr], env=child_env(**env), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "deselected" in proc.stdout


@pytest.mark.skipif(not (X86 and shutil.which("objdump")), reason="x86 build; needs binutils' objdump")
def test_simd_instructions_only_in_their_own_level():
    """No function outside aft_fast::AVX2 / aft_fast::AVX512 holds a VEX or EVEX instruction (v*, or an
    AVX-512 mask op k*), so the common code runs on any x86-64 CPU; and the AVX512 copy uses zmm."""
    from aft_fast import _C

    asm = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", _C.__file__], capture_output=True,
                         text=True, check=True).stdout
    owners: dict[str, set[str]] = {}
    fn = ""
    for line in asm.splitlines():
        if line.endswith(">:"):
            fn = line.split("<", 1)[1][:-2]
            continue
        parts = line.split("\t")
        if len(parts) >= 2 and parts[1]:
            op = parts[1].split()[0]
            if op.startswith(("v", "kmov", "kor", "kand", "kxor", "knot", "kshift", "kunpck", "kadd",
                              "ktest")):
                owners.setdefault(fn, set()).add("zmm" if "zmm" in line else "vex")
    assert owners, "no SIMD code found at all: is the AVX2 / AVX512 copy compiled?"
    outside = sorted(f for f in owners if not f.startswith(("aft_fast::AVX2::", "aft_fast::AVX512::")))
    assert outside == []
    assert any("zmm" in kinds for f, kinds in owners.items() if f.startswith("aft_fast::AVX512::"))
    assert not any("zmm" in kinds for f, kinds in owners.items() if f.startswith("aft_fast::AVX2::"))
