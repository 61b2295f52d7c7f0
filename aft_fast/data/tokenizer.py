"""A small byte-level BPE tokenizer for the embedded default model, trained on the bundled data.

Every digit is its own token (pre-tokenizer ``Digits(individual_digits=True)`` before ``ByteLevel``), as in
Llama and most math-capable tokenizers: arithmetic then works on a fixed 10-symbol alphabet instead of a
zoo of merged number pieces, which a 2M-parameter model could not learn in a few hundred steps.

Special tokens: ``<pad>`` = 0, ``<s>`` (bos) = 1, ``</s>`` (eos) = 2. Encoding adds none of them (no
post-processor), so ``encode(prompt) + encode(chain)`` are plain text ids; the caller places bos/eos.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2 in this order
MAX_LENGTH = 2048


def train_tokenizer(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = 384
) -> PreTrainedTokenizerFast:
    """Train the BPE on `texts`, save it as a Hugging Face tokenizer folder in `out_dir`
    (``AutoTokenizer.from_pretrained(out_dir)`` loads it) and return it.

    `vocab_size` counts the 256 byte symbols and the 3 special tokens; training stops early (a slightly
    smaller vocabulary) when no pair occurs twice, as on tiny corpora."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must be at least {len(alphabet) + len(SPECIAL_TOKENS)}, got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,  # all 256 bytes, so any text encodes (no unknown token needed)
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=MAX_LENGTH,
        clean_up_tokenization_spaces=False,  # would turn "3 ." into "3." and break exact round trips
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast
