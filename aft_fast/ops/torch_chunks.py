"""Chunk primitives in plain PyTorch: the `torch` backend, and the model the C++ ops follow.

Both take fp32 tensors (the chunk loop upcasts once) and work in place on a [c, V] buffer so that
one buffer serves every chunk of a call.
"""

from __future__ import annotations

import torch


def chunk_logprob(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    buf: torch.Tensor,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of one chunk. h [c, H], weight [V, H], bias [V] or None, targets [c], buf [c, V].

    buf ends holding the softmax probabilities (what the gradient needs). With `lse` given (a
    recompute in backward) the log-sum-exp is not recomputed. Returns (logp [c], lse [c]), fp32.
    """
    torch.mm(h, weight.t(), out=buf)
    if bias is not None:
        buf.add_(bias)
    target_logit = buf.gather(1, targets[:, None]).squeeze(1)
    if lse is None:
        lse = torch.logsumexp(buf, dim=1)
    buf.sub_(lse[:, None]).exp_()
    return target_logit - lse, lse


def chunk_grad(
    probs: torch.Tensor,
    coef: torch.Tensor,
    targets: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
    grad_bias: torch.Tensor | None,
) -> None:
    """Accumulate the gradients of one chunk, given coef [c] = d(loss)/d(logp) of each token.

    probs [c, V] is turned in place into d(loss)/d(logits) = coef * (onehot(target) - probs);
    grad_hidden [N, H] gets it @ weight scattered by `rows`, grad_weight [V, H] gets it^T @ h.
    """
    probs.mul_(-coef[:, None]).scatter_add_(1, targets[:, None], coef[:, None])
    if grad_hidden is not None:
        grad_hidden.index_put_((rows,), probs @ weight, accumulate=True)  # index_add_ is slow on CPU
    if grad_weight is not None:
        grad_weight.addmm_(probs.t(), h)
    if grad_bias is not None:
        grad_bias.add_(probs.sum(0))
