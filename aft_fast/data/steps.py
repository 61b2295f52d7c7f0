"""The step checker for GSM8K-style chains: is every arithmetic statement of a chain true?

A GSM8K chain states its arithmetic inline, in prose: ``Natalia sold 48/2 = <<48/2=24>>24 clips in May.``,
``15 girls x 3 boys/girl = 45 boys``, ``$360,000 x 6/100 = $21,600``, ``400 / 1600 * 100% = 25%``. The
checker reads each ``left = right`` it finds and evaluates both sides exactly (fractions, no floats):

- numbers: ``1,234``, ``3.5``, ``.5``, ``25%`` (0.25), ``1/2`` written without spaces (one number, so
  ``10÷1/2`` is 20), currency signs dropped, ``half`` / ``twice``;
- operators: ``+ - − * x × · / ÷``, the words ``times``, ``plus``, ``minus``, ``divided by``,
  ``multiplied by``, ``of`` after a percentage or fraction, parentheses and ``2(73+57)``; LaTeX's ``\\times``,
  ``\\cdot``, ``\\div`` and ``\\frac{a}{b}``;
- units after a number are skipped (``4 mushroom/minute``, ``12 skeins per pair of socks``);
- GSM8K's calculator notes ``<<48/2=24>>`` are statements of their own, and the text around them is read
  without them;
- a chain ``a = b = c`` gives the statements a = b and b = c; a run-on ``5 + 3 = 8 * 2 = 16`` (a result,
  then the next step on it) gives 5 + 3 = 8 and 8 * 2 = 16.

A statement is true when the right side is the left side rounded to the digits it shows, to the nearest,
down or up (``7 / 3 = 2.33``, ``0.52 * 80 = 41`` students and ``143 / 22 = 7`` racks hold; ``13 * 11 =
153`` and ``48 / 2 = 25`` do not: a left side with no more digits than the right must equal it). What the
checker cannot read is left unjudged, never guessed at: a side with a variable (``2x + 90 = 252``), a left
side without an operator (``1 dozen = 12``, a restatement), a clause it cannot parse. A chain is ok when
it has at least one statement, every statement holds, and its final answer (``#### N``, else ``The answer
is N``) is the result of one of them: a right answer that the chain never computes is not verified.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from aft_fast.data.answers import extract_answer, parse_number


@dataclass(frozen=True)
class Step:
    """One arithmetic statement: `line` (1-based) of the chain, its `text` as read (``"48/2 = 24"``),
    the exact values of its two sides, whether it holds within the right side's rounding, and the result
    as written (``25`` for ``= 25%``, whose value is 0.25)."""

    line: int
    text: str
    left: Fraction
    right: Fraction
    ok: bool
    written: Fraction


@dataclass(frozen=True)
class StepCheck:
    """ok: at least one statement, all true, the final answer among their results. steps: every statement
    read, in order. error: the first reason the chain is not ok, human-readable (None when ok)."""

    ok: bool
    steps: tuple[Step, ...]
    error: str | None


# ---------------------------------------------------------------------------------------------------------
# Tokens.


@dataclass(frozen=True)
class _Tok:
    kind: str  # num | op | lp | rp | eq | word | var | stop
    text: str
    value: Fraction | None = None
    decimals: int = 0  # digits after the point, as written (the right side's rounding)
    tight: bool = False  # no space before it (implicit product: "2(73+57)")
    frac: bool = False  # "48/2" written as one number: a division all the same
    pct: bool = False  # "25%": value 0.25, written 25


_LATEX = (
    (re.compile(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}"), r"(\1)/(\2)"),
    (re.compile(r"\\(?:times|cdot)"), " × "),
    (re.compile(r"\\div"), " ÷ "),
    (re.compile(r"\\text\s*\{([^{}]*)\}"), r" \1 "),
    (re.compile(r"\\[()\[\]]|\\,|\\!|\\;"), " "),
    (re.compile(r"\\([$%])"), r"\1"),
)
_NOTE = re.compile(r"<<([^<>]*)>>")
_TOKEN = re.compile(
    r"(?P<frac>(?<![\d,.])\d+/\d+(?![\d/]|\.\d|,\d{3}))"
    r"|(?P<num>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
    r"|(?P<cur>[$€£¥₹])"
    r"|(?P<pct>%)"
    r"|(?P<op>\*\*|[+\-−–*×·/÷^])"
    r"|(?P<lp>\()|(?P<rp>\))"
    r"|(?P<eq>=)"
    r"|(?P<word>[A-Za-z][A-Za-z'’]*(?:-[A-Za-z]+)*)"
    r"|(?P<space>\s+)"
    r"|(?P<other>.)"
)
_OPS = {"+": "+", "-": "-", "−": "-", "–": "-", "*": "*", "×": "*", "·": "*", "/": "/", "÷": "/"}
_WORD_OPS = {"x": "*", "times": "*", "plus": "+", "minus": "-"}
_WORD_OPS_BY = {"divided": "/", "multiplied": "*"}  # followed by "by"
_WORD_NUMBERS = {"half": Fraction(1, 2), "twice": Fraction(2)}


def _percent(t: _Tok) -> _Tok:
    assert t.value is not None
    return _Tok("num", t.text + "%", t.value / 100, t.decimals + 2, t.tight, t.frac, True)


def _tokens(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    spaced = True  # whitespace before the current token
    skip_by = False
    for m in _TOKEN.finditer(text):
        kind, s = m.lastgroup, m.group()
        if kind == "space":
            spaced = True
            continue
        if kind == "cur":  # currency signs are not part of the arithmetic
            continue
        tight, spaced = not spaced, False
        last = out[-1] if out else None
        if skip_by:
            skip_by = False
            if s.lower() == "by":
                continue
        if kind == "frac":
            a, b = (int(x) for x in s.split("/"))
            out.append(_Tok("num", s, Fraction(a, b), 0, tight, frac=True) if b else _Tok("stop", s))
        elif kind == "num":
            after = text[m.end() : m.end() + 2]
            if re.match(r"[A-Za-z](?![A-Za-z])", after) and after[0] not in "xX":
                out.append(_Tok("var", s + after[0]))  # "2x": algebra, not a number this checker can judge
                continue
            decimals = len(s.split(".")[1]) if "." in s else 0
            out.append(_Tok("num", s, Fraction(s.replace(",", "")), decimals, tight))
        elif kind == "pct" and last is not None and last.kind == "num" and not last.pct:
            out[-1] = _percent(last)
        elif kind == "op":
            out.append(_Tok("op", _OPS.get(s, s), tight=tight))
        elif kind in ("lp", "rp", "eq"):
            out.append(_Tok(kind, s, tight=tight))
        elif kind == "word":
            out.extend(_word(s, last, tight, out))
            skip_by = s.lower() in _WORD_OPS_BY
        else:
            out.append(_Tok("stop", s))
    return out


def _word(s: str, last: _Tok | None, tight: bool, out: list[_Tok]) -> list[_Tok]:
    """The token(s) a word adds (it may turn the last number into a percentage instead)."""
    low = s.lower()
    after_num = last is not None and last.kind == "num"
    if low == "percent" and after_num and not last.pct:  # type: ignore[union-attr]
        out[-1] = _percent(last)  # type: ignore[arg-type]
        return []
    if low in _WORD_OPS and (low != "x" or s in ("x", "X")):
        return [_Tok("op", _WORD_OPS[low], tight=tight)]
    if low in _WORD_OPS_BY:
        return [_Tok("op", _WORD_OPS_BY[low], tight=tight)]
    if low in _WORD_NUMBERS:
        return [_Tok("num", s, _WORD_NUMBERS[low], 0, tight)]
    if low == "of" and after_num and (last.pct or last.frac):  # type: ignore[union-attr]
        return [_Tok("op", "*", tight=tight)]  # "25% of 80", "3/4 of 12"
    if len(s) == 1 and s not in ("a", "A", "I"):
        return [_Tok("var", s)]  # a one-letter variable ("T", "y")
    return [_Tok("word", s, tight=tight)]


# ---------------------------------------------------------------------------------------------------------
# Expressions: recursive descent over tokens[i:end]; a parse returns (value, next index, operators used).

_MAX_UNIT_WORDS = 6


class _NoParse(Exception):
    pass


class _Parser:
    def __init__(self, toks: list[_Tok], end: int):
        self.toks, self.end = toks, end
        self.ops = 0
        self.zero_division = False

    def peek(self, i: int) -> _Tok | None:
        return self.toks[i] if i < self.end else None

    def expr(self, i: int) -> tuple[Fraction, int]:
        value, i = self.term(i)
        while (t := self.peek(i)) is not None and t.kind == "op" and t.text in "+-":
            rhs, i = self.term(i + 1)
            value = value + rhs if t.text == "+" else value - rhs
            self.ops += 1
        return value, i

    def term(self, i: int) -> tuple[Fraction, int]:
        value, i = self.factor(i)
        while (t := self.peek(i)) is not None:
            if t.kind == "op" and t.text in "*/":
                rhs, i = self.factor(i + 1)
            elif t.kind == "lp" and t.tight:  # "2(73+57)"
                rhs, i = self.factor(i)
            else:
                break
            self.ops += 1
            if t.text == "/":
                if rhs == 0:
                    self.zero_division = True
                    raise _NoParse
                value = value / rhs
            else:
                value = value * rhs
        return value, i

    def factor(self, i: int) -> tuple[Fraction, int]:
        t = self.peek(i)
        if t is None:
            raise _NoParse
        if t.kind == "op" and t.text == "-":
            value, i = self.factor(i + 1)
            return -value, i
        if t.kind == "num" and t.value is not None:
            self.ops += t.frac  # "48/2" is a division
            return t.value, self.units(i + 1)
        if t.kind == "lp":
            value, i = self.expr(i + 1)
            close = self.peek(i)
            if close is None or close.kind != "rp":
                raise _NoParse
            return value, self.units(i + 1)
        raise _NoParse

    def units(self, i: int) -> int:
        """Skip the unit words after a number: "mushroom/minute", "skeins per pair of socks"."""
        words = 0
        while words < _MAX_UNIT_WORDS and (t := self.peek(i)) is not None:
            if t.kind == "word":
                i, words = i + 1, words + 1
            elif (
                t.kind == "op" and t.text == "/" and (n := self.peek(i + 1)) is not None and n.kind == "word"
            ):
                i, words = i + 2, words + 1
            else:
                break
        return i


def _parse_all(toks: list[_Tok], start: int, end: int) -> tuple[Fraction, int] | None:
    """(value, operator count) of tokens[start:end] read as one expression, or None."""
    p = _Parser(toks, end)
    try:
        value, i = p.expr(start)
    except _NoParse:
        return None
    return (value, p.ops) if i == end else None


def _parse_prefix(toks: list[_Tok], start: int, end: int) -> tuple[Fraction, int, int] | None:
    """(value, next index, operator count) of the longest expression that starts at tokens[start]."""
    p = _Parser(toks, end)
    try:
        value, i = p.expr(start)
    except _NoParse:
        return None
    return value, i, p.ops


_STARTS = ("num", "lp")


def _left_side(toks: list[_Tok], eq: int) -> tuple[int, Fraction, int] | None:
    """(start, value, operators) of the longest expression that ends right before tokens[eq], within the
    clause (after the last '=' or punctuation)."""
    lo = eq
    while lo > 0 and toks[lo - 1].kind not in ("stop", "eq"):
        lo -= 1
    for s in range(lo, eq):
        t = toks[s]
        if t.kind in _STARTS or (t.kind == "op" and t.text == "-"):
            parsed = _parse_all(toks, s, eq)
            if parsed is not None:
                return s, parsed[0], parsed[1]
    return None


def _right_side(toks: list[_Tok], eq: int, left: Fraction) -> tuple[int, Fraction, int, _Tok] | None:
    """(end, value, operators, first token) of the right side after tokens[eq]: the whole expression when
    another '=' follows it (a = b = c), else the first number and its units (the result). A run-on
    ``5 + 3 = 8 * 2 = 16`` (the result, then the next step on it) reads as 5 + 3 = 8 when the whole
    ``8 * 2`` does not equal the left side but its first number does."""
    start = eq + 1
    if start >= len(toks):
        return None
    first = toks[start]
    if not (first.kind in _STARTS or (first.kind == "op" and first.text == "-")):
        return None
    whole = _parse_prefix(toks, start, len(toks))
    p = _Parser(toks, len(toks))
    try:
        value, end = p.factor(start)
    except _NoParse:
        return None
    if whole is not None and whole[1] < len(toks) and toks[whole[1]].kind == "eq":
        run_on = whole[2] > 0 and not _holds(left, whole[0], 9) and not first.frac
        if not (run_on and _holds(left, value, first.decimals)):
            return whole[1], whole[0], whole[2], first
    # A variable right after the result ("= 145 + T") makes the side unreadable.
    if end < len(toks) and toks[end].kind == "op" and end + 1 < len(toks) and toks[end + 1].kind == "var":
        return None
    return end, value, 0, first


def _holds(left: Fraction, right: Fraction, decimals: int) -> bool:
    """Whether `right`, written with `decimals` digits after the point, is `left` rounded to them: to the
    nearest, down or up (word problems floor whole students and ceil racks needed), so within one unit
    of the last digit; exact when `left` has no more digits than that. A relative 1e-9 covers the long
    decimals that float-printing generators write (``14.33333333333333 - 12 = 2.3333333333333304``)."""
    if abs(left - right) <= abs(right) * Fraction(1, 10**9):
        return True
    unit = Fraction(1, 10**decimals)
    return (left / unit).denominator != 1 and abs(left - right) < unit


def _text(toks: list[_Tok], a: int, b: int) -> str:
    return " ".join(t.text for t in toks[a:b])


def _fmt(v: Fraction) -> str:
    if v.denominator == 1:
        return str(v.numerator)
    return f"{float(v):.6g}"


def _line_steps(line_no: int, line: str) -> list[Step]:
    steps: list[Step] = []
    for note in _NOTE.findall(line):  # calculator notes: "<<48/2=24>>"
        left, sep, right = note.rpartition("=")
        if not sep:
            continue
        lt, rt = _tokens(left), _tokens(right)
        lp, rp = _parse_all(lt, 0, len(lt)), _parse_all(rt, 0, len(rt))
        if lp is None or rp is None:
            continue
        decimals = max((t.decimals for t in rt if t.kind == "num"), default=0) if rp[1] == 0 else 9
        ok = _holds(lp[0], rp[0], decimals)
        steps.append(Step(line_no, f"<<{note}>>", lp[0], rp[0], ok, rp[0]))
    toks = _tokens(_NOTE.sub(" ", line))
    for eq, t in enumerate(toks):
        if t.kind != "eq":
            continue
        left = _left_side(toks, eq)
        if left is None or left[2] == 0:
            continue  # unreadable, or a restatement ("1 dozen = 12")
        start, lv, _ = left
        right = _right_side(toks, eq, lv)
        if right is None:
            continue
        end, rv, rops, first = right
        single = rops == 0 and not first.frac  # one written number: it rounds to its own digits
        decimals = first.decimals if single else 9
        shown = end if not single else next(i for i in range(eq + 1, end) if toks[i].kind == "num") + 1
        text = f"{_text(toks, start, eq)} = {_text(toks, eq + 1, shown)}"  # the result without its units
        written = rv * 100 if single and first.pct else rv
        steps.append(Step(line_no, text, lv, rv, _holds(lv, rv, decimals), written))
    return steps


def _clean(chain: str) -> str:
    for pattern, repl in _LATEX:
        chain = pattern.sub(repl, chain)
    return chain


_BULLET = re.compile(r"^\s*[-*+]\s+")  # a list bullet is no minus sign or product


def read_steps(chain: str) -> list[Step]:
    """Every arithmetic statement of `chain` that the checker can read, in order."""
    steps: list[Step] = []
    for k, line in enumerate(_clean(chain).splitlines(), start=1):
        if line.strip().startswith("####"):
            continue
        steps.extend(_line_steps(k, _BULLET.sub("", line)))
    return steps


def check_steps(chain: str) -> StepCheck:
    """Check a GSM8K-style chain: every statement true, and the final answer computed by one of them."""
    steps = tuple(read_steps(chain))
    if not steps:
        return StepCheck(False, steps, "no arithmetic statement to check")
    for s in steps:
        if not s.ok:
            return StepCheck(
                False, steps, f"line {s.line}: {s.text} is false (the left side is {_fmt(s.left)})"
            )
    answer = extract_answer(chain, "number")
    value = parse_number(answer) if answer is not None else None
    if value is None:
        return StepCheck(False, steps, "no final answer")
    # A percentage counts as written: "= 25%" computes the answer 25.
    if value not in {s.right for s in steps} | {s.written for s in steps}:
        return StepCheck(False, steps, f"the final answer {answer} is no statement's result")
    return StepCheck(True, steps, None)
