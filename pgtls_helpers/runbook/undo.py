"""Undo a change from its write-ahead journal: files first (no server needed), then a reload.

Shared by a step that fails half-way (it undoes on the connection it opened before changing
anything) and by ``pgtls rollback`` (which may find the server down, or refusing every new
login because of what the change left).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pgtls_helpers.errors import PgtlsError, PreflightError, ServerError
from pgtls_helpers.postgres.server import Server, signal_reload
from pgtls_helpers.runbook import journal as wal
from pgtls_helpers.runbook.common import open_server
from pgtls_helpers.runbook.params import Params

__all__ = ["UndoResult", "undo_change"]

Reloaded = Literal["on the open connection", "on a new connection", "by signal", "server down"]


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


def undo_change(params: Params, *, server: Server | None, reason: str) -> UndoResult:
    """Put back every file the journal names, reset unreadable settings, reload, seal.

    ``server`` is the connection opened before the change (None: open one if the server lets
    us; if it does not, the postmaster is signalled as ``pg_ctl reload`` would).
    """
    entries = wal.read_entries(params.work.journal)
    if not entries:
        raise PreflightError(
            f"{params.work.path}: no journal for change {params.change_id}; nothing was "
            "applied, or it was already rolled back"
        )
    changes = wal.file_changes(entries)
    before = wal.before_state(entries)
    restored = wal.restore_files(changes, work_key=params.work.key)
    owned = server is None
    if server is None:
        try:
            server = open_server(params)
            server.show("ssl")
        except PgtlsError:
            server = None
    reset: dict[str, str | None] = {}
    try:
        for change in changes:
            if change.kind == "auto.conf" and not change.readable:
                if server is None:
                    raise ServerError(
                        f"{change.target} could not be read, so its settings can only be reset "
                        "through the server, which is not reachable; start it and run the "
                        "rollback again"
                    )
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
