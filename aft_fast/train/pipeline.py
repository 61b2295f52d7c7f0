"""The stages in order (docs/design.md section 1): setup -> vft -> eval -> sample -> aft -> eval, with the
input checks up front and the summary table at the end. `train.py` and `aft-fast` both call `run`.

Every input is checked before the first step trains: data files (file:line on a bad record), model
folders, the tokenizer's vocabulary against the model's, the candidate file (an empty one fails).
"""

from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import torch
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from aft_fast.constants import train_mode
from aft_fast.data.candidates import (
    CandidateGroup,
    not_checkable_error,
    read_candidates,
    relabel,
)
from aft_fast.data.chains import FORMS, is_checkable
from aft_fast.data.formats import DataError, Example, prompt_text, read_examples
from aft_fast.data.gsm_symbolic import write_gsm_symbolic
from aft_fast.data.prompts import bind_prompt_format
from aft_fast.data.synthetic import write_default_task
from aft_fast.eval.evaluate import (
    Evaluation,
    evaluate,
    form_scores,
    split_scores,
    summary_line,
    write_results,
)
from aft_fast.eval.plots import plot_score_distributions, plot_scores_by_form
from aft_fast.models.adapters import check_qlora
from aft_fast.models.folders import TRAINER_STATE
from aft_fast.models.loading import (
    check_model_dir,
    check_vocab,
    create_default_model,
    load_replica,
    load_tokenizer,
    resolve_model,
)
from aft_fast.train.aft import run_aft
from aft_fast.train.config import EvalSettings, InputError, TrainConfig, to_yaml
from aft_fast.train.engine import Dist, model_dtype, resolve_ds_config_path
from aft_fast.train.logging import MetricsLogger, print0
from aft_fast.train.run_guard import guard
from aft_fast.train.sample import check_sampler, group_stats, make_sampler, run_sample
from aft_fast.train.vft import run_vft

ALL = ("vft", "eval_vft", "sample", "aft", "eval_aft")


@dataclass
class Row:
    stage: str
    seconds: float
    result: str


@dataclass
class Summary:
    rows: list[Row] = field(default_factory=list)
    values: dict[str, float | int | str] = field(default_factory=dict)

    def add(self, stage: str, seconds: float, result: str, **values) -> None:
        self.rows.append(Row(stage, seconds, result))
        self.values.update(values)
        print0(f"[{stage}] {result} ({seconds:.1f} s)")

    def table(self) -> str:
        lines = ["| stage | time | result |", "| --- | ---: | --- |"]
        lines += [f"| {r.stage} | {r.seconds:.1f} s | {r.result} |" for r in self.rows]
        lines.append(f"| total | {sum(r.seconds for r in self.rows):.1f} s | |")
        return "\n".join(lines)


def _barrier() -> None:
    if deepspeed.comm.is_initialized():
        deepspeed.comm.barrier()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_trained_format(model_dir: Path, prompt_format: str) -> None:
    """ValueError when `model_dir` is a stage output of this trainer that learned another prompt format
    (its trainer_state.json records the run's config): sampling, training or scoring it under another
    template would show it prompts it never saw."""
    state = model_dir / TRAINER_STATE
    if not state.is_file():
        return
    trained = json.loads(state.read_text()).get("config", {}).get("prompt_format")
    if trained is not None and trained != prompt_format:
        raise ValueError(
            f"prompt_format: {model_dir} was trained with prompt_format {trained} ({state}); this run asks "
            f"for {prompt_format}. Use --prompt_format {trained}, or train that model again"
        )


def _finished(model_dir: Path, steps: int) -> bool:
    """A stage's Hugging Face folder exists and records the step count asked for."""
    state = model_dir / TRAINER_STATE
    return state.is_file() and json.loads(state.read_text()).get("steps") == steps


@dataclass
class Inputs:
    tokenizer: PreTrainedTokenizerBase
    train: list[Example]
    test: list[Example]
    start_model: Path  # what the first requested stage loads
    groups: list[CandidateGroup] | None = None  # --stage aft: the candidate file, read up front
    eval_groups: list[CandidateGroup] | None = None  # --eval_candidates: the fixed set every eval scores


def prepare(cfg: TrainConfig, dist: Dist, summary: Summary) -> Inputs:
    """Data, tokenizer and starting model for the requested stage(s), all checked before training.
    Raises InputError (bad data line as file:line, missing model folder, vocab mismatch, empty or
    unusable candidate file, bad DeepSpeed config)."""
    try:
        return _prepare(cfg, dist, summary)
    except (DataError, FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from e


def _prepare(cfg: TrainConfig, dist: Dist, summary: Summary) -> Inputs:
    t0 = time.perf_counter()
    # --sampler vllm: its environment is checked before anything is written or trained.
    vllm = check_sampler(cfg.sampling(), dist) if cfg.stage in ("all", "sample", "eval") else None
    train, test = _read_data(cfg, dist)
    start = _from_gguf(_start_model(cfg), dist)  # a GGUF file: its cached Hugging Face folder
    tokenizer, n_params = _tokenizer(cfg, dist, train, start)
    check_model_dir(start)
    check_vocab(tokenizer, start)
    bind_prompt_format(tokenizer, cfg.prompt_format)  # every stage encodes prompts through this tokenizer
    if cfg.stage in ("sample", "aft", "eval"):
        check_trained_format(start, cfg.prompt_format)
    if cfg.qlora:
        check_qlora(dist.device)
    resolve_ds_config_path(cfg.deepspeed_config)
    groups = _candidates(cfg) if cfg.stage == "aft" else None
    eval_groups = None
    if cfg.eval_candidates and cfg.stage in ("all", "eval"):
        eval_groups = read_candidates(cfg.eval_candidates)
    what = [f"{len(train)} train examples"] if train else []
    what += [f"{len(test)} test examples"] if test else []
    what += [f"{len(groups)} candidate groups"] if groups else []
    what += [
        f"tokenizer {len(tokenizer)} tokens",
        f"model {start}" + (f" ({n_params / 1e6:.2f}M params, from scratch)" if n_params else ""),
    ]
    what += [f"sampler vllm {vllm} ({cfg.vllm_python})"] if vllm else []
    summary.add("setup", time.perf_counter() - t0, ", ".join(what))
    return Inputs(tokenizer, train, test, start, groups, eval_groups)


def _read_data(cfg: TrainConfig, dist: Dist) -> tuple[list[Example], list[Example]]:
    """(train examples, test examples) the stages need: the given files, or the embedded task written
    into the run folder."""
    run, stage = cfg.run_path, cfg.stage
    needs_train, needs_test = stage in ("all", "vft", "sample"), stage in ("all", "eval")
    train_path = Path(cfg.train_data) if cfg.train_data else None
    test_path = Path(cfg.test_data) if cfg.test_data else None
    if train_path is None and (needs_train or (needs_test and test_path is None)):
        data_dir = run / "data"
        # A fresh vft/all run writes the task; later stages (and --resume) keep the run's own copy, so
        # eval and sample see the data the run trained on even if the generator changed since.
        rewrite = not cfg.resume and stage in ("all", "vft")
        if dist.is_main and (rewrite or not (data_dir / "train.jsonl").is_file()):
            if cfg.task == "gsm_symbolic":  # train, validation, test, test_ood
                write_gsm_symbolic(
                    data_dir, cfg.synthetic_train, cfg.synthetic_test, cfg.seed, cfg.heldout_templates
                )
            else:
                write_default_task(
                    data_dir, cfg.synthetic_train, cfg.synthetic_test, cfg.seed, task=cfg.synthetic_task
                )
        _barrier()
        train_path, test_path = data_dir / "train.jsonl", test_path or data_dir / "test.jsonl"
    train = read_examples(train_path, cfg.data_format) if needs_train and train_path else []
    if cfg.label == "verified" and stage in ("all", "sample"):  # before VFT trains, not after
        bad = next((e for e in train[: cfg.sample_limit or None] if not is_checkable(e.question)), None)
        if bad is not None:
            raise not_checkable_error(f"{train_path}: question {bad.id!r}")
    if needs_test and test_path is None:
        raise ValueError("eval needs --test_data (the test split of --train_data's task)")
    test = read_examples(test_path, cfg.data_format) if needs_test and test_path else []
    return train, test


def _from_gguf(path: Path, dist: Dist) -> Path:
    """`resolve_model` on rank 0 first (it converts a GGUF file once; transformers saves on rank 0 only),
    then on the other ranks, which find the cached folder."""
    folder = resolve_model(path, print0) if dist.is_main else path
    _barrier()
    return folder if dist.is_main else resolve_model(path, lambda line: None)


def _start_model(cfg: TrainConfig) -> Path:
    """The model folder the stage starts from."""
    run, stage = cfg.run_path, cfg.stage
    if stage in ("all", "vft"):
        return Path(cfg.model) if cfg.model else run / "init"
    if stage in ("sample", "aft"):
        return Path(cfg.vft_model) if cfg.vft_model else run / "vft"
    # `aft-fast eval --model PATH` evaluates any HF folder; --eval_model (if set) takes precedence.
    chosen = cfg.eval_model or cfg.model
    if chosen:
        return Path(chosen)
    return next((run / s for s in ("aft", "vft") if (run / s).is_dir()), run / "aft")


def _tokenizer(
    cfg: TrainConfig, dist: Dist, train: list[Example], start: Path
) -> tuple[PreTrainedTokenizerBase, int]:
    """The run's tokenizer, and the parameter count of the model built here (0: none built). The
    embedded default is a tokenizer trained on the training texts and a fresh tiny Llama."""
    if not (cfg.stage in ("all", "vft") and not cfg.model):
        tok_dir = _from_gguf(Path(cfg.tokenizer), dist) if cfg.tokenizer else check_model_dir(start)
        return load_tokenizer(tok_dir), 0
    fresh, n_params = not cfg.resume, 0
    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else cfg.run_path / "tokenizer"
    if dist.is_main and not cfg.tokenizer and (fresh or not tok_dir.is_dir()):
        from aft_fast.data.tokenizer import train_tokenizer

        train_tokenizer([prompt_text(e.question) + e.reference for e in train], tok_dir)
    _barrier()
    tokenizer = load_tokenizer(tok_dir)
    if dist.is_main and (fresh or not start.is_dir()):
        n_params = create_default_model(tokenizer, start, cfg.seed)
    _barrier()
    return tokenizer, n_params


def _candidates(cfg: TrainConfig) -> list[CandidateGroup]:
    """The aft stage's candidate groups, relabelled by the run's rule and checked for what its mode needs."""
    groups = read_candidates(cfg.candidates_path)  # DataError names file:line; an empty file fails
    groups = relabel(groups, cfg.label)  # one sampled file serves both label rules
    if not any(g.candidates for g in groups):
        raise ValueError(f"{cfg.candidates_path}: no group has a candidate")
    if train_mode(cfg.mode).needs_ref_logp:
        missing = [g.id for g in groups if any(c.ref_logp is None for c in g.candidates)]
        if missing:
            raise ValueError(
                f"{cfg.candidates_path}: mode {cfg.mode} needs ref_logp on every candidate; group "
                f"{missing[0]!r} lacks it (sample with --mode={cfg.mode})"
            )
    return groups


def _evaluate(
    settings: EvalSettings,
    dist: Dist,
    tokenizer,
    test: list[Example],
    model_dir: Path,
    name: str,
    dtype: torch.dtype,
    summary: Summary,
    run_dir: Path,
    fixed: list[CandidateGroup] | None = None,
) -> Evaluation:
    """All metrics of one model (aft_fast.eval.evaluate); rank 0 writes predictions_<name>.jsonl,
    eval_<name>.json, test_candidates_<name>.jsonl and the score plot scores_<name>.png into `run_dir`."""
    t0 = time.perf_counter()
    sampling = settings.sampling
    model = load_replica(model_dir, dist.device, dtype)
    sampler = make_sampler(sampling, dist, tokenizer, model_dir, dtype, model)
    try:
        res = evaluate(
            model,
            tokenizer,
            test[: settings.limit or None],
            samples=settings.samples,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_new_tokens=sampling.max_new_tokens,
            batch_size=sampling.batch_size,
            max_length=sampling.max_length,
            seed=sampling.seed,
            fixed=fixed,
            progress=sampling.progress,
            sampler=sampler,
        )
    finally:
        sampler.close()
    del model
    _free()
    if dist.is_main:
        write_results(run_dir, name, res, model=str(model_dir))
        panels = [(f"{name}: own samples", *split_scores(res.groups, res.scored))] if settings.samples else []
        if res.fixed_groups is not None and res.fixed_scored is not None:
            panels.append((f"{name}: fixed set", *split_scores(res.fixed_groups, res.fixed_scored)))
        if panels:
            plot_score_distributions(panels, run_dir / f"scores_{name}.png", title=str(model_dir))
        by_form = form_scores(res.groups, res.scored) if settings.samples else []
        if by_form:
            path = run_dir / f"scores_by_form_{name}.png"
            plot_scores_by_form(by_form, FORMS, path, title=str(model_dir))
    values = {k: v for k, v in res.summary.items() if k.startswith("eval/") and v is not None}
    MetricsLogger(run_dir, name, tensorboard=False).log(0, values)
    summary.add(
        name,
        time.perf_counter() - t0,
        f"{summary_line(res.summary)} of {model_dir}",
        **{f"{name}/{k.removeprefix('eval/')}": v for k, v in values.items()},
        **{f"{name}/questions": res.summary["questions"]},
    )
    return res


def _plot_before_after(cfg: TrainConfig, before: Evaluation, after: Evaluation) -> None:
    """scores_vft_vs_aft.png: both models scoring the same chains (the fixed set, else VFT's own samples)."""
    if before.fixed_groups is not None and before.fixed_scored is not None:
        vft = split_scores(before.fixed_groups, before.fixed_scored)
    else:
        vft = split_scores(before.groups, before.scored)
    if after.fixed_groups is None or after.fixed_scored is None:
        return
    aft = split_scores(after.fixed_groups, after.fixed_scored)
    plot_score_distributions(
        [("after VFT", *vft), ("after AFT", *aft)],
        cfg.run_path / "scores_vft_vs_aft.png",
        title=f"positive vs negative test chains ({cfg.mode})",
    )


def _train_row(stage: str, r, summary: Summary) -> None:
    parts = [
        f"{r.steps} steps",
        f"loss {r.metrics.get('train/loss', float('nan')):.4f}",
        f"{r.tokens_per_sec:,.0f} tokens/s",
    ]
    m = r.metrics
    if "train/assess_acc" in m:
        parts.append(f"in-batch assessment accuracy {100 * m['train/assess_acc']:.1f}%")
    # What the constraint did (aft_fast/train/diagnostics.py), from the last log step.
    if "train/margin" in m:
        parts.append(f"margin s_p - s_n {m['train/margin']:.4f}")
    if "train/beta" in m:
        parts.append(f"beta {m['train/beta']:.4g}")
    if "train/neg_minus_boundary" in m:
        parts.append(
            f"negatives s_n - B {m['train/neg_minus_boundary']:.4f} "
            f"({100 * m['train/neg_below_boundary']:.0f}% below B)"
        )
    if "train/grad_ratio" in m:
        parts.append(f"|grad align| / |grad vft| {m['train/grad_ratio']:.3g}")
    keep = ("margin", "beta", "neg_minus_boundary", "neg_below_boundary", "grad_ratio", "score_spread")
    values = {f"{stage}/{k}": m[f"train/{k}"] for k in keep if f"train/{k}" in m}
    summary.add(stage, r.seconds, ", ".join(parts), **{f"{stage}/loss": m.get("train/loss", 0.0)}, **values)


def compare_line(cfg: TrainConfig, values: dict) -> str | None:
    """One line: greedy accuracy after VFT and after the aft stage, and the change (None unless both
    models were evaluated in this run)."""
    before, after = values.get("eval_vft/accuracy"), values.get("eval_aft/accuracy")
    if before is None or after is None:
        return None
    beta = f", beta {values['aft/beta']:.4g}" if "aft/beta" in values else ""
    delta = 100 * (after - before)
    word = "above" if delta > 0 else "below" if delta < 0 else "level with"
    return (
        f"AFT ({cfg.mode}{beta}, label {cfg.label}) vs VFT: greedy accuracy "
        f"{100 * before:.1f}% -> {100 * after:.1f}% ({delta:+.1f} points, {word} the VFT model)"
    )


def trust_line(values: dict) -> str | None:
    """How far the verdict of one run can be trusted: the binomial standard error of each greedy accuracy on
    this test set. The training's own seed-to-seed spread comes on top; only a comparison paired over seeds
    (benchmarks/reproduce.py) separates a mode's effect from both."""
    n = values.get("eval_vft/questions")
    before, after = values.get("eval_vft/accuracy"), values.get("eval_aft/accuracy")
    if not n or before is None or after is None:
        return None
    se = max(math.sqrt(p * (1 - p) / n) for p in (before, after))
    return (
        f"One seed on {n} test questions: each accuracy has a binomial standard error of ±{100 * se:.1f} "
        "points, and the training's seed-to-seed spread comes on top; benchmarks/reproduce.py pairs seeds "
        "to measure a mode's effect"
    )


def _sample_row(
    cfg: TrainConfig,
    dist: Dist,
    tok: PreTrainedTokenizerBase,
    train: list[Example],
    vft_dir: Path,
    dtype: torch.dtype,
    summary: Summary,
) -> None:
    """The sample stage (or, resuming --stage all, the candidate file it wrote) and its summary row."""
    out = cfg.candidates_path
    if cfg.resume and cfg.stage == "all" and out.is_file():
        s = group_stats(read_candidates(out), 0, 0.0)
        s.duplicates = 0
    else:
        s = run_sample(cfg.sample_settings(), dist, tok, train, vft_dir, out, dtype)
    _free()
    summary.add(
        "sample",
        s.seconds,
        f"{s.candidates} candidates for {s.questions} questions: "
        f"{s.positives} positive / {s.negatives} negative, both on {s.both} questions "
        f"({100 * s.both / max(s.questions, 1):.0f}%), {s.duplicates} duplicates dropped, "
        f"label {cfg.label}: {s.noise_text()} -> {out}",
        positives=s.positives,
        negatives=s.negatives,
        both=s.both,
        answer_positives=s.answer_positives,
        **({"false_step": s.false_step} if s.false_step is not None else {}),
    )


def _write_summary(cfg: TrainConfig, dist: Dist, summary: Summary) -> None:
    """The AFT-vs-VFT verdict printed, and summary.md / summary.json written by rank 0."""
    verdict = "\n".join(filter(None, [compare_line(cfg, summary.values), trust_line(summary.values)]))
    if verdict:
        print0(verdict)
    if dist.is_main:
        run_dir = cfg.run_path
        (run_dir / "summary.md").write_text(summary.table() + "\n" + (f"\n{verdict}\n" if verdict else ""))
        (run_dir / "summary.json").write_text(
            json.dumps({"rows": [r.__dict__ for r in summary.rows], "values": summary.values}, indent=1)
        )


def run(cfg: TrainConfig, dist: Dist) -> Summary:
    """Run cfg.stage ("all": every stage in order); returns the summary (rank 0 writes summary.md/json)."""
    summary = Summary()
    run_dir = cfg.run_path
    # One live run per folder; finished stages are replaced only with --overwrite (skipped with --resume).
    lock = guard(cfg, tuple(s for s in ("vft", "sample", "aft") if cfg.stage in ("all", s)), dist.is_main)
    hf_logging.disable_progress_bar()  # per-rank "Loading weights" bars; the stages draw their own
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    print0("resolved config:\n" + to_yaml(cfg))
    inputs = prepare(cfg, dist, summary)
    tok = inputs.tokenizer
    dtype = model_dtype(json.loads(resolve_ds_config_path(cfg.deepspeed_config).read_text()))
    stages = ALL if cfg.stage == "all" else (cfg.stage,)
    # --stage all samples from the VFT model it just trained; a single stage may start elsewhere.
    vft_dir = inputs.start_model if cfg.stage in ("sample", "aft") else cfg.stage_model_dir("vft")

    evaluating = cfg.eval_settings()

    def evaluate_model(model_dir: Path, name: str, fixed: list[CandidateGroup] | None) -> Evaluation:
        return _evaluate(evaluating, dist, tok, inputs.test, model_dir, name, dtype, summary, run_dir, fixed)

    evals: dict[str, Evaluation] = {}  # eval_vft's result, for eval_aft's before/after comparison
    for stage in stages:
        if stage == "vft":
            if cfg.resume and _finished(vft_dir, cfg.vft_steps):
                check_trained_format(vft_dir, cfg.prompt_format)  # sample and aft will prompt it
                summary.add("vft", 0.0, f"done earlier ({vft_dir})")
                continue
            _train_row("vft", run_vft(cfg, dist, tok, inputs.train, inputs.start_model), summary)
        elif stage == "sample":
            _sample_row(cfg, dist, tok, inputs.train, vft_dir, dtype, summary)
        elif stage == "aft":
            groups = inputs.groups if inputs.groups is not None else read_candidates(cfg.candidates_path)
            aft_dir = cfg.stage_model_dir("aft")
            if cfg.resume and _finished(aft_dir, cfg.aft_steps):
                summary.add("aft", 0.0, f"done earlier ({aft_dir})")
                continue
            _train_row("aft", run_aft(cfg, dist, tok, groups, vft_dir), summary)
        elif stage == "eval":
            evaluate_model(inputs.start_model, "eval", inputs.eval_groups)
        else:  # eval_vft / eval_aft inside --stage all
            which = stage.split("_")[1]
            # AFT scores the chains VFT sampled on the test questions (unless a fixed set is given), so
            # their assessment accuracies compare the two models on the same chains.
            fixed = inputs.eval_groups
            if which == "aft" and fixed is None and evals.get("vft") and evaluating.samples:
                fixed = evals["vft"].groups
            evals[which] = evaluate_model(cfg.stage_model_dir(which), stage, fixed)
            if which == "aft" and "vft" in evals and dist.is_main:
                _plot_before_after(cfg, evals["vft"], evals["aft"])
        _free()

    _write_summary(cfg, dist, summary)
    if lock is not None:
        lock.release()
    return summary
