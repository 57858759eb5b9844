"""``pgtls lab up|down|status|notebook``: a throwaway PostgreSQL cluster to explore the runbook on.

``up`` also writes ``runbook.yaml`` next to the cluster: parameters that point the runbook at
it, for ``pgtls run``. ``notebook`` (``make notebook``) opens the notebooks in JupyterLab
against a lab cluster, for the interactive path; as root it also makes the lab's client OS user
(named in ``client_os_user`` in the lab directory), which ``down`` removes with the cluster.
JupyterLab's log goes to ``jupyterlab.log`` there too. With ``apply: true`` on a server that is
not a lab cluster, ``notebook`` says which server will change, the notebooks apply nothing until
the DBA presses the button naming it, and the session's record is written when JupyterLab stops
(:mod:`pgtls_helpers.runbook.interactive`).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from pgtls_helpers.errors import PgtlsError
from pgtls_helpers.lab import LabCluster, free_port
from pgtls_helpers.runbook import interactive
from pgtls_helpers.runbook.record import pgtls_command
from pgtls_helpers.runbook.runner import remove_lab_client_user

_RUNBOOK_YAML = "runbook.yaml"
_CLIENT_USER_FILE = "client_os_user"  # the client OS user this lab made (as root)
JUPYTER_LOG = "jupyterlab.log"


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _psql(cluster: LabCluster) -> str:
    conn = f"host={cluster.host} port={cluster.port} user={cluster.superuser} dbname=postgres"
    return f"PGPASSFILE={shlex.quote(str(cluster.passfile))} psql {shlex.quote(conn)}"


def _runbook_params(cluster: LabCluster) -> dict[str, Any]:
    return cluster.runbook_values("lab-explore", organization="pgtls lab", reject_non_ssl=True)


def up(args: argparse.Namespace) -> int:
    """Create and start a lab cluster in ``--dir``; say how to reach it and run the runbook."""
    cluster = LabCluster.create(args.dir, port=args.port)
    try:
        cluster.start()
    except BaseException:
        cluster.remove()
        raise
    params_file = cluster.base / _RUNBOOK_YAML
    params_file.write_text(
        "# The runbook against the lab cluster in this directory (SSL off until step 4).\n"
        + yaml.safe_dump(_runbook_params(cluster), sort_keys=False)
    )
    env = f"PGPASSFILE={shlex.quote(str(cluster.passfile))}"
    pgtls = pgtls_command()
    _out(
        "\n".join(
            [
                f"lab cluster running on {cluster.host}:{cluster.port} (SSL off, stock "
                "pg_hba.conf)",
                f"  data directory: {cluster.pgdata}",
                f"  server log:     {cluster.log_path}",
                "",
                "connect (the password is in the passfile, never printed):",
                f"  {_psql(cluster)}",
                "",
                f"run the runbook against it (parameters written to {params_file}):",
                f"  {env} {pgtls} run {shlex.quote(str(params_file))}",
                "",
                f"stop and remove it:  {pgtls} lab down --dir {shlex.quote(str(args.dir))}",
            ]
        )
    )
    return 0


def down(args: argparse.Namespace) -> int:
    """Stop the lab cluster in ``--dir``, delete the directory and the client OS user the lab
    made."""
    cluster = LabCluster.attach(args.dir)
    user = _recorded_client_user(cluster.base)
    cluster.remove()
    said = f"lab cluster in {cluster.base} stopped and removed"
    if user is None:
        _out(said)
    elif remove_lab_client_user(user):
        _out(f"{said}, and its client OS user {user} with its home")
    else:
        _out(
            f"{said}; its client OS user {user} is still there: remove it with "
            f"'userdel --remove {user}'"
        )
        return 1
    return 0


def _record_client_user(base: Path, name: str) -> None:
    """Note in the lab directory the client OS user made for its cluster, for ``down``."""
    fd = os.open(
        base / _CLIENT_USER_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600
    )
    with os.fdopen(fd, "w") as fh:
        fh.write(name + "\n")


def _recorded_client_user(base: Path) -> str | None:
    """The client OS user :func:`_record_client_user` noted in ``base``, or None."""
    # base is the lab directory given on the command line; as root the server's OS user owns
    # it, so only a file of our own, not a link, counts (and remove_lab_client_user deletes
    # nothing but the lab's own pgtls_client_<hex> users)
    try:
        fd = os.open(base / _CLIENT_USER_FILE, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd) as fh:
        if os.fstat(fh.fileno()).st_uid != os.geteuid():
            return None
        return fh.read().strip() or None


def status(args: argparse.Namespace) -> int:
    """Whether the lab cluster in ``--dir`` runs, and how to connect; 1 when it is stopped."""
    cluster = LabCluster.attach(args.dir)
    if not cluster.running():
        _out(
            f"lab cluster in {cluster.base} is not running; remove it with '{pgtls_command()} "
            f"lab down --dir {args.dir}' and start a new one with '{pgtls_command()} lab up "
            f"--dir {args.dir}'"
        )
        return 1
    _out(f"lab cluster running on {cluster.host}:{cluster.port}, data in {cluster.pgdata}")
    _out(f"  {_psql(cluster)}")
    return 0


# --------------------------------------------------------------------------- make notebook


def _lab_for_notebooks(base: Path) -> tuple[LabCluster, bool]:
    """The lab cluster in ``base``, started if needed, or a new one; True when new."""
    if (base / "lab.json").exists():
        cluster = LabCluster.attach(base)
        if not cluster.running():
            cluster.start()
        return cluster, False
    cluster = LabCluster.create(base)
    cluster.start()
    return cluster, True


# A session in JupyterLab against the lab cluster is a change of its own: `make demo` leaves its
# key, CSR and journals under the parameters' change_id, and those belong to a cluster that is
# gone, so the notebooks get a change id (and a work directory) of their own.
NOTEBOOK_SUFFIX = "-notebook"


def prepare_lab_notebooks(args: argparse.Namespace) -> tuple[Any, Path, dict[str, str]]:
    """The parameters, the prepared notebooks' folder and the environment for ``notebook``."""
    import dataclasses
    import shutil

    from pgtls_helpers.runbook.params import load_params, read_params_file, resolve_paths
    from pgtls_helpers.runbook.runner import (
        lab_client_user,
        on_lab_cluster,
        prepare_notebooks,
    )

    values = resolve_paths(read_params_file(args.params), Path(args.params), args.work)
    params = load_params(values, source=str(args.params))
    env = dict(os.environ)
    if params.lab_cluster:
        if not params.change_id.endswith(NOTEBOOK_SUFFIX):
            params = dataclasses.replace(params, change_id=params.change_id + NOTEBOOK_SUFFIX)
        cluster, new = _lab_for_notebooks(Path(args.dir).resolve())
        client = _recorded_client_user(cluster.base)
        if new:  # whatever an earlier session left belonged to a cluster that is gone
            shutil.rmtree(params.work.path, ignore_errors=True)
            remove_lab_client_user(client)
            # as root, an OS user of the cluster's own, which `lab down` removes with it
            client = lab_client_user(private=True)
            if client is not None:
                _record_client_user(cluster.base, client)
        params = on_lab_cluster(params, cluster, client_user=client)
        env["PGPASSFILE"] = str(cluster.passfile)
        _out(f"lab cluster on {cluster.host}:{cluster.port} ({'new' if new else 'reused'})")
    target = Path(args.work).resolve() / "notebooks" / params.change_id
    # an earlier session here that changed the server and was not recorded (its terminal was
    # killed) is recorded now, before its notebooks are replaced
    earlier = interactive.seal_session(target)
    if earlier is not None:
        _out(f"record of the earlier session in {target}: {earlier / 'index.html'}")
    if params.apply and not params.lab_cluster:
        params = _start_session(params, target, args, values)
    prepare_notebooks(params, target)
    _out(f"notebooks for change {params.change_id} in {target}")
    _out(f"  work directory (key, CSR, subject.json): {params.work.path}")
    _out(
        f"  server {params.server_host}:{params.server_port}, ca_mode {params.ca_mode}, "
        f"apply {str(params.apply).lower()}"
    )
    if params.lab_cluster:
        again = f"{pgtls_command()} lab down --dir {shlex.quote(str(args.dir))}"
        _out(f"to start over (a new cluster, an empty work directory): {again}; make notebook")
        _out(f"when done: {again}")
    return params, target, env


def _data_directory(params: Any) -> tuple[str | None, str]:
    """The server's data directory (``pgdata``, else asked from the server), and how known."""
    from pgtls_helpers.postgres.server import Server

    if params.pgdata:
        return params.pgdata, "from the parameters"
    try:
        with Server({**params.conninfo(), "connect_timeout": 5}) as server:
            return server.show("data_directory"), "as the server says"
    except PgtlsError as exc:
        return None, f"not known: {exc}"


def _start_session(params: Any, target: Path, args: argparse.Namespace, values: Any) -> Any:
    """An interactive session that will change a real server: say which one, loudly, and
    prepare the confirmation and the record (:mod:`pgtls_helpers.runbook.interactive`)."""
    from pgtls_helpers.runbook.snapshot import server_state

    pgdata, how = _data_directory(params)
    records = Path(getattr(args, "records", None) or "records").resolve()
    params = interactive.start_session(
        params,
        target,
        params_file=Path(args.params),
        values=values,
        records_dir=records,
        data_directory=pgdata,
        server_before=server_state(params),
    )
    server = f"{params.server_host}:{params.server_port}"
    _out(f"THESE NOTEBOOKS CHANGE A REAL SERVER: {server} (change {params.change_id})")
    _out(f"  data directory: {pgdata + ' (' + how + ')' if pgdata else how}")
    _out(
        f'  nothing is applied until you press "Apply to {server}" at the top of a notebook; '
        "save each notebook (Ctrl-S) before you stop JupyterLab"
    )
    _out(f"  the record goes to {records / params.change_id}/<stamp>/ when JupyterLab stops")
    return params


def jupyterlab_argv(root: Path, port: int) -> list[str]:
    """The command that serves the notebooks in ``root`` on ``port`` (localhost, no browser;
    the token comes in the environment as ``JUPYTER_TOKEN``, so ``ps`` does not show it)."""
    argv = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={root}",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.news_url=",
    ]
    if os.geteuid() == 0:
        argv.append("--allow-root")
    return argv


_DEFAULT_PORT = 8888


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def notebook(args: argparse.Namespace) -> int:
    """Prepare the notebooks with a parameters file and open them in JupyterLab.

    With ``lab_cluster: true`` the notebooks point at the lab cluster in ``--dir`` (started,
    or created, as needed; it keeps running afterwards for ``pgtls lab down``), under the
    change id ``<change_id>-notebook``, so nothing ``make demo`` left is reused. JupyterLab
    listens on ``--port`` (default 8888, or a free one when that is taken); its log goes to
    ``jupyterlab.log`` in ``--dir``, and one line gives the URL with its token.

    With ``apply: true`` on any other server the terminal and every notebook say which server
    changes; the notebooks apply nothing until the DBA presses the button that names it, and
    when JupyterLab stops a session that applied something is recorded in
    ``records/<change_id>/<stamp>/`` (the notebooks as saved, the manifest, the index page).
    """
    _params, target, env = prepare_lab_notebooks(args)
    port = args.port or (_DEFAULT_PORT if _port_free(_DEFAULT_PORT) else free_port())
    token = secrets.token_hex(24)
    env["JUPYTER_TOKEN"] = token
    lab_dir = Path(args.dir).resolve()
    lab_dir.mkdir(parents=True, exist_ok=True)
    log_path = lab_dir / JUPYTER_LOG
    with log_path.open("w") as log:
        # stdin is not a terminal, so Ctrl-C stops JupyterLab without its "Shutdown?" prompt
        proc = subprocess.Popen(
            jupyterlab_argv(target, port),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        base = f"http://localhost:{port}"
        if not _wait_until_serving(proc, f"{base}/api/status?token={token}"):
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise PgtlsError(
                f"JupyterLab did not start on port {port} ({tail[0]}); its log is {log_path}"
            )
        _out(
            f"JupyterLab: {base}/lab/tree/01_key_and_csr.ipynb?token={token}  "
            f"(log: {log_path}; Ctrl-C stops it)"
        )
        proc.wait()
    except KeyboardInterrupt:
        pass  # JupyterLab, in the same process group, had the Ctrl-C too
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _out("JupyterLab stopped")
    record = interactive.seal_session(target)
    if record is not None:
        _out(f"record of this session's change: {record / 'index.html'}")
    return 0


def _wait_until_serving(proc: subprocess.Popen[bytes], url: str, timeout: float = 120) -> bool:
    """True once ``url`` answers; False when the server exits first or takes too long."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except OSError:
            time.sleep(0.3)
    return False


# --------------------------------------------------------------------------- pgtls lab ca


def ca(args: argparse.Namespace) -> int:
    """A lab CA kept in ``--dir`` (made on first use, root named ``--name``); ``--sign CSR``
    writes the CA's answer (leaf, intermediates, root) to ``DIR/signed/`` for ``ca_files``."""
    from pgtls_helpers.lab import LabCA
    from pgtls_helpers.pki.csr import load_csr

    base = Path(args.dir).resolve()
    existed = (base / "signer.key").exists()
    lab_ca = LabCA.load_or_create(base, root_name=args.name, minimal=args.minimal)
    root_cn = lab_ca.root.subject.rfc4514_string()
    if existed and f"CN={args.name}" not in root_cn:
        _out(f"note: {base} already holds a lab CA whose root is {root_cn}; it was kept")
    _out(f"lab CA in {base} ({'reused' if existed else 'new'}): root {root_cn}")
    _out(f"  root certificate (for add_roots): {base / 'root.crt'}")
    if args.sign:
        csr = load_csr(Path(args.sign).read_bytes(), source=args.sign)
        written = lab_ca.write_response(lab_ca.sign_csr(csr), base / "signed")
        _out("signed; list these in ca_files:")
        for path in written:
            _out(f"  {path}")
    return 0


def demo_clients(args: argparse.Namespace) -> int:
    """The client-certificate runbook on the embedded default: a throwaway cluster brought to
    TLS by the server runbook, a throwaway client OS user and role, then ``pgtls clients``;
    everything made for the demo is removed afterwards, the records stay."""
    import psycopg

    from pgtls_helpers.errors import InputError
    from pgtls_helpers.runbook.runner import lab_client_user, remove_lab_client_user, run
    from pgtls_helpers.runbook.steps import CLIENTS

    if os.geteuid() != 0:
        raise InputError(
            "the client demo makes a throwaway client OS user, which needs root; run it as root "
            "(your own ~/.postgresql is never used for a demo)"
        )
    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    cluster = LabCluster.create()  # in a folder of its own the server's OS user can reach
    user = None
    saved = os.environ.get("PGPASSFILE")
    try:
        cluster.start()
        user = lab_client_user(private=True)
        if user is None:
            raise InputError("could not make a throwaway client OS user (useradd failed)")
        os.environ["PGPASSFILE"] = str(cluster.passfile)
        server = {**_runbook_params(cluster), "change_id": "lab-clients-server"}
        server["client_system_users"] = [user]
        server_file = base / "server.yaml"
        server_file.write_text(yaml.safe_dump(server, sort_keys=False))
        first = run(server_file, records_dir=args.records, work_dir=args.work, progress=False)
        _out(first.summary())
        if first.exit_code != 0:
            return first.exit_code
        with psycopg.connect(**cluster.conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
            conn.execute(f'CREATE ROLE "{user}" LOGIN')
        clients = {
            **server,
            "change_id": "lab-clients",
            "clients": [{"os_user": user, "role": user}],
            "hba_rules": [
                {
                    "type": "hostssl",
                    "database": "all",
                    "user": user,
                    "address": f"{cluster.host}/32",
                    "method": "cert",
                }
            ],
        }
        clients_file = base / "clients.yaml"
        clients_file.write_text(yaml.safe_dump(clients, sort_keys=False))
        second = run(
            clients_file,
            records_dir=args.records,
            work_dir=args.work,
            progress=False,
            steps=CLIENTS,
        )
        _out(second.summary())
        _out(
            f"the demo's cluster and client OS user {user} are removed now (nothing to roll "
            f"back); its records stay in {args.records}/"
        )
        return second.exit_code
    finally:
        if saved is None:
            os.environ.pop("PGPASSFILE", None)
        else:
            os.environ["PGPASSFILE"] = saved
        cluster.remove()
        remove_lab_client_user(user)
