"""Run the five runbook notebooks headless and leave the record of the change.

``run(PARAMS.yaml)`` executes ``notebooks/01…05`` in order through papermill (in one shared
kernel, :mod:`pgtls_helpers.runbook.kernel`), stops at the first step that fails, and always
writes ``records/<change_id>/<UTC stamp>/`` (:mod:`pgtls_helpers.runbook.record`): each executed
notebook, a readable page per step, ``index.html``, the steps' summaries, and ``manifest.json``
(parameters with secrets redacted, who, where, when, tool versions, each step's status, the
files installed with their hashes and backups, the server before and after, the verdict). A
record is written once and never replaced; private key bytes and passphrases are never in it.
What the terminal says is :mod:`pgtls_helpers.runbook.terminal`.

A little over 500 lines: the run's life (lab cluster, kernel, steps, interruption, record) is one
sequence that reads best in one place.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgtls_helpers.errors import InputError, PgtlsError, is_refusal
from pgtls_helpers.runbook import interrupt
from pgtls_helpers.runbook import record as rec
from pgtls_helpers.runbook.manifest import Manifest
from pgtls_helpers.runbook.params import (
    Params,
    load_params,
    plain_values,
    read_params_file,
    resolve_paths,
)
from pgtls_helpers.runbook.record import new_record_dir
from pgtls_helpers.runbook.record import release as rec_release
from pgtls_helpers.runbook.steps import SERVER, Step, waits_for_the_ca

if TYPE_CHECKING:
    from pgtls_helpers.lab.cluster import LabCluster
    from pgtls_helpers.runbook.kernel import Kernel

__all__ = [
    "STEPS",
    "RunOutcome",
    "StepOutcome",
    "kernel_name",
    "new_record_dir",
    "prepare_notebooks",
    "run",
]

STEPS: tuple[Step, ...] = SERVER  # the server runbook's notebooks, from the registry


def _notebooks_dir() -> Path:
    """``notebooks/`` of a checkout, or the copy that the wheel carries as package data."""
    checkout = Path(__file__).resolve().parents[2] / "notebooks"
    if checkout.is_dir():
        return checkout
    return Path(__file__).resolve().parents[1] / "notebooks"


NOTEBOOKS_DIR = _notebooks_dir()
LAB_CLIENT_USER = "pgtls_client"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass(frozen=True)
class StepOutcome:
    """One notebook of a run: ``ok``, ``failed``, ``skipped`` or ``not-run``."""

    step: str
    title: str
    status: str
    seconds: float = 0.0
    error: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class RunOutcome:
    """What a run did and where its record is; ``exit_code`` is what ``pgtls run`` returns."""

    record_dir: Path
    outcome: str  # "ok", "failed" or "waiting-for-ca"
    exit_code: int
    steps: tuple[StepOutcome, ...]
    record: Manifest = field(repr=False)

    @property
    def manifest(self) -> dict[str, object]:
        """The record's ``manifest.json``, as written."""
        return self.record.to_json()

    def summary(self) -> str:
        """What the terminal shows at the end of a run."""
        from pgtls_helpers.runbook.terminal import run_summary

        return run_summary(self.record, self.record_dir)


def kernel_name() -> str:
    """The Jupyter kernel a run uses (see :func:`pgtls_helpers.runbook.kernel.kernel_name`)."""
    from pgtls_helpers.runbook.kernel import kernel_name as name

    return name()


def _skip_slow_optional_imports() -> None:
    """jsonschema (which nbformat imports) loads ``rfc3987_syntax`` when it is installed, and
    that builds a parser grammar at import time: about a second on a small machine, for IRI
    formats notebook validation never checks. Mark it absent (``sys.modules[name] = None`` makes
    the import fail, and jsonschema treats it as optional)."""
    if "jsonschema" not in sys.modules:
        sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- set-up


def _check_input(params: Params) -> None:
    """What would make the run fail for a reason the parameters file can fix (exit 2)."""
    for name in ("key_passphrase_env",) + (
        ("ca_files_password_env",) if params.ca_mode == "files" and params.ca_files else ()
    ):
        var = getattr(params, name)
        if var and not os.environ.get(var):
            raise InputError(
                f"{name} names the environment variable {var}, which is not set; "
                "export it before the run"
            )
    for path in params.ca_files:
        if not Path(path).exists():
            raise InputError(f"ca_files: {path} does not exist; list the files the CA returned")
    if params.key_type not in _key_types():
        raise InputError(f"key_type '{params.key_type}' is not one of {', '.join(_key_types())}")


def _key_types() -> tuple[str, ...]:
    from pgtls_helpers.pki.keys import KEY_TYPES

    return tuple(KEY_TYPES)


def _injected(params: Params) -> dict[str, Any]:
    """The parameters as papermill injects them (the notebooks' cells have the same shape)."""
    return plain_values(params)


@contextmanager
def _environ(**changes: str | None) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in changes}
    try:
        for key, value in changes.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def lab_client_user(*, private: bool = False) -> str | None:
    """As root: a throwaway client OS user, with no old roots; None when not root.

    A ``private`` one (``pgtls_client_<hex>``) is made for each lab cluster and removed with it
    by :func:`remove_lab_client_user` (a run's throwaway cluster at the end of the run, ``pgtls
    lab notebook``'s by ``pgtls lab down``), so two lab runs at once never share a ``root.crt``
    and no lab leaves an OS user behind. Without ``private``: ``pgtls_client``, made once and
    kept, for callers that keep a cluster of their own.
    """
    if os.geteuid() != 0:
        return None
    name = f"{LAB_CLIENT_USER}_{secrets.token_hex(4)}" if private else LAB_CLIENT_USER
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        proc = subprocess.run(
            ["useradd", "--system", "--create-home", "--shell", "/bin/sh", name],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            return None
        entry = pwd.getpwnam(name)
    # its ~/.postgresql only ever holds roots of throwaway lab CAs
    shutil.rmtree(Path(entry.pw_dir) / ".postgresql", ignore_errors=True)
    return name


_PRIVATE_LAB_USER = re.compile(rf"{LAB_CLIENT_USER}_[0-9a-f]{{8}}")


def remove_lab_client_user(name: str | None) -> bool:
    """Delete a private lab client user (:func:`lab_client_user`) and its home; True when it
    is gone. Any other name, the shared ``pgtls_client`` among them, is left alone (False)."""
    if not name or not _PRIVATE_LAB_USER.fullmatch(name):
        return False
    try:
        pwd.getpwnam(name)
    except KeyError:
        return True
    subprocess.run(["userdel", "--remove", name], capture_output=True, check=False)
    try:
        pwd.getpwnam(name)
    except KeyError:
        return True
    return False


def on_lab_cluster(params: Params, cluster: LabCluster, *, client_user: str | None) -> Params:
    """``params`` pointed at a lab cluster, with the lab's client OS user added; that user gets
    a login of its own on the cluster (its role, its ``~/.pgpass``), never the runbook's."""
    users = list(params.client_system_users)
    if client_user and client_user not in users:
        users.append(client_user)
    if client_user:
        cluster.add_client_login(client_user)
    return dataclasses.replace(
        params,
        server_host=cluster.host,
        server_port=cluster.port,
        server_log_file=str(cluster.log_path),
        client_system_users=tuple(users),
    )


# --------------------------------------------------------------------------- running


def _run_notebook(
    src: Path, out: Path, parameters: dict[str, Any], kernel: Kernel, progress: bool, desc: str
) -> tuple[str | None, Any]:
    """Execute one notebook; returns (error or None, the executed notebook)."""
    import nbformat
    import papermill
    from papermill.exceptions import PapermillExecutionError

    from pgtls_helpers.runbook.kernel import ENGINE, KERNEL_ARGS

    error: str | None = None
    nb = None
    try:
        nb = papermill.execute_notebook(
            str(src),
            str(out),
            parameters=parameters,
            engine_name=ENGINE,
            kernel_name=kernel.name,
            pgtls_kernel=kernel,
            # a bar per notebook on a terminal; in a log, the "[n/5] step" lines are enough
            progress_bar={"desc": desc, "leave": False}
            if progress and sys.stderr.isatty()
            else False,
            request_save_on_cell_execute=False,
            log_output=False,
            cwd=os.getcwd(),
            start_timeout=60,
            execution_timeout=600,
            # the kernel's own log (transport notices, shutdown chatter) is not the record's
            extra_arguments=KERNEL_ARGS,
        )
    except PapermillExecutionError as exc:
        # a refusal is its sentence; the class and traceback of a real bug stay in the
        # step's notebook and page, the terminal says it is one
        evalue = _ANSI.sub("", str(exc.evalue)).strip()
        error = (
            evalue
            if is_refusal(exc.traceback, str(exc.evalue))
            else f"an unexpected error stopped the step ({exc.ename}: {evalue}); its traceback "
            "is in the step's notebook"
        )
    except Exception as exc:  # a kernel that died, a cell that timed out, an unreadable file
        first = (_ANSI.sub("", str(exc)).strip().splitlines() or [type(exc).__name__])[0]
        error = f"the notebook could not be run to its end: {first}"
    if nb is None and out.exists():  # papermill wrote the failed notebook before raising
        nb = nbformat.read(out, as_version=4)
    return error, nb


def prepare_notebooks(
    params: Params, out_dir: str | Path, *, notebooks_dir: str | Path | None = None
) -> list[Path]:
    """Copies of the five notebooks with ``params`` injected, not executed: the interactive
    path (``make notebook``) opens these in JupyterLab."""
    import papermill

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for step in STEPS:
        target = out / step.notebook
        papermill.execute_notebook(
            str(Path(notebooks_dir or NOTEBOOKS_DIR) / step.notebook),
            str(target),
            parameters=_injected(params),
            prepare_only=True,
            kernel_name="python3",
            progress_bar=False,
        )
        made.append(target)
    return made


def _write_step_page(nb: Any, path: Path, **how: Any) -> None:
    from pgtls_helpers.runbook.pages import step_page

    path.write_text(step_page(nb, **how), encoding="utf-8")


# --------------------------------------------------------------------------- run


def run(
    params_path: str | Path,
    records_dir: str | Path = "records",
    work_dir: str | Path = "work",
    progress: bool = True,
    *,
    notebooks_dir: str | Path | None = None,
    steps: tuple[Step, ...] = STEPS,
) -> RunOutcome:
    """Run the runbook for a parameters file and write its record.

    ``steps`` are the notebooks to run, in order (the server runbook's five by default;
    ``pgtls trust`` runs the client-trust one).

    Raises:
        InputError: the parameters file is unusable (nothing was run, no record written).
    """
    t0 = time.monotonic()
    params_file = Path(params_path).resolve()
    values = read_params_file(params_file)
    values = resolve_paths(values, params_file, work_dir)
    params = load_params(values, source=str(params_path))
    _check_input(params)
    nb_dir = Path(notebooks_dir or NOTEBOOKS_DIR)
    missing = [s.name for s in steps if not (nb_dir / s.notebook).exists()]
    if missing:
        raise InputError(
            f"{nb_dir}: the runbook notebooks {', '.join(missing)} are missing; "
            "run from a checkout of pgtls"
        )

    record, started = new_record_dir(Path(records_dir), params.change_id)
    hold = ExitStack()  # what this run holds until its record is sealed, released in reverse
    # the record is claimed from its creation, so no other run or rollback seals it as
    # interrupted; sealing it gives the claim up, and so does the end of this run
    hold.callback(rec_release, record)
    interrupt.seal_unfinished(Path(records_dir), params.change_id, params, exclude=record)
    params = dataclasses.replace(params, record_dir=str(record))
    done: list[StepOutcome] = []
    lab_info: dict[str, Any] | None = None
    cluster: LabCluster | None = None
    kernel: Kernel | None = None
    error: str | None = None
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    exit_code, outcome = 1, "failed"
    # the lab cluster's passfile is known before the cluster exists, so the kernel can start
    # (with PGPASSFILE in its environment) while initdb runs
    lab_base = Path(tempfile.mkdtemp(prefix="pgtls-lab-")) if params.lab_cluster else None
    env = {"PGPASSFILE": str(lab_base / "pgpass")} if lab_base else {}
    # the kernel inherits the token, and with it the right to work under this run's lock
    from pgtls_helpers.postgres.lock import TOKEN_ENV

    env[TOKEN_ENV] = secrets.token_hex(16)
    _skip_slow_optional_imports()
    from pgtls_helpers.runbook.kernel import Kernel
    from pgtls_helpers.runbook.snapshot import server_state

    try:
        with _environ(**env), interrupt.terminate_as_interrupt():
            try:
                kernel = Kernel(kernel_name())
                kernel_ready = kernel.start_in_background()
                if lab_base is not None:
                    params, cluster, lab_info = _start_lab(params, lab_base)
                # phase 1 (the CSR, waiting for the CA) does not touch the server
                phase_one = waits_for_the_ca(params, steps)
                before = None if phase_one else server_state(params)
                kernel_ready()
            except PgtlsError as exc:
                error = f"set-up failed: {exc}"
                exit_code = 2 if isinstance(exc, InputError) else 1
                done = [StepOutcome(s.name, s.title, "not-run") for s in steps]
            else:
                done, outcome = _run_steps(
                    params, record, nb_dir, kernel, progress, steps, into=done, hold=hold
                )
                exit_code = 0 if outcome in ("ok", "waiting-for-ca") else _failed_code(record)
                after = None if phase_one else server_state(params)
    except KeyboardInterrupt:
        done = interrupt.mark_interrupted(done, steps, StepOutcome)
        back_out = rec.rollback_command(params_file, params.work_dir, Path(records_dir).resolve())
        error, exit_code, outcome = interrupt.in_place(params, back_out), 130, "interrupted"
        raise
    finally:
        if kernel is not None:
            kernel.close()
        if cluster is not None:
            cluster.remove()
            remove_lab_client_user((lab_info or {}).get("client_user"))
        elif lab_base is not None:
            shutil.rmtree(lab_base, ignore_errors=True)
        if not done:  # interrupted before the first step ended
            done = [StepOutcome(s.name, s.title, "not-run") for s in steps]
            error = error or "interrupted"
        manifest = rec.run_manifest(
            params=params,
            injected=_injected(params),
            params_file=params_file,
            values=values,
            record=record,
            started=started,
            seconds=time.monotonic() - t0,
            outcome=outcome,
            exit_code=exit_code,
            steps=done,
            lab=lab_info,
            error=error,
            server_before=before,
            server_after=after,
            records_dir=Path(records_dir).resolve(),
        )
        try:
            rec.write_run_index(record, manifest)
            manifest = rec.seal(record, manifest)
            rec.write_change_index(record.parent)
        finally:
            hold.close()  # the change lock, then the claim on the record
    return RunOutcome(record, outcome, exit_code, tuple(done), manifest)


def _failed_code(record: Path) -> int:
    """1, or the CA back-end's own status when the CA was down (4) or refused (5)."""
    from pgtls_helpers.ca import CaRefused, CaUnavailable
    from pgtls_helpers.runbook.manifest import JsonObject

    s2 = JsonObject(rec.step_summaries(record).get("02_ca_response"))
    return {"unavailable": CaUnavailable.exit_code, "refused": CaRefused.exit_code}.get(
        s2.text("ca_failure"), 1
    )


def _start_lab(params: Params, base: Path) -> tuple[Params, LabCluster, dict[str, Any]]:
    """A throwaway cluster for this run; the change's work directory starts empty, since
    whatever an earlier lab run left there belonged to a server that no longer exists."""
    from pgtls_helpers.lab import LabCluster

    shutil.rmtree(params.work.path, ignore_errors=True)
    cluster = LabCluster.create(base)
    try:
        cluster.start()
    except BaseException:
        cluster.remove()
        raise
    client = lab_client_user(private=True)
    params = on_lab_cluster(params, cluster, client_user=client)
    info = {"port": cluster.port, "pgdata": str(cluster.pgdata), "client_user": client}
    return params, cluster, info


def _take_run_lock(params: Params, hold: ExitStack) -> str | None:
    """Take the server's change lock for the rest of the run (into ``hold``); the step's
    error when another change holds it. A server that cannot be reached is the step's to
    report: it runs, and fails on its own terms."""
    from pgtls_helpers.errors import PreflightError
    from pgtls_helpers.postgres.lock import change_lock
    from pgtls_helpers.runbook.common import lock_directory, open_server

    try:
        server = hold.enter_context(open_server(params))
        facts = server.facts()
    except PgtlsError:
        return None
    try:
        directory, owner = lock_directory(params, facts)
        hold.enter_context(change_lock(directory, owner, server, params.change_id))
    except PreflightError as exc:
        return f"PreflightError: {exc}"
    return None


def _run_steps(
    params: Params,
    record: Path,
    nb_dir: Path,
    kernel: Kernel,
    progress: bool,
    notebooks: tuple[Step, ...] = STEPS,
    *,
    into: list[StepOutcome] | None = None,
    hold: ExitStack | None = None,
) -> tuple[list[StepOutcome], str]:
    from concurrent.futures import Future, ThreadPoolExecutor

    parameters = _injected(params)
    # phase one: the CA has not answered yet, so the steps that need its answer wait
    phase_one = waits_for_the_ca(params, notebooks)
    steps: list[StepOutcome] = into if into is not None else []  # filled as steps end
    # HTML is rendered while the next notebook runs (the kernel is another process)
    html = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgtls-html")
    rendering: dict[str, Future[None]] = {}
    try:
        for i, entry in enumerate(notebooks):
            step, title = entry.name, entry.title
            if (skip := entry.skipped(params, phase_one=phase_one)) is not None:
                status, why = skip
                steps.append(StepOutcome(step, title, status, note=why))
                continue
            if any(s.status == "failed" for s in steps):
                steps.append(StepOutcome(step, title, "not-run"))
                continue
            if hold is not None and params.apply and entry.writes:
                refused = _take_run_lock(params, hold)
                hold = None  # taken (or not needed) once, for the rest of the run
                if refused is not None:
                    steps.append(StepOutcome(step, title, "failed", error=refused))
                    continue
            if progress:
                print(f"[{i + 1}/{len(notebooks)}] {step}", file=sys.stderr, flush=True)
            t = time.monotonic()
            error, nb = _run_notebook(
                nb_dir / entry.notebook,
                record / entry.notebook,
                parameters,
                kernel,
                progress,
                title,
            )
            seconds = time.monotonic() - t
            if nb is not None:
                statement = (
                    f"Stopped after {seconds:.1f} s: {error}"
                    if error
                    else f"Step {i + 1} of {len(notebooks)} ran in {seconds:.1f} s without error."
                )
                page = functools.partial(
                    _write_step_page,
                    nb,
                    record / f"{step}.html",
                    change_id=params.change_id,
                    number=i + 1,
                    title=title,
                    statement=statement,
                    failed=bool(error),
                )
                rendering[step] = html.submit(page)
            steps.append(StepOutcome(step, title, "failed" if error else "ok", seconds, error))
    finally:
        html.shutdown(wait=True)
    for i, outcome in enumerate(steps):
        future = rendering.get(outcome.step)
        problem = future.exception() if future is not None else None
        if problem is not None:  # the notebook itself is the record; the HTML is a view of it
            steps[i] = dataclasses.replace(outcome, note=f"HTML rendering failed: {problem}")
    if any(s.status == "failed" for s in steps):
        return steps, "failed"
    return steps, "waiting-for-ca" if phase_one else "ok"
