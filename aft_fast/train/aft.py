"""Stage aft: train the VFT model further on the candidate file, in one of the modes of
aft_fast.constants.TRAIN_MODES:

- the AFT loss family and its baselines: each group is the question's reference chain plus its labelled
  candidates; the loss is w_vft * L_vft (references) + w_align * L_align (candidates), docs/design.md;
- vft: continued VFT on the same questions' reference chains (the control);
- rft: rejection-sampling fine-tuning, maximum likelihood on each question's reference plus its positive
  candidates (a positive that repeats the reference verbatim is kept once).

Every mode trains on the same list of groups (those with a candidate), so a seed gives every mode the
same questions in the same order.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from aft_fast.constants import TrainMode, train_mode
from aft_fast.data.batch import Encoded
from aft_fast.data.candidates import CandidateGroup
from aft_fast.data.collate import encode_chain, encode_group, encode_prompt
from aft_fast.train.config import InputError, TrainConfig
from aft_fast.train.diagnostics import score_spread
from aft_fast.train.engine import Dist, model_dtype, resolve_ds_config_path
from aft_fast.train.logging import print0
from aft_fast.train.loop import StageResult, train


def positives(group: CandidateGroup) -> list[str]:
    """Texts of the group's positive candidates: label 1 (binary) or the top rank (ranked feedback, when
    the group holds more than one rank), without exact repeats of the reference or of each other."""
    labels = group.labels()
    if not labels or (group.candidates[0].rank is not None and max(labels) == min(labels)):
        return []
    top = max(labels) if group.candidates[0].rank is not None else 1
    seen, out = {group.reference}, []
    for c, label in zip(group.candidates, labels, strict=True):
        if label == top and c.text not in seen:
            seen.add(c.text)
            out.append(c.text)
    return out


def encode_items(
    mode: TrainMode, groups: list[CandidateGroup], tokenizer: PreTrainedTokenizerBase
) -> list[Encoded]:
    """The training items of `mode`, one per group that has a candidate (in file order)."""
    used = [g for g in groups if g.candidates]
    if mode.trains_on == "candidates+references":
        return [encode_group(g, tokenizer, with_ref_logp=mode.needs_ref_logp) for g in used]
    missing = [g.id for g in used if not g.reference]
    if missing and mode.trains_on == "references":
        raise InputError(f"mode {mode.name}: group {missing[0]!r} has no reference chain to train on")
    items = []
    for g in used:
        texts = [g.reference] if g.reference else []
        if mode.trains_on == "positives+references":
            texts += positives(g)
        if not texts:  # rft: no reference and no positive; an empty item would fail collation
            continue
        members = [encode_chain(tokenizer, t) for t in texts]
        # Every member is a maximum-likelihood target: L_vft's token mean covers them all.
        n = len(members)
        items.append(Encoded(encode_prompt(tokenizer, g.question), members, [1] * n, [True] * n))
    return items


def spread_beta(
    cfg: TrainConfig,
    dist: Dist,
    tokenizer: PreTrainedTokenizerBase,
    groups: list[CandidateGroup],
    model_dir: Path,
) -> tuple[float, float]:
    """(beta, spread): the VFT model's pooled within-question standard deviation of the candidates' scores
    s_c and cfg.beta_from_spread times it (collective when distributed: every rank scores its share)."""
    from aft_fast.eval.evaluate import score_groups  # evaluation builds on training's model helpers
    from aft_fast.models.loading import load_replica

    dtype = model_dtype(json.loads(resolve_ds_config_path(cfg.deepspeed_config).read_text()))
    model = load_replica(model_dir, dist.device, dtype)
    used = [g for g in groups if len(g.candidates) >= 2]
    scored = score_groups(
        model,
        tokenizer,
        used,
        max_length=cfg.max_length,
        batch_size=cfg.gen_batch_size,
        with_reference=False,
        progress=cfg.progress,
        desc="score spread",
    )
    del model
    spread = score_spread([s.scores for s in scored])
    return cfg.beta_from_spread * spread, spread


def run_aft(
    cfg: TrainConfig,
    dist: Dist,
    tokenizer: PreTrainedTokenizerBase,
    groups: list[CandidateGroup],
    init_model: Path,
) -> StageResult:
    mode = train_mode(cfg.mode)
    items = encode_items(mode, groups, tokenizer)
    if not items:
        raise InputError(f"mode {mode.name}: no group of the candidate file gives a training item")
    spread = None
    if cfg.beta_from_spread and mode.boundary:
        beta, spread = spread_beta(cfg, dist, tokenizer, groups, init_model)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print0(
            f"[aft] beta {beta:.4g} = {cfg.beta_from_spread:g} x the VFT model's score spread {spread:.4g} "
            f"(pooled within-question std of the training candidates' per-token scores)"
        )
        cfg = replace(cfg, beta=beta)
    elif cfg.beta_from_spread:
        print0(f"[aft] beta_from_spread ignored: mode {mode.name} has no boundary")
    result = train(
        cfg,
        dist,
        stage="aft",
        items=items,
        init_model=init_model,
        tokenizer=tokenizer,
        mode=mode,
        schedule=cfg.schedule("aft"),
        out_dir=cfg.stage_model_dir("aft"),
        layout=cfg.layout,
    )
    if spread is not None:
        result.metrics["train/score_spread"] = spread
    return result
