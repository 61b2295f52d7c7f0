"""LoRA adapters through PEFT (aft_fast/models/adapters.py), one CPU process: which modules get adapters,
the refusals (LM head, tied embedding), adapter folders and their base chains, merged loading, QLoRA's
refusal off CUDA. ZeRO-3 training with adapters: tests/test_lora_distributed.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, LlamaConfig

from aft_fast.models import adapters
from aft_fast.models.adapters import LoraSettings, adapter_chain, adapter_state_dict, add_lora
from aft_fast.models.loading import check_model_dir, check_vocab, load_replica, load_tokenizer, save_hf_folder
from tests._integration_support import tiny_dims
from tests._train_support import make_assets

LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def tiny(tied: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(**tiny_dims(40, 16, 24, tie=tied))
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    return make_assets(tmp_path_factory.mktemp("assets"), n_groups=4)


def test_default_targets_are_every_linear_layer_but_the_head():
    lm = tiny(tied=False)
    model = add_lora(lm, LoraSettings(r=2))
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == LINEARS
    assert len(wrapped) == 2 * len(LINEARS)
    assert not isinstance(lm.get_output_embeddings(), LoraLayer)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not lm.get_output_embeddings().weight.requires_grad
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (
        f"on 14 modules (down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj): {n:,} trainable"
        in (adapters.describe(model))
    )


@pytest.mark.parametrize("tied", [True, False])
def test_adapter_on_the_head_is_refused(tied):
    with pytest.raises(
        ValueError, match=r"lora_target_modules: 'lm_head' is the LM head.*Leave 'lm_head' out"
    ):
        add_lora(tiny(tied), LoraSettings(r=2, target_modules=("q_proj", "lm_head")))


def test_adapter_on_a_tied_embedding_is_refused():
    with pytest.raises(ValueError, match=r"'model.embed_tokens' is the input embedding, tied to the LM head"):
        add_lora(tiny(tied=True), LoraSettings(r=2, target_modules=("embed_tokens",)))
    # Untied, the embedding is an ordinary input layer: the head the loss reads is untouched.
    model = add_lora(tiny(tied=False), LoraSettings(r=2, target_modules=("embed_tokens",)))
    assert isinstance(model.get_input_embeddings(), LoraLayer)


def test_target_module_list_and_settings_checks():
    assert adapters.parse_target_modules("") == ()
    assert adapters.parse_target_modules("all-linear") == ()
    assert adapters.parse_target_modules(" q_proj, v_proj ,") == ("q_proj", "v_proj")
    model = add_lora(tiny(tied=True), LoraSettings(r=2, target_modules=("q_proj", "v_proj")))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="lora_r"):
        LoraSettings(r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        LoraSettings(r=2, dropout=1.0)


def test_adapters_start_alike_for_a_seed():
    a = adapter_state_dict(add_lora(tiny(True), LoraSettings(r=2), seed=3))
    b = adapter_state_dict(add_lora(tiny(True), LoraSettings(r=2), seed=3))
    c = adapter_state_dict(add_lora(tiny(True), LoraSettings(r=2), seed=4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def _save_adapter(base: Path, out: Path, tok, seed: int) -> dict[str, torch.Tensor]:
    lm = load_replica(base, torch.device("cpu"), torch.float32)
    model = add_lora(lm, LoraSettings(r=4, alpha=8.0, init_weights=False), base=base, seed=seed)
    state = adapter_state_dict(model)
    save_hf_folder(model, tok, out, state_dict=state, trainer_state={"steps": 1})
    return state


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapter_folder_chain_loads_merged(assets, tmp_path):
    tok = load_tokenizer(assets["tokenizer"])
    first, second = tmp_path / "vft", tmp_path / "aft"
    state = _save_adapter(assets["model"], first, tok, seed=1)
    _save_adapter(first, second, tok, seed=2)  # adapters trained on a LoRA model: its base is the folder
    cfg = json.loads((first / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]) == assets["model"].resolve()
    assert adapter_chain(second) == (assets["model"].resolve(), [first.resolve(), second])
    assert check_model_dir(second) == second
    check_vocab(tok, second)

    ids = torch.tensor([tok.encode("Question: 3 + 4?", add_special_tokens=False)])
    cpu = torch.device("cpu")
    base = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, first)  # what a user of the folder does
    saved = {k.replace(".default.", "."): v for k, v in state.items()}
    for name, p in peft.named_parameters():
        if ".lora_" in name:
            assert torch.equal(p.detach(), saved[name.replace(".default.", ".")]), name
    merged = load_replica(first, cpu, torch.float32)
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    torch.testing.assert_close(_logits(merged, ids), _logits(peft, ids), rtol=1e-5, atol=1e-5)
    with peft.disable_adapter():
        plain = _logits(peft, ids)
    assert (plain - _logits(merged, ids)).abs().max() > 1e-3  # the adapter changes the model

    # Two adapters: the second on the first, merged, as a PEFT user would stack them.
    by_hand = PeftModel.from_pretrained(
        PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32), first
        ).merge_and_unload(),
        second,
    )
    torch.testing.assert_close(
        _logits(load_replica(second, cpu, torch.float32), ids), _logits(by_hand, ids), rtol=1e-5, atol=1e-5
    )
    unmerged = adapters.load_peft(second, cpu, torch.float32)
    torch.testing.assert_close(_logits(unmerged, ids), _logits(by_hand, ids), rtol=1e-5, atol=1e-5)


def test_broken_adapter_folders_are_named(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(FileNotFoundError, match="has no weights"):
        adapter_chain(folder)
    (folder / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="no base_model_name_or_path"):
        adapter_chain(folder)
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "IA3", "base_model_name_or_path": "x"})
    )
    with pytest.raises(ValueError, match="only LoRA"):
        adapter_chain(folder)
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(tmp_path / "missing")})
    )
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        check_model_dir(folder)


def test_qlora_is_refused_off_cuda():
    with pytest.raises(ValueError, match="qlora: a 4-bit base .* needs a CUDA device"):
        adapters.check_qlora(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs CUDA")
def test_qlora_base_is_4bit_and_trains_adapters(assets):
    pytest.importorskip("bitsandbytes")
    device = torch.device("cuda")
    lm = adapters.load_4bit(assets["model"], device, torch.bfloat16)
    model = add_lora(lm, LoraSettings(r=4, init_weights=False))
    assert any("4bit" in type(m).__name__ for m in model.modules())
    ids = torch.tensor([[1, 5, 9, 13]], device=device)
    model(input_ids=ids).logits.float().sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
