"""``pgtls lab demo-unattended [--ca vault|acme]``: the unattended path on the embedded default.

A throwaway cluster, a real CA started for the demo (OpenBao's PKI, or Pebble for ACME), one
``pgtls run`` from key to proven TLS with the CA signing, then ``pgtls renew`` renewing through
the same CA with no person in the loop; the cluster and the CA are removed afterwards, the
records stay.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import yaml

from pgtls_helpers.lab import LabCluster

__all__ = ["main"]


def main(args: argparse.Namespace) -> int:
    """Run the demo; print what each command printed; return the worst exit status."""
    from pgtls_helpers.cli import main as cli_main
    from pgtls_helpers.lab import cas

    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    saved = os.environ.get("PGPASSFILE")
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pgtls-ca-")))
        if args.ca == "acme":
            server = stack.enter_context(cas.pebble(scratch))
            settings, mode = server.settings, "acme"
        else:
            bao = stack.enter_context(cas.openbao(scratch))
            settings, mode = bao.settings, "vault"
        cluster = LabCluster.create()
        stack.callback(cluster.remove)
        cluster.start()
        os.environ["PGPASSFILE"] = str(cluster.passfile)
        stack.callback(_restore, saved)
        values = cluster.runbook_values(
            f"lab-{mode}", ca_mode=mode, ca_settings=settings, subject_alt_names=[cluster.host]
        )
        params = base / f"lab-{mode}.yaml"
        params.write_text(yaml.safe_dump(values, sort_keys=False))
        where = ["--records", str(args.records), "--work", str(args.work), "--no-progress"]
        first = cli_main(["run", str(params), *where])
        if first != 0:
            return first
        # a certificate fresh from the CA is not due; with --due-days 365 it is, and renews
        second = cli_main(["renew", str(params), "--due-days", "365", *where])
        sys.stdout.write(
            f"the demo's cluster and {mode} CA are removed now; its records stay in "
            f"{args.records}/\n"
        )
        return second


def _restore(saved: str | None) -> None:
    if saved is None:
        os.environ.pop("PGPASSFILE", None)
    else:
        os.environ["PGPASSFILE"] = saved
