"""root.crt for client OS users: created private, replaced with a backup kept in the work
directory, or merged; a ~/.postgresql the change made goes again when it is emptied."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pgtls_helpers.lab import LabCA
from pgtls_helpers.postgres.clients import ClientUser, classify_error, plan_root_crt
from pgtls_helpers.postgres.files import Installed
from pgtls_helpers.runbook import journal as wal
from pgtls_helpers.runbook.journal import Journal
from pgtls_helpers.runbook.workdir import WorkDir

ROOT_A = LabCA.create(root_name="Root A").root
ROOT_B = LabCA.create(root_name="Root B").root


def _pem(cert: object) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return cert.public_bytes(Encoding.PEM)  # type: ignore[attr-defined, no-any-return]


def _user(tmp_path: Path) -> ClientUser:
    home = tmp_path / "home"
    home.mkdir()
    return ClientUser("bob", home, os.getuid(), os.getgid())


def _work(tmp_path: Path) -> WorkDir:
    return WorkDir(tmp_path / "work" / "c1")


def _install(tmp_path: Path, user: ClientUser, pem: bytes, *, merge: bool = False) -> Installed:
    """One root.crt write as step 3 makes it: journaled, in the user's own directory."""
    journal = Journal.begin(_work(tmp_path), "install", {})
    journal.client_dir(user)
    done = journal.write_file(plan_root_crt(user, pem, merge=merge))
    journal.end("ok")
    return done


def test_new_root_crt_in_a_private_directory(tmp_path: Path) -> None:
    user = _user(tmp_path)
    _install(tmp_path, user, _pem(ROOT_A))
    assert user.root_crt.read_bytes() == _pem(ROOT_A)
    assert stat.S_IMODE(user.root_crt.parent.stat().st_mode) == 0o700


def test_a_different_root_crt_is_kept_as_a_backup_in_the_work_directory(tmp_path: Path) -> None:
    user = _user(tmp_path)
    _install(tmp_path, user, _pem(ROOT_A))
    done = _install(tmp_path, user, _pem(ROOT_B))
    assert user.root_crt.read_bytes() == _pem(ROOT_B)
    assert done.backup is not None and done.backup.read_bytes() == _pem(ROOT_A)
    assert done.backup.parent == _work(tmp_path).backups
    assert sorted(p.name for p in user.root_crt.parent.iterdir()) == ["root.crt"]


def test_merge_keeps_the_old_root_and_adds_the_new_once(tmp_path: Path) -> None:
    user = _user(tmp_path)
    _install(tmp_path, user, _pem(ROOT_A))
    _install(tmp_path, user, _pem(ROOT_B), merge=True)
    again = _install(tmp_path, user, _pem(ROOT_B), merge=True)
    text = user.root_crt.read_bytes()
    assert text.count(b"BEGIN CERTIFICATE") == 2
    assert _pem(ROOT_A) in text and _pem(ROOT_B) in text
    assert again.action == "unchanged"


def test_restoring_removes_the_directory_the_change_made_once_empty(tmp_path: Path) -> None:
    user = _user(tmp_path)
    _install(tmp_path, user, _pem(ROOT_A))
    entries = wal.read_entries(_work(tmp_path).journal)
    wal.restore_files(wal.file_changes(entries), work_key=_work(tmp_path).key)
    removed = wal.remove_created_dirs(entries)
    assert [r.target for r in removed] == [user.root_crt.parent]
    assert not user.root_crt.parent.exists()


def test_a_directory_the_user_filled_again_stays(tmp_path: Path) -> None:
    user = _user(tmp_path)
    _install(tmp_path, user, _pem(ROOT_A))
    (user.root_crt.parent / "postgresql.crt").write_bytes(b"the user's own")
    entries = wal.read_entries(_work(tmp_path).journal)
    wal.restore_files(wal.file_changes(entries), work_key=_work(tmp_path).key)
    assert wal.remove_created_dirs(entries) == []
    assert (user.root_crt.parent / "postgresql.crt").read_bytes() == b"the user's own"
    assert not user.root_crt.exists()


def test_error_classes_follow_libpq_messages() -> None:
    assert classify_error("SSL error: certificate verify failed") == "certificate not trusted"
    assert (
        classify_error("server does not support SSL, but SSL was required") == "server has SSL off"
    )
    assert classify_error('password authentication failed for user "x"') == "password refused"
