"""``pgtls rollback PARAMS.yaml``: the back-out plan of a change, carried out and recorded
(``--dry-run``: only shown)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pgtls_helpers.errors import InputError
from pgtls_helpers.runbook.params import load_params, read_params_file, resolve_paths

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
    manifest, record = rollback_with_record(
        params,
        params_file=params_file,
        records_dir=Path(args.records).resolve(),
        dry_run=args.dry_run,
    )
    sys.stdout.write(rollback_summary(manifest, record) + "\n")
    return 0
