"""What a server actually presents: PostgreSQL's SSLRequest, a TLS handshake, the peer chain.

A PostgreSQL client asks for TLS with an 8-byte SSLRequest packet and reads a one-byte answer:
``S`` (go ahead with the handshake) or ``N`` (SSL is off). :func:`probe` does exactly that, then
runs a handshake *without* verification, because the point is to see what the server sends,
including a broken or incomplete chain, and reports the TLS version, the cipher and the chain in
the order the server presented it. Nothing here raises for a server that misbehaves; the answer
is a :class:`ProbeResult` whose ``error`` is one sentence.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pgtls_helpers.pki import chain as chainmod
from pgtls_helpers.pki.target import DEFAULT_PORT, format_target, parse_target
from pgtls_helpers.postgres.wire import attempt, attempt_many, cert_der

if TYPE_CHECKING:
    from cryptography import x509

    from pgtls_helpers.postgres.wire import Presented

__all__ = [
    "DEFAULT_PORT",
    "ProbeResult",
    "chain_rows",
    "fingerprint",
    "format_target",
    "leaf_validity",
    "parse_target",
    "probe",
    "probe_many",
]


@dataclass(frozen=True)
class ProbeResult:
    """One server's answer: TLS version, cipher and presented chain, or an error sentence.

    ``chain`` is what the server sent, in the order it sent it (leaf first when the server is
    configured properly); it is empty when ``error`` is set.
    """

    host: str
    port: int
    tls_version: str | None = None
    cipher: str | None = None
    chain: tuple[x509.Certificate, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the handshake completed."""
        return self.error is None

    @property
    def target(self) -> str:
        """``host:port``, with brackets around an IPv6 address."""
        return format_target(self.host, self.port)


def _result(host: str, port: int, answer: Presented | str) -> ProbeResult:
    if isinstance(answer, str):
        return ProbeResult(host, port, error=answer)
    from cryptography import x509

    version, cipher, certs = answer
    try:
        chain = tuple(x509.load_der_x509_certificate(cert_der(c)) for c in certs)
    except ValueError as exc:
        return ProbeResult(
            host,
            port,
            error=f"{format_target(host, port)}: the server presented a certificate that "
            f"cannot be parsed ({exc})",
        )
    return ProbeResult(host, port, tls_version=version, cipher=cipher, chain=chain)


def _pairs(targets: Iterable[str | tuple[str, int]]) -> list[tuple[str, int]]:
    return [parse_target(t) if isinstance(t, str) else (t[0], int(t[1])) for t in targets]


def probe(host: str, port: int = DEFAULT_PORT, timeout: float = 5.0) -> ProbeResult:
    """Ask ``host:port`` for TLS the way libpq does and record what it presents.

    Args:
        host: a host name or an IP address (IPv6 without brackets).
        port: the PostgreSQL port.
        timeout: seconds for the whole exchange (connect, answer, handshake).

    Returns:
        A :class:`ProbeResult`; on failure ``error`` says what happened in one sentence
        starting with ``host:port:``, and nothing is raised.
    """
    return _result(host, port, attempt(host, port, timeout))


def probe_many(
    targets: Iterable[str | tuple[str, int]], timeout: float = 5.0, max_workers: int = 16
) -> list[ProbeResult]:
    """Probe several servers at once; the results come back in the order given.

    Args:
        targets: ``"host:port"`` strings (see :func:`parse_target`) or ``(host, port)`` pairs.
        timeout: seconds for each probe.
        max_workers: how many probes run at the same time.

    Raises:
        InputError: a target is not ``HOST[:PORT]``; nothing was probed.
    """
    pairs = _pairs(targets)
    answers = attempt_many(pairs, timeout, max_workers)
    return [_result(host, port, a) for (host, port), a in zip(pairs, answers, strict=True)]


fingerprint = chainmod.fingerprint  # the one fingerprint: SHA-256 of the DER, lower-case hex


def chain_rows(result: ProbeResult) -> list[dict[str, str]]:
    """The presented chain as rows ``{"sha256", "subject", "issuer"}``: RFC 4514 names with
    ``emailAddress`` by name (:func:`pgtls_helpers.pki.client.rfc4514_dn`)."""
    from pgtls_helpers.pki.client import rfc4514_dn

    return [
        {
            "sha256": fingerprint(cert),
            "subject": rfc4514_dn(cert.subject),
            "issuer": rfc4514_dn(cert.issuer),
        }
        for cert in result.chain
    ]


def leaf_validity(cert: x509.Certificate) -> tuple[int, list[str]]:
    """Not-after (whole seconds since the epoch) and the subjectAltName entries as ``DNS:name``,
    ``IP:address``, ``email:...``, ``URI:...`` (other kinds by their type), as ``pgtls probe``
    prints them for the leaf."""
    from cryptography import x509 as _x509

    from pgtls_helpers.pki.client import rfc4514_dn

    try:
        ext = cert.extensions.get_extension_for_class(_x509.SubjectAlternativeName).value
    except _x509.ExtensionNotFound:
        ext = None
    names: list[str] = []
    for general in ext or ():
        if isinstance(general, _x509.DNSName):
            names.append(f"DNS:{general.value}")
        elif isinstance(general, _x509.IPAddress):
            names.append(f"IP:{general.value}")
        elif isinstance(general, _x509.RFC822Name):
            names.append(f"email:{general.value}")
        elif isinstance(general, _x509.UniformResourceIdentifier):
            names.append(f"URI:{general.value}")
        elif isinstance(general, _x509.DirectoryName):
            names.append(f"DirName:{rfc4514_dn(general.value)}")
        else:
            names.append(f"{type(general).__name__}:{general.value!r}")
    return int(cert.not_valid_after_utc.timestamp()), names
