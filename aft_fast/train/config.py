"""TrainConfig: one typed dataclass with its defaults in code, overridden by a YAML file and `--key=value`.

    deepspeed train.py --config configs/default.yaml --stage=all --vft_steps=600 --resume

Precedence: defaults < `--config FILE` < command-line flags. Unknown keys (in the file or on the
command line) fail with the list of valid ones. `--help` prints every option with its default.

Every field belongs to one section (SECTIONS: run, data, model, adapters, optimizer, vft, sample, aft, eval,
engine), declared beside it. The keys stay flat, so YAML files and flags name a field alone; the sections
group the checks and `--help`, give each training stage its `Schedule` and the sample and eval stages their
settings (`SampleSettings`, `EvalSettings`, sharing one `Sampling`), and say what a resumed stage must share
with the run that wrote its checkpoint (RESUME_SECTIONS).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from aft_fast.constants import BACKENDS, TRAIN_MODES, train_mode
from aft_fast.data.collate import LAYOUTS
from aft_fast.data.prompts import PROMPT_FORMATS
from aft_fast.eval.sampler import SAMPLERS
from aft_fast.eval.vllm_sampler import VLLMOptions
from aft_fast.options import LossOptions

STAGES = ("vft", "sample", "aft", "eval", "all")


class InputError(ValueError):
    """A bad config value, data file, model folder or candidate file: reported without a traceback,
    before any training starts."""


def _opt(section: str, default: Any, help: str) -> Any:
    """A config field: its section (SECTIONS), default and help line."""
    return field(default=default, metadata={"section": section, "help": help})


@dataclass
class TrainConfig:
    # --- run: how the run is driven: where its files go, its seed, resuming, checkpoints and logs -----------
    stage: str = _opt("run", "all", "vft | sample | aft | eval | all (vft, eval, sample, aft, eval)")
    run_dir: str = _opt(
        "run",
        "runs/default",
        "every output goes here: tokenizer/, vft/, candidates.jsonl, aft/, "
        "checkpoints/, metrics.jsonl, tensorboard/, summary.md",
    )
    seed: int = _opt("run", 0, "seed of model init, data order and sampling")
    resume: bool = _opt(
        "run", False, "skip finished stages and resume the interrupted one from its latest checkpoint"
    )
    overwrite: bool = _opt(
        "run",
        False,
        "replace the finished stages already in run_dir (without it, or --resume, a run over them stops)",
    )
    save_every: int = _opt(
        "run", 200, "DeepSpeed checkpoint every N optimizer steps (0: only the final HF folder)"
    )
    keep_checkpoints: int = _opt("run", 2, "DeepSpeed checkpoints kept per stage (older ones are deleted)")
    log_every: int = _opt("run", 10, "optimizer steps between metric lines (metrics.jsonl, TensorBoard)")
    tensorboard: bool = _opt("run", True, "write TensorBoard events under <run_dir>/tensorboard")
    progress: bool = _opt("run", True, "tqdm progress bars on rank 0")
    merge_adapters: bool = _opt(
        "run",
        False,
        "with lora_r: also write <run_dir>/<stage>_merged, base and adapters merged (a plain HF folder)",
    )
    # --- data: what the stages read: files or a generated task, and how a question is shown to the model ----
    train_data: str = _opt(
        "data", "", "training file (GSM8K / AQuA-RAT / ECQA); empty: the embedded synthetic task"
    )
    test_data: str = _opt("data", "", "test file for eval; empty: the embedded synthetic task's test split")
    data_format: str = _opt(
        "data", "auto", "gsm8k | aqua | ecqa | auto (decided from the first record's fields)"
    )
    task: str = _opt(
        "data",
        "embedded",
        "the task written into <run_dir>/data when train_data is empty: embedded (the synthetic task, "
        "synthetic_task) | gsm_symbolic (reasoning-gym's GSM8K templates, needs the real extra: "
        "train.jsonl, validation.jsonl and test.jsonl from the same templates, test_ood.jsonl from "
        "heldout_templates held out of them; synthetic_train / synthetic_test problems)",
    )
    heldout_templates: int = _opt(
        "data", 15, "gsm_symbolic: templates only test_ood.jsonl draws from (of 85)"
    )
    synthetic_train: int = _opt("data", 8000, "the generated task (task): number of training problems")
    synthetic_test: int = _opt(
        "data",
        200,
        "the generated task (task): number of test problems (gsm_symbolic: also of validation, test_ood)",
    )
    synthetic_task: str = _opt(
        "data",
        "forms",
        "embedded task version: forms (three valid solution strategies, references drawn 60/30/10 from "
        "them) | v1 (the first generator: one running-total chain per problem, for old runs)",
    )
    max_length: int = _opt("data", 256, "tokens per row ([prompt | chain]); longer chains are cut at the end")
    prompt_format: str = _opt(
        "data",
        "plain",
        "how every stage shows a question to the model: plain (the paper's 'Question: ...\\nAnswer:\\n') | "
        "chat (the tokenizer's chat template, the question as the user turn; for instruct models)",
    )
    # --- model: which model each stage starts from, and its tokenizer ---------------------------------------
    model: str = _opt(
        "model",
        "",
        "Hugging Face model folder to start VFT from; empty: the embedded tiny Llama, "
        "built from scratch with a tokenizer trained on the training data",
    )
    tokenizer: str = _opt("model", "", "tokenizer folder; empty: the model folder's (or the trained one)")
    vft_model: str = _opt("model", "", "model that sample and aft start from; empty: <run_dir>/vft")
    eval_model: str = _opt(
        "model",
        "",
        "model to evaluate with --stage eval; empty: --model, else <run_dir>/aft, else <run_dir>/vft",
    )
    # --- adapters: PEFT LoRA: what trains in vft and aft (full fine-tuning when lora_r is 0) ----------------
    lora_r: int = _opt(
        "adapters",
        0,
        "LoRA rank: > 0 trains PEFT LoRA adapters on a frozen base in vft and aft (their outputs are PEFT "
        "adapter folders; aft's base is the VFT model, adapters merged); 0: full fine-tuning",
    )
    lora_alpha: float = _opt(
        "adapters", 16.0, "LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)"
    )
    lora_dropout: float = _opt("adapters", 0.0, "dropout on the LoRA input")
    lora_target_modules: str = _opt(
        "adapters",
        "",
        "comma-separated module names (or name suffixes, e.g. q_proj,v_proj) that get adapters; empty: every "
        "linear layer except the LM head (PEFT's all-linear). The head and an embedding tied to it are "
        "refused",
    )
    qlora: bool = _opt("adapters", False, "with lora_r: a 4-bit NF4 base (bitsandbytes; CUDA only)")
    # --- optimizer: AdamW and its schedule, shared by vft and aft -------------------------------------------
    warmup_ratio: float = _opt(
        "optimizer", 0.1, "fraction of a stage's steps spent warming up the learning rate"
    )
    min_lr_ratio: float = _opt("optimizer", 0.1, "cosine decay ends at min_lr_ratio * peak")
    weight_decay: float = _opt("optimizer", 0.1, "AdamW weight decay")
    grad_clip: float = _opt("optimizer", 1.0, "gradient norm clipping (fills the DeepSpeed config's 'auto')")
    # --- vft: the vft stage's steps and batch ---------------------------------------------------------------
    vft_steps: int = _opt("vft", 450, "VFT optimizer steps")
    vft_batch_size: int = _opt(
        "vft", 32, "VFT examples per optimizer step (all processes and accumulation together)"
    )
    vft_micro_batch_size: int = _opt(
        "vft", 16, "VFT examples per process per forward; accumulation = batch / (micro * processes)"
    )
    vft_lr: float = _opt("vft", 2e-3, "VFT peak learning rate (AdamW, linear warm-up, cosine decay)")
    # --- sample: the sample stage: k chains per training question, labelled ---------------------------------
    num_samples: int = _opt("sample", 6, "candidates sampled per training question (k)")
    temperature: float = _opt("sample", 1.0, "sampling temperature")
    top_p: float = _opt("sample", 1.0, "nucleus sampling threshold (1.0: off)")
    max_new_tokens: int = _opt("sample", 128, "generation limit for sampling and eval")
    sample_limit: int = _opt("sample", 0, "sample only the first N training questions (0: all)")
    gen_batch_size: int = _opt("sample", 32, "questions per generate call (sampling and eval)")
    label: str = _opt(
        "sample",
        "answer",
        "how sample labels a candidate: answer (positive when the final answer equals the gold, the "
        "paper's rule) | verified (answer right and every step of the chain checked right: the embedded "
        "task's checker, or the step checker on GSM8K-style questions; not for multiple choice)",
    )
    candidates: str = _opt(
        "sample", "", "candidate JSONL that aft reads (sample writes); empty: <run_dir>/candidates.jsonl"
    )
    sampler: str = _opt(
        "sample",
        "hf",
        "where sample and eval get their chains: hf (the model's own Hugging Face generate) | vllm (a vLLM "
        "engine per process, run by vllm_python; the same sampling parameters, labels and scores)",
    )
    vllm_python: str = _opt(
        "sample",
        VLLMOptions.python,
        "sampler vllm: the Python that has vLLM, in an environment of its own (vLLM pins an older "
        "transformers); `make vllm-env` creates the default, with vLLM's CPU build",
    )
    vllm_gpu_memory_utilization: float = _opt(
        "sample",
        VLLMOptions.gpu_memory_utilization,
        "sampler vllm: fraction of the GPU the engine may take (the stage has the GPU to itself; capped at "
        "what is free beside the model that scores)",
    )
    vllm_kv_cache_gb: float = _opt(
        "sample",
        VLLMOptions.kv_cache_gb,
        "sampler vllm: KV cache in GiB; 0: what vllm_gpu_memory_utilization leaves on GPUs, 1 GiB on the CPU",
    )
    vllm_tensor_parallel_size: int = _opt(
        "sample",
        VLLMOptions.tensor_parallel_size,
        "sampler vllm: GPUs per engine (tensor parallel); above 1 only in a run of one process",
    )
    # --- aft: the aft stage: steps, batch and the loss (docs/design.md section 2) ---------------------------
    aft_steps: int = _opt("aft", 100, "AFT optimizer steps")
    aft_batch_size: int = _opt("aft", 16, "AFT groups (questions) per optimizer step")
    aft_micro_batch_size: int = _opt("aft", 4, "AFT groups per process per forward")
    aft_lr: float = _opt("aft", 2e-4, "AFT peak learning rate")
    aft_optimizer: str = _opt(
        "aft",
        "fresh",
        "the AdamW state aft starts from: fresh (new moments) | vft (the VFT stage's final moments and step "
        "count carried over, with aft's own lr schedule and weight decay: the vft stage then also writes its "
        "final DeepSpeed checkpoint, which aft reads from checkpoints/vft in the folder holding vft_model; "
        "full fine-tuning and the same number of processes)",
    )
    mode: str = _opt(
        "aft",
        LossOptions.mode,
        "what the aft stage trains: " + " | ".join(TRAIN_MODES) + " (vft: continued VFT on the reference "
        "chains, the control; rft: maximum likelihood on the positive candidates plus the references; the "
        "rest: the AFT loss family and its baselines)",
    )
    beta: float = _opt(
        "aft",
        LossOptions.beta,
        "boundary margin of bcl and +bc modes: B = min_p s_p - beta (per-token log-prob)",
    )
    beta_from_spread: float = _opt(
        "aft",
        0.0,
        "> 0: set beta to this multiple of the VFT model's own score spread, the standard deviation of the "
        "training candidates' scores s_c around their question's mean (pooled over questions with 2 or more "
        "candidates), measured before the aft stage trains; the value used is printed and logged as "
        "train/beta. 0: use --beta as given",
    )
    w_vft: float = _opt("aft", LossOptions.w_vft, "weight of the reference chains' likelihood in AFT")
    w_align: float = _opt("aft", LossOptions.w_align, "weight of the alignment loss")
    dpo_beta: float = _opt("aft", LossOptions.dpo_beta, "DPO inverse temperature")
    pro_tau: float = _opt("aft", LossOptions.pro_tau, "PRO temperature")
    # --- eval: evaluation on the test split -----------------------------------------------------------------
    eval_limit: int = _opt("eval", 0, "evaluate only the first N test questions (0: all)")
    eval_samples: int = _opt(
        "eval",
        6,
        "eval: samples per test question (temperature, top_p as in sampling) for self-consistency, "
        "re-ranking and assessment accuracy; 0: greedy accuracy and perplexity only",
    )
    eval_candidates: str = _opt(
        "eval",
        "",
        "eval: a fixed candidate JSONL (e.g. <run_dir>/test_candidates_eval_vft.jsonl) that every evaluated "
        "model scores, for assessment accuracy on the same chains; empty: --stage all scores eval_vft's "
        "test samples with the AFT model",
    )
    # --- engine: how the computation runs, never what it computes: changing it keeps a run resumable --------
    deepspeed_config: str = _opt(
        "engine",
        "auto",
        "DeepSpeed JSON; auto: configs/ds_zero3_gpu_bf16.json on CUDA, configs/ds_zero3_cpu_fp32.json on CPU",
    )
    dist_backend: str = _opt("engine", "auto", "torch.distributed backend; auto: nccl on CUDA, gloo on CPU")
    gradient_checkpointing: bool = _opt(
        "engine", False, "recompute activations in backward (less memory, ~30% slower)"
    )
    loss_backend: str = _opt("engine", "auto", "fused loss backend: " + " | ".join(BACKENDS))
    layout: str = _opt(
        "engine",
        "shared",
        "AFT batch layout (docs/design.md section 4): shared (a group's prompt encoded once, members "
        "packed after it) | packed (one [prompt | member] sequence each, no padding) | padded (one padded "
        "row each)",
    )
    max_tokens_per_row: int = _opt(
        "engine",
        0,
        "token budget of a packed/shared row (at least max_length); 0: auto (the longest sequence with a "
        "dense SDPA mask, whose cost grows with the square of the row; the whole micro batch otherwise)",
    )

    def __post_init__(self) -> None:
        check(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section(self, name: str) -> dict[str, Any]:
        """The fields of one section (SECTIONS) and their values."""
        return {k: getattr(self, k) for k in SECTIONS[name]}

    def schedule(self, stage: str) -> Schedule:
        """The optimizer schedule of a training stage (vft or aft): its section and the optimizer's."""
        own = {k.removeprefix(f"{stage}_"): v for k, v in self.section(stage).items()}
        return Schedule(
            steps=own["steps"],
            batch_size=own["batch_size"],
            micro_batch_size=own["micro_batch_size"],
            lr=own["lr"],
            **self.section("optimizer"),
        )

    def sampling(self) -> Sampling:
        """How the sample and eval stages draw and score chains: the sample section's sampler, its vLLM
        engine (the vllm_* keys) and sampling parameters, with the run and data keys they need."""
        own = self.section("sample")
        return Sampling(
            sampler=own["sampler"],
            vllm=VLLMOptions(**{k.removeprefix("vllm_"): v for k, v in own.items() if k.startswith("vllm_")}),
            temperature=own["temperature"],
            top_p=own["top_p"],
            max_new_tokens=own["max_new_tokens"],
            batch_size=own["gen_batch_size"],
            seed=self.seed,
            max_length=self.max_length,
            progress=self.progress,
        )

    def sample_settings(self) -> SampleSettings:
        """What the sample stage reads (its output path, `candidates_path`, aside)."""
        return SampleSettings(
            sampling=self.sampling(),
            num_samples=self.num_samples,
            limit=self.sample_limit,
            label=self.label,
            ref_logp=train_mode(self.mode).needs_ref_logp,
            task=self._generated_task(),
        )

    def _generated_task(self) -> str | None:
        """The generated task's name, for the candidate file's metadata; None when a data file is read."""
        if self.train_data:
            return None
        return self.synthetic_task if self.task == "embedded" else self.task

    def eval_settings(self) -> EvalSettings:
        """What the eval stage reads (the fixed candidate set of eval_candidates is read up front)."""
        own = {k.removeprefix("eval_"): v for k, v in self.section("eval").items()}
        return EvalSettings(sampling=self.sampling(), limit=own["limit"], samples=own["samples"])

    # Paths derived from run_dir, so every stage finds the others' outputs.
    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    def stage_model_dir(self, stage: str) -> Path:
        return self.run_path / stage

    def vft_checkpoints(self) -> Path:
        """The VFT stage's DeepSpeed checkpoints: checkpoints/vft in the run folder that holds vft_model."""
        model = Path(self.vft_model) if self.vft_model else self.stage_model_dir("vft")
        return model.parent / "checkpoints" / "vft"

    @property
    def candidates_path(self) -> Path:
        return Path(self.candidates) if self.candidates else self.run_path / "candidates.jsonl"


# The sections, in order: section name -> its fields (declared once, by `_opt` above).
def _sections() -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for f in dataclasses.fields(TrainConfig):
        out[f.metadata["section"]] = (*out.get(f.metadata["section"], ()), f.name)
    return out


SECTIONS = _sections()


# What a training stage's checkpoint must share with the run resuming it: the stage's own section (steps,
# batch, lr; the loss for aft), the optimizer, the adapters, and these keys of the run and data sections
# (the data order, and the rows trained on). The engine section may change between the two.
RESUME_SECTIONS = ("optimizer", "adapters")
RESUME_KEYS = ("seed", "max_length", "prompt_format")


@dataclass(frozen=True)
class Schedule:
    """What a training stage (vft, aft) steps by: the loop and the DeepSpeed engine read only this."""

    steps: int
    batch_size: int  # examples (vft) or groups (aft) per optimizer step, all processes together
    micro_batch_size: int  # per process per forward
    lr: float  # peak: linear warm-up, cosine decay to min_lr_ratio * lr
    warmup_ratio: float
    min_lr_ratio: float
    weight_decay: float
    grad_clip: float


@dataclass(frozen=True)
class Sampling:
    """How chains are drawn and scored, in the sample stage and the eval stage alike: the sampler and its
    engine read only this."""

    sampler: str  # hf | vllm (SAMPLERS)
    vllm: VLLMOptions  # sampler vllm: the engine's settings (the vllm_* keys)
    temperature: float
    top_p: float
    max_new_tokens: int
    batch_size: int  # questions per generate call, groups per scoring call (gen_batch_size)
    seed: int  # batch i samples with batch_seed(seed, i); the vLLM engine's seed
    max_length: int  # tokens per scored row ([prompt | chain])
    progress: bool


@dataclass(frozen=True)
class SampleSettings:
    """What the sample stage reads: num_samples chains for each of the first `limit` training questions
    (0: all), labelled by `label`."""

    sampling: Sampling
    num_samples: int
    limit: int
    label: str  # answer | verified
    ref_logp: bool  # the aft mode trains against a reference: store each candidate's log-prob (ref_logp)
    task: str | None  # the generated task's version, for the candidate file's metadata (None: a data file)


@dataclass(frozen=True)
class EvalSettings:
    """What the eval stage reads: the first `limit` test questions (0: all), `samples` sampled chains each
    (0: greedy accuracy and perplexity only)."""

    sampling: Sampling
    limit: int
    samples: int


def _choice(name: str, value: Any, choices: typing.Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise InputError(f"{name}: {value!r} is not one of {', '.join(choices)}")


def _at_least(cfg: TrainConfig, low: int, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < low:
            raise InputError(f"{name}: must be at least {low}, got {getattr(cfg, name)}")


def _check_run(cfg: TrainConfig) -> None:
    _choice("stage", cfg.stage, STAGES)
    if cfg.resume and cfg.overwrite:
        raise InputError("resume and overwrite: give one of them (continue the run, or replace it)")
    _at_least(cfg, 1, "log_every", "keep_checkpoints")
    _at_least(cfg, 0, "save_every")


def _check_data(cfg: TrainConfig) -> None:
    _choice("data_format", cfg.data_format, ("auto", "gsm8k", "aqua", "ecqa"))
    _choice("synthetic_task", cfg.synthetic_task, ("forms", "v1"))
    _choice("task", cfg.task, ("embedded", "gsm_symbolic"))
    _choice("prompt_format", cfg.prompt_format, PROMPT_FORMATS)
    _at_least(cfg, 1, "max_length", "synthetic_train", "synthetic_test", "heldout_templates")


def _check_adapters(cfg: TrainConfig) -> None:
    if cfg.lora_r < 0:
        raise InputError(f"lora_r: must be >= 0 (0: full fine-tuning), got {cfg.lora_r}")
    if cfg.lora_r:
        if cfg.lora_alpha <= 0:
            raise InputError(f"lora_alpha: must be > 0, got {cfg.lora_alpha}")
        if not 0 <= cfg.lora_dropout < 1:
            raise InputError(f"lora_dropout: must lie in [0, 1), got {cfg.lora_dropout}")
    for name in ("merge_adapters", "qlora"):
        if getattr(cfg, name) and not cfg.lora_r:
            raise InputError(f"{name}: needs adapters (lora_r > 0)")


def _check_optimizer(cfg: TrainConfig) -> None:
    if not 0 <= cfg.warmup_ratio < 1 or not 0 <= cfg.min_lr_ratio <= 1:
        raise InputError("warmup_ratio must lie in [0, 1) and min_lr_ratio in [0, 1]")


def _check_vft(cfg: TrainConfig) -> None:
    _at_least(cfg, 1, "vft_steps", "vft_batch_size", "vft_micro_batch_size")


def _check_sample(cfg: TrainConfig) -> None:
    _at_least(cfg, 1, "num_samples", "max_new_tokens", "gen_batch_size")
    _at_least(cfg, 0, "sample_limit")
    if cfg.temperature <= 0 or not 0 < cfg.top_p <= 1:
        raise InputError("temperature must be > 0 and top_p in (0, 1]")
    _choice("label", cfg.label, ("answer", "verified"))
    _choice("sampler", cfg.sampler, SAMPLERS)
    if not 0 < cfg.vllm_gpu_memory_utilization <= 1:
        raise InputError(
            f"vllm_gpu_memory_utilization: must lie in (0, 1], got {cfg.vllm_gpu_memory_utilization}"
        )
    if cfg.vllm_kv_cache_gb < 0:
        raise InputError(f"vllm_kv_cache_gb: must be >= 0 (0: auto), got {cfg.vllm_kv_cache_gb}")
    _at_least(cfg, 1, "vllm_tensor_parallel_size")


def _check_aft(cfg: TrainConfig) -> None:
    _at_least(cfg, 1, "aft_steps", "aft_batch_size", "aft_micro_batch_size")
    _choice("mode", cfg.mode, TRAIN_MODES)
    try:  # the loss options, checked where they are declared
        LossOptions.from_config(cfg, mode=TRAIN_MODES[cfg.mode].loss)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if cfg.beta_from_spread < 0:
        raise InputError(f"beta_from_spread: must be >= 0 (0: off), got {cfg.beta_from_spread}")
    _choice("aft_optimizer", cfg.aft_optimizer, ("fresh", "vft"))
    if cfg.aft_optimizer == "vft" and cfg.lora_r:
        raise InputError(
            "aft_optimizer: vft carries the moments of full fine-tuning; with lora_r the aft stage trains "
            "new adapters on the merged VFT model, so use fresh"
        )


def _check_eval(cfg: TrainConfig) -> None:
    _at_least(cfg, 0, "eval_limit", "eval_samples")


def _check_engine(cfg: TrainConfig) -> None:
    _choice("loss_backend", cfg.loss_backend, BACKENDS)
    _choice("layout", cfg.layout, LAYOUTS)
    if cfg.max_tokens_per_row != 0 and cfg.max_tokens_per_row < cfg.max_length:
        raise InputError(
            f"max_tokens_per_row: {cfg.max_tokens_per_row} cannot hold a [prompt | chain] of max_length "
            f"{cfg.max_length}; use 0 (auto) or at least max_length"
        )


_CHECKS = {
    "run": _check_run,
    "data": _check_data,
    "model": lambda cfg: None,  # paths: checked when a stage opens them
    "adapters": _check_adapters,
    "optimizer": _check_optimizer,
    "vft": _check_vft,
    "sample": _check_sample,
    "aft": _check_aft,
    "eval": _check_eval,
    "engine": _check_engine,
}


def check(cfg: TrainConfig) -> None:
    """Value checks that need no files (files are checked when a stage opens them), section by section."""
    for name in SECTIONS:
        _CHECKS[name](cfg)


# ---------------------------------------------------------------------------------------------------------
# Parsing: YAML file + --key=value flags, typed by the dataclass annotations.

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _field_type(name: str) -> type:
    hints = typing.get_type_hints(TrainConfig)
    t = hints[name]
    if isinstance(t, types.UnionType):  # "str | None" style: take the first concrete type
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def _parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _coerce(name: str, value: Any, source: str) -> Any:
    t = _field_type(name)
    try:
        if t is bool:
            return _parse_bool(value)
        if t is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if t is str and not isinstance(value, str):
            raise ValueError
        return t(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise InputError(f"{source}: {name} expects {t.__name__}, got {value!r}") from None


def _unknown(keys: typing.Iterable[str], source: str) -> None:
    bad = sorted(set(keys) - set(_FIELDS))
    if bad:
        raise InputError(
            f"{source}: unknown config key(s) {', '.join(bad)}; valid keys: {', '.join(_FIELDS)}"
        )


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    _unknown(data, str(path))
    return {k: _coerce(k, v, str(path)) for k, v in data.items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=Path(sys.argv[0]).name or "train.py",
        formatter_class=argparse.HelpFormatter,
        description="AFT training pipeline (arXiv 2309.02144) on DeepSpeed ZeRO-3. Precedence: defaults < "
        "--config FILE < flags. Booleans take --flag, --flag=true or --flag=false.",
    )
    p.add_argument("--config", default=None, help="YAML file of config keys (see configs/default.yaml)")
    # The DeepSpeed launcher appends --local_rank; LOCAL_RANK in the environment carries the same.
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    groups = {name: p.add_argument_group(f"{name} section") for name in SECTIONS}  # --help by section
    for name, f in _FIELDS.items():
        t = _field_type(name)
        help_text = f"{f.metadata['help']} (default: {f.default!r})"
        kw: dict[str, Any] = dict(default=None, help=help_text.replace("%", "%%"))  # argparse formats %
        if t is bool:
            kw.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
        else:
            kw.update(type=lambda v, n=name: _coerce(n, v, "command line"), metavar=t.__name__.upper())
        groups[f.metadata["section"]].add_argument(f"--{name}", **kw)
    return p


def _parser_error(parser: argparse.ArgumentParser, message: str) -> typing.NoReturn:
    flags = [a for a in message.split() if a.startswith("--")]
    if message.startswith("unrecognized arguments") and flags:
        message += f"; valid keys: {', '.join(_FIELDS)}"
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def load_config(argv: list[str] | None = None, **overrides: Any) -> TrainConfig:
    """Defaults < `--config` YAML < flags in `argv` < keyword `overrides` (for programmatic use)."""
    parser = build_parser()
    parser.error = lambda message: _parser_error(parser, message)  # type: ignore[method-assign]
    args = parser.parse_args(argv if argv is not None else [])
    values: dict[str, Any] = {}
    if args.config:
        values.update(load_yaml(args.config))
    values.update({k: v for k, v in vars(args).items() if k in _FIELDS and v is not None})
    _unknown(overrides, "overrides")
    values.update(overrides)
    return TrainConfig(**values)


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
