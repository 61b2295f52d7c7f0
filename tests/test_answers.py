"""Answer extraction and equivalence, on real-format samples and hand-written cases."""

from __future__ import annotations

import json
import random
from fractions import Fraction
from pathlib import Path

import pytest

from aft_fast.data.answers import answers_match, extract_answer, normalize_answer

DATA = Path(__file__).parent / "data"


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def test_gsm8k_answers_extract_the_hash_line():
    rows = _jsonl("gsm8k_sample.jsonl")
    assert len(rows) == 4
    for row in rows:
        # Gold by hand: the text after "####" on the last line, commas dropped.
        gold = row["answer"].splitlines()[-1].split("####")[1].strip().replace(",", "")
        pred = extract_answer(row["answer"], "number")
        assert pred is not None and Fraction(pred) == Fraction(gold)
        assert answers_match(pred, gold, "number")


def test_aqua_rationales_extract_the_correct_letter():
    # The rationales end "The answer is E.", "ANSWER:A", "Answer: Option C": three published styles.
    for row in _jsonl("aqua_sample.json"):
        assert extract_answer(row["rationale"], "option") == row["correct"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("#### $1,000.00", "1000"),
        ("#### -3", "-3"),
        ("#### 3.50", "3.5"),
        ("#### 3/4", "0.75"),
        ("#### 1/3", "1/3"),
        ("So she has 18 dollars left. The answer is 18 dollars.", "18"),
        ("The answer is 7.", "7"),
        ("the answer is: 12", "12"),
        ("Answer: 12 apples", "12"),
        ("First 3 + 4 = 7, then 7 - 2 = 5.", "5"),  # no marker: last number
        ("He has .75 of a pie", "0.75"),
        ("The speed was 50%", "50"),
        ("#### 9\nextra text 44", "9"),  # the hash line beats a later number
        ("The answer is 5.\nThe answer is 6.", "6"),  # the last marker wins
        ("#### \nso it is 8", "8"),  # an empty hash line falls through
        ("she counts 3,4 and 5 eggs", "5"),  # "3,4" is a list, not 34
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_number(text, expected):
    assert extract_answer(text, "number") == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("x = 1 hr.\nANSWER:A", "A"),
        ("Answer is B", "B"),
        ("Answer: Option C", "C"),
        ("So the answer is (D).", "D"),
        ("#### E", "E"),
        ("#### (B)", "B"),
        ("I pick C) since it is larger", "C"),
        ("(A) is wrong, (B) is right", "B"),  # last parenthesized letter
        ("the answer is a car", None),  # "a" is a word, not an option
        ("A dog barks. Answer: Apples", None),
        ("ABC) is not an option marker", None),
        ("nothing here", None),
    ],
)
def test_extract_option(text, expected):
    assert extract_answer(text, "option") == expected


@pytest.mark.parametrize(
    "pred, gold, kind, expected",
    [
        ("1,234", "1234", "number", True),
        ("3.50", "3.5", "number", True),
        ("3/4", "0.75", "number", True),
        ("0.333", "1/3", "number", False),
        ("-2", "2", "number", False),
        ("+2", "2", "number", True),
        ("$18", "18", "number", True),
        ("18.", "18", "number", True),
        ("18", "18 dollars", "number", True),
        (None, "5", "number", False),
        ("five", "5", "number", False),
        ("C", "C", "option", True),
        ("(C)", "C", "option", True),
        ("c", "C", "option", True),
        ("B", "C", "option", False),
        ("F", "F", "option", False),  # not an option letter
        (None, "C", "option", False),
    ],
)
def test_answers_match(pred, gold, kind, expected):
    assert answers_match(pred, gold, kind) is expected


def test_number_spellings_match_their_value():
    # Random values written in the ways people write them must equal the value's plain spelling.
    rng = random.Random(0)
    for _ in range(300):
        cents = rng.randint(-(10**8), 10**8)
        value = Fraction(cents, 100)
        whole, frac = divmod(abs(cents), 100)
        sign = "-" if cents < 0 else ""
        spellings = [
            f"{sign}{whole:,}.{frac:02d}",
            f"{sign}{whole}.{frac:02d}0",
            f"{sign}${whole:,}.{frac:02d}",
        ]
        plain = f"{sign}{whole}.{frac:02d}"
        for s in spellings:
            pred = extract_answer(f"so the total is\n#### {s} dollars.", "number")
            assert answers_match(pred, plain, "number"), (s, pred)
            assert Fraction(pred) == value
        # A value one cent off must not match.
        assert not answers_match(
            extract_answer(f"#### {spellings[0]}", "number"), str(value + Fraction(1, 100)), "number"
        )


def test_normalize_answer_is_canonical():
    assert normalize_answer("1,234.50", "number") == normalize_answer("1234.5", "number") == "1234.5"
    assert normalize_answer("6/8", "number") == "0.75"
    assert normalize_answer("(b)", "option") == "B"
    assert normalize_answer("banana", "option") is None


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="kind"):
        extract_answer("#### 3", "numeric")
    with pytest.raises(ValueError, match="kind"):
        answers_match("3", "3", "letter")
