"""Helpers for the training tests: tiny assets (tokenizer, model folder, candidate file) and DeepSpeed
launches on the CPU with free ports, a time limit and clean-up of the whole process group."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

from aft_fast.data.candidates import CandidateGroup, label_candidates, write_candidates
from aft_fast.data.formats import prompt_text
from aft_fast.data.synthetic import generate_problems

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_assets(root: Path, n_groups: int = 24) -> dict[str, Path]:
    """A trained tokenizer, a freshly initialised default tiny Llama folder, and a candidate file whose
    groups mix right and wrong chains (the reference, and copies with a changed final answer)."""
    from aft_fast.data.tokenizer import train_tokenizer
    from aft_fast.models.loading import create_default_model

    problems = generate_problems(n_groups, seed=7)
    tok = train_tokenizer(
        [prompt_text(p.question) + p.reference for p in generate_problems(300, seed=1)], root / "tokenizer"
    )
    create_default_model(tok, root / "model", seed=0)
    groups = []
    for i, p in enumerate(problems):
        body = p.reference[: p.reference.rfind("#### ")]
        wrong = [f"{body}#### {int(p.gold) + d}" for d in (1, 2, 3)[: 1 + i % 3]]
        texts = [p.reference, *wrong] if i % 4 else [*wrong, p.reference, p.reference]  # one duplicate
        groups.append(label_candidates(CandidateGroup.from_example(p), texts))
    write_candidates(root / "candidates.jsonl", groups)
    return {"model": root / "model", "candidates": root / "candidates.jsonl", "tokenizer": root / "tokenizer"}


def aft_stage_args(
    assets: dict[str, Path], run_dir: Path, steps: int, batch: int, micro: int, lr: str, *options: str
) -> list[str]:
    """train.py's arguments for `steps` AFT steps (`batch` groups a step, `micro` a micro batch, learning rate
    `lr`) of the assets' model on their candidates into run_dir: mode bcl (beta 0.5), max_length 160, a log
    line a step, no checkpoints, no progress bar or tensorboard; `options` last, so that they add to those
    or override them."""
    return [
        "--stage=aft",
        f"--vft_model={assets['model']}",
        f"--candidates={assets['candidates']}",
        f"--run_dir={run_dir}",
        f"--aft_steps={steps}",
        f"--aft_batch_size={batch}",
        f"--aft_micro_batch_size={micro}",
        f"--aft_lr={lr}",
        "--mode=bcl",
        "--beta=0.5",
        "--max_length=160",
        "--log_every=1",
        "--save_every=0",
        "--progress=false",
        "--tensorboard=false",
        *options,
    ]


def zero3_rank(model_dir: str, candidates: str, micro: int, grad_clip: float) -> tuple:
    """The start of one rank of a worker under `deepspeed` on the CPU (tests/_lora_worker.py,
    tests/_zero3_grads_worker.py): gloo initialised, the model's tokenizer, the candidate file's groups
    encoded, the ZeRO-3 CPU fp32 config for `micro` groups a rank and step, and the model loaded
    partitioned by it. Returns (dist, tokenizer, items, config, model)."""
    from aft_fast.data.candidates import read_candidates
    from aft_fast.data.collate import encode_group
    from aft_fast.models.loading import load_partitioned, load_tokenizer
    from aft_fast.train.engine import ds_config, init_distributed

    dist = init_distributed("gloo")
    tok = load_tokenizer(model_dir)
    items = [encode_group(g, tok) for g in read_candidates(candidates)]
    config = ds_config(
        "configs/ds_zero3_cpu_fp32.json",
        micro_batch=micro,
        grad_accum=1,
        world_size=dist.world_size,
        grad_clip=grad_clip,
    )
    return dist, tok, items, config, load_partitioned(model_dir, config)


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "LOCAL_WORLD_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
            "TRITON_INTERPRET",
        )
    }
    env.update(
        DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false"
    )
    env.update(extra)
    return env


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )  # own process group: a timeout kills launcher and ranks
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s: {' '.join(cmd)}\n{out[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def deepspeed_cmd(nprocs: int, script: str, args: list[str], port: int | None = None) -> list[str]:
    return [DEEPSPEED, "--num_gpus", str(nprocs), "--master_port", str(port or free_port()), script, *args]


def launch(
    nprocs: int,
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    script: str = "train.py",
) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus nprocs script args` on the CPU (gloo)."""
    return _run(deepspeed_cmd(nprocs, script, args), env or clean_env(), timeout)


def run_python(
    args: list[str], *, env: dict[str, str] | None = None, timeout: float = 300, script: str = "train.py"
) -> subprocess.CompletedProcess:
    """`python script args`: one process, no launcher."""
    return _run([PYTHON, script, *args], env or clean_env(), timeout)


def launch_two_nodes(
    args: list[str], hostfile: Path, *, timeout: float = 300
) -> list[subprocess.CompletedProcess]:
    """Two launcher invocations (node ranks 0 and 1, one process each) that meet on 127.0.0.1, as two
    real nodes started without ssh would."""
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [
            DEEPSPEED,
            "--hostfile",
            str(hostfile),
            "--no_ssh",
            "--node_rank",
            str(node),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            "train.py",
            *args,
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=clean_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, None))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
    return results


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (
        f"exit {result.returncode}: {' '.join(result.args)}\n{result.stdout[-6000:]}"
    )


def losses(run_dir: Path, stage: str, name: str = "train/loss") -> dict[int, float]:
    """step -> metric from metrics.jsonl; a step logged twice (killed, then resumed) keeps the last."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["stage"] == stage and name in rec:
            out[rec["step"]] = rec[name]
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def assert_weights_close(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float, atol: float
) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
