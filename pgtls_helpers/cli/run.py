"""``pgtls run PARAMS.yaml``: the five notebooks, headless, and the record of the change."""

from __future__ import annotations

import argparse
import sys

from pgtls_helpers.runbook.runner import run


def main(args: argparse.Namespace) -> int:
    """Run the runbook; print where the record is and a summary; return the exit status."""
    outcome = run(
        args.params, records_dir=args.records, work_dir=args.work, progress=not args.no_progress
    )
    sys.stdout.write(outcome.summary() + "\n")
    return outcome.exit_code
