"""``ca_mode: acme`` against a real Pebble (the ACME test server of the Let's Encrypt project)
started here, with its DNS answered by pebble-challtestsrv, so Pebble's own validation
connects to this host's http-01 answer: an order placed, validated and finalized for a CSR,
then one ``pgtls run`` from key to proven TLS, and Pebble down leaving the server untouched."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from certfactory import csr_for
from support import skip_or_fail

from pgtls_helpers.ca import CaUnavailable, SignRequest, backend_for
from pgtls_helpers.cli import main as cli_main
from pgtls_helpers.errors import PgtlsError
from pgtls_helpers.lab import LabCluster
from pgtls_helpers.lab.cas import LabPebble, free_port
from pgtls_helpers.lab.cas import pebble as start_pebble
from pgtls_helpers.pki.chain import order_chain
from pgtls_helpers.pki.intake import read_ca_response


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabPebble]:
    try:
        with start_pebble(tmp_path_factory.mktemp("pebble")) as server:
            yield server
    except PgtlsError as exc:
        skip_or_fail(str(exc))


def test_pebble_validates_the_http01_answer_and_issues_a_chain_to_its_root(
    pebble: LabPebble, tmp_path: Path
) -> None:
    key, csr = csr_for("db1.lab.pgtls.test", ["db1.lab.pgtls.test", "127.0.0.1"])
    ca = backend_for("acme", pebble.settings, "p.yaml")
    request = SignRequest(csr, "db1.lab.pgtls.test", ("127.0.0.1",), "C", state_dir=tmp_path)
    signed = ca.sign(request, tmp_path / "answer")
    assert signed.ca == f"acme {pebble.settings['directory']}"
    assert (signed.reference or "").startswith("order https://127.0.0.1:")
    account = tmp_path / "acme-account.key"
    assert account.stat().st_mode & 0o777 == 0o600
    certs = [s.cert for s in read_ca_response(list(signed.files)).certificates]
    leaf = next(c for c in certs if c.public_key() == key.public_key())
    chain = order_chain(certs, leaf=leaf)
    assert chain.complete and chain.root is not None
    # a second order with the same account key finds its account, and is issued too
    _, again = csr_for("db2.lab.pgtls.test", ["db2.lab.pgtls.test"])
    ca.sign(SignRequest(again, "db2.lab.pgtls.test", (), "C", state_dir=tmp_path), tmp_path / "b")
    # the account key never reaches the answer's files
    for path in signed.files:
        assert b"PRIVATE KEY" not in path.read_bytes()


def test_pebble_down_is_unavailable(pebble: LabPebble, tmp_path: Path) -> None:
    _, csr = csr_for("db1.lab.pgtls.test", ["db1.lab.pgtls.test"])
    down = {**pebble.settings, "directory": f"https://127.0.0.1:{free_port()}/dir"}
    with pytest.raises(CaUnavailable, match="is not reachable .*run again later"):
        backend_for("acme", down, "p").sign(
            SignRequest(csr, "db1.lab.pgtls.test", (), "C", state_dir=tmp_path), tmp_path / "a"
        )


def test_one_run_from_key_to_proven_tls_with_pebble(
    pebble: LabPebble,
    fresh_cluster: LabCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PGPASSFILE", str(fresh_cluster.passfile))
    values = fresh_cluster.runbook_values(
        "CHG-acme", ca_mode="acme", ca_settings=pebble.settings, subject_alt_names=["127.0.0.1"]
    )
    params = tmp_path / "acme.yaml"
    params.write_text(yaml.safe_dump(values, sort_keys=False))
    records = tmp_path / "records"
    argv = ["run", str(params), "--records", str(records), "--work", str(tmp_path / "work")]
    code = cli_main([*argv, "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "signed by acme https://127.0.0.1:" in out and "verdict: pass" in out, out
    (manifest,) = (records / "CHG-acme").glob("*/manifest.json")
    m = json.loads(manifest.read_text())
    assert m["verdict"] == "pass" and (m["ca_reference"] or "").startswith("order ")
