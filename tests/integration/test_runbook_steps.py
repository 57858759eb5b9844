"""The server side on real throwaway clusters: install, enable, prove, roll back."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from cryptography import x509

from pgtls_helpers import notebook as runbook
from pgtls_helpers.errors import InputError, PreflightError, ServerError
from pgtls_helpers.lab import LabCluster
from pgtls_helpers.pki.keys import generate_key, serialize_key
from pgtls_helpers.runbook.params import Params
from pgtls_helpers.runbook.verify import VerifyResult

ParamsFactory = Callable[..., Params]


def _snapshot(cluster: LabCluster) -> dict[str, str]:
    """Hashes of every regular file the runbook could touch in the data directory."""
    out = {}
    for path in sorted(cluster.pgdata.iterdir()):
        if path.name == "pgtls.lock":
            continue  # the change lock: its content names the last change that held it
        if path.is_file() and (path.suffix in (".conf", ".crt", ".key") or "pgtls" in path.name):
            out[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _show_ssl(cluster: LabCluster) -> str:
    with psycopg.connect(**cluster.conninfo()) as conn:  # type: ignore[arg-type]
        return str(conn.execute("SHOW ssl").fetchone()[0])  # type: ignore[index]


def _run_all(params: Params) -> VerifyResult:
    runbook.step1_key_and_csr(params)
    runbook.step2_ca_response(params)
    runbook.step3_install_files(params)
    runbook.step4_enable_ssl(params)
    return runbook.step5_verify_clients(params)


def test_whole_change_then_a_second_run_changes_nothing(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory
) -> None:
    params = runbook_params(fresh_cluster)
    assert _show_ssl(fresh_cluster) == "off"
    runbook.step1_key_and_csr(params)
    runbook.step2_ca_response(params)
    runbook.step3_install_files(params)
    enabled = runbook.step4_enable_ssl(params)
    assert enabled.runbook_connection and enabled.runbook_connection.startswith("TLSv1.")
    verdict = runbook.step5_verify_clients(params)
    assert verdict.passed, [c for c in verdict.checks if not c.passed]
    assert _show_ssl(fresh_cluster) == "on"

    key = fresh_cluster.pgdata / "server.key"
    st = key.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == (
        fresh_cluster.pgdata.stat().st_uid,
        fresh_cluster.pgdata.stat().st_gid,
    )
    # ALTER SYSTEM rewrote postgresql.auto.conf: its old bytes are kept in the work directory
    assert not list(fresh_cluster.pgdata.glob("*.pgtls-backup-*"))
    (auto_backup,) = (params.work.path / "backups").glob("postgresql.auto.conf.pgtls-backup-*")
    assert b"ssl" not in auto_backup.read_bytes()
    # the key left the work directory once installed
    assert not (params.work.key).exists()
    # server.crt is leaf + FOO + BAR: the root is not appended
    assert (fresh_cluster.pgdata / "server.crt").read_bytes().count(b"BEGIN CERTIFICATE") == 3

    before = _snapshot(fresh_cluster)
    assert runbook.step1_key_and_csr(params).reused
    runbook.step2_ca_response(params)
    third = runbook.step3_install_files(params)
    fourth = runbook.step4_enable_ssl(params)
    assert not third.changed
    assert not fourth.changed and fourth.confirmed and not fourth.reloaded
    assert "nothing to change" in fourth.messages[0]
    assert _snapshot(fresh_cluster) == before
    assert runbook.step5_verify_clients(params).passed


def test_every_must_fail_connection_fails_for_its_reason(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory
) -> None:
    verdict = _run_all(runbook_params(fresh_cluster))
    failing = {c.check: c for c in verdict.checks if c.expect == "fail"}
    assert failing["sslmode=disable (non-SSL)"].observed_reason == "non-SSL rejected by pg_hba.conf"
    assert (
        failing["verify-full with a name not in the certificate"].observed_reason
        == "host name not in certificate"
    )
    assert (
        failing["verify-ca against an unrelated root"].observed_reason == "certificate not trusted"
    )
    assert all(c.passed for c in failing.values())
    require = next(c for c in verdict.checks if c.sslmode == "require")
    assert require.observed == "ok"  # require accepts a server it never verified


def test_apply_false_changes_nothing(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory
) -> None:
    params = runbook_params(fresh_cluster, apply=False)
    before = _snapshot(fresh_cluster)
    runbook.step1_key_and_csr(params)
    runbook.step2_ca_response(params)
    plan = runbook.step3_install_files(params)
    enable = runbook.step4_enable_ssl(params)
    assert not plan.applied and plan.installed is None
    assert {row["action"] for row in plan.plan} == {"create"}
    assert "+hostnossl all" in enable.hba_diff and not enable.reloaded
    assert _snapshot(fresh_cluster) == before
    assert _show_ssl(fresh_cluster) == "off"
    assert (params.work.key).exists()  # still waiting for the real run


def test_wrong_key_is_refused_before_any_file_changes(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory
) -> None:
    params = runbook_params(fresh_cluster)
    runbook.step1_key_and_csr(params)
    runbook.step2_ca_response(params)
    # someone put another key in the work directory
    other = params.work.key
    other.unlink()
    fd = os.open(other, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(serialize_key(generate_key("ecdsa-p256")))
    before = _snapshot(fresh_cluster)
    with pytest.raises(PreflightError, match="key-mismatch"):
        runbook.step3_install_files(params)
    assert _snapshot(fresh_cluster) == before
    assert not (params.work.path / "journal.jsonl").exists()


def test_the_eject_typo_never_reaches_the_server(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory
) -> None:
    before = _snapshot(fresh_cluster)
    # refused when the parameters are read: before step 3 writes anything
    with pytest.raises(InputError, match="did you mean 'reject'"):
        runbook_params(
            fresh_cluster,
            hba_rules=[
                {
                    "type": "hostnossl",
                    "database": "all",
                    "user": "all",
                    "address": "all",
                    "method": "eject",
                }
            ],
        )
    assert _snapshot(fresh_cluster) == before
    assert _show_ssl(fresh_cluster) == "off"


def test_a_line_the_server_rejects_is_restored_before_any_reload(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory
) -> None:
    # well-formed for a parser, refused by PostgreSQL itself: only pg_hba_file_rules knows
    params = runbook_params(
        fresh_cluster,
        hba_rules=[
            {
                "type": "hostssl",
                "database": "all",
                "user": "all",
                "address": "127.0.0.1/32",
                "method": "scram-sha-256",
                "options": ["clientcert=maybe"],
            }
        ],
    )
    runbook.step1_key_and_csr(params)
    runbook.step2_ca_response(params)
    before = _snapshot(fresh_cluster)
    log_at = fresh_cluster.log_size()
    # judged with the whole change before step 3's first write
    with pytest.raises(PreflightError, match="step4-would-refuse.*clientcert"):
        runbook.step3_install_files(params)
    assert _snapshot(fresh_cluster) == before
    assert not (fresh_cluster.pgdata / "server.key").exists()
    assert _show_ssl(fresh_cluster) == "off"
    assert fresh_cluster.wait_for_log("received SIGHUP", after=log_at, timeout=1) is None


def test_a_certificate_the_server_cannot_load_is_rolled_back_with_its_log_line(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory
) -> None:
    params = runbook_params(fresh_cluster)
    runbook.step1_key_and_csr(params)
    runbook.step2_ca_response(params)
    hba = fresh_cluster.pgdata / "pg_hba.conf"
    hba_before = hba.read_bytes()
    runbook.step3_install_files(params)
    # the installed certificate is damaged between install and reload
    crt = fresh_cluster.pgdata / "server.crt"
    crt.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    with pytest.raises(ServerError) as err:
        runbook.step4_enable_ssl(params)
    message = str(err.value)
    assert "rolled back" in message and "the server log says" in message
    assert "certificate" in message.split("the server log says")[1]
    assert hba.read_bytes() == hba_before
    assert not crt.exists()  # there was none before the change
    assert not (fresh_cluster.pgdata / "server.key").exists()
    assert _show_ssl(fresh_cluster) == "off"
    # the server is still there for non-SSL clients, as before the change
    with psycopg.connect(**fresh_cluster.conninfo(sslmode="disable")) as conn:  # type: ignore[arg-type]
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_replacing_an_existing_certificate_keeps_backups_and_rollback_restores(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, lab_ca: object
) -> None:
    from pgtls_helpers.lab import LabCA

    ca = LabCA.create(root_name="Old Root")
    old_key, old_cert = ca.issue(["old.lab.pgtls.test"])
    fresh_cluster.serve_certificate(old_key, [old_cert, *ca.intermediates])
    old = {n: (fresh_cluster.pgdata / n).read_bytes() for n in ("server.crt", "server.key")}
    params = runbook_params(  # another root (a CA rotation), and the old name goes
        fresh_cluster, new_root="accept", allow_dropped_names=True
    )
    verdict = _run_all(params)
    assert verdict.passed
    # backups live in the change's 0700 work directory, never in the data directory (so a
    # retired key does not travel in base backups)
    assert not list(fresh_cluster.pgdata.glob("*.pgtls-backup-*"))
    store = params.work.path / "backups"
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    backups = sorted(p.name for p in store.glob("server.*.pgtls-backup-*"))
    assert [b.split(".pgtls")[0] for b in backups] == ["server.crt", "server.key"]
    for name in ("server.crt", "server.key"):
        backup = next(store.glob(f"{name}.pgtls-backup-*"))
        assert backup.read_bytes() == old[name]
    key_backup = next(store.glob("server.key.pgtls-backup-*"))
    assert stat.S_IMODE(key_backup.stat().st_mode) == 0o600

    from pgtls_helpers.runbook.rollback import rollback_change

    result = rollback_change(params)
    assert result.ok, result.problems
    for name, data in old.items():
        assert (fresh_cluster.pgdata / name).read_bytes() == data
    # the change is closed: its backups (a retired key among them) are gone
    assert not store.exists()


def test_encrypted_key_needs_ssl_passphrase_command(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGTLS_TEST_PASSPHRASE", "correct horse battery staple")
    params = runbook_params(fresh_cluster, key_passphrase_env="PGTLS_TEST_PASSPHRASE")
    runbook.step1_key_and_csr(params)
    assert b"ENCRYPTED" in (params.work.key).read_bytes()
    runbook.step2_ca_response(params)
    before = _snapshot(fresh_cluster)
    with pytest.raises(PreflightError, match="ssl_passphrase_command") as err:
        runbook.step3_install_files(params)
    assert "correct horse" not in str(err.value)
    assert _snapshot(fresh_cluster) == before


def test_client_user_gets_root_crt_and_psql_connects_verify_full(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, client_user: str
) -> None:
    import pwd

    params = runbook_params(fresh_cluster, client_system_users=[client_user])
    verdict = _run_all(params)
    home = Path(pwd.getpwnam(client_user).pw_dir)
    root_crt = home / ".postgresql" / "root.crt"
    assert root_crt.read_bytes() == (params.work.root).read_bytes()
    assert stat.S_IMODE(root_crt.parent.stat().st_mode) == 0o700
    assert root_crt.parent.stat().st_uid == pwd.getpwnam(client_user).pw_uid
    psql = next(c for c in verdict.checks if c.check.startswith("psql as OS user"))
    # the user has no role or password of its own: the login is refused after the handshake
    assert psql.observed_reason == f"TLS verified; authentication failed for role {client_user}"
    assert psql.passed, psql.detail
    assert verdict.passed


def test_psql_as_client_user_without_root_crt_is_refused(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, client_user: str
) -> None:
    from pgtls_helpers.postgres.clients import psql_as_user, resolve_client_users

    params = runbook_params(fresh_cluster)
    _run_all(params)
    user = resolve_client_users([client_user])[0]
    if user.root_crt.exists():
        user.root_crt.unlink()
    check = psql_as_user(
        user,
        {**params.conninfo(), "passfile": str(fresh_cluster.passfile)},
        host="db1.lab.pgtls.test",
        hostaddr="127.0.0.1",
    )
    assert check.observed == "fail" and check.observed_reason == "certificate not trusted"


def test_after_a_rollback_the_key_is_back_in_the_work_directory_for_a_retry(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory
) -> None:
    params = runbook_params(fresh_cluster)
    runbook.step1_key_and_csr(params)
    runbook.step2_ca_response(params)
    runbook.step3_install_files(params)
    installed_key = (fresh_cluster.pgdata / "server.key").read_bytes()
    assert not (params.work.key).exists()
    (fresh_cluster.pgdata / "server.crt").write_bytes(b"damaged")
    with pytest.raises(ServerError):
        runbook.step4_enable_ssl(params)
    work_key = params.work.key
    assert work_key.read_bytes() == installed_key
    assert stat.S_IMODE(work_key.stat().st_mode) == 0o600
    # the retry goes through with the same key and CSR
    assert runbook.step1_key_and_csr(params).reused
    runbook.step2_ca_response(params)
    runbook.step3_install_files(params)
    assert runbook.step4_enable_ssl(params).confirmed
    assert runbook.step5_verify_clients(params).passed


def _serve_snakeoil(cluster: LabCluster) -> dict[Path, bytes]:
    """SSL on with a shared pair outside the data directory, as Debian's packages set it up."""
    import pwd

    from cryptography.hazmat.primitives import serialization

    from pgtls_helpers.lab import LabCA

    key, cert = LabCA.create(root_name="snakeoil").issue(["localhost"])
    pair = {
        cluster.base / "ssl-cert-snakeoil.pem": cert.public_bytes(serialization.Encoding.PEM),
        cluster.base / "ssl-cert-snakeoil.key": key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    }
    owner = pwd.getpwuid(cluster.pgdata.stat().st_uid)
    for path, data in pair.items():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chown(path, owner.pw_uid, owner.pw_gid)
    with open(cluster.pgdata / "postgresql.conf", "a") as conf:
        conf.write(
            "ssl = on\n"
            f"ssl_cert_file = '{cluster.base / 'ssl-cert-snakeoil.pem'}'\n"
            f"ssl_key_file = '{cluster.base / 'ssl-cert-snakeoil.key'}'\n"
        )
    cluster.restart()
    return pair


def _show(cluster: LabCluster, name: str) -> str:
    with psycopg.connect(**cluster.conninfo()) as conn:  # type: ignore[arg-type]
        return str(conn.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]


def test_a_shared_snakeoil_pair_is_left_alone_and_the_settings_move(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory
) -> None:
    pair = _serve_snakeoil(fresh_cluster)
    params = runbook_params(fresh_cluster)
    runbook.step1_key_and_csr(params)
    runbook.step2_ca_response(params)
    plan = runbook.step3_install_files(runbook_params(fresh_cluster, apply=False))
    assert {row["file"] for row in plan.plan} == {
        str(fresh_cluster.pgdata / "server.key"),
        str(fresh_cluster.pgdata / "server.crt"),
    }
    enable_plan = runbook.step4_enable_ssl(runbook_params(fresh_cluster, apply=False))
    assert any("ssl_cert_file" in m for m in enable_plan.messages)

    verdict = _run_all(params)
    assert verdict.passed
    for path, data in pair.items():
        assert path.read_bytes() == data
    assert _show(fresh_cluster, "ssl_cert_file") == str(fresh_cluster.pgdata / "server.crt")
    assert _show(fresh_cluster, "ssl_key_file") == str(fresh_cluster.pgdata / "server.key")
    # and once moved, a second run has nothing to change
    assert not runbook.step4_enable_ssl(params).changed


def test_a_failed_move_puts_the_snakeoil_settings_back(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory
) -> None:
    _serve_snakeoil(fresh_cluster)
    params = runbook_params(fresh_cluster)
    runbook.step1_key_and_csr(params)
    runbook.step2_ca_response(params)
    runbook.step3_install_files(params)
    (fresh_cluster.pgdata / "server.crt").write_bytes(b"damaged")
    with pytest.raises(ServerError, match="rolled back"):
        runbook.step4_enable_ssl(params)
    assert _show(fresh_cluster, "ssl_cert_file") == str(
        fresh_cluster.base / "ssl-cert-snakeoil.pem"
    )
    assert _show(fresh_cluster, "ssl") == "on"
    assert "ssl_cert_file" not in (fresh_cluster.pgdata / "postgresql.auto.conf").read_text()


def test_step1_never_reuses_a_csr_for_other_names_or_another_key_type(
    tmp_path: Path, runbook_params: ParamsFactory, lab_cluster: LabCluster
) -> None:
    params = runbook_params(lab_cluster)
    first = runbook.step1_key_and_csr(params)
    with pytest.raises(PreflightError, match="different subject"):
        runbook.step1_key_and_csr(runbook_params(lab_cluster, common_name="db9.lab.pgtls.test"))
    with pytest.raises(PreflightError, match="has an ECDSA P-256 key, not RSA 2048"):
        runbook.step1_key_and_csr(runbook_params(lab_cluster, key_type="rsa2048"))
    assert runbook.step1_key_and_csr(params).csr_sha256 == first.csr_sha256


def test_a_completed_change_backs_out_to_the_server_as_it_was(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, tmp_path: Path
) -> None:
    import subprocess
    import sys

    import yaml

    hba_before = (fresh_cluster.pgdata / "pg_hba.conf").read_bytes()
    params = runbook_params(fresh_cluster)
    assert _run_all(params).passed
    installed_key = (fresh_cluster.pgdata / "server.key").read_bytes()
    # a later run that changes nothing must keep the journals of the one that did
    runbook.step3_install_files(params)
    runbook.step4_enable_ssl(params)

    values = {k: v for k, v in params.__dict__.items() if v is not None}
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    values["hba_rules"] = [dict(r) for r in params.hba_rules]
    params_file = tmp_path / "change.yaml"
    params_file.write_text(yaml.safe_dump(values))
    records = ["--records", str(tmp_path / "records")]
    proc = subprocess.run(
        [sys.executable, "-m", "pgtls_helpers", "rollback", str(params_file), *records],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PGPASSFILE": str(fresh_cluster.passfile)},
    )
    assert proc.returncode == 0, proc.stderr
    assert "ssl off" in proc.stdout and "restored from its backup" in proc.stdout, proc.stdout
    assert (fresh_cluster.pgdata / "pg_hba.conf").read_bytes() == hba_before
    assert not (fresh_cluster.pgdata / "server.crt").exists()
    assert not (fresh_cluster.pgdata / "server.key").exists()
    assert _show_ssl(fresh_cluster) == "off"
    with psycopg.connect(**fresh_cluster.conninfo(sslmode="disable")) as conn:  # type: ignore[arg-type]
        assert conn.execute("SELECT 1").fetchone() == (1,)
    # the key is back in the work directory: the change can be redone without a new CSR
    assert (params.work.key).read_bytes() == installed_key
    assert _run_all(params).passed

    again = subprocess.run(
        [sys.executable, "-m", "pgtls_helpers", "rollback", str(params_file), *records],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PGPASSFILE": str(fresh_cluster.passfile)},
    )
    assert again.returncode == 0  # the redo made new journals
    nothing = subprocess.run(
        [sys.executable, "-m", "pgtls_helpers", "rollback", str(params_file), *records],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PGPASSFILE": str(fresh_cluster.passfile)},
    )
    assert nothing.returncode == 0, nothing.stderr
    assert "nothing to roll back; it was already rolled back" in nothing.stdout


def test_a_minimal_extension_ca_runs_end_to_end_renews_and_watches_ok(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, client_user: str
) -> None:
    """The own-CA recipe of many shops (a root with basicConstraints only, no key identifiers,
    leaves with only their SANs): libpq takes it, so the change goes through, a renewal from
    the same CA is a same-root renewal, and ``pgtls watch`` says verified, never critical."""
    from pgtls_helpers.lab import LabCA
    from pgtls_helpers.pki.posture import Target, WatchOptions
    from pgtls_helpers.postgres.watch import watch

    params = runbook_params(fresh_cluster, client_system_users=[client_user])
    ca = LabCA.load_or_create(params.work.shared_lab_ca, minimal=True)
    assert not ca.root.extensions.get_extension_for_class(x509.BasicConstraints).critical
    runbook.step1_key_and_csr(params)
    step2 = runbook.step2_ca_response(params)
    assert not step2.errors, step2.errors
    assert "strict-profile" in {f.code for f in step2.findings}  # said, never an error
    leaf = step2.chain.path[0]
    assert [e.oid for e in leaf.extensions] == [x509.SubjectAlternativeName.oid]
    runbook.step3_install_files(params)
    runbook.step4_enable_ssl(params)
    verdict = runbook.step5_verify_clients(params)
    assert verdict.passed, [c for c in verdict.checks if not c.passed]

    renewal = runbook_params(
        fresh_cluster, change_id="CHG-renew", client_system_users=[client_user]
    )
    runbook.step1_key_and_csr(renewal)
    runbook.step2_ca_response(renewal)
    installed = runbook.step3_install_files(renewal)
    assert installed.renewal is not None and installed.renewal.kind.startswith("renewal")
    runbook.step4_enable_ssl(renewal)
    assert runbook.step5_verify_clients(renewal).passed

    (watched,) = watch(
        [Target("127.0.0.1", fresh_cluster.port)], WatchOptions(roots=(ca.root,), timeout=5.0)
    )
    assert watched.verified is True and watched.status != "critical", watched.as_json()
