"""The serving path never imports the research tools, and import paths match folders."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "vllm_vla_pruner"
#: The CLI dispatches to both sides (``serve`` and ``bench``/``demo``/``checkpoint``).
DISPATCHERS = {PKG / "cli.py"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_runtime_does_not_import_research():
    offenders = {}
    for path in PKG.rglob("*.py"):
        if "research" in path.relative_to(PKG).parts or path in DISPATCHERS:
            continue
        bad = sorted(n for n in _imports(path) if n.startswith("vllm_vla_pruner.research"))
        if bad:
            offenders[str(path.relative_to(PKG))] = bad
    assert offenders == {}


def test_every_package_folder_is_importable_by_its_path():
    import importlib

    for init in PKG.rglob("__init__.py"):
        rel = init.parent.relative_to(PKG.parent)
        module = ".".join(rel.parts)
        assert importlib.import_module(module).__file__ == str(init)
