"""Stage aft: each group is the question's reference chain plus its labelled candidates; the loss is
w_vft * L_vft (references) + w_align * L_align (candidates), in any mode of DESIGN.md section 2."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from aft_fast.data.candidates import CandidateGroup
from aft_fast.data.collate import encode_group
from aft_fast.train.config import TrainConfig
from aft_fast.train.engine import Dist
from aft_fast.train.loop import StageResult, train


def run_aft(
    cfg: TrainConfig,
    dist: Dist,
    tokenizer: PreTrainedTokenizerBase,
    groups: list[CandidateGroup],
    init_model: Path,
) -> StageResult:
    dpo = cfg.mode.startswith("dpo")
    items = [encode_group(g, tokenizer, with_ref_logp=dpo) for g in groups if g.candidates]
    return train(
        cfg,
        dist,
        stage="aft",
        items=items,
        init_model=init_model,
        tokenizer=tokenizer,
        mode=cfg.mode,
        steps=cfg.aft_steps,
        batch_size=cfg.aft_batch_size,
        micro_batch=cfg.aft_micro_batch_size,
        lr=cfg.aft_lr,
        out_dir=cfg.stage_model_dir("aft"),
        layout=cfg.layout,
    )
