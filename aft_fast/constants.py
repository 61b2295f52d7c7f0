"""Names shared by every layer: the loss modes, the training modes, the backends, the ignore index."""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100

# Modes of the fused loss (docs/design.md, loss math). "vft" is maximum likelihood on reference chains alone.
MODES = ("vft", "align", "dcl", "bcl", "dpo", "rrhf", "pro", "dpo+bc", "rrhf+bc", "pro+bc")
BACKENDS = ("auto", "triton", "cpp", "torch")


@dataclass(frozen=True)
class TrainMode:
    """What the aft stage does in one `--mode`: the trainer reads these facts instead of testing names.

    loss:            the fused loss's mode (aft_fast.aft_loss) the stage trains with.
    trains_on:       "references" (each question's reference chain), "positives+references" (the
                     reference plus the positive candidates, all as maximum-likelihood targets) or
                     "candidates+references" (the reference for L_vft, the labelled candidates for L_align).
    ranking:         the loss has an alignment term over candidate pairs (L_align; w_align applies).
    boundary:        the loss has the boundary B = min_p s_p - beta (bcl, +bc): beta applies.
    needs_ref_logp:  the candidates must carry the frozen reference model's log-prob (dpo).
    """

    name: str
    loss: str
    trains_on: str
    ranking: bool
    boundary: bool
    needs_ref_logp: bool

    @property
    def uses_candidates(self) -> bool:
        return self.trains_on != "references"


def _ranking(name: str) -> TrainMode:
    base = name.partition("+")[0]
    return TrainMode(
        name=name,
        loss=name,
        trains_on="candidates+references",
        ranking=True,
        boundary=base == "bcl" or name.endswith("+bc"),
        needs_ref_logp=base == "dpo",
    )


# Every --mode of the aft stage. vft: continued VFT on the reference chains (the control); rft:
# rejection-sampling fine-tuning (maximum likelihood on the positive samples plus the references).
TRAIN_MODES: dict[str, TrainMode] = {
    "vft": TrainMode("vft", "vft", "references", ranking=False, boundary=False, needs_ref_logp=False),
    "rft": TrainMode(
        "rft", "vft", "positives+references", ranking=False, boundary=False, needs_ref_logp=False
    ),
    **{m: _ranking(m) for m in MODES if m != "vft"},
}


def train_mode(name: str) -> TrainMode:
    """The table row of `--mode name`; ValueError naming the field for an unknown one."""
    if name not in TRAIN_MODES:
        raise ValueError(f"mode: {name!r} is not one of {', '.join(TRAIN_MODES)}")
    return TRAIN_MODES[name]
