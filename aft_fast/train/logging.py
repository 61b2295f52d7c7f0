"""Rank-0 output: `print0`, progress bars, and metrics to JSONL + TensorBoard (a no-op on other ranks).

Metric names are fixed: ``train/loss``, ``train/vft_loss``, ``train/align_loss``, ``train/lr``,
``train/tokens_per_sec``, ``train/pos_score``, ``train/neg_score``, ``train/assess_acc``; ``eval/accuracy``;
``sample/*``. Each JSONL line also carries ``stage`` and ``step``; TensorBoard gets one folder per stage.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import deepspeed
from tqdm.auto import tqdm


def is_main() -> bool:
    return not deepspeed.comm.is_initialized() or deepspeed.comm.get_rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def progress(total: int, desc: str, enabled: bool = True, initial: int = 0) -> tqdm:
    return tqdm(
        total=total,
        desc=desc,
        initial=initial,
        disable=not (enabled and is_main()),
        dynamic_ncols=True,
        leave=True,
    )


class MetricsLogger:
    """Appends metric records to ``<run_dir>/metrics.jsonl`` and TensorBoard
    ``<run_dir>/tensorboard/<stage>``. Construct it on every rank; only rank 0 writes."""

    def __init__(self, run_dir: str | Path, stage: str, tensorboard: bool = True):
        self.enabled = is_main()
        self.stage = stage
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard" / stage))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"stage": self.stage, "step": step, "time": round(time.time(), 3), **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
