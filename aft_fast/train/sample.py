"""Stage sample: k candidates per training question from the frozen VFT model, labelled by answer checking.

Each process holds a replica of the model (loaded from the VFT Hugging Face folder) and samples its share
of the questions; rank 0 writes one JSONL. For the dpo modes a second pass stores each candidate's summed
log-prob under that same frozen model (`ref_logp`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from aft_fast.data.candidates import Candidate, CandidateGroup, label_candidates, write_candidates
from aft_fast.data.collate import collate, encode_group
from aft_fast.data.formats import Example
from aft_fast.eval.generation import generate_chains, map_sharded
from aft_fast.train.config import TrainConfig
from aft_fast.train.engine import Dist
from aft_fast.models.forward import segment_logprobs
from aft_fast.models.loading import load_replica


@dataclass
class SampleStats:
    questions: int
    candidates: int
    positives: int
    negatives: int
    both: int  # questions with at least one positive and one negative
    duplicates: int
    seconds: float


def group_stats(groups: list[CandidateGroup], sampled: int, seconds: float) -> SampleStats:
    cands = [c for g in groups for c in g.candidates]
    pos = sum(bool(c.correct) for c in cands)
    both = sum(
        any(c.correct for c in g.candidates) and not all(c.correct for c in g.candidates) for g in groups
    )
    return SampleStats(len(groups), len(cands), pos, len(cands) - pos, both, sampled - len(cands), seconds)


@torch.no_grad()
def reference_logps(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    groups: list[CandidateGroup],
    *,
    max_length: int,
    batch_size: int,
    progress: bool = True,
) -> list[CandidateGroup]:
    """Copies of `groups` whose candidates carry their summed log-prob under `model` (the DPO reference),
    scored on exactly the tokens that AFT's collation scores."""
    device = model.get_output_embeddings().weight.device

    def score(_: int, batch: list[CandidateGroup]) -> list[list[float]]:
        items = [encode_group(g, tokenizer, with_reference=False) for g in batch]
        b = collate(items, pad_id=tokenizer.pad_token_id, max_length=max_length).to(device)
        sums = segment_logprobs(model, b).tolist()
        out, i = [], 0
        for g in batch:
            out.append(sums[i : i + len(g.candidates)])
            i += len(g.candidates)
        return out

    logps = map_sharded(groups, batch_size, score, desc="ref_logp", progress=progress)
    return [
        CandidateGroup(
            g.id,
            g.question,
            g.gold,
            g.kind,
            g.reference,
            [Candidate(c.text, c.correct, c.rank, lp) for c, lp in zip(g.candidates, lps, strict=True)],
        )
        for g, lps in zip(groups, logps, strict=True)
    ]


def run_sample(
    cfg: TrainConfig,
    dist: Dist,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    model_dir: Path,
    out_path: Path,
    dtype: torch.dtype,
) -> SampleStats:
    t0 = time.perf_counter()
    model = load_replica(model_dir, dist.device, dtype)
    questions = examples[: cfg.sample_limit or None]

    def sample(i: int, batch: list[Example]) -> list[list[str]]:
        return generate_chains(
            model,
            tokenizer,
            [e.question for e in batch],
            num_return_sequences=cfg.num_samples,
            do_sample=True,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            seed=cfg.seed * 1_000_003 + i,
        )

    texts = map_sharded(questions, cfg.gen_batch_size, sample, desc="sample", progress=cfg.progress)
    groups = [
        label_candidates(CandidateGroup.from_example(e), t) for e, t in zip(questions, texts, strict=True)
    ]
    if cfg.mode.startswith("dpo"):
        groups = reference_logps(
            model,
            tokenizer,
            groups,
            max_length=cfg.max_length,
            batch_size=cfg.gen_batch_size,
            progress=cfg.progress,
        )
    if dist.is_main:
        write_candidates(out_path, groups)
    deepspeed.comm.barrier()
    return group_stats(groups, len(questions) * cfg.num_samples, time.perf_counter() - t0)
