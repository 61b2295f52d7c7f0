"""Plain Hugging Face model folders on disk: what one holds, the check that a folder is one, and the
atomic save. Both loading (aft_fast/models/loading.py) and adapter folders (aft_fast/models/adapters.py)
build on it, so neither needs the other for these.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

TRAINER_STATE = "trainer_state.json"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_hf_folder(path: str | Path) -> Path:
    """`path`, checked to be a Hugging Face model folder: config.json and weights."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist (expected a Hugging Face model folder)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder {path} has no config.json: not a Hugging Face model folder")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"model folder {path} has no weights (looked for {', '.join(WEIGHT_FILES)})")
    return path


def save_hf_folder(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    state_dict: dict | None = None,
    trainer_state: dict | None = None,
) -> None:
    """save_pretrained into a temp folder, then rename: a reader never sees a half-written model.
    trainer_state (steps, config, last metrics) goes to trainer_state.json beside the weights."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    _rmtree(tmp)
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if trainer_state is not None:
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
    _rmtree(out_dir)
    tmp.rename(out_dir)


def _rmtree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
