"""The step checker for GSM8K-style chains (aft_fast/data/steps.py): reasoning-gym's gsm_symbolic reference
chains (the share that passes, and why the rest do not), GSM8K lines with calculator notes, commas, decimals
and every operator sign, chains with one number changed (all rejected), what it leaves unjudged, and the
one label rule that sample, eval and the candidate files share."""

from __future__ import annotations

import re
from collections import defaultdict
from decimal import Decimal
from random import Random

import pytest

from aft_fast.data.candidates import CandidateGroup, label_candidates, label_rule
from aft_fast.data.chains import check_chain, checker_of, is_checkable
from aft_fast.data.steps import check_steps, read_steps

# ---------------------------------------------------------------------------------------------------------
# gsm_symbolic's own reference chains.

PER_TEMPLATE = 4
# Templates whose references the checker does not pass, and why (read off the chains themselves):
# 66 derives the answer in words ("Thus, W = 4 episodes"), so no statement computes it; 83 solves
# "2x+90=252" by algebra, which the checker leaves unjudged, so nothing is checked.
UNREADABLE = {66: "no statement's result", 83: "no arithmetic statement"}
# 49 and 99 truncate floats, so a statement (and the gold answer) is off by one ("935.0 / 0.55 = 1699").
FALSE_STEPS = {49, 99}


@pytest.fixture(scope="module")
def references() -> list[tuple[int, str]]:
    """(template, reference chain): PER_TEMPLATE problems of each template reasoning-gym marks as sound."""
    gs = pytest.importorskip("reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic")
    generators = gs.GSMSymbolicDataset(gs.GSMSymbolicDatasetConfig(size=1, seed=0)).generators
    out = []
    for t in gs.tasks_ok:
        for k in range(PER_TEMPLATE):
            example = generators[t](Random(1000 * t + k), 1.0)
            out.append((t, example["metadata"]["answer_cot"]))
    return out


_EXPR_CHARS = re.compile(r"[^0-9.+\-*/() ]")


def _python_value(text: str) -> float:
    """The left side of a statement evaluated by Python itself: signs mapped, units and currency dropped."""
    left = text.split("=")[0].replace("×", "*").replace("÷", "/").replace(" x ", " * ")
    return eval(_EXPR_CHARS.sub("", left))  # noqa: S307 (digits, operators and parentheses only)


def test_gsm_symbolic_references(references):
    failed: dict[int, list[str]] = defaultdict(list)
    for t, chain in references:
        c = check_steps(chain)
        if not c.ok:
            failed[t].append(c.error or "")
    share = 1 - sum(map(len, failed.values())) / len(references)
    print(f"\nstep checker on {len(references)} gsm_symbolic references: {100 * share:.1f}% pass")
    assert share >= 0.95
    assert set(failed) <= set(UNREADABLE) | FALSE_STEPS, dict(failed)
    for t, why in UNREADABLE.items():
        assert len(failed[t]) == PER_TEMPLATE and all(why in e for e in failed[t]), failed[t]
    # Where a false step is reported, Python's own arithmetic agrees that the statement is false.
    for t, chain in references:
        for s in read_steps(chain):
            if not s.ok:
                assert t in FALSE_STEPS, (t, s.text)
                assert abs(_python_value(s.text) - float(s.right)) >= 1, s.text


# Every "a op b = c" in a chain, found by the test's own pattern (not the checker's).
_SIMPLE = re.compile(
    r"(?<![\d.,])(\d+(?:\.\d+)?)\s*([+\-*x×/÷])\s*[$€£]?(\d+(?:\.\d+)?)\s*=\s*[$€£]?(\d+(?:\.\d+)?)(?![\d.]\d)"
)


def _bump(number: str, units: int) -> str:
    """`number` with its last written digit moved by `units`."""
    if "." in number:
        d = len(number.split(".")[1])
        return str(Decimal(number) + Decimal(units).scaleb(-d))
    return str(int(number) + units)


def test_one_number_changed_is_rejected(references):
    """Results moved by 2 in their last digit (past any rounding) and, in integer sums and differences,
    the second operand moved by 1: every such chain is rejected."""
    tried = 0
    for t, chain in references:
        if not check_steps(chain).ok:
            continue
        for m in _SIMPLE.finditer(chain):
            a, op, b, c = m.groups()
            changes = [(m.span(4), _bump(c, 2))]
            if op in "+-" and "." not in a + b + c:
                changes.append((m.span(3), _bump(b, 1)))
            for (lo, hi), new in changes:
                changed = chain[:lo] + new + chain[hi:]
                tried += 1
                assert not check_steps(changed).ok, f"template {t}: {m.group(0)!r} -> {new}\n{changed}"
    assert tried > 500


# ---------------------------------------------------------------------------------------------------------
# GSM8K-format chains written here.

GSM8K = {
    # chain: the statements the checker must read (calculator notes count on their own)
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72": 4,
    "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
    "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10": 4,
    "In the beginning, Betty has only 100 / 2 = $<<100/2=50>>50.\n"
    "Betty's grandparents gave her 15 * 2 = $<<15*2=30>>30.\n"
    "This means, Betty needs 100 - 50 - 30 - 15 = $<<100-50-30-15=5>>5 more.\n#### 5": 6,
    "The agent takes $1,200,000 x 0.05 = $<<1200000*0.05=60000>>60,000.\n"
    "Split four ways, that is 60,000 ÷ 4 = $15,000 each.\n#### 15000": 3,
    "Each box holds 2.5 × 4 = 10 kg, and 3 boxes hold 3 * 10 = 30 kg.\n#### 30": 2,
    "It was 5 - 7 = <<5-7=-2>>-2 degrees at night.\n#### -2": 2,
    "She walks at 2 * 1/4 = 1/2 blocks per minute, so 10 blocks take 10÷1/2=20 minutes.\n#### 20": 2,
    "The room's perimeter is 2(73+57) = 260 feet and 25% of 80 = 20 tiles are blue.\n#### 260": 2,
    "3 times 4 plus 2 = 14 apples, and 14 divided by 7 = 2 baskets.\nThe answer is 2.": 2,
    "He pays $\\frac{12}{4} \\times 3 = 9$ dollars.\n#### 9": 1,
    "She has 5+3=8*2=16 stickers, and 75 + 38 = 113 = 100 + 13.\n#### 16": 3,  # a run-on, then a chain
}


@pytest.mark.parametrize("chain", list(GSM8K), ids=range(len(GSM8K)))
def test_gsm8k_chains_pass(chain):
    c = check_steps(chain)
    assert c.ok, (c.error, [s.text for s in c.steps])
    assert len(c.steps) == GSM8K[chain], [s.text for s in c.steps]


@pytest.mark.parametrize(
    ("chain", "where"),
    [
        (
            "Natalia sold 48/2 = <<48/2=24>>25 clips in May.\nShe sold 48+25 = <<48+25=73>>73.\n#### 73",
            "line 1",
        ),
        ("Natalia sold 48/2 = <<48/2=25>>25 clips in May.\n#### 25", "<<48/2=25>>"),
        ("The agent takes $1,200,000 x 0.05 = $61,000.\n#### 61000", "1,200,000"),
        ("Each box holds 2.5 × 4 = 10.5 kg.\n#### 10.5", "2.5"),
        ("It was 5 - 7 = -3 degrees.\n#### -3", "5 - 7"),
        ("She needs 143 / 22 = 5 racks.\n#### 5", "143 / 22"),  # 6.5: neither rounded, floored nor ceiled
        ("2 + 12 = 13 cards, then 13 + 8 = 21 cards.\n#### 21", "2 + 12"),  # errors that cancel
        ("She has 5+3=9*2=18 stickers.\n#### 18", "5 + 3 = 9 * 2"),  # a false run-on
    ],
)
def test_changed_numbers_rejected(chain, where):
    c = check_steps(chain)
    assert not c.ok and c.error is not None and "is false" in c.error and where in c.error, c.error


def test_rounding_to_the_written_digits():
    assert check_steps("7 / 3 = 2.33 each\n#### 2.33").ok
    assert check_steps("0.52 * 80 = 41 whole students\n#### 41").ok  # floored
    assert check_steps("143 / 22 = 7 racks to hold them all\n#### 7").ok  # ceiled
    assert check_steps("7 / 3 = 2.3 each\n#### 2.3").ok  # 2.33... at one digit
    assert not check_steps("7 / 3 = 2.35 each\n#### 2.35").ok
    assert not check_steps("13 * 11 = 143.4 muffins\n#### 143.4").ok  # exact at one digit: must equal


def test_what_is_left_unjudged():
    """Algebra, restatements and unreadable clauses are neither true nor false: no statement is read."""
    for text in (
        "We get 2x+90=252, so x=81.",
        "1 dozen = 12 eggs.",
        "Patricia = 454 points.",
        "Let T be the tube: 75 + 38 + 32 + T = 145 + T = 210.",
    ):
        assert read_steps(text) == [], (text, [s.text for s in read_steps(text)])
    c = check_steps("The answer is 8.\n#### 8")
    assert not c.ok and c.error == "no arithmetic statement to check"
    c = check_steps("3 + 5 = 8 apples.\n#### 16")  # a right answer the chain never computes
    assert not c.ok and "no statement's result" in (c.error or "")


# ---------------------------------------------------------------------------------------------------------
# One checker per question, one label rule for every stage.

GSM_Q = "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many in all?"
AQUA_Q = "What is 2 + 2?\nAnswer Choices: (A) 3 (B) 4 (C) 5 (D) 6 (E) 7"


def test_checker_per_question():
    assert checker_of(GSM_Q) == "steps" and is_checkable(GSM_Q)
    assert checker_of(AQUA_Q) is None and not is_checkable(AQUA_Q)
    embedded = "Mia has 7 shells. She finds 5 more. How many shells does Mia have now?"
    assert checker_of(embedded) == "forms"
    chain = next(iter(GSM8K))
    assert check_chain(GSM_Q, chain).ok and check_chain(GSM_Q, chain).form is None
    with pytest.raises(ValueError, match="multiple-choice"):
        check_chain(AQUA_Q, "2 + 2 = 4\n#### B")


def test_verified_labels_on_gsm8k_questions():
    right = "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips in all.\n#### 72"
    cancel = "Natalia sold 48/2 = 25 clips in May.\nNatalia sold 48+25 = 72 clips in all.\n#### 72"
    wrong = "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips in all.\n#### 73"
    group = CandidateGroup("g", GSM_Q, "72", "number", None)
    by_answer = label_candidates(group, [right, cancel, wrong], "answer")
    verified = label_candidates(group, [right, cancel, wrong], "verified")
    assert by_answer.labels() == [1, 1, 0] and verified.labels() == [1, 0, 0]
    assert [c.chain_ok for c in verified.candidates] == [True, False, False]
    table = {
        (a, ok): (label_rule("answer", a, ok), label_rule("verified", a, ok))
        for a in (True, False)
        for ok in (True, False, None)
    }
    assert table == {
        (True, True): (True, True),
        (True, False): (True, False),
        (True, None): (True, False),
        (False, True): (False, False),
        (False, False): (False, False),
        (False, None): (False, False),
    }
    with pytest.raises(ValueError, match="label: 'verified'.*multiple choice"):
        label_candidates(CandidateGroup("a", AQUA_Q, "B", "option", None), ["#### B"], "verified")
