"""`benchmarks/reproduce.py --quick` end to end: every stage of the study at toy size (VFT, the candidate
files, the lr and beta choices on the validation split, the arms in their tiers under both label rules over
two seeds in two worker processes, evaluation, report), a second invocation that reuses every finished arm,
and the arms from the initial model (--aft_init base). The numbers mean nothing at this size; the tests check
that the outputs exist and agree with each other and with the held-out candidate file, recomputing what they
check from the per-seed and per-question values."""

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


def test_every_tier_of_arms_seeds_and_rules_has_a_result(quick):
    """The core arms at every seed under answer labels; the other arms and the verified-label arms at the
    first `other_seeds` (quick: 1), the verified arms then at the rest."""
    raw = quick["json"]
    plan = raw["plan"]
    arms, seeds, few = plan["arms"], plan["seeds"], plan["seeds"][: plan["other_seeds"]]
    assert {"control", "rft", "bcl"} <= set(arms) and any(a.endswith("+bc") for a in arms)
    assert plan["labels"] == ["answer", "verified"] and len(seeds) >= 2 and len(few) < len(seeds)
    assert raw["seeds"] == seeds  # the seeds actually run
    core = [a for a in arms if a in ("control", "rft", "dcl", "bcl")]
    want = sorted(
        [("-" if a == "control" else "answer", a, s) for a in core for s in seeds]
        + [("answer", a, s) for a in arms if a not in core for s in few]
        + [("verified", a, s) for a in plan["verified_arms"] for s in seeds]
    )
    assert sorted((r["job"]["label"], r["job"]["arm"], r["job"]["seed"]) for r in raw["results"]) == want
    n_test = plan["base"]["synthetic_test"]
    scored = plan["seeds"][: plan["score_seeds"]]  # the held-out set is scored at these seeds only
    assert 0 < len(scored) < len(seeds)
    for r in [*raw["results"], raw["start"]["test"]]:
        m = r["metrics"]
        assert r["summary"]["questions"] == n_test
        heldout = r is raw["start"]["test"] or r["job"]["seed"] in scored
        assert r.get("key", {}).get("heldout", True) == heldout
        for k in ("accuracy", "chain_accuracy", "fixed_rerank_accuracy", "fixed_assess_acc"):
            if k.startswith("fixed_") and not heldout:
                assert m[k] is None, k
            else:
                assert 0.0 <= m[k] <= 1.0, k
        assert m["chain_accuracy"] <= m["accuracy"]  # right reasoning is a subset of right answers
        # The per-question record the paired tests use is the same evaluation as the accuracy.
        for key in ("accuracy", "chain_accuracy"):
            bits = r["per_question"][key]
            assert len(bits) == n_test and set(bits) <= {"0", "1"}
            assert bits.count("1") / n_test == pytest.approx(m[key])
    for r in raw["results"]:
        assert r["train_seconds"] > 0 and r["eval_seconds"] > 0
        assert r["key"]["lr"] == raw["lr"]  # every test arm at the lr chosen on validation
    # rft trained on more than the references: its metrics.jsonl logged the aft stage with loss vft.
    assert all(
        r["train_metrics"]["train/align_loss"] == 0.0
        for r in raw["results"]
        if r["job"]["arm"] in ("control", "rft")
    )


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
    scored = [r for r in raw["results"] if r["key"]["heldout"]]
    assert scored
    for r in [raw["start"]["test"], *scored]:
        assert r["summary"]["eval/fixed_assess_pairs"] == want["answer"]
        assert r["summary"].get("eval/fixed_assess_pairs_verified", 0) == want["verified"]


def test_settings_are_chosen_on_the_validation_split(quick):
    """The lr: the candidate under which the control does best on validation (ties: the larger); beta: bcl's
    best validation accuracy at that lr, ties to the smaller."""
    raw = quick["json"]
    plan, val = raw["plan"], raw["val"]
    assert val and all(r["job"]["split"] == "val" for r in val)
    assert all(r["summary"]["questions"] == plan["val_questions"] for r in val)

    def mean(rs: list[dict]) -> float:
        return sum(r["metrics"]["accuracy"] for r in rs) / len(rs)

    control = {
        lr: mean([r for r in val if r["job"]["arm"] == "control" and r["job"]["lr"] == lr])
        for lr in plan["lrs"]
    }
    best = max(control.values())
    assert raw["lr"] == max(lr for lr, v in control.items() if v == best)
    for label, beta in raw["betas"].items():
        sweep = {
            b: mean(
                [
                    r
                    for r in val
                    if r["job"]["arm"] == "bcl"
                    and r["job"]["label"] == label
                    and r["job"]["beta"] == b
                    and r["job"]["lr"] == raw["lr"]
                ]
            )
            for b in plan["betas"]
        }
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
            if ref not in table:
                continue
            a, b = _per_seed(raw, label, arm), _per_seed(raw, label, ref)
            seeds = sorted(set(a) & set(b))
            d = [a[s] - b[s] for s in seeds]
            got = table[arm]["vs_control" if ref == "control" else "vs_rft"]
            assert got["seeds"] == seeds and got["diffs"] == pytest.approx(d)
            assert got["mean"] == pytest.approx(sum(d) / len(d))
            if len(set(d)) > 1:
                p = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue
                assert got["t_p"] == pytest.approx(p)


def test_per_question_bootstrap_is_centred_on_the_pooled_difference(quick):
    """The pooled per-question difference is the mean of the seeds' accuracy differences (same questions
    every seed), and its interval holds it."""
    raw = quick["json"]
    comp = raw["summary"]["comparisons"]["answer:bcl − control"]
    by_seed, boot = comp["by_seed"]["accuracy"], comp["by_question"]
    assert boot["seeds"] == by_seed["seeds"]
    assert boot["mean"] == pytest.approx(by_seed["mean"])
    assert boot["ci"][0] <= boot["mean"] <= boot["ci"][1] and 0.0 <= boot["p"] <= 1.0 and boot["se"] >= 0


def test_markdown_agrees_with_the_json(quick):
    raw, md = quick["json"], quick["md"]
    assert "--quick" in md and "## Label rule: answer" in md and "## Label rule: verified" in md
    assert "## Paired differences" in md and "chosen on the validation split" in md
    assert "## What the design can detect" in md
    for label in ("answer", "verified"):
        section = md.split(f"## Label rule: {label}")[1].split("##")[0]
        rows = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ")}
        for arm in raw["plan"]["arms"]:
            accs = _per_seed(raw, label, arm)
            if not accs:  # not run under this rule (a tier that rule skips): no row either
                assert arm not in rows
                continue
            mean = 100 * sum(accs.values()) / len(accs)
            cells = [c.strip() for c in rows[arm].split("|")]
            assert int(cells[3]) == len(accs), rows[arm]
            assert float(cells[4].split("±")[0]) == pytest.approx(mean, abs=0.051), rows[arm]


def test_plots_are_png_files(quick):
    plots = quick["json"]["meta"]["plots"]
    assert "reproduce_metrics.png" in plots
    for name in plots:
        assert (quick["out"] / name).read_bytes()[:8] == PNG, name
    assert not list(quick["out"].glob("*.tmp")) and not list(quick["out"].glob(".*.tmp"))


def test_second_invocation_reuses_every_finished_arm(quick):
    r = _reproduce("--quick", f"--work_dir={quick['work']}", f"--out={quick['out']}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [x for x in r.stdout.splitlines() if x.startswith("[reproduce] ") and " seed " in x]
    runs = len(quick["json"]["results"]) + len(quick["json"]["val"])
    assert len(lines) == runs and all("(cached)" in x for x in lines)
    again = json.loads((quick["out"] / "reproduce.json").read_text())
    assert again["summary"]["tables"] == quick["json"]["summary"]["tables"]


def test_arms_from_the_initial_model(quick, tmp_path):
    """--aft_init base: the arms start from the model VFT started from (the base is reused), not the VFT
    model, and are cached apart from the default arms."""
    out = tmp_path / "out"
    r = _reproduce(
        "--quick",
        "--aft_init",
        "base",
        "--arms",
        "control",
        "rft",
        "bcl",
        "--seeds",
        "0",
        "1",
        f"--work_dir={quick['work']}",
        f"--out={out}",
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    raw = json.loads((out / "reproduce.json").read_text())
    assert raw["plan"]["init"] == "base" and raw["results"]
    assert all(r["key"]["init"] == "base" for r in raw["results"])
    assert (quick["work"] / "arms-from-init").is_dir()
    assert "model VFT started from" in (out / "reproduce.md").read_text()

    # Two steps from the untrained model leave the reference chains far less likely than the VFT model's.
    def ppl(results: list[dict]) -> dict[int, float]:
        return {
            r["job"]["seed"]: r["summary"]["eval/perplexity"] for r in results if r["job"]["arm"] == "control"
        }

    from_init, from_vft = ppl(raw["results"]), ppl(quick["json"]["results"])
    assert from_init and all(from_init[s] > 2 * from_vft[s] for s in from_init)


def test_the_report_names_no_folder_of_the_machine_it_ran_on(quick):
    assert quick["json"]["meta"]["command"] == "python benchmarks/reproduce.py --quick"
    for text in (quick["md"], json.dumps(quick["json"]["meta"])):
        assert str(quick["work"]) not in text and str(quick["out"]) not in text


def test_bad_arm_is_rejected_naming_the_argument():
    r = _reproduce("--quick", "--arms", "ppo")
    assert r.returncode == 2 and "--arms" in r.stderr and "ppo" in r.stderr
