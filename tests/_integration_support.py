"""Small assets for the integration tests: a byte-level BPE trained in a second on arithmetic text, a tiny
random Llama (fp32) made in the test, candidate groups, and the plain reference step of the AFT loss."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from aft_fast.data.candidates import Candidate, CandidateGroup
from aft_fast.data.collate import collate
from aft_fast.reference import aft_loss_ref

# The trainer tests' run: two plain SGD steps at a constant rate on the CPU, a log line a step, nothing saved
# or reported (their reference steps assume exactly this).
LR = 0.5


def sgd_steps_args(output_dir: Path | str, **kw) -> dict:
    """The keywords of a Hugging Face TrainingArguments (AFTConfig, DPOConfig, SFTConfig) for that run, plus
    `kw`."""
    return dict(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=LR,
        optim="sgd",
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **kw,
    )


TEXTS = [
    f"{a} + {b} = {a + b}. {a} - {b} = {a - b}. {a} * {b} = {a * b}" for a in range(12) for b in range(9)
]


def make_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    from aft_fast.data.tokenizer import train_tokenizer

    return train_tokenizer(TEXTS, out_dir, vocab_size=300)


def tiny_dims(
    vocab: int,
    hidden: int = 32,
    intermediate: int = 64,
    *,
    layers: int = 2,
    heads: int = 2,
    tie: bool = False,
    **kw,
) -> dict:
    """The config keywords of the tests' tiny random decoders: `layers` layers of `heads` attention heads
    over two key-value heads, plus `kw`."""
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        **kw,
    )


def tiny_llama(vocab: int, seed: int = 0, tie: bool = False, **config) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    dims = tiny_dims(vocab, tie=tie, max_position_embeddings=128, **config)
    cfg = LlamaConfig(**dims, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).float()


def make_groups(n: int = 4) -> list[CandidateGroup]:
    """Groups mixing right and wrong chains, one with ranks, one all-positive (no pair: L_vft only)."""
    groups = []
    for i in range(n):
        a, b = i + 2, i + 1
        right, wrong = f"{a} + {b} = {a + b}. #### {a + b}", f"{a} + {b} = {a + b + 1}. #### {a + b + 1}"
        if i % 4 == 1:
            cands = [
                Candidate(right, rank=2),
                Candidate(wrong, rank=0),
                Candidate(f"{a + b}. #### {a + b}", rank=1),
            ]
        elif i % 4 == 3:
            cands = [Candidate(right, correct=True), Candidate(f"{a} plus {b} is {a + b}", correct=True)]
        else:
            cands = [
                Candidate(right, correct=True),
                Candidate(wrong, correct=False),
                Candidate(f"{a} - {b} = {a - b}", correct=False),
            ]
        groups.append(
            CandidateGroup(
                f"q{i}",
                f"What is {a} + {b}?",
                str(a + b),
                "number",
                reference=right if i % 2 == 0 else None,
                candidates=cands,
            )
        )
    return groups


def reference_step(model, items, tokenizer, **loss) -> tuple[float, dict[str, torch.Tensor]]:
    """The plain reference AFT loss of `items` (one padded row per member, the model's own decoder, full
    logits) and its gradient of every trainable parameter."""
    batch = collate(items, pad_id=tokenizer.pad_token_id, max_length=64, layout="padded")
    model.zero_grad()
    hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    out = aft_loss_ref(
        hidden.flatten(0, 1),
        model.lm_head.weight,
        **batch.token_index(),
        **batch.group_inputs(),
        **loss,
    )
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
