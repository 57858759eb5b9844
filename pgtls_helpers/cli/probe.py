"""``pgtls probe HOST[:PORT]...``: what each server presents, one block or JSON line per host.

Built on :mod:`pgtls_helpers.postgres.wire` so that the command starts without cryptography,
dataclasses, pandas or psycopg: with fifty hosts, start-up is otherwise a large share of the run.
The rows are the same as :func:`pgtls_helpers.probe.chain_rows` gives (the tests hold them
equal); subject and issuer come from OpenSSL's decoding of the presented certificates, and from
cryptography only for a certificate OpenSSL cannot render. So do the leaf's not-after and names
(:func:`pgtls_helpers.postgres.probe.leaf_validity`); days left are whole days, rounded down, as
``pgtls watch`` counts them.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time

from pgtls_helpers.errors import InputError
from pgtls_helpers.pki.target import format_target, parse_target
from pgtls_helpers.postgres.wire import attempt_many, cert_der, cert_names, cert_validity

TYPE_CHECKING = False  # typing costs start-up time on every probe; mypy reads this as true
if TYPE_CHECKING:
    from typing import Any

    from pgtls_helpers.postgres.wire import Presented

__all__ = ["main", "presented_object"]

_ROWS: dict[bytes, dict[str, str]] = {}
_LEAVES: dict[bytes, tuple[int, list[str]]] = {}


def _row(cert: Any) -> dict[str, str]:
    der = cert_der(cert)
    row = _ROWS.get(der)
    if row is None:
        names = cert_names(cert)
        if names is None:
            from cryptography import x509

            from pgtls_helpers.pki.client import rfc4514_dn

            parsed = x509.load_der_x509_certificate(der)
            names = rfc4514_dn(parsed.subject), rfc4514_dn(parsed.issuer)
        row = {"sha256": hashlib.sha256(der).hexdigest(), "subject": names[0], "issuer": names[1]}
        _ROWS[der] = row
    return row


def _validity(cert: Any) -> tuple[int, list[str]]:
    der = cert_der(cert)
    found = _LEAVES.get(der)
    if found is None:
        found = cert_validity(cert)
        if found is None:
            from cryptography import x509

            from pgtls_helpers.postgres.probe import leaf_validity

            found = leaf_validity(x509.load_der_x509_certificate(der))
        _LEAVES[der] = found
    return found


def presented_object(
    host: str, port: int, answer: Presented | str, *, now: float | None = None
) -> dict[str, Any]:
    """The ``--json`` object for one host, keys in the documented order; ``not_after``,
    ``days_left`` and ``names`` are the leaf's (``now``: seconds since the epoch)."""
    ok = not isinstance(answer, str)
    version, cipher, certs = answer if not isinstance(answer, str) else (None, None, [])
    not_after = days_left = None
    names: list[str] = []
    if certs:
        end, names = _validity(certs[0])
        not_after = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end))
        days_left = int((end - (time.time() if now is None else now)) // 86400)
    return {
        "host": host,
        "port": port,
        "tls_version": version,
        "cipher": cipher,
        "not_after": not_after,
        "days_left": days_left,
        "names": names,
        "chain": [_row(c) for c in certs],
        "error": None if ok else answer,
    }


def _block(obj: dict[str, Any]) -> str:
    count = len(obj["chain"])
    lines = [
        f"{format_target(obj['host'], obj['port'])}  {obj['tls_version']}  {obj['cipher']}  "
        f"{count} certificate{'' if count == 1 else 's'} presented"
    ]
    if obj["not_after"] is not None:
        days = obj["days_left"]
        left = f"{days} day{'' if days == 1 else 's'} left" if days >= 0 else "expired"
        lines.append(f"  not after  {obj['not_after']} ({left})")
        lines.append(f"  names      {', '.join(obj['names']) or '(no subjectAltName)'}")
    for index, row in enumerate(obj["chain"]):
        lines.append(f"  {index}  subject  {row['subject']}")
        lines.append(f"     issuer   {row['issuer']}")
        lines.append(f"     sha256   {row['sha256']}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Probe every target (concurrently), print in the order given; 1 when any failed."""
    if not args.timeout > 0:
        raise InputError(f"--timeout {args.timeout:g}: give a number of seconds above zero")
    pairs = [parse_target(text) for text in args.targets]
    answers = attempt_many(pairs, timeout=args.timeout, max_workers=16)
    now = time.time()
    objects = [presented_object(h, p, a, now=now) for (h, p), a in zip(pairs, answers, strict=True)]
    out = sys.stdout
    if args.json:
        import json

        out.writelines(json.dumps(obj) + "\n" for obj in objects)
    else:
        first = True
        for obj in objects:
            if obj["error"] is not None:
                out.flush()
                sys.stderr.write(f"pgtls: {obj['error']}\n")
                sys.stderr.flush()
                continue
            out.write(("" if first else "\n") + _block(obj) + "\n")
            first = False
    out.flush()
    return 0 if all(obj["error"] is None for obj in objects) else 1
