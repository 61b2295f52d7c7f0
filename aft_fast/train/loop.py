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
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import torch
from transformers import PreTrainedTokenizerBase

from aft_fast.data.batch import Batch, Encoded
from aft_fast.data.collate import collate
from aft_fast.models import attention
from aft_fast.models.forward import AFTModel
from aft_fast.models.loading import load_partitioned, save_hf_folder
from aft_fast.train import checkpoint
from aft_fast.train.config import InputError, TrainConfig
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
    """A checkpoint continues only the run that wrote it: same data order, schedule, loss and process
    count (ZeRO-3 shards are per rank). Anything else would resume a different run silently."""
    keys = ["seed", "max_length", "warmup_ratio", "min_lr_ratio", "weight_decay", "grad_clip"]
    keys += [f"{stage}_{k}" for k in ("steps", "batch_size", "micro_batch_size", "lr")]
    if stage == "aft":
        keys += ["mode", "beta", "w_vft", "w_align", "dpo_beta", "pro_tau"]
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
    """Sums over micro batches (and, at `reduce`, over ranks) of the logged quantities."""

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
    )

    def __init__(self):
        self.sums = torch.zeros(len(self.NAMES), dtype=torch.float64)
        self.start = time.perf_counter()

    def add(self, batch: Batch, out: dict[str, torch.Tensor]) -> None:
        scores = out["scores"].detach().float().cpu()
        group, label, is_ref = batch.group.cpu(), batch.label.cpu(), batch.is_reference.cpu()
        cand = ~is_ref
        # pair[i, j]: i and j are candidates of one group and i is labelled above j.
        pair = (
            (group[:, None] == group[None, :])
            & cand[:, None]
            & cand[None, :]
            & (label[:, None] > label[None, :])
        )
        below = pair.any(dim=0)
        pos, neg = pair.any(dim=1) & ~below, below  # a group's top candidates; those under another
        right = pair & (scores[:, None] > scores[None, :])
        vals = [
            out["loss"].item(),
            out["vft_loss"].item(),
            out["align_loss"].item(),
            1.0,
            batch.num_tokens,
            scores[pos].sum().item(),
            pos.sum().item(),
            scores[neg].sum().item(),
            neg.sum().item(),
            right.sum().item(),
            pair.sum().item(),
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
        return m


def _kill_hook(stage: str, step: int) -> None:
    if os.environ.get(KILL_ENV) == f"{stage}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def train(
    cfg: TrainConfig,
    dist: Dist,
    *,
    stage: str,
    items: list[Encoded],
    init_model: Path,
    tokenizer: PreTrainedTokenizerBase,
    mode: str,
    steps: int,
    batch_size: int,
    micro_batch: int,
    lr: float,
    out_dir: Path,
    layout: str = "padded",
) -> StageResult:
    """Train `init_model` on `items` for `steps` optimizer steps with loss `mode`, micro batches collated in
    `layout` (aft_fast/data/collate.py); write the consolidated Hugging Face folder `out_dir`. With
    cfg.resume, continue from the stage's latest checkpoint."""
    accum = grad_accum_steps(batch_size, micro_batch, dist.world_size, stage)
    config = ds_config(
        cfg.deepspeed_config,
        micro_batch=micro_batch,
        grad_accum=accum,
        world_size=dist.world_size,
        grad_clip=cfg.grad_clip,
    )
    plan = StepPlan(len(items), micro_batch, dist.world_size, accum, cfg.seed)
    ckpt_dir = cfg.run_path / "checkpoints" / stage
    saved = checkpoint.read_state(ckpt_dir) if cfg.resume else None
    if saved is not None:
        check_resumable(saved, cfg, stage, dist.world_size)
    elif dist.is_main:
        checkpoint.clear(ckpt_dir)  # a fresh start: checkpoints there belong to an older run
    print0(
        f"[{stage}] {len(items)} items, {steps} steps of {batch_size} ({micro_batch} per process x "
        f"{dist.world_size} processes x {accum} accumulation), {model_dtype(config)}, lr {lr}"
    )
    lm = load_partitioned(init_model, config)
    attn = attention.prepare(lm, layout, dist.device)  # the attention kernel that can express the layout
    max_tokens = attn.row_budget(cfg.max_tokens_per_row)
    print0(f"[{stage}] layout {layout}, attention {attn.kernel}" + (f": {attn.note}" if attn.note else ""))
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = AFTModel(
        lm,
        mode=mode,
        beta=cfg.beta,
        w_vft=cfg.w_vft,
        w_align=cfg.w_align,
        dpo_beta=cfg.dpo_beta,
        pro_tau=cfg.pro_tau,
        backend=cfg.loss_backend,
    )
    engine = build_engine(
        model,
        config,
        lr=lr,
        steps=steps,
        warmup_ratio=cfg.warmup_ratio,
        min_lr_ratio=cfg.min_lr_ratio,
        weight_decay=cfg.weight_decay,
    )
    start = 0
    if saved is not None:
        start = int(checkpoint.load(engine, ckpt_dir)["step"])
        print0(f"[{stage}] resumed from {ckpt_dir / checkpoint.latest_tag(ckpt_dir)} at step {start}")
    logger = MetricsLogger(cfg.run_dir, stage, cfg.tensorboard)
    meter, bar = _Meter(), progress(steps, stage, cfg.progress, initial=start)
    t0, tokens, metrics = time.perf_counter(), 0, {}
    engine.train()
    for step in range(start, steps):
        for accum_step in range(accum):
            idx = plan.micro_batch(step, accum_step, dist.rank)
            batch = collate(
                [items[i] for i in idx],
                pad_id=tokenizer.pad_token_id,
                max_length=cfg.max_length,
                layout=layout,
                max_tokens=max_tokens,
            )
            batch = batch.to(dist.device)
            out = engine(**batch.tensors())
            engine.backward(out["loss"])
            engine.step()  # DeepSpeed steps the optimizer and the schedule at the accumulation boundary
            meter.add(batch, out)
            tokens += batch.num_tokens
        done = step + 1
        if done % cfg.log_every == 0 or done == steps:
            metrics = meter.reduce(engine.get_lr()[0], dist.device)
            logger.log(done, metrics)
            bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", refresh=False)
        if cfg.save_every and done % cfg.save_every == 0 and done < steps:
            checkpoint.save(
                engine,
                ckpt_dir,
                done,
                {"step": done, "stage": stage, "world_size": dist.world_size, "config": cfg.to_dict()},
                cfg.keep_checkpoints,
            )
        _kill_hook(stage, done)
        bar.update()
    bar.close()
    logger.close()
    seconds = time.perf_counter() - t0
    local = torch.tensor([float(tokens)], device=dist.device)
    deepspeed.comm.all_reduce(local)
    state = consolidated_state_dict(engine)
    if dist.is_main:
        save_hf_folder(
            lm,
            tokenizer,
            out_dir,
            state_dict=state,
            trainer_state={"stage": stage, "steps": steps, "config": cfg.to_dict(), "metrics": metrics},
        )
    deepspeed.comm.barrier()
    engine.destroy()
    return StageResult(steps, seconds, float(local.item()) / max(seconds, 1e-9), metrics)
