"""The source a fleet wheel is built from: the checkout's scratch folders stay out, at its top
only; a package folder of the same name (pgtls_helpers/ca/) is source and goes in."""

from __future__ import annotations

from pathlib import Path

from pgtls_helpers.lab.fleet import source_copy


def test_scratch_folders_count_only_at_the_top(tmp_path: Path) -> None:
    root = tmp_path / "checkout"
    for rel in (
        "pgtls_helpers/ca/__init__.py",
        "pgtls_helpers/ca/__pycache__/x.pyc",
        "pgtls_helpers/work/keep.py",
        "ca/lab-fleet/db1/cert.pem",
        "work/CHG/key.pem",
        "records/CHG/index.html",
        ".venv/bin/python",
        "pyproject.toml",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    copied = source_copy(root, tmp_path / "copy")
    got = {str(p.relative_to(copied)) for p in copied.rglob("*") if p.is_file()}
    assert got == {
        "pgtls_helpers/ca/__init__.py",
        "pgtls_helpers/work/keep.py",
        "pyproject.toml",
    }
