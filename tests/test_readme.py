"""The README's example of the fused loss in a plain PyTorch loop runs as written, and its loss is the
reference loss of the same inputs."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import torch

from aft_fast.reference import aft_loss_ref

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- tests/test_readme.py runs this block -->"


def _example() -> str:
    text = README.read_text()
    assert MARKER in text, f"README.md lost the marker {MARKER!r} before its runnable example"
    match = re.search(r"```python\n(.*?)```", text[text.index(MARKER) :], re.S)
    assert match, "no python block after the marker"
    return match.group(1)


def test_readme_example_runs_and_matches_the_reference():
    torch.manual_seed(0)
    ns: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(_example(), str(README), "exec"), ns)
    lines = printed.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == ["0", "1", "2"]

    # The loss once more with the example's final weights, fused and from the plain reference (full logits).
    model = ns["model"]
    with torch.no_grad():
        hidden = model.model(input_ids=ns["input_ids"], attention_mask=ns["attention_mask"]).last_hidden_state
    inputs = dict(
        rows=torch.cat(ns["rows"]),
        targets=torch.cat(ns["targets"]),
        segments=torch.cat(ns["segments"]),
        group=torch.zeros(4, dtype=torch.long),
        label=ns["label"],
        is_reference=ns["is_reference"],
    )
    weight = model.lm_head.weight.detach()
    out = ns["loss_fn"](hidden.flatten(0, 1), weight, **inputs)
    ref = aft_loss_ref(hidden.flatten(0, 1), weight, mode="bcl", beta=1.0, **inputs)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.scores, ref.scores, rtol=1e-4, atol=1e-5)
    assert ns["out"].loss.isfinite()
