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
    from pgtls_helpers.runbook import interrupt
    from pgtls_helpers.runbook.rollback import RollbackConflict
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
    from pgtls_helpers.runbook import journal as wal

    if wal.is_client_trust(wal.read_entries(params.work.journal)):  # pgtls trust's change
        return _rollback_trust(params, dry_run=args.dry_run)
    records = Path(args.records).resolve()
    if not args.dry_run:
        for left in interrupt.seal_unfinished(records, params.change_id, params, exclude=records):
            sys.stderr.write(f"sealed the record of an interrupted run: {left}\n")
    try:
        manifest, record = rollback_with_record(
            params,
            params_file=params_file,
            records_dir=records,
            dry_run=args.dry_run,
            force=args.force,
        )
    except RollbackConflict as conflict:
        sys.stderr.write(conflict.diff)
        raise
    sys.stdout.write(rollback_summary(manifest, record) + "\n")
    for problem in manifest.get("problems") or []:
        sys.stderr.write(f"not as before: {problem}\n")
    return 1 if manifest.get("problems") else 0


def _rollback_trust(params: Params, *, dry_run: bool) -> int:
    """Every root.crt a client-trust change wrote, back from its backup (or, dry, listed)."""
    from pgtls_helpers.runbook.trust import rollback_trust
    from pgtls_helpers.runbook.undo import checked_journal

    if dry_run:
        for change in reversed(checked_journal(params)[1]):
            source = change.backup or "(remove it: the change created it)"
            sys.stdout.write(f"would restore {change.target} from {source}\n")
        return 0
    for restored in rollback_trust(params):
        sys.stdout.write(f"restored {restored}\n")
    return 0
