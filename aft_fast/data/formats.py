"""The published task formats, read as they are: GSM8K, AQuA-RAT and ECQA.

- GSM8K (``train.jsonl``/``test.jsonl``): JSON lines ``{"question", "answer"}``; the answer's last line is
  ``#### <number>`` and earlier lines may carry calculator annotations (``<<48/2=24>>``), kept verbatim.
- AQuA-RAT (``train.json``, JSON lines despite the name): ``{"question", "options": ["A)21", ...],
  "rationale", "correct": "B"}``.
- ECQA: the CSV that the ECQA-Dataset repo's ``generate_data.py`` writes (``cqa_data_{train,val,test}.csv``:
  ``q_no, q_concept, q_text, q_op1..q_op5, q_ans`` (the answer's text), ``taskA_pos, taskA_neg, taskB`` (the
  free-flow explanation)), the same fields as JSON lines or Parquet (the Hugging Face copies, e.g.
  tasksource/ecqa), and the common re-exports ``{"question", "choices", "explanation", "answer"}`` where
  choices is a list of texts, a CommonsenseQA ``[{"label", "text"}]`` list or ``{"label": [...], "text":
  [...]}``, and answer is a letter, an option's text or a 0-based index (``answerKey`` is accepted too).

Every example becomes an `Example` whose ``reference`` ends in the answer line ``#### <answer>`` (GSM8K's
own convention, appended to AQuA rationales and ECQA explanations), so one extractor checks all tasks. For
option tasks the question shown to the model lists the options: ``<question>\\nAnswer Choices: (A) ...``.
Files may also be a single JSON array (some GSM8K copies are). Problems raise `DataError` naming the file
and line ("row" for Parquet, 1-based).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aft_fast.data.answers import OPTION_LETTERS, format_number, normalize_answer, parse_number

FORMATS = ("gsm8k", "aqua", "ecqa")
ANSWER_PREFIX = "#### "

# One template for every task and stage (VFT, sampling, AFT, eval). It ends in a newline so the chain
# starts a new pre-token: tokenizing prompt and chain apart gives the same ids as tokenizing them together.
PROMPT_TEMPLATE = "Question: {question}\nAnswer:\n"


class DataError(ValueError):
    """A problem in a data file. The message starts with "<path>:<line>: " and says what is wrong."""

    def __init__(self, path: str | Path, line: int, problem: str) -> None:
        self.path, self.line, self.problem = str(path), line, problem
        super().__init__(f"{path}:{line}: {problem}")

    def __reduce__(self):  # picklable, so it survives a DataLoader worker or multiprocessing pool
        return type(self), (self.path, self.line, self.problem)


@dataclass(frozen=True)
class Example:
    """One task example. ``reference`` is the chain of thought to train on, ending in ``#### <gold>``;
    ``gold`` is canonical (``"1234"``, ``"0.5"``, ``"C"``); ``kind`` is ``"number"`` or ``"option"``."""

    id: str
    question: str
    reference: str
    gold: str
    kind: str


def prompt_text(question: str) -> str:
    """The text the model sees before its chain: ``"Question: <question>\\nAnswer:\\n"``."""
    return PROMPT_TEMPLATE.format(question=question)


def answer_line(gold: str) -> str:
    """The line every reference chain ends with: ``"#### <gold>"``."""
    return f"{ANSWER_PREFIX}{gold}"


def with_options(question: str, options: list[str]) -> str:
    """The question as shown for a multiple-choice task: ``q + "\\nAnswer Choices: (A) x (B) y ..."``."""
    listed = " ".join(f"({OPTION_LETTERS[i]}) {text}" for i, text in enumerate(options))
    return f"{question}\nAnswer Choices: {listed}"


# ---------------------------------------------------------------------------------------------------------
# Records: (line, dict) pairs from JSON lines, a JSON array, CSV or Parquet.


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_records(path)
        return
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a UTF-8 byte-order mark, as spreadsheet tools write
    if not data.strip():
        raise DataError(path, 1, "empty file")
    if suffix == ".csv":
        yield from _csv_records(path, data)
    elif data.lstrip()[:1] == b"[":
        yield from _json_array_records(path, data)
    else:
        yield from _jsonl_records(path, data)


def _decode(path: Path, raw: bytes, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, line, f"not UTF-8 ({e.reason} at byte {e.start})") from None


def _jsonl_records(path: Path, data: bytes) -> Iterator[tuple[int, dict[str, Any]]]:
    for i, raw in enumerate(data.split(b"\n"), start=1):
        text = _decode(path, raw, i).strip()
        if not text:
            continue  # blank lines (a trailing newline, a gap) carry nothing
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(path, i, f"bad JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(path, i, f"expected a JSON object, got {type(obj).__name__}")
        yield i, obj


def _json_array_records(path: Path, data: bytes) -> Iterator[tuple[int, dict[str, Any]]]:
    text = _decode(path, data, 1)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, f"bad JSON: {e.msg} (column {e.colno})") from None
    # Re-scan to learn where each element starts, so later errors can name its line.
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    for n, item in enumerate(items):
        while text[pos] in " \t\r\n,":
            pos += 1
        line = text.count("\n", 0, pos) + 1
        _, pos = decoder.raw_decode(text, pos)
        if not isinstance(item, dict):
            raise DataError(path, line, f"element {n} is {type(item).__name__}, expected a JSON object")
        yield line, item


def _csv_records(path: Path, data: bytes) -> Iterator[tuple[int, dict[str, Any]]]:
    text = _decode(path, data, 1)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
        start = reader.line_num + 1
        for row in reader:
            if any(cell.strip() for cell in row):
                if len(row) != len(header):
                    raise DataError(path, start, f"{len(row)} columns, the header has {len(header)}")
                yield start, dict(zip(header, row, strict=True))
            start = reader.line_num + 1  # a quoted field may span lines
    except csv.Error as e:
        raise DataError(path, reader.line_num, f"bad CSV: {e}") from None


def _parquet_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow comes with `datasets`
        raise DataError(path, 1, "reading Parquet needs pyarrow") from e
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(path, 1, f"bad Parquet file: {e}") from None
    if not rows:
        raise DataError(path, 1, "empty file")
    yield from enumerate(rows, start=1)


# ---------------------------------------------------------------------------------------------------------
# Field access with file:line errors.


def _field(path: Path, line: int, rec: dict[str, Any], names: Iterable[str], what: str | None = None) -> Any:
    names = tuple(names)
    for name in names:
        if name in rec and rec[name] is not None:
            return rec[name]
    alts = " or ".join(repr(n) for n in names)
    raise DataError(path, line, f"missing field {what} ({alts})" if what else f"missing field {alts}")


def _text(path: Path, line: int, value: Any, name: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(path, line, f"field {name!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(path, line, f"field {name!r} is empty")
    return value


def _record_id(rec: dict[str, Any], default: str) -> str:
    for name in ("id", "q_no", "qid"):
        value = rec.get(name)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
            return str(value)
    return default


# ---------------------------------------------------------------------------------------------------------
# The three formats.

_GSM8K_FINAL = re.compile(r"^####\s*(.+?)\s*$")


def _gsm8k(path: Path, line: int, rec: dict[str, Any], default_id: str) -> Example:
    question = _text(path, line, _field(path, line, rec, ["question"]), "question").strip()
    answer = _text(path, line, _field(path, line, rec, ["answer"]), "answer").rstrip()
    last = answer.splitlines()[-1].strip() if answer else ""
    m = _GSM8K_FINAL.match(last)
    value = parse_number(m.group(1)) if m else None
    if value is None:
        raise DataError(path, line, f"answer's last line must be '#### <number>', got {last[:60]!r}")
    gold = format_number(value)
    # Keep the chain verbatim; only the answer line is rewritten to the canonical "#### <gold>".
    body = answer[: answer.rfind("\n") + 1]
    return Example(_record_id(rec, default_id), question, body + answer_line(gold), gold, "number")


_OPTION_RE = re.compile(r"^\s*\(?([A-Ea-e])\s*\)\s*(.*)$", re.S)


def _aqua(path: Path, line: int, rec: dict[str, Any], default_id: str) -> Example:
    question = _text(path, line, _field(path, line, rec, ["question"]), "question").strip()
    options = _field(path, line, rec, ["options"])
    if not isinstance(options, list) or not 2 <= len(options) <= len(OPTION_LETTERS):
        raise DataError(path, line, "field 'options' must be a list of 2-5 strings like 'A)21'")
    texts = []
    for i, opt in enumerate(options):
        m = _OPTION_RE.match(opt) if isinstance(opt, str) else None
        if m is None or m.group(1).upper() != OPTION_LETTERS[i]:
            raise DataError(path, line, f"option {i} must read '{OPTION_LETTERS[i]})<text>', got {opt!r}")
        texts.append(m.group(2).strip())
    rationale = _text(path, line, _field(path, line, rec, ["rationale"]), "rationale", allow_empty=True)
    gold = _letter(path, line, _field(path, line, rec, ["correct"]), texts, "correct", text_first=False)
    return Example(
        _record_id(rec, default_id), with_options(question, texts), _join(rationale, gold), gold, "option"
    )


def _join(explanation: str, gold: str) -> str:
    body = explanation.strip()
    return f"{body}\n{answer_line(gold)}" if body else answer_line(gold)


def _letter(path: Path, line: int, value: Any, options: list[str], name: str, *, text_first: bool) -> str:
    """The gold letter from a letter ("C", "(C)"), a 0-based index, or an option's text (ECQA's q_ans).

    `text_first` says the field usually holds the option's text, so an exact text match wins over reading
    the value as a letter (an option could itself be the word "A")."""
    letters = OPTION_LETTERS[: len(options)]
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(options):
            return letters[value]
        raise DataError(
            path, line, f"field {name!r}: index {value} is out of range for {len(options)} options"
        )
    if isinstance(value, str):
        s = value.strip()
        if text_first and s in options:
            return letters[options.index(s)]
        letter = normalize_answer(s, "option")
        if letter is not None and letter in letters:
            return letter
        lowered = [o.lower() for o in options]
        if text_first and s.lower() in lowered:
            return letters[lowered.index(s.lower())]
    raise DataError(path, line, f"field {name!r} = {value!r} names none of the options {letters}")


def _ecqa_choices(path: Path, line: int, rec: dict[str, Any]) -> list[str]:
    if all(f"q_op{i}" in rec for i in range(1, 6)):
        return [_text(path, line, rec[f"q_op{i}"], f"q_op{i}") for i in range(1, 6)]
    q = rec.get("question")
    raw = rec.get("choices", q.get("choices") if isinstance(q, dict) else None)
    if raw is None:
        raw = rec.get("options")
    if raw is None:
        raise DataError(path, line, "missing field choices ('choices', 'options' or 'q_op1'..'q_op5')")
    if isinstance(raw, dict) and isinstance(raw.get("text"), list):
        raw = raw["text"]  # Hugging Face commonsense_qa: {"label": [...], "text": [...]}
    if not isinstance(raw, list) or not 2 <= len(raw) <= len(OPTION_LETTERS):
        raise DataError(path, line, "field 'choices' must list 2-5 options")
    choices = []
    for i, c in enumerate(raw):
        if isinstance(c, dict):  # CommonsenseQA: {"label": "A", "text": "bank"}
            c = c.get("text")
        if isinstance(c, str):
            m = _OPTION_RE.match(c)
            if m and m.group(1).upper() == OPTION_LETTERS[i]:
                c = m.group(2)  # "A) bank" as in AQuA-style re-exports
        choices.append(_text(path, line, c, f"choices[{i}]").strip())
    return choices


def _ecqa(path: Path, line: int, rec: dict[str, Any], default_id: str) -> Example:
    q = _field(path, line, rec, ["q_text", "question"], "question")
    if isinstance(q, dict):  # CommonsenseQA nests the stem: {"stem", "choices"}
        q = q.get("stem")
    question = _text(path, line, q, "question").strip()
    choices = _ecqa_choices(path, line, rec)
    name = next((n for n in ("q_ans", "answer", "answerKey") if rec.get(n) is not None), None)
    if name is None:
        raise DataError(path, line, "missing field answer ('q_ans', 'answer' or 'answerKey')")
    gold = _letter(path, line, rec[name], choices, name, text_first=name != "answerKey")
    explanation = _field(path, line, rec, ["taskB", "explanation", "freeflow", "rationale"], "explanation")
    explanation = _text(path, line, explanation, "explanation", allow_empty=True)
    return Example(
        _record_id(rec, default_id), with_options(question, choices), _join(explanation, gold), gold, "option"
    )


_READERS = {"gsm8k": _gsm8k, "aqua": _aqua, "ecqa": _ecqa}


def detect_format(rec: dict[str, Any]) -> str | None:
    """The format a record's fields say it is in, or None."""
    if "options" in rec and "correct" in rec:
        return "aqua"
    if any(k in rec for k in ("q_text", "q_op1", "choices", "taskB", "explanation", "answerKey")):
        return "ecqa"
    if isinstance(rec.get("question"), dict):
        return "ecqa"
    if "question" in rec and "answer" in rec:
        return "gsm8k"
    return None


def read_examples(path: str | Path, format: str = "auto") -> list[Example]:
    """Read a GSM8K, AQuA-RAT or ECQA file (``format`` = "gsm8k" | "aqua" | "ecqa" | "auto").

    "auto" decides from the first record's fields. Raises `DataError` ("<path>:<line>: <problem>") on a
    malformed line, a missing or ill-typed field, bad JSON or an empty file.
    """
    path = Path(path)
    if format not in (*FORMATS, "auto"):
        raise ValueError(f"format must be one of {(*FORMATS, 'auto')}, got {format!r}")
    examples: list[Example] = []
    reader = None
    for line, rec in _records(path):
        if reader is None:
            name = detect_format(rec) if format == "auto" else format
            if name is None:
                raise DataError(path, line, f"cannot tell the format from fields {sorted(rec)}; pass format=")
            reader = _READERS[name]
        examples.append(reader(path, line, rec, f"{path.stem}-{len(examples)}"))
    if not examples:
        raise DataError(path, 1, "empty file")
    return examples


def write_gsm8k(path: str | Path, examples: Iterable[Example]) -> None:
    """Write GSM8K JSON lines ``{"question", "answer"}``; ``answer`` is the reference (ends ``#### n``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps({"question": ex.question, "answer": ex.reference}, ensure_ascii=False) + "\n")
