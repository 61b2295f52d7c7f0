"""What the reproduction study (benchmarks/reproduce.py) runs in its processes: the shared base (the VFT
model, the training candidates, the held-out test candidates) and one arm (the aft stage from the base, then
evaluate() on the test or validation split), cached under the work folder by a key of everything it read.
`plan` is reproduce.Plan, `job` reproduce.Job."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from benchmarks.reproduce_report import METRICS

ROOT = Path(__file__).resolve().parents[1]
# arm -> the aft stage's --mode (aft_fast.constants.TRAIN_MODES): the control is continued VFT.
ARMS = {"control": "vft", **{m: m for m in "rft align dcl bcl dpo dpo+bc rrhf rrhf+bc pro pro+bc".split()}}
LABELS = ("answer", "verified")
# The fields of the run config the base (VFT model, candidate files) depends on: its cache key.
BASE_KEYS = tuple(
    "seed synthetic_train synthetic_test synthetic_task vft_steps vft_batch_size vft_micro_batch_size "
    "vft_lr warmup_ratio min_lr_ratio weight_decay grad_clip num_samples temperature top_p max_new_tokens "
    "sample_limit gen_batch_size max_length prompt_format model train_data test_data mode "
    "aft_optimizer".split()
)


# ---------------------------------------------------------------------------------------------------------
# The shared base: VFT model, training candidates, held-out test candidates, the start's metrics.


def base_config(plan, work: Path):
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


def base_stamp(plan, cfg) -> dict[str, Any]:
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


def prepare_base(plan, work: Path, dist) -> dict[str, Any]:
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


def _worker_init(plan, work: str, threads: int) -> None:
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


def arm_dir(plan, work: Path, job) -> Path:
    return work / ("arms" if plan.init == "vft" else "arms-from-init") / job.name


def scores_heldout(plan, job) -> bool:
    """Whether the arm run scores the held-out set: test runs at the first `plan.score_seeds` seeds."""
    return job.split == "test" and job.seed in plan.seeds[: plan.score_seeds]


def job_key(plan, job, stamp: dict) -> dict[str, Any]:
    return {
        **asdict(job),
        "heldout": scores_heldout(plan, job),
        "mode": ARMS[job.arm],
        "init": plan.init,
        "aft_steps": plan.aft_steps,
        "aft_batch_size": plan.aft_batch_size,
        "w_align": plan.w_align,
        "base": stamp,
    }


def run_job(job, stamp: dict) -> dict[str, Any]:
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
        aft_optimizer=base["cfg"].aft_optimizer if plan.init == "vft" else "fresh",  # the init has no moments
    )
    t0 = time.perf_counter()
    stage = run_aft(cfg, dist, base["tok"], base["labelled"][label], start)
    t1 = time.perf_counter()
    result = evaluate_model(base, cfg.stage_model_dir("aft"), job.split, heldout=scores_heldout(plan, job))
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


def evaluate_model(base: dict, model_dir: Path, split: str, heldout: bool) -> dict[str, Any]:
    """evaluate()'s greedy metrics on one split, and with `heldout` the held-out set's (test questions)
    scored. Per question: greedy right ("1") or not, for the per-question paired tests."""
    import torch

    from aft_fast.data.candidates import relabel
    from aft_fast.eval.evaluate import evaluate, split_scores
    from aft_fast.models.loading import load_replica

    cfg = base["cfg"]
    fixed = base["heldout"] if heldout else None
    model = load_replica(model_dir, torch.device("cpu"), torch.float32)
    res = evaluate(
        model,
        base["tok"],
        base["examples"][split],
        samples=0,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.gen_batch_size,
        max_length=cfg.max_length,
        fixed=fixed,
        progress=False,
    )
    s = res.summary
    metrics = {k: s.get(f"eval/{k}") for k in METRICS}
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
