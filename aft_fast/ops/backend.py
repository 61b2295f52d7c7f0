"""The contract between the loss layer (aft_fast/losses/) and the backends that run it (docs/design.md
section 3).

`Backend` is what every backend offers: the two passes of `linear_logprob` and the one-call forward of
`aft_loss` (loss, parts, per-segment sums and the gradients). `ChunkPrims` is what a chunked CPU backend
brings to the shared chunk loop (aft_fast/ops/chunk_loop.py): `aft_fast.ops.torch_chunks` and
`aft_fast.ops.cpp_chunks` are modules of this shape. `GroupObjective` is the loss layer's part of a
chunked `aft_forward`: the group loss of a run of whole groups, and d(loss)/d(sums) for it; a backend
may run its own kernel for it instead (the triton backend does).

The plan and the loss options (`aft_fast.losses.objectives.GroupPlan`, `aft_fast.options.LossOptions`)
travel through this layer as they are: the chunk loop reads only `plan.seg_group` and
`plan.num_groups`, the triton backend's group-loss kernel the fields it launches with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from aft_fast.ops.logit_options import IDENTITY, LogitOptions

Need = tuple[bool, bool, bool]  # whether hidden, weight, bias need a gradient
MaybeGrads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


@dataclass
class AFTResult:
    loss: torch.Tensor
    vft: torch.Tensor
    align: torch.Tensor
    sums: torch.Tensor
    grads: tuple  # (grad_hidden, grad_weight, grad_bias) for d(loss) = 1, in the inputs' dtypes


class GroupObjective(Protocol):
    """The group loss of a chunked `aft_forward`, one unit (a run of whole groups) at a time."""

    def unit(self, sums: torch.Tensor, g0: int, g1: int) -> torch.Tensor | None:
        """d(loss)/d(sums) [S] for groups g0..g1-1 (their sums are final), or None if nothing of them
        reaches the loss."""
        ...

    def result(self, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, L_vft, L_align) once every unit has been seen."""
        ...


# Builds a GroupObjective: (counts [S], plan, cfg, ref_logp [S] or None, need_grad) -> objective.
ObjectiveFactory = Callable[[torch.Tensor, Any, Any, "torch.Tensor | None", bool], GroupObjective]


class ChunkPrims(Protocol):
    """The two (three) chunk primitives of a chunked CPU backend, in fp32 on a reused [c, V] buffer."""

    def chunk_logprob(
        self,
        h: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        buf: torch.Tensor,
        lse: torch.Tensor | None = None,
        *,
        keep: torch.Tensor | None = None,
        keep_scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logp [c], lse [c]); buf ends holding the probabilities (or keep/keep_scale do)."""
        ...

    def chunk_grad(
        self,
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
        """Accumulate the chunk's gradients for coef [c] = d(loss)/d(logp) from its probabilities."""
        ...

    def chunk_grad_kept(
        self,
        keep: torch.Tensor,
        keep_scale: torch.Tensor,
        logp: torch.Tensor,
        buf: torch.Tensor,
        coef: torch.Tensor,
        targets: torch.Tensor,
        h: torch.Tensor,
        weight: torch.Tensor,
        rows: torch.Tensor,
        grad_hidden: torch.Tensor | None,
        grad_weight: torch.Tensor | None,
        grad_bias: torch.Tensor | None,
    ) -> None:
        """`chunk_grad` from the fp16 probabilities that `chunk_logprob` kept."""
        ...


class Backend(Protocol):
    """One backend of the fused operators (torch, cpp, triton), as `aft_fast.ops.dispatch.get_backend`
    returns it."""

    def logprob_forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        rows: torch.Tensor,
        targets: torch.Tensor,
        chunk_size: int,
        keep_bytes: int = 0,
        post: LogitOptions = IDENTITY,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(logp [T], lse [T]) fp32 and `kept`: what the backend keeps for backward within keep_bytes."""
        ...

    def logprob_backward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        rows: torch.Tensor,
        targets: torch.Tensor,
        lse: torch.Tensor,
        coef: torch.Tensor,
        need: Need,
        chunk_size: int,
        logp: torch.Tensor | None = None,
        kept: tuple[torch.Tensor, ...] | list[torch.Tensor] = (),
        post: LogitOptions = IDENTITY,
    ) -> MaybeGrads:
        """Gradients of sum_t coef[t] * logp[t] in the inputs' dtypes (None where not `need`)."""
        ...

    def aft_forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        rows: torch.Tensor,
        targets: torch.Tensor,
        segments: torch.Tensor,
        counts: torch.Tensor,
        plan: Any,
        cfg: Any,
        ref_logp: torch.Tensor | None,
        need: Need,
        chunk_size: int | None,
        *,
        objective: ObjectiveFactory,
        live_seg: torch.Tensor | None = None,
        post: LogitOptions = IDENTITY,
    ) -> AFTResult:
        """Loss, its parts, per-segment sums and (where `need`) the gradients for d(loss) = 1.

        objective: the loss layer's per-unit group loss; live_seg [S] bool: the segments whose gradient
        can be nonzero (engines that skip dead rows order the others last); post: the logit
        post-processing (docs/design.md section 2)."""
        ...
