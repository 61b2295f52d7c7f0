"""Which backend runs a call, in one place: `resolve_backend` turns `auto` into triton for CUDA tensors,
cpp on the CPU when built, else torch (an explicit choice that cannot run on the given tensors is a
ValueError); `get_backend` gives the `Backend` of a resolved name."""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

from aft_fast.ops import cpp_chunks, torch_chunks
from aft_fast.ops.backend import Backend
from aft_fast.ops.chunk_loop import ChunkedBackend

_warned = False


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_runs_on(device: torch.device) -> bool:
    """Triton runs CUDA tensors, and CPU tensors under its interpreter (TRITON_INTERPRET=1)."""
    if not triton_importable():
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def triton_backend_available() -> bool:
    return importlib.util.find_spec("aft_fast.kernels") is not None and triton_importable()


def resolve_backend(name: str, device: torch.device) -> str:
    global _warned
    if name == "auto":
        if device.type == "cuda":
            return "triton" if triton_backend_available() and triton_runs_on(device) else "torch"
        if cpp_chunks.AVAILABLE:
            return "cpp"
        if not _warned:
            warnings.warn(
                f"aft_fast._C is not built ({cpp_chunks.BUILD_ERROR}); using the torch backend", stacklevel=3
            )
            _warned = True
        return "torch"
    if name == "cpp":
        if not cpp_chunks.AVAILABLE:
            raise ValueError(
                f"backend: 'cpp' is not built ({cpp_chunks.BUILD_ERROR}); "
                "run `pip install -e . --no-build-isolation`"
            )
        if device.type != "cpu":
            raise ValueError(f"backend: 'cpp' runs CPU tensors, got tensors on {device}")
    if name == "triton" and not (triton_backend_available() and triton_runs_on(device)):
        raise ValueError(
            f"backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1) and the "
            f"triton package; got tensors on {device}"
        )
    return name


@functools.cache
def get_backend(name: str) -> Backend:
    """The `Backend` of a resolved name (torch, cpp, triton); triton's is imported on first use."""
    if name == "torch":
        return ChunkedBackend(torch_chunks)
    if name == "cpp":
        return ChunkedBackend(cpp_chunks)
    if name == "triton":
        from aft_fast.ops.triton_backend import TritonBackend

        return TritonBackend()
    raise ValueError(f"backend: unknown backend {name!r}")
