"""Back out a change from its write-ahead journal, and check that the server is as before.

Works whatever the journal holds (a finished change, a step killed half-way, a rerun on top of
one), with the server up, refusing new logins, or down: the files come back from their byte
backups first, then the server is told (on a connection, else by signal, else the operator is
asked to start it), then the result is checked against what the journal recorded before the
change: ``ssl``, the certificate served (or none), ``pg_file_settings`` and ``pg_hba.conf``
errors, and the server log.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pgtls_helpers.errors import PgtlsError, PreflightError
from pgtls_helpers.postgres.lock import change_lock
from pgtls_helpers.postgres.server import Server
from pgtls_helpers.runbook import journal as wal
from pgtls_helpers.runbook.common import (
    address_of,
    fingerprint_of,
    lock_directory,
    open_server,
    save_step,
)
from pgtls_helpers.runbook.params import Params
from pgtls_helpers.runbook.undo import UndoResult, checked_journal, undo_change

__all__ = ["RollbackConflict", "RollbackResult", "check_conflicts", "rollback_change"]


class RollbackConflict(PreflightError):
    """A file was changed by someone else after the change; ``diff`` shows what would be lost."""

    def __init__(self, message: str, diff: str):
        super().__init__(message)
        self.diff = diff


@dataclass(frozen=True)
class RollbackResult:
    """What a back-out restored, how the server was told, and how it answers afterwards."""

    restored: list[str]
    settings: dict[str, str | None]
    reloaded: str
    ssl_after: bool | None
    presented: list[dict[str, str]]
    problems: list[str] = field(default_factory=list)
    files: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict[str, object]:
        return {**self.__dict__, "ok": self.ok}


def conflicts(changes: list[wal.FileChange]) -> list[tuple[wal.FileChange, str]]:
    """Files whose content is neither what the change left nor the original: later work."""
    out = []
    for change in changes:
        current = change.current_sha256()
        if current is None or current == change.previous_sha256:
            continue
        if current in change.left_sha256 or (change.kind == "auto.conf" and not change.readable):
            continue
        if change.kind == "auto.conf" and not change.left_sha256:
            continue  # killed inside ALTER SYSTEM: the new file's hash was never recorded
        out.append((change, _diff(change)))
    return out


def _diff(change: wal.FileChange) -> str:
    if change.kind in ("key",):
        return f"{change.target}: changed since the change (content not shown)\n"
    try:
        now = change.target.read_text().splitlines(keepends=True)
        was = change.backup.read_text().splitlines(keepends=True) if change.backup else []
    except (OSError, UnicodeDecodeError):
        return f"{change.target}: changed since the change (binary)\n"
    return "".join(
        difflib.unified_diff(
            now, was, fromfile=f"{change.target} (now)", tofile=f"{change.target} (after rollback)"
        )
    )


def check_conflicts(params: Params) -> None:
    """Raise :class:`RollbackConflict` (with the diff) when a file the change touched was
    edited since: the rollback would discard that work."""
    _entries, changes, _before = checked_journal(params)
    found = conflicts(changes)
    if found:
        names = ", ".join(str(c.target) for c, _ in found)
        raise RollbackConflict(
            f"{names}: changed after change {params.change_id} (see the diff); the rollback "
            "would discard that work, so nothing was restored; merge it by hand or run the "
            "rollback again with --force",
            "".join(d for _, d in found),
        )


def rollback_change(params: Params, *, force: bool = False) -> RollbackResult:
    """Back out the change whose journal is in the work directory; see the module docstring.

    Raises :class:`PreflightError` when there is nothing to back out, and
    :class:`RollbackConflict` when a file was edited after the change (unless ``force``).
    """
    params.work.check()
    log_at = _log_size(params)
    server: Server | None = open_server(params)
    try:
        assert server is not None
        server.show("ssl")
    except PgtlsError:
        server = None
    data_dir: Path | None = None
    if server is None:  # the lock file is in the data directory the journal names
        _entries, _changes, before = checked_journal(params)
        data_dir = Path(str(before["data_directory"])) if before.get("data_directory") else None
    try:
        # the lock before the journal is read: a run of this change (or another change) that
        # is still writing is waited for, and its journal read as that run left it
        with _rollback_lock(params, server, data_dir):
            _entries, _changes, before = checked_journal(params)
            data_dir = Path(str(before["data_directory"])) if before.get("data_directory") else None
            if not force:
                check_conflicts(params)
            undone = undo_change(params, server=server, reason="rolled-back")
    finally:
        if server is not None:
            server.close()
    res = _check(params, undone, before, log_at, data_dir)
    save_step(params, "rollback", res.summary())
    return res


@contextmanager
def _rollback_lock(params: Params, server: Server | None, data_dir: Path | None) -> Iterator[None]:
    """The server's change lock (the lock file alone when the server is down; nothing when
    this host cannot see the data directory either)."""
    if server is not None:
        facts = server.facts()
        directory, owner = lock_directory(params, facts)
        with change_lock(directory, owner, server, params.change_id):
            yield
    elif data_dir is not None and data_dir.is_dir():
        st = data_dir.stat()
        with change_lock(data_dir, (st.st_uid, st.st_gid), None, params.change_id):
            yield
    else:
        yield


def _log_size(params: Params) -> int:
    try:
        return Path(params.server_log_file).stat().st_size if params.server_log_file else 0
    except OSError:
        return 0


def _check(
    params: Params,
    undone: UndoResult,
    before: dict[str, object],
    log_at: int,
    data_dir: Path | None,
) -> RollbackResult:
    """Is the server as the journal says it was before the change?"""
    from pgtls_helpers.postgres.probe import chain_rows, probe

    restored = [str(r.target) for r in undone.restored if r.action in wal.CHANGED_BACK]
    rows = [{"file": str(r.target), "action": r.action} for r in undone.restored]
    problems: list[str] = []
    if undone.reloaded == "server down":
        return RollbackResult(
            restored=restored,
            settings=undone.settings_reset,
            reloaded="the server is not running: every file is back as before; start the "
            "server (pg_ctl start) and it comes up as it was",
            ssl_after=None,
            presented=[],
            problems=[],
            files=rows,
        )
    ssl_after: bool | None = None
    deadline = time.monotonic() + 15.0
    while True:
        try:
            with open_server(params) as fresh:
                if undone.reloaded == "by signal":
                    time.sleep(0.5)
                ssl_after = fresh.show("ssl") == "on"
                problems += [f"pg_file_settings: {e}" for e in fresh.file_setting_errors()]
                problems += [f"pg_hba.conf {e}" for e in fresh.hba_errors()]
            break
        except PgtlsError as exc:
            if time.monotonic() > deadline:
                problems.append(f"no new connection after the rollback: {exc}")
                break
            time.sleep(0.3)
    if "ssl" in before and ssl_after is not None and ssl_after != bool(before["ssl"]):
        problems.append(
            f"ssl is {'on' if ssl_after else 'off'}, but it was "
            f"{'on' if before['ssl'] else 'off'} before the change"
        )
    after = probe(address_of(params.server_host), params.server_port, timeout=5.0)
    served = fingerprint_of(after.chain[0]) if after.error is None and after.chain else None
    if "served_sha256" in before and served != before.get("served_sha256"):
        problems.append(
            "the server presents "
            + (f"certificate {served[:16]}…" if served else "no certificate")
            + ", not the one it presented before the change"
        )
    problems += _log_problems(params, log_at)
    return RollbackResult(
        restored=restored,
        settings=undone.settings_reset,
        reloaded=f"reloaded {undone.reloaded}",
        ssl_after=ssl_after,
        presented=chain_rows(after) if after.ok else [],
        problems=problems,
        files=rows,
    )


def _log_problems(params: Params, since: int) -> list[str]:
    if not params.server_log_file:
        return []
    try:
        with open(params.server_log_file, "rb") as fh:
            fh.seek(since)
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return []
    bad = ("could not load", "was not reloaded", "private key file")
    return [f"server log: {ln.strip()}" for ln in lines if any(b in ln for b in bad)]
