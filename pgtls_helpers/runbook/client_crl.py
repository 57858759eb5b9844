"""The server's CRL of step c4 (``client_crl_file``): the client CAs' revocation lists installed
as ``ssl_crl_file``, checked before any write.

The file given (PEM, one CRL or several one after the other, or one DER CRL) is written as PEM
where ``ssl_crl_file`` points already, the CRLs of other issuers there kept byte for byte, or as
``client_ca.crl`` in the data directory with ``ALTER SYSTEM SET ssl_crl_file``. It is journaled
and rolled back like ``ssl_ca_file``.

Once ``ssl_crl_file`` is set, PostgreSQL has OpenSSL check every certificate of a client's chain
against a CRL of its issuer (``X509_V_FLAG_CRL_CHECK_ALL``), so each refusal below stands for
logins that would fail:

- a CRL no CA of the merged ``ssl_ca_file`` (or of the clients' chains) signed protects nothing;
- a CRL past its nextUpdate (or within :data:`CRL_MARGIN` of it) makes every certificate login
  of that CA fail, and libpq shows the client the misleading ``sslv3 alert certificate
  expired``; one not valid yet fails them the same way;
- a CA of a client's chain, or a root of ``ssl_ca_file``, without a CRL fails the logins of every
  certificate it issued (``unable to get certificate CRL``; libpq: ``tlsv1 alert unknown ca``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pgtls_helpers.errors import PreflightError
from pgtls_helpers.pki import chain as chainmod
from pgtls_helpers.pki.client_posture import CRL_EXPIRED_ALERT
from pgtls_helpers.postgres import files
from pgtls_helpers.postgres.clients import ClientUser, read_client_file
from pgtls_helpers.postgres.server import ServerFacts
from pgtls_helpers.postgres.targets import TargetPolicy
from pgtls_helpers.runbook.common import rfc4514

__all__ = [
    "CLIENT_CRL_NAME",
    "CRL_KEY",
    "CRL_MARGIN",
    "CRL_NOT_FOUND_ALERT",
    "CRL_REVOKED_ALERT",
    "CrlPlan",
    "crl_row",
    "given_crls",
    "load_crls",
    "plan_crl",
    "revoked_by",
]

CRL_KEY = "client_crl_file"
CLIENT_CRL_NAME = "client_ca.crl"  # in the data directory, when ssl_crl_file is empty
#: a CRL must stay valid at least this long after the check, so the change and its proof end
#: before its nextUpdate
CRL_MARGIN = timedelta(hours=1)
#: what libpq (OpenSSL 3.0) prints for a certificate the server's CRL revokes
CRL_REVOKED_ALERT = "sslv3 alert certificate revoked"
#: what libpq prints when a CA of the client's chain has no CRL on the server
CRL_NOT_FOUND_ALERT = "tlsv1 alert unknown ca"
_PEM_CRL = b"-----BEGIN X509 CRL-----"


def load_crls(data: bytes, where: str) -> list[x509.CertificateRevocationList]:
    """The CRLs of a file's bytes: PEM blocks, or one DER CRL.

    Raises:
        PreflightError: nothing there parses as a CRL.
    """
    try:
        if _PEM_CRL in data:
            return [x509.load_pem_x509_crl(_PEM_CRL + b) for b in data.split(_PEM_CRL)[1:]]
        return [x509.load_der_x509_crl(data)]
    except ValueError:
        raise PreflightError(
            f"{where}: not a CRL (PEM or DER); give the file the CA publishes its certificate "
            "revocation list in. Nothing was changed"
        ) from None


def given_crls(source: str) -> list[x509.CertificateRevocationList]:
    """The CRLs of ``client_crl_file`` (``source``); [] when it is not given.

    Raises:
        PreflightError: the file cannot be read or holds no CRL.
    """
    if not source:
        return []
    path = Path(source)
    try:
        data = path.read_bytes()  # the operator's own file, named in the parameters
    except OSError as exc:
        raise PreflightError(
            f"{path}: {CRL_KEY} cannot be read ({exc.strerror}); give the path of the CRL file "
            "the CA publishes. Nothing was changed"
        ) from None
    return load_crls(data, f"{path} ({CRL_KEY})")


def _pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def crl_row(crl: x509.CertificateRevocationList) -> dict[str, object]:
    """A CRL as the record shows it."""
    nxt = crl.next_update_utc
    return {
        "issuer": rfc4514(crl.issuer),
        "last_update": crl.last_update_utc.isoformat(),
        "next_update": nxt.isoformat() if nxt else None,
        "revoked": len(crl),
        "sha256": files.sha256_hex(crl.public_bytes(serialization.Encoding.DER)),
    }


def revoked_by(
    crls: Sequence[x509.CertificateRevocationList], cert: x509.Certificate
) -> x509.CertificateRevocationList | None:
    """The CRL of ``crls`` that revokes ``cert`` (same issuer, its serial listed), or None."""
    for crl in crls:
        if crl.issuer == cert.issuer and (
            crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
        ):
            return crl
    return None


@dataclass(frozen=True)
class CrlPlan:
    """What step c4 does with ``client_crl_file``, decided before anything is written."""

    source: Path  # client_crl_file, as given
    target: Path  # the file ssl_crl_file names, or will name
    file: files.PlannedFile
    crls: tuple[x509.CertificateRevocationList, ...]  # the CRLs given, as installed
    kept: int  # CRLs of other issuers kept from the file already there
    settings: dict[str, str]  # ssl_crl_file, when it is set by ALTER SYSTEM
    before: str  # the ssl_crl_file setting now
    revoked_clients: tuple[str, ...]  # listed clients whose installed certificate is revoked

    def rows(self) -> list[dict[str, object]]:
        return [crl_row(c) for c in self.crls]

    def lines(self) -> list[str]:
        out = [
            f"{self.target}: installs the CRL of {rfc4514(c.issuer)} ({len(c)} revoked, "
            f"nextUpdate {c.next_update_utc:%Y-%m-%d %H:%M} UTC)"
            for c in self.crls
        ]
        out += [
            f"{who}: its installed certificate is revoked by the CRL; it will be refused"
            for who in self.revoked_clients
        ]
        return out


def _signers(
    crls: Sequence[x509.CertificateRevocationList], pool: Sequence[x509.Certificate], where: str
) -> list[x509.Certificate]:
    """The CA of ``pool`` that signed each CRL; refuses a CRL none of them signed."""
    out = []
    for crl in crls:
        signer = next(
            (
                c
                for c in pool
                if c.subject == crl.issuer and crl.is_signature_valid(c.public_key())  # type: ignore[arg-type]
            ),
            None,
        )
        if signer is None:
            known = ", ".join(sorted({rfc4514(c.subject) for c in pool})) or "none"
            raise PreflightError(
                f"{where}: the CRL of {rfc4514(crl.issuer)} is not signed by a client-issuing CA "
                f"of ssl_ca_file or of the clients' chains ({known}), so it would revoke "
                "nothing the server checks; give the CRLs of the CA that issued the clients' "
                f"certificates ({CRL_KEY}). Nothing was changed"
            )
        out.append(signer)
    return out


def _check_dates(crls: Sequence[x509.CertificateRevocationList], now: datetime, where: str) -> None:
    for crl in crls:
        issuer, nxt = rfc4514(crl.issuer), crl.next_update_utc
        if nxt is None or nxt < now + CRL_MARGIN:
            hours = int(CRL_MARGIN.total_seconds() // 3600)
            when = (
                "has no nextUpdate"
                if nxt is None
                else f"was due on {nxt:%Y-%m-%d %H:%M} UTC (nextUpdate)"
                if nxt <= now
                else f"is due on {nxt:%Y-%m-%d %H:%M} UTC, less than {hours} h from now"
            )
            raise PreflightError(
                f"{where}: the CRL of {issuer} {when}: past its nextUpdate the server refuses "
                "every client certificate of that CA and "
                f'libpq shows the client the misleading "{CRL_EXPIRED_ALERT}" though the '
                "certificate is valid; fetch the CA's current CRL and run again. Nothing was "
                "changed"
            )
        if crl.last_update_utc > now:
            raise PreflightError(
                f"{where}: the CRL of {issuer} is not valid before "
                f"{crl.last_update_utc:%Y-%m-%d %H:%M} UTC (thisUpdate), and the server would "
                "refuse every client certificate of that CA until then; check this host's "
                "clock or the CA's. Nothing was changed"
            )


def _client_chains(users: Sequence[ClientUser]) -> list[tuple[str, list[x509.Certificate]]]:
    """Each listed client's installed ``postgresql.crt`` (leaf, then intermediates)."""
    out = []
    for user in users:
        data = read_client_file(user.client_crt, user.uid)
        if data is None:
            continue
        try:
            out.append((user.name, x509.load_pem_x509_certificates(data)))
        except ValueError:
            continue  # c4's identity check says so
    return out


def _crl_dir_issuers(facts: ServerFacts, crl_dir: str) -> set[x509.Name]:
    """The issuers of the CRLs OpenSSL finds in ``ssl_crl_dir`` (they count as well)."""
    if not crl_dir:
        return set()
    base = Path(crl_dir) if Path(crl_dir).is_absolute() else facts.data_directory / crl_dir
    out: set[x509.Name] = set()
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return out
    for name in names:
        found = files.read_regular(base / name, exact=True)
        if found is None:
            continue
        try:
            out |= {c.issuer for c in load_crls(found[0], str(base / name))}
        except PreflightError:
            continue
    return out


def _missing_crls(
    ca_certs: Sequence[x509.Certificate],
    chains: Sequence[tuple[str, list[x509.Certificate]]],
    covered: set[x509.Name],
) -> list[str]:
    """Who would be refused for want of a CRL: each root of ssl_ca_file, and each CA of a
    client's chain, whose CRL is not installed."""
    out: list[str] = []
    for root in ca_certs:
        if root.subject == root.issuer and root.subject not in covered:
            out.append(f"{rfc4514(root.subject)} (a root of ssl_ca_file)")
    for who, chain in chains:
        if not chain:
            continue
        for cert in chainmod.order_chain(chain, ca_certs, leaf=chain[0]).path:
            if cert.subject == cert.issuer:
                continue
            if cert.issuer not in covered:
                text = f"{rfc4514(cert.issuer)} (in {who}'s chain)"
                if not any(rfc4514(cert.issuer) in m for m in out):
                    out.append(text)
    return out


def plan_crl(
    source: str,
    *,
    facts: ServerFacts,
    crl_setting: str,
    crl_dir: str,
    policy: TargetPolicy,
    ca_file_after: bytes,
    users: Sequence[ClientUser],
    now: datetime | None = None,
) -> CrlPlan | None:
    """Decide ``ssl_crl_file`` from ``client_crl_file`` (``source``); None when not given.

    ``ca_file_after`` is the planned ``ssl_ca_file``; ``users`` the listed clients, whose
    installed chains say which CAs need a CRL. Changes nothing.
    """
    if not source:
        return None
    now = now or datetime.now(timezone.utc)
    path = Path(source)
    crls = given_crls(source)
    ca_certs = (
        x509.load_pem_x509_certificates(ca_file_after) if b"-----BEGIN" in ca_file_after else []
    )
    chains = _client_chains(users)
    pool = {chainmod.fingerprint(c): c for c in ca_certs}
    for _who, chain in chains:
        pool.update((chainmod.fingerprint(c), c) for c in chain if chainmod.is_ca(c))
    _signers(crls, list(pool.values()), f"{path} ({CRL_KEY})")
    _check_dates(crls, now, f"{path} ({CRL_KEY})")

    owner = facts.data_directory_owner or (os.geteuid(), os.getegid())
    settings: dict[str, str] = {}
    if crl_setting:
        target = Path(crl_setting)  # from the server's ssl_crl_file
        if not target.is_absolute():
            target = facts.data_directory / target
        setting = "ssl_crl_file"
    else:
        target = facts.data_directory / CLIENT_CRL_NAME
        setting = f"the new ssl_crl_file ({CLIENT_CRL_NAME})"
        settings["ssl_crl_file"] = CLIENT_CRL_NAME
    if problem := policy.problem(target, setting=setting):
        raise PreflightError(f"{problem}; nothing was changed")
    target = files.canonical(target)
    found = files.read_regular(target, exact=True)
    if not crl_setting and found is not None:
        raise PreflightError(
            f"{target}: ssl_crl_file is empty but this file exists; point ssl_crl_file at it "
            "or move it away, so nothing is replaced silently. Nothing was changed"
        )
    current = found[0] if found is not None else b""
    issuers = {c.issuer for c in crls}
    kept_blocks: list[bytes] = []
    kept_issuers: set[x509.Name] = set()
    if current.strip():
        blocks = (
            [_PEM_CRL + b for b in current.split(_PEM_CRL)[1:]]
            if _PEM_CRL in current
            else [current]
        )
        head = current.split(_PEM_CRL)[0] if _PEM_CRL in current else b""
        olds = load_crls(current, f"{target} (ssl_crl_file)")
        for block, old in zip(blocks, olds, strict=True):
            if old.issuer not in issuers:
                # a DER file of another issuer is kept as the same CRL in PEM
                kept_blocks.append(block if _PEM_CRL in current else _pem(old))
                kept_issuers.add(old.issuer)
        kept_data = head + b"".join(kept_blocks)
    else:
        kept_data = b""
    if kept_data and not kept_data.endswith(b"\n"):
        kept_data += b"\n"
    data = kept_data + b"".join(_pem(c) for c in crls)

    missing = _missing_crls(
        ca_certs, chains, issuers | kept_issuers | _crl_dir_issuers(facts, crl_dir)
    )
    if missing:
        raise PreflightError(
            f"{path} ({CRL_KEY}): no CRL of {', '.join(missing)}; with ssl_crl_file set, the "
            "server checks every certificate of a client's chain against a CRL of its issuer "
            f'and refuses those it finds none for (libpq: "{CRL_NOT_FOUND_ALERT}"); add the '
            "CRL of each of these CAs to the file, one after the other. Nothing was changed"
        )
    try:
        st = target.stat()
        mode, file_owner = st.st_mode & 0o777, (st.st_uid, st.st_gid)
    except FileNotFoundError:
        mode, file_owner = 0o644, owner
    planned = files.plan_file(target, data, kind="ssl_crl_file", mode=mode, owner=file_owner)
    revoked = tuple(who for who, chain in chains if chain and revoked_by(crls, chain[0]))
    return CrlPlan(
        source=path,
        target=target,
        file=planned,
        crls=tuple(crls),
        kept=len(kept_blocks),
        settings=settings,
        before=crl_setting,
        revoked_clients=revoked,
    )
