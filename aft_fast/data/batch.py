"""The tensors of one batch and the records collate and packing build it from.

`Encoded` is one group tokenized; `Member` one member cut to max_length; `Segments` the per-segment
tensors every layout shares; `Batch` what one forward of the model and the fused loss takes. The layouts
are built by aft_fast/data/collate.py (padded) and aft_fast/data/packing.py (packed, shared).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

LAYOUTS = ("padded", "packed", "shared")


@dataclass
class Encoded:
    """One group, tokenized. members[i] are chain token ids ending in eos; the reference chain, when
    present, is one member with is_reference True. label: 1/0 or a rank per member."""

    prompt: list[int]
    members: list[list[int]]
    label: list[int]
    is_reference: list[bool]
    ref_logp: list[float] | None = None


@dataclass
class Batch:
    """What one forward of the model and the fused loss needs. B rows of L tokens, T scored tokens,
    S segments (members).

    input_ids [B, L] int64; attention_mask [B, L] int64 (1 = token, 0 = pad); position_ids [B, L] or None
    (None: 0..L-1 per row); rows, targets, segments [T] int64; group, label [S] int64; is_reference [S]
    bool; ref_logp [S] float32 or None (summed log-prob under the frozen reference model, dpo modes).

    Padding-free layouts only (None in "padded"): sequence_ids [B, L] int64, the packed sequence of its row
    each token belongs to (unique in the batch, -1 for padding); member_ids [B, L] int64, "shared" only: 0
    for the prompt, m for the m-th member of its sequence. Token i attends to token j of its row iff they
    are in one sequence, j <= i, and j is in the prompt or in i's member. The mask itself is built at
    forward time in the form the attention kernel takes (aft_fast/models/attention.py)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor
    targets: torch.Tensor
    segments: torch.Tensor
    group: torch.Tensor
    label: torch.Tensor
    is_reference: torch.Tensor
    position_ids: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    sequence_ids: torch.Tensor | None = None
    member_ids: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def token_index(self) -> dict[str, torch.Tensor]:
        """rows, targets, segments: the fused operator's per-token keywords (aft_loss, linear_logprob)."""
        return dict(rows=self.rows, targets=self.targets, segments=self.segments)

    def group_inputs(self) -> dict[str, torch.Tensor]:
        """group, label, is_reference: aft_loss's per-segment keywords (ref_logp is passed on its own)."""
        return dict(group=self.group, label=self.label, is_reference=self.is_reference)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{k: None if v is None else v.to(device) for k, v in self.tensors().items()})

    @property
    def layout(self) -> str:
        if self.sequence_ids is None:
            return "padded"
        return "packed" if self.member_ids is None else "shared"

    @property
    def num_segments(self) -> int:
        return self.group.numel()

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens the model reads."""
        return int(self.attention_mask.sum())

    @property
    def computed_tokens(self) -> int:
        """Token positions the model computes, padding included (B * L)."""
        return self.input_ids.numel()


@dataclass
class Member:
    """One member after cutting to max_length: its segment index, group index, prompt and chain."""

    segment: int
    group: int
    prompt: list[int]
    chain: list[int]


@dataclass
class Segments:
    """The per-segment tensors every layout shares: group, label [S] int64, is_reference [S] bool,
    ref_logp [S] float32 or None."""

    group: torch.Tensor
    label: torch.Tensor
    is_reference: torch.Tensor
    ref_logp: torch.Tensor | None
