"""The write-ahead journal read back: the first record of a file names its original, a torn
last line is ignored, unfinished steps are found, and a restore needs no server."""

from __future__ import annotations

import os
from pathlib import Path

from pgtls_helpers.postgres import files
from pgtls_helpers.runbook import journal as wal
from pgtls_helpers.runbook.workdir import WorkDir


def _plan(target: Path, data: bytes) -> files.PlannedFile:
    return files.plan_file(target, data, kind="certificate", mode=0o644)


def test_a_rerun_merges_and_restore_brings_back_the_first_original(tmp_path: Path) -> None:
    work = WorkDir(tmp_path / "work" / "CHG-1")
    target = tmp_path / "server.crt"
    target.write_bytes(b"original")
    first = wal.Journal.begin(work, "install", {"ssl": False})
    first.write_file(_plan(target, b"new"))
    # killed before its end; the rerun finds "new" in place ("unchanged") and writes a newer one
    second = wal.Journal.begin(work, "install", {"ssl": True})
    assert _plan(target, b"new").action == "unchanged"
    second.write_file(_plan(target, b"newer"))
    entries = wal.read_entries(work.journal)
    assert wal.before_state(entries)["ssl"] is False  # the first begin decides
    assert wal.unfinished_steps(entries) == ["install"]
    (change,) = wal.file_changes(entries)
    assert change.previous_sha256 == files.sha256_hex(b"original")
    assert files.sha256_hex(b"newer") in change.left_sha256
    restored = wal.restore_files(wal.file_changes(entries), work_key=work.key)
    assert [r.action for r in restored] == ["restored"]
    assert target.read_bytes() == b"original"


def test_a_file_the_change_created_is_removed(tmp_path: Path) -> None:
    work = WorkDir(tmp_path / "work" / "CHG-2")
    target = tmp_path / "server.crt"
    wal.Journal.begin(work, "install", {}).write_file(_plan(target, b"new"))
    entries = wal.read_entries(work.journal)
    (done,) = wal.restore_files(wal.file_changes(entries), work_key=work.key)
    assert done.action == "removed (created by the change)" and not target.exists()


def test_a_torn_last_line_is_ignored_and_intent_without_done_still_restores(
    tmp_path: Path,
) -> None:
    work = WorkDir(tmp_path / "work" / "CHG-3")
    target = tmp_path / "pg_hba.conf"
    target.write_bytes(b"before\n")
    journal = wal.Journal.begin(work, "enable", {})
    backup = journal._backup(target)
    journal.record(
        "file",
        target=str(target),
        kind="hba",
        backup=str(backup),
        previous_sha256=files.sha256_hex(b"before\n"),
        planned_sha256=files.sha256_hex(b"after\n"),
    )
    target.write_bytes(b"after\n")  # the write happened, the "done" never made it
    with open(work.journal, "ab") as fh:
        fh.write(b'{"seq": 3, "op": "do')
    entries = wal.read_entries(work.journal)
    assert entries[-1]["op"] == "file"
    wal.restore_files(wal.file_changes(entries), work_key=work.key)
    assert target.read_bytes() == b"before\n"


def test_entries_are_private_and_sealing_removes_the_backups(tmp_path: Path) -> None:
    work = WorkDir(tmp_path / "work" / "CHG-4")
    target = tmp_path / "server.key"
    target.write_bytes(b"old key")
    os.chmod(target, 0o600)
    wal.Journal.begin(work, "install", {}).write_file(
        files.plan_file(target, b"new key", kind="key", mode=0o600)
    )
    assert os.stat(work.journal).st_mode & 0o777 == 0o600
    assert os.stat(work.backups).st_mode & 0o777 == 0o700
    sealed = wal.seal(work, "rolled-back")
    assert sealed is not None and sealed.exists()
    assert not work.journal.exists() and not work.backups.exists()
