"""``client_crl_file`` on real clusters: step c4 installs the client CAs' CRLs as the server's
``ssl_crl_file`` (journaled, rolled back byte for byte with the setting), step c5 proves that the
client the CRL revokes is refused while the others log in, and the CRLs that would break logins
(stale, of an unrelated CA, missing a CA of the chain) are refused before any write."""

from __future__ import annotations

import hashlib
import os
import pwd
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import certfactory
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from support import skip_or_fail

from pgtls_helpers import notebook as runbook
from pgtls_helpers.errors import PreflightError
from pgtls_helpers.lab import LabCA, LabCluster
from pgtls_helpers.postgres.watch_clients import crls_in
from pgtls_helpers.postgres.watch_login import server_facts
from pgtls_helpers.runbook import client_proof, client_server, manifest
from pgtls_helpers.runbook.client_crl import CRL_NOT_FOUND_ALERT, CRL_REVOKED_ALERT
from pgtls_helpers.runbook.params import Params
from pgtls_helpers.runbook.rollback import rollback_change

ParamsFactory = Callable[..., Params]
ADDR = "127.0.0.1/32"
HOUR = timedelta(hours=1)


def _serve_tls(cluster: LabCluster, runbook_params: ParamsFactory) -> Params:
    params = runbook_params(cluster, change_id="CHG-first")
    runbook.step1_key_and_csr(params)
    runbook.step2_ca_response(params)
    runbook.step3_install_files(params)
    runbook.step4_enable_ssl(params)
    assert runbook.step5_verify_clients(params).passed
    return params


def _place(ca: LabCA, os_user: str, role: str, server_root: Path) -> x509.Certificate:
    """What step c3 leaves: ``~/.postgresql/`` with root.crt, postgresql.crt (leaf and
    intermediates) and postgresql.key, the user's own; the leaf signed by ``ca``."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, role)]))
        .sign(key, hashes.SHA256())
    )
    leaf = ca.sign_client_csr(csr)
    entry = pwd.getpwnam(os_user)
    home = Path(entry.pw_dir) / ".postgresql"
    home.mkdir(mode=0o700, exist_ok=True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    items = (
        ("root.crt", server_root.read_bytes(), 0o644),
        ("postgresql.crt", certfactory.pem(leaf, *ca.intermediates), 0o644),
        ("postgresql.key", key_pem, 0o600),
    )
    for name, data, mode in items:
        path = home / name
        path.write_bytes(data)
        os.chmod(path, mode)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    os.chown(home, entry.pw_uid, entry.pw_gid)
    return leaf


def _write_crls(path: Path, crls: list[x509.CertificateRevocationList]) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crls))
    return path


def _roots(params: Params, *roots: x509.Certificate) -> None:
    """What step c2 leaves: the distinct client roots in the work directory."""
    params.work.client_roots.parent.mkdir(parents=True, exist_ok=True)
    params.work.client_roots.write_bytes(certfactory.pem(*roots))


def _sql(cluster: LabCluster, *statements: str) -> list[object]:
    with psycopg.connect(**cluster.conninfo(sslmode="require"), autocommit=True) as conn:
        out: list[object] = []
        for statement in statements:
            cur = conn.execute(statement)
            out.append(cur.fetchone() if cur.description else None)
        return out


def _files(cluster: LabCluster) -> dict[str, str]:
    """Every configuration, TLS and CRL file of the data directory, by hash."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(cluster.pgdata.iterdir())
        if p.is_file() and p.suffix in (".conf", ".crt", ".key", ".crl")
    }


def _psql_as_sam(cluster: LabCluster, entry: pwd.struct_passwd) -> subprocess.CompletedProcess[str]:
    """The machine's psql as the client OS user, with only its own ~/.postgresql files."""
    return subprocess.run(
        ["psql", f"host=127.0.0.1 port={cluster.port} dbname=postgres user=sam sslmode=require",
         "-XAtc", "SELECT 1"],
        capture_output=True, text=True, timeout=30, cwd="/", check=False,
        env={"HOME": entry.pw_dir, "PATH": os.environ["PATH"], "LC_ALL": "C"},
        user=entry.pw_uid, group=entry.pw_gid, extra_groups=[],
    )  # fmt: skip


def _rule(user: str) -> dict[str, object]:
    return {
        "type": "hostssl",
        "database": "postgres",
        "user": user,
        "address": ADDR,
        "method": "cert",
    }


@pytest.fixture
def two_users() -> Iterator[list[str]]:
    """Two client OS users of this test alone."""
    if os.geteuid() != 0:
        skip_or_fail("creating client OS users needs root")
    names = [f"pgtls_crl{os.getpid()}_{i}" for i in range(2)]
    for name in names:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
    try:
        yield names
    finally:
        for name in names:
            subprocess.run(["userdel", "--remove", name], check=False, capture_output=True)


def test_a_crl_is_installed_the_revoked_client_refused_and_it_rolls_back_exactly(
    fresh_cluster: LabCluster,
    runbook_params: ParamsFactory,
    two_users: list[str],
    tmp_path: Path,
) -> None:
    first = _serve_tls(fresh_cluster, runbook_params)
    u_rita, u_sam = two_users
    _sql(fresh_cluster, 'CREATE ROLE "rita" LOGIN', 'CREATE ROLE "sam" LOGIN')
    ca = LabCA.create(("Client BAR", "Client FOO"), root_name="Client Root")
    rita = _place(ca, u_rita, "rita", first.work.root)
    _place(ca, u_sam, "sam", first.work.root)
    now = datetime.now(timezone.utc)
    crls = ca.sign_crls(last_update=now - HOUR, next_update=now + 7 * 24 * HOUR, revoked=[rita])
    crl_file = _write_crls(tmp_path / "client-cas.crl", crls)
    before = _files(fresh_cluster)
    values: dict[str, object] = dict(
        change_id="CHG-crl",
        record_dir=str(tmp_path / "record"),
        clients=[{"os_user": u_rita, "role": "rita"}, {"os_user": u_sam, "role": "sam"}],
        hba_rules=[_rule("rita"), _rule("sam")],
        client_crl_file=str(crl_file),
    )
    params = runbook_params(fresh_cluster, **values)
    _roots(params, ca.root)

    planned = client_server.step_c4_server_trust(
        runbook_params(fresh_cluster, **{**values, "apply": False})
    )
    assert _files(fresh_cluster) == before  # a plan writes nothing
    assert planned.settings_planned == [
        {"name": "ssl_ca_file", "before": "", "after": "client_ca.crt"},
        {"name": "ssl_crl_file", "before": "", "after": "client_ca.crl"},
    ]
    assert planned.revoked_clients == [u_rita]

    result = client_server.step_c4_server_trust(params)
    assert result.changed and result.ssl_crl_file == str(fresh_cluster.pgdata / "client_ca.crl")
    assert [(c["issuer"], c["revoked"]) for c in result.crls] == [
        ("CN=Client Root,O=pgtls lab CA,C=US", 0),
        ("CN=Client BAR,O=pgtls lab CA,C=US", 0),
        ("CN=Client FOO,O=pgtls lab CA,C=US", 1),
    ]
    assert _sql(fresh_cluster, "SHOW ssl_crl_file") == [("client_ca.crl",)]
    installed = fresh_cluster.pgdata / "client_ca.crl"
    assert installed.read_bytes() == crl_file.read_bytes()
    # the record: each CRL with its issuer, nextUpdate and revoked count
    facts = manifest.from_steps({"c4_server_trust": result.summary()})
    assert [(c.issuer, c.revoked, c.file) for c in facts.client_crls][-1] == (
        "CN=Client FOO,O=pgtls lab CA,C=US",
        1,
        str(installed),
    )
    assert facts.client_crls[0].next_update == crls[0].next_update_utc.isoformat()

    proof = client_proof.step_c5_verify_clients(params)
    assert proof.passed, [c for c in proof.checks if not c.passed]
    refused = next(c for c in proof.checks if c.os_user == u_rita and "revokes" in c.case)
    # measured: the machine's libpq (OpenSSL 3.0) says so in these words
    assert refused.expect == CRL_REVOKED_ALERT and CRL_REVOKED_ALERT in refused.detail
    own = next(c for c in proof.checks if c.os_user == u_sam and c.case.startswith("its own"))
    assert own.passed and own.expect == "ok"
    assert [s["os_user"] for s in proof.sessions] == [u_sam]

    # pgtls watch --on-disk reads the installed file through the server
    seen = server_facts("127.0.0.1", fresh_cluster.port, timeout=10, user="postgres")
    assert seen.crl_path == "client_ca.crl" and seen.crl_data == installed.read_bytes()
    rows = crls_in(seen.crl_data, source="s", path=seen.crl_path, now=now)
    assert [(r.status, r.revoked) for r in rows] == [("ok", 0), ("ok", 0), ("ok", 1)]

    # what the check of the chain's CRLs guards against: with the signer's CRL alone, the server
    # finds no CRL for the intermediates and refuses a valid certificate (measured wording)
    good = installed.read_bytes()
    installed.write_bytes(crls[-1].public_bytes(serialization.Encoding.PEM))
    _sql(fresh_cluster, "SELECT pg_reload_conf()")
    entry = pwd.getpwnam(u_sam)
    for _ in range(50):  # the reload is asynchronous
        login = _psql_as_sam(fresh_cluster, entry)
        if login.returncode != 0:
            break
        time.sleep(0.1)
    assert login.returncode != 0 and CRL_NOT_FOUND_ALERT in login.stderr, login.stderr
    installed.write_bytes(good)
    _sql(fresh_cluster, "SELECT pg_reload_conf()")

    rollback_change(params)
    assert _files(fresh_cluster) == before
    assert not installed.exists()
    assert _sql(fresh_cluster, "SHOW ssl_crl_file", "SHOW ssl_ca_file") == [("",), ("",)]


def test_an_existing_ssl_crl_file_keeps_other_issuers_crls_and_is_put_back(
    fresh_cluster: LabCluster,
    runbook_params: ParamsFactory,
    own_client_user: str,
    tmp_path: Path,
) -> None:
    first = _serve_tls(fresh_cluster, runbook_params)
    _sql(fresh_cluster, 'CREATE ROLE "tom" LOGIN')
    ca = LabCA.create(("Client BAR", "Client FOO"), root_name="Client Root")
    _place(ca, own_client_user, "tom", first.work.root)
    now = datetime.now(timezone.utc)
    other = LabCA.create((), root_name="Root of other clients")
    # the server already trusts another client root, and has its CRL
    (fresh_cluster.pgdata / "trusted.crt").write_bytes(certfactory.pem(other.root))
    other_crl = other.sign_crl(last_update=now - HOUR, next_update=now + 48 * HOUR)
    old = b"# the other CA's CRL\n" + other_crl.public_bytes(serialization.Encoding.PEM)
    existing = fresh_cluster.pgdata / "revoked.crl"
    existing.write_bytes(old)
    owner = fresh_cluster.pgdata.stat()
    for path in (existing, fresh_cluster.pgdata / "trusted.crt"):
        os.chown(path, owner.st_uid, owner.st_gid)
    _sql(
        fresh_cluster,
        "ALTER SYSTEM SET ssl_ca_file = 'trusted.crt'",
        "ALTER SYSTEM SET ssl_crl_file = 'revoked.crl'",
        "SELECT pg_reload_conf()",
    )
    auto_before = (fresh_cluster.pgdata / "postgresql.auto.conf").read_bytes()
    crls = ca.sign_crls(last_update=now - HOUR, next_update=now + 48 * HOUR)
    params = runbook_params(
        fresh_cluster,
        change_id="CHG-crl-merge",
        clients=[{"os_user": own_client_user, "role": "tom"}],
        hba_rules=[_rule("tom")],
        client_crl_file=str(_write_crls(tmp_path / "new.crl", crls)),
    )
    _roots(params, ca.root)
    result = client_server.step_c4_server_trust(params)
    assert result.settings_planned == [] and result.crls_kept == 1
    merged = existing.read_bytes()
    assert merged.startswith(old) and merged.count(b"BEGIN X509 CRL") == 4
    assert client_proof.step_c5_verify_clients(params).passed
    rollback_change(params)
    assert existing.read_bytes() == old
    assert (fresh_cluster.pgdata / "postgresql.auto.conf").read_bytes() == auto_before


def test_crls_that_would_break_logins_are_refused_with_nothing_changed(
    fresh_cluster: LabCluster,
    runbook_params: ParamsFactory,
    own_client_user: str,
    tmp_path: Path,
) -> None:
    first = _serve_tls(fresh_cluster, runbook_params)
    _sql(fresh_cluster, 'CREATE ROLE "uma" LOGIN')
    ca = LabCA.create(("Client BAR", "Client FOO"), root_name="Client Root")
    _place(ca, own_client_user, "uma", first.work.root)
    now = datetime.now(timezone.utc)
    unrelated = LabCA.create(("Unrelated BAR", "Unrelated FOO"), root_name="Unrelated Root")
    stale = ca.sign_crls(last_update=now - 8 * 24 * HOUR, next_update=now - HOUR)
    soon = ca.sign_crls(last_update=now - HOUR, next_update=now + HOUR / 2)
    fresh = dict(last_update=now - HOUR, next_update=now + 48 * HOUR)
    garbage = tmp_path / "garbage.crl"
    garbage.write_bytes(b"not a CRL\n")
    cases = [
        (
            _write_crls(tmp_path / "stale.crl", stale),
            'misleading "sslv3 alert certificate expired"',
        ),
        (_write_crls(tmp_path / "soon.crl", soon), "less than 1 h from now"),
        (
            _write_crls(tmp_path / "unrelated.crl", unrelated.sign_crls(**fresh)),
            "is not signed by a client-issuing CA",
        ),
        (
            _write_crls(tmp_path / "signer-only.crl", [ca.sign_crl(**fresh)]),
            "no CRL of CN=Client Root,O=pgtls lab CA,C=US \\(a root of ssl_ca_file\\)",
        ),
        (garbage, "not a CRL \\(PEM or DER\\)"),
        (tmp_path / "absent.crl", "cannot be read"),
    ]
    before = _files(fresh_cluster)
    for n, (path, message) in enumerate(cases):
        params = runbook_params(
            fresh_cluster,
            change_id=f"CHG-crl-refused-{n}",
            clients=[{"os_user": own_client_user, "role": "uma"}],
            hba_rules=[_rule("uma")],
            client_crl_file=str(path),
        )
        _roots(params, ca.root)
        with pytest.raises(PreflightError, match=message) as err:
            client_server.step_c4_server_trust(params)
        assert str(err.value).endswith("Nothing was changed"), str(err.value)
        assert _files(fresh_cluster) == before, path
        assert not params.work.journal.exists()
    assert _sql(fresh_cluster, "SHOW ssl_crl_file") == [("",)]
