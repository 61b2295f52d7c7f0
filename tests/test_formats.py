"""Readers for the published GSM8K, AQuA-RAT and ECQA formats, the prompt template, and every DataError."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import pytest

from aft_fast.data.formats import DataError, Example, prompt_text, read_examples, write_gsm8k

DATA = Path(__file__).parent / "data"
LETTERS = "ABCDE"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _raises(path: Path, line: int, *words: str, **kw):
    """Read `path` and check the DataError names the file, the line and the problem."""
    with pytest.raises(DataError) as info:
        read_examples(path, **kw)
    msg = str(info.value)
    assert msg.startswith(f"{path}:{line}: "), msg
    assert info.value.line == line and info.value.path == str(path)
    for w in words:
        assert w in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------ good files


def test_gsm8k_sample():
    path = DATA / "gsm8k_sample.jsonl"
    rows = _jsonl(path)
    examples = read_examples(path)
    assert examples == read_examples(path, "gsm8k")
    assert len(examples) == len(rows)
    for row, ex in zip(rows, examples, strict=True):
        gold = row["answer"].splitlines()[-1].removeprefix("####").strip().replace(",", "")
        assert ex.kind == "number" and ex.gold == gold
        assert ex.question == row["question"]
        # The chain is kept verbatim, calculator annotations included; only "#### " + gold ends it.
        body = row["answer"].rsplit("\n", 1)[0]
        assert ex.reference == f"{body}\n#### {gold}"
    assert "<<48/2=24>>" in examples[0].reference
    assert examples[2].gold == "1240"  # "#### 1,240" in the file
    assert len({ex.id for ex in examples}) == len(examples)


def test_aqua_sample_shows_options_and_ends_in_the_letter():
    path = DATA / "aqua_sample.json"
    rows = _jsonl(path)
    examples = read_examples(path)
    assert examples == read_examples(path, "aqua")
    for row, ex in zip(rows, examples, strict=True):
        assert ex.kind == "option" and ex.gold == row["correct"]
        assert ex.question.startswith(row["question"])
        for opt in row["options"]:
            letter, text = opt[0], opt[2:]
            assert f"({letter}) {text}" in ex.question
        assert ex.reference.startswith(row["rationale"].strip())
        assert ex.reference.endswith(f"\n#### {row['correct']}")


def test_ecqa_csv_sample():
    path = DATA / "ecqa_sample.csv"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    examples = read_examples(path)
    assert examples == read_examples(path, "ecqa")
    assert len(examples) == len(rows) == 2
    for row, ex in zip(rows, examples, strict=True):
        options = [row[f"q_op{i}"] for i in range(1, 6)]
        gold = LETTERS[options.index(row["q_ans"])]  # q_ans is the answer's text
        assert ex.gold == gold and ex.kind == "option" and ex.id == row["q_no"]
        assert ex.question.startswith(row["q_text"]) and f"({gold}) {row['q_ans']}" in ex.question
        assert ex.reference == f"{row['taskB']}\n#### {gold}"
    assert [ex.gold for ex in examples] == ["A", "B"]


def test_ecqa_jsonl_variants():
    path = DATA / "ecqa_sample.jsonl"
    rows = _jsonl(path)
    examples = read_examples(path)
    # Row 0 names the answer by its text, row 1 by CommonsenseQA's answerKey with {"label", "text"} choices.
    assert examples[0].gold == LETTERS[rows[0]["choices"].index(rows[0]["answer"])]
    assert examples[1].gold == rows[1]["answerKey"]
    assert "(E) sea water" in examples[0].question and "(B) late for work" in examples[1].question
    for row, ex in zip(rows, examples, strict=True):
        assert ex.id == row["id"]
        assert ex.reference == f"{row['explanation']}\n#### {ex.gold}"


def test_ecqa_commonsenseqa_nesting_and_index_answer(tmp_path):
    rec = {
        "id": "q1",
        "question": {
            "stem": "Where do fish live?",
            "choices": [
                {"label": lab, "text": t}
                for lab, t in zip(LETTERS, ["tree", "sky", "water", "car", "desk"], strict=True)
            ],
        },
        "answerKey": "C",
        "explanation": "Fish live in water.",
    }
    rec2 = {
        "q_text": "Pick the second.",
        **{f"q_op{i}": f"opt{i}" for i in range(1, 6)},
        "q_ans": "opt2",
        "taskB": "It is the second.",
    }
    rec3 = {"question": "Pick the first.", "choices": ["x", "y", "z"], "answer": 0, "explanation": ""}
    path = _write(tmp_path / "e.jsonl", [json.dumps(r) for r in (rec, rec2, rec3)])
    golds = [ex.gold for ex in read_examples(path, "ecqa")]
    assert golds == ["C", "B", "A"]
    assert read_examples(path, "ecqa")[2].reference == "#### A"


def test_ecqa_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    cols = {
        "q_no": ["a", "b"],
        "q_text": ["Q1?", "Q2?"],
        **{f"q_op{i}": [f"x{i}", f"y{i}"] for i in range(1, 6)},
        "q_ans": ["x3", "y5"],
        "taskB": ["because x3", "because y5"],
    }
    path = tmp_path / "ecqa.parquet"
    pq.write_table(pa.table(cols), path)
    assert [ex.gold for ex in read_examples(path)] == ["C", "E"]
    cols["q_ans"] = ["x3", "nope"]
    pq.write_table(pa.table(cols), path)
    _raises(path, 2, "'nope'")


def test_json_array_and_blank_lines(tmp_path):
    rows = _jsonl(DATA / "gsm8k_sample.jsonl")
    arr = tmp_path / "gsm8k.json"
    arr.write_text(json.dumps(rows, indent=2))
    assert [e.gold for e in read_examples(arr)] == [
        e.gold for e in read_examples(DATA / "gsm8k_sample.jsonl")
    ]
    # Blank lines are skipped but still counted, so errors keep pointing at the right line.
    path = _write(tmp_path / "g.jsonl", [json.dumps(rows[0]), "", "   ", json.dumps({"question": "q"})])
    _raises(path, 4, "answer")


def test_prompt_template():
    q = "Tom has 3 apples. How many?"
    p = prompt_text(q)
    assert p == f"Question: {q}\nAnswer:\n"
    assert p.endswith("\n")  # the chain starts on a new pre-token


def test_write_gsm8k_round_trip(tmp_path):
    examples = read_examples(DATA / "gsm8k_sample.jsonl")
    path = tmp_path / "sub" / "out.jsonl"
    write_gsm8k(path, examples)
    for line in path.read_text().splitlines():
        assert set(json.loads(line)) == {"question", "answer"}
    back = read_examples(path, "gsm8k")
    assert [(e.question, e.reference, e.gold) for e in back] == [
        (e.question, e.reference, e.gold) for e in examples
    ]


def test_example_is_frozen():
    ex = Example("i", "q", "#### 1", "1", "number")
    with pytest.raises(AttributeError):
        ex.gold = "2"


# ------------------------------------------------------------------------------------------------ errors

GOOD_GSM = json.dumps({"question": "What is 1+1?", "answer": "1+1 = <<1+1=2>>2\n#### 2"})
GOOD_AQUA = {
    "question": "2+2?",
    "options": ["A)3", "B)4", "C)5", "D)6", "E)7"],
    "rationale": "2+2=4",
    "correct": "B",
}


def test_empty_files(tmp_path):
    _raises(_write(tmp_path / "e.jsonl", []), 1, "empty")
    _raises(_write(tmp_path / "w.jsonl", ["", "  ", ""]), 1, "empty")
    (tmp_path / "z.csv").write_text("")
    _raises(tmp_path / "z.csv", 1, "empty")
    (tmp_path / "h.csv").write_text(",q_no,q_text\n")  # a header and no rows
    _raises(tmp_path / "h.csv", 1, "empty")


def test_bad_json(tmp_path):
    _raises(_write(tmp_path / "a.jsonl", [GOOD_GSM, '{"question": "x", "answer": ']), 2, "bad JSON")
    _raises(_write(tmp_path / "b.jsonl", [GOOD_GSM, GOOD_GSM, "[1, 2]"]), 3, "JSON object")
    (tmp_path / "c.json").write_text('[\n  {"question": "q",\n  "answer": "#### 1"},\n  oops\n]')
    _raises(tmp_path / "c.json", 4, "bad JSON")
    (tmp_path / "d.json").write_text('[\n  {"question": "q", "answer": "#### 1"},\n  7\n]')
    _raises(tmp_path / "d.json", 3, "JSON object")


def test_not_utf8(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(GOOD_GSM.encode() + b"\n" + b'{"question": "\xff\xfe", "answer": "#### 1"}\n')
    _raises(path, 2, "UTF-8")


def test_gsm8k_errors(tmp_path):
    _raises(_write(tmp_path / "a.jsonl", [GOOD_GSM, json.dumps({"question": "q"})]), 2, "missing", "'answer'")
    _raises(
        _write(tmp_path / "b.jsonl", [json.dumps({"answer": "#### 2"})]),
        1,
        "missing",
        "'question'",
        format="gsm8k",
    )
    _raises(
        _write(
            tmp_path / "c.jsonl", [GOOD_GSM, GOOD_GSM, json.dumps({"question": "q", "answer": "it is 2"})]
        ),
        3,
        "####",
    )
    _raises(_write(tmp_path / "d.jsonl", [json.dumps({"question": "q", "answer": "x\n#### two"})]), 1, "####")
    _raises(_write(tmp_path / "e.jsonl", [json.dumps({"question": 5, "answer": "#### 2"})]), 1, "string")
    _raises(_write(tmp_path / "f.jsonl", [json.dumps({"question": "  ", "answer": "#### 2"})]), 1, "empty")


def test_aqua_errors(tmp_path):
    def bad(name: str, **change) -> Path:
        rec = {**GOOD_AQUA, **change}
        rec = {k: v for k, v in rec.items() if v is not None}
        return _write(tmp_path / name, [json.dumps(GOOD_AQUA), json.dumps(rec)])

    _raises(bad("a.json", rationale=None), 2, "missing", "'rationale'", format="aqua")
    _raises(bad("b.json", options=["A)1", "B)2", "X)3"]), 2, "option 2", format="aqua")
    _raises(bad("c.json", options="A)1 B)2"), 2, "options", format="aqua")
    _raises(bad("d.json", correct="F"), 2, "'correct'", format="aqua")
    _raises(bad("e.json", correct=None), 2, "missing", "'correct'", format="aqua")


def test_ecqa_errors(tmp_path):
    good = {"question": "q?", "choices": ["a", "b", "c", "d", "e"], "answer": "b", "explanation": "b it is"}
    path = _write(tmp_path / "a.jsonl", [json.dumps(good), json.dumps({**good, "answer": "zebra"})])
    _raises(path, 2, "'zebra'")
    no_choices = {k: v for k, v in good.items() if k != "choices"}
    _raises(_write(tmp_path / "b.jsonl", [json.dumps(no_choices)]), 1, "choices", format="ecqa")
    no_expl = {k: v for k, v in good.items() if k != "explanation"}
    _raises(_write(tmp_path / "c.jsonl", [json.dumps(good), json.dumps(no_expl)]), 2, "explanation")
    _raises(_write(tmp_path / "d.jsonl", [json.dumps({**good, "choices": ["a"]})]), 1, "choices")
    _raises(_write(tmp_path / "e.jsonl", [json.dumps({**good, "answer": 7})]), 1, "out of range")


def test_csv_errors_name_the_record_line(tmp_path):
    header = ",q_no,q_concept,q_text,q_op1,q_op2,q_op3,q_op4,q_op5,q_ans,taskA_pos,taskA_neg,taskB"
    row0 = '0,id0,c,Q0?,a,b,c,d,e,a,"p1\np2","n1\nn2",because a'  # a quoted field spans lines 2-3, 3-4
    row1 = "1,id1,c,Q1?,a,b,c,d,e,zebra,p,n,because"
    path = tmp_path / "cqa_data_train.csv"
    path.write_text("\n".join([header, row0, row1]) + "\n")
    _raises(path, 5, "'zebra'")
    path.write_text("\n".join([header, row0, "1,id1,c,Q1?"]) + "\n")
    _raises(path, 5, "columns")


def test_auto_cannot_tell(tmp_path):
    _raises(_write(tmp_path / "x.jsonl", [json.dumps({"prompt": "p", "completion": "c"})]), 1, "format")


def test_data_error_pickles():
    err = pickle.loads(pickle.dumps(DataError("x.jsonl", 3, "bad JSON")))
    assert (str(err), err.path, err.line, err.problem) == ("x.jsonl:3: bad JSON", "x.jsonl", 3, "bad JSON")


def test_unknown_format_name():
    with pytest.raises(ValueError, match="format"):
        read_examples(DATA / "gsm8k_sample.jsonl", "math")
