"""The embedded default task: seeded multi-step arithmetic word problems in GSM8K format (no download).

A problem states a starting count and 2-3 changes to it, then asks for the final count::

    Q: Mia has 7 shells. She finds 5 more. She gives 3 to Ben. How many shells does Mia have now?
    A: Mia has 7 shells.
       She finds 5 more, so she has 7 + 5 = 12.
       She gives 3 to Ben, so she has 12 - 3 = 9.
       #### 9

The language is small and regular (a dozen names, ten objects, a few verbs per operation) so that a ~2M
parameter model trained from scratch learns it in a few hundred steps, yet every step needs real
arithmetic on one- and two-digit numbers (carries and borrows included), which is what keeps greedy
accuracy well below 100% early on and leaves both right and wrong samples for AFT to rank. Every
intermediate and final count is an integer in [0, MAX_VALUE].
"""

from __future__ import annotations

import random
from pathlib import Path

from aft_fast.data.formats import Example, answer_line, write_gsm8k

# Difficulty, calibrated with a 1.84M-parameter Llama (DESIGN.md section 5 setup; batch 32, lr 2e-3, cosine
# over 750 steps): greedy accuracy 4% after 250 steps, 31% after 500, 89% after 750. With counts up to 30 and
# operands up to 9 it was 9% / 55% / 96%: too easy, few wrong samples would be left for AFT to rank.
MAX_VALUE = 50  # every count stays in [0, MAX_VALUE]: small, non-negative, at most two digits
START = (2, 25)  # the starting count
OPERAND = (1, 12)  # how many are added or taken away in one step

NAMES = {
    **dict.fromkeys(("Tom", "Sam", "Ben", "Max", "Leo", "Jack"), "he"),
    **dict.fromkeys(("Ann", "Mia", "Lily", "Zoe", "Eva", "Emma"), "she"),
}
ITEMS = ("apples", "pens", "cards", "books", "eggs", "coins", "marbles", "stickers", "cookies", "shells")
OBJECT = {"he": "him", "she": "her"}

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


def _problem(rng: random.Random, n_steps: int) -> tuple[str, str, int]:
    name = rng.choice(list(NAMES))
    pron = NAMES[name]
    item = rng.choice(ITEMS)
    x = rng.randint(*START)
    question = [f"{name} has {x} {item}."]
    chain = [f"{name} has {x} {item}."]
    for _ in range(n_steps):
        friend = rng.choice([n for n in NAMES if n != name])
        # Subtract only when something is left to take; add only while there is room below MAX_VALUE.
        can_add, can_sub = x + OPERAND[0] <= MAX_VALUE, x >= OPERAND[0]
        add = can_add and (not can_sub or rng.random() < 0.5)
        if add:
            b = rng.randint(OPERAND[0], min(OPERAND[1], MAX_VALUE - x))
            q_tpl, c_tpl = rng.choice(ADD)
            y, op = x + b, "+"
        else:
            b = rng.randint(OPERAND[0], min(OPERAND[1], x))
            q_tpl, c_tpl = rng.choice(SUB)
            y, op = x - b, "-"
        fill = {"P": pron.capitalize(), "o": OBJECT[pron], "f": friend, "b": b}
        question.append(q_tpl.format(**fill))
        chain.append(f"{c_tpl.format(**fill)}, so {pron} has {x} {op} {b} = {y}.")
        x = y
    question.append(f"How many {item} does {name} have now?")
    chain.append(answer_line(str(x)))
    return " ".join(question), "\n".join(chain), x


def _generate(
    n: int, rng: random.Random, steps: tuple[int, int], exclude: set[str], prefix: str
) -> list[Example]:
    lo, hi = steps
    if not 1 <= lo <= hi:
        raise ValueError(f"steps must be (lo, hi) with 1 <= lo <= hi, got {steps}")
    out: list[Example] = []
    seen = set(exclude)
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:  # the space is huge; this only trips on absurd requests
            raise ValueError(f"could not draw {n} distinct problems (got {len(out)})")
        question, chain, answer = _problem(rng, rng.randint(lo, hi))
        if question in seen:
            continue
        seen.add(question)
        out.append(Example(f"{prefix}-{len(out)}", question, chain, str(answer), "number"))
    return out


def generate_problems(n: int, seed: int, steps: tuple[int, int] = (2, 3)) -> list[Example]:
    """`n` distinct problems, each with `steps[0]`..`steps[1]` operations; the same for the same seed."""
    return _generate(n, random.Random(f"aft-synthetic:{seed}"), steps, set(), f"synthetic-{seed}")


def write_default_task(out_dir: str | Path, n_train: int, n_test: int, seed: int = 0) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` (GSM8K JSON lines) under `out_dir`; returns their paths.

    The test set is drawn first from its own stream, so it depends only on (n_test, seed), not on
    n_train; training problems that repeat a test question are redrawn (the sets are disjoint)."""
    out_dir = Path(out_dir)
    test = _generate(n_test, random.Random(f"aft-synthetic:{seed}:test"), (2, 3), set(), "test")
    train = _generate(
        n_train, random.Random(f"aft-synthetic:{seed}:train"), (2, 3), {ex.question for ex in test}, "train"
    )
    paths = {"train": out_dir / "train.jsonl", "test": out_dir / "test.jsonl"}
    write_gsm8k(paths["train"], train)
    write_gsm8k(paths["test"], test)
    return paths
