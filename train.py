"""AFT (arXiv 2309.02144) on DeepSpeed ZeRO-3: VFT -> sample -> AFT -> eval, or any one stage.

    deepspeed train.py --config configs/default.yaml                       # the GPUs of one node
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 train.py --config configs/default.yaml   # 2 CPU processes
    deepspeed --hostfile configs/hostfile.example train.py --config ...    # several nodes
    python train.py --stage=eval --eval_model=runs/default/aft             # one process, no launcher

Every option: `python train.py --help`. Outputs go under --run_dir (default runs/default):
data/, tokenizer/, init/, vft/ and aft/ (Hugging Face folders), candidates.jsonl, checkpoints/<stage>/
(DeepSpeed, for --resume), metrics.jsonl, tensorboard/, predictions_*.jsonl, summary.md.
"""

import os
import sys

from aft_fast.train.config import InputError, load_config
from aft_fast.train.engine import init_distributed, shutdown_distributed
from aft_fast.train.logging import print0
from aft_fast.train.pipeline import run

try:
    # 1. Config: dataclass defaults < --config YAML < --key=value flags; unknown keys fail.
    cfg = load_config(sys.argv[1:])

    # 2. One process group for every stage (the launcher's environment, or a single process).
    dist = init_distributed(cfg.dist_backend)
    print0(f"{dist.world_size} process(es), device {dist.device}")

    # 3. setup (data, tokenizer, model: all checked first) -> vft -> eval -> sample -> aft -> eval.
    summary = run(cfg, dist)
except InputError as e:  # bad input: one clear line, no traceback, nothing trained
    if os.environ.get("RANK", "0") == "0":
        print(f"train.py: error: {e}", file=sys.stderr)
    sys.exit(2)

# 4. The table: accuracy after VFT and after AFT, candidates sampled, time per stage.
print0("\n" + summary.table())
print0(f"\nsummary written to {cfg.run_path / 'summary.md'}")
shutdown_distributed()
