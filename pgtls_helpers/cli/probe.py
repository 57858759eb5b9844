"""``pgtls probe HOST[:PORT]...``: what each server presents, one block or JSON line per host.

Built on :mod:`pgtls_helpers.postgres.wire` so that the command starts without cryptography,
dataclasses, pandas or psycopg: with fifty hosts, start-up is otherwise a large share of the run.
The rows are the same as :func:`pgtls_helpers.probe.chain_rows` gives (the tests hold them
equal); subject and issuer come from OpenSSL's decoding of the presented certificates, and from
cryptography only for a certificate OpenSSL cannot render.
"""

from __future__ import annotations

import argparse
import hashlib
import sys

from pgtls_helpers.errors import InputError
from pgtls_helpers.pki.target import format_target, parse_target
from pgtls_helpers.postgres.wire import attempt_many, cert_der, cert_names

TYPE_CHECKING = False  # typing costs start-up time on every probe; mypy reads this as true
if TYPE_CHECKING:
    from typing import Any

    from pgtls_helpers.postgres.wire import Presented

__all__ = ["main", "presented_object"]

_ROWS: dict[bytes, dict[str, str]] = {}


def _row(cert: Any) -> dict[str, str]:
    der = cert_der(cert)
    row = _ROWS.get(der)
    if row is None:
        names = cert_names(cert)
        if names is None:
            from cryptography import x509
            from cryptography.x509.oid import NameOID

            parsed = x509.load_der_x509_certificate(der)
            email = {NameOID.EMAIL_ADDRESS: "emailAddress"}
            names = parsed.subject.rfc4514_string(email), parsed.issuer.rfc4514_string(email)
        row = {"sha256": hashlib.sha256(der).hexdigest(), "subject": names[0], "issuer": names[1]}
        _ROWS[der] = row
    return row


def presented_object(host: str, port: int, answer: Presented | str) -> dict[str, Any]:
    """The ``--json`` object for one host, keys in the documented order."""
    ok = not isinstance(answer, str)
    version, cipher, certs = answer if not isinstance(answer, str) else (None, None, [])
    return {
        "host": host,
        "port": port,
        "tls_version": version,
        "cipher": cipher,
        "chain": [_row(c) for c in certs],
        "error": None if ok else answer,
    }


def _block(obj: dict[str, Any]) -> str:
    count = len(obj["chain"])
    lines = [
        f"{format_target(obj['host'], obj['port'])}  {obj['tls_version']}  {obj['cipher']}  "
        f"{count} certificate{'' if count == 1 else 's'} presented"
    ]
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
    objects = [presented_object(h, p, a) for (h, p), a in zip(pairs, answers, strict=True)]
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
