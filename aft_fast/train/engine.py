"""DeepSpeed set-up: the process group, the ZeRO-3 config with its "auto" fields filled, the engine
(AdamW + warm-up/cosine schedule), and the consolidated weights for a Hugging Face folder."""

from __future__ import annotations

import json
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
from torch import nn
from transformers import get_cosine_with_min_lr_schedule_with_warmup

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_DS_CONFIGS = {"cuda": "ds_zero3_gpu_bf16.json", "cpu": "ds_zero3_cpu_fp32.json"}


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str = "auto") -> Dist:
    """Join the process group that the launcher (deepspeed, torchrun, slurm) describes in the environment;
    a plain `python train.py` becomes a one-process group."""
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    # DeepSpeed logs every engine's config at INFO, and calls collectives that torch marks deprecated (a
    # FutureWarning per call site and rank): keep the console for our progress and results.
    deepspeed.utils.logger.setLevel(os.environ.get("DS_LOG_LEVEL", "WARNING").upper())
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
        if not cuda:
            _unlink_shm_buffer(deepspeed.comm.get_rank())
    world = deepspeed.comm.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    if not cuda and "OMP_NUM_THREADS" not in os.environ:
        # CPU processes on one node share its cores; oversubscribing them slows every rank.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if not cuda and deepspeed.comm.get_rank() == 0:
        from aft_fast import cpu_info  # the cpp loss backend's SIMD level and GEMM library, and why

        print(f"[aft_fast] {cpu_info()['summary']}", flush=True)
    return Dist(deepspeed.comm.get_rank(), world, local_rank, local_world, device)


def _unlink_shm_buffer(rank: int) -> None:
    """DeepSpeed's CPU allreduce (all ranks on one node) maps one /dev/shm segment per rank and never
    unlinks it: every run would leave 66 MiB a rank behind in shared memory, killed runs included. Once
    every rank has mapped its peers' segments (they do so inside init_distributed, before the barrier
    returns), the names can go; the mappings stay valid until the processes exit."""
    path = Path(
        f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
        f"{os.environ.get('MASTER_PORT', '')}_{rank}"
    )
    if deepspeed.comm.get_world_size() > 1:
        deepspeed.comm.barrier()  # on every rank alike: whether a segment exists is no reason to skip it
    path.unlink(missing_ok=True)


def shutdown_distributed() -> None:
    """Leave the process group together: a rank that exits while a peer still holds gloo connections can
    make that peer's process abort (SIGABRT) at interpreter exit, after its work is done."""
    if deepspeed.comm.is_initialized():
        deepspeed.comm.barrier()
        torch.distributed.destroy_process_group()


def resolve_ds_config_path(name: str) -> Path:
    if name == "auto":
        name = str(CONFIG_DIR / DEFAULT_DS_CONFIGS["cuda" if torch.cuda.is_available() else "cpu"])
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} does not exist")
    return path


def ds_config(
    path: str | Path, *, micro_batch: int, grad_accum: int, world_size: int, grad_clip: float
) -> dict:
    """The DeepSpeed JSON with its "auto" batch and clipping fields filled from the run config. A value
    that is set (not "auto") must agree, so a config file can never silently change the batch."""
    path = resolve_ds_config_path(str(path))
    cfg = json.loads(path.read_text())
    want = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": grad_clip,
    }
    for key, value in want.items():
        have = cfg.get(key, "auto")
        if have == "auto":
            cfg[key] = value
        elif have != value:
            raise ValueError(f'{path}: {key} = {have}, but the run config implies {value}; set it to "auto"')
    stage = cfg.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ValueError(f"{path}: zero_optimization.stage must be 3 (got {stage})")
    if cfg.get("optimizer") or cfg.get("scheduler"):
        raise ValueError(
            f"{path}: leave out 'optimizer' and 'scheduler': the trainer builds AdamW and its "
            "schedule from the run config (lr, warmup_ratio, min_lr_ratio, weight_decay)"
        )
    return cfg


def model_dtype(cfg: dict) -> torch.dtype:
    if cfg.get("bf16", {}).get("enabled") is True:
        return torch.bfloat16
    if cfg.get("fp16", {}).get("enabled") is True:
        return torch.float16
    return torch.float32


def grad_accum_steps(batch_size: int, micro_batch: int, world_size: int, what: str) -> int:
    """batch = micro * processes * accumulation, so the same global batch trains on any number of GPUs."""
    per_step = micro_batch * world_size
    if batch_size % per_step:
        raise ValueError(
            f"{what}: batch size {batch_size} is not a multiple of micro batch {micro_batch} x "
            f"{world_size} processes"
        )
    return batch_size // per_step


def build_engine(
    module: nn.Module,
    config: dict,
    *,
    lr: float,
    steps: int,
    warmup_ratio: float,
    min_lr_ratio: float,
    weight_decay: float,
):
    """deepspeed.initialize with torch AdamW (ZeRO-3 runs it on each rank's fp32 partition) and a linear
    warm-up then cosine decay to min_lr_ratio * lr, stepped by DeepSpeed once per optimizer step.

    Only parameters that require a gradient reach the optimizer: with LoRA adapters (a frozen base) ZeRO-3
    keeps fp32 master weights and Adam moments for the adapters alone, and the base is only gathered for
    the forward and backward."""
    fused = torch.cuda.is_available()
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("build_engine: the module has no trainable parameter (everything is frozen)")
    optimizer = torch.optim.AdamW(
        params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, fused=fused or None
    )

    def schedule(opt):  # DeepSpeed calls it with its wrapped optimizer
        return get_cosine_with_min_lr_schedule_with_warmup(
            opt,
            num_warmup_steps=int(warmup_ratio * steps),
            num_training_steps=steps,
            min_lr_rate=min_lr_ratio,
        )

    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=schedule, config=config)
    return engine


def consolidated_state_dict(engine, prefix: str = "lm.") -> dict[str, torch.Tensor] | None:
    """The full weights gathered layer by layer onto rank 0's CPU (None on other ranks); call on all ranks.
    `_zero3_consolidated_16bit_state_dict` is the entry point that Hugging Face Trainer and Accelerate use
    (it returns the training dtype: fp32 for fp32 runs, bf16 for bf16 runs)."""
    state = engine._zero3_consolidated_16bit_state_dict()
    if state is None:
        return None
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
