"""One live run per run folder, and no finished stage overwritten without being asked.

Rank 0 holds `<run_dir>/run.lock` (JSON: host, pid, the process's start tick, start time) for the whole
run. A second live launch into the same folder is refused with the holder's host, pid and start time. A
lock whose process is gone (killed, crashed, out of memory) is taken over with a message that says so;
the start tick guards against a recycled pid. A lock written on another host cannot be checked from here,
so it is refused with the path to delete once that run is known to be dead.

Before training, `check_outputs` refuses a fresh run into a folder where the stages it would run already
finished, unless `--resume` (skip them, continue the interrupted one) or `--overwrite` (replace them, said
out loud) is given.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from aft_fast.train.config import InputError, TrainConfig

LOCK_NAME = "run.lock"


@dataclass(frozen=True)
class LockInfo:
    host: str
    pid: int
    started: str  # wall-clock start, for people
    proc_start: int | None  # /proc/<pid>/stat start tick, for telling a recycled pid apart

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"


def _proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat), if readable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after its closing one.
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def _this_process() -> LockInfo:
    pid = os.getpid()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return LockInfo(socket.gethostname(), pid, started, _proc_start(pid))


def is_alive(info: LockInfo) -> bool | None:
    """True / False for a lock of this host; None when it was written on another host (cannot tell)."""
    if info.host != socket.gethostname():
        return None
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    now = _proc_start(info.pid)
    return info.proc_start is None or now is None or now == info.proc_start


def _same_process(a: LockInfo, b: LockInfo) -> bool:
    return (a.host, a.pid, a.proc_start) == (b.host, b.pid, b.proc_start)


def _read(path: Path) -> LockInfo | None:
    """The lock's holder, or None for a lock that is unreadable or half-written (a run killed mid-write)."""
    try:
        data = json.loads(path.read_text())
        return LockInfo(str(data["host"]), int(data["pid"]), str(data["started"]), data.get("proc_start"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class RunLock:
    """`with RunLock(run_dir) as lock:` holds the folder for this process; `lock.message` says whether a
    stale lock was taken over."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.me = _this_process()
        self.message: str | None = None
        self._held = False

    def _create(self) -> bool:
        """Create the lock atomically; False when it already exists."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self.me), f)
        return True

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a race with another taker: one of them wins the O_EXCL create
            if self._create():
                self._held = True
                return self
            holder = _read(self.path)
            if holder is not None and _same_process(holder, self.me):
                self._held = True
                return self
            alive = is_alive(holder) if holder is not None else False
            if alive and holder is not None:
                raise InputError(
                    f"run_dir: {self.path.parent} is in use by a live run ({holder.describe()}); wait for it "
                    "to finish or give another --run_dir"
                )
            if alive is None and holder is not None:  # no answer: the holder is on another host
                raise InputError(
                    f"run_dir: {self.path.parent} is locked by a run on another host ({holder.describe()}); "
                    f"if that run is no longer alive, delete {self.path} and start again"
                )
            what = holder.describe() if holder is not None else "an unreadable lock file"
            self.message = f"run_dir: took over the lock of a run that is no longer alive ({what})"
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        raise InputError(f"run_dir: could not take {self.path}: another launch keeps taking it")

    def release(self) -> None:
        holder = _read(self.path)
        if self._held and holder is not None and _same_process(holder, self.me):
            self.path.unlink(missing_ok=True)
        self._held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def finished_outputs(cfg: TrainConfig, stages: tuple[str, ...]) -> list[Path]:
    """Outputs in cfg.run_dir of the training stages in `stages` (vft, sample, aft) that already exist.

    Evaluation reports are not guarded: re-evaluating a model into its run folder is the usual use."""
    outputs = {
        "vft": [cfg.stage_model_dir("vft"), cfg.run_path / "vft_merged", cfg.run_path / "checkpoints/vft"],
        "sample": [cfg.candidates_path],
        "aft": [cfg.stage_model_dir("aft"), cfg.run_path / "aft_merged", cfg.run_path / "checkpoints/aft"],
    }
    return [p for s in stages for p in outputs.get(s, []) if p.exists()]


def check_outputs(cfg: TrainConfig, stages: tuple[str, ...]) -> str | None:
    """Refuse (InputError) a fresh run over finished stages unless --resume or --overwrite is given;
    with --overwrite, remove them and return a message naming what was removed."""
    found = finished_outputs(cfg, stages)
    if not found or cfg.resume:
        return None
    names = ", ".join(str(p) for p in found)
    if not cfg.overwrite:
        raise InputError(
            f"run_dir: {cfg.run_path} already holds finished stages ({names}); pass --resume to continue "
            "that run, --overwrite to replace them, or give another --run_dir"
        )
    for p in found:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    return f"run_dir: --overwrite removed {names}"


def guard(cfg: TrainConfig, stages: tuple[str, ...], is_main: bool) -> RunLock | None:
    """Rank 0 takes the lock and checks the finished stages; every rank raises the same InputError when
    that fails, so no rank waits at a barrier for a run that will not start. Returns rank 0's lock."""
    import torch.distributed as torch_dist

    lock, error, notes = None, None, []
    if is_main:
        try:
            lock = RunLock(cfg.run_path).acquire()
            notes = [m for m in (lock.message, check_outputs(cfg, stages)) if m]
        except InputError as e:
            if lock is not None:
                lock.release()
            lock, error = None, str(e)
    if torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        box = [error]
        torch_dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise InputError(error)
    for note in notes:
        print(note, flush=True)
    return lock
