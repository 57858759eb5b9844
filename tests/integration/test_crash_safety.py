"""Issue 8 on real clusters: a lock-out rule, two changes at once, symlinked client files,
rollback with the server down, rollback after a DBA edit, hostssl cert rules with SSL off."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
import yaml

from pgtls_helpers import notebook as runbook
from pgtls_helpers.errors import InputError, PreflightError
from pgtls_helpers.lab import LabCluster
from pgtls_helpers.postgres.lock import change_lock
from pgtls_helpers.postgres.server import Server
from pgtls_helpers.runbook.params import Params

ParamsFactory = Callable[..., Params]


def _params_file(params: Params, directory: Path) -> Path:
    values = {k: v for k, v in params.__dict__.items() if k != "extra" and v is not None}
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    values["hba_rules"] = [dict(r) for r in params.hba_rules]
    path = directory / f"{params.change_id}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _rollback(path: Path, cluster: LabCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgtls_helpers", "rollback", str(path), *args]
        + ([] if "--records" in args else ["--records", str(path.parent / "rollback-records")]),
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PGPASSFILE": str(cluster.passfile)},
        timeout=120,
    )


def _steps_1_to_3(params: Params) -> None:
    runbook.step1_key_and_csr(params)
    runbook.step2_ca_response(params)
    runbook.step3_install_files(params)


def _files(cluster: LabCluster) -> dict[str, str]:
    """Every file at the top of the data directory, hashed (the server's own files)."""
    import hashlib

    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(cluster.pgdata.iterdir())
        if p.is_file() and p.name not in ("postmaster.pid", "postmaster.opts")
    }


def _ssl(cluster: LabCluster) -> str:
    with psycopg.connect(**cluster.conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        return str(conn.execute("SHOW ssl").fetchone()[0])  # type: ignore[index]


def test_a_rule_that_locks_out_the_runbooks_own_login_is_refused_before_any_change(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory
) -> None:
    # case 4: method cert for the runbook's own address, and no client certificate
    params = runbook_params(
        fresh_cluster,
        hba_rules=[
            {
                "type": "hostssl",
                "database": "all",
                "user": "all",
                "address": "127.0.0.1/32",
                "method": "cert",
            }
        ],
    )
    before = _files(fresh_cluster)
    runbook.step1_key_and_csr(params)
    runbook.step2_ca_response(params)
    # the whole change is judged before its first write: step 3 stops, nothing installed
    with pytest.raises(PreflightError, match="step4-would-refuse.*lock out the runbook's own"):
        runbook.step3_install_files(params)
    assert _files(fresh_cluster) == before
    assert not params.work.journal.exists()
    # and step 4, run on its own, still guards the same way
    with pytest.raises(PreflightError, match="lock out the runbook's own connection"):
        runbook.step4_enable_ssl(params)
    assert _files(fresh_cluster) == before
    assert _ssl(fresh_cluster) == "off"


def test_a_hostssl_cert_rule_is_checked_as_hostssl_while_ssl_is_off(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory
) -> None:
    # case 9: the check parses with SSL on, so 'hostssl … cert' is not turned into 'host … cert'
    params = runbook_params(
        fresh_cluster,
        hba_rules=[
            {
                "type": "hostssl",
                "database": "all",
                "user": "all",
                "address": "127.0.0.1/32",
                "method": "scram-sha-256",
            },
            {
                "type": "hostssl",
                "database": "all",
                "user": "app",
                "address": "10.0.0.0/8",
                "method": "cert",
            },
        ],
    )
    _steps_1_to_3(params)
    result = runbook.step4_enable_ssl(params)
    assert result.changed and any("cert" in line for line in result.hba_added)
    assert any("GSS-encrypted" in m for m in result.messages)
    assert not list(fresh_cluster.pgdata.glob(".pg_hba.conf.pgtls-check-*"))


def test_a_second_change_waits_then_stops_naming_the_first(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # case 5: two change ids against one server
    first = runbook_params(fresh_cluster, change_id="CHG-first")
    second = runbook_params(fresh_cluster, change_id="CHG-second")
    runbook.step1_key_and_csr(second)
    runbook.step2_ca_response(second)
    monkeypatch.setenv("PGTLS_LOCK_WAIT", "1")
    holder = Server({**first.conninfo(), "application_name": "pgtls CHG-first"})
    with holder, change_lock(fresh_cluster.pgdata, None, holder, "CHG-first"):
        with pytest.raises(PreflightError, match="CHG-first.*is changing this server now"):
            runbook.step3_install_files(second)
        assert not (fresh_cluster.pgdata / "server.crt").exists()
        assert (fresh_cluster.pgdata / "pgtls.lock").exists()  # visible while a change runs
    assert not (fresh_cluster.pgdata / "pgtls.lock").exists()  # and gone after it
    # the advisory lock alone (a run on another host) also stops it
    other = Server({**first.conninfo(), "application_name": "pgtls CHG-first"})
    with other:
        assert other.advisory_lock(0x67746C73, timeout=0)
        # named by its role and backend, never by the application_name it chose
        with pytest.raises(PreflightError, match="a session of role postgres from"):
            runbook.step3_install_files(second)
    runbook.step3_install_files(second)  # once the first is gone, the second proceeds


def test_rollback_with_the_server_down_restores_every_file_and_says_to_start_it(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, tmp_path: Path
) -> None:
    hba = (fresh_cluster.pgdata / "pg_hba.conf").read_bytes()
    auto = (fresh_cluster.pgdata / "postgresql.auto.conf").read_bytes()
    params = runbook_params(fresh_cluster)
    _steps_1_to_3(params)
    runbook.step4_enable_ssl(params)
    path = _params_file(params, tmp_path)
    fresh_cluster.stop()
    back = _rollback(path, fresh_cluster)
    assert back.returncode == 0, back.stderr
    assert "start the server" in back.stdout
    assert (fresh_cluster.pgdata / "pg_hba.conf").read_bytes() == hba
    assert (fresh_cluster.pgdata / "postgresql.auto.conf").read_bytes() == auto
    assert not (fresh_cluster.pgdata / "server.crt").exists()
    fresh_cluster.start()
    assert _ssl(fresh_cluster) == "off"


def _written(cluster: LabCluster, tmp_path: Path) -> tuple[dict[str, str], int]:
    """What a dry run must leave alone: every file at the top of the data directory and under
    ``tmp_path`` (the work directory, the records, the parameters files), hashed, and the data
    directory's mtime (a lock file created and removed there would change it)."""
    import hashlib

    hashed = {f"data/{name}": digest for name, digest in _files(cluster).items()}
    for p in sorted(tmp_path.rglob("*")):
        if p.is_file() and not p.is_symlink():
            hashed[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return hashed, cluster.pgdata.stat().st_mtime_ns


def test_rollback_after_a_dba_edit_names_the_file_and_stops_unless_forced(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, tmp_path: Path
) -> None:
    params = runbook_params(fresh_cluster)
    _steps_1_to_3(params)
    runbook.step4_enable_ssl(params)
    path = _params_file(params, tmp_path)
    hba_file = fresh_cluster.pgdata / "pg_hba.conf"
    with open(hba_file, "a") as fh:
        fh.write("hostssl reporting analyst 10.9.0.0/16 scram-sha-256\n")
    edited = hba_file.read_bytes()
    records = ("--records", str(tmp_path / "records"))
    dry = _rollback(path, fresh_cluster, "--dry-run", *records)
    stopped = _rollback(path, fresh_cluster, *records)
    assert (dry.returncode, dry.stderr) == (stopped.returncode, stopped.stderr)
    assert stopped.returncode == 1
    # one sentence naming the file and the fix; the diff stays off the terminal ...
    (line,) = stopped.stderr.splitlines()
    assert f"{hba_file}: changed after change {params.change_id}" in line, line
    assert "merge the edit by hand (diff -u " in line
    assert line.endswith("or run the rollback again with --force to discard it"), line
    assert "reporting analyst" not in line and "@@" not in line
    # ... and the command it names shows what would be lost
    shown = re.search(r"\((diff -u \S+ \S+) shows what would be lost\)", line)
    assert shown, line
    diff = subprocess.run(shown[1].split(), capture_output=True, text=True, check=False)
    assert "-hostssl reporting analyst 10.9.0.0/16" in diff.stdout, diff.stdout
    assert hba_file.read_bytes() == edited and _ssl(fresh_cluster) == "on"
    assert not (tmp_path / "records").exists(), "a refused rollback left a record"
    forced = _rollback(path, fresh_cluster, "--force", *records)
    assert forced.returncode == 0, forced.stderr
    assert _ssl(fresh_cluster) == "off"


def test_a_dry_run_of_an_older_change_under_a_later_one_refuses_as_the_rollback_does(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, tmp_path: Path
) -> None:
    older = runbook_params(fresh_cluster, change_id="CHG-older")
    _steps_1_to_3(older)
    runbook.step4_enable_ssl(older)
    later = runbook_params(fresh_cluster, change_id="CHG-later")
    _steps_1_to_3(later)  # a new key and certificate over the older change's
    runbook.step4_enable_ssl(later)
    older_file, later_file = _params_file(older, tmp_path), _params_file(later, tmp_path)
    records = ("--records", str(tmp_path / "records"))
    before = _written(fresh_cluster, tmp_path)

    dry = _rollback(older_file, fresh_cluster, "--dry-run", *records)
    assert _written(fresh_cluster, tmp_path) == before, "the dry run wrote"
    real = _rollback(older_file, fresh_cluster, *records)
    # (the rollback took the lock, so only the data directory's mtime moved)
    assert _written(fresh_cluster, tmp_path)[0] == before[0], "the refused rollback wrote"
    assert not (tmp_path / "records").exists(), "a refused rollback left a record"
    # the same exit status and the same sentence: what the dry run lists, the rollback does
    assert (dry.returncode, dry.stdout, dry.stderr) == (real.returncode, real.stdout, real.stderr)
    assert real.returncode == 1 and real.stdout == ""
    (line,) = real.stderr.splitlines()
    crt = fresh_cluster.pgdata / "server.crt"
    assert str(crt) in line and "replaced by change CHG-later after change CHG-older" in line
    assert "roll back change CHG-later first" in line and "--force" in line, line
    assert "BEGIN CERTIFICATE" not in line and "diff -u" not in line

    # --force skips the check in the dry run as in the rollback: the back-out is listed
    before = _written(fresh_cluster, tmp_path)
    forced = _rollback(older_file, fresh_cluster, "--dry-run", "--force", *records)
    assert forced.returncode == 0, forced.stderr
    assert f"would be removed (created by the change): {crt}" in forced.stdout, forced.stdout
    assert _written(fresh_cluster, tmp_path) == before
    # in the order the fix names, both come back out
    for params_file in (later_file, older_file):
        back = _rollback(params_file, fresh_cluster, *records)
        assert back.returncode == 0, back.stdout + back.stderr
    assert _ssl(fresh_cluster) == "off"


def test_a_dry_run_while_another_change_holds_the_lock_refuses_as_the_rollback_does(
    fresh_cluster: LabCluster,
    runbook_params: ParamsFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    params = runbook_params(fresh_cluster)
    _steps_1_to_3(params)
    runbook.step4_enable_ssl(params)
    path = _params_file(params, tmp_path)
    records = ("--records", str(tmp_path / "records"))
    monkeypatch.setenv("PGTLS_LOCK_WAIT", "1")
    holder = Server({**params.conninfo(), "application_name": "pgtls CHG-other"})
    with holder, change_lock(fresh_cluster.pgdata, None, holder, "CHG-other"):
        before = _written(fresh_cluster, tmp_path)
        dry = _rollback(path, fresh_cluster, "--dry-run", *records)
        assert _written(fresh_cluster, tmp_path) == before
        real = _rollback(path, fresh_cluster, *records)
        assert _written(fresh_cluster, tmp_path) == before
    assert (dry.returncode, dry.stdout, dry.stderr) == (real.returncode, real.stdout, real.stderr)
    assert real.returncode == 1
    (line,) = real.stderr.splitlines()
    assert "change CHG-other (pid" in line and "is changing this server now" in line, line
    assert not (tmp_path / "records").exists(), "a refused rollback left a record"
    assert _ssl(fresh_cluster) == "on"
    # the holder gone, the dry run goes through as the rollback then does, and neither
    # leaves a lock file behind
    dry = _rollback(path, fresh_cluster, "--dry-run", *records)
    assert dry.returncode == 0 and "dry run: nothing restored" in dry.stdout, dry.stderr
    assert not (fresh_cluster.pgdata / "pgtls.lock").exists()
    back = _rollback(path, fresh_cluster, *records)
    assert back.returncode == 0, back.stderr
    assert _ssl(fresh_cluster) == "off" and not (fresh_cluster.pgdata / "pgtls.lock").exists()


def test_rollback_checks_its_result_and_fails_when_the_server_is_not_as_before(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, tmp_path: Path
) -> None:
    params = runbook_params(fresh_cluster)
    _steps_1_to_3(params)
    runbook.step4_enable_ssl(params)
    path = _params_file(params, tmp_path)
    # someone turns SSL on in postgresql.conf meanwhile: after the rollback SSL stays on
    with open(fresh_cluster.pgdata / "postgresql.conf", "a") as fh:
        fh.write("ssl = on\n")
    back = _rollback(path, fresh_cluster)
    assert back.returncode == 1
    assert "not as before: ssl is on, but it was off before the change" in back.stderr


def _client_home(client_user: str) -> Path:
    return Path(pwd.getpwnam(client_user).pw_dir)


def test_a_symlinked_root_crt_is_refused_and_nothing_is_read_through_it(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, client_user: str
) -> None:
    # case 6: root.crt linked to the data directory's key, with client_root_merge
    home = _client_home(client_user)
    shutil.rmtree(home / ".postgresql", ignore_errors=True)
    pgdir = home / ".postgresql"
    pgdir.mkdir(mode=0o700)
    info = pwd.getpwnam(client_user)
    os.chown(pgdir, info.pw_uid, info.pw_gid)
    secret = fresh_cluster.pgdata / "postgresql.conf"
    os.symlink(secret, pgdir / "root.crt")
    params = runbook_params(
        fresh_cluster, client_system_users=[client_user], client_root_merge=True
    )
    runbook.step1_key_and_csr(params)
    runbook.step2_ca_response(params)
    try:
        with pytest.raises(InputError, match="symbolic link"):
            runbook.step3_install_files(params)
        assert (pgdir / "root.crt").is_symlink()
        assert not (fresh_cluster.pgdata / "server.crt").exists()
    finally:
        shutil.rmtree(pgdir, ignore_errors=True)


def test_a_symlinked_dot_postgresql_is_refused_and_rollback_never_follows_a_swap(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, client_user: str, tmp_path: Path
) -> None:
    # case 7: ~/.postgresql is a link to another user's directory
    home = _client_home(client_user)
    shutil.rmtree(home / ".postgresql", ignore_errors=True)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "root.crt").write_text("someone else's root\n")
    os.symlink(victim, home / ".postgresql")
    params = runbook_params(fresh_cluster, client_system_users=[client_user])
    runbook.step1_key_and_csr(params)
    runbook.step2_ca_response(params)
    try:
        with pytest.raises(InputError, match="symbolic link"):
            runbook.step3_install_files(params)
        (home / ".postgresql").unlink()
        # a real directory now: the change installs root.crt ...
        runbook.step3_install_files(params)
        assert (home / ".postgresql" / "root.crt").is_file()
        # ... then the user swaps the directory for a link to the victim's
        shutil.rmtree(home / ".postgresql")
        os.symlink(victim, home / ".postgresql")
        path = _params_file(params, tmp_path)
        back = _rollback(path, fresh_cluster, "--force")
        assert back.returncode != 0
        assert "symbolic link" in back.stderr
        assert (victim / "root.crt").read_text() == "someone else's root\n"
    finally:
        if (home / ".postgresql").is_symlink():
            (home / ".postgresql").unlink()
        shutil.rmtree(home / ".postgresql", ignore_errors=True)


@pytest.mark.parametrize(
    "rule",
    [
        {"type": "hostssl", "method": "trust"},
        {"type": "host", "method": "scram-sha-256"},
    ],
)
def test_trust_and_plain_host_rules_are_refused_with_the_parameters_unless_allowed(
    lab_cluster: LabCluster, runbook_params: ParamsFactory, rule: dict[str, str]
) -> None:
    full = {"database": "all", "user": "all", "address": "10.0.0.0/8", **rule}
    with pytest.raises(InputError, match="set allow_insecure_rules: true if this rule"):
        runbook_params(lab_cluster, apply=False, hba_rules=[full])
    params = runbook_params(lab_cluster, apply=False)
    runbook.step1_key_and_csr(params)
    runbook.step2_ca_response(params)
    allowed = runbook_params(lab_cluster, apply=False, hba_rules=[full], allow_insecure_rules=True)
    assert not runbook.step4_enable_ssl(allowed).changed


def test_reject_lines_go_above_an_included_file_with_tcp_lines(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory
) -> None:
    # PostgreSQL 16+ reads include_dir in pg_hba.conf; 15 refuses the line, and so does the check
    conf_d = fresh_cluster.pgdata / "hba.d"
    conf_d.mkdir()
    (conf_d / "10-apps.conf").write_text("host all app 10.0.0.0/8 scram-sha-256\n")
    owner = fresh_cluster.pgdata.stat()
    for path in (conf_d, conf_d / "10-apps.conf"):
        os.chown(path, owner.st_uid, owner.st_gid)
    hba_file = fresh_cluster.pgdata / "pg_hba.conf"
    lines = hba_file.read_text().splitlines(keepends=True)
    first_host = next(i for i, ln in enumerate(lines) if ln.startswith("host "))
    lines.insert(first_host, "include_dir hba.d\n")
    hba_file.write_text("".join(lines))
    params = runbook_params(fresh_cluster)
    with psycopg.connect(**fresh_cluster.conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        major = int(str(conn.execute("SHOW server_version_num").fetchone()[0])) // 10000  # type: ignore[index]
    if major < 16:
        before = _files(fresh_cluster)
        runbook.step1_key_and_csr(params)
        runbook.step2_ca_response(params)
        with pytest.raises(PreflightError, match="the server would reject line"):
            runbook.step3_install_files(params)  # before the first write
        assert _files(fresh_cluster) == before
        return
    _steps_1_to_3(params)
    runbook.step4_enable_ssl(params)
    after = hba_file.read_text().splitlines()
    reject = next(i for i, ln in enumerate(after) if ln.startswith("hostnossl all"))
    assert reject < after.index("include_dir hba.d")
    assert _ssl(fresh_cluster) == "on"
