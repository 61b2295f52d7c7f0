"""The chain checker on hand-written chains: right ones of every form, and each way a chain can be wrong
(a false equation, a true equation not built on the previous result, errors that cancel, a wrong final
line, a step the question does not have)."""

from __future__ import annotations

import pytest

from aft_fast.data.chains import FORMS, ChainCheck, check_chain, checker_of, is_checkable, parse_question

# start 7; changes +5, -3, +4; answer 13.
Q = (
    "Mia has 7 shells. She finds 5 more. She gives 3 to Ben. She buys 4 more. "
    "How many shells does Mia have now?"
)

RIGHT = {
    "running_total": (
        "Mia has 7 shells.\n"
        "She finds 5 more, so she has 7 + 5 = 12.\n"
        "She gives 3 to Ben, so she has 12 - 3 = 9.\n"
        "She buys 4 more, so she has 9 + 4 = 13.\n"
        "#### 13"
    ),
    "gains_losses": (
        "Mia has 7 shells.\nShe gets 5 + 4 = 9 more in all.\nShe gives away 3 in all.\n"
        "So she has 7 + 9 - 3 = 13.\n#### 13"
    ),
    "net_change": "Mia has 7 shells.\nHer shells change by 5 - 3 + 4 = 6.\nSo she has 7 + 6 = 13.\n#### 13",
}


def _wrong(form: str, chain: str, *words: str) -> None:
    c = check_chain(Q, chain)
    assert not c.ok and c.form == form, c
    assert c.error is not None
    for w in words:
        assert w in c.error, c.error


def test_question_reading():
    q = parse_question(Q)
    assert q is not None and (q.name, q.item, q.start, q.changes, q.answer) == (
        "Mia",
        "shells",
        7,
        (5, -3, 4),
        13,
    )
    assert is_checkable(Q)
    assert is_checkable("Ben has 6 eggs. Eva gives him 2 more. He sells 7. How many eggs does Ben have now?")
    for other in (
        "Natalia sold clips to 48 of her friends in April. How many clips did she sell?",  # GSM8K
        "Mia has 7 shells. She eats 2. How many shells does Mia have now?",  # an unknown event
        "Mia has 7 shells. She finds 5 more. How many pens does Mia have now?",  # asks about another item
        "",
    ):
        # Not the embedded task: the step checker judges their chains (tests/test_steps.py).
        assert parse_question(other) is None and checker_of(other) == "steps", other
    assert check_chain("What is 2 + 2?", "2 + 2 = 4\n#### 4") == ChainCheck(True, None, None)
    with pytest.raises(ValueError, match="multiple-choice question has no checker"):
        check_chain("What is 2 + 2?\nAnswer Choices: (A) 3 (B) 4", "#### B")


@pytest.mark.parametrize("form", FORMS)
def test_right_chains(form):
    c = check_chain(Q, RIGHT[form])
    assert c.ok and c.form == form and c.error is None, c
    # Blank lines and surrounding spaces are not steps.
    assert check_chain(Q, "\n  " + RIGHT[form].replace("\n", " \n\n") + "\n").ok


def test_running_total_wrong():
    r = RIGHT["running_total"]
    _wrong("running_total", r.replace("7 + 5 = 12", "7 + 5 = 11"), "line 2", "7 + 5 = 11 is false")
    # Every equation true, but line 3 does not start from line 2's result.
    _wrong(
        "running_total",
        r.replace("12 - 3 = 9", "13 - 3 = 10")
        .replace("9 + 4 = 13", "10 + 4 = 14")
        .replace("#### 13", "#### 14"),
        "line 3",
        "starts from 13",
        "12",
    )
    # Applies a change the question does not have (true arithmetic).
    _wrong(
        "running_total", r.replace("12 - 3 = 9", "12 - 2 = 10").replace("9 + 4", "10 + 4 = 14 x"), "line 3"
    )
    _wrong(
        "running_total", r.replace("12 - 3 = 9", "12 + 3 = 15").replace("9 + 4 = 13", "15 + 4 = 19"), "line 3"
    )
    # A step missing, and a final line that differs from the last result.
    lines = r.splitlines()
    _wrong("running_total", "\n".join(lines[:3] + lines[4:]), "2 step lines", "3 changes")
    _wrong("running_total", r.replace("#### 13", "#### 12"), "answers 12", "last result is 13")
    _wrong("running_total", r.replace("#### 13", "So 13."), "####")
    _wrong("running_total", r.replace("Mia has 7 shells.", "Mia has 8 shells."), "line 1", "8")


def test_errors_that_cancel_reach_the_gold_but_fail():
    # The label noise of the first task: two false equations, the gold answer at the end.
    q = "Sam has 2 cards. He buys 12 more. He finds 4 more. He sells 3. How many cards does Sam have now?"
    chain = (
        "Sam has 2 cards.\nHe buys 12 more, so he has 2 + 12 = 13.\nHe finds 4 more, so he has 13 + 4 = 18.\n"
        "He sells 3, so he has 18 - 3 = 15.\n#### 15"
    )
    assert parse_question(q).answer == 15
    c = check_chain(q, chain)
    assert not c.ok and c.form == "running_total" and "2 + 12 = 13 is false" in c.error, c
    q2 = (
        "Sam has 2 cards. He buys 12 more. He finds 4 more. He finds 3 more. "
        "How many cards does Sam have now?"
    )
    chain2 = (
        "Sam has 2 cards.\nHe buys 12 more, so he has 2 + 12 = 13.\nHe finds 4 more, so he has 13 + 4 = 18.\n"
        "He finds 3 more, so he has 18 + 3 = 21.\n#### 21"
    )
    assert parse_question(q2).answer == 21
    c = check_chain(q2, chain2)
    assert not c.ok and "line 2" in c.error and "2 + 12 = 13" in c.error


def test_gains_losses_wrong():
    r = RIGHT["gains_losses"]
    _wrong(
        "gains_losses",
        r.replace("5 + 4 = 9", "5 + 4 = 10").replace("7 + 9 - 3", "7 + 10 - 3 = 14 x"),
        "line 2",
    )
    _wrong(
        "gains_losses",
        r.replace("5 + 4 = 9", "5 + 4 = 10").replace("7 + 9 - 3 = 13", "7 + 10 - 3 = 14"),
        "false",
    )
    # True sums of the wrong numbers, and a true final step that ignores the gains line.
    _wrong(
        "gains_losses",
        r.replace("5 + 4 = 9", "5 + 3 = 8").replace("7 + 9 - 3 = 13", "7 + 8 - 3 = 12"),
        "5 + 4",
    )
    _wrong("gains_losses", r.replace("7 + 9 - 3 = 13", "7 + 8 - 2 = 13"), "line 4", "7 + 9 - 3")
    # Cancelling errors: 5 + 4 = 10 (false) and 7 + 10 - 3 = 13 (false) reach the gold.
    c = check_chain(Q, r.replace("5 + 4 = 9", "5 + 4 = 10").replace("7 + 9 - 3 = 13", "7 + 10 - 3 = 13"))
    assert not c.ok and "5 + 4 = 10 is false" in c.error
    # The losses line left out; a losses line for a question with none.
    _wrong(
        "gains_losses", r.replace("She gives away 3 in all.\n", "").replace(" - 3 = 13", " = 16"), "losses"
    )
    q = "Mia has 7 shells. She finds 5 more. She buys 4 more. How many shells does Mia have now?"
    ok = "Mia has 7 shells.\nShe gets 4 + 5 = 9 more in all.\nSo she has 7 + 9 = 16.\n#### 16"
    assert check_chain(q, ok).ok  # any order of the gains
    bad = (
        "Mia has 7 shells.\nShe gets 4 + 5 = 9 more in all.\nShe gives away 0 in all.\n"
        "So she has 7 + 9 - 0 = 16.\n#### 16"
    )
    assert not check_chain(q, bad).ok


def test_net_change_wrong():
    r = RIGHT["net_change"]
    _wrong(
        "net_change", r.replace("5 - 3 + 4 = 6", "5 - 3 + 4 = 7").replace("7 + 6 = 13", "7 + 7 = 14"), "false"
    )
    # True net of other numbers; a true last step not built on the net.
    _wrong(
        "net_change",
        r.replace("5 - 3 + 4 = 6", "5 - 2 + 4 = 7").replace("7 + 6 = 13", "7 + 7 = 14"),
        "line 2",
    )
    _wrong("net_change", r.replace("7 + 6 = 13", "8 + 5 = 13"), "line 3", "7 + 6")
    _wrong(
        "net_change", r.replace("7 + 6 = 13", "7 + 6 = 12").replace("#### 13", "#### 12"), "line 3", "false"
    )
    # A loss first: a negative net change, then a subtraction.
    q = "Ben has 9 eggs. He sells 6. Eva gives him 2 more. How many eggs does Ben have now?"
    assert check_chain(q, "Ben has 9 eggs.\nHis eggs change by -6 + 2 = -4.\nSo he has 9 - 4 = 5.\n#### 5").ok
    c = check_chain(q, "Ben has 9 eggs.\nHis eggs change by -6 + 2 = -4.\nSo he has 9 + 4 = 13.\n#### 13")
    assert not c.ok and "line 3" in c.error


def test_unrecognised_and_mixed():
    for chain in ("#### 13", "Mia has 7 shells.\nShe thinks hard.\n#### 13", ""):
        c = check_chain(Q, chain)
        assert c == type(c)(False, None, c.error) and c.error
    # Opens as a running total, then switches form.
    mixed = (
        "Mia has 7 shells.\nShe finds 5 more, so she has 7 + 5 = 12.\nSo she has 12 - 3 + 4 = 13.\n#### 13"
    )
    _wrong("running_total", mixed, "line 3")
    # Extra text after a right chain.
    _wrong("net_change", RIGHT["net_change"].replace("#### 13", "She is happy.\n#### 13"))
