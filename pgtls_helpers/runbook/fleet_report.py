"""What a fleet run did, host by host, read from the records the playbook brought home.

``fleet/pgtls.yml`` (and ``fleet/rollback.yml``, ``fleet/renew.yml``) leave, on the control
machine::

    records/<change_id>/fleet-runs/<run>.json        the run: playbook, hosts of the play, …
    records/<change_id>/<host>/<stamp>/               a host's record, as `pgtls run` wrote it
    records/<change_id>/<host>/<stamp>.fleet.json     the fleet's note: run, wave, phase, exit
                                                      (a renewal's: its verdict and sentence)

:func:`load_fleet_report` turns the latest run (or a named one) into one row per host of the
play: wave, outcome, failing step and reason, the fingerprint the server now presents and its
days left, the connection checks passed, and where the record is; hosts the run never reached
are rows too. A renewal run's rows say *not due* (with renew's sentence, no record), *renewed*,
*CA unavailable*, *CA refused* or *failed*. A host's record is read as the typed
:class:`~pgtls_helpers.runbook.manifest.Manifest` (any format; what it lacks reads as missing).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from pgtls_helpers.errors import InputError
from pgtls_helpers.runbook.manifest import JsonObject, Manifest
from pgtls_helpers.runbook.record import read_manifest

__all__ = ["FleetReport", "HostRow", "load_fleet_report"]

Json = dict[str, object]


@dataclass(frozen=True)
class HostRow:
    """One host of the play in one fleet run."""

    host: str
    reached: bool
    outcome: str  # ok, waiting-for-ca, planned, failed, rolled-back, nothing to roll back,
    # not reached; a renewal's: not due, renewed, CA unavailable, CA refused
    wave: int | None = None
    phase: str | None = None
    failed_step: str | None = None
    reason: str | None = None
    fingerprint: str | None = None
    days_left: int | None = None
    checks_passed: int | None = None
    checks_total: int | None = None
    record: str | None = None  # the record folder, relative to records/<change_id>/
    page: str | None = None  # the page to open first, relative to records/<change_id>/

    @property
    def good(self) -> bool:
        return self.outcome in (
            "ok",
            "waiting-for-ca",
            "planned",
            "rolled-back",
            "nothing to roll back",
            "not due",
            "renewed",
        )


@dataclass(frozen=True)
class FleetReport:
    """A fleet run: what ran, and a row per host."""

    change_id: str
    directory: Path
    run: str
    playbook: str
    check_mode: bool
    started_utc: str | None
    max_fail_percentage: int | None
    rows: tuple[HostRow, ...]
    other_runs: tuple[str, ...]

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.rows:
            out[row.outcome] = out.get(row.outcome, 0) + 1
        return out

    @property
    def all_good(self) -> bool:
        return all(r.good for r in self.rows)

    def as_dict(self) -> Json:
        return {
            "change_id": self.change_id,
            "run": self.run,
            "playbook": self.playbook,
            "check_mode": self.check_mode,
            "started_utc": self.started_utc,
            "max_fail_percentage": self.max_fail_percentage,
            "counts": self.counts,
            "hosts": [asdict(r) for r in self.rows],
            "other_runs": list(self.other_runs),
        }


def _read_json(path: Path) -> Json | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _first_page(record: Path, failed: str | None) -> Path | None:
    for name in ("index.html", f"{failed}.html" if failed else ""):
        if name and (record / name).is_file():
            return record / name
    pages = sorted(record.glob("*.html"))
    return pages[-1] if pages else None


@dataclass(frozen=True)
class _Facts:
    """What a host's row takes from its record."""

    outcome: str
    failed_step: str | None = None
    failed_id: str | None = None
    reason: str | None = None
    fingerprint: str | None = None
    days_left: int | None = None
    checks_passed: int | None = None
    checks_total: int | None = None


def _from_manifest(m: Manifest, now: datetime) -> _Facts:
    failed = m.failed_step
    failed_step = f"{failed.step} {failed.title}".strip() if failed else None
    failed_id = failed.step if failed else None
    reason = failed.error if failed else None
    outcome = m.outcome
    if m.kind == "rollback":
        outcome = {"ok": "rolled-back", "planned": "planned", "nothing": "rolled-back"}.get(
            outcome, outcome
        )
        if outcome == "failed":
            failed_step, failed_id, reason = "rollback", "rollback", m.error
    elif outcome == "ok" and not m.apply:
        outcome = "planned"
    served = m.presented_chain[0] if m.presented_chain else None
    fingerprint = served.sha256 if served and served.sha256 else None
    leaf = next((c for c in m.certificates if c.role == "leaf" and c.sha256 == fingerprint), None)
    return _Facts(
        outcome=outcome,
        failed_step=failed_step,
        failed_id=failed_id,
        reason=reason or m.error,
        fingerprint=fingerprint,
        days_left=leaf.days_left(now) if leaf else None,
        checks_passed=m.checks_passed if m.checks else None,
        checks_total=len(m.checks) if m.checks else None,
    )


@dataclass(frozen=True)
class _Note:
    """The fleet's note beside a host's record (``<stamp>.fleet.json``)."""

    run: str
    wave: int | None
    phase: str | None
    last_error: str | None
    record: str | None
    exit_code: int | None
    outcome: str | None  # fleet/renew.yml's verdict for the host
    said: str | None  # and renew's sentence

    @classmethod
    def read(cls, path: Path) -> _Note | None:
        data = _read_json(path)
        if data is None:
            return None
        j = JsonObject(data)
        stderr = j.strs("stderr")
        return cls(
            run=j.text("run"),
            wave=j.num("wave"),
            phase=j.opt("phase") or None,
            last_error=stderr[-1] if stderr else None,
            record=j.opt("record"),
            exit_code=j.num("exit_code"),
            outcome=j.opt("outcome") or None,
            said=j.opt("said") or None,
        )


def _row(host: str, host_dir: Path, run: str, base: Path, now: datetime) -> HostRow:
    notes = [
        note
        for path in sorted(host_dir.glob("*.fleet.json"))
        if (note := _Note.read(path)) is not None and note.run == run
    ]
    if not notes:
        return HostRow(host=host, reached=False, outcome="not reached")
    note = notes[-1]
    record = host_dir / note.record if note.record else None
    if (record is None or not record.is_dir()) and note.phase == "rollback" and note.exit_code == 0:
        # a rollback with nothing to back out writes no record, and that is good news
        return HostRow(
            host=host,
            reached=True,
            outcome="nothing to roll back",
            wave=note.wave,
            phase=note.phase,
        )
    if (record is None or not record.is_dir()) and note.phase == "renew":
        # not due writes no record; nor does a refusal before the renewal change began
        verdict = note.outcome or ("not due" if note.exit_code == 0 else "failed")
        return HostRow(
            host=host,
            reached=True,
            outcome=verdict,
            wave=note.wave,
            phase=note.phase,
            failed_step=None if verdict == "not due" else "pgtls renew",
            reason=note.said or note.last_error,
        )
    if record is None or not record.is_dir():
        return HostRow(
            host=host,
            reached=True,
            outcome="failed",
            wave=note.wave,
            phase=note.phase,
            failed_step="before the runbook",
            reason=note.last_error or f"the run left no record (exit status {note.exit_code})",
        )
    if (record / "manifest.json").is_file():
        facts = _from_manifest(read_manifest(record / "manifest.json"), now)
    else:
        facts = _Facts(outcome="failed", reason="the record has no manifest.json")
    outcome = facts.outcome
    if note.phase == "renew":
        # the renewal change's own outcome, named as the renewal playbook names it
        outcome = {"ok": "renewed", "failed": note.outcome or "failed"}.get(outcome, outcome)
    page = _first_page(record, facts.failed_id)
    return HostRow(
        host=host,
        reached=True,
        outcome=outcome,
        wave=note.wave,
        phase=note.phase,
        failed_step=facts.failed_step,
        reason=facts.reason,
        fingerprint=facts.fingerprint,
        days_left=facts.days_left,
        checks_passed=facts.checks_passed,
        checks_total=facts.checks_total,
        record=str(record.relative_to(base)),
        page=str(page.relative_to(base)) if page else None,
    )


def load_fleet_report(
    directory: str | Path, *, run: str | None = None, now: datetime | None = None
) -> FleetReport:
    """Read ``records/<change_id>/`` of a fleet: the latest run, or ``run``.

    Raises:
        InputError: the folder holds no fleet run (or not the one named).
    """
    base = Path(directory)
    runs_dir = base / "fleet-runs"
    runs = sorted(p.stem for p in runs_dir.glob("*.json")) if runs_dir.is_dir() else []
    if not runs:
        raise InputError(
            f"{base}: no fleet run here (no fleet-runs/*.json); give the records/<change_id>/ "
            "folder that fleet/pgtls.yml filled"
        )
    chosen = run or runs[-1]
    if chosen not in runs:
        raise InputError(f"{base}: no fleet run '{chosen}'; the runs here: {', '.join(runs)}")
    info = JsonObject(_read_json(runs_dir / f"{chosen}.json"))
    at = now or datetime.now(timezone.utc)
    rows = tuple(_row(h, base / h, chosen, base, at) for h in info.strs("hosts"))
    return FleetReport(
        change_id=info.text("change_id") or base.name,
        directory=base,
        run=chosen,
        playbook=info.text("playbook") or "change",
        check_mode=info.flag("check_mode"),
        started_utc=info.opt("started_utc"),
        max_fail_percentage=info.num("max_fail_percentage"),
        rows=rows,
        other_runs=tuple(r for r in runs if r != chosen),
    )
