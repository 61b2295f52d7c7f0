"""The design notes and the contributing guide point at what is there: every `docs/design.md section N`
in the tree names a section of docs/design.md, and every path CONTRIBUTING.md names exists."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
POINTER = re.compile(r"docs/design\.md,? (?:section )?(\d+)")


def _text_files() -> list[Path]:
    """The project's text files (no git needed: a source archive has none)."""
    skip = {".git", ".venv", ".venv-vllm", "build", "dist", "node_modules", "__pycache__", ".pytest_cache"}
    suffixes = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".cpp", ".h", ".txt", ".cfg"}
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip]
        found += [Path(folder) / f for f in files if Path(f).suffix in suffixes]
    return found


def _sections() -> set[str]:
    return set(re.findall(r"^## (\d+)\. ", DESIGN.read_text(), re.M))


def test_design_has_numbered_sections():
    assert {"1", "2", "3", "4", "5", "6", "7", "8"} <= _sections()


def test_every_pointer_names_a_section():
    sections = _sections()
    dangling = []
    for path in _text_files():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            dangling += [
                f"{path.relative_to(ROOT)}:{n}: section {s}"
                for s in POINTER.findall(line)
                if s not in sections
            ]
    assert dangling == []


def test_contributing_names_real_files():
    text = (ROOT / "CONTRIBUTING.md").read_text()
    paths = set(re.findall(r"`((?:aft_fast|kernels|csrc|tests|benchmarks|configs)/[\w/.]+\.\w+)`", text))
    assert len(paths) >= 15  # the table names the files of every row
    assert sorted(p for p in paths if not (ROOT / p).is_file()) == []
