"""DeepSpeed checkpoints for --resume, written atomically.

Every rank writes its shard into ``<dir>/.tmp-step0000200``; after a barrier rank 0 renames it to
``<dir>/step0000200`` and then points ``<dir>/latest`` at it (temp file + os.replace). A kill at any
moment leaves either the previous checkpoint as ``latest`` or the new one, never a half-written one;
stale ``.tmp-*`` folders are deleted on the next save or resume. Multi-node runs need ``<dir>`` on a
shared filesystem (as DeepSpeed's own checkpoints do).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import deepspeed

TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"  # our small copy of the client state, readable without loading shards


def tag_for(step: int) -> str:
    return f"step{step:07d}"


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The tag `latest` names, if that checkpoint is complete (its folder exists)."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if tag and (ckpt_dir / tag).is_dir() else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove_stale(ckpt_dir: Path) -> None:
    for p in ckpt_dir.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def save(engine, ckpt_dir: str | Path, step: int, client_state: dict[str, Any], keep: int) -> Path:
    """Collective: all ranks call it. Returns the checkpoint folder."""
    ckpt_dir = Path(ckpt_dir)
    rank = deepspeed.comm.get_rank()
    tag = tag_for(step)
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale(ckpt_dir)
    deepspeed.comm.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=TMP_PREFIX + tag, client_state=client_state, save_latest=False)
    deepspeed.comm.barrier()  # every shard is on disk
    if rank == 0:
        (ckpt_dir / (TMP_PREFIX + tag) / STATE_FILE).write_text(json.dumps(client_state, indent=1))
        final = ckpt_dir / tag
        if final.exists():
            shutil.rmtree(final)
        (ckpt_dir / (TMP_PREFIX + tag)).rename(final)
        _write_atomic(ckpt_dir / "latest", tag)
        done = sorted(p for p in ckpt_dir.glob("step*") if p.is_dir())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    deepspeed.comm.barrier()
    return ckpt_dir / tag


def read_state(ckpt_dir: str | Path) -> dict[str, Any] | None:
    """The client state of the latest complete checkpoint, or None."""
    tag = latest_tag(ckpt_dir)
    return None if tag is None else json.loads((Path(ckpt_dir) / tag / STATE_FILE).read_text())


def load(engine, ckpt_dir: str | Path) -> dict[str, Any] | None:
    """Collective. Restores weights, optimizer and LR schedule from the latest complete checkpoint and
    returns its client state, or None when there is none."""
    ckpt_dir = Path(ckpt_dir)
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    if deepspeed.comm.get_rank() == 0:
        _remove_stale(ckpt_dir)  # shards of a save that a kill interrupted
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    return client_state


def carry_moments(engine, ckpt_dir: str | Path, tag: str) -> None:
    """Collective. A fresh engine takes the weights and Adam moments (m, v, step count) of a finished stage's
    checkpoint `tag`, and keeps its own hyperparameters (lr, weight decay, betas) and schedule: torch's
    load_state_dict would bring the finished stage's param groups, its last lr too, into the first step."""
    own = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {Path(ckpt_dir) / tag}")
    for group, values in zip(engine.optimizer.param_groups, own, strict=True):
        group.update(values)
    engine.global_steps = engine.global_samples = engine.skipped_steps = 0  # this stage's own counts


def clear(ckpt_dir: str | Path) -> None:
    """Rank 0: drop a stage's checkpoints when it starts afresh (they belong to an older run)."""
    shutil.rmtree(ckpt_dir, ignore_errors=True)
