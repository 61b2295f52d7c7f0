"""GPU benchmark of the fused AFT loss: the triton backend against eager PyTorch, torch.compile,
Liger-Kernel and Cut Cross-Entropy, with the matmul floor measured in the same run.

Providers (every one but floor computes the same bcl AFT loss of the same batch, checked below):
  triton_chunked aft_fast.aft_loss(backend="triton") with the chunked strategy (the default): whole
                 groups per chunk, three cuBLAS products per chunk around Triton row kernels
  triton_fused   the same with the fused strategy: Triton forward and recomputing backward (four
                 products, logits never stored), exact gradient filter
  triton_cce     the fused strategy with Cut Cross-Entropy's tile skipping (GRAD_FILTER="cce": approximate)
  triton         the triton backend's default strategy (accepted in --providers, not run by default)
  eager          the unfused reference: linear_logprob_ref (full [T, V] logits in the input dtype, fp32
                 log_softmax) and aft_fast's vectorized objective on the [S] segment sums, autograd
  torch_compile  torch.compile of that same function
  liger          Liger-Kernel's fused linear cross-entropy (reduction="none") for the per-token log-probs,
                 then the same segment sums and objective
  cce            Cut Cross-Entropy's linear_cross_entropy (reduction="none", its default filter), likewise
  trl            TRL's chunked LM-head log-prob (trl.kernels.ChunkedLogProbFunction, the head behind its
                 fused_lm_head=True, at the vocab chunk its trainers use), likewise
  floor          the [T,H]x[H,V]-sized products alone with cuBLAS (logits, grad_hidden, grad_weight; only
                 the first in mode fwd): the bound every fused kernel is measured against

Default shape: T=8192 scored tokens in groups of k=6 candidates plus a reference chain, H=4096,
V=128256 (Llama 3 8B's head), bf16. Each provider runs in a fresh process: warm-up calls (compilation,
autotuning) are discarded, the peak memory it adds beyond the inputs is read once, then `--repeats`
timed calls give p50 (p20, p80). TFLOP/s counts only the floor's products, so it is comparable across
providers. Writes benchmarks/results/gpu_check_<date>_<gpu>.md and rows of benchmarks/results/bench_gpu.csv.

    python benchmarks/bench_gpu.py                       # H200-sized run, all providers
    python benchmarks/bench_gpu.py --dry-run             # tiny shape on the CPU (triton interpreted)
    python benchmarks/bench_gpu.py --goals benchmarks/results   # the goals table from the CSVs there
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import re
import sys
import tempfile
from pathlib import Path

try:
    from benchmarks import _common  # python -m benchmarks.bench_gpu
    from benchmarks.bench_loss import make_batch
except ImportError:
    import _common  # python benchmarks/bench_gpu.py: the script's own folder is on sys.path
    from bench_loss import make_batch

HERE = Path(__file__).resolve()
# Run in this order: the essential ones first, torch.compile (the slowest to warm up) last.
PROVIDERS = ["floor", "triton_chunked", "triton_fused", "eager", "triton_cce", "liger", "cce", "trl",
             "torch_compile"]
# The triton providers' strategy (aft_fast.ops.triton_backend.STRATEGY); None: the backend's default.
TRITON_STRATEGY = {"triton": None, "triton_chunked": "chunked", "triton_fused": "fused",
                   "triton_cce": "fused"}
MODES = ["fwd_bwd", "fwd"]
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DRY_RUN = dict(tokens=96, hidden=32, vocab=300, k=3, dtype="fp32", repeats=2, warmup=1,
               providers="triton_chunked,triton_fused,eager,floor")


def build_batch(tokens: int, hidden_size: int, vocab: int, k: int, dtype, device, weight_std: float,
                seed: int = 0) -> dict:
    """bench_loss's packed layout (ragged members, prompt sharing), hidden and weight drawn on `device`."""
    import torch

    batch = make_batch(tokens, 1, vocab, k, torch.float32, seed=seed)  # its [*, 1] hidden, weight: dropped
    g = torch.Generator(device=device).manual_seed(seed)
    rows_total = batch["hidden"].shape[0]
    batch["hidden"] = torch.randn(rows_total, hidden_size, generator=g, device=device).to(dtype)
    batch["weight"] = (torch.randn(vocab, hidden_size, generator=g, device=device) * weight_std).to(dtype)
    for key in ("rows", "targets", "segments", "group", "label", "is_reference"):
        batch[key] = batch[key].to(device)
    return batch


def build_call(provider: str, batch: dict, mode: str):
    """A zero-argument closure running one call (forward, or forward+backward) of `provider`; it returns
    the loss (None for floor)."""
    import torch

    from aft_fast.losses.objectives import build_plan, objective
    from aft_fast.options import LossOptions
    from aft_fast.reference import linear_logprob_ref

    grad = mode == "fwd_bwd"
    hidden = batch["hidden"].requires_grad_(grad)
    weight = batch["weight"].requires_grad_(grad)
    rows, targets, segments = batch["rows"], batch["targets"], batch["segments"]
    S = batch["group"].numel()
    counts = torch.bincount(segments, minlength=S).float()
    plan = build_plan(batch["group"], batch["label"], batch["is_reference"], counts)
    cfg = LossOptions(mode="bcl")

    def loss_of_logp(logp):
        sums = torch.zeros(S, dtype=torch.float32, device=logp.device).index_add(0, segments, logp.float())
        return objective(sums, counts, plan, cfg)[0]

    def run(loss_fn):
        def call():
            hidden.grad = weight.grad = None
            with torch.set_grad_enabled(grad):
                loss = loss_fn(hidden, weight)
                if grad:
                    loss.backward()
            return loss.detach()

        return call

    if provider == "floor":
        T, (V, H) = rows.numel(), weight.shape
        h, w = hidden.detach()[rows], weight.detach()
        buf = torch.empty(T, V, dtype=w.dtype, device=w.device)
        gh = torch.empty(T, H, dtype=w.dtype, device=w.device)
        gw = torch.empty(V, H, dtype=w.dtype, device=w.device)

        def call():
            torch.mm(h, w.t(), out=buf)
            if grad:
                torch.mm(buf, w, out=gh)
                torch.mm(buf.t(), h, out=gw)

        return call

    if provider in TRITON_STRATEGY:
        import aft_fast
        from aft_fast.ops import triton_backend as triton_impl

        triton_impl.GRAD_FILTER = "cce" if provider == "triton_cce" else "exact"
        triton_impl.STRATEGY = TRITON_STRATEGY[provider] or triton_impl.STRATEGY
        index = dict(rows=rows, targets=targets, segments=segments, group=batch["group"],
                     label=batch["label"], is_reference=batch["is_reference"])
        return run(lambda h, w: aft_fast.aft_loss(h, w, **index, mode="bcl", backend="triton").loss)

    def eager(h, w):
        sums = linear_logprob_ref(h, w, rows=rows, targets=targets, segments=segments, num_segments=S)
        return objective(sums, counts, plan, cfg)[0]

    if provider == "eager":
        return run(eager)
    if provider == "torch_compile":
        return run(torch.compile(eager))
    if provider == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        nll = LigerFusedLinearCrossEntropyLoss(reduction="none")
        return run(lambda h, w: loss_of_logp(-nll(w, h[rows], targets)))
    if provider == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return run(lambda h, w: loss_of_logp(-linear_cross_entropy(h[rows], w, targets, reduction="none")))
    if provider == "trl":
        from trl.kernels import ChunkedLogProbFunction

        try:  # the vocab chunk that trl.trainer.utils passes (importing that module needs datasets)
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
        except ImportError:
            chunk = 32768  # its value in TRL 1.16
        # (hidden, weight, bias, targets, temperature, vocab chunk, softcap, logit scale, extra outputs)
        return run(lambda h, w: loss_of_logp(
            ChunkedLogProbFunction.apply(h[rows], w, None, targets, 1.0, chunk, None, 1.0, ())[0]))
    raise ValueError(f"provider: unknown {provider!r}")


def _tuned_configs() -> str:
    """The block configs the triton autotuner picked in this process ('' when it did not run)."""
    try:
        from aft_fast.kernels import linear_logprob, linear_logprob_bwd
    except ImportError:
        return ""
    picked = []
    for name, tuners in (("fwd", linear_logprob._fwd_tuned), ("bwd", linear_logprob_bwd._bwd_tuned)):
        for tuner in tuners:
            best = getattr(tuner, "best_config", None)
            if best is not None:
                picked.append(f"{name}: {best}")
    return "; ".join(picked)


def worker(args) -> None:
    """One provider in this fresh process: warm up, read the peak memory it adds, then time it."""
    import torch

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    batch = build_batch(args.tokens, args.hidden, args.vocab, args.k, getattr(torch, DTYPES[args.dtype]),
                        device, args.weight_std)
    call = build_call(args.provider, batch, args.mode)
    sync = torch.cuda.synchronize if cuda else None
    for _ in range(args.warmup):
        call()
    if cuda:
        base = _common.cuda_peak_reset()
        loss = call()
        torch.cuda.synchronize()
        added = torch.cuda.max_memory_allocated() - base
    else:
        base = _common.reset_peak_memory()
        loss = call()
        added = _common.peak_memory() - base
    times = _common.time_call(call, repeats=args.repeats, warmup=0, sync=sync)
    notes = _tuned_configs() if args.provider.startswith("triton") and cuda else ""
    if args.provider in TRITON_STRATEGY and cuda:
        from aft_fast.ops import triton_backend as triton_impl
        from aft_fast.ops import triton_chunks

        if triton_impl.STRATEGY == "chunked":
            has_mm, has_addmm = triton_chunks._fp32_out_products()
            notes = (f"strategy chunked, chunk buffer {triton_chunks.CHUNK_BYTES >> 20} MiB, fp32-output "
                     f"cuBLAS products mm={has_mm} addmm={has_addmm}")
    print(json.dumps({"times": times, "peak_added": added, "loss": None if loss is None else float(loss),
                      "notes": notes}))


def summarize(results: dict, shape: dict, mode: str) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, warnings) of the markdown table, from each provider's worker result."""
    products = 3 if mode == "fwd_bwd" else 1
    flop = products * 2.0 * shape["tokens"] * shape["hidden"] * shape["vocab"]

    def p50(name):
        r = results.get(name, {})
        return _common.quantiles(r["times"])["p50"] if "times" in r else None

    floor, eager_loss = p50("floor"), results.get("eager", {}).get("loss")
    header = ["provider", f"{mode} ms p50 (p20-p80)", "peak added MiB",
              f"TFLOP/s ({products} product{'s' if products > 1 else ''})",
              "vs floor", "loss", "loss vs eager"]
    rows, warnings = [], []
    for name, r in results.items():
        if "times" not in r:
            rows.append([name, "failed: " + " ".join(r.get("error", ["?"]))[:100], "", "", "", "", ""])
            continue
        q = _common.quantiles(r["times"])
        loss = r.get("loss")
        rel = None
        if loss is not None and eager_loss is not None:
            rel = abs(loss - eager_loss) / max(abs(eager_loss), 1e-12)
        if rel is not None and rel > 1e-2:
            warnings.append(f"{name}: loss {loss:.6g} differs from eager's {eager_loss:.6g} by {rel:.2%}")
        rows.append([
            name,
            f"{q['p50'] * 1e3:.2f} ({q['p20'] * 1e3:.2f}-{q['p80'] * 1e3:.2f})",
            "n/a" if name == "floor" else f"{r['peak_added'] / 2**20:.0f}",
            f"{flop / q['p50'] / 1e12:.1f}",
            f"{q['p50'] / floor:.2f}x" if floor else "",
            "" if loss is None else f"{loss:.6g}",
            "" if rel is None else f"{rel:.1e}",
        ])
    return header, rows, warnings


def report_path(out: Path, gpu: str, when: dt.datetime) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") or "unknown"
    return out / f"gpu_check_{when:%Y-%m-%d}_{slug}.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_problem_args(parser, tokens=8192, hidden=4096, vocab=128256, dtypes=DTYPES, dtype="bf16")
    parser.add_argument("--mode", choices=MODES, default="fwd_bwd")
    parser.add_argument("--weight-std", type=float, default=0.02,
                        help="std of the LM head entries (0.02: an initialized head)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per provider")
    parser.add_argument("--warmup", type=int, default=3, help="discarded calls first (compile, autotune)")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {PROVIDERS}")
    parser.add_argument("--timeout", type=float, default=150, help="seconds allowed per provider")
    parser.add_argument("--out", type=Path, default=None, help="folder for the results (default "
                        "benchmarks/results; a temporary folder for --dry-run)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shape on the CPU, triton interpreted: checks the script, not speed")
    parser.add_argument("--goals", type=Path, metavar="DIR", help="print the table of the latest results in "
                        "DIR (bench_gpu.csv, bench_step.csv) against the project's goals, and exit")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--provider", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.goals:
        print(goals_report(args.goals))
        return 0

    if args.dry_run:
        for key, value in DRY_RUN.items():
            if parser.get_default(key) == getattr(args, key):  # keep what was given explicitly
                setattr(args, key, value)
        os.environ["TRITON_INTERPRET"] = "1"  # the workers import triton with it
        device, out = "cpu", args.out or Path(tempfile.mkdtemp(prefix="bench_gpu_dry_run_"))
    else:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on a GPU machine, or pass --dry-run")
        device, out = "cuda", args.out or _common.RESULTS
    providers = [p for p in args.providers.split(",") if p]
    unknown = sorted(set(providers) - set(PROVIDERS) - set(TRITON_STRATEGY))
    if unknown:
        parser.error(f"--providers: unknown {unknown}; expected from {PROVIDERS}")
    for name in ("tokens", "hidden", "vocab", "k", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected a positive integer, got {getattr(args, name)}")

    shape = dict(tokens=args.tokens, hidden=args.hidden, vocab=args.vocab, k=args.k, dtype=args.dtype)
    command = " ".join(["python benchmarks/bench_gpu.py", *(sys.argv[1:] if argv is None else argv)])
    env = _common.environment()
    path = report_path(out, env["gpu"], dt.datetime.now())
    results, warnings = {}, []
    for provider in providers:
        print(f"[bench_gpu] {provider} ...", file=sys.stderr, flush=True)
        worker_args = ["--worker", f"--provider={provider}", f"--device={device}", f"--mode={args.mode}",
                       f"--repeats={args.repeats}", f"--warmup={args.warmup}",
                       f"--weight-std={args.weight_std}", *(f"--{k}={v}" for k, v in shape.items())]
        try:
            results[provider] = _common.run_worker(HERE, worker_args, timeout=args.timeout)
        except Exception as exc:  # a missing library, a timeout: report it and go on with the others
            results[provider] = {"error": [f"{type(exc).__name__}: {exc}"]}
        status = "ok" if "times" in results[provider] else "failed: " + " ".join(results[provider]["error"])
        print(f"[bench_gpu] {provider}: {status}", file=sys.stderr, flush=True)
        # Rewrite the report after every provider: an outer time limit still leaves what was measured.
        text, warnings = write_report(out, path, results, shape, args, env, command)
    print(text)
    print(f"[bench_gpu] wrote {path} and {out / 'bench_gpu.csv'}", file=sys.stderr)
    failed = [p for p, r in results.items() if "times" not in r]
    # A provider that is not installed is not a failure of aft_fast; triton failing or a wrong loss is.
    return 1 if warnings or any(p.startswith("triton") or p in ("eager", "floor") for p in failed) else 0


def write_report(out: Path, path: Path, results: dict, shape: dict, args, env: dict, command: str):
    """Write the markdown report and merge the CSV rows; return (markdown text, loss warnings)."""
    header, rows, warnings = summarize(results, shape, args.mode)
    notes = [f"- {p}: {'' if r['notes'].startswith('strategy') else 'autotuned '}{r['notes']}"
             for p, r in results.items() if r.get("notes")]
    text = "\n".join([
        f"# GPU check: fused AFT loss ({env['gpu']})",
        "",
        f"`{command}`",
        "",
        f"T={args.tokens} scored tokens in groups of k={args.k} (+1 reference), H={args.hidden}, "
        f"V={args.vocab}, {args.dtype}, mode {args.mode}, loss bcl; head std {args.weight_std}. p50 of "
        f"{args.repeats} calls after {args.warmup} warm-up calls, each provider in a fresh process. "
        "TFLOP/s counts the floor's products only.",
        f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, commit {env['git_sha']}, "
        f"{env['timestamp']}.",
        "",
        _common.markdown_table(header, rows),
        *([""] + notes if notes else []),
        *([""] + [f"WARNING {w}" for w in warnings] if warnings else []),
        "",
    ])
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    config = json.dumps(shape, sort_keys=True)
    csv_rows = []
    for provider, r in results.items():
        if "times" not in r:
            continue
        q = {k: round(v * 1e3, 3) for k, v in _common.quantiles(r["times"]).items()}
        csv_rows.append(dict(op="aft_loss", provider=provider, mode=args.mode, metric="time", unit="ms",
                             x_name="T", x_value=args.tokens, config_json=config, **q, **env))
        if provider != "floor":
            mib = round(r["peak_added"] / 2**20, 1)
            csv_rows.append(dict(op="aft_loss", provider=provider, mode=args.mode, metric="peak_memory_added",
                                 unit="MiB", x_name="T", x_value=args.tokens, config_json=config,
                                 p50=mib, p20=mib, p80=mib, **env))
    _common.append_csv(out / "bench_gpu.csv", csv_rows)
    return text, warnings


# The goals of the triton backend, at the shape they are stated for (bench_gpu's defaults).
GOAL_SHAPE = dict(tokens=8192, hidden=4096, vocab=128256, k=6, dtype="bf16")
EXACT_TRITON = ("triton_chunked", "triton_fused", "triton")  # triton_cce's tile skipping is approximate


def _latest(path: Path, op: str) -> tuple[str, list[dict]]:
    """(device, rows) of `op` in the CSV at `path` measured on the device of its newest row."""
    if not path.exists():
        return "", []
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r["op"] == op]
    if not rows:
        return "", []
    device = max(rows, key=lambda r: r["timestamp"])["gpu"]
    return device, [r for r in rows if r["gpu"] == device]


def _value(rows: list[dict], provider: str, metric: str, mode: str = "fwd_bwd", **config) -> float | None:
    """p50 of the newest row of `provider`, `metric` and `mode` whose config holds `config`."""
    hits = [r for r in rows if r["provider"] == provider and r["metric"] == metric and r["mode"] == mode
            and all(json.loads(r["config_json"]).get(k) == v for k, v in config.items())]
    return float(max(hits, key=lambda r: r["timestamp"])["p50"]) if hits else None


def goals_report(folder: Path) -> str:
    """Markdown table of the newest results in `folder` against the goals (met / not met / not measured)."""
    gpu, loss_rows = _latest(folder / "bench_gpu.csv", "aft_loss")
    step_gpu, step_rows = _latest(folder / "bench_step.csv", "aft_step")
    shape = GOAL_SHAPE
    if loss_rows and _value(loss_rows, "floor", "time", **shape) is None:
        shape = json.loads(max(loss_rows, key=lambda r: r["timestamp"])["config_json"])  # e.g. --dry-run's
    at_goal_shape = shape == GOAL_SHAPE

    def loss(provider, metric="time"):
        return _value(loss_rows, provider, metric, **shape) if provider else None

    timed = [(loss(p), p) for p in EXACT_TRITON if loss(p) is not None]
    best_time, best = min(timed) if timed else (None, None)
    floor, eager_mem = loss("floor"), loss("eager", "peak_memory_added")
    triton_mem = loss(best, "peak_memory_added")
    padded = _value(step_rows, "padded", "time")
    shared = _value(step_rows, "shared", "time")

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    rows = []
    for goal, value, ok, shown in (
        ("triton aft_loss within 1.2x of the matmul floor", ratio(best_time, floor), lambda r: r <= 1.2,
         "{:.2f}x the floor"),
        ("triton aft_loss peak memory under 5% of eager's", ratio(triton_mem, eager_mem), lambda r: r < 0.05,
         "{:.1%} of eager's"),
        ("triton aft_loss faster than Cut Cross-Entropy", ratio(loss("cce"), best_time), lambda r: r > 1,
         "{:.2f}x faster"),
        ("triton aft_loss faster than TRL's chunked head", ratio(loss("trl"), best_time), lambda r: r > 1,
         "{:.2f}x faster"),
        ("shared-layout training step at least 1.5x the padded one", ratio(padded, shared),
         lambda r: r >= 1.5, "{:.2f}x the padded step"),
    ):
        if value is None:
            rows.append([goal, "not measured", ""])
        else:
            where = not step_gpu.startswith("cpu") if goal.startswith("shared") else at_goal_shape
            verdict = ("met" if ok(value) else "NOT met") if where else "n/a (not the goal's setting)"
            rows.append([goal, shown.format(value), verdict])
    lines = [
        "# GPU check: results against the goals",
        "",
        f"aft_loss: {gpu or 'no bench_gpu.csv rows'}, T={shape.get('tokens')}, H={shape.get('hidden')}, "
        f"V={shape.get('vocab')}, {shape.get('dtype')}, forward+backward (best exact triton provider: "
        f"{best}). "
        f"Training step: {step_gpu or 'no bench_step.csv rows'}.",
        "",
        _common.markdown_table(["goal", "measured", "verdict"], rows),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
