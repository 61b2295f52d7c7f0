"""The contract between the loss layer (aft_fast/losses/) and the backends that run it (docs/design.md
section 3).

`Backend` is what every backend offers: the two passes of `linear_logprob` and the one-call forward of
`aft_loss` (loss, parts, per-segment sums and the gradients). `AFTCall` and `LogProbCall` are everything of
one call but the three differentiable tensors, in one frozen object each: the autograd Function holds it
and hands it to the backend whole. `GroupObjective` is the group loss of an `aft_forward`, one run of whole
groups at a time: the loss layer builds it for the backend it picked (autograd on the loss math for the CPU
backends, the group-loss kernel for triton), and every backend's `aft_forward` runs the one it is given.
`ChunkPrims` is what a chunked CPU backend brings to the shared chunk loop (aft_fast/ops/chunk_loop.py):
`aft_fast.ops.torch_chunks` and `aft_fast.ops.cpp_chunks` are modules of this shape.

The loss options and the group plan are typed in the ground layer (`aft_fast.options.LossOptions`,
`GroupPlan`), so that nothing on this road is `Any`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from aft_fast.ops.logit_options import IDENTITY, LogitOptions
from aft_fast.options import GroupPlan, LossOptions

Need = tuple[bool, bool, bool]  # whether hidden, weight, bias need a gradient
MaybeGrads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


@dataclass(frozen=True)
class AFTCall:
    """One `aft_loss` call, checked (aft_fast/losses/aft_function.py), as the backends read it.

    rows, targets, segments: [T] int64, each scored token's hidden row, token id and segment.
    counts:    [S] float32, scored tokens per segment.
    plan:      the label-only structure of the groups (pairs, top ranks, references).
    options:   the loss options (mode, beta, weights, dpo_beta, pro_tau).
    ref_logp:  [S] the frozen reference model's summed log-probs (dpo modes), or None.
    backend:   the resolved backend name (torch | cpp | triton).
    chunk_size: scored tokens per chunk, None: the backend's sizing.
    post:      the logit post-processing (logit_scale, softcap, temperature; docs/design.md section 2).
    """

    rows: torch.Tensor
    targets: torch.Tensor
    segments: torch.Tensor
    counts: torch.Tensor
    plan: GroupPlan
    options: LossOptions
    ref_logp: torch.Tensor | None
    backend: str
    chunk_size: int | None = None
    post: LogitOptions = IDENTITY


@dataclass(frozen=True)
class LogProbCall:
    """One `linear_logprob` call, checked (aft_fast/losses/functional.py), as the backends read it.

    rows, targets, segments: [T] int64; num_segments: S.
    backend:    the resolved backend name (torch | cpp | triton).
    chunk_size: scored tokens per chunk (the CPU backends; the fused triton kernels need none).
    keep_bytes: what forward may keep for backward, in bytes (0: nothing; `linear_logprob`'s keep_probs).
    post:       the logit post-processing (logit_scale, softcap, temperature; docs/design.md section 2).
    """

    rows: torch.Tensor
    targets: torch.Tensor
    segments: torch.Tensor
    num_segments: int
    backend: str
    chunk_size: int
    keep_bytes: int = 0
    post: LogitOptions = IDENTITY


@dataclass
class AFTResult:
    loss: torch.Tensor
    vft: torch.Tensor
    align: torch.Tensor
    sums: torch.Tensor
    grads: MaybeGrads  # (grad_hidden, grad_weight, grad_bias) for d(loss) = 1, in the inputs' dtypes


class GroupObjective(Protocol):
    """The group loss of one `aft_forward`, one unit (a run of whole groups) at a time."""

    def unit(self, sums: torch.Tensor, g0: int, g1: int) -> torch.Tensor | None:
        """d(loss)/d(sums) [S] for groups g0..g1-1 (their sums are final), or None if nothing of them
        reaches the loss."""
        ...

    def result(self, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, L_vft, L_align) once every unit has been seen."""
        ...


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
        cap: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logp [c], lse [c]); buf ends holding the probabilities (or keep/keep_scale do). cap: a soft cap
        (logits = cap * tanh(y), aft_fast/ops/logit_options.py), or None."""
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
        self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, call: LogProbCall
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(logp [T], lse [T]) fp32 and `kept`: what the backend keeps for backward within keep_bytes."""
        ...

    def logprob_backward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        call: LogProbCall,
        lse: torch.Tensor,
        coef: torch.Tensor,
        need: Need,
        logp: torch.Tensor,
        kept: tuple[torch.Tensor, ...] | list[torch.Tensor] = (),
    ) -> MaybeGrads:
        """Gradients of sum_t coef[t] * logp[t] in the inputs' dtypes (None where not `need`), from
        forward's lse, logp and kept."""
        ...

    def aft_forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        call: AFTCall,
        need: Need,
        objective: GroupObjective,
    ) -> AFTResult:
        """Loss, its parts, per-segment sums and (where `need`) the gradients for d(loss) = 1, the group
        loss of each unit of whole groups from `objective`."""
        ...
