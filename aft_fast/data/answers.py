"""Final-answer extraction and equivalence for numeric (GSM8K) and multiple-choice (AQuA, ECQA) tasks.

Labels in AFT come from here (a candidate is positive when its extracted answer matches the gold), so
extraction is strict about where the answer sits and lenient about how a number is written:

- numbers: the ``#### <number>`` line first (GSM8K's convention, and what every reference chain in this
  project ends with), else ``The answer is ...``, else the last number in the text. ``1,234`` == ``1234``,
  ``3.50`` == ``3.5``, ``3/4`` == ``0.75``; a sign, ``$`` and a trailing unit or period are allowed.
- options: a letter A-E written as ``#### C``, ``answer is C`` / ``Answer: (C)``, else the last ``(C)`` or
  ``C)``. A bare capital letter elsewhere is not taken: "A" is also an English word.
"""

from __future__ import annotations

import re
from fractions import Fraction

KINDS = ("number", "option")
OPTION_LETTERS = "ABCDE"

# A number as people write it: thousands groups ("1,234") only when well formed, so that a list such as
# "3,4" is two numbers, not 34. Fractions need digits on both sides of the slash.
_INT = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
_NUM = r"[-+\u2212]?\$?(?:" + _INT + r"(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+)?"
_NUMBER_RE = re.compile(r"(?<![\w.])(" + _NUM + r")")
_HASH_RE = re.compile(r"####\s*(.*)")
_ANSWER_IS_RE = re.compile(r"(?i:answer\s+is|answer\s*:)\s*:?\s*(.*)")

_OPT_HASH_RE = re.compile(r"####\s*\(?([A-E])\)?(?![A-Za-z])")
_OPT_ANSWER_RE = re.compile(
    r"(?i:answer)(?:\s+(?i:is))?\s*[:\-]?\s*(?:(?i:option)\s*)?\(?([A-E])\)?(?![A-Za-z])"
)
_OPT_PAREN_RE = re.compile(r"(?:\(([A-E])\)|(?<![A-Za-z(])([A-E])\))")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _numbers(text: str) -> list[str]:
    return [m.group(1) for m in _NUMBER_RE.finditer(text)]


def parse_number(text: str) -> Fraction | None:
    """The exact value of one written number ("1,234", "-3.50", "$18", "3/4"), or None."""
    s = text.strip().replace("\u2212", "-").replace(",", "").replace("$", "").replace(" ", "")
    s = s.rstrip(".")
    if not s:
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def format_number(value: Fraction) -> str:
    """Canonical text of a value: "7", "-2", "0.75", "1/3" (decimals when they terminate)."""
    if value.denominator == 1:
        return str(value.numerator)
    d = value.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d != 1:
        return f"{value.numerator}/{value.denominator}"
    # Terminating decimal: scale to an integer, then place the point.
    digits = 0
    scaled = value
    while scaled.denominator != 1:
        scaled *= 10
        digits += 1
    sign = "-" if scaled < 0 else ""
    s = str(abs(scaled.numerator)).rjust(digits + 1, "0")
    return f"{sign}{s[:-digits]}.{s[-digits:]}"


def _first_number(text: str) -> str | None:
    for raw in _numbers(text):
        value = parse_number(raw)
        if value is not None:
            return format_number(value)
    return None


def extract_answer(text: str, kind: str) -> str | None:
    """The final answer written in `text`, canonicalized ("1,234.50" -> "1234.5", "(C)" -> "C"), or None."""
    _check_kind(kind)
    if kind == "option":
        return _extract_option(text)
    # Search line by line from the end so that the last answer line wins when a model repeats itself.
    lines = text.splitlines()
    for pattern in (_HASH_RE, _ANSWER_IS_RE):
        for line in reversed(lines):
            m = pattern.search(line)
            if m:
                found = _first_number(m.group(1))
                if found is not None:
                    return found
    for raw in reversed(_numbers(text)):
        value = parse_number(raw)
        if value is not None:
            return format_number(value)
    return None


def _extract_option(text: str) -> str | None:
    for pattern in (_OPT_HASH_RE, _OPT_ANSWER_RE):
        matches = list(pattern.finditer(text))
        if matches:
            return matches[-1].group(1)
    matches = list(_OPT_PAREN_RE.finditer(text))
    if matches:
        m = matches[-1]
        return m.group(1) or m.group(2)
    return None


def normalize_answer(answer: str, kind: str) -> str | None:
    """Canonical form of a gold or predicted answer (for voting and equality), or None if unreadable."""
    _check_kind(kind)
    if kind == "option":
        s = answer.strip().strip("()").strip().upper()
        return s if len(s) == 1 and s in OPTION_LETTERS else None
    value = parse_number(answer)
    if value is None:
        # Allow a trailing unit on a gold string ("18 dollars"), never on a whole sentence.
        nums = _numbers(answer)
        value = parse_number(nums[0]) if len(nums) == 1 else None
    return None if value is None else format_number(value)


def answers_match(pred: str | None, gold: str, kind: str) -> bool:
    """Whether a predicted answer (from `extract_answer`) equals the gold answer: exact value for
    numbers ("3/4" == "0.75" == ".75"), same letter for options. None never matches."""
    _check_kind(kind)
    if pred is None:
        return False
    p, g = normalize_answer(pred, kind), normalize_answer(gold, kind)
    if p is None or g is None:
        return False
    if kind == "number":
        return parse_number(p) == parse_number(g)
    return p == g
