#!/usr/bin/env bash
# The GPU check of the triton backend: one command for a machine with one CUDA GPU and no network.
#
#   bash benchmarks/gpu_check.sh [--install] [--dry-run] [OUT_DIR]   (OUT_DIR: benchmarks/results)
#
# Needs aft_fast installed in the python it uses (PYTHON, else .venv/bin/python, else python3), as
# `make install` does: the install maps kernels/ to aft_fast.kernels. On a bare machine (a fresh GPU
# box with torch and triton but not this package) pass --install: it runs
# `pip install --no-deps --no-build-isolation -e .` first (no network; builds the C++ extension).
#
# Steps, each under its own time limit, all run even when one fails (7.2 minutes at most, 8.7 with
# --install):
#   install (90 s)  only with --install
#   env    (30 s)   CUDA visible; GPU, driver, torch and triton versions; aft_fast.kernels importable
#   tests  (180 s)  tests/test_triton_backend.py on CUDA tensors, the realistic-shape gpu tests included
#                   (bf16, H=4096, V=128256, T=8192 in groups of 6), with the first block config of each
#                   kernel (AFT_FAST_AUTOTUNE=0: compiling every autotune candidate would not fit)
#   bench  (220 s)  benchmarks/bench_gpu.py at that shape, autotuned: triton against the matmul floor,
#                   eager PyTorch, torch.compile, Liger-Kernel and Cut Cross-Entropy
# Writes into OUT_DIR: gpu_check_<date>_<gpu>.md (the table), bench_gpu.csv, pytest.xml and one log per
# step. Exit status 0 when every step passed, else 1.
#
# --dry-run checks this script on a machine without a GPU: no CUDA required, a few triton tests under
# the interpreter, the benchmark's --dry-run (tiny shape); OUT_DIR defaults to a temporary folder.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DRY_RUN=0
INSTALL=0
while [[ ${1:-} == --* ]]; do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --install) INSTALL=1 ;;
        *) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
if [[ $# -gt 1 ]]; then
    echo "usage: bash benchmarks/gpu_check.sh [--install] [--dry-run] [OUT_DIR]" >&2
    exit 2
fi
if [[ $DRY_RUN == 1 ]]; then
    OUT_DIR=${1:-$(mktemp -d -t gpu_check_dry_run.XXXXXX)}
else
    OUT_DIR=${1:-benchmarks/results}
fi
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)

PY=${PYTHON:-.venv/bin/python}
if [[ ! -x $PY ]]; then
    PY=$(command -v python3 || true)
fi
if [[ -z $PY ]]; then
    echo "gpu_check: no python (set PYTHON=/path/to/python)" >&2
    exit 2
fi
export PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}  # triton 3.9's default, stated (no warning)
if [[ $DRY_RUN == 1 ]]; then
    export TRITON_INTERPRET=1
else
    unset TRITON_INTERPRET  # compiled kernels on the GPU
fi

declare -a SUMMARY=()
FAILED=0

# step NAME LIMIT_SECONDS COMMAND...: run with a time limit, log to OUT_DIR/gpu_check_NAME.log.
step() {
    local name=$1 limit=$2
    shift 2
    local log="$OUT_DIR/gpu_check_$name.log" start=$SECONDS rc
    echo "=== [$name] limit ${limit}s: $*"
    set +e
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    local took=$((SECONDS - start)) status=ok
    if [[ $rc == 124 || $rc == 137 ]]; then
        status="TIMED OUT after ${limit}s"
    elif [[ $rc != 0 ]]; then
        status="FAILED (exit $rc)"
    fi
    [[ $status == ok ]] || FAILED=1
    echo "=== [$name] $status in ${took}s (log: $log)"
    SUMMARY+=("$(printf '%-6s %-28s %4ss' "$name" "$status" "$took")")
    return 0
}

ENV_CHECK='
import sys, torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "missing"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton_version}, "
      f"CUDA runtime {torch.version.cuda}")
if not torch.cuda.is_available():
    print("no CUDA device visible", file=sys.stderr)
    sys.exit(0 if "--dry-run" in sys.argv else 1)
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
try:
    import aft_fast.kernels  # noqa: F401  (mapped from kernels/ by the install)
except ImportError as exc:
    sys.exit(f"aft_fast.kernels does not import ({exc}): install the package (make install), or pass --install")
from aft_fast.ops.dispatch import resolve_backend
print("backend auto on cuda:", resolve_backend("auto", torch.device("cuda")))
'

if [[ $INSTALL == 1 ]]; then
    step install 90 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi
dry=()
[[ $DRY_RUN == 1 ]] && dry=(--dry-run)
step env 30 "$PY" -c "$ENV_CHECK" "${dry[@]}"
if [[ $FAILED == 1 ]]; then
    echo "gpu_check: a set-up step failed; skipping tests and benchmark" >&2
    printf '%s\n' "${SUMMARY[@]}"
    exit 1
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total \
    --format=csv,noheader || true

if [[ $DRY_RUN == 1 ]]; then
    step tests 180 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_backend.py \
        -k "forward_kernel and small and fp32" --junitxml "$OUT_DIR/pytest.xml" -ra
    step bench 220 "$PY" benchmarks/bench_gpu.py --dry-run --out "$OUT_DIR" --timeout 120
else
    step tests 180 env AFT_FAST_AUTOTUNE=0 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_backend.py \
        --junitxml "$OUT_DIR/pytest.xml" -ra
    # Providers run in order (floor, triton, eager, ...); the report is rewritten after each, so a
    # step that runs out of time still leaves what it measured.
    step bench 220 "$PY" benchmarks/bench_gpu.py --out "$OUT_DIR" --timeout 90
fi

echo
echo "=== gpu_check summary ($OUT_DIR)"
printf '%s\n' "${SUMMARY[@]}"
ls -1 "$OUT_DIR"
exit "$FAILED"
