"""The default tokenizer: digits split, exact round trips, special tokens, loads with AutoTokenizer."""

from __future__ import annotations

import pytest

from aft_fast.data.formats import prompt_text, read_examples
from aft_fast.data.synthetic import generate_problems
from aft_fast.data.tokenizer import train_tokenizer

from .test_formats import DATA


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    problems = generate_problems(2000, seed=0)
    out = tmp_path_factory.mktemp("tok")
    tok = train_tokenizer((prompt_text(p.question) + p.reference for p in problems), out)
    return tok, out, problems


def test_every_digit_is_its_own_token(trained):
    tok, _, _ = trained
    # No vocabulary entry mixes a digit with anything else (byte-level: digits map to themselves).
    for piece in tok.get_vocab():
        if any(c.isdigit() for c in piece):
            assert len(piece) == 1, piece
    for text in ("12345", "Tom has 907 pens.", "#### 1024", "x=3.75, y=1,000"):
        pieces = tok.convert_ids_to_tokens(tok.encode(text, add_special_tokens=False))
        digits = [p for p in pieces if any(c.isdigit() for c in p)]
        assert digits == [c for c in text if c.isdigit()]


def test_round_trip(trained):
    tok, _, problems = trained
    texts = [prompt_text(p.question) + p.reference for p in problems[:50]]
    texts += [ex.reference for ex in read_examples(DATA / "gsm8k_sample.jsonl")]
    texts += ["café – ½ 😀\ttabs  and   spaces \n\n", "3 . 4 , don't", ""]
    for text in texts:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_special_tokens_and_no_implicit_specials(trained):
    tok, _, problems = trained
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    ids = tok.encode(problems[0].reference)
    assert not {0, 1, 2} & set(ids)  # encoding adds no bos/eos; the caller places them
    assert tok.decode([1, *ids, 2], skip_special_tokens=True) == problems[0].reference
    assert 259 < len(tok) <= 384
    text = prompt_text(problems[0].question) + problems[0].reference
    assert len(tok.encode(text)) < len(text) / 2  # the merges do compress the task's language


def test_prompt_and_chain_tokenize_separately(trained):
    # The trainer tokenizes the prompt once and each chain on its own; the ids must equal joint tokenization.
    tok, _, problems = trained
    for p in problems[:100]:
        prompt, chain = prompt_text(p.question), p.reference
        joint = tok.encode(prompt + chain, add_special_tokens=False)
        assert joint == tok.encode(prompt, add_special_tokens=False) + tok.encode(
            chain, add_special_tokens=False
        )


def test_loads_with_autotokenizer(trained):
    from transformers import AutoTokenizer

    tok, out, problems = trained
    loaded = AutoTokenizer.from_pretrained(out)
    text = prompt_text(problems[1].question) + problems[1].reference
    assert loaded.encode(text) == tok.encode(text)
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert loaded.decode(loaded.encode(text)) == text
    assert len(loaded) == len(tok)


def test_deterministic_and_compact(tmp_path):
    texts = [prompt_text(p.question) + p.reference for p in generate_problems(300, seed=1)]
    a = train_tokenizer(texts, tmp_path / "a", vocab_size=300)
    b = train_tokenizer(texts, tmp_path / "b", vocab_size=300)
    assert a.get_vocab() == b.get_vocab() and len(a) <= 300
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(texts, tmp_path / "c", vocab_size=100)
