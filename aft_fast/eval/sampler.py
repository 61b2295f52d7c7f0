"""Where chains of thought come from: the `Sampler` seam of the sample stage and of evaluation.

Both ask one thing of a sampler: for each question, k chains (the decoded text after the prompt), under
one set of sampling parameters and a seed. `HFSampler` answers with the model's own Hugging Face
`generate` (aft_fast/eval/generation.py); `VLLMSampler` (aft_fast/eval/vllm_sampler.py) with a vLLM engine
in an environment of its own. The run config's `sampler` picks one for the sample stage and evaluation
alike (`make_sampler`, aft_fast/train/sample.py). Sharding over ranks stays with the caller
(`map_sharded`), so a sampler sees one batch of questions at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import nn
from transformers import PreTrainedTokenizerBase

from aft_fast.eval.generation import generate_chains

SAMPLERS = ("hf", "vllm")  # --sampler: HFSampler here, VLLMSampler in aft_fast/eval/vllm_sampler.py


@dataclass(frozen=True)
class SamplingParams:
    """k chains per question (num_return_sequences); greedy unless do_sample (temperature, top_p apply
    only then); at most max_new_tokens each."""

    num_return_sequences: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128


def batch_seed(seed: int, batch: int) -> int:
    """The seed of global batch `batch` of a run seeded `seed`: results do not depend on which rank, or
    how many, sample it."""
    return seed * 1_000_003 + batch


class Sampler(Protocol):
    def generate(
        self, questions: list[str], params: SamplingParams, *, seed: int | None = None
    ) -> list[list[str]]:
        """For each question, params.num_return_sequences chains (text after the prompt, no special
        tokens). seed: the batch's seed, so that results do not depend on the process count."""
        ...

    def close(self) -> None:
        """Free what the sampler holds (an engine, a worker process); the caller that made it calls this."""
        ...


class HFSampler:
    """The model's own Hugging Face `generate`, prompts left-padded into one batch."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase):
        self.model = model
        self.tokenizer = tokenizer

    def generate(
        self, questions: list[str], params: SamplingParams, *, seed: int | None = None
    ) -> list[list[str]]:
        return generate_chains(
            self.model,
            self.tokenizer,
            questions,
            num_return_sequences=params.num_return_sequences,
            do_sample=params.do_sample,
            temperature=params.temperature,
            top_p=params.top_p,
            max_new_tokens=params.max_new_tokens,
            seed=seed,
        )

    def close(self) -> None:
        """Nothing to free: the model is the caller's."""
