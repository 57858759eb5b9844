"""The record of a run: its directory, its manifest, its pages, and the change's index.

``records/<change_id>/<UTC stamp>/`` is created new for each run (of the runbook or of a
rollback) and written once: the executed notebooks, a readable page per step, ``index.html``
(the page a reviewer opens first), the steps' summaries and ``manifest.json``, which hashes
every other file; then all of it is made read-only. ``records/<change_id>/index.html`` lists
every run of the change, newest first, and is rewritten after each run. The HTML is drawn by
:mod:`pgtls_helpers.runbook.pages`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import getpass
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgtls_helpers.errors import PgtlsError
from pgtls_helpers.runbook.client_subjects import said_by_parameters
from pgtls_helpers.runbook.manifest import (
    FORMAT,
    JsonObject,
    Kind,
    Lab,
    Manifest,
    ServerState,
    StepRecord,
    from_json,
    from_steps,
)
from pgtls_helpers.runbook.params import Params, redacted

if TYPE_CHECKING:
    from pgtls_helpers.runbook.runner import StepOutcome

__all__ = [
    "host_names",
    "folder_lock",
    "new_record_dir",
    "read_manifest",
    "release",
    "result_line",
    "rollback_command",
    "run_manifest",
    "seal",
    "step_summaries",
    "versions",
    "write_change_index",
]

RECORD_FORMAT = FORMAT  # manifest.FORMAT, the version of manifest.json


def utc() -> datetime:
    return datetime.now(timezone.utc)


def stamp(at: datetime) -> str:
    return at.strftime("%Y%m%dT%H%M%SZ")


def new_record_dir(records: Path, change_id: str) -> tuple[Path, datetime]:
    """``records/<change_id>/<stamp>/``, created new and claimed; waits for the next second if
    taken.

    The directory is created and claimed (``flock`` on it, which dies with the process) while
    the change's folder is locked, and :func:`~pgtls_helpers.runbook.interrupt.seal_unfinished`
    takes that lock too, so no other run seals a record between its creation and its claim.
    The claim lasts until :func:`seal` (or :func:`release`) or the end of the process.
    """
    parent = records / change_id
    parent.mkdir(parents=True, exist_ok=True)
    for _ in range(5):
        now = utc()
        path = parent / stamp(now)
        with folder_lock(parent):
            try:
                path.mkdir()
            except FileExistsError:
                pass
            else:
                path = path.resolve()
                _claims[path] = _claim(path)
                return path, now
        time.sleep(1.05 - now.microsecond / 1e6)
    raise PgtlsError(
        f"{parent}: could not create a new record directory; is another run writing there?"
    )


_claims: dict[Path, int] = {}


def _claim(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def release(record: Path) -> None:
    """Give up the claim :func:`new_record_dir` took on ``record`` (idempotent)."""
    fd = _claims.pop(Path(record).resolve(), None)
    if fd is not None:
        os.close(fd)


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on a change's records folder for the block."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def host_names() -> dict[str, str | None]:
    """This machine's host name, and its FQDN where that differs."""
    name = socket.gethostname()
    fqdn = socket.getfqdn(name)
    # getfqdn falls back to "localhost" or the bare name when no domain is configured
    return {"host": name, "host_fqdn": fqdn if "." in fqdn and fqdn != name else None}


def who_and_where() -> dict[str, Any]:
    return {"operator": getpass.getuser(), **host_names()}


def versions() -> dict[str, str | None]:
    """The versions that decide what a run did: Python, the libraries, libpq, OpenSSL."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in (
        "pgtls",
        "cryptography",
        "psycopg",
        "papermill",
        "nbconvert",
        "pandas",
        "pgtoolkit",
        "ipykernel",
        "ipywidgets",
    ):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    try:
        import psycopg

        v = psycopg.pq.version()
        out["libpq"] = f"{v // 10000}.{v % 10000}" if v >= 100000 else str(v)
    except Exception:  # the record notes what it cannot tell
        out["libpq"] = None
    try:
        from cryptography.hazmat.backends.openssl.backend import backend

        out["openssl (cryptography)"] = backend.openssl_version_text()
    except Exception:
        out["openssl (cryptography)"] = None
    import ssl

    out["openssl (python ssl)"] = ssl.OPENSSL_VERSION
    try:
        out["openssl (command)"] = (
            subprocess.run(
                ["openssl", "version"], capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        out["openssl (command)"] = None
    return out


def sha256_file(path: Path) -> str:
    from pgtls_helpers.postgres.files import sha256_hex

    return sha256_hex(path.read_bytes())


def step_summaries(record: Path) -> dict[str, Any]:
    """What each step left in ``steps/<step>.json``, by step name."""
    out = {}
    for path in sorted((record / "steps").glob("*.json")):
        try:
            out[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            out[path.stem] = {"unreadable": path.name}
    return out


def pgtls_command() -> str:
    """How to call ``pgtls`` from any directory: the script beside this interpreter."""
    script = Path(sys.executable).parent / "pgtls"
    if script.exists():
        return str(script)
    return f"{sys.executable} -m pgtls_helpers"


def change_command(
    subcommand: str, params_file: str | Path, work_dir: str | Path, records: str | Path
) -> str:
    """``pgtls SUBCOMMAND PARAMS --work W --records R``, runnable as printed from any
    directory (``pgtls`` itself is rarely on the PATH: it lives in the checkout's venv)."""
    import shlex

    return (
        f"{pgtls_command()} {subcommand} {shlex.quote(str(params_file))} "
        f"--work {shlex.quote(str(work_dir))} --records {shlex.quote(str(records))}"
    )


def rollback_command(params_file: Path, work_dir: str | Path, records: Path) -> str:
    """The exact command that backs the change out, runnable from any directory."""
    return change_command("rollback", params_file, work_dir, records)


def result_line(m: Manifest) -> str:
    """The run's outcome in words a change manager uses."""
    return m.result


def seal(record: Path, manifest: Manifest) -> Manifest:
    """Hash every file of the record into the manifest, write it, make it all read-only;
    returns the manifest as written."""
    files = sorted(p for p in record.rglob("*") if p.is_file())
    sealed = dataclasses.replace(
        manifest, record_files={str(p.relative_to(record)): sha256_file(p) for p in files}
    )
    target = record / "manifest.json"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as fh:
        json.dump(sealed.to_json(), fh, indent=2, default=str)
        fh.write("\n")
    for path in [*files, target]:
        path.chmod(0o444)
    release(record)
    return sealed


def read_manifest(path: Path) -> Manifest:
    """A record's ``manifest.json``, typed; one that cannot be read is a manifest saying so."""
    try:
        return from_json(json.loads(path.read_text()))
    except (OSError, ValueError):
        return Manifest(
            kind="change",
            change_id=path.parent.parent.name,
            outcome="unreadable manifest",
            error=f"{path}: cannot be read",
        )


def write_run_index(record: Path, manifest: Manifest) -> None:
    """``index.html`` of one run (before :func:`seal`, so the manifest hashes it)."""
    from pgtls_helpers.runbook.pages import run_page

    (record / "index.html").write_text(run_page(manifest), encoding="utf-8")


def write_change_index(change_dir: Path) -> Path:
    """Rewrite ``records/<change_id>/index.html`` from the manifests of its runs, atomically."""
    from pgtls_helpers.runbook.pages import change_page

    runs = [
        (path.parent.name, read_manifest(path))
        for path in sorted(change_dir.glob("*/manifest.json"), reverse=True)
    ]
    target = change_dir / "index.html"
    tmp = change_dir / f".index.html.{os.getpid()}"
    tmp.write_text(change_page(change_dir.name, runs), encoding="utf-8")
    os.replace(tmp, target)
    return target


# --------------------------------------------------------------------------- a run's manifest


def run_manifest(
    *,
    params: Params,
    injected: Mapping[str, Any],
    params_file: Path,
    values: Mapping[str, Any],
    record: Path,
    started: datetime,
    seconds: float,
    outcome: str,
    exit_code: int,
    steps: Sequence[StepOutcome],
    lab: dict[str, Any] | None,
    error: str | None,
    server_before: dict[str, Any] | None,
    server_after: dict[str, Any] | None,
    records_dir: Path,
) -> Manifest:
    """The manifest of a run of the runbook (``kind: change``, or ``trust`` for ``pgtls
    trust``); ``steps`` are the runner's :class:`~pgtls_helpers.runbook.runner.StepOutcome`
    values."""
    facts = from_steps(step_summaries(record))
    failed = next((s for s in steps if s.status == "failed"), None)
    if outcome == "failed" and not error:
        error = (
            f"step {failed.step[:2].lstrip('0')} {failed.title}: {failed.error}"
            if failed
            else "the run failed before its first step"
        )
    before = ServerState.read(JsonObject(server_before)) if server_before else None
    after = ServerState.read(JsonObject(server_after)) if server_after else None
    journals = params.work.journal.exists()
    parameters = redacted(dict(injected))
    m = Manifest(
        kind=_kind_of(steps),
        change_id=params.change_id,
        outcome=outcome,
        exit_code=exit_code,
        error=error,
        parameters_file=str(params_file),
        parameters_file_sha256=sha256_file(params_file),
        parameters=parameters,
        parameters_as_given=redacted(dict(values)),
        server=f"{params.server_host}:{params.server_port}",
        apply=params.apply,
        ca_mode=params.ca_mode,
        operator=getpass.getuser(),
        host=host_names()["host"] or "",
        host_fqdn=host_names()["host_fqdn"],
        started_utc=started.isoformat(timespec="seconds"),
        finished_utc=utc().isoformat(timespec="seconds"),
        seconds=round(seconds, 2),
        versions=versions(),
        lab=Lab.read(JsonObject(lab)) if lab else None,
        steps=tuple(
            StepRecord(
                step=s.step,
                title=s.title,
                status=s.status,
                seconds=round(s.seconds, 2),
                error=s.error,
                note=s.note,
                notebook=f"{s.step}.ipynb" if s.status in ("ok", "failed") else None,
                html=f"{s.step}.html" if s.status in ("ok", "failed") else None,
            )
            for s in steps
        ),
        key_type=facts.key_type,
        key_encrypted=facts.key_encrypted,
        csr_file=facts.csr_file or str(params.work.csr),
        csr_sha256=facts.csr_sha256,
        public_key_sha256=facts.public_key_sha256,
        certificates=facts.certificates,
        unused_certificates=facts.unused_certificates,
        findings=facts.findings,
        verifier=facts.verifier,
        signed_by=facts.signed_by,
        ca_reference=facts.ca_reference,
        files=facts.files,
        planned_files=facts.planned_files,
        settings=facts.settings(before, after),
        settings_applied=facts.enable_changed,
        hba_diff=facts.hba_diff,
        hba_added=facts.hba_added,
        hba_written=facts.hba_written,
        ident_diff=facts.ident_diff,
        sessions_refused=facts.sessions_refused,
        presented_chain=facts.presented_chain,
        tls_version=facts.tls_version,
        renewal=facts.renewal,
        trust_added=facts.trust_added,
        trust_removed=facts.trust_removed,
        client_certificates=facts.client_certificates,
        client_crls=facts.client_crls,
        clients_used=said_by_parameters(facts.clients_used, params)
        if facts.clients_used is not None
        else None,
        verdict=facts.verdict,
        checks=facts.checks,
        server_before=before,
        server_after=after,
        # a lab cluster is gone after the run: nothing there to roll back
        rollback_command=rollback_command(params_file, params.work_dir, records_dir)
        if journals and not lab
        else None,
    )
    if outcome != "failed":
        return m
    in_place = (
        ("nothing: the throwaway lab cluster was removed at the end of the run",)
        if lab
        else _in_place(params, after)
    )
    return dataclasses.replace(m, in_place=in_place)


def _kind_of(steps: Sequence[StepOutcome]) -> Kind:
    names = {s.step for s in steps}
    if "client_trust" in names:
        return "trust"
    if any(n.startswith("c1_") for n in names):
        return "clients"
    return "change"


def _in_place(params: Params, after: ServerState | None) -> tuple[str, ...]:
    """After a failure: what of the change is on the server now, in sentences."""
    from pgtls_helpers.runbook import journal as wal

    out = []
    changes = wal.file_changes(wal.read_entries(params.work.journal))
    for change in changes:
        verb = "created" if change.backup is None else "replaced"
        out.append(f"{change.target} ({change.kind}): {verb} by this change")
    if after is not None and after.settings:
        served = after.served
        out.append(
            f"the server has ssl {after.settings.get('ssl')}"
            + (f" and presents {served.subject} (sha256 {served.sha256})" if served else "")
        )
    if not changes:
        out.insert(0, "nothing was changed: every server and client file is as it was before")
    return tuple(out)
