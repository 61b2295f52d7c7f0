"""`aft-fast train|sample|eval [options]`: the stages of train.py as a console script.

    aft-fast train                  # --stage all: vft, eval, sample, aft, eval
    aft-fast train --stage=vft      # one training stage (vft or aft)
    aft-fast sample --vft_model=runs/default/vft
    aft-fast eval --model=runs/default/aft   # any local Hugging Face causal LM folder

It runs in one process; for several, start it under a launcher:
`deepspeed --num_gpus 8 --module aft_fast.cli train ...`. Options are train.py's (`aft-fast train --help`).
"""

from __future__ import annotations

import os
import sys

COMMANDS = {"train": ("all", "vft", "aft"), "sample": ("sample",), "eval": ("eval",)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # A launcher puts --local_rank first; the config parser accepts (and ignores) it anywhere.
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        return 0 if any(a in ("-h", "--help") for a in argv) and command is None else 2
    argv.remove(command)
    from aft_fast.train.config import InputError, load_config
    from aft_fast.train.engine import init_distributed, shutdown_distributed
    from aft_fast.train.logging import print0
    from aft_fast.train.pipeline import run

    allowed = COMMANDS[command]
    try:
        cfg = load_config(argv) if command == "train" else load_config(argv, stage=allowed[0])
        if cfg.stage not in allowed:
            raise InputError(f"--stage must be one of {', '.join(allowed)}")
        summary = run(cfg, init_distributed(cfg.dist_backend))
    except InputError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"aft-fast {command}: error: {e}", file=sys.stderr)
        return 2
    print0("\n" + summary.table())
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
