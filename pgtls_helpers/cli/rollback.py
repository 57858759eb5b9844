"""``pgtls rollback PARAMS.yaml``: the back-out plan of a change, carried out and recorded
(``--dry-run``: only shown, after the same checks, with the same refusals and exit status).

Exit status: 0 rolled back (or, dry, it would be), and 0 when there is nothing to roll back
(one sentence says so); 1 when a check refuses (a file edited after the change, the change lock
held by a live change) or the server is not as before afterwards; 2 for unusable input.
"""

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
    from pgtls_helpers.runbook.undo import NothingToRollBack

    try:
        return _rollback(args)
    except NothingToRollBack as nothing:  # never applied, or already rolled back: not a failure
        sys.stdout.write(f"{nothing}\n")
        return 0


def _rollback(args: argparse.Namespace) -> int:
    from pgtls_helpers.runbook import interrupt
    from pgtls_helpers.runbook.manifest import from_json
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

    records = Path(args.records).resolve()
    if wal.is_client_trust(wal.read_entries(params.work.journal)):  # pgtls trust's change
        return _rollback_trust(params, params_file, records, dry_run=args.dry_run)
    if not args.dry_run:
        for left in interrupt.seal_unfinished(records, params.change_id, params, exclude=records):
            sys.stderr.write(f"sealed the record of an interrupted run: {left}\n")
    # a refusal (RollbackConflict included) is one sentence, the diff stays off the terminal
    manifest, record = rollback_with_record(
        params,
        params_file=params_file,
        records_dir=records,
        dry_run=args.dry_run,
        force=args.force,
    )
    sys.stdout.write(rollback_summary(from_json(manifest), record) + "\n")
    for problem in manifest.get("problems") or []:
        sys.stderr.write(f"not as before: {problem}\n")
    return 1 if manifest.get("problems") else 0


def _rollback_trust(params: Params, params_file: Path, records: Path, *, dry_run: bool) -> int:
    """Every root.crt a client-trust change wrote, back from its backup, and recorded (or,
    dry, listed after the same checks)."""
    from pgtls_helpers.runbook.manifest import from_json
    from pgtls_helpers.runbook.rollback_record import trust_rollback_with_record
    from pgtls_helpers.runbook.terminal import rollback_summary
    from pgtls_helpers.runbook.trust import trust_backout

    if dry_run:
        for change in trust_backout(params):
            source = change.backup or "(remove it: the change created it)"
            sys.stdout.write(f"would restore {change.target} from {source}\n")
        return 0
    manifest, record = trust_rollback_with_record(
        params, params_file=params_file, records_dir=records
    )
    sys.stdout.write(rollback_summary(from_json(manifest), record) + "\n")
    return 0
