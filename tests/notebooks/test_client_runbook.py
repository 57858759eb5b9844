"""``pgtls clients`` end to end, through the runner: two client OS users get CA-signed client
certificates (one by CN, one by a DN and a pg_ident.conf map, the DN changed in step c1's form),
the server trusts their CA, each logs in with its certificate alone, the record says so in
Chromium, with the subjects used and where they came from, and a rollback puts every server and
client file back byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from record_checks import params_for, read_in_chromium, run_into, write_params

from pgtls_helpers import notebook as pgtls
from pgtls_helpers.cli import main as cli_main
from pgtls_helpers.lab import LabCluster
from pgtls_helpers.runbook.params import load_params


@pytest.fixture
def one_cluster() -> Iterator[LabCluster]:
    """A cluster of the first major: the runbook's server side runs on every major in
    tests/integration/test_client_server.py."""
    from conftest import PG_MAJORS, _bindir_or_skip

    cluster = LabCluster.create(bindir=_bindir_or_skip(PG_MAJORS[0]))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def two_users() -> Iterator[tuple[str, str]]:
    if os.geteuid() != 0:
        pytest.skip("client OS users need root")
    names = (f"pgtls_ca{os.getpid()}", f"pgtls_cb{os.getpid()}")
    for name in names:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
    try:
        yield names
    finally:
        for name in names:
            subprocess.run(["userdel", "--remove", name], check=False, capture_output=True)


GIVEN_DN = "CN=bob,OU=dba,O=Example"  # bob's subject in the parameters file
USED_DN = "CN=bob,OU=ops,O=Example"  # and as step c1's form changed it
SAID = "the parameters file says clients [^.]*?"  # where a page says what was not used


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _state(cluster: LabCluster, users: tuple[str, ...]) -> dict[str, object]:
    """Every file the client runbook may change, by its hash, and the settings."""
    with psycopg.connect(**cluster.conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        show = {
            n: conn.execute(f"SHOW {n}").fetchone()[0]  # type: ignore[index]
            for n in ("ssl_ca_file", "hba_file", "ident_file", "data_directory")
        }
    data = Path(str(show["data_directory"]))
    out: dict[str, object] = dict(show)
    for path in (Path(str(show["hba_file"])), Path(str(show["ident_file"]))):
        out[str(path)] = _sha(path)
    out["auto.conf"] = _sha(data / "postgresql.auto.conf")
    out["data files"] = sorted(p.name for p in data.iterdir())
    for user in users:
        home = Path(pwd.getpwnam(user).pw_dir) / ".postgresql"
        out[user] = {p.name: _sha(p) for p in sorted(home.iterdir())} if home.is_dir() else None
    return out


def test_two_clients_log_in_with_their_certificates_and_the_rollback_puts_it_all_back(
    one_cluster: LabCluster,
    two_users: tuple[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    alice, bob = two_users
    monkeypatch.setenv("PGPASSFILE", str(one_cluster.passfile))
    # the server serves TLS first (the server runbook), and the clients trust its root
    server = run_into(
        tmp_path,
        write_params(
            tmp_path / "server.yaml",
            **params_for(one_cluster, change_id="CHG-server", client_system_users=[alice, bob]),
        ),
    )
    assert server.exit_code == 0, server.summary()
    with psycopg.connect(**one_cluster.conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        conn.execute(f'CREATE ROLE "{alice}" LOGIN')
        conn.execute('CREATE ROLE "bob_db" LOGIN')
    before = _state(one_cluster, two_users)
    rule = {"type": "hostssl", "database": "all", "address": "127.0.0.1/32", "method": "cert"}
    values = params_for(
        one_cluster,
        change_id="CHG-clients",
        clients=[
            {"os_user": alice, "role": alice},
            {"os_user": bob, "role": "bob_db", "subject": GIVEN_DN},
        ],
        ident_maps=[{"map": "certmap", "system_user": "bob", "role": "bob_db"}],
        hba_rules=[
            {**rule, "user": alice},
            {**rule, "user": "bob_db", "options": ["map=certmap"]},
        ],
        client_driver_files=["pk8"],
    )
    params_file = write_params(tmp_path / "clients.yaml", **values)
    records, work = tmp_path / "records", tmp_path / "work"
    # in step c1's form the DBA gives bob another DN (the same CN, so the same map line); the
    # headless run below uses it, and its record must say so
    form = pgtls.client_form(load_params({**values, "work_dir": str(work)}, source="test"))
    form.rows[1].dn.value = USED_DN
    form.button.click()
    saved = work / "CHG-clients" / "client_subjects.json"
    assert "the next cells use these values" in form.status.value and saved.is_file()
    code = cli_main(
        ["clients", str(params_file), "--records", str(records), "--work", str(work)]
        + ["--no-progress"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "pgtls clients: change CHG-clients" in out and "verdict: pass" in out, out
    assert f"clients and ident_maps: from the c1 form ({saved}), not the parameters file" in out
    (record,) = [p for p in (records / "CHG-clients").iterdir() if p.is_dir()]
    m = json.loads((record / "manifest.json").read_text())
    assert m["kind"] == "clients" and m["outcome"] == "ok" and m["verdict"] == "pass"
    assert [s["status"] for s in m["steps"]] == ["ok"] * 5
    # the manifest: the subjects used, their source, and what the parameters file said
    used = m["clients_used"]
    assert used["saved_in"] == str(saved)
    assert [c["subject"] for c in used["clients"]] == [f"CN={alice}", USED_DN]
    assert [c["subject"] for c in used["parameters_clients"]] == [f"CN={alice}", GIVEN_DN]
    assert used["ident_maps"] == [{"map": "certmap", "system_user": "bob", "role": "bob_db"}]
    assert [c["subject"] for c in m["client_certificates"]] == [f"CN={alice}", USED_DN]
    kinds = {f["kind"] for f in m["files"] if f["action"] in ("create", "replace")}
    assert {"client.crt", "client.key", "hba", "ident"} <= kinds, kinds
    for user in two_users:
        home = Path(pwd.getpwnam(user).pw_dir) / ".postgresql"
        key = home / "postgresql.key"
        assert (
            key.stat().st_mode & 0o777 == 0o600 and key.stat().st_uid == pwd.getpwnam(user).pw_uid
        )
        assert (home / "postgresql.crt").is_file() and (home / "postgresql.pk8").is_file()
    # what a reviewer reads: the kind, each client file written, the logins proven
    steps = [record / f"{s['step']}.html" for s in m["steps"]]
    index, *pages = read_in_chromium(record / "index.html", *steps)
    assert "CHG-clients · clients" in index and "verdict: pass" in index
    assert "postgresql.crt" in index and "pg_ident.conf" in index
    # every page names the subject used and its source; the parameters file's DN appears
    # only where it is said to be the parameters file's, not used
    for page in [index, *pages]:
        assert f"from the c1 form ({saved}), not the parameters file" in page, page
        assert USED_DN in page, page
        assert GIVEN_DN in page, page
        assert GIVEN_DN not in re.sub(SAID + re.escape(GIVEN_DN), "", page), page
    # the rollback puts every server and client file back, byte for byte
    code = cli_main(["rollback", str(params_file), "--records", str(records), "--work", str(work)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert _state(one_cluster, two_users) == before


def test_the_client_demo_runs_both_runbooks_and_leaves_only_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("the client demo makes a client OS user, which needs root")
    records = tmp_path / "records"
    code = cli_main(
        ["lab", "demo-clients", "--dir", str(tmp_path / "lab"), "--records", str(records)]
        + ["--work", str(tmp_path / "work")]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count("verdict: pass") == 2, out
    for change in ("lab-clients-server", "lab-clients"):
        (manifest,) = (records / change).glob("*/manifest.json")
        assert json.loads(manifest.read_text())["verdict"] == "pass"
    user = out.split("client OS user ")[1].split()[0]
    with pytest.raises(KeyError):
        pwd.getpwnam(user)
    assert {p.name for p in (tmp_path / "lab").iterdir()} == {"server.yaml", "clients.yaml"}
