"""The AFT loss family on the Hugging Face Trainer: `AFTConfig` and `AFTTrainer`.

For users outside aft-fast's own DeepSpeed loop: the Trainer (and so accelerate: DDP, FSDP, DeepSpeed
ZeRO, PEFT adapters, gradient accumulation, checkpoints, logging) drives training; each step scores a
batch of candidate groups with aft-fast's collator (the prompt-sharing layout by default), its model
forward and `aft_fast.aft_loss`, inside the model's own forward so that every wrapper's hooks see it.

Data: a candidate JSONL file (`aft_fast.data.candidates.read_candidates`, one group a line), a list of
`CandidateGroup`, or a `datasets.Dataset` with columns ``prompt`` (text, used as is), ``candidates``
(list of texts) and ``labels`` (list of 1/0, or ranks: higher is better), and optionally ``reference``
(a chain for L_vft) and ``ref_logp`` (list of the frozen reference model's summed log-probs, dpo modes).
"""

from __future__ import annotations

import functools
import types
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)

from aft_fast.constants import BACKENDS, MODES, train_mode
from aft_fast.data.batch import LAYOUTS, Batch, Encoded
from aft_fast.data.candidates import Candidate, CandidateGroup, read_candidates
from aft_fast.data.collate import collate, encode_group
from aft_fast.models import attention
from aft_fast.models.forward import AFTModel, register_head_for_zero3
from aft_fast.options import LossOptions

__all__ = [
    "AFTConfig",
    "AFTTrainer",
    "AFTCollator",
    "add_aft_loss",
    "encode_dataset",
    "register_head_for_zero3",
]

BATCH_FIELDS = frozenset(Batch.__dataclass_fields__)


@dataclass
class AFTConfig(TrainingArguments):
    """`TrainingArguments` plus the AFT loss's options (aft_fast.aft_loss) and the batch layout.

    mode: vft | align | dcl | bcl | dpo | rrhf | pro | dpo+bc | rrhf+bc | pro+bc (docs/design.md, loss math).
    beta, w_vft, w_align, dpo_beta, pro_tau: as in `aft_fast.aft_loss`, with its defaults.
    layout: shared (each group's prompt encoded once for all its members), packed or padded.
    max_length: cap of each [prompt | member]; max_tokens: cap of a packed/shared row (None: the longest).
    with_reference: add each group's reference chain (when it has one) as an L_vft member.
    backend: the fused operator's backend (auto | triton | cpp | torch).
    """

    mode: str = field(default=LossOptions.mode, metadata={"help": f"AFT loss mode: {', '.join(MODES)}"})
    beta: float = field(default=LossOptions.beta, metadata={"help": "boundary margin of bcl and +bc modes"})
    w_vft: float = field(default=LossOptions.w_vft, metadata={"help": "weight of L_vft (reference chains)"})
    w_align: float = field(
        default=LossOptions.w_align, metadata={"help": "weight of L_align (candidate pairs)"}
    )
    dpo_beta: float = field(
        default=LossOptions.dpo_beta, metadata={"help": "DPO's inverse temperature (dpo modes)"}
    )
    pro_tau: float = field(default=LossOptions.pro_tau, metadata={"help": "PRO's temperature (pro modes)"})
    layout: str = field(default="shared", metadata={"help": f"batch layout: {', '.join(LAYOUTS)}"})
    max_length: int = field(default=1024, metadata={"help": "max tokens of one [prompt | member]"})
    max_tokens: int | None = field(default=None, metadata={"help": "max tokens of a packed/shared row"})
    with_reference: bool = field(default=True, metadata={"help": "train on each group's reference chain"})
    backend: str = field(default="auto", metadata={"help": f"fused operator backend: {', '.join(BACKENDS)}"})
    # The batches are built by AFTCollator from encoded groups, not from dataset columns.
    remove_unused_columns: bool = False

    def __post_init__(self):
        try:  # the loss options, checked where they are declared
            LossOptions.from_config(self)
        except ValueError as exc:
            raise ValueError(f"AFTConfig.{exc}") from None
        for name, value, allowed in (
            ("layout", self.layout, LAYOUTS),
            ("backend", self.backend, BACKENDS),
        ):
            if value not in allowed:
                raise ValueError(f"AFTConfig.{name}: {value!r} is not one of {', '.join(allowed)}")
        if self.max_length < 2:
            raise ValueError(f"AFTConfig.max_length: must be at least 2, got {self.max_length}")
        super().__post_init__()

    @property
    def needs_ref_logp(self) -> bool:
        """The mode compares with a frozen reference model (dpo, dpo+bc): candidates carry ref_logp."""
        return train_mode(self.mode).needs_ref_logp

    @property
    def loss(self) -> LossOptions:
        """The AFT loss options this config sets."""
        return LossOptions.from_config(self)


def add_aft_loss(model: PreTrainedModel, options: LossOptions | None = None, **call_options: Any) -> None:
    """Let ``model(**batch.tensors(), aft_batch=True)`` return the AFT loss of a collated `Batch` (a dict:
    loss, scores, vft_loss, align_loss), computed by `AFTModel`'s forward (hidden states of the batch's
    layout, `aft_fast.aft_loss` on the LM head, with `options` and the call's keywords such as backend).
    Without ``aft_batch=True`` the original forward runs.

    Patching the model's own forward, as TRL's fused head does, keeps the model a `PreTrainedModel` (PEFT,
    saving and loading work as usual) and runs the loss inside every wrapper's forward (DDP, FSDP,
    DeepSpeed). Add it before wrapping the model with PEFT."""
    aft = AFTModel(
        model, options, **call_options
    )  # not a submodule of `model`: held by the patched forward only
    register_head_for_zero3(model)
    original_forward = model.forward

    @functools.wraps(type(model).forward)
    def _aft_forward(self, *args, aft_batch: bool = False, **kwargs):
        if not aft_batch:
            return original_forward(*args, **kwargs)
        # PEFT passes its own keywords (labels, return_dict, ...) through as None.
        extra = sorted(k for k, v in kwargs.items() if k not in BATCH_FIELDS and v is not None)
        if args or extra:
            raise TypeError(
                f"aft_batch=True takes a Batch's tensors as keywords only; got {extra or 'positionals'}"
            )
        return aft.forward(**{k: v for k, v in kwargs.items() if k in BATCH_FIELDS})

    model.forward = types.MethodType(_aft_forward, model)


@dataclass
class AFTCollator:
    """Encoded groups -> the tensors of one `Batch` (aft_fast.data.collate.collate), None fields left out."""

    pad_id: int
    max_length: int
    layout: str = "shared"
    max_tokens: int | None = None

    def __call__(self, items: list[Encoded]) -> dict[str, torch.Tensor]:
        batch = collate(
            items,
            pad_id=self.pad_id,
            max_length=self.max_length,
            layout=self.layout,
            max_tokens=self.max_tokens,
        )
        return {k: v for k, v in batch.tensors().items() if v is not None}


class _Groups(torch.utils.data.Dataset):
    def __init__(self, items: list[Encoded]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Encoded:
        return self.items[i]


def _row_group(i: int, row: dict, tokenizer: PreTrainedTokenizerBase, with_ref_logp: bool, arg: str):
    """One Dataset row -> (CandidateGroup, the prompt's ids). Errors name the argument, row and column."""
    where = f"{arg} row {i}"
    for col in ("prompt", "candidates", "labels", *(("ref_logp",) if with_ref_logp else ())):
        if row.get(col) is None:
            raise ValueError(
                f"{where}: missing column {col!r} (expected prompt, candidates, labels"
                f"{', ref_logp' if with_ref_logp else ''})"
            )
    texts, labels = list(row["candidates"]), list(row["labels"])
    if len(texts) != len(labels):
        raise ValueError(f"{where}: 'labels' has {len(labels)} entries, 'candidates' {len(texts)}")
    ref_logp = list(row["ref_logp"]) if with_ref_logp else [None] * len(texts)
    if len(ref_logp) != len(texts):
        raise ValueError(f"{where}: 'ref_logp' has {len(ref_logp)} entries, 'candidates' {len(texts)}")
    for j, label in enumerate(labels):
        if isinstance(label, float) and not label.is_integer() or not isinstance(label, (int, float)):
            raise ValueError(f"{where}: labels[{j}] = {label!r} is neither 1/0 nor an integer rank")
    # A label is used as a rank: 1/0 ranks are exactly the binary labels (aft_loss reads both as ints).
    cands = [
        Candidate(t, rank=int(lab), ref_logp=None if r is None else float(r))
        for t, lab, r in zip(texts, labels, ref_logp, strict=True)
    ]
    group = CandidateGroup(
        str(i), row["prompt"], gold="", kind="number", reference=row.get("reference"), candidates=cands
    )
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return group, bos + tokenizer.encode(row["prompt"], add_special_tokens=False)


def encode_dataset(
    data: Any, tokenizer: PreTrainedTokenizerBase, args: AFTConfig, arg: str = "train_dataset"
):
    """A candidate JSONL path, a list of `CandidateGroup` or a `datasets.Dataset` -> encoded groups (groups
    without candidates are left out, as in aft-fast's aft stage). The JSONL's questions get aft-fast's
    prompt template; a Dataset's prompts are used as they are."""
    if data is None:
        return None
    enc = functools.partial(
        encode_group,
        tokenizer=tokenizer,
        with_reference=args.with_reference,
        with_ref_logp=args.needs_ref_logp,
    )
    if isinstance(data, (str, Path)):
        data = read_candidates(data)
    if isinstance(data, datasets.Dataset):
        items = []
        for i, row in enumerate(data):
            group, prompt = _row_group(i, row, tokenizer, args.needs_ref_logp, arg)
            if group.candidates:
                items.append(replace(enc(group), prompt=prompt))
    elif isinstance(data, list) and all(isinstance(g, CandidateGroup) for g in data):
        items = [enc(g) for g in data if g.candidates]
    else:
        raise TypeError(
            f"{arg}: expected a candidate JSONL path, a list of CandidateGroup or a datasets.Dataset "
            f"with prompt / candidates / labels columns, got {type(data).__name__}"
        )
    if not items:
        raise ValueError(f"{arg}: no group has candidates")
    return _Groups(items)


class AFTTrainer(Trainer):
    """The AFT loss family over candidate groups on the Hugging Face Trainer.

    model: a causal LM (or a path / hub id to load one), or a PEFT model. processing_class: its tokenizer
    (loaded from `model` when that is a path). peft_config: wrap the model in a PEFT adapter after the
    loss is attached. The other arguments are the Trainer's. Logs `vft_loss` and `align_loss` beside
    `loss`."""

    # compute_loss returns each micro batch's mean loss: the Trainer divides it for gradient accumulation.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | str | Path,
        args: AFTConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        data_collator: Any = None,
        peft_config: Any = None,
        **kwargs: Any,
    ):
        if args is None:
            args = AFTConfig(output_dir="aft-out")
        if not isinstance(args, AFTConfig):
            raise TypeError(f"args: expected an AFTConfig, got {type(args).__name__}")
        if isinstance(model, (str, Path)):
            if processing_class is None:
                processing_class = AutoTokenizer.from_pretrained(model)
            model = AutoModelForCausalLM.from_pretrained(model)
        if processing_class is None:
            raise ValueError(
                "processing_class: AFTTrainer needs the model's tokenizer to encode the candidates"
            )
        pad_id = processing_class.pad_token_id
        if pad_id is None:
            pad_id = processing_class.eos_token_id
        if pad_id is None or processing_class.eos_token_id is None:
            raise ValueError("processing_class: the tokenizer needs an eos token (chains end with it)")
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        attention.prepare(lm, args.layout, args.device)
        add_aft_loss(lm, args.loss, backend=args.backend)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if data_collator is None:
            data_collator = AFTCollator(pad_id, args.max_length, args.layout, args.max_tokens)
        if isinstance(eval_dataset, dict):
            eval_dataset = {
                k: encode_dataset(v, processing_class, args, f"eval_dataset[{k!r}]")
                for k, v in eval_dataset.items()
            }
        else:
            eval_dataset = encode_dataset(eval_dataset, processing_class, args, "eval_dataset")
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=encode_dataset(train_dataset, processing_class, args),
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self._metrics: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs, aft_batch=True)
        mode = "train" if model.training else "eval"
        parts = torch.stack([out["vft_loss"].detach(), out["align_loss"].detach()]).float()
        parts = self.accelerator.gather(parts[None]).mean(0)  # the mean over processes, as `loss` is logged
        self._metrics[mode]["vft_loss"].append(parts[0].item())
        self._metrics[mode]["align_loss"].append(parts[1].item())
        return (out["loss"], out) if return_outputs else out["loss"]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the AFT loss of the batch (its inputs hold no `labels` for the Trainer to find), and
        the per-segment scores as the predictions."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, out = self.compute_loss(model, inputs, return_outputs=True)
        loss = loss.detach()
        return (loss, None, None) if prediction_loss_only else (loss, out["scores"], inputs["label"])

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        for name, values in self._metrics[mode].items():
            if values:
                logs[prefix + name] = sum(values) / len(values)
        self._metrics[mode].clear()
        super().log(logs, start_time)
