"""`benchmarks/reproduce.py --quick` end to end: every stage of the reproduction at toy size (VFT, the
candidate files, the beta sweep on the validation split, the arms under both label rules over two seeds in
two worker processes, evaluation, report), then a second invocation that reuses every finished arm. The
numbers mean nothing at this size; the test checks that the outputs exist and agree with each other and with
the held-out candidate file, recomputing what it checks from the per-seed values."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from scipy import stats

from aft_fast.data.candidates import read_candidates
from tests._train_support import ROOT, clean_env

PNG = b"\x89PNG\r\n\x1a\n"


def _reproduce(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "benchmarks/reproduce.py", *args],
        cwd=ROOT,
        env=clean_env(TOKENIZERS_PARALLELISM="false"),
        capture_output=True,
        text=True,
        timeout=1200,  # about 3 min on 2 idle cores; far more when they are shared
    )


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reproduce")
    work, out = root / "work", root / "out"
    r = _reproduce("--quick", f"--work_dir={work}", f"--out={out}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {
        "work": work,
        "out": out,
        "stdout": r.stdout,
        "md": (out / "reproduce.md").read_text(),
        "json": json.loads((out / "reproduce.json").read_text()),
    }


def _per_seed(raw: dict, label: str, arm: str, key: str = "accuracy") -> dict[int, float]:
    want = "-" if arm == "control" else label
    return {
        r["job"]["seed"]: r["metrics"][key]
        for r in raw["results"]
        if r["job"]["arm"] == arm and r["job"]["label"] == want
    }


def test_every_arm_rule_and_seed_has_a_result(quick):
    raw = quick["json"]
    plan = raw["plan"]
    arms, seeds, labels = plan["arms"], plan["seeds"], plan["labels"]
    assert {"control", "rft", "bcl"} <= set(arms) and any(a.endswith("+bc") for a in arms)
    assert labels == ["answer", "verified"] and len(seeds) >= 2
    assert raw["seeds"] == seeds  # the seeds actually run
    want = sorted(
        [("-", "control", s) for s in seeds]
        + [(lab, a, s) for lab in labels for a in arms if a != "control" for s in seeds]
    )
    assert sorted((r["job"]["label"], r["job"]["arm"], r["job"]["seed"]) for r in raw["results"]) == want
    n_test = plan["base"]["synthetic_test"]
    for r in raw["results"]:
        m = r["metrics"]
        assert r["summary"]["questions"] == n_test
        for k in ("accuracy", "chain_accuracy", "rerank_accuracy", "self_consistency"):
            assert 0.0 <= m[k] <= 1.0, k
        assert m["chain_accuracy"] <= m["accuracy"]  # right reasoning is a subset of right answers
        assert r["train_seconds"] > 0 and r["eval_seconds"] > 0
    # rft trained on more than the references: its metrics.jsonl logged the aft stage with loss vft.
    assert all(r["train_metrics"]["train/align_loss"] == 0.0 for r in raw["results"]
               if r["job"]["arm"] in ("control", "rft"))


def test_assessment_pairs_match_the_held_out_file(quick):
    """Every arm scores the same held-out chains: its pair counts under both rules are the file's."""
    groups = read_candidates(quick["work"] / "base" / "heldout_test.jsonl")
    want = {}
    for rule in ("answer", "verified"):
        pairs = 0
        for g in groups:
            pos = sum(bool(c.answer_correct) and (rule == "answer" or bool(c.chain_ok)) for c in g.candidates)
            pairs += pos * (len(g.candidates) - pos)
        want[rule] = pairs
    raw = quick["json"]
    for r in [raw["start"], *raw["results"]]:
        assert r["pairs"] == want


def test_beta_is_the_validation_argmax(quick):
    raw = quick["json"]
    for label, beta in raw["betas"].items():
        sweep = {
            r["job"]["beta"]: r["metrics"]["accuracy"] for r in raw["sweep"] if r["job"]["label"] == label
        }
        assert set(sweep) == set(raw["plan"]["betas"])
        best = max(sweep.values())
        assert beta == min(b for b, v in sweep.items() if v == best)
        for r in raw["results"]:
            if r["job"]["arm"] in ("bcl", "rrhf+bc") and r["job"]["label"] == label:
                assert r["job"]["beta"] == beta


def test_paired_differences_and_tests(quick):
    raw = quick["json"]
    for label in ("answer", "verified"):
        table = raw["summary"]["tables"][label]
        for arm, ref in (("bcl", "control"), ("bcl", "rft")):
            a, b = _per_seed(raw, label, arm), _per_seed(raw, label, ref)
            seeds = sorted(a)
            d = [a[s] - b[s] for s in seeds]
            got = table[arm]["vs_control" if ref == "control" else "vs_rft"]
            assert got["seeds"] == seeds and got["diffs"] == pytest.approx(d)
            assert got["mean"] == pytest.approx(sum(d) / len(d))
            if len(set(d)) > 1:
                p = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue
                assert got["t_p"] == pytest.approx(p)


def test_markdown_agrees_with_the_json(quick):
    raw, md = quick["json"], quick["md"]
    assert "--quick" in md and "## Label rule: answer" in md and "## Label rule: verified" in md
    assert "## Paired differences" in md and "chosen on the validation split" in md
    for label in ("answer", "verified"):
        section = md.split(f"## Label rule: {label}")[1].split("##")[0]
        rows = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ")}
        for arm in raw["plan"]["arms"]:
            accs = _per_seed(raw, label, arm)
            mean = 100 * sum(accs.values()) / len(accs)
            cells = [c.strip() for c in rows[arm].split("|")]
            assert float(cells[3].split("±")[0]) == pytest.approx(mean, abs=0.051), rows[arm]


def test_plots_are_png_files(quick):
    plots = quick["json"]["meta"]["plots"]
    assert "reproduce_metrics.png" in plots
    for name in plots:
        assert (quick["out"] / name).read_bytes()[:8] == PNG, name
    assert not list(quick["out"].glob("*.tmp")) and not list(quick["out"].glob(".*.tmp"))


def test_second_invocation_reuses_every_finished_arm(quick):
    # A result carried into the cache by hand keeps saying where it came from, in the report.
    carried = sorted(quick["work"].glob("arms/test/*/*/*/result.json"))[0]
    entry = json.loads(carried.read_text())
    carried.write_text(json.dumps({**entry, "reused_from": "an earlier run on the same base"}))
    r = _reproduce("--quick", f"--work_dir={quick['work']}", f"--out={quick['out']}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [x for x in r.stdout.splitlines() if x.startswith("[reproduce] ") and " seed " in x and "/" in x]
    runs = len(quick["json"]["results"]) + len(quick["json"]["sweep"])
    assert len(lines) == runs and all("(cached)" in x for x in lines)
    again = json.loads((quick["out"] / "reproduce.json").read_text())
    assert again["summary"]["tables"] == quick["json"]["summary"]["tables"]
    md = (quick["out"] / "reproduce.md").read_text()
    assert f"1 of the {runs} runs are reused: an earlier run on the same base." in md


def test_the_report_names_no_folder_of_the_machine_it_ran_on(quick):
    assert quick["json"]["meta"]["command"] == "python benchmarks/reproduce.py --quick"
    for text in (quick["md"], json.dumps(quick["json"]["meta"])):
        assert str(quick["work"]) not in text and str(quick["out"]) not in text


def test_bad_arm_is_rejected_naming_the_argument():
    r = _reproduce("--quick", "--arms", "ppo")
    assert r.returncode == 2 and "--arms" in r.stderr and "ppo" in r.stderr
