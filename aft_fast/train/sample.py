"""Stage sample: k candidates per training question from the frozen VFT model, labelled by `label`: answer
checking (the paper's rule) or answer and chain checking (`aft_fast.data.chains`: the embedded task's
checker, or the step checker on GSM8K-style questions).

Each process holds a replica of the model (loaded from the VFT Hugging Face folder) and samples its share
of the questions; rank 0 writes one JSONL. For the dpo modes a second pass stores each candidate's summed
log-prob under that same frozen model (`ref_logp`). Next to the file, `<file>.meta.json` records the label
rule, the task version, the chain checker and the label noise: how many answer-positives hold a false step.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import deepspeed
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from aft_fast.data.candidates import (
    CandidateGroup,
    label_candidates,
    not_checkable_error,
    write_candidates,
)
from aft_fast.data.chains import checker_of, is_checkable
from aft_fast.data.formats import Example
from aft_fast.eval.evaluate import score_groups
from aft_fast.eval.generation import map_sharded
from aft_fast.eval.sampler import HFSampler, Sampler, SamplingParams, batch_seed
from aft_fast.eval.vllm_sampler import VLLMSampler, check_vllm_python
from aft_fast.models.loading import load_replica
from aft_fast.train.config import SampleSettings, Sampling
from aft_fast.train.engine import Dist


@dataclass
class SampleStats:
    questions: int
    candidates: int
    positives: int
    negatives: int
    both: int  # questions with at least one positive and one negative
    duplicates: int
    seconds: float
    # Label noise (candidates that store answer_correct / chain_ok; None where nothing was checked):
    answer_positives: int = 0  # final answer right
    false_step: int | None = None  # ... of which the chain holds a false or unsupported step
    positives_by_form: dict[str, int] = field(default_factory=dict)  # positives (the label used) per form

    @property
    def false_step_pct(self) -> float | None:
        if self.false_step is None or not self.answer_positives:
            return None
        return 100 * self.false_step / self.answer_positives

    def noise_text(self) -> str:
        """The label-noise clause of the summary line."""
        if self.false_step is None:
            return "chains not checked (multiple choice: no chain checker)"
        pct = self.false_step_pct
        return f"{self.false_step} of {self.answer_positives} answer-positives have a false step" + (
            f" ({pct:.1f}%)" if pct is not None else ""
        )


def group_stats(groups: list[CandidateGroup], sampled: int, seconds: float) -> SampleStats:
    cands = [c for g in groups for c in g.candidates]
    pos = sum(bool(c.correct) for c in cands)
    both = sum(
        any(c.correct for c in g.candidates) and not all(c.correct for c in g.candidates) for g in groups
    )
    stats = SampleStats(len(groups), len(cands), pos, len(cands) - pos, both, sampled - len(cands), seconds)
    right = [c for c in cands if c.answer_correct]
    stats.answer_positives = len(right)
    if cands and all(c.chain_ok is not None for c in cands):
        stats.false_step = sum(not c.chain_ok for c in right)
        for c in cands:
            if c.correct:
                key = c.form or "unrecognised"
                stats.positives_by_form[key] = stats.positives_by_form.get(key, 0) + 1
    return stats


def meta_path(candidates_path: str | Path) -> Path:
    """The sidecar metadata file of a candidate file: `<path>.meta.json`."""
    return Path(f"{candidates_path}.meta.json")


def write_meta(
    candidates_path: str | Path,
    stats: SampleStats,
    *,
    label: str,
    task: str | None,
    checker: str | None = None,
) -> Path:
    """Write `<candidates_path>.meta.json`: label rule, task version (None: not the embedded task), the
    chain checker (`aft_fast.data.chains.checker_of`; None: chains not checked), counts and label noise.
    Atomic (temp file, then os.replace)."""
    path = meta_path(candidates_path)
    meta = {
        "label": label,
        "task": task,
        "checker": checker,
        "groups": stats.questions,
        "candidates": stats.candidates,
        "positives": stats.positives,
        "negatives": stats.negatives,
        "both": stats.both,
        "duplicates": stats.duplicates,
        "answer_positives": stats.answer_positives,
        "answer_positives_false_step": stats.false_step,
        "answer_positives_false_step_pct": stats.false_step_pct,
        "positives_by_form": stats.positives_by_form,
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, path)
    return path


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
    scored by `score_groups` on exactly the tokens that AFT's collation scores."""
    scored = score_groups(
        model,
        tokenizer,
        groups,
        max_length=max_length,
        batch_size=batch_size,
        with_reference=False,
        progress=progress,
        desc="ref_logp",
    )
    return [
        CandidateGroup(
            g.id,
            g.question,
            g.gold,
            g.kind,
            g.reference,
            [replace(c, ref_logp=lp) for c, lp in zip(g.candidates, s.sums, strict=True)],
        )
        for g, s in zip(groups, scored, strict=True)
    ]


def check_sampler(sampling: Sampling, dist: Dist) -> str | None:
    """Before any stage starts: under --sampler vllm, the vLLM environment imports vLLM (its version is
    returned) and the tensor-parallel size fits the run; ValueError naming the field otherwise (with the
    command that creates the environment). None under hf."""
    if sampling.sampler != "vllm":
        return None
    tp = sampling.vllm.tensor_parallel_size
    if tp > 1 and dist.world_size > 1:
        raise ValueError(
            f"vllm_tensor_parallel_size: {tp} GPUs per engine needs a run of one "
            f"process (this one has {dist.world_size}, each with an engine on its own GPU)"
        )
    return check_vllm_python(sampling.vllm.python)


def make_sampler(
    sampling: Sampling,
    dist: Dist,
    tokenizer: PreTrainedTokenizerBase,
    model_dir: Path,
    dtype: torch.dtype,
    model: nn.Module | None = None,
) -> Sampler:
    """The sampler that sampling.sampler names, for the sample stage and evaluation alike: hf generates
    with `model` (loaded from `model_dir` when None); vllm starts an engine on `model_dir` on first use
    (close it when done), seeded with sampling.seed, with the settings sampling.vllm."""
    if sampling.sampler == "vllm":
        return VLLMSampler(
            model_dir, tokenizer, dtype=dtype, seed=sampling.seed, options=sampling.vllm, device=dist.device
        )
    return HFSampler(model if model is not None else load_replica(model_dir, dist.device, dtype), tokenizer)


def _refuse_uncheckable(questions: list[Example]) -> None:
    """Verified labels need a step checker for every question: name the first one without."""
    bad = next((e for e in questions if not is_checkable(e.question)), None)
    if bad is not None:
        raise not_checkable_error(f"training question {bad.id!r}")


def run_sample(
    settings: SampleSettings,
    dist: Dist,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    model_dir: Path,
    out_path: Path,
    dtype: torch.dtype,
    sampler: Sampler | None = None,
) -> SampleStats:
    """k candidates per training question from `sampler` (default: the configured one, `make_sampler`),
    labelled, with the reference log-probs for the dpo modes; written to `out_path`."""
    t0 = time.perf_counter()
    sampling = settings.sampling
    questions = examples[: settings.limit or None]
    if settings.label == "verified":  # fail before sampling, not after
        _refuse_uncheckable(questions)
    # vLLM's engine samples alone (the default engine memory assumes the stage's device to itself); the
    # replica that scores ref_logp loads after it is gone.
    hf = sampler is None and sampling.sampler == "hf"
    model = load_replica(model_dir, dist.device, dtype) if hf else None
    chains = sampler or make_sampler(sampling, dist, tokenizer, model_dir, dtype, model)
    params = SamplingParams(
        num_return_sequences=settings.num_samples,
        do_sample=True,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_new_tokens=sampling.max_new_tokens,
    )

    def sample(i: int, batch: list[Example]) -> list[list[str]]:
        return chains.generate([e.question for e in batch], params, seed=batch_seed(sampling.seed, i))

    try:
        texts = map_sharded(questions, sampling.batch_size, sample, desc="sample", progress=sampling.progress)
    finally:
        if chains is not sampler:  # made here: an engine's memory goes back before ref_logp scoring
            chains.close()
    groups = [
        label_candidates(CandidateGroup.from_example(e), t, settings.label)
        for e, t in zip(questions, texts, strict=True)
    ]
    if settings.ref_logp:
        groups = reference_logps(
            model if model is not None else load_replica(model_dir, dist.device, dtype),
            tokenizer,
            groups,
            max_length=sampling.max_length,
            batch_size=sampling.batch_size,
            progress=sampling.progress,
        )
    stats = group_stats(groups, len(questions) * settings.num_samples, time.perf_counter() - t0)
    if dist.is_main:
        write_candidates(out_path, groups)
        checkers = {checker_of(g.question) for g in groups}
        checker = checkers.pop() if len(checkers) == 1 else None  # a mixed file names none
        write_meta(out_path, stats, label=settings.label, task=settings.task, checker=checker)
    deepspeed.comm.barrier()
    return stats
