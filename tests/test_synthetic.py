"""The embedded synthetic task: determinism, disjoint splits, GSM8K format and correct arithmetic."""

from __future__ import annotations

import json
import re

import pytest

from aft_fast.data.answers import extract_answer
from aft_fast.data.formats import read_examples
from aft_fast.data.synthetic import generate_problems, write_default_task

# The test's own reading of the question text (independent of the generator's templates).
START = re.compile(r"^(\w+) has (\d+) (\w+)\.$")
MORE = re.compile(r"^(?:\w+ (?:buys|finds) (\d+) more|\w+ gives (?:him|her) (\d+) more)\.$")
LESS = re.compile(r"^\w+ (?:gives (\d+) to \w+|loses (\d+)|sells (\d+))\.$")
STEP = re.compile(r"^.*, so (?:he|she) has (\d+) ([+-]) (\d+) = (\d+)\.$")


def _solve(question: str) -> tuple[int, int, list[int]]:
    """(answer, number of operations, every count along the way), read from the question alone."""
    sentences = re.findall(r"[^.?]+[.?]", question)
    sentences = [s.strip() for s in sentences]
    m = START.match(sentences[0])
    assert m, sentences[0]
    count, counts, ops = int(m.group(2)), [int(m.group(2))], 0
    assert sentences[-1] == f"How many {m.group(3)} does {m.group(1)} have now?"
    for s in sentences[1:-1]:
        if mm := MORE.match(s):
            count += int(next(g for g in mm.groups() if g))
        elif ml := LESS.match(s):
            count -= int(next(g for g in ml.groups() if g))
        else:
            raise AssertionError(f"unreadable sentence {s!r}")
        counts.append(count)
        ops += 1
    return count, ops, counts


def test_deterministic_per_seed():
    a, b = generate_problems(60, seed=3), generate_problems(60, seed=3)
    assert a == b
    c = generate_problems(60, seed=4)
    assert [e.question for e in a] != [e.question for e in c]


def test_answers_and_chains_are_correct():
    problems = generate_problems(400, seed=0)
    assert len({p.question for p in problems}) == len(problems)
    n_ops = set()
    for p in problems:
        answer, ops, counts = _solve(p.question)
        n_ops.add(ops)
        assert p.kind == "number" and p.gold == str(answer)
        assert all(0 <= c <= 99 for c in counts), counts  # small, non-negative
        lines = p.reference.splitlines()
        assert lines[0] == p.question.split(". ")[0] + "."
        assert lines[-1] == f"#### {answer}"
        assert len(lines) == ops + 2
        # Each chain line does one step of arithmetic; check it and that the steps chain together.
        running = counts[0]
        for line, expected in zip(lines[1:-1], counts[1:], strict=True):
            m = STEP.match(line)
            assert m, line
            x, op, b, y = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
            assert x == running and y == (x + b if op == "+" else x - b) == expected
            running = y
        assert extract_answer(p.reference, "number") == p.gold
    assert n_ops == {2, 3}


def test_steps_range():
    for lo, hi in [(1, 1), (4, 5)]:
        ops = {_solve(p.question)[1] for p in generate_problems(100, seed=1, steps=(lo, hi))}
        assert ops == set(range(lo, hi + 1))
    with pytest.raises(ValueError):
        generate_problems(5, seed=0, steps=(3, 2))


def test_answers_are_spread():
    # A task whose answers cluster on a few values can be gamed without arithmetic.
    golds = [int(p.gold) for p in generate_problems(1000, seed=0)]
    assert len(set(golds)) >= 20
    assert max(golds.count(g) for g in set(golds)) < 0.1 * len(golds)


def test_default_task_files(tmp_path):
    paths = write_default_task(tmp_path / "task", n_train=300, n_test=50, seed=7)
    assert set(paths) == {"train", "test"}
    for split, n in (("train", 300), ("test", 50)):
        lines = paths[split].read_text().splitlines()
        assert len(lines) == n
        assert all(set(json.loads(line)) == {"question", "answer"} for line in lines)
    train, test = read_examples(paths["train"], "gsm8k"), read_examples(paths["test"], "gsm8k")
    assert not {e.question for e in train} & {e.question for e in test}
    assert all(e.gold == str(_solve(e.question)[0]) for e in train + test)
    # The test split depends on the seed only, not on the training set size.
    again = write_default_task(tmp_path / "other", n_train=20, n_test=50, seed=7)
    assert again["test"].read_text() == paths["test"].read_text()
    different = write_default_task(tmp_path / "seed8", n_train=20, n_test=50, seed=8)
    assert different["test"].read_text() != paths["test"].read_text()
