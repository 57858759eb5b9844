"""``pgtls trust PARAMS.yaml``: the client-trust change of a CA rotation, with its record.

Runs ``notebooks/client_trust.ipynb`` through the same runner as ``pgtls run``: the record goes
to ``records/<change_id>/<UTC stamp>/`` with the executed notebook, its HTML and a manifest.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pgtls_helpers.cli.run import checked_params, run_runbook
from pgtls_helpers.errors import InputError
from pgtls_helpers.runbook.steps import TRUST
from pgtls_helpers.runbook.trust import parse_fingerprint


def main(args: argparse.Namespace) -> int:
    """Run the client-trust runbook; print where the record is and a summary."""
    _check(Path(args.params), args.work)
    return run_runbook(args, TRUST)


def _check(params_file: Path, work: str) -> None:
    """What the parameters file must say for a client-trust change (exit 2 before any run)."""
    params = checked_params(params_file, work)
    if not params.client_system_users:
        raise InputError(
            f"{params_file}: client_system_users is empty; list the client OS users whose "
            "root.crt changes"
        )
    if not params.add_roots and not params.remove_roots:
        raise InputError(
            f"{params_file}: add_roots and remove_roots are both empty; list the new root to "
            "trust (add_roots) or the old one to retire (remove_roots)"
        )
    if params.lab_cluster:
        raise InputError(
            f"{params_file}: lab_cluster is true; the client-trust change runs against a "
            "server that already serves TLS, so set lab_cluster: false and point it at one"
        )
    for item in (*params.add_roots, *params.remove_roots):
        if not Path(item).is_file() and not (
            item in params.remove_roots and parse_fingerprint(item)
        ):
            raise InputError(f"{params_file}: {item} does not exist; list root certificate files")
