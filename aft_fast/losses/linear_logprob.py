"""LinearLogProbFunction: per-segment sums of log p(target | hidden[row]) through autograd.

Forward keeps only the per-token log-sum-exp; backward recomputes each chunk's logits from it
(four matrix products in all, no [T, V] buffer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aft_fast.losses import backends


@dataclass(frozen=True)
class LogProbInputs:
    rows: torch.Tensor
    targets: torch.Tensor
    segments: torch.Tensor
    num_segments: int
    backend: str
    chunk_size: int


class LinearLogProbFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, inputs: LogProbInputs):
        impl = backends.get(inputs.backend)
        logp, lse = impl.logprob_forward(hidden, weight, bias, inputs.rows, inputs.targets, inputs.chunk_size)
        sums = torch.zeros(inputs.num_segments, dtype=torch.float32, device=hidden.device)
        sums.index_add_(0, inputs.segments, logp)
        ctx.save_for_backward(hidden, weight, bias, lse)
        ctx.inputs = inputs
        return sums

    @staticmethod
    def backward(ctx, grad_sums):
        hidden, weight, bias, lse = ctx.saved_tensors
        inputs: LogProbInputs = ctx.inputs
        impl = backends.get(inputs.backend)
        coef = grad_sums.float()[inputs.segments]
        grads = impl.logprob_backward(
            hidden, weight, bias, inputs.rows, inputs.targets, lse, coef,
            tuple(ctx.needs_input_grad[:3]), inputs.chunk_size,
        )
        return (*grads, None)
