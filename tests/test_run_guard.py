"""The run folder's guard: one live run per folder, stale locks taken over, finished stages kept unless
--resume or --overwrite says otherwise."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from aft_fast.train.config import InputError, TrainConfig
from aft_fast.train.run_guard import LOCK_NAME, RunLock, check_outputs, is_alive
from tests._train_support import ROOT, clean_env

HOLD = """
import sys, time
from aft_fast.train.run_guard import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """A real second process holding tmp_path/run."""
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True, env=clean_env()
    )
    assert proc.stdout.readline().strip() == "held"
    yield run, proc
    proc.kill()
    proc.wait()


def _lock(run, **fields):
    run.mkdir(parents=True, exist_ok=True)
    data = {"host": socket.gethostname(), "pid": os.getpid(), "started": "then", "proc_start": None}
    data.update(fields)
    (run / LOCK_NAME).write_text(json.dumps(data))


def test_a_second_live_run_is_refused_with_the_holder(holder):
    run, proc = holder
    held = rf"in use by a live run \(host {socket.gethostname()}, pid {proc.pid}"
    with pytest.raises(InputError, match=held):
        RunLock(run).acquire()
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == proc.pid  # the holder keeps its lock


def test_a_second_launch_of_train_py_is_refused(holder, tmp_path):
    run, proc = holder
    r = subprocess.run(
        [sys.executable, "train.py", f"--run_dir={run}", "--stage=vft", "--vft_steps=1"],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"in use by a live run (host {socket.gethostname()}, pid {proc.pid}" in r.stderr
    assert not (run / "vft").exists() and not (run / "data").exists()


def test_the_lock_of_a_killed_run_is_taken_over(holder):
    run, proc = holder
    proc.kill()
    proc.wait()
    lock = RunLock(run).acquire()
    assert lock.message is not None
    assert "no longer alive" in lock.message and f"pid {proc.pid}" in lock.message
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / LOCK_NAME).exists()


def test_a_recycled_pid_is_not_taken_for_the_holder(tmp_path):
    # Our own pid, but another process start tick: the run that wrote it is gone.
    _lock(tmp_path, proc_start=1)
    assert is_alive(RunLock(tmp_path).me) is True
    lock = RunLock(tmp_path).acquire()
    assert lock.message is not None and "no longer alive" in lock.message
    lock.release()


def test_a_half_written_lock_is_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text('{"host": "x", "pi')
    lock = RunLock(tmp_path).acquire()
    assert "unreadable lock file" in lock.message
    lock.release()


def test_a_lock_from_another_host_is_refused_with_its_path(tmp_path):
    _lock(tmp_path, host="elsewhere-node-7", pid=123)
    elsewhere = r"another host \(host elsewhere-node-7, pid 123.*delete .*run\.lock"
    with pytest.raises(InputError, match=elsewhere):
        RunLock(tmp_path).acquire()


def test_the_same_process_may_take_its_lock_again(tmp_path):
    first = RunLock(tmp_path).acquire()
    second = RunLock(tmp_path).acquire()  # e.g. a library caller running two stages in one process
    assert second.message is None
    second.release()
    first.release()


def _cfg(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(run_dir=str(tmp_path), **kw)


def test_a_fresh_run_over_finished_stages_stops(tmp_path):
    (tmp_path / "vft").mkdir()
    (tmp_path / "candidates.jsonl").write_text("{}\n")
    with pytest.raises(InputError, match=r"already holds finished stages .*vft.*candidates\.jsonl.*--resume"):
        check_outputs(_cfg(tmp_path), ("vft", "sample", "aft"))
    assert check_outputs(_cfg(tmp_path), ("aft",)) is None  # the stage to run has no output yet
    assert check_outputs(_cfg(tmp_path, resume=True), ("vft", "sample", "aft")) is None
    assert (tmp_path / "vft").is_dir()


def test_overwrite_says_what_it_removes(tmp_path):
    (tmp_path / "vft").mkdir()
    (tmp_path / "vft" / "model.safetensors").write_text("x")
    (tmp_path / "candidates.jsonl").write_text("{}\n")
    msg = check_outputs(_cfg(tmp_path, overwrite=True), ("vft", "sample"))
    assert msg is not None and "removed" in msg and "vft" in msg and "candidates.jsonl" in msg
    assert not (tmp_path / "vft").exists() and not (tmp_path / "candidates.jsonl").exists()


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(InputError, match="resume and overwrite"):
        _cfg(tmp_path, resume=True, overwrite=True)


def test_the_lock_is_released_after_a_run(tmp_path):
    start = time.time()
    lock = RunLock(tmp_path).acquire()
    info = json.loads((tmp_path / LOCK_NAME).read_text())
    assert info["host"] == socket.gethostname() and info["pid"] == os.getpid()
    assert info["proc_start"] is not None and time.time() - start < 5
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
