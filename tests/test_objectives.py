"""The vectorized loss math against the loop-by-loop reference, and fp64 gradchecks of both."""

from __future__ import annotations

import pytest
import torch

from aft_fast.constants import MODES
from aft_fast.losses.objectives import build_plan, objective
from aft_fast.options import LossOptions
from aft_fast.reference import aft_loss_ref, group_loss_ref
from tests.conftest import make_problem


def _segment_inputs(seed: int, ranked: bool):
    p = make_problem(seed=seed, ranked=ranked)
    S = p.group.numel()
    g = torch.Generator().manual_seed(seed)
    counts = torch.bincount(p.segments, minlength=S).double()
    sums = -(torch.rand(S, generator=g, dtype=torch.float64) * 3 + 0.1) * counts
    return p, sums, counts


@pytest.mark.parametrize("ranked", [False, True], ids=["binary", "ranked"])
@pytest.mark.parametrize("mode", MODES)
def test_vectorized_matches_loops(mode, ranked):
    p, sums, counts = _segment_inputs(11 + ranked, ranked)
    cfg = LossOptions(mode=mode, beta=0.3, w_vft=0.7, w_align=1.3, dpo_beta=0.2, pro_tau=0.8)
    plan = build_plan(p.group, p.label, p.is_reference, counts)
    ref_logp = p.ref_logp.double()

    leaf = sums.clone().requires_grad_()
    loss, vft, align = objective(leaf, counts, plan, cfg, ref_logp)
    loss.backward()

    ref_leaf = sums.clone().requires_grad_()
    ref_align = group_loss_ref(ref_leaf, counts, p.group, p.label, p.is_reference, mode=mode, beta=0.3,
                               ref_logp=ref_logp, dpo_beta=0.2, pro_tau=0.8) if mode != "vft" else 0.0
    ref_vft = -ref_leaf[p.is_reference].sum() / counts[p.is_reference].sum()
    (0.7 * ref_vft + 1.3 * ref_align).backward()

    torch.testing.assert_close(vft, ref_vft)
    torch.testing.assert_close(align, torch.as_tensor(ref_align, dtype=torch.float64))
    torch.testing.assert_close(leaf.grad, ref_leaf.grad)


def test_slices_add_up_to_the_whole():
    p, sums, counts = _segment_inputs(13, True)
    cfg = LossOptions(mode="pro+bc")
    plan = build_plan(p.group, p.label, p.is_reference, counts)
    whole = objective(sums, counts, plan, cfg)[0]
    parts = [objective(sums, counts, plan.slice_groups(g, g + 1), cfg)[0] for g in range(plan.num_groups)]
    torch.testing.assert_close(sum(parts), whole)


def test_pairs_of_binary_labels_are_positives_times_negatives():
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    label = torch.tensor([1, 1, 0, 0, 1, 0, 1])
    is_ref = torch.tensor([True, False, False, False, False, False, False])
    plan = build_plan(group, label, is_ref, torch.ones(7))
    pairs = set(zip(plan.pair_i.tolist(), plan.pair_j.tolist(), strict=True))
    assert pairs == {(1, 2), (1, 3), (4, 5), (6, 5)}
    assert plan.num_valid == 2 and plan.ref_tokens == 1
    assert set(plan.top_seg.tolist()) == {1, 4, 6}


def test_bcl_gradient_on_negative_vanishes_at_the_boundary():
    """docs/design.md section 2: the two terms of a bcl pair cancel on s_n exactly at s_n = B."""
    beta = 0.5
    group, label = torch.tensor([0, 0]), torch.tensor([1, 0])
    is_ref = torch.tensor([False, False])
    counts = torch.ones(2, dtype=torch.float64)
    plan = build_plan(group, label, is_ref, counts)
    s_p = -1.0
    for s_n, sign in ((s_p - beta, 0), (s_p - beta + 0.2, 1), (s_p - beta - 0.2, -1)):
        sums = torch.tensor([s_p, s_n], dtype=torch.float64, requires_grad=True)
        objective(sums, counts, plan, LossOptions(mode="bcl", beta=beta, w_vft=0.0))[0].backward()
        grad_n = float(sums.grad[1])
        if sign == 0:
            assert abs(grad_n) < 1e-12
        else:  # above B the loss pushes s_n down (positive gradient), below B it pulls it up
            assert grad_n * sign > 0


# Finite differences see through stop-gradients, so gradcheck applies to the modes without one
# (dcl, bcl and +bc are checked against the loops above and by the boundary test).
SMOOTH_MODES = [m for m in MODES if m in ("vft", "align", "dpo", "rrhf", "pro")]


@pytest.mark.parametrize("mode", SMOOTH_MODES)
def test_gradcheck_reference_fp64(mode):
    p = make_problem(seed=14, hidden_size=5, vocab=11, members=[[2, 3, 1], [2, 2]], ranked=True)
    p = p.to(dtype=torch.float64)
    kw = dict(p.index_kwargs(), mode=mode, beta=0.4, ref_logp=p.ref_logp.double())

    def f(hidden, weight):
        return aft_loss_ref(hidden, weight, **kw).loss

    assert torch.autograd.gradcheck(f, (p.hidden.requires_grad_(), p.weight.requires_grad_()))


@pytest.mark.parametrize("mode", SMOOTH_MODES)
def test_gradcheck_objective_fp64(mode):
    p, sums, counts = _segment_inputs(15, True)
    plan = build_plan(p.group, p.label, p.is_reference, counts)
    cfg = LossOptions(mode=mode, beta=0.4)
    ref_logp = p.ref_logp.double()
    assert torch.autograd.gradcheck(lambda s: objective(s, counts, plan, cfg, ref_logp)[0],
                                    (sums.requires_grad_(),))
