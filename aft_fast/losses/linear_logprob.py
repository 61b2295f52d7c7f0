"""LinearLogProbFunction: per-segment sums of log p(target | hidden[row]) through autograd.

By default forward keeps only the per-token log-sum-exp and backward recomputes each chunk's logits
from it: four matrix products in all, no [T, V] buffer. The caller's loss, and so each token's
d(loss)/d(logp), is unknown until backward, so the gradient cannot be formed in the forward pass as
`aft_loss` does. With `keep_bytes` the first tokens' probabilities are kept instead (fp16 on the CPU
backends, 2 bytes a logit; the logits in the input dtype on triton): those take three products, at
that memory cost.
"""

from __future__ import annotations

import torch

from aft_fast.ops.backend import LogProbCall
from aft_fast.ops.dispatch import get_backend


class LinearLogProbFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, call: LogProbCall):
        logp, lse, kept = get_backend(call.backend).logprob_forward(hidden, weight, bias, call)
        sums = torch.zeros(call.num_segments, dtype=torch.float32, device=hidden.device)
        sums.index_add_(0, call.segments, logp)
        ctx.save_for_backward(hidden, weight, bias, lse, logp, *kept)
        ctx.call = call
        return sums

    @staticmethod
    def backward(ctx, grad_sums):
        hidden, weight, bias, lse, logp, *kept = ctx.saved_tensors
        call: LogProbCall = ctx.call
        coef = grad_sums.float()[call.segments]
        need = (bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]), bool(ctx.needs_input_grad[2]))
        impl = get_backend(call.backend)
        grads = impl.logprob_backward(hidden, weight, bias, call, lse, coef, need, logp, kept)
        return (*grads, None)
