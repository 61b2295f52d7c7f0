"""Data: task formats, answer checking, candidate files, the embedded synthetic task and its tokenizer.

Importing this package is cheap (standard library only); `train_tokenizer` pulls in `transformers` on
first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aft_fast.data.answers import answers_match, extract_answer, normalize_answer
from aft_fast.data.candidates import (
    Candidate,
    CandidateGroup,
    label_candidates,
    read_candidates,
    write_candidates,
)
from aft_fast.data.formats import DataError, Example, prompt_text, read_examples, write_gsm8k
from aft_fast.data.synthetic import generate_problems, write_default_task

if TYPE_CHECKING:
    from aft_fast.data.tokenizer import train_tokenizer

__all__ = [
    "extract_answer",
    "answers_match",
    "normalize_answer",
    "DataError",
    "Example",
    "read_examples",
    "prompt_text",
    "write_gsm8k",
    "Candidate",
    "CandidateGroup",
    "read_candidates",
    "write_candidates",
    "label_candidates",
    "generate_problems",
    "write_default_task",
    "train_tokenizer",
]


def __getattr__(name: str) -> Any:
    if name == "train_tokenizer":  # lazy: transformers takes seconds to import
        from aft_fast.data.tokenizer import train_tokenizer

        return train_tokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
