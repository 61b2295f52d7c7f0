"""The embedded default task: seeded multi-step arithmetic word problems in GSM8K format (no download).

A problem states a starting count and 2-3 changes to it, then asks for the final count. Task "forms" (the
default) solves each problem in one of three valid ways, each with its own wording::

    Q: Mia has 7 shells. She finds 5 more. She gives 3 to Ben. She buys 4 more. How many shells does
       Mia have now?

    running_total                               gains_losses
      Mia has 7 shells.                           Mia has 7 shells.
      She finds 5 more, so she has 7 + 5 = 12.    She gets 5 + 4 = 9 more in all.
      She gives 3 to Ben, so she has 12 - 3 = 9.  She gives away 3 in all.
      She buys 4 more, so she has 9 + 4 = 13.     So she has 7 + 9 - 3 = 13.
      #### 13                                     #### 13

    net_change
      Mia has 7 shells.
      Her shells change by 5 - 3 + 4 = 6.
      So she has 7 + 6 = 13.
      #### 13

Every form ends in the same ``#### <answer>`` line, so the answer rule labels them alike; the chain checker
(`aft_fast.data.chains`) tells them apart and checks each step. Task "v1" is the first generator (the running
total only), kept byte for byte so that old runs reproduce.

The language is small and regular (a dozen names, ten objects, a few verbs per operation) so that a ~2M
parameter model trained from scratch learns it in a few hundred steps, yet every step needs real
arithmetic on one- and two-digit numbers (carries and borrows included), which is what keeps greedy
accuracy well below 100% early on and leaves both right and wrong samples for AFT to rank. Every
running count is an integer in [0, MAX_VALUE] (a gains total may reach 2 * MAX_VALUE; a net change may be
negative).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from aft_fast.data.chains import FORMS
from aft_fast.data.formats import Example, answer_line, write_gsm8k

TASKS = ("forms", "v1")

# Difficulty, calibrated with a 1.84M-parameter Llama (docs/design.md section 5; batch 32, lr 2e-3,
# cosine over 750 steps) on task v1: greedy accuracy 4% after 250 steps, 31% after 500, 89% after 750. With
# counts up to 30 and operands up to 9 it was 9% / 55% / 96%: too easy, few wrong samples would be left for
# AFT to rank.
MAX_VALUE = 50  # every running count stays in [0, MAX_VALUE]: small, non-negative, at most two digits
START = (2, 25)  # the starting count
OPERAND = (1, 12)  # how many are added or taken away in one step

# How often a reference is written in each form (task "forms"). Uneven on purpose: MLE on these references
# makes the VFT model prefer the running total, so it under-scores right chains in the other two forms
# (assessment misalignment, the paper's premise 1). The second form is common enough (30%) that samples
# at temperature 1 show it often; the third (10%) is seen ~800 times in 8000 problems, learnt but rare.
FORM_WEIGHTS = {"running_total": 0.6, "gains_losses": 0.3, "net_change": 0.1}
assert tuple(FORM_WEIGHTS) == FORMS

NAMES = {
    **dict.fromkeys(("Tom", "Sam", "Ben", "Max", "Leo", "Jack"), "he"),
    **dict.fromkeys(("Ann", "Mia", "Lily", "Zoe", "Eva", "Emma"), "she"),
}
ITEMS = ("apples", "pens", "cards", "books", "eggs", "coins", "marbles", "stickers", "cookies", "shells")
OBJECT = {"he": "him", "she": "her"}
POSSESSIVE = {"he": "his", "she": "her"}

# (question sentence, chain clause); {P} subject pronoun, {o} object pronoun, {f} a friend, {b} the operand.
ADD = (
    ("{P} buys {b} more.", "{P} buys {b} more"),
    ("{P} finds {b} more.", "{P} finds {b} more"),
    ("{f} gives {o} {b} more.", "{f} gives {o} {b} more"),
)
SUB = (
    ("{P} gives {b} to {f}.", "{P} gives {b} to {f}"),
    ("{P} loses {b}.", "{P} loses {b}"),
    ("{P} sells {b}.", "{P} sells {b}"),
)


@dataclass(frozen=True)
class Change:
    amount: int  # signed: +b adds b, -b takes b away
    sentence: str  # in the question
    clause: str  # the running total's wording of the same event


@dataclass(frozen=True)
class Problem:
    name: str
    pron: str
    item: str
    start: int
    changes: tuple[Change, ...]

    @property
    def question(self) -> str:
        first, last = f"{self.name} has {self.start} {self.item}.", self.ending
        return " ".join([first, *(c.sentence for c in self.changes), last])

    @property
    def ending(self) -> str:
        return f"How many {self.item} does {self.name} have now?"

    @property
    def answer(self) -> int:
        return self.start + sum(c.amount for c in self.changes)


def _draw(rng: random.Random, n_steps: int) -> Problem:
    # The order of the rng calls is the first generator's: task v1 depends on it byte for byte.
    name = rng.choice(list(NAMES))
    pron = NAMES[name]
    item = rng.choice(ITEMS)
    x = start = rng.randint(*START)
    changes = []
    for _ in range(n_steps):
        friend = rng.choice([n for n in NAMES if n != name])
        # Subtract only when something is left to take; add only while there is room below MAX_VALUE.
        can_add, can_sub = x + OPERAND[0] <= MAX_VALUE, x >= OPERAND[0]
        add = can_add and (not can_sub or rng.random() < 0.5)
        if add:
            b = rng.randint(OPERAND[0], min(OPERAND[1], MAX_VALUE - x))
            q_tpl, c_tpl = rng.choice(ADD)
        else:
            b = rng.randint(OPERAND[0], min(OPERAND[1], x))
            q_tpl, c_tpl = rng.choice(SUB)
        fill = {"P": pron.capitalize(), "o": OBJECT[pron], "f": friend, "b": b}
        changes.append(Change(b if add else -b, q_tpl.format(**fill), c_tpl.format(**fill)))
        x += changes[-1].amount
    return Problem(name, pron, item, start, tuple(changes))


def _sum(terms: list[int]) -> str:
    """ "5 + 4 = 9" for several terms, "5" for one."""
    text = " + ".join(map(str, terms))
    return f"{text} = {sum(terms)}" if len(terms) > 1 else text


def running_total(p: Problem) -> str:
    """One step per change, each on the previous count (the first generator's chain, byte for byte)."""
    lines, x = [f"{p.name} has {p.start} {p.item}."], p.start
    for c in p.changes:
        y, op = x + c.amount, "+" if c.amount > 0 else "-"
        lines.append(f"{c.clause}, so {p.pron} has {x} {op} {abs(c.amount)} = {y}.")
        x = y
    lines.append(answer_line(str(x)))
    return "\n".join(lines)


def gains_losses(p: Problem) -> str:
    """All gains summed, all losses summed, then one line from the start: start + gains - losses."""
    gains = [c.amount for c in p.changes if c.amount > 0]
    losses = [-c.amount for c in p.changes if c.amount < 0]
    lines = [f"{p.name} has {p.start} {p.item}."]
    final = str(p.start)
    if gains:
        lines.append(f"{p.pron.capitalize()} gets {_sum(gains)} more in all.")
        final += f" + {sum(gains)}"
    if losses:
        lines.append(f"{p.pron.capitalize()} gives away {_sum(losses)} in all.")
        final += f" - {sum(losses)}"
    lines.append(f"So {p.pron} has {final} = {p.answer}.")
    lines.append(answer_line(str(p.answer)))
    return "\n".join(lines)


def net_change(p: Problem) -> str:
    """The net change of the count (the signed changes in the question's order), then one step."""
    amounts = [c.amount for c in p.changes]
    expr = str(amounts[0]) + "".join(f" {'+' if a > 0 else '-'} {abs(a)}" for a in amounts[1:])
    net = sum(amounts)
    lines = [
        f"{p.name} has {p.start} {p.item}.",
        f"{POSSESSIVE[p.pron].capitalize()} {p.item} change by {expr}"
        + (f" = {net}." if len(amounts) > 1 else "."),
        f"So {p.pron} has {p.start} {'-' if net < 0 else '+'} {abs(net)} = {p.answer}.",
        answer_line(str(p.answer)),
    ]
    return "\n".join(lines)


RENDER = {"running_total": running_total, "gains_losses": gains_losses, "net_change": net_change}


def render(p: Problem, form: str) -> str:
    """The chain of `p` written in `form` (one of `aft_fast.data.chains.FORMS`)."""
    if form not in RENDER:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    return RENDER[form](p)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"synthetic_task: {task!r} is not one of {', '.join(TASKS)}")


def _generate(
    n: int,
    rng: random.Random,
    steps: tuple[int, int],
    exclude: set[str],
    prefix: str,
    task: str,
    form_rng: random.Random,
) -> list[Example]:
    """`n` distinct problems. The questions come from `rng` alone and are the same for every task; task
    "forms" draws each reference's form from `form_rng`, so both tasks pose the same questions."""
    _check_task(task)
    lo, hi = steps
    if not 1 <= lo <= hi:
        raise ValueError(f"steps must be (lo, hi) with 1 <= lo <= hi, got {steps}")
    out: list[Example] = []
    seen = set(exclude)
    attempts = 0
    forms, weights = list(FORM_WEIGHTS), list(FORM_WEIGHTS.values())
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:  # the space is huge; this only trips on absurd requests
            raise ValueError(f"could not draw {n} distinct problems (got {len(out)})")
        problem = _draw(rng, rng.randint(lo, hi))
        question = problem.question
        if question in seen:
            continue
        seen.add(question)
        form = "running_total" if task == "v1" else form_rng.choices(forms, weights)[0]
        chain = render(problem, form)
        out.append(Example(f"{prefix}-{len(out)}", question, chain, str(problem.answer), "number"))
    return out


def generate_problems(
    n: int, seed: int, steps: tuple[int, int] = (2, 3), task: str = "forms"
) -> list[Example]:
    """`n` distinct problems, each with `steps[0]`..`steps[1]` operations; the same for the same seed.
    task: "forms" (references drawn from FORM_WEIGHTS) or "v1" (the running total only)."""
    return _generate(
        n,
        random.Random(f"aft-synthetic:{seed}"),
        steps,
        set(),
        f"synthetic-{seed}",
        task,
        random.Random(f"aft-synthetic-forms:{seed}"),
    )


def write_default_task(
    out_dir: str | Path, n_train: int, n_test: int, seed: int = 0, task: str = "forms"
) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` (GSM8K JSON lines) under `out_dir`; returns their paths.

    The test set is drawn first from its own stream, so it depends only on (n_test, seed), not on
    n_train; training problems that repeat a test question are redrawn (the sets are disjoint). Test
    references follow the same form distribution as the training ones (task "forms")."""
    _check_task(task)
    out_dir = Path(out_dir)
    test = _generate(
        n_test,
        random.Random(f"aft-synthetic:{seed}:test"),
        (2, 3),
        set(),
        "test",
        task,
        random.Random(f"aft-synthetic-forms:{seed}:test"),
    )
    train = _generate(
        n_train,
        random.Random(f"aft-synthetic:{seed}:train"),
        (2, 3),
        {ex.question for ex in test},
        "train",
        task,
        random.Random(f"aft-synthetic-forms:{seed}:train"),
    )
    paths = {"train": out_dir / "train.jsonl", "test": out_dir / "test.jsonl"}
    write_gsm8k(paths["train"], train)
    write_gsm8k(paths["test"], test)
    return paths
