"""Records of renewal and rotation through the runner: ``pgtls trust`` (with ``pgtls lab ca``
standing in for a new root) and a renewal's served-before/after and client loop."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from record_checks import assert_no_secrets, read_in_chromium, write_params

from pgtls_helpers import notebook as runbook
from pgtls_helpers.cli import main as cli_main
from pgtls_helpers.lab import LabCluster
from pgtls_helpers.pki.chain import fingerprint
from pgtls_helpers.postgres.clients import resolve_client_users
from pgtls_helpers.runbook.params import Params
from pgtls_helpers.runbook.renewal import read_roots

ParamsFactory = Callable[..., Params]


@pytest.fixture
def one_cluster() -> Iterator[LabCluster]:
    """A running cluster of the first major only: these tests go through papermill, which
    costs seconds, and the server-side behaviour is covered on every major elsewhere."""
    from conftest import PG_MAJORS, _bindir_or_skip

    cluster = LabCluster.create(bindir=_bindir_or_skip(PG_MAJORS[0]))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


def test_pgtls_trust_adds_a_lab_ca_root_and_leaves_a_record(
    one_cluster: LabCluster,
    runbook_params: ParamsFactory,
    own_client_user: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    first = runbook_params(
        one_cluster, change_id="CHG-first", client_system_users=[own_client_user]
    )
    runbook.step1_key_and_csr(first)
    runbook.step2_ca_response(first)
    runbook.step3_install_files(first)
    runbook.step4_enable_ssl(first)

    ca_dir = tmp_path / "ca-b"
    assert cli_main(["lab", "ca", "--dir", str(ca_dir), "--name", "Rotation Root B"]) == 0
    assert "root.crt" in capsys.readouterr().out
    new_root = read_roots(ca_dir / "root.crt")[0]
    assert "Rotation Root B" in new_root.subject.rfc4514_string()
    assert (ca_dir / "signer.key").stat().st_mode & 0o077 == 0
    # a second call keeps the same CA
    assert cli_main(["lab", "ca", "--dir", str(ca_dir), "--name", "Rotation Root B"]) == 0
    assert fingerprint(read_roots(ca_dir / "root.crt")[0]) == fingerprint(new_root)
    # --sign answers a CSR the way a CA does
    assert cli_main(["lab", "ca", "--dir", str(ca_dir), "--sign", str(first.work.csr)]) == 0
    assert (ca_dir / "signed" / "RootCA.crt").read_bytes() == (ca_dir / "root.crt").read_bytes()

    values = {
        "change_id": "CHG-trust",
        "common_name": "db1.lab.pgtls.test",
        "server_host": "127.0.0.1",
        "server_port": one_cluster.port,
        "client_system_users": [own_client_user],
        "add_roots": [str(ca_dir / "root.crt")],
        "apply": True,
    }
    params_file = write_params(tmp_path / "trust.yaml", **values)
    records, work = tmp_path / "records", tmp_path / "work"
    code = cli_main(
        ["trust", str(params_file), "--records", str(records), "--work", str(work), "--no-progress"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "pgtls trust: change CHG-trust" in out and "pgtls run:" not in out, out
    (record,) = [p for p in (records / "CHG-trust").iterdir() if p.is_dir()]
    assert (records / "CHG-trust" / "index.html").is_file()  # the change's index of runs
    m = json.loads((record / "manifest.json").read_text())
    assert m["outcome"] == "ok" and m["verdict"] == "pass"
    assert [s["step"] for s in m["steps"]] == ["client_trust"]
    assert (record / "client_trust.html").read_text().lstrip().lower().startswith("<!doctype")
    import nbformat

    for cell in nbformat.read(record / "client_trust.ipynb", as_version=4).cells:
        for out in cell.get("outputs", []):
            assert out["output_type"] not in ("error", "stream"), out
    assert m["kind"] == "trust" and m["trust_added"][0]["sha256"] == fingerprint(new_root)
    # the record lists the root.crt it replaced; it never says no file was written
    (written,) = [f for f in m["files"] if f["action"] in ("create", "replace")]
    assert written["target"].endswith("/.postgresql/root.crt") and written["kind"] == "root.crt"
    (index,) = read_in_chromium(record / "index.html")
    assert written["target"] in " ".join(index.split()).replace(" /", "/")
    assert "No file was written" not in index and "no change" not in index
    assert "Roots added to root.crt" in index and fingerprint(new_root)[:16] in index
    assert "record format 3" in index
    assert all(c["passed"] for c in m["checks"])
    (user,) = resolve_client_users([own_client_user])
    assert {fingerprint(c) for c in read_roots(user.root_crt)} == {
        fingerprint(read_roots(first.work.root)[0]),
        fingerprint(new_root),
    }
    assert_no_secrets(record, one_cluster.password())

    # the back-out plan of a client-trust change is the same command as a server change's
    argv = ["rollback", str(params_file), "--work", str(work), "--records", str(records)]
    assert cli_main(argv) == 0
    said = capsys.readouterr().out
    assert f"restored from its backup: {user.root_crt} (from {work / 'CHG-trust'}" in said, said
    # it is recorded next to the change's runs, and says so, like a server rollback
    rolled = [p for p in (records / "CHG-trust").iterdir() if p.is_dir() and p != record]
    (back,) = rolled
    assert said.rstrip().endswith(f"record: {back / 'index.html'}"), said
    rm = json.loads((back / "manifest.json").read_text())
    assert rm["kind"] == "rollback" and rm["outcome"] == "ok"
    assert [(f["target"], f["done"]) for f in rm["backout"]] == [(str(user.root_crt), True)]
    assert "nothing was reloaded (a client-trust change)" in said
    # no backup is left in the user's own directory
    assert not list(user.root_crt.parent.glob("*pgtls-backup*"))
    assert [fingerprint(c) for c in read_roots(user.root_crt)] == [
        fingerprint(read_roots(first.work.root)[0])
    ]

    # nothing to add or remove: one sentence, exit 2, no record
    bad = write_params(tmp_path / "bad.yaml", **{**values, "add_roots": [], "change_id": "X"})
    assert cli_main(["trust", str(bad), "--records", str(records), "--work", str(work)]) == 2
    assert "add_roots and remove_roots are both empty" in capsys.readouterr().err
    assert not (records / "X").exists()


def test_a_renewal_run_records_served_before_and_after_and_the_client_loop(
    one_cluster: LabCluster, runbook_params: ParamsFactory, tmp_path: Path
) -> None:
    from record_checks import params_for, run_into

    from pgtls_helpers.postgres.probe import probe

    first = runbook_params(one_cluster, change_id="CHG-first")
    runbook.step1_key_and_csr(first)
    runbook.step2_ca_response(first)
    runbook.step3_install_files(first)
    runbook.step4_enable_ssl(first)
    old = fingerprint(probe("127.0.0.1", one_cluster.port).chain[0])
    values = params_for(one_cluster, change_id="CHG-renew")
    outcome = run_into(tmp_path, write_params(tmp_path / "renew.yaml", **values))
    assert outcome.exit_code == 0, outcome.summary()
    m = outcome.manifest
    renewal = m["renewal"]
    assert renewal["kind"] == "renewal"
    assert renewal["served_before"] == old
    assert renewal["served_after"] == m["certificates"][0]["sha256"] != old
    assert outcome.record.leaf is not None and (outcome.record.leaf.days_left() or 0) > 300
    assert renewal["loop"]["connections"] >= 200 and renewal["loop"]["failed"] == 0
    # the summary page a reviewer opens first says which kind of change, and the loop's count
    (index,) = read_in_chromium(outcome.record_dir / "index.html")
    assert "Renewal: renewal" in index and "Certificate installed" in index
    assert f"{renewal['loop']['connections']} connections, 0 failed" in index
    assert "throwaway lab cluster" not in index  # the change ran on a server of its own
    assert f"connected {renewal['loop']['connections']} times through the reload, 0 failed" in (
        outcome.summary()
    )
    html = (outcome.record_dir / "03_install_files.html").read_text()
    assert "Served now" in html and "Will be served" in html
    assert (
        "verify-full connections across the reload"
        in (outcome.record_dir / "04_enable_ssl.html").read_text()
    )


def test_the_client_trust_notebook_follows_the_runbook_conventions() -> None:
    import ast
    import re

    import nbformat

    from pgtls_helpers.runbook.params import PARAMETER_NAMES

    nb = nbformat.read(
        Path(__file__).resolve().parents[2] / "notebooks" / "client_trust.ipynb", as_version=4
    )
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].metadata.get("tags") == ["parameters"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    declared = re.findall(r"^(\w+): [^=]+ = .+  # \S", code[0].source, flags=re.M)
    assert set(declared) == set(PARAMETER_NAMES)
    assert "pgtls.notebook_params(globals())" in code[1].source
    for cell in code[2:]:
        assert 1 <= len(ast.parse(cell.source).body) <= 2, cell.source
