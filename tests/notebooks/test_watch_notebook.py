"""``notebooks/watch.ipynb``: committed thin and without outputs, and run headless with papermill
against real servers into an HTML report."""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from pathlib import Path

import certfactory
import nbformat
import papermill
from nbconvert import HTMLExporter

from pgtls_helpers.lab import LabCluster, free_port
from pgtls_helpers.runbook.runner import kernel_name

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "watch.ipynb"
_DECLARED = re.compile(r"^(\w+): ([^=]+?) = (.+?)  # \S.*$")


def test_committed_watch_notebook_follows_the_conventions() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c for c in code if "parameters" in c.metadata.get("tags", [])] == [code[0]]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    declared = {}
    for line in code[0].source.splitlines():
        if line.startswith("#"):
            continue
        match = _DECLARED.match(line)
        assert match, f"not 'name: type = value  # comment': {line!r}"
        ast.literal_eval(match.group(3))
        declared[match.group(1)] = match.group(2)
    assert set(declared) == {
        "targets", "root", "warn_days", "crit_days", "timeout",
        "client_users", "crl_files", "sessions", "login_user",
    }  # fmt: skip
    for cell in code[1:]:
        assert 1 <= len(ast.parse(cell.source).body) <= 2, cell.source


def test_watch_notebook_runs_headless_into_a_report(
    make_cluster: Callable[[], LabCluster], tmp_path: Path
) -> None:
    chain = certfactory.article_chain("127.0.0.1")
    root = certfactory.write_pem(tmp_path / "root.crt", chain.root)
    good, soon = make_cluster(), make_cluster()
    good.serve_certificate(chain.leaf.key, chain.leaf_first(with_root=False))  # type: ignore[arg-type]
    leaf = certfactory.issue(
        "127.0.0.1", issuer=chain.intermediates[-1], sans=["127.0.0.1"], days=10
    )
    soon.serve_certificate(  # type: ignore[arg-type]
        leaf.key, [leaf.cert, *(i.cert for i in reversed(chain.intermediates))]
    )
    closed = free_port()
    targets = [f"127.0.0.1:{good.port}", f"127.0.0.1:{soon.port}", f"127.0.0.1:{closed}"]
    out = tmp_path / "watch.ipynb"
    nb = papermill.execute_notebook(
        str(NOTEBOOK),
        str(out),
        parameters={"targets": targets, "root": str(root), "timeout": 2.0},
        kernel_name=kernel_name(),
        progress_bar=False,
        log_output=False,
        start_timeout=60,
    )
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    html_parts = [o.data.get("text/html", "") for o in outputs if "data" in o]
    joined = "".join(html_parts)
    # the table is sorted by days left: the server with 10 days comes first, the closed port last
    table = next(h for h in html_parts if "<table" in h and "days_left" in h)
    assert table.index(f"127.0.0.1:{soon.port}") < table.index(f"127.0.0.1:{good.port}")
    assert table.index(f"127.0.0.1:{good.port}") < table.index(f"127.0.0.1:{closed}")
    assert joined.count("<svg") == 2 and "critical 15 d" in joined and "today" in joined
    assert "expires-soon" in joined and "unreachable" in joined and "plaintext-accepted" in joined
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    assert "<svg" in body and f"127.0.0.1:{soon.port}" in body
