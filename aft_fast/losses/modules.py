"""nn.Module forms of the public API: they hold options and call `functional` (no math here)."""

from __future__ import annotations

from torch import nn

from aft_fast.losses.functional import aft_loss


class AFTLoss(nn.Module):
    """nn.Module form of `aft_fast.aft_loss`: holds the options, forwards the tensors.

    >>> loss_fn = AFTLoss(mode="bcl", beta=1.0)
    >>> out = loss_fn(hidden, lm_head.weight, rows=..., targets=..., segments=..., group=...,
    ...               label=..., is_reference=...)
    """

    def __init__(self, mode: str = "bcl", beta: float = 1.0, w_vft: float = 1.0, w_align: float = 1.0,
                 dpo_beta: float = 0.1, pro_tau: float = 1.0, backend: str = "auto",
                 chunk_size: int | None = None, logit_scale: float = 1.0, softcap: float | None = None,
                 temperature: float = 1.0):
        super().__init__()
        self.options = dict(mode=mode, beta=beta, w_vft=w_vft, w_align=w_align, dpo_beta=dpo_beta,
                            pro_tau=pro_tau, backend=backend, chunk_size=chunk_size, logit_scale=logit_scale,
                            softcap=softcap, temperature=temperature)

    def forward(self, hidden, weight, *, rows, targets, segments, group, label, is_reference,
                ref_logp=None, bias=None):
        return aft_loss(hidden, weight, rows=rows, targets=targets, segments=segments, group=group,
                        label=label, is_reference=is_reference, ref_logp=ref_logp, bias=bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
