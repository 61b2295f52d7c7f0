"""Candidate files: reading the schema, validation errors, atomic round trips and labeling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aft_fast.data.candidates import (
    Candidate,
    CandidateGroup,
    label_candidates,
    read_candidates,
    relabel,
    write_candidates,
)
from aft_fast.data.formats import DataError, read_examples

DATA = Path(__file__).parent / "data"


def _write(path: Path, objs: list) -> Path:
    path.write_text("\n".join(o if isinstance(o, str) else json.dumps(o) for o in objs) + "\n")
    return path


def _raises(path: Path, line: int, *words: str) -> None:
    with pytest.raises(DataError) as info:
        read_candidates(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:{line}: "), msg
    for w in words:
        assert w in msg, msg


GOOD = {"id": "g0", "question": "q", "gold": "7", "candidates": [{"text": "#### 7", "correct": True}]}


def test_read_sample():
    path = DATA / "candidates_sample.jsonl"
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    groups = read_candidates(path)
    assert [g.id for g in groups] == [r["id"] for r in raw]
    g0, g1 = groups
    assert g0.kind == "number" and g1.kind == "option"  # g0 omits "kind": inferred from its gold
    assert g0.reference == raw[0]["reference"] and g1.reference is None
    assert [c.text for c in g0.candidates] == [c["text"] for c in raw[0]["candidates"]]
    assert g0.labels() == [int(c["correct"]) for c in raw[0]["candidates"]]
    assert g1.labels() == [c["rank"] for c in raw[1]["candidates"]]
    assert [c.ref_logp for c in g0.candidates] == [c["ref_logp"] for c in raw[0]["candidates"]]


def test_round_trip(tmp_path):
    groups = read_candidates(DATA / "candidates_sample.jsonl")
    groups.append(
        CandidateGroup(
            "extra",
            "Q?",
            "0.5",
            "number",
            None,
            [Candidate("a"), Candidate("b", correct=False, ref_logp=-3.25), Candidate("ü ½", correct=True)],
        )
    )
    groups.append(CandidateGroup("empty", "Q2?", "1", "number", "#### 1", []))
    path = tmp_path / "out" / "cands.jsonl"
    write_candidates(path, groups)
    assert read_candidates(path) == groups
    # Unset optional fields are left out of the file.
    extra = json.loads(path.read_text().splitlines()[2])
    assert extra["candidates"][0] == {"text": "a"} and "reference" not in extra


def test_write_is_atomic(tmp_path):
    path = tmp_path / "c.jsonl"
    groups = read_candidates(DATA / "candidates_sample.jsonl")
    write_candidates(path, groups)
    before = path.read_bytes()

    def failing():
        yield groups[0]
        raise RuntimeError("sampler crashed")

    with pytest.raises(RuntimeError):
        write_candidates(path, failing())
    assert path.read_bytes() == before  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]  # no temp file left behind


def test_validation_errors(tmp_path):
    cases = [
        ("[1, 2", "bad JSON"),
        ("[1, 2]", "object"),
        ({k: v for k, v in GOOD.items() if k != "gold"}, "'gold'"),
        ({k: v for k, v in GOOD.items() if k != "candidates"}, "'candidates'"),
        ({**GOOD, "candidates": {"text": "x"}}, "list"),
        ({**GOOD, "candidates": ["x"]}, "candidates[0]"),
        ({**GOOD, "candidates": [{"correct": True}]}, "'text'"),
        ({**GOOD, "candidates": [{"text": "x", "correct": "yes"}]}, "'correct'"),
        ({**GOOD, "candidates": [{"text": "x", "rank": 2.5}]}, "'rank'"),
        ({**GOOD, "candidates": [{"text": "x", "rank": True}]}, "'rank'"),
        ({**GOOD, "candidates": [{"text": "x", "ref_logp": "low"}]}, "'ref_logp'"),
        (
            {**GOOD, "candidates": [{"text": "x", "rank": 1}, {"text": "y", "correct": False}]},
            "rank all or none",
        ),
        ({**GOOD, "kind": "letter"}, "'kind'"),
        ({**GOOD, "question": ""}, "'question'"),
        ({**GOOD, "id": None}, "'id'"),
        ({**GOOD, "gold": True}, "'gold'"),
        ({**GOOD, "reference": 3}, "'reference'"),
    ]
    for n, (bad, word) in enumerate(cases):
        path = _write(tmp_path / f"c{n}.jsonl", [GOOD | {"id": "first"}, "", bad])
        _raises(path, 3, word)


def test_duplicate_id_and_empty_file(tmp_path):
    _raises(_write(tmp_path / "d.jsonl", [GOOD, GOOD]), 2, "duplicate", "line 1")
    (tmp_path / "e.jsonl").write_text("")
    _raises(tmp_path / "e.jsonl", 1, "empty")
    (tmp_path / "b.jsonl").write_text("\n\n")
    _raises(tmp_path / "b.jsonl", 1, "empty")


def test_lenient_spellings(tmp_path):
    # A numeric gold written as a JSON number, an integral float rank, and unknown keys all load.
    obj = {
        "id": 5,
        "question": "q",
        "gold": 72,
        "temperature": 1.0,
        "candidates": [{"text": "a", "rank": 2.0, "answer": "72"}, {"text": "b", "rank": 0}],
    }
    (g,) = read_candidates(_write(tmp_path / "l.jsonl", [obj]))
    assert (g.id, g.gold, g.kind, g.labels()) == ("5", "72", "number", [2, 0])


def test_label_candidates_dedupes_and_labels():
    (ex,) = [e for e in read_examples(DATA / "gsm8k_sample.jsonl") if e.gold == "72"]
    group = CandidateGroup.from_example(ex)
    texts = [
        "48/2 = 24, 48 + 24 = 72.\n#### 72",
        "48 + 48 = 96\n#### 96",
        "48/2 = 24, 48 + 24 = 72.\n#### 72",  # exact duplicate: dropped
        "48/2 = 24, 48 + 24 = 72.\n#### 72 ",  # differs by a space: kept
        "The answer is 72.0",
        "I am not sure.",
    ]
    out = label_candidates(group, texts)
    assert [c.text for c in out.candidates] == [texts[0], texts[1], texts[3], texts[4], texts[5]]
    assert out.labels() == [1, 0, 1, 1, 0]
    assert (out.id, out.gold, out.reference) == (ex.id, ex.gold, ex.reference)
    assert group.candidates == []  # the input group is not modified

    opt = CandidateGroup("o", "q\nAnswer Choices: (A) 1 (B) 2", "B", "option", None, [])
    assert label_candidates(opt, ["so 2.\n#### B", "Answer: A", "(B)"]).labels() == [1, 0, 1]


def test_labels_need_a_label():
    g = CandidateGroup("g", "q", "1", "number", None, [Candidate("x", correct=True), Candidate("y")])
    with pytest.raises(ValueError, match="candidate 1"):
        g.labels()
    g = CandidateGroup("g", "q", "1", "number", None, [Candidate("x", rank=3), Candidate("y", correct=True)])
    with pytest.raises(ValueError, match="mixes"):
        g.labels()


# An embedded-task question (start 2; +12, +4, +3; answer 21) and chains the two label rules disagree on.
SYN_Q = (
    "Sam has 2 cards. He buys 12 more. He finds 4 more. He finds 3 more. How many cards does Sam have now?"
)
SYN_RIGHT = (
    "Sam has 2 cards.\nHe buys 12 more, so he has 2 + 12 = 14.\nHe finds 4 more, so he has 14 + 4 = 18.\n"
    "He finds 3 more, so he has 18 + 3 = 21.\n#### 21"
)
SYN_CANCEL = SYN_RIGHT.replace("2 + 12 = 14", "2 + 12 = 13").replace("14 + 4 = 18", "13 + 4 = 18")
SYN_NET = "Sam has 2 cards.\nHis cards change by 12 + 4 + 3 = 19.\nSo he has 2 + 19 = 21.\n#### 21"
SYN_WRONG = SYN_RIGHT.replace("18 + 3 = 21.\n#### 21", "18 + 3 = 22.\n#### 22")


def _syn_group() -> CandidateGroup:
    return CandidateGroup("s0", SYN_Q, "21", "number", SYN_RIGHT, [])


def test_label_rules_on_the_embedded_task():
    texts = [SYN_RIGHT, SYN_CANCEL, SYN_NET, SYN_WRONG, "no idea"]
    by_answer = label_candidates(_syn_group(), texts)
    verified = label_candidates(_syn_group(), texts, "verified")
    assert by_answer.labels() == [1, 1, 1, 0, 0]
    assert verified.labels() == [1, 0, 1, 0, 0]
    for g in (by_answer, verified):
        assert [c.answer_correct for c in g.candidates] == [True, True, True, False, False]
        assert [c.chain_ok for c in g.candidates] == [True, False, True, False, False]
        assert [c.form for c in g.candidates] == [
            "running_total",
            "running_total",
            "net_change",
            "running_total",
            None,
        ]
    # GSM8K: the step checker judges the chain (no form); a bare answer computes nothing.
    (ex,) = [e for e in read_examples(DATA / "gsm8k_sample.jsonl") if e.gold == "72"]
    g = label_candidates(CandidateGroup.from_example(ex), [ex.reference, "#### 72", "#### 5"], "verified")
    assert [(c.answer_correct, c.chain_ok, c.form, c.correct) for c in g.candidates] == [
        (True, True, None, True),
        (True, False, None, False),
        (False, False, None, False),
    ]
    # Multiple choice: no chain check; "verified" refuses, naming the config field.
    aqua = read_examples(DATA / "aqua_sample.json")[0]
    g = label_candidates(CandidateGroup.from_example(aqua), [f"#### {aqua.gold}"])
    assert [(c.answer_correct, c.chain_ok, c.form) for c in g.candidates] == [(True, None, None)]
    with pytest.raises(ValueError, match="label: 'verified'"):
        label_candidates(CandidateGroup.from_example(aqua), ["#### A"], "verified")
    with pytest.raises(ValueError, match="label: 'nope'"):
        label_candidates(_syn_group(), ["#### 21"], "nope")


def test_relabel_from_stored_fields(tmp_path):
    texts = [SYN_RIGHT, SYN_CANCEL, SYN_NET, SYN_WRONG]
    sampled = label_candidates(_syn_group(), texts)  # the answer rule, as sampled
    path = tmp_path / "c.jsonl"
    write_candidates(path, [sampled])
    (back,) = read_candidates(path)
    assert back == sampled  # the new fields survive the file
    (v,) = relabel([back], "verified")
    assert v.labels() == [1, 0, 1, 0]
    (a,) = relabel([v], "answer")
    assert a.labels() == [1, 1, 1, 0]
    assert back.labels() == [1, 1, 1, 0]  # relabel copies; the input is unchanged
    # An old file (no stored fields): the answer rule keeps its labels, verified refuses.
    old = tmp_path / "old.jsonl"
    _write(old, [GOOD])
    (g,) = relabel(read_candidates(old), "answer")
    assert g.labels() == [1]
    with pytest.raises(ValueError, match="label: 'verified'.*'answer_correct'"):
        relabel(read_candidates(old), "verified")
    # Ranked candidates keep their ranks under both rules.
    ranked = CandidateGroup(
        "r", SYN_Q, "21", "number", None, [Candidate("x", rank=2), Candidate("y", rank=0)]
    )
    assert relabel([ranked], "verified")[0].labels() == [2, 0]


def test_new_fields_on_disk(tmp_path):
    sampled = label_candidates(_syn_group(), [SYN_CANCEL, "no idea"])
    path = tmp_path / "c.jsonl"
    write_candidates(path, [sampled])
    (obj,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert obj["candidates"][0] == {
        "text": SYN_CANCEL,
        "correct": True,
        "answer_correct": True,
        "chain_ok": False,
        "form": "running_total",
    }
    assert obj["candidates"][1] == {
        "text": "no idea",
        "correct": False,
        "answer_correct": False,
        "chain_ok": False,
        "form": None,
    }
    # Stored nulls read back as None; a bad value names the field and line.
    bad = dict(GOOD, candidates=[{"text": "#### 7", "correct": True, "answer_correct": "yes"}])
    _raises(_write(tmp_path / "b1.jsonl", [GOOD | {"id": "g1"}, bad]), 2, "answer_correct")
    bad = dict(GOOD, candidates=[{"text": "#### 7", "correct": True, "form": "zigzag"}])
    _raises(_write(tmp_path / "b2.jsonl", [bad]), 1, "'form'")
    nulls = dict(
        GOOD, candidates=[{"text": "#### 7", "correct": True, "answer_correct": True, "chain_ok": None}]
    )
    (g,) = read_candidates(_write(tmp_path / "n.jsonl", [nulls]))
    assert (g.candidates[0].answer_correct, g.candidates[0].chain_ok, g.candidates[0].form) == (
        True,
        None,
        None,
    )


# --- the sample stage: label noise in its statistics and in <candidates>.meta.json -----------------------


def test_sample_stats_and_meta(tmp_path):
    from aft_fast.train.sample import group_stats, meta_path, write_meta

    # Answer-positives: RIGHT, CANCEL (a false step), NET; negative: WRONG. "verified" makes CANCEL negative.
    texts = [SYN_RIGHT, SYN_CANCEL, SYN_NET, SYN_WRONG, SYN_RIGHT]  # one duplicate
    for rule, positives, by_form in (
        ("answer", 3, {"running_total": 2, "net_change": 1}),
        ("verified", 2, {"running_total": 1, "net_change": 1}),
    ):
        groups = [label_candidates(_syn_group(), texts, rule)]
        s = group_stats(groups, sampled=5, seconds=1.0)
        assert (s.questions, s.candidates, s.positives, s.negatives, s.duplicates) == (
            1,
            4,
            positives,
            4 - positives,
            1,
        )
        assert (s.answer_positives, s.false_step) == (3, 1)
        assert s.false_step_pct == pytest.approx(100 / 3)
        assert s.positives_by_form == by_form
        assert "1 of 3 answer-positives have a false step (33.3%)" in s.noise_text()
        path = tmp_path / f"{rule}.jsonl"
        meta = json.loads(write_meta(path, s, label=rule, task="forms").read_text())
        assert meta_path(path) == tmp_path / f"{rule}.jsonl.meta.json"
        assert meta["label"] == rule and meta["task"] == "forms"
        assert (meta["groups"], meta["candidates"], meta["answer_positives"]) == (1, 4, 3)
        assert meta["answer_positives_false_step"] == 1
        assert meta["answer_positives_false_step_pct"] == pytest.approx(100 / 3)
        assert meta["positives_by_form"] == by_form
    # GSM8K: the step checker counts the answer-positive that computes nothing as noise.
    (ex,) = [e for e in read_examples(DATA / "gsm8k_sample.jsonl") if e.gold == "72"]
    texts = [ex.reference, "#### 72", "#### 1"]
    s = group_stats([label_candidates(CandidateGroup.from_example(ex), texts)], 3, 0.0)
    assert (s.answer_positives, s.false_step) == (2, 1)
    assert "1 of 2 answer-positives have a false step (50.0%)" in s.noise_text()
    # Multiple choice: nothing checked, and the statistics say so instead of reporting zero noise.
    aqua = read_examples(DATA / "aqua_sample.json")[0]
    s = group_stats([label_candidates(CandidateGroup.from_example(aqua), [f"#### {aqua.gold}"])], 1, 0.0)
    assert s.answer_positives == 1 and s.false_step is None and s.false_step_pct is None
    assert "not checked" in s.noise_text()


def _embedded_train_file(path: Path, n: int) -> Path:
    from aft_fast.data.synthetic import generate_problems

    rows = [json.dumps({"question": p.question, "answer": p.reference}) for p in generate_problems(n, seed=2)]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    from tests._train_support import make_assets

    return make_assets(tmp_path_factory.mktemp("assets"), n_groups=4)


def test_verified_rule_refuses_other_tasks(tmp_path, assets):
    import torch

    from aft_fast.train.config import InputError, TrainConfig
    from aft_fast.train.engine import Dist
    from aft_fast.train.pipeline import Summary, prepare

    dist = Dist(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    aqua = DATA / "aqua_sample.json"
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), stage="sample", train_data=str(aqua), label="verified")
    with pytest.raises(
        InputError, match=r"label: 'verified' needs a task whose chains can be checked.*aqua_sample"
    ):
        prepare(cfg, dist, Summary())
    # An aft stage reading a file without chain fields (older, or another task's) under --label verified.
    old = _write(tmp_path / "old.jsonl", [GOOD])
    cfg = TrainConfig(
        run_dir=str(tmp_path / "run"),
        stage="aft",
        candidates=str(old),
        label="verified",
        vft_model=str(assets["model"]),
    )
    with pytest.raises(InputError, match="label: 'verified'.*'answer_correct'"):
        prepare(cfg, dist, Summary())


def test_sample_stage_writes_labels_and_meta(tmp_path, assets):
    from aft_fast.data.answers import answers_match, extract_answer
    from aft_fast.data.chains import check_chain
    from tests._train_support import check, run_python

    train = _embedded_train_file(tmp_path / "train.jsonl", 4)
    run = tmp_path / "run"
    r = run_python(
        [
            "--stage=sample",
            f"--vft_model={assets['model']}",
            f"--tokenizer={assets['tokenizer']}",
            f"--train_data={train}",
            f"--run_dir={run}",
            "--label=verified",
            "--num_samples=3",
            "--max_new_tokens=24",
            "--gen_batch_size=4",
            "--progress=false",
        ],
        timeout=600,  # a few seconds alone; minutes on a loaded 2-core machine
    )
    check(r)
    groups = read_candidates(run / "candidates.jsonl")
    meta = json.loads((run / "candidates.jsonl.meta.json").read_text())
    # Recount from the texts (not the stored fields): answer right, chain right, the verified label.
    right = false_step = 0
    for g in groups:
        for c in g.candidates:
            a = answers_match(extract_answer(c.text, "number"), g.gold, "number")
            chk = check_chain(g.question, c.text)
            assert (c.answer_correct, c.chain_ok, c.form) == (a, chk.ok, chk.form)
            assert c.correct == (a and chk.ok)
            right += a
            false_step += a and not chk.ok
    assert meta["label"] == "verified" and meta["task"] is None  # a --train_data file, not the generator
    assert meta["groups"] == len(groups) == 4
    assert meta["candidates"] == sum(len(g.candidates) for g in groups)
    assert (meta["answer_positives"], meta["answer_positives_false_step"]) == (right, false_step)
    assert f"of {right} answer-positives have a false step" in r.stdout and "label verified" in r.stdout
