"""Shared pieces of the Triton kernels: block configs, the interpreter switch, small jit helpers.

Block configs live here, one list per kernel, best guess first. On a GPU the launchers autotune over
the list (set AFT_FAST_AUTOTUNE=0 to pin the first entry and skip the tuning runs); under the
interpreter (TRITON_INTERPRET=1, CPU tensors, tests only) they take one small config so that tiny
test shapes still cover several blocks, split vocab ranges and masked tails.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Read once, when the kernels are decorated: triton picks interpreter or compiler at that moment.
try:
    from triton import knobs

    INTERPRETED: bool = bool(knobs.runtime.interpret)
except ImportError:  # triton < 3.4 has no knobs and reads the variable itself
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE: bool = os.environ.get("AFT_FAST_AUTOTUNE", "1") != "0"


def _cfg(num_warps: int, num_stages: int, **blocks: int) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


# Entries were checked to compile for sm_90 without register spills (tests/triton_aot_check.py).
# Forward (logits tile -> online log-sum-exp): one accumulator tile, two operand tiles in flight.
FWD_CONFIGS = [
    _cfg(8, 3, BLOCK_B=128, BLOCK_V=128, BLOCK_D=64, GROUP_B=8),
    _cfg(8, 4, BLOCK_B=128, BLOCK_V=128, BLOCK_D=64, GROUP_B=8),
    _cfg(8, 3, BLOCK_B=64, BLOCK_V=256, BLOCK_D=64, GROUP_B=8),
    _cfg(4, 4, BLOCK_B=64, BLOCK_V=128, BLOCK_D=64, GROUP_B=8),
]
# Backward (recompute tile, then two products streamed into fp32 atomics): bigger tiles mean fewer
# atomics (T*V*H*(1/BLOCK_B + 1/BLOCK_V) in all) but more registers.
BWD_CONFIGS = [
    _cfg(8, 3, BLOCK_B=128, BLOCK_V=128, BLOCK_D=64, GROUP_B=8),
    _cfg(8, 4, BLOCK_B=128, BLOCK_V=128, BLOCK_D=64, GROUP_B=8),
    _cfg(4, 4, BLOCK_B=128, BLOCK_V=128, BLOCK_D=32, GROUP_B=8),
    _cfg(8, 3, BLOCK_B=128, BLOCK_V=256, BLOCK_D=32, GROUP_B=8),
]
# fp32 operands (ieee products on CUDA cores, or tf32 where torch allows it) need smaller tiles.
FWD_CONFIGS_F32 = [
    _cfg(8, 2, BLOCK_B=64, BLOCK_V=128, BLOCK_D=16, GROUP_B=8),
    _cfg(4, 2, BLOCK_B=64, BLOCK_V=64, BLOCK_D=32, GROUP_B=8),
]
BWD_CONFIGS_F32 = [
    _cfg(8, 2, BLOCK_B=64, BLOCK_V=128, BLOCK_D=16, GROUP_B=8),
    _cfg(4, 2, BLOCK_B=64, BLOCK_V=64, BLOCK_D=16, GROUP_B=8),
]
# Every forward BLOCK_V divides this, so a vocab split never ends inside a tile.
SPLIT_V_MULTIPLE = 256
# Row kernels of the chunked path (chunk_softmax.py): one program per row of the [c, V] logits buffer,
# memory-bound, no autotuning (the forward adds into shared sums, the backward works in place: a tuning
# run would change the outputs). 4096 columns a step over 8 warps: 16 elements (two 16-byte bf16 loads)
# per thread in flight, and up to 8 rows per SM to hide latency; 32 steps over V = 128256.
CHUNK_ROW_CONFIG = dict(BLOCK_B=1, BLOCK_V=4096, num_warps=8, num_stages=3)

# Under the interpreter (test shapes: T ~ 90, V = 123, H = 24): several token blocks with a partial
# last one, vocab splits of two tiles with a partial last tile, H cut by BLOCK_D. Few programs: the
# interpreter's cost is per program.
INTERPRET_FWD = dict(BLOCK_B=32, BLOCK_V=32, BLOCK_D=16, GROUP_B=2, num_warps=1, num_stages=1)
INTERPRET_BWD = dict(BLOCK_B=32, BLOCK_V=32, BLOCK_D=16, GROUP_B=2, num_warps=1, num_stages=1)
INTERPRET_SPLIT_V = 64
# Row kernels: 16 rows a program (a chunk of 93 ends in a partial block), V = 123 in two steps of 64.
INTERPRET_CHUNK_ROW = dict(BLOCK_B=16, BLOCK_V=64, num_warps=1, num_stages=1)


def tuned(kernel, configs: list[triton.Config], key: list[str], **kwargs):
    """`kernel` autotuned over `configs` (the first alone when AFT_FAST_AUTOTUNE=0); None when
    interpreting, where launchers pass INTERPRET_* explicitly."""
    if INTERPRETED:
        return None
    return triton.autotune(configs=configs if AUTOTUNE else configs[:1], key=key, **kwargs)(kernel)


def config_kwargs(config: triton.Config | dict) -> dict:
    """Launch keyword arguments (blocks, num_warps, num_stages) of a Config or a plain dict."""
    if isinstance(config, dict):
        return dict(config)
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands follow torch's matmul precision setting (tf32 only when torch allows it)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def size_bucket(n: int) -> int:
    """Power-of-two bucket of a token count: the autotune key, so that every batch length does not
    trigger a new tuning run."""
    return 1 << max(0, (n - 1).bit_length())


@triton.jit
def swizzle(pid, num_b, num_other, GROUP_B: tl.constexpr):
    """Program id -> (token block, other block), GROUP_B token blocks at a time, so that programs
    running together share weight tiles and hidden rows in L2."""
    per_group = GROUP_B * num_other
    first_b = (pid // per_group) * GROUP_B
    size_b = tl.minimum(num_b - first_b, GROUP_B)
    pid_b = first_b + (pid % per_group) % size_b
    pid_o = (pid % per_group) // size_b
    return pid_b, pid_o


def logit_args(logit_scale: float, softcap: float | None, temperature: float) -> dict:
    """Launch arguments of `process_logits`: the three floats and the HAS_SOFTCAP switch."""
    return dict(logit_scale=float(logit_scale), softcap=1.0 if softcap is None else float(softcap),
                inv_temperature=1.0 / float(temperature), HAS_SOFTCAP=softcap is not None)


@triton.jit
def process_logits(z, logit_scale, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    """The model's logits from fp32 z = h W^T + b (docs/design.md section 2), and d logits / d z:
    softcap * tanh(logit_scale * z / softcap) / temperature, or logit_scale * z / temperature. With the
    defaults (1, no cap, 1) the logits are z itself, bit for bit. tanh(u) is 2 * sigmoid(2u) - 1 (as TRL's
    kernels write it: sigmoid exists in every triton version and the interpreter; exact at saturation)."""
    outer = logit_scale * inv_temperature
    if HAS_SOFTCAP:  # one return statement: the compiler unifies the types of every return
        t = 2.0 * tl.sigmoid(z * (2.0 * logit_scale / softcap)) - 1.0
        logits = (softcap * inv_temperature) * t
        dz = outer * (1.0 - t * t)
    else:
        logits = z * outer
        dz = outer
    return logits, dz


@triton.jit
def logits_tile(
    hidden, weight, bias, row, bmask, offs_v, vmask, H, stride_h, stride_w,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """fp32 [BLOCK_B, BLOCK_V] logits of hidden rows `row` against vocab entries `offs_v` (int64)."""
    acc = tl.zeros((BLOCK_B, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_D):
        offs_d = k0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < H
        h = tl.load(hidden + row[:, None] * stride_h + offs_d[None, :],
                    mask=bmask[:, None] & dmask[None, :], other=0.0)
        w = tl.load(weight + offs_v[None, :] * stride_w + offs_d[:, None],
                    mask=vmask[None, :] & dmask[:, None], other=0.0)
        if DOT_F32:  # the interpreter multiplies bf16 bit patterns (triton-lang/triton#11584)
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias + offs_v, mask=vmask, other=0.0).to(tl.float32)[None, :]
    return acc
