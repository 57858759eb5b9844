"""Steps c4 and c5 on real clusters that serve TLS: the server trusts the client roots, the
``cert`` and ``clientcert=verify-full`` lines and the maps go live, each client logs in as its
own OS user with its certificate, and the must-fail checks fail each for its reason."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import certfactory
import psycopg
import pytest
from certfactory import CLIENT_AUTH, Issued
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pgtls_helpers import notebook as runbook
from pgtls_helpers.errors import PgtlsError, PreflightError, ServerError
from pgtls_helpers.lab import LabCA, LabCluster
from pgtls_helpers.postgres import ident
from pgtls_helpers.runbook import client_proof, client_roots, client_server
from pgtls_helpers.runbook.client_keys import (
    step_c1_client_keys,
    step_c2_client_certs,
    step_c3_install_clients,
)
from pgtls_helpers.runbook.params import Params
from pgtls_helpers.runbook.rollback import rollback_change

ParamsFactory = Callable[..., Params]
ADDR = "127.0.0.1/32"


# ----------------------------------------------------------------------------- helpers


def _serve_tls(cluster: LabCluster, runbook_params: ParamsFactory, **kw: object) -> Params:
    """The server runbook's change, so the cluster serves the lab chain over TLS."""
    params = runbook_params(cluster, change_id="CHG-first", **kw)
    runbook.step1_key_and_csr(params)
    runbook.step2_ca_response(params)
    runbook.step3_install_files(params)
    runbook.step4_enable_ssl(params)
    assert runbook.step5_verify_clients(params).passed
    return params


def _lab_issuer(first: Params) -> tuple[Issued, tuple[x509.Certificate, ...], x509.Certificate]:
    """The lab CA of the work directory as an issuer of client certificates."""
    ca = LabCA.load(first.work.shared_lab_ca)
    key = serialization.load_pem_private_key(
        (first.work.shared_lab_ca / "signer.key").read_bytes(), None
    )
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return Issued(cert=ca.signer, key=key), ca.intermediates, ca.root


def _own_ca() -> tuple[Issued, tuple[x509.Certificate, ...], x509.Certificate]:
    """A client CA of its own: root → intermediate."""
    root = certfactory.make_ca("Client Root CA")
    inter = certfactory.make_ca("Client Issuing CA", issuer=root)
    return inter, (inter.cert,), root.cert


def _place(
    os_user: str,
    subject: str,
    issuer: tuple[Issued, tuple[x509.Certificate, ...], x509.Certificate],
    server_root: Path,
) -> x509.Certificate:
    """What step c3 leaves: ``~/.postgresql/`` with root.crt, postgresql.crt (leaf and
    intermediates) and postgresql.key, the user's own."""
    signer, inters, _root = issuer
    leaf = certfactory.issue(
        x509.Name.from_rfc4514_string(subject), issuer=signer, eku=[CLIENT_AUTH]
    )
    entry = pwd.getpwnam(os_user)
    home = Path(entry.pw_dir) / ".postgresql"
    home.mkdir(mode=0o700, exist_ok=True)
    items = (
        ("root.crt", server_root.read_bytes(), 0o644),
        ("postgresql.crt", certfactory.pem(leaf.cert, *inters), 0o644),
        ("postgresql.key", leaf.key_pem(), 0o600),
    )
    for name, data, mode in items:
        path = home / name
        path.write_bytes(data)
        os.chmod(path, mode)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    os.chown(home, entry.pw_uid, entry.pw_gid)
    return leaf.cert


def _roots(params: Params, *roots: x509.Certificate) -> None:
    """What step c2 leaves: the distinct client roots in the work directory."""
    out = params.work.path / "clients"
    out.mkdir(parents=True, exist_ok=True)
    (out / "roots.pem").write_bytes(certfactory.pem(*roots))


def _roles(cluster: LabCluster, *names: str) -> None:
    with psycopg.connect(**cluster.conninfo(sslmode="require"), autocommit=True) as conn:  # type: ignore[arg-type]
        for name in names:
            conn.execute(f'CREATE ROLE "{name}" LOGIN')


def _files(cluster: LabCluster) -> dict[str, str]:
    """Every configuration and TLS file of the data directory, by hash."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(cluster.pgdata.iterdir())
        if p.is_file() and p.suffix in (".conf", ".crt", ".key")
    }


@pytest.fixture
def os_users() -> Iterator[list[str]]:
    """Three client OS users of this test alone."""
    if os.geteuid() != 0:
        pytest.skip("creating client OS users needs root")
    names = [f"pgtls_cs{os.getpid()}_{i}" for i in range(3)]
    for name in names:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
    try:
        yield names
    finally:
        for name in names:
            subprocess.run(["userdel", "--remove", name], check=False, capture_output=True)


def _rule(user: str, method: str, *options: str) -> dict[str, object]:
    return {
        "type": "hostssl",
        "database": "postgres",
        "user": user,
        "address": ADDR,
        "method": method,
        "options": list(options),
    }


# ----------------------------------------------------------------------------- tests


def test_the_dn_preview_is_what_openssl_prints_in_rfc2253(tmp_path: Path) -> None:
    subject = x509.Name.from_rfc4514_string(r"CN=al\,ice,OU=d b+UID=7,O=Exämple,C=DE")
    cert = certfactory.issue(subject)
    path = certfactory.write_pem(tmp_path / "c.crt", cert)
    out = subprocess.run(
        ["openssl", "x509", "-in", str(path), "-noout", "-subject", "-nameopt", "RFC2253"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == "subject=" + ident.server_dn(cert.cert.subject)
    assert ident.stat_ssl_dn(cert.cert.subject).startswith("/C=DE/O=")


def test_cert_lines_with_and_without_a_map_and_clientcert_prove_and_roll_back(
    fresh_cluster: LabCluster,
    runbook_params: ParamsFactory,
    os_users: list[str],
) -> None:
    first = _serve_tls(fresh_cluster, runbook_params)
    u_alice, u_bob, u_carol = os_users
    _roles(fresh_cluster, "alice", "bob")
    fresh_cluster.add_client_login(u_carol)  # a role of its own with a password in ~/.pgpass
    issuer = _lab_issuer(first)
    certs = {
        u_alice: _place(u_alice, "CN=alice,OU=dba,O=Example", issuer, first.work.root),
        u_bob: _place(u_bob, "CN=bob", issuer, first.work.root),
        u_carol: _place(u_carol, f"CN={u_carol}", issuer, first.work.root),
    }
    before = _files(fresh_cluster)
    auto_before = (fresh_cluster.pgdata / "postgresql.auto.conf").read_bytes()
    hba_before = (fresh_cluster.pgdata / "pg_hba.conf").read_bytes()
    ident_before = (fresh_cluster.pgdata / "pg_ident.conf").read_bytes()
    record = first.work.path.parent / "record"
    values: dict[str, object] = dict(
        change_id="CHG-clients",
        record_dir=str(record),
        clients=[
            {"os_user": u_alice, "role": "alice", "subject": "CN=alice,OU=dba,O=Example"},
            {"os_user": u_bob, "role": "bob"},
            {"os_user": u_carol, "role": u_carol},
        ],
        ident_maps=[{"map": "dnmap", "system_user": "CN=alice,OU=dba,O=Example", "role": "alice"}],
        hba_rules=[
            _rule("alice", "cert", "clientname=DN", "map=dnmap"),
            _rule("bob", "cert"),
            _rule(u_carol, "scram-sha-256", "clientcert=verify-full"),
        ],
    )
    params = runbook_params(fresh_cluster, **values)
    _roots(params, issuer[2])

    planned = client_server.step_c4_server_trust(
        runbook_params(fresh_cluster, **{**values, "apply": False})
    )
    assert _files(fresh_cluster) == before  # a plan writes nothing
    assert planned.settings_planned == [
        {"name": "ssl_ca_file", "before": "", "after": "client_ca.crt"}
    ]
    alice = next(c for c in planned.clients if c["os_user"] == u_alice)
    assert alice["system_user"] == "CN=alice,OU=dba,O=Example"
    assert alice["stat_ssl_dn"] == "/O=Example/OU=dba/CN=alice" and alice["from_certificate"]

    result = client_server.step_c4_server_trust(params)
    assert result.hba_written and result.settings_applied and result.changed
    assert 'dnmap           "CN=alice,OU=dba,O=Example" alice' in result.ident_added
    assert [r["subject"] for r in result.roots_after] == [
        issuer[2].subject.rfc4514_string()
    ] and result.roots_before == []
    summary = json.loads((record / "steps" / "c4_server_trust.json").read_text())
    assert {"installed", "planned_files", "hba_diff", "ident_diff", "roots_after"} <= set(summary)
    assert (fresh_cluster.pgdata / "client_ca.crt").exists()
    # from outside: the server now asks for a client certificate and names the client root
    asked = client_roots.asked_ca_names("127.0.0.1", fresh_cluster.port)
    assert asked == [ident.server_dn(issuer[2].subject)]
    hba_text = (fresh_cluster.pgdata / "pg_hba.conf").read_text()
    assert hba_text.index("cert clientname=DN map=dnmap") < hba_text.index(
        "all             127.0.0.1/32            scram-sha-256"
    )

    proof = client_proof.step_c5_verify_clients(params)
    assert proof.verdict == "pass", [c for c in proof.checks if not c.passed]
    assert len(proof.checks) == 15  # per client: its login and four must-fail checks
    by = {(c.os_user, c.case): c for c in proof.checks}
    assert by[(u_alice, "no client certificate")].detail.find(client_proof.NO_CERTIFICATE) >= 0
    assert "tlsv1 alert unknown ca" in by[(u_bob, "a certificate of an unrelated CA")].detail
    server_only = "a certificate for servers only (serverAuth, no clientAuth)"
    assert "sslv3 alert unsupported certificate" in by[(u_carol, server_only)].detail
    assert "certificate authentication failed for user" in (
        by[(u_alice, "its own certificate as role bob")].detail
    )
    for session in proof.sessions:
        cert = certs[str(session["os_user"])]
        assert session["client_dn"] == ident.stat_ssl_dn(cert.subject)
        assert session["client_serial"] == str(cert.serial_number)
    assert any(s["client_dn"] == "/O=Example/OU=dba/CN=alice" for s in proof.sessions)
    manifest = json.loads((record / "steps" / "c5_verify_clients.json").read_text())
    assert manifest["verdict"] == "pass"
    assert set(manifest["checks"][0]) >= {"check", "expect", "observed", "passed", "detail"}
    assert manifest["checks"][0]["check"].startswith(f"{u_alice} as alice: ")

    # a second run finds nothing to change
    again = client_server.step_c4_server_trust(params)
    assert not again.changed and again.installed == []

    rollback_change(params)
    assert (fresh_cluster.pgdata / "pg_hba.conf").read_bytes() == hba_before
    assert (fresh_cluster.pgdata / "pg_ident.conf").read_bytes() == ident_before
    assert (fresh_cluster.pgdata / "postgresql.auto.conf").read_bytes() == auto_before
    assert not (fresh_cluster.pgdata / "client_ca.crt").exists()
    assert _files(fresh_cluster) == before
    assert client_roots.asked_ca_names("127.0.0.1", fresh_cluster.port) == []


def test_an_existing_ssl_ca_file_is_merged_not_replaced_and_rolled_back_exactly(
    fresh_cluster: LabCluster,
    runbook_params: ParamsFactory,
    own_client_user: str,
) -> None:
    _serve_tls(fresh_cluster, runbook_params)
    other = certfactory.make_ca("Root the server trusted before")
    bundle = fresh_cluster.pgdata / "trusted.crt"
    old_bytes = b"# kept as it is\n" + certfactory.pem(other.cert)
    bundle.write_bytes(old_bytes)
    owner = fresh_cluster.pgdata.stat()
    os.chown(bundle, owner.st_uid, owner.st_gid)
    with psycopg.connect(**fresh_cluster.conninfo(sslmode="require"), autocommit=True) as conn:  # type: ignore[arg-type]
        conn.execute("ALTER SYSTEM SET ssl_ca_file = 'trusted.crt'")
        conn.execute("SELECT pg_reload_conf()")
    auto_before = (fresh_cluster.pgdata / "postgresql.auto.conf").read_bytes()
    _roles(fresh_cluster, "dave")
    issuer = _own_ca()
    first_root = Path(runbook_params(fresh_cluster, change_id="CHG-first").work.root)
    _place(own_client_user, "CN=dave", issuer, first_root)
    params = runbook_params(
        fresh_cluster,
        change_id="CHG-merge",
        clients=[{"os_user": own_client_user, "role": "dave"}],
        hba_rules=[_rule("dave", "cert")],
    )
    _roots(params, issuer[2], issuer[2])  # the same root twice: deduplicated
    result = client_server.step_c4_server_trust(params)
    assert [r["subject"] for r in result.roots_before] == [other.cert.subject.rfc4514_string()]
    assert [r["subject"] for r in result.roots_after] == [
        other.cert.subject.rfc4514_string(),
        issuer[2].subject.rfc4514_string(),
    ]
    assert result.settings_planned == [] and not result.settings_applied
    assert client_roots.asked_ca_names("127.0.0.1", fresh_cluster.port) == [
        ident.server_dn(other.cert.subject),
        ident.server_dn(issuer[2].subject),
    ]
    merged = bundle.read_bytes()
    assert merged.startswith(old_bytes) and merged.count(b"BEGIN CERTIFICATE") == 2
    proof = client_proof.step_c5_verify_clients(params)
    assert proof.passed, [c for c in proof.checks if not c.passed]
    assert any("serverAuth-only check" in m for m in proof.messages)  # no lab CA at hand
    rollback_change(params)
    assert bundle.read_bytes() == old_bytes
    assert (fresh_cluster.pgdata / "postgresql.auto.conf").read_bytes() == auto_before


def test_refused_plans_leave_every_file_byte_identical(
    fresh_cluster: LabCluster,
    runbook_params: ParamsFactory,
    own_client_user: str,
) -> None:
    plain = runbook_params(
        fresh_cluster,
        change_id="CHG-early",
        clients=[{"os_user": own_client_user, "role": "erin"}],
        hba_rules=[_rule("erin", "cert")],
    )
    with pytest.raises(PreflightError, match="run the server runbook first"):
        client_server.step_c4_server_trust(plain)
    first = _serve_tls(fresh_cluster, runbook_params)
    _roles(fresh_cluster, "erin")
    issuer = _own_ca()
    _place(own_client_user, "CN=erin,O=Example", issuer, first.work.root)
    before = _files(fresh_cluster)
    general = {
        "type": "hostssl",
        "database": "all",
        "user": "all",
        "address": ADDR,
        "method": "scram-sha-256",
    }
    cases: list[tuple[dict[str, object], str]] = [
        ({"hba_rules": [_rule("erin", "cert", "clientcert=1")]}, "removed in PostgreSQL 14"),
        (
            {"hba_rules": [{**general, "method": "cert"}]},
            "lock out the runbook's own connection",
        ),
        ({"hba_rules": [general, _rule("erin", "cert")]}, "would not reach"),
        ({"hba_rules": [_rule("erin", "cert", "map=m1")]}, "has no line mapping it"),
        ({"hba_rules": [_rule("erin", "cert", "clientname=DN")]}, "needs it to be the role erin"),
        (
            {
                "hba_rules": [_rule("erin", "cert", "map=m1")],
                "ident_maps": [{"map": "m1", "system_user": "/O=Example/CN=erin", "role": "erin"}],
            },
            "regular expression",
        ),
        (
            {
                "hba_rules": [_rule("erin", "cert", "map=m1")],
                "ident_maps": [
                    {"map": "m1", "system_user": "erin", "role": "erin"},
                    {"map": "m2", "system_user": "/(", "role": "erin"},
                ],
            },
            "the server would reject line",  # the throwaway backend's verdict on the regex
        ),
    ]
    for n, (overrides, message) in enumerate(cases):
        params = runbook_params(
            fresh_cluster,
            change_id=f"CHG-refused-{n}",
            clients=[{"os_user": own_client_user, "role": "erin"}],
            **overrides,
        )
        _roots(params, issuer[2])
        with pytest.raises(PgtlsError, match=message):
            client_server.step_c4_server_trust(params)
        assert _files(fresh_cluster) == before, overrides
        assert not params.work.journal.exists()


def test_a_failed_client_check_undoes_the_change_and_says_which(
    fresh_cluster: LabCluster,
    runbook_params: ParamsFactory,
    own_client_user: str,
) -> None:
    first = _serve_tls(fresh_cluster, runbook_params)
    _roles(fresh_cluster, "frank")
    issuer = _own_ca()
    _place(own_client_user, "CN=frank", issuer, first.work.root)
    before = _files(fresh_cluster)
    params = runbook_params(
        fresh_cluster,
        change_id="CHG-fails",
        clients=[{"os_user": own_client_user, "role": "frank"}],
        hba_rules=[_rule("frank", "cert")],
    )
    _roots(params, issuer[2])
    client_server.step_c4_server_trust(params)
    assert _files(fresh_cluster) != before
    # the client's certificate now names someone else: its own login must fail
    _place(own_client_user, "CN=mallory", issuer, first.work.root)
    with pytest.raises(ServerError, match="1 of 3 client checks failed") as err:
        client_proof.step_c5_verify_clients(params)
    assert "steps c3 and c4 were undone" in str(err.value)
    assert "got 'certificate authentication failed for user \"frank\"'" in str(err.value)
    assert _files(fresh_cluster) == before
    assert not params.work.journal.exists()


def test_the_whole_client_runbook_in_the_lab_then_rolled_back(
    fresh_cluster: LabCluster,
    runbook_params: ParamsFactory,
    os_users: list[str],
) -> None:
    u_gina, u_hal, _unused = os_users
    _serve_tls(fresh_cluster, runbook_params, client_system_users=[u_gina, u_hal])
    _roles(fresh_cluster, "gina", "hal")
    before = _files(fresh_cluster)
    params = runbook_params(
        fresh_cluster,
        change_id="CHG-lab-clients",
        clients=[
            {"os_user": u_gina, "role": "gina", "subject": "CN=gina,OU=ops,O=Example"},
            {"os_user": u_hal, "role": "hal"},
        ],
        ident_maps=[
            {"map": "ops", "system_user": "gina", "role": "gina"},
            {"map": "rx", "system_user": "/^(h[a-z]+)$", "role": "\\1"},  # a regex map
        ],
        hba_rules=[_rule("gina", "cert", "map=ops"), _rule("hal", "cert", "map=rx")],
    )
    step_c1_client_keys(params)
    step_c2_client_certs(params)
    step_c3_install_clients(params)
    trust = client_server.step_c4_server_trust(params)
    assert trust.changed and [c["system_user"] for c in trust.clients] == ["gina", "hal"]
    proof = client_proof.step_c5_verify_clients(params)
    assert proof.passed and len(proof.checks) == 10, [c for c in proof.checks if not c.passed]
    assert {s["client_dn"] for s in proof.sessions} == {"/O=Example/OU=ops/CN=gina", "/CN=hal"}
    rollback_change(params)
    assert _files(fresh_cluster) == before
    gina_home = Path(pwd.getpwnam(u_gina).pw_dir) / ".postgresql"
    assert not (gina_home / "postgresql.crt").exists()


def test_a_c4_stopped_after_its_last_write_rolls_back_byte_for_byte(
    fresh_cluster: LabCluster,
    runbook_params: ParamsFactory,
    own_client_user: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = _serve_tls(fresh_cluster, runbook_params)
    _roles(fresh_cluster, "ivy")
    issuer = _own_ca()
    _place(own_client_user, "CN=ivy,O=Example", issuer, first.work.root)
    names = ("pg_hba.conf", "pg_ident.conf", "postgresql.auto.conf")
    before = {n: (fresh_cluster.pgdata / n).read_bytes() for n in names}
    params = runbook_params(
        fresh_cluster,
        change_id="CHG-stopped",
        clients=[{"os_user": own_client_user, "role": "ivy"}],
        ident_maps=[{"map": "m", "system_user": "CN=ivy,O=Example", "role": "ivy"}],
        hba_rules=[_rule("ivy", "cert", "clientname=DN", "map=m")],
    )
    _roots(params, issuer[2])
    monkeypatch.setenv("PGTLS_FAULT_AFTER", f"{client_server.JOURNAL_STEP}:auto.conf")
    monkeypatch.setenv("PGTLS_FAULT_SIGNAL", "INT")  # as Ctrl-C would, after ALTER SYSTEM
    with pytest.raises(KeyboardInterrupt):
        client_server.step_c4_server_trust(params)
    monkeypatch.delenv("PGTLS_FAULT_AFTER")
    assert all((fresh_cluster.pgdata / n).read_bytes() != before[n] for n in names)
    assert (fresh_cluster.pgdata / "client_ca.crt").exists()
    rollback_change(params)
    assert {n: (fresh_cluster.pgdata / n).read_bytes() for n in names} == before
    assert not (fresh_cluster.pgdata / "client_ca.crt").exists()
    with psycopg.connect(**fresh_cluster.conninfo(sslmode="require"), autocommit=True) as conn:  # type: ignore[arg-type]
        assert conn.execute("SHOW ssl_ca_file").fetchone() == ("",)
