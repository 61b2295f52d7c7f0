"""The reproduction study on the embedded task (arXiv 2309.02144): does AFT (dcl, bcl) beat continued VFT
and rejection-sampling fine-tuning (RFT), does the constraint matter (bcl / dcl against align; +bc for DPO,
RRHF, PRO), and what does label noise cost (answer labels against verified).

    python benchmarks/reproduce.py          # the full study from scratch: benchmarks/results/reproduce.*
    python benchmarks/reproduce.py --quick  # every code path at toy size (about 2 min); numbers mean nothing

Protocol (docs/design.md section 9):
1. The base: one VFT model trained near its plateau on the task (Plan.base), one training candidate file
   (k samples per question, answer_correct and chain_ok stored: the two label rules are two labellings of
   it), and one held-out set (k samples per test question from the same model) that every arm scores.
2. Every setting is chosen on the validation split (fresh problems, in neither train nor test) before the
   test split is scored: the arms' learning rate (the largest candidate under which the control, continued
   VFT, does not end below the VFT model), then bcl's beta per label rule (the best validation accuracy).
3. Arms, all from the VFT model (or with --aft_init base, from the model VFT started from) with the same
   steps, batch, schedule and data order per seed: control (continued VFT on the same questions'
   references), rft, align, dcl, bcl, dpo / rrhf / pro with and without +bc. Every AFT arm keeps w_vft = 1.
4. Each arm is scored on the test split: greedy and chain accuracy, and re-ranking and assessment accuracy
   on the held-out set. The report (reproduce_report.py) pairs arms by seed (t-test) and by question and
   seed (bootstrap), and states the smallest gain the design detects.

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
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

try:
    from benchmarks import _common, reproduce_report  # python -m benchmarks.reproduce
except ImportError:
    import _common  # python benchmarks/reproduce.py: the script's own folder is on sys.path
    import reproduce_report

ROOT = Path(__file__).resolve().parents[1]

# arm -> the aft stage's --mode (aft_fast.constants.TRAIN_MODES).
ARMS = {
    "control": "vft",
    "rft": "rft",
    "align": "align",
    "dcl": "dcl",
    "bcl": "bcl",
    "dpo": "dpo",
    "dpo+bc": "dpo+bc",
    "rrhf": "rrhf",
    "rrhf+bc": "rrhf+bc",
    "pro": "pro",
    "pro+bc": "pro+bc",
}
CORE = ("control", "rft", "dcl", "bcl")  # the comparisons the study is powered for: every seed
LABELS = ("answer", "verified")
# The fields of the run config the base (VFT model, candidate files) depends on: its cache key.
BASE_KEYS = (
    "seed",
    "synthetic_train",
    "synthetic_test",
    "synthetic_task",
    "vft_steps",
    "vft_batch_size",
    "vft_micro_batch_size",
    "vft_lr",
    "warmup_ratio",
    "min_lr_ratio",
    "weight_decay",
    "grad_clip",
    "num_samples",
    "temperature",
    "top_p",
    "max_new_tokens",
    "sample_limit",
    "gen_batch_size",
    "max_length",
    "prompt_format",
    "model",
    "train_data",
    "test_data",
    "mode",
)


@dataclass
class Plan:
    """What one study runs. `base` overrides configs/default.yaml for the shared VFT model and candidates."""

    base: dict[str, Any] = field(default_factory=dict)
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    labels: list[str] = field(default_factory=lambda: list(LABELS))
    seeds: list[int] = field(default_factory=lambda: list(range(8)))  # the core arms'
    other_seeds: int = 5  # seeds of the other arms, and of the verified-label arms past the core tiers
    verified_arms: list[str] = field(default_factory=lambda: ["rft", "dcl", "bcl"])
    lrs: list[float] = field(default_factory=lambda: [5e-5, 1e-4, 2e-4])  # candidates for the arms' lr
    betas: list[float] = field(default_factory=lambda: [0.03, 0.1, 0.3])  # candidates for bcl's beta
    val_seeds: list[int] = field(default_factory=lambda: [0, 1])
    init: str = "vft"  # "base": arms start from the model VFT started from (the equal-budget comparison)
    aft_steps: int = 40
    aft_batch_size: int = 8
    aft_micro_batch_size: int = 8
    w_align: float = 1.0
    heldout_samples: int = 6  # samples per test question in the held-out set
    start_samples: int = 6  # the VFT model's own samples per test question (pass@k, maj@k of the start)
    val_questions: int = 500
    workers: int = 2
    budget_minutes: float = 150.0


def full_plan() -> Plan:
    # 1000 VFT steps: the base near its plateau with headroom (docs/design.md section 9); 1000 test
    # questions (±1.5 points), 500 validation questions.
    return Plan(base={"save_every": 0, "vft_steps": 1000, "synthetic_test": 1000})


def quick_plan() -> Plan:
    """Every code path of the full run at toy size (a barely trained model: the numbers mean nothing)."""
    return Plan(
        base={
            "save_every": 0,
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
        start_samples=2,
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
# The shared base: VFT model, training candidates, held-out test candidates, the start's metrics.


def base_config(plan: Plan, work: Path):
    from aft_fast.train.config import load_config

    values = {
        "run_dir": str(work / "base"),
        "tensorboard": False,
        "progress": False,
        "mode": "dpo",
        "label": "answer",
        "overwrite": True,
        **plan.base,
    }  # mode dpo: the candidates get ref_logp
    return load_config(["--config", str(ROOT / "configs" / "default.yaml")], **values)


def base_stamp(plan: Plan, cfg) -> dict[str, Any]:
    return {
        "config": {k: getattr(cfg, k) for k in BASE_KEYS},
        "heldout_samples": plan.heldout_samples,
        "val": plan.val_questions,
    }


def validation_examples(cfg, n: int) -> list:
    """Fresh problems from another stream, in neither the training nor the test set."""
    from aft_fast.data.formats import read_examples
    from aft_fast.data.synthetic import generate_problems

    data = Path(cfg.run_dir) / "data"
    seen = {e.question for p in ("train.jsonl", "test.jsonl") for e in read_examples(data / p)}
    fresh = generate_problems(2 * n + 50, seed=10_000 + cfg.seed, task=cfg.synthetic_task)
    return [e for e in fresh if e.question not in seen][:n]


def prepare_base(plan: Plan, work: Path, dist) -> dict[str, Any]:
    """Train the VFT model and sample the candidate files once; reuse them while the stamp matches."""
    import torch

    from aft_fast.data.candidates import write_candidates
    from aft_fast.data.formats import read_examples
    from aft_fast.eval.evaluate import evaluate
    from aft_fast.models.loading import load_replica, load_tokenizer
    from aft_fast.train.pipeline import run

    d, cfg = work / "base", base_config(plan, work)
    want, stamp = base_stamp(plan, cfg), work / "base" / "plan.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != want:
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(want, indent=1))
    times_path = d / "timings.json"
    timings = json.loads(times_path.read_text()) if times_path.is_file() else {}

    def timed(name: str, fn) -> None:
        t = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - t
        times_path.write_text(json.dumps(timings))

    if not (d / "vft" / "model.safetensors").is_file():
        timed("vft", lambda: run(replace(cfg, stage="vft"), dist))
    if not cfg.candidates_path.is_file():
        timed("sample", lambda: run(replace(cfg, stage="sample"), dist))
    heldout = d / "heldout_test.jsonl"
    if not heldout.is_file():  # the VFT model's own samples on the test questions: the fixed set

        def build() -> None:
            model = load_replica(d / "vft", dist.device, torch.float32)
            res = evaluate(
                model,
                load_tokenizer(d / "vft"),
                read_examples(d / "data" / "test.jsonl"),
                samples=plan.heldout_samples,
                temperature=cfg.temperature,
                max_new_tokens=cfg.max_new_tokens,
                batch_size=cfg.gen_batch_size,
                max_length=cfg.max_length,
                seed=cfg.seed + 1,
                progress=False,
            )
            write_candidates(heldout, res.groups)

        timed("heldout_test", build)
    meta = Path(f"{cfg.candidates_path}.meta.json")
    return {
        "cfg": cfg,
        "dir": d,
        "timings": timings,
        "stamp": want,
        "candidates_meta": json.loads(meta.read_text()) if meta.is_file() else {},
    }


# ---------------------------------------------------------------------------------------------------------
# Arm workers: one process each (one torch thread), the base read once per process.

_W: dict[str, Any] = {}


def _worker_init(plan: Plan, work: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    # A fresh one-process group per worker on its own port (the parent's variables would collide with it).
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    from aft_fast.train.engine import init_distributed

    _W.update(plan=plan, work=Path(work), dist=init_distributed("gloo"))


def _shared() -> dict[str, Any]:
    """The base as a worker reads it (once per process)."""
    if "base" not in _W:
        from aft_fast.data.candidates import read_candidates, relabel
        from aft_fast.data.formats import read_examples
        from aft_fast.models.loading import load_tokenizer

        plan, work = _W["plan"], _W["work"]
        cfg = base_config(plan, work)
        d = work / "base"
        groups = read_candidates(cfg.candidates_path)
        _W["base"] = {
            "cfg": cfg,
            "dir": d,
            "tok": load_tokenizer(d / "vft"),
            "labelled": {rule: relabel(groups, rule) for rule in LABELS},
            "heldout": read_candidates(d / "heldout_test.jsonl"),
            "examples": {
                "test": read_examples(d / "data" / "test.jsonl"),
                "val": validation_examples(cfg, plan.val_questions),
            },
        }
    return _W["base"]


def arm_dir(plan: Plan, work: Path, job: Job) -> Path:
    return work / ("arms" if plan.init == "vft" else "arms-from-init") / job.name


def job_key(plan: Plan, job: Job, stamp: dict) -> dict[str, Any]:
    return {
        **asdict(job),
        "mode": ARMS[job.arm],
        "init": plan.init,
        "aft_steps": plan.aft_steps,
        "aft_batch_size": plan.aft_batch_size,
        "w_align": plan.w_align,
        "base": stamp,
    }


def run_job(job: Job, stamp: dict) -> dict[str, Any]:
    """Train one arm (the aft stage), evaluate it, cache the result (reused while the key matches)."""
    from aft_fast.train.aft import run_aft

    plan, work, dist = _W["plan"], _W["work"], _W["dist"]
    out_dir = arm_dir(plan, work, job)
    shutil.rmtree(out_dir, ignore_errors=True)
    base = _shared()
    label = "answer" if job.label == "-" else job.label
    start = base["dir"] / ("vft" if plan.init == "vft" else "init")
    cfg = replace(
        base["cfg"],
        stage="aft",
        run_dir=str(out_dir),
        seed=job.seed,
        vft_model=str(start),
        label=label,
        mode=ARMS[job.arm],
        aft_steps=plan.aft_steps,
        aft_lr=job.lr,
        beta=job.beta,
        aft_batch_size=plan.aft_batch_size,
        aft_micro_batch_size=plan.aft_micro_batch_size,
        w_align=plan.w_align,
    )
    t0 = time.perf_counter()
    stage = run_aft(cfg, dist, base["tok"], base["labelled"][label], start)
    t1 = time.perf_counter()
    result = evaluate_model(base, cfg.stage_model_dir("aft"), job.split, samples=0)
    result.update(
        key=job_key(plan, job, stamp),
        job=asdict(job),
        train_seconds=t1 - t0,
        eval_seconds=time.perf_counter() - t1,
        train_metrics=stage.metrics,
    )
    if not (job.split == "test" and job.seed == plan.seeds[0]):
        result.pop("scores", None)  # the score plot shows the first seed only
    (out_dir / "result.json").write_text(json.dumps(result))
    shutil.rmtree(out_dir / "aft", ignore_errors=True)  # ~7 MB a model; the result is what is kept
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    return result


def evaluate_model(base: dict, model_dir: Path, split: str, samples: int, seed: int = 0) -> dict[str, Any]:
    """evaluate()'s metrics on one split: the test split with the held-out set scored, the validation split
    greedy only. Per question: greedy right ("1") or not, for the per-question paired tests."""
    import torch

    from aft_fast.data.candidates import relabel
    from aft_fast.eval.evaluate import evaluate, split_scores
    from aft_fast.models.loading import load_replica

    cfg = base["cfg"]
    fixed = base["heldout"] if split == "test" else None
    model = load_replica(model_dir, torch.device("cpu"), torch.float32)
    res = evaluate(
        model,
        base["tok"],
        base["examples"][split],
        samples=samples,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.gen_batch_size,
        max_length=cfg.max_length,
        seed=seed,
        fixed=fixed,
        progress=False,
    )
    s = res.summary
    metrics = {k: s.get(f"eval/{k}") for k in reproduce_report.METRICS}
    out = {
        "summary": {k: v for k, v in s.items() if not isinstance(v, (list, dict))},
        "metrics": metrics,
        "per_question": {
            "accuracy": "".join("1" if r["correct"] else "0" for r in res.records),
            "chain_accuracy": "".join("1" if r["correct"] and r["chain_ok"] else "0" for r in res.records),
        },
    }
    if fixed is not None:
        pos, neg = split_scores(relabel(fixed, "verified"), res.fixed_scored or [])
        out["scores"] = {"pos": pos, "neg": neg}  # held-out scores under the verified labels
    return out


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
    start_path = work / "base" / "start.json"  # the VFT model measured like an arm, on both splits
    start_key = {"base": base["stamp"], "samples": plan.start_samples}
    start = json.loads(start_path.read_text()) if start_path.is_file() else {}
    if start.get("key") != start_key:
        _W.update(plan=plan, work=work)
        start = {
            split: evaluate_model(
                _shared(), work / "base" / "vft", split, plan.start_samples if split == "test" else 0
            )
            for split in ("test", "val")
        }
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
        state["lr"] = reproduce_report.choose_lr(plan, start, state["val"])
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
