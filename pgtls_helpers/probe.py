"""What a server actually presents: PostgreSQL's SSLRequest, a TLS handshake, the peer chain.

A PostgreSQL client asks for TLS with an 8-byte SSLRequest packet and reads a one-byte answer:
``S`` (go ahead with the handshake) or ``N`` (SSL is off). :func:`probe` does exactly that, then
runs a handshake *without* verification, because the point is to see what the server sends,
including a broken or incomplete chain, and reports the TLS version, the cipher and the chain in
the order the server presented it. Nothing here raises for a server that misbehaves; the answer
is a :class:`ProbeResult` whose ``error`` is one sentence.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pgtls_helpers.errors import InputError

if TYPE_CHECKING:
    from cryptography import x509

__all__ = [
    "ProbeResult",
    "chain_rows",
    "fingerprint",
    "format_target",
    "parse_target",
    "probe",
    "probe_many",
]

DEFAULT_PORT = 5432
_SSL_REQUEST = struct.pack("!ii", 8, 80877103)  # length 8, code 1234 << 16 | 5679


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


def format_target(host: str, port: int) -> str:
    """``host:port`` as a user would type it.

    >>> format_target("db1.example.com", 5432)
    'db1.example.com:5432'
    >>> format_target("::1", 5433)
    '[::1]:5433'
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_target(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """Split ``HOST[:PORT]`` (IPv6 as ``[addr]:port``, ``[addr]`` or a bare address).

    >>> parse_target("db1.example.com:6432")
    ('db1.example.com', 6432)
    >>> parse_target("db1.example.com")
    ('db1.example.com', 5432)
    >>> parse_target("[::1]:5433")
    ('::1', 5433)
    >>> parse_target("::1")
    ('::1', 5432)
    >>> parse_target("db1:http")
    Traceback (most recent call last):
    ...
    pgtls_helpers.errors.InputError: 'db1:http': the port must be a number from 1 to 65535; write HOST:PORT, with IPv6 addresses as [ADDRESS]:PORT
    """  # noqa: E501
    raw = text.strip()
    host, port_text = raw, ""
    if raw.startswith("["):
        close = raw.find("]")
        rest = raw[close + 1 :] if close > 0 else "?"
        if close < 0 or (rest and not rest.startswith(":")):
            raise InputError(
                f"{text!r}: an IPv6 address is written [ADDRESS]:PORT, for example [::1]:5432"
            )
        host, port_text = raw[1:close], rest[1:]
    elif raw.count(":") == 1:
        host, port_text = raw.split(":")
    elif raw.count(":") > 1:
        try:
            ipaddress.IPv6Address(raw)
        except ValueError:
            raise InputError(
                f"{text!r}: not HOST:PORT; write IPv6 addresses as [ADDRESS]:PORT"
            ) from None
    if not host:
        raise InputError(f"{text!r}: the host is missing; write HOST:PORT")
    if not port_text and raw.endswith(":"):
        port_text = "?"
    port = default_port
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise InputError(
                f"{text!r}: the port must be a number from 1 to 65535; write "
                "HOST:PORT, with IPv6 addresses as [ADDRESS]:PORT"
            )
        port = int(port_text)
    return host, port


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


_CONTEXT: ssl.SSLContext | None = None


def _context() -> ssl.SSLContext:
    """A client context that accepts whatever the server offers and verifies nothing."""
    global _CONTEXT
    if _CONTEXT is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        # Old protocol versions and weak keys are findings to show, not reasons to stop looking.
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.set_ciphers("ALL:@SECLEVEL=0")
        _CONTEXT = ctx
    return _CONTEXT


def _presented_der(sock: ssl.SSLSocket) -> list[bytes]:
    """The peer chain as sent, DER, leaf first (OpenSSL's SSL_get_peer_cert_chain)."""
    public = getattr(sock, "get_unverified_chain", None)  # Python 3.13+
    if public is not None:
        return [bytes(der) for der in public()]
    # Python 3.10-3.12 have the same call on the internal object; it returns _ssl.Certificate.
    chain = sock._sslobj.get_unverified_chain()  # type: ignore[attr-defined]
    if not chain:
        return []
    encoding = ssl._ssl.ENCODING_DER  # type: ignore[attr-defined]
    return [cert.public_bytes(encoding) for cert in chain]


class _ProbeFailure(Exception):
    """One sentence (without the ``host:port:`` prefix) saying what went wrong."""


def _close_politely(tls: ssl.SSLSocket) -> None:
    # close_notify tells the backend we are gone; without it the server logs "could not receive
    # data from client: Connection reset by peer" for every probe. Its own close_notify is not
    # awaited (the socket is non-blocking by then): that would only time the backend's exit.
    try:
        tls.setblocking(False)
        tls.unwrap()
    except (OSError, ValueError):
        pass
    finally:
        tls.close()


def _error_text(raw: socket.socket) -> str:
    """The message of an ErrorResponse that follows an ``E`` byte (v3 or the old v2 form)."""
    data = b""
    try:
        raw.settimeout(0.5)
        while len(data) < 2048:
            chunk = raw.recv(2048)
            if not chunk:
                break
            data += chunk
            if len(data) >= 4 and len(data) >= int.from_bytes(data[:4], "big"):
                break
    except OSError:
        pass
    if len(data) >= 5 and 4 <= int.from_bytes(data[:4], "big") <= 10_000:
        for field in data[4:].split(b"\0"):
            if field[:1] == b"M":
                return field[1:].decode("utf-8", "replace")
    text = data.split(b"\0", 1)[0].decode("utf-8", "replace").strip()
    return " ".join(text.split())[:300] or "no message"


def _handshake(host: str, port: int, timeout: float) -> tuple[str | None, str | None, list[bytes]]:
    deadline = time.monotonic() + timeout
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as exc:
        raise _ProbeFailure(
            f"cannot resolve the host name ({exc.strerror}); check the spelling and DNS"
        ) from exc
    except ConnectionRefusedError as exc:
        raise _ProbeFailure(
            "connection refused; is PostgreSQL listening on this address "
            "and port (listen_addresses, port)?"
        ) from exc
    except TimeoutError as exc:
        raise _ProbeFailure(
            f"no connection within {timeout:g} s; check the host, the port "
            "and any firewall in between"
        ) from exc
    except OSError as exc:
        raise _ProbeFailure(
            f"cannot connect ({exc.strerror or exc}); check the host and the port"
        ) from exc
    with raw:
        # Small writes in a row (SSLRequest, handshake, close_notify) must not wait for
        # delayed ACKs; libpq sets the same option.
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            raw.sendall(_SSL_REQUEST)
            raw.settimeout(max(0.001, deadline - time.monotonic()))
            answer = raw.recv(1)
        except TimeoutError as exc:
            raise _ProbeFailure(
                f"no answer to the SSLRequest within {timeout:g} s; is this a PostgreSQL server?"
            ) from exc
        except OSError as exc:
            raise _ProbeFailure(
                f"the connection failed before an answer to the SSLRequest "
                f"({exc.strerror or exc}); is this a PostgreSQL server?"
            ) from exc
        if answer == b"N":
            raise _ProbeFailure("the server refused SSL (ssl = off?)")
        if answer == b"":
            raise _ProbeFailure(
                "the server closed the connection without answering the "
                "SSLRequest; is this a PostgreSQL server?"
            )
        if answer == b"E":
            raise _ProbeFailure(
                f"the server answered the SSLRequest with an error: {_error_text(raw)}"
            )
        if answer != b"S":
            raise _ProbeFailure(
                f"the server answered the SSLRequest with {answer!r}, not "
                "'S' or 'N'; is this a PostgreSQL server?"
            )
        raw.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            tls = _context().wrap_socket(raw, server_hostname=None if _is_ip(host) else host)
        except TimeoutError as exc:
            raise _ProbeFailure(f"the TLS handshake did not finish within {timeout:g} s") from exc
        except ssl.SSLError as exc:
            reason = exc.reason or exc.strerror or str(exc)
            raise _ProbeFailure(
                f"the TLS handshake failed ({reason}); see the server log for its side"
            ) from exc
        except OSError as exc:
            raise _ProbeFailure(
                f"the connection failed during the TLS handshake "
                f"({exc.strerror or exc}); see the server log"
            ) from exc
        try:
            cipher = tls.cipher()
            return tls.version(), cipher[0] if cipher else None, _presented_der(tls)
        finally:
            _close_politely(tls)


_Outcome = tuple[str | None, str | None, list[bytes]] | str


def _attempt(host: str, port: int, timeout: float) -> _Outcome:
    """The network part of a probe: (version, cipher, DER chain), or an error sentence."""
    try:
        return _handshake(host, port, timeout)
    except _ProbeFailure as exc:
        return f"{format_target(host, port)}: {exc}"


def _result(host: str, port: int, outcome: _Outcome) -> ProbeResult:
    if isinstance(outcome, str):
        return ProbeResult(host, port, error=outcome)
    from cryptography import x509

    version, cipher, ders = outcome
    try:
        chain = tuple(x509.load_der_x509_certificate(der) for der in ders)
    except ValueError as exc:
        return ProbeResult(
            host,
            port,
            error=f"{format_target(host, port)}: the server "
            f"presented a certificate that cannot be parsed ({exc})",
        )
    return ProbeResult(host, port, tls_version=version, cipher=cipher, chain=chain)


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
    return _result(host, port, _attempt(host, port, timeout))


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
    pairs = [parse_target(t) if isinstance(t, str) else (t[0], int(t[1])) for t in targets]
    if len(pairs) <= 1 or max_workers <= 1:
        return [probe(host, port, timeout) for host, port in pairs]
    import threading

    _context()  # built once, before the threads share it
    outcomes: list[_Outcome | BaseException | None] = [None] * len(pairs)
    todo = iter(range(len(pairs)))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                index = next(todo, None)
            if index is None:
                return
            host, port = pairs[index]
            try:
                outcomes[index] = _attempt(host, port, timeout)
            except BaseException as exc:  # handed to the caller's thread below
                outcomes[index] = exc

    threads = [
        threading.Thread(target=work, name=f"pgtls-probe-{n}", daemon=True)
        for n in range(min(max_workers, len(pairs)))
    ]
    for thread in threads:
        thread.start()
    # The certificate parser is imported here, while the handshakes are on the network.
    from cryptography import x509  # noqa: F401

    for thread in threads:
        thread.join()
    results = []
    for (host, port), outcome in zip(pairs, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            raise outcome
        assert outcome is not None
        results.append(_result(host, port, outcome))
    return results


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER encoding, lower-case hex without separators."""
    from cryptography.hazmat.primitives import hashes

    return cert.fingerprint(hashes.SHA256()).hex()


def chain_rows(result: ProbeResult) -> list[dict[str, str]]:
    """The presented chain as rows ``{"sha256", "subject", "issuer"}`` (RFC 4514 names)."""
    return [
        {
            "sha256": fingerprint(cert),
            "subject": cert.subject.rfc4514_string(),
            "issuer": cert.issuer.rfc4514_string(),
        }
        for cert in result.chain
    ]
