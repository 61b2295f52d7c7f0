"""Prompt formats (aft_fast/data/prompts.py): plain is the paper's template; chat is the tokenizer's chat
template, the same ids in every stage (VFT items, AFT items, generation for sample and eval, scoring); a
tokenizer without a chat template is refused; a run does not resume under another format."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from aft_fast.constants import train_mode
from aft_fast.data.candidates import CandidateGroup, label_candidates
from aft_fast.data.collate import encode_example, encode_group, encode_prompt
from aft_fast.data.formats import prompt_text
from aft_fast.data.prompts import bind_prompt_format, check_prompt_format, prompt_format_of, prompt_ids
from aft_fast.data.synthetic import generate_problems
from aft_fast.eval.generation import generate_chains
from aft_fast.train.aft import encode_items
from aft_fast.train.config import InputError, TrainConfig
from aft_fast.train.loop import check_resumable

# A small Jinja chat template of the usual shape: bos, role markers, the assistant's turn opened.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from aft_fast.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([prompt_text(p.question) + p.reference for p in generate_problems(60, seed=1)], out)
    return out


def _load(tok_dir, template: str | None = None):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    if template:
        tok.chat_template = template
    return tok


def test_plain_is_the_paper_template(tok_dir):
    tok = _load(tok_dir)
    q = generate_problems(1, seed=2)[0].question
    expected = [tok.bos_token_id] + tok.encode(prompt_text(q), add_special_tokens=False)
    assert prompt_format_of(tok) == "plain"  # nobody bound a format: plain
    assert encode_prompt(tok, q) == prompt_ids(tok, q, "plain") == expected
    assert encode_prompt(bind_prompt_format(_load(tok_dir, CHAT_TEMPLATE), "plain"), q) == expected


def test_chat_prompt_tokens_equal_apply_chat_template(tok_dir):
    tok = bind_prompt_format(_load(tok_dir, CHAT_TEMPLATE), "chat")
    q = generate_problems(1, seed=3)[0].question
    want = tok.apply_chat_template(
        [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert encode_prompt(tok, q) == list(want)
    assert tok.decode(encode_prompt(tok, q)) == f"{tok.bos_token}<|user|>\n{q}\n<|assistant|>\n"
    assert encode_prompt(tok, q).count(tok.bos_token_id) == 1  # the template's bos, no second one


class _Recorder(torch.nn.Module):
    """Stands in for a causal LM in generate_chains: records the prompt ids and answers with eos."""

    def __init__(self, eos: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.eos, self.seen = eos, None

    def generate(self, input_ids, attention_mask, generation_config):
        self.seen = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask, strict=True)]
        eos = torch.full((input_ids.shape[0], 1), self.eos)
        return torch.cat([input_ids, eos], dim=1).repeat_interleave(generation_config.num_return_sequences, 0)


def test_every_stage_encodes_the_same_chat_prompt(tok_dir):
    tok = bind_prompt_format(_load(tok_dir, CHAT_TEMPLATE), "chat")
    problems = generate_problems(3, seed=4)
    chat = [prompt_ids(tok, p.question, "chat") for p in problems]
    assert all(c != prompt_ids(tok, p.question, "plain") for c, p in zip(chat, problems, strict=True))
    vft = [encode_example(p, tok).prompt for p in problems]
    groups = [
        label_candidates(CandidateGroup.from_example(p), [p.reference, p.reference + " 1"]) for p in problems
    ]
    aft = [item.prompt for item in encode_items(train_mode("bcl"), groups, tok)]
    rft = [item.prompt for item in encode_items(train_mode("rft"), groups, tok)]
    scored = [encode_group(g, tok, with_reference=False).prompt for g in groups]  # eval / ref_logp scoring
    model = _Recorder(tok.eos_token_id)
    questions = [p.question for p in problems]
    generate_chains(model, tok, questions, num_return_sequences=2, do_sample=True)  # sample and eval
    assert vft == aft == rft == scored == model.seen == chat


def test_a_tokenizer_without_a_chat_template_is_refused(tok_dir):
    tok = _load(tok_dir)
    with pytest.raises(
        ValueError, match=r"prompt_format chat: tokenizer .* has no chat template.*--prompt_format"
    ):
        bind_prompt_format(tok, "chat")
    assert prompt_format_of(tok) == "plain"
    with pytest.raises(ValueError, match="prompt_format chat"):
        prompt_ids(tok, "1 + 1?", "chat")
    with pytest.raises(ValueError, match="prompt_format: 'alpaca' is not one of plain, chat"):
        check_prompt_format(tok, "alpaca")


def test_resume_under_another_prompt_format_or_adapter_is_refused():
    saved = {"step": 2, "world_size": 1, "config": TrainConfig().to_dict()}
    check_resumable(saved, TrainConfig(), "vft", 1)
    with pytest.raises(InputError, match=r"cannot resume vft from step 2.*prompt_format: 'plain' -> 'chat'"):
        check_resumable(saved, TrainConfig(prompt_format="chat"), "vft", 1)
    with pytest.raises(InputError, match=r"lora_r: 0 -> 8"):
        check_resumable(saved, TrainConfig(lora_r=8), "aft", 1)


def test_the_cli_names_prompt_format_for_a_tokenizer_without_a_template(tok_dir, tmp_path):
    from aft_fast.models.loading import create_default_model
    from tests._train_support import run_python

    create_default_model(_load(tok_dir), tmp_path / "model", seed=0)
    args = [
        "--stage=eval",
        f"--model={tmp_path / 'model'}",
        f"--run_dir={tmp_path / 'run'}",
        "--prompt_format=chat",
    ]
    result = run_python([*args, "--synthetic_train=8", "--synthetic_test=2", "--progress=false"], timeout=600)
    assert result.returncode != 0
    assert "prompt_format chat: tokenizer" in result.stdout and "has no chat template" in result.stdout
    assert "Traceback" not in result.stdout
