"""The runbook's parameters have one source, ``Params``: each notebook's parameters cell declares
exactly its fields (names, types, defaults), and ``parameters/lab.yaml`` holds only what the lab
changes. Editing either side alone fails here."""

from __future__ import annotations

import ast
import typing
from collections.abc import Mapping
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any

import nbformat
import papermill.parameterize
import pytest
from papermill.iorw import load_notebook_node

from pgtls_helpers.display.form import notebook_params
from pgtls_helpers.runbook import runner
from pgtls_helpers.runbook.params import (
    PARAMETER_NAMES,
    Params,
    load_params,
    parameters_cell_source,
    plain_values,
    read_params_file,
    write_parameters_cells,
)

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
HINTS = typing.get_type_hints(Params)
# watch.ipynb reports on many servers (pgtls watch's targets, root and thresholds); it takes no
# runbook parameters, so its cell is not Params'.
NOT_RUNBOOK = {"watch"}
# A notebook that needs only some of the runbook's parameters would be listed here with them,
# and its cell checked field by field all the same; every runbook notebook declares them all.
SUBSETS: dict[str, tuple[str, ...]] = {}
RUNBOOK = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb") if p.stem not in NOT_RUNBOOK)
REQUIRED = {"change_id": "CHG-1", "common_name": "db1.example.com"}


def _read(stem: str) -> Any:
    return nbformat.read(NOTEBOOKS / f"{stem}.ipynb", as_version=4)


def _parameters_cell(nb: Any) -> Any:
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    return tagged[0]


def _declared(source: str) -> dict[str, tuple[str, object]]:
    """name -> (annotation as written, literal value), in the cell's order."""
    out: dict[str, tuple[str, object]] = {}
    for node in ast.parse(source).body:
        assert isinstance(node, ast.AnnAssign), f"not 'name: type = value': {ast.unparse(node)}"
        assert isinstance(node.target, ast.Name) and node.value is not None
        out[node.target.id] = (ast.unparse(node.annotation), ast.literal_eval(node.value))
    return out


def _plain_type(hint: Any) -> str:
    """The type a notebook holds a parameter in: what papermill injects and load_params reads."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, __import__("types").UnionType):
        assert args == (str, type(None)), f"only optional text is optional, not {hint}"
        return "str"
    if origin is tuple:
        assert args[1] is Ellipsis
        return f"list[{_plain_type(args[0])}]"
    if origin is Mapping:
        return f"dict[{_plain_type(args[0])}, {_plain_type(args[1])}]"
    assert hint in (str, int, bool, object), hint
    return str(hint.__name__)


def _plain_default(f: Field[Any]) -> object:
    if f.default is MISSING and f.default_factory is MISSING:
        return ""  # required (change_id, common_name): a parameters file gives it
    value = f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]
    if value is None:
        return ""
    if isinstance(value, tuple):
        return list(value)
    return value


def test_every_notebook_is_a_runbook_notebook_or_named_here() -> None:
    for stem in RUNBOOK:
        assert "notebook_params(" in "".join(c.source for c in _read(stem).cells), stem
    for stem in NOT_RUNBOOK:
        assert "notebook_params(" not in "".join(c.source for c in _read(stem).cells), stem


@pytest.mark.parametrize("stem", RUNBOOK)
def test_the_parameters_cell_declares_exactly_the_fields_of_params(stem: str) -> None:
    declared = _declared(_parameters_cell(_read(stem)).source)
    by_name = {f.name: f for f in fields(Params)}
    names = SUBSETS.get(stem, PARAMETER_NAMES)
    assert tuple(declared) == names, "the fields of Params, in its order"
    for name, (annotation, value) in declared.items():
        assert annotation == _plain_type(HINTS[name]), name
        default = _plain_default(by_name[name])
        assert value == default and type(value) is type(default), name
    # read back as a run reads it, the cell gives exactly Params' defaults
    given = {name: value for name, (_, value) in declared.items()}
    assert load_params({**given, **REQUIRED}) == Params(**REQUIRED)


@pytest.mark.parametrize("stem", RUNBOOK)
def test_the_parameters_cell_is_the_generated_one_without_outputs(stem: str) -> None:
    cell = _parameters_cell(_read(stem))
    assert cell.source == parameters_cell_source(), "run `make parameters-cells`"
    assert cell.outputs == [] and cell.execution_count is None
    assert max(len(line) for line in cell.source.splitlines()) <= 100  # ruff's line length
    assert write_parameters_cells(NOTEBOOKS, check=True) == []


def test_the_generator_rewrites_a_stale_cell_and_keeps_its_tag(tmp_path: Path) -> None:
    nb = _read("02_ca_response")
    cell = _parameters_cell(nb)
    cell.source = cell.source.replace('ca_mode: str = "files"', 'ca_mode: str = "lab"')
    cell.outputs, cell.execution_count = [nbformat.v4.new_output("stream", text="x")], 3
    nbformat.write(nb, tmp_path / "02_ca_response.ipynb")
    nbformat.write(_read("watch"), tmp_path / "watch.ipynb")
    assert write_parameters_cells(tmp_path, check=True) == [tmp_path / "02_ca_response.ipynb"]
    assert write_parameters_cells(tmp_path) == [tmp_path / "02_ca_response.ipynb"]
    again = _parameters_cell(nbformat.read(tmp_path / "02_ca_response.ipynb", as_version=4))
    assert again.source == parameters_cell_source() and again.id == cell.id
    assert again.outputs == [] and again.execution_count is None
    assert again.metadata.tags == ["parameters"]
    assert nbformat.read(tmp_path / "watch.ipynb", as_version=4) == _read("watch")


def test_injected_values_have_the_cells_shape_and_override_it(tmp_path: Path) -> None:
    """What ``pgtls run`` injects after the cell: every parameter, in the cell's types; run in
    a notebook's order (cell, then papermill's injected cell) it gives back the run's Params."""
    params = load_params(
        {
            **REQUIRED,
            "ca_mode": "lab",
            "subject_alt_names": ["db1"],
            "country": "DE",
            "client_system_users": ["app"],
            "client_roles": {"app": "app_role"},
            "hba_rules": [
                {"type": "hostssl", "database": "all", "user": "all", "address": "10.0.0.0/8",
                 "method": "scram-sha-256", "options": ["clientcert=verify-full"]}
            ],
            "work_dir": str(tmp_path / "work"),
        }
    )  # fmt: skip
    injected = runner._injected(params)
    assert injected == plain_values(params)
    declared = _declared(parameters_cell_source())
    for name, value in injected.items():
        assert _plain_type(HINTS[name]).split("[")[0] == type(value).__name__, name
    # papermill's own reading (it tags every cell), then its injection, as a run does
    nb = papermill.parameterize.parameterize_notebook(
        load_notebook_node(str(NOTEBOOKS / "02_ca_response.ipynb")), injected
    )
    namespace: dict[str, Any] = {}
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if "parameters" in tags or "injected-parameters" in tags:
            exec(cell.source, namespace)
    assert set(namespace["__annotations__"]) == set(declared)
    assert notebook_params(namespace) == params


def test_lab_yaml_holds_only_what_differs_from_the_defaults() -> None:
    values = read_params_file(ROOT / "parameters" / "lab.yaml")
    unknown = set(values) - set(PARAMETER_NAMES)
    assert not unknown, f"not fields of Params: {unknown}"
    params = load_params(values, source="lab.yaml")
    defaults = Params(change_id=params.change_id, common_name=params.common_name)
    same = [n for n in values if n not in REQUIRED and getattr(params, n) == getattr(defaults, n)]
    assert not same, f"lab.yaml repeats the defaults of Params: {same}"
