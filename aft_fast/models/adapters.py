"""LoRA adapters through PEFT: a frozen base (a replica, or partitioned under ZeRO-3) with trainable low-rank
adapters, saved as PEFT adapter folders and loaded back as base + adapter.

The fused loss reads the LM head's weight directly (`AFTModel`), never through the head module's forward:
an adapter on the head would train nothing and be dropped silently at scoring, and one on an input
embedding tied to the head would change the head behind the loss's back. Both are refused, naming the
module. The default targets are PEFT's "all-linear": every linear layer except the output layer.

A stage trained with adapters writes a PEFT folder (adapter_config.json, adapter_model.safetensors, the
tokenizer and trainer_state.json) whose `base_model_name_or_path` is the absolute path of the folder it
trained on, so `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)` loads it.
That base may itself be an adapter folder (AFT adapters trained on a LoRA VFT model): `adapter_chain`
follows the links down to a Hugging Face model folder, and loading merges each adapter in order.

QLoRA: the base in 4 bits (bitsandbytes NF4) on CUDA; refused with a clear message elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn
from transformers import AutoModelForCausalLM

from aft_fast.models.folders import check_hf_folder, save_hf_folder

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
ALL_LINEAR = "all-linear"  # PEFT's name for every linear layer except the output layer


@dataclass(frozen=True)
class LoraSettings:
    """What `--lora_r`, `--lora_alpha`, `--lora_dropout` and `--lora_target_modules` ask for."""

    r: int
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()  # module names or name suffixes; empty: every linear but the head
    init_weights: bool = True  # PEFT's init_lora_weights (False: B random too, tests want nonzero adapters)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora_r: must be at least 1 to train adapters, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"lora_alpha: must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora_dropout: must lie in [0, 1), got {self.dropout}")


def parse_target_modules(text: str) -> tuple[str, ...]:
    """`--lora_target_modules q_proj,v_proj` -> ("q_proj", "v_proj"); "", "all-linear" -> ()."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    return () if names in ((), (ALL_LINEAR,)) else names


def lora_config(settings: LoraSettings) -> LoraConfig:
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules) or ALL_LINEAR,
        init_lora_weights=settings.init_weights,
    )


def _head_modules(lm: nn.Module) -> dict[int, str]:
    """id(module) -> what it is, for the modules an adapter must not touch: the LM head, and the input
    embedding when the head's weight is tied to it."""
    head, emb = lm.get_output_embeddings(), lm.get_input_embeddings()
    out = {id(head): "the LM head"} if head is not None else {}
    if head is not None and emb is not None and head.weight is emb.weight:
        out[id(emb)] = "the input embedding, tied to the LM head"
    return out


def check_targets(lm: nn.Module, config: LoraConfig) -> None:
    """ValueError naming the first target module that is the LM head or a tied embedding."""
    refused = _head_modules(lm)
    for name, module in lm.named_modules():
        if id(module) in refused and check_target_module_exists(config, name):
            raise ValueError(
                f"lora_target_modules: {name!r} is {refused[id(module)]}; the fused loss reads the frozen "
                "head weight directly, so an adapter there would never train or score. Leave "
                f"{name.rsplit('.', 1)[-1]!r} out (the default, all-linear: every linear layer but the head)"
            )


def add_lora(
    lm: nn.Module, settings: LoraSettings, base: str | Path | None = None, seed: int = 0
) -> PeftModel:
    """Freeze `lm` and inject LoRA adapters (PEFT); `base` is the folder `lm` was loaded from (recorded as the
    adapter's base_model_name_or_path). Every rank calls it with the same seed, so the adapters start alike
    on every rank before DeepSpeed partitions them."""
    config = lora_config(settings)
    check_targets(lm, config)
    torch.manual_seed(seed)
    model = get_peft_model(lm, config)
    if base is not None:  # PEFT took the model's name_or_path: the bottom folder when `base` is an adapter
        model.peft_config["default"].base_model_name_or_path = str(Path(base).resolve())
    refused = _head_modules(lm)
    for name, module in model.named_modules():  # "all-linear" already skips the head; keep it so
        if isinstance(module, LoraLayer) and id(module.get_base_layer()) in refused:
            raise ValueError(
                f"lora_target_modules: an adapter landed on {name!r}, {refused[id(module.get_base_layer())]}"
            )
    return model


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer gets: all of a plain model, the adapters alone of a PEFT one."""
    return [p for p in module.parameters() if p.requires_grad]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The trainable (adapter) parameters by name, whole, on rank 0's CPU (None on other ranks). Collective
    under ZeRO-3: only the adapters are gathered, never the frozen base."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rank0 = not deepspeed.comm.is_initialized() or deepspeed.comm.get_rank() == 0
    partitioned = [p for _, p in named if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(partitioned, enabled=bool(partitioned)):
        return {n: p.detach().to("cpu", copy=True) for n, p in named} if rank0 else None


def describe(model: nn.Module) -> str:
    """One line for the run log: the adapted modules and the trainable share (ZeRO-3 sizes where
    partitioned)."""

    def numel(p: nn.Parameter) -> int:
        return p.ds_numel if hasattr(p, "ds_numel") else p.numel()

    wrapped = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer)})
    count = sum(isinstance(m, LoraLayer) for m in model.modules())
    train = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    cfg = model.peft_config["default"]
    return (
        f"LoRA r={cfg.r} alpha={cfg.lora_alpha:g} dropout={cfg.lora_dropout:g} on {count} modules "
        f"({', '.join(wrapped)}): {train:,} trainable parameters ({100 * train / total:.2f}% of {total:,}), "
        "the base frozen"
    )


def save_stage(
    model: PeftModel,
    tokenizer,
    out_dir: Path,
    trainer_state: dict,
    *,
    merged_dir: Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """A stage's outputs (collective: every rank calls it): the adapter folder `out_dir`, and with
    `merged_dir` the base with the adapters merged as a plain Hugging Face folder (rank 0 merges on its
    CPU, from the base folder on disk: full precision even when training ran on a 4-bit base)."""
    state = adapter_state_dict(model)
    if state is not None:
        save_hf_folder(model, tokenizer, out_dir, state_dict=state, trainer_state=trainer_state)
        if merged_dir is not None:
            merged = load_replica(out_dir, torch.device("cpu"), dtype)
            save_hf_folder(
                merged, tokenizer, merged_dir, trainer_state={**trainer_state, "merged_from": str(out_dir)}
            )


# ---------------------------------------------------------------------------------------------------------
# Adapter folders on disk.


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_chain(path: str | Path) -> tuple[Path, list[Path]]:
    """(the Hugging Face model folder at the bottom, the adapter folders to apply to it in order) for
    `path`; a plain model folder is its own bottom with no adapters."""
    path = Path(path)
    chain: list[Path] = []
    while is_adapter_dir(path):
        if any(path.resolve() == p.resolve() for p in chain):
            raise ValueError(f"{path}/{ADAPTER_CONFIG}: its base_model_name_or_path links back to itself")
        if not any((path / name).is_file() for name in ADAPTER_WEIGHTS):
            raise FileNotFoundError(
                f"adapter folder {path} has no weights (looked for {', '.join(ADAPTER_WEIGHTS)})"
            )
        cfg = json.loads((path / ADAPTER_CONFIG).read_text())
        if cfg.get("peft_type") != "LORA":
            raise ValueError(
                f"{path}/{ADAPTER_CONFIG}: peft_type {cfg.get('peft_type')!r}; only LoRA adapters load"
            )
        base = cfg.get("base_model_name_or_path")
        if not base:
            raise ValueError(
                f"{path}/{ADAPTER_CONFIG} has no base_model_name_or_path: its base model is unknown"
            )
        chain.append(path)
        path = Path(base)
    return path, chain[::-1]


def load_replica(path: str | Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A full copy of base + adapters with every adapter merged into the weights (PEFT's merge_and_unload):
    plain Hugging Face modules, as fast to sample and score as the base."""
    root, chain = adapter_chain(path)
    model = AutoModelForCausalLM.from_pretrained(check_hf_folder(root), dtype=dtype)
    for adapter in chain:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.to(device).eval()


def load_peft(path: str | Path, device: torch.device, dtype: torch.dtype) -> PeftModel:
    """Base + the adapter of `path` as a PeftModel, the adapter unmerged (adapters below it merged): what
    `PeftModel.from_pretrained` gives a user of the folder, and what `disable_adapter()` turns back into
    the base."""
    root, chain = adapter_chain(path)
    if not chain:
        raise ValueError(f"{path} is not an adapter folder (no {ADAPTER_CONFIG})")
    base = load_replica(chain[-2], device, dtype) if len(chain) > 1 else load_replica(root, device, dtype)
    return PeftModel.from_pretrained(base, chain[-1]).to(device).eval()


def merged_state_dict(path: str | Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The weights of base + adapters merged, on the CPU: what a ZeRO-3 load of an adapter folder copies
    into the partitions (rank 0 only, as it reads a plain checkpoint)."""
    return load_replica(path, torch.device("cpu"), dtype).state_dict()


# ---------------------------------------------------------------------------------------------------------
# QLoRA: the frozen base in 4 bits.


def check_qlora(device: torch.device) -> None:
    """ValueError unless a 4-bit (bitsandbytes) base can be loaded on `device`."""
    if torch.device(device).type != "cuda":
        raise ValueError(
            "qlora: a 4-bit base (bitsandbytes NF4) needs a CUDA device, and this run has none; train "
            "LoRA on the full-precision base instead (--qlora=false)"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("qlora: bitsandbytes is not installed (pip install bitsandbytes)")


def load_4bit(path: str | Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model folder `path` quantized to NF4 (double quantization) on `device`, computing in `dtype`,
    ready for adapters (PEFT's prepare_model_for_kbit_training). Each rank loads it whole (4 bits: ~35 GB
    for 70B); DeepSpeed then partitions it like any parameter, which the packed weights allow because they
    are stored in `dtype` (bnb_4bit_quant_storage), as Hugging Face's QLoRA + ZeRO-3 recipe does."""
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    check_qlora(device)
    root, chain = adapter_chain(path)
    if chain:
        raise ValueError(
            f"qlora: {path} is an adapter folder; 4-bit loading needs a merged model folder (write one with "
            "--merge_adapters and pass it as --vft_model)"
        )
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(
        check_hf_folder(root), quantization_config=quant, dtype=dtype, device_map={"": torch.device(device)}
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
