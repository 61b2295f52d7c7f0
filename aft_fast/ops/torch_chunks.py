"""Chunk primitives in plain PyTorch: the `torch` backend, and the model the C++ ops follow.

They take fp32 tensors (the chunk loop upcasts once) and work in place on a [c, V] buffer so that
one buffer serves every chunk of a call.
"""

from __future__ import annotations

import torch

# Kept probabilities are fp16(exp(z - max) * KEEP_MULT): values in (0, 2^15], so fp16's normal range
# reaches down to 2^-29 of the largest probability (relative error 2^-11 there) before flushing.
KEEP_MULT = 2.0**15


def chunk_logprob(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    buf: torch.Tensor,
    lse: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    keep_scale: torch.Tensor | None = None,
    cap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of one chunk. h [c, H], weight [V, H], bias [V] or None, targets [c], buf [c, V].

    buf ends holding the softmax probabilities (what the gradient needs). With `lse` given (a
    recompute in backward) the log-sum-exp is not recomputed. With `keep` (fp16 [c, V]) and
    `keep_scale` (fp32 [c]) the probabilities go there instead, p = keep * keep_scale, for a backward
    without recompute (`chunk_grad_kept`), and buf is scratch. Returns (logp [c], lse [c]), fp32.

    cap (a soft cap, aft_fast/ops/logit_options.py): the logits are cap * tanh(h @ weight^T + bias), and
    buf ends holding p * (1 - tanh^2), plus tanh(target)^2 at each row's target, so that `chunk_grad` with
    coef * cap forms the gradient with respect to the pre-tanh values. Not with `keep`.
    """
    torch.mm(h, weight.t(), out=buf)
    if bias is not None:
        buf.add_(bias)
    if cap is not None:
        return _capped_logprob(buf, targets, lse, cap)
    target_logit = buf.gather(1, targets[:, None]).squeeze(1)
    if keep is not None:
        assert keep_scale is not None  # the two come together
        top = buf.amax(dim=1, keepdim=True)
        total = buf.sub_(top).exp_().sum(dim=1)
        keep.copy_(buf.mul_(KEEP_MULT))
        keep_scale.copy_(1.0 / (KEEP_MULT * total))
        lse = top.squeeze(1) + total.log()
        return target_logit - lse, lse
    if lse is None:
        lse = torch.logsumexp(buf, dim=1)
    buf.sub_(lse[:, None]).exp_()
    return target_logit - lse, lse


def _capped_logprob(buf, targets, lse, cap: float):
    """`chunk_logprob`'s soft-capped case, buf holding y: logits = cap * tanh(y)."""
    t = buf.tanh_()
    t_target = t.gather(1, targets[:, None])
    deriv = torch.square(t).neg_().add_(1.0)  # 1 - tanh^2, a [c, V] temporary (this backend is the model)
    logits = t.mul_(cap)
    if lse is None:
        lse = torch.logsumexp(logits, dim=1)
    logits.sub_(lse[:, None]).exp_().mul_(deriv)
    # chunk_grad adds coef at the target: with t^2 there, its entry becomes coef * (1 - t^2) * (1 - p).
    buf.scatter_add_(1, targets[:, None], t_target.square())
    return t_target.squeeze(1) * cap - lse, lse


def _accumulate(g, h, weight, rows, grad_hidden, grad_weight, grad_bias) -> None:
    """grad_hidden[rows] += g @ weight, grad_weight += g^T @ h, grad_bias += g's column sums."""
    if grad_hidden is not None:
        grad_hidden.index_put_((rows,), g @ weight, accumulate=True)  # index_add_ is slow on CPU
    if grad_weight is not None:
        grad_weight.addmm_(g.t(), h)
    if grad_bias is not None:
        grad_bias.add_(g.sum(0))


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
    _accumulate(probs, h, weight, rows, grad_hidden, grad_weight, grad_bias)


def chunk_grad_kept(keep, keep_scale, logp, buf, coef, targets, h, weight, rows, grad_hidden, grad_weight,
                    grad_bias) -> None:
    """`chunk_grad` from the probabilities `chunk_logprob` kept: buf [c, V] (scratch) receives
    coef * (onehot(target) - p); the target's entry comes from the fp32 log-prob, -coef * expm1(logp),
    so a probability near 1 loses nothing to fp16."""
    torch.mul(keep, (-coef * keep_scale)[:, None], out=buf)
    buf.scatter_(1, targets[:, None], (-coef * torch.expm1(logp))[:, None])
    _accumulate(buf, h, weight, rows, grad_hidden, grad_weight, grad_bias)
