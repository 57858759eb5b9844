"""The package's shape: every module imports, layers point down only, no borrowed private names."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import pgtls_helpers

PACKAGE = Path(pgtls_helpers.__file__).parent
# A layer may import the ones after it, never the ones before it.
LAYERS = ["cli", "display", "runbook", "ca", "postgres", "pki"]
MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages([str(PACKAGE)], prefix="pgtls_helpers.")
    if m.name != "pgtls_helpers.__main__"  # importing it runs the command line
)


def _source_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "notebooks" not in p.parts)


def _imports(path: Path) -> list[ast.ImportFrom | ast.Import]:
    tree = ast.parse(path.read_text())
    return [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]


def _imported_modules(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    return [base] + [f"{base}.{a.name}" for a in node.names]


@pytest.mark.parametrize("name", MODULES)
def test_every_module_imports(name: str) -> None:
    importlib.import_module(name)


def test_layers_point_down_only() -> None:
    wrong = []
    for path in _source_files():
        rel = path.relative_to(PACKAGE).parts
        if len(rel) < 2 or rel[0] not in LAYERS:
            continue
        above = LAYERS[: LAYERS.index(rel[0])]
        for node in _imports(path):
            for mod in _imported_modules(node):
                parts = mod.split(".")
                if parts[0] == "pgtls_helpers" and len(parts) > 1 and parts[1] in above:
                    wrong.append(f"{'/'.join(rel)} imports {mod}")
                if rel[0] == "pki" and parts[:2] == ["pgtls_helpers", "lab"]:
                    wrong.append(f"{'/'.join(rel)} imports {mod}")
    assert wrong == []


def test_no_module_imports_another_modules_private_names() -> None:
    borrowed = []
    for path in _source_files():
        for node in _imports(path):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pgtls_helpers"):
                borrowed += [
                    f"{path.relative_to(PACKAGE)}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_")
                ]
    assert borrowed == []


def test_the_pure_layer_writes_no_files() -> None:
    writers = []
    for path in (PACKAGE / "pki").glob("*.py"):
        text = path.read_text()
        for needle in ("os.open(", "write_bytes(", "write_text(", "os.replace(", "os.rename("):
            if needle in text:
                writers.append(f"pki/{path.name}: {needle}")
    assert writers == []
