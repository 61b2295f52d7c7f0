"""Collation into the padded layout: rows/targets/segments point at the right tokens, and scores from
the fused operator on the base model's hidden states equal those from a causal LM's full logits.
The packed and shared layouts are tested against this one in tests/test_packing.py."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aft_fast.data.batch import Batch
from aft_fast.data.candidates import Candidate, CandidateGroup
from aft_fast.data.collate import collate, encode_example, encode_group, encode_prompt
from aft_fast.data.formats import Example, prompt_text
from aft_fast.data.synthetic import generate_problems
from aft_fast.models.forward import segment_logprobs
from tests._integration_support import tiny_dims


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from aft_fast.data.tokenizer import train_tokenizer

    texts = [prompt_text(p.question) + p.reference for p in generate_problems(200, seed=3)]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"))


def _group(ex: Example, texts: list[str], correct: list[bool], ref_logp: list[float] | None = None):
    cands = [
        Candidate(t, c, None, None if ref_logp is None else lp)
        for t, c, lp in zip(texts, correct, ref_logp or [None] * len(texts), strict=True)
    ]
    return CandidateGroup(ex.id, ex.question, ex.gold, ex.kind, ex.reference, cands)


@pytest.fixture(scope="module")
def groups():
    exs = generate_problems(3, seed=5)
    g0 = _group(exs[0], ["right #### " + exs[0].gold, "wrong #### 999"], [True, False], [-3.0, -4.5])
    g1 = _group(
        exs[1],
        ["x #### 1", "y\n#### 2", "a longer chain of thought #### 3"],
        [False, False, True],
        [-1.0, -2.0, -3.0],
    )
    g2 = _group(exs[2], [exs[2].reference], [True], [-7.0])
    return [g0, g1, g2]


def test_rows_and_targets_point_at_the_next_token(tokenizer, groups):
    items = [encode_group(g, tokenizer) for g in groups]
    b = collate(items, pad_id=tokenizer.pad_token_id, max_length=512)
    B, L = b.input_ids.shape
    assert B == sum(len(i.members) for i in items) == b.num_segments
    # In the padded layout the token after a row's position is its target, in the same row.
    assert torch.equal(b.input_ids.flatten()[b.rows + 1], b.targets)
    assert bool((b.rows % L < L - 1).all()) and bool(b.attention_mask.flatten()[b.rows + 1].all())
    # Segment s is member s in order: group 0's reference, then its candidates, then group 1's, ...
    expected_group = [g for g, i in enumerate(items) for _ in i.members]
    assert b.group.tolist() == expected_group
    assert b.is_reference.tolist() == [True, False, False, True, False, False, False, True, False]
    assert b.label.tolist() == [1, 1, 0, 1, 0, 0, 1, 1, 1]
    counts = torch.bincount(b.segments, minlength=b.num_segments)
    assert counts.tolist() == [len(m) for i in items for m in i.members]
    # Each scored chain ends in eos and each row starts with bos + the prompt template.
    assert (b.targets[torch.cumsum(counts, 0) - 1] == tokenizer.eos_token_id).all()  # segments are contiguous
    prompt = encode_prompt(tokenizer, groups[0].question)
    assert b.input_ids[0, : len(prompt)].tolist() == prompt and prompt[0] == tokenizer.bos_token_id


def test_prompt_and_chain_tokenize_like_the_joined_text(tokenizer, groups):
    # Scoring tokenizes prompt and chain apart; generation reads them joined. They must agree.
    ex = groups[0]
    joined = tokenizer.encode(prompt_text(ex.question) + ex.reference, add_special_tokens=False)
    item = encode_example(Example(ex.id, ex.question, ex.reference, ex.gold, ex.kind), tokenizer)
    assert item.prompt[1:] + item.members[0][:-1] == joined


def test_scores_equal_full_logits_of_a_causal_lm(tokenizer, groups):
    torch.manual_seed(0)
    cfg = LlamaConfig(**tiny_dims(len(tokenizer), heads=4))
    lm = LlamaForCausalLM(cfg).eval()
    b = collate([encode_group(g, tokenizer) for g in groups], pad_id=tokenizer.pad_token_id, max_length=512)
    sums = segment_logprobs(lm, b)
    logits = lm(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, b.input_ids[:, 1:, None]).squeeze(-1)
    B, L = b.input_ids.shape
    member_mask = torch.zeros(B, L - 1, dtype=torch.bool)
    member_mask.view(-1)[(b.rows // L) * (L - 1) + b.rows % L] = True
    expected = (logp * member_mask).sum(1)  # one row per member in this layout
    torch.testing.assert_close(sums, expected, rtol=1e-5, atol=1e-4)


def test_ref_logp_and_vft_items(tokenizer, groups):
    item = encode_group(groups[1], tokenizer, with_ref_logp=True)
    assert item.ref_logp == [0.0, -1.0, -2.0, -3.0] and item.is_reference == [True, False, False, False]
    b = collate([item], pad_id=tokenizer.pad_token_id, max_length=512)
    assert b.ref_logp is not None and b.ref_logp.dtype == torch.float32
    no_ref = encode_group(groups[1], tokenizer, with_reference=False)
    assert not any(no_ref.is_reference) and len(no_ref.members) == 3
    missing = CandidateGroup("g", "q", "1", "number", None, [Candidate("#### 1", True)])
    with pytest.raises(ValueError, match="no ref_logp"):
        encode_group(missing, tokenizer, with_ref_logp=True)
    with pytest.raises(ValueError, match="some groups carry ref_logp"):
        collate([item, encode_group(groups[0], tokenizer)], pad_id=0, max_length=512)


def test_long_rows_are_cut_to_max_length(tokenizer, groups):
    item = encode_group(groups[2], tokenizer)
    full = len(item.prompt) + max(len(m) for m in item.members)
    b = collate([item], pad_id=tokenizer.pad_token_id, max_length=full - 10)
    assert b.input_ids.shape[1] == full - 10
    assert torch.equal(b.input_ids.flatten()[b.rows + 1], b.targets)  # still aligned after the cut
    tiny = collate([item], pad_id=tokenizer.pad_token_id, max_length=8)  # the prompt loses its start
    assert tiny.input_ids.shape[1] == 8 and tiny.targets.numel() > 0


def test_batch_moves_and_rejects_unknown_layout(tokenizer, groups):
    b = collate([encode_group(groups[0], tokenizer)], pad_id=0, max_length=64)
    assert isinstance(b.to("cpu"), Batch) and b.tensors().keys() >= {"input_ids", "rows", "ref_logp"}
    with pytest.raises(ValueError, match="layout 'ragged' is not available"):
        collate([encode_group(groups[0], tokenizer)], pad_id=0, max_length=64, layout="ragged")
