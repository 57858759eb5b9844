"""A client OS user's check logs in with what is its own, never the runbook's password.

libpq verifies the server's certificate and host name during the handshake, before the server
asks for a password, so a ``verify-full`` login that is refused still proves the TLS part.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable
from pathlib import Path

import pytest

from pgtls_helpers import notebook as runbook
from pgtls_helpers.lab import LabCluster
from pgtls_helpers.postgres.clients import TLS_VERIFIED, ConnCheck
from pgtls_helpers.runbook.params import Params

ParamsFactory = Callable[..., Params]


def _psql_check(params: Params) -> ConnCheck:
    verdict = runbook.step5_verify_clients(params)
    assert verdict.passed, [c for c in verdict.checks if not c.passed]
    return next(c for c in verdict.checks if c.check.startswith("psql as OS user"))


def _write_pgpass(user: str, line: str) -> Path:
    entry = pwd.getpwnam(user)
    pgpass = Path(entry.pw_dir) / ".pgpass"
    pgpass.unlink(missing_ok=True)
    fd = os.open(pgpass, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(line + "\n")
    os.chown(pgpass, entry.pw_uid, entry.pw_gid)
    return pgpass


def test_the_client_check_never_borrows_the_runbooks_password(
    fresh_cluster: LabCluster,
    runbook_params: ParamsFactory,
    client_user: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the runbook itself logs in as postgres with PGPASSFILE; PGPASSWORD is set as well
    password = fresh_cluster.password()
    monkeypatch.setenv("PGPASSWORD", password)
    params = runbook_params(
        fresh_cluster,
        client_system_users=[client_user],
        client_roles={client_user: "postgres"},
    )
    home = Path(pwd.getpwnam(client_user).pw_dir)
    (home / ".pgpass").unlink(missing_ok=True)
    runbook.step1_key_and_csr(params)
    runbook.step2_ca_response(params)
    runbook.step3_install_files(params)
    runbook.step4_enable_ssl(params)

    # 1. the client user has no password of its own: the server refuses the login after a
    #    verified handshake, which proves TLS; the runbook's password never reached psql
    check = _psql_check(params)
    assert check.observed == "fail", check.detail
    assert check.observed_reason == f"{TLS_VERIFIED}; authentication failed for role postgres"
    assert check.passed
    assert "no password supplied" in check.detail
    assert password not in check.detail

    # 2. its own ~/.pgpass with a line for the address: libpq matches the host name it
    #    connects to, so the line does not apply, and the message says why
    _write_pgpass(client_user, f"127.0.0.1:{fresh_cluster.port}:*:postgres:{password}")
    check = _psql_check(params)
    assert check.observed_reason.startswith(TLS_VERIFIED), check.detail
    assert "by the host name the client connects to (db1.lab.pgtls.test)" in check.detail
    assert "not by its address 127.0.0.1" in check.detail

    # 3. a line for the host name: the client logs in with its own password source
    _write_pgpass(client_user, f"db1.lab.pgtls.test:{fresh_cluster.port}:*:postgres:{password}")
    check = _psql_check(params)
    assert (check.observed, check.observed_reason) == ("ok", "connected"), check.detail
    assert "connected as role postgres over TLS" in check.detail
    (home / ".pgpass").unlink()


def test_a_lab_client_gets_a_login_of_its_own(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, client_user: str
) -> None:
    from pgtls_helpers.runbook.runner import on_lab_cluster

    home = Path(pwd.getpwnam(client_user).pw_dir)
    (home / ".pgpass").unlink(missing_ok=True)
    params = on_lab_cluster(runbook_params(fresh_cluster), fresh_cluster, client_user=client_user)
    assert params.client_system_users == (client_user,)
    pgpass = home / ".pgpass"
    assert pgpass.stat().st_uid == pwd.getpwnam(client_user).pw_uid
    assert pgpass.stat().st_mode & 0o077 == 0
    assert fresh_cluster.password() not in pgpass.read_text()
    runbook.step1_key_and_csr(params)
    runbook.step2_ca_response(params)
    runbook.step3_install_files(params)
    runbook.step4_enable_ssl(params)
    check = _psql_check(params)
    assert check.observed == "ok", check.detail
    assert f"connected as role {client_user}" in check.detail
    pgpass.unlink()


def test_only_a_refused_login_counts_as_tls_verified() -> None:
    def check(observed: str, reason: str) -> ConnCheck:
        return ConnCheck(
            check="psql as OS user bob",
            sslmode="verify-full",
            host="db1",
            expect="ok",
            expect_reason=TLS_VERIFIED,
            observed=observed,  # type: ignore[arg-type]
            observed_reason=reason,
            detail="",
        )

    assert check("ok", "connected").passed
    assert check("fail", f"{TLS_VERIFIED}; authentication failed for role bob").passed
    assert not check("fail", "certificate not trusted").passed
    assert not check("fail", "host name not in certificate").passed
    assert not check("fail", "server has SSL off").passed
