"""Where an arm's evaluation time goes in the reproduction study, and what the batch size buys.

One study arm is scored by `evaluate()`: greedy decoding of the test questions (with the reference chains'
perplexity) and the scores of the held-out set (k sampled chains per test question, fixed across arms).
This times the two parts apart on the study's VFT model, at several batch sizes, and projects one arm's
evaluation at the study's size (1,000 test questions, 6 held-out chains each).

    python benchmarks/bench_eval.py                       # the study's model: runs/reproduce/base
    python benchmarks/bench_eval.py --questions 64 --batches 32 128

Writes benchmarks/results/bench_eval.{md,json} (--out to change the folder). Greedy chains depend on the
batch (padding changes the floating-point sums), so a study keeps one batch size for all its arms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # python benchmarks/bench_eval.py: the package imports from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, default=ROOT / "runs/reproduce/base", help="the study's base folder")
    p.add_argument(
        "--questions", type=int, default=128, help="test questions timed (and their held-out sets)"
    )
    p.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=_common.RESULTS)
    args = p.parse_args(argv)

    import torch

    from aft_fast.data.candidates import read_candidates
    from aft_fast.data.formats import read_examples
    from aft_fast.eval.evaluate import greedy_and_sampled, score_groups
    from aft_fast.eval.sampler import HFSampler, SamplingParams
    from aft_fast.models.loading import load_replica
    from aft_fast.train.config import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(["--config", str(args.base / "config.yaml")])
    tok_dir = args.base / "tokenizer"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    model = load_replica(args.base / "vft", torch.device("cpu"), torch.float32)
    examples = read_examples(args.base / "data" / "test.jsonl")[: args.questions]
    heldout = read_candidates(args.base / "heldout_test.jsonl")[: args.questions]
    chains = sum(len(g.candidates) for g in heldout)
    sampler = HFSampler(model, tok)
    greedy = SamplingParams(max_new_tokens=cfg.max_new_tokens)

    rows, load = [], [os.getloadavg()[0]]
    for b in args.batches:
        t_greedy = _timed(
            lambda b=b: greedy_and_sampled(sampler, examples, greedy, batch_size=b, seed=0, progress=False),
            args.repeats,
        )
        t_ref = _timed(
            lambda b=b: score_groups(
                model,
                tok,
                heldout,
                batch_size=b,
                max_length=cfg.max_length,
                with_reference=True,
                progress=False,
                desc="ref",
            ),
            args.repeats,
        )
        rows.append(
            {
                "batch": b,
                "greedy_s_per_1000_questions": 1000 * t_greedy / len(examples),
                "heldout_s_per_1000_questions": 1000 * t_ref / len(heldout),
                "heldout_chains_per_question": chains / len(heldout),
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    env = _common.environment()
    load.append(os.getloadavg()[0])
    lines = [
        "# Where an arm's evaluation time goes (`benchmarks/bench_eval.py`)",
        "",
        f"{env['gpu']}, torch {env['torch']}, git {env['git_sha']}, {env['timestamp']}; the study's VFT "
        "model "
        f"({args.base.name}), {len(examples)} test questions and their held-out sets "
        f"({chains / len(heldout):.1f} chains each), median of {args.repeats}. Seconds per 1,000 test "
        "questions: one study arm scores 1,000. 1-minute load average "
        f"{load[0]:.1f} at the start, {load[1]:.1f} at the end (2 cores: above 2, other work shared them).",
        "",
        "| batch | greedy (s) | held-out scoring (s) | arm eval (s) | greedy share |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        greedy_s, heldout_s = r["greedy_s_per_1000_questions"], r["heldout_s_per_1000_questions"]
        total = greedy_s + heldout_s
        lines.append(
            f"| {r['batch']} | {greedy_s:.0f} | {heldout_s:.0f} | {total:.0f} | {greedy_s / total:.0%} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_eval.md").write_text("\n".join(lines) + "\n")
    (args.out / "bench_eval.json").write_text(
        json.dumps(
            {"env": env, "args": vars(args) | {"base": str(args.base.name), "out": None}, "rows": rows},
            indent=1,
        )
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
