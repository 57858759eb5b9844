"""Undo a change from its write-ahead journal: files first (no server needed), then a reload.

Shared by a step that fails half-way (it undoes on the connection it opened before changing
anything) and by ``pgtls rollback`` (which may find the server down, or refusing every new
login because of what the change left).
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pgtls_helpers.errors import PgtlsError, PreflightError, ServerError
from pgtls_helpers.postgres.server import Server, signal_reload
from pgtls_helpers.postgres.targets import TargetPolicy
from pgtls_helpers.runbook import journal as wal
from pgtls_helpers.runbook.common import open_server
from pgtls_helpers.runbook.params import Params

__all__ = [
    "NothingToRollBack",
    "UndoResult",
    "checked_journal",
    "journal_target_problems",
    "settings_need_server",
    "undo_change",
]


class NothingToRollBack(PreflightError):
    """The change has no open journal: it was never applied, or it was already rolled back
    (or undone by its own run). Not a failure: ``pgtls rollback`` says so and exits 0."""

    @classmethod
    def of(cls, params: Params) -> NothingToRollBack:
        """The sentence for this change, naming the journal that closed it, if any."""
        sealed = wal.last_sealed(params.work)
        if sealed is None:
            why = f"{params.work.path} holds no journal of it, so it was never applied"
        elif sealed[0] == "rolled-back":
            why = f"it was already rolled back ({sealed[1]})"
        else:
            why = f"its run put everything back itself ({sealed[1]})"
        return cls(f"change {params.change_id}: nothing to roll back; {why}")


Reloaded = Literal[
    "on the open connection", "on a new connection", "by signal", "server down", "not needed"
]


@dataclass(frozen=True)
class UndoResult:
    """What was put back, and how the server was told."""

    restored: list[wal.Restored]
    settings_reset: dict[str, str | None]
    reloaded: Reloaded
    sealed: Path | None
    before: dict[str, object] = field(default_factory=dict)


def _data_directory(before: dict[str, object], changes: list[wal.FileChange]) -> Path | None:
    if before.get("data_directory"):
        return Path(str(before["data_directory"]))
    for change in changes:
        if change.kind == "auto.conf":
            return change.target.parent
    return None


def journal_target_problems(
    params: Params, changes: list[wal.FileChange], before: dict[str, object]
) -> list[str]:
    """Every journal target the target policy of apply would refuse, as sentences.

    The journal is the change's own (the work directory is checked to be ours), yet its
    targets are judged again: rollback writes as root exactly where a journal says.
    """
    data_dir = _data_directory(before, changes)
    raw_config = before.get("config_files")
    raw_owner = before.get("server_owner")
    owner = (
        (int(raw_owner[0]), int(raw_owner[1]))
        if isinstance(raw_owner, list) and len(raw_owner) == 2
        else (os.geteuid(), os.getegid())
    )
    policy = TargetPolicy.of(
        data_directory=data_dir or "/nonexistent",
        config_files=[str(f) for f in raw_config] if isinstance(raw_config, list) else [],
        listed=params.server_file_targets,
        owner=owner,
    )
    problems = []
    backups = Path(os.path.realpath(params.work.backups))
    for change in changes:
        if change.backup is not None and (
            Path(os.path.realpath(change.backup.parent)) != backups or change.backup.is_symlink()
        ):
            problems.append(
                f"{change.backup}: not a backup in this change's own {params.work.backups}"
            )
        if change.kind in wal.CLIENT_KINDS:
            # a client's file: only ~/.postgresql/<name> of the user whose uid it carries
            try:
                home = Path(pwd.getpwuid(change.uid if change.uid is not None else -1).pw_dir)
            except (KeyError, OverflowError):
                problems.append(f"{change.target}: the journal names no existing client user")
                continue
            if change.target.parent != home / ".postgresql":
                problems.append(
                    f"{change.target}: not in ~/.postgresql of uid {change.uid}, the user the "
                    "journal names"
                )
            continue
        if problem := policy.problem(change.target, setting=f"the journal's {change.kind} file"):
            problems.append(problem)
    return problems


def _client_home(uid: int) -> Path | None:
    try:
        return Path(pwd.getpwuid(uid).pw_dir) / ".postgresql"
    except (KeyError, OverflowError):
        return None


def checked_journal(
    params: Params,
) -> tuple[list[wal.Entry], list[wal.FileChange], dict[str, object]]:
    """The change's journal, once the work directory is known to be ours and every target
    passes the target policy; raises with one sentence otherwise (nothing read or written)."""
    params.work.check()
    entries = wal.read_entries(params.work.journal)
    if not entries:
        raise NothingToRollBack.of(params)
    changes = wal.file_changes(entries)
    before = wal.before_state(entries)
    problems = journal_target_problems(params, changes, before)
    for directory, uid in wal.created_dirs(entries):
        if _client_home(uid) is None or directory != _client_home(uid):
            problems.append(f"{directory}: not ~/.postgresql of uid {uid}, the user it names")
    if problems:
        raise PreflightError(
            f"{params.work.journal}: {'; '.join(problems)}; nothing was rolled back"
        )
    return entries, changes, before


def settings_need_server(changes: list[wal.FileChange]) -> ServerError | None:
    """The refusal when the server is not reachable: settings the change made in a
    ``postgresql.auto.conf`` that could not be read are reset only by ``ALTER SYSTEM``."""
    for change in changes:
        if change.kind == "auto.conf" and not change.readable:
            return ServerError(
                f"{change.target} could not be read, so its settings can only be reset "
                "through the server, which is not reachable; start it and run the "
                "rollback again"
            )
    return None


def undo_change(params: Params, *, server: Server | None, reason: str) -> UndoResult:
    """Put back every file the journal names, reset unreadable settings, reload, seal.

    ``server`` is the connection opened before the change (None: open one if the server lets
    us; if it does not, the postmaster is signalled as ``pg_ctl reload`` would).
    """
    entries, changes, before = checked_journal(params)
    restored = wal.restore_files(changes, work_key=params.work.key)
    restored += wal.remove_created_dirs(entries)
    if wal.is_client_trust(entries):  # roots only: the server was never touched
        sealed = wal.seal(params.work, reason)
        return UndoResult(restored, {}, "not needed", sealed, before)
    owned = server is None
    if server is None:
        try:
            server = open_server(params)
            server.show("ssl")
        except PgtlsError:
            server = None
    reset: dict[str, str | None] = {}
    try:
        refused = settings_need_server(changes) if server is None else None
        if refused is not None:
            raise refused
        for change in changes:
            if server is not None and change.kind == "auto.conf" and not change.readable:
                for name, (previous, _new) in change.settings.items():
                    server.alter_system(name, previous)
                    reset[name] = previous
        how: Reloaded = "server down"
        if server is not None:
            try:
                server.reload_confirmed()
                how = "on a new connection" if owned else "on the open connection"
            except ServerError:
                server = None if owned else server
        if how == "server down":
            data_dir = _data_directory(before, changes)
            if data_dir is not None and signal_reload(data_dir):
                how = "by signal"
    finally:
        if owned and server is not None:
            server.close()
    sealed = wal.seal(params.work, reason)
    return UndoResult(
        restored=restored, settings_reset=reset, reloaded=how, sealed=sealed, before=before
    )
