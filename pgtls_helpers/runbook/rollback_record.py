"""A rollback as change management sees it: what it would put back (the dry run), and the
record it leaves next to the change's (``records/<change_id>/<stamp>/``, kind ``rollback``).

The back-out itself is :func:`pgtls_helpers.runbook.rollback.rollback_change`; this module only
reads the change's journals beforehand to say what each file is (a file the change created is
removed, a file it replaced is restored from its backup), and records the result.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgtls_helpers.errors import PgtlsError, PreflightError
from pgtls_helpers.runbook import record as rec
from pgtls_helpers.runbook.params import Params, redacted

__all__ = ["BackoutItem", "backout_plan", "rollback_with_record"]

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
    """From the change's journals: each file a rollback would put back, in the order it does
    (step 4's before step 3's), and the settings it would set back. Raises
    :class:`PreflightError` when there is nothing to back out."""
    enable_path, install_path = params.work.enable_journal, params.work.install_journal
    if not enable_path.exists() and not install_path.exists():
        raise PreflightError(
            f"{params.work.path}: no install or enable journal for change {params.change_id}; "
            "nothing was applied, or it was already rolled back"
        )
    items: list[BackoutItem] = []
    settings: dict[str, str | None] = {}
    try:
        if enable_path.exists():
            journal = json.loads(enable_path.read_text())
            settings = dict(journal.get("settings_previous", {}))
            items += _items([i for i in journal.get("files", []) if i.get("kind") == "hba"])
        if install_path.exists():
            entries = json.loads(install_path.read_text())
            items += _items(entries if isinstance(entries, list) else entries.get("files", []))
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise PreflightError(
            f"{params.work.path}: the change's journal cannot be read ({exc}); nothing was restored"
        ) from None
    return items, settings


def _items(entries: list[dict[str, Any]]) -> list[BackoutItem]:
    out = []
    for e in reversed(entries):
        if e.get("action") == "unchanged":
            continue
        out.append(
            BackoutItem(
                target=str(e["target"]),
                kind=str(e.get("kind", "")),
                what=REMOVED if not e.get("backup") else RESTORED,
                backup=e.get("backup"),
                sha256_now=e.get("sha256"),
            )
        )
    return out


def rollback_with_record(
    params: Params,
    *,
    params_file: Path,
    records_dir: Path,
    dry_run: bool = False,
) -> tuple[dict[str, Any], Path | None]:
    """Back the change out (or, with ``dry_run``, only say what would be put back).

    A real rollback writes its record and rewrites the change's index; a dry run writes
    nothing. Returns the manifest and the record directory (``None`` for a dry run).
    """
    from pgtls_helpers.runbook.rollback import rollback_change
    from pgtls_helpers.runbook.snapshot import server_state

    t0 = time.monotonic()
    items, settings = backout_plan(params)
    m: dict[str, Any] = {
        "record_format": rec.RECORD_FORMAT,
        "kind": "rollback",
        "dry_run": dry_run,
        "change_id": params.change_id,
        "server": f"{params.server_host}:{params.server_port}",
        "parameters_file": str(params_file),
        "parameters": redacted({"work_dir": params.work_dir, "change_id": params.change_id}),
        **rec.who_and_where(),
        "files": [i.as_dict() for i in items],
        "settings": settings,
        "outcome": "planned" if dry_run else "ok",
        "error": None,
        "steps": [],
    }
    if dry_run:
        return m, None
    record, started = rec.new_record_dir(records_dir, params.change_id)
    m["started_utc"] = started.isoformat(timespec="seconds")
    m["server_before"] = server_state(params)
    exit_error: PgtlsError | None = None
    try:
        result = rollback_change(params)
    except PgtlsError as exc:
        exit_error = exc
        m["outcome"], m["error"] = "failed", str(exc)
    else:
        done = {str(p) for p in getattr(result, "restored", [])}
        for f in m["files"]:
            f["done"] = f["target"] in done
        m["settings"] = dict(getattr(result, "settings", settings))
    m["server_after"] = server_state(params)
    m["finished_utc"] = rec.utc().isoformat(timespec="seconds")
    m["seconds"] = round(time.monotonic() - t0, 2)
    m["versions"] = rec.versions()
    rec.write_run_index(record, m)
    rec.seal(record, m)
    rec.write_change_index(record.parent)
    if exit_error is not None:
        raise RollbackFailed(str(exit_error), m, record)
    return m, record


class RollbackFailed(PgtlsError):
    """A rollback that stopped; its record was still written."""

    def __init__(self, message: str, manifest: dict[str, Any], record: Path) -> None:
        super().__init__(f"{message}; record: {record / 'index.html'}")
        self.manifest = manifest
        self.record = record
