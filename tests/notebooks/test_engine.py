"""The runner's papermill engine comes from the ``papermill.engine`` entry point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pgtls_helpers"


@pytest.mark.parametrize(
    "first",
    ["import papermill.engines", "import pgtls_helpers.runbook.engine"],
    ids=["papermill-first", "engine-first"],
)
def test_papermill_finds_the_engine_through_its_entry_point(first: str) -> None:
    code = (
        f"{first}\n"
        "from papermill.engines import papermill_engines\n"
        "print(papermill_engines.get_engine('pgtls-shared-kernel').__qualname__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "SharedKernelEngine"


def test_no_module_reaches_into_papermills_registry() -> None:
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "papermill_engines._engines" not in text, path
        assert "papermill_engines.register(" not in text, path
