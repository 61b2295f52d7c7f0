"""The model's forward side: one decoder call per batch in any layout, per-segment log-probs through the
fused operator, and `AFTModel`, the module whose forward calls the fused loss on the gathered LM head.

Shapes: B rows, L tokens per row, H hidden, V vocab, N = B * L hidden rows.
"""

from __future__ import annotations

import deepspeed
import torch
from torch import nn

from aft_fast import aft_loss_with, linear_logprob
from aft_fast.data.batch import Batch
from aft_fast.models import attention
from aft_fast.models.logits import UnsupportedModelError, check_against_model, lm_head, logit_processing
from aft_fast.options import LossOptions


def forward_hidden(lm: nn.Module, batch: Batch) -> torch.Tensor:
    """The one model-forward call: the base model's final-norm hidden states, flattened to [N, H].

    Only the decoder runs (no LM head, so no [N, V] logits). Every layout goes through here: the padded one
    with its 2-D padding mask; packed and shared with their position ids and the mask in the form the model's
    attention kernel takes (aft_fast/models/attention.py; `attention.prepare` picks the kernel). Row n of the
    result is position n % L of row n // L in every case (flash-attn's single row keeps that order)."""
    hidden = decoder_outputs(lm, batch).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])


def decoder_outputs(lm: nn.Module, batch: Batch, **extra):
    """The decoder's output for `batch` in its layout (see `forward_hidden`); `extra` goes to the decoder
    (output_router_logits=True for a mixture of experts' router logits)."""
    base = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    if batch.layout == "padded":
        inputs = dict(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        )
    else:
        inputs = attention.decoder_inputs(lm.config, batch, next(base.parameters()).dtype)
    return base(**inputs, use_cache=False, **extra)


def router_aux_options(config) -> tuple[float, int, int] | None:
    """(router_aux_loss_coef, experts, experts per token) when the model's own forward adds the router's
    load-balancing loss to its training loss (a mixture of experts whose config sets output_router_logits,
    as Mixtral's forward reads it, and TRL's fused head does), else None."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(config, "output_router_logits", False):
        return None
    experts = next((getattr(config, k) for k in ("num_local_experts", "num_experts", "n_routed_experts")
                    if getattr(config, k, None)), None)
    top_k, coef = getattr(config, "num_experts_per_tok", None), getattr(config, "router_aux_loss_coef", None)
    if experts is None or top_k is None or coef is None:
        raise UnsupportedModelError(
            "config field output_router_logits: set, but the config lacks the expert count, "
            "num_experts_per_tok or router_aux_loss_coef that the router auxiliary loss needs")
    return float(coef), int(experts), int(top_k)


def segment_logprobs(lm: nn.Module, batch: Batch, *, temperature: float = 1.0,
                     backend: str = "auto") -> torch.Tensor:
    """[S] summed log-prob of each segment of `batch` under `lm`, through the fused operator (no [N, V]
    logits): what sampling stores as the DPO reference and evaluation scores chains with.

    The logits are the model's own: its post-processing (soft cap, logit scale) is read from its config
    (`aft_fast.models.logits`), and a model the operator cannot reproduce is refused (by its config, and on
    the first call by a probe against the model's own forward). `temperature` divides
    them on top (1.0, the default: the model's own distribution; the sampling temperature is another
    setting)."""
    head = lm_head(lm)
    processing = logit_processing(lm.config, temperature=temperature)
    if not getattr(lm, "_aft_fast_logits_checked", False):  # once per model: one short probe forward
        check_against_model(lm, processing)
        lm._aft_fast_logits_checked = True
    return linear_logprob(
        forward_hidden(lm, batch),
        head.weight,
        **batch.token_index(),
        num_segments=batch.num_segments,
        bias=head.bias,
        backend=backend,
        **processing.options(),
    )


def register_head_for_zero3(model: nn.Module, owner: nn.Module | None = None) -> None:
    """Under DeepSpeed ZeRO-3, make `model`'s LM head weight (and bias) external parameters of `owner`
    (default: `model`), the module whose forward runs the fused loss: the loss reads them in that forward
    and its backward, never through the head module's own forward (or through the embedding's, when tied),
    so without this DeepSpeed would hand it a partition of 0 elements. Registering works before and after
    partitioning (DeepSpeed keys it by the parameter object); without ZeRO-3 it does nothing."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head) to fuse")
    if not (hasattr(head.weight, "ds_id") or is_deepspeed_zero3_enabled()):
        return
    for param in (head.weight, getattr(head, "bias", None)):
        if param is not None:
            deepspeed.zero.register_external_parameter(owner if owner is not None else model, param)


class AFTModel(nn.Module):
    """Causal LM + fused AFT loss. The loss runs inside this module's forward, so that under ZeRO-3
    DeepSpeed gathers the LM head weight for it (registered below as an external parameter: it belongs
    to `lm_head` - or to the embedding when tied - whose own forward never runs) and routes its
    gradient back to the partitions."""

    def __init__(self, lm: nn.Module, options: LossOptions | None = None, **loss_options):
        """loss_options: the keyword options of `aft_fast.aft_loss` (mode, beta, w_vft, ..., and
        `temperature`, 1.0 by default). The logit post-processing (soft cap, logit scale) is the model's
        own, read from its config (`aft_fast.models.logits`); a model the operator cannot reproduce is
        refused here. The loss is called as a function, not held as a child module: DeepSpeed would hook a
        child's forward and warn that it cannot see the tensors inside its AFTOutput."""
        super().__init__()
        if options is None:  # the loss options spelled as keywords: one LossOptions of them (checked)
            spelled = {k: loss_options.pop(k) for k in LossOptions.names() if k in loss_options}
            options = LossOptions(**spelled)
        twice = sorted(set(options.names()) & set(loss_options))
        if twice:
            raise ValueError(f"{twice[0]}: given both in options and as a keyword")
        for name in ("logit_scale", "softcap"):
            if name in loss_options:
                raise ValueError(f"{name}: AFTModel reads the logit post-processing from the model's config")
        self.logits = logit_processing(lm.config, temperature=loss_options.pop("temperature", 1.0))
        self.router_aux = router_aux_options(lm.config)
        self.lm = lm
        self.loss = options  # handed whole to the fused operator
        self.call_options = loss_options  # the call's other keywords (backend, chunk_size)
        lm_head(lm)  # an nn.Linear head, or refused
        register_head_for_zero3(lm, owner=self)

    @property
    def loss_options(self) -> dict:
        """The loss options and the call's other keywords as the keywords of `aft_fast.aft_loss`."""
        return {**self.loss.kwargs(), **self.call_options}

    @property
    def note(self) -> str:
        """One line for the run log at model load: the logit post-processing read from the config and, for a
        mixture of experts, whether its router auxiliary loss joins the AFT loss."""
        config = self.lm.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        note = self.logits.describe()
        moe = [k for k in ("num_local_experts", "num_experts", "n_routed_experts")
               if getattr(config, k, None)]
        if self.router_aux is not None:
            note += (f"; MoE: router auxiliary loss added, {self.router_aux[0]:g} x load balancing "
                     "(config output_router_logits, as the model's own forward)")
        elif moe:
            coef = getattr(config, "router_aux_loss_coef", None)
            note += (f"; MoE ({moe[0]}={getattr(config, moe[0])}): the router auxiliary loss is left out of "
                     f"the AFT loss, as in the model's own forward (config output_router_logits is off; "
                     f"router_aux_loss_coef={coef} is not applied)")
        return note

    def forward(self, **tensors: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Takes `Batch.tensors()` as keywords (DeepSpeed's hooks see tensors, not dataclasses); returns
        the AFTOutput fields as a dict for the same reason."""
        batch = Batch(**tensors)
        extra = {} if self.router_aux is None else {"output_router_logits": True}
        dec = decoder_outputs(self.lm, batch, **extra)
        hidden = dec.last_hidden_state.reshape(-1, dec.last_hidden_state.shape[-1])
        head = lm_head(self.lm)
        out = aft_loss_with(
            self.loss,
            hidden,
            head.weight,
            **batch.token_index(),
            **batch.group_inputs(),
            ref_logp=batch.ref_logp,
            bias=head.bias,
            **self.call_options,
            **self.logits.options(),
        )
        result = {
            "loss": out.loss,
            "scores": out.scores,
            "vft_loss": out.vft_loss,
            "align_loss": out.align_loss,
        }
        if self.router_aux is not None:  # as the model's own forward (and TRL's fused head) add it
            from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

            coef, experts, top_k = self.router_aux
            aux = load_balancing_loss_func(dec.router_logits, experts, top_k, batch.attention_mask)
            result["loss"] = out.loss + coef * aux
            result["router_aux_loss"] = aux.detach()
        return result
