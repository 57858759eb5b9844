"""``pgtls record pdf RECORD_DIR``: a run's summary page and step pages in one PDF for a ticket.

The pages are printed by Chromium (``--headless --print-to-pdf``, Debian's ``chromium``
package), which draws them exactly as a reviewer's browser does. The PDF goes beside the run's
directory (``records/<change_id>/<stamp>.pdf``), since the run's own directory is written once.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pgtls_helpers.errors import InputError, PgtlsError

__all__ = ["pdf"]

_BROWSERS = ("chromium", "chromium-browser", "google-chrome")
_BODY = re.compile(r"(?is)<body>(.*)</body>")
_STYLE = re.compile(r"(?is)<style>(.*?)</style>")


def _browser() -> str:
    for name in _BROWSERS:
        if found := shutil.which(name):
            return found
    raise PgtlsError(
        "no Chromium to print with; install it (Debian: apt-get install chromium) and run again"
    )


def combined_html(record: Path) -> str:
    """The run's index page and its step pages, in order, one printed page break apart."""
    manifest_path = record / "manifest.json"
    if not manifest_path.is_file() or not (record / "index.html").is_file():
        raise InputError(
            f"{record}: not the record of a run (no manifest.json and index.html); give "
            "records/<change_id>/<stamp>/"
        )
    from pgtls_helpers.runbook.record import read_manifest

    manifest = read_manifest(manifest_path)
    pages = [record / "index.html"] + [record / s.html for s in manifest.steps if s.html]
    first = pages[0].read_text(encoding="utf-8")
    style = _STYLE.search(first)
    bodies = []
    for page in pages:
        found = _BODY.search(page.read_text(encoding="utf-8"))
        bodies.append(found.group(1) if found else "")
    css = (style.group(1) if style else "") + "nav{display:none}.page{break-before:page}"
    joined = "".join(f'<div class="page">{b}</div>' if i else b for i, b in enumerate(bodies))
    title = f"{manifest.change_id} · {record.name}"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{css}</style></head><body>{joined}</body></html>\n"
    )


def pdf(args: argparse.Namespace) -> int:
    """Print a run's record to one PDF; say where it is."""
    record = Path(args.record).resolve()
    html = combined_html(record)
    out = Path(args.out).resolve() if args.out else record.with_suffix(".pdf")
    browser = _browser()
    with tempfile.TemporaryDirectory(prefix="pgtls-pdf-") as tmp:
        page = Path(tmp) / "record.html"
        page.write_text(html, encoding="utf-8")
        target = Path(tmp) / "record.pdf"
        proc = subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--no-pdf-header-footer",
                f"--user-data-dir={tmp}/profile",
                f"--print-to-pdf={target}",
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if proc.returncode != 0 or not target.is_file() or target.stat().st_size == 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise PgtlsError(f"{browser} did not print {record} ({last})")
        shutil.move(str(target), out)
    sys.stdout.write(f"wrote {out} ({out.stat().st_size // 1024} KB)\n")
    return 0
