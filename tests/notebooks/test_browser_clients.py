"""Step c1's client form as a DBA meets it: JupyterLab, the subject of each client, Chromium.

JupyterLab runs from this interpreter on a free port with a token, on a copy of c1 prepared with
lab parameters for a lab cluster; Debian's Chromium is driven by Playwright (see test_browser).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import nbformat
import papermill
import pytest
from cryptography import x509
from support import skip_or_fail
from test_browser import (  # the JupyterLab helpers of the server runbook's browser tests
    CHROMIUM,
    CHROMIUM_ARGS,
    _cell,
    _no_errors_shown,
    _open,
    _playwright,
    _run_menu,
    _wait_idle,
    pg_bindir,  # noqa: F401 - the fixture: one major is enough here
    running_jupyterlab,
)

from pgtls_helpers.lab import LabCluster
from pgtls_helpers.runbook.params import Params, load_params, plain_values

pytestmark = pytest.mark.browser

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
C1 = "c1_client_keys.ipynb"
RULE = {"type": "hostssl", "database": "all", "address": "127.0.0.1/32", "method": "cert"}


@pytest.fixture
def lab_c1(tmp_path: Path, fresh_cluster: LabCluster) -> Iterator[tuple[str, Params, Path]]:
    """(URL of c1_client_keys with the token, the parameters it was prepared with, the
    notebook's file)."""
    if not Path(CHROMIUM).exists():
        skip_or_fail(f"{CHROMIUM} is not installed (Debian: apt-get install chromium)")
    params = load_params(
        {
            "change_id": "CHG-browser-clients",
            "common_name": "db1.lab.pgtls.test",
            "key_type": "ecdsa-p256",
            "ca_mode": "lab",
            "server_host": fresh_cluster.host,
            "server_port": fresh_cluster.port,
            "work_dir": str(tmp_path / "work"),
            "clients": [
                {"os_user": "alice", "role": "alice"},
                {"os_user": "bob", "role": "bob_db"},
            ],
            "ident_maps": [{"map": "certmap", "system_user": "bob_db", "role": "bob_db"}],
            "hba_rules": [
                {**RULE, "user": "alice"},
                {**RULE, "user": "bob_db", "options": ["map=certmap"]},
            ],
        }
    )
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    papermill.execute_notebook(
        str(NOTEBOOKS / C1),
        str(notebooks / C1),
        parameters=plain_values(params),
        prepare_only=True,
        kernel_name="python3",
        progress_bar=False,
    )
    with running_jupyterlab(tmp_path, notebooks, fresh_cluster.passfile) as (base, token):
        yield f"{base}/lab/tree/{C1}?token={token}", params, notebooks / C1


def test_a_dn_typed_in_the_client_form_is_the_subject_of_that_clients_csr(
    lab_c1: tuple[str, Params, Path],
) -> None:
    playwright_sync = _playwright()
    url, params, notebook = lab_c1
    saved = params.work.client_subjects
    with playwright_sync.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1200})
            page.set_default_timeout(60_000)
            _open(page, url)
            form_cell = _cell(page, "client_form(params)")
            form_cell.locator(".jp-InputPrompt").click()
            _run_menu(page, "Run All Above Selected Cell")
            _wait_idle(page)
            form_cell.locator(".jp-InputPrompt").click()
            _run_menu(page, "Run Selected Cell and Do not Advance")
            role = page.get_by_label("bob: role")
            role.wait_for()
            assert role.input_value() == "bob_db"  # prefilled from the parameters
            assert page.get_by_label("bob: pg_ident.conf map").input_value() == "certmap"

            # a full DN for bob: a mistake is caught as typed, refused by the button, no file
            page.get_by_label("bob: subject").select_option("a full DN")
            dn = page.get_by_label("bob: DN")
            dn.fill("CN=bob_db,OU=dba,,O=Example")
            page.get_by_text("is not a distinguished name").first.wait_for()
            page.get_by_role("button", name="Use these values").click()
            page.get_by_text("not taken:").wait_for()
            assert not saved.exists()

            # corrected: the DN as the server will match it and as pg_stat_ssl will show it
            dn.fill("CN=bob_db,OU=dba,O=Example")
            page.get_by_text("is not a distinguished name").first.wait_for(state="detached")
            page.get_by_text("CN=bob_db,OU=dba,O=Example", exact=True).wait_for()
            page.get_by_text("/O=Example/OU=dba/CN=bob_db", exact=True).wait_for()
            page.get_by_role("button", name="Use these values").click()
            page.get_by_text("the next cells use these values").wait_for()

            values_cell = _cell(page, "form.params")
            values_cell.locator(".jp-InputPrompt").click()
            _run_menu(page, "Run Selected Cell and All Below")
            page.get_by_text("The client CSRs are made from the form").wait_for()
            _wait_idle(page)
            _no_errors_shown(page)
            page.keyboard.press("Control+s")
            page.wait_for_timeout(1000)
        finally:
            browser.close()

    choice = json.loads(saved.read_text())
    assert choice["clients"][1] == {
        "os_user": "bob",
        "role": "bob_db",
        "subject": "CN=bob_db,OU=dba,O=Example",
    }
    bob = x509.load_pem_x509_csr(params.work.client("bob").csr.read_bytes())
    assert bob.subject.rfc4514_string() == "CN=bob_db,OU=dba,O=Example"
    alice = x509.load_pem_x509_csr(params.work.client("alice").csr.read_bytes())
    assert alice.subject.rfc4514_string() == "CN=alice"
    # the notebook as saved: the values table and the step's result name the form's DN
    outputs = [o for c in nbformat.read(notebook, as_version=4).cells for o in c.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error" or o.get("name") == "stderr"]
    texts = " ".join(str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "The client CSRs are made from the form" in texts
    assert texts.count("CN=bob_db,OU=dba,O=Example") >= 2, texts
