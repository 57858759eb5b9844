"""The interactive path as a DBA meets it: JupyterLab, the CSR form, Chromium.

JupyterLab runs from this interpreter on a free port with a token, on copies of the notebooks
prepared with lab parameters; Debian's Chromium (never a downloaded browser) is driven by
Playwright.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nbformat
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from support import skip_or_fail

from pgtls_helpers.errors import PgtlsError
from pgtls_helpers.lab import LabCluster, find_bindir, free_port
from pgtls_helpers.runbook.params import load_params
from pgtls_helpers.runbook.runner import prepare_notebooks

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def pg_bindir() -> Path:
    """These tests drive JupyterLab; the server side runs on both majors elsewhere, so one
    (PostgreSQL 15) is enough here and keeps the suite's time down."""
    try:
        return find_bindir(15)
    except PgtlsError as exc:
        skip_or_fail(str(exc))
        raise


@contextmanager
def running_jupyterlab(
    tmp_path: Path, notebooks: Path, passfile: Path
) -> Iterator[tuple[str, str]]:
    """A JupyterLab of its own serving ``notebooks`` (settings under ``tmp_path``), until the
    block ends: its base URL and token."""
    port, token = free_port(), secrets.token_hex(16)
    home = tmp_path / "jupyter"
    env = {
        **os.environ,
        "PGPASSFILE": str(passfile),
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
    }
    argv = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        f"--ServerApp.token={token}",
        f"--ServerApp.root_dir={notebooks}",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.news_url=",
    ]
    if os.geteuid() == 0:
        argv.append("--allow-root")
    log_path = tmp_path / "jupyterlab.log"
    log = log_path.open("w")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("JupyterLab did not start: " + log_path.read_text()[-2000:])
                time.sleep(0.3)
        yield base, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def jupyterlab(tmp_path: Path, fresh_cluster: LabCluster) -> Iterator[tuple[str, Path, Path]]:
    """(URL of 01_key_and_csr with the token, the notebooks' directory, the work directory)."""
    if not Path(CHROMIUM).exists():
        skip_or_fail(f"{CHROMIUM} is not installed (Debian: apt-get install chromium)")
    work = tmp_path / "work"
    params = load_params(
        {
            "change_id": "CHG-browser",
            "common_name": "db1.lab.pgtls.test",
            "subject_alt_names": ["localhost", "127.0.0.1"],
            "country": "US",
            "organization": "pgtls lab",
            "key_type": "ecdsa-p256",
            "ca_mode": "lab",
            "apply": True,
            "server_host": fresh_cluster.host,
            "server_port": fresh_cluster.port,
            "server_log_file": str(fresh_cluster.log_path),
            "work_dir": str(work),
            "hba_rules": [
                {
                    "type": "hostssl",
                    "database": "all",
                    "user": "all",
                    "address": "127.0.0.1/32",
                    "method": "scram-sha-256",
                }
            ],
        }
    )
    notebooks = tmp_path / "notebooks"
    prepare_notebooks(params, notebooks)
    with running_jupyterlab(tmp_path, notebooks, fresh_cluster.passfile) as (base, token):
        yield f"{base}/lab/tree/01_key_and_csr.ipynb?token={token}", notebooks, work


def _open(page: Any, url: str) -> None:
    """Open a notebook in the running JupyterLab, with a kernel of its own, ready to run."""
    page.goto(url)
    page.locator(".jp-Notebook .jp-Cell:visible").first.wait_for()
    # JupyterLab asks which kernel to start for a notebook opened beside another
    accept = page.locator(".jp-Dialog .jp-mod-accept")
    try:
        accept.wait_for(timeout=5000)
    except Exception:  # noqa: BLE001 - no dialog: the kernel starts by itself
        pass
    else:
        accept.click()
    page.get_by_text("Python 3 (ipykernel) | Idle").wait_for()


def _no_errors_shown(page: Any) -> None:
    stderr = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
    assert stderr.count() == 0, stderr.all_inner_texts()


def _run_to_the_end(page: Any, path: Path, timeout: float = 180) -> Path:
    """Save the notebook until the file shows its last cell ran, or an error stopped it."""
    deadline = time.monotonic() + timeout
    while True:
        if time.monotonic() > deadline:
            pytest.fail(f"{path.name} did not finish running within {timeout:.0f} s")
        page.wait_for_timeout(1000)
        page.keyboard.press("Control+s")
        page.wait_for_timeout(500)
        try:
            saved = nbformat.read(path, as_version=4)
        except (ValueError, nbformat.reader.NotJSONError):  # caught while being written
            continue
        cells = [c for c in saved.cells if c.cell_type == "code"]
        ran = cells[-1].get("execution_count") is not None
        failed = any(o["output_type"] == "error" for c in cells for o in c.get("outputs", []))
        if ran or failed:
            _wait_idle(page)
            page.keyboard.press("Control+s")
            page.wait_for_timeout(1000)
            return path


def _saved_outputs(path: Path) -> str:
    """Every output of a saved notebook as text; fails on an error or anything on stderr."""
    saved = nbformat.read(path, as_version=4)
    outputs = [o for c in saved.cells for o in c.get("outputs", [])]
    assert outputs, f"{path.name} was saved with its outputs"
    errors = [o for o in outputs if o["output_type"] == "error" or o.get("name") == "stderr"]
    assert not errors, [o.get("evalue") or o.get("text") for o in errors]
    return " ".join(
        str(o.get("data", {}).get("text/html", "")) + str(o.get("data", {}).get("text/plain", ""))
        for o in outputs
    )


def _playwright() -> Any:
    try:
        import playwright.sync_api
    except ImportError:
        skip_or_fail("playwright is not installed (it comes with the dev extra)")
        raise  # not reached: skip_or_fail raises
    return playwright.sync_api


def _run_menu(page: object, item: str) -> None:
    """Click Run → ``item`` (the accessible name may end with the item's shortcut)."""
    page.get_by_role("menuitem", name="Run", exact=True).click()  # type: ignore[attr-defined]
    name = re.compile("^" + re.escape(item) + r"(\s|$)")
    page.get_by_role("menuitem", name=name).first.click()  # type: ignore[attr-defined]


def _cell(page: object, text: str) -> object:
    """The notebook's code cell whose source contains ``text``."""
    return page.locator(".jp-CodeCell", has_text=text).first  # type: ignore[attr-defined]


def _wait_idle(page: object, timeout: float = 90.0) -> None:
    page.wait_for_function(  # type: ignore[attr-defined]
        "() => !document.querySelector('.jp-Notebook .jp-InputPrompt')"
        " || ![...document.querySelectorAll('.jp-InputPrompt')]"
        ".some(p => p.textContent.includes('*'))",
        timeout=timeout * 1000,
    )


def test_the_dba_fills_the_csr_form_and_gets_a_key_and_csr(
    jupyterlab: tuple[str, Path, Path],
) -> None:
    playwright_sync = _playwright()
    url, notebooks, work = jupyterlab
    with playwright_sync.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(url)
            page.locator(".jp-Notebook .jp-Cell").first.wait_for()
            page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for()

            # run down to the form, as a DBA would: select the form's cell, run what is above
            form_cell = _cell(page, "csr_form(params)")
            form_cell.locator(".jp-InputPrompt").click()  # type: ignore[attr-defined]
            _run_menu(page, "Run All Above Selected Cell")
            _wait_idle(page)
            form_cell.locator(".jp-InputPrompt").click()  # type: ignore[attr-defined]
            _run_menu(page, "Run Selected Cell and Do not Advance")
            cn = page.get_by_label("Common name (CN)")
            cn.wait_for()
            assert cn.input_value() == "db1.lab.pgtls.test"  # prefilled from the parameters

            # a mistake is caught inline, then corrected
            page.get_by_label("Country (C)").fill("Germany")
            page.get_by_text("must be two letters").wait_for()
            page.get_by_label("Country (C)").fill("DE")
            page.get_by_text("must be two letters").wait_for(state="detached")
            cn.fill("db7.lab.pgtls.test")
            page.get_by_label("Alternative names").fill("localhost\n127.0.0.1\ndb7")
            page.get_by_label("Key type").select_option("ecdsa-p384")
            page.get_by_role("button", name="Use these values").click()
            page.get_by_text("the next cells use these values").wait_for()

            # and the rest of the notebook
            values_cell = _cell(page, "form.params")
            values_cell.locator(".jp-InputPrompt").click()  # type: ignore[attr-defined]
            _run_menu(page, "Run Selected Cell and All Below")
            page.get_by_text("What to send to the CA").wait_for(timeout=90_000)
            _wait_idle(page)
            stderr = page.locator(
                '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
            )
            assert stderr.count() == 0, stderr.all_inner_texts()
            page.keyboard.press("Control+s")
            page.wait_for_timeout(1500)
        finally:
            browser.close()

    key = work / "CHG-browser" / "server.key"
    csr_path = work / "CHG-browser" / "server.csr"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert csr.subject.rfc4514_string().startswith("CN=db7.lab.pgtls.test")
    assert "C=DE" in csr.subject.rfc4514_string()
    sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "db7" in sans.get_values_for_type(x509.DNSName)
    public = csr.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"

    saved = nbformat.read(notebooks / "01_key_and_csr.ipynb", as_version=4)
    outputs = [o for c in saved.cells for o in c.get("outputs", [])]
    assert outputs, "the notebook was saved with its outputs"
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert not [o for o in outputs if o.get("name") == "stderr"]
    texts = " ".join(str(o.get("data", {}).get("text/html", "")) for o in outputs)
    assert "The CSR is made from the form" in texts


def test_a_name_changed_in_the_form_reaches_the_installed_certificate(
    jupyterlab: tuple[str, Path, Path], fresh_cluster: LabCluster
) -> None:
    """Step 1 in the browser with an edited common name, then 02 to 05 in the same JupyterLab:
    the certificate the server ends up presenting carries the name typed into the form."""
    playwright_sync = _playwright()
    url, notebooks, work = jupyterlab
    with playwright_sync.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            _open(page, url)
            form_cell = _cell(page, "csr_form(params)")
            form_cell.locator(".jp-InputPrompt").click()
            _run_menu(page, "Run All Above Selected Cell")
            _wait_idle(page)
            form_cell.locator(".jp-InputPrompt").click()
            _run_menu(page, "Run Selected Cell and Do not Advance")
            cn = page.get_by_label("Common name (CN)")
            cn.wait_for()

            # an invalid name is refused with the reason, and the next cell will not run on
            cn.fill("db 8")
            page.get_by_role("button", name="Use these values").click()
            page.get_by_text("not taken").wait_for()
            cn.fill("db8.lab.pgtls.test")
            page.get_by_role("button", name="Use these values").click()
            page.get_by_text("the next cells use these values").wait_for()
            values_cell = _cell(page, "form.params")
            values_cell.locator(".jp-InputPrompt").click()
            _run_menu(page, "Run Selected Cell and All Below")
            page.get_by_text("What to send to the CA").wait_for(timeout=90_000)
            _wait_idle(page)
            _no_errors_shown(page)

            base = url.split("/lab/tree/")[0]
            token = url.split("?token=")[1]
            steps = ("02_ca_response", "03_install_files", "04_enable_ssl", "05_verify_clients")
            for step in steps:
                _open(page, f"{base}/lab/tree/{step}.ipynb?token={token}")
                _run_menu(page, "Run All Cells")
                # JupyterLab draws only the cells in view: read what ran from the saved file
                texts = _saved_outputs(_run_to_the_end(page, notebooks / f"{step}.ipynb"))
                # the names of the CSR, not of the parameters, and a note that says so
                assert "the host names come from" in texts, step
                assert "db8.lab.pgtls.test" in texts, step
                if step == "05_verify_clients":
                    assert "Verdict: pass" in texts
        finally:
            browser.close()

    saved = work / "CHG-browser" / "subject.json"
    assert '"common_name": "db8.lab.pgtls.test"' in saved.read_text()
    installed = x509.load_pem_x509_certificates((fresh_cluster.pgdata / "server.crt").read_bytes())
    leaf = installed[0]
    assert leaf.subject.rfc4514_string().startswith("CN=db8.lab.pgtls.test")
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "db8.lab.pgtls.test" in sans.get_values_for_type(x509.DNSName)
    assert "db1.lab.pgtls.test" not in sans.get_values_for_type(x509.DNSName)
