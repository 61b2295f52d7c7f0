"""The layers of the package, read from the code's own imports (docs/design.md section 6).

From the ground up:

    constants, outputs, options, _C,    the ground: no imports from the rest of the package
    kernels
    ops                                 backends of the fused operators (chunk loop, C++, Triton host code)
    losses, reference                   the loss math, checks, autograd Functions; the plain PyTorch oracle
    aft_fast (the package face)         the public API: aft_loss, AFTLoss, linear_logprob
    data                                formats, candidates, tokenizer, collate and packing (no torch model)
    models                              attention per layout, forward_hidden, AFTModel, model folders
    eval                                generation, scoring, metrics
    train                               stages, engine, pipeline
    integrations, cli, train.py         the faces to the outside

A module may import its own unit and the units below it that `MAY_IMPORT` lists (and what those may),
nothing else: no upward import, no sideways one (data never imports ops, eval never imports train), and
no import circle anywhere. The trainer side (models/, eval/, train/, integrations/, cli.py, train.py)
reaches the loss only through the public API, never kernels, backends or torch.ops.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# unit -> the units it may import directly (the closure of this relation is what lies below a unit).
MAY_IMPORT: dict[str, set[str]] = {
    "ground": set(),
    "kernels": {"ground"},
    "ops": {"kernels", "ground"},
    "losses": {"ops", "ground"},
    "reference": {"ground"},
    "api": {"losses", "reference", "ground"},
    "data": {"ground"},
    "models": {"api", "data"},
    "eval": {"models", "data"},
    "train": {"eval", "models", "data", "api"},
    "integrations": {"train", "eval", "models", "data", "api"},
    "cli": {"train"},
    "script": {"cli", "train"},
}
# module name prefix -> unit; the longest prefix wins.
UNITS = {
    "aft_fast.constants": "ground",
    "aft_fast.outputs": "ground",
    "aft_fast.options": "ground",
    "aft_fast._C": "ground",
    "aft_fast.kernels": "kernels",
    "aft_fast.ops": "ops",
    "aft_fast.losses": "losses",
    "aft_fast.reference": "reference",
    "aft_fast.data": "data",
    "aft_fast.models": "models",
    "aft_fast.eval": "eval",
    "aft_fast.train": "train",
    "aft_fast.integrations": "integrations",
    "aft_fast.cli": "cli",
    "train": "script",
}
COMPILED = {"aft_fast._C"}  # extension modules: no source to read, but a module to import
PUBLIC_API_ONLY = {"models", "eval", "train", "integrations", "cli", "script"}
FORBIDDEN_FOR_TRAINER = (
    "kernels",
    "aft_fast.kernels",
    "aft_fast.ops",
    "aft_fast._ops",
    "aft_fast._C",
    "aft_fast.losses",
    "triton",
)


def unit_of(module: str) -> str | None:
    if module == "aft_fast":  # the package face alone; a new top-level module needs a unit of its own
        return "api"
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        unit = UNITS.get(".".join(parts[:n]))
        if unit is not None:
            return unit
    return None


def below(unit: str) -> set[str]:
    """Every unit that `unit` may reach: the closure of MAY_IMPORT."""
    seen: set[str] = set()
    todo = list(MAY_IMPORT[unit])
    while todo:
        u = todo.pop()
        if u not in seen:
            seen.add(u)
            todo.extend(MAY_IMPORT[u])
    return seen


def source_modules() -> dict[str, Path]:
    """Module name -> file, for the package, its kernels (installed as aft_fast.kernels) and train.py."""
    found = {}
    for path in sorted((ROOT / "aft_fast").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        name = "aft_fast.kernels" if path.stem == "__init__" else f"aft_fast.kernels.{path.stem}"
        found[name] = path
    found["train"] = ROOT / "train.py"
    return found


def imports_of(module: str, source: str, known: set[str], is_package: bool) -> list[tuple[int, str]]:
    """(line, imported module) for every import in `source`, at any depth (functions, TYPE_CHECKING),
    relative ones resolved; `from a.b import c` names a.b.c when that is a module of `known`."""
    found = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in known else base))
    return found


def import_graph(modules: dict[str, str], packages: set[str]) -> dict[str, list[tuple[int, str]]]:
    """module -> [(line, module of this tree it imports)], from the sources `modules` (name -> text)."""
    known = set(modules) | COMPILED
    graph = {}
    for name, source in modules.items():
        edges = []
        for line, target in imports_of(name, source, known, name in packages):
            while target and target not in known:  # aft_fast.data.batch.Batch -> aft_fast.data.batch
                target = target.rpartition(".")[0]
            if target and target != name and unit_of(target) is not None:
                edges.append((line, target))
        graph[name] = edges
    return graph


def layer_violations(graph: dict[str, list[tuple[int, str]]]) -> list[str]:
    """Imports that go up or sideways: from a unit to one that is not itself or below it."""
    found = []
    for name, edges in sorted(graph.items()):
        unit = unit_of(name)
        if unit is None:
            continue
        allowed = below(unit) | {unit}
        for line, target in edges:
            other = unit_of(target)
            if other not in allowed:
                found.append(f"{name} line {line}: imports {target} ({unit} may not import {other})")
    return found


def circles(graph: dict[str, list[tuple[int, str]]]) -> list[list[str]]:
    """Each import circle once, as the modules along it (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for _, w in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def trainer_violations(source: str) -> list[str]:
    """The trainer side uses only the public loss API, never kernels, backends or torch.ops."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if any(name == m or name.startswith(m + ".") for m in FORBIDDEN_FOR_TRAINER):
                found.append(f"line {node.lineno}: imports {name}")
        if (
            isinstance(node, ast.Attribute)
            and node.attr == "ops"
            and isinstance(node.value, ast.Name)
            and node.value.id == "torch"
        ):
            found.append(f"line {node.lineno}: uses torch.ops")
    return found


def _tree_graph() -> dict[str, list[tuple[int, str]]]:
    files = source_modules()
    packages = {name for name, path in files.items() if path.name == "__init__.py"}
    return import_graph({name: path.read_text() for name, path in files.items()}, packages)


def test_every_module_has_a_layer():
    assert [name for name in source_modules() if unit_of(name) is None] == []


def test_no_import_goes_up_or_sideways():
    assert layer_violations(_tree_graph()) == []


def test_no_import_circle():
    assert circles(_tree_graph()) == []


def test_checker_catches_a_circle_and_an_upward_import():
    modules = {
        "aft_fast.data.collate": "from aft_fast.data.packing import pack\n",
        "aft_fast.data.packing": "def f():\n    from aft_fast.data.collate import Batch\n",
        "aft_fast.eval.evaluate": "from aft_fast.train.model import segment_logprobs\n",
        "aft_fast.train.model": "from aft_fast import aft_loss\n",
        "aft_fast.ops.dispatch": "from ..losses import objectives\n",
        "aft_fast.losses.objectives": "import torch\n",
        "aft_fast": "from aft_fast.losses.objectives import x\n",
    }
    graph = import_graph(modules, packages={"aft_fast"})
    assert circles(graph) == [["aft_fast.data.collate", "aft_fast.data.packing"]]
    assert layer_violations(graph) == [
        "aft_fast.eval.evaluate line 1: imports aft_fast.train.model (eval may not import train)",
        "aft_fast.ops.dispatch line 1: imports aft_fast.losses.objectives (ops may not import losses)",
    ]
    # The layout as it stands: the same modules without the circle and the two upward imports.
    fixed = {
        **modules,
        "aft_fast.data.packing": "from aft_fast.data.batch import Batch\n",
        "aft_fast.data.batch": "import torch\n",
        "aft_fast.eval.evaluate": "from aft_fast.models.forward import segment_logprobs\n",
        "aft_fast.models.forward": "from aft_fast import aft_loss\n",
        "aft_fast.ops.dispatch": "from aft_fast.ops import torch_chunks\n",
        "aft_fast.ops.torch_chunks": "import torch\n",
    }
    assert circles(import_graph(fixed, {"aft_fast"})) == []
    assert layer_violations(import_graph(fixed, {"aft_fast"})) == []


def test_trainer_checker_catches_each_kind_of_violation():
    bad = (
        "import aft_fast.kernels.linear_logprob\nfrom aft_fast.ops import dispatch\n"
        "from aft_fast.losses.functional import aft_loss\nimport torch\nx = torch.ops.aft_fast.f\n"
        "from aft_fast import kernels\n"
    )
    expected = {"line 1", "line 2", "line 3", "line 5", "line 6"}
    assert {v.split(":")[0] for v in trainer_violations(bad)} == expected
    assert trainer_violations("from aft_fast import aft_loss, AFTLoss, linear_logprob\nimport torch\n") == []


TRAINER_SIDE = sorted(path for name, path in source_modules().items() if unit_of(name) in PUBLIC_API_ONLY)


@pytest.mark.parametrize("path", TRAINER_SIDE, ids=lambda p: str(p.relative_to(ROOT)))
def test_trainer_side_uses_only_the_public_api(path):
    assert trainer_violations(path.read_text()) == []
