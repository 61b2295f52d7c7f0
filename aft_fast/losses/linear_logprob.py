"""LinearLogProbFunction: per-segment sums of log p(target | hidden[row]) through autograd.

By default forward keeps only the per-token log-sum-exp and backward recomputes each chunk's logits
from it: four matrix products in all, no [T, V] buffer. The caller's loss, and so each token's
d(loss)/d(logp), is unknown until backward, so the gradient cannot be formed in the forward pass as
`aft_loss` does. With `keep_bytes` the first tokens' probabilities are kept instead (fp16 on the CPU
backends, 2 bytes a logit; the logits in the input dtype on triton): those take three products, at
that memory cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aft_fast.ops.dispatch import get_backend
from aft_fast.ops.logit_options import IDENTITY, LogitOptions


@dataclass(frozen=True)
class LogProbInputs:
    rows: torch.Tensor
    targets: torch.Tensor
    segments: torch.Tensor
    num_segments: int
    backend: str
    chunk_size: int
    keep_bytes: int = 0
    post: LogitOptions = IDENTITY  # the logit post-processing (logit_scale, softcap, temperature)


class LinearLogProbFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, inputs: LogProbInputs):
        impl = get_backend(inputs.backend)
        logp, lse, kept = impl.logprob_forward(hidden, weight, bias, inputs.rows, inputs.targets,
                                               inputs.chunk_size, inputs.keep_bytes, post=inputs.post)
        sums = torch.zeros(inputs.num_segments, dtype=torch.float32, device=hidden.device)
        sums.index_add_(0, inputs.segments, logp)
        ctx.save_for_backward(hidden, weight, bias, lse, logp, *kept)
        ctx.inputs = inputs
        return sums

    @staticmethod
    def backward(ctx, grad_sums):
        hidden, weight, bias, lse, logp, *kept = ctx.saved_tensors
        inputs: LogProbInputs = ctx.inputs
        impl = get_backend(inputs.backend)
        coef = grad_sums.float()[inputs.segments]
        grads = impl.logprob_backward(
            hidden, weight, bias, inputs.rows, inputs.targets, lse, coef,
            tuple(ctx.needs_input_grad[:3]), inputs.chunk_size, logp=logp, kept=kept, post=inputs.post,
        )
        return (*grads, None)
