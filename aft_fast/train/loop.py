"""The training loop shared by VFT and AFT: ZeRO-3 engine, data-parallel step plan, metrics, resume.

Data order is a pure function of (seed, step): step s of epoch e takes a slice of the epoch's
permutation and splits it into world_size x grad_accum micro batches, micro batch k = accum * world + rank.
So 1 process with accumulation 2 and 2 processes without accumulation train on the same micro batches
(the same losses and gradients), and a resumed run continues with exactly the batches it would have seen.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import torch
from transformers import PreTrainedTokenizerBase

from aft_fast.constants import TrainMode
from aft_fast.data.batch import Batch, Encoded
from aft_fast.data.collate import collate
from aft_fast.models import adapters, attention
from aft_fast.models.attention import AttentionPlan
from aft_fast.models.folders import save_hf_folder
from aft_fast.models.forward import AFTModel
from aft_fast.models.loading import load_partitioned
from aft_fast.options import LossOptions
from aft_fast.train import checkpoint
from aft_fast.train.config import RESUME_KEYS, RESUME_SECTIONS, SECTIONS, InputError, Schedule, TrainConfig
from aft_fast.train.diagnostics import gradient_norms, pair_stats
from aft_fast.train.engine import (
    Dist,
    build_engine,
    consolidated_state_dict,
    ds_config,
    grad_accum_steps,
    model_dtype,
)
from aft_fast.train.logging import MetricsLogger, print0, progress

KILL_ENV = "AFT_FAST_KILL_AT"  # "<stage>:<step>": tests use it to SIGKILL every rank after that step


def check_resumable(saved: dict, cfg: TrainConfig, stage: str, world_size: int) -> None:
    """A checkpoint continues only the run that wrote it: the same stage section, optimizer, adapters,
    data order and rows (config.RESUME_SECTIONS, RESUME_KEYS), and process count (ZeRO-3 shards are per
    rank). Anything else would resume a different run silently."""
    keys = [k for name in (stage, *RESUME_SECTIONS) for k in SECTIONS[name]] + list(RESUME_KEYS)
    diff = [
        f"{k}: {saved['config'].get(k)!r} -> {getattr(cfg, k)!r}"
        for k in keys
        if saved["config"].get(k) != getattr(cfg, k)
    ]
    if saved.get("world_size") != world_size:
        diff.append(f"processes: {saved.get('world_size')} -> {world_size}")
    if diff:
        raise InputError(
            f"cannot resume {stage} from step {saved['step']}: the run differs ({'; '.join(diff)}); "
            "restore those settings or start afresh without --resume"
        )


class StepPlan:
    """Which items rank `rank` trains on in accumulation step `accum` of optimizer step `step`."""

    def __init__(self, n_items: int, micro_batch: int, world_size: int, grad_accum: int, seed: int):
        self.micro, self.world, self.accum = micro_batch, world_size, grad_accum
        self.per_step = micro_batch * world_size * grad_accum
        if n_items < self.per_step:
            raise InputError(
                f"{n_items} training items cannot fill one batch of {self.per_step}; lower the batch size"
            )
        self.n, self.seed = n_items, seed
        self.steps_per_epoch = n_items // self.per_step  # the ragged tail of an epoch is skipped
        self._cache: tuple[int, torch.Tensor] | None = None

    def _perm(self, epoch: int) -> torch.Tensor:
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = (epoch, torch.randperm(self.n, generator=g))
        return self._cache[1]

    def micro_batch(self, step: int, accum: int, rank: int) -> list[int]:
        epoch, s = divmod(step, self.steps_per_epoch)
        start = s * self.per_step + (accum * self.world + rank) * self.micro
        return self._perm(epoch)[start : start + self.micro].tolist()


@dataclass
class StageResult:
    steps: int
    seconds: float
    tokens_per_sec: float
    metrics: dict[str, float] = field(default_factory=dict)


class _Meter:
    """Sums over micro batches (and, at `reduce`, over ranks) of the logged quantities.

    Besides the losses: the mean margin s_i - s_j over valid pairs, the mean distance s_n - B of the
    negatives to the boundary and the fraction below it (modes with a boundary), and on log steps the
    norms of the alignment and VFT parts of the gradient on the final hidden states
    (aft_fast/train/diagnostics.py)."""

    NAMES = (
        "loss",
        "vft_loss",
        "align_loss",
        "micro",
        "tokens",
        "pos_sum",
        "pos_n",
        "neg_sum",
        "neg_n",
        "pairs_right",
        "pairs",
        "margin_sum",
        "gap_n",
        "gap_sum",
        "below",
        "grad_align",
        "grad_vft",
        "grad_n",
    )

    def __init__(self, beta: float | None = None):
        """beta: the loss's boundary margin (None: the mode has no boundary, so no distance to B)."""
        self.sums = torch.zeros(len(self.NAMES), dtype=torch.float64)
        self.start = time.perf_counter()
        self.beta = beta

    def add_gradients(self, align: float, vft: float) -> None:
        for name, value in (("grad_align", align), ("grad_vft", vft), ("grad_n", 1.0)):
            self.sums[self.NAMES.index(name)] += value

    def add(self, batch: Batch, out: dict[str, torch.Tensor]) -> None:
        st = pair_stats(out["scores"], batch.group, batch.label, batch.is_reference, self.beta)
        vals = [
            out["loss"].item(),
            out["vft_loss"].item(),
            out["align_loss"].item(),
            1.0,
            batch.num_tokens,
            st.top_sum,  # a group's top candidates ("pos"); those under another ("neg")
            st.tops,
            st.neg_sum,
            st.negatives,
            st.right,
            st.pairs,
            st.margin_sum,
            st.negatives if self.beta is not None else 0,
            st.neg_gap_sum,
            st.below,
            0.0,
            0.0,
            0.0,
        ]
        self.sums += torch.tensor(vals, dtype=torch.float64)

    def reduce(self, lr: float, device: torch.device) -> dict[str, float]:
        """Collective: global means since the last call (reduced on `device`: NCCL takes no CPU tensors)."""
        sums = self.sums.to(device)
        if deepspeed.comm.get_world_size() > 1:
            deepspeed.comm.all_reduce(sums)
        s = dict(zip(self.NAMES, sums.tolist(), strict=True))
        elapsed = time.perf_counter() - self.start
        self.sums.zero_()
        self.start = time.perf_counter()
        m = {
            "train/loss": s["loss"] / s["micro"],
            "train/vft_loss": s["vft_loss"] / s["micro"],
            "train/align_loss": s["align_loss"] / s["micro"],
            "train/lr": lr,
            "train/tokens_per_sec": s["tokens"] / max(elapsed, 1e-9),
        }
        if s["pos_n"]:
            m["train/pos_score"] = s["pos_sum"] / s["pos_n"]
        if s["neg_n"]:
            m["train/neg_score"] = s["neg_sum"] / s["neg_n"]
        if s["pairs"]:
            m["train/assess_acc"] = s["pairs_right"] / s["pairs"]
            m["train/margin"] = s["margin_sum"] / s["pairs"]
        if s["gap_n"]:
            m["train/neg_minus_boundary"] = s["gap_sum"] / s["gap_n"]
            m["train/neg_below_boundary"] = s["below"] / s["gap_n"]
        if self.beta is not None:
            m["train/beta"] = self.beta
        if s["grad_n"]:
            m["train/grad_align"] = s["grad_align"] / s["grad_n"]
            m["train/grad_vft"] = s["grad_vft"] / s["grad_n"]
            if s["grad_vft"] > 0:
                m["train/grad_ratio"] = s["grad_align"] / s["grad_vft"]
        return m


class _HiddenTap:
    """Keeps the decoder's final hidden states of the next forward (detached) once armed: the input of the
    fused loss, for the gradient norms of the log steps. A forward hook on the decoder, so the training
    forward itself is unchanged (no second model forward)."""

    def __init__(self, lm: torch.nn.Module):
        base = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
        self.handle = base.register_forward_hook(self._hook)
        self.armed, self.hidden = False, None

    def _hook(self, module, args, output) -> None:
        if self.armed:
            hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            self.hidden, self.armed = hidden.detach(), False

    def take(self) -> torch.Tensor | None:
        hidden, self.hidden = self.hidden, None
        return hidden


def _gradient_norms(model: AFTModel, hidden: torch.Tensor, batch: Batch) -> tuple[float, float]:
    """The align and VFT parts of the gradient on `hidden` (collective under ZeRO-3: the head is gathered
    on every rank, so every rank calls this on the same steps)."""
    head = model.lm.get_output_embeddings()
    bias = getattr(head, "bias", None)
    with deepspeed.zero.GatheredParameters([p for p in (head.weight, bias) if p is not None]):
        # The loss options and the model's logit post-processing, exactly as AFTModel.forward passes them.
        options = {**model.loss_options, **model.logits.options()}
        return gradient_norms(hidden, head.weight, bias, batch, options)


def _kill_hook(stage: str, step: int) -> None:
    if os.environ.get(KILL_ENV) == f"{stage}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def build_model(
    cfg: TrainConfig,
    dist: Dist,
    *,
    stage: str,
    init_model: Path,
    config: dict,
    mode: TrainMode,
    layout: str,
) -> tuple[AFTModel, AttentionPlan]:
    """The module a stage trains: `init_model` loaded partitioned under the DeepSpeed `config`, its
    attention switched to the kernel that can express `layout`, gradient checkpointing, and the fused
    loss of `mode` around it. What wraps the language model (adapters) goes in between."""
    if cfg.qlora:  # a 4-bit base (bitsandbytes, CUDA); aft_fast/models/adapters.py
        lm = adapters.load_4bit(init_model, dist.device, model_dtype(config))
    else:
        lm = load_partitioned(init_model, config)
    attn = attention.prepare(lm, layout, dist.device)  # the attention kernel that can express the layout
    print0(f"[{stage}] layout {layout}, attention {attn.kernel}" + (f": {attn.note}" if attn.note else ""))
    if cfg.gradient_checkpointing:  # transformers' activation checkpointing (its old name goes in v6)
        checkpointing = {"use_reentrant": False}
        if hasattr(lm, "activation_checkpointing_enable"):
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
        else:  # transformers before the rename
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    peft = None
    if cfg.lora_r:  # the base frozen; only the adapters reach the optimizer (build_engine)
        targets = adapters.parse_target_modules(cfg.lora_target_modules)
        settings = adapters.LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, targets)
        peft = adapters.add_lora(lm, settings, base=init_model, seed=cfg.seed)
        print0(f"[{stage}] {adapters.describe(peft)}")
    options = LossOptions.from_config(cfg, mode=mode.loss)
    model = AFTModel(lm if peft is None else peft, options, backend=cfg.loss_backend)
    print0(f"[{stage}] {model.note}")  # the logit post-processing read from the config; MoE router loss
    return model, attn


def train(
    cfg: TrainConfig,
    dist: Dist,
    *,
    stage: str,
    items: list[Encoded],
    init_model: Path,
    tokenizer: PreTrainedTokenizerBase,
    mode: TrainMode,
    schedule: Schedule,
    out_dir: Path,
    layout: str = "padded",
) -> StageResult:
    """Train `init_model` on `items` by `schedule` with the loss of `mode` (a row of
    aft_fast.constants.TRAIN_MODES; cfg.beta is the beta used), micro batches collated in `layout`
    (aft_fast/data/collate.py); write the consolidated Hugging Face folder `out_dir`. With cfg.resume,
    continue from the stage's latest checkpoint."""
    run = _StageRun(cfg, dist, stage, schedule, init_model=init_model, mode=mode, layout=layout)
    print0(f"[{stage}] {len(items)} items, {run.describe()}")
    plan = StepPlan(len(items), schedule.micro_batch_size, dist.world_size, run.accum, cfg.seed)
    max_tokens = run.attn.row_budget(cfg.max_tokens_per_row)

    def micro_batches(step: int) -> Iterable[Batch]:  # collated one at a time, as the forwards take them
        for accum_step in range(run.accum):
            rows = [items[i] for i in plan.micro_batch(step, accum_step, dist.rank)]
            pad = tokenizer.pad_token_id
            batch = collate(rows, pad_id=pad, max_length=cfg.max_length, layout=layout, max_tokens=max_tokens)
            yield batch.to(dist.device)

    t0 = time.perf_counter()
    tokens, metrics = run.steps(range(run.start, schedule.steps), micro_batches)
    seconds = time.perf_counter() - t0
    local = torch.tensor([float(tokens)], device=dist.device)
    deepspeed.comm.all_reduce(local)
    trainer_state = {"stage": stage, "steps": schedule.steps, "config": cfg.to_dict(), "metrics": metrics}
    run.save(tokenizer, out_dir, trainer_state)
    return StageResult(schedule.steps, seconds, float(local.item()) / max(seconds, 1e-9), metrics)


class _StageRun:
    """One stage's engine from its setup (resumed from its latest checkpoint with cfg.resume) to its saved
    folder: the step loop with its logging, diagnostics and checkpoints, then the save."""

    def __init__(
        self,
        cfg: TrainConfig,
        dist: Dist,
        stage: str,
        schedule: Schedule,
        *,
        init_model: Path,
        mode: TrainMode,
        layout: str,
    ):
        self.cfg, self.dist, self.stage, self.schedule, self.mode = cfg, dist, stage, schedule, mode
        self.accum = grad_accum_steps(schedule.batch_size, schedule.micro_batch_size, dist.world_size, stage)
        self.config = ds_config(
            cfg.deepspeed_config,
            micro_batch=schedule.micro_batch_size,
            grad_accum=self.accum,
            world_size=dist.world_size,
            grad_clip=schedule.grad_clip,
        )
        self.ckpt_dir = cfg.run_path / "checkpoints" / stage
        saved = _checkpoint_to_resume(cfg, dist, stage, self.ckpt_dir)
        self.model, self.attn = build_model(
            cfg, dist, stage=stage, init_model=init_model, config=self.config, mode=mode, layout=layout
        )
        self.peft = self.model.lm if cfg.lora_r else None  # the PeftModel around the frozen base
        self.lm = self.model.lm if self.peft is None else self.peft.get_base_model()
        self.engine = build_engine(
            self.model,
            self.config,
            lr=schedule.lr,
            steps=schedule.steps,
            warmup_ratio=schedule.warmup_ratio,
            min_lr_ratio=schedule.min_lr_ratio,
            weight_decay=schedule.weight_decay,
        )
        self.start = 0
        self.saves_final = (
            stage == "vft" and cfg.aft_optimizer == "vft"
        )  # the aft stage carries its moments on
        if saved is None and stage == "aft" and cfg.aft_optimizer == "vft":
            _carry_vft_moments(cfg, dist, self.engine)
        if saved is not None:
            loaded = checkpoint.load(self.engine, self.ckpt_dir)
            assert loaded is not None  # read_state found it above
            self.start = int(loaded["step"])
            tag = checkpoint.tag_for(self.start)
            print0(f"[{stage}] resumed from {self.ckpt_dir / tag} at step {self.start}")
        self.meter = _Meter(cfg.beta if mode.boundary else None)
        self.tap = _HiddenTap(self.lm) if mode.ranking else None

    def describe(self) -> str:
        s, mode = self.schedule, self.mode
        return (
            f"{s.steps} steps of {s.batch_size} ({s.micro_batch_size} per process x {self.dist.world_size} "
            f"processes x {self.accum} accumulation), {model_dtype(self.config)}, lr {s.lr}, mode "
            f"{mode.name} (loss {mode.loss}" + (f", beta {self.cfg.beta:.4g})" if mode.boundary else ")")
        )

    def steps(self, steps: range, micro_batches) -> tuple[int, dict]:
        """Optimizer steps `steps` (of 0..steps.stop); returns the tokens read and the last metrics."""
        cfg, last = self.cfg, steps.stop
        logger = MetricsLogger(cfg.run_dir, self.stage, cfg.tensorboard)
        bar = progress(last, self.stage, cfg.progress, initial=steps.start)
        tokens, metrics = 0, {}
        self.engine.train()
        for step in steps:
            done = step + 1
            log_step = done % cfg.log_every == 0 or done == last
            tap = self.tap if log_step else None
            tokens += _optimizer_step(self.engine, self.model, micro_batches(step), self.meter, tap)
            if log_step:
                metrics = self.meter.reduce(self.engine.get_lr()[0], self.dist.device)
                logger.log(done, metrics)
                bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", refresh=False)
            if (cfg.save_every and done % cfg.save_every == 0 and done < last) or (
                done == last and self.saves_final
            ):
                state = {"step": done, "stage": self.stage, "world_size": self.dist.world_size}
                state["config"] = cfg.to_dict()
                checkpoint.save(self.engine, self.ckpt_dir, done, state, cfg.keep_checkpoints)
            _kill_hook(self.stage, done)
            bar.update()
        bar.close()
        logger.close()
        if self.tap is not None:
            self.tap.handle.remove()
        return tokens, metrics

    def save(self, tokenizer: PreTrainedTokenizerBase, out_dir: Path, trainer_state: dict) -> None:
        """The trained model as a Hugging Face folder (adapters: a PEFT folder, and with merge_adapters the
        merged model beside it); the engine released (collective)."""
        if self.peft is None:
            _save_model(self.engine, self.lm, tokenizer, out_dir, trainer_state, self.dist.is_main)
            return
        merged = out_dir.with_name(f"{out_dir.name}_merged") if self.cfg.merge_adapters else None
        dtype = model_dtype(self.config)
        adapters.save_stage(self.peft, tokenizer, out_dir, trainer_state, merged_dir=merged, dtype=dtype)
        deepspeed.comm.barrier()
        self.engine.destroy()


def _optimizer_step(
    engine, model: AFTModel, batches: Iterable[Batch], meter: _Meter, tap: _HiddenTap | None
) -> int:
    """One optimizer step over its micro batches (DeepSpeed steps the optimizer and the schedule at the
    accumulation boundary); returns the tokens read. With `tap` (a log step), the first micro batch's
    hidden states give the gradient diagnostics, before the step: the same weights as its forward."""
    tokens = 0
    for accum_step, batch in enumerate(batches):
        if tap is not None:
            tap.armed = accum_step == 0
        out = engine(**batch.tensors())
        hidden = tap.take() if tap is not None else None
        if hidden is not None:
            meter.add_gradients(*_gradient_norms(model, hidden, batch))
        engine.backward(out["loss"])
        engine.step()
        meter.add(batch, out)
        tokens += batch.num_tokens
    return tokens


def _checkpoint_to_resume(cfg: TrainConfig, dist: Dist, stage: str, ckpt_dir: Path) -> dict | None:
    """The state of the stage's latest checkpoint when resuming (checked to continue this very run);
    on a fresh start, None and the folder's old checkpoints cleared (they belong to an older run)."""
    saved = checkpoint.read_state(ckpt_dir) if cfg.resume else None
    if saved is not None:
        check_resumable(saved, cfg, stage, dist.world_size)
    elif dist.is_main:
        checkpoint.clear(ckpt_dir)
    return saved


def _carry_vft_moments(cfg: TrainConfig, dist: Dist, engine) -> None:
    """aft_optimizer vft: the engine starts from the VFT stage's final checkpoint (weights, Adam moments)."""
    ckpt_dir = cfg.vft_checkpoints()
    saved = checkpoint.read_state(ckpt_dir)
    if saved is None or saved.get("stage") != "vft":
        raise InputError(
            f"aft_optimizer vft: no VFT checkpoint in {ckpt_dir}; run the vft stage with aft_optimizer vft "
            "(it then writes its final one), or use aft_optimizer fresh"
        )
    step, final = saved["step"], saved["config"].get("vft_steps")
    if step != final:
        raise InputError(
            f"aft_optimizer vft: the latest checkpoint in {ckpt_dir} is at step {step} of "
            f"{final}, not the VFT model's end; run the vft stage with aft_optimizer vft"
        )
    if saved.get("world_size") != dist.world_size:
        raise InputError(
            f"aft_optimizer vft: the VFT checkpoint holds ZeRO-3 shards of {saved.get('world_size')} "
            f"processes; run aft with as many, or use aft_optimizer fresh"
        )
    tag = checkpoint.tag_for(step)
    checkpoint.carry_moments(engine, ckpt_dir, tag)
    print0(f"[aft] AdamW moments carried over from {ckpt_dir / tag}")


def _save_model(engine, lm, tokenizer, out_dir: Path, trainer_state: dict, is_main: bool) -> None:
    """The trained model as one Hugging Face folder (gathered from the ZeRO-3 partitions, written by rank
    0), then the engine released (collective)."""
    state = consolidated_state_dict(engine)
    if is_main:
        save_hf_folder(lm, tokenizer, out_dir, state_dict=state, trainer_state=trainer_state)
    deepspeed.comm.barrier()
    engine.destroy()
