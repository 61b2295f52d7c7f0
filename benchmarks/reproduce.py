"""A small-scale reproduction of the paper's two findings (arXiv 2309.02144): AFT beats vanilla
fine-tuning, and the boundary constraint is what the ranking baselines (DPO, RRHF, PRO) lack.

    python benchmarks/reproduce.py            # the full run (~1 h on 2 CPU cores): benchmarks/results/
    python benchmarks/reproduce.py --quick    # CI-sized (~1 min): tiny task, 4 arms, 2 seeds; runs/...
    python benchmarks/reproduce.py --tune     # the lr sweep on a validation split (reproduce_tune.md)

Protocol (everything runs in this one process through aft_fast's Python API, no launcher):
1. One VFT model, trained once: configs/default.yaml's VFT stage (the model `make train` builds).
2. One training candidate file from it: k samples per training question at temperature 1, labelled by
   the gold answer, with the DPO reference log-probs stored (the sample stage in mode dpo).
3. One held-out assessment set: k samples per *test* question from the same VFT model, labelled the
   same way. Every arm scores exactly these chains and none trained on them, so assessment accuracy
   compares the arms' judgement on one fixed set; scoring each arm's own samples would give each arm a
   different, self-chosen test.
4. Arms, all from the VFT model with the same steps, batch, learning-rate schedule and data order per
   seed (the order is a function of the seed and the number of groups only): `vft-continued` (the
   control: the VFT loss on the same questions' reference chains), AFT `dcl` and `bcl`, and `dpo`,
   `rrhf`, `pro` each with and without `+bc`. Every AFT arm keeps w_vft = 1: its only difference from the
   control is the alignment term.
5. Each arm and seed evaluated the same way: greedy accuracy on the test split, assessment accuracy on
   the held-out set, perplexity of the test reference chains. Mean and sample standard deviation over
   seeds; differences to the control and from adding +bc are paired by seed (same data order).

A seed changes only the AFT data order: the VFT model and both candidate sets are shared, so the
spread shows how much the order alone moves the result, not the variance of the whole pipeline.
Outputs: reproduce.md (tables), reproduce.json (every number), reproduce_scores*.png (positive vs
negative score distributions on the held-out set, seed 0), reproduce_metrics.png (per-seed dots).
Intermediate models live under --work_dir; finished arms are reused when their settings match.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

try:
    from benchmarks import _common  # python -m benchmarks.reproduce
except ImportError:
    import _common  # python benchmarks/reproduce.py: the script's own folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]

# arm -> loss mode; "vft" is the control (maximum likelihood on the reference chains alone).
ARMS = {
    "vft-continued": "vft",
    "aft-dcl": "dcl",
    "aft-bcl": "bcl",
    "dpo": "dpo",
    "dpo+bc": "dpo+bc",
    "rrhf": "rrhf",
    "rrhf+bc": "rrhf+bc",
    "pro": "pro",
    "pro+bc": "pro+bc",
}
CONTROL = "vft-continued"


@dataclass
class Plan:
    """What one reproduction runs. `base` overrides configs/default.yaml for the shared VFT model and
    candidate files; the rest are the arms' settings (identical for every arm)."""

    base: dict[str, Any] = field(default_factory=dict)
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    aft_steps: int = 100
    aft_batch_size: int = 8
    aft_micro_batch_size: int = 8
    aft_lr: float = 2e-4
    control_lr: float = 2e-4
    beta: float = 1.0
    w_align: float = 1.0
    heldout_samples: int = 6  # samples per test question in the held-out assessment set
    eval_samples: int = 0  # per arm: own samples for self-consistency / re-ranking (0: skip, saves time)
    val_questions: int = 200  # --tune: size of the validation split

    def arm_settings(self, arm: str, lr: float | None = None) -> dict[str, Any]:
        lr = lr if lr is not None else (self.control_lr if ARMS[arm] == "vft" else self.aft_lr)
        return {
            "mode": ARMS[arm],
            "aft_steps": self.aft_steps,
            "aft_batch_size": self.aft_batch_size,
            "aft_micro_batch_size": self.aft_micro_batch_size,
            "aft_lr": lr,
            "beta": self.beta,
            "w_align": self.w_align,
        }


def full_plan() -> Plan:
    # mode dpo at the sample stage: the candidate file then carries ref_logp, so the dpo arms share it.
    # 60 arm steps (not make train's 100): on 2 shared CPU cores the base takes ~13 min and an AFT arm
    # ~1.6 min at 60 steps, so 9 arms x 3 seeds fit the hour this run is allowed.
    return Plan(base={"mode": "dpo", "save_every": 0}, aft_steps=60)


def quick_plan() -> Plan:
    """Every code path of the full run at toy size (a barely trained model: the numbers mean nothing)."""
    return Plan(
        base={
            "mode": "dpo",
            "save_every": 0,
            "synthetic_train": 600,
            "synthetic_test": 24,
            "vft_steps": 30,
            "vft_batch_size": 16,
            "vft_micro_batch_size": 16,
            "sample_limit": 16,
            "num_samples": 4,
            "max_new_tokens": 40,
            "gen_batch_size": 24,
        },
        arms=[CONTROL, "aft-bcl", "rrhf", "rrhf+bc"],
        seeds=[0, 1],
        aft_steps=3,
        aft_batch_size=4,
        aft_micro_batch_size=4,
        heldout_samples=3,
        val_questions=16,
    )


# ---------------------------------------------------------------------------------------------------------
# The shared base: VFT model, training candidates, held-out candidates (test and validation splits).


def _base_config(plan: Plan, work: Path, progress: bool, **extra: Any):
    from aft_fast.train.config import load_config

    values = {"run_dir": str(work / "base"), "tensorboard": False, "progress": progress, **plan.base, **extra}
    return load_config(["--config", str(ROOT / "configs" / "default.yaml")], **values)


def validation_examples(train_path: Path, test_path: Path, n: int, seed: int) -> list:
    """A validation split for tuning: fresh problems from another stream, none in the train or test set."""
    from aft_fast.data.formats import read_examples
    from aft_fast.data.synthetic import generate_problems

    seen = {e.question for p in (train_path, test_path) for e in read_examples(p)}
    out = [e for e in generate_problems(2 * n + 50, seed=10_000 + seed) if e.question not in seen]
    return out[:n]


def prepare_base(plan: Plan, work: Path, dist, progress: bool, splits: tuple[str, ...]) -> dict[str, Any]:
    """Train the VFT model and sample the candidate files once; reuse them while the settings match."""
    from aft_fast.data.candidates import read_candidates, write_candidates
    from aft_fast.data.formats import read_examples
    from aft_fast.eval.evaluate import evaluate
    from aft_fast.models.loading import load_replica, load_tokenizer
    from aft_fast.train.pipeline import run

    base_dir = work / "base"
    cfg = _base_config(plan, work, progress)
    stamp = base_dir / "plan.json"
    want = {"config": cfg.to_dict(), "heldout_samples": plan.heldout_samples, "val": plan.val_questions}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == want):
        shutil.rmtree(base_dir, ignore_errors=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    if not (base_dir / "vft" / "model.safetensors").is_file():
        run(replace(cfg, stage="vft"), dist)
        timings["vft"] = time.perf_counter() - t0
    if not cfg.candidates_path.is_file():
        t = time.perf_counter()
        run(replace(cfg, stage="sample"), dist)
        timings["sample"] = time.perf_counter() - t
    tok = load_tokenizer(base_dir / "vft")
    data = base_dir / "data"
    examples = {"test": read_examples(data / "test.jsonl")}
    if "val" in splits:
        examples["val"] = validation_examples(
            data / "train.jsonl", data / "test.jsonl", plan.val_questions, cfg.seed
        )
    heldout = {}
    for split, exs in examples.items():
        path = base_dir / f"heldout_{split}.jsonl"
        if not path.is_file():  # the VFT model's own samples on these questions: the fixed assessment set
            t = time.perf_counter()
            model = load_replica(base_dir / "vft", dist.device, torch.float32)
            res = evaluate(
                model,
                tok,
                exs,
                samples=plan.heldout_samples,
                temperature=cfg.temperature,
                max_new_tokens=cfg.max_new_tokens,
                batch_size=cfg.gen_batch_size,
                max_length=cfg.max_length,
                seed=cfg.seed + 1,  # not the training candidates' sampling seed
                progress=progress,
            )
            write_candidates(path, res.groups)
            timings[f"heldout_{split}"] = time.perf_counter() - t
        heldout[split] = read_candidates(path)
    stamp.write_text(json.dumps(want, indent=1))
    # Keep the base's build times with it, so a rerun that reuses the base still reports them.
    times = base_dir / "timings.json"
    built_now = sorted(timings)
    if timings:
        earlier = json.loads(times.read_text()) if times.is_file() else {}
        times.write_text(json.dumps({**earlier, **timings}))
    timings = json.loads(times.read_text()) if times.is_file() else {}
    return {
        "cfg": cfg,
        "tokenizer": tok,
        "vft_dir": base_dir / "vft",
        "groups": read_candidates(cfg.candidates_path),
        "examples": examples,
        "heldout": heldout,
        "timings": timings,
        "built_now": built_now,
    }


# ---------------------------------------------------------------------------------------------------------
# One arm x seed: train from the VFT model, evaluate, cache the result.


def run_arm(
    plan: Plan,
    base: dict[str, Any],
    work: Path,
    dist,
    arm: str,
    seed: int,
    split: str,
    progress: bool,
    lr: float | None = None,
) -> dict[str, Any]:
    from aft_fast.data.collate import encode_group
    from aft_fast.train.aft import run_aft
    from aft_fast.train.loop import train

    settings = plan.arm_settings(arm, lr)
    run_dir = work / "arms" / split / arm / f"lr{settings['aft_lr']:g}-seed{seed}"
    result_path = run_dir / "result.json"
    key = {"arm": arm, "seed": seed, "split": split, **settings, "base": base["cfg"].to_dict()}
    if result_path.is_file():
        cached = json.loads(result_path.read_text())
        if cached.get("key") == key:
            return cached
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = replace(
        base["cfg"],
        stage="aft",
        run_dir=str(run_dir),
        seed=seed,
        vft_model=str(base["vft_dir"]),
        candidates=str(base["cfg"].candidates_path),
        mode=settings["mode"] if settings["mode"] != "vft" else "bcl",  # the control calls train() itself
        **{k: v for k, v in settings.items() if k != "mode"},
    )
    tok, groups = base["tokenizer"], base["groups"]
    t0 = time.perf_counter()
    if settings["mode"] == "vft":
        # The same groups (so the same order per seed), each reduced to its reference chain.
        items = [encode_group(replace(g, candidates=[]), tok) for g in groups if g.candidates]
        stage = train(
            cfg,
            dist,
            stage="aft",
            items=items,
            init_model=base["vft_dir"],
            tokenizer=tok,
            mode="vft",
            steps=cfg.aft_steps,
            batch_size=cfg.aft_batch_size,
            micro_batch=cfg.aft_micro_batch_size,
            lr=cfg.aft_lr,
            out_dir=cfg.stage_model_dir("aft"),
        )
    else:
        stage = run_aft(cfg, dist, tok, groups, base["vft_dir"])
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    result = evaluate_model(plan, base, cfg.stage_model_dir("aft"), split, seed, progress)
    result.update(
        key=key,
        arm=arm,
        seed=seed,
        train_seconds=train_s,
        eval_seconds=time.perf_counter() - t1,
        train_metrics=stage.metrics,
    )
    result_path.write_text(json.dumps(result))
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return result


def evaluate_model(plan: Plan, base: dict[str, Any], model_dir: Path, split: str, seed: int, progress: bool):
    from aft_fast.eval.evaluate import evaluate, split_scores
    from aft_fast.models.loading import load_replica

    cfg = base["cfg"]
    model = load_replica(model_dir, torch.device("cpu"), torch.float32)  # one CPU process, fp32
    res = evaluate(
        model,
        base["tokenizer"],
        base["examples"][split],
        samples=plan.eval_samples,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.gen_batch_size,
        max_length=cfg.max_length,
        seed=seed,
        fixed=base["heldout"][split],
        progress=progress,
    )
    pos, neg = split_scores(res.fixed_groups, res.fixed_scored)
    return {"summary": res.summary, "pos": pos, "neg": neg}


# ---------------------------------------------------------------------------------------------------------
# Report.


def _pct(values: list[float]) -> str:
    from aft_fast.eval.metrics import spread

    if not values:
        return "n/a"
    s = spread([100 * v for v in values])
    return f"{s.mean:.1f} ± {s.std:.1f}" if s.n > 1 else f"{s.mean:.1f}"


def _diff(values: list[float]) -> str:
    """Paired differences in points: mean ± std, and in how many seeds the difference was > 0 / < 0."""
    from aft_fast.eval.metrics import spread

    if not values:
        return "n/a"
    s = spread([100 * v for v in values])
    up, down = sum(v > 0 for v in values), sum(v < 0 for v in values)
    return f"{s.mean:+.1f} ± {s.std:.1f} ({up}↑ {down}↓ of {s.n})"


def _by(results: list[dict], arm: str, key: str) -> dict[int, float]:
    return {
        r["seed"]: r["summary"][key] for r in results if r["arm"] == arm and r["summary"].get(key) is not None
    }


def _paired(results: list[dict], a: str, b: str, key: str) -> list[float]:
    xa, xb = _by(results, a, key), _by(results, b, key)
    return [xa[s] - xb[s] for s in sorted(xa) if s in xb]


ACC, ASSESS, PPL = "eval/accuracy", "eval/fixed_assess_acc", "eval/perplexity"


def report(plan: Plan, base: dict, start: dict, results: list[dict], split: str, meta: dict) -> str:
    arms = [a for a in plan.arms if any(r["arm"] == a for r in results)]
    s0 = start["summary"]
    n_test, n_q, n_pairs = s0["questions"], s0["eval/fixed_assess_questions"], s0["eval/fixed_assess_pairs"]
    lines = [
        f"# Reproduction: AFT vs vanilla fine-tuning, and the boundary constraint ({meta['title']})",
        "",
        f"Command: `{meta['command']}` — {meta['minutes']:.0f} min on {meta['env']['gpu']} "
        f"({meta['env']['torch']}, git {meta['env']['git_sha']}, {meta['env']['timestamp']}). "
        f"Shared base: {_base_times(base)}.",
        "",
        f"Start: one VFT model ({base['cfg'].vft_steps} steps of configs/default.yaml) and one candidate "
        f"file ({len(base['groups'])} training questions x {base['cfg'].num_samples} samples at "
        f"temperature {base['cfg'].temperature}), shared by every arm. Each arm: {plan.aft_steps} steps of "
        f"{plan.aft_batch_size} questions, AdamW, warm-up {base['cfg'].warmup_ratio:g} then cosine, "
        f"lr {plan.aft_lr:g} (control {plan.control_lr:g}), beta {plan.beta:g}, w_vft 1, "
        f"w_align {plan.w_align:g}; seeds {', '.join(map(str, plan.seeds))} (the data order).",
        "",
        f"Accuracy: greedy, on the {n_test} {split} questions. Assessment: pairs (right chain, wrong chain) "
        f"of the held-out set ({n_q} {split} questions with both, {n_pairs} pairs, sampled once from the "
        "VFT model) that the "
        "model scores in the right order (ties count half). Mean ± sample std over seeds, in %.",
        "",
    ]
    rows = [
        [
            "VFT (start)",
            "-",
            _pct([start["summary"][ACC]]),
            _pct([start["summary"][ASSESS]]),
            f"{start['summary'][PPL]:.4f}",
            "",
            "",
        ]
    ]
    for a in arms:
        accs = _by(results, a, ACC)
        rows.append(
            [
                a,
                ARMS[a],
                _pct(list(accs.values())),
                _pct(list(_by(results, a, ASSESS).values())),
                f"{sum(_by(results, a, PPL).values()) / max(len(accs), 1):.4f}",
                _diff(_paired(results, a, CONTROL, ACC)) if a != CONTROL else "",
                " / ".join(f"{100 * accs[s]:.1f}" for s in sorted(accs)),
            ]
        )
    header = [
        "arm",
        "loss",
        "accuracy %",
        "assessment %",
        "ref. ppl",
        "Δ accuracy vs control (paired)",
        "accuracy per seed",
    ]
    lines += [_common.markdown_table(header, rows), ""]

    bc_rows = []
    for b in ("dpo", "rrhf", "pro"):
        if b in arms and f"{b}+bc" in arms:
            bc_rows.append(
                [
                    f"{b} → {b}+bc",
                    _diff(_paired(results, f"{b}+bc", b, ACC)),
                    _diff(_paired(results, f"{b}+bc", b, ASSESS)),
                ]
            )
    for a in ("aft-dcl", "aft-bcl"):
        if a in arms and CONTROL in arms:
            bc_rows.append(
                [
                    f"{CONTROL} → {a}",
                    _diff(_paired(results, a, CONTROL, ACC)),
                    _diff(_paired(results, a, CONTROL, ASSESS)),
                ]
            )
    if bc_rows:
        lines += [
            "Paired differences (points; same seed, so the same data order; ↑/↓: seeds where it rose/fell):",
            "",
            _common.markdown_table(["change", "Δ accuracy", "Δ assessment"], bc_rows),
            "",
        ]
    lines += [
        f"Binomial standard error of one accuracy on {n_test} questions near {100 * s0[ACC]:.0f}%: "
        f"±{100 * binomial_se(s0[ACC], n_test):.1f} points; "
        "the seeds share the test set, so their spread does not include it.",
        "",
        "Time per arm (train + eval, mean over seeds): "
        + ", ".join(
            f"{a} {sum(r['train_seconds'] + r['eval_seconds'] for r in results if r['arm'] == a) / max(1, sum(r['arm'] == a for r in results)):.0f} s"  # noqa: E501
            for a in arms
        )
        + ".",
        "",
        f"Plots: {', '.join(meta['plots'])}.",
        "",
    ]
    return "\n".join(lines)


def _base_times(base: dict) -> str:
    """How long the shared VFT model and candidate files took, and whether this invocation built them."""
    names = {"vft": "VFT", "sample": "training candidates", "heldout_test": "held-out set"}
    parts = [f"{names.get(k, k)} {v / 60:.1f} min" for k, v in base["timings"].items()]
    if not parts:
        return "reused (build times unknown)"
    reused = [k for k in base["timings"] if k not in base["built_now"]]
    if not reused:
        return ", ".join(parts)
    again = ", ".join(names.get(k, k) for k in reused)
    return ", ".join(parts) + f"; {again} reused from an earlier invocation"


def binomial_se(p: float, n: int) -> float:
    return (p * (1 - p) / max(n, 1)) ** 0.5


def plots(out: Path, prefix: str, start: dict, results: list[dict], arms: list[str]) -> list[str]:
    from aft_fast.eval.plots import plot_score_distributions

    seed0 = min(r["seed"] for r in results)

    def panel(name: str, r: dict) -> tuple[str, list[float], list[float]]:
        acc = r["summary"][ASSESS]
        return (
            f"{name}: assessment {100 * acc:.1f}%, accuracy {100 * r['summary'][ACC]:.1f}%",
            r["pos"],
            r["neg"],
        )

    pick = {r["arm"]: r for r in results if r["seed"] == seed0}
    written = []
    groups = [
        (f"{prefix}_scores.png", [a for a in (CONTROL, "aft-dcl", "aft-bcl") if a in pick], True),
        (
            f"{prefix}_scores_baselines.png",
            [a for a in ARMS if a in pick and ARMS[a] not in ("vft", "dcl", "bcl")],
            False,
        ),
    ]
    for name, chosen, with_start in groups:
        panels = ([panel("VFT (start)", start)] if with_start else []) + [panel(a, pick[a]) for a in chosen]
        if panels:
            plot_score_distributions(
                panels, out / name, title=f"held-out chains: positive vs negative scores (seed {seed0})"
            )
            written.append(name)
    written.append(metrics_plot(out / f"{prefix}_metrics.png", start, results, arms).name)
    return written


def metrics_plot(path: Path, start: dict, results: list[dict], arms: list[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key, label in (
        (axes[0], ACC, "greedy accuracy (%)"),
        (axes[1], ASSESS, "assessment accuracy (%)"),
    ):
        for x, a in enumerate(arms):
            vals = [100 * v for v in _by(results, a, key).values()]
            ax.scatter([x] * len(vals), vals, s=14, color="tab:blue", alpha=0.7)
            if vals:
                ax.hlines(sum(vals) / len(vals), x - 0.3, x + 0.3, color="black")
        ax.axhline(100 * start["summary"][key], color="tab:gray", linestyle="--", label="VFT (start)")
        ax.set_xticks(range(len(arms)), arms, rotation=40, ha="right", fontsize=8)
        ax.set_ylabel(label, fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("per seed (dots) and mean (bar)", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized run (about a minute); numbers mean nothing")
    p.add_argument(
        "--tune",
        action="store_true",
        help="sweep --tune_lrs on a validation split for the control and aft-bcl (one seed)",
    )
    p.add_argument("--tune_lrs", type=float, nargs="+", default=[2e-4, 5e-4, 1e-3])
    p.add_argument("--arms", nargs="+", choices=list(ARMS), help="default: all nine (quick: four)")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--aft_steps", type=int)
    p.add_argument("--aft_lr", type=float, help="lr of every AFT and baseline arm")
    p.add_argument("--control_lr", type=float, help="lr of the vft-continued control")
    p.add_argument("--beta", type=float)
    p.add_argument("--w_align", type=float)
    p.add_argument("--eval_samples", type=int, help="own samples per test question per arm (0: skip)")
    p.add_argument("--work_dir", type=Path, help="models and caches (default runs/reproduce[-quick])")
    p.add_argument("--out", type=Path, help="tables and plots (default benchmarks/results; quick: work_dir)")
    p.add_argument("--progress", action="store_true", help="progress bars")
    args = p.parse_args(argv)

    plan = quick_plan() if args.quick else full_plan()
    for name in ("arms", "seeds", "aft_steps", "aft_lr", "control_lr", "beta", "w_align", "eval_samples"):
        if getattr(args, name) is not None:
            setattr(plan, name, getattr(args, name))
    work = args.work_dir or ROOT / "runs" / ("reproduce-quick" if args.quick else "reproduce")
    out = args.out or (work / "results" if args.quick else _common.RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from aft_fast.train.engine import init_distributed

    t0 = time.perf_counter()
    dist = init_distributed("gloo")
    split = "val" if args.tune else "test"
    base = prepare_base(plan, work, dist, args.progress, (split,))
    print(f"[reproduce] base ready ({base['timings'] or 'cached'})", flush=True)
    start = evaluate_model(plan, base, base["vft_dir"], split, plan.seeds[0], args.progress)
    print(
        f"[reproduce] VFT start: accuracy {start['summary'][ACC]:.3f}, "
        f"assessment {start['summary'][ASSESS]:.3f}",
        flush=True,
    )

    if args.tune:
        arms = args.arms or [CONTROL, "aft-bcl"]
        results = []
        for lr in args.tune_lrs:
            for arm in arms:
                r = run_arm(plan, base, work, dist, arm, plan.seeds[0], split, args.progress, lr=lr)
                r["lr"] = lr
                results.append(r)
                _log(r)
        text = tune_report(plan, start, results, arms, args, time.perf_counter() - t0)
        (out / "reproduce_tune.md").write_text(text)
        print(text)
        return 0

    results = []
    for seed in plan.seeds:
        for arm in plan.arms:
            r = run_arm(plan, base, work, dist, arm, seed, split, args.progress)
            results.append(r)
            _log(r)
    prefix = "reproduce"
    written = plots(out, prefix, start, results, plan.arms)
    meta = {
        "title": "--quick, toy size: the numbers mean nothing" if args.quick else "full run",
        "command": "python benchmarks/reproduce.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
        "minutes": (time.perf_counter() - t0) / 60,
        "env": _common.environment(),
        "plots": written,
    }
    text = report(plan, base, start, results, split, meta)
    (out / f"{prefix}.md").write_text(text)
    raw = {
        "plan": asdict(plan),
        "meta": meta,
        "base_timings": base["timings"],
        "start": {"summary": start["summary"]},
        "results": [{k: v for k, v in r.items() if k not in ("pos", "neg")} for r in results],
    }
    (out / f"{prefix}.json").write_text(json.dumps(raw, indent=1, default=str) + "\n")
    print(text, flush=True)
    return 0


def _log(r: dict) -> None:
    s = r["summary"]
    print(
        f"[reproduce] {r['arm']:>13} seed {r['seed']}: accuracy {s[ACC]:.3f}, assessment {s[ASSESS]:.3f}, "
        f"ppl {s[PPL]:.4f} (train {r['train_seconds']:.0f} s, eval {r['eval_seconds']:.0f} s)",
        flush=True,
    )


def tune_report(plan: Plan, start: dict, results: list[dict], arms: list[str], args, seconds: float) -> str:
    rows = [
        ["VFT (start)", "-", f"{100 * start['summary'][ACC]:.1f}", f"{100 * start['summary'][ASSESS]:.1f}"]
    ]
    rows += [
        [r["arm"], f"{r['lr']:g}", f"{100 * r['summary'][ACC]:.1f}", f"{100 * r['summary'][ASSESS]:.1f}"]
        for r in results
    ]
    return "\n".join(
        [
            "# Reproduction: learning-rate sweep on the validation split",
            "",
            f"Command: `python benchmarks/reproduce.py --tune{' --quick' if args.quick else ''} --tune_lrs "
            f"{' '.join(f'{x:g}' for x in args.tune_lrs)}` — {seconds / 60:.0f} min. Seed {plan.seeds[0]}, "
            f"{plan.aft_steps} steps; {plan.val_questions} validation questions (fresh problems, in neither "
            "the training nor the test set) and their held-out VFT samples; the same grid for each arm.",
            "",
            _common.markdown_table(["arm", "lr", "val accuracy %", "val assessment %"], rows),
            "",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
