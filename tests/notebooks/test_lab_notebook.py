"""``make notebook`` / ``pgtls lab notebook``: JupyterLab on its port, one line with the URL, its
log in a file; and ``pgtls lab down`` leaves nothing of the lab behind, the client OS user it
made as root included."""

from __future__ import annotations

import os
import pwd
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import skip_or_fail

from pgtls_helpers.cli import main as cli_main
from pgtls_helpers.cli.lab import JUPYTER_LOG, jupyterlab_argv
from pgtls_helpers.errors import PgtlsError
from pgtls_helpers.lab import LabCluster, find_bindir, free_port

ROOT = Path(__file__).resolve().parents[2]


def test_make_notebook_hands_port_to_jupyterlab() -> None:
    def recipe(*args: str) -> str:
        done = subprocess.run(
            ["make", "-n", "--no-print-directory", "notebook", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        (line,) = [ln for ln in done.stdout.splitlines() if " lab notebook " in ln]
        return line

    assert recipe("PORT=8123").endswith("--dir work/lab --work work --records records --port 8123")
    assert "--port" not in recipe()
    argv = jupyterlab_argv(Path("/srv/nb"), 8123)
    assert argv[:3] == [sys.executable, "-m", "jupyterlab"]
    assert "--port=8123" in argv and "--ServerApp.port_retries=0" in argv
    assert "--ServerApp.root_dir=/srv/nb" in argv and "--no-browser" in argv
    assert not any("token" in a for a in argv)  # it comes in the environment, not in ps


@pytest.fixture
def lab_dir() -> Iterator[Path]:
    """A directory the server's OS user can reach (pytest's tmp_path is private to root)."""
    try:
        find_bindir(15)
    except PgtlsError as exc:
        skip_or_fail(str(exc))
    base = Path(tempfile.mkdtemp(prefix="pgtls-test-lab-"))
    yield base
    if (base / "lab.json").exists():
        cli_main(["lab", "down", "--dir", str(base)])
    shutil.rmtree(base, ignore_errors=True)


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str | None]:
    """What ``proc`` prints, line by line (None at its end), read on a thread of its own."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def test_lab_notebook_serves_on_its_port_and_lab_down_leaves_nothing(
    lab_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    home = tmp_path / "jupyter"
    env = {
        **os.environ,
        "PGTLS_PG_BINDIR": str(find_bindir(15)),
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
    }
    argv = [
        sys.executable,
        "-m",
        "pgtls_helpers",
        "lab",
        "notebook",
        "--params",
        str(ROOT / "parameters" / "lab.yaml"),
        "--dir",
        str(lab_dir),
        "--work",
        str(tmp_path / "work"),
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out: list[str] = []
    try:
        lines, deadline = _lines(proc), time.monotonic() + 120
        while not any(ln.startswith("JupyterLab: ") for ln in out):
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            assert line is not None, "\n".join(out)
            out.append(line)
        (url_line,) = [ln for ln in out if "http://" in ln]  # one line with the URL
        match = re.search(rf"(http://localhost:{port}/\S+)\?token=(\w+)", url_line)
        assert match, url_line
        token = match.group(2)
        with urllib.request.urlopen(
            f"http://localhost:{port}/api/status?token={token}", timeout=10
        ) as resp:
            assert resp.status == 200
        log = lab_dir / JUPYTER_LOG
        assert f"log: {log}" in url_line
        assert log.read_text().strip(), "JupyterLab's log is empty"
        assert not any(re.match(r"\[[IWE] ", ln) for ln in out), out  # its log is in the file
        user = (lab_dir / "client_os_user").read_text().strip() if os.geteuid() == 0 else None
        if user is not None:  # as root: a client OS user of this lab's own, in the notebooks
            assert re.fullmatch(r"pgtls_client_[0-9a-f]{8}", user), user
            pwd.getpwnam(user)
            notebooks = tmp_path / "work" / "notebooks" / "lab-demo-notebook"
            assert user in (notebooks / "03_install_files.ipynb").read_text()
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    while (line := lines.get(timeout=10)) is not None:
        out.append(line)
    assert proc.stdout is not None
    proc.stdout.close()
    assert proc.returncode == 0, "\n".join(out)
    assert out[-1] == "JupyterLab stopped", out
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://localhost:{port}/api/status", timeout=2)

    cluster = LabCluster.attach(lab_dir)
    capsys.readouterr()
    assert cli_main(["lab", "down", "--dir", str(lab_dir)]) == 0
    said = capsys.readouterr().out
    assert not (lab_dir / "data").exists()
    with pytest.raises(OSError):
        socket.create_connection((cluster.host, cluster.port), timeout=2).close()
    if user is not None:
        assert f"client OS user {user} with its home" in said
        with pytest.raises(KeyError):
            pwd.getpwnam(user)
        assert not Path("/home", user).exists()
