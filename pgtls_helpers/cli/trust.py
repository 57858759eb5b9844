"""``pgtls trust PARAMS.yaml``: the client-trust change of a CA rotation, with its record.

Runs ``notebooks/client_trust.ipynb`` through the same runner as ``pgtls run``: the record goes
to ``records/<change_id>/<UTC stamp>/`` with the executed notebook, its HTML and a manifest.
"""

from __future__ import annotations

import argparse
import sys

from pgtls_helpers.runbook.runner import run

TRUST_STEPS: tuple[tuple[str, str], ...] = (("client_trust", "Client trust"),)


def main(args: argparse.Namespace) -> int:
    """Run the client-trust runbook; print where the record is and a summary."""
    outcome = run(
        args.params,
        records_dir=args.records,
        work_dir=args.work,
        progress=not args.no_progress,
        steps=TRUST_STEPS,
    )
    sys.stdout.write(outcome.summary() + "\n")
    return outcome.exit_code
