"""Renewal and CA rotation on real clusters: a served certificate replaced by reload with no
failed connection, and clients moved to a new root in three phases."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from cryptography import x509

from pgtls_helpers import notebook as runbook
from pgtls_helpers.errors import PreflightError, ServerError
from pgtls_helpers.lab import LabCA, LabCluster
from pgtls_helpers.pki.chain import fingerprint
from pgtls_helpers.pki.csr import load_csr, spki_sha256
from pgtls_helpers.postgres.clients import psql_as_user, resolve_client_users
from pgtls_helpers.postgres.probe import probe
from pgtls_helpers.runbook.params import Params
from pgtls_helpers.runbook.renewal import ClientLoop, read_roots
from pgtls_helpers.runbook.verify import VerifyResult

ParamsFactory = Callable[..., Params]


def _run_all(params: Params) -> VerifyResult:
    runbook.step1_key_and_csr(params)
    runbook.step2_ca_response(params)
    runbook.step3_install_files(params)
    runbook.step4_enable_ssl(params)
    return runbook.step5_verify_clients(params)


def _served(cluster: LabCluster) -> str:
    result = probe("127.0.0.1", cluster.port, timeout=5.0)
    assert result.ok and result.chain, result.error
    return fingerprint(result.chain[0])


def _snapshot(cluster: LabCluster) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(cluster.pgdata.iterdir())
        if p.is_file() and (p.suffix in (".conf", ".crt", ".key") or "pgtls" in p.name)
    }


def _first_change(cluster: LabCluster, runbook_params: ParamsFactory, **kw: object) -> Params:
    params = runbook_params(cluster, change_id="CHG-first", **kw)
    verdict = _run_all(params)
    assert verdict.passed, [c for c in verdict.checks if not c.passed]
    return params


def _psql_verify_full(cluster: LabCluster, user_name: str) -> tuple[str, str]:
    """psql as the client OS user with its own root.crt: "ok" when the handshake verified the
    server (the login itself may be refused: the user has no role of its own here)."""
    (user,) = resolve_client_users([user_name])
    check = psql_as_user(
        user, {"port": cluster.port}, host="db1.lab.pgtls.test", hostaddr="127.0.0.1"
    )
    return ("ok" if check.passed else check.observed_reason), check.detail


def _sign_with(ca: LabCA, params: Params, out: Path) -> list[str]:
    csr = load_csr(params.work.csr.read_bytes())
    return [str(p) for p in ca.write_response(ca.sign_csr(csr), out)]


def test_same_root_renewal_by_reload_with_no_failed_connection(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, tmp_path: Path
) -> None:
    first = _first_change(fresh_cluster, runbook_params)
    old = _served(fresh_cluster)
    record = tmp_path / "record"
    renew = runbook_params(fresh_cluster, change_id="CHG-renew", record_dir=str(record))
    # a session opened before the renewal outlives it: a reload, not a restart
    session = psycopg.connect(**fresh_cluster.conninfo(sslmode="require"), autocommit=True)  # type: ignore[arg-type]
    pid = session.execute("SELECT pg_backend_pid()").fetchone()
    loop_info = {k: v for k, v in fresh_cluster.conninfo().items() if k != "host"}
    with ClientLoop(
        loop_info,
        host="db1.lab.pgtls.test",
        hostaddr="127.0.0.1",
        root_file=first.work.root,
        at_least=200,
    ) as loop:
        runbook.step1_key_and_csr(renew)
        runbook.step2_ca_response(renew)
        plan = runbook.step3_install_files(renew)
        enabled = runbook.step4_enable_ssl(renew)
        verdict = runbook.step5_verify_clients(renew)
    assert loop.result is not None
    assert loop.result.connections >= 200 and loop.result.failed == 0, loop.result.errors
    assert verdict.passed
    # the lab CA is kept once per work directory: the second lab change is a same-root renewal
    assert plan.renewal is not None and plan.renewal.kind == "renewal", plan.renewal
    assert plan.renewal.served[0]["sha256"] == old and plan.renewal.new[0]["sha256"] != old
    assert plan.renewal.names_dropped == [] and not plan.renewal.rotation
    new = _served(fresh_cluster)
    assert new != old and new == plan.renewal.new[0]["sha256"]
    # the record: served before and after, days left, and the runbook's own client loop
    summary = json.loads((record / "steps" / "04_enable_ssl.json").read_text())
    ren = summary["renewal"]
    assert ren["served_before"]["sha256"] == old and ren["served_after"]["sha256"] == new
    assert ren["served_after"]["days_left"] >= 390
    assert ren["client_loop"]["connections"] >= 200 and ren["client_loop"]["failed"] == 0
    assert enabled.changed and enabled.renewal == ren
    assert session.execute("SELECT pg_backend_pid()").fetchone() == pid
    session.close()
    assert (renew.work.root).read_bytes() == (first.work.root).read_bytes()


def test_an_intermediate_change_is_a_renewal_that_sends_the_new_intermediates(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, tmp_path: Path
) -> None:
    ca = LabCA.create()
    work = tmp_path / "work"
    ca.save(work / "lab-ca")  # the work directory's lab CA, with its root key at hand
    _first_change(fresh_cluster, runbook_params)
    other = ca.with_new_intermediates(("IntermediateCA_BAZ",))
    renew = runbook_params(fresh_cluster, change_id="CHG-inter", ca_mode="files")
    runbook.step1_key_and_csr(renew)
    renew = runbook_params(
        fresh_cluster,
        change_id="CHG-inter",
        ca_mode="files",
        ca_files=_sign_with(other, renew, tmp_path / "baz"),
    )
    runbook.step2_ca_response(renew)
    plan = runbook.step3_install_files(renew)
    assert plan.renewal is not None and plan.renewal.kind == "renewal, intermediates change"
    runbook.step4_enable_ssl(renew)
    assert runbook.step5_verify_clients(renew).passed
    served = probe("127.0.0.1", fresh_cluster.port, timeout=5.0)
    assert [fingerprint(c) for c in served.chain[1:]] == [
        fingerprint(c) for c in other.intermediates
    ]


def test_a_certificate_the_server_cannot_load_at_reload_is_restored_and_the_old_one_served(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory
) -> None:
    _first_change(fresh_cluster, runbook_params)
    old = _served(fresh_cluster)
    crt = fresh_cluster.pgdata / "server.crt"
    old_bytes = crt.read_bytes()
    renew = runbook_params(fresh_cluster, change_id="CHG-broken")
    runbook.step1_key_and_csr(renew)
    runbook.step2_ca_response(renew)
    runbook.step3_install_files(renew)
    # damaged between install and reload: the server keeps its old SSL configuration
    crt.write_bytes(b"-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
    with pytest.raises(ServerError) as err:
        runbook.step4_enable_ssl(renew)
    message = str(err.value)
    assert "rolled back" in message
    assert f"the previous certificate (sha256 {old[:16]}…) is served again" in message
    assert "SSL configuration was not reloaded" in message
    assert crt.read_bytes() == old_bytes
    assert _served(fresh_cluster) == old
    # the new key went back to the work directory for a retry
    assert renew.work.key.exists()


def test_reuse_key_renews_with_the_installed_key(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory
) -> None:
    _first_change(fresh_cluster, runbook_params)
    key_file = fresh_cluster.pgdata / "server.key"
    key_bytes = key_file.read_bytes()
    old = _served(fresh_cluster)
    renew = runbook_params(fresh_cluster, change_id="CHG-reuse", reuse_key=True)
    made = runbook.step1_key_and_csr(renew)
    assert not renew.work.key.exists()  # the key never left the server
    served_key = probe("127.0.0.1", fresh_cluster.port).chain[0].public_key()
    assert made.public_key_sha256 == spki_sha256(served_key)
    runbook.step2_ca_response(renew)
    plan = runbook.step3_install_files(renew)
    assert {r["kind"]: r["action"] for r in plan.plan}["key"] == "unchanged"
    runbook.step4_enable_ssl(renew)
    assert runbook.step5_verify_clients(renew).passed
    assert key_file.read_bytes() == key_bytes
    assert _served(fresh_cluster) != old


def test_a_shorter_validity_is_refused_before_anything_changes(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, tmp_path: Path
) -> None:
    ca = LabCA.load_or_create(tmp_path / "work" / "lab-ca")
    key, cert = ca.issue(["db1.lab.pgtls.test", "localhost", "127.0.0.1"], days=800)
    fresh_cluster.serve_certificate(key, [cert, *ca.intermediates])
    params = runbook_params(fresh_cluster, change_id="CHG-short")
    runbook.step1_key_and_csr(params)
    runbook.step2_ca_response(params)  # the lab CA signs for 397 days
    before = _snapshot(fresh_cluster)
    with pytest.raises(PreflightError, match="shorter-validity"):
        runbook.step3_install_files(params)
    assert _snapshot(fresh_cluster) == before
    allowed = runbook.step3_install_files(
        runbook_params(
            fresh_cluster, change_id="CHG-short", allow_shorter_validity=True, apply=False
        )
    )
    assert allowed.renewal is not None
    assert [f.severity for f in allowed.renewal.findings if f.code == "shorter-validity"] == [
        "warning"
    ]


def test_ca_rotation_trust_then_serve_then_retire(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, own_client_user: str, tmp_path: Path
) -> None:
    users = [own_client_user]
    first = _first_change(fresh_cluster, runbook_params, client_system_users=users)
    (user,) = resolve_client_users(users)
    old_root = read_roots(first.work.root)[0]
    assert _psql_verify_full(fresh_cluster, own_client_user)[0] == "ok"
    new_ca = LabCA.load_or_create(tmp_path / "ca-b", root_name="Rotation Root B")
    new_root_file = tmp_path / "ca-b" / "root.crt"

    # serve before trust: refused before anything changes
    serve = runbook_params(fresh_cluster, change_id="CHG-serve", ca_mode="files")
    runbook.step1_key_and_csr(serve)
    signed = _sign_with(new_ca, serve, tmp_path / "signed-b")
    serve = runbook_params(
        fresh_cluster,
        change_id="CHG-serve",
        ca_mode="files",
        ca_files=signed,
        client_system_users=users,
    )
    runbook.step2_ca_response(serve)
    before = _snapshot(fresh_cluster)
    root_crt_before = user.root_crt.read_bytes()
    with pytest.raises(PreflightError, match="new-root-untrusted") as err:
        runbook.step3_install_files(serve)
    assert "ca-rotation" in str(err.value)
    assert _snapshot(fresh_cluster) == before and user.root_crt.read_bytes() == root_crt_before

    # 1. trust: the new root beside the old one, proven against the chain served today
    trust = runbook_params(
        fresh_cluster,
        change_id="CHG-trust",
        client_system_users=users,
        add_roots=[str(new_root_file), str(first.work.root)],  # the old one again: deduplicated
    )
    trusted = runbook.client_trust(trust)
    assert trusted.verdict == "pass", trusted.checks
    assert [fingerprint(c) for c in read_roots(user.root_crt)] == [
        fingerprint(old_root),
        fingerprint(new_ca.root),
    ]
    assert trusted.installed is not None
    (written,) = trusted.installed.installed
    assert written.backup is not None and written.backup.read_bytes() == root_crt_before
    assert _psql_verify_full(fresh_cluster, own_client_user)[0] == "ok"
    trusted_bytes = user.root_crt.read_bytes()

    # retiring the old root now would leave the client unable to verify today's chain
    early = runbook_params(
        fresh_cluster,
        change_id="CHG-retire-early",
        client_system_users=users,
        remove_roots=[fingerprint(old_root)],
    )
    with pytest.raises(PreflightError, match="would-not-verify"):
        runbook.client_trust(early)
    assert user.root_crt.read_bytes() == trusted_bytes

    # 2. serve: still needs new_root: accept for the clients nobody listed
    with pytest.raises(PreflightError, match="ca-rotation") as err:
        runbook.step3_install_files(serve)
    assert "new-root-untrusted" not in str(err.value)
    serve = runbook_params(
        fresh_cluster,
        change_id="CHG-serve",
        ca_mode="files",
        ca_files=signed,
        client_system_users=users,
        new_root="accept",
    )
    plan = runbook.step3_install_files(serve)
    assert plan.renewal is not None and plan.renewal.kind == "CA rotation"
    runbook.step4_enable_ssl(serve)
    served_checks = runbook.step5_verify_clients(serve)
    assert served_checks.passed, [(c.check, c.detail) for c in served_checks.checks if not c.passed]
    # the clients' root.crt was merged, not replaced: other servers still serve the old chain
    assert {fingerprint(c) for c in read_roots(user.root_crt)} == {
        fingerprint(old_root),
        fingerprint(new_ca.root),
    }
    assert _psql_verify_full(fresh_cluster, own_client_user)[0] == "ok"

    # 3. retire: the old root goes, named by its fingerprint with colons, upper case
    colons = ":".join(fingerprint(old_root).upper()[i : i + 2] for i in range(0, 64, 2))
    retire = runbook_params(
        fresh_cluster, change_id="CHG-retire", client_system_users=users, remove_roots=[colons]
    )
    retired = runbook.client_trust(retire)
    assert retired.verdict == "pass"
    assert [fingerprint(c) for c in read_roots(user.root_crt)] == [fingerprint(new_ca.root)]
    assert _psql_verify_full(fresh_cluster, own_client_user)[0] == "ok"


def test_a_passphrase_key_renews_by_reload_only_with_supports_reload(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    _first_change(fresh_cluster, runbook_params)
    with psycopg.connect(**fresh_cluster.conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        conn.execute("ALTER SYSTEM SET ssl_passphrase_command = '/bin/echo %p'")
        conn.execute("SELECT pg_reload_conf()")
    monkeypatch.setenv("PGTLS_TEST_PASSPHRASE", "correct horse battery staple")
    renew = runbook_params(
        fresh_cluster, change_id="CHG-pass", key_passphrase_env="PGTLS_TEST_PASSPHRASE"
    )
    runbook.step1_key_and_csr(renew)
    runbook.step2_ca_response(renew)
    before = _snapshot(fresh_cluster)
    with pytest.raises(PreflightError, match="passphrase-reload") as err:
        runbook.step3_install_files(renew)
    assert "correct horse" not in str(err.value)
    assert _snapshot(fresh_cluster) == before
    with psycopg.connect(**fresh_cluster.conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        conn.execute("ALTER SYSTEM SET ssl_passphrase_command_supports_reload = on")
        conn.execute("SELECT pg_reload_conf()")
    plan = runbook.step3_install_files(
        runbook_params(
            fresh_cluster,
            change_id="CHG-pass",
            key_passphrase_env="PGTLS_TEST_PASSPHRASE",
            apply=False,
        )
    )
    assert plan.renewal is not None
    assert not [f for f in plan.preflight if f.code == "passphrase-reload"]


def test_a_renewal_reuses_the_installed_names_unless_the_parameters_say_otherwise(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory
) -> None:
    _first_change(fresh_cluster, runbook_params, organization="Org A", locality="Malvern")
    renew = runbook_params(
        fresh_cluster, change_id="CHG-names", subject_alt_names=[], organization="Org B"
    )
    made = runbook.step1_key_and_csr(renew)
    subject = dict(made.subject_fields)
    assert subject["Organization (O)"] == "Org B", subject
    assert subject["Locality (L)"] == "Malvern", subject
    csr = load_csr(renew.work.csr.read_bytes())
    sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(v.value) for v in sans} >= {"localhost", "127.0.0.1", "db1.lab.pgtls.test"}
    runbook.step2_ca_response(renew)
    plan = runbook.step3_install_files(runbook_params(fresh_cluster, change_id="CHG-names"))
    assert plan.renewal is not None and plan.renewal.names_dropped == []
    # a dropped name is refused before anything is written, unless it is dropped on purpose
    dropped = runbook_params(
        fresh_cluster, change_id="CHG-drop", subject_alt_names=["localhost"], apply=False
    )
    runbook.step1_key_and_csr(dropped)
    runbook.step2_ca_response(dropped)
    with pytest.raises(PreflightError, match="names-dropped: .*127.0.0.1.*allow_dropped_names"):
        runbook.step3_install_files(dropped)
    plan = runbook.step3_install_files(dataclasses.replace(dropped, allow_dropped_names=True))
    assert plan.renewal is not None and plan.renewal.names_dropped == ["127.0.0.1"]
    assert [(f.code, f.severity) for f in plan.renewal.findings] == [("names-dropped", "warning")]


def test_a_fifo_for_root_crt_is_refused_not_waited_on(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, own_client_user: str
) -> None:
    import signal
    import subprocess

    from pgtls_helpers.errors import InputError

    _first_change(fresh_cluster, runbook_params, client_system_users=[own_client_user])
    (user,) = resolve_client_users([own_client_user])
    # the attacker: the client user makes its root.crt a FIFO nobody writes to
    user.root_crt.unlink()
    subprocess.run(
        ["runuser", "-u", own_client_user, "--", "mkfifo", str(user.root_crt)], check=True
    )
    renew = runbook_params(
        fresh_cluster, change_id="CHG-fifo", client_system_users=[own_client_user]
    )
    runbook.step1_key_and_csr(renew)
    runbook.step2_ca_response(renew)
    signal.alarm(60)  # a hang fails the test instead of the whole session
    try:
        with pytest.raises(InputError, match="root.crt"):
            runbook.step3_install_files(renew)
    finally:
        signal.alarm(0)
