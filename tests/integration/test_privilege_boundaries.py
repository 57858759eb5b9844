"""Root is never a lever: the attacks of a superuser role and of another OS user, attempted.

Each test makes a victim file the tool must not touch, attempts the attack the way an attacker
would (SQL as a superuser role, files prepared by an unprivileged OS user), and asserts the
victim's bytes, owner and mode are unchanged and the refusal is named.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from pgtls_helpers import notebook as runbook
from pgtls_helpers.errors import PreflightError
from pgtls_helpers.lab import LabCluster
from pgtls_helpers.runbook.params import Params
from pgtls_helpers.runbook.rollback import rollback_change
from tests.support import skip_or_fail

ParamsFactory = Callable[..., Params]


def _state(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return (hashlib.sha256(path.read_bytes()).hexdigest(), st.st_uid, st.st_gid, st.st_mode)


@pytest.fixture
def victim() -> Iterator[Path]:
    """A root-owned file in /etc that stands for /etc/shadow or a cron file."""
    if os.geteuid() != 0:
        skip_or_fail("the attacks are on root-owned files; run the tests as root")
    path = Path(f"/etc/pgtls-victim-{os.getpid()}")
    path.write_bytes(b"root:$6$do-not-touch:19000:0:99999:7:::\n")
    path.chmod(0o640)
    yield path
    path.unlink(missing_ok=True)


def _alter(cluster: LabCluster, **settings: str) -> None:
    with psycopg.connect(**cluster.conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        for name, value in settings.items():
            conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
        conn.execute("SELECT pg_reload_conf()")


@pytest.mark.parametrize("setting", ["ssl_cert_file", "ssl_key_file"])
def test_a_superuser_cannot_point_the_tls_files_at_a_root_file(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, victim: Path, setting: str
) -> None:
    # the attacker: a superuser role, through SQL only
    _alter(fresh_cluster, **{setting: str(victim)})
    before = _state(victim)
    params = runbook_params(fresh_cluster)
    runbook.step1_key_and_csr(params)
    runbook.step2_ca_response(params)
    with pytest.raises(PreflightError) as err:
        runbook.step3_install_files(params)
    message = str(err.value)
    assert setting in message and str(victim) in message
    assert "outside the data directory" in message and "server_file_targets" in message
    assert _state(victim) == before
    assert not params.work.journal.exists(), "refused before the first write"


def test_a_listed_target_is_still_refused_when_root_owns_it_with_another_group(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, victim: Path
) -> None:
    os.chown(victim, 0, 0)
    _alter(fresh_cluster, ssl_cert_file=str(victim))
    before = _state(victim)
    params = runbook_params(fresh_cluster, server_file_targets=[str(victim)])
    runbook.step1_key_and_csr(params)
    runbook.step2_ca_response(params)
    with pytest.raises(PreflightError, match="neither the server's OS user nor root"):
        runbook.step3_install_files(params)
    assert _state(victim) == before


def test_a_symlink_in_the_data_directory_is_not_followed(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, victim: Path
) -> None:
    # the attacker: the server's OS user, who owns the data directory
    link = fresh_cluster.pgdata / "evil.crt"
    subprocess.run(
        ["runuser", "-u", "postgres", "--", "ln", "-s", str(victim), str(link)], check=True
    )
    _alter(fresh_cluster, ssl_cert_file=str(link))
    before = _state(victim)
    params = runbook_params(fresh_cluster)
    runbook.step1_key_and_csr(params)
    runbook.step2_ca_response(params)
    with pytest.raises(PreflightError, match="ssl_cert_file"):
        runbook.step3_install_files(params)
    assert _state(victim) == before
    assert link.is_symlink()


def test_a_work_directory_another_user_prepared_is_refused(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, victim: Path, tmp_path: Path
) -> None:
    # the attacker: an unprivileged OS user (nobody) prepares work/<change_id> with a journal
    # that says the change created the victim, so rollback would remove it
    work = tmp_path / "work"
    work.mkdir(mode=0o755)
    change = work / "CHG-test"
    change.mkdir(mode=0o700)
    journal = change / "journal.jsonl"
    entries = [
        {"seq": 0, "op": "begin", "step": "install", "before": {"data_directory": "/etc"}},
        {"seq": 1, "op": "file", "step": "install", "target": str(victim), "kind": "key"},
    ]
    journal.write_text("".join(json.dumps(e) + "\n" for e in entries))
    nobody = 65534
    os.chown(change, nobody, nobody)
    os.chown(journal, nobody, nobody)
    before = _state(victim)
    params = runbook_params(fresh_cluster, work_dir=str(work))
    with pytest.raises(PreflightError, match="belongs to uid 65534"):
        rollback_change(params)
    assert _state(victim) == before


def test_a_forged_journal_in_our_own_work_directory_cannot_aim_rollback_outside(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, victim: Path, tmp_path: Path
) -> None:
    params = runbook_params(fresh_cluster)
    params.work.create()
    backups = params.work.backups
    backups.mkdir(mode=0o700)
    payload = backups / "server.key.pgtls-backup-x"
    payload.write_bytes(b"* * * * * root /tmp/owned\n")
    entries = [
        {
            "seq": 0,
            "op": "begin",
            "step": "install",
            "before": {"data_directory": str(fresh_cluster.pgdata)},
        },
        {
            "seq": 1,
            "op": "file",
            "step": "install",
            "target": str(victim),
            "kind": "key",
            "backup": str(payload),
            "previous_sha256": "0" * 64,
        },
    ]
    params.work.journal.write_text("".join(json.dumps(e) + "\n" for e in entries))
    before = _state(victim)
    with pytest.raises(PreflightError, match="outside the data directory"):
        rollback_change(params, force=True)
    assert _state(victim) == before


def test_a_client_swapping_its_postgresql_directory_for_a_link_never_wins(
    own_client_user: str, victim: Path
) -> None:
    from pgtls_helpers.errors import InputError
    from pgtls_helpers.postgres.clients import prepare_client_dir, resolve_client_users

    (user,) = resolve_client_users([own_client_user])
    directory = user.root_crt.parent
    before = _state(victim)
    # the attacker: the client OS user, flipping ~/.postgresql between nothing and a link to
    # the victim as fast as it can, for several seconds
    swapper = subprocess.Popen(
        [
            "runuser",
            "-u",
            own_client_user,
            "--",
            "timeout",
            "6",
            "sh",
            "-c",
            f'while :; do rm -rf "{directory}"; ln -s "{victim}" "{directory}" 2>/dev/null; '
            f'rm -f "{directory}"; done',
        ]
    )
    tries = refused = 0
    try:
        while swapper.poll() is None:
            tries += 1
            try:
                prepare_client_dir(user)
            except (InputError, OSError):
                refused += 1
            assert _state(victim) == before
    finally:
        swapper.wait(timeout=10)
    assert tries > 50, f"only {tries} attempts ran in the race"
    assert _state(victim) == before
    if directory.exists() and not directory.is_symlink():
        assert directory.stat().st_uid == user.uid


def test_a_login_role_that_is_not_a_superuser_cannot_block_changes(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pgtls_helpers.postgres.lock import ADVISORY_KEY

    with psycopg.connect(**fresh_cluster.conninfo(), autocommit=True) as admin:  # type: ignore[arg-type]
        admin.execute("CREATE ROLE lesser LOGIN PASSWORD 'lesser-pw'")
    params = runbook_params(fresh_cluster)
    runbook.step1_key_and_csr(params)
    runbook.step2_ca_response(params)
    monkeypatch.setenv("PGTLS_LOCK_WAIT", "1")
    lesser = {**fresh_cluster.conninfo(), "user": "lesser", "password": "lesser-pw"}
    with psycopg.connect(**lesser, autocommit=True) as attacker:  # type: ignore[arg-type]
        attacker.execute("SET application_name = 'pgtls CHG-someone-else'")
        attacker.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_KEY,))
        result = runbook.step3_install_files(params)
    assert result.changed


def test_rollback_gives_a_clients_root_crt_back_with_its_mode_and_owner(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, own_client_user: str
) -> None:
    from pgtls_helpers.postgres.clients import resolve_client_users

    (user,) = resolve_client_users([own_client_user])
    directory = user.root_crt.parent
    directory.mkdir(mode=0o700)
    os.chown(directory, user.uid, user.gid)
    user.root_crt.write_bytes(b"the user's own roots\n")
    os.chown(user.root_crt, user.uid, user.gid)
    user.root_crt.chmod(0o600)
    before = _state(user.root_crt)
    params = runbook_params(fresh_cluster, client_system_users=[own_client_user])
    runbook.step1_key_and_csr(params)
    runbook.step2_ca_response(params)
    runbook.step3_install_files(params)
    assert _state(user.root_crt) != before
    assert rollback_change(params).ok
    assert _state(user.root_crt) == before


def test_a_link_swapped_into_a_server_files_path_never_redirects_the_write(
    tmp_path: Path,
) -> None:
    """The server's OS user owns directories on the way to the data directory; flipping one
    between a directory and a link to a root-owned folder never gets root to write there."""
    from pgtls_helpers.errors import PreflightError
    from pgtls_helpers.postgres import files

    if os.geteuid() != 0:
        skip_or_fail("the attack is on a root-owned directory; run the tests as root")
    victim_dir = Path(f"/etc/pgtls-victim-dir-{os.getpid()}")
    victim_dir.mkdir(mode=0o755)
    try:
        base = tmp_path / "pg"
        base.mkdir()
        base.chmod(0o755)
        tmp_path.chmod(0o755)
        nobody = 65534
        os.chown(base, nobody, nobody)
        data = base / "main"
        swapper = subprocess.Popen(
            [
                "runuser",
                "-u",
                "nobody",
                "--",
                "timeout",
                "5",
                "sh",
                "-c",
                f'while :; do rm -rf "{data}"; mkdir "{data}"; rm -rf "{data}"; '
                f'ln -s "{victim_dir}" "{data}"; done',
            ]
        )
        tries = written = 0
        try:
            while swapper.poll() is None:
                tries += 1
                try:
                    files.atomic_write(data / "server.crt", b"cert\n", mode=0o644, exact=True)
                    written += 1
                except (PreflightError, OSError):
                    pass
                assert not list(victim_dir.iterdir()), "root wrote through the link"
        finally:
            swapper.wait(timeout=10)
        assert tries > 100, f"only {tries} attempts ran in the race"
        assert not list(victim_dir.iterdir())
        # a link in place is refused outright; a path-based write would have followed it
        if data.is_symlink() or data.is_file():
            data.unlink()
        elif data.is_dir():
            data.rmdir()
        data.symlink_to(victim_dir)
        with pytest.raises(PreflightError, match="symbolic link appeared"):
            files.atomic_write(data / "server.crt", b"cert\n", mode=0o644, exact=True)
        assert not list(victim_dir.iterdir())
        files.atomic_write(data / "server.crt", b"cert\n", mode=0o644)
        assert [p.name for p in victim_dir.iterdir()] == ["server.crt"], "the attack is real"
    finally:
        for p in victim_dir.iterdir():
            p.unlink()
        victim_dir.rmdir()


def test_the_hba_checks_cache_taken_first_by_another_user_is_replaced_not_used(
    fresh_cluster: LabCluster,
) -> None:
    from pgtls_helpers.postgres import hbacheck

    if os.geteuid() != 0:
        skip_or_fail("the attacker is another OS user; run the tests as root")
    st = fresh_cluster.pgdata.stat()
    bindir = hbacheck.server_bindir(fresh_cluster.pgdata)
    home = Path("/var/tmp") / f"pgtls-hbacheck-{hbacheck._major(bindir)}-{st.st_uid}"
    subprocess.run(["rm", "-rf", str(home)], check=True)
    # the attacker: nobody takes the name first, with a world-readable "cluster" of its own
    planted = home / "data" / "PG_VERSION"
    subprocess.run(
        [
            "runuser",
            "-u",
            "nobody",
            "--",
            "sh",
            "-c",
            f'mkdir -p "{planted.parent}" && echo 15 > "{planted}" && chmod -R 0777 "{home}"',
        ],
        check=True,
    )
    text = (fresh_cluster.pgdata / "pg_hba.conf").read_text()
    lines = hbacheck.check_hba_text(
        text,
        hba_file=fresh_cluster.pgdata / "pg_hba.conf",
        data_directory=fresh_cluster.pgdata,
        owner=(st.st_uid, st.st_gid),
    )
    assert lines, "the check parsed the file"
    now = home.lstat()
    assert (now.st_uid, now.st_mode & 0o077) == (st.st_uid, 0), "the cache is the server user's"
    assert planted.read_text() != "15\n" or planted.stat().st_uid == st.st_uid
