"""``pgtls rollback PARAMS.yaml``: the back-out plan of a change, carried out and recorded
(``--dry-run``: only shown)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pgtls_helpers.errors import InputError
from pgtls_helpers.runbook.params import Params, load_params, read_params_file, resolve_paths

__all__ = ["main"]


def main(args: argparse.Namespace) -> int:
    """Restore what steps 3 and 4 changed, reload, say how the server answers now, and write
    the rollback's record next to the change's."""
    from pgtls_helpers.runbook.rollback_record import rollback_with_record
    from pgtls_helpers.runbook.terminal import rollback_summary

    params_file = Path(args.params).resolve()
    values = resolve_paths(read_params_file(params_file), params_file, args.work)
    params = load_params(values, source=str(args.params))
    if params.lab_cluster:
        raise InputError(
            f"{args.params}: lab_cluster runs remove their throwaway cluster at the end, so "
            "there is nothing to roll back"
        )
    if params.work.trust_journal.exists():  # a client-trust change (pgtls trust)
        return _rollback_trust(params, dry_run=args.dry_run)
    manifest, record = rollback_with_record(
        params,
        params_file=params_file,
        records_dir=Path(args.records).resolve(),
        dry_run=args.dry_run,
    )
    sys.stdout.write(rollback_summary(manifest, record) + "\n")
    return 0


def _rollback_trust(params: Params, *, dry_run: bool) -> int:
    """Every root.crt a client-trust change wrote, back from its backup (or, dry, listed)."""
    from pgtls_helpers.postgres.files import load_journal
    from pgtls_helpers.runbook.trust import rollback_trust

    if dry_run:
        for item in load_journal(params.work.trust_journal).installed:
            sys.stdout.write(f"would restore {item.target} from {item.backup or '(remove it)'}\n")
        return 0
    for restored in rollback_trust(params):
        sys.stdout.write(f"restored {restored}\n")
    return 0
