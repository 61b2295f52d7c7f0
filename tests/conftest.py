"""Shared test fixtures: a random packed AFT batch with prompt sharing, and the tolerance table."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
import torch

# Triton runs CPU tensors only under its interpreter, and picks interpreter or compiler when a kernel
# module is imported: switch it on here, before any test imports aft_fast.kernels, on machines
# without CUDA. Set TRITON_INTERPRET=0 to skip the (slow) interpreted triton tests.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tolerance rule (docs/design.md section 8): gold = reference on fp64-upcast inputs, ref = reference in
# the test dtype; require max|ours - gold| <= 2 * max|ref - gold| + ATOL[dtype].
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-4, torch.float64: 1e-10}


def backends_under_test() -> list[str]:
    """torch always, cpp when built, triton under the interpreter: the suites that use this build CPU
    tensors (on a CUDA machine tests/test_triton_backend.py runs triton on CUDA tensors instead)."""
    from aft_fast.ops import cpp_chunks
    from aft_fast.ops.dispatch import triton_backend_available, triton_runs_on

    names = ["torch"]
    if cpp_chunks.AVAILABLE:
        names.append("cpp")
    if triton_backend_available() and triton_runs_on(torch.device("cpu")):
        names.append("triton")
    return names


@dataclass
class Problem:
    """One packed batch: groups laid out as [prompt | member_1 | ... | member_k] on hidden rows."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    rows: torch.Tensor
    targets: torch.Tensor
    segments: torch.Tensor
    group: torch.Tensor
    label: torch.Tensor
    is_reference: torch.Tensor
    ref_logp: torch.Tensor
    extra: dict = field(default_factory=dict)

    def index_kwargs(self) -> dict:
        return dict(rows=self.rows, targets=self.targets, segments=self.segments, group=self.group,
                    label=self.label, is_reference=self.is_reference)

    def to(self, device=None, dtype=None) -> Problem:
        def conv(t):
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return Problem(conv(self.hidden), conv(self.weight), conv(self.bias), *(
            t.to(device) for t in (self.rows, self.targets, self.segments, self.group, self.label,
                                   self.is_reference)), self.ref_logp.to(device))


def make_problem(
    *,
    seed: int = 0,
    hidden_size: int = 24,
    vocab: int = 123,
    ranked: bool = False,
    members: list[list[int]] | None = None,
    prompt_len: int = 3,
    with_reference: bool = True,
    bias: bool = False,
    dtype: torch.dtype = torch.float32,
    scale: float = 1.0,
) -> Problem:
    """Random problem. `members[g]` lists the token lengths of group g's candidates.

    Default groups: mixed labels, all positive, all negative, one with 1-token segments, and a
    larger ragged group. The last prompt row of each group predicts the first token of every member
    (rows repeat, as under prompt sharing). Labels are 0/1, or ranks 0..3 with ties when `ranked`.
    """
    g = torch.Generator().manual_seed(seed)
    if members is None:
        members = [[4, 2, 5, 3], [3, 6, 2], [2, 2, 4], [1, 1, 2, 1], [7, 1, 9, 4, 6, 3]]
    rows, targets, segments, group, label, is_ref = [], [], [], [], [], []
    pos = 0
    for gi, lengths in enumerate(members):
        last_prompt = pos + prompt_len - 1
        pos += prompt_len
        group_lengths = ([5] if with_reference else []) + lengths
        for mi, length in enumerate(group_lengths):
            seg = len(group)
            reference = with_reference and mi == 0
            group.append(gi * 7 + 3)  # group ids need not be contiguous
            is_ref.append(reference)
            if ranked:
                label.append(int(torch.randint(0, 4, (1,), generator=g)))
            elif gi == 1:
                label.append(1)  # all positive
            elif gi == 2:
                label.append(0)  # all negative
            else:
                label.append(int(mi % 2 == 1))
            prev = last_prompt
            for _ in range(length):
                rows.append(prev)
                targets.append(int(torch.randint(0, vocab, (1,), generator=g)))
                segments.append(seg)
                prev = pos
                pos += 1
    n_rows = pos
    hidden = torch.randn(n_rows, hidden_size, generator=g) * scale
    weight = torch.randn(vocab, hidden_size, generator=g) * scale / hidden_size**0.5 * 3
    b = torch.randn(vocab, generator=g) if bias else None
    S = len(group)
    ref_logp = -torch.rand(S, generator=g) * 20
    p = Problem(hidden, weight, b, torch.tensor(rows), torch.tensor(targets), torch.tensor(segments),
                torch.tensor(group), torch.tensor(label), torch.tensor(is_ref), ref_logp)
    return p.to(dtype=dtype)


@pytest.fixture
def problem() -> Problem:
    return make_problem()
