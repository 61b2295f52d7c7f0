"""Compile every Triton kernel variant ahead of time for a GPU target, on a machine without a GPU.

The interpreter runs the kernels' Python, not the compiler, so a kernel can pass every CPU test and
still fail to compile. This script lowers each kernel (with its first autotune config and each switch
setting that matters) through Triton's real pipeline down to a cubin for sm_90 (H100/H200), which
needs Triton's bundled ptxas but no driver. Run it without TRITON_INTERPRET (the kernels must be
decorated as compiled functions); `tests/test_triton_backend.py` runs it in a subprocess.

    python tests/triton_aot_check.py [--arch 90] [--all-configs]

It prints each variant's registers and spill stack (STACK:0 means no spills).
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Integer arguments that a real launch sees divisible by 16 at the shapes that matter (H = 4096,
# V = 128256, T = 8192): Triton specializes on that, and vectorized loads depend on it.
ALIGNED_INTS = {"T", "V", "H", "stride_h", "stride_w", "split_v", "stride_z"}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _source(kernel, types: dict[str, str], constexprs: dict) -> ASTSource:
    sig = {name: "constexpr" if name in constexprs else types[name] for name in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if sig[name].startswith("*") or name in ALIGNED_INTS}
    return ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)


def _resources(cubin: bytes) -> str:
    """Registers and spill stack of a cubin, from the cuobjdump bundled with Triton."""
    if not os.path.exists(CUOBJDUMP):
        return "resources n/a"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True)
    fields = [line.split() for line in out.stdout.splitlines() if "REG:" in line]
    return " ".join(f for f in (fields[0] if fields else []) if f.startswith(("REG:", "STACK:")))


def _compile(kernel, types, constexprs, target, num_warps=4, num_stages=3) -> tuple[float, str]:
    start = time.perf_counter()
    options = dict(num_warps=num_warps, num_stages=num_stages)
    compiled = triton.compile(_source(kernel, types, constexprs), target=target, options=options)
    assert "cubin" in compiled.asm, "no cubin produced"
    return time.perf_counter() - start, _resources(compiled.asm["cubin"])


def variants(all_configs: bool = False):
    """(name, kernel, types, constexprs, launch options) of every variant worth compiling: each switch
    setting with the first config, and with `all_configs` every autotune config."""
    # Imported here, after main() checked TRITON_INTERPRET: kernels are decorated at import.
    from aft_fast.kernels import _utils, group_loss

    fwd_cfg, bwd_cfg = _utils.FWD_CONFIGS[0], _utils.BWD_CONFIGS[0]
    if all_configs:
        for cfg in _utils.FWD_CONFIGS[1:]:
            yield from _fwd("bf16", False, cfg)
        for cfg in _utils.FWD_CONFIGS_F32[1:]:
            yield from _fwd("fp32", False, cfg)
        for cfg in _utils.BWD_CONFIGS[1:]:
            yield from _bwd("bf16", False, 1, cfg)
        for cfg in _utils.BWD_CONFIGS_F32[1:]:
            yield from _bwd("fp32", False, 1, cfg)
    for dtype, has_bias in (("bf16", False), ("bf16", True)):
        yield from _fwd(dtype, has_bias, fwd_cfg)
    yield from _fwd("fp32", False, _utils.FWD_CONFIGS_F32[0])
    for dtype, has_bias, filt in (("bf16", True, 1), ("bf16", False, 2)):
        yield from _bwd(dtype, has_bias, filt, bwd_cfg)
    yield from _bwd("fp32", True, 0, _utils.BWD_CONFIGS_F32[0])
    types = dict(sums="*fp32", counts="*fp32", ref_logp="*fp32", member_ptr="*i64", member_seg="*i64",
                 pair_ptr="*i64", pair_i="*i64", pair_j="*i64", top_ptr="*i64", top_seg="*i64",
                 group_loss="*fp32", dsum="*fp32", beta="fp32", dpo_beta="fp32", inv_tau="fp32", scale="fp32")
    for (mode, code), has_bc in itertools.product(group_loss.MODES.items(), (False, True)):
        if has_bc and mode not in ("dpo", "rrhf", "pro"):
            continue
        consts = dict(MODE=code, HAS_BC=has_bc, BLOCK_M=8, BLOCK_P=16, BLOCK_K=4)
        name = f"group_loss {mode}{'+bc' if has_bc else ''}"
        yield name, group_loss._group_loss_fwd_kernel, types, consts, (1, 1)
    for dtype, has_sums in (("bf16", True), ("bf16", False), ("fp32", True), ("fp16", True)):
        yield from _chunk_rows(dtype, has_sums, _utils.CHUNK_ROW_CONFIG)
    # The soft-capped variants (Gemma-2's final_logit_softcapping): the tanh and its derivative in the tiles.
    yield from _fwd("bf16", True, fwd_cfg, softcap=True)
    yield from _bwd("bf16", True, 1, bwd_cfg, softcap=True)
    yield from _chunk_rows("bf16", True, _utils.CHUNK_ROW_CONFIG, softcap=True)
    for blocks, warps in (((2, 1, 1), 1), ((64, 64, 64), 4)):  # the extremes of the launcher's block sizes
        consts = dict(MODE=group_loss.MODES["pro"], HAS_BC=True, BLOCK_M=blocks[0], BLOCK_P=blocks[1],
                      BLOCK_K=blocks[2])
        name = f"group_loss pro+bc blocks {blocks}"
        yield name, group_loss._group_loss_fwd_kernel, types, consts, (warps, 1)


# The logit post-processing's runtime arguments (kernels/_utils.py process_logits).
POST_TYPES = dict(logit_scale="fp32", softcap="fp32", inv_temperature="fp32")


def _fwd(dtype: str, has_bias: bool, cfg: triton.Config, softcap: bool = False):
    from aft_fast.kernels import linear_logprob

    types = dict(hidden=f"*{dtype}", weight=f"*{dtype}", bias=f"*{dtype}", rows="*i64", targets="*i64",
                 lse_part="*fp32", target_logit="*fp32", T="i32", V="i32", H="i32", split_v="i32",
                 num_splits="i32", stride_h="i32", stride_w="i32", t_bucket="i32", **POST_TYPES)
    flags = dict(HAS_BIAS=has_bias, HAS_SOFTCAP=softcap, DOT_F32=False,
                 PRECISION="ieee" if dtype == "fp32" else "tf32")
    yield (f"fwd {dtype} bias={has_bias} softcap={softcap} {_describe(cfg)}",
           linear_logprob._linear_logprob_fwd_kernel, types,
           {**flags, **cfg.kwargs}, (cfg.num_warps, cfg.num_stages))


def _bwd(dtype: str, has_bias: bool, filt: int, cfg: triton.Config, softcap: bool = False):
    from aft_fast.kernels import linear_logprob_bwd

    types = dict(hidden=f"*{dtype}", weight=f"*{dtype}", bias=f"*{dtype}", rows="*i64", targets="*i64",
                 lse="*fp32", coef="*fp32", grad_hidden="*fp32", grad_weight="*fp32", grad_bias="*fp32",
                 T="i32", V="i32", H="i32", stride_h="i32", stride_w="i32", filter_eps="fp32", t_bucket="i32",
                 **POST_TYPES)
    flags = dict(HAS_BIAS=has_bias, HAS_SOFTCAP=softcap, HAS_GRAD_HIDDEN=True, HAS_GRAD_WEIGHT=True,
                 HAS_GRAD_BIAS=has_bias, FILTER=filt, DOT_F32=False, ROUND_BF16=False,
                 PRECISION="ieee" if dtype == "fp32" else "tf32")
    yield (f"bwd {dtype} bias={has_bias} filter={filt} softcap={softcap} {_describe(cfg)}",
           linear_logprob_bwd._linear_logprob_bwd_kernel, types, {**flags, **cfg.kwargs},
           (cfg.num_warps, cfg.num_stages))


def _chunk_rows(dtype: str, has_sums: bool, cfg: dict, softcap: bool = False):
    """The chunked path's row kernels (kernels/chunk_softmax.py): forward with and without the segment
    sums, and (once per dtype) the in-place backward."""
    from aft_fast.kernels import chunk_softmax

    blocks = {k: cfg[k] for k in ("BLOCK_B", "BLOCK_V")}
    launch = (cfg["num_warps"], cfg["num_stages"])
    what = f"{blocks['BLOCK_B']}x{blocks['BLOCK_V']} w{launch[0]} s{launch[1]} softcap={softcap}"
    types = dict(logits=f"*{dtype}", targets="*i64", segments="*i64", sums="*fp32", lse="*fp32",
                 logp="*fp32", C="i32", V="i32", stride_z="i32", **POST_TYPES)
    yield (f"chunk_softmax fwd {dtype} sums={has_sums} {what}", chunk_softmax._chunk_softmax_fwd_kernel,
           types, {"HAS_SUMS": has_sums, "HAS_SOFTCAP": softcap, **blocks}, launch)
    if has_sums:
        types = dict(logits=f"*{dtype}", targets="*i64", lse="*fp32", coef="*fp32", coef_index="*i64",
                     C="i32", V="i32", stride_z="i32", **POST_TYPES)
        yield (f"chunk_softmax bwd {dtype} {what}", chunk_softmax._chunk_softmax_bwd_kernel, types,
               {"ROUND_BF16": False, "HAS_SOFTCAP": softcap, **blocks}, launch)  # compiled code rounds itself


def _describe(cfg: triton.Config) -> str:
    k = cfg.kwargs
    return f"{k['BLOCK_B']}x{k['BLOCK_V']}x{k['BLOCK_D']} w{cfg.num_warps} s{cfg.num_stages}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--all-configs", action="store_true", help="also every autotune config (bf16)")
    args = parser.parse_args(argv)
    if triton.knobs.runtime.interpret:
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    for name, kernel, types, consts, (warps, stages) in variants(args.all_configs):
        try:
            seconds, resources = _compile(kernel, types, consts, target, warps, stages)
            print(f"ok    {name}: {resources} ({seconds:.1f} s)")
        except Exception as exc:  # report every variant, then fail
            failed += 1
            print(f"FAIL  {name}: {type(exc).__name__}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
