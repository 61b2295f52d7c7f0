"""One options dataclass for the loss (aft_fast/options.py): every signature that still spells the six
options (the public API, the reference, the trainer's config) has its defaults, and the trainer and
AFTModel pass it whole."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import aft_fast
from aft_fast.losses import objectives
from aft_fast.models.forward import AFTModel
from aft_fast.options import LossOptions
from aft_fast.reference import aft_loss_ref
from aft_fast.train.config import TrainConfig
from tests._integration_support import tiny_dims

DEFAULTS = {"mode": "bcl", "beta": 1.0, "w_vft": 1.0, "w_align": 1.0, "dpo_beta": 0.1, "pro_tau": 1.0}


def _signature_defaults(fn) -> dict:
    params = inspect.signature(fn).parameters
    return {name: params[name].default for name in LossOptions.names()}


def test_the_defaults_are_the_public_apis():
    assert LossOptions().kwargs() == DEFAULTS
    assert LossOptions.names() == tuple(DEFAULTS)
    assert not hasattr(objectives, "LossConfig")  # one type, one name: the objectives take LossOptions


@pytest.mark.parametrize(
    "fn",
    [aft_fast.aft_loss, aft_fast.AFTLoss.__init__, aft_loss_ref],
    ids=["aft_loss", "AFTLoss", "aft_loss_ref"],
)
def test_every_signature_spelling_the_options_has_their_defaults(fn):
    assert _signature_defaults(fn) == DEFAULTS


def test_train_config_has_the_defaults_and_gives_its_options():
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert {name: fields[name] for name in LossOptions.names()} == DEFAULTS
    cfg = TrainConfig(mode="dpo", beta=0.3, w_vft=0.5, w_align=2.0, dpo_beta=0.2, pro_tau=0.7)
    assert LossOptions.from_config(cfg) == LossOptions("dpo", 0.3, 0.5, 2.0, 0.2, 0.7)
    assert LossOptions.from_config(cfg, mode="vft").mode == "vft"  # a training mode's loss mode


def test_mode_parts_and_floats():
    rrhf_bc, bcl = LossOptions(mode="rrhf+bc"), LossOptions(mode="bcl")
    assert (rrhf_bc.base, rrhf_bc.boundary_constraint) == ("rrhf", True)
    assert (bcl.base, bcl.boundary_constraint) == ("bcl", False)
    floats = LossOptions(beta=2, w_vft=0, pro_tau=3)  # ints are accepted and stored as floats
    assert all(type(getattr(floats, n)) is float for n in LossOptions.names() if n != "mode")
    assert floats == LossOptions(beta=2.0, w_vft=0.0, pro_tau=3.0)


# Values the loss cannot mean: each is refused with a ValueError that names the argument, wherever the
# options enter (the one declaration checks them for every entry).
BAD = [
    ("mode", "kto"),
    ("beta", -1.0),
    ("beta", float("nan")),
    ("w_vft", -1.0),
    ("w_align", -0.5),
    ("w_align", float("inf")),
    ("dpo_beta", 0.0),
    ("dpo_beta", -0.1),
    ("pro_tau", 0.0),
    ("pro_tau", -2.0),
    ("beta", "1.0"),
    ("w_vft", True),
]
BAD_IDS = [f"{name}={value!r}" for name, value in BAD]


@pytest.mark.parametrize("name,value", BAD, ids=BAD_IDS)
def test_bad_options_are_refused_by_name(name, value):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        LossOptions(**{name: value})
    with pytest.raises(ValueError, match=rf"^{name}:"):
        aft_fast.AFTLoss(**{name: value})
    with pytest.raises(ValueError, match=rf"^{name}:"):
        TrainConfig(**{name: value})
    with pytest.raises(ValueError, match=rf"^{name}:"):
        AFTModel(_tiny_lm(), **{name: value})


@pytest.mark.parametrize("name,value", BAD, ids=BAD_IDS)
def test_aft_loss_refuses_bad_options_by_name(name, value):
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(4, 8, generator=g), torch.randn(11, 8, generator=g)
    index = dict(
        rows=torch.tensor([0, 1, 2, 3]),
        targets=torch.tensor([1, 2, 3, 4]),
        segments=torch.tensor([0, 0, 1, 1]),
        group=torch.tensor([0, 0]),
        label=torch.tensor([1, 0]),
        is_reference=torch.tensor([False, False]),
    )
    with pytest.raises(ValueError, match=rf"^{name}:"):
        aft_fast.aft_loss(hidden, weight, **index, backend="torch", **{name: value})


@pytest.mark.parametrize("name,value", BAD[:4], ids=BAD_IDS[:4])
def test_aft_config_refuses_bad_options_by_name(name, value, tmp_path):
    from aft_fast.integrations.hf import AFTConfig

    with pytest.raises(ValueError, match=rf"^AFTConfig\.{name}:"):
        AFTConfig(output_dir=str(tmp_path), report_to=[], **{name: value})
    fields = {f.name: f.default for f in dataclasses.fields(AFTConfig)}
    assert {n: fields[n] for n in LossOptions.names()} == DEFAULTS


def test_the_issue_cases_are_refused():
    """bcl with beta = -1 and w_vft = -1 were accepted silently (loss 11.72 and -3.80); now named."""
    with pytest.raises(ValueError, match="^beta: expected a number >= 0, got -1.0"):
        LossOptions(mode="bcl", beta=-1.0)
    with pytest.raises(ValueError, match="^w_vft: expected a number >= 0, got -1.0"):
        LossOptions(w_vft=-1.0)
    # The edges that mean something stay accepted: no margin, one part switched off.
    assert LossOptions(beta=0.0, w_vft=0.0).kwargs() == {**DEFAULTS, "beta": 0.0, "w_vft": 0.0}


def _tiny_lm() -> torch.nn.Module:
    config = LlamaConfig(**tiny_dims(32, 16, 32, layers=1, max_position_embeddings=16))
    return LlamaForCausalLM(config)


def test_aft_model_takes_the_options_whole():
    lm = _tiny_lm()
    whole = AFTModel(lm, LossOptions(mode="dcl", beta=0.5), backend="torch")
    spelled = AFTModel(
        lm, mode="dcl", beta=0.5, w_vft=1.0, w_align=1.0, dpo_beta=0.1, pro_tau=1.0, backend="torch"
    )
    assert (
        whole.loss_options
        == spelled.loss_options
        == {**DEFAULTS, "mode": "dcl", "beta": 0.5, "backend": "torch"}
    )
    with pytest.raises(ValueError, match="beta: given both"):
        AFTModel(lm, LossOptions(), beta=0.2)
