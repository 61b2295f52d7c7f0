"""`benchmarks/reproduce.py --quick` end to end: every stage of the reproduction at toy size (VFT, the two
candidate files, the arms over two seeds, evaluation, report). The numbers mean nothing at this size; the
test checks that the outputs exist and agree with each other and with the held-out candidate file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from aft_fast.data.candidates import read_candidates
from tests._train_support import ROOT, clean_env

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reproduce")
    work, out = root / "work", root / "out"
    r = subprocess.run(
        [sys.executable, "benchmarks/reproduce.py", "--quick", f"--work_dir={work}", f"--out={out}"],
        cwd=ROOT,
        env=clean_env(TOKENIZERS_PARALLELISM="false"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {
        "work": work,
        "out": out,
        "stdout": r.stdout,
        "md": (out / "reproduce.md").read_text(),
        "json": json.loads((out / "reproduce.json").read_text()),
    }


def test_every_arm_and_seed_has_a_result(quick):
    raw = quick["json"]
    arms, seeds = raw["plan"]["arms"], raw["plan"]["seeds"]
    assert len(arms) >= 4 and len(seeds) >= 2  # the control, AFT, a baseline and its +bc; a spread
    assert "vft-continued" in arms and any(a.endswith("+bc") for a in arms)
    got = sorted((r["arm"], r["seed"]) for r in raw["results"])
    assert got == sorted((a, s) for a in arms for s in seeds)
    n_test = raw["plan"]["base"]["synthetic_test"]
    for r in raw["results"]:
        s = r["summary"]
        assert s["questions"] == n_test
        assert 0.0 <= s["eval/accuracy"] <= 1.0
        assert s["eval/perplexity"] >= 1.0  # exp of a mean NLL, which is >= 0
        assert r["train_seconds"] > 0 and r["eval_seconds"] > 0


def test_assessment_counts_match_the_held_out_file(quick):
    """Every arm scores the same held-out chains: its pair and question counts are those of the file."""
    groups = read_candidates(quick["work"] / "base" / "heldout_test.jsonl")
    pairs, questions = 0, 0
    for g in groups:
        pos = sum(c.correct for c in g.candidates)
        neg = len(g.candidates) - pos
        pairs += pos * neg
        questions += pos > 0 and neg > 0
    raw = quick["json"]
    for s in [raw["start"]["summary"], *(r["summary"] for r in raw["results"])]:
        assert s["eval/fixed_assess_pairs"] == pairs
        assert s["eval/fixed_assess_questions"] == questions
        acc = s["eval/fixed_assess_acc"]
        assert (acc is None) if pairs == 0 else (0.0 <= acc <= 1.0)


def test_markdown_table_agrees_with_the_json(quick):
    raw, md = quick["json"], quick["md"]
    assert "--quick" in md and "| arm |" in md
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    for arm in raw["plan"]["arms"]:
        accs = {r["seed"]: r["summary"]["eval/accuracy"] for r in raw["results"] if r["arm"] == arm}
        per_seed = " / ".join(f"{100 * accs[s]:.1f}" for s in sorted(accs))
        mean = 100 * sum(accs.values()) / len(accs)
        cells = [c.strip() for c in rows[arm].split("|")]
        assert cells[-2] == per_seed, rows[arm]  # the last column: accuracy per seed
        assert float(cells[3].split("±")[0]) == pytest.approx(mean, abs=0.051), rows[arm]
    start = raw["start"]["summary"]["eval/accuracy"]
    assert f"{100 * start:.1f}" in rows["VFT (start)"]


def test_plots_are_png_files(quick):
    plots = quick["json"]["meta"]["plots"]
    assert {"reproduce_scores.png", "reproduce_metrics.png"} <= set(plots)
    for name in plots:
        assert (quick["out"] / name).read_bytes()[:8] == PNG, name
    assert not list(quick["out"].glob("*.tmp"))  # written atomically


def test_bad_arm_is_rejected_naming_the_argument():
    r = subprocess.run(
        [sys.executable, "benchmarks/reproduce.py", "--quick", "--arms", "ppo"],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--arms" in r.stderr and "ppo" in r.stderr
