"""What the alignment loss does to a batch, for the metrics: the margins of its pairs, where the negatives
sit against the boundary B, and how large the alignment gradient is against the VFT gradient.

Pairs, top rank and B follow the loss's definition (docs/design.md, loss math): in one group, candidates
i and j form a pair when label[i] > label[j] (references never pair: the loss's own pair builder,
`aft_fast.options.candidate_pairs`, makes them); the group's top rank is its highest
candidate label; B = min over the top-rank candidates of s - beta, in groups that have a pair. The
negatives are the candidates that sit below another one (for binary labels, the label-0 candidates of
groups that also have a positive). bcl's two terms on a negative cancel exactly at s_n = B, so a negative
above B is still pushed down and one below B is pulled back up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import aft_fast
from aft_fast.options import candidate_pairs


@dataclass
class PairStats:
    """Sums over one batch (the logger divides them after adding up micro batches and ranks).

    pairs, margin_sum:     valid pairs and the sum of s_i - s_j over them (i labelled above j).
    right:                 pairs with s_i > s_j (in-batch assessment).
    negatives, neg_sum:    candidates below another one of their group, and the sum of their scores.
    neg_gap_sum, below:    sum over negatives of s_n - B, and how many have s_n < B (boundary modes only,
                           else 0: no B exists).
    tops, top_sum:         candidates above another one of their group and below none (a group's top
                           rank, in groups with a pair), and the sum of their scores.
    """

    pairs: int = 0
    margin_sum: float = 0.0
    right: int = 0
    negatives: int = 0
    neg_gap_sum: float = 0.0
    below: int = 0
    neg_sum: float = 0.0
    tops: int = 0
    top_sum: float = 0.0


def group_boundary(
    scores: torch.Tensor, group: torch.Tensor, label: torch.Tensor, is_reference: torch.Tensor, beta: float
) -> torch.Tensor:
    """[S] the boundary B of each segment's group: min over its top-rank candidates of s - beta (inf where
    the group has no pair, i.e. its candidates hold a single label)."""
    mates = (group[:, None] == group[None, :]) & ~is_reference[None, :]  # [s, j]: j a candidate of s's group
    big = torch.iinfo(label.dtype).max
    top = torch.where(mates, label[None, :], -big).amax(dim=1)
    low = torch.where(mates, label[None, :], big).amin(dim=1)
    at_top = mates & (label[None, :] == top[:, None])
    b = torch.where(at_top, scores[None, :], torch.inf).amin(dim=1) - beta
    return torch.where(top > low, b, torch.full_like(b, torch.inf))


def pair_stats(
    scores: torch.Tensor,
    group: torch.Tensor,
    label: torch.Tensor,
    is_reference: torch.Tensor,
    beta: float | None = None,
) -> PairStats:
    """The sums of `PairStats` for segments with these scores [S] and labels; beta None: no boundary."""
    scores = scores.detach().double().cpu()
    group, label, is_reference = group.cpu(), label.cpu(), is_reference.cpu()
    pair_i, pair_j = candidate_pairs(group, label, is_reference)
    margin = scores[pair_i] - scores[pair_j]
    neg = torch.zeros_like(is_reference).index_fill_(0, pair_j, True)
    top = torch.zeros_like(is_reference).index_fill_(0, pair_i, True) & ~neg
    out = PairStats(
        pairs=pair_i.numel(),
        margin_sum=float(margin.sum()),
        right=int((margin > 0).sum()),
        negatives=int(neg.sum()),
        neg_sum=float(scores[neg].sum()),
        tops=int(top.sum()),
        top_sum=float(scores[top].sum()),
    )
    if beta is not None and out.negatives:
        gap = (scores - group_boundary(scores, group, label, is_reference, beta))[neg]
        out.neg_gap_sum, out.below = float(gap.sum()), int((gap < 0).sum())
    return out


def score_spread(scores: list[list[float]]) -> float:
    """The pooled within-group standard deviation of scores: sqrt(sum over groups of sum (s - group
    mean)^2 / sum over groups of (n - 1)), over groups with 2 or more scores. What beta_from_spread
    multiplies: the scale on which a model's scores of one question's chains differ."""
    ss, dof = 0.0, 0
    for group in scores:
        if len(group) >= 2:
            t = torch.tensor(group, dtype=torch.float64)
            ss += float(((t - t.mean()) ** 2).sum())
            dof += len(group) - 1
    if dof == 0:
        raise ValueError("beta_from_spread: no question has 2 or more candidates to measure a spread on")
    return (ss / dof) ** 0.5


def gradient_norms(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    batch,
    loss_options: dict,
) -> tuple[float, float]:
    """(||d(w_align L_align)/d hidden||, ||d(w_vft L_vft)/d hidden||): the two parts of the loss's gradient
    on the final hidden states, each through the public `aft_loss` on a detached copy of `hidden` with the
    other weight set to 0 (Frobenius norms over [N, H]). `batch` is the micro batch `hidden` came from."""
    h = hidden.detach().reshape(-1, hidden.shape[-1]).requires_grad_(True)
    norms = []
    for w_vft, w_align in ((0.0, loss_options["w_align"]), (loss_options["w_vft"], 0.0)):
        out = aft_fast.aft_loss(
            h,
            weight.detach(),
            **batch.token_index(),
            **batch.group_inputs(),
            ref_logp=batch.ref_logp,
            bias=None if bias is None else bias.detach(),
            **{**loss_options, "w_vft": w_vft, "w_align": w_align},
        )
        (grad,) = torch.autograd.grad(out.loss, h, allow_unused=True)
        norms.append(0.0 if grad is None else float(grad.float().norm()))
    return norms[0], norms[1]
