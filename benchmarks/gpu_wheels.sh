#!/usr/bin/env bash
# Fill .whl/ with the Python 3.12 x86-64 wheels that benchmarks/gpu_check.sh needs on a GPU machine that
# has torch, triton and transformers but no network and none of DeepSpeed, Liger-Kernel, Cut
# Cross-Entropy or TRL. Run it where pip reaches a package index; `gpu_check.sh --install` then installs
# them with `pip install --no-index --no-deps` from that folder.
#
#   bash benchmarks/gpu_wheels.sh [DIR]        (DIR: .whl)
#
# What it fetches (PYTHON: the python that downloads and builds, default .venv/bin/python):
#   - the packages of WHEELS below as binary wheels for CPython 3.12 on manylinux x86-64, without their
#     requirements: each requirement the GPU image lacks is named here itself, so that pip can never
#     pull a second torch or triton (a multi-GB CUDA build) into the folder;
#   - DeepSpeed, which PyPI serves as a source archive only, built here into a pure-Python wheel
#     (DS_BUILD_OPS=0: no CUDA op is compiled ahead, DeepSpeed JIT-builds what it uses).
# Versions follow constraints.txt where it pins them. The folder must stay small: it travels with the
# working tree (64 MiB in all).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DIR=${1:-.whl}
PY=${PYTHON:-.venv/bin/python}
[[ -x $PY ]] || PY=$(command -v python3)

pin() {  # pin NAME [VERSION]: NAME==the version constraints.txt pins, else NAME==VERSION
    local v
    v=$(sed -n "s/^$1==\([^ ]*\).*/\1/p" constraints.txt | head -1)
    v=${v:-${2:?gpu_wheels: no version for $1}}
    echo "$1==$v"
}

# Binary wheels, requirements included by name. On the GPU image (see the device notes) are already:
# torch, triton, transformers, accelerate, numpy, einops, msgpack, ninja, packaging, psutil, py-cpuinfo,
# tqdm, nvidia-ml-py, typing-extensions, pyyaml, safetensors, tokenizers.
WHEELS=(
    "$(pin liger-kernel)"       # requires torch, triton
    "$(pin cut-cross-entropy)"  # requires torch, triton
    "$(pin trl 1.16.0)"             # bench_gpu imports trl.kernels alone: torch, transformers, packaging
    hjson==3.1.0                # deepspeed
    # deepspeed's pydantic>=2, at a version whose typing-extensions floor (4.12.2) an older image meets
    pydantic==2.11.7 pydantic-core==2.33.2 annotated-types==0.7.0 typing-inspection==0.4.1
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64)

mkdir -p "$DIR"
rm -f "$DIR"/*.whl
# --no-deps throughout: requirements come only from the list above.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]/#/--platform=}" -d "$DIR" "${WHEELS[@]}"

# DeepSpeed: the source archive, then a wheel built without isolation (its setup.py imports torch,
# which must be the one installed here, not a download) and without compiling any op.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$src" "$(pin deepspeed)"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "$src"/deepspeed-*.tar.gz

# Never torch or triton (or a CUDA runtime): the GPU image's own must be the ones imported.
if ls "$DIR" | grep -E -i '^(torch|triton|nvidia)[-_]'; then
    echo "gpu_wheels: a torch/triton/nvidia wheel landed in $DIR; refusing" >&2
    exit 1
fi
# One version of each: two stop `pip install --no-index` there.
dupes=$(ls "$DIR" | sed -E 's/-[0-9].*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [[ -n $dupes ]]; then
    echo "gpu_wheels: more than one version of: $dupes" >&2
    exit 1
fi
ls -1 "$DIR"
du -sh "$DIR"
