"""The model's own logit post-processing, read from its config, and the checks that refuse a model whose
logits the fused operator cannot reproduce (docs/design.md section 2).

With z = hidden @ W^T + b from the LM head, the operator's logits are
softcap * tanh(logit_scale * z / softcap) / temperature. The config fields read (those TRL's fused LM head
reads, in the same order of precedence):

    field                      model types (transformers 5)                  logits
    final_logit_softcapping    gemma2, gemma3, gemma3n, gemma4, nanochat, ...  c * tanh(z / c)
    logit_scale                cohere, cohere2, cohere2_moe (mpt: None)      z * logit_scale
    output_multiplier          muse_glimmer, muse_spark                      z * output_multiplier
    lm_head_multiplier         falcon_h1                                     z * lm_head_multiplier
    logits_scaling             granite*, minicpm3                            z / logits_scaling
                               hyperclovax                                   z * logits_scaling

Any other config field whose name speaks of logits, a soft cap, the LM head or an output multiplier (and
whose value is not a no-op) is refused by name, as is a head that is not an nn.Linear: scoring such a model
would be silently wrong. `check_against_model` is the backstop for what no field announces: it compares
the operator's log-probs with the model's own forward on a short probe.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

SOFTCAP_FIELD = "final_logit_softcapping"
# In TRL's order: the first one set wins.
SCALE_FIELDS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
# Model types that multiply by logits_scaling where the others divide.
MULTIPLY_LOGITS_SCALING = ("hyperclovax",)
# Field names that look like logit post-processing ...
_SUSPECT = re.compile(r"logit|soft_?cap|lm_head|output_mult")
# ... but act elsewhere: attention scores, the MoE router, MLP activations, generation, the head's bias.
ELSEWHERE = frozenset({
    "attn_logit_softcapping", "output_router_logits", "router_logits", "num_logits_to_keep", "logits_to_keep",
    "lm_head_bias", "moe_router_logit_softcapping", "mlp_gate_softcap", "mlp_up_softcap",
    "chunk_size_lm_head",
})
# Fields that change the logits in a way the operator cannot express (not matched by the pattern).
UNSUPPORTED = {"unpadded_vocab_size": "the logits are cut to the first unpadded_vocab_size entries"}


class UnsupportedModelError(ValueError):
    """The model's logits (or its attention layout) cannot be reproduced by the fused operator."""


@dataclass(frozen=True)
class LogitProcessing:
    """The operator's logit options for one model (keyword arguments of aft_loss / linear_logprob), and
    the config fields they came from."""

    logit_scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0
    fields: tuple[str, ...] = ()

    def options(self) -> dict:
        return dict(logit_scale=self.logit_scale, softcap=self.softcap, temperature=self.temperature)

    @property
    def is_identity(self) -> bool:
        return self.logit_scale == 1.0 and self.softcap is None and self.temperature == 1.0

    def describe(self) -> str:
        """One line for the run log."""
        parts = [f"logit_scale={self.logit_scale:g}", f"softcap={self.softcap}",
                 f"temperature={self.temperature:g}"]
        source = ", ".join(self.fields) if self.fields else "no post-processing field set"
        return f"logits: {' '.join(parts)} (config: {source})"


def _is_noop(value) -> bool:
    return value is None or value is False or (isinstance(value, (int, float)) and value in (0, 1))


def _number(config, name: str) -> float:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UnsupportedModelError(f"config field {name}: expected a finite number, got {value!r}")
    return float(value)


def logit_processing(config, *, temperature: float = 1.0) -> LogitProcessing:
    """The logit post-processing of a model with this (Hugging Face) config; `temperature` is the scoring
    temperature (1.0: the model's own distribution). Raises UnsupportedModelError naming the field for a
    post-processing the operator does not know."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", type(text).__name__)
    read: list[str] = []

    softcap = getattr(text, SOFTCAP_FIELD, None)
    if softcap is not None:
        softcap = _number(text, SOFTCAP_FIELD)
        if softcap <= 0:
            raise UnsupportedModelError(f"config field {SOFTCAP_FIELD}: expected a positive soft cap, "
                                        f"got {softcap}")
        read.append(f"{SOFTCAP_FIELD}={softcap:g}")

    scale = 1.0
    present = [name for name in SCALE_FIELDS if getattr(text, name, None) is not None]
    if len([name for name in present if _number(text, name) != 1.0]) > 1:
        # No model applies two of them: which one this one does is not knowable from the config.
        raise UnsupportedModelError(
            f"config fields {' and '.join(present)} ({model_type}): more than one logit scale is set; "
            "the model's own forward applies one of them"
        )
    if present:
        name = present[0]  # TRL's precedence: the first field set is the one the model applies
        value = _number(text, name)
        if name == "logits_scaling" and model_type not in MULTIPLY_LOGITS_SCALING:
            if value == 0:
                raise UnsupportedModelError("config field logits_scaling: the logits are divided by it, "
                                            "got 0")
            scale = 1.0 / value
        else:
            scale = value
        read.append(f"{name}={value:g}")

    unknown = _suspects(text)
    if unknown:
        name = unknown[0]
        raise UnsupportedModelError(
            f"config field {name}={getattr(text, name)!r} ({model_type}): "
            f"{UNSUPPORTED.get(name, 'a logit post-processing the fused operator does not know')}; "
            f"it reads {SOFTCAP_FIELD} and {', '.join(SCALE_FIELDS)} only"
        )
    if not isinstance(temperature, (int, float)) or not temperature > 0 or temperature == float("inf"):
        raise UnsupportedModelError(f"temperature: expected a positive number, got {temperature!r}")
    return LogitProcessing(logit_scale=scale, softcap=softcap, temperature=float(temperature),
                           fields=tuple(read))


def _suspects(config) -> list[str]:
    """Fields of `config` that post-process logits in a way not read here (and are not no-ops)."""
    known = {SOFTCAP_FIELD, *SCALE_FIELDS, *ELSEWHERE}
    names = [k for k in config.to_dict() if k not in known and (_SUSPECT.search(k) or k in UNSUPPORTED)]
    return [k for k in names if not _is_noop(getattr(config, k, None))]


def lm_head(lm: nn.Module) -> nn.Linear:
    """The model's LM head, refused unless it is an nn.Linear (the operator computes h W^T + b)."""
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise UnsupportedModelError(
            f"{type(lm).__name__}.get_output_embeddings(): the fused operator needs an nn.Linear LM head, "
            f"got {type(head).__name__}"
        )
    return head


@torch.no_grad()
def check_against_model(lm: nn.Module, processing: LogitProcessing, *, tokens: int = 16,
                        rtol: float | None = None, seed: int = 0) -> float:
    """Compare the operator's log-probs with the model's own forward on one probe row of random tokens;
    raise UnsupportedModelError when they differ by more than rtol relative to the largest |log-prob|
    (default 1e-3 for fp32 models; 5e-2 for half precision, whose own logits are rounded to 8 bits: a
    missing scale or cap on logits of the probe's size still differs by far more). Returns the largest
    relative difference. Costs one short forward of the model: for a full replica (sampling, evaluation),
    not a ZeRO-3 partition."""
    from aft_fast import linear_logprob

    head = lm_head(lm)
    param = head.weight
    if rtol is None:
        rtol = 1e-3 if param.dtype in (torch.float32, torch.float64) else 5e-2
    vocab = head.weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, tokens + 1), generator=g).to(param.device)
    was_training = lm.training
    lm.eval()
    try:
        logits = lm(input_ids=ids, use_cache=False).logits[0, :-1].float() / processing.temperature
        decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
    finally:
        lm.train(was_training)
    targets = ids[0, 1:]
    own = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    rows = torch.arange(tokens, device=param.device)
    ours = linear_logprob(hidden, head.weight, rows=rows, targets=targets, segments=rows, num_segments=tokens,
                          bias=head.bias, **processing.options())
    diff = float((ours - own).abs().max() / own.abs().max().clamp(min=1.0))
    if not diff <= rtol:
        raise UnsupportedModelError(
            f"{type(lm).__name__}: its own logits differ from the fused operator's ({processing.describe()}) "
            f"by {diff:.2g} (relative) on a probe: a logit post-processing or hidden-state path the operator "
            "does not reproduce"
        )
    return diff
