"""Losses: the math (objectives, group_objective), the argument checks, the autograd Functions
(aft_function, linear_logprob) and the public API (functional, modules). The backends that run them live
in aft_fast/ops/."""

from aft_fast.losses.functional import aft_loss, linear_logprob
from aft_fast.losses.modules import AFTLoss

__all__ = ["aft_loss", "linear_logprob", "AFTLoss"]
