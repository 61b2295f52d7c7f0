"""Scores equal the model's own logits for every causal LM family the trainer loads (docs/design.md 2, 4).

For tiny random configs of each family and in every layout (padded, packed, shared), the fused scores of
`segment_logprobs` (hidden states of the decoder, the LM head through the operator, the logit
post-processing read from the config) must equal log_softmax of one plain full-logits forward of the model
itself, in fp32 to 1e-4 relative; or the case must be refused with an error naming the config field.
Sliding-window and mixed-layer families (Mistral, Qwen2, Gemma-2, Gemma-3, Phi-3, Starcoder2, Mixtral) go
through packed and shared too. The families and their status are listed in the README's model table.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import aft_fast
from aft_fast.data.collate import collate
from aft_fast.models import attention
from aft_fast.models.forward import forward_hidden, segment_logprobs
from aft_fast.models.logits import UnsupportedModelError, check_against_model, logit_processing
from tests._integration_support import tiny_dims
from tests.conftest import backends_under_test
from tests.test_packing import PAD, V, make_items

LAYOUTS = ("padded", "packed", "shared")
CPU = torch.device("cpu")

COMMON = tiny_dims(
    V, intermediate=48, heads=4, max_position_embeddings=128, pad_token_id=PAD, bos_token_id=1, eos_token_id=2
)
# A window of 5 positions is shorter than prompt + member (3-8 + 1-9 tokens): it bites inside members
# and across the prompt, so a mask that ignored it would change the scores.
WINDOW = 5
# family: (config class, model class, config arguments beyond COMMON)
FAMILIES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(sliding_window=WINDOW)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM,
              dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(head_dim=8)),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, dict(head_dim=8)),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM,
               dict(head_dim=8, sliding_window=WINDOW, final_logit_softcapping=5.0)),
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM,
               dict(head_dim=8, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
                    final_logit_softcapping=8.0)),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(sliding_window=WINDOW)),
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel,
             dict(n_embd=32, n_layer=2, n_head=4, n_positions=128)),
    "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, {}),
    "cohere": (tf.CohereConfig, tf.CohereForCausalLM, dict(logit_scale=0.0625)),
    "granite": (tf.GraniteConfig, tf.GraniteForCausalLM,
                dict(logits_scaling=8.0, embedding_multiplier=2.0, residual_multiplier=0.5,
                     attention_multiplier=0.3)),
    "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM, {}),
    "stablelm": (tf.StableLmConfig, tf.StableLmForCausalLM, {}),
    "starcoder2": (tf.Starcoder2Config, tf.Starcoder2ForCausalLM, dict(sliding_window=WINDOW)),
    "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM,
                dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW)),
    "falcon": (tf.FalconConfig, tf.FalconForCausalLM, {}),
    # HyperCLOVA X multiplies by logits_scaling where Granite divides.
    "hyperclovax": (tf.HyperCLOVAXConfig, tf.HyperCLOVAXForCausalLM, dict(logits_scaling=3.0)),
}
# Families whose config leaves the logits as h W^T + b, and the others' post-processing.
POST_PROCESSED = {"gemma2": (1.0, 5.0), "gemma3": (1.0, 8.0), "cohere": (0.0625, None),
                  "granite": (1 / 8.0, None), "hyperclovax": (3.0, None)}
_NOT_COMMON = {"gpt2": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "max_position_embeddings"),
               "gpt_neox": ("num_key_value_heads",), "falcon": ("intermediate_size", "num_key_value_heads")}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is fastest on a busy machine (see tests/test_packing.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(family: str, *, peak: float = 10.0, **overrides) -> torch.nn.Module:
    """A tiny random model of `family`, its LM head scaled so that the largest |z| on a probe batch is
    `peak`: random initializations give logits near 0, where a soft cap or a scale hardly shows."""
    config_class, model_class, extra = FAMILIES[family]
    kwargs = {k: v for k, v in COMMON.items() if k not in _NOT_COMMON.get(family, ())}
    torch.manual_seed(0)
    lm = model_class(config_class(**kwargs, **{**extra, **overrides})).float().eval()
    with torch.no_grad():
        b = collate(make_items(n_groups=1), pad_id=PAD, max_length=64)
        hidden = lm.get_decoder()(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
        head = lm.get_output_embeddings()
        head.weight.mul_(peak / float(head(hidden).abs().max()))
    return lm


def own_sums(lm, items) -> torch.Tensor:
    """[S] summed log-probs of each member from log_softmax of the model's own logits: one plain forward of
    the padded layout (one row per member), the model's own attention and post-processing."""
    b = collate(items, pad_id=PAD, max_length=64)
    attention.prepare(lm, "padded", CPU)
    with torch.no_grad():
        logits = lm(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()
    logp = torch.log_softmax(logits.flatten(0, 1), -1)[b.rows, b.targets]
    return torch.zeros(b.num_segments).index_add_(0, b.segments, logp)


def fused_sums(lm, items, layout: str, **kw) -> torch.Tensor:
    attention.prepare(lm, layout, CPU)
    b = collate(items, pad_id=PAD, max_length=64, layout=layout)
    with torch.no_grad():
        return segment_logprobs(lm, b, **kw)


def assert_rel_close(ours: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-4) -> None:
    rel = float(((ours - expected).abs() / expected.abs()).max())
    assert rel <= rtol, f"{what}: relative difference {rel:.2e} > {rtol}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_scores_equal_the_models_own_logits(family):
    items = make_items()
    lm = build(family)
    expected = own_sums(lm, items)
    scale, softcap = POST_PROCESSED.get(family, (1.0, None))
    processing = logit_processing(lm.config)
    assert (processing.logit_scale, processing.softcap) == pytest.approx((scale, softcap))
    if family in POST_PROCESSED:  # the test can fail: without the post-processing the scores differ
        b = collate(items, pad_id=PAD, max_length=64)
        with torch.no_grad():
            raw = aft_fast.linear_logprob(forward_hidden(lm, b), lm.get_output_embeddings().weight,
                                          **b.token_index(), num_segments=b.num_segments)
        assert float(((raw - expected).abs() / expected.abs()).max()) > 1e-3
    for layout in LAYOUTS:
        assert_rel_close(fused_sums(lm, items, layout), expected, f"{family} {layout}")


def test_scoring_temperature_divides_the_logits():
    """Scores are taken at temperature 1 (the model's own distribution) unless asked: then the processed
    logits are divided by it, as sampling at that temperature draws them."""
    items = make_items(n_groups=2)
    lm = build("gemma2")
    b = collate(items, pad_id=PAD, max_length=64)
    with torch.no_grad():
        logits = lm(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float() / 0.7
    logp = torch.log_softmax(logits.flatten(0, 1), -1)[b.rows, b.targets]
    expected = torch.zeros(b.num_segments).index_add_(0, b.segments, logp)
    for layout in LAYOUTS:
        assert_rel_close(fused_sums(lm, items, layout, temperature=0.7), expected, f"temperature {layout}")


@pytest.mark.parametrize("backend", backends_under_test())
def test_peaked_softcapped_logits_on_every_backend(backend):
    """Gemma-2's soft cap of 30 with peaked logits (head weights scaled up so that |z| reaches ~100 and
    the tanh saturates): every backend scores within 1e-4 of the model's own logits."""
    items = make_items(n_groups=2)
    lm = build("gemma2", peak=100.0, final_logit_softcapping=30.0)
    b = collate(items, pad_id=PAD, max_length=64)
    with torch.no_grad():
        hidden = lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
        z = lm.lm_head(hidden)
    assert float(z.abs().max()) > 60  # peaked: the cap bends the largest logits
    expected = own_sums(lm, items)
    assert float(expected.min()) < -50  # and the scores are far from uniform
    for layout in ("padded", "shared"):
        assert_rel_close(fused_sums(lm, items, layout, backend=backend), expected, f"{backend} {layout}")


# ---------------------------------------------------------------------------------------------------------
# Refusals: a clear error naming the config field, never a silently wrong score.


def test_unknown_logit_post_processing_is_refused():
    lm = build("llama", output_logit_soft_cap=30.0)  # xLSTM's soft cap: not a field the operator reads
    with pytest.raises(UnsupportedModelError, match="config field output_logit_soft_cap"):
        logit_processing(lm.config)
    with pytest.raises(UnsupportedModelError, match="config field unpadded_vocab_size"):
        logit_processing(build("llama", unpadded_vocab_size=50).config)
    with pytest.raises(UnsupportedModelError, match="config field final_logit_softcapping"):
        logit_processing(build("gemma2", final_logit_softcapping=-1.0).config)
    # Fields of the same look that act elsewhere (attention scores, the MoE router) are not refused.
    assert logit_processing(build("gemma2").config).softcap == 5.0  # attn_logit_softcapping=50 is set
    assert logit_processing(build("mixtral", output_router_logits=True).config).is_identity


def test_two_scale_fields_are_refused():
    with pytest.raises(UnsupportedModelError, match="logit_scale.*logits_scaling"):
        logit_processing(build("cohere", logits_scaling=2.0).config)


def test_head_that_is_not_linear_is_refused():
    lm = build("llama")

    class Head(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.linear = linear

        def forward(self, x):
            return self.linear(x) ** 2

    lm.lm_head = Head(lm.lm_head)
    b = collate(make_items(n_groups=1), pad_id=PAD, max_length=64)
    with pytest.raises(UnsupportedModelError, match="nn.Linear LM head, got Head"):
        segment_logprobs(lm, b)


@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_unknown_layer_type_is_refused_for_padding_free_layouts(layout):
    lm = build("qwen3")
    lm.config.layer_types = ["full_attention", "chunked_attention"]  # Llama 4's chunked layers
    items = make_items(n_groups=1)
    with pytest.raises(ValueError, match="config field layer_types.*chunked_attention"):
        fused_sums(lm, items, layout)


@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_alibi_is_refused_for_padding_free_layouts(layout):
    """ALiBi biases attention by the key's column in the row, not by its position id: a packed or shared
    row would give wrong scores. The padded layout keeps the model's own mask and is exact."""
    lm = build("falcon", alibi=True)
    items = make_items(n_groups=2)
    assert_rel_close(fused_sums(lm, items, "padded"), own_sums(lm, items), "falcon alibi padded")
    with pytest.raises(ValueError, match="config field alibi"):
        fused_sums(lm, items, layout)


def test_check_against_model_catches_what_no_field_announces():
    """The probe compares the operator with the model's own forward: a model that post-processes its logits
    without a config field (here: a subclass that halves them) is caught."""
    lm = build("llama")
    check_against_model(lm, logit_processing(lm.config))  # the plain model passes

    class Halved(tf.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    torch.manual_seed(0)
    odd = Halved(lm.config).eval()
    with pytest.raises(UnsupportedModelError, match="differ from the fused operator's"):
        check_against_model(odd, logit_processing(odd.config))


# ---------------------------------------------------------------------------------------------------------
# Mixture of experts: the router's load-balancing loss, as the model's own forward adds it.


def test_router_aux_loss_joins_when_the_config_asks():
    """With output_router_logits set (Mixtral's own forward then adds router_aux_loss_coef x the load
    balancing loss to its training loss) AFTModel's loss adds the same term, its value the model's own
    aux_loss, in the padded layout and the packed one (the same tokens, the same padding mask), and its
    gradient reaches the router. Without it, nothing is added and the run-log note says so."""
    from aft_fast.models.forward import AFTModel

    items = make_items(n_groups=2)
    plain = AFTModel(build("mixtral"), mode="vft")
    assert plain.router_aux is None and "left out" in plain.note
    lm = build("mixtral", output_router_logits=True, router_aux_loss_coef=0.5)
    model = AFTModel(lm, mode="bcl", beta=0.5)
    assert "router auxiliary loss added" in model.note
    padded = collate(items, pad_id=PAD, max_length=64)
    with torch.no_grad():
        own_aux = lm(input_ids=padded.input_ids, attention_mask=padded.attention_mask).aux_loss
    for layout in ("padded", "packed"):
        attention.prepare(lm, layout, CPU)
        b = collate(items, pad_id=PAD, max_length=64, layout=layout)
        lm.zero_grad()
        out = model(**b.tensors())
        torch.testing.assert_close(out["router_aux_loss"], own_aux, rtol=1e-5, atol=1e-7)
        out["loss"].backward()
        with_aux = lm.model.layers[0].mlp.gate.weight.grad.clone()
        lm.zero_grad()
        fused = aft_fast.aft_loss(forward_hidden(lm, b), lm.lm_head.weight, **b.token_index(),
                                  **b.group_inputs(), mode="bcl", beta=0.5).loss
        torch.testing.assert_close(out["loss"].detach(), fused.detach() + 0.5 * own_aux, rtol=1e-5, atol=1e-6)
        fused.backward()
        assert float((with_aux - lm.model.layers[0].mlp.gate.weight.grad).abs().max()) > 1e-6
