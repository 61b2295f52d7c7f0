"""Losses: the math (objectives), the argument checks, the fused operator's entry and the autograd
Functions (aft_function, linear_logprob) and the public API (functional, modules). The backends that run
them live in aft_fast/ops/."""

from aft_fast.losses.aft_function import aft_loss_with
from aft_fast.losses.functional import aft_loss, linear_logprob
from aft_fast.losses.modules import AFTLoss

__all__ = ["aft_loss", "aft_loss_with", "linear_logprob", "AFTLoss"]
