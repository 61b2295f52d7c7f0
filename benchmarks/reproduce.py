"""The reproduction study on the embedded task (arXiv 2309.02144): does AFT (dcl, bcl) beat continued VFT
and rejection-sampling fine-tuning (RFT), does the constraint matter (bcl / dcl against align; +bc for DPO,
RRHF, PRO), and what does label noise cost (answer labels against verified).

    python benchmarks/reproduce.py          # the full study from scratch: benchmarks/results/reproduce.*
    python benchmarks/reproduce.py --quick  # every code path at toy size (about 2 min); numbers mean nothing

Protocol (docs/design.md section 9):
1. The base: one VFT model trained to its plateau for its step budget (lr decayed to 0; Plan.base), one
   training candidate file (k samples per question, answer_correct and chain_ok stored: the two label rules
   are two labellings of it), and one held-out set (k samples per test question from the same model) that
   the arms score.
2. Every setting is chosen on the validation split (fresh problems, in neither train nor test) before the
   test split is scored: the arms' learning rate (the candidate under which the control, continued VFT,
   does best: the strongest control; it must not end below the VFT model), then bcl's beta per label rule
   (the best validation accuracy at that lr).
3. Arms, all from the VFT model and its AdamW moments (or with --aft_init base, from the model VFT started
   from, with a fresh optimizer) with the same steps, batch, schedule and data order per seed: control
   (continued VFT on the same questions' references), rft, align, dcl, bcl, dpo / rrhf / pro with and
   without +bc. Every AFT arm keeps w_vft = 1.
4. Each arm is scored on the test split: greedy and chain accuracy, and (at the first `score_seeds` seeds)
   re-ranking and assessment accuracy on the held-out set. The report (reproduce_report.py) pairs arms by
   seed (t-test) and by question and seed (bootstrap), and states the smallest gain the design detects.

Arm runs are cached under --work_dir and reused, in priority tiers (the core arms at every seed first), and
the report is rewritten after each: an interrupted run resumes where it stopped and its tables are honest
over what ran. `--budget_minutes` stops starting arms past the budget.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # python benchmarks/reproduce.py: the package imports from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common, reproduce_report  # noqa: E402
from benchmarks.reproduce_arms import (  # noqa: E402
    _W,
    ARMS,
    LABELS,
    _shared,
    _worker_init,
    arm_dir,
    evaluate_model,
    job_key,
    prepare_base,
    run_job,
)

ROOT = Path(__file__).resolve().parents[1]

CORE = ("control", "rft", "dcl", "bcl")  # the comparisons the study is powered for: every seed


@dataclass
class Plan:
    """What one study runs. `base` overrides configs/default.yaml for the shared VFT model and candidates."""

    base: dict[str, Any] = field(default_factory=dict)
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    labels: list[str] = field(default_factory=lambda: list(LABELS))
    seeds: list[int] = field(default_factory=lambda: list(range(8)))  # the core arms'
    other_seeds: int = 5  # seeds of the other arms, and of the verified-label arms past the core tiers
    verified_arms: list[str] = field(default_factory=lambda: ["rft", "dcl", "bcl"])
    lrs: list[float] = field(default_factory=lambda: [1e-5, 3e-5, 1e-4, 3e-4])  # candidates for the arms' lr
    betas: list[float] = field(default_factory=lambda: [0.03, 0.1, 0.3])  # candidates for bcl's beta
    val_seeds: list[int] = field(default_factory=lambda: [0, 1])
    init: str = "vft"  # "base": arms start from the model VFT started from (the equal-budget comparison)
    aft_steps: int = 40
    aft_batch_size: int = 8
    aft_micro_batch_size: int = 8
    w_align: float = 1.0
    heldout_samples: int = 6  # samples per test question in the held-out set
    # Seeds (the first ones) on which each arm also scores the held-out set (re-rank, assessment): that
    # scoring is 60% of an arm's evaluation, and the study's comparisons are on greedy accuracy.
    score_seeds: int = 2
    val_questions: int = 500
    workers: int = 2
    budget_minutes: float = 150.0


def full_plan() -> Plan:
    # The base: 800 VFT steps at peak lr 2e-3 whose cosine decay ends at a floor of 1e-5 (min_lr_ratio
    # 0.005), the smallest lr candidate of the arms: the control then continues the base's own last phase
    # (same lr, same AdamW moments, aft_optimizer vft) rather than restarting an annealed model, and anneals
    # from there like every arm. 800 rather than 1000 steps keeps the base at the edge of its competence
    # (docs/design.md section 9). 1000 test questions (±1.5 points), 500 validation questions.
    # Decayed to 0 instead, the control lost 1.1 points to its start with the moments carried
    # (benchmarks/results/reproduce_annealed_base.md) and 1.6 with a fresh AdamW (reproduce_fresh_adam.md).
    return Plan(
        base={
            "save_every": 0,
            "vft_steps": 800,
            "min_lr_ratio": 0.005,
            "synthetic_test": 1000,
            "aft_optimizer": "vft",
        },
        # 1e-4 and 3e-4 cost the control 11 and 31 points on validation from the annealed base.
        lrs=[1e-5, 3e-5],
    )


def quick_plan() -> Plan:
    """Every code path of the full run at toy size (a barely trained model: the numbers mean nothing)."""
    return Plan(
        base={
            "save_every": 0,
            "aft_optimizer": "vft",
            "synthetic_train": 600,
            "synthetic_test": 16,
            "vft_steps": 30,
            "vft_batch_size": 16,
            "vft_micro_batch_size": 16,
            "sample_limit": 16,
            "num_samples": 4,
            "max_new_tokens": 40,
            "gen_batch_size": 16,
        },
        arms=["control", "rft", "bcl", "rrhf+bc"],
        seeds=[0, 1],
        other_seeds=1,
        verified_arms=["bcl"],
        lrs=[1e-4, 2e-4],
        betas=[0.05, 0.5],
        val_seeds=[0],
        aft_steps=2,
        aft_batch_size=4,
        aft_micro_batch_size=4,
        heldout_samples=3,
        score_seeds=1,
        val_questions=8,
        budget_minutes=30.0,
    )


@dataclass(frozen=True)
class Job:
    split: str  # "val" (choosing settings) or "test"
    label: str  # "answer" | "verified"; "-" for the control (it reads no labels)
    arm: str
    seed: int
    lr: float
    beta: float

    @property
    def name(self) -> str:
        return f"{self.split}/{self.label}/{self.arm}/lr{self.lr:g}-beta{self.beta:g}-seed{self.seed}"


# ---------------------------------------------------------------------------------------------------------
# The jobs, in the order they run.


def lr_jobs(plan: Plan) -> list[Job]:
    return [Job("val", "-", "control", s, lr, 0.0) for lr in plan.lrs for s in plan.val_seeds]


def beta_jobs(plan: Plan, lr: float) -> list[Job]:
    return [
        Job("val", lab, "bcl", s, lr, b) for lab in plan.labels for b in plan.betas for s in plan.val_seeds
    ]


def test_jobs(plan: Plan, lr: float, betas: dict[str, float]) -> list[Job]:
    """Priority tiers: the core arms at every seed; align and the core arms under verified labels at the
    first `other_seeds`; the baselines; the verified core arms at the remaining seeds."""
    from aft_fast.constants import train_mode

    def job(label: str, arm: str, seed: int) -> Job:
        beta = betas[label] if train_mode(ARMS[arm]).boundary else 0.0
        return Job("test", "-" if arm == "control" else label, arm, seed, lr, beta)

    few = plan.seeds[: plan.other_seeds]
    verified = [a for a in plan.verified_arms if a in plan.arms and "verified" in plan.labels]
    core = [a for a in CORE if a in plan.arms]
    rest = [a for a in plan.arms if a not in CORE]
    tiers = [
        [job("answer", a, s) for s in plan.seeds for a in core],
        [job("answer", "align", s) for s in few if "align" in plan.arms]
        + [job("verified", a, s) for s in few for a in verified],
        [job("answer", a, s) for s in few for a in rest if a != "align"],
        [job("verified", a, s) for s in plan.seeds[plan.other_seeds :] for a in verified],
    ]
    return [j for tier in tiers for j in tier]


def run_jobs(
    plan: Plan, pool: cf.ProcessPoolExecutor, jobs: list[Job], stamp: dict, clock: dict, on_result
) -> list[dict]:
    """Run `jobs` in the pool, cached results reused. Stops starting jobs whose expected end (the mean time
    of the jobs run so far) passes the budget."""
    results: list[dict] = []
    pending, running = list(jobs), {}

    def submit() -> None:
        while pending and len(running) < plan.workers:
            job = pending.pop(0)
            path = arm_dir(plan, clock["work"], job) / "result.json"
            cached = json.loads(path.read_text()) if path.is_file() else None
            if cached is not None and cached.get("key") == job_key(plan, job, stamp):
                results.append(cached)
                on_result(cached, cached=True)
            elif _fits(plan, clock):
                running[pool.submit(run_job, job, stamp)] = job
            else:
                print(f"[reproduce] budget: {len(pending) + 1} arm runs not started", flush=True)
                pending.clear()

    submit()
    while running:
        done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
        for fut in done:
            running.pop(fut)
            r = fut.result()
            clock["job_seconds"].append(r["train_seconds"] + r["eval_seconds"])
            results.append(r)
            on_result(r, cached=False)
        submit()
    return results


def _fits(plan: Plan, clock: dict) -> bool:
    done = clock["job_seconds"]
    per_job = sum(done) / len(done) / plan.workers if done else 0.0  # wall time a job with workers busy
    return time.perf_counter() - clock["t0"] + per_job <= 60 * plan.budget_minutes


def _settings_args(argv: list[str] | None) -> list[str]:
    """The command line without --work_dir / --out: where files go changes no result, and the report
    should not point to a folder of the machine it ran on."""
    args, out, skip = list(sys.argv[1:] if argv is None else argv), [], False
    for a in args:
        if skip:
            skip = False
        elif a in ("--work_dir", "--out"):
            skip = True
        elif not a.startswith(("--work_dir=", "--out=")):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized run (about 2 min); numbers mean nothing")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), help="default: all eleven (quick: four)")
    p.add_argument("--labels", nargs="+", choices=list(LABELS), help="label rules (default: both)")
    p.add_argument("--seeds", type=int, nargs="+", help="the core arms' seeds (default 0-7; quick: 0 1)")
    p.add_argument("--other_seeds", type=int, help="how many of them the other arms run (default 5)")
    p.add_argument("--lrs", type=float, nargs="+", help="candidates for the arms' learning rate")
    p.add_argument("--betas", type=float, nargs="+", help="candidates for bcl's beta")
    p.add_argument(
        "--aft_init",
        dest="init",
        choices=("vft", "base"),
        help="where the arms start: the VFT model (default) or the model VFT started from",
    )
    p.add_argument("--aft_steps", type=int)
    p.add_argument("--workers", type=int, help="arm processes at once (default 2)")
    p.add_argument("--budget_minutes", type=float, help="start no arm past this (default 150)")
    p.add_argument("--work_dir", type=Path, help="models and caches (default runs/reproduce[-quick])")
    p.add_argument("--out", type=Path, help="tables and plots (default benchmarks/results; quick: work_dir)")
    args = p.parse_args(argv)

    plan = quick_plan() if args.quick else full_plan()
    for name in (
        "arms",
        "labels",
        "seeds",
        "other_seeds",
        "lrs",
        "betas",
        "init",
        "aft_steps",
        "workers",
        "budget_minutes",
    ):
        if getattr(args, name) is not None:
            setattr(plan, name, getattr(args, name))
    if plan.workers < 1:
        p.error("--workers: must be at least 1")
    if "control" not in plan.arms:
        p.error("--arms: the control is needed (the learning rate is chosen on it)")
    default_work = (
        "runs/reproduce" + ("-quick" if args.quick else "") + ("-base" if plan.init == "base" else "")
    )
    work = args.work_dir or ROOT / default_work
    out = args.out or (work / "results" if args.quick else _common.RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from aft_fast.constants import train_mode
    from aft_fast.train.engine import init_distributed

    clock = {"t0": time.perf_counter(), "work": work, "job_seconds": []}
    base = prepare_base(plan, work, init_distributed("gloo"))
    print(f"[reproduce] base ready ({base['timings']})", flush=True)
    # The VFT model measured like an arm, on both splits (its own samples are the held-out set).
    start_path = work / "base" / "start.json"
    start_key = {"base": base["stamp"]}
    start = json.loads(start_path.read_text()) if start_path.is_file() else {}
    if start.get("key") != start_key:
        _W.update(plan=plan, work=work)
        vft = work / "base" / "vft"
        start = {s: evaluate_model(_shared(), vft, s, heldout=s == "test") for s in ("test", "val")}
        start["key"] = start_key
        start_path.write_text(json.dumps(start))
    print(f"[reproduce] VFT start (test): {json.dumps(start['test']['metrics'])}", flush=True)

    meta = {
        "title": "--quick, toy size: the numbers mean nothing" if args.quick else "full run",
        "command": "python benchmarks/reproduce.py" + "".join(f" {a}" for a in _settings_args(argv)),
        "env": _common.environment(),
        "plots": [],
    }
    state: dict[str, Any] = {"val": [], "test": [], "lr": None, "betas": {}}

    def write_report(final: bool = False) -> None:
        meta["minutes"] = (time.perf_counter() - clock["t0"]) / 60
        reproduce_report.write(
            out, plan, base, start, state, meta, plots=final or len(state["test"]) % 10 == 0
        )

    def on_result(r: dict, cached: bool) -> None:
        j, m = r["job"], r["metrics"]
        state[j["split"]].append(r)
        print(
            f"[reproduce] {'(cached) ' if cached else ''}{j['split']} {j['label']:>8} {j['arm']:>8} lr "
            f"{j['lr']:g} beta {j['beta']:g} seed {j['seed']}: greedy {m['accuracy']:.3f} "
            f"({r['train_seconds']:.0f} s + {r['eval_seconds']:.0f} s; "
            f"{(time.perf_counter() - clock['t0']) / 60:.1f} min so far)",
            flush=True,
        )
        if j["split"] == "test":
            write_report()

    ctx = mp.get_context("spawn")  # no inherited process group
    threads = max(1, (os.cpu_count() or 2) // plan.workers)
    with cf.ProcessPoolExecutor(plan.workers, ctx, _worker_init, (plan, str(work), threads)) as pool:
        run_jobs(plan, pool, lr_jobs(plan), base["stamp"], clock, on_result)
        state["lr"] = reproduce_report.choose_lr(plan, state["val"])
        print(f"[reproduce] arms' lr chosen on validation: {state['lr']:g}", flush=True)
        if any(train_mode(ARMS[a]).boundary for a in plan.arms):
            run_jobs(plan, pool, beta_jobs(plan, state["lr"]), base["stamp"], clock, on_result)
        state["betas"] = reproduce_report.choose_betas(plan, state["val"], state["lr"])
        print(f"[reproduce] beta chosen on validation: {state['betas']}", flush=True)
        run_jobs(plan, pool, test_jobs(plan, state["lr"], state["betas"]), base["stamp"], clock, on_result)
    write_report(final=True)
    print((out / "reproduce.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
