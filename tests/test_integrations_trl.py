"""aft_fast.integrations.trl: TRL's fused-LM-head contract on aft-fast's operator.

The head's outputs and gradients equal TRL's own head (an independent implementation of the same contract)
and a full-logits forward through the model's own lm_head; DPOTrainer and SFTTrainer train the same with
each of the three."""

from __future__ import annotations

import importlib
import math
import types

import pytest
import torch
from transformers import LlamaForCausalLM, TrainerCallback

from tests._integration_support import make_tokenizer, sgd_steps_args, tiny_llama

trl = pytest.importorskip("trl", reason="the trl extra: pip install -e '.[trl]'")
from trl.trainer.utils import FusedCausalLMOutput  # noqa: E402
from trl.trainer.utils import add_fused_lm_head as trl_add_fused_lm_head  # noqa: E402

from aft_fast.integrations import trl as aft_trl  # noqa: E402

ALL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
VOCAB = 61


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def twins(vocab: int = VOCAB, **config) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    # Initialized 15x wider than Llama's default: peaked next-token distributions, so that the log-probs, the
    # entropy and the top-1 flags depend visibly on temperature and scale.
    config.setdefault("initializer_range", 0.3)
    a, b = tiny_llama(vocab, **config), tiny_llama(vocab, seed=1, **config)
    b.load_state_dict(a.state_dict())
    return a, b


def with_bias(model: LlamaForCausalLM) -> LlamaForCausalLM:
    old = model.lm_head
    model.lm_head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        model.lm_head.weight.copy_(old.weight)
        model.lm_head.bias.copy_(torch.randn(old.out_features))
    return model


def batch(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 13), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # prompts
    labels[1, 9:] = -100  # a shorter completion
    return ids, labels


def full_logits_head(
    model,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    outputs: tuple[str, ...] = ("log_probs",),
) -> None:
    """The contract computed the plain way: the model's own forward (full [B, L, V] logits), log_softmax."""
    original = model.forward

    def forward(
        self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kw
    ):
        if not fused_lm_head:
            return original(*args, labels=labels, **kw)
        kw["use_cache"] = False
        logits = original(*args, **kw).logits.float() / temperature
        if shift_labels is None:
            logits, labels = logits[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        mask = labels != -100
        logp = logits.log_softmax(-1)
        log_probs = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * mask
        extra = dict(
            entropy=-(logp.exp() * logp).sum(-1) * mask,
            log_sum_sq_probs=torch.logsumexp(2 * logp, -1).detach() * mask,
            mean_logits=logits.mean(-1).detach() * mask,
            is_top1=(logits.argmax(-1) == labels) & mask,
        )
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / count,
            log_probs=log_probs,
            label_mask=mask,
            **{k: (v if k in outputs else None) for k, v in extra.items()},
        )

    model.forward = types.MethodType(forward, model)


def run_head(model, ids, labels, shift: bool = False, **call):
    if shift:  # pre-shifted: position i's own next-token label, -100 for the last position
        shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        out = model(input_ids=ids, shift_labels=shifted, fused_lm_head=True, **call)
    else:
        out = model(input_ids=ids, labels=labels, fused_lm_head=True, **call)
    # A loss that reaches every differentiable field: log-probs through the loss, the entropy directly.
    (out.loss + 0.3 * out.entropy.sum()).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_outputs(ours, theirs, atol: float = 1e-5):
    for name in ("loss", *ALL_OUTPUTS, "label_mask"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.shape == b.shape and a.dtype == b.dtype, name
            torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def assert_same_grads(ga: dict, gb: dict, atol: float = 1e-5):
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(
            ga[name], gb[name], rtol=1e-5, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("shift", [False, True], ids=["labels", "shift_labels"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_head_equals_a_full_logits_forward(temperature, shift):
    ours, plain = twins()
    aft_trl.add_fused_lm_head(ours, temperature=temperature, outputs=ALL_OUTPUTS)
    full_logits_head(plain, temperature=temperature, outputs=ALL_OUTPUTS)
    ids, labels = batch()
    out_a, grads_a = run_head(ours, ids, labels, shift=shift)
    out_b, grads_b = run_head(plain, ids, labels, shift=shift)
    assert_same_outputs(out_a, out_b)
    assert_same_grads(grads_a, grads_b)
    assert bool((out_a.log_probs[~out_a.label_mask] == 0).all())
    assert out_a.log_probs.shape == ((3, 13) if shift else (3, 12))


CASES = {
    "plain": dict(config={}, temperature=1.0, bias=False),
    "temperature+bias": dict(config={}, temperature=0.6, bias=True),
    "logit_scale": dict(config={"logit_scale": 0.5}, temperature=1.0, bias=True),  # Cohere
    "logits_scaling": dict(config={"logits_scaling": 4.0}, temperature=0.8, bias=False),  # Granite
    "lm_head_multiplier": dict(config={"lm_head_multiplier": 2.5}, temperature=1.0, bias=False),  # Falcon-H1
    "softcap": dict(config={"final_logit_softcapping": 3.0}, temperature=0.9, bias=True),  # Gemma-2
    "softcap+scale": dict(
        config={"final_logit_softcapping": 2.0, "logit_scale": 1.5}, temperature=1.0, bias=False
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_head_equals_trls_head(case):
    spec = CASES[case]
    ours, theirs = twins(**spec["config"])
    if spec["bias"]:
        torch.manual_seed(5)
        with_bias(ours)
        theirs.lm_head = with_bias(tiny_llama(VOCAB, **spec["config"])).lm_head
        theirs.lm_head.load_state_dict(ours.lm_head.state_dict())
    aft_trl.add_fused_lm_head(ours, temperature=spec["temperature"], outputs=ALL_OUTPUTS)
    trl_add_fused_lm_head(theirs, temperature=spec["temperature"], outputs=ALL_OUTPUTS)
    ids, labels = batch()
    out_a, grads_a = run_head(ours, ids, labels, num_items_in_batch=7)
    out_b, grads_b = run_head(theirs, ids, labels, num_items_in_batch=7)
    assert_same_outputs(out_a, out_b)
    assert_same_grads(grads_a, grads_b)


def test_bf16_model_with_the_head_cast_to_fp32_and_under_autocast():
    """GRPO's cast_lm_head_to_fp32 on a bf16 model: the head runs in fp32, as TRL's does (the backbone's
    bf16 hidden states upcast). Under bf16 autocast the head runs in bf16, as TRL's does."""
    ours, theirs = (m.to(torch.bfloat16) for m in twins())
    aft_trl.add_fused_lm_head(ours, cast_lm_head_to_fp32=True, outputs=("log_probs", "entropy"))
    trl_add_fused_lm_head(theirs, cast_lm_head_to_fp32=True, outputs=("log_probs", "entropy"))
    ids, labels = batch()
    a = ours(input_ids=ids, labels=labels, fused_lm_head=True)
    b = theirs(input_ids=ids, labels=labels, fused_lm_head=True)
    assert a.log_probs.dtype == torch.float32
    torch.testing.assert_close(a.log_probs, b.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.entropy, b.entropy, rtol=1e-5, atol=1e-5)

    ours, theirs = twins()
    aft_trl.add_fused_lm_head(ours)
    trl_add_fused_lm_head(theirs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = ours(input_ids=ids, labels=labels, fused_lm_head=True)
        b = theirs(input_ids=ids, labels=labels, fused_lm_head=True)
    full = full_logits_reference(twins()[0], ids, labels)
    # The whole model runs in bf16 (the backbone too): our error from the fp32 log-probs is at most TRL's
    # own bf16 head's, twice over (the project's tolerance rule), and the two heads agree to bf16 precision.
    ours_err, trl_err = (a.log_probs - full).abs().max(), (b.log_probs - full).abs().max()
    assert 0 < trl_err and ours_err <= 2 * trl_err + 1e-3, (ours_err, trl_err)
    torch.testing.assert_close(a.log_probs, b.log_probs, rtol=0.02, atol=0.05)


def full_logits_reference(model, ids, labels) -> torch.Tensor:
    full_logits_head(model)
    with torch.no_grad():
        return model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs


def test_only_the_requested_fields_and_the_original_forward_without_the_flag():
    model, plain = twins()
    aft_trl.add_fused_lm_head(model)
    ids, labels = batch()
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert out.log_probs is not None and out.entropy is None and out.is_top1 is None
    # Without fused_lm_head the model's own forward runs, logits and loss as before.
    a, b = model(input_ids=ids, labels=labels), plain(input_ids=ids, labels=labels)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(out.loss, b.loss, rtol=1e-5, atol=1e-6)  # the same NLL, through the operator


def test_all_masked_batch_backpropagates_a_zero():
    model = tiny_llama(VOCAB)
    aft_trl.add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    ids, labels = batch()
    out = model(input_ids=ids, labels=torch.full_like(labels, -100), fused_lm_head=True)
    assert out.loss.detach().item() == 0.0 and bool((out.log_probs == 0).all())
    out.loss.backward()
    assert all(p.grad is None or bool((p.grad == 0).all()) for p in model.parameters())


def test_an_adapter_on_the_head_is_refused():
    """The operator reads lm_head.weight: a LoRA adapter on the head itself would be silently left out."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(VOCAB)
    aft_trl.add_fused_lm_head(model)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    ids, labels = batch()
    with pytest.raises(ValueError, match="nn.Linear LM head"):
        peft_model(input_ids=ids, labels=labels, fused_lm_head=True)


def test_bad_arguments_are_refused():
    model = tiny_llama(VOCAB)
    with pytest.raises(ValueError, match="outputs"):
        aft_trl.add_fused_lm_head(model, outputs=("log_probs", "logits"))
    with pytest.raises(ValueError, match="temperature"):
        aft_trl.add_fused_lm_head(model, temperature=0.0)
    # A logit post-processing the operator does not know is refused by its config field, never ignored.
    with pytest.raises(ValueError, match="final_logit_scale_hack"):
        aft_trl.add_fused_lm_head(tiny_llama(VOCAB, final_logit_scale_hack=2.0))
    aft_trl.add_fused_lm_head(model)
    with pytest.raises(ValueError, match="labels"):
        model(input_ids=batch()[0], fused_lm_head=True)


def test_patch_trl_reaches_every_trainer_and_unpatch_restores():
    import trl.trainer.dpo_trainer as dpo
    import trl.trainer.grpo_trainer as grpo
    import trl.trainer.kto_trainer as kto
    import trl.trainer.rloo_trainer as rloo
    import trl.trainer.sft_trainer as sft
    import trl.trainer.utils as utils

    modules = (utils, dpo, kto, grpo, rloo, sft)
    aft_trl.patch_trl()
    try:
        assert all(m.add_fused_lm_head is aft_trl.add_fused_lm_head for m in modules)
    finally:
        aft_trl.unpatch_trl()
    assert all(m.add_fused_lm_head is trl_add_fused_lm_head for m in modules)


# ---------------------------------------------------------------------------------------------------------
# DPOTrainer, two steps, with each head.


class _Record(TrainerCallback):
    """Gradients of every parameter just before each optimizer step."""

    def __init__(self):
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append(
            {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        )


PROMPTS = ["1 + 2 =", "3 + 4 =", "5 - 1 =", "2 * 3 ="]
DATA = {
    "dpo": {
        "prompt": PROMPTS,
        "chosen": [" 3", " 7", " 4", " 6"],
        "rejected": [" 4 and more", " 8", " 5 or 6", " 5"],
    },
    "sft": {"prompt": PROMPTS, "completion": [" 3", " 7 and 7", " 4", " 6 or 6 or 6"]},
}
# Each trainer's logged metrics that come from the fused head's fields.
METRICS = {
    "dpo": ("rewards/chosen", "logps/chosen", "entropy", "mean_token_accuracy", "logits/chosen"),
    "sft": ("entropy", "mean_token_accuracy", "num_tokens"),
}


def _trl_run(kind, tokenizer, head, tmp_path, monkeypatch):
    """Two SGD steps of TRL's DPOTrainer or SFTTrainer with `head` as its add_fused_lm_head: the losses, the
    logged metrics and each step's parameter gradients."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    module = importlib.import_module(f"trl.trainer.{kind}_trainer")
    monkeypatch.setattr(module, "add_fused_lm_head", head)
    model, ref = twins(vocab=len(tokenizer))
    config, trainer_class = (DPOConfig, DPOTrainer) if kind == "dpo" else (SFTConfig, SFTTrainer)
    args = config(
        **sgd_steps_args(
            tmp_path,
            bf16=False,
            fp16=False,
            activation_checkpointing=False,  # TRL's configs default to True
            dataloader_num_workers=0,
        )
    )
    record = _Record()
    losses = []
    extra = {"ref_model": ref} if kind == "dpo" else {}
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict(DATA[kind]),
        processing_class=tokenizer,
        callbacks=[record],
        **extra,
    )
    compute_loss = trainer.compute_loss

    def logged_loss(*a, **k):
        loss = compute_loss(*a, **k)
        losses.append((loss[0] if isinstance(loss, tuple) else loss).detach().item())
        return loss

    trainer.compute_loss = logged_loss
    trainer.train()
    metrics = [
        {k: v for k, v in log.items() if k in METRICS[kind] or "/" in k}
        for log in trainer.state.log_history
        if "entropy" in log
    ]
    return losses, metrics, record.grads


@pytest.mark.parametrize("kind", ["dpo", "sft"])
def test_trl_trainer_two_steps_same_with_every_head(kind, tiny_tokenizer, tmp_path, monkeypatch):
    runs = {
        name: _trl_run(kind, tiny_tokenizer, head, tmp_path / name, monkeypatch)
        for name, head in (
            ("trl", trl_add_fused_lm_head),
            ("aft_fast", aft_trl.add_fused_lm_head),
            ("full_logits", full_logits_head),
        )
    }
    losses, metrics, grads = runs["aft_fast"]
    assert len(losses) == 2 and len(metrics) == 2 and len(grads) == 2
    assert metrics[0].keys() >= set(METRICS[kind])
    assert any(abs(v) > 1e-6 for v in grads[1]["model.layers.0.mlp.up_proj.weight"].flatten().tolist())
    for other in ("trl", "full_logits"):
        o_losses, o_metrics, o_grads = runs[other]
        assert losses == pytest.approx(o_losses, rel=1e-5, abs=1e-5), other
        for mine, theirs in zip(metrics, o_metrics, strict=True):
            assert mine.keys() == theirs.keys()
            for key in mine:
                assert math.isclose(mine[key], theirs[key], rel_tol=1e-5, abs_tol=1e-5), (other, key)
        for step, (mine, theirs) in enumerate(zip(grads, o_grads, strict=True)):
            assert mine.keys() == theirs.keys()
            for name in mine:
                torch.testing.assert_close(
                    mine[name],
                    theirs[name],
                    rtol=1e-5,
                    atol=1e-5,
                    msg=lambda m, s=step, n=name, o=other: f"{o} step {s} {n}: {m}",
                )
