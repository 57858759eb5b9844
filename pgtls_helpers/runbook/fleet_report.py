"""What a fleet run did, host by host, read from the records the playbook brought home.

``fleet/pgtls.yml`` (and ``fleet/rollback.yml``) leave, on the control machine::

    records/<change_id>/fleet-runs/<run>.json        the run: playbook, hosts of the play, …
    records/<change_id>/<host>/<stamp>/               a host's record, as `pgtls run` wrote it
    records/<change_id>/<host>/<stamp>.fleet.json     the fleet's note: run, wave, phase, exit

:func:`load_fleet_report` turns the latest run (or a named one) into one row per host of the
play: wave, outcome, failing step and reason, the fingerprint the server now presents and its
days left, the connection checks passed, and where the record is; hosts the run never reached
are rows too. The manifest is read defensively (its format is still growing): only
``kind`` (``rollback``), ``outcome``, ``error``, ``apply``, ``steps[].{step,title,status,error}``,
``presented_chain[0].sha256``, ``certificates[].{role,sha256,not_after}`` and
``checks[].passed`` are used, and each may be missing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from pgtls_helpers.errors import InputError

__all__ = ["FleetReport", "HostRow", "load_fleet_report"]

Json = dict[str, object]


@dataclass(frozen=True)
class HostRow:
    """One host of the play in one fleet run."""

    host: str
    reached: bool
    outcome: str  # ok, waiting-for-ca, planned, failed, rolled-back, not reached
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
        return self.outcome in ("ok", "waiting-for-ca", "planned", "rolled-back")


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


def _int(value: object) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


def _bool(value: object) -> bool:
    return value is True or str(value).lower() in ("true", "yes", "1")


def _list(value: object) -> list[Json]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _days_left(manifest: Json, sha256: str | None, now: datetime) -> int | None:
    for cert in _list(manifest.get("certificates")):
        if cert.get("role") == "leaf" and (sha256 is None or cert.get("sha256") == sha256):
            try:
                end = datetime.fromisoformat(str(cert.get("not_after")))
            except ValueError:
                return None
            if end.tzinfo is None:
                end = end.replace(tzinfo=timezone.utc)
            return (end - now).days
    return None


def _first_page(record: Path, failed: str | None) -> Path | None:
    for name in ("index.html", f"{failed}.html" if failed else ""):
        if name and (record / name).is_file():
            return record / name
    pages = sorted(record.glob("*.html"))
    return pages[-1] if pages else None


def _from_manifest(manifest: Json, now: datetime) -> dict[str, object]:
    steps = _list(manifest.get("steps"))
    failed = next((s for s in steps if s.get("status") == "failed"), None)
    outcome = str(manifest.get("outcome") or "unknown")
    if manifest.get("kind") == "rollback":
        outcome = {"ok": "rolled-back", "planned": "planned"}.get(outcome, outcome)
        if outcome == "failed":
            failed = {"step": "rollback", "error": manifest.get("error")}
    elif outcome == "ok" and manifest.get("apply") is False:
        outcome = "planned"
    presented = _list(manifest.get("presented_chain"))
    fingerprint = str(presented[0]["sha256"]) if presented and presented[0].get("sha256") else None
    checks = _list(manifest.get("checks"))
    error = manifest.get("error")
    return {
        "outcome": outcome,
        "failed_step": (
            f"{failed.get('step')} {failed.get('title') or ''}".strip() if failed else None
        ),
        "failed_id": str(failed.get("step")) if failed else None,
        "reason": (failed.get("error") if failed else None) or (str(error) if error else None),
        "fingerprint": fingerprint,
        "days_left": _days_left(manifest, fingerprint, now) if fingerprint else None,
        "checks_passed": sum(1 for c in checks if c.get("passed") is True) if checks else None,
        "checks_total": len(checks) if checks else None,
    }


def _row(host: str, host_dir: Path, run: str, base: Path, now: datetime) -> HostRow:
    notes = []
    for path in sorted(host_dir.glob("*.fleet.json")):
        note = _read_json(path)
        if note is not None and note.get("run") == run:
            notes.append(note)
    if not notes:
        return HostRow(host=host, reached=False, outcome="not reached")
    note = notes[-1]
    wave, phase = _int(note.get("wave")), str(note.get("phase") or "") or None
    stderr = note.get("stderr")
    last_err = stderr[-1] if isinstance(stderr, list) and stderr else None
    stamp = note.get("record")
    record = host_dir / str(stamp) if stamp else None
    if record is None or not record.is_dir():
        return HostRow(
            host=host,
            reached=True,
            outcome="failed",
            wave=wave,
            phase=phase,
            failed_step="before the runbook",
            reason=str(last_err or f"the run left no record (exit status {note.get('exit_code')})"),
        )
    facts: dict[str, object] = {}
    manifest = _read_json(record / "manifest.json")
    if manifest is not None:
        facts = _from_manifest(manifest, now)
    else:
        facts = {"outcome": "failed", "reason": "the record has no manifest.json"}
    page = _first_page(record, facts.pop("failed_id", None))  # type: ignore[arg-type]
    return HostRow(
        host=host,
        reached=True,
        outcome=str(facts.get("outcome")),
        wave=wave,
        phase=phase,
        failed_step=facts.get("failed_step"),  # type: ignore[arg-type]
        reason=facts.get("reason"),  # type: ignore[arg-type]
        fingerprint=facts.get("fingerprint"),  # type: ignore[arg-type]
        days_left=facts.get("days_left"),  # type: ignore[arg-type]
        checks_passed=facts.get("checks_passed"),  # type: ignore[arg-type]
        checks_total=facts.get("checks_total"),  # type: ignore[arg-type]
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
    info = _read_json(runs_dir / f"{chosen}.json") or {}
    hosts = info.get("hosts")
    host_names = [str(h) for h in hosts] if isinstance(hosts, list) else []
    at = now or datetime.now(timezone.utc)
    rows = tuple(_row(h, base / h, chosen, base, at) for h in host_names)
    return FleetReport(
        change_id=str(info.get("change_id") or base.name),
        directory=base,
        run=chosen,
        playbook=str(info.get("playbook") or "change"),
        check_mode=_bool(info.get("check_mode")),
        started_utc=str(info["started_utc"]) if info.get("started_utc") else None,
        max_fail_percentage=_int(info.get("max_fail_percentage")),
        rows=rows,
        other_runs=tuple(r for r in runs if r != chosen),
    )
