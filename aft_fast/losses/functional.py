"""The public functional API (docs/design.md section 3): `aft_loss` and `linear_logprob`. `aft_loss` spells
the loss options as keywords, builds their one `LossOptions` and runs `aft_function.aft_loss_with`, the
entry that callers holding a `LossOptions` (`AFTModel`, `AFTLoss`) call directly.

Shapes: N hidden rows, H hidden size, V vocab, T scored tokens, S segments (a segment is one
candidate chain or one reference chain; a group is one question's segments).
"""

from __future__ import annotations

import torch

from aft_fast.losses import checks
from aft_fast.losses.aft_function import aft_loss_with
from aft_fast.losses.linear_logprob import LinearLogProbFunction
from aft_fast.ops.backend import LogProbCall
from aft_fast.ops.chunk_loop import default_chunk_size
from aft_fast.ops.dispatch import resolve_backend
from aft_fast.options import LossOptions
from aft_fast.outputs import AFTOutput


def aft_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    rows: torch.Tensor,
    targets: torch.Tensor,
    segments: torch.Tensor,
    group: torch.Tensor,
    label: torch.Tensor,
    is_reference: torch.Tensor,
    mode: str = LossOptions.mode,
    beta: float = LossOptions.beta,
    w_vft: float = LossOptions.w_vft,
    w_align: float = LossOptions.w_align,
    ref_logp: torch.Tensor | None = None,
    dpo_beta: float = LossOptions.dpo_beta,
    pro_tau: float = LossOptions.pro_tau,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
) -> AFTOutput:
    """The AFT loss L = w_vft * L_vft + w_align * L_align without materializing [T, V] logits, as
    AFTOutput(loss, scores [S] detached, vft_loss, align_loss).

    hidden: [N, H] final-norm hidden states of every position of the packed batch (any float dtype);
    weight: [V, H] LM head; bias: optional [V]. Per scored token: rows [T] int64, the hidden row that
    predicts it (rows may repeat: with prompt sharing the last prompt position predicts the first token of
    every candidate); targets [T] int64, its token id; segments [T] int64 in [0, S), its segment.
    Per segment: group [S] int64, its group (question); label [S] int64, 1/0 for a positive/negative
    candidate or a rank (higher is better); is_reference [S] bool, reference chains feed L_vft only;
    ref_logp [S], its summed log-prob under the frozen reference model (dpo modes).
    mode: vft | align | dcl | bcl | dpo | rrhf | pro | dpo+bc | rrhf+bc | pro+bc (docs/design.md 2); default
    "bcl", the paper's boundary-constrained loss, its best performer. beta (>= 0), w_vft, w_align (>= 0),
    dpo_beta, pro_tau (> 0): the loss options; their defaults and reasons: `aft_fast.options.LossOptions`.
    backend: auto | triton | cpp | torch. auto: triton on CUDA, cpp on CPU when built, else torch.
    chunk_size: scored tokens per chunk. Default on CPU: a 64 MiB [chunk, V] fp32 buffer, grown (up to
    256 MiB) to the largest group, so that chunks hold whole groups and the gradient forms in the loss's
    pass; on CUDA (triton) 512 MiB in the input dtype, grown up to 1 GiB (AFT_FAST_TRITON_CHUNK_MIB).
    logit_scale, softcap, temperature: the model's logit post-processing (docs/design.md section 2): with
    z = hidden[rows] @ weight^T + bias, softcap * tanh(logit_scale * z / softcap) / temperature (softcap
    None: no tanh), as Gemma-2 (final_logit_softcapping), Cohere (logit_scale) or Granite
    (1 / logits_scaling) compute them, inside the chunks (never as a [T, V] tensor). Default: the plain
    logits z; `aft_fast.models.logits.logit_processing` reads them from a Hugging Face config."""
    # The call's one LossOptions: a bad option fails here, named.
    options = LossOptions(mode=mode, beta=beta, w_vft=w_vft, w_align=w_align, dpo_beta=dpo_beta,
                          pro_tau=pro_tau)
    return aft_loss_with(options, hidden, weight, rows=rows, targets=targets, segments=segments,
                         group=group, label=label, is_reference=is_reference, ref_logp=ref_logp, bias=bias,
                         backend=backend, chunk_size=chunk_size, logit_scale=logit_scale, softcap=softcap,
                         temperature=temperature)


def linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    rows: torch.Tensor,
    targets: torch.Tensor,
    segments: torch.Tensor,
    num_segments: int,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
    keep_probs: bool | int = False,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-segment sums of log p(targets[t] | hidden[rows[t]]) under the LM head: [S] float32.

    Differentiable to hidden, weight and bias. Use it to build losses other than `aft_loss` (the
    scores are sums / token counts). Arguments as in `aft_loss`, and:

    keep_probs: what forward keeps for backward. False (default): the log-sum-exp only; backward
        recomputes the logits (four matrix products in all) and memory stays O(chunk x V). True: every
        chunk's softmax probabilities, so backward skips the recompute (three products, as unfused
        autograd) at 2 bytes a logit (fp16, relative error 2^-11; the targets' probabilities stay
        fp32) on the CPU backends, a logit in the input dtype on triton. An int: a budget in bytes;
        the tokens that fit keep theirs (whole chunks on the CPU backends), the rest recompute. With a
        soft cap the CPU backends keep nothing (the gradient needs each logit's tanh): backward recomputes.
    logit_scale, softcap, temperature: the model's logit post-processing, as in `aft_loss`.
    """
    checks.check_projection(hidden, weight, bias)
    checks.check_options(chunk_size=chunk_size, backend=backend)
    keep_bytes = checks.check_keep_probs(keep_probs)
    leaves = (hidden, weight, bias)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in leaves)):
        keep_bytes = 0  # no backward will read them
    checks.check_tokens(hidden, weight, rows, targets, segments, num_segments)
    post = checks.check_logit_options(logit_scale, softcap, temperature)
    call = LogProbCall(
        rows=rows, targets=targets, segments=segments, num_segments=num_segments,
        backend=resolve_backend(backend, hidden.device), post=post,
        chunk_size=chunk_size or default_chunk_size(weight.shape[0], rows.numel()),
        keep_bytes=keep_bytes,
    )
    return LinearLogProbFunction.apply(hidden, weight, bias, call)
