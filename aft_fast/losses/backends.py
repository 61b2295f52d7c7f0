"""The per-backend implementation of the two operators, picked by name (L1 chooses the backend).

Each implementation offers:
  logprob_forward(hidden, weight, bias, rows, targets, chunk_size, keep_bytes) -> (logp [T], lse [T] fp32,
      kept: a list of tensors, the probabilities kept within keep_bytes for backward, backend-defined)
  logprob_backward(hidden, weight, bias, rows, targets, lse, coef, need, chunk_size, logp, kept) -> grads
  aft_forward(hidden, weight, bias, rows, targets, segments, counts, plan, cfg, ref_logp, need,
              chunk_size) -> chunked.AFTResult
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

from aft_fast.losses import chunked
from aft_fast.ops import cpp_chunks, torch_chunks


def _chunk_driven(prims) -> SimpleNamespace:
    return SimpleNamespace(
        logprob_forward=functools.partial(chunked.logprob_forward, prims),
        logprob_backward=functools.partial(chunked.logprob_backward, prims),
        aft_forward=functools.partial(chunked.aft_forward, prims),
    )


@functools.cache
def get(name: str) -> SimpleNamespace:
    if name == "torch":
        return _chunk_driven(torch_chunks)
    if name == "cpp":
        return _chunk_driven(cpp_chunks)
    if name == "triton":
        from aft_fast.losses import triton_impl

        return triton_impl.IMPL
    raise ValueError(f"backend: unknown backend {name!r}")
