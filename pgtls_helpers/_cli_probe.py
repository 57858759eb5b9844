"""``pgtls probe HOST[:PORT]...``: what each server presents, one block or JSON line per host.

Startup stays cheap: no pandas, no psycopg; cryptography is imported by the first finished
handshake while the other probes are still on the network.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pgtls_helpers.errors import InputError
from pgtls_helpers.probe import ProbeResult, chain_rows, parse_target, probe_many

__all__ = ["main", "result_dict"]


def result_dict(result: ProbeResult) -> dict[str, Any]:
    """The ``--json`` object for one host, keys in the documented order."""
    return {
        "host": result.host,
        "port": result.port,
        "tls_version": result.tls_version,
        "cipher": result.cipher,
        "chain": chain_rows(result),
        "error": result.error,
    }


def _block(result: ProbeResult) -> str:
    count = len(result.chain)
    lines = [
        f"{result.target}  {result.tls_version}  {result.cipher}  "
        f"{count} certificate{'' if count == 1 else 's'} presented"
    ]
    for index, row in enumerate(chain_rows(result)):
        lines.append(f"  {index}  subject  {row['subject']}")
        lines.append(f"     issuer   {row['issuer']}")
        lines.append(f"     sha256   {row['sha256']}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Probe every target (concurrently), print in the order given; 1 when any failed."""
    if not args.timeout > 0:
        raise InputError(f"--timeout {args.timeout:g}: give a number of seconds above zero")
    targets = [parse_target(text) for text in args.targets]
    results = probe_many(targets, timeout=args.timeout, max_workers=16)
    out = sys.stdout
    if args.json:
        import json

        for result in results:
            out.write(json.dumps(result_dict(result)) + "\n")
    else:
        first = True
        for result in results:
            if result.error is not None:
                out.flush()
                sys.stderr.write(f"pgtls: {result.error}\n")
                sys.stderr.flush()
                continue
            if not first:
                out.write("\n")
            out.write(_block(result) + "\n")
            first = False
    out.flush()
    return 0 if all(result.ok for result in results) else 1
