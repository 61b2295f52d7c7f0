"""The vLLM side of `VLLMSampler` (aft_fast/eval/vllm_sampler.py): run by vLLM's own interpreter
(`--vllm_python`), never imported by the project. It imports only the standard library, torch and vllm.

Protocol: one JSON object per line on stdin, one answer per line on the descriptor that was stdout (stdout
itself is pointed at stderr first, so that no library print can break the protocol).

    {"op": "init", "model": PATH, "dtype": "float32", "seed": 0, ...engine options}
        -> {"ok": true, "vllm": VERSION, "torch": VERSION}
    {"op": "generate", "prompts": [[ids]], "n": k, "temperature": t, "top_p": p, "max_tokens": m,
     "stop_token_ids": [eos], "seed": S | null}
        -> {"ok": true, "outputs": [[[ids] * k] * len(prompts)]}
    any failure -> {"ok": false, "error": TEXT}; end of stdin -> exit 0.

Prompts go in as token ids and chains come back as token ids: the project encodes and decodes both, so
prompt formats and text are its own. temperature 0 is greedy. A generate request with a seed reseeds the
engine's sampler first (the per-request `SamplingParams(seed=...)` kills vLLM's CPU engine).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, TextIO

# Run as a script, this folder would lead sys.path, and its modules (evaluate.py, metrics.py, ...) could
# shadow packages of the same name that vLLM's dependencies import.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]


def _seed_worker(_worker: Any, seed: int) -> None:
    """Seed one engine worker's generators (vLLM's CPU sampler draws its noise from torch's default one)."""
    import random

    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def _init(msg: dict[str, Any]) -> Any:
    import vllm

    kwargs: dict[str, Any] = dict(
        model=msg["model"],
        dtype=msg.get("dtype", "auto"),
        seed=int(msg.get("seed", 0)),
        skip_tokenizer_init=True,  # token ids in, token ids out
        generation_config="vllm",  # no sampling defaults from the model folder: the request says all
        # A batch's chains must not depend on what the engine ran before it (or on which rank runs it).
        enable_prefix_caching=False,
        enforce_eager=bool(msg.get("enforce_eager", True)),
        tensor_parallel_size=int(msg.get("tensor_parallel_size", 1)),
    )
    if msg.get("gpu_memory_utilization") is not None:
        kwargs["gpu_memory_utilization"] = float(msg["gpu_memory_utilization"])
    if msg.get("kv_cache_bytes"):
        kwargs["kv_cache_memory_bytes"] = int(msg["kv_cache_bytes"])
    if msg.get("max_model_len"):
        kwargs["max_model_len"] = int(msg["max_model_len"])
    return vllm.LLM(**kwargs)


def _generate(llm: Any, msg: dict[str, Any]) -> list[list[list[int]]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    if msg.get("seed") is not None:
        llm.collective_rpc(_seed_worker, args=(int(msg["seed"]),))
    temperature = float(msg["temperature"])
    params = SamplingParams(
        n=int(msg["n"]),
        temperature=temperature,
        top_p=float(msg["top_p"]) if temperature > 0 else 1.0,
        top_k=0 if temperature > 0 else -1,  # no top-k cut, as the Hugging Face sampler's top_k=0
        max_tokens=int(msg["max_tokens"]),
        stop_token_ids=list(msg["stop_token_ids"]),
        detokenize=False,
    )
    prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in msg["prompts"]]
    results = llm.generate(prompts, params, use_tqdm=False)
    return [[list(c.token_ids) for c in sorted(r.outputs, key=lambda c: c.index)] for r in results]


def _answer(out: TextIO, payload: dict[str, Any]) -> None:
    out.write(json.dumps(payload) + "\n")
    out.flush()


def main() -> int:
    """Serve requests until stdin ends; 1 when the engine could not start."""
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    llm = None
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
            if msg["op"] == "init":
                llm = _init(msg)
                import torch
                import vllm

                _answer(out, {"ok": True, "vllm": vllm.__version__, "torch": torch.__version__})
            elif msg["op"] == "generate":
                if llm is None:
                    raise RuntimeError("generate before init")
                _answer(out, {"ok": True, "outputs": _generate(llm, msg)})
            else:
                raise ValueError(f"unknown op {msg['op']!r}")
        except Exception:
            _answer(out, {"ok": False, "error": traceback.format_exc()})
            if llm is None:
                return 1
    out.close()
    sys.stderr.flush()
    os._exit(0)  # the caller closed the pipe: done. The engine holds nothing to flush; skip its teardown


if __name__ == "__main__":  # vLLM may spawn processes that import this file: start nothing on import
    sys.exit(main())
