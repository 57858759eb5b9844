"""An interactive session against a real server: prepared, confirmed in a notebook, recorded.

``pgtls lab notebook`` (``make notebook``) with ``apply: true`` on a server that is not a lab
cluster starts a session in the prepared notebooks' folder, ``<notebooks>/.pgtls-session/``:

- ``session.json`` (:class:`Session`, ``format`` :data:`FORMAT`): which server changes
  (``host:port``, the data directory when it is known), the change id, the parameters as
  injected and as given, where the record goes, and the server as it was at preparation.
  Only the preparation writes it, and the notebooks' ``record_dir`` names its folder, so a
  headless run (``pgtls run``, whose ``record_dir`` is its own record) never meets a session;
- ``confirmation.json`` (:class:`Confirmation`): written when the DBA presses the button that
  names the server, at the top of any of the session's notebooks. Until it exists, and names the
  server the notebook points at, :func:`require_confirmation` refuses every apply step;
- ``applied.jsonl``: one line per apply step started after the confirmation (what makes the
  session a change that needs a record);
- ``steps/<step>.json``: the steps' summaries, as in a headless run's record.

:func:`seal_session` turns a session that applied something into a record like a headless
one, ``records/<change_id>/<stamp>/``: the notebooks as saved, a page per step, the steps'
summaries, ``session.json`` and ``confirmation.json``, ``index.html`` and ``manifest.json``.
``pgtls lab notebook`` seals when JupyterLab stops, and, when that process was killed, the next
``pgtls lab notebook`` for the same folder seals the earlier session before it prepares new
copies. The confirmation and the applied steps go with the record; ``session.json`` stays, so
the notebooks still refuse to apply until the next confirmation.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pgtls_helpers.errors import PgtlsError
from pgtls_helpers.runbook import record as rec
from pgtls_helpers.runbook.manifest import JsonObject
from pgtls_helpers.runbook.params import Params, load_params, plain_values
from pgtls_helpers.runbook.runner import STEPS, StepOutcome
from pgtls_helpers.runbook.snapshot import server_state

__all__ = [
    "FORMAT",
    "SESSION_DIR",
    "Confirmation",
    "NotConfirmed",
    "Session",
    "confirm",
    "confirmation_of",
    "note_applied",
    "require_confirmation",
    "seal_session",
    "session_of",
    "start_session",
]

FORMAT = 1
SESSION_DIR = ".pgtls-session"  # hidden: JupyterLab's file browser does not list it
_SESSION = "session.json"
_CONFIRMATION = "confirmation.json"
_APPLIED = "applied.jsonl"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class NotConfirmed(PgtlsError):
    """An apply step of an interactive session before the DBA confirmed the server."""


def _utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Session:
    """What ``session.json`` holds: the server an interactive session changes, and its record."""

    change_id: str
    server_host: str
    server_port: int
    data_directory: str | None
    records_dir: str
    params_file: str
    prepared_utc: str
    operator: str
    parameters: Mapping[str, object] = field(default_factory=dict)  # as injected (plain)
    parameters_as_given: Mapping[str, object] = field(default_factory=dict)
    server_before: Mapping[str, object] | None = None
    format: int = FORMAT

    @property
    def server(self) -> str:
        return f"{self.server_host}:{self.server_port}"

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: object) -> Session:
        j = JsonObject(data)
        before = j.raw("server_before")
        return cls(
            change_id=j.text("change_id"),
            server_host=j.text("server_host"),
            server_port=j.num("server_port") or 0,
            data_directory=j.opt("data_directory"),
            records_dir=j.text("records_dir", "records"),
            params_file=j.text("params_file"),
            prepared_utc=j.text("prepared_utc"),
            operator=j.text("operator"),
            parameters=dict(j.raw("parameters") or {}),  # type: ignore[call-overload]
            parameters_as_given=dict(j.raw("parameters_as_given") or {}),  # type: ignore[call-overload]
            server_before=dict(before) if isinstance(before, Mapping) else None,
            format=j.num("format") or FORMAT,
        )


@dataclass(frozen=True)
class Confirmation:
    """What ``confirmation.json`` holds: who confirmed which server, and when."""

    server: str
    change_id: str
    confirmed_by: str
    confirmed_utc: str
    format: int = FORMAT

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: object) -> Confirmation:
        j = JsonObject(data)
        return cls(
            server=j.text("server"),
            change_id=j.text("change_id"),
            confirmed_by=j.text("confirmed_by"),
            confirmed_utc=j.text("confirmed_utc"),
            format=j.num("format") or FORMAT,
        )


# --------------------------------------------------------------------------- files


def _read_json(path: Path) -> object | None:
    # the session folder is the one the preparation made beside the notebooks; a link there is
    # not ours, so it is not followed
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd) as fh:
        try:
            return json.load(fh)
        except ValueError:
            return None


def _write_json(path: Path, data: object) -> None:
    """Write ``path`` whole or not at all (a kernel and the terminal may read it meanwhile)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2, default=str)
        fh.write("\n")
    os.replace(tmp, path)


def _session_dir(params: Params) -> Path | None:
    return Path(params.record_dir) if params.record_dir else None


def session_of(params: Params) -> Session | None:
    """The interactive session ``params`` belong to, or None (a headless run, a lab session,
    notebooks not prepared by ``pgtls lab notebook``)."""
    folder = _session_dir(params)
    if folder is None:
        return None
    data = _read_json(folder / _SESSION)
    return None if data is None else Session.from_json(data)


def confirmation_of(params: Params) -> Confirmation | None:
    """The DBA's confirmation of this session, when it names the server ``params`` point at."""
    folder = _session_dir(params)
    data = None if folder is None else _read_json(folder / _CONFIRMATION)
    if data is None:
        return None
    got = Confirmation.from_json(data)
    here = f"{params.server_host}:{params.server_port}"
    return got if got.server == here and got.change_id == params.change_id else None


def confirm(params: Params) -> Confirmation:
    """Note that the DBA confirmed: the apply steps of this session may change the server."""
    folder = _session_dir(params)
    if folder is None or session_of(params) is None:
        raise PgtlsError("these notebooks were not prepared by `make notebook`; nothing to confirm")
    done = Confirmation(
        server=f"{params.server_host}:{params.server_port}",
        change_id=params.change_id,
        confirmed_by=getpass.getuser(),
        confirmed_utc=_utc(),
    )
    _write_json(folder / _CONFIRMATION, done.to_json())
    return done


def require_confirmation(params: Params) -> None:
    """Refuse an apply step of an interactive session the DBA has not confirmed.

    Raises:
        NotConfirmed: the session's button was not pressed (or it named another server).
    """
    session = session_of(params)
    if session is None or confirmation_of(params) is not None:
        return
    server = f"{params.server_host}:{params.server_port}"
    raise NotConfirmed(
        f"nothing was applied: press “Apply to {server}” at the top of this notebook to "
        "confirm this server, then run this cell again"
    )


def note_applied(params: Params, step: str) -> None:
    """Note that an apply step starts (before it runs, so a kernel that dies mid-step still
    leaves a session to record)."""
    folder = _session_dir(params)
    if folder is None or session_of(params) is None:
        return
    line = json.dumps({"step": step, "started_utc": _utc(), "operator": getpass.getuser()})
    fd = os.open(folder / _APPLIED, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "a") as fh:
        fh.write(line + "\n")


# --------------------------------------------------------------------------- the preparation


def start_session(
    params: Params,
    notebooks: Path,
    *,
    params_file: Path,
    values: Mapping[str, Any],
    records_dir: Path,
    data_directory: str | None,
    server_before: Mapping[str, object] | None,
) -> Params:
    """Start a session in ``notebooks`` (the prepared copies' folder); returns ``params``
    with ``record_dir`` naming the session's folder, to inject into the notebooks. An earlier
    session's confirmation is dropped: each session is confirmed anew."""
    folder = notebooks / SESSION_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for stale in (_CONFIRMATION, _APPLIED):
        (folder / stale).unlink(missing_ok=True)
    shutil.rmtree(folder / "steps", ignore_errors=True)
    params = dataclasses.replace(params, record_dir=str(folder))
    session = Session(
        change_id=params.change_id,
        server_host=params.server_host,
        server_port=params.server_port,
        data_directory=data_directory,
        records_dir=str(records_dir.resolve()),
        params_file=str(params_file.resolve()),
        prepared_utc=_utc(),
        operator=getpass.getuser(),
        parameters=plain_values(params),
        parameters_as_given=dict(values),
        server_before=server_before,
    )
    _write_json(folder / _SESSION, session.to_json())
    return params


def applied(notebooks: Path) -> list[dict[str, Any]]:
    """The apply steps the session in ``notebooks`` started, oldest first."""
    try:
        text = (notebooks / SESSION_DIR / _APPLIED).read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


# --------------------------------------------------------------------------- the record


def _step_status(nb: Any) -> tuple[str, str | None]:
    """``ok``, ``failed`` (with the first error) or ``not-run``, as the saved notebook says."""
    cells = [c for c in nb.cells if c.cell_type == "code"]
    for cell in cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return "failed", _ANSI.sub("", str(out.get("evalue", ""))).strip() or "error"
    ran = any(c.get("execution_count") is not None for c in cells)
    return ("ok" if ran else "not-run"), None


def seal_session(notebooks: Path) -> Path | None:
    """Write the record of the session in ``notebooks`` when it applied something; returns the
    record's folder, or None when nothing was applied (no record: nothing changed)."""
    folder = notebooks / SESSION_DIR
    data = _read_json(folder / _SESSION)
    started_steps = applied(notebooks)
    if data is None or not started_steps:
        return None
    # every notebook imports this module (through apply_step); nbformat and the pages only
    # when a record is written
    import nbformat

    from pgtls_helpers.runbook.pages import step_page

    session = Session.from_json(data)
    confirmation_data = _read_json(folder / _CONFIRMATION)
    confirmed = Confirmation.from_json(confirmation_data) if confirmation_data else None
    params = load_params(session.parameters, source=str(folder / _SESSION))
    records = Path(session.records_dir)
    record, _now = rec.new_record_dir(records, session.change_id)
    started = datetime.fromisoformat(session.prepared_utc)
    who = f"confirmed by {confirmed.confirmed_by} at {confirmed.confirmed_utc}" if confirmed else ""
    outcomes = []
    for i, step in enumerate(STEPS):
        src = notebooks / step.notebook
        if not src.exists():
            outcomes.append(StepOutcome(step.name, step.title, "not-run"))
            continue
        nb = nbformat.read(src, as_version=4)
        status, error = _step_status(nb)
        if status != "not-run":
            shutil.copy2(src, record / step.notebook)
            saved = datetime.fromtimestamp(src.stat().st_mtime, timezone.utc)
            statement = (
                f"Run interactively in JupyterLab ({who or 'not confirmed'}); the notebook as "
                f"saved at {saved.isoformat(timespec='seconds')}"
                + (f". It stopped at: {error}" if error else ".")
            )
            page = step_page(
                nb,
                change_id=session.change_id,
                number=i + 1,
                title=step.title,
                statement=statement,
                failed=error is not None,
            )
            (record / f"{step.name}.html").write_text(page, encoding="utf-8")
        outcomes.append(StepOutcome(step.name, step.title, status, error=error))
    if (folder / "steps").is_dir():
        shutil.copytree(folder / "steps", record / "steps")
    for name in (_SESSION, _CONFIRMATION, _APPLIED):
        if (folder / name).exists():
            shutil.copy2(folder / name, record / name)
    params_file = Path(session.params_file)
    if not params_file.exists():  # moved since: the record names the values it holds
        params_file = record / _SESSION
    failed = any(o.status == "failed" for o in outcomes)
    recorded = dataclasses.replace(params, record_dir=str(record))
    manifest = rec.run_manifest(
        params=recorded,
        injected=plain_values(recorded),
        params_file=params_file,
        values=session.parameters_as_given,
        record=record,
        started=started,
        seconds=time.time() - started.timestamp(),
        outcome="failed" if failed else "ok",
        exit_code=1 if failed else 0,
        steps=outcomes,
        lab=None,
        error=None,
        server_before=dict(session.server_before) if session.server_before else None,
        server_after=server_state(params),
        records_dir=records,
    )
    manifest = dataclasses.replace(
        manifest, interactive=_interactive_line(session, confirmed, started_steps)
    )
    rec.write_run_index(record, manifest)
    rec.seal(record, manifest)
    rec.write_change_index(record.parent)
    # the confirmation and the applied steps went with the record; session.json stays, so the
    # notebooks refuse to apply again until the next confirmation
    for name in (_CONFIRMATION, _APPLIED):
        (folder / name).unlink(missing_ok=True)
    shutil.rmtree(folder / "steps", ignore_errors=True)
    return record


def _interactive_line(
    session: Session,
    confirmed: Confirmation | None,
    started_steps: list[dict[str, Any]],
) -> str:
    """The record's sentence that this was an interactive run: who prepared and confirmed it."""
    steps = ", ".join(dict.fromkeys(str(s.get("step")) for s in started_steps))
    who = (
        f"confirmed for {confirmed.server} by {confirmed.confirmed_by} at {confirmed.confirmed_utc}"
        if confirmed
        else "no confirmation on record"
    )
    return (
        f"Interactive run in JupyterLab (make notebook), prepared at {session.prepared_utc} by "
        f"{session.operator}; {who}; apply steps run: {steps}. The notebooks are kept as they "
        "were last saved; session.json and confirmation.json hold the session."
    )
