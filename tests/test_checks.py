"""Bad input raises ValueError naming the argument, before anything reaches a kernel."""

from __future__ import annotations

import pytest
import torch

import aft_fast
from tests.conftest import backends_under_test, make_problem


def _kwargs(p, **over):
    kw = dict(p.index_kwargs(), mode="bcl")
    kw.update(over)
    return kw


CASES = {
    "hidden 1-D": (dict(hidden=torch.randn(5)), "hidden"),
    "hidden int": (dict(hidden=torch.ones(40, 24, dtype=torch.int64)), "hidden"),
    "weight dtype": (dict(weight=torch.randn(123, 24, dtype=torch.float64)), "weight"),
    "weight hidden size": (dict(weight=torch.randn(123, 23)), "weight"),
    "bias shape": (dict(bias=torch.randn(7)), "bias"),
    "rows out of range": (dict(rows="big"), "rows"),
    "rows negative": (dict(rows="neg"), "rows"),
    "rows dtype": (dict(rows="int32"), "rows"),
    "targets out of range": (dict(targets="big"), "targets"),
    "targets length": (dict(targets="short"), "targets"),
    "segments out of range": (dict(segments="big"), "segments"),
    "segment without tokens": (dict(segments="gap"), "segments"),
    "empty": (dict(rows="empty"), "rows"),
    "label length": (dict(label="short"), "label"),
    "is_reference dtype": (dict(is_reference="int"), "is_reference"),
    "dpo without ref_logp": (dict(mode="dpo"), "ref_logp"),
    "ref_logp length": (dict(mode="dpo+bc", ref_logp=torch.zeros(3)), "ref_logp"),
    "ref_logp nan": (dict(mode="dpo", ref_logp="nan"), "ref_logp"),
    "unknown mode": (dict(mode="kto"), "mode"),
    "unknown backend": (dict(backend="cuda"), "backend"),
    "bad pro_tau": (dict(mode="pro", pro_tau=0.0), "pro_tau"),
    "bad beta": (dict(beta=float("nan")), "beta"),
    "bad chunk_size": (dict(chunk_size=0), "chunk_size"),
}


def _apply(p, over):
    hidden, weight, bias = p.hidden, p.weight, None
    kw = _kwargs(p)
    T, S = p.rows.numel(), p.group.numel()
    for key, value in over.items():
        if key == "hidden":
            hidden = value
        elif key == "weight":
            weight = value
        elif key == "bias":
            bias = value
        elif value == "big":
            kw[key] = kw[key].clone()
            kw[key][-1] = {"rows": p.hidden.shape[0], "targets": p.weight.shape[0], "segments": S}[key]
        elif value == "neg":
            kw[key] = kw[key].clone()
            kw[key][0] = -1
        elif value == "int32":
            kw[key] = kw[key].int()
        elif value == "short":
            kw[key] = kw[key][:-1]
        elif value == "gap":
            kw[key] = torch.where(kw[key] == 2, 3, kw[key])
        elif value == "empty":
            for k in ("rows", "targets", "segments"):
                kw[k] = kw[k][:0]
        elif value == "int":
            kw[key] = kw[key].long()
        elif value == "nan":
            kw["ref_logp"] = torch.full((S,), float("nan"))
        else:
            kw[key] = value
    assert T > 0
    return hidden, weight, bias, kw


@pytest.mark.parametrize("backend", backends_under_test())
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_names_the_argument(case, backend):
    over, name = CASES[case]
    p = make_problem(seed=0)
    hidden, weight, bias, kw = _apply(p, over)
    kw.setdefault("backend", backend)
    with pytest.raises(ValueError, match=rf"^{name}:"):
        aft_fast.aft_loss(hidden, weight, bias=bias, **kw)


def test_linear_logprob_checks_num_segments_and_ranges():
    p = make_problem(seed=0)
    kw = dict(rows=p.rows, targets=p.targets, segments=p.segments)
    with pytest.raises(ValueError, match="^num_segments:"):
        aft_fast.linear_logprob(p.hidden, p.weight, **kw, num_segments=0)
    with pytest.raises(ValueError, match="^segments:"):
        aft_fast.linear_logprob(p.hidden, p.weight, **kw, num_segments=3)


@pytest.mark.parametrize("bad", [-1, 1.5, "yes", None])
def test_linear_logprob_checks_keep_probs(bad):
    p = make_problem(seed=0)
    kw = dict(rows=p.rows, targets=p.targets, segments=p.segments, num_segments=p.group.numel())
    with pytest.raises(ValueError, match="^keep_probs:"):
        aft_fast.linear_logprob(p.hidden, p.weight, **kw, keep_probs=bad)


def test_cpp_backend_refuses_when_unavailable_or_wrong_device(monkeypatch):
    from aft_fast.ops import cpp_chunks

    p = make_problem(seed=0)
    monkeypatch.setattr(cpp_chunks, "AVAILABLE", False)
    with pytest.raises(ValueError, match="^backend: 'cpp' is not built"):
        aft_fast.aft_loss(p.hidden, p.weight, **p.index_kwargs(), backend="cpp")


def test_cpp_ops_check_their_own_inputs():
    """Called directly (bypassing the Python checks), the C++ ops still refuse bad indices."""
    from aft_fast.ops import cpp_chunks

    if not cpp_chunks.AVAILABLE:
        pytest.skip("C++ extension not built")
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    buf = torch.empty(4, 10)
    with pytest.raises(RuntimeError, match="targets"):
        cpp_chunks.chunk_logprob(h, w, None, torch.tensor([0, 1, 10, 2]), buf)
    with pytest.raises(RuntimeError, match="buf"):
        cpp_chunks.chunk_logprob(h, w, None, torch.tensor([0, 1, 2, 3]), torch.empty(3, 10))
    with pytest.raises(RuntimeError, match="h: expected float32"):
        cpp_chunks.chunk_logprob(h.double(), w, None, torch.tensor([0, 1, 2, 3]), buf)
    probs = torch.rand(4, 10)
    with pytest.raises(RuntimeError, match="rows"):
        cpp_chunks.chunk_grad(probs, torch.ones(4), torch.tensor([0, 1, 2, 3]), h, w,
                              torch.tensor([0, 1, 2, 9]), torch.zeros(4, 8), None, None)
