"""What every benchmark shares: timing (medians after warm-up), the memory probe, the result files.

Memory: each measured provider runs in a fresh worker process. Its baseline is the resident set
once the inputs exist and one warm-up call is done; the peak is the kernel's high-water mark (VmHWM,
reset through /proc/self/clear_refs) during one more call. glibc's malloc is told to hand large
blocks straight back to the system (MALLOC_MMAP_THRESHOLD_), so freed buffers do not hide in the heap.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CSV_FIELDS = ["op", "provider", "mode", "metric", "unit", "x_name", "x_value", "p50", "p20", "p80",
              "config_json", "gpu", "torch", "triton", "git_sha", "timestamp"]
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "PYTHONUNBUFFERED": "1"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_memory() -> int:
    """Reset the high-water mark; return the current resident set in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def peak_memory() -> int:
    return _status_kib("VmHWM") * 1024


def cuda_peak_reset():
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def add_problem_args(parser, *, tokens: int, hidden: int, vocab: int, dtypes: dict, dtype: str) -> None:
    """The loss benchmarks' problem, with their defaults: --tokens T, --hidden H, --vocab V, --k candidates
    per group (6), --dtype (one of `dtypes`)."""
    parser.add_argument("--tokens", type=int, default=tokens, help="scored tokens T")
    parser.add_argument("--hidden", type=int, default=hidden, help="hidden size H")
    parser.add_argument("--vocab", type=int, default=vocab, help="vocabulary size V")
    parser.add_argument("--k", type=int, default=6, help="candidates per group")
    parser.add_argument("--dtype", choices=list(dtypes), default=dtype)


def time_call(fn, repeats: int, warmup: int = 1, sync=None) -> list[float]:
    """Wall-clock seconds of `repeats` calls after `warmup` discarded ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return times


def quantiles(values: list[float]) -> dict[str, float]:
    if len(values) == 1:
        return {"p50": values[0], "p20": values[0], "p80": values[0]}
    q = statistics.quantiles(values, n=10, method="inclusive")
    return {"p50": statistics.median(values), "p20": q[1], "p80": q[7]}


def run_worker(script: Path, args: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run `script --worker ...` in a fresh process (with `env` added to its environment); it prints one
    JSON line last."""
    env = dict(os.environ, **WORKER_ENV, **(env or {}))
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def environment() -> dict:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=RESULTS.parent).stdout.strip()
    except OSError:
        sha = ""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu: {platform.processor() or platform.machine()} x{os.cpu_count()}"
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
            device = f"cpu: {name} x{os.cpu_count()}"
        except (OSError, StopIteration):
            pass
    return {"gpu": device, "torch": torch.__version__, "triton": triton_version, "git_sha": sha,
            "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def cpu_description() -> str:
    """The CPU model and the SIMD features the C++ backend's levels need, from /proc/cpuinfo, e.g.
    "AMD EPYC (family 25, model 17) x2; AVX2 yes, AVX-512 (f/bw/vl/dq) no"."""
    fields, flags = {}, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "flags":
                    flags = set(value.split())
                    break
                fields.setdefault(key, value.strip())
    except OSError:
        return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"
    name = fields.get("model name", platform.machine())
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"

    def has(*features: str) -> str:
        return "yes" if set(features) <= flags else "no"

    return (f"{name} x{os.cpu_count()}; AVX2 {has('avx2', 'fma', 'f16c')}, "
            f"AVX-512 (f/bw/vl/dq) {has('avx512f', 'avx512bw', 'avx512vl', 'avx512dq')}")


def append_csv(path: Path, rows: list[dict]) -> None:
    """Merge rows into the CSV: a row with the same key (op, provider, mode, metric, x, config, gpu) is
    replaced."""
    key = ("op", "provider", "mode", "metric", "x_name", "x_value", "config_json", "gpu")
    existing = []
    if path.exists():
        with path.open() as f:
            existing = list(csv.DictReader(f))
    new_keys = {tuple(str(r[k]) for k in key) for r in rows}
    kept = [r for r in existing if tuple(str(r[k]) for k in key) not in new_keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(kept + rows)
    tmp.replace(path)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
