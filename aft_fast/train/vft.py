"""Stage vft: maximum likelihood on (question, reference chain), through the fused loss in mode "vft"."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from aft_fast.constants import TRAIN_MODES
from aft_fast.data.collate import encode_example
from aft_fast.data.formats import Example
from aft_fast.train.config import TrainConfig
from aft_fast.train.engine import Dist
from aft_fast.train.loop import StageResult, train


def run_vft(
    cfg: TrainConfig,
    dist: Dist,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    init_model: Path,
) -> StageResult:
    items = [encode_example(e, tokenizer) for e in examples]
    return train(
        cfg,
        dist,
        stage="vft",
        items=items,
        init_model=init_model,
        tokenizer=tokenizer,
        mode=TRAIN_MODES["vft"],
        schedule=cfg.schedule("vft"),
        out_dir=cfg.stage_model_dir("vft"),
    )
