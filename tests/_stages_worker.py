"""Worker for tests/test_real_model.py, started with `deepspeed --num_gpus 2`: stages of the trainer one after
another in one launch, as train.py runs one (`pipeline.run`), so the processes start once. Arguments: one
stage's flags, then `--then`, then the next stage's flags, and so on."""

import sys

from aft_fast.train.config import load_config
from aft_fast.train.engine import init_distributed, shutdown_distributed
from aft_fast.train.logging import print0
from aft_fast.train.pipeline import run

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
stages: list[list[str]] = [[]]
for a in args:
    if a == "--then":
        stages.append([])
    else:
        stages[-1].append(a)
configs = [load_config(flags) for flags in stages]
dist = init_distributed(configs[0].dist_backend)
for cfg in configs:
    print0("\n" + run(cfg, dist).table())
shutdown_distributed()
