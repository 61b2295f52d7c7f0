"""Losses: the math (objectives), autograd Functions, the public functional API and modules."""

from aft_fast.losses.functional import aft_loss, linear_logprob
from aft_fast.losses.modules import AFTLoss

__all__ = ["aft_loss", "linear_logprob", "AFTLoss"]
