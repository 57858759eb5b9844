"""The lifecycle of client certificates on real clusters: a renewal while the client keeps
connecting (no connection fails), its rollback byte for byte, and a client-CA rotation in
three changes (trust, reissue, retire) whose retire is refused while a session of the old CA is
connected, and goes through once it is gone."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import certfactory
import psycopg
import pytest
from certfactory import CLIENT_AUTH, Issued
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from pgtls_helpers import notebook as runbook
from pgtls_helpers.errors import PreflightError, ServerError
from pgtls_helpers.lab import LabCA, LabCluster
from pgtls_helpers.pki import chain as chainmod
from pgtls_helpers.pki import keys
from pgtls_helpers.postgres.client_loop import ClientLoop, LoopResult
from pgtls_helpers.postgres.clients import resolve_client_users
from pgtls_helpers.runbook import client_proof, client_roots, client_server
from pgtls_helpers.runbook.client_keys import (
    LOOP_AFTER,
    LOOP_BEFORE,
    step_c1_client_keys,
    step_c2_client_certs,
    step_c3_install_clients,
)
from pgtls_helpers.runbook.params import Params
from pgtls_helpers.runbook.rollback import rollback_change
from pgtls_helpers.runbook.steps import CLIENTS

ParamsFactory = Callable[..., Params]
ROLE = "kim"
RULE = {
    "type": "hostssl",
    "database": "postgres",
    "user": ROLE,
    "address": "127.0.0.1/32",
    "method": "cert",
}


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def os_user() -> Iterator[str]:
    """A client OS user of this test alone."""
    if os.geteuid() != 0:
        pytest.skip("creating client OS users needs root")
    name = f"pgtls_cl{os.getpid()}"
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", "--remove", name], check=False, capture_output=True)


def _dot_postgresql(os_user: str) -> Path:
    return Path(pwd.getpwnam(os_user).pw_dir) / ".postgresql"


def _client_files(os_user: str) -> dict[str, tuple[str, int, int]]:
    """Each file of the user's ~/.postgresql: its hash, mode and owner."""
    out = {}
    for p in sorted(_dot_postgresql(os_user).iterdir()):
        st = p.lstat()
        out[p.name] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mode, st.st_uid)
    return out


def _server_files(cluster: LabCluster) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(cluster.pgdata.iterdir())
        if p.is_file() and p.suffix in (".conf", ".crt", ".key")
    }


def _first_change(cluster: LabCluster, runbook_params: ParamsFactory, os_user: str) -> Params:
    """The server serves TLS (the user has root.crt), and the client has a certificate of the
    lab CA that the server trusts and checks: c1 to c5 of a first change."""
    first = runbook_params(cluster, change_id="CHG-tls", client_system_users=[os_user])
    runbook.step1_key_and_csr(first)
    runbook.step2_ca_response(first)
    runbook.step3_install_files(first)
    runbook.step4_enable_ssl(first)
    assert runbook.step5_verify_clients(first).passed
    with psycopg.connect(**cluster.conninfo(sslmode="require"), autocommit=True) as conn:  # type: ignore[arg-type]
        conn.execute(f'CREATE ROLE "{ROLE}" LOGIN')
    params = _clients_change(cluster, runbook_params, os_user, "CHG-clients")
    _issue(params)
    client_server.step_c4_server_trust(params)
    assert client_proof.step_c5_verify_clients(params).passed
    return params


def _clients_change(
    cluster: LabCluster, runbook_params: ParamsFactory, os_user: str, change_id: str, **kw: object
) -> Params:
    return runbook_params(
        cluster,
        change_id=change_id,
        clients=[{"os_user": os_user, "role": ROLE}],
        hba_rules=[RULE],
        **kw,
    )


def _issue(params: Params) -> dict[str, object]:
    step_c1_client_keys(params)
    step_c2_client_certs(params)
    return step_c3_install_clients(params).summary()


def _sign(csr: x509.CertificateSigningRequest, ca: Issued) -> x509.Certificate:
    """What a CA of our own returns for a client CSR: clientAuth, 30 days."""
    now = datetime.now(timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(ca.cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())  # type: ignore[arg-type]
    )


def _conninfo(params: Params) -> dict[str, str]:
    return {
        "host": params.common_name,
        "hostaddr": "127.0.0.1",
        "port": str(params.server_port),
        "dbname": "postgres",
        "user": ROLE,
        "sslmode": "verify-full",
    }


def _session(os_user: str, params: Params) -> subprocess.Popen[str]:
    """psql as the client OS user with its own ~/.postgresql, left connected (it waits for
    input) until its stdin is closed."""
    entry = pwd.getpwnam(os_user)
    psql = shutil.which("psql")
    assert psql is not None
    conninfo = " ".join(f"{k}={v}" for k, v in _conninfo(params).items())
    proc = subprocess.Popen(
        [psql, conninfo, "-X", "-q"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        env={"HOME": entry.pw_dir, "PATH": os.environ["PATH"], "LC_ALL": "C"},
        cwd=entry.pw_dir,
        user=entry.pw_uid,
        group=entry.pw_gid,
        extra_groups=[],
    )
    return proc


def _ssl_sessions(cluster: LabCluster) -> list[tuple[int, str, str]]:
    with psycopg.connect(**cluster.conninfo(sslmode="require"), autocommit=True) as conn:  # type: ignore[arg-type]
        rows = conn.execute(
            "SELECT pid, client_dn, issuer_dn FROM pg_stat_ssl WHERE client_dn IS NOT NULL"
        ).fetchall()
    return [(int(p), str(d), str(i)) for p, d, i in rows]


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


# ----------------------------------------------------------------------------- tests


MISMATCH = "key values mismatch"  # libpq: the key it read is not its certificate's


def _at_most_the_switch(loop: dict[str, object] | LoopResult, *, reuse_key: bool) -> None:
    """A renewal that keeps the key changes one file in one rename: no connection fails. With a
    new key, one connection whose two reads straddle the back-to-back renames may fail (libpq:
    key mismatch), and no other."""
    res = loop.summary() if isinstance(loop, LoopResult) else loop
    clients = res.get("clients", [res])
    assert isinstance(clients, list)
    for row in clients:
        if reuse_key:
            assert row["failed"] == 0, row
        else:
            assert row["failed"] <= 1 and all(MISMATCH in e for e in row["errors"]), row
        assert row["last_ok"], row


@pytest.mark.spread
@pytest.mark.parametrize("reuse_key", [True, False], ids=["same-key", "new-key"])
def test_a_renewal_under_a_looping_client_and_its_rollback(
    fresh_cluster: LabCluster,
    runbook_params: ParamsFactory,
    os_user: str,
    tmp_path: Path,
    reuse_key: bool,
) -> None:
    _first_change(fresh_cluster, runbook_params, os_user)
    home = _dot_postgresql(os_user)
    old = _client_files(os_user)
    old_crt = (home / "postgresql.crt").read_bytes()
    old_key = (home / "postgresql.key").read_bytes()

    record = tmp_path / "record"
    renew = _clients_change(
        fresh_cluster,
        runbook_params,
        os_user,
        "CHG-renew",
        record_dir=str(record),
        reuse_key=reuse_key,
    )
    summary = _issue(renew)
    saved = json.loads((record / "steps" / "c3_install_clients.json").read_text())
    assert saved["client_loop"] == summary["client_loop"]

    loop = summary["client_loop"]
    assert isinstance(loop, dict), summary["notes"]
    assert loop["connections"] >= LOOP_BEFORE + LOOP_AFTER, loop
    _at_most_the_switch(loop, reuse_key=reuse_key)
    (row,) = loop["clients"]
    assert row["os_user"] == os_user and row["before_switch"] >= LOOP_BEFORE
    assert row["old_certificate_connections"] >= LOOP_BEFORE  # it was looping before the switch
    assert row["new_certificate_connections"] >= LOOP_AFTER // 2  # and presents the new one after
    crt, key = (home / "postgresql.crt").read_bytes(), (home / "postgresql.key").read_bytes()
    assert crt != old_crt and (key == old_key) is reuse_key
    leaf = x509.load_pem_x509_certificates(crt)[0]
    assert keys.public_key_matches(keys.load_key(key, source="key", validate=False), leaf)
    assert not list(home.glob(".*pgtls-tmp*"))  # nothing staged is left behind
    assert client_proof.step_c5_verify_clients(renew).passed

    # the rollback puts the files back the same way, under a loop of the client's own
    (user,) = resolve_client_users([os_user])
    with ClientLoop(user, _conninfo(renew)) as looping:
        assert looping.wait_for(50) >= 50
        rollback_change(renew)
        looping.mark_switch()
        looping.wait_for(50)
    assert looping.result.connections >= 100
    _at_most_the_switch(looping.result, reuse_key=reuse_key)
    assert _client_files(os_user) == old
    assert (home / "postgresql.crt").read_bytes() == old_crt
    assert (home / "postgresql.key").read_bytes() == old_key


def test_a_renewal_the_server_refuses_is_put_back_by_the_loop(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, os_user: str, tmp_path: Path
) -> None:
    """A client reissued from a CA the server does not trust yet: the loop sees its
    connections fail after the switch, and c3 puts the old files back."""
    _first_change(fresh_cluster, runbook_params, os_user)
    old = _client_files(os_user)
    root = certfactory.make_ca("Untrusted Client Root")
    reissue = _clients_change(fresh_cluster, runbook_params, os_user, "CHG-early", ca_mode="files")
    (key,) = step_c1_client_keys(reissue).clients
    csr = x509.load_pem_x509_csr(key.csr_path.read_bytes())
    answer = certfactory.write_pem(tmp_path / "answer.pem", _sign(csr, root), root.cert)
    reissue = _clients_change(
        fresh_cluster,
        runbook_params,
        os_user,
        "CHG-early",
        ca_mode="files",
        client_ca_files=[str(answer)],
    )
    step_c2_client_certs(reissue)
    with pytest.raises(ServerError, match="looping across the switch failed") as err:
        step_c3_install_clients(reissue)
    assert "every client file was put back" in str(err.value)
    assert _client_files(os_user) == old


def test_a_client_ca_rotation_in_three_changes(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, os_user: str, tmp_path: Path
) -> None:
    first = _first_change(fresh_cluster, runbook_params, os_user)
    old_root = LabCA.load(first.work.shared_lab_ca).root
    new_root = certfactory.make_ca("Client Root CA 2026")
    new_issuer = certfactory.make_ca("Client Issuing CA 2026", issuer=new_root)
    root_file = certfactory.write_pem(tmp_path / "new-root.pem", new_root.cert)
    ca_file = fresh_cluster.pgdata / "client_ca.crt"

    # (a) trust: the new root beside the old one; the clients are not touched
    trust = _clients_change(
        fresh_cluster, runbook_params, os_user, "CHG-trust", trust_client_roots=[str(root_file)]
    )
    assert all(s.skipped(trust, phase_one=False) for s in CLIENTS[:3])
    clients_before = _client_files(os_user)
    trusted = client_server.step_c4_server_trust(trust)
    assert [r["sha256"] for r in trusted.roots_after] == [
        chainmod.fingerprint(old_root),
        chainmod.fingerprint(new_root.cert),
    ]
    assert client_proof.step_c5_verify_clients(trust).passed
    assert _client_files(os_user) == clients_before

    # a session with the old certificate, held open across (b) and into (c)
    held = _session(os_user, trust)
    try:
        _wait(lambda: len(_ssl_sessions(fresh_cluster)) == 1, "the held session connects")
        ((held_pid, _dn, old_issuer),) = _ssl_sessions(fresh_cluster)

        # (b) reissue from the new CA; the server already trusts it, so the loop loses nothing
        csr_params = _clients_change(
            fresh_cluster, runbook_params, os_user, "CHG-reissue", ca_mode="files", reuse_key=True
        )
        (key,) = step_c1_client_keys(csr_params).clients
        csr = x509.load_pem_x509_csr(key.csr_path.read_bytes())
        answer = certfactory.write_pem(
            tmp_path / "answer.pem", _sign(csr, new_issuer), new_issuer.cert, new_root.cert
        )
        reissue = _clients_change(
            fresh_cluster,
            runbook_params,
            os_user,
            "CHG-reissue",
            ca_mode="files",
            client_ca_files=[str(answer)],
            reuse_key=True,
        )
        step_c2_client_certs(reissue)
        loop = step_c3_install_clients(reissue).summary()["client_loop"]
        assert (
            isinstance(loop, dict)
            and loop["failed"] == 0
            and loop["connections"] >= LOOP_BEFORE + LOOP_AFTER
        )
        assert not client_server.step_c4_server_trust(reissue).changed
        assert client_proof.step_c5_verify_clients(reissue).passed

        # (c) retire: refused, before any write, while the old-issuer session is connected
        server_before, clients_now = _server_files(fresh_cluster), _client_files(os_user)
        ca_before = ca_file.read_bytes()
        fp = chainmod.fingerprint(old_root)
        retire = _clients_change(
            fresh_cluster, runbook_params, os_user, "CHG-retire", retire_client_roots=[fp]
        )
        with pytest.raises(PreflightError) as err:
            client_server.step_c4_server_trust(retire)
        said = str(err.value)
        assert f"pid {held_pid}, user {ROLE}, client_dn /CN={ROLE}" in said, said
        assert "reissue those clients from the new CA" in said
        assert old_issuer != "/CN=Client Issuing CA 2026"
        assert _server_files(fresh_cluster) == server_before
        assert _client_files(os_user) == clients_now
        assert ca_file.read_bytes() == ca_before
        assert not retire.work.journal.exists()

        # retiring every root while cert lines exist: refused too, byte-identical
        both = _clients_change(
            fresh_cluster,
            runbook_params,
            os_user,
            "CHG-retire-all",
            retire_client_roots=[fp, str(root_file)],
        )
        with pytest.raises(PreflightError, match="without a root while"):
            client_server.step_c4_server_trust(both)
        assert _server_files(fresh_cluster) == server_before
        assert not both.work.journal.exists()
    finally:
        assert held.stdin is not None
        held.stdin.close()
        held.wait(timeout=30)

    _wait(lambda: not _ssl_sessions(fresh_cluster), "the held session ends")
    retired = client_server.step_c4_server_trust(retire)
    assert retired.changed
    assert [r["sha256"] for r in retired.roots_retired] == [fp]
    assert [r["sha256"] for r in retired.roots_after] == [chainmod.fingerprint(new_root.cert)]
    assert ca_file.read_bytes() == certfactory.pem(new_root.cert)
    names = client_roots.asked_ca_names("127.0.0.1", fresh_cluster.port)
    assert names is None or names == ["CN=Client Root CA 2026"]
    assert client_proof.step_c5_verify_clients(retire).passed
    assert _client_files(os_user) == clients_now

    rollback_change(retire)
    assert ca_file.read_bytes() == ca_before
    assert _server_files(fresh_cluster) == server_before
