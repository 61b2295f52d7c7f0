"""Every test-set metric of one model (docs/design.md section 1), for any local Hugging Face causal LM:

- greedy accuracy;
- self-consistency (majority vote over k samples) and re-ranking (the sample with the highest score),
  with pass@k (some sample right) as their ceiling;
- assessment accuracy on the model's own k samples, and on a fixed candidate set when given (the fair
  comparison of several models: each scores the same chains);
- perplexity of the reference chains;
- on the embedded task (whose chains can be checked, `aft_fast.data.chains`): chain accuracy (greedy answer
  right and every step right), assessment accuracy under the verified rule, and assessment misalignment
  by form (the paper's pilot study: (right, wrong) pairs scored wrong-higher, split by whether the right
  chain has the reference's form), with the form mix of the samples.

A candidate's score (s_c, docs/design.md section 2) is the length-normalized log-likelihood of its chain
(eos included) after the prompt, computed by the fused `linear_logprob` (no [tokens x vocab] logits), on
exactly the tokens AFT's collation trains on. Definitions of the metrics: `aft_fast.eval.metrics`.

Generation (any `Sampler`, aft_fast/eval/sampler.py) and scoring are batched and sharded across ranks
(`map_sharded`); every rank gets the full result, rank 0 writes it. Sampling is seeded per batch, so
results do not depend on the process count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from aft_fast.data.answers import answers_match, extract_answer
from aft_fast.data.candidates import CandidateGroup, label_candidates, write_candidates
from aft_fast.data.chains import FORMS, check_chain, checker_of, is_checkable
from aft_fast.data.collate import collate, encode_group
from aft_fast.data.formats import Example
from aft_fast.eval import metrics
from aft_fast.eval.generation import map_sharded
from aft_fast.eval.sampler import HFSampler, Sampler, SamplingParams, batch_seed
from aft_fast.models.forward import segment_logprobs


@dataclass
class Scored:
    """One group scored by a model: per-candidate scores (length-normalized log-likelihood) and the
    reference chain's summed NLL and token count (0 tokens: no reference scored); `sums`, the candidates'
    summed log-likelihood (what sampling stores as the DPO reference's ref_logp)."""

    scores: list[float]
    ref_nll: float = 0.0
    ref_tokens: int = 0
    sums: list[float] = field(default_factory=list)


@torch.no_grad()
def score_groups(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    groups: list[CandidateGroup],
    *,
    max_length: int = 256,
    batch_size: int = 32,
    with_reference: bool = True,
    progress: bool = True,
    desc: str = "score",
) -> list[Scored]:
    """Score every candidate (and, with_reference, the reference chain) of each group; collective when
    distributed. Chains longer than max_length are cut as in training."""
    device = model.get_output_embeddings().weight.device

    def score(_: int, batch: list[CandidateGroup]) -> list[Scored]:
        items = [encode_group(g, tokenizer, with_reference=with_reference) for g in batch]
        keep = [i for i, item in enumerate(items) if item.members]
        out = [Scored([]) for _ in batch]
        if not keep:
            return out
        b = collate([items[i] for i in keep], pad_id=tokenizer.pad_token_id, max_length=max_length)
        b = b.to(device)
        sums = segment_logprobs(model, b).tolist()
        counts = torch.bincount(b.segments, minlength=b.num_segments).tolist()
        for s, (g, is_ref) in enumerate(zip(b.group.tolist(), b.is_reference.tolist(), strict=True)):
            rec = out[keep[g]]
            if is_ref:
                rec.ref_nll, rec.ref_tokens = -sums[s], counts[s]
            else:
                rec.scores.append(sums[s] / counts[s])
                rec.sums.append(sums[s])
        return out

    return map_sharded(groups, batch_size, score, desc=desc, progress=progress)


def assessment(groups: list[CandidateGroup], scored: list[Scored]) -> metrics.Assessment:
    return metrics.assessment_accuracy((s.scores, g.labels()) for g, s in zip(groups, scored, strict=True))


def split_scores(groups: list[CandidateGroup], scored: list[Scored]) -> tuple[list[float], list[float]]:
    """(scores of positives, scores of negatives) over the questions that have both (the ones assessment
    accuracy counts), for the distribution plot. Ranked groups: top rank vs the rest."""
    pos: list[float] = []
    neg: list[float] = []
    for g, s in zip(groups, scored, strict=True):
        labels = g.labels()
        if labels and max(labels) > min(labels):
            top = max(labels)
            for score, label in zip(s.scores, labels, strict=True):
                (pos if label == top else neg).append(score)
    return pos, neg


def checkable(groups: list[CandidateGroup]) -> bool:
    """Whether every group's chains can be checked step by step (the embedded task, GSM8K-style data)."""
    return bool(groups) and all(is_checkable(g.question) for g in groups)


def has_forms(groups: list[CandidateGroup]) -> bool:
    """Whether every group is an embedded-task question, whose chains follow one of its solution forms."""
    return bool(groups) and all(checker_of(g.question) == "forms" for g in groups)


def reference_form(group: CandidateGroup) -> str | None:
    """The form of the group's reference chain (None: no reference, or not recognised)."""
    if group.reference is None or not is_checkable(group.question):
        return None
    return check_chain(group.question, group.reference).form


def chain_info(group: CandidateGroup) -> list[tuple[bool, bool | None, str | None]]:
    """(answer right, chain ok, form) per candidate: the stored fields, else computed (older files)."""
    out: list[tuple[bool, bool | None, str | None]] = []
    ok = is_checkable(group.question)
    for c in group.candidates:
        if c.answer_correct is not None and (c.chain_ok is not None or not ok):
            out.append((c.answer_correct, c.chain_ok, c.form))
            continue
        right = answers_match(extract_answer(c.text, group.kind), group.gold, group.kind)
        check = check_chain(group.question, c.text) if ok else None
        out.append((right, None if check is None else check.ok, None if check is None else check.form))
    return out


def form_assessment(groups: list[CandidateGroup], scored: list[Scored]) -> dict[str, Any]:
    """Assessment under the verified rule where chains can be checked, and assessment misalignment by form
    on the embedded task (keys without the "eval/" prefix); empty where chains cannot be checked."""
    if not checkable(groups):
        return {}
    forms = has_forms(groups)
    infos = [chain_info(g) for g in groups]
    refs = [reference_form(g) for g in groups]
    out: dict[str, Any] = {}
    for suffix, label in (("", lambda a, ok: a), ("_verified", lambda a, ok: a and bool(ok))):
        labels = [[int(label(a, ok)) for a, ok, _ in info] for info in infos]
        if forms:
            m = metrics.misranking_by_form(
                (s.scores, lab, [f for _, _, f in info], ref)
                for s, lab, info, ref in zip(scored, labels, infos, refs, strict=True)
            )
            out.update(
                {
                    f"misranked_same_form{suffix}": m.same_form,
                    f"misranked_other_form{suffix}": m.other_form,
                    f"misranked_same_form_pairs{suffix}": m.same_pairs,
                    f"misranked_other_form_pairs{suffix}": m.other_pairs,
                }
            )
        if suffix:
            a = metrics.assessment_accuracy((s.scores, lab) for s, lab in zip(scored, labels, strict=True))
            out.update({"assess_acc_verified": a.accuracy, "assess_pairs_verified": a.pairs})
    if forms:
        shares = metrics.form_shares((f for info in infos for _, _, f in info), FORMS)
        out.update({f"sample_form_{k}": v for k, v in shares.items()})
    return out


def form_scores(
    groups: list[CandidateGroup], scored: list[Scored]
) -> list[tuple[float, bool, str | None, bool]]:
    """(score, answer right, form, same form as the reference) per candidate, for the by-form histogram;
    empty unless every group is an embedded-task question."""
    if not has_forms(groups):
        return []
    out = []
    for g, s in zip(groups, scored, strict=True):
        ref = reference_form(g)
        for score, (right, _, form) in zip(s.scores, chain_info(g), strict=True):
            out.append((score, right, form, form is not None and form == ref))
    return out


@dataclass
class Evaluation:
    summary: dict[str, Any]  # eval/* metrics and counts (None where undefined)
    records: list[dict[str, Any]]  # one per test question
    groups: list[CandidateGroup]  # the model's own samples, labelled and de-duplicated
    scored: list[Scored]
    fixed_groups: list[CandidateGroup] | None = None
    fixed_scored: list[Scored] | None = None
    fixed_records: list[dict[str, Any]] = field(default_factory=list)


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    *,
    samples: int = 6,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
    batch_size: int = 32,
    max_length: int = 256,
    seed: int = 0,
    fixed: list[CandidateGroup] | None = None,
    progress: bool = True,
    sampler: Sampler | None = None,
) -> Evaluation:
    """All metrics of `model` on `examples` (collective when distributed). samples=0 skips sampling:
    greedy accuracy and perplexity only (and the fixed set's assessment accuracy when given). sampler:
    where the chains come from (default: `model`'s own `generate`); `model` scores them."""
    params = SamplingParams(
        num_return_sequences=samples,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
    )
    outputs = greedy_and_sampled(
        sampler or HFSampler(model, tokenizer),
        examples,
        params,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    groups = [
        label_candidates(CandidateGroup.from_example(e), texts)
        for e, (_, texts) in zip(examples, outputs, strict=True)
    ]
    scored = score_groups(
        model, tokenizer, groups, max_length=max_length, batch_size=batch_size, progress=progress
    )
    chains = checkable(groups)
    records = [
        _record(e, greedy, texts, g, s, chains)
        for e, (greedy, texts), g, s in zip(examples, outputs, groups, scored, strict=True)
    ]
    result = Evaluation(_summary(records, groups, scored, samples, chains), records, groups, scored)
    if fixed is not None:
        _score_fixed(
            model, tokenizer, fixed, result, max_length=max_length, batch_size=batch_size, progress=progress
        )
    return result


def greedy_and_sampled(
    sampler: Sampler,
    examples: list[Example],
    params: SamplingParams,
    *,
    batch_size: int,
    seed: int,
    progress: bool,
) -> list[tuple[str, list[str]]]:
    """Each question's greedy chain and, when params.num_return_sequences > 0, that many sampled chains;
    batches sharded over ranks, batch i sampled with `batch_seed(seed, i)`."""
    greedy = SamplingParams(max_new_tokens=params.max_new_tokens)

    def generate(i: int, batch: list[Example]) -> list[tuple[str, list[str]]]:
        questions = [e.question for e in batch]
        first = sampler.generate(questions, greedy)
        sampled: list[list[str]] = [[] for _ in batch]
        if params.num_return_sequences:
            sampled = sampler.generate(questions, params, seed=batch_seed(seed, i))
        return [(g[0], s) for g, s in zip(first, sampled, strict=True)]

    return map_sharded(examples, batch_size, generate, desc="eval", progress=progress)


def _record(
    e: Example, greedy: str, texts: list[str], g: CandidateGroup, s: Scored, chains: bool
) -> dict[str, Any]:
    """One test question's record: its greedy answer (and chain check), the vote and the re-ranked pick
    over its samples, and each candidate with its score."""
    pred = extract_answer(greedy, e.kind)
    greedy_check = check_chain(e.question, greedy) if chains else None
    votes = [extract_answer(t, e.kind) for t in texts]
    answers = [extract_answer(c.text, e.kind) for c in g.candidates]
    vote, top = metrics.majority_vote(votes), metrics.rerank(s.scores, answers)
    wins, pairs = metrics.pair_wins(s.scores, g.labels())
    return {
        "id": e.id,
        "gold": e.gold,
        "pred": pred,
        "correct": answers_match(pred, e.gold, e.kind),
        "chain_ok": greedy_check and greedy_check.ok,
        "form": greedy_check and greedy_check.form,
        "reference_form": reference_form(g) if chains else None,
        "output": greedy,
        "votes": votes,
        "vote": vote,
        "vote_correct": answers_match(vote, e.gold, e.kind),
        "rerank": top,
        "rerank_correct": answers_match(top, e.gold, e.kind),
        "pass_at_k": any(c.correct for c in g.candidates),
        "pairs": pairs,
        "pair_wins": wins,
        "ref_nll": s.ref_nll,
        "ref_tokens": s.ref_tokens,
        "candidates": [
            {
                "text": c.text,
                "pred": a,
                "correct": c.correct,
                "chain_ok": c.chain_ok,
                "form": c.form,
                "score": sc,
            }
            for c, a, sc in zip(g.candidates, answers, s.scores, strict=True)
        ],
    }


def _summary(
    records: list[dict[str, Any]],
    groups: list[CandidateGroup],
    scored: list[Scored],
    samples: int,
    chains: bool,
) -> dict[str, Any]:
    """The eval/* metrics over the records and the scored samples."""
    n = len(records)
    own = assessment(groups, scored)
    pos, neg = split_scores(groups, scored)
    summary: dict[str, Any] = {
        "questions": n,
        "samples": samples,
        "eval/accuracy": metrics.mean_or_none(r["correct"] for r in records),
        # Greedy answer right and every step right (embedded task only; None elsewhere).
        "eval/chain_accuracy": (
            metrics.mean_or_none(r["correct"] and bool(r["chain_ok"]) for r in records) if chains else None
        ),
        "eval/perplexity": metrics.perplexity([s.ref_nll for s in scored], [s.ref_tokens for s in scored]),
    }
    if samples:
        summary.update(
            {
                "eval/self_consistency": metrics.mean_or_none(r["vote_correct"] for r in records),
                "eval/rerank_accuracy": metrics.mean_or_none(r["rerank_correct"] for r in records),
                "eval/pass_at_k": metrics.mean_or_none(r["pass_at_k"] for r in records),
                "eval/assess_acc": own.accuracy,
                "eval/assess_pairs": own.pairs,
                "eval/assess_questions": own.questions,
                "eval/pos_score": metrics.mean_or_none(pos),
                "eval/neg_score": metrics.mean_or_none(neg),
            }
        )
        summary.update({f"eval/{k}": v for k, v in form_assessment(groups, scored).items()})
    return summary


def _score_fixed(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    fixed: list[CandidateGroup],
    result: Evaluation,
    *,
    max_length: int,
    batch_size: int,
    progress: bool,
) -> None:
    """Assessment on the fixed candidate set, each chain scored by `model`: into result (summary, groups,
    scores, records)."""
    fixed_scored = score_groups(
        model,
        tokenizer,
        fixed,
        max_length=max_length,
        batch_size=batch_size,
        with_reference=False,
        progress=progress,
        desc="score fixed",
    )
    a = assessment(fixed, fixed_scored)
    fpos, fneg = split_scores(fixed, fixed_scored)
    # Re-ranking on the fixed set: the chain this model scores highest has the right answer (every model
    # judges the same chains, unlike eval/rerank_accuracy over its own samples).
    top_right = []
    for g, s in zip(fixed, fixed_scored, strict=True):
        if s.scores:
            top = g.candidates[s.scores.index(max(s.scores))]  # the first on equal scores, as metrics.rerank
            top_right.append(bool(top.correct if top.answer_correct is None else top.answer_correct))
    result.summary.update(
        {
            "eval/fixed_rerank_accuracy": metrics.mean_or_none(top_right),
            "eval/fixed_assess_acc": a.accuracy,
            "eval/fixed_assess_pairs": a.pairs,
            "eval/fixed_assess_questions": a.questions,
            "eval/fixed_pos_score": metrics.mean_or_none(fpos),
            "eval/fixed_neg_score": metrics.mean_or_none(fneg),
        }
    )
    result.summary.update({f"eval/fixed_{k}": v for k, v in form_assessment(fixed, fixed_scored).items()})
    result.fixed_groups, result.fixed_scored = fixed, fixed_scored
    result.fixed_records = [
        {"id": g.id, "labels": g.labels(), "scores": s.scores}
        for g, s in zip(fixed, fixed_scored, strict=True)
    ]


def write_results(out_dir: str | Path, name: str, result: Evaluation, **meta: Any) -> dict[str, Path]:
    """Rank 0: predictions_<name>.jsonl (one record per question), eval_<name>.json (the summary and
    `meta`), test_candidates_<name>.jsonl (the model's own labelled samples, reusable as a fixed set), and
    fixed_scores_<name>.jsonl when a fixed set was scored."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "predictions": out_dir / f"predictions_{name}.jsonl",
        "summary": out_dir / f"eval_{name}.json",
        "candidates": out_dir / f"test_candidates_{name}.jsonl",
    }
    with paths["predictions"].open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in result.records)
    paths["summary"].write_text(json.dumps({**meta, **result.summary}, indent=1, default=str) + "\n")
    if any(g.candidates for g in result.groups):
        write_candidates(paths["candidates"], result.groups)
    else:
        del paths["candidates"]
    if result.fixed_records:
        paths["fixed_scores"] = out_dir / f"fixed_scores_{name}.jsonl"
        with paths["fixed_scores"].open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in result.fixed_records)
    return paths


def summary_line(summary: dict[str, Any]) -> str:
    """One line for the pipeline's table: the metrics that are defined, in percent."""

    def pct(key: str) -> str:
        v = summary.get(key)
        return "n/a" if v is None else f"{100 * v:.1f}%"

    n = summary["questions"]
    right = round((summary.get("eval/accuracy") or 0.0) * n)
    parts = [f"greedy accuracy {pct('eval/accuracy')} ({right}/{n})"]
    if summary.get("eval/chain_accuracy") is not None:
        parts.append(f"chain accuracy {pct('eval/chain_accuracy')}")
    if summary.get("samples"):
        k = summary["samples"]
        parts += [
            f"maj@{k} {pct('eval/self_consistency')}",
            f"re-rank@{k} {pct('eval/rerank_accuracy')}",
            f"pass@{k} {pct('eval/pass_at_k')}",
            f"assessment {pct('eval/assess_acc')} ({summary.get('eval/assess_pairs', 0)} pairs)",
        ]
        if "eval/misranked_other_form" in summary:
            parts.append(
                f"misranked same form {pct('eval/misranked_same_form')} / other form "
                f"{pct('eval/misranked_other_form')}"
            )
    if "eval/fixed_assess_acc" in summary:
        pairs = summary["eval/fixed_assess_pairs"]
        parts.append(f"fixed-set assessment {pct('eval/fixed_assess_acc')} ({pairs} pairs)")
    ppl = summary.get("eval/perplexity")
    parts.append(f"reference perplexity {ppl:.3f}" if ppl is not None else "reference perplexity n/a")
    return ", ".join(parts)
