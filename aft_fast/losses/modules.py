"""nn.Module forms of the public API: they hold options and call the fused operator's entry (no math here)."""

from __future__ import annotations

from torch import nn

from aft_fast.losses.aft_function import aft_loss_with
from aft_fast.options import LossOptions


class AFTLoss(nn.Module):
    """nn.Module form of `aft_fast.aft_loss`: holds the options, forwards the tensors.

    >>> loss_fn = AFTLoss(mode="bcl", beta=1.0)
    >>> out = loss_fn(hidden, lm_head.weight, rows=..., targets=..., segments=..., group=...,
    ...               label=..., is_reference=...)
    """

    def __init__(self, mode: str = LossOptions.mode, beta: float = LossOptions.beta,
                 w_vft: float = LossOptions.w_vft, w_align: float = LossOptions.w_align,
                 dpo_beta: float = LossOptions.dpo_beta, pro_tau: float = LossOptions.pro_tau,
                 backend: str = "auto", chunk_size: int | None = None, logit_scale: float = 1.0,
                 softcap: float | None = None, temperature: float = 1.0):
        super().__init__()
        self.loss = LossOptions(mode, beta, w_vft, w_align, dpo_beta, pro_tau)  # a bad option fails here
        self.call_options = dict(backend=backend, chunk_size=chunk_size, logit_scale=logit_scale,
                                 softcap=softcap, temperature=temperature)

    @property
    def options(self) -> dict:
        """Every option as the keywords of `aft_fast.aft_loss`."""
        return {**self.loss.kwargs(), **self.call_options}

    def forward(self, hidden, weight, *, rows, targets, segments, group, label, is_reference,
                ref_logp=None, bias=None):
        return aft_loss_with(self.loss, hidden, weight, rows=rows, targets=targets, segments=segments,
                             group=group, label=label, is_reference=is_reference, ref_logp=ref_logp,
                             bias=bias, **self.call_options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
