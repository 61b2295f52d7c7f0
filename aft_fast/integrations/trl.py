"""TRL on aft-fast's operator: TRL 1.16's fused-LM-head contract, and the AFT trainer re-exported.

TRL's trainers (DPO, KTO, GRPO, RLOO, SFT) patch the model with `trl.trainer.utils.add_fused_lm_head` and
call ``model(..., labels=labels, fused_lm_head=True)``, reading a `FusedCausalLMOutput`. `add_fused_lm_head`
here takes the same arguments and returns the same output, with the log-probabilities (and so the loss
and every gradient the trainers take through them) from `aft_fast.linear_logprob`. `patch_trl()` makes
every TRL trainer use it:

    from aft_fast.integrations.trl import patch_trl
    patch_trl()  # before building the trainer

Shapes: B rows, L tokens per row, H hidden, V vocab, T scored (label != -100) tokens.
"""

from __future__ import annotations

import functools
import sys
import types
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import transformers
from packaging.version import Version
from torch import nn
from trl.kernels import ChunkedLogProbFunction
from trl.kernels.chunked_logprob import OPTIONAL_OUTPUTS
from trl.trainer import utils as trl_utils
from trl.trainer.utils import FusedCausalLMOutput

from aft_fast import linear_logprob
from aft_fast.constants import IGNORE_INDEX
from aft_fast.integrations.hf import AFTConfig, AFTTrainer, register_head_for_zero3
from aft_fast.models.logits import LogitProcessing, lm_head, logit_processing

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without distributed
    DTensor = None

__all__ = [
    "add_fused_lm_head",
    "patch_trl",
    "unpatch_trl",
    "AFTConfig",
    "AFTTrainer",
    "FusedCausalLMOutput",
]

_TRL_ADD_FUSED_LM_HEAD = trl_utils.add_fused_lm_head
# TRL's own tile width for the optional outputs (same value TRL passes).
_TRL_CHUNK = trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE


def add_fused_lm_head(
    model: transformers.PreTrainedModel,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    outputs: tuple[str, ...] = ("log_probs",),
) -> None:
    """`trl.trainer.utils.add_fused_lm_head` on aft-fast's operator: same arguments, same behaviour.

    ``model(..., labels=labels, fused_lm_head=True)`` runs the backbone, scores only the positions whose
    next-token label is not -100 through `aft_fast.linear_logprob` (one segment per token, so its sums are
    the per-token log-probabilities) and returns a `FusedCausalLMOutput`: ``log_probs`` [B, L - 1] (or
    [B, L] with pre-shifted ``shift_labels``), zero where the label is -100; ``loss``, the negative
    log-likelihood summed over scored tokens / ``num_items_in_batch`` (their count when not given), plus
    the MoE load-balancing loss when router logits are requested; ``label_mask``. Without
    ``fused_lm_head=True`` the original forward runs, so generation is unchanged.

    outputs: TRL's optional per-token fields ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
        are computed, when asked for, by TRL's own kernel on the scored tokens (one more pass over the
        head; the entropy keeps its gradient, as GRPO's entropy bonus needs). "log_probs" always is ours.
    temperature: the logits are divided by it. The config's soft cap (final_logit_softcapping) and logit
        scale (logit_scale, output_multiplier, lm_head_multiplier, logits_scaling) are read as TRL reads
        them (`aft_fast.models.logits`) and applied by the operator; a post-processing it does not know,
        or a head that is not an nn.Linear, raises UnsupportedModelError (a ValueError) naming it.

    Add the head before wrapping the model with PEFT. Under DeepSpeed ZeRO-3 the head weight is
    registered as an external parameter of `model`, so it stays gathered from this forward through its
    backward (the operator reads it in both).
    """
    extras = _optional_outputs(outputs)
    # The model's own post-processing, read as TRL reads it; an unknown one is refused by field name.
    processing = logit_processing(model.config, temperature=temperature)
    lm_head(model)
    text_config = model.config.get_text_config()
    spec = _FusedHead(
        processing, cast_lm_head_to_fp32, extras, text_config, _backbone_attr(model, text_config)
    )
    register_head_for_zero3(model)
    original_forward = model.forward

    @functools.wraps(type(model).forward)  # `generate` validates its kwargs against this signature
    def _fused_forward(
        self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs
    ):
        if not fused_lm_head:
            given = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return original_forward(*args, **kwargs, **{k: v for k, v in given.items() if v is not None})
        return _fused_output(self, spec, args, kwargs, labels, shift_labels, num_items_in_batch)

    model.forward = types.MethodType(_fused_forward, model)


@dataclass(frozen=True)
class _FusedHead:
    """What `add_fused_lm_head` reads from the model once, for every fused forward after it."""

    processing: LogitProcessing
    cast_fp32: bool
    extras: tuple[str, ...]  # TRL's optional outputs asked for, in TRL's order
    text_config: transformers.PretrainedConfig
    backbone_attr: str


def _optional_outputs(outputs: tuple[str, ...]) -> tuple[str, ...]:
    """TRL's optional fields among `outputs`, in TRL's order; refuses a name TRL does not know up front,
    rather than on the first forward."""
    unknown = set(outputs) - {"log_probs", *OPTIONAL_OUTPUTS}
    if unknown:
        raise ValueError(
            f"outputs: unknown field(s) {sorted(unknown)}; expected among log_probs, "
            f"{', '.join(OPTIONAL_OUTPUTS)}"
        )
    return tuple(name for name in OPTIONAL_OUTPUTS if name in outputs)


def _backbone_attr(model: transformers.PreTrainedModel, text_config: transformers.PretrainedConfig) -> str:
    """The attribute that holds the backbone: `base_model`, except on a multimodal model (its text config
    apart from its own) under transformers 4, where the text backbone is `model`."""
    multimodal = text_config is not model.config
    return "model" if multimodal and Version(transformers.__version__) < Version("5.0.0") else "base_model"


def _fused_output(
    model: nn.Module, spec: _FusedHead, args, kwargs, labels, shift_labels, num_items_in_batch
) -> FusedCausalLMOutput:
    """The fused forward: the backbone, then the scored positions through the operator, and TRL's loss."""
    if labels is None and shift_labels is None:
        raise ValueError("fused_lm_head=True needs labels (or shift_labels): the tokens to score")
    kwargs["use_cache"] = False
    if getattr(spec.text_config, "output_router_logits", False):
        kwargs.setdefault("output_router_logits", True)
    # Looked up on each call: FSDP and PEFT replace the backbone and head after patching.
    backbone_outputs = getattr(model, spec.backbone_attr)(*args, **kwargs)
    head = lm_head(model)  # looked up again: refuses an adapter on the head itself (PEFT's lora.Linear)
    hidden, labels = _next_token_pairs(backbone_outputs.last_hidden_state, labels, shift_labels, head)
    mask = labels != IGNORE_INDEX
    log_probs, extra = _score(hidden, head, labels, mask, spec.processing, spec.cast_fp32, spec.extras)
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -log_probs.sum() / count
    aux_loss = None
    if kwargs.get("output_router_logits"):
        aux_loss = _load_balancing_loss(
            model, spec.text_config, backbone_outputs, kwargs.get("attention_mask")
        )
        loss = loss + getattr(spec.text_config, "router_aux_loss_coef", 0.0) * aux_loss
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, label_mask=mask, aux_loss=aux_loss, **extra)


def _next_token_pairs(
    hidden: torch.Tensor, labels: torch.Tensor | None, shift_labels: torch.Tensor | None, head: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each hidden state with the label of the token it predicts, on the head's device: labels shifted
    left by one (the last position predicts nothing), or TRL's pre-shifted `shift_labels` as they are."""
    if shift_labels is None:
        assert labels is not None  # the caller refuses neither being given
        labels = labels[:, 1:]
        hidden = hidden[:, :-1]
    else:
        labels = shift_labels
    return hidden.to(head.weight.device), labels.to(head.weight.device)


def _score(
    hidden: torch.Tensor,
    head: nn.Module,
    labels: torch.Tensor,
    mask: torch.Tensor,
    processing: LogitProcessing,
    cast_fp32: bool,
    extras: tuple[str, ...],
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """Per-token log-probs [*mask.shape] (fp32, 0 where masked) and TRL's optional fields for them."""
    weight, bias = _full_head(head)
    device = hidden.device
    dtype, ctx = _compute_dtype(hidden, cast_fp32)
    flat = hidden.reshape(-1, hidden.shape[-1])
    rows = mask.reshape(-1).nonzero().flatten()
    targets = labels.reshape(-1)[rows]
    log_probs = torch.zeros(mask.shape, dtype=torch.float32, device=device)
    extra: dict[str, torch.Tensor | None] = {name: None for name in OPTIONAL_OUTPUTS}
    if rows.numel() == 0:
        # Keep the output connected to the model, so that an all-masked micro batch backpropagates a zero.
        for name in extras:
            extra[name] = torch.zeros(
                mask.shape, dtype=torch.bool if name == "is_top1" else torch.float32, device=device
            )
        return log_probs + flat.sum() * 0.0, extra
    with ctx:
        h, w = flat.to(dtype), weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        scored = linear_logprob(
            h,
            w,
            rows=rows,
            targets=targets,
            segments=torch.arange(rows.numel(), device=device),
            num_segments=rows.numel(),
            bias=b,
            **processing.options(),
        )
        if extras:
            extra.update(_trl_fields(h[rows], w, b, targets, mask, processing, extras))
    return log_probs.masked_scatter(mask, scored), extra


def _full_head(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's weight and bias as whole tensors: FSDP2 may shard the head on its own (a DTensor), and
    the operator needs every vocabulary row."""
    weight, bias = head.weight, getattr(head, "bias", None)
    if DTensor is not None and isinstance(weight, DTensor):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    return weight, bias


def _compute_dtype(hidden: torch.Tensor, cast_fp32: bool) -> tuple[torch.dtype, AbstractContextManager]:
    """The dtype the head runs in and the context to run it under: fp32 with autocast off when asked;
    autocast's own dtype under autocast, cast by hand since autocast does not reach into a custom autograd
    Function (as the head's matmul would be cast); else the hidden states' dtype."""
    device = hidden.device
    if cast_fp32:
        return torch.float32, torch.autocast(device.type, enabled=False)
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type), torch.autocast(device.type, enabled=False)
    return hidden.dtype, nullcontext()


def _trl_fields(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    targets: torch.Tensor,
    mask: torch.Tensor,
    processing: LogitProcessing,
    extras: tuple[str, ...],
) -> dict[str, torch.Tensor]:
    """TRL's optional per-token fields, from TRL's own kernel on the scored rows h, scattered back to
    [*mask.shape] (zero where masked): the values TRL's head would give, entropy gradient included."""
    fields = ChunkedLogProbFunction.apply(
        h,
        w,
        b,
        targets,
        processing.temperature,
        _TRL_CHUNK,
        processing.softcap,
        processing.logit_scale,
        extras,
    )
    return {
        name: value.new_zeros(mask.shape).masked_scatter(mask, value)
        for name, value in zip(OPTIONAL_OUTPUTS, fields[1:], strict=True)
        if value is not None
    }


def _load_balancing_loss(model: nn.Module, text_config, backbone_outputs, attention_mask) -> torch.Tensor:
    """The MoE load-balancing loss the model's own forward adds (Mixtral's, which MoE families share)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    if Version(transformers.__version__) < Version("5.0.0"):
        experts, per_token = model.num_experts, model.num_experts_per_tok
    else:
        experts = getattr(text_config, "num_experts", None) or getattr(model, "num_experts", None)
        per_token = text_config.num_experts_per_tok
    return load_balancing_loss_func(backbone_outputs.router_logits, experts, per_token, attention_mask)


def _trl_modules() -> list[types.ModuleType]:
    return [m for name, m in list(sys.modules.items()) if (name == "trl" or name.startswith("trl.")) and m]


def patch_trl() -> None:
    """Make every TRL trainer (DPO, KTO, GRPO, RLOO, SFT, and the experimental ones that use it) add
    aft-fast's fused LM head instead of TRL's: replaces `add_fused_lm_head` in `trl.trainer.utils` and in
    every loaded TRL module that imported it (trainer modules imported later pick up the patched one).
    Call before building the trainer; `unpatch_trl()` undoes it."""
    _swap(_TRL_ADD_FUSED_LM_HEAD, add_fused_lm_head)


def unpatch_trl() -> None:
    """Put TRL's own `add_fused_lm_head` back where `patch_trl` replaced it."""
    _swap(add_fused_lm_head, _TRL_ADD_FUSED_LM_HEAD)


def _swap(old, new) -> None:
    for module in _trl_modules():
        # vars(): a lazy TRL module would import on getattr; only names already bound need replacing.
        if vars(module).get("add_fused_lm_head") is old:
            vars(module)["add_fused_lm_head"] = new
