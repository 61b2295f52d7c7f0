"""The logit post-processing every backend applies (docs/design.md section 2): with z = h W^T + b,
logits = softcap * tanh(logit_scale * z / softcap) / temperature (softcap None: no tanh).

`LogitOptions` carries the three values from the public API to the backends. The CPU chunk engine
(aft_fast/ops/chunk_loop.py) splits the transform in two so that its chunk primitives stay simple:
    y = pre_scale * z                     folded into the chunk's hidden rows (h' = pre_scale * h) and the
                                          bias, one [c, H] multiply per chunk instead of one per logit
    logits = cap * tanh(y)  (soft cap)    the primitive's own work (`cap` None: logits = y)
so that pre_scale = logit_scale / softcap and cap = softcap / temperature with a soft cap, else
pre_scale = logit_scale / temperature. The gradient then needs d logits / d y = cap * (1 - tanh(y)^2),
formed by the primitive, and a final pre_scale on grad_hidden and grad_bias (grad_weight takes h').
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LogitOptions:
    """The logit post-processing of one call (checked by the loss layer, aft_fast/losses/checks.py)."""

    logit_scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    @property
    def is_identity(self) -> bool:
        return self.logit_scale == 1.0 and self.softcap is None and self.temperature == 1.0

    @property
    def pre_scale(self) -> float:
        """y = pre_scale * z: the part of the transform that is linear in z."""
        return self.logit_scale / (self.softcap if self.softcap is not None else self.temperature)

    @property
    def cap(self) -> float | None:
        """logits = cap * tanh(y), or None: logits = y."""
        return None if self.softcap is None else self.softcap / self.temperature

    def kernel_kwargs(self) -> dict:
        """Keyword arguments of the Triton launchers (kernels/)."""
        return dict(logit_scale=self.logit_scale, softcap=self.softcap, temperature=self.temperature)


IDENTITY = LogitOptions()

