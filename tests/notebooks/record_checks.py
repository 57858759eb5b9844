"""Assertions on the record of a run (importable as ``records`` from tests/notebooks)."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from pgtls_helpers.lab import LabCluster
from pgtls_helpers.runbook.runner import STEPS, RunOutcome, run

HBA_RULE = {
    "type": "hostssl",
    "database": "all",
    "user": "all",
    "address": "127.0.0.1/32",
    "method": "scram-sha-256",
}
STEP_NAMES = [s.name for s in STEPS]
_PEM_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")


def write_params(path: Path, **values: Any) -> Path:
    """A parameters file, as an operator would write it."""
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def params_for(cluster: LabCluster, **overrides: Any) -> dict[str, Any]:
    """Parameters for a change on a running server the runbook did not create."""
    values: dict[str, Any] = {
        "change_id": "CHG-nb",
        "lab_cluster": False,
        "ca_mode": "lab",
        "apply": True,
        "server_host": "127.0.0.1",
        "server_port": cluster.port,
        "server_log_file": str(cluster.log_path),
        "common_name": "db1.lab.pgtls.test",
        "subject_alt_names": ["localhost", "127.0.0.1"],
        "organization": "pgtls tests",
        "key_type": "ecdsa-p256",
        "hba_rules": [HBA_RULE],
        "reject_non_ssl": True,
    }
    values.update(overrides)
    return values


def run_into(tmp_path: Path, params_file: Path) -> RunOutcome:
    """Run the runbook with its records and work directories under ``tmp_path``."""
    return run(
        params_file,
        records_dir=tmp_path / "records",
        work_dir=tmp_path / "work",
        progress=False,
    )


def manifest(outcome: RunOutcome) -> dict[str, Any]:
    """The manifest as written on disk (not the copy in memory)."""
    return dict(json.loads((outcome.record_dir / "manifest.json").read_text()))


def statuses(outcome: RunOutcome) -> list[str]:
    return [s["status"] for s in manifest(outcome)["steps"]]


def assert_record_shape(outcome: RunOutcome) -> dict[str, Any]:
    """Every executed step has its notebook and HTML; the manifest is sealed and read-only;
    the hashes it lists match the files."""
    import hashlib

    m = manifest(outcome)
    assert outcome.record_dir.parent.name == m["change_id"]
    for step in m["steps"]:
        if step["status"] in ("ok", "failed"):
            assert (outcome.record_dir / f"{step['step']}.ipynb").is_file(), step
            html = (outcome.record_dir / f"{step['step']}.html").read_text()
            assert html.lstrip().lower().startswith("<!doctype html")
        else:
            assert not (outcome.record_dir / f"{step['step']}.ipynb").exists(), step
    for field in (
        "parameters",
        "operator",
        "host",
        "started_utc",
        "finished_utc",
        "versions",
        "steps",
        "record_files",
    ):
        assert m[field], field
    for dist in ("cryptography", "psycopg", "libpq", "papermill", "pandas", "pgtoolkit"):
        assert m["versions"][dist], dist
    assert any(k.startswith("openssl") and v for k, v in m["versions"].items())
    for name, digest in m["record_files"].items():
        assert hashlib.sha256((outcome.record_dir / name).read_bytes()).hexdigest() == digest
    mode = stat.S_IMODE((outcome.record_dir / "manifest.json").stat().st_mode)
    assert mode & 0o222 == 0, oct(mode)
    return m


def assert_no_secrets(record: Path, *secrets: str) -> None:
    """No private key and none of ``secrets`` in any file of the record."""
    files = [p for p in record.rglob("*") if p.is_file()]
    assert files
    for path in files:
        data = path.read_bytes()
        assert not _PEM_KEY.search(data), f"{path} holds a private key"
        for secret in secrets:
            assert secret.encode() not in data, f"{path} holds a secret"


CHROMIUM = "/usr/bin/chromium"


def read_in_chromium(*pages: Path) -> list[str]:
    """Each page's text as headless Chromium renders it, as a reviewer reads it; a page that
    asks the network for anything fails the test."""
    from support import skip_or_fail

    if not Path(CHROMIUM).exists():
        skip_or_fail(f"{CHROMIUM} is not installed (Debian: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    texts = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            headless=True,
        )
        try:
            page = browser.new_page()
            asked: list[str] = []
            page.on("request", lambda r: asked.append(r.url))
            for path in pages:
                page.goto(path.as_uri())
                page.wait_for_load_state("load")
                texts.append(str(page.inner_text("body")))
            outside = [u for u in asked if not u.startswith(("file:", "data:"))]
            assert outside == [], outside
        finally:
            browser.close()
    return texts
