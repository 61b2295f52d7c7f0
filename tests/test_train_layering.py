"""STYLE.md section 2: the trainer (aft_fast/train/, train.py, aft_fast/cli.py) uses only the public loss
API (`aft_fast.aft_loss`, `AFTLoss`, `linear_logprob`), never kernels, backends or torch.ops."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINER_FILES = sorted((ROOT / "aft_fast" / "train").glob("*.py")) + [
    ROOT / "train.py",
    ROOT / "aft_fast" / "cli.py",
]
FORBIDDEN_MODULES = (
    "kernels",
    "aft_fast.kernels",
    "aft_fast.ops",
    "aft_fast._ops",
    "aft_fast._C",
    "aft_fast.losses",
    "triton",
)


def violations(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if any(name == m or name.startswith(m + ".") for m in FORBIDDEN_MODULES):
                found.append(f"line {node.lineno}: imports {name}")
        if (
            isinstance(node, ast.Attribute)
            and node.attr == "ops"
            and isinstance(node.value, ast.Name)
            and node.value.id == "torch"
        ):
            found.append(f"line {node.lineno}: uses torch.ops")
    return found


def test_checker_catches_each_kind_of_violation():
    bad = (
        "import aft_fast.kernels.linear_logprob\nfrom aft_fast.ops import dispatch\n"
        "from aft_fast.losses.functional import aft_loss\nimport torch\nx = torch.ops.aft_fast.f\n"
        "from aft_fast import kernels\n"
    )
    assert {v.split(":")[0] for v in violations(bad)} == {"line 1", "line 2", "line 3", "line 5", "line 6"}
    assert violations("from aft_fast import aft_loss, AFTLoss, linear_logprob\nimport torch\n") == []


@pytest.mark.parametrize("path", TRAINER_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_trainer_uses_only_the_public_api(path):
    assert violations(path.read_text()) == []
