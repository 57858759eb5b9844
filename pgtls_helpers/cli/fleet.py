"""``pgtls fleet report records/<change_id>/``: what a fleet run did, host by host."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pgtls_helpers.display.fleet import fleet_page, fleet_text
from pgtls_helpers.runbook.fleet_report import load_fleet_report

__all__ = ["report"]


def _write(path: Path, text: str) -> None:
    """Write whole or not at all: a temporary name, then a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def report(args: argparse.Namespace) -> int:
    """Write fleet-report.html and .json into the folder; 0 when every host is fine."""
    fleet = load_fleet_report(args.directory, run=args.run)
    base = Path(args.directory)
    html_path = Path(args.out) if args.out else base / "fleet-report.html"
    json_path = html_path.with_suffix(".json")
    _write(html_path, fleet_page(fleet))
    _write(json_path, json.dumps(fleet.as_dict(), indent=2) + "\n")
    if args.json:
        sys.stdout.write(json.dumps(fleet.as_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(fleet_text(fleet) + f"\nreport: {html_path} (and {json_path.name})\n")
    return 0 if fleet.all_good else 1
