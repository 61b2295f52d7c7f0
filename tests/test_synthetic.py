"""The embedded synthetic task: determinism, disjoint splits, GSM8K format and correct arithmetic; task
"forms" (three solution strategies, uneven frequencies) and task "v1" (the first generator, byte for byte)."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter

import pytest

from aft_fast.data.answers import extract_answer
from aft_fast.data.chains import FORMS, check_chain
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
    problems = generate_problems(400, seed=0, task="v1")
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


# Task v1 as the first generator wrote it (copied from its output before task "forms" existed).
V1_SEED5 = [
    (
        "Mia has 12 apples. She sells 10. She sells 2. How many apples does Mia have now?",
        "Mia has 12 apples.\nShe sells 10, so she has 12 - 10 = 2.\nShe sells 2, so she has 2 "
        "- 2 = 0.\n#### 0",
        "0",
    ),
    (
        "Zoe has 9 books. She buys 9 more. She sells 3. She buys 7 more. How many books does Zoe have now?",
        "Zoe has 9 books.\nShe buys 9 more, so she has 9 + 9 = 18.\nShe sells 3, so she has 18 "
        "- 3 = 15.\nShe buys 7 more, so she has 15 + 7 = 22.\n#### 22",
        "22",
    ),
    (
        "Emma has 3 coins. Leo gives her 6 more. She finds 4 more. How many coins does Emma have now?",
        "Emma has 3 coins.\nLeo gives her 6 more, so she has 3 + 6 = 9.\nShe finds 4 more, so "
        "she has 9 + 4 = 13.\n#### 13",
        "13",
    ),
]
V1_TRAIN_SEED1 = (
    '{"question": "Zoe has 21 shells. Emma gives her 5 more. She loses 3. How many shells '
    'does Zoe have now?", "answer": "Zoe has 21 shells.\\nEmma gives her 5 more, so she '
    'has 21 + 5 = 26.\\nShe loses 3, so she has 26 - 3 = 23.\\n#### 23"}\n{"question": '
    '"Mia has 14 books. She finds 5 more. She finds 8 more. How many books does Mia have '
    'now?", "answer": "Mia has 14 books.\\nShe finds 5 more, so she has 14 + 5 = 19.\\nShe '
    'finds 8 more, so she has 19 + 8 = 27.\\n#### 27"}\n'
)
V1_TEST_SEED1 = (
    '{"question": "Eva has 18 shells. Zoe gives her 6 more. She gives 11 to Mia. How many '
    'shells does Eva have now?", "answer": "Eva has 18 shells.\\nZoe gives her 6 more, so '
    "she has 18 + 6 = 24.\\nShe gives 11 to Mia, so she has 24 - 11 = 13.\\n#### "
    '13"}\n{"question": "Ben has 6 eggs. He gives 2 to Eva. He finds 7 more. How many eggs '
    'does Ben have now?", "answer": "Ben has 6 eggs.\\nHe gives 2 to Eva, so he has 6 - 2 '
    '= 4.\\nHe finds 7 more, so he has 4 + 7 = 11.\\n#### 11"}\n'
)
# sha256 of the first generator's write_default_task(n_train=400, n_test=100, seed=0) files.
V1_SHA256 = {
    "train": "b376cfd4e8e246bb6187ce9a43c850acb27f6730e96cf23de75d3017651ec864",
    "test": "578cf90b030fabbe6bfbabaf1e1c9bee4d1f66852df189b7de0c0c55955cead5",
}


def test_v1_is_the_first_generator_byte_for_byte(tmp_path):
    got = [(p.question, p.reference, p.gold) for p in generate_problems(3, seed=5, task="v1")]
    assert got == V1_SEED5
    paths = write_default_task(tmp_path / "small", n_train=2, n_test=2, seed=1, task="v1")
    assert paths["train"].read_text() == V1_TRAIN_SEED1
    assert paths["test"].read_text() == V1_TEST_SEED1
    paths = write_default_task(tmp_path / "large", n_train=400, n_test=100, seed=0, task="v1")
    for split, digest in V1_SHA256.items():
        assert hashlib.sha256(paths[split].read_bytes()).hexdigest() == digest, split


def test_forms_pose_the_v1_questions():
    # Only the references differ between the tasks: same questions, same golds, in the same order.
    v1, forms = generate_problems(300, seed=2, task="v1"), generate_problems(300, seed=2)
    assert [(p.question, p.gold) for p in v1] == [(p.question, p.gold) for p in forms]
    assert sum(a.reference != b.reference for a, b in zip(v1, forms, strict=True)) > 60


def test_forms_every_reference_checks_and_answers():
    problems = generate_problems(3000, seed=0)
    forms = Counter()
    for p in problems:
        answer = _solve(p.question)[0]
        assert p.gold == str(answer)
        check = check_chain(p.question, p.reference)
        assert check.ok, (check, p.reference)
        assert extract_answer(p.reference, "number") == p.gold
        assert p.reference.splitlines()[-1] == f"#### {answer}"
        forms[check.form] += 1
    assert set(forms) == set(FORMS)
    # 0.6 / 0.3 / 0.1 over 3000 draws: binomial SE at most 0.009, so 0.035 is about 4 SE.
    for form, want in zip(FORMS, (0.6, 0.3, 0.1), strict=True):
        assert abs(forms[form] / len(problems) - want) < 0.035, (form, forms)


def test_forms_wording():
    # Each form's own recognisable wording, read off the text (not through the checker).
    problems = generate_problems(500, seed=4)
    seen = set()
    for p in problems:
        lines = p.reference.splitlines()
        if ", so " in lines[1]:
            seen.add("running_total")
            assert all(", so " in line for line in lines[1:-1])
        elif "in all." in lines[1]:
            seen.add("gains_losses")
            assert lines[-2].startswith("So ") and all("in all." in line for line in lines[1:-2])
        else:
            assert re.fullmatch(r"(His|Her) \w+ change by .+\.", lines[1]), lines[1]
            assert len(lines) == 4 and lines[2].startswith("So ")
            seen.add("net_change")
    assert seen == set(FORMS)


def test_forms_deterministic_and_task_checked(tmp_path):
    a, b = generate_problems(200, seed=3), generate_problems(200, seed=3)
    assert a == b
    paths = write_default_task(tmp_path / "a", 50, 30, seed=3)
    again = write_default_task(tmp_path / "b", 50, 30, seed=3)
    assert paths["train"].read_bytes() == again["train"].read_bytes()
    assert paths["test"].read_bytes() == again["test"].read_bytes()
    test = read_examples(paths["test"], "gsm8k")
    assert len({check_chain(e.question, e.reference).form for e in test}) >= 2  # test references vary too
    with pytest.raises(ValueError, match="synthetic_task"):
        generate_problems(3, seed=0, task="v2")
    with pytest.raises(ValueError, match="synthetic_task"):
        write_default_task(tmp_path / "c", 3, 3, task="nope")
