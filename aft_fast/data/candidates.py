"""Sampled candidate files: one JSON line per question group (docs/design.md section 1).

Schema::

    {"id": str, "question": str, "gold": str, "kind"?: "number" | "option", "reference"?: str,
     "candidates": [{"text": str, "correct"?: bool, "rank"?: int, "ref_logp"?: float,
                     "answer_correct"?: bool, "chain_ok"?: bool | null, "form"?: str | null}, ...]}

``question`` is the question as shown to the model (options included), i.e. what `prompt_text` wraps.
``kind`` defaults to "option" when ``gold`` is a single letter A-E and "number" otherwise. Within a group
either every candidate has a ``rank`` (ranked feedback, higher is better) or none has. Unknown keys are
ignored, so files with extra metadata (sampling temperature, extracted answers) still load.

The sample stage also stores why a candidate got its label: ``answer_correct`` (the final answer equals the
gold), ``chain_ok`` (every step of the chain is right, `aft_fast.data.chains`: the embedded task's checker,
or the step checker on GSM8K-style questions; null where the task's chains cannot be checked, i.e. multiple
choice) and ``form`` (the embedded task's solution strategy the chain follows, null if unrecognised or
another task). ``correct`` is the label under the rule the file was sampled with (``label``: "answer" or
"verified", `label_rule`); `relabel` recomputes it for the other rule from those fields, so one sampled
file serves both. Files without them (older ones, hand-made ones) still read.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aft_fast.data.answers import KINDS, OPTION_LETTERS, answers_match, extract_answer
from aft_fast.data.chains import FORMS, check_chain, is_checkable
from aft_fast.data.formats import DataError, Example


@dataclass
class Candidate:
    """One sampled chain. ``correct``: binary label; ``rank``: ranked feedback (higher is better);
    ``ref_logp``: summed log-prob under the reference model (for the ``dpo`` baseline). ``answer_correct``,
    ``chain_ok``, ``form``: what the label was computed from (see the module docstring)."""

    text: str
    correct: bool | None = None
    rank: int | None = None
    ref_logp: float | None = None
    answer_correct: bool | None = None
    chain_ok: bool | None = None
    form: str | None = None


@dataclass
class CandidateGroup:
    """A question with its sampled candidates; ``reference`` (if any) feeds L_vft."""

    id: str
    question: str
    gold: str
    kind: str
    reference: str | None
    candidates: list[Candidate] = field(default_factory=list)

    def labels(self) -> list[int]:
        """Per-candidate labels for the loss: the rank where given, else 1 (correct) / 0 (wrong)."""
        if len({c.rank is None for c in self.candidates}) > 1:
            raise ValueError(f"group {self.id!r}: mixes ranked and unranked candidates")
        out = []
        for i, c in enumerate(self.candidates):
            if c.rank is not None:
                out.append(int(c.rank))
            elif c.correct is not None:
                out.append(int(c.correct))
            else:
                raise ValueError(f"group {self.id!r}: candidate {i} has neither 'rank' nor 'correct'")
        return out

    @classmethod
    def from_example(cls, example: Example, candidates: list[Candidate] | None = None) -> CandidateGroup:
        return cls(
            example.id,
            example.question,
            example.gold,
            example.kind,
            example.reference,
            list(candidates or []),
        )


def infer_kind(gold: str) -> str:
    """The kind a gold implies: "option" for one letter A-E, else "number" (when "kind" is absent)."""
    g = gold.strip().strip("()").strip()
    return "option" if len(g) == 1 and g in OPTION_LETTERS else "number"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_candidate(path: Path, line: int, j: int, obj: Any) -> Candidate:
    where = f"candidates[{j}]"
    if not isinstance(obj, dict):
        raise DataError(path, line, f"{where} must be an object, got {type(obj).__name__}")
    text = obj.get("text")
    if not isinstance(text, str):
        raise DataError(path, line, f"{where}: missing or non-string 'text'")
    correct = obj.get("correct")
    if correct is not None and not isinstance(correct, bool):
        raise DataError(path, line, f"{where}: 'correct' must be true/false, got {correct!r}")
    rank = obj.get("rank")
    if rank is not None and not _is_int(rank):
        # 2.0 from a float-writing tool is accepted; 2.5 is not a rank.
        if isinstance(rank, float) and rank.is_integer():
            rank = int(rank)
        else:
            raise DataError(path, line, f"{where}: 'rank' must be an integer, got {rank!r}")
    ref_logp = obj.get("ref_logp")
    if ref_logp is not None:
        if (
            isinstance(ref_logp, bool)
            or not isinstance(ref_logp, (int, float))
            or not math.isfinite(ref_logp)
        ):
            raise DataError(path, line, f"{where}: 'ref_logp' must be a finite number, got {ref_logp!r}")
        ref_logp = float(ref_logp)
    flags = {}
    for key in ("answer_correct", "chain_ok"):
        flags[key] = obj.get(key)
        if flags[key] is not None and not isinstance(flags[key], bool):
            raise DataError(path, line, f"{where}: {key!r} must be true/false/null, got {flags[key]!r}")
    form = obj.get("form")
    if form is not None and form not in FORMS:
        raise DataError(path, line, f"{where}: 'form' must be one of {FORMS} or null, got {form!r}")
    return Candidate(text, correct, rank, ref_logp, flags["answer_correct"], flags["chain_ok"], form)


def _parse_group(path: Path, line: int, obj: Any) -> CandidateGroup:
    if not isinstance(obj, dict):
        raise DataError(path, line, f"expected a JSON object, got {type(obj).__name__}")
    for key in ("id", "question", "gold", "candidates"):
        if key not in obj or obj[key] is None:
            raise DataError(path, line, f"missing field {key!r}")
    gid, gold = obj["id"], obj["gold"]
    if not (isinstance(gid, str) or _is_int(gid)) or not str(gid).strip():
        raise DataError(path, line, f"'id' must be a non-empty string, got {gid!r}")
    if not isinstance(obj["question"], str) or not obj["question"].strip():
        raise DataError(path, line, "'question' must be a non-empty string")
    # A gold written as a JSON number (72) is common in hand-made files; keep its text.
    if _is_int(gold) or isinstance(gold, float):
        gold = str(gold)
    if not isinstance(gold, str) or not gold.strip():
        raise DataError(path, line, f"'gold' must be a non-empty string, got {gold!r}")
    kind = obj.get("kind") or infer_kind(gold)
    if kind not in KINDS:
        raise DataError(path, line, f"'kind' must be one of {KINDS}, got {kind!r}")
    reference = obj.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise DataError(path, line, "'reference' must be a string")
    raw = obj["candidates"]
    if not isinstance(raw, list):
        raise DataError(path, line, f"'candidates' must be a list, got {type(raw).__name__}")
    cands = [_parse_candidate(path, line, j, c) for j, c in enumerate(raw)]
    if len({c.rank is None for c in cands}) > 1:
        raise DataError(path, line, "some candidates have 'rank' and some do not; rank all or none")
    return CandidateGroup(str(gid), obj["question"], gold, kind, reference, cands)


def read_candidates(path: str | Path) -> list[CandidateGroup]:
    """Read a candidate JSONL file. Raises `DataError` ("<path>:<line>: ...") on bad JSON, a missing or
    ill-typed field, a duplicate group id, or an empty file. Blank lines are skipped."""
    path = Path(path)
    groups: list[CandidateGroup] = []
    seen: dict[str, int] = {}
    with path.open("rb") as f:
        for i, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise DataError(path, i, f"not UTF-8 ({e.reason} at byte {e.start})") from None
            if not text:
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(path, i, f"bad JSON: {e.msg} (column {e.colno})") from None
            group = _parse_group(path, i, obj)
            if group.id in seen:
                raise DataError(path, i, f"duplicate group id {group.id!r} (first on line {seen[group.id]})")
            seen[group.id] = i
            groups.append(group)
    if not groups:
        raise DataError(path, 1, "empty file: no candidate groups")
    return groups


def group_to_json(group: CandidateGroup) -> dict[str, Any]:
    """The schema's JSON object for a group; unset optional fields are left out."""
    obj: dict[str, Any] = {"id": group.id, "question": group.question, "gold": group.gold, "kind": group.kind}
    if group.reference is not None:
        obj["reference"] = group.reference
    cands = []
    for c in group.candidates:
        d: dict[str, Any] = {"text": c.text}
        if c.correct is not None:
            d["correct"] = bool(c.correct)
        if c.rank is not None:
            d["rank"] = int(c.rank)
        if c.ref_logp is not None:
            d["ref_logp"] = float(c.ref_logp)
        if c.answer_correct is not None:  # a labelled candidate stores all three, nulls included
            d.update(answer_correct=bool(c.answer_correct), chain_ok=c.chain_ok, form=c.form)
        cands.append(d)
    obj["candidates"] = cands
    return obj


def write_candidates(path: str | Path, groups: Iterable[CandidateGroup]) -> None:
    """Write groups as JSONL atomically (temp file in the same folder, then os.replace), so a crash
    mid-write never leaves a truncated file where a later stage would read it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for g in groups:
                f.write(json.dumps(group_to_json(g), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


LABEL_RULES = ("answer", "verified")


def _check_rule(rule: str) -> None:
    if rule not in LABEL_RULES:
        raise ValueError(f"label: {rule!r} is not one of {', '.join(LABEL_RULES)}")


def label_rule(rule: str, answer_correct: bool, chain_ok: bool | None) -> bool:
    """A candidate's binary label under `rule`, the one definition every stage uses: "answer" (the
    paper's rule) = the final answer is right; "verified" = the answer is right and the chain checked
    right (`aft_fast.data.chains.check_chain`; None, not checked, is not right)."""
    _check_rule(rule)
    return answer_correct if rule == "answer" else answer_correct and bool(chain_ok)


def not_checkable_error(where: str) -> ValueError:
    return ValueError(
        f"label: 'verified' needs a task whose chains can be checked (the embedded synthetic task, or "
        f"GSM8K-style questions: the step checker); {where} is multiple choice. Use --label answer"
    )


def label_candidates(group: CandidateGroup, texts: list[str], rule: str = "answer") -> CandidateGroup:
    """A copy of `group` whose candidates are `texts` without exact duplicates (first kept, order
    preserved), each with ``answer_correct`` (its extracted answer matches the gold), ``chain_ok`` and
    ``form`` (from `check_chain`; None where the question is not checkable) and ``correct`` by
    `label_rule`. "verified" on a question that cannot be checked (multiple choice) raises ValueError
    naming the ``label`` field."""
    _check_rule(rule)
    checkable = is_checkable(group.question)
    if rule == "verified" and not checkable:
        raise not_checkable_error(f"group {group.id!r}")
    seen: set[str] = set()
    cands = []
    for t in texts:
        if t in seen:
            continue
        seen.add(t)
        right = answers_match(extract_answer(t, group.kind), group.gold, group.kind)
        chain_ok = form = None
        if checkable:
            check = check_chain(group.question, t)
            chain_ok, form = check.ok, check.form
        correct = label_rule(rule, right, chain_ok)
        cands.append(Candidate(t, correct=correct, answer_correct=right, chain_ok=chain_ok, form=form))
    return replace(group, candidates=cands)


def relabel(groups: list[CandidateGroup], rule: str) -> list[CandidateGroup]:
    """Copies of `groups` whose ``correct`` follows `rule`, recomputed from each candidate's stored
    ``answer_correct`` / ``chain_ok``. Ranked candidates keep their rank. Under "answer", a candidate
    without stored fields (an older or hand-made file) keeps its ``correct``; under "verified" every
    unranked candidate needs ``chain_ok``, else ValueError naming the ``label`` field."""
    _check_rule(rule)
    out = []
    for g in groups:
        cands = []
        for i, c in enumerate(g.candidates):
            if c.rank is not None or (rule == "answer" and c.answer_correct is None):
                cands.append(c)
                continue
            if c.answer_correct is None or c.chain_ok is None:
                missing = "answer_correct" if c.answer_correct is None else "chain_ok"
                raise not_checkable_error(f"group {g.id!r} (candidate {i} has no {missing!r})")
            correct = label_rule(rule, c.answer_correct, c.chain_ok)
            cands.append(replace(c, correct=correct))
        out.append(replace(g, candidates=cands))
    return out
