"""Batched Hugging Face `generate` over questions, sharded across ranks and gathered in order.

The question list is cut into global batches of `batch_size`; batch i runs on rank i % world_size, seeded
with (seed, i). So the outputs depend on the seed and the batch size, not on the number of processes.
Each prompt is encoded once; `num_return_sequences=k` expands it to k samples inside `generate`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import deepspeed
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase

from aft_fast.data.collate import encode_prompt

T = TypeVar("T")
R = TypeVar("R")


def _rank_world() -> tuple[int, int]:
    if deepspeed.comm.is_initialized():
        return deepspeed.comm.get_rank(), deepspeed.comm.get_world_size()
    return 0, 1


def map_sharded(
    items: Sequence[T],
    batch_size: int,
    fn: Callable[[int, list[T]], list[R]],
    *,
    desc: str = "",
    progress: bool = True,
) -> list[R]:
    """Apply fn(batch_index, batch) -> one result per item to this rank's batches; every rank gets all
    results back in the order of `items` (collective when distributed)."""
    rank, world = _rank_world()
    starts = list(range(0, len(items), batch_size))
    mine = [(i, s) for i, s in enumerate(starts) if i % world == rank]
    local: list[tuple[int, list[R]]] = []
    for i, s in tqdm(mine, desc=desc, disable=not progress or rank != 0, dynamic_ncols=True):
        batch = list(items[s : s + batch_size])
        results = fn(i, batch)
        if len(results) != len(batch):
            raise RuntimeError(f"{desc}: {len(results)} results for {len(batch)} items")
        local.append((i, results))
    if world > 1:
        gathered: list[Any] = [None] * world
        deepspeed.comm.all_gather_object(gathered, local)
        local = [pair for part in gathered for pair in part]
    out: list[R] = []
    for _, results in sorted(local, key=lambda pair: pair[0]):
        out.extend(results)
    return out


@torch.no_grad()
def generate_chains(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[str],
    *,
    num_return_sequences: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
    seed: int | None = None,
) -> list[list[str]]:
    """For each question, `num_return_sequences` chains (decoded text after the prompt, specials dropped)."""
    prompts = [encode_prompt(tokenizer, q) for q in questions]
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    # Left padding: every prompt ends at the same column, where generation starts.
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_return_sequences=num_return_sequences,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **(dict(temperature=temperature, top_p=top_p, top_k=0) if do_sample else {}),
    )
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen)
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    k = num_return_sequences
    return [texts[i * k : (i + 1) * k] for i in range(len(questions))]
