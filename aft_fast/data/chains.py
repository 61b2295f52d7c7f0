"""The chain checkers: is a chain of thought right, not only its final answer? One entry point,
`check_chain(question, chain)`, serves every stage (sample's labels, the candidate file's metadata, eval):

- an embedded-task question gets the checker below, which knows the task's solution strategies;
- any other question without answer choices (GSM8K and its kin) gets the step checker of
  `aft_fast.data.steps`: every arithmetic statement true, the final answer computed by one of them;
- a multiple-choice question (AQuA, ECQA: "Answer Choices: (A) ...") gets none (`is_checkable` is False).

The embedded task's checker:

A candidate can reach the gold answer through false arithmetic whose errors cancel ("2 + 12 = 13 ...
13 + 4 = 18 ... #### 21"); the answer rule labels it positive and AFT would push wrong reasoning up.
`check_chain` reads the question (its own reading of the task's language, independent of the generator's
templates) and the chain, recognises which of the task's solution strategies (`FORMS`) the chain follows,
and checks every step:

- running_total: one line per change of the question, in order, each ``<event>, so <he|she> has a +/- b =
  c.`` with a the previous count (the start for the first), b the question's change and a +/- b = c;
- gains_losses: ``<He|She> gets g1 + g2 = G more in all.`` (the question's gains, any order; one gain: no
  equation), ``<He|She> gives away l1 + l2 = L in all.`` (its losses), each line present exactly when the
  question has such changes, then ``So <he|she> has start + G - L = answer.``;
- net_change: ``<His|Her> <items> change by d1 + d2 - d3 = D.`` (the signed changes, any order), then
  ``So <he|she> has start +/- |D| = answer.``.

Every form starts by restating the start (``Mia has 7 shells.``) and ends with ``#### <answer>`` equal to
the last result. A chain is ok when every equation is true, each step builds on what it must, and nothing
else is written; then its answer is necessarily the question's.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from aft_fast.data.steps import check_steps

FORMS: tuple[str, ...] = ("running_total", "gains_losses", "net_change")

# The question, sentence by sentence.
_Q_START = re.compile(r"(\w+) has (\d+) (\w+)\.")
_Q_END = re.compile(r"How many (\w+) does (\w+) have now\?")
_Q_ADD = (
    re.compile(r"(?:He|She) (?:buys|finds) (\d+) more\."),
    re.compile(r"\w+ gives (?:him|her) (\d+) more\."),
)
_Q_SUB = (re.compile(r"(?:He|She) gives (\d+) to \w+\."), re.compile(r"(?:He|She) (?:loses|sells) (\d+)\."))

# The chain, line by line.
_NUM = r"-?\d+"
_EXPR = re.compile(rf"({_NUM})((?: [+-] \d+)*)(?: = ({_NUM}))?")
_START = re.compile(r"(\w+) has (-?\d+) (\w+)\.")
_STEP = re.compile(rf".+, so (?:he|she) has ({_NUM}) ([+-]) (\d+) = ({_NUM})\.")
_GAINS = re.compile(r"(?:He|She) gets (.+) more in all\.")
_LOSSES = re.compile(r"(?:He|She) gives away (.+) in all\.")
_NET = re.compile(r"(?:His|Her) \w+ change by (.+)\.")
_SO = re.compile(r"So (?:he|she) has (.+)\.")
_FINAL = re.compile(rf"#### ?({_NUM})")


@dataclass(frozen=True)
class ChainCheck:
    """ok: every equation true, every step built on what its form requires, the final line the last
    result (on other questions: the step checker's verdict). form: the strategy the chain follows (one
    of FORMS), None if unrecognised or not the embedded task. error: the first false or unsupported step,
    human-readable (None when ok)."""

    ok: bool
    form: str | None
    error: str | None


@dataclass(frozen=True)
class Question:
    name: str
    item: str
    start: int
    changes: tuple[int, ...]  # signed, in the question's order

    @property
    def answer(self) -> int:
        return self.start + sum(self.changes)


def parse_question(question: str) -> Question | None:
    """The start and the signed changes of an embedded-task question, or None for any other text."""
    sentences = [s.strip() for s in re.findall(r"[^.?]+[.?]", question.strip())]
    if len(sentences) < 3 or "".join(sentences).replace(" ", "") != question.replace(" ", "").strip():
        return None
    start, end = _Q_START.fullmatch(sentences[0]), _Q_END.fullmatch(sentences[-1])
    if not start or not end or end.groups() != (start.group(3), start.group(1)):
        return None
    changes = []
    for s in sentences[1:-1]:
        add = next((m for p in _Q_ADD if (m := p.fullmatch(s))), None)
        sub = next((m for p in _Q_SUB if (m := p.fullmatch(s))), None)
        if add is None and sub is None:
            return None
        changes.append(int(add.group(1)) if add else -int(sub.group(1)))  # type: ignore[union-attr]
    return Question(start.group(1), start.group(3), int(start.group(2)), tuple(changes))


CHECKERS = ("forms", "steps")  # the embedded task's checker; the GSM8K-style step checker
# How formats.with_options shows a multiple-choice question: its chains end in a letter, not arithmetic.
_CHOICES = re.compile(r"\nAnswer Choices: \(A\) ")


def checker_of(question: str) -> str | None:
    """The checker that judges chains for `question` (one of CHECKERS), or None: multiple choice."""
    if parse_question(question) is not None:
        return "forms"
    return None if _CHOICES.search(question) else "steps"


def is_checkable(question: str) -> bool:
    """Whether `check_chain` can judge chains for `question`: every question but multiple choice."""
    return checker_of(question) is not None


@dataclass(frozen=True)
class _Expr:
    text: str
    terms: tuple[int, ...]  # signed
    result: int | None  # the right-hand side, None when no "= r" is written

    @property
    def value(self) -> int:
        return sum(self.terms)


def _expr(text: str) -> _Expr | None:
    m = _EXPR.fullmatch(text.strip())
    if not m:
        return None
    rest = re.findall(r"([+-]) (\d+)", m.group(2))
    terms = (int(m.group(1)), *(int(b) if op == "+" else -int(b) for op, b in rest))
    return _Expr(m.group(0), terms, None if m.group(3) is None else int(m.group(3)))


def _signed(terms: tuple[int, ...] | list[int]) -> str:
    return str(terms[0]) + "".join(f" {'+' if t >= 0 else '-'} {abs(t)}" for t in terms[1:])


class _Fail(Exception):
    pass


def _true(line: int, e: _Expr) -> int:
    """The equation's right-hand side after checking that it holds (a bare term: its value)."""
    if e.result is None:
        if len(e.terms) > 1:
            raise _Fail(f"line {line}: {e.text} gives no result")
        return e.value
    if e.result != e.value:
        raise _Fail(f"line {line}: {e.text} is false ({_signed(e.terms)} = {e.value})")
    return e.result


def _running(q: Question, lines: list[str]) -> int:
    x = q.start
    for k, text in enumerate(lines, start=2):
        m = _STEP.fullmatch(text)
        if not m:
            raise _Fail(f"line {k}: not a running-total step: {text!r}")
        if k - 2 >= len(q.changes):
            raise _Fail(f"line {k}: one step more than the question's {len(q.changes)} changes")
        change = q.changes[k - 2]
        a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        y = _true(k, _Expr(f"{a} {op} {b} = {c}", (a, b if op == "+" else -b), c))
        if a != x:
            raise _Fail(f"line {k}: starts from {a}, but the count so far is {x}")
        if (b if op == "+" else -b) != change:
            raise _Fail(
                f"line {k}: applies {op} {b}, but change {k - 1} of the question is "
                f"{'+' if change > 0 else '-'} {abs(change)}"
            )
        x = y
    if len(lines) < len(q.changes):
        raise _Fail(f"{len(lines)} step lines for the question's {len(q.changes)} changes")
    return x


def _gains_losses(q: Question, lines: list[str]) -> int:
    gains = [c for c in q.changes if c > 0]  # the question's order, for the messages
    losses = [-c for c in q.changes if c < 0]
    k, i, final_terms = 2, 0, [q.start]
    for want, pattern, what in ((gains, _GAINS, "gains"), (losses, _LOSSES, "losses")):
        m = pattern.fullmatch(lines[i]) if i < len(lines) else None
        if not want:
            if m:
                raise _Fail(f"line {k}: the question has no {what}")
            continue
        if not m:
            raise _Fail(
                f"line {k}: expected the {what} line, got {lines[i] if i < len(lines) else 'nothing'!r}"
            )
        e = _expr(m.group(1))
        if e is None or any(t <= 0 for t in e.terms):
            raise _Fail(f"line {k}: {what} must be a sum of positive numbers, got {m.group(1)!r}")
        total = _true(k, e)
        if sorted(e.terms) != sorted(want):
            raise _Fail(f"line {k}: sums {what} {_signed(e.terms)}, but the question's are {_signed(want)}")
        final_terms.append(total if what == "gains" else -total)
        k, i = k + 1, i + 1
    if len(lines) != i + 1:
        raise _Fail(f"line {k}: expected one final 'So ... has ...' line, got {lines[i:]!r}")
    m = _SO.fullmatch(lines[i])
    e = _expr(m.group(1)) if m else None
    if e is None:
        raise _Fail(f"line {k}: not the gains-and-losses result: {lines[i]!r}")
    y = _true(k, e)
    if list(e.terms) != final_terms:
        raise _Fail(
            f"line {k}: computes {_signed(e.terms)}, but start, gains and losses give {_signed(final_terms)}"
        )
    return y


def _net(q: Question, lines: list[str]) -> int:
    if len(lines) != 2:
        raise _Fail(f"expected the net-change line and one result line, got {len(lines)} lines")
    m = _NET.fullmatch(lines[0])
    e = _expr(m.group(1)) if m else None
    if e is None:
        raise _Fail(f"line 2: not a net change: {lines[0]!r}")
    net = _true(2, e)
    if sorted(e.terms) != sorted(q.changes):
        raise _Fail(f"line 2: nets {_signed(e.terms)}, but the question's changes are {_signed(q.changes)}")
    m = _SO.fullmatch(lines[1])
    f = _expr(m.group(1)) if m else None
    if f is None or len(f.terms) != 2:
        raise _Fail(f"line 3: not a single step from the start: {lines[1]!r}")
    y = _true(3, f)
    if f.terms != (q.start, net):
        raise _Fail(
            f"line 3: computes {_signed(f.terms)}, but start and net change give {_signed((q.start, net))}"
        )
    return y


_CHECK: dict[str, Callable[[Question, list[str]], int]] = {
    "running_total": _running,
    "gains_losses": _gains_losses,
    "net_change": _net,
}


def chain_form(lines: list[str]) -> str | None:
    """The form that a chain's second line opens (the first restates the start), or None."""
    if len(lines) < 2:
        return None
    second = lines[1]
    if _STEP.fullmatch(second):
        return "running_total"
    if _GAINS.fullmatch(second) or _LOSSES.fullmatch(second):
        return "gains_losses"
    if _NET.fullmatch(second):
        return "net_change"
    return None


def check_chain(question: str, chain: str) -> ChainCheck:
    """Check `chain` for `question` with the question's checker (`checker_of`): form and steps on the
    embedded task; on other questions every arithmetic statement (form None). Raises ValueError for a
    multiple-choice question."""
    q = parse_question(question)
    if q is None:
        if _CHOICES.search(question):
            raise ValueError(f"check_chain: a multiple-choice question has no checker: {question[:80]!r}")
        steps = check_steps(chain)
        return ChainCheck(steps.ok, None, steps.error)
    lines = [s.strip() for s in chain.strip().splitlines() if s.strip()]
    form = chain_form(lines)
    if form is None:
        second = lines[1] if len(lines) > 1 else ""
        return ChainCheck(False, None, f"line 2: no known form opens with {second!r}")
    try:
        m = _START.fullmatch(lines[0])
        if not m:
            raise _Fail(f"line 1: does not restate the start: {lines[0]!r}")
        if int(m.group(2)) != q.start:
            raise _Fail(f"line 1: restates the start as {m.group(2)}, but the question says {q.start}")
        final = _FINAL.fullmatch(lines[-1])
        if not final:
            raise _Fail(f"line {len(lines)}: expected the final '#### <answer>' line, got {lines[-1]!r}")
        last = _CHECK[form](q, lines[1:-1])
        if int(final.group(1)) != last:
            raise _Fail(f"line {len(lines)}: answers {final.group(1)}, but the last result is {last}")
    except _Fail as e:
        return ChainCheck(False, form, str(e))
    return ChainCheck(True, form, None)
