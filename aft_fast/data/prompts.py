"""Prompt formats: how a question becomes the token ids a chain follows, in every stage.

    plain  bos + "Question: <question>\\nAnswer:\\n" (the paper's template, `formats.prompt_text`)
    chat   the tokenizer's chat template with the question as the one user turn and the assistant's turn
           opened (`apply_chat_template(..., add_generation_prompt=True)`): what an instruct model expects

The format travels with the tokenizer: the pipeline loads one tokenizer and binds the run's
`--prompt_format` to it (`bind_prompt_format`), and every stage (VFT, sample, AFT, eval generation and
scoring) encodes prompts through `prompt_ids` with that same object, so no two stages can disagree. A
tokenizer nobody bound encodes plain prompts.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from aft_fast.data.formats import prompt_text

PROMPT_FORMATS = ("plain", "chat")
_ATTR = "aft_fast_prompt_format"  # where bind_prompt_format keeps the format on the tokenizer object


def check_prompt_format(tokenizer: PreTrainedTokenizerBase, prompt_format: str) -> None:
    """ValueError unless `prompt_format` is a known format that `tokenizer` can encode."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format: {prompt_format!r} is not one of {', '.join(PROMPT_FORMATS)}")
    if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"prompt_format chat: tokenizer {name} has no chat template (tokenizer.chat_template is unset: "
            "no chat_template in its tokenizer_config.json or chat_template.jinja); use --prompt_format "
            "plain, or a --tokenizer that has one"
        )


def bind_prompt_format(tokenizer: PreTrainedTokenizerBase, prompt_format: str) -> PreTrainedTokenizerBase:
    """Check `prompt_format` against `tokenizer` and make it the format every prompt of this tokenizer is
    encoded in. Returns the tokenizer."""
    check_prompt_format(tokenizer, prompt_format)
    setattr(tokenizer, _ATTR, prompt_format)
    return tokenizer


def prompt_format_of(tokenizer: PreTrainedTokenizerBase) -> str:
    """The format bound to `tokenizer` ("plain" when none was)."""
    return getattr(tokenizer, _ATTR, "plain")


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase, question: str, prompt_format: str | None = None
) -> list[int]:
    """The ids a chain follows: generation starts right after them, and scoring predicts a chain's first
    token from their last position. prompt_format None: the tokenizer's bound format."""
    fmt = prompt_format_of(tokenizer) if prompt_format is None else prompt_format
    if fmt == "plain":
        ids = tokenizer.encode(prompt_text(question), add_special_tokens=False)
        return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids
    check_prompt_format(tokenizer, fmt)
    # The template writes its own special tokens (bos, role markers); tokenizing adds none of its own.
    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(enc["input_ids"])
