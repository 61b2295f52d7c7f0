"""Greedy accuracy alone on a test split: batched generation sharded across ranks, answers checked against
gold. `aft_fast.eval.evaluate` computes it together with every other metric (what the eval stage runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from transformers import PreTrainedTokenizerBase

from aft_fast.data.answers import answers_match, extract_answer
from aft_fast.data.formats import Example
from aft_fast.eval.generation import generate_chains, map_sharded


@dataclass
class AccuracyResult:
    accuracy: float
    correct: int
    total: int
    predictions: list[dict] = field(default_factory=list)  # {"id", "gold", "pred", "correct", "output"}


def greedy_accuracy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 128,
    progress: bool = True,
) -> AccuracyResult:
    """Collective when distributed: each rank decodes its share; every rank returns the full result."""

    def decode(_: int, batch: list[Example]) -> list[str]:
        chains = generate_chains(model, tokenizer, [e.question for e in batch], max_new_tokens=max_new_tokens)
        return [c[0] for c in chains]

    outputs = map_sharded(examples, batch_size, decode, desc="eval", progress=progress)
    predictions = []
    for ex, text in zip(examples, outputs, strict=True):
        pred = extract_answer(text, ex.kind)
        predictions.append(
            {
                "id": ex.id,
                "gold": ex.gold,
                "pred": pred,
                "correct": answers_match(pred, ex.gold, ex.kind),
                "output": text,
            }
        )
    correct = sum(p["correct"] for p in predictions)
    return AccuracyResult(correct / max(len(examples), 1), correct, len(examples), predictions)
