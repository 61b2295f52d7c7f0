"""The reproduction study's report (benchmarks/reproduce.py runs the arms): the settings chosen on the
validation split, the tables, the paired tests, the smallest detectable gain, and the plots.

Two paired tests, both two-sided:
- by seed: each arm's mean accuracy per seed against another arm's at the same seed (the same data order),
  a paired t-test (scipy.stats.ttest_rel). Its spread is that of the fine-tuning alone: the seeds share the
  VFT model, the candidates and the test set.
- by question and seed: a bootstrap of the mean per-question difference (right minus right, pooled over the
  seeds both arms ran), resampling questions and seeds with replacement. It adds the test set's own sampling
  error, so it asks whether the gain would hold on other questions from the task.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from benchmarks import _common

# evaluate()'s summary keys (without "eval/") the study reports, and their column titles. The held-out
# ("fixed") set is the VFT model's own samples on the test questions, scored by every arm.
METRICS = {
    "accuracy": "greedy %",
    "chain_accuracy": "chain %",
    "fixed_rerank_accuracy": "held-out re-rank %",
    "fixed_assess_acc": "assess. (answer) %",
    "fixed_assess_acc_verified": "assess. (verified) %",
}
BOOTSTRAP = 4000  # resamples; seeded, so the report is reproducible


def _arm_label(arm: str, label: str) -> str:
    return "-" if arm == "control" else label


def values(results: list[dict], label: str, arm: str, key: str) -> dict[int, float]:
    """seed -> metric of one arm under one label rule (the control serves every rule)."""
    return {
        r["job"]["seed"]: r["metrics"][key]
        for r in results
        if r["job"]["arm"] == arm
        and r["job"]["label"] == _arm_label(arm, label)
        and r["metrics"].get(key) is not None
    }


def per_question(results: list[dict], label: str, arm: str, key: str) -> dict[int, str]:
    return {
        r["job"]["seed"]: r["per_question"][key]
        for r in results
        if r["job"]["arm"] == arm and r["job"]["label"] == _arm_label(arm, label)
    }


def paired(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """a - b over the seeds both have: mean, sample std, seeds up / down, paired t-test p."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    out: dict[str, Any] = {"seeds": seeds, "diffs": d}
    if not d:
        return out
    out.update(
        mean=float(np.mean(d)),
        std=float(np.std(d, ddof=1)) if len(d) > 1 else 0.0,
        up=sum(x > 0 for x in d),
        down=sum(x < 0 for x in d),
        t_p=None,
    )
    if len(d) >= 2 and any(x != d[0] for x in d):
        out["t_p"] = float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)
    return out


def bootstrap(a: dict[int, str], b: dict[int, str], reps: int = BOOTSTRAP) -> dict[str, Any]:
    """The mean per-question difference a - b over the seeds both ran, its bootstrap standard error, 95%
    interval and two-sided p (twice the share of resamples on the far side of zero), resampling questions
    and seeds."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return {}
    d = np.array([[int(x) - int(y) for x, y in zip(a[s], b[s], strict=True)] for s in seeds], dtype=np.int8)
    rng = np.random.default_rng(0)
    n_s, n_q = d.shape
    means = np.empty(reps)
    for i in range(reps):
        rows = d[rng.integers(0, n_s, n_s)]
        means[i] = rows[:, rng.integers(0, n_q, n_q)].mean()
    mean = float(d.mean())
    far = (means <= 0).mean() if mean > 0 else (means >= 0).mean()
    return {
        "seeds": seeds,
        "mean": mean,
        "se": float(means.std(ddof=1)),
        "ci": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))],
        "p": float(min(1.0, 2 * far)),
    }


def detectable(std: float, n: int) -> float | None:
    """The smallest true mean gain a paired t-test over n seeds finds at p < 0.05 with 80% power, given the
    std of the paired differences."""
    if n < 2:
        return None
    return float((stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * std / np.sqrt(n))


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def choose_lr(plan, val: list[dict]) -> float:
    """The candidate lr under which the control (continued VFT), averaged over the validation seeds, does best
    on the validation split (ties: the larger lr): AFT is compared with the strongest control. The report
    says whether that control ends at or above the VFT model."""
    mean = {
        lr: _mean(
            [r["metrics"]["accuracy"] for r in val if r["job"]["arm"] == "control" and r["job"]["lr"] == lr]
        )
        for lr in plan.lrs
    }
    return max(mean, key=lambda lr: (mean[lr], lr))


def choose_betas(plan, val: list[dict], lr: float) -> dict[str, float]:
    """Per label rule: the beta with bcl's best mean validation accuracy (ties: the smaller beta)."""
    chosen = {}
    for label in plan.labels:
        mean = {}
        for b in plan.betas:
            accs = [
                r["metrics"]["accuracy"]
                for r in val
                if r["job"]["arm"] == "bcl"
                and r["job"]["label"] == label
                and r["job"]["lr"] == lr
                and r["job"]["beta"] == b
            ]
            if accs:
                mean[b] = _mean(accs)
        chosen[label] = max(mean, key=lambda b: (mean[b], -b)) if mean else plan.betas[0]
    return chosen


# ---------------------------------------------------------------------------------------------------------
# Formatting.


def _pct(vals: dict[int, float]) -> str:
    if not vals:
        return "n/a"
    v = [100 * x for x in vals.values()]
    return f"{_mean(v):.1f} ± {np.std(v, ddof=1):.1f}" if len(v) > 1 else f"{v[0]:.1f}"


def _p(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2g}"


def _delta(p: dict[str, Any]) -> str:
    if "mean" not in p:
        return "n/a"
    return f"{100 * p['mean']:+.1f} ± {100 * p['std']:.1f} ({p['up']}↑{p['down']}↓, t p={_p(p['t_p'])})"


def _boot(b: dict[str, Any]) -> str:
    if not b:
        return "n/a"
    lo, hi = b["ci"]
    p = f"p={_p(b['p'])}" if b["p"] > 0 else f"p<{1 / BOOTSTRAP:.2g}"  # no resample crossed zero
    return f"{100 * b['mean']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}], {p}"


def _start_name(plan, cfg) -> str:
    if plan.init != "vft":
        return "model VFT started from (--aft_init base), with a fresh AdamW"
    if cfg.aft_optimizer == "vft":
        return "VFT model, continuing its AdamW moments (aft_optimizer vft)"
    return "VFT model, with a fresh AdamW"


def _start_metric(start: dict, split: str, key: str) -> str:
    v = start[split]["summary"].get(f"eval/{key}")
    return "n/a" if v is None else f"{100 * v:.1f}"


def base_facts(base: dict) -> dict[str, Any]:
    """How close the VFT model sits to the edge of its competence, from its training candidates."""
    from aft_fast.data.candidates import read_candidates

    heldout = read_candidates(base["dir"] / "heldout_test.jsonl")
    groups = read_candidates(base["cfg"].candidates_path)
    right = [[bool(c.answer_correct) for c in g.candidates] for g in groups]
    positives = [c for g in groups for c in g.candidates if c.answer_correct]
    n = max(len(groups), 1)
    return {
        "questions": len(groups),
        "mixed": sum(0 < sum(r) < len(r) for r in right) / n,
        "all_right": sum(bool(r) and all(r) for r in right) / n,
        "none_right": sum(not any(r) for r in right) / n,
        "sample_accuracy": sum(map(sum, right)) / max(sum(map(len, right)), 1),
        "answer_positives": len(positives),
        "verified_positives": sum(bool(c.chain_ok) for c in positives),
        "false_step_positives": sum(c.chain_ok is False for c in positives) / max(len(positives), 1),
        "heldout_pass_at_k": sum(any(c.answer_correct for c in g.candidates) for g in heldout)
        / max(len(heldout), 1),
    }


COMPARISONS = [  # (question, arm a, arm b): a - b under each label rule
    *[("AFT vs control", a, "control") for a in ("dcl", "bcl")],
    *[("AFT vs RFT", a, "rft") for a in ("dcl", "bcl")],
    ("RFT vs control", "rft", "control"),
    *[("constraint", a, "align") for a in ("dcl", "bcl")],
    ("align vs control", "align", "control"),
    *[("+bc", f"{x}+bc", x) for x in ("dpo", "rrhf", "pro")],
]


def write(out: Path, plan, base: dict, start: dict, state: dict, meta: dict, plots: bool) -> None:
    """reproduce.md, reproduce.json and (with plots) the PNGs into `out`, from what has run so far."""
    from aft_fast.constants import train_mode

    test, val = state["test"], state["val"]
    if plots and test:
        meta["plots"] = _plots(out, plan, start, test)
    cfg, facts = base["cfg"], base_facts(base)
    seeds_run = sorted({r["job"]["seed"] for r in test})
    times = ", ".join(f"{k} {v / 60:.1f} min" for k, v in base["timings"].items()) or "reused"
    worker_min = sum(r["train_seconds"] + r["eval_seconds"] for r in (*val, *test)) / 60
    n_test = start["test"]["summary"]["questions"]
    L = [
        f"# Reproduction: AFT against continued VFT and RFT, the constraint, label noise ({meta['title']})",
        "",
        f"Command: `{meta['command']}`: {meta['minutes']:.0f} min in its last invocation, {worker_min:.0f} "
        f"worker-min of arm runs in all ({len(val) + len(test)} runs), on {meta['env']['gpu']} "
        f"({meta['env']['torch']}, git {meta['env']['git_sha']}, {meta['env']['timestamp']}); "
        f"{plan.workers} arm workers. Shared base: {times}.",
        "",
        "## The start: a VFT model at the edge of its competence",
        "",
        f"{cfg.vft_steps} VFT steps of {cfg.vft_batch_size} on task `{cfg.synthetic_task}` "
        f"({cfg.synthetic_train} problems). On its {facts['questions']} training questions, k = "
        f"{cfg.num_samples} samples at temperature {cfg.temperature:g}: "
        f"{100 * facts['sample_accuracy']:.1f}% of samples right; {100 * facts['mixed']:.1f}% of questions "
        "have both a right and a wrong sample, "
        f"{100 * facts['all_right']:.1f}% only right ones, {100 * facts['none_right']:.1f}% none; "
        f"{100 * facts['false_step_positives']:.1f}% of the {facts['answer_positives']} answer-positives "
        f"hold a false step ({facts['verified_positives']} verified positives).",
        "",
        _common.markdown_table(
            [
                "split",
                "questions",
                "greedy %",
                "chain %",
                f"pass@{plan.heldout_samples} % (held-out set)",
                "held-out re-rank %",
                "held-out assess. (answer) %",
            ],
            [
                [
                    "test",
                    n_test,
                    _start_metric(start, "test", "accuracy"),
                    _start_metric(start, "test", "chain_accuracy"),
                    f"{100 * facts['heldout_pass_at_k']:.1f}",
                    _start_metric(start, "test", "fixed_rerank_accuracy"),
                    _start_metric(start, "test", "fixed_assess_acc"),
                ],
                [
                    "validation",
                    start["val"]["summary"]["questions"],
                    _start_metric(start, "val", "accuracy"),
                    _start_metric(start, "val", "chain_accuracy"),
                    "",
                    "",
                    "",
                ],
            ],
        ),
        "",
    ]
    # Settings chosen on validation.
    L += [
        "## Settings chosen on the validation split (before the test split was scored)",
        "",
        f"Each arm: {plan.aft_steps} steps of {plan.aft_batch_size} questions, warm-up {cfg.warmup_ratio:g} "
        f"then cosine to {cfg.min_lr_ratio:g} x the peak lr, w_vft 1, w_align {plan.w_align:g}, from the "
        f"{_start_name(plan, cfg)}. "
        f"Validation: {start['val']['summary']['questions']} fresh problems, seeds "
        f"{', '.join(map(str, plan.val_seeds))}. The lr: the candidate under which the control does best "
        "(the strongest control). beta: bcl's best validation accuracy (ties: smaller).",
        "",
    ]
    rows = []
    for lr in plan.lrs:
        accs = {
            r["job"]["seed"]: r["metrics"]["accuracy"]
            for r in val
            if r["job"]["arm"] == "control" and r["job"]["lr"] == lr
        }
        rows.append(
            [
                f"{lr:g}" + (" ←" if lr == state["lr"] else ""),
                "control",
                "-",
                _pct(accs),
                f"{100 * (_mean(list(accs.values())) - start['val']['metrics']['accuracy']):+.1f}"
                if accs
                else "n/a",
            ]
        )
    for label in plan.labels:
        for b in plan.betas:
            accs = {
                r["job"]["seed"]: r["metrics"]["accuracy"]
                for r in val
                if r["job"]["arm"] == "bcl" and r["job"]["label"] == label and r["job"]["beta"] == b
            }
            if accs:
                pick = " ←" if state["betas"].get(label) == b else ""
                rows.append(
                    [
                        f"{state['lr']:g}",
                        f"bcl ({label})",
                        f"{b:g}{pick}",
                        _pct(accs),
                        f"{100 * (_mean(list(accs.values())) - start['val']['metrics']['accuracy']):+.1f}",
                    ]
                )
    L += [_common.markdown_table(["lr", "arm", "beta", "val greedy %", "Δ vs VFT (val)"], rows), ""]
    # The arms on the test split.
    summary: dict[str, Any] = {
        "seeds_run": seeds_run,
        "lr": state["lr"],
        "betas": state["betas"],
        "base": facts,
        "tables": {},
        "comparisons": {},
    }
    start_row = ["VFT (start)", "", "1", *[_start_metric(start, "test", k) for k in METRICS], "", ""]
    for label in plan.labels:
        arms = [a for a in plan.arms if values(test, label, a, "accuracy")]
        if not arms:
            continue
        rows, table = [start_row], {}
        for a in arms:
            v = {k: values(test, label, a, k) for k in METRICS}
            vs_c = paired(v["accuracy"], values(test, label, "control", "accuracy"))
            vs_r = paired(v["accuracy"], values(test, label, "rft", "accuracy"))
            mode = next(r["key"]["mode"] for r in test if r["job"]["arm"] == a)
            mode += f" β={state['betas'][label]:g}" if train_mode(mode).boundary else ""
            rows.append(
                [
                    a,
                    mode,
                    len(v["accuracy"]),
                    *[_pct(v[k]) for k in METRICS],
                    _delta(vs_c) if a != "control" else "",
                    _delta(vs_r) if a != "rft" else "",
                ]
            )
            table[a] = {"values": v, "vs_control": vs_c, "vs_rft": vs_r}
        summary["tables"][label] = table
        L += [
            f"## Label rule: {label} (the control reads no labels: the same runs in both tables)",
            "",
            f"Test: {n_test} questions. Mean ± sample std over seeds, in %; Δ: paired by seed, in points "
            f"(↑↓: seeds up / down; p: paired t-test). The held-out columns (re-rank, assessment): the first "
            f"{plan.score_seeds} seeds of each arm.",
            "",
            _common.markdown_table(
                ["arm", "mode", "seeds", *METRICS.values(), "Δ greedy vs control", "Δ greedy vs RFT"], rows
            ),
            "",
        ]
    # Paired differences: by seed and by question.
    rows = _against_start(summary, test, start)
    for label in plan.labels:
        for what, a, b in COMPARISONS:
            _compare(summary, rows, test, label, what, a, b, label, label)
    for a in plan.verified_arms:
        _compare(summary, rows, test, "both", "label noise", a, a, "verified", "answer")
    if rows:
        L += [
            "## Paired differences",
            "",
            "Δ by seed: mean ± std of the per-seed differences (t-test). By question: the mean per-question "
            "difference pooled over the seeds, with its bootstrap 95% interval over questions and seeds.",
            "",
            _common.markdown_table(
                [
                    "rule",
                    "question",
                    "difference",
                    "seeds",
                    "Δ greedy by seed",
                    "Δ greedy by question",
                    "Δ chain by seed",
                ],
                rows,
            ),
            "",
        ]
    L += _power(summary, test, n_test, start)
    L += _diagnostics(plan, test)
    L += [f"Plots: {', '.join(meta['plots']) or 'none yet'}.", ""]
    _write(out, "reproduce.md", "\n".join(L))
    from dataclasses import asdict

    raw = {
        "plan": asdict(plan),
        "meta": meta,
        "seeds": seeds_run,
        "lr": state["lr"],
        "betas": state["betas"],
        "base": {"timings": base["timings"], "candidates": base["candidates_meta"], "facts": facts},
        "start": {s: {k: v for k, v in start[s].items() if k != "scores"} for s in ("test", "val")},
        "summary": summary,
        "val": val,
        "results": [{k: v for k, v in r.items() if k != "scores"} for r in test],
    }
    _write(out, "reproduce.json", json.dumps(raw, indent=1, default=str) + "\n")


def _compare(
    summary: dict,
    rows: list,
    test: list[dict],
    rule: str,
    what: str,
    a: str,
    b: str,
    label_a: str,
    label_b: str,
) -> None:
    """One row of the paired-differences table (a under label_a minus b under label_b), if both ran."""
    by_seed = {
        k: paired(values(test, label_a, a, k), values(test, label_b, b, k))
        for k in ("accuracy", "chain_accuracy")
    }
    if "mean" not in by_seed["accuracy"]:
        return
    boot = bootstrap(per_question(test, label_a, a, "accuracy"), per_question(test, label_b, b, "accuracy"))
    name = f"{a} − {b}" if a != b else f"{a}: {label_a} − {label_b}"
    summary["comparisons"][f"{rule}:{name}"] = {"by_seed": by_seed, "by_question": boot}
    rows.append(
        [
            rule,
            what,
            name,
            len(by_seed["accuracy"]["seeds"]),
            _delta(by_seed["accuracy"]),
            _boot(boot),
            _delta(by_seed["chain_accuracy"]),
        ]
    )


def _against_start(summary: dict, test: list[dict], start: dict) -> list[list]:
    """The control against the VFT model it starts from: its one accuracy paired with each seed's (by seed a
    one-sample t-test), and per question pooled over the seeds (the bootstrap resamples both)."""
    control = {k: values(test, "answer", "control", k) for k in ("accuracy", "chain_accuracy")}
    if not control["accuracy"]:
        return []
    by_seed = {k: paired(v, {s: start["test"]["metrics"][k] for s in v}) for k, v in control.items()}
    mine = per_question(test, "answer", "control", "accuracy")
    boot = bootstrap(mine, {s: start["test"]["per_question"]["accuracy"] for s in mine})
    summary["comparisons"]["-:control − start"] = {"by_seed": by_seed, "by_question": boot}
    row = ["-", "the control keeps its start", "control − start", len(by_seed["accuracy"]["seeds"])]
    return [[*row, _delta(by_seed["accuracy"]), _boot(boot), _delta(by_seed["chain_accuracy"])]]


def _power(summary: dict, test: list[dict], n_test: int, start: dict) -> list[str]:
    """The smallest gain the design detects, from the spreads measured here."""
    acc = start["test"]["metrics"]["accuracy"]
    binom = 100 * (acc * (1 - acc) / max(n_test, 1)) ** 0.5
    control = values(test, "answer", "control", "accuracy")
    core = [
        summary["comparisons"].get(f"answer:{a} − {b}")
        for a, b in (("dcl", "control"), ("bcl", "control"), ("dcl", "rft"), ("bcl", "rft"))
    ]
    core = [c for c in core if c and len(c["by_seed"]["accuracy"]["seeds"]) >= 2]
    if not core:
        return []
    n = min(len(c["by_seed"]["accuracy"]["seeds"]) for c in core)
    sd = float(np.sqrt(_mean([c["by_seed"]["accuracy"]["std"] ** 2 for c in core])))
    se = _mean([c["by_question"]["se"] for c in core])
    t_mde = detectable(sd, n)
    summary["power"] = {
        "seeds": n,
        "paired_std": sd,
        "t_detectable": t_mde,
        "bootstrap_se": se,
        "bootstrap_significant": 1.96 * se,
        "bootstrap_detectable": 2.8 * se,
        "binomial_se": binom / 100,
    }
    text = (
        f"One accuracy on {n_test} questions near {100 * acc:.0f}%: binomial standard error ±{binom:.1f} "
        f"points. Control over {len(control)} seeds: {_pct(control)}. Over the core comparisons (dcl / bcl "
        f"against control / RFT, answer labels, {n} seeds) the per-seed differences have a std of "
        f"{100 * sd:.1f} points"
    )
    if t_mde is not None:
        just = 100 * stats.t.ppf(0.975, n - 1) * sd / np.sqrt(n)
        text += (
            f": a paired t-test finds a true gain of **{100 * t_mde:.1f} points** at p < 0.05 with 80% "
            f"power (an observed mean of {just:.1f} points reaches p = 0.05)"
        )
    text += (
        f". The per-question bootstrap's standard error is {100 * se:.1f} points: {100 * 1.96 * se:.1f} "
        f"points reach p = 0.05, and a true gain of **{100 * 2.8 * se:.1f} points** is found with 80% power."
    )
    return ["## What the design can detect", "", text, ""]


def _diagnostics(plan, test: list[dict]) -> list[str]:
    rows = []
    for label in plan.labels:
        for a in plan.arms:
            rs = [r for r in test if r["job"]["arm"] == a and r["job"]["label"] == label]
            if not rs:
                continue

            def mean(k: str, rs=rs) -> float | None:
                v = [r["train_metrics"][k] for r in rs if r["train_metrics"].get(k) is not None]
                return _mean(v) if v else None

            def num(x: float | None, pct: bool = False) -> str:
                return "n/a" if x is None else (f"{100 * x:.0f}%" if pct else f"{x:.4f}")

            secs = _mean([r["train_seconds"] + r["eval_seconds"] for r in rs])
            rows.append(
                [
                    label,
                    a,
                    num(mean("train/margin")),
                    num(mean("train/neg_minus_boundary")),
                    num(mean("train/neg_below_boundary"), pct=True),
                    num(mean("train/grad_ratio")),
                    f"{secs:.0f} s",
                ]
            )
    if not rows:
        return []
    return [
        "## What the loss did (training diagnostics at the last log step, mean over seeds)",
        "",
        "margin: mean s_p − s_n over the batch's pairs; s_n − B, below B: boundary modes only; align / vft "
        "gradient: the norms of the two parts of the gradient on the final hidden states "
        "(aft_fast/train/diagnostics.py); time: train + evaluation of one run on one worker.",
        "",
        _common.markdown_table(
            ["rule", "arm", "margin", "s_n − B", "below B", "align / vft gradient", "time / run"], rows
        ),
        "",
    ]


def _plots(out: Path, plan, start: dict, test: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from aft_fast.eval.plots import plot_score_distributions

    written, seed0 = [], plan.seeds[0]
    panels = [("VFT (start)", start["test"]["scores"]["pos"], start["test"]["scores"]["neg"])]
    for a in ("control", "rft", "align", "dcl", "bcl"):
        r = next(
            (
                r
                for r in test
                if r["job"]["arm"] == a
                and r["job"]["seed"] == seed0
                and r["job"]["label"] in ("-", "answer")
                and "scores" in r
            ),
            None,
        )
        if r is not None:
            panels.append((f"{a} (answer labels)", r["scores"]["pos"], r["scores"]["neg"]))
    if len(panels) > 1 and panels[0][1] and panels[0][2]:
        plot_score_distributions(
            panels,
            out / "reproduce_scores.png",
            title=f"held-out chains, verified right vs wrong: per-token scores (seed {seed0})",
        )
        written.append("reproduce_scores.png")
    fig, axes = plt.subplots(len(plan.labels), 2, figsize=(12, 3.6 * len(plan.labels)), squeeze=False)
    for row, label in enumerate(plan.labels):
        for col, key in enumerate(("accuracy", "chain_accuracy")):
            ax = axes[row][col]
            arms = [a for a in plan.arms if values(test, label, a, key)]
            for x, a in enumerate(arms):
                vals = [100 * v for v in values(test, label, a, key).values()]
                ax.scatter([x] * len(vals), vals, s=14, color="tab:blue", alpha=0.7)
                ax.hlines(_mean(vals), x - 0.3, x + 0.3, color="black")
            ax.axhline(
                100 * start["test"]["metrics"][key], color="tab:gray", linestyle="--", label="VFT (start)"
            )
            ax.set_xticks(range(len(arms)), arms, rotation=40, ha="right", fontsize=8)
            ax.set_ylabel(f"{METRICS[key]} ({label} labels)", fontsize=9)
            ax.legend(fontsize=8)
    fig.suptitle("test split, per seed (dots) and mean (bar)", fontsize=10)
    fig.tight_layout()
    path = out / "reproduce_metrics.png"
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return [*written, path.name]


def _write(out: Path, name: str, text: str) -> None:
    tmp = out / f".{name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / name)
