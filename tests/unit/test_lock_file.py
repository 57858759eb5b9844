"""The change lock's file: held by one change at a time, gone when the change is done."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from pgtls_helpers.errors import PreflightError
from pgtls_helpers.postgres.lock import LOCK_NAME, change_lock


def test_the_lock_file_names_the_holder_and_is_removed_after(tmp_path: Path) -> None:
    with change_lock(tmp_path, None, None, "CHG-1", wait=0):
        assert "CHG-1" in (tmp_path / LOCK_NAME).read_text()
        with pytest.raises(PreflightError, match="change CHG-1 .* is changing this server"):
            with change_lock(tmp_path, None, None, "CHG-2", wait=0):
                pass
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_waiter_takes_over_the_lock_when_the_holder_removes_the_file(tmp_path: Path) -> None:
    taken, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def second() -> None:
        try:
            with change_lock(tmp_path, None, None, "CHG-2", wait=10):
                taken.set()
                release.wait(10)
        except BaseException as exc:  # reported to the test below
            errors.append(exc)
            taken.set()

    with change_lock(tmp_path, None, None, "CHG-1", wait=0):
        waiter = threading.Thread(target=second)
        waiter.start()
        assert not taken.wait(0.5)  # it waits while the first holds the lock
    assert taken.wait(10) and not errors, errors
    # the waiter holds the file now at the path, not the one its first holder removed
    assert "CHG-2" in (tmp_path / LOCK_NAME).read_text()
    with pytest.raises(PreflightError, match="CHG-2"):
        with change_lock(tmp_path, None, None, "CHG-3", wait=0):
            pass
    release.set()
    waiter.join(10)
    assert not (tmp_path / LOCK_NAME).exists()
