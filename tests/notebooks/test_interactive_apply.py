"""``make notebook`` with ``apply: true`` on a real server (not a lab run): the terminal and the
notebooks say which server changes, Run All changes nothing until the DBA presses the button
that names it, and the session leaves a record like a headless run.

The server is a throwaway cluster of this test's own, given to ``pgtls lab notebook`` as any
server would be (``lab_cluster: false``); JupyterLab is the one that command starts, driven by
Debian's Chromium through Playwright.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nbformat
import psycopg
import pytest
import yaml
from test_browser import CHROMIUM, CHROMIUM_ARGS, _open, _playwright, _run_menu, _wait_idle
from test_lab_notebook import _lines

from pgtls_helpers.lab import LabCluster, free_port
from pgtls_helpers.runbook.record import read_manifest

pytestmark = pytest.mark.browser

CHANGE = "CHG-interactive"


@pytest.fixture(scope="module")
def pg_bindir() -> Path:
    """This test drives JupyterLab; the server side runs on both majors elsewhere, so the first
    major is enough here and keeps the suite's time down."""
    from conftest import PG_MAJORS, _bindir_or_skip

    return _bindir_or_skip(PG_MAJORS[0])


def _data_files(cluster: LabCluster) -> dict[str, str]:
    """sha256 of every file at the top of the data directory (the configuration, the key and
    certificate files the runbook installs), and which files there are."""
    out = {}
    for path in sorted(cluster.pgdata.iterdir()):
        if path.is_file() and path.name not in ("postmaster.pid", "postmaster.opts"):
            out[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _show_ssl(cluster: LabCluster) -> str:
    with psycopg.connect(**cluster.conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        row = conn.execute("SHOW ssl").fetchone()
    assert row is not None
    return str(row[0])


def _run_all_and_save(page: Any, path: Path, timeout: float = 300) -> nbformat.NotebookNode:
    """Run All Cells, then save until the file shows this run reached its last cell or
    stopped at an error (execution counts above those of any earlier run)."""
    try:
        before = nbformat.read(path, as_version=4)
        old = max((c.get("execution_count") or 0 for c in before.cells), default=0)
    except (OSError, ValueError):
        old = 0
    _run_menu(page, "Run All Cells")
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, f"{path.name} did not finish within {timeout:.0f} s"
        page.wait_for_timeout(1000)
        page.keyboard.press("Control+s")
        page.wait_for_timeout(500)
        try:
            saved = nbformat.read(path, as_version=4)
        except (ValueError, nbformat.reader.NotJSONError):
            continue
        cells = [c for c in saved.cells if c.cell_type == "code"]
        new = [c for c in cells if (c.get("execution_count") or 0) > old]
        failed = any(o["output_type"] == "error" for c in new for o in c.get("outputs", []))
        if failed or (cells[-1].get("execution_count") or 0) > old:
            _wait_idle(page)
            page.keyboard.press("Control+s")
            page.wait_for_timeout(1000)
            return nbformat.read(path, as_version=4)


def _texts(nb: nbformat.NotebookNode) -> str:
    outs = [o for c in nb.cells for o in c.get("outputs", [])]
    return " ".join(
        str(o.get("data", {}).get("text/html", ""))
        + str(o.get("data", {}).get("text/plain", ""))
        + str(o.get("evalue", ""))
        for o in outs
    )


def _errors(nb: nbformat.NotebookNode) -> list[str]:
    return [
        str(o.get("evalue"))
        for c in nb.cells
        for o in c.get("outputs", [])
        if o["output_type"] == "error"
    ]


def test_run_all_changes_nothing_until_confirmed_and_the_session_is_recorded(
    tmp_path: Path, fresh_cluster: LabCluster
) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (Debian: apt-get install chromium)")
    pw_sync = _playwright()
    cluster = fresh_cluster
    server = f"{cluster.host}:{cluster.port}"
    params_file = tmp_path / f"{CHANGE}.yaml"
    params_file.write_text(
        yaml.safe_dump(
            {
                "change_id": CHANGE,
                "lab_cluster": False,
                "apply": True,
                "ca_mode": "lab",
                "server_host": cluster.host,
                "server_port": cluster.port,
                "server_user": cluster.superuser,
                "server_log_file": str(cluster.log_path),
                "common_name": "db1.lab.pgtls.test",
                "subject_alt_names": ["localhost", cluster.host],
                "key_type": "ecdsa-p256",
                "hba_rules": [
                    {
                        "type": "hostssl",
                        "database": "all",
                        "user": "all",
                        "address": f"{cluster.host}/32",
                        "method": "scram-sha-256",
                    }
                ],
            }
        )
    )
    home = tmp_path / "jupyter"
    settings = home / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    # every cell in the DOM, so the button at the top is there after a Run All scrolled down
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    env = {
        **os.environ,
        "PGPASSFILE": str(cluster.passfile),
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
    }
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "pgtls_helpers",
        "lab",
        "notebook",
        "--params",
        str(params_file),
        "--dir",
        str(tmp_path / "lab"),
        "--work",
        str(tmp_path / "work"),
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=tmp_path,  # records/ goes here, as `make notebook` puts it in the checkout
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    notebooks = tmp_path / "work" / "notebooks" / CHANGE
    out: list[str] = []
    lines: queue.Queue[str | None] = _lines(proc)
    before = _data_files(cluster)
    assert _show_ssl(cluster) == "off"
    try:
        deadline = time.monotonic() + 120
        while not any(ln.startswith("JupyterLab: ") for ln in out):
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            assert line is not None, "\n".join(out)
            out.append(line)
        said = "\n".join(out)
        # the terminal says which server changes, where its data is, and the change
        assert f"THESE NOTEBOOKS CHANGE A REAL SERVER: {server} (change {CHANGE})" in said, said
        assert f"data directory: {cluster.pgdata}" in said, said
        assert f'press "Apply to {server}"' in said, said
        match = re.search(r"(http://localhost:\d+)/lab/tree/\S+\?token=(\w+)", said)
        assert match, said
        base, token = match.group(1), match.group(2)

        with pw_sync.sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
            )
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(60_000)

                def step(name: str) -> nbformat.NotebookNode:
                    _open(page, f"{base}/lab/tree/{name}.ipynb?token={token}")
                    return _run_all_and_save(page, notebooks / f"{name}.ipynb")

                for name in ("01_key_and_csr", "02_ca_response"):
                    nb = step(name)
                    assert not _errors(nb), (name, _errors(nb))
                    # the warning is the first thing every notebook shows
                    assert f"This session changes the real server {server}" in _texts(nb)
                    assert str(cluster.pgdata) in _texts(nb)
                # Run All before the confirmation: one sentence, and nothing changes
                for name in ("03_install_files", "04_enable_ssl"):
                    nb = step(name)
                    (error,) = _errors(nb)
                    assert error.startswith("nothing was applied: press “Apply to"), error
                    assert server in error
                    assert _data_files(cluster) == before, name
                    assert _show_ssl(cluster) == "off", name
                # the DBA confirms in the notebook open now (04), then runs 03 to 05 again
                button = page.locator("button:visible", has_text=f"Apply to {server}")
                button.first.scroll_into_view_if_needed()
                button.first.click()
                page.get_by_text("confirmed by").first.wait_for()
                assert _data_files(cluster) == before  # the button alone changes nothing
                for name in ("03_install_files", "04_enable_ssl", "05_verify_clients"):
                    nb = step(name)
                    assert not _errors(nb), (name, _errors(nb))
                assert "Verdict: pass" in _texts(nb)
            finally:
                browser.close()
        assert _show_ssl(cluster) == "on"
        assert _data_files(cluster) != before
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C, as the DBA stops `make notebook`
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        try:
            while (line := lines.get(timeout=30)) is not None:
                out.append(line)
        except queue.Empty:
            pass
        finally:  # closed whatever happened above, so no pipe outlives the test
            assert proc.stdout is not None
            proc.stdout.close()
    said = "\n".join(out)
    assert proc.returncode == 0, said

    # the session's record, beside the headless ones
    (record,) = sorted((tmp_path / "records" / CHANGE).glob("*/manifest.json"))
    record = record.parent
    assert f"record of this session's change: {record / 'index.html'}" in said, said
    manifest = read_manifest(record / "manifest.json")
    assert manifest.kind == "change" and manifest.apply and manifest.server == server
    assert [s.status for s in manifest.steps] == ["ok"] * 5, manifest.steps
    assert manifest.verdict == "pass" and manifest.changed
    assert manifest.result == "changed and proven"
    assert manifest.server_before is not None and manifest.server_before.settings["ssl"] == "off"
    assert manifest.server_after is not None and manifest.server_after.settings["ssl"] == "on"
    for step in ("01_key_and_csr", "03_install_files", "05_verify_clients"):
        assert (record / f"{step}.ipynb").exists() and (record / f"{step}.html").exists()
    saved = nbformat.read(record / "04_enable_ssl.ipynb", as_version=4)
    assert not _errors(saved)  # as saved after the confirmed run
    session = json.loads((record / "session.json").read_text())
    assert session["server_host"] == cluster.host and session["change_id"] == CHANGE
    confirmation = json.loads((record / "confirmation.json").read_text())
    assert confirmation["server"] == server
    applied = [
        json.loads(ln)["step"] for ln in (record / "applied.jsonl").read_text().split("\n") if ln
    ]
    assert applied == ["step3_install_files", "step4_enable_ssl"], applied
    index = (record / "index.html").read_text()
    assert 'id="interactive"' in index and "Interactive run in JupyterLab" in index
    assert set(manifest.record_files) >= {"index.html", "session.json", "03_install_files.ipynb"}
    change_index = (record.parent / "index.html").read_text()
    assert record.name in change_index
    # the confirmation went with the record: the notebooks refuse again until the next one
    assert not (notebooks / ".pgtls-session" / "confirmation.json").exists()
    assert (notebooks / ".pgtls-session" / "session.json").exists()
