"""How each layout reaches a Hugging Face decoder's attention (docs/design.md section 4).

    layout   kernel (attn_implementation)   what the decoder gets besides input_ids
    padded   the model's own                the 2-D padding mask; Hugging Face builds the causal mask
    packed   flash_attention_2 (CUDA, when  one row [1, B*L] with position_ids, cu_seq_lens_q/k and
             flash-attn is installed)       max_length_q/k from sequence_ids: flash-attn varlen
    packed,  flex_attention (CUDA)          a BlockMask built from sequence_ids / member_ids / positions
    shared                                  (FlexAttention skips the blocks it masks out)
    packed,  sdpa (CPU, or CUDA without     a dense additive 4-D mask [B, 1, L, L] (0 = attend, dtype min =
    shared   FlexAttention), eager          masked) and position_ids

In every padding-free case the position ids come from the batch, so rotary embeddings see each member at
the positions it has in the padded layout. Where the model has sliding-window layers (Mistral, Qwen2 with
use_sliding_window) the mask also applies the window by position distance, as Hugging Face's own masks do;
models with per-layer attention types get one mask per type.

Flash-attn varlen takes sequence boundaries only: it cannot let members share a prompt they do not
follow, so `shared` never uses it. `prepare` picks the kernel for a layout and device, switches the
model to it, and says what it chose and why in `AttentionPlan.note`.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PretrainedConfig

from aft_fast.data.batch import LAYOUTS, Batch

DENSE_KERNELS = ("sdpa", "eager")
FLASH_KERNELS = ("flash_attention_2", "flash_attention_3")


@dataclass(frozen=True)
class AttentionPlan:
    layout: str
    kernel: str  # the model's attn_implementation while training in this layout
    note: str = ""  # what was chosen and why, when it is not the obvious choice

    def row_budget(self, max_tokens: int) -> int | None:
        """collate's max_tokens for the config value (0 = auto). Dense-mask attention costs the square of the
        row length: auto keeps rows at the longest sequence. FlexAttention and flash-attn skip what is
        masked: auto puts the whole micro batch in one row (no padding at all)."""
        if max_tokens:
            return max_tokens
        return None if self.kernel in DENSE_KERNELS else sys.maxsize


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def choose_kernel(
    layout: str,
    *,
    current: str,
    cuda: bool,
    half: bool,
    supports_sdpa: bool = True,
    supports_flex: bool = True,
    supports_flash: bool = True,
    flash_installed: bool | None = None,
) -> AttentionPlan:
    """The kernel for `layout` given the model's current attn_implementation, the device and what is
    installed. Pure: tests call it with every combination."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: {layout!r} is not one of {', '.join(LAYOUTS)}")
    if layout == "padded":
        return AttentionPlan(layout, current)
    flash = flash_attn_installed() if flash_installed is None else flash_installed
    if layout == "packed" and cuda and flash and supports_flash and half:
        return AttentionPlan(layout, "flash_attention_2", "layout packed: flash-attn varlen (cu_seqlens)")
    why = []  # why the layout does not get a better kernel
    if layout == "shared" and current in FLASH_KERNELS:
        why.append("flash-attn varlen cannot express prompt sharing (a shared prompt, separate members)")
    if layout == "packed" and cuda:
        why.append(
            "flash-attn is not installed"
            if not flash
            else "the model does not support flash-attn"
            if not supports_flash
            else "flash-attn needs fp16/bf16"
        )
    if cuda and supports_flex:
        note = f"layout {layout}: FlexAttention block mask" + (f" ({'; '.join(why)})" if why else "")
        return AttentionPlan(layout, "flex_attention", note)
    why.append("the model does not support FlexAttention" if cuda else "FlexAttention needs CUDA")
    if layout == "packed" and not cuda:
        why[-1] = "FlexAttention and flash-attn need CUDA"
    kernel, name = ("sdpa", "SDPA") if supports_sdpa else ("eager", "eager attention")
    return AttentionPlan(layout, kernel, f"layout {layout}: {name} with a dense 4-D mask ({'; '.join(why)})")


def prepare(lm: torch.nn.Module, layout: str, device: torch.device) -> AttentionPlan:
    """Choose the kernel for `layout` on `device` and switch `lm` to it (only its config changes)."""
    if layout != "padded":
        check_padding_free(lm.config)
    param = next(lm.parameters())
    plan = choose_kernel(
        layout,
        current=lm.config._attn_implementation,
        cuda=torch.device(device).type == "cuda",
        half=param.dtype in (torch.float16, torch.bfloat16),
        supports_sdpa=bool(getattr(lm, "_supports_sdpa", False)),
        supports_flex=bool(getattr(lm, "_supports_flex_attn", False)),
        supports_flash=bool(getattr(lm, "_supports_flash_attn", False)),
    )
    if plan.kernel != lm.config._attn_implementation:
        lm.set_attn_implementation(plan.kernel)
    return plan


# ---------------------------------------------------------------------------------------------------------
# The decoder's inputs for a padding-free batch.


# Config fields of models whose layers mix tokens by something other than the attention mask (state-space,
# convolution, linear-attention or recurrent layers): a packed or shared row would leak across members.
_NON_ATTENTION_MIXING = re.compile(
    r"mamba|ssm_|conv_|_conv|linear_attn|linear_conv|recurrent|lru_|block_type|attn_layer_"
)
# Model types that do so without a config field that says it.
_UNMASKED_MODEL_TYPES = {
    "bloom": "ALiBi biases attention by the column in the row, not by the position id",
    "rwkv": "recurrent layers that mix tokens other than through the attention mask",
    "xlstm": "recurrent layers that mix tokens other than through the attention mask",
}


def check_padding_free(config: PretrainedConfig) -> None:
    """Refuse, naming the config field, a model whose attention the packed/shared layouts cannot express:
    ALiBi (biases by column in the row, not by position id) and layers that mix tokens other than through
    attention, and per-layer attention types other than full and sliding-window attention (`_windows`)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    name = type(config).__name__
    attn_config = getattr(config, "attn_config", None)  # MPT's: a dict or a config object
    alibi = getattr(config, "alibi", None) or (
        attn_config.get("alibi") if isinstance(attn_config, dict) else getattr(attn_config, "alibi", None)
    )
    if alibi:
        raise ValueError(
            f"layout packed/shared: config field alibi ({name}): ALiBi biases attention by the "
            "column in the row, not by the position id; use --layout padded"
        )
    model_type = getattr(config, "model_type", None)
    if model_type in _UNMASKED_MODEL_TYPES:
        raise ValueError(
            f"layout packed/shared: config field model_type={model_type!r}: "
            f"{_UNMASKED_MODEL_TYPES[model_type]}; use --layout padded"
        )
    for field, value in config.to_dict().items():
        if _NON_ATTENTION_MIXING.search(field) and value not in (None, False, 0):
            raise ValueError(
                f"layout packed/shared: config field {field} ({name}): layers that mix tokens "
                "other than through the attention mask; use --layout padded"
            )
    _windows(config)  # per-layer attention types


def _windows(config: PretrainedConfig) -> dict[str, int | None] | int | None:
    """The sliding window(s) the model applies: None (full attention everywhere), one window for every
    layer (Mistral), or {layer type: window or None} for models with per-layer attention types (Qwen2)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        return window
    known = {"full_attention": None, "sliding_attention": window}
    unknown = sorted(set(layer_types) - set(known))
    if unknown:
        raise ValueError(
            f"layout packed/shared: config field layer_types has {', '.join(unknown)} "
            f"({type(config).__name__}): only full_attention and sliding_attention layers take the "
            "packed/shared mask; use --layout padded"
        )
    if "sliding_attention" not in layer_types:
        return None
    return {t: known[t] for t in set(layer_types)}


def _packing(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence_ids, position_ids) of a packed or shared batch; the padded layout has no sequence ids."""
    if batch.sequence_ids is None or batch.position_ids is None:
        raise ValueError(f"layout {batch.layout}: no sequence_ids / position_ids to build a mask from")
    return batch.sequence_ids, batch.position_ids


def allowed(batch: Batch, window: int | None = None) -> torch.Tensor:
    """[B, L, L] bool: query i may attend to key j (Batch's rule; within `window` positions when set).
    Padding attends to the padding before it, so that no query row is empty."""
    seq, pos = _packing(batch)
    idx = torch.arange(seq.shape[1], device=seq.device)
    ok = (seq[:, :, None] == seq[:, None, :]) & (idx[:, None] >= idx[None, :])
    if batch.member_ids is not None:
        mem = batch.member_ids
        ok &= (mem[:, None, :] == 0) | (mem[:, None, :] == mem[:, :, None])
    if window is not None:
        ok &= (pos[:, :, None] - pos[:, None, :]) < window
    return ok


def dense_mask(batch: Batch, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """[B, 1, L, L] additive mask in `dtype` (SDPA and eager): 0 where allowed, the dtype's min elsewhere.
    Additive rather than bool: CPU SDPA runs ~10-25% faster with it, and eager attention needs it."""
    ok = allowed(batch, window)
    mask = torch.zeros(ok.shape, dtype=dtype, device=ok.device)
    return mask.masked_fill_(~ok, torch.finfo(dtype).min)[:, None]


def block_mask(batch: Batch, window: int | None = None):
    """FlexAttention BlockMask with the same rule as `allowed` (evaluated block by block, never [L, L])."""
    from torch.nn.attention.flex_attention import create_block_mask

    (seq, pos), mem = _packing(batch), batch.member_ids

    def mask_mod(b, h, q, kv):
        ok = (seq[b, q] == seq[b, kv]) & (kv <= q)
        if mem is not None:
            ok = ok & ((mem[b, kv] == 0) | (mem[b, kv] == mem[b, q]))
        if window is not None:
            ok = ok & (pos[b, q] - pos[b, kv] < window)
        return ok

    B, L = seq.shape
    return create_block_mask(mask_mod, B, None, L, L, device=seq.device)


def flash_varlen_kwargs(batch: Batch) -> dict:
    """Flash-attn varlen arguments: the batch as one row, sequence boundaries where sequence_ids change
    (sequence ids are unique in the batch, so a row's end is always a boundary; a padding run is a
    sequence of its own)."""
    ids = _packing(batch)[0].reshape(-1)
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[1:] = ids[1:] != ids[:-1]
    bounds = torch.cat([starts.nonzero().flatten(), torch.tensor([ids.numel()], device=ids.device)])
    cu = bounds.to(torch.int32)
    longest = int(cu.diff().max())
    return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)


def decoder_inputs(config: PretrainedConfig, batch: Batch, dtype: torch.dtype) -> dict:
    """Keyword arguments for the decoder's forward for a packed or shared `batch`, in the form the model's
    attention kernel (config._attn_implementation) takes."""
    if batch.layout == "padded":
        raise ValueError("decoder_inputs: the padded layout needs no custom mask")
    kernel = config._attn_implementation
    if kernel in FLASH_KERNELS:
        if batch.layout == "shared":
            raise ValueError(
                "layout shared: flash-attn varlen cannot express prompt sharing; call "
                "aft_fast.models.attention.prepare(lm, 'shared', device) to pick a kernel that can"
            )
        return dict(
            input_ids=batch.input_ids.reshape(1, -1),
            position_ids=_packing(batch)[1].reshape(1, -1),
            attention_mask=None,
            **flash_varlen_kwargs(batch),
        )
    check_padding_free(config)
    windows = _windows(config)
    build: Callable[[Batch, int | None], Any]
    if kernel == "flex_attention":
        build = block_mask
    elif kernel in DENSE_KERNELS:

        def build(b, w):
            return dense_mask(b, dtype, w)
    else:
        raise ValueError(
            f"layout {batch.layout}: attention implementation {kernel!r} cannot take a custom mask; "
            "use sdpa, eager, flex_attention (or flash_attention_2 for packed)"
        )
    if isinstance(windows, dict):  # one mask per window size, shared by the layer types that use it
        by_window = {w: build(batch, w) for w in set(windows.values())}
        mask = {t: by_window[w] for t, w in windows.items()}
    else:
        mask = build(batch, windows)
    return dict(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask)
