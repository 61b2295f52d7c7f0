"""The result type of the fused AFT loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AFTOutput:
    """What `aft_loss` returns.

    loss:       scalar, differentiable to hidden, weight (and bias): w_vft * L_vft + w_align * L_align.
    scores:     [S] float32, detached: length-normalized log-likelihood of each segment.
    vft_loss:   scalar float32, detached: L_vft (0 when the batch has no reference chain).
    align_loss: scalar float32, detached: L_align (0 in mode "vft" or when no group has a pair).
    """

    loss: torch.Tensor
    scores: torch.Tensor
    vft_loss: torch.Tensor
    align_loss: torch.Tensor
