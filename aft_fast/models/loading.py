"""Models from folders: the embedded default (a tiny Llama trained from scratch), the checks that run
before any training, and loading (a replica, or partitioned at construction under ZeRO-3), for plain
Hugging Face folders (aft_fast/models/folders.py) and adapter folders (aft_fast/models/adapters.py). A GGUF
file becomes such a folder first (`resolve_model`, aft_fast/models/gguf.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

try:
    from transformers.integrations.deepspeed import prevent_arange_dtype_change
except ImportError:  # transformers < 5.23 has none (its own ZeRO-3 loading enters no such context)
    from contextlib import nullcontext as prevent_arange_dtype_change

from aft_fast.models.folders import check_hf_folder, save_hf_folder
from aft_fast.models.gguf import find_gguf, gguf_to_folder


def tiny_llama_config(tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """docs/design.md section 5: 4 layers, hidden 192, 4 heads, FFN 512, tied embeddings (1.84M params)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_dropout=0.0,
    )


def create_default_model(tokenizer: PreTrainedTokenizerBase, out_dir: Path, seed: int) -> int:
    """Write a freshly initialized tiny Llama (and the tokenizer) as a Hugging Face folder (call on rank 0).
    Returns its parameter count."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(tokenizer))
    save_hf_folder(model, tokenizer, out_dir)
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# Checks that run before training: a clear message instead of a stack trace minutes in.


def resolve_model(path: str | Path, log: Callable[[str], None] = print) -> Path:
    """The folder every loader reads for `path`: a GGUF file (or a folder holding one) becomes its cached
    Hugging Face folder, converted once (`log` names the cache); any other path is returned as it is."""
    path = Path(path)
    file = find_gguf(path)
    return path if file is None else gguf_to_folder(file, log)


def check_model_dir(path: str | Path) -> Path:
    """`path`, checked: a Hugging Face model folder, or a PEFT adapter folder whose bases end in one."""
    path = Path(path)
    from aft_fast.models import adapters  # adapters builds on folders.py, not on this module

    if adapters.is_adapter_dir(path):
        check_hf_folder(adapters.adapter_chain(path)[0])
        return path
    return check_hf_folder(path)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {path} does not exist")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {path} has no eos token: chains could not end")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # common for Llama-family tokenizers; pads are masked anyway
    return tok


def check_vocab(tokenizer: PreTrainedTokenizerBase, model_dir: str | Path) -> None:
    """The model must have an embedding row for every token id the tokenizer can produce."""
    from aft_fast.models import adapters

    config = AutoConfig.from_pretrained(adapters.adapter_chain(model_dir)[0])  # an adapter keeps its base's
    vocab = getattr(config, "vocab_size", None)
    if vocab is None:
        raise ValueError(f"{model_dir}/config.json has no vocab_size")
    if len(tokenizer) > vocab:
        raise ValueError(
            f"vocab mismatch: the tokenizer has {len(tokenizer)} tokens but the model in {model_dir} "
            f"has {vocab} embedding rows; use the model's own tokenizer (--tokenizer)"
        )
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    for name, tid in special.items():
        if tid is not None and tid >= vocab:
            raise ValueError(
                f"vocab mismatch: {name} token id {tid} >= model vocab_size {vocab} ({model_dir})"
            )


# ---------------------------------------------------------------------------------------------------------
# Loading.


def load_replica(path: str | Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A full copy of the model on this process (sampling, eval, the frozen DPO reference); an adapter
    folder loads as its base with the adapters merged in."""
    from aft_fast.models import adapters

    if adapters.is_adapter_dir(path):
        return adapters.load_replica(path, device, dtype)
    model = AutoModelForCausalLM.from_pretrained(check_model_dir(path), dtype=dtype)
    return model.to(device).eval()


def _weight_files(path: Path) -> dict[str, Path]:
    """Parameter name -> file holding it, for single-file or sharded safetensors / torch checkpoints."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            weight_map = json.loads((path / index).read_text())["weight_map"]
            return {k: path / v for k, v in weight_map.items()}
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return {"*": path / single}
    raise FileNotFoundError(f"no weights in {path}")


class _Reader:
    """Reads one tensor at a time, so only rank 0 ever holds (a piece of) the checkpoint in memory."""

    def __init__(self, path: Path):
        self.files = _weight_files(path)
        self.cache: dict[Path, object] = {}

    def _open(self, file: Path):
        if file not in self.cache:
            if file.suffix == ".safetensors":
                from safetensors import safe_open

                self.cache[file] = safe_open(str(file), framework="pt")
            else:
                self.cache[file] = torch.load(file, map_location="cpu", weights_only=True)
        return self.cache[file]

    def get(self, name: str) -> torch.Tensor | None:
        file = self.files.get(name, self.files.get("*"))
        if file is None:
            return None
        handle = self._open(file)
        if isinstance(handle, dict):
            return handle.get(name)
        return handle.get_tensor(name) if name in handle.keys() else None


class _Merged:
    """`_Reader`'s interface over an adapter folder's base with its adapters merged (held whole)."""

    def __init__(self, path: Path, dtype: torch.dtype):
        from aft_fast.models import adapters

        self.state = adapters.merged_state_dict(path, dtype)

    def get(self, name: str) -> torch.Tensor | None:
        return self.state.get(name)


def load_partitioned(path: str | Path, ds_config: dict) -> nn.Module:
    """Build the model under `deepspeed.zero.Init` (each process allocates only its partition) and copy
    the checkpoint in one parameter at a time: rank 0 reads it and DeepSpeed scatters it.

    The model is never whole in any process's memory, which is what lets a 70B model start on GPUs
    that each hold a fraction of it. Tied weights are one parameter, loaded once. An adapter folder loads
    as its base with the adapters merged in (rank 0 merges them on its CPU, as an export would)."""
    from aft_fast.models import adapters

    path = check_model_dir(path)
    root = adapters.adapter_chain(path)[0]
    config = AutoConfig.from_pretrained(root)
    # Resolve (import) the model class first: importing torch._dynamo inside zero.Init fails.
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    # The contexts Hugging Face's own ZeRO-3 loading enters: skip weight init (the partitions are empty and
    # get the checkpoint below), and keep RoPE's torch.arange buffers in fp32 under a bf16 zero.Init.
    with no_init_weights(), prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = model_class(config)
    model.tie_weights()
    reader = None
    if deepspeed.comm.get_rank() == 0:
        dtype = next(model.parameters()).dtype  # the run's: zero.Init made every parameter in it
        reader = _Merged(path, dtype) if adapters.is_adapter_dir(path) else _Reader(path)
    problems = []
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if reader is not None:
                value = reader.get(name)
                if value is None:
                    problems.append(f"{name} is missing")
                elif tuple(value.shape) != tuple(param.shape):
                    problems.append(f"{name} has shape {tuple(value.shape)}, the model {tuple(param.shape)}")
                else:
                    param.data.copy_(value.to(param.dtype))
    # Rank 0 alone read the checkpoint: tell every rank, so that all stop together.
    device = torch.device(get_accelerator().current_device_name())
    flag = torch.tensor([len(problems)], device=device)
    deepspeed.comm.broadcast(flag, 0)
    if int(flag.item()):
        detail = "; ".join(problems[:3]) if problems else "see rank 0"
        raise ValueError(f"{path}: the checkpoint does not fit the model: {detail}")
    return model
