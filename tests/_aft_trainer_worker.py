"""One rank of the 2-process AFTTrainer test (tests/test_aft_trainer_distributed.py): trains a tiny Llama for
two steps with the Trainer's accelerate (DDP on gloo, or DeepSpeed ZeRO-3 on the CPU), records the groups
each step saw, saves the final model.

    accelerate launch --multi_gpu --num_processes 2 tests/_aft_trainer_worker.py \
        OUT TOKENIZER CANDIDATES ddp|zero3
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from aft_fast.integrations.trl import AFTConfig, AFTTrainer, patch_trl
from tests._integration_support import sgd_steps_args, tiny_llama

ZERO3 = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    # Every parameter partitioned (threshold 0), so the LM head is really gathered for the fused loss.
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": False,
        "stage3_param_persistence_threshold": 0,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "steps_per_print": 10**9,
    "wall_clock_breakdown": False,
}


def main(out: Path, tokenizer_dir: str, candidates: str, backend: str) -> None:
    torch.set_num_threads(1)
    args = AFTConfig(
        **sgd_steps_args(
            out, dataloader_num_workers=0, max_length=64, deepspeed=ZERO3 if backend == "zero3" else None
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    patch_trl()  # harmless here, and the README's line: the trainer must work with it in place
    model = tiny_llama(len(tokenizer), tie=True)  # the same initial weights on every rank (seeded)
    trainer = AFTTrainer(model, args, candidates, processing_class=tokenizer)
    seen, collator = [], trainer.data_collator

    def collate_and_keep(items):
        seen.append(copy.deepcopy(items))
        return collator(items)

    trainer.data_collator = collate_and_keep
    trainer.train()
    trainer.save_model()
    rank = trainer.accelerator.process_index
    torch.save(seen[:2], out / f"items_rank{rank}.pt")
    if rank == 0:
        (out / "result.json").write_text(
            json.dumps(
                {
                    "world_size": trainer.accelerator.num_processes,
                    "distributed_type": str(trainer.accelerator.distributed_type),
                    "steps": trainer.state.global_step,
                    "losses": [log["loss"] for log in trainer.state.log_history if "loss" in log],
                }
            )
        )


def dpo(out: Path, tokenizer_dir: str) -> None:
    """DPOTrainer under ZeRO-3 (every parameter partitioned) for two steps, once with TRL's own fused head and
    once with aft-fast's (patch_trl), from the same weights: rank 0 writes both runs' losses and weights."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from aft_fast.integrations.trl import unpatch_trl

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = Dataset.from_dict(
        {
            "prompt": [
                "1 + 2 =",
                "3 + 4 =",
                "5 - 1 =",
                "2 * 3 =",
                "4 + 4 =",
                "6 - 2 =",
                "1 * 5 =",
                "3 + 3 =",
            ],
            "chosen": [" 3", " 7", " 4", " 6", " 8", " 4", " 5", " 6"],
            "rejected": [" 4 and more", " 8", " 5 or 6", " 5", " 9", " 3 or 2", " 6", " 7 and 1"],
        }
    )
    runs, heads = {}, {}
    for head in ("trl", "aft_fast"):
        (patch_trl if head == "aft_fast" else unpatch_trl)()
        args = DPOConfig(
            **sgd_steps_args(
                out / head,
                bf16=False,
                activation_checkpointing=False,  # TRL's configs default to True
                deepspeed=ZERO3,
            )
        )
        model = tiny_llama(len(tokenizer), tie=True, initializer_range=0.3)
        ref = tiny_llama(len(tokenizer), tie=True, initializer_range=0.3)
        trainer = DPOTrainer(
            model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tokenizer
        )
        trainer.train()
        trainer.save_model()
        # Whose fused head the trainer installed (functools.wraps copies the name, not the code's file).
        heads[head] = "/".join(Path(model.forward.__func__.__code__.co_filename).parts[-3:])
        runs[head] = [
            {k: v for k, v in log.items() if "/" in k or k == "loss"}
            for log in trainer.state.log_history
            if "rewards/chosen" in log
        ]
    if trainer.accelerator.process_index == 0:
        (out / "result.json").write_text(
            json.dumps(
                {"distributed_type": str(trainer.accelerator.distributed_type), "logs": runs, "heads": heads}
            )
        )


if __name__ == "__main__":
    if sys.argv[4] == "dpo-zero3":
        dpo(Path(sys.argv[1]), sys.argv[2])
    else:
        main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
