"""A wheel carries every package of the tree: setuptools finds the subpackages of aft_fast/ (no list kept
by hand that a new one could miss) and installs kernels/ as aft_fast.kernels."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _packages_in(folder: Path, name: str) -> set[str]:
    """Dotted names of the folders with an __init__.py below `folder`, `folder` itself being `name`."""
    return {
        ".".join([name, *init.parent.relative_to(folder).parts])
        for init in folder.rglob("__init__.py")
        if "__pycache__" not in init.parts
    }


def test_the_build_carries_every_package(tmp_path):
    # build_py is the step that lays out a wheel's Python files (the C++ extension is built apart).
    meta, lib = tmp_path / "meta", tmp_path / "lib"
    meta.mkdir()
    cmd = [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(meta)]
    cmd += ["build_py", "--build-lib", str(lib)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = _packages_in(ROOT / "aft_fast", "aft_fast")
    expected |= _packages_in(ROOT / "kernels", "aft_fast.kernels")
    assert sorted(p.name for p in lib.iterdir()) == ["aft_fast"]  # no stray top-level kernels or tests
    built = _packages_in(lib / "aft_fast", "aft_fast")
    assert {"aft_fast.models", "aft_fast.ops", "aft_fast.kernels"} <= expected
    assert built == expected
    for package in expected:  # every module of each package, not only its __init__
        source = ROOT / "kernels" if package == "aft_fast.kernels" else ROOT.joinpath(*package.split("."))
        target = lib.joinpath(*package.split("."))
        assert {p.name for p in source.glob("*.py")} <= {p.name for p in target.glob("*.py")}, package
    assert (lib / "aft_fast" / "py.typed").is_file()
