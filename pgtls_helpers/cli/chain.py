"""``pgtls chain inspect`` and ``pgtls chain bundle``.

``inspect`` prints the ordered chain and the findings (``--json`` for the machine-readable
shape); ``bundle`` writes ``server.crt`` (leaf, then intermediates in signing order) and,
when asked, ``root.crt``. Exit status: 0 no error finding, 1 an error finding, 2 unusable
input (raised as :class:`InputError` and printed by ``cli.main``).

Only cryptography is imported here: no pandas, psycopg or papermill.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.x509.oid import NameOID

from pgtls_helpers.errors import InputError
from pgtls_helpers.pki.chain import (
    ChainResult,
    bundle_pem,
    cert_label,
    fingerprint,
    is_ca,
    order_chain,
    root_pem,
)
from pgtls_helpers.pki.findings import Finding, check_chain, has_errors
from pgtls_helpers.pki.intake import load_pool, read_ca_response
from pgtls_helpers.pki.keys import (
    PrivateKey,
    describe_key,
    load_key,
    passphrase_from_env,
    public_key_matches,
)

#: ``pgtls chain``'s way in for a missing CA certificate (both subcommands take ``--pool``)
ADD_ON_COMMAND_LINE = (
    "add its file to the command line, or pass --pool with a folder or bundle that holds it"
)

__all__ = ["bundle", "inspect", "load_key_for_matching", "render_text", "to_json"]


def inspect(args: argparse.Namespace) -> int:
    """Run ``pgtls chain inspect``; returns the exit status."""
    password = passphrase_from_env(args.password_env) if args.password_env else None
    certs, sources, notes = _read(args.paths, password)
    pool = _read_pool(args.pool)
    key = _read_key(args.key, password) if args.key else None

    result = order_chain(certs, pool, leaf=_leaf_for_key(certs, key))
    findings = notes + check_chain(
        result,
        key=key,
        hosts=args.host,
        expires_soon_days=args.expires_soon_days,
        add=ADD_ON_COMMAND_LINE,
    )
    findings.sort(key=lambda f: {"error": 0, "warning": 1, "info": 2}[f.severity])
    if args.json:
        json.dump(to_json(result, findings, sources), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        render_text(result, findings, sources, sys.stdout)
    return 1 if has_errors(findings) else 0


def bundle(args: argparse.Namespace) -> int:
    """Run ``pgtls chain bundle``; returns the exit status.

    Nothing is written when the chain has an error other than a missing root (a CA often
    leaves its root out; ``server.crt`` does not need it). ``--root-out`` needs the root.
    """
    password = passphrase_from_env(args.password_env) if args.password_env else None
    certs, _sources, notes = _read(args.paths, password)
    pool = _read_pool(args.pool)
    result = order_chain(certs, pool)
    findings = notes + check_chain(result, verify=False, add=ADD_ON_COMMAND_LINE)
    blocking = [
        f
        for f in findings
        if f.severity == "error"
        and not (f.code == "missing-issuer" and not args.root_out and _stops_at_ca(result))
    ]
    out = sys.stdout
    if blocking:
        for f in blocking:
            out.write(_finding_line(f) + "\n")
        out.write(
            f"Nothing written: fix the error{'s' if len(blocking) > 1 else ''} above "
            f"first ({args.out} is unchanged).\n"
        )
        return 1
    server = bundle_pem(result)
    root = root_pem(result) if args.root_out else None
    _write_atomic(Path(args.out), server)
    n_inter = len(result.intermediates) if result.root else len(result.path) - 1
    out.write(
        f"Wrote {args.out}: {cert_label(result.path[0])} followed by {n_inter} "
        f"intermediate certificate{'s' if n_inter != 1 else ''} in signing order.\n"
    )
    if root is not None and result.root is not None:
        _write_atomic(Path(args.root_out), root)
        out.write(
            f"Wrote {args.root_out}: {cert_label(result.root)} "
            f"(sha256 {fingerprint(result.root)}).\n"
        )
    for f in findings:
        if f.code == "missing-issuer":
            out.write(
                f"note     {f.code}: {f.message} ({args.out} does not need the root; "
                "clients do, as root.crt.)\n"
            )
        elif f.severity != "info":
            out.write(_finding_line(f) + "\n")
    return 0


# --- output ------------------------------------------------------------------------------------


def to_json(
    result: ChainResult,
    findings: Sequence[Finding],
    sources: dict[str, str] | None = None,
    *,
    now: _dt.datetime | None = None,
) -> dict[str, Any]:
    """The ``--json`` document: ``ready`` (no error finding), the chain leaf first, the unused
    certificates, and the findings.

    Each certificate names the file it came from (``source``; null for one taken from
    ``--pool``), the days left until its end date at ``now`` and its key type.
    """
    at = now if now is not None else _dt.datetime.now(_dt.UTC)
    files = sources or {}
    pool_fps = {fingerprint(c) for c in result.from_pool}

    def entry(cert: x509.Certificate) -> dict[str, Any]:
        fp = fingerprint(cert)
        return {
            "sha256": fp,
            "subject": cert.subject.rfc4514_string(),
            "issuer": cert.issuer.rfc4514_string(),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "days_left": (cert.not_valid_after_utc - at).days,
            "key_type": _key(cert),
            "source": None if fp in pool_fps else files.get(fp),
            "from_pool": fp in pool_fps,
        }

    from pgtls_helpers.pki import openssl

    return {
        "ready": not has_errors(findings),
        # who decided the trust verdict: the OpenSSL libpq uses (a complete chain only)
        "verifier": openssl.openssl_name() if result.complete else None,
        "chain": [
            {"role": role, **entry(c)} for c, role in zip(result.path, result.roles, strict=True)
        ],
        "unused": [entry(c) for c in result.unused],
        "findings": [
            {"severity": f.severity, "code": f.code, "message": f.message} for f in findings
        ],
    }


def render_text(
    result: ChainResult,
    findings: Sequence[Finding],
    sources: dict[str, str],
    out: TextIO,
) -> None:
    """The readable form: one line per certificate, then the findings and a verdict."""
    now = _dt.datetime.now(_dt.UTC)
    header = ("#", "role", "subject", "issuer", "not after", "days", "key", "sha256", "file")
    rows: list[tuple[str, ...]] = []
    members: list[tuple[str, str, x509.Certificate]] = [
        (str(i), r, c) for i, (c, r) in enumerate(zip(result.path, result.roles, strict=True))
    ]
    members += [("-", "unused", c) for c in result.unused[:_MAX_UNUSED]]
    pool_fps = {fingerprint(c) for c in result.from_pool}
    for pos, role, cert in members:
        fp = fingerprint(cert)
        rows.append(
            (
                pos,
                role,
                _short(_label(cert.subject), 34),
                _short(_label(cert.issuer), 28),
                f"{cert.not_valid_after_utc:%Y-%m-%d}",
                str((cert.not_valid_after_utc - now).days),
                _key(cert),
                fp[:12],
                "(pool)" if fp in pool_fps else _short_left(sources.get(fp, ""), 36),
            )
        )
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    for line in (header, *rows):
        out.write("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() + "\n")
    hidden = len(result.unused) - _MAX_UNUSED
    if hidden > 0:
        out.write(f"… and {hidden} more unused certificates (--json lists them all)\n")
    if result.missing_issuer is not None:
        out.write(f"The chain stops: the issuer {_label(result.missing_issuer)} is missing.\n")
    out.write("\n")
    shown = [f for f in findings if f.code != "unused-certificate" or f.severity != "info"]
    for f in shown:
        out.write(_finding_line(f) + "\n")
    quiet = len(findings) - len(shown)
    if quiet:
        out.write(
            f"info     {quiet} certificate{'s are' if quiet > 1 else ' is'} not on the "
            "path (listed above as unused).\n"
        )
    errors = sum(f.severity == "error" for f in findings)
    warnings = sum(f.severity == "warning" for f in findings)
    if errors:
        out.write(
            f"\nNOT READY: {errors} error{'s' if errors > 1 else ''}, {warnings} "
            f"warning{'s' if warnings != 1 else ''}.\n"
        )
    else:
        out.write(
            f"\nOK: the chain is complete and in order ({warnings} "
            f"warning{'s' if warnings != 1 else ''}).\n"
        )


_MAX_UNUSED = 50


def _finding_line(f: Finding) -> str:
    return f"{f.severity:<8} {f.code}: {f.message}"


def _label(name: x509.Name) -> str:
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else name.rfc4514_string() or "(empty name)"


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _short_left(text: str, width: int) -> str:
    """Long file names keep their end, where the file's own name is."""
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def _key(cert: x509.Certificate) -> str:
    try:
        return describe_key(cert.public_key())
    except (ValueError, UnsupportedAlgorithm):
        return "unsupported key"


# --- input -------------------------------------------------------------------------------------


def _read(
    paths: Sequence[str], password: bytes | None
) -> tuple[list[x509.Certificate], dict[str, str], list[Finding]]:
    """Certificates from the given files, their source names, and notes about the input."""
    intake = read_ca_response(paths, password=password)
    certs = [sc.cert for sc in intake.certificates]
    if not certs:
        raise InputError(
            f"no certificate was found in {', '.join(paths)}; pass the files the CA returned "
            "(PEM, DER, PKCS#7 or PKCS#12)."
        )
    sources = {fingerprint(sc.cert): str(sc.source) for sc in intake.certificates}
    notes: list[Finding] = []
    for item in intake.private_keys:
        notes.append(
            Finding(
                "warning",
                "private-key-in-bundle",
                f"{item}; keep private keys out of the files exchanged with a CA and never send "
                "them anywhere.",
            )
        )
    for item in intake.skipped:
        notes.append(Finding("info", "skipped-input", f"{item}."))
    return certs, sources, notes


def _read_pool(paths: Sequence[str]) -> list[x509.Certificate]:
    if not paths:
        return []
    return list(load_pool(paths))


def _read_key(path: str, password: bytes | None) -> PrivateKey:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"{path} cannot be read ({exc.strerror}); check the --key path.") from exc
    return load_key_for_matching(data, password, source=path)


def load_key_for_matching(data: bytes, password: bytes | None, source: str) -> PrivateKey:
    """A private key read only to compare its public half with a certificate.

    The RSA private-number check protects signing, not the comparison of public keys that
    happens here (OpenSSL's ``SSL_CTX_check_private_key`` compares the public halves too).
    """
    return load_key(data, password, source=source, validate=False)


def _leaf_for_key(
    certs: Sequence[x509.Certificate], key: PrivateKey | None
) -> x509.Certificate | None:
    if key is None:
        return None
    for cert in certs:
        if public_key_matches(key, cert):
            return cert
    return None


def _stops_at_ca(result: ChainResult) -> bool:
    """The path holds more than the leaf and stops at a CA (likely only the root is missing)."""
    return len(result.path) > 1 and is_ca(result.path[-1])


def _write_atomic(target: Path, data: bytes) -> None:
    if not target.parent.is_dir():
        raise InputError(f"{target.parent} is not a directory; create it or choose another path.")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
