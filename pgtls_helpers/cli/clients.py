"""``pgtls clients PARAMS.yaml``: the client-certificate runbook, with its record.

Clients prove who they are: each client OS user listed in ``clients`` gets a key, a certificate
the CA signs for client authentication, and ``~/.postgresql/postgresql.crt`` / ``.key``; the
server gets the client-issuing roots in ``ssl_ca_file``, the ``cert`` (or ``clientcert``) lines
of ``hba_rules`` in pg_hba.conf and the maps of ``ident_maps`` in pg_ident.conf; then each client
logs in with its certificate alone. Runs ``notebooks/c1_*`` to ``c5_*`` through the same runner
as ``pgtls run``; the record goes to ``records/<change_id>/<UTC stamp>/``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pgtls_helpers.cli.run import checked_params, run_runbook
from pgtls_helpers.errors import InputError
from pgtls_helpers.runbook.steps import CLIENTS


def main(args: argparse.Namespace) -> int:
    """Run the client-certificate runbook; print the summary and where the record is."""
    _check(Path(args.params), args.work)
    return run_runbook(args, CLIENTS)


def _check(params_file: Path, work: str) -> None:
    """What the parameters file must say for a client-certificate change (exit 2 first)."""
    params = checked_params(params_file, work)
    if not params.clients:
        raise InputError(
            f"{params_file}: clients is empty; list each client as {{os_user, role}} (and a "
            "subject when its certificate's DN is not CN=<role>)"
        )
    if params.lab_cluster:
        raise InputError(
            f"{params_file}: lab_cluster is true; client certificates are added to a server "
            "that already serves TLS, so run the server runbook first and point this at it"
        )
    if params.ca_mode not in ("lab", "files"):
        raise InputError(f"{params_file}: ca_mode must be 'lab' or 'files' for client certificates")
