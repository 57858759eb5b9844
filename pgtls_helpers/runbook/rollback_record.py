"""A rollback as change management sees it: what it would put back (the dry run), and the
record it leaves next to the change's (``records/<change_id>/<stamp>/``, kind ``rollback``).

The checks and the back-out itself are :mod:`pgtls_helpers.runbook.rollback`'s
(:func:`~pgtls_helpers.runbook.rollback.checked_rollback`, then ``Backout.apply``); this module
only reads the change's journals beforehand to say what each file is (a file the change created
is removed, a file it replaced is restored from its backup), and records the result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgtls_helpers.errors import PgtlsError
from pgtls_helpers.runbook import record as rec
from pgtls_helpers.runbook.manifest import from_json
from pgtls_helpers.runbook.params import Params, redacted
from pgtls_helpers.runbook.rollback import Backout, checked_rollback
from pgtls_helpers.runbook.undo import NothingToRollBack

__all__ = ["BackoutItem", "backout_plan", "rollback_with_record", "trust_rollback_with_record"]

REMOVED = "removed (created by the change)"
RESTORED = "restored from its backup"


@dataclass(frozen=True)
class BackoutItem:
    """One file a rollback puts back."""

    target: str
    kind: str
    what: str  # REMOVED or RESTORED
    backup: str | None
    sha256_now: str | None  # what the change wrote

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def backout_plan(params: Params) -> tuple[list[BackoutItem], dict[str, str | None]]:
    """From the change's write-ahead journal: each file a rollback would put back, in the order
    it does (newest first), and the settings ``postgresql.auto.conf`` held before (what its
    restored bytes set back). Raises :class:`NothingToRollBack` when there is nothing to
    back out."""
    from pgtls_helpers.runbook import journal as wal

    entries = wal.read_entries(params.work.journal)
    if not entries:
        raise NothingToRollBack.of(params)
    items: list[BackoutItem] = []
    settings: dict[str, str | None] = {}
    for change in reversed(wal.file_changes(entries)):
        items.append(
            BackoutItem(
                target=str(change.target),
                kind=change.kind,
                what=REMOVED if change.backup is None else RESTORED,
                backup=str(change.backup) if change.backup else None,
                sha256_now=change.left_sha256[-1] if change.left_sha256 else None,
            )
        )
        for name, (previous, _new) in change.settings.items():
            settings[name] = previous
    return items, settings


def rollback_with_record(
    params: Params,
    *,
    params_file: Path,
    records_dir: Path,
    dry_run: bool = False,
    force: bool = False,
) -> tuple[dict[str, Any], Path | None]:
    """Back the change out (or, with ``dry_run``, only say what would be put back).

    Both make every check first (:func:`~pgtls_helpers.runbook.rollback.checked_rollback`:
    the journal, the change lock, later edits unless ``force``) and refuse alike, before
    anything is written. A real rollback then writes its record and rewrites the change's
    index, under the lock; a dry run writes nothing. Returns the manifest and the record
    directory (``None`` for a dry run).
    """
    t0 = time.monotonic()
    with checked_rollback(params, force=force, dry_run=dry_run) as backout:
        return _with_record(
            params,
            backout,
            params_file=params_file,
            records_dir=records_dir,
            dry_run=dry_run,
            t0=t0,
        )


def _with_record(
    params: Params,
    backout: Backout,
    *,
    params_file: Path,
    records_dir: Path,
    dry_run: bool,
    t0: float,
) -> tuple[dict[str, Any], Path | None]:
    from pgtls_helpers.runbook.snapshot import server_state

    items, settings = backout_plan(params)
    m = {
        **_header(params, params_file, items),
        "dry_run": dry_run,
        "settings": settings,
        "outcome": "planned" if dry_run else "ok",
    }
    if dry_run:
        return m, None
    record, started = rec.new_record_dir(records_dir, params.change_id)
    m["started_utc"] = started.isoformat(timespec="seconds")
    m["server_before"] = server_state(params)
    exit_error: PgtlsError | None = None
    try:
        result = backout.apply()
    except PgtlsError as exc:
        exit_error = exc
        m["outcome"], m["error"] = "failed", str(exc)
    else:
        done = {row["file"]: row["action"] for row in result.files}
        for f in m["files"]:
            f["done"] = f["target"] in done
            if done.get(f["target"]) == "already as before":
                f["what"] = "already as before"
        m["reloaded"] = result.reloaded
        m["server_running"] = result.ssl_after is not None
        m["problems"] = result.problems
        if result.problems:
            m["outcome"], m["error"] = "not-as-before", "; ".join(result.problems)
    m["server_after"] = server_state(params)
    return _sealed(record, m, t0, exit_error)


def _header(params: Params, params_file: Path, items: list[BackoutItem]) -> dict[str, Any]:
    return {
        "record_format": rec.RECORD_FORMAT,
        "kind": "rollback",
        "dry_run": False,
        "change_id": params.change_id,
        "server": f"{params.server_host}:{params.server_port}",
        "parameters_file": str(params_file),
        "parameters": redacted({"work_dir": params.work_dir, "change_id": params.change_id}),
        **rec.who_and_where(),
        "files": [i.as_dict() for i in items],
        "settings": {},
        "outcome": "ok",
        "error": None,
        "steps": [],
    }


def _sealed(
    record: Path, m: dict[str, Any], t0: float, exit_error: PgtlsError | None
) -> tuple[dict[str, Any], Path]:
    m["finished_utc"] = rec.utc().isoformat(timespec="seconds")
    m["seconds"] = round(time.monotonic() - t0, 2)
    m["versions"] = rec.versions()
    typed = from_json(m)  # the record's format (manifest.py): files become its backout
    rec.write_run_index(record, typed)
    rec.seal(record, typed)
    rec.write_change_index(record.parent)
    if exit_error is not None:
        raise RollbackFailed(str(exit_error), m, record)
    return m, record


#: what a client-trust rollback says instead of a reload: it never touches the server
TRUST_ONLY = "no server file was changed back and nothing was reloaded (a client-trust change)"


def trust_rollback_with_record(
    params: Params, *, params_file: Path, records_dir: Path
) -> tuple[dict[str, Any], Path]:
    """Back out a client-trust change (every ``root.crt`` it wrote, from its backup in the
    change's work directory) and leave a rollback record next to the change's, as a server
    rollback does. The checks come first (:func:`~pgtls_helpers.runbook.trust.trust_backout`),
    so a refusal leaves no record directory behind."""
    from pgtls_helpers.runbook.trust import rollback_trust, trust_backout

    t0 = time.monotonic()
    trust_backout(params)  # the same refusals as the rollback, before a record exists
    items, _settings = backout_plan(params)
    m = _header(params, params_file, items)
    record, started = rec.new_record_dir(records_dir, params.change_id)
    m["started_utc"] = started.isoformat(timespec="seconds")
    exit_error: PgtlsError | None = None
    try:
        restored = {str(p) for p in rollback_trust(params)}
    except PgtlsError as exc:
        exit_error = exc
        m["outcome"], m["error"] = "failed", str(exc)
    else:
        for f in m["files"]:
            f["done"] = f["target"] in restored or f["what"] == REMOVED
        m["reloaded"] = TRUST_ONLY
    return _sealed(record, m, t0, exit_error)


class RollbackFailed(PgtlsError):
    """A rollback that stopped; its record was still written."""

    def __init__(self, message: str, manifest: dict[str, Any], record: Path) -> None:
        super().__init__(f"{message}; record: {record / 'index.html'}")
        self.manifest = manifest
        self.record = record
