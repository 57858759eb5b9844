"""Honest records of interrupted runs.

Ctrl-C (SIGINT) and SIGTERM stop a run as ``KeyboardInterrupt``; the runner then records each
step's true status (the finished ones as they ended, the running one ``interrupted``, the rest
``not-run``) and what the change has in place, from its write-ahead journal. A run stopped by
SIGKILL (or a lost machine) leaves a record directory without ``manifest.json``; the next run
of that change seals it as ``interrupted`` with what its step summaries and the journal show.
Every record directory is claimed from its creation (``flock`` on it, which dies with the
process; :func:`~pgtls_helpers.runbook.record.new_record_dir`) until it is sealed, so a record
whose run is still alive, a change's or a rollback's, is never sealed by anyone else.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Protocol, TypeVar

from pgtls_helpers.runbook import journal as wal
from pgtls_helpers.runbook.params import Params
from pgtls_helpers.runbook.record import folder_lock, pgtls_command
from pgtls_helpers.runbook.steps import Step

__all__ = ["in_place", "mark_interrupted", "seal_unfinished", "terminate_as_interrupt"]


class _Step(Protocol):
    @property
    def step(self) -> str: ...


S = TypeVar("S", bound=_Step)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM stops the run as Ctrl-C does, so the record is finished."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def mark_interrupted(
    done: Sequence[S], table: Sequence[Step], make: Callable[[str, str, str], S]
) -> list[S]:
    """The finished steps as they ended, the next one ``interrupted``, the rest ``not-run``.

    ``make(step, title, status)`` builds the missing outcomes (the runner's ``StepOutcome``).
    """
    out = list(done)
    names = {s.step for s in out}
    missing = [(s.name, s.title) for s in table if s.name not in names]
    for i, (step, title) in enumerate(missing):
        out.append(make(step, title, "interrupted" if i == 0 else "not-run"))
    return out


def in_place(params: Params, back_out: str | None = None) -> str:
    """What the change has on the server now, from its journal, and the way back
    (``back_out``: the exact rollback command, when the caller knows the parameters file)."""
    entries = wal.read_entries(params.work.journal)
    if not entries:
        if list(params.work.path.glob("journal.rolled-back-*.jsonl")):
            return "the change was rolled back since; nothing is in place"
        return "interrupted before any change to the server; nothing is in place"
    changes = wal.file_changes(entries)
    unfinished = wal.unfinished_steps(entries)
    files = ", ".join(str(c.target) for c in changes) or "no file yet"
    state = f"step(s) {', '.join(unfinished)} interrupted" if unfinished else "steps finished"
    back_out = back_out or f"{pgtls_command()} rollback PARAMS.yaml"
    return (
        f"interrupted: {state}; changed so far: {files}; back out with: {back_out} "
        "(or rerun to finish)"
    )


def seal_unfinished(records: Path, change_id: str, params: Params, *, exclude: Path) -> list[Path]:
    """Seal every record of ``change_id`` that a killed run left without a manifest."""
    sealed: list[Path] = []
    parent = records / change_id
    if not parent.is_dir():
        return sealed
    with folder_lock(parent):  # no record is between its creation and its claim meanwhile
        for record in sorted(parent.iterdir()):
            if not record.is_dir() or record.resolve() == exclude.resolve():
                continue
            held = _hold(record)
            if held is None:  # a live run, or another run sealing it now
                continue
            try:
                if _seal_one(record, change_id, params):
                    sealed.append(record)
            finally:
                os.close(held)
    return sealed


def _hold(record: Path) -> int | None:
    """The record's lock taken without waiting, or None when someone holds it."""
    try:
        fd = os.open(record, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _seal_one(record: Path, change_id: str, params: Params) -> bool:
    """Write the killed run's manifest; False when one is there already (sealed meanwhile)."""
    if (record / "manifest.json").exists():
        return False
    from pgtls_helpers.runbook.manifest import Manifest, StepRecord

    summaries = sorted(p.stem for p in (record / "steps").glob("*.json"))
    manifest = Manifest(
        kind="change",
        change_id=change_id,
        outcome="interrupted",
        server=f"{params.server_host}:{params.server_port}",
        apply=params.apply,
        ca_mode=params.ca_mode,
        sealed_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        error="the run was killed (SIGKILL, a lost session or machine) before it could "
        "finish its record; sealed by the next run of this change",
        # the steps that left a summary before the kill
        steps=tuple(StepRecord(step=name, title="", status="interrupted") for name in summaries),
        in_place=(in_place(params),),
    ).to_json()
    try:
        fd = os.open(record / "manifest.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        json.dump(manifest, fh, indent=2)
        fh.write("\n")
    return True
