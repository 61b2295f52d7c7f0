"""The model's forward side: one decoder call per batch in any layout, per-segment log-probs through the
fused operator, and `AFTModel`, the module whose forward calls the fused loss on the gathered LM head.

Shapes: B rows, L tokens per row, H hidden, V vocab, N = B * L hidden rows.
"""

from __future__ import annotations

import deepspeed
import torch
from torch import nn

from aft_fast import aft_loss, linear_logprob
from aft_fast.data.batch import Batch
from aft_fast.models import attention
from aft_fast.options import LossOptions


def forward_hidden(lm: nn.Module, batch: Batch) -> torch.Tensor:
    """The one model-forward call: the base model's final-norm hidden states, flattened to [N, H].

    Only the decoder runs (no LM head, so no [N, V] logits). Every layout goes through here: the padded one
    with its 2-D padding mask; packed and shared with their position ids and the mask in the form the model's
    attention kernel takes (aft_fast/models/attention.py; `attention.prepare` picks the kernel). Row n of the
    result is position n % L of row n // L in every case (flash-attn's single row keeps that order)."""
    base = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    if batch.layout == "padded":
        inputs = dict(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        )
    else:
        inputs = attention.decoder_inputs(lm.config, batch, next(base.parameters()).dtype)
    out = base(**inputs, use_cache=False)
    hidden = out.last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])


def segment_logprobs(lm: nn.Module, batch: Batch) -> torch.Tensor:
    """[S] summed log-prob of each segment of `batch` under `lm`, through the fused operator (no [N, V]
    logits): what sampling stores as the DPO reference and evaluation scores chains with."""
    head = lm.get_output_embeddings()
    return linear_logprob(
        forward_hidden(lm, batch),
        head.weight,
        **batch.token_index(),
        num_segments=batch.num_segments,
        bias=getattr(head, "bias", None),
    )


class AFTModel(nn.Module):
    """Causal LM + fused AFT loss. The loss runs inside this module's forward, so that under ZeRO-3
    DeepSpeed gathers the LM head weight for it (registered below as an external parameter: it belongs
    to `lm_head` - or to the embedding when tied - whose own forward never runs) and routes its
    gradient back to the partitions."""

    def __init__(self, lm: nn.Module, options: LossOptions | None = None, **loss_options):
        """loss_options: the keyword options of `aft_fast.aft_loss` (mode, beta, w_vft, ...). The loss is
        called as a function, not held as a child module: DeepSpeed would hook a child's forward and
        warn that it cannot see the tensors inside its AFTOutput."""
        super().__init__()
        if options is not None:  # the loss options as one LossOptions; the call options as keywords
            twice = sorted(set(options.names()) & set(loss_options))
            if twice:
                raise ValueError(f"{twice[0]}: given both in options and as a keyword")
            loss_options = {**options.kwargs(), **loss_options}
        self.lm = lm
        self.loss_options = loss_options
        head = lm.get_output_embeddings()
        if hasattr(head.weight, "ds_id"):  # a ZeRO-3 parameter
            deepspeed.zero.register_external_parameter(self, head.weight)
            if getattr(head, "bias", None) is not None:
                deepspeed.zero.register_external_parameter(self, head.bias)

    def forward(self, **tensors: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Takes `Batch.tensors()` as keywords (DeepSpeed's hooks see tensors, not dataclasses); returns
        the AFTOutput fields as a dict for the same reason."""
        batch = Batch(**tensors)
        hidden = forward_hidden(self.lm, batch)
        head = self.lm.get_output_embeddings()
        out = aft_loss(
            hidden,
            head.weight,
            **batch.token_index(),
            **batch.group_inputs(),
            ref_logp=batch.ref_logp,
            bias=getattr(head, "bias", None),
            **self.loss_options,
        )
        return {
            "loss": out.loss,
            "scores": out.scores,
            "vft_loss": out.vft_loss,
            "align_loss": out.align_loss,
        }
