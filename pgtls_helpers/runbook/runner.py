"""Run the five runbook notebooks headless and leave the record of the change.

``run(PARAMS.yaml)`` executes ``notebooks/01…05`` in order through papermill, stops at the first
step that fails, and always writes ``records/<change_id>/<UTC stamp>/``: each executed notebook,
its HTML, the steps' summaries, and ``manifest.json`` (parameters with secrets redacted, who,
where, when, tool versions, each step's status, the files installed with their hashes and
backups, certificate fingerprints, the verdict). A record is written once and never replaced;
private key bytes and passphrases are never in it.
"""

from __future__ import annotations

import copy
import dataclasses
import getpass
import json
import os
import platform
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pgtls_helpers.errors import InputError, PgtlsError
from pgtls_helpers.runbook.params import (
    PARAMETER_NAMES,
    Params,
    load_params,
    read_params_file,
    redacted,
    resolve_paths,
)

__all__ = ["STEPS", "RunOutcome", "StepOutcome", "kernel_name", "prepare_notebooks", "run"]

STEPS: tuple[tuple[str, str], ...] = (
    ("01_key_and_csr", "Key and CSR"),
    ("02_ca_response", "CA response"),
    ("03_install_files", "Install files"),
    ("04_enable_ssl", "Enable SSL"),
    ("05_verify_clients", "Verify clients"),
)


def _notebooks_dir() -> Path:
    """``notebooks/`` of a checkout, or the copy that the wheel carries as package data."""
    checkout = Path(__file__).resolve().parents[2] / "notebooks"
    if checkout.is_dir():
        return checkout
    return Path(__file__).resolve().parents[1] / "notebooks"


NOTEBOOKS_DIR = _notebooks_dir()
LAB_CLIENT_USER = "pgtls_client"
_OPTIONAL_TEXT = (
    "pgdata",
    "server_log_file",
    "country",
    "state",
    "locality",
    "organization",
    "organizational_unit",
    "email",
    "key_passphrase_env",
    "ca_files_password_env",
    "record_dir",
)
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
    manifest: dict[str, Any] = field(repr=False)

    def summary(self) -> str:
        """A screenful: each step, the verdict, the certificate, and where the record is."""
        m = self.manifest
        lines = [
            f"pgtls run: change {m['change_id']} on {m['server']}, ca_mode "
            f"{m['parameters'].get('ca_mode')}, apply {str(m['apply']).lower()}"
        ]
        if m.get("lab"):
            lines.append(
                f"  on a throwaway lab cluster (port {m['lab']['port']}), removed after the run"
            )
        last_note = None
        for s in self.steps:
            took = f"{s.seconds:5.1f} s" if s.status in ("ok", "failed") else ""
            lines.append(f"  {s.step[:2]} {s.title:<15} {s.status:<8} {took}".rstrip())
            if s.error:
                lines.append(f"     {s.error}")
            elif s.note and s.note != last_note:
                lines.append(f"     {s.note}")
            last_note = s.note
        if m.get("error"):
            lines.append(f"  {m['error']}")
        if m.get("verdict"):
            checks = m.get("checks", [])
            good = sum(1 for c in checks if c.get("passed"))
            lines.append(
                f"verdict: {m['verdict']} ({good} of {len(checks)} connection checks "
                "as they must be)"
            )
        leaf = next((c for c in m.get("certificates", []) if c.get("role") == "leaf"), None)
        if leaf:
            cn = re.search(r"(?:^|,)CN=((?:[^,\\]|\\.)+)", leaf["subject"])
            lines.append(
                f"certificate: {cn.group(1) if cn else leaf['subject']}, until "
                f"{leaf['not_after'][:10]}, sha256 {leaf['sha256']}"
            )
        for f in m.get("files", []):
            if f.get("action") != "unchanged":
                lines.append(
                    f"wrote {f['target']} ({f['action']}"
                    + (f", backup {f['backup']}" if f.get("backup") else "")
                    + ")"
                )
        if self.outcome == "waiting-for-ca":
            lines.append(
                f"next: send {m['csr_file']} to your CA; then list the files it returns "
                f"in ca_files and run again: pgtls run {m['parameters_file']}"
            )
        lines.append(f"took {m['seconds']:.1f} s; record: {self.record_dir}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- set-up


def _utc() -> datetime:
    return datetime.now(timezone.utc)


def _stamp(at: datetime) -> str:
    return at.strftime("%Y%m%dT%H%M%SZ")


def new_record_dir(records: Path, change_id: str) -> tuple[Path, datetime]:
    """``records/<change_id>/<stamp>/``, created new; waits for the next second if taken."""
    parent = records / change_id
    parent.mkdir(parents=True, exist_ok=True)
    for _ in range(5):
        now = _utc()
        path = parent / _stamp(now)
        try:
            path.mkdir()
        except FileExistsError:
            time.sleep(1.05 - now.microsecond / 1e6)
            continue
        return path.resolve(), now
    raise PgtlsError(
        f"{parent}: could not create a new record directory; is another run writing there?"
    )


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


def _plain(name: str, value: Any) -> Any:
    """A parameter as papermill injects it: lists, dicts and scalars only."""
    if value is None and name in _OPTIONAL_TEXT:
        return ""
    if isinstance(value, tuple | list):
        return [_plain(name, v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(name, v) for k, v in value.items()}
    return value


def _injected(params: Params) -> dict[str, Any]:
    return {name: _plain(name, getattr(params, name)) for name in PARAMETER_NAMES}


def kernel_name() -> str:
    """A kernel that runs this interpreter (the venv's): ``python3`` when it resolves here,
    else a ``pgtls`` kernelspec installed into this environment."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    ksm = KernelSpecManager()
    me = Path(sys.executable).resolve()
    major, minor = sys.version_info[:2]
    bare = {"python", f"python{major}", f"python{major}.{minor}"}
    for name in ("python3", "pgtls"):
        try:
            argv0 = ksm.get_kernel_spec(name).argv[0]
        except NoSuchKernel:
            continue
        # jupyter_client starts a bare "python" with the interpreter that starts the kernel
        if argv0 in bare or Path(argv0).resolve() == me:
            return name
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ipykernel",
            "install",
            "--sys-prefix",
            "--name",
            "pgtls",
            "--display-name",
            "Python (pgtls)",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise PgtlsError(
            f"no Jupyter kernel runs {sys.executable} and installing one failed ({last}); run "
            f"'{sys.executable} -m ipykernel install --sys-prefix --name pgtls'"
        )
    return "pgtls"


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


def lab_client_user() -> str | None:
    """As root: the throwaway OS user ``pgtls_client`` (created once), with no old roots."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(LAB_CLIENT_USER)
    except KeyError:
        proc = subprocess.run(
            ["useradd", "--system", "--create-home", "--shell", "/bin/sh", LAB_CLIENT_USER],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            return None
        entry = pwd.getpwnam(LAB_CLIENT_USER)
    # its ~/.postgresql only ever holds roots of throwaway lab CAs
    shutil.rmtree(Path(entry.pw_dir) / ".postgresql", ignore_errors=True)
    return LAB_CLIENT_USER


def on_lab_cluster(params: Params, cluster: Any, *, client_user: str | None) -> Params:
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


# Each notebook starts with an empty namespace and In [1]; imported modules stay loaded.
_RESET = "get_ipython().reset(new_session=False)\nget_ipython().execution_count = 1\n"
# What the notebooks import, loaded while the lab cluster starts.
_WARM = """\
import importlib
for _name in ("pgtls_helpers.notebook", "pandas", "ipywidgets"):
    importlib.import_module(_name)
"""
_KERNEL_ARGS = ["--IPKernelApp.log_level=CRITICAL", "--HistoryManager.enabled=False"]
_ENGINE = "pgtls-shared-kernel"


def _skip_slow_optional_imports() -> None:
    """jsonschema (which nbformat imports) loads ``rfc3987_syntax`` when it is installed, and
    that builds a parser grammar at import time: about a second on a small machine, for IRI
    formats notebook validation never checks. Mark it absent (``sys.modules[name] = None`` makes
    the import fail, and jsonschema treats it as optional)."""
    if "jsonschema" not in sys.modules:
        sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]


def _register_engine() -> None:
    """A papermill engine that runs every notebook of a run in one kernel.

    Starting a kernel and importing the package costs more than most steps do; the runner pays
    it once per run. Each notebook still begins with an empty namespace (and ``In [1]``), so no
    notebook can lean on a name another one defined, and each reads as if it ran alone.
    """
    from papermill.clientwrap import PapermillNotebookClient
    from papermill.engines import NBClientEngine, papermill_engines
    from papermill.log import logger
    from papermill.utils import merge_kwargs, remove_args

    if _ENGINE in papermill_engines._engines:
        return

    class SharedKernelEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(
            cls,
            nb_man: Any,
            kernel_name: str,
            log_output: bool = False,
            stdout_file: Any = None,
            stderr_file: Any = None,
            start_timeout: int = 60,
            execution_timeout: int | None = None,
            **kwargs: Any,
        ) -> Any:
            kernel: _Kernel = kwargs.pop("pgtls_kernel")
            kwargs = remove_args(["input_path"], **kwargs)
            safe_kwargs = remove_args(["timeout", "startup_timeout"], **kwargs)
            final_kwargs = merge_kwargs(
                safe_kwargs,
                timeout=execution_timeout or kwargs.get("timeout"),
                startup_timeout=start_timeout,
                kernel_name=kernel_name,
                log=logger,
                log_output=log_output,
                stdout_file=stdout_file,
                stderr_file=stderr_file,
                km=kernel.km,
            )
            client = PapermillNotebookClient(nb_man, **final_kwargs)
            client.kc = kernel.fresh_namespace()
            return client.execute()

    papermill_engines.register(_ENGINE, SharedKernelEngine)


class _Kernel:
    """The run's kernel and one connection to it, shared by the five notebooks."""

    def __init__(self, name: str) -> None:
        from jupyter_client.manager import AsyncKernelManager

        self.name = name
        self.km = AsyncKernelManager(kernel_name=name)
        self.kc: Any = None
        self._starting: threading.Thread | None = None

    def start_in_background(self) -> Callable[[], None]:
        """Start the kernel and import the package in a thread; returns a join that connects
        to the kernel, or raises :class:`PgtlsError` when it did not come up."""
        import asyncio

        problem: list[BaseException] = []

        async def start() -> None:
            await self.km.start_kernel(extra_arguments=_KERNEL_ARGS, cwd=os.getcwd())
            kc = self.km.client()
            kc.start_channels()
            try:
                await kc.wait_for_ready(timeout=60)
                await kc.execute_interactive(
                    _WARM, silent=True, store_history=False, timeout=60, output_hook=lambda m: None
                )
            finally:
                kc.stop_channels()

        def target() -> None:
            try:
                asyncio.run(start())
                _skip_slow_optional_imports()
                _register_engine()  # importing papermill is not free either: do it here too
            except BaseException as exc:  # handed to the caller by join()
                problem.append(exc)

        thread = threading.Thread(target=target, name="pgtls-kernel", daemon=True)
        thread.start()
        self._starting = thread

        def join() -> None:
            from jupyter_core.utils import run_sync

            thread.join()
            try:
                if problem:
                    raise problem[0]
                # the connection lives in this thread's event loop, where papermill runs
                self.kc = self.km.client()
                self.kc.start_channels()
                run_sync(self.kc.wait_for_ready)(timeout=60)
                self.kc.allow_stdin = False
            except Exception as exc:
                raise PgtlsError(
                    f"the Jupyter kernel '{self.name}' did not start ({exc}); check "
                    f"'{sys.executable} -m jupyter kernelspec list'"
                ) from exc

        return join

    def fresh_namespace(self) -> Any:
        """Empty the kernel's namespace for the next notebook; returns the connection."""
        from jupyter_core.utils import run_sync

        reply = run_sync(self.kc.execute_interactive)(
            _RESET, silent=True, store_history=False, timeout=60, output_hook=lambda m: None
        )
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"the kernel's namespace was not reset: {reply['content']}")
        return self.kc

    def close(self) -> None:
        from jupyter_core.utils import run_sync

        if self._starting is not None:  # a set-up that failed early: let the start finish
            self._starting.join(timeout=90)
        if self.kc is not None:
            self.kc.stop_channels()
        if self.km.has_kernel:
            run_sync(self.km.shutdown_kernel)(now=True)


def _run_notebook(
    src: Path, out: Path, parameters: dict[str, Any], kernel: _Kernel, progress: bool, desc: str
) -> tuple[str | None, Any]:
    """Execute one notebook; returns (error or None, the executed notebook)."""
    import nbformat
    import papermill
    from papermill.exceptions import PapermillExecutionError

    error: str | None = None
    nb = None
    try:
        nb = papermill.execute_notebook(
            str(src),
            str(out),
            parameters=parameters,
            engine_name=_ENGINE,
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
            extra_arguments=_KERNEL_ARGS,
        )
    except PapermillExecutionError as exc:
        evalue = _ANSI.sub("", str(exc.evalue)).strip()
        error = f"{exc.ename}: {evalue}"
    except Exception as exc:  # a kernel that died, a cell that timed out, an unreadable file
        error = f"{type(exc).__name__}: {_ANSI.sub('', str(exc)).strip().splitlines()[0]}"
    if nb is None and out.exists():  # papermill wrote the failed notebook before raising
        nb = nbformat.read(out, as_version=4)
    return error, nb


def _for_html(nb: Any) -> Any:
    """A copy for the HTML record: widgets show their plain-text stand-in (a record has no
    kernel to draw them, and must not fetch scripts from the internet)."""
    nb = copy.deepcopy(nb)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data")
            if data and "application/vnd.jupyter.widget-view+json" in data:
                del data["application/vnd.jupyter.widget-view+json"]
    return nb


def _write_html(nb: Any, path: Path) -> None:
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(template_name="lab").from_notebook_node(_for_html(nb))
    path.write_text(body, encoding="utf-8")


def prepare_notebooks(
    params: Params, out_dir: str | Path, *, notebooks_dir: str | Path | None = None
) -> list[Path]:
    """Copies of the five notebooks with ``params`` injected, not executed: the interactive
    path (``make notebook``) opens these in JupyterLab."""
    import papermill

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for step, _ in STEPS:
        target = out / f"{step}.ipynb"
        papermill.execute_notebook(
            str(Path(notebooks_dir or NOTEBOOKS_DIR) / f"{step}.ipynb"),
            str(target),
            parameters=_injected(params),
            prepare_only=True,
            kernel_name="python3",
            progress_bar=False,
        )
        made.append(target)
    return made


# --------------------------------------------------------------------------- the manifest


def _versions() -> dict[str, str | None]:
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


def _sha256(path: Path) -> str:
    from pgtls_helpers.postgres.files import sha256_hex

    return sha256_hex(path.read_bytes())


def _step_summaries(record: Path) -> dict[str, Any]:
    out = {}
    for path in sorted((record / "steps").glob("*.json")):
        try:
            out[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            out[path.stem] = {"unreadable": path.name}
    return out


def _manifest(
    *,
    params: Params,
    params_file: Path,
    values: Mapping[str, Any],
    record: Path,
    started: datetime,
    seconds: float,
    outcome: str,
    exit_code: int,
    steps: list[StepOutcome],
    lab: dict[str, Any] | None,
    error: str | None,
) -> dict[str, Any]:
    summaries = _step_summaries(record)
    s1 = summaries.get("01_key_and_csr", {})
    s2 = summaries.get("02_ca_response", {})
    s3 = summaries.get("03_install_files", {})
    s4 = summaries.get("04_enable_ssl", {})
    s5 = summaries.get("05_verify_clients", {})
    installed = [*s3.get("installed", []), *s4.get("installed", [])]
    return {
        "record_format": 1,
        "change_id": params.change_id,
        "outcome": outcome,
        "exit_code": exit_code,
        "error": error,
        "parameters_file": str(params_file),
        "parameters_file_sha256": _sha256(params_file),
        "parameters": redacted(_injected(params)),
        "parameters_as_given": redacted(dict(values)),
        "server": f"{params.server_host}:{params.server_port}",
        "apply": params.apply,
        "operator": getpass.getuser(),
        "host": socket.getfqdn(),
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": _utc().isoformat(timespec="seconds"),
        "seconds": round(seconds, 2),
        "versions": _versions(),
        "lab": lab,
        "steps": [
            {
                **dataclasses.asdict(s),
                "seconds": round(s.seconds, 2),
                "notebook": f"{s.step}.ipynb" if s.status in ("ok", "failed") else None,
                "html": f"{s.step}.html" if s.status in ("ok", "failed") else None,
                "summary": summaries.get(s.step),
            }
            for s in steps
        ],
        "csr_file": s1.get("csr_file") or str(params.work.csr),
        "csr_sha256": s1.get("csr_sha256"),
        "public_key_sha256": s1.get("public_key_sha256"),
        "certificates": s2.get("chain", []),
        "unused_certificates": s2.get("unused", []),
        "findings": s2.get("findings", []),
        "files": installed,
        "ssl_before": s4.get("ssl_before"),
        "ssl_after": s4.get("ssl_after"),
        "presented_chain": s4.get("presented", []),
        "tls_version": s4.get("tls_version"),
        "verdict": s5.get("verdict"),
        "checks": s5.get("checks", []),
    }


def _seal(record: Path, manifest: dict[str, Any]) -> None:
    """Hash every file of the record into the manifest, write it, make it all read-only."""
    files = sorted(p for p in record.rglob("*") if p.is_file())
    manifest["record_files"] = {str(p.relative_to(record)): _sha256(p) for p in files}
    target = record / "manifest.json"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as fh:
        json.dump(manifest, fh, indent=2, default=str)
        fh.write("\n")
    for path in [*files, target]:
        path.chmod(0o444)


# --------------------------------------------------------------------------- run


def run(
    params_path: str | Path,
    records_dir: str | Path = "records",
    work_dir: str | Path = "work",
    progress: bool = True,
    *,
    notebooks_dir: str | Path | None = None,
) -> RunOutcome:
    """Run the runbook for a parameters file and write its record.

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
    missing = [s for s, _ in STEPS if not (nb_dir / f"{s}.ipynb").exists()]
    if missing:
        raise InputError(
            f"{nb_dir}: the runbook notebooks {', '.join(missing)} are missing; "
            "run from a checkout of pgtls"
        )

    record, started = new_record_dir(Path(records_dir), params.change_id)
    params = dataclasses.replace(params, record_dir=str(record))
    steps: list[StepOutcome] = []
    lab_info: dict[str, Any] | None = None
    cluster: Any = None
    kernel: _Kernel | None = None
    error: str | None = None
    exit_code, outcome = 1, "failed"
    # the lab cluster's passfile is known before the cluster exists, so the kernel can start
    # (with PGPASSFILE in its environment) while initdb runs
    lab_base = Path(tempfile.mkdtemp(prefix="pgtls-lab-")) if params.lab_cluster else None
    env = {"PGPASSFILE": str(lab_base / "pgpass")} if lab_base else {}
    try:
        with _environ(**env):
            try:
                kernel = _Kernel(kernel_name())
                kernel_ready = kernel.start_in_background()
                if lab_base is not None:
                    params, cluster, lab_info = _start_lab(params, lab_base)
                kernel_ready()
            except PgtlsError as exc:
                error = f"set-up failed: {exc}"
                exit_code = 2 if isinstance(exc, InputError) else 1
                steps = [StepOutcome(s, t, "not-run") for s, t in STEPS]
            else:
                steps, outcome = _run_steps(params, record, nb_dir, kernel, progress)
                exit_code = 0 if outcome in ("ok", "waiting-for-ca") else 1
    finally:
        if kernel is not None:
            kernel.close()
        if cluster is not None:
            cluster.remove()
        elif lab_base is not None:
            shutil.rmtree(lab_base, ignore_errors=True)
        if not steps:  # interrupted before the first step ended
            steps = [StepOutcome(s, t, "not-run") for s, t in STEPS]
            error = error or "interrupted"
        manifest = _manifest(
            params=params,
            params_file=params_file,
            values=values,
            record=record,
            started=started,
            seconds=time.monotonic() - t0,
            outcome=outcome,
            exit_code=exit_code,
            steps=steps,
            lab=lab_info,
            error=error,
        )
        _seal(record, manifest)
    return RunOutcome(record, outcome, exit_code, tuple(steps), manifest)


def _start_lab(params: Params, base: Path) -> tuple[Params, Any, dict[str, Any]]:
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
    client = lab_client_user()
    params = on_lab_cluster(params, cluster, client_user=client)
    info = {"port": cluster.port, "pgdata": str(cluster.pgdata), "client_user": client}
    return params, cluster, info


def _run_steps(
    params: Params, record: Path, nb_dir: Path, kernel: _Kernel, progress: bool
) -> tuple[list[StepOutcome], str]:
    from concurrent.futures import Future, ThreadPoolExecutor

    parameters = _injected(params)
    phase_one = params.ca_mode == "files" and not params.ca_files
    steps: list[StepOutcome] = []
    # HTML is rendered while the next notebook runs (the kernel is another process)
    html = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgtls-html")
    rendering: dict[str, Future[None]] = {}
    try:
        for i, (step, title) in enumerate(STEPS):
            if phase_one and i > 0:
                steps.append(
                    StepOutcome(
                        step,
                        title,
                        "not-run",
                        note="waiting for the CA's response (ca_files is empty)",
                    )
                )
                continue
            if i == 4 and not params.apply:
                steps.append(
                    StepOutcome(
                        step,
                        title,
                        "skipped",
                        note="apply is false: nothing was changed, so there is nothing to verify",
                    )
                )
                continue
            if any(s.status == "failed" for s in steps):
                steps.append(StepOutcome(step, title, "not-run"))
                continue
            if progress:
                print(f"[{i + 1}/{len(STEPS)}] {step}", file=sys.stderr, flush=True)
            t = time.monotonic()
            error, nb = _run_notebook(
                nb_dir / f"{step}.ipynb",
                record / f"{step}.ipynb",
                parameters,
                kernel,
                progress,
                title,
            )
            seconds = time.monotonic() - t
            if nb is not None:
                rendering[step] = html.submit(_write_html, nb, record / f"{step}.html")
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
