"""``pgtls rollback PARAMS.yaml``: the back-out plan of a change, carried out."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pgtls_helpers.errors import InputError
from pgtls_helpers.runbook.params import load_params, read_params_file, resolve_paths

__all__ = ["main"]


def main(args: argparse.Namespace) -> int:
    """Restore what steps 3 and 4 changed, reload, and say how the server answers now."""
    from pgtls_helpers.runbook import interrupt
    from pgtls_helpers.runbook.rollback import RollbackConflict, rollback_change

    values = resolve_paths(read_params_file(args.params), Path(args.params), args.work)
    params = load_params(values, source=str(args.params))
    if params.lab_cluster:
        raise InputError(
            f"{args.params}: lab_cluster runs remove their throwaway cluster at the end, so "
            "there is nothing to roll back"
        )
    records = Path(getattr(args, "records", "records"))
    for record in interrupt.seal_unfinished(records, params.change_id, params, exclude=records):
        sys.stderr.write(f"sealed the record of an interrupted run: {record}\n")
    try:
        result = rollback_change(params, force=bool(getattr(args, "force", False)))
    except RollbackConflict as conflict:
        sys.stderr.write(conflict.diff)
        raise
    out = sys.stdout
    for row in result.files:
        out.write(f"{row['action']}: {row['file']}\n")
    for name, value in result.settings.items():
        shown = f"'{value}'" if value is not None else "its postgresql.conf value (RESET)"
        out.write(f"ALTER SYSTEM: {name} back to {shown}\n")
    if result.ssl_after is None:
        out.write(f"{result.reloaded}\n")
        return 0
    state = "on" if result.ssl_after else "off"
    leaf = result.presented[0]["subject"] if result.presented else "no certificate"
    out.write(
        f"{result.reloaded}; {params.server_host}:{params.server_port} has ssl {state} and "
        f"presents {leaf}\n"
    )
    for problem in result.problems:
        sys.stderr.write(f"not as before: {problem}\n")
    return 0 if result.ok else 1
