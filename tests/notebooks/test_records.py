"""The records of one change as a reviewer meets them, and what the terminal says.

One throwaway cluster goes through a change the way change management runs it: the plan
(apply false), the change, a re-run that finds nothing to do, the rollback's dry run and the
rollback. A second cluster gets a change whose proof fails after step 4 changed the server.
The pages are opened in Debian's Chromium through Playwright, offline, and read as a reviewer
reads them; every network request the pages make is counted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any

import psycopg
import pytest
from record_checks import params_for, write_params
from support import skip_or_fail

from pgtls_helpers.cli import main as cli_main
from pgtls_helpers.lab import LabCluster, find_bindir
from pgtls_helpers.runbook.runner import NOTEBOOKS_DIR, RunOutcome, run

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
CHANGE = "CHG-rec"
# values of the notebooks' own default parameters cell, never the change's
WRONG_ROOT = """\
from pgtls_helpers.lab import LabCA
from pgtls_helpers.runbook.common import pem_of

params.work.root.write_bytes(pem_of(LabCA.create(root_name="Wrong Root CA").root))
"""
DEFAULTS_SHOWN_AS_VALUES = ('"lab-demo"', "lab-demo", "server_port: int = 5432")


@dataclass
class Change:
    cluster: LabCluster
    tmp: Path
    params_file: Path
    plan: RunOutcome
    applied: RunOutcome
    again: RunOutcome
    dry_run_out: str
    rollback_out: str
    rollback_dir: Path
    hba_before: bytes
    hba_after_rollback: bytes


@dataclass
class Failed:
    outcome: RunOutcome
    cluster: LabCluster


def _cli(*argv: str) -> tuple[int, str]:
    out = StringIO()
    with redirect_stdout(out):
        code = cli_main(list(argv))
    return code, out.getvalue()


def _run(tmp: Path, params_file: Path) -> RunOutcome:
    return run(params_file, tmp / "records", tmp / "work", progress=False)


@pytest.fixture(scope="module")
def change(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Change]:
    tmp = tmp_path_factory.mktemp("change")
    cluster = LabCluster.create(bindir=find_bindir(15))
    mp = pytest.MonkeyPatch()
    try:
        cluster.start()
        mp.setenv("PGPASSFILE", str(cluster.passfile))
        hba = cluster.pgdata / "pg_hba.conf"
        hba_before = hba.read_bytes()
        values = params_for(cluster, change_id=CHANGE, apply=False)
        params_file = write_params(tmp / "CHG-rec.yaml", **values)
        # an application connected over TCP without SSL while the change is planned
        legacy = psycopg.connect(
            **cluster.conninfo(),  # type: ignore[arg-type]
            sslmode="disable",
            application_name="legacy-app",
        )
        try:
            plan = _run(tmp, params_file)
        finally:
            legacy.close()
        write_params(params_file, **{**values, "apply": True})
        applied = _run(tmp, params_file)
        again = _run(tmp, params_file)
        work, records = str(tmp / "work"), str(tmp / "records")
        code, dry = _cli("rollback", str(params_file), "--work", work, "--records", records,
                         "--dry-run")  # fmt: skip
        assert code == 0, dry
        before_rollback = sorted((tmp / "records" / CHANGE).iterdir())
        code, back = _cli("rollback", str(params_file), "--work", work, "--records", records)
        assert code == 0, back
        new = set(sorted((tmp / "records" / CHANGE).iterdir())) - set(before_rollback)
        (rollback_dir,) = [p for p in new if p.is_dir()]
        yield Change(
            cluster,
            tmp,
            params_file,
            plan,
            applied,
            again,
            dry,
            back,
            rollback_dir,
            hba_before,
            hba.read_bytes(),
        )
    finally:
        mp.undo()
        cluster.remove()


@pytest.fixture(scope="module")
def failed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Failed]:
    """A change whose proof fails after step 4 changed the server: between steps 4 and 5 the
    root handed to clients is swapped for one that did not sign the chain (as when the wrong
    root.crt is distributed), so libpq refuses the server in step 5 and the change stays."""
    import nbformat

    tmp = tmp_path_factory.mktemp("failed")
    notebooks = tmp / "notebooks"
    notebooks.mkdir()
    for src in sorted(NOTEBOOKS_DIR.glob("0*.ipynb")):
        nb = nbformat.read(src, as_version=4)
        if src.name.startswith("05"):
            at = next(i for i, c in enumerate(nb.cells) if "notebook_params" in c.source)
            nb.cells.insert(at + 1, nbformat.v4.new_code_cell(WRONG_ROOT))
        nbformat.write(nb, notebooks / src.name)
    cluster = LabCluster.create(bindir=find_bindir(15))
    mp = pytest.MonkeyPatch()
    try:
        cluster.start()
        mp.setenv("PGPASSFILE", str(cluster.passfile))
        values = params_for(cluster, change_id="CHG-fail")
        params_file = write_params(tmp / "fail.yaml", **values)
        outcome = run(
            params_file, tmp / "records", tmp / "work", progress=False, notebooks_dir=notebooks
        )
        yield Failed(outcome, cluster)
    finally:
        mp.undo()
        cluster.remove()


def _manifest(record: Path) -> dict[str, Any]:
    return dict(json.loads((record / "manifest.json").read_text()))


# --------------------------------------------------------------------------- terminal


def test_a_plan_only_run_says_nothing_changed_and_what_would(change: Change) -> None:
    text = change.plan.summary()
    assert "plan only: nothing changed" in text
    assert re.search(r"would write \S+/server\.crt \(create\)", text), text
    assert "would add to pg_hba.conf:" in text
    assert re.search(r"hostnossl all\s+all\s+all\s+reject", text), text
    assert "legacy-app" in text and "would be refused" in text
    assert "to roll back" not in text


def test_a_change_prints_its_rollback_command_and_the_command_runs_as_printed(
    change: Change,
) -> None:
    text = change.applied.summary()
    assert "verdict: pass" in text
    (line,) = [ln for ln in text.splitlines() if ln.startswith("to roll back: ")]
    command = line.removeprefix("to roll back: ")
    assert command == _manifest(change.applied.record_dir)["rollback_command"]
    assert " rollback " in command and str(change.params_file) in command
    assert Path(command.split()[0]).is_file()  # the pgtls beside this interpreter
    assert f"--work {change.tmp / 'work'}" in command
    assert f"--records {change.tmp / 'records'}" in command


def test_a_rerun_with_nothing_to_do_says_so(change: Change) -> None:
    assert change.again.exit_code == 0, change.again.summary()
    assert "no change: already as planned" in change.again.summary()
    assert not any(f["action"] in ("create", "replace") for f in change.again.manifest["files"])


def test_the_rollback_dry_run_shows_what_would_be_put_back_and_changes_nothing(
    change: Change,
) -> None:
    dry = change.dry_run_out
    assert "dry run: nothing restored, nothing reloaded" in dry
    assert re.search(r"would be removed \(created by the change\): \S+/server\.crt", dry), dry
    assert re.search(r"would be restored from its backup: \S+/pg_hba\.conf \(from ", dry), dry
    assert "would set ssl back to" in dry
    # the dry run left no record: the rollback's is the only one after the re-run
    runs = [p for p in (change.tmp / "records" / CHANGE).iterdir() if p.is_dir()]
    assert len(runs) == 4


def test_the_rollback_restores_removes_and_records(change: Change) -> None:
    back = change.rollback_out
    assert re.search(r"^removed \(created by the change\): \S+/server\.crt$", back, re.M), back
    assert re.search(r"^restored from its backup: \S+/pg_hba\.conf \(from ", back, re.M), back
    assert "restored " + str(change.cluster.pgdata / "server.crt") not in back
    assert "has ssl off" in back
    assert change.hba_after_rollback == change.hba_before
    assert not (change.cluster.pgdata / "server.crt").exists()
    m = _manifest(change.rollback_dir)
    assert m["kind"] == "rollback" and m["outcome"] == "ok" and m["error"] is None
    whats = {Path(f["target"]).name: f["what"] for f in m["backout"]}
    assert whats["server.crt"] == "removed (created by the change)"
    assert whats["pg_hba.conf"] == "restored from its backup"
    assert all(f["done"] for f in m["backout"]) and m["files"] == []
    assert m["server_after"]["settings"]["ssl"] == "off"
    for name, digest in m["record_files"].items():
        data = (change.rollback_dir / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest


@pytest.mark.parametrize("dry_run", [False, True], ids=["rollback", "dry-run"])
def test_a_second_rollback_finds_nothing_to_do_and_writes_no_record(
    change: Change, capsys: pytest.CaptureFixture[str], dry_run: bool
) -> None:
    runs = sorted((change.tmp / "records" / CHANGE).iterdir())
    code = cli_main(
        ["rollback", str(change.params_file), "--work", str(change.tmp / "work"),
         "--records", str(change.tmp / "records"), *(["--dry-run"] if dry_run else [])]
    )  # fmt: skip
    out, err = capsys.readouterr()
    # not a failure: one sentence on stdout, exit 0, for the dry run as for the real one
    assert code == 0 and err == "" and out.count("\n") == 1, out + err
    assert out.startswith(f"change {CHANGE}: nothing to roll back; it was already rolled back")
    assert "journal.rolled-back-" in out
    assert sorted((change.tmp / "records" / CHANGE).iterdir()) == runs


def test_a_failure_after_step_4_says_what_is_in_place_and_how_to_roll_back(
    failed: Failed,
) -> None:
    out = failed.outcome
    assert out.exit_code == 1
    text = out.summary()
    assert re.search(r"05 Verify clients +failed", text), text
    assert "see the table above" not in text
    checks = [ln for ln in text.splitlines() if ln.startswith("  check failed: ")]
    assert checks, text
    # libpq's own words, as it said them
    assert any("certificate verify failed" in ln for ln in checks), checks
    assert "in place now:" in text
    assert re.search(r"\S+/server\.crt \(certificate\): created by this change", text), text
    assert re.search(r"\S+/pg_hba\.conf \(hba\): replaced by this change", text), text
    assert re.search(r"\S+/postgresql\.auto\.conf \(auto\.conf\): replaced by this", text), text
    assert re.search(r"^to roll back: \S+ rollback ", text, re.M), text
    m = out.manifest
    assert m["outcome"] == "failed" and m["error"].startswith("step 5 Verify clients: ")


# --------------------------------------------------------------------------- manifest


def test_the_manifest_tells_the_truth(change: Change) -> None:
    import socket

    m = _manifest(change.applied.record_dir)
    assert m["kind"] == "change" and m["host"] == socket.gethostname()
    assert m["host_fqdn"] is None or "." in m["host_fqdn"]
    for f in m["files"]:
        if f["action"] == "replace":
            # kept in the change's work directory (the rollback below removed them with it)
            assert f["previous_sha256"] and f["backup"], f
            assert Path(f["backup"]).parent == change.tmp / "work" / CHANGE / "backups", f
        if f["action"] == "create":
            assert f["previous_sha256"] is None and f["backup"] is None, f
    # the subject as openssl prints it with -nameopt RFC2253, emailAddress by name
    import subprocess

    served = m["server_after"]["served"]
    pem = (change.tmp / "work" / CHANGE / "server.crt").read_bytes()
    openssl = subprocess.run(
        ["openssl", "x509", "-noout", "-subject", "-nameopt", "RFC2253"],
        input=pem,
        capture_output=True,
        check=True,
    ).stdout.decode()
    assert served["subject"] == openssl.strip().removeprefix("subject=")
    assert m["certificates"][0]["subject"] == served["subject"]
    assert m["presented_chain"][0]["subject"] == served["subject"]
    assert served["days_left"] > 300


# --------------------------------------------------------------------------- the pages


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        skip_or_fail(f"{CHROMIUM} is not installed (Debian: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


class Reviewer:
    """A browser page that counts every request leaving the machine."""

    def __init__(self, browser: Any) -> None:
        self.page = browser.new_page()
        self.requests: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))

    def open(self, path: Path) -> str:
        self.page.goto(path.as_uri())
        self.page.wait_for_load_state("load")
        return str(self.page.inner_text("body"))

    @property
    def external(self) -> list[str]:
        return [u for u in self.requests if not u.startswith(("file:", "data:"))]


def _html_files(record: Path) -> list[Path]:
    return sorted(record.glob("*.html"))


def _self_contained(record: Path) -> None:
    for page in _html_files(record):
        html = page.read_text()
        assert not re.search(r"<script|<link|@import|https?://[^\s\"'<]*\.(js|css)", html), page


@pytest.mark.browser
def test_the_change_index_lists_every_run_newest_first(change: Change, browser: Any) -> None:
    r = Reviewer(browser)
    text = r.open(change.tmp / "records" / CHANGE / "index.html")
    rows = [ln for ln in text.splitlines() if ln.startswith("20")]
    assert len(rows) == 4, text
    assert "rolled back" in rows[0] and "rollback" in rows[0]
    assert "no change: already as planned" in rows[1]
    assert "changed and proven" in rows[2]
    assert "plan: no change made" in rows[3] and "plan" in rows[3]
    links = r.page.eval_on_selector_all("table a", "els => els.map(e => e.getAttribute('href'))")
    assert links[0] == f"{change.rollback_dir.name}/index.html"
    assert "rolled back" in r.page.inner_text("#now")
    proven = r.page.inner_text("#proven")
    # the re-run proved the change again (and changed nothing)
    assert change.again.record_dir.name in proven and "already as planned" in proven
    assert r.external == []


@pytest.mark.browser
def test_the_change_summary_page_shows_what_changed_and_the_proof(
    change: Change, browser: Any
) -> None:
    record = change.applied.record_dir
    m = _manifest(record)
    r = Reviewer(browser)
    text = r.open(record / "index.html")
    summary = r.page.inner_text("#summary")
    for part in (CHANGE, m["server"], m["operator"], m["host"], "changed and proven"):
        assert part in summary, (part, summary)
    # every written file, created or replaced, with both hashes and the backup
    flat = " ".join(text.split())
    hba = next(f for f in m["files"] if f["kind"] == "hba")
    assert f"{hba['previous_sha256']} → {hba['sha256']}" in flat
    assert hba["backup"] in flat and "replaced" in flat
    crt = next(f for f in m["files"] if f["kind"] == "certificate")
    assert f"(none: new file) → {crt['sha256']}" in flat
    # settings before → after, the diff, the certificate served before and after
    assert re.search(r"ssl\s+off\s+on\s+changed", text), text
    assert "+hostnossl all" in text
    assert "no certificate (SSL is off)" in text
    served = m["server_after"]["served"]
    assert served["sha256"] in flat and "days left" in flat
    assert "Unix-socket (local) lines are not affected" in text
    # the checks with libpq's words, the verdict, the rollback command, the links
    assert 'pg_hba.conf rejects connection for host "127.0.0.1"' in text
    good = sum(1 for c in m["checks"] if c["passed"])
    assert r.page.inner_text("#verdict") == (
        f"verdict: pass ({good} of {len(m['checks'])} connection checks as they must be)"
    )
    # an applied change shows the certificate it installed, and no lab text unless a lab run
    assert "Certificate installed" in text
    assert r.page.inner_text("#rollback").strip() == m["rollback_command"]
    r.page.click("text=step 4 · Enable SSL")
    assert r.page.title() == f"{CHANGE} · step 4 · Enable SSL"
    r.page.go_back()
    with r.page.expect_navigation():
        r.page.click("nav >> text=manifest.json")
    assert '"format": 3' in r.page.content()
    assert r.external == []
    _self_contained(record)


@pytest.mark.browser
def test_step_pages_are_small_readable_and_show_only_the_changes_parameters(
    change: Change, browser: Any
) -> None:
    record = change.applied.record_dir
    m = _manifest(record)
    r = Reviewer(browser)
    for number, step in enumerate(m["steps"], start=1):
        page = record / step["html"]
        size = page.stat().st_size
        assert size < 80_000, (page.name, size)
        text = r.open(page)
        assert r.page.title() == f"{CHANGE} · step {number} · {step['title']}"
        for default in DEFAULTS_SHOWN_AS_VALUES:
            assert default not in text, (page.name, default)
        # the injected parameters cell is not shown as code either
        assert f'change_id = "{CHANGE}"' not in text
        assert "papermill" not in text.lower()
        assert "An Exception was encountered" not in text
    first = r.open(record / "01_key_and_csr.html")
    assert first.count(f"change_id\t{CHANGE}") == 1, first
    # a long path breaks only after its slashes
    html = (record / "03_install_files.html").read_text()
    assert "/<wbr>" in html and "word-break:break-all" not in html
    assert r.external == []


@pytest.mark.browser
def test_the_plan_page_says_no_change_and_shows_what_would_change(
    change: Change, browser: Any
) -> None:
    record = change.plan.record_dir
    r = Reviewer(browser)
    text = r.open(record / "index.html")
    assert "plan: no change made" in r.page.inner_text("#summary")
    assert "No file was written. The plan:" in text
    assert re.search(r"server\.crt\s+certificate\s+created", text), text
    assert "pg_hba.conf (planned, not written)" in text and "+hostnossl all" in text
    # the settings as planned, not as they are now
    assert "Settings now → planned (not applied)" in text
    assert re.search(r"ssl\s+off\s+on\s+would change", text), text
    # the certificate the change would install, as a reviewer checks it against the CSR
    leaf = next(c for c in _manifest(record)["certificates"] if c["role"] == "leaf")
    cert = r.page.inner_text("#certificate + table")
    assert "Certificate to be installed" in text
    assert leaf["subject"] in cert and leaf["issuer"] in cert and leaf["not_after"] in cert
    assert leaf["sha256"] in "".join(cert.split()) and "localhost" in cert
    assert "record format 3" in r.page.inner_text("#format")
    assert "Sessions the new pg_hba.conf would refuse" in text
    assert re.search(r"postgres\s+postgres\s+127\.0\.0\.1\s+legacy-app", text), text
    assert "Rollback" not in text
    step4 = r.open(record / "04_enable_ssl.html")
    assert "legacy-app" in step4 and "Unix-socket (local) lines are not affected" in step4
    assert r.external == []
    _self_contained(record)


@pytest.mark.browser
def test_the_failed_run_page_names_the_step_the_reason_and_what_is_in_place(
    failed: Failed, browser: Any
) -> None:
    record = failed.outcome.record_dir
    m = _manifest(record)
    r = Reviewer(browser)
    text = r.open(record / "index.html")
    assert "failed at step 5 Verify clients" in r.page.inner_text("#summary")
    assert r.page.inner_text("#error").startswith("step 5 Verify clients: ")
    assert "In place now" in text and "created by this change" in text
    assert r.page.inner_text("#rollback").strip() == m["rollback_command"]
    assert re.search(r"verify-ca with the CA's root\s+ok\s+fail\s+NO", text), text
    step5 = r.open(record / "05_verify_clients.html")
    # the reason as its sentence: the class stays in the step's notebook
    stopped = step5.split("The step stopped here: ", 1)[1]
    assert not re.match(r"\w+Error\b", stopped), stopped[:200]
    assert "PgtlsError" not in step5 and "Traceback" not in step5
    assert r.external == []
    _self_contained(record)


@pytest.mark.browser
def test_the_rollback_page_says_what_was_removed_and_restored(change: Change, browser: Any) -> None:
    r = Reviewer(browser)
    text = r.open(change.rollback_dir / "index.html")
    assert "rolled back" in r.page.inner_text("#summary")
    assert "removed (created by the change)" in text
    assert "restored from its backup" in text
    assert "no certificate (SSL is off)" in text  # served after the rollback
    assert r.external == []
    _self_contained(change.rollback_dir)


def test_no_record_holds_the_servers_password(change: Change) -> None:
    from record_checks import assert_no_secrets

    for record in (change.plan.record_dir, change.applied.record_dir, change.rollback_dir):
        assert_no_secrets(record, change.cluster.password())
    assert os.environ.get("PGPASSFILE") != str(change.cluster.passfile)


@pytest.mark.browser
def test_a_record_prints_to_one_pdf_beside_the_run(change: Change) -> None:
    if not Path(CHROMIUM).exists():
        skip_or_fail(f"{CHROMIUM} is not installed (Debian: apt-get install chromium)")
    record = change.applied.record_dir
    code, out = _cli("record", "pdf", str(record))
    assert code == 0, out
    pdf = record.with_suffix(".pdf")
    assert out.strip().startswith(f"wrote {pdf} ")
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-")
    # the summary page and five step pages, each starting on a page of its own
    assert len(re.findall(rb"/Type\s*/Page\b", data)) >= 6
    assert (record / "manifest.json").stat().st_mode & 0o222 == 0  # the run stays sealed


def test_pdf_of_something_that_is_not_a_record_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["record", "pdf", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pgtls: {tmp_path}: not the record of a run") and err.count("\n") == 1
