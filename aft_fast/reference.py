"""The plain PyTorch oracle: full logits, log_softmax, autograd, a Python loop over groups.

Tests and benchmarks import these (never copy them). They favour being obviously right over being
fast: `group_loss_ref` enumerates each group's pairs one by one, exactly as docs/design.md section 2
writes the formulas, so the vectorized objective and every kernel backend are checked against an
independent statement of the math.

Shapes: N hidden rows, H hidden size, V vocab, T scored tokens, S segments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aft_fast.outputs import AFTOutput


def linear_logprob_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    rows: torch.Tensor,
    targets: torch.Tensor,
    segments: torch.Tensor,
    num_segments: int,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-segment sums of log p(target | hidden[row]) with the full [T, V] logits.

    The logits are the model's own (docs/design.md section 2): with z = hidden[rows] @ weight^T + bias,
    logits = softcap * tanh(logit_scale * z / softcap) / temperature (softcap None: no tanh).
    The product runs in the input dtype; the post-processing and log_softmax in at least fp32 (as
    Hugging Face models do). Returns [S] in fp32 (fp64 for fp64 inputs).
    """
    logits = F.linear(hidden[rows], weight, bias)
    logits = process_logits_ref(logits.to(torch.promote_types(logits.dtype, torch.float32)),
                                logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    sums = torch.zeros(num_segments, dtype=logp.dtype, device=hidden.device)
    return sums.index_add(0, segments, logp)


def process_logits_ref(
    z: torch.Tensor, *, logit_scale: float = 1.0, softcap: float | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """softcap * tanh(logit_scale * z / softcap) / temperature, in z's dtype (softcap None: no tanh)."""
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def _logsumexp_with_zero(values: list[torch.Tensor]) -> torch.Tensor:
    """log(1 + sum(exp(v))) for a list of scalars, computed stably."""
    zero = torch.zeros((), dtype=values[0].dtype, device=values[0].device)
    return torch.logsumexp(torch.stack([zero, *values]), dim=0)


def group_loss_ref(
    sums: torch.Tensor,
    counts: torch.Tensor,
    group: torch.Tensor,
    label: torch.Tensor,
    is_reference: torch.Tensor,
    *,
    mode: str,
    beta: float = 1.0,
    ref_logp: torch.Tensor | None = None,
    dpo_beta: float = 0.1,
    pro_tau: float = 1.0,
) -> torch.Tensor:
    """L_align: the mean over groups with at least one pair of the per-group loss of `mode`.

    sums [S]: summed log-prob of each segment (differentiable); counts [S]: its scored tokens.
    A pair (i, j) is two candidates of one group with label[i] > label[j].
    """
    base, _, extra = mode.partition("+")
    s = sums / counts
    per_group = []
    for g in torch.unique(group).tolist():
        members, pairs = _group_pairs(g, group, label, is_reference)
        if not pairs:
            continue
        top = max(int(label[i]) for i in members)
        boundary = (min(s[i] for i in members if int(label[i]) == top) - beta).detach()
        threshold = {i: (2 * boundary - s[i]).detach() for i, _ in pairs}
        loss = _pair_loss(base, mode, s, sums, pairs, threshold, ref_logp, dpo_beta, pro_tau)
        if extra == "bc":
            loss = loss + _logsumexp_with_zero([threshold[i] - s[j] for i, j in pairs])
        per_group.append(loss)

    if not per_group:
        return sums.sum() * 0.0
    return torch.stack(per_group).mean()


def _group_pairs(
    g: int, group: torch.Tensor, label: torch.Tensor, is_reference: torch.Tensor
) -> tuple[list[int], list[tuple[int, int]]]:
    """Group g's candidates (reference chains excluded: they feed L_vft only) and its pairs (i, j) with
    label[i] > label[j], enumerated one by one as docs/design.md section 2 defines them."""
    members = [i for i in range(len(group)) if int(group[i]) == g and not bool(is_reference[i])]
    pairs = [(i, j) for i in members for j in members if int(label[i]) > int(label[j])]
    return members, pairs


def _pair_loss(
    base: str,
    mode: str,
    s: torch.Tensor,
    sums: torch.Tensor,
    pairs: list[tuple[int, int]],
    threshold: dict[int, torch.Tensor],
    ref_logp: torch.Tensor | None,
    dpo_beta: float,
    pro_tau: float,
) -> torch.Tensor:
    """One group's loss under the base objective (mode without its "+bc"), written pair by pair from the
    formulas of docs/design.md section 2: s are the scores, sums the summed log-probs (dpo's margins)."""
    if base == "align":
        return _logsumexp_with_zero([s[j] - s[i] for i, j in pairs])
    if base == "dcl":
        return _logsumexp_with_zero([s[j].detach() - s[i] for i, j in pairs])
    if base == "bcl":
        terms = [s[j] - s[i] for i, j in pairs] + [threshold[i] - s[j] for i, j in pairs]
        return _logsumexp_with_zero(terms)
    if base == "dpo":
        if ref_logp is None:
            raise ValueError("ref_logp: mode 'dpo' needs the reference model's log-probs")
        margins = [dpo_beta * ((sums[i] - ref_logp[i]) - (sums[j] - ref_logp[j])) for i, j in pairs]
        return torch.stack([-F.logsigmoid(m) for m in margins]).mean()
    if base == "rrhf":
        return torch.stack([torch.clamp(s[j] - s[i], min=0) for i, j in pairs]).sum()
    if base == "pro":
        terms = []
        for i in sorted({i for i, _ in pairs}):
            below = [s[j] / pro_tau for ii, j in pairs if ii == i]
            terms.append(torch.logsumexp(torch.stack([s[i] / pro_tau, *below]), 0) - s[i] / pro_tau)
        return torch.stack(terms).sum()
    raise ValueError(f"mode: unknown mode {mode!r}")


def aft_loss_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    rows: torch.Tensor,
    targets: torch.Tensor,
    segments: torch.Tensor,
    group: torch.Tensor,
    label: torch.Tensor,
    is_reference: torch.Tensor,
    mode: str = "bcl",
    beta: float = 1.0,
    w_vft: float = 1.0,
    w_align: float = 1.0,
    ref_logp: torch.Tensor | None = None,
    dpo_beta: float = 0.1,
    pro_tau: float = 1.0,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
) -> AFTOutput:
    """The whole AFT loss, unfused: full logits (post-processed as in `linear_logprob_ref`), then
    L = w_vft * L_vft + w_align * L_align."""
    num_segments = group.numel()
    sums = linear_logprob_ref(
        hidden, weight, rows=rows, targets=targets, segments=segments, num_segments=num_segments, bias=bias,
        logit_scale=logit_scale, softcap=softcap, temperature=temperature,
    )
    counts = torch.bincount(segments, minlength=num_segments).to(sums.dtype)
    ref_tokens = counts[is_reference].sum()
    vft = -sums[is_reference].sum() / ref_tokens if bool(is_reference.any()) else sums.sum() * 0.0
    loss = w_vft * vft
    align = sums.sum() * 0.0
    if mode != "vft":
        align = group_loss_ref(
            sums, counts, group, label, is_reference,
            mode=mode, beta=beta, ref_logp=ref_logp, dpo_beta=dpo_beta, pro_tau=pro_tau,
        )
        loss = loss + w_align * align
    return AFTOutput(
        loss=loss, scores=(sums / counts).detach(), vft_loss=vft.detach(), align_loss=align.detach()
    )
