"""reasoning-gym's `gsm_symbolic` as a data source: GSM8K-template problems with worked chains, written as
GSM8K JSON lines that `read_examples` reads as they are.

reasoning-gym (an optional extra: ``pip install 'aft-fast[real]'``) turns GSM8K test problems into
procedural generators, one per template (85 it marks as sound). `write_gsm_symbolic` writes four splits:

- ``train``, ``validation``, ``test``: problems of the same templates (the in-distribution ones);
- ``test_ood``: problems of the templates held out of the other three (the paper's claim that AFT
  generalizes out of distribution is measured there).

Which templates are held out depends only on how many (`heldout`), so runs with different seeds share
the split; the problems are a function of (seed, split). No question appears in two splits. A problem
whose reference chain states false arithmetic (a few generators truncate floats: ``935.0 / 0.55 = 1699``,
so their gold answer is off too) is skipped, and counted in ``manifest.json``.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from aft_fast.data.steps import read_steps

SPLITS = ("train", "validation", "test", "test_ood")
_HELDOUT_SEED = "aft-gsm-symbolic:heldout"
_MAX_TRIES = 20  # draws per problem asked for before giving up (a split larger than its templates allow)

Generator = Callable[[random.Random, float], dict[str, Any]]


def _generators() -> dict[int, Generator]:
    """Template id -> generator, for the templates reasoning-gym marks as sound."""
    try:
        from reasoning_gym.arithmetic.gsm_symbolic import gsm_symbolic as gs
    except ImportError:
        raise ValueError(
            "task: gsm_symbolic needs reasoning-gym: pip install 'aft-fast[real]' (make install does)"
        ) from None
    dataset = gs.GSMSymbolicDataset(gs.GSMSymbolicDatasetConfig(size=1, seed=0))
    return {t: dataset.generators[t] for t in gs.tasks_ok}


def heldout_templates(templates: list[int], heldout: int) -> list[int]:
    """The `heldout` templates only ``test_ood`` draws from: a fixed draw, the same for every seed."""
    if not 0 < heldout < len(templates):
        raise ValueError(f"heldout_templates: must lie in [1, {len(templates) - 1}], got {heldout}")
    return sorted(random.Random(_HELDOUT_SEED).sample(sorted(templates), heldout))


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    chain: str  # the worked chain, ending in "#### <answer>"
    template: int


def _draw(
    split: str,
    n: int,
    templates: list[int],
    generators: dict[int, Generator],
    seed: int,
    seen: set[str],
    dropped: list[dict[str, Any]],
) -> list[Problem]:
    rng = random.Random(f"aft-gsm-symbolic:{seed}:{split}")
    out: list[Problem] = []
    for _ in range(_MAX_TRIES * n):
        if len(out) == n:
            break
        template = rng.choice(templates)
        example = generators[template](random.Random(rng.getrandbits(64)), 1.0)
        question, chain = example["question"].strip(), example["metadata"]["answer_cot"].strip()
        if question in seen:
            continue
        seen.add(question)
        false = [s for s in read_steps(chain) if not s.ok]
        if false:
            dropped.append({"split": split, "template": template, "false_step": false[0].text})
            continue
        out.append(Problem(f"{split}-{len(out):05d}", question, chain, template))
    if len(out) < n:
        raise ValueError(f"gsm_symbolic: {split} got {len(out)} distinct problems of the {n} asked for")
    return out


def _write_jsonl(path: Path, problems: list[Problem]) -> None:
    """GSM8K JSON lines plus the id and template; written atomically (temp file, then os.replace)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for p in problems:
            rec = {"id": p.id, "question": p.question, "answer": p.chain, "template": p.template}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_gsm_symbolic(
    out_dir: str | Path, n_train: int, n_test: int, seed: int = 0, heldout: int = 15
) -> dict[str, Path]:
    """Write ``train.jsonl`` (n_train problems), ``validation.jsonl``, ``test.jsonl`` and
    ``test_ood.jsonl`` (n_test each) and ``manifest.json`` under `out_dir`; returns the split paths.
    The evaluation splits are drawn first, so they do not depend on n_train."""
    generators = _generators()
    ood = heldout_templates(list(generators), heldout)
    ind = [t for t in generators if t not in ood]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    dropped: list[dict[str, Any]] = []
    splits = {
        "test": _draw("test", n_test, ind, generators, seed, seen, dropped),
        "validation": _draw("validation", n_test, ind, generators, seed, seen, dropped),
        "test_ood": _draw("test_ood", n_test, ood, generators, seed, seen, dropped),
    }
    splits["train"] = _draw("train", n_train, ind, generators, seed, seen, dropped)
    paths = {name: out_dir / f"{name}.jsonl" for name in SPLITS}
    for name in SPLITS:
        _write_jsonl(paths[name], splits[name])
    manifest = {
        "source": f"reasoning-gym {metadata.version('reasoning-gym')} gsm_symbolic",
        "seed": seed,
        "templates": {"in_distribution": ind, "held_out": ood},
        "sizes": {name: len(splits[name]) for name in SPLITS},
        "dropped_false_reference": dropped,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return paths
