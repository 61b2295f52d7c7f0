"""Prompt sharing and padding-free packing (docs/design.md section 4): the packed and shared layouts give
every member the tokens, positions and attention it has in the padded one-row-per-member layout, so scores and
gradients match it for Llama, Mistral and Qwen2; the attention kernel choice; the layout options."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import aft_fast
from aft_fast.data.batch import Batch, Encoded
from aft_fast.data.collate import collate
from aft_fast.models import attention
from aft_fast.models.forward import forward_hidden
from aft_fast.train.config import InputError, TrainConfig
from tests._integration_support import tiny_dims

V = 61
PAD = 0


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: with OpenMP threads on a busy machine their many small ops wait on each
    other (a 100x slowdown seen on 2 shared cores); one thread is fastest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_items(n_groups: int = 3, k: int = 3, seed: int = 0, max_member: int = 9) -> list[Encoded]:
    """Groups of a reference and k candidates with ragged prompts and members (token ids 1..V-1)."""
    g = torch.Generator().manual_seed(seed)

    def tokens(lo: int, hi: int) -> list[int]:
        n = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return torch.randint(1, V, (n,), generator=g).tolist()

    items = []
    for _ in range(n_groups):
        members = [tokens(1, max_member) for _ in range(k + 1)]
        label = [1] + torch.randint(0, 2, (k,), generator=g).tolist()
        items.append(Encoded(tokens(3, 8), members, label, [True] + [False] * k))
    return items


def member_view(b: Batch) -> list[tuple[list[int], list[int]]]:
    """Per segment: the (hidden row's token, position) pairs that predict its tokens, in order. Equal
    across layouts means every member reads the same tokens at the same positions."""
    ids, pos = b.input_ids.flatten(), b.position_ids.flatten() if b.position_ids is not None else None
    if pos is None:
        pos = torch.arange(b.input_ids.shape[1]).repeat(b.input_ids.shape[0])
    return [
        (ids[b.rows[b.segments == s]].tolist(), pos[b.rows[b.segments == s]].tolist())
        for s in range(b.num_segments)
    ]


# ---------------------------------------------------------------------------------------------------------
# Collation


@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_members_see_the_padded_layouts_tokens_and_positions(layout):
    items = make_items()
    padded = collate(items, pad_id=PAD, max_length=64)
    b = collate(items, pad_id=PAD, max_length=64, layout=layout)
    assert b.layout == layout and padded.layout == "padded"
    assert torch.equal(b.targets, padded.targets) and torch.equal(b.segments, padded.segments)
    for name in ("group", "label", "is_reference"):
        assert torch.equal(getattr(b, name), getattr(padded, name))
    assert member_view(b) == member_view(padded)
    assert b.num_tokens == b.computed_tokens - int((b.sequence_ids == -1).sum())


def test_shared_rows_positions_and_members():
    items = make_items(n_groups=2, k=3)
    b = collate(items, pad_id=PAD, max_length=64, layout="shared")
    ids, pos = b.input_ids.flatten(), b.position_ids.flatten()
    seq, mem = b.sequence_ids.flatten(), b.member_ids.flatten()
    # One sequence per group: the prompt once, then every member, no padding in between.
    assert b.num_tokens == sum(len(i.prompt) + sum(map(len, i.members)) for i in items)
    starts = torch.cumsum(torch.bincount(b.segments), 0) - torch.bincount(b.segments)
    for s in range(b.num_segments):
        item = items[int(b.group[s])]
        m = s - sum(len(i.members) for i in items[: int(b.group[s])])
        P, rows = len(item.prompt), b.rows[b.segments == s]
        # The first token is predicted by the prompt's last position (shared by all members) ...
        first = rows[0]
        assert pos[first] == P - 1 and mem[first] == 0 and ids[first] == item.prompt[-1]
        # ... the rest by the member's own previous token, at positions continuing from the prompt's end.
        chain = rows[1:]
        assert pos[chain].tolist() == list(range(P, P + len(item.members[m]) - 1))
        assert (mem[chain] == m + 1).all() and (seq[chain] == seq[first]).all()
        assert torch.equal(ids[chain + 1], b.targets[starts[s] + 1 : starts[s] + len(item.members[m])])
    # Members of one group share a first-token row: it repeats k + 1 times in rows.
    firsts = b.rows[starts]
    assert torch.equal(firsts[b.group == 0], firsts[0].repeat(len(items[0].members)))


def test_packed_sequences_restart_positions():
    items = make_items(n_groups=2, k=2)
    b = collate(items, pad_id=PAD, max_length=64, layout="packed")
    assert b.member_ids is None
    seq, pos = b.sequence_ids.flatten(), b.position_ids.flatten()
    n_members = sum(len(i.members) for i in items)
    assert int(seq.max()) + 1 == n_members  # one sequence per member
    for s in range(n_members):
        at = (seq == s).nonzero().flatten()
        assert pos[at].tolist() == list(range(len(at))) and (at.diff() == 1).all()


def test_attention_rule_on_a_hand_made_row():
    # One shared sequence: prompt (2 tokens), member 1 (2), member 2 (1), then one pad.
    b = Batch(
        input_ids=torch.tensor([[5, 6, 7, 8, 9, PAD]]),
        attention_mask=torch.tensor([[1, 1, 1, 1, 1, 0]]),
        position_ids=torch.tensor([[0, 1, 2, 3, 2, 0]]),
        rows=torch.zeros(1, dtype=torch.long),
        targets=torch.zeros(1, dtype=torch.long),
        segments=torch.zeros(1, dtype=torch.long),
        group=torch.zeros(1, dtype=torch.long),
        label=torch.zeros(1, dtype=torch.long),
        is_reference=torch.zeros(1, dtype=torch.bool),
        sequence_ids=torch.tensor([[0, 0, 0, 0, 0, -1]]),
        member_ids=torch.tensor([[0, 0, 1, 1, 2, 0]]),
    )
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 0, 0, 1, 0],  # member 2 sees the prompt and itself, not member 1
            [0, 0, 0, 0, 0, 1],  # padding sees only padding
        ],
        dtype=torch.bool,
    )
    assert torch.equal(attention.allowed(b)[0], expected)
    window = expected.clone()
    window[3, 0] = window[3, 1] = False  # position 3 is 3 and 2 positions from 0 and 1: outside a window of 2
    window[2, 0] = window[4, 0] = False
    assert torch.equal(attention.allowed(b, window=2)[0], window)
    mask = attention.dense_mask(b, torch.float32)
    assert mask.shape == (1, 1, 6, 6) and torch.equal(mask[0, 0] == 0, expected)


def test_budget_packs_rows_and_splits_long_groups():
    items = make_items(n_groups=5, k=3, seed=2)
    lengths = [len(i.prompt) + sum(map(len, i.members)) for i in items]
    budget = max(lengths) + 5
    b = collate(items, pad_id=PAD, max_length=64, layout="shared", max_tokens=budget)
    assert b.input_ids.shape[1] <= budget and b.input_ids.shape[0] < len(items)  # several groups per row
    assert b.num_tokens == sum(lengths)
    # A budget below a group's length splits it: each part repeats the prompt, scores line up as before.
    small = max(len(i.prompt) + len(m) for i in items for m in i.members) + 2
    split = collate(items, pad_id=PAD, max_length=64, layout="shared", max_tokens=small)
    assert split.input_ids.shape[1] <= small and split.num_tokens > sum(lengths)
    assert member_view(split) == member_view(collate(items, pad_id=PAD, max_length=64))
    with pytest.raises(ValueError, match="max_tokens"):
        collate(items, pad_id=PAD, max_length=64, layout="shared", max_tokens=small - 3)
    with pytest.raises(ValueError, match="max_tokens"):
        collate(items, pad_id=PAD, max_length=64, layout="packed", max_tokens=0)


def test_cut_members_keep_the_padded_layouts_view():
    items = make_items(n_groups=2, k=3, max_member=20)
    for layout in ("packed", "shared"):
        b = collate(items, pad_id=PAD, max_length=12, layout=layout)
        assert member_view(b) == member_view(collate(items, pad_id=PAD, max_length=12))


def test_flash_varlen_boundaries():
    b = collate(make_items(n_groups=2, k=1), pad_id=PAD, max_length=64, layout="packed")
    kw = attention.flash_varlen_kwargs(b)
    cu = kw["cu_seq_lens_q"].long()
    assert cu[0] == 0 and cu[-1] == b.input_ids.numel() and kw["max_length_q"] == int(cu.diff().max())
    ids = b.sequence_ids.flatten()
    for lo, hi in zip(cu[:-1], cu[1:], strict=True):  # each span is one sequence (or one padding run)
        assert (ids[lo:hi] == ids[lo]).all()
    assert len(cu) - 1 == len(torch.unique_consecutive(ids))


# ---------------------------------------------------------------------------------------------------------
# Models: every member's score and its gradients equal those of the padded layout.

COMMON = tiny_dims(V, intermediate=48, heads=4, max_position_embeddings=128, pad_token_id=PAD)
ARCHS = {
    "llama": lambda impl: LlamaForCausalLM(LlamaConfig(**COMMON, attn_implementation=impl)),
    # A window shorter than prompt + member, so it bites inside members and across the prompt.
    "mistral": lambda impl: MistralForCausalLM(
        MistralConfig(**COMMON, sliding_window=5, attn_implementation=impl)
    ),
    # Layer 0 full attention, layer 1 a sliding window: one mask per layer type.
    "qwen2": lambda impl: Qwen2ForCausalLM(
        Qwen2Config(
            **COMMON, use_sliding_window=True, sliding_window=5, max_window_layers=1, attn_implementation=impl
        )
    ),
}


def build(arch: str, impl: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    return ARCHS[arch](impl).float()


def member_scores_and_grads(lm, b: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Scores [S] (length-normalized log-likelihoods) and, per member, the gradient of its score with
    respect to every parameter (flattened)."""
    params = list(lm.parameters())
    scores = member_scores(lm, b)
    grads = []
    for s in range(b.num_segments):
        g = torch.autograd.grad(scores[s], params, retain_graph=True, materialize_grads=True)
        grads.append(torch.cat([x.flatten() for x in g]))
    return scores.detach(), grads


def member_scores(lm, b: Batch) -> torch.Tensor:
    sums = aft_fast.linear_logprob(
        forward_hidden(lm, b),
        lm.lm_head.weight,
        **b.token_index(),
        num_segments=b.num_segments,
        backend="torch",
    )
    return sums / torch.bincount(b.segments, minlength=b.num_segments)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("layout", ["shared", "packed"])
def test_scores_and_gradients_equal_padded(arch, layout):
    items = make_items()
    lm = build(arch)
    assert attention.prepare(lm, "padded", torch.device("cpu")).kernel == "sdpa"
    ref_scores, ref_grads = member_scores_and_grads(lm, collate(items, pad_id=PAD, max_length=64))
    plan = attention.prepare(lm, layout, torch.device("cpu"))
    assert plan.kernel == "sdpa" and "FlexAttention" in plan.note  # the CPU fallback says why
    scores, grads = member_scores_and_grads(lm, collate(items, pad_id=PAD, max_length=64, layout=layout))
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-6)
    for s, (g, ref) in enumerate(zip(grads, ref_grads, strict=True)):
        assert ref.abs().max() > 1e-4
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6, msg=lambda m, s=s: f"member {s}: {m}")


def test_eager_attention_takes_the_same_mask():
    items = make_items(seed=4)
    lm = build("qwen2", "eager")
    ref, _ = member_scores_and_grads(lm, collate(items, pad_id=PAD, max_length=64))
    ours, _ = member_scores_and_grads(lm, collate(items, pad_id=PAD, max_length=64, layout="shared"))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_aft_loss_and_gradients_equal_padded():
    """The training objective itself (bcl with the reference's L_vft): loss and every parameter gradient."""
    items = make_items(n_groups=4, seed=3)
    lm = build("llama")

    def step(layout: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        attention.prepare(lm, layout, torch.device("cpu"))
        b = collate(items, pad_id=PAD, max_length=64, layout=layout)
        lm.zero_grad()
        out = aft_fast.aft_loss(
            forward_hidden(lm, b),
            lm.lm_head.weight,
            **b.token_index(),
            **b.group_inputs(),
            mode="bcl",
            beta=0.5,
        )
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in lm.parameters()]

    ref_loss, ref_grads = step("padded")
    for layout in ("shared", "packed"):
        loss, grads = step(layout)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_no_member_attends_to_another(arch):
    items = make_items(n_groups=2, k=3, seed=5)
    lm = build(arch)
    attention.prepare(lm, "shared", torch.device("cpu"))
    before, _ = member_scores_and_grads(lm, collate(items, pad_id=PAD, max_length=64, layout="shared"))
    changed = 1  # group 0's first candidate (segment 1); members packed after it must not see it
    assert len(items[0].members[changed + 1]) > 1  # a later member that reads more than the prompt
    items[0].members[changed] = [(t % (V - 1)) + 1 for t in items[0].members[changed]]
    after, _ = member_scores_and_grads(lm, collate(items, pad_id=PAD, max_length=64, layout="shared"))
    assert abs(after[changed] - before[changed]) > 1e-3  # the perturbation is visible where it belongs
    keep = torch.arange(len(before)) != changed
    torch.testing.assert_close(after[keep], before[keep], rtol=0, atol=1e-6)


def test_flex_attention_block_mask_forward():
    """The CUDA kernel's BlockMask (with a sliding window) gives the padded scores. FlexAttention runs
    forward-only on the CPU, compiled, so this covers the mask; gradients need CUDA (below)."""
    items = make_items(n_groups=2, k=2, seed=6)
    lm = build("mistral")
    with torch.no_grad():
        ref = member_scores(lm, collate(items, pad_id=PAD, max_length=64))
        lm.set_attn_implementation("flex_attention")
        ours = member_scores(lm, collate(items, pad_id=PAD, max_length=64, layout="shared"))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layout", ["shared", "packed"])
def test_cuda_kernels_equal_padded(layout):
    """On CUDA, prepare picks FlexAttention (shared) or flash-attn varlen (packed, bf16, when installed)."""
    items = make_items()
    dtype = torch.bfloat16 if layout == "packed" and attention.flash_attn_installed() else torch.float32
    lm = build("llama").to("cuda", dtype)
    ref = member_scores(lm, collate(items, pad_id=PAD, max_length=64).to("cuda"))
    plan = attention.prepare(lm, layout, torch.device("cuda"))
    assert plan.kernel in ("flex_attention", "flash_attention_2")
    ours = member_scores(lm, collate(items, pad_id=PAD, max_length=64, layout=layout).to("cuda"))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash_attn is not installed")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn needs CUDA")
def test_flash_varlen_packed_equals_padded():
    items = make_items()
    lm = build("llama").to("cuda", torch.bfloat16)
    ref = member_scores(lm, collate(items, pad_id=PAD, max_length=64).to("cuda"))
    assert attention.prepare(lm, "packed", torch.device("cuda")).kernel == "flash_attention_2"
    ours = member_scores(lm, collate(items, pad_id=PAD, max_length=64, layout="packed").to("cuda"))
    torch.testing.assert_close(ours, ref, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------------------------
# Kernel choice and options


def test_kernel_choice_and_fallback_messages():
    choose = attention.choose_kernel
    assert choose("padded", current="eager", cuda=True, half=True).kernel == "eager"
    cpu = choose("shared", current="sdpa", cuda=False, half=False)
    assert cpu.kernel == "sdpa" and "FlexAttention needs CUDA" in cpu.note
    assert choose("shared", current="sdpa", cuda=False, half=False, supports_sdpa=False).kernel == "eager"
    # flash-attn cannot express a shared prompt: the model is moved to FlexAttention, and the note says why.
    flex = choose("shared", current="flash_attention_2", cuda=True, half=True, flash_installed=True)
    assert flex.kernel == "flex_attention" and "prompt sharing" in flex.note
    packed = choose("packed", current="sdpa", cuda=True, half=True, flash_installed=True)
    assert packed.kernel == "flash_attention_2"
    no_flash = choose("packed", current="sdpa", cuda=True, half=True, flash_installed=False)
    assert no_flash.kernel == "flex_attention" and "not installed" in no_flash.note
    fp32 = choose("packed", current="sdpa", cuda=True, half=False, flash_installed=True)
    assert fp32.kernel == "flex_attention" and "fp16/bf16" in fp32.note
    with pytest.raises(ValueError, match="layout"):
        choose("ragged", current="sdpa", cuda=False, half=False)
    # Row budgets: dense masks keep rows short, block-sparse kernels take the whole micro batch.
    assert cpu.row_budget(0) is None and cpu.row_budget(512) == 512 and flex.row_budget(0) > 10**9


def test_shared_batch_rejected_by_flash_kernel():
    lm = build("llama")
    lm.config._attn_implementation = "flash_attention_2"  # as a model loaded with flash-attn would be
    b = collate(make_items(), pad_id=PAD, max_length=64, layout="shared")
    with pytest.raises(ValueError, match="cannot express prompt sharing"):
        attention.decoder_inputs(lm.config, b, torch.float32)


def test_layout_options():
    assert TrainConfig().layout == "shared"
    assert TrainConfig(layout="padded", max_tokens_per_row=512, max_length=256).max_tokens_per_row == 512
    with pytest.raises(InputError, match="layout"):
        TrainConfig(layout="ragged")
    with pytest.raises(InputError, match="max_tokens_per_row"):
        TrainConfig(max_tokens_per_row=100, max_length=256)
    with pytest.raises(InputError, match="max_tokens_per_row"):
        TrainConfig(max_tokens_per_row=-1)
