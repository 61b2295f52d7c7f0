"""`--sampler vllm`: chains from vLLM, run in an environment of its own.

vLLM pins an older transformers than the project does, so it cannot share the project's interpreter: it
runs in `--vllm_python` (`make vllm-env` creates `.venv-vllm` with vLLM's CPU build; on GPUs, any
interpreter that has vLLM). Each process (each rank) starts one worker there, `vllm_worker.py`, which
holds one engine (vLLM's offline `LLM` API) and answers JSON lines over pipes.

Why a worker over pipes, not vLLM's OpenAI-compatible server on loopback:
- reproducible: the engine runs in the worker's own thread of control (`VLLM_ENABLE_V1_MULTIPROCESSING=0`)
  and takes one batch at a time, so which sequences share a step never depends on timing, and each batch
  is reseeded with the same `batch_seed` as `HFSampler`'s. A server batches requests by arrival time; and
  vLLM's CPU engine crashes on the per-request seed that a server would need;
- nothing listens: no port to find per rank, no health polling; the worker ends when its pipe closes,
  with the stage or the process that started it;
- token ids both ways: the prompt is the project's own encoding (prompt format, bos) and the chain is
  decoded by the project's tokenizer, so prompts and texts mean the same under both samplers.

Temperature, top_p (no top-k cut), k and max_new_tokens are passed as `HFSampler` passes them; a chain
stops at the tokenizer's eos. Duplicates are dropped, chains labelled and scored by the caller, as for
`HFSampler`: scores and ref_logp come from the project's own operator, never from vLLM's log-probs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import torch
from transformers import PreTrainedTokenizerBase

from aft_fast.data.collate import encode_prompt
from aft_fast.eval.sampler import SamplingParams

DEFAULT_PYTHON = ".venv-vllm/bin/python"
SETUP = "make vllm-env"  # what creates DEFAULT_PYTHON (Makefile)
WORKER = Path(__file__).with_name("vllm_worker.py")
# The launcher's and the project interpreter's variables mean nothing to vLLM's own world of one process.
_DROP_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "CROSS_RANK",
    "CROSS_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "PYTHONPATH",
    "PYTHONHOME",
    "VIRTUAL_ENV",
)
_CPU_KV_CACHE_GB = 1.0  # the CPU engine's KV cache when vllm_kv_cache_gb is 0 (vLLM would take 92% of RAM)


@dataclass(frozen=True)
class VLLMOptions:
    """The engine's settings (TrainConfig's vllm_* fields). gpu_memory_utilization: the fraction of the GPU
    the engine may take; the default assumes the stage has the GPU to itself (it is capped at what is free
    when the stage's own model is loaded beside it). kv_cache_gb: 0 sizes the KV cache from that fraction
    on GPUs, and gives it 1 GiB on the CPU."""

    python: str = DEFAULT_PYTHON
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    kv_cache_gb: float = 0.0
    enforce_eager: bool = True  # no torch.compile warm-up: an engine per stage starts in seconds
    max_model_len: int = 0  # 0: the model's own limit


class VLLMError(RuntimeError):
    """The vLLM worker failed or died; the message holds the end of its log."""


def worker_env(device: torch.device | None = None, tensor_parallel_size: int = 1) -> dict[str, str]:
    """The worker's environment: this one without the launcher's rank variables and the interpreter's
    paths, the engine in the worker's own process, as many threads as torch uses here, and on CUDA the
    devices of this rank only."""
    env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # deterministic scheduling, reseedable sampler
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # vLLM drops to one thread per engine unless OMP_NUM_THREADS says otherwise; HFSampler uses torch's.
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    if device is not None and device.type == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        first = device.index or 0
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[first : first + tensor_parallel_size])
    return env


def check_vllm_python(python: str, *, field: str = "vllm_python") -> str:
    """The vLLM version that `python` imports. ValueError naming `field` and the command that creates the
    environment when the interpreter is missing or cannot import vLLM (a broken environment)."""
    fix = f"create it with `{SETUP}`, or point --{field} at a Python that has vLLM"
    exe = shutil.which(python) if os.sep not in python else (python if os.access(python, os.X_OK) else None)
    if exe is None:
        raise ValueError(f"{field}: {python} does not exist (the vLLM environment of --sampler vllm); {fix}")
    probe = "import torch, vllm; print(vllm.__version__)"
    try:
        proc = subprocess.run(
            [exe, "-c", probe], env=worker_env(), capture_output=True, text=True, timeout=600, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ValueError(f"{field}: {python} does not run ({exc}); {fix}") from None
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit {proc.returncode}"
        raise ValueError(f"{field}: {python} cannot import vllm ({last}); {fix}")
    return proc.stdout.strip().splitlines()[-1]


def engine_folder(model_dir: str | Path, dtype: torch.dtype, scratch: Path) -> Path:
    """The Hugging Face folder the engine loads: `model_dir` itself, or for a PEFT adapter folder its base
    with the adapters merged, written under `scratch`."""
    from aft_fast.models import adapters

    if not adapters.is_adapter_dir(model_dir):
        return Path(model_dir)
    merged = Path(scratch) / "merged"
    model = adapters.load_replica(model_dir, torch.device("cpu"), dtype)
    model.save_pretrained(merged, safe_serialization=True)
    del model
    return merged


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class VLLMSampler:
    """A `Sampler` whose chains come from a vLLM engine in a worker process (started on first use; `close`
    or a `with` block ends it). `seed` seeds the engine; each batch with a seed reseeds it, as
    `HFSampler` reseeds torch."""

    def __init__(
        self,
        model_dir: str | Path,
        tokenizer: PreTrainedTokenizerBase,
        *,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        options: VLLMOptions | None = None,
        device: torch.device | None = None,
    ):
        self.model_dir = Path(model_dir)
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.seed = seed
        self.options = options or VLLMOptions()
        self.device = device
        self.version: str | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._scratch: Path | None = None
        self._log: IO[str] | None = None

    # -- the worker ---------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._proc is not None:
            return
        opts = self.options
        self._scratch = Path(tempfile.mkdtemp(prefix="aft-vllm-"))
        self._log = (self._scratch / "worker.log").open("w+")
        folder = engine_folder(self.model_dir, self.dtype, self._scratch)
        on_cuda = self.device is not None and self.device.type == "cuda"
        util = opts.gpu_memory_utilization
        if on_cuda:  # what this process holds already (the model that scores) is not the engine's to take
            free, total = torch.cuda.mem_get_info(self.device)
            util = min(util, free / total - 0.02)
        kv_gb = opts.kv_cache_gb or (0.0 if on_cuda else _CPU_KV_CACHE_GB)
        self._proc = subprocess.Popen(
            [self.options.python, str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=worker_env(self.device, opts.tensor_parallel_size),
            text=True,
        )
        answer = self._ask(
            {
                "op": "init",
                "model": str(folder),
                "dtype": _dtype_name(self.dtype),
                "seed": self.seed,
                "gpu_memory_utilization": util if on_cuda else None,
                "tensor_parallel_size": opts.tensor_parallel_size,
                "kv_cache_bytes": int(kv_gb * 2**30),
                "enforce_eager": opts.enforce_eager,
                "max_model_len": opts.max_model_len,
            }
        )
        self.version = answer["vllm"]

    def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps(message) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            code = proc.wait()
            self._proc = None
            raise VLLMError(
                f"the vLLM worker ({self.options.python}) exited with {code}:\n{self._log_tail()}"
            )
        answer: dict[str, Any] = json.loads(line)
        if not answer.get("ok"):
            raise VLLMError(f"the vLLM worker failed on {message['op']}:\n{answer.get('error')}")
        return answer

    def _log_tail(self, chars: int = 4000) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()[-chars:]

    def close(self) -> None:
        """End the worker (its engine frees its memory) and remove the scratch folder."""
        proc, self._proc = self._proc, None
        if proc is not None:
            assert proc.stdin is not None
            try:
                proc.stdin.close()
                proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def __enter__(self) -> VLLMSampler:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # at interpreter exit, what close needs may be gone already
            pass

    # -- the Sampler ---------------------------------------------------------------------------------------
    def generate_ids(
        self, questions: list[str], params: SamplingParams, *, seed: int | None = None
    ) -> list[list[list[int]]]:
        """For each question, params.num_return_sequences chains as token ids, cut before the first eos."""
        self.start()
        eos = self.tokenizer.eos_token_id
        answer = self._ask(
            {
                "op": "generate",
                "prompts": [encode_prompt(self.tokenizer, q) for q in questions],
                "n": params.num_return_sequences,
                "temperature": params.temperature if params.do_sample else 0.0,
                "top_p": params.top_p if params.do_sample else 1.0,
                "max_tokens": params.max_new_tokens,
                "stop_token_ids": [eos],
                "seed": seed if params.do_sample else None,
            }
        )
        outputs: list[list[list[int]]] = answer["outputs"]
        if len(outputs) != len(questions):
            raise VLLMError(f"the vLLM worker answered {len(outputs)} prompts for {len(questions)}")
        return [[ids[: ids.index(eos)] if eos in ids else ids for ids in chains] for chains in outputs]

    def generate(
        self, questions: list[str], params: SamplingParams, *, seed: int | None = None
    ) -> list[list[str]]:
        return [
            self.tokenizer.batch_decode(chains, skip_special_tokens=True)
            for chains in self.generate_ids(questions, params, seed=seed)
        ]
