"""A small-scale reproduction of the paper's findings (arXiv 2309.02144) on the embedded task: does AFT beat
continued vanilla fine-tuning and rejection-sampling fine-tuning (RFT), does the constraint matter (bcl and
dcl against align; +bc for DPO, RRHF, PRO), and what label noise costs (answer labels against verified).

    python benchmarks/reproduce.py          # the full run (about 2 h 15 min on 2 cores): benchmarks/results/
    python benchmarks/reproduce.py --quick  # CI-sized (about a minute): toy sizes, the numbers mean nothing

Protocol (everything in this process and its arm workers, through aft_fast's Python API, no launcher):
1. One VFT model (the VFT stage of configs/default.yaml on the embedded task with several solution forms).
2. One training candidate file from it: k samples per training question at temperature 1, with the DPO
   reference log-probs and, per candidate, answer_correct / chain_ok. The two label rules are two labellings
   of this one file (`relabel`): answer (the paper's: right final answer) and verified (right answer and
   every step right).
3. Two held-out sets, sampled once from the same VFT model: k samples per test question and per validation
   question (fresh problems, in neither split). Every arm scores exactly these chains, none trained on them:
   re-ranking and assessment accuracy compare the arms' judgement on one fixed set.
4. beta for bcl (and the +bc baselines) is chosen per label rule on the validation split (seed 0, greedy
   accuracy, ties to the smaller beta) from a sweep across the score scale (0.02-1.0). The VFT model's own
   score spread (aft_fast.train.diagnostics.score_spread, what --beta_from_spread multiplies) is reported
   beside it.
5. Arms, all from the VFT model with the same steps, batch, schedule and data order per seed: control
   (mode vft: continued VFT on the same questions' references), rft, AFT align / dcl / bcl, dpo / rrhf / pro
   with and without +bc. Every AFT arm keeps w_vft = 1. The control does not read labels: one run per seed
   serves both label rules.
6. Metrics per arm and seed, on the test split: greedy accuracy, chain accuracy (greedy answer right and every
   step right), re-ranking accuracy (the held-out candidate the model scores highest has the right answer),
   self-consistency (majority vote over the model's own samples), assessment accuracy on the held-out set
   under both label rules. Mean ± sample std over seeds; paired differences against the control and RFT with
   a paired t-test (scipy.stats.ttest_rel) and Wilcoxon's signed-rank test.

A seed changes the arms' data order and their own samples; the VFT model and the candidate sets are shared,
so the spread is that of the fine-tuning alone, not of the whole pipeline. Arms run in `--workers` processes
(one torch thread each); each finished arm is cached under --work_dir and reused, and the tables are
rewritten after every arm, so an interrupted or budget-cut run leaves honest tables over the seeds it ran.
Order: the beta sweep, then per seed every arm under the answer rule and the core arms under verified, then
the baselines under verified; `--budget_minutes` stops starting arms that would end past the budget.
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
    from benchmarks import _common  # python -m benchmarks.reproduce
except ImportError:
    import _common  # python benchmarks/reproduce.py: the script's own folder is on sys.path

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
CORE = ("control", "rft", "align", "dcl", "bcl")
LABELS = ("answer", "verified")
CONTROL, RFT = "control", "rft"
METRICS = {  # key in a result's "metrics" -> column title
    "accuracy": "greedy %",
    "chain_accuracy": "chain %",
    "rerank_accuracy": "re-rank %",
    "self_consistency": "maj@k %",
    "assess_answer": "assess. (answer) %",
    "assess_verified": "assess. (verified) %",
}


@dataclass
class Plan:
    """What one reproduction runs. `base` overrides configs/default.yaml for the shared VFT model and
    candidate files; the rest are the arms' settings (the same for every arm)."""

    base: dict[str, Any] = field(default_factory=dict)
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    labels: list[str] = field(default_factory=lambda: list(LABELS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    betas: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.1, 0.3, 1.0])
    aft_steps: int = 30
    aft_batch_size: int = 8
    aft_micro_batch_size: int = 8
    aft_lr: float = 2e-4
    w_align: float = 1.0
    heldout_samples: int = 6  # samples per question in the held-out sets (test and validation)
    eval_samples: int = 4  # per arm: own samples per test question, for self-consistency
    val_questions: int = 200
    workers: int = 2
    budget_minutes: float = 150.0

    def settings(self, arm: str, beta: float) -> dict[str, Any]:
        return {
            "mode": ARMS[arm],
            "aft_steps": self.aft_steps,
            "aft_batch_size": self.aft_batch_size,
            "aft_micro_batch_size": self.aft_micro_batch_size,
            "aft_lr": self.aft_lr,
            "beta": beta,
            "w_align": self.w_align,
        }


def full_plan() -> Plan:
    # 30 arm steps of 8 questions (make train's aft stage: 100): 115 arm runs of about 125 s each on one of
    # two quiet cores (measured), about 2 h with the 14-min base; past --budget_minutes the lowest tier (the
    # baselines under verified labels) is left out.
    return Plan(base={"save_every": 0}, aft_steps=30)


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
        betas=[0.05, 0.5],
        aft_steps=2,
        aft_batch_size=4,
        aft_micro_batch_size=4,
        heldout_samples=3,
        eval_samples=2,
        val_questions=8,
        budget_minutes=30.0,
    )


@dataclass(frozen=True)
class Job:
    split: str  # "val" (the beta sweep) or "test"
    label: str  # "answer" | "verified"; "-" for the control (it reads no labels)
    arm: str
    seed: int
    beta: float

    @property
    def name(self) -> str:
        return f"{self.split}/{self.label}/{self.arm}/beta{self.beta:g}-seed{self.seed}"


# ---------------------------------------------------------------------------------------------------------
# The shared base: VFT model, training candidates, held-out candidates (test and validation).


def _base_config(plan: Plan, work: Path, progress: bool):
    from aft_fast.train.config import load_config

    values = {
        "run_dir": str(work / "base"),
        "tensorboard": False,
        "progress": progress,
        "mode": "dpo",  # the sample stage then stores ref_logp, so the dpo arms share the file
        "label": "answer",  # answer_correct and chain_ok are stored either way; arms relabel
        "overwrite": True,  # the base is rebuilt only when missing or stale (plan.json below)
        **plan.base,
    }
    return load_config(["--config", str(ROOT / "configs" / "default.yaml")], **values)


def validation_examples(train_path: Path, test_path: Path, n: int, seed: int, task: str) -> list:
    """Fresh problems from another stream, in neither the training nor the test set."""
    from aft_fast.data.formats import read_examples
    from aft_fast.data.synthetic import generate_problems

    seen = {e.question for p in (train_path, test_path) for e in read_examples(p)}
    out = [e for e in generate_problems(2 * n + 50, seed=10_000 + seed, task=task) if e.question not in seen]
    return out[:n]


def prepare_base(plan: Plan, work: Path, dist, progress: bool) -> dict[str, Any]:
    """Train the VFT model and sample the candidate files once; reuse them while the settings match."""
    import torch

    from aft_fast.data.candidates import read_candidates, write_candidates
    from aft_fast.data.formats import read_examples
    from aft_fast.eval.evaluate import evaluate, score_groups
    from aft_fast.models.loading import load_replica, load_tokenizer
    from aft_fast.train.diagnostics import score_spread
    from aft_fast.train.pipeline import run

    base_dir = work / "base"
    cfg = _base_config(plan, work, progress)
    stamp = base_dir / "plan.json"
    want = {"config": cfg.to_dict(), "heldout_samples": plan.heldout_samples, "val": plan.val_questions}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == want):
        shutil.rmtree(base_dir, ignore_errors=True)
    times_path = base_dir / "timings.json"
    timings: dict[str, float] = json.loads(times_path.read_text()) if times_path.is_file() else {}
    built: list[str] = []

    def timed(name: str, fn) -> None:
        t = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - t
        built.append(name)
        base_dir.mkdir(parents=True, exist_ok=True)
        times_path.write_text(json.dumps(timings))

    if not (base_dir / "vft" / "model.safetensors").is_file():
        timed("vft", lambda: run(replace(cfg, stage="vft"), dist))
    if not cfg.candidates_path.is_file():
        timed("sample", lambda: run(replace(cfg, stage="sample"), dist))
    tok = load_tokenizer(base_dir / "vft")
    data = base_dir / "data"
    examples = {
        "test": read_examples(data / "test.jsonl"),
        "val": validation_examples(
            data / "train.jsonl", data / "test.jsonl", plan.val_questions, cfg.seed, cfg.synthetic_task
        ),
    }
    groups = read_candidates(cfg.candidates_path)
    for split, exs in examples.items():
        path = base_dir / f"heldout_{split}.jsonl"
        if not path.is_file():  # the VFT model's own samples on these questions: the fixed set

            def build(exs=exs, path=path) -> None:
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

            timed(f"heldout_{split}", build)
    spread_path = base_dir / "spread.json"
    if not spread_path.is_file():  # what --beta_from_spread would multiply, for the report
        model = load_replica(base_dir / "vft", dist.device, torch.float32)
        used = [g for g in groups if len(g.candidates) >= 2]
        scored = score_groups(
            model, tok, used, max_length=cfg.max_length, batch_size=cfg.gen_batch_size,
            with_reference=False, progress=progress,
        )
        spread_path.write_text(json.dumps({"spread": score_spread([s.scores for s in scored])}))
    stamp.write_text(json.dumps(want, indent=1))
    meta_path = Path(f"{cfg.candidates_path}.meta.json")
    return {
        "cfg": cfg,
        "dir": base_dir,
        "timings": timings,
        "built_now": built,
        "spread": json.loads(spread_path.read_text())["spread"],
        "candidates_meta": json.loads(meta_path.read_text()) if meta_path.is_file() else {},
        "stamp": want,
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
        from aft_fast.data.candidates import read_candidates
        from aft_fast.data.formats import read_examples
        from aft_fast.models.loading import load_tokenizer

        plan, work = _W["plan"], _W["work"]
        cfg = _base_config(plan, work, progress=False)
        d = work / "base"
        _W["base"] = {
            "cfg": cfg,
            "dir": d,
            "tok": load_tokenizer(d / "vft"),
            "groups": read_candidates(cfg.candidates_path),
            "heldout": {s: read_candidates(d / f"heldout_{s}.jsonl") for s in ("test", "val")},
            "examples": {
                "test": read_examples(d / "data" / "test.jsonl"),
                "val": validation_examples(
                    d / "data" / "train.jsonl", d / "data" / "test.jsonl", plan.val_questions, cfg.seed,
                    cfg.synthetic_task,
                ),
            },
            "labelled": {},
        }
    return _W["base"]


def _job_key(plan: Plan, job: Job, stamp: dict) -> dict[str, Any]:
    samples = plan.eval_samples if job.split == "test" else 0
    return {**asdict(job), **plan.settings(job.arm, job.beta), "eval_samples": samples, "base": stamp}


def run_job(job: Job, stamp: dict) -> dict[str, Any]:
    """Train one arm from the VFT model, evaluate it, cache the result (reused when the key matches)."""
    from aft_fast.data.candidates import relabel
    from aft_fast.train.aft import run_aft

    plan, work, dist = _W["plan"], _W["work"], _W["dist"]
    out_dir = work / "arms" / job.name
    result_path = out_dir / "result.json"
    key = _job_key(plan, job, stamp)
    if result_path.is_file():
        cached = json.loads(result_path.read_text())
        if cached.get("key") == key:
            return cached
    shutil.rmtree(out_dir, ignore_errors=True)
    base = _shared()
    label = job.label if job.label != "-" else "answer"
    if label not in base["labelled"]:
        base["labelled"][label] = relabel(base["groups"], label)
    cfg = replace(
        base["cfg"],
        stage="aft",
        run_dir=str(out_dir),
        seed=job.seed,
        vft_model=str(base["dir"] / "vft"),
        label=label,
        progress=False,
        **plan.settings(job.arm, job.beta),
    )
    t0 = time.perf_counter()
    stage = run_aft(cfg, dist, base["tok"], base["labelled"][label], base["dir"] / "vft")
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    samples = plan.eval_samples if job.split == "test" else 0
    result = evaluate_model(base, cfg.stage_model_dir("aft"), job.split, job.seed, samples)
    result.update(
        key=key,
        job=asdict(job),
        train_seconds=train_s,
        eval_seconds=time.perf_counter() - t1,
        train_metrics=stage.metrics,
    )
    if not (job.split == "test" and job.seed == plan.seeds[0]):
        result.pop("scores")  # the score plots show the first seed only
    result_path.write_text(json.dumps(result))
    shutil.rmtree(out_dir / "aft", ignore_errors=True)  # ~7 MB a model; the result is what is kept
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    return result


def evaluate_model(base: dict, model_dir: Path, split: str, seed: int, samples: int) -> dict[str, Any]:
    import torch

    from aft_fast.data.chains import check_chain
    from aft_fast.eval import metrics
    from aft_fast.eval.evaluate import evaluate
    from aft_fast.models.loading import load_replica

    cfg, fixed = base["cfg"], base["heldout"][split]
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
    del model
    return {"summary": res.summary, **measure(res, base["examples"][split], fixed, check_chain, metrics)}


def measure(res, examples: list, fixed: list, check_chain, metrics) -> dict[str, Any]:
    """The study's metrics from one evaluation: greedy and chain accuracy from the greedy outputs,
    re-ranking and assessment (both label rules) from the fixed held-out set, self-consistency from the
    model's own samples (None without samples)."""
    greedy = [r["correct"] for r in res.records]
    chain = [r["correct"] and check_chain(e.question, r["output"]).ok for r, e in zip(res.records, examples,
                                                                                       strict=True)]
    rerank, assess = [], {}
    pos, neg = [], []
    for rule in LABELS:
        pairs = []
        for g, s in zip(fixed, res.fixed_scored, strict=True):
            labels = [
                int(bool(c.answer_correct) and (rule == "answer" or bool(c.chain_ok))) for c in g.candidates
            ]
            pairs.append((s.scores, labels))
            if rule == "answer" and s.scores:
                best = max(range(len(s.scores)), key=lambda i, sc=s.scores: sc[i])
                rerank.append(bool(g.candidates[best].answer_correct))
            if rule == "verified" and labels and 0 < sum(labels) < len(labels):
                for sc, lab in zip(s.scores, labels, strict=True):
                    (pos if lab else neg).append(sc)
        a = metrics.assessment_accuracy(pairs)
        assess[rule] = (a.accuracy, a.pairs)
    n = max(len(greedy), 1)
    return {
        "metrics": {
            "accuracy": sum(greedy) / n,
            "chain_accuracy": sum(chain) / n,
            "rerank_accuracy": sum(rerank) / max(len(rerank), 1),
            "self_consistency": res.summary.get("eval/self_consistency"),
            "assess_answer": assess["answer"][0],
            "assess_verified": assess["verified"][0],
        },
        "pairs": {rule: assess[rule][1] for rule in LABELS},
        "scores": {"pos": pos, "neg": neg},  # held-out scores under the verified labels
    }


# ---------------------------------------------------------------------------------------------------------
# Scheduling.


def sweep_jobs(plan: Plan) -> list[Job]:
    return [Job("val", label, "bcl", plan.seeds[0], b) for label in plan.labels for b in plan.betas]


def main_jobs(plan: Plan, betas: dict[str, float]) -> list[Job]:
    """In priority order: per seed, the control, every arm under answer and the core arms under verified;
    then the other arms under verified."""
    from aft_fast.constants import train_mode

    def job(label: str, arm: str, seed: int) -> Job:
        beta = betas[label] if train_mode(ARMS[arm]).boundary else 0.0
        return Job("test", "-" if arm == CONTROL else label, arm, seed, beta)

    first, later = [], []
    for seed in plan.seeds:
        if CONTROL in plan.arms:
            first.append(job("answer", CONTROL, seed))
        for label in plan.labels:
            for arm in plan.arms:
                if arm == CONTROL:
                    continue
                (first if label == "answer" or arm in CORE else later).append(job(label, arm, seed))
    return first + later


def worker_pool(plan: Plan, work: Path) -> cf.ProcessPoolExecutor:
    """plan.workers arm processes (spawned: no inherited process group), the cores split between them."""
    threads = max(1, (os.cpu_count() or 2) // plan.workers)
    ctx = mp.get_context("spawn")
    return cf.ProcessPoolExecutor(plan.workers, ctx, _worker_init, (plan, str(work), threads))


def run_jobs(
    plan: Plan, pool: cf.ProcessPoolExecutor, jobs: list[Job], stamp: dict, clock: dict, on_result
) -> list[dict]:
    """Run `jobs` in the pool; finished results are reused. Stops starting jobs whose expected end passes
    the budget (the mean time of the jobs run so far)."""
    results: list[dict] = []
    pending = list(jobs)
    running: dict[cf.Future, Job] = {}

    def submit() -> None:
        while pending and len(running) < plan.workers:
            job = pending[0]
            cached = _cached(plan, job, stamp, clock["work"])
            if cached is None and not _fits(plan, clock):
                print(f"[reproduce] budget: {len(pending)} arm runs not started", flush=True)
                pending.clear()
                return
            pending.pop(0)
            if cached is not None:
                results.append(cached)
                on_result(cached, cached=True)
                continue
            running[pool.submit(run_job, job, stamp)] = job

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


def _cached(plan: Plan, job: Job, stamp: dict, work: Path) -> dict | None:
    path = work / "arms" / job.name / "result.json"
    if path.is_file():
        r = json.loads(path.read_text())
        if r.get("key") == _job_key(plan, job, stamp):
            return r
    return None


def _fits(plan: Plan, clock: dict) -> bool:
    done = clock["job_seconds"]
    if not done:
        return True
    elapsed = time.perf_counter() - clock["t0"]
    per_job = sum(done) / len(done) / plan.workers  # wall time per job with the workers busy
    return elapsed + per_job <= 60 * plan.budget_minutes


# The up-front estimate, in seconds of one process with both cores (2 CPU cores of the kind CI uses): the
# VFT stage ~1.47 s a step of 32, sampling ~0.06 s a chain, an arm's start-up (engine, model in and out)
# ~8 s, an AFT step of 8 groups ~0.8 s (the control's ~0.35 s), greedy decoding ~0.0125 s a question and
# sampling ~0.025 s a chain (the previous reproduction and docs/design.md's figures). Two 1-thread workers
# are taken to give 1.5x the throughput of one 2-thread process (a 192-wide model splits poorly over two
# threads); the log prints the measured times and a projection from them after every arm.
EST = {"vft_step": 1.47, "chain": 0.06, "startup": 8.0, "aft_step": 0.8, "vft_arm_step": 0.35,
       "greedy": 0.0125, "sample": 0.025, "score": 0.0025}


def estimate(plan: Plan, base_done: list[str], n_sweep: int, jobs: list[Job], n_test: int) -> float:
    """Minutes the run should take (cached arms and base parts count as zero when found)."""
    cfg = plan.base
    base = 0.0
    if "vft" not in base_done:
        base += EST["vft_step"] * cfg.get("vft_steps", 450) * cfg.get("vft_batch_size", 32) / 32
    if "sample" not in base_done:
        base += EST["chain"] * cfg.get("sample_limit", 512) * cfg.get("num_samples", 6)
    for split, n in (("test", n_test), ("val", plan.val_questions)):
        if f"heldout_{split}" not in base_done:
            base += EST["chain"] * n * plan.heldout_samples

    def job_seconds(arm: str, questions: int, samples: int) -> float:
        step = EST["vft_arm_step"] if arm == CONTROL else EST["aft_step"]
        train = step * plan.aft_steps * plan.aft_batch_size / 8
        chains = questions * (samples + plan.heldout_samples)
        evals = EST["greedy"] * questions + EST["sample"] * questions * samples + EST["score"] * chains
        return EST["startup"] + train + evals

    arms = n_sweep * job_seconds("bcl", plan.val_questions, 0)
    arms += sum(job_seconds(j.arm, n_test, plan.eval_samples) for j in jobs)
    speedup = 1.5 if plan.workers >= 2 else 1.0
    return (base + arms / speedup) / 60


# ---------------------------------------------------------------------------------------------------------
# Report.


def _vals(results: list[dict], split: str, label: str, arm: str, key: str) -> dict[int, float]:
    """seed -> metric of one arm under one label rule (the control serves every rule)."""
    want = "-" if arm == CONTROL else label
    return {
        r["job"]["seed"]: r["metrics"][key]
        for r in results
        if r["job"]["split"] == split
        and r["job"]["arm"] == arm
        and r["job"]["label"] == want
        and r["metrics"].get(key) is not None
    }


def paired(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """a - b over the seeds both have: mean, std, seeds up / down, t-test and Wilcoxon p-values."""
    from scipy import stats

    from aft_fast.eval.metrics import spread

    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    out: dict[str, Any] = {"seeds": seeds, "diffs": d}
    if not d:
        return out
    s = spread(d)
    out.update(mean=s.mean, std=s.std, up=sum(x > 0 for x in d), down=sum(x < 0 for x in d))
    out["t_p"] = out["w_p"] = None
    if len(d) >= 2 and any(x != d[0] for x in d):
        out["t_p"] = float(stats.ttest_rel([a[x] for x in seeds], [b[x] for x in seeds]).pvalue)
    if len(d) >= 2 and any(x != 0 for x in d):
        out["w_p"] = float(stats.wilcoxon(d).pvalue)
    return out


def _pct(values: dict[int, float]) -> str:
    from aft_fast.eval.metrics import spread

    if not values:
        return "n/a"
    s = spread([100 * v for v in values.values()])
    return f"{s.mean:.1f} ± {s.std:.1f}" if s.n > 1 else f"{s.mean:.1f}"


def _p(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2g}"


def _delta(p: dict[str, Any]) -> str:
    if "mean" not in p:
        return "n/a"
    return f"{100 * p['mean']:+.1f} ± {100 * p['std']:.1f} ({p['up']}↑{p['down']}↓, t p={_p(p['t_p'])})"


def choose_betas(plan: Plan, sweep: list[dict]) -> tuple[dict[str, float], list[list[str]]]:
    """Per label rule: the beta with the best validation greedy accuracy (ties: the smaller beta)."""
    chosen, rows = {}, []
    for label in plan.labels:
        rs = sorted((r for r in sweep if r["job"]["label"] == label), key=lambda r: r["job"]["beta"])
        if not rs:
            continue
        best = max(rs, key=lambda r: (r["metrics"]["accuracy"], -r["job"]["beta"]))
        chosen[label] = best["job"]["beta"]
        for r in rs:
            m, tm = r["metrics"], r.get("train_metrics", {})
            rows.append([
                label,
                f"{r['job']['beta']:g}" + (" ←" if r is best else ""),
                f"{100 * m['accuracy']:.1f}",
                f"{100 * m['chain_accuracy']:.1f}",
                f"{100 * m['assess_verified']:.1f}" if m["assess_verified"] is not None else "n/a",
                _num(tm.get("train/neg_minus_boundary")),
                _num(tm.get("train/neg_below_boundary"), pct=True),
            ])
    return chosen, rows


def _num(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.0f}%" if pct else f"{x:.4f}"


def report(plan: Plan, base: dict, start: dict, sweep: list[dict], results: list[dict], meta: dict,
           betas: dict[str, float]) -> tuple[str, dict]:
    """The markdown tables and the JSON summary of what has run so far."""
    from aft_fast.constants import train_mode

    cfg = base["cfg"]
    seeds_run = sorted({r["job"]["seed"] for r in results})
    lines = [
        f"# Reproduction: AFT against continued VFT and RFT, the constraint, label noise ({meta['title']})",
        "",
        f"Command: `{meta['command']}`: {meta['minutes']:.0f} min in its last invocation, "
        f"{_run_minutes(sweep, results):.0f} worker-min of arm runs in all, on {meta['env']['gpu']} "
        f"({meta['env']['torch']}, git {meta['env']['git_sha']}, {meta['env']['timestamp']}); "
        f"{plan.workers} arm workers. Shared base: {_base_times(base)}.",
        "",
    ]
    reused = [r for r in (*sweep, *results) if r.get("reused_from")]
    if reused:  # results carried over into the cache by hand say where they came from
        lines += [f"{len(reused)} of the {len(sweep) + len(results)} runs are reused: "
                  f"{reused[0]['reused_from']}. Their times are those of that run.", ""]
    lines += [
        f"Start: one VFT model ({cfg.vft_steps} steps, task `{cfg.synthetic_task}`) and one candidate file "
        f"({_meta_text(base)}), shared by every arm. Each arm: {plan.aft_steps} steps of "
        f"{plan.aft_batch_size} questions, lr {plan.aft_lr:g}, warm-up {cfg.warmup_ratio:g} then cosine, "
        "w_vft 1, w_align "
        f"{plan.w_align:g}. Seeds run: {', '.join(map(str, seeds_run)) or 'none'} (of "
        f"{', '.join(map(str, plan.seeds))}).",
        "",
        f"Test: {start['summary']['questions']} questions. Greedy / chain accuracy: the greedy answer "
        "right / right with every step right. Re-rank: the held-out chain the model scores highest has the "
        "right "
        f"answer. maj@{plan.eval_samples}: majority vote over the model's own samples. Assessment: (right, "
        "wrong) pairs of the held-out set (sampled once from the VFT model) scored in the right order, right "
        "meaning the right answer (answer) or the right answer and chain (verified); "
        f"{start['pairs']['answer']} / {start['pairs']['verified']} pairs. Mean ± sample std over seeds, "
        "in %; Δ: paired by seed, in "
        "points (↑↓: seeds up / down; p: paired t-test).",
        "",
    ]
    summary: dict[str, Any] = {"seeds_run": seeds_run, "betas": betas, "tables": {}, "comparisons": {}}
    start_row = ["VFT (start)", "-", *[_pct({0: start["metrics"][k]}) if start["metrics"][k] is not None
                                       else "n/a" for k in METRICS], "", ""]
    for label in plan.labels:
        arms = [a for a in plan.arms if _vals(results, "test", label, a, "accuracy")]
        if not arms:
            continue
        rows, table = [start_row], {}
        for a in arms:
            vals = {k: _vals(results, "test", label, a, k) for k in METRICS}
            vs_c = paired(vals["accuracy"], _vals(results, "test", label, CONTROL, "accuracy"))
            vs_r = paired(vals["accuracy"], _vals(results, "test", label, RFT, "accuracy"))
            mode = ARMS[a] + (f" β={betas[label]:g}" if train_mode(ARMS[a]).boundary else "")
            rows.append([a, mode, *[_pct(vals[k]) for k in METRICS],
                         _delta(vs_c) if a != CONTROL else "", _delta(vs_r) if a != RFT else ""])
            table[a] = {"values": vals, "vs_control": vs_c, "vs_rft": vs_r}
        summary["tables"][label] = table
        lines += [
            f"## Label rule: {label}" + (" (the control reads no labels: the same runs in both tables)"),
            "",
            _common.markdown_table(
                ["arm", "mode", *METRICS.values(), "Δ greedy vs control", "Δ greedy vs RFT"], rows
            ),
            "",
        ]
    comp_rows = []
    for label in plan.labels:
        for a, b, what in [("bcl", "align", "constraint"), ("dcl", "align", "constraint"),
                           *[(f"{x}+bc", x, "+bc") for x in ("dpo", "rrhf", "pro")],
                           *[(x, CONTROL, "vs control") for x in ("align", "dcl", "bcl")],
                           *[(x, RFT, "vs RFT") for x in ("align", "dcl", "bcl")]]:
            for key in ("accuracy", "chain_accuracy", "assess_verified"):
                p = paired(_vals(results, "test", label, a, key), _vals(results, "test", label, b, key))
                if "mean" in p:
                    summary["comparisons"][f"{label}:{a}-{b}:{key}"] = p
            p = summary["comparisons"].get(f"{label}:{a}-{b}:accuracy")
            if p:
                c = summary["comparisons"].get(f"{label}:{a}-{b}:chain_accuracy", {})
                comp_rows.append([label, what, f"{a} − {b}", _delta(p), _p(p["w_p"]), _delta(c)])
    for a in plan.arms:
        if a == CONTROL:
            continue
        for key in ("accuracy", "chain_accuracy"):
            p = paired(_vals(results, "test", "verified", a, key), _vals(results, "test", "answer", a, key))
            if "mean" in p:
                summary["comparisons"][f"verified-answer:{a}:{key}"] = p
        p = summary["comparisons"].get(f"verified-answer:{a}:accuracy")
        if p:
            c = summary["comparisons"].get(f"verified-answer:{a}:chain_accuracy", {})
            comp_rows.append(["both", "label noise", f"{a}: verified − answer", _delta(p), _p(p["w_p"]),
                              _delta(c)])
    if comp_rows:
        lines += [
            "## Paired differences",
            "",
            f"Same seed, so the same data order. The smallest two-sided Wilcoxon p over {len(seeds_run)} "
            f"seeds is {2 / 2 ** len(seeds_run):.3g}.",
            "",
            _common.markdown_table(
                ["rule", "question", "difference", "Δ greedy", "Wilcoxon p", "Δ chain accuracy"], comp_rows
            ),
            "",
        ]
    _, sweep_rows = choose_betas(plan, sweep)
    if sweep_rows:
        lines += [
            "## beta for bcl and +bc, chosen on the validation split",
            "",
            f"Seed {plan.seeds[0]}, {plan.val_questions} validation questions (fresh problems), bcl. The VFT "
            f"model's score spread (pooled within-question std of the training candidates' s_c) is "
            f"{base['spread']:.4f}: `--beta_from_spread=1` would give beta {base['spread']:.4f}. s_n − B and "
            "below B: the negatives' mean distance to the boundary and the fraction under it at the last "
            "log step of training.",
            "",
            _common.markdown_table(
                ["rule", "beta", "val greedy %", "val chain %", "val assess. (verified) %", "s_n − B",
                 "below B"],
                sweep_rows,
            ),
            "",
        ]
    diag_rows = []
    for label in plan.labels:
        for a in plan.arms:
            rs = [r for r in results if r["job"]["split"] == "test" and r["job"]["arm"] == a
                  and r["job"]["label"] == ("-" if a == CONTROL else label)]
            if not rs or a == CONTROL:
                continue
            tm = [r.get("train_metrics", {}) for r in rs]

            def mean(k: str, tm=tm) -> float | None:
                v = [t[k] for t in tm if t.get(k) is not None]
                return sum(v) / len(v) if v else None

            ratio = mean("train/grad_ratio")
            seconds = sum(r["train_seconds"] + r["eval_seconds"] for r in rs) / len(rs)
            diag_rows.append([label, a, _num(mean("train/margin")), _num(mean("train/neg_minus_boundary")),
                              _num(mean("train/neg_below_boundary"), pct=True),
                              "n/a" if ratio is None else f"{ratio:.3g}", f"{seconds:.0f} s"])
    if diag_rows:
        lines += [
            "## What the loss did (training diagnostics, last log step, mean over seeds)",
            "",
            "margin: mean s_p − s_n over the batch's pairs; s_n − B, below B: boundary modes only; "
            "align / vft gradient: the norms of the two parts of the gradient on the final hidden states "
            "(aft_fast/train/diagnostics.py).",
            "",
            _common.markdown_table(["rule", "arm", "margin", "s_n − B", "below B", "align / vft gradient",
                                    "time / run"], diag_rows),
            "",
        ]
    n = start["summary"]["questions"]
    acc = start["metrics"]["accuracy"]
    lines += [
        f"Binomial standard error of one accuracy on {n} questions near {100 * acc:.0f}%: "
        f"±{100 * (acc * (1 - acc) / max(n, 1)) ** 0.5:.1f} points; the seeds share the test set, so their "
        "spread does not include it.",
        "",
        f"Plots: {', '.join(meta['plots']) or 'none yet'}.",
        "",
    ]
    return "\n".join(lines), summary


def _meta_text(base: dict) -> str:
    m = base["candidates_meta"]
    if not m:
        return f"{base['cfg'].num_samples} samples per training question"
    return ", ".join(f"{k} {v}" for k, v in m.items() if isinstance(v, (int, float, str)) and k != "label")


def _run_minutes(sweep: list[dict], results: list[dict]) -> float:
    """Train and evaluation time of every arm run reported, cached ones included."""
    return sum(r["train_seconds"] + r["eval_seconds"] for r in (*sweep, *results)) / 60


def _base_times(base: dict) -> str:
    names = {"vft": "VFT", "sample": "training candidates", "heldout_test": "held-out test set",
             "heldout_val": "held-out validation set"}
    parts = [f"{names.get(k, k)} {v / 60:.1f} min" for k, v in base["timings"].items()]
    if not parts:
        return "reused (build times unknown)"
    reused = [names.get(k, k) for k in base["timings"] if k not in base["built_now"]]
    return ", ".join(parts) + (f"; {', '.join(reused)} reused from an earlier invocation" if reused else "")


def plots(out: Path, plan: Plan, start: dict, results: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from aft_fast.eval.plots import plot_score_distributions

    written = []
    seed0 = plan.seeds[0]
    panels = [("VFT (start)", start["scores"]["pos"], start["scores"]["neg"])]
    for a in CORE:
        r = next((r for r in results if r["job"]["split"] == "test" and r["job"]["arm"] == a
                  and r["job"]["seed"] == seed0 and r["job"]["label"] in ("-", "answer") and "scores" in r),
                 None)
        if r is not None:
            panels.append((f"{a} (answer labels)", r["scores"]["pos"], r["scores"]["neg"]))
    if len(panels) > 1 and panels[0][1] and panels[0][2]:
        plot_score_distributions(
            panels, out / "reproduce_scores.png",
            title=f"held-out chains, verified right vs wrong: per-token scores (seed {seed0})",
        )
        written.append("reproduce_scores.png")
    fig, axes = plt.subplots(len(plan.labels), 2, figsize=(12, 3.6 * len(plan.labels)), squeeze=False)
    for row, label in enumerate(plan.labels):
        for col, key in enumerate(("accuracy", "chain_accuracy")):
            ax = axes[row][col]
            arms = [a for a in plan.arms if _vals(results, "test", label, a, key)]
            for x, a in enumerate(arms):
                vals = [100 * v for v in _vals(results, "test", label, a, key).values()]
                ax.scatter([x] * len(vals), vals, s=14, color="tab:blue", alpha=0.7)
                ax.hlines(sum(vals) / len(vals), x - 0.3, x + 0.3, color="black")
            ax.axhline(100 * start["metrics"][key], color="tab:gray", linestyle="--", label="VFT (start)")
            ax.set_xticks(range(len(arms)), arms, rotation=40, ha="right", fontsize=8)
            ax.set_ylabel(f"{METRICS[key]} ({label} labels)", fontsize=9)
            ax.legend(fontsize=8)
    fig.suptitle("per seed (dots) and mean (bar)", fontsize=10)
    fig.tight_layout()
    path = out / "reproduce_metrics.png"
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    written.append(path.name)
    return written


def _write(out: Path, name: str, text: str) -> None:
    tmp = out / f".{name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / name)


# ---------------------------------------------------------------------------------------------------------


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
    p.add_argument("--quick", action="store_true", help="CI-sized run (about a minute); numbers mean nothing")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), help="default: all eleven (quick: four)")
    p.add_argument("--labels", nargs="+", choices=list(LABELS), help="label rules (default: both)")
    p.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 3 4 (quick: 0 1)")
    p.add_argument("--betas", type=float, nargs="+", help="the validation sweep of bcl's beta")
    p.add_argument("--aft_steps", type=int)
    p.add_argument("--aft_lr", type=float)
    p.add_argument("--eval_samples", type=int, help="own samples per test question (maj@k)")
    p.add_argument("--workers", type=int, help="arm processes at once (default 2)")
    p.add_argument("--budget_minutes", type=float, help="start no arm past this (default 150)")
    p.add_argument("--work_dir", type=Path, help="models and caches (default runs/reproduce[-quick])")
    p.add_argument("--out", type=Path, help="tables and plots (default benchmarks/results; quick: work_dir)")
    p.add_argument("--progress", action="store_true", help="progress bars for the shared base")
    args = p.parse_args(argv)

    plan = quick_plan() if args.quick else full_plan()
    for name in ("arms", "labels", "seeds", "betas", "aft_steps", "aft_lr", "eval_samples", "workers",
                 "budget_minutes"):
        if getattr(args, name) is not None:
            setattr(plan, name, getattr(args, name))
    if plan.workers < 1:
        p.error("--workers: must be at least 1")
    work = args.work_dir or ROOT / "runs" / ("reproduce-quick" if args.quick else "reproduce")
    out = args.out or (work / "results" if args.quick else _common.RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from aft_fast.train.engine import init_distributed

    clock = {"t0": time.perf_counter(), "work": work, "job_seconds": []}
    from aft_fast.constants import train_mode

    n_sweep = len(sweep_jobs(plan)) if any(train_mode(ARMS[a]).boundary for a in plan.arms) else 0
    planned = main_jobs(plan, {label: 0.0 for label in plan.labels})
    n_main = len(planned)
    times = work / "base" / "timings.json"
    base_done = list(json.loads(times.read_text())) if times.is_file() else []
    n_test = plan.base.get("synthetic_test", 200)
    print(
        f"[reproduce] plan: {n_sweep} sweep runs + {n_main} arm runs ({len(plan.seeds)} seeds), "
        f"{plan.workers} workers; estimate {estimate(plan, base_done, n_sweep, planned, n_test):.0f} min "
        "(cached results shorten it; "
        f"budget {plan.budget_minutes:g} min)",
        flush=True,
    )
    dist = init_distributed("gloo")
    base = prepare_base(plan, work, dist, args.progress)
    print(f"[reproduce] base ready ({base['timings']}), score spread {base['spread']:.4f}", flush=True)
    # The VFT model itself, measured like an arm (seed 0 of its own samples).
    start_path = work / "base" / "start.json"
    start_key = {"base": base["stamp"], "eval_samples": plan.eval_samples}
    start = json.loads(start_path.read_text()) if start_path.is_file() else None
    if start is None or start.get("key") != start_key:
        _W.update(plan=plan, work=work, dist=dist)
        start = evaluate_model(_shared(), work / "base" / "vft", "test", plan.seeds[0], plan.eval_samples)
        start["key"] = start_key
        start_path.write_text(json.dumps(start))
    print(f"[reproduce] VFT start: {json.dumps({k: v for k, v in start['metrics'].items()})}", flush=True)

    meta = {
        "title": "--quick, toy size: the numbers mean nothing" if args.quick else "full run",
        "command": "python benchmarks/reproduce.py" + "".join(f" {a}" for a in _settings_args(argv)),
        "env": _common.environment(),
        "plots": [],
    }
    state: dict[str, Any] = {"sweep": [], "results": [], "betas": {}}

    def write_report(final: bool = False) -> str:
        meta["minutes"] = (time.perf_counter() - clock["t0"]) / 60
        if final or len(state["results"]) % 10 == 0:
            meta["plots"] = plots(out, plan, start, state["results"]) if state["results"] else []
        text, summary = report(plan, base, start, state["sweep"], state["results"], meta, state["betas"])
        _write(out, "reproduce.md", text)
        raw = {
            "plan": asdict(plan),
            "meta": meta,
            "seeds": summary["seeds_run"],
            "base": {
                "timings": base["timings"], "spread": base["spread"], "candidates": base["candidates_meta"]
            },
            "betas": state["betas"],
            "start": {k: v for k, v in start.items() if k != "scores"},
            "summary": summary,
            "sweep": state["sweep"],
            "results": [{k: v for k, v in r.items() if k != "scores"} for r in state["results"]],
        }
        _write(out, "reproduce.json", json.dumps(raw, indent=1, default=str) + "\n")
        return text

    def on_result(r: dict, cached: bool) -> None:
        j = r["job"]
        bucket = state["sweep"] if j["split"] == "val" else state["results"]
        bucket.append(r)
        m = r["metrics"]
        done = len(state["sweep"]) + len(state["results"])
        elapsed, times = (time.perf_counter() - clock["t0"]) / 60, clock["job_seconds"]
        left = (n_sweep + n_main - done) * sum(times) / max(len(times), 1) / plan.workers / 60
        print(
            f"[reproduce] {done}/{n_sweep + n_main} {'(cached) ' if cached else ''}{j['split']} "
            f"{j['label']:>8} "
            f"{j['arm']:>8} beta {j['beta']:g} seed {j['seed']}: greedy {m['accuracy']:.3f}, chain "
            f"{m['chain_accuracy']:.3f}, re-rank {m['rerank_accuracy']:.3f} ({r['train_seconds']:.0f} s + "
            f"{r['eval_seconds']:.0f} s; {elapsed:.1f} min so far, ~{left:.0f} min to go at this pace)",
            flush=True,
        )
        if j["split"] == "test":
            write_report()

    with worker_pool(plan, work) as pool:
        if n_sweep:
            run_jobs(plan, pool, sweep_jobs(plan), base["stamp"], clock, on_result)
            state["betas"], _ = choose_betas(plan, state["sweep"])
            print(f"[reproduce] beta chosen on validation: {state['betas']}", flush=True)
        for label in plan.labels:
            state["betas"].setdefault(label, plan.betas[0])
        run_jobs(plan, pool, main_jobs(plan, state["betas"]), base["stamp"], clock, on_result)
    text = write_report(final=True)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
