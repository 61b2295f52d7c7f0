"""The options of the AFT loss family (docs/design.md section 2): declared, defaulted and checked once.

`LossOptions` is the one declaration of the six loss options. Its defaults are those of the public API:
`aft_fast.aft_loss`, `AFTLoss`, `TrainConfig` and the Hugging Face integration's `AFTConfig` take theirs
from here (tests/test_options.py holds every signature that spells them to these). Building one checks it:
a value the loss cannot mean is a ValueError that names the argument. Inside, the loss layer, its backends,
the objectives and `AFTModel` pass one `LossOptions` around.

`GroupPlan` is the label-only structure of a batch of segments that the loss and every backend read
(built by `aft_fast.losses.objectives.build_plan`), and `candidate_pairs` the pair rule behind it
(label_i > label_j), written once for the loss, the training diagnostics and the evaluation metrics. They
live here, in the ground layer, so that the backends (aft_fast/ops/) name their types.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from aft_fast.constants import MODES


@dataclass(frozen=True)
class LossOptions:
    """mode: vft | align | dcl | bcl | dpo | rrhf | pro | dpo+bc | rrhf+bc | pro+bc.
    beta: the boundary margin of bcl and +bc (B = min top-rank score - beta), >= 0. Default 1.0: scores are
        per-token log-probs, so negatives may sit one nat per token below the positives.
    w_vft, w_align: the weights of the two parts, >= 0 (the paper adds them: 1.0 and 1.0; a negative weight
        would maximize what the loss minimizes).
    dpo_beta: DPO's inverse temperature, > 0 (0.1, DPO's own default).
    pro_tau: PRO's temperature, > 0 (1.0).
    The numbers are stored as floats (ints are accepted; the kernels take floats)."""

    mode: str = "bcl"
    beta: float = 1.0
    w_vft: float = 1.0
    w_align: float = 1.0
    dpo_beta: float = 0.1
    pro_tau: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: unknown mode {self.mode!r}; expected one of {', '.join(MODES)}")
        for name in self.names()[1:]:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}: expected a finite number, got {value!r}")
            positive = name in ("dpo_beta", "pro_tau")  # a temperature: 0 divides by zero
            if value < 0 or (positive and value == 0):
                need = "a positive number" if positive else "a number >= 0"
                raise ValueError(f"{name}: expected {need}, got {value!r}")
            object.__setattr__(self, name, float(value))

    @property
    def base(self) -> str:
        """The mode without its +bc suffix."""
        return self.mode.partition("+")[0]

    @property
    def boundary_constraint(self) -> bool:
        return self.mode.endswith("+bc")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_config(cls, cfg: Any, *, mode: str | None = None) -> LossOptions:
        """The options of a config object with these six attributes (a `TrainConfig`, the Hugging Face
        integration's arguments). mode: the loss mode when the config's own `mode` names something else
        (the trainer's modes table maps a training mode such as rft to the loss it trains with)."""
        values = {name: getattr(cfg, name) for name in cls.names()}
        if mode is not None:
            values["mode"] = mode
        return cls(**values)

    def kwargs(self) -> dict[str, Any]:
        """The options as the keywords of `aft_fast.aft_loss`."""
        return asdict(self)


@dataclass(frozen=True)
class GroupPlan:
    """Label-only structure of a batch of segments. Arrays named *_group are sorted by group.

    num_groups: G, the number of distinct group ids (groups are renumbered 0..G-1).
    num_valid:  groups with at least one pair: the denominator of L_align (global, kept by slices).
    ref_tokens: scored tokens of reference chains: the denominator of L_vft (global, likewise).
    seg_group:  [S] each segment's renumbered group.
    pair_i, pair_j, pair_group: [P] candidate pairs with label[i] > label[j] (i plays the positive).
    top_seg, top_group: [K] candidates at their group's top rank, in groups that have a pair.
    ref_seg, ref_group: [R] reference segments.
    """

    num_groups: int
    num_valid: int
    ref_tokens: int
    seg_group: torch.Tensor
    pair_i: torch.Tensor
    pair_j: torch.Tensor
    pair_group: torch.Tensor
    top_seg: torch.Tensor
    top_group: torch.Tensor
    ref_seg: torch.Tensor
    ref_group: torch.Tensor

    def slice_groups(self, start: int, end: int) -> GroupPlan:
        """The part of the plan that belongs to groups start..end-1 (normalizers unchanged)."""

        def cut(idx: torch.Tensor, *arrays: torch.Tensor) -> list[torch.Tensor]:
            bounds = torch.searchsorted(idx, torch.tensor([start, end], device=idx.device)).tolist()
            return [a[bounds[0] : bounds[1]] for a in arrays]

        pair_i, pair_j, pair_group = cut(self.pair_group, self.pair_i, self.pair_j, self.pair_group)
        top_seg, top_group = cut(self.top_group, self.top_seg, self.top_group)
        ref_seg, ref_group = cut(self.ref_group, self.ref_seg, self.ref_group)
        return replace(
            self,
            pair_i=pair_i,
            pair_j=pair_j,
            pair_group=pair_group,
            top_seg=top_seg,
            top_group=top_group,
            ref_seg=ref_seg,
            ref_group=ref_group,
        )

    def live_segments(self, options: LossOptions) -> torch.Tensor:
        """[S] bool: the segments whose d(loss)/d(sum) can be nonzero, from labels alone. A superset: a
        segment marked False has an exactly zero gradient (references when w_vft = 0, candidates in groups
        without pairs or in mode vft, and in dcl the candidates that only ever play j, whose score is
        detached). Engines that skip dead rows order the others last."""
        live = torch.zeros(self.seg_group.numel(), dtype=torch.bool, device=self.seg_group.device)
        if options.w_vft != 0 and self.ref_tokens:
            live[self.ref_seg] = True
        if options.mode != "vft" and options.w_align != 0 and self.num_valid:
            live[self.pair_i] = True
            if options.base != "dcl":
                live[self.pair_j] = True
        return live


def candidate_pairs(
    group: torch.Tensor, label: torch.Tensor, is_reference: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair rule of docs/design.md section 2, the one place it is written: (pair_i, pair_j) [P] int64,
    every two candidates i, j of one group with label[i] > label[j] (i plays the positive; references never
    pair). Binary labels give P x N, ranks {(i, j): r_i > r_j}. Ordered by group id, then by segment.

    group [S] (any ids), label [S] (1/0 or ranks; any ordered dtype), is_reference [S] bool."""
    seg_group = torch.unique(group, return_inverse=True)[1]
    order = torch.argsort(seg_group, stable=True)  # segments by group
    sizes = torch.bincount(seg_group)
    starts = torch.cumsum(sizes, 0) - sizes
    # All ordered (a, b) positions of `order` inside each group, enumerated in group order.
    pos_group = seg_group[order]
    reps = sizes[pos_group]
    a = torch.repeat_interleave(torch.arange(order.numel(), device=group.device), reps)
    first = torch.repeat_interleave(torch.cumsum(reps, 0) - reps, reps)  # where each row's run starts
    b = starts[pos_group[a]] + torch.arange(a.numel(), device=group.device) - first
    i, j = order[a], order[b]
    candidate = ~is_reference
    keep = candidate[i] & candidate[j] & (label[i] > label[j])
    return i[keep], j[keep]
