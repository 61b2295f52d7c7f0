"""Evaluation metrics as pure functions on plain Python values (no model): the eval loop and the
reproduction script compute them, tests check them on hand-made cases. Pairs are the loss's own
(`aft_fast.options.candidate_pairs`, label_i > label_j), so assessment accuracy counts what L_align ranks.

Conventions (docs/usage.md's "Evaluation" section repeats them):

- answers are canonical strings from `aft_fast.data.answers.extract_answer` (or None: nothing readable).
  None never wins a vote and never matches the gold.
- self-consistency: majority vote over the k sampled answers (duplicates are votes). A tie goes to the
  answer sampled first among the tied ones: the samples are i.i.d., so this is a fair coin in expectation
  and it is deterministic. No readable answer at all: the vote is None (wrong).
- re-ranking: the candidate with the highest score wins; equal scores go to the earlier candidate.
- assessment accuracy: over questions whose candidates have at least one pair (i, j) with
  label_i > label_j (binary labels: a positive and a negative), the fraction of all such pairs, pooled
  over questions, where score_i > score_j. A tie counts one half, so a model that scores everything
  alike sits at 0.5 (chance), as in the Mann-Whitney/AUC statistic. Questions with only positives or only
  negatives have no pair and do not count. No pair anywhere: None (undefined), never 0.
- perplexity of reference chains: exp(total NLL / total tokens), the token mean over all chains together
  (the way L_vft averages), not a mean of per-chain perplexities.
- assessment misalignment by form (the paper's pilot study, where a task has several solution strategies):
  over the (right, wrong) candidate pairs of each question, the fraction scored wrong-higher (a tie counts
  one half, so 1 - assessment accuracy on those pairs), split by whether the right chain follows the
  reference's form ("same form") or another ("other form", unrecognised chains included). A model that
  credits only the reference's strategy misranks more often in the other-form split.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from aft_fast.options import candidate_pairs


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent non-None answer; ties go to the one that occurs first. None if none is readable."""
    counts: dict[str, int] = {}
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1  # dicts keep first-occurrence order
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a, c in counts.items() if c == best)


def rerank(scores: Sequence[float], answers: Sequence[str | None]) -> str | None:
    """The answer of the highest-scoring candidate (the first on equal scores); None for no candidate."""
    if len(scores) != len(answers):
        raise ValueError(f"rerank: {len(scores)} scores for {len(answers)} answers")
    if not scores:
        return None
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return answers[best]


def pair_wins(scores: Sequence[float], labels: Sequence[int | bool]) -> tuple[float, int]:
    """(wins, pairs) over the pairs (i, j) with labels[i] > labels[j]: a win when scores[i] > scores[j],
    half a win on a tie. Labels are 1/0 (binary) or ranks (higher is better)."""
    if len(scores) != len(labels):
        raise ValueError(f"pair_wins: {len(scores)} scores for {len(labels)} labels")
    n = len(labels)
    pair_i, pair_j = candidate_pairs(
        torch.zeros(n, dtype=torch.int64),  # one group
        torch.tensor([float(lab) for lab in labels], dtype=torch.float64),
        torch.zeros(n, dtype=torch.bool),  # all candidates
    )
    wins = 0.0
    for i, j in zip(pair_i.tolist(), pair_j.tolist(), strict=True):
        wins += 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
    return wins, len(pair_i)


@dataclass
class Assessment:
    accuracy: float | None  # pooled wins / pairs; None when no question has a pair
    wins: float
    pairs: int
    questions: int  # questions with at least one pair


def assessment_accuracy(groups: Iterable[tuple[Sequence[float], Sequence[int | bool]]]) -> Assessment:
    """Pooled pair accuracy over (scores, labels) groups, one per question (see the module docstring)."""
    wins, pairs, questions = 0.0, 0, 0
    for scores, labels in groups:
        w, p = pair_wins(scores, labels)
        if p:
            wins, pairs, questions = wins + w, pairs + p, questions + 1
    return Assessment(wins / pairs if pairs else None, wins, pairs, questions)


def perplexity(nll_sums: Sequence[float], token_counts: Sequence[int]) -> float | None:
    """exp(sum of NLLs / sum of token counts); None when there is no token."""
    if len(nll_sums) != len(token_counts):
        raise ValueError(f"perplexity: {len(nll_sums)} sums for {len(token_counts)} counts")
    tokens = sum(token_counts)
    if tokens <= 0:
        return None
    return math.exp(sum(nll_sums) / tokens)


def mean_or_none(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


@dataclass
class Spread:
    mean: float
    std: float  # sample standard deviation (n - 1); 0 for one value
    min: float
    max: float
    n: int


def spread(values: Sequence[float]) -> Spread:
    """Mean, sample standard deviation and range over seeds."""
    if not values:
        raise ValueError("spread: no values")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Spread(statistics.fmean(values), std, min(values), max(values), len(values))


@dataclass
class FormMisranking:
    same_form: float | None  # misranked fraction of the pairs whose right chain has the reference's form
    other_form: float | None  # ... whose right chain has another form (or none recognised)
    same_pairs: int
    other_pairs: int


def misranking_by_form(
    groups: Iterable[tuple[Sequence[float], Sequence[int | bool], Sequence[str | None], str | None]],
) -> FormMisranking:
    """groups: (scores, binary labels, each candidate's form, the reference's form) per question. Questions
    whose reference form is None (not recognised, or no reference) do not count."""
    mis = {True: 0.0, False: 0.0}
    pairs = {True: 0, False: 0}
    for scores, labels, forms, ref_form in groups:
        if not len(scores) == len(labels) == len(forms):
            raise ValueError(
                f"misranking_by_form: {len(scores)} scores, {len(labels)} labels, {len(forms)} forms"
            )
        if ref_form is None:
            continue
        for si, li, fi in zip(scores, labels, forms, strict=True):
            if not li:
                continue
            same = fi == ref_form
            for sj, lj in zip(scores, labels, strict=True):
                if not lj:
                    pairs[same] += 1
                    mis[same] += 1.0 if sj > si else 0.5 if sj == si else 0.0
    return FormMisranking(
        mis[True] / pairs[True] if pairs[True] else None,
        mis[False] / pairs[False] if pairs[False] else None,
        pairs[True],
        pairs[False],
    )


def form_shares(forms: Iterable[str | None], names: Sequence[str]) -> dict[str, float]:
    """The share of each form name (and "unrecognised" for None) among `forms`; empty for no form."""
    forms = list(forms)
    if not forms:
        return {}
    keys = [*names, "unrecognised"]
    counts = dict.fromkeys(keys, 0)
    for f in forms:
        counts["unrecognised" if f is None else f] += 1
    return {k: counts[k] / len(forms) for k in keys}
