"""The notebooks as committed: papermill's conventions, no outputs, thin code."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest

from pgtls_helpers.runbook.params import PARAMETER_NAMES
from pgtls_helpers.runbook.runner import STEPS

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
_DECLARED = re.compile(r"^(\w+): ([^=]+?) = (.+?)  # \S.*$")


@pytest.mark.parametrize("step", [s.name for s in STEPS])
def test_committed_notebook_follows_the_conventions(step: str) -> None:
    nb = nbformat.read(NOTEBOOKS / f"{step}.ipynb", as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# Step ")
    code = [c for c in nb.cells if c.cell_type == "code"]
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert tagged == [code[0]], "exactly one parameters cell, the first code cell"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, "committed without outputs"
    # every parameter is declared, typed and commented, with a plain literal value
    declared = {}
    for line in code[0].source.splitlines():
        if line.startswith("#"):
            continue
        match = _DECLARED.match(line)
        assert match, f"not 'name: type = value  # comment': {line!r}"
        ast.literal_eval(match.group(3))
        declared[match.group(1)] = match.group(2)
    assert set(declared) == set(PARAMETER_NAMES)
    # then one call turns them into Params, and the rest stays thin
    assert "from pgtls_helpers import notebook as pgtls" in code[1].source
    # step 1 makes the CSR; the later steps take the host names from it
    call = "globals())" if step.startswith("01") else "globals(), names_from_csr=True)"
    assert f"pgtls.notebook_params({call}" in code[1].source
    for cell in code[2:]:
        statements = ast.parse(cell.source).body
        assert 1 <= len(statements) <= 2, cell.source


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_no_markdown_speaks_of_the_lab(path: Path) -> None:
    """The text of a notebook is in the record of every change, a real one too: what only a lab
    run does is said by the step's output, and only in a lab run."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            assert "IntermediateCA_" not in cell.source, cell.source
            assert "throwaway" not in cell.source.lower(), cell.source
