"""Fused loss microbenchmark: forward+backward of `aft_loss` and `linear_logprob` per provider.

Providers, all on the same inputs in one run:
  eager   the unfused reference (full [T, V] logits, log_softmax, autograd): aft_fast.reference
  trl     TRL 1.16's chunked LM-head log-prob (trl.kernels.ChunkedLogProbFunction, the head behind its
          add_fused_lm_head and DPO/KTO/GRPO/RLOO/SFT): per-token log-probs of the scored rows, summed
          per segment, then the same loss
  torch   aft_fast, backend="torch" (chunked pure PyTorch)
  cpp     aft_fast, backend="cpp" (the C++ extension), its products by the library it picks at run time
          (oneDNN where it runs, else ATen's mm: cpu_info()["gemm"])
  cpp-aten  the same with AFT_FAST_CPU_GEMM=aten: ATen's mm (MKL), what a CPU without AVX-512 runs
  cpp-keep  linear_logprob only: backend="cpp", keep_probs=True (fp16 probabilities kept for backward:
          three products instead of four, T x V x 2 bytes more memory)
  cce     Cut Cross-Entropy's linear_cross_entropy (its CPU path: torch.compile), per-token log-probs
          summed per segment, then the same loss
  liger   Liger-Kernel's chunked CPO loss (its CPU path: torch.compile per chunk): the same tokens
          scored as length-normalized chosen/rejected pairs, its own pairwise loss
  floor   the three [T,H]x[H,V]-sized matrix products alone (logits, grad_hidden, grad_weight), by
          torch.mm (MKL), as eager, cce and liger run them
  floor-onednn  the same three products by oneDNN, where the cpp backend uses it; "vs matmul floor" is
          to the faster of the two floors, "vs same-library floor" to the floor of the library that
          ran the provider's products (column "products by")

Default shape: T=4096 scored tokens in groups of k=6 candidates plus a reference chain, H=1024,
V=32000, fp32. Reports the median time of forward+backward, the peak memory each adds over the
inputs, its gradients included (see _common.py), and ratios to the matmul floor and to eager.
The header names the CPU, its AVX2 / AVX-512 flags and the cpp backend's SIMD level and GEMM path.
Writes benchmarks/results/bench_loss.{csv,md}.

    python benchmarks/bench_loss.py                      # default shape, all providers
    python benchmarks/bench_loss.py --tokens 512 --vocab 4000 --hidden 256 --repeats 2   # quick
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path

try:
    from benchmarks import _common  # python -m benchmarks.bench_loss
except ImportError:
    import _common  # python benchmarks/bench_loss.py: the script's own folder is on sys.path

HERE = Path(__file__).resolve()
PROVIDERS = ["eager", "trl", "torch", "cpp", "cpp-aten", "cpp-keep", "cce", "liger", "floor", "floor-onednn"]
# The cpp backend picks its GEMM once per process: cpp-aten's workers start with the choice forced.
WORKER_ENV = {"cpp-aten": {"AFT_FAST_CPU_GEMM": "aten"}}
ONLY_FOR = {"cpp-keep": "linear_logprob"}  # aft_loss forms its gradient in the forward pass: nothing to keep
OPS = ["aft_loss", "linear_logprob"]
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def make_batch(tokens: int, hidden_size: int, vocab: int, k: int, dtype, seed: int = 0, mean_len: int = 96):
    """A packed batch of exactly `tokens` scored tokens: groups of one reference and k candidates.

    Member lengths are ragged (mean_len/2 .. 3*mean_len/2); the last prompt row of a group predicts
    the first token of each member (prompt sharing), so rows repeat.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    rows, segments, group, label, is_ref = [], [], [], [], []
    pos, gi = 0, 0
    while len(rows) < tokens:
        prompt_row = pos
        pos += 1
        for m in range(k + 1):
            length = int(torch.randint(mean_len // 2, mean_len * 3 // 2 + 1, (1,), generator=g))
            length = min(length, tokens - len(rows))
            if length == 0:
                break
            seg = len(group)
            group.append(gi)
            is_ref.append(m == 0)
            label.append(int(m % 2 == 1))
            prev = prompt_row
            for _ in range(length):
                rows.append(prev)
                segments.append(seg)
                prev = pos
                pos += 1
        gi += 1
    hidden = torch.randn(pos, hidden_size, generator=g).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.02).to(dtype)
    return dict(
        hidden=hidden, weight=weight, rows=torch.tensor(rows), segments=torch.tensor(segments),
        targets=torch.randint(0, vocab, (tokens,), generator=g), group=torch.tensor(group),
        label=torch.tensor(label), is_reference=torch.tensor(is_ref),
    )


def build_call(op: str, provider: str, batch: dict):
    """A zero-argument closure running one forward+backward of `op` by `provider`."""
    import torch

    import aft_fast
    from aft_fast.losses.objectives import build_plan, objective
    from aft_fast.options import LossOptions
    from aft_fast.reference import aft_loss_ref, linear_logprob_ref

    hidden = batch["hidden"].requires_grad_()
    weight = batch["weight"].requires_grad_()
    rows, targets, segments = batch["rows"], batch["targets"], batch["segments"]
    S = batch["group"].numel()
    index = dict(rows=rows, targets=targets, segments=segments)
    groups = dict(group=batch["group"], label=batch["label"], is_reference=batch["is_reference"])
    upstream = torch.randn(S, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(segments, minlength=S).float()
    plan = build_plan(batch["group"], batch["label"], batch["is_reference"], counts)

    def clear():
        hidden.grad = weight.grad = None

    def finish(sums):
        """The op's scalar: the bcl loss of the sums, or a fixed random weighting of them."""
        if op == "aft_loss":
            return objective(sums.float(), counts, plan, LossOptions(mode="bcl"))[0]
        return (sums.float() * upstream).sum()

    if provider in ("floor", "floor-onednn"):
        if provider == "floor":
            def mm(a, b, out):
                torch.mm(a, b, out=out)
        else:
            from aft_fast.ops import cpp_chunks

            info = cpp_chunks.cpu_info()
            if info.get("gemm") != "onednn":
                raise RuntimeError(f"the cpp backend runs no oneDNN here ({info.get('gemm_reason', info)})")
            mm = cpp_chunks.gemm
        T, V, H = rows.numel(), weight.shape[0], weight.shape[1]
        h = hidden.detach()[rows]
        w = weight.detach()
        buf = torch.empty(T, V, dtype=w.dtype)
        gh, gw = torch.empty(T, H, dtype=w.dtype), torch.empty(V, H, dtype=w.dtype)

        def call():
            mm(h, w.t(), buf)
            mm(buf, w, gh)
            mm(buf.t(), h, gw)

        return call

    if provider in ("torch", "cpp", "cpp-aten", "cpp-keep"):
        backend, keep = provider.split("-")[0], provider.endswith("-keep")
        if op == "aft_loss":
            def call():
                clear()
                out = aft_fast.aft_loss(hidden, weight, **index, **groups, mode="bcl", backend=backend)
                out.loss.backward()
        else:
            def call():
                clear()
                finish(aft_fast.linear_logprob(hidden, weight, **index, num_segments=S, backend=backend,
                                               keep_probs=keep)).backward()
        return call

    if provider == "eager":
        if op == "aft_loss":
            def call():
                clear()
                aft_loss_ref(hidden, weight, **index, **groups, mode="bcl").loss.backward()
        else:
            def call():
                clear()
                finish(linear_logprob_ref(hidden, weight, **index, num_segments=S)).backward()
        return call

    if provider == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def call():
            clear()
            nll = linear_cross_entropy(hidden[rows], weight, targets, reduction="none", impl="torch_compile")
            finish(torch.zeros(S).index_add(0, segments, -nll.float())).backward()
        return call

    if provider == "trl":
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE  # the vocab tile its fused head passes

        def call():
            clear()
            # (hidden, weight, bias, targets, temperature, vocab tile, softcap, logit scale, extra outputs)
            logp = ChunkedLogProbFunction.apply(hidden[rows], weight, None, targets, 1.0,
                                                _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ())[0]
            finish(torch.zeros(S).index_add(0, segments, logp.float())).backward()
        return call

    if provider == "liger":
        from liger_kernel.chunked_loss.cpo_loss import LigerFusedLinearCPOFunction

        # Liger scores fixed-length chosen/rejected pairs: the same T tokens as 2B rows of length L.
        T = rows.numel()
        L = 64
        pairs = T // (2 * L)
        x_rows = rows[: 2 * pairs * L]
        x_targets = targets[: 2 * pairs * L].view(2 * pairs, L)
        chunk_pairs = max(1, 512 // (2 * L))  # ~512 tokens per chunk, as the fused backends use

        def call():
            clear()
            x = hidden[x_rows].view(2 * pairs, L, -1)
            out = LigerFusedLinearCPOFunction.apply(x, weight, x_targets, None, -100, 0.1, 0.0, 0.0, False,
                                                    True, True, chunk_pairs)
            out[0].backward()
        return call

    raise ValueError(f"unknown provider {provider!r}")


def worker(args) -> None:
    """One provider in a fresh process: warm up, measure the peak it adds, then time it."""
    import torch

    torch.manual_seed(0)
    batch = make_batch(args.tokens, args.hidden, args.vocab, args.k, getattr(torch, DTYPES[args.dtype]))
    call = build_call(args.op, args.provider, batch)
    warmup = 2 if args.provider in ("cce", "liger") else 1  # compile, then settle
    for _ in range(warmup):
        call()
    # The baseline is the inputs alone: what the call allocates, its gradients included, is "added".
    batch["hidden"].grad = batch["weight"].grad = None
    gc.collect()
    base = _common.reset_peak_memory()
    call()
    added = _common.peak_memory() - base
    times = _common.time_call(call, repeats=args.repeats, warmup=0)
    print(json.dumps({"times": times, "peak_added": added, "gemm": products_by(args.provider)}))


def products_by(provider: str) -> str:
    """The library that ran the provider's [T, H] x [H, V]-sized products in this process."""
    if provider.startswith("cpp"):
        from aft_fast.ops import cpp_chunks

        return "oneDNN" if cpp_chunks.cpu_info()["gemm"] == "onednn" else "ATen mm"
    return "oneDNN" if provider == "floor-onednn" else "ATen mm"


def cpp_paths() -> str:
    """The cpp backend's SIMD level and GEMM path in a plain process (what `cpp` runs), and why."""
    code = "from aft_fast.ops import cpp_chunks; print(cpp_chunks.cpu_info()['summary'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE.parents[1])
    return proc.stdout.strip() if proc.returncode == 0 else f"cpp backend: {proc.stderr.strip()[-200:]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_problem_args(parser, tokens=4096, hidden=1024, vocab=32000, dtypes=DTYPES, dtype="fp32")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per provider and round")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds over the providers, each in a fresh process (median over all calls)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma list of {OPS}")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {PROVIDERS}")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per provider")
    parser.add_argument("--out", type=Path, default=_common.RESULTS, help="folder for bench_loss.{csv,md}")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--op", help=argparse.SUPPRESS)
    parser.add_argument("--provider", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    ops = [o for o in args.ops.split(",") if o]
    providers = [p for p in args.providers.split(",") if p]
    for name, values, known in (("--ops", ops, OPS), ("--providers", providers, PROVIDERS)):
        unknown = sorted(set(values) - set(known))
        if unknown:
            parser.error(f"{name}: unknown {unknown}; expected from {known}")
    shape = dict(tokens=args.tokens, hidden=args.hidden, vocab=args.vocab, k=args.k, dtype=args.dtype)
    env = _common.environment()
    config = json.dumps(shape, sort_keys=True)
    csv_rows, sections = [], []
    for op in ops:
        results = {}
        # Rounds interleave the providers, so that a slow spell of a shared machine hits them alike.
        for rnd in range(args.rounds):
            for provider in providers:
                if ONLY_FOR.get(provider, op) != op or "error" in results.get(provider, {}):
                    continue
                print(f"[bench_loss] {op} / {provider} (round {rnd + 1}/{args.rounds}) ...", file=sys.stderr,
                      flush=True)
                worker_args = ["--worker", "--op", op, "--provider", provider,
                               "--repeats", str(args.repeats), *(f"--{k}={v}" for k, v in shape.items())]
                try:
                    r = _common.run_worker(HERE, worker_args, timeout=args.timeout,
                                           env=WORKER_ENV.get(provider))
                except Exception as exc:  # a missing optional library or a timeout: report, keep going
                    results[provider] = {"error": [f"{type(exc).__name__}: {exc}"]}
                    continue
                prev = results.setdefault(provider, {"times": [], "peak_added": 0})
                prev["gemm"] = r["gemm"]
                prev["times"] += r["times"]
                prev["peak_added"] = max(prev["peak_added"], r["peak_added"])
        sections.append(_section(op, results, shape))
        for provider, r in results.items():
            if "error" in r:
                continue
            q = _common.quantiles(r["times"])
            csv_rows.append(dict(op=op, provider=provider, mode="fwd_bwd", metric="time", unit="ms",
                                 x_name="T", x_value=args.tokens, config_json=config,
                                 **{k: round(v * 1e3, 2) for k, v in q.items()}, **env))
            if not provider.startswith("floor"):
                mib = round(r["peak_added"] / 2**20, 1)
                csv_rows.append(dict(op=op, provider=provider, mode="fwd_bwd", metric="peak_memory_added",
                                     unit="MiB", x_name="T", x_value=args.tokens, config_json=config,
                                     p50=mib, p20=mib, p80=mib, **env))
    header = (f"# bench_loss\n\n`python benchmarks/bench_loss.py {' '.join(sys.argv[1:])}`".rstrip() +
              f"\n\nT={args.tokens} scored tokens in groups of k={args.k} (+1 reference), H={args.hidden}, "
              f"V={args.vocab}, {args.dtype}; median of {args.rounds} x {args.repeats} forward+backward "
              f"calls (rounds interleave the providers).\n"
              f"CPU: {_common.cpu_description()}; torch {env['torch']}, commit {env['git_sha']}, "
              f"{env['timestamp']}.\n{cpp_paths()}; `cpp-aten` forces ATen's mm (AFT_FAST_CPU_GEMM=aten).\n")
    text = header + "\n" + "\n\n".join(sections) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_loss.md").write_text(text)
    _common.append_csv(args.out / "bench_loss.csv", csv_rows)


def _section(op: str, results: dict, shape: dict) -> str:
    def median(p):
        r = results.get(p, {})
        return None if "error" in r or "times" not in r else _common.quantiles(r["times"])["p50"]

    floors = [t for t in (median("floor"), median("floor-onednn")) if t is not None]
    floor, eager = min(floors, default=None), median("eager")
    same_floor = {"ATen mm": median("floor"), "oneDNN": median("floor-onednn")}
    eager_mem = results.get("eager", {}).get("peak_added")
    rows = []
    for provider, r in results.items():
        if "error" in r:
            rows.append([provider, "failed: " + " ".join(r["error"])[:100], "", "", "", "", "", ""])
            continue
        t = median(provider)
        mem = r.get("peak_added") if not provider.startswith("floor") else None
        lib_floor = same_floor.get(r.get("gemm"))
        rows.append([
            provider,
            r.get("gemm", ""),
            f"{t * 1e3:.0f}",
            f"{t / floor:.2f}x" if floor else "",
            f"{t / lib_floor:.2f}x" if lib_floor else "",
            f"{t / eager:.2f}x" if eager else "",
            f"{mem / 2**20:.0f}" if mem is not None else "n/a",
            f"{mem / eager_mem:.0%}" if mem is not None and eager_mem else "",
        ])
    table = _common.markdown_table(
        ["provider", "products by", "fwd+bwd ms (median)", "vs matmul floor", "vs same-library floor",
         "vs eager", "peak added MiB", "memory vs eager"],
        rows)
    return f"## {op}\n\n{table}"


if __name__ == "__main__":
    main()
