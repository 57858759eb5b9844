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
import os
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
from pgtls_helpers.runbook.record import pgtls_command
from pgtls_helpers.runbook.undo import (
    NothingToRollBack,
    UndoResult,
    checked_journal,
    settings_need_server,
    undo_change,
)
from pgtls_helpers.runbook.workdir import WorkDir

__all__ = [
    "Backout",
    "NothingToRollBack",
    "RollbackConflict",
    "RollbackResult",
    "check_conflicts",
    "checked_rollback",
    "rollback_change",
]


class RollbackConflict(PreflightError):
    """A file was changed by someone else after the change; ``diff`` shows what would be lost
    (for a program; the terminal gets the sentence alone)."""

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
    if change.kind in ("key", "client.key"):
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


def check_conflicts(params: Params, changes: list[wal.FileChange] | None = None) -> None:
    """Raise :class:`RollbackConflict` when a file the change touched was edited since: the
    rollback would discard that work. The sentence names the files and the fix (roll back the
    later change first, or ``--force``); the diff is kept on the exception, off the terminal."""
    if changes is None:
        changes = checked_journal(params)[1]
    found = conflicts(changes)
    if not found:
        return
    later = [(c, _later_change(params, c)) for c, _ in found]
    by = sorted({b for _, b in later if b})
    by_hand = [c for c, b in later if not b]
    if len(by) == 1 and not by_hand:
        what = f"{', '.join(str(c.target) for c, _ in later)}: replaced by change {by[0]}"
    else:
        what = ", ".join(f"{c.target} (by change {b})" if b else str(c.target) for c, b in later)
        what += ": changed"
    fixes = []
    if by:
        whose = "its" if len(by) == 1 else "their"
        fixes.append(
            f"roll back change {' and '.join(by)} first ({pgtls_command()} rollback with "
            f"{whose} parameters file)"
        )
    if by_hand:
        shown = [
            f"diff -u {c.target} {c.backup}"
            for c in by_hand
            if c.backup and c.kind not in ("key", "client.key")
        ]
        fixes.append(
            "merge the edit by hand"
            + (f" ({' and '.join(shown)} shows what would be lost)" if shown else "")
        )
    raise RollbackConflict(
        f"{what} after change {params.change_id}, so rolling it back would discard that work "
        f"and nothing was restored; {', '.join(fixes)}, or run the rollback again with --force "
        "to discard it",
        "".join(d for _, d in found),
    )


def _later_change(params: Params, change: wal.FileChange) -> str | None:
    """The change (a folder beside this one in the work root, with an open journal) that
    replaced ``change.target`` after this change left it, if one did."""
    root = params.work.path.parent  # checked ours with the change's folder (WorkDir.check)
    try:
        folders = sorted(e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=False))
    except OSError:
        return None
    for name in folders:
        if name == params.work.path.name:
            continue
        try:
            entries = wal.read_entries(WorkDir(root / name).journal)
        except OSError:  # not a change's folder (the lab CA's, or not readable): not it
            continue
        for other in wal.file_changes(entries):
            if other.target == change.target and other.previous_sha256 in change.left_sha256:
                return name
    return None


@dataclass(frozen=True)
class Backout:
    """A rollback that passed every check, held by :func:`checked_rollback` under the
    change lock until :meth:`apply` writes."""

    params: Params
    server: Server | None  # None: the server is down or refuses us (files, then a signal)
    before: dict[str, object]  # the server as the journal recorded it before the change
    data_dir: Path | None
    log_at: int  # the server log's size before the rollback: what it logs is read from here

    def apply(self) -> RollbackResult:
        """Put every file back, reload, and check that the server is as before."""
        undone = undo_change(self.params, server=self.server, reason="rolled-back")
        res = _check(self.params, undone, self.before, self.log_at, self.data_dir)
        save_step(self.params, "rollback", res.summary())
        return res


@contextmanager
def checked_rollback(
    params: Params, *, force: bool = False, dry_run: bool = False
) -> Iterator[Backout]:
    """Every check a rollback makes before its first write, then the ``with`` block under the
    server's change lock: the work directory and the journal (:func:`checked_journal`), the
    lock (waited for ``PGTLS_LOCK_WAIT`` seconds, then refused naming its holder), files
    edited after the change (unless ``force``), and a server for settings only ``ALTER
    SYSTEM`` can reset. A dry run makes the same checks and gets the same refusals, but only
    looks at the lock (:func:`change_lock` with ``take=False``) and writes nothing.

    Raises :class:`NothingToRollBack` when the change has no journal, :class:`RollbackConflict`,
    or the :class:`PreflightError` / :class:`ServerError` of a check.
    """
    params.work.check()
    log_at = _log_size(params)
    server: Server | None = open_server(params)
    try:
        assert server is not None
        server.show("ssl")
    except PgtlsError:
        server = None
    try:
        data_dir: Path | None = None
        if server is None:  # the lock file is in the data directory the journal names
            data_dir = _data_dir(checked_journal(params)[2])
        # the lock before the journal is read: a run of this change (or another change) that
        # is still writing is waited for, and its journal read as that run left it
        with _rollback_lock(params, server, data_dir, take=not dry_run):
            _entries, changes, before = checked_journal(params)
            if not force:
                check_conflicts(params, changes)
            if server is None and (refused := settings_need_server(changes)) is not None:
                raise refused
            yield Backout(params, server, before, _data_dir(before), log_at)
    finally:
        if server is not None:
            server.close()


def rollback_change(params: Params, *, force: bool = False) -> RollbackResult:
    """Back out the change whose journal is in the work directory; see the module docstring.

    Raises what :func:`checked_rollback` raises, before anything is written: among them
    :class:`NothingToRollBack` and :class:`RollbackConflict` (unless ``force``).
    """
    with checked_rollback(params, force=force) as backout:
        return backout.apply()


def _data_dir(before: dict[str, object]) -> Path | None:
    return Path(str(before["data_directory"])) if before.get("data_directory") else None


@contextmanager
def _rollback_lock(
    params: Params, server: Server | None, data_dir: Path | None, *, take: bool
) -> Iterator[None]:
    """The server's change lock (the lock file alone when the server is down; nothing when
    this host cannot see the data directory either); with ``take`` False, only looked at."""
    if server is not None:
        facts = server.facts()
        if take or facts.data_directory.is_dir():
            directory, owner = lock_directory(params, facts)
        else:  # a dry run from another host: the work root's lock file, never a new root
            directory, owner = params.work.path.parent, None
        with change_lock(directory, owner, server, params.change_id, take=take):
            yield
    elif data_dir is not None and data_dir.is_dir():
        st = data_dir.stat()
        with change_lock(data_dir, (st.st_uid, st.st_gid), None, params.change_id, take=take):
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
