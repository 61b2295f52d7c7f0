"""The options of the AFT loss family (docs/design.md section 2), in one frozen dataclass.

`aft_fast.aft_loss` and `AFTLoss` take them as keywords (their public signatures); inside, the loss
layer, its backends, the objectives and `AFTModel` pass one `LossOptions` around. The defaults here are
those of the public API (tests/test_options.py holds every signature that spells them to these).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class LossOptions:
    """mode: vft | align | dcl | bcl | dpo | rrhf | pro | dpo+bc | rrhf+bc | pro+bc; beta: the boundary
    margin of bcl and +bc; w_vft, w_align: the weights of the two parts; dpo_beta: DPO's inverse
    temperature; pro_tau: PRO's temperature. Checked by `aft_fast.losses.checks.check_groups`."""

    mode: str = "bcl"
    beta: float = 1.0
    w_vft: float = 1.0
    w_align: float = 1.0
    dpo_beta: float = 0.1
    pro_tau: float = 1.0

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

    def as_floats(self) -> LossOptions:
        """The numeric options as floats (ints are accepted at the API; the kernels take floats)."""
        return LossOptions(self.mode, *(float(getattr(self, name)) for name in self.names()[1:]))
