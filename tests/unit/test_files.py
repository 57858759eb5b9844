"""Atomic writes, backups and exact rollback on a real file system."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pgtls_helpers.postgres import files


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_is_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        files.atomic_write(tmp_path / "server.key", b"secret", mode=0o600)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "server.key") == 0o600
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]


def test_apply_backs_up_and_rollback_restores_bytes_and_mode(tmp_path: Path) -> None:
    crt = tmp_path / "server.crt"
    crt.write_bytes(b"old certificate")
    crt.chmod(0o640)
    new_key = tmp_path / "server.key"
    plan = [
        files.plan_file(crt, b"new certificate", kind="certificate", mode=0o644),
        files.plan_file(new_key, b"new key", kind="key", mode=0o600),
    ]
    assert [p.action for p in plan] == ["replace", "create"]
    result = files.apply_plan(plan, stamp="20260101T000000Z")
    assert crt.read_bytes() == b"new certificate" and _mode(crt) == 0o644
    backup = result.installed[0].backup
    assert backup is not None and backup.read_bytes() == b"old certificate"
    assert _mode(backup) == 0o640
    assert result.installed[0].previous_sha256 == files.sha256_hex(b"old certificate")

    files.rollback(result)
    assert crt.read_bytes() == b"old certificate" and _mode(crt) == 0o640
    assert not new_key.exists()


def test_same_bytes_owner_and_mode_is_unchanged(tmp_path: Path) -> None:
    target = tmp_path / "server.crt"
    files.atomic_write(target, b"x", mode=0o644)
    item = files.plan_file(target, b"x", kind="certificate", mode=0o644)
    assert item.action == "unchanged"
    result = files.apply_plan([item])
    assert not result.changed
    assert [p.name for p in tmp_path.iterdir()] == ["server.crt"]


def test_failed_write_rolls_back_the_writes_before_it(tmp_path: Path) -> None:
    good = tmp_path / "a.crt"
    good.write_bytes(b"original")
    missing_dir = tmp_path / "gone"
    missing_dir.mkdir()
    plan = [
        files.plan_file(good, b"changed", kind="certificate", mode=0o644),
        files.plan_file(missing_dir / "b.crt", b"new", kind="certificate", mode=0o644),
    ]
    missing_dir.rmdir()
    with pytest.raises(files.PgtlsError, match="nothing was changed"):
        files.apply_plan(plan)
    assert good.read_bytes() == b"original"


def test_journal_round_trip(tmp_path: Path) -> None:
    target = tmp_path / "server.crt"
    target.write_bytes(b"before")
    result = files.apply_plan([files.plan_file(target, b"after", kind="certificate", mode=0o644)])
    files.save_journal(result, tmp_path / "install.json")
    files.rollback(files.load_journal(tmp_path / "install.json"))
    assert target.read_bytes() == b"before"


def test_plan_describes_without_content(tmp_path: Path) -> None:
    item = files.plan_file(
        tmp_path / "server.key", b"-----BEGIN PRIVATE KEY-----", kind="key", mode=0o600
    )
    assert "PRIVATE" not in repr(item) and "PRIVATE" not in str(item.describe())
