"""AFTTrainer (aft_fast.integrations): its steps are the plain reference AFT loss of the same groups, from any
of its inputs, with a PEFT adapter too; the README's example runs."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra: pip install -e '.[trl]'")
from datasets import Dataset  # noqa: E402

from aft_fast.data.candidates import write_candidates  # noqa: E402
from aft_fast.data.formats import prompt_text  # noqa: E402
from aft_fast.integrations.hf import encode_dataset  # noqa: E402
from aft_fast.integrations.trl import AFTConfig, AFTTrainer  # noqa: E402
from tests._integration_support import (  # noqa: E402
    LR,
    make_groups,
    make_tokenizer,
    reference_step,
    sgd_steps_args,
    tiny_llama,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "aft_trainer.py"
README_MARKER = "<!-- tests/test_aft_trainer.py runs this block -->"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def config(tmp_path: Path, **kw) -> AFTConfig:
    return AFTConfig(**{**sgd_steps_args(tmp_path / "out", dataloader_num_workers=0, max_length=64), **kw})


class Recorder:
    """Wraps the trainer's collator and compute_loss: each step's groups, parameters before it, its loss."""

    def __init__(self, trainer: AFTTrainer):
        self.items, self.params, self.losses = [], [], []
        collator, compute_loss = trainer.data_collator, trainer.compute_loss

        def collate_and_keep(items):
            self.items.append(copy.deepcopy(items))
            return collator(items)

        def loss_and_keep(model, inputs, *a, **k):
            self.params.append({n: p.detach().clone() for n, p in model.named_parameters()})
            loss = compute_loss(model, inputs, *a, **k)
            self.losses.append(loss.detach().item())
            return loss

        trainer.data_collator = collate_and_keep
        trainer.compute_loss = loss_and_keep


@pytest.mark.parametrize("mode", ["bcl", "align"])
def test_steps_equal_the_reference_aft_loss(tokenizer, tmp_path, mode):
    write_candidates(tmp_path / "c.jsonl", make_groups())
    model = tiny_llama(len(tokenizer), tie=True)  # tied: the head's gradient reaches the embedding too
    trainer = AFTTrainer(
        model,
        config(tmp_path, mode=mode, beta=0.5, w_vft=0.7),
        tmp_path / "c.jsonl",
        processing_class=tokenizer,
    )
    rec = Recorder(trainer)
    trainer.train()
    assert len(rec.losses) == 2
    final = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    after = [*rec.params[1:], final]
    for step in range(2):
        ref_model = tiny_llama(len(tokenizer), tie=True)
        ref_model.load_state_dict(rec.params[step], strict=False)
        loss, grads = reference_step(ref_model, rec.items[step], tokenizer, mode=mode, beta=0.5, w_vft=0.7)
        assert rec.losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
        for name, grad in grads.items():
            torch.testing.assert_close(
                after[step][name],
                rec.params[step][name] - LR * grad,
                rtol=1e-5,
                atol=1e-6,
                msg=lambda m, s=step, n=name: f"step {s} {n}: {m}",
            )
    logged = [log for log in trainer.state.log_history if "align_loss" in log]
    assert len(logged) == 2 and all(log["vft_loss"] > 0 for log in logged)


def test_evaluate_is_the_reference_loss(tokenizer, tmp_path):
    model = tiny_llama(len(tokenizer))
    groups = make_groups()
    args = config(tmp_path, per_device_eval_batch_size=4, w_vft=0.5)
    trainer = AFTTrainer(model, args, groups, eval_dataset=groups, processing_class=tokenizer)
    metrics = trainer.evaluate()
    items = [trainer.eval_dataset[i] for i in range(4)]
    loss, _ = reference_step(tiny_llama(len(tokenizer)), items, tokenizer, mode="bcl", w_vft=0.5)
    assert metrics["eval_loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["eval_vft_loss"] > 0 and "eval_align_loss" in metrics


def test_dataset_and_jsonl_encode_the_same(tokenizer, tmp_path):
    groups = make_groups()
    write_candidates(tmp_path / "c.jsonl", groups)
    data = Dataset.from_dict(
        {
            "prompt": [prompt_text(g.question) for g in groups],
            "candidates": [[c.text for c in g.candidates] for g in groups],
            "labels": [g.labels() for g in groups],
            "reference": [g.reference for g in groups],
        }
    )
    args = config(tmp_path)
    from_file = encode_dataset(str(tmp_path / "c.jsonl"), tokenizer, args)
    from_dataset = encode_dataset(data, tokenizer, args)
    from_list = encode_dataset(groups, tokenizer, args)
    assert len(from_file) == 4
    for i in range(4):
        assert from_file[i] == from_dataset[i] == from_list[i], i
    assert sum(from_file[i].is_reference.count(True) for i in range(4)) == 2


def test_bad_inputs_name_the_field(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="AFTConfig.mode"):
        config(tmp_path, mode="ppo")
    with pytest.raises(ValueError, match="AFTConfig.layout"):
        config(tmp_path, layout="ragged")
    args = config(tmp_path)
    with pytest.raises(ValueError, match="row 1: 'labels' has 1 entries, 'candidates' 2"):
        encode_dataset(
            Dataset.from_dict(
                {"prompt": ["a", "b"], "candidates": [["x"], ["y", "z"]], "labels": [[1], [0]]}
            ),
            tokenizer,
            args,
        )
    with pytest.raises(ValueError, match="missing column 'labels'"):
        encode_dataset(Dataset.from_dict({"prompt": ["a"], "candidates": [["x"]]}), tokenizer, args)
    with pytest.raises(ValueError, match="ref_logp"):
        encode_dataset(make_groups(), tokenizer, config(tmp_path, mode="dpo"))


def test_peft_adapter_trains_and_the_base_stays(tokenizer, tmp_path):
    from peft import LoraConfig

    model = tiny_llama(len(tokenizer))
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = AFTTrainer(
        model,
        config(tmp_path),
        make_groups(),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    rec = Recorder(trainer)
    trainer.train()
    # LoRA's B starts at zero: the first step's loss is the base model's reference loss.
    loss, _ = reference_step(tiny_llama(len(tokenizer)), rec.items[0], tokenizer, mode="bcl")
    assert rec.losses[0] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    named = dict(trainer.model.named_parameters())
    lora = [n for n in named if "lora_" in n]
    assert lora and any(not torch.equal(named[n], rec.params[0][n]) for n in lora)
    for n, p in named.items():
        if "lora_" not in n:
            plain = n.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, base[plain]), n
    trainer.save_model()
    assert (Path(trainer.args.output_dir) / "adapter_config.json").is_file()


def _readme_block() -> str | None:
    text = (ROOT / "README.md").read_text()
    if README_MARKER not in text:
        return None
    match = re.search(r"```python\n(.*?)```", text[text.index(README_MARKER) :], re.S)
    return match.group(1) if match else None


def test_readme_holds_the_example():
    """The README's TRL / AFTTrainer block (the python block after its marker) is examples/aft_trainer.py,
    which the next test runs."""
    assert _readme_block() == EXAMPLE.read_text(), (
        f"README.md must hold examples/aft_trainer.py verbatim in a ```python block after {README_MARKER!r}"
    )


def test_example_runs(tokenizer, tmp_path):
    """examples/aft_trainer.py runs on a run folder as `make train` leaves it (runs/default/vft with its
    tokenizer, runs/default/candidates.jsonl) and trains the model it saves."""
    code = EXAMPLE.read_text()
    run = tmp_path / "runs" / "default"
    model = tiny_llama(len(tokenizer), tie=True)
    model.save_pretrained(run / "vft")
    tokenizer.save_pretrained(run / "vft")
    write_candidates(run / "candidates.jsonl", make_groups(8))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        ns: dict = {}
        exec(compile(code, str(EXAMPLE), "exec"), ns)
    finally:
        os.chdir(cwd)
        from aft_fast.integrations.trl import unpatch_trl

        unpatch_trl()
    assert ns["trainer"].state.global_step == 2  # 8 groups, 4 a step, one epoch
    saved = run / "aft-trainer" / "model.safetensors"
    assert saved.is_file()
    from safetensors.torch import load_file

    after = load_file(str(saved))
    assert not torch.equal(after["model.embed_tokens.weight"], model.model.embed_tokens.weight.detach())
