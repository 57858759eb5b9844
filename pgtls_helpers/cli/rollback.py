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
    from pgtls_helpers.runbook.rollback import rollback_change

    values = resolve_paths(read_params_file(args.params), Path(args.params), args.work)
    params = load_params(values, source=str(args.params))
    if params.lab_cluster:
        raise InputError(
            f"{args.params}: lab_cluster runs remove their throwaway cluster at the end, so "
            "there is nothing to roll back"
        )
    out = sys.stdout
    if params.work.trust_journal.exists():  # a client-trust change (pgtls trust)
        from pgtls_helpers.runbook.trust import rollback_trust

        for restored in rollback_trust(params):
            out.write(f"restored {restored}\n")
        return 0
    result = rollback_change(params)
    for path in result.restored:
        out.write(f"restored {path}\n")
    for name, value in result.settings.items():
        shown = f"'{value}'" if value is not None else "its postgresql.conf value (RESET)"
        out.write(f"ALTER SYSTEM: {name} back to {shown}\n")
    state = "on" if result.ssl_after else "off"
    leaf = result.presented[0]["subject"] if result.presented else "no certificate"
    out.write(
        f"reloaded; {params.server_host}:{params.server_port} has ssl {state} and presents {leaf}\n"
    )
    return 0
