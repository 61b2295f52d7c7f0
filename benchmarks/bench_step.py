"""End-to-end AFT training step: forward + backward of the model and the loss, per batch layout.

Providers, all on the same groups in one run:
  naive   padded layout, the model's full logits through lm_head at every position, log_softmax, then the
          unfused loss of aft_fast.reference (what a Hugging Face training loop does)
  padded  one right-padded row per member, fused loss (aft_fast.models.forward.AFTModel)
  packed  one [prompt | member] sequence per member, rows packed without padding, fused loss
  shared  one [prompt | member_1 | ... | member_k] sequence per group (the prompt encoded once), fused loss
  full    shared, plus an AdamW step on every parameter (full fine-tuning; opt-in: --providers full,lora)
  lora    shared, plus an AdamW step on LoRA adapters (r=16, alpha 32, every linear layer but the head; PEFT)
          on the frozen model: the same model and batch as full

The layouts run as training does: attention.prepare picks the kernel (CPU: SDPA with a dense 4-D mask;
CUDA: FlexAttention, or flash-attn varlen for packed in bf16 when installed) and the row budget.

Default setting: groups of a reference chain and k=6 candidates, prompt 128 tokens, members 32-256 tokens
(uniform, ragged), 2 groups per step, a small Llama (hidden 512, 6 layers, V=32000), fp32 on the CPU,
bcl loss. Reports tokens computed (positions the decoder runs, padding included), median step time,
the peak memory a step adds over the model (see _common.py), and ratios to naive and padded. Writes
benchmarks/results/bench_step.{csv,md,png}.

    python benchmarks/bench_step.py                                   # CPU default
    python benchmarks/bench_step.py --groups 1 --model llama_tiny --repeats 2   # quick
    python benchmarks/bench_step.py --device cuda --model llama_1b --groups 8    # a GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

try:
    from benchmarks import _common  # python -m benchmarks.bench_step
except ImportError:
    import _common  # python benchmarks/bench_step.py: the script's own folder is on sys.path

HERE = Path(__file__).resolve()
PROVIDERS = ["naive", "padded", "packed", "shared"]
OPTIMIZER_PROVIDERS = ["full", "lora"]  # a whole training step (optimizer included), full vs adapters
LORA_RANK = 16
# Llama-architecture shapes (random init: speed does not depend on the weights), one row a model.
SHAPE = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)
MODELS = {
    name: dict(zip(SHAPE, row, strict=True))
    for name, row in {
        "llama_tiny": (128, 344, 2, 4, 4, 8000),
        "llama_small": (512, 1408, 6, 8, 8, 32000),
        "llama_1b": (2048, 8192, 16, 32, 8, 128256),
    }.items()
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def make_items(groups: int, k: int, prompt: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list:
    """`groups` AFT groups: a reference chain and k candidates each, random tokens, ragged lengths."""
    import torch

    from aft_fast.data.collate import Encoded

    g = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> list[int]:
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    items = []
    for _ in range(groups):
        members = [tokens(int(torch.randint(lo, hi + 1, (1,), generator=g))) for _ in range(k + 1)]
        label = [1] + [int(i % 2 == 0) for i in range(k)]  # both positives and negatives: every pair counts
        items.append(Encoded(tokens(prompt), members, label, [True] + [False] * k))
    return items


def build_step(provider: str, args):
    """(a zero-argument closure running one forward+backward, the model, batch statistics)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from aft_fast.data.collate import collate
    from aft_fast.models import attention
    from aft_fast.models.forward import AFTModel
    from aft_fast.reference import group_loss_ref

    device = torch.device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    torch.manual_seed(0)
    config = LlamaConfig(
        **MODELS[args.model],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    with torch.device(device):  # built where it runs: a 1B model's CPU init takes longer than the run
        lm = LlamaForCausalLM(config).to(dtype)
    layout = {"naive": "padded", "full": "shared", "lora": "shared"}.get(provider, provider)
    plan = attention.prepare(lm, layout, device)
    items = make_items(args.groups, args.k, args.prompt, args.min_member, args.max_member, config.vocab_size)
    max_length = args.prompt + args.max_member + 1
    batch = collate(items, pad_id=0, max_length=max_length, layout=layout, max_tokens=plan.row_budget(0))
    stats = dict(
        kernel=plan.kernel,
        rows=list(batch.input_ids.shape),
        computed=batch.computed_tokens,
        real=batch.num_tokens,
        scored=batch.targets.numel(),
        logit_rows=batch.computed_tokens if provider == "naive" else batch.targets.numel(),
    )
    batch = batch.to(device)

    if provider == "naive":
        counts = torch.bincount(batch.segments, minlength=batch.num_segments).float()
        is_ref = batch.is_reference

        def step():
            lm.zero_grad(set_to_none=True)
            logits = lm(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask
            ).logits  # every position
            logp = torch.log_softmax(logits.float(), dim=-1).flatten(0, 1)
            sums = torch.zeros(batch.num_segments, device=device).index_add(
                0, batch.segments, logp[batch.rows, batch.targets]
            )
            vft = (
                -sums[is_ref].sum() / counts[is_ref].sum()
            )  # L = w_vft * L_vft + w_align * L_align, weights 1
            align = group_loss_ref(sums, counts, batch.group, batch.label, is_ref, mode="bcl")
            (vft + align).backward()

        return step, lm, stats

    if provider in OPTIMIZER_PROVIDERS:
        return _training_step(provider, lm, batch, stats)
    model = AFTModel(lm, mode="bcl")
    tensors = batch.tensors()

    def step():
        lm.zero_grad(set_to_none=True)
        model(**tensors)["loss"].backward()

    return step, lm, stats


def _training_step(provider: str, lm, batch, stats: dict):
    """Forward, backward and an AdamW step: on every parameter (full) or on LoRA adapters over the frozen
    model (lora). The step's `reset` drops the optimizer state, so that the measured step allocates it (the
    moments are what full fine-tuning pays for and LoRA does not)."""
    import torch

    from aft_fast.models.adapters import LoraSettings, add_lora
    from aft_fast.models.forward import AFTModel

    if provider == "lora":
        lm = add_lora(lm, LoraSettings(r=LORA_RANK, alpha=2.0 * LORA_RANK))
    params = [p for p in lm.parameters() if p.requires_grad]
    stats["trainable"] = sum(p.numel() for p in params)
    model = AFTModel(lm, mode="bcl")
    opt = torch.optim.AdamW(params, lr=1e-5)
    tensors = batch.tensors()

    def step():
        opt.zero_grad(set_to_none=True)
        model(**tensors)["loss"].backward()
        opt.step()

    step.reset = opt.state.clear
    return step, lm, stats


def worker(args) -> None:
    """One provider in a fresh process: warm up, measure the peak a step adds, then time it."""
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    step, lm, stats = build_step(args.provider, args)
    cuda = args.device.startswith("cuda")
    for _ in range(args.warmup):
        step()
    lm.zero_grad(set_to_none=True)  # the baseline is the model alone: gradients count as "added"
    if hasattr(step, "reset"):
        step.reset()  # ... and optimizer state too
    gc.collect()
    sync = torch.cuda.synchronize if cuda else None
    # The memory probe's step is also the first timed one (a step is long: this saves one per provider).
    base = _common.cuda_peak_reset() if cuda else _common.reset_peak_memory()
    times = _common.time_call(step, repeats=1, warmup=0, sync=sync)
    added = (torch.cuda.max_memory_allocated() if cuda else _common.peak_memory()) - base
    times += _common.time_call(step, repeats=args.repeats - 1, warmup=0, sync=sync)
    print(json.dumps({"times": times, "peak_added": added, **stats}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", choices=list(MODELS), default="llama_small", help="model shape")
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default=None, help="default: fp32 on cpu, bf16 on cuda"
    )
    parser.add_argument("--groups", type=int, default=2, help="groups (questions) per step")
    parser.add_argument("--k", type=int, default=6, help="candidates per group (plus one reference chain)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--min-member", type=int, default=32, help="shortest member (chain) in tokens")
    parser.add_argument("--max-member", type=int, default=256, help="longest member in tokens")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per provider (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="discarded steps per provider")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per worker (0: torch's default)"
    )
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {PROVIDERS}")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per provider")
    parser.add_argument(
        "--out", type=Path, default=_common.RESULTS, help="folder for bench_step.{csv,md,png}"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--provider", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.worker:
        return worker(args)

    providers = [p for p in args.providers.split(",") if p]
    unknown = sorted(set(providers) - set(PROVIDERS + OPTIMIZER_PROVIDERS))
    if unknown:
        parser.error(f"--providers: unknown {unknown}; expected from {PROVIDERS + OPTIMIZER_PROVIDERS}")
    if args.repeats < 1:
        parser.error("--repeats: must be at least 1")
    if not 1 <= args.min_member <= args.max_member:
        parser.error("--min-member and --max-member: need 1 <= min <= max")
    setting = {key: getattr(args, key) for key in ("model", "dtype", "device", "groups", "k", "prompt")}
    setting.update(members=f"{args.min_member}-{args.max_member}", mode="bcl")
    env = _common.environment()
    results = {}
    for provider in providers:
        print(f"[bench_step] {provider} ...", file=sys.stderr, flush=True)
        worker_args = [
            "--worker",
            "--provider",
            provider,
            "--device",
            args.device,
            "--model",
            args.model,
            "--dtype",
            args.dtype,
            "--groups",
            str(args.groups),
            "--k",
            str(args.k),
            "--prompt",
            str(args.prompt),
            "--min-member",
            str(args.min_member),
            "--max-member",
            str(args.max_member),
            "--repeats",
            str(args.repeats),
            "--warmup",
            str(args.warmup),
            "--threads",
            str(args.threads),
        ]
        try:
            results[provider] = _common.run_worker(HERE, worker_args, timeout=args.timeout)
        except Exception as exc:  # a timeout or a missing kernel: report it, keep going
            results[provider] = {"error": [f"{type(exc).__name__}: {exc}"]}
        # Written after every provider: an outer time limit still leaves what was measured.
        text = _report(args, setting, env, results)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_step.md").write_text(text)
        _common.append_csv(args.out / "bench_step.csv", _csv_rows(setting, env, results, args.groups))
    print(text)
    _plot(args.out / "bench_step.png", setting, env, results)


def _median(r: dict) -> float | None:
    return None if "times" not in r else _common.quantiles(r["times"])["p50"]


def _report(args, setting: dict, env: dict, results: dict) -> str:
    naive, padded = _median(results.get("naive", {})), _median(results.get("padded", {}))
    rows = []
    for provider, r in results.items():
        if "error" in r:
            rows.append([provider, "failed: " + " ".join(r["error"])[:80]] + [""] * 8)
            continue
        q = _common.quantiles(r["times"])
        t = q["p50"]
        rows.append(
            [
                provider,
                r["kernel"],
                "x".join(map(str, r["rows"])),
                f"{r['computed']:,}",
                f"{r['logit_rows']:,}",
                f"{t * 1e3:.0f} ({q['p20'] * 1e3:.0f}-{q['p80'] * 1e3:.0f})",
                f"{naive / t:.2f}x" if naive else "",
                f"{padded / t:.2f}x" if padded else "",
                f"{r['peak_added'] / 2**20:.0f}",
                f"{r['scored'] / t:,.0f}",
            ]
        )
    table = _common.markdown_table(
        [
            "provider",
            "attention",
            "rows x L",
            "tokens computed",
            "LM-head rows",
            "step ms p50 (p20-p80)",
            "speed-up vs naive",
            "vs padded",
            "peak added MiB",
            "scored tokens/s",
        ],
        rows,
    )
    cfg = MODELS[args.model]
    header = (
        f"# bench_step\n\n`python benchmarks/bench_step.py {' '.join(sys.argv[1:])}`".rstrip()
        + f"\n\nOne AFT training step (forward + backward, bcl loss), {args.groups} groups of a reference "
        f"and k={args.k} candidates, prompt {args.prompt} tokens, members "
        f"{args.min_member}-{args.max_member} tokens; {args.model} (hidden {cfg['hidden_size']}, "
        f"{cfg['num_hidden_layers']} layers, "
        f"V={cfg['vocab_size']}), {args.dtype} on {args.device}; median of {args.repeats} steps after "
        f"{args.warmup} warm-up.\n{env['gpu']}, torch {env['torch']}, commit {env['git_sha']}, "
        f"{env['timestamp']}.\n"
    )
    notes = (
        "\n\ntokens computed: positions the decoder runs (padding included). LM-head rows: hidden rows "
        "multiplied by the LM head (naive: every position; fused: the scored tokens only). peak added: "
        "the high-water mark of one step over the model's own footprint, gradients included."
    )
    return header + "\n" + table + notes + "\n"


def _csv_rows(setting: dict, env: dict, results: dict, groups: int) -> list[dict]:
    config = json.dumps(setting, sort_keys=True)
    out = []
    for provider, r in results.items():
        if "error" in r:
            continue
        base = dict(
            op="aft_step",
            provider=provider,
            mode="fwd_bwd",
            x_name="groups",
            x_value=groups,
            config_json=config,
            **env,
        )
        q = _common.quantiles(r["times"])
        out.append(dict(base, metric="time", unit="ms", **{k: round(v * 1e3, 2) for k, v in q.items()}))
        for metric, unit, value in (
            ("peak_memory_added", "MiB", round(r["peak_added"] / 2**20, 1)),
            ("tokens_computed", "tokens", r["computed"]),
        ):
            out.append(dict(base, metric=metric, unit=unit, p50=value, p20=value, p80=value))
    return out


def _plot(path: Path, setting: dict, env: dict, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = {p: r for p, r in results.items() if "error" not in r}
    if not done:
        return
    names = list(done)
    colors = ["#999999" if p == "naive" else "#4c72b0" if p == "padded" else "#55a868" for p in names]
    panels = [
        ("step time (s, median)", [_median(r) for r in done.values()], "{:.2f}"),
        ("tokens computed (k)", [r["computed"] / 1e3 for r in done.values()], "{:.1f}"),
        ("peak memory added (MiB)", [r["peak_added"] / 2**20 for r in done.values()], "{:.0f}"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (title, values, fmt) in zip(axes, panels, strict=True):
        bars = ax.bar(names, values, color=colors)
        ax.bar_label(bars, [fmt.format(v) for v in values], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(
        f"AFT step: {setting['model']}, {setting['groups']} groups x (1 + k={setting['k']}), prompt "
        f"{setting['prompt']}, members {setting['members']}, {setting['dtype']}; {env['gpu']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
