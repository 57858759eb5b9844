"""The network half of :mod:`pgtls_helpers.postgres.probe`, on the standard library alone.

PostgreSQL's SSLRequest, a TLS handshake without verification, and the chain the server sent,
as OpenSSL holds it. ``pgtls probe`` is built on this module directly, so that a command probing
fifty servers starts without importing cryptography (about 40 ms of CPU, as much as twenty
probes cost the client); :mod:`pgtls_helpers.postgres.probe` turns the same answers into
``x509.Certificate`` objects for everything else.

Python's ``ssl`` module exposes the unverified peer chain publicly only from 3.13
(``SSLSocket.get_unverified_chain``, DER bytes); 3.11 and 3.12 have the same call on the
socket's internal ``_sslobj``, which returns ``_ssl.Certificate`` objects (``public_bytes``,
``get_info``) on every version. They are used through :func:`cert_der` and :func:`cert_names`
only.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Sequence

from pgtls_helpers.pki.target import format_target, is_ip_address

TYPE_CHECKING = False  # typing costs start-up time on every probe; mypy reads this as true
if TYPE_CHECKING:
    from typing import Any, TypeAlias

    #: What a completed handshake gives: TLS version, cipher, and the presented chain in the
    #: order the server sent it (``_ssl.Certificate`` objects, or DER bytes where only those
    #: are exposed).
    Presented: TypeAlias = tuple[str | None, str | None, list[Any]]

SSL_REQUEST = struct.pack("!ii", 8, 80877103)  # length 8, code 1234 << 16 | 5679


#: The ALPN protocol name PostgreSQL 17 selects (and requires for direct TLS).
ALPN = "postgresql"
_CONTEXTS: dict[bool, ssl.SSLContext] = {}


def context(alpn: bool = False) -> ssl.SSLContext:
    """The client context of every probe: accepts whatever the server offers, verifies nothing.

    With ``alpn`` it offers ALPN ``postgresql`` as libpq 17 does: a PostgreSQL 17 server selects
    it, on the SSLRequest path too; older servers ignore it.
    """
    ctx = _CONTEXTS.get(alpn)
    if ctx is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        # Old protocol versions and weak keys are findings to show, not reasons to stop looking.
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.set_ciphers("ALL:@SECLEVEL=0")
        if alpn:
            ctx.set_alpn_protocols([ALPN])
        _CONTEXTS[alpn] = ctx
    return ctx


class WireError(Exception):
    """One sentence (without the ``host:port:`` prefix) saying what went wrong.

    ``kind`` says which way it went wrong, for callers that classify (``pgtls watch``):
    ``unreachable`` (no TCP connection, or it broke), ``timeout``, ``not-postgres`` (an answer
    PostgreSQL does not give), ``no-ssl`` (the server refused SSL) or ``handshake`` (the TLS
    handshake failed).
    """

    def __init__(self, message: str, kind: str = "unreachable") -> None:
        super().__init__(message)
        self.kind = kind


def _peer_chain(tls: ssl.SSLSocket) -> list[Any]:
    """The peer chain as sent, leaf first (OpenSSL's ``SSL_get_peer_cert_chain``)."""
    internal = getattr(tls._sslobj, "get_unverified_chain", None)  # type: ignore[attr-defined]
    if internal is not None:
        return list(internal() or ())
    return [bytes(der) for der in tls.get_unverified_chain()]  # type: ignore[attr-defined]


def cert_der(cert: Any) -> bytes:
    """The DER encoding of one presented certificate."""
    if isinstance(cert, bytes):
        return cert
    return bytes(cert.public_bytes(ssl._ssl.ENCODING_DER))  # type: ignore[attr-defined]


# cryptography's short names (x509.name._NAMEOID_TO_NAME) and emailAddress, as
# pgtls_helpers.pki.client.rfc4514_dn prints them; every other type is its dotted OID.
_SHORT = {
    "1.2.840.113549.1.9.1": "emailAddress",
    "2.5.4.3": "CN",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "2.5.4.6": "C",
    "2.5.4.9": "STREET",
    "0.9.2342.19200300.100.1.25": "DC",
    "0.9.2342.19200300.100.1.1": "UID",
}
_OIDS: dict[str, str] = {}


def _attribute_type(name: str) -> str:
    oid = _OIDS.get(name)
    if oid is None:
        if name[:1].isdigit():
            oid = name
        else:
            oid = ssl._ssl.txt2obj(name, True)[3]  # type: ignore[attr-defined]
        _OIDS[name] = oid
    return _SHORT.get(oid, oid)


def _escape(value: str) -> str:
    # RFC 4514 section 2.4, exactly as cryptography's Name.rfc4514_string escapes.
    if not value:
        return ""
    for char, escaped in (
        ("\\", "\\\\"),
        ('"', '\\"'),
        ("+", "\\+"),
        (",", "\\,"),
        (";", "\\;"),
        ("<", "\\<"),
        (">", "\\>"),
        ("\0", "\\00"),
    ):
        value = value.replace(char, escaped)
    if value[0] == "#" or (value[0] == " " and len(value) > 1):
        value = "\\" + value
    if value[-1] == " ":
        value = value[:-1] + "\\ "
    return value


def rfc4514(name: Sequence[Sequence[tuple[str, str]]]) -> str | None:
    """An OpenSSL-decoded name (``get_info()["subject"]``) as
    :func:`pgtls_helpers.pki.client.rfc4514_dn` prints it (cryptography's RFC 4514 string, with
    ``emailAddress``).

    None when a value is not ASCII text: OpenSSL and cryptography decode some string types
    differently (a T61String with accents, a BIT STRING), so only cryptography answers then.

    >>> print(rfc4514(((("countryName", "US"),), (("commonName", "db1, primary"),))))
    CN=db1\\, primary,C=US
    >>> rfc4514(((("commonName", "Zürich"),),)) is None
    True
    """
    if not all(isinstance(v, str) and v.isascii() for rdn in name for _, v in rdn):
        return None
    return ",".join(
        "+".join(f"{_attribute_type(t)}={_escape(v)}" for t, v in rdn) for rdn in reversed(name)
    )


def cert_names(cert: Any) -> tuple[str, str] | None:
    """Subject and issuer as RFC 4514 strings, from OpenSSL's decoding of the certificate.

    None when OpenSSL's decoding cannot be taken as cryptography's (DER bytes only, a value
    that is not ASCII text, a name OpenSSL cannot decode); the caller then asks cryptography.
    """
    if isinstance(cert, bytes):
        return None
    try:
        info = cert.get_info()
        subject, issuer = rfc4514(info["subject"]), rfc4514(info["issuer"])
    except (ssl.SSLError, ValueError, KeyError, TypeError):
        return None
    return (subject, issuer) if subject is not None and issuer is not None else None


_SAN_TYPES = {"DNS": "DNS", "IP Address": "IP", "email": "email", "URI": "URI"}


def cert_validity(cert: Any) -> tuple[int, list[str]] | None:
    """Not-after (seconds since the epoch) and the subjectAltName entries (``DNS:name``,
    ``IP:address``, ``email:...``, ``URI:...``), from OpenSSL's decoding of the certificate.

    None where the caller must ask cryptography (DER bytes only, another type of name):
    :func:`pgtls_helpers.postgres.probe.leaf_validity` gives the same answer from it.
    """
    if isinstance(cert, bytes):
        return None
    try:
        info = cert.get_info()
        end = ssl.cert_time_to_seconds(info["notAfter"])
        names = []
        for kind, value in info.get("subjectAltName", ()):
            label = _SAN_TYPES.get(kind)
            if label is None or not isinstance(value, str):
                return None
            if label == "IP":
                import ipaddress

                value = ipaddress.ip_address(value.strip()).compressed
            names.append(f"{label}:{value}")
    except (ssl.SSLError, ValueError, KeyError, TypeError):
        return None
    return end, names


def close_politely(tls: ssl.SSLSocket) -> None:
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


def remaining(deadline: float) -> float:
    """Seconds left until ``deadline`` (a ``time.monotonic()`` value).

    Raises:
        TimeoutError: none left; callers report it as they report a socket timeout.
    """
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the deadline passed")
    return left


def arm(sock: socket.socket, deadline: float) -> None:
    """Give the next socket operation only the time left until ``deadline``.

    A socket timeout is per call: a server that sends one byte a second would otherwise keep a
    reading loop going for as long as it likes.

    Raises:
        TimeoutError: no time left.
    """
    sock.settimeout(remaining(deadline))


#: The most of an ErrorResponse read after the SSLRequest; the length field is not trusted.
ERROR_TEXT_CAP = 2048


def _error_text(raw: socket.socket, deadline: float) -> str:
    """The message of an ErrorResponse that follows an ``E`` byte (v3 or the old v2 form).

    Raises:
        TimeoutError: the deadline passed before the message was complete.
    """
    data = b""
    try:
        while len(data) < ERROR_TEXT_CAP:
            # A complete error arrives at once; 0.5 s of silence ends an old v2 one early.
            raw.settimeout(min(0.5, remaining(deadline)))
            try:
                chunk = raw.recv(ERROR_TEXT_CAP - len(data))
            except TimeoutError:
                remaining(deadline)  # raises when the deadline, not the silence, ran out
                break
            if not chunk:
                break
            data += chunk
            if len(data) >= 4 and len(data) >= int.from_bytes(data[:4], "big"):
                break
    except TimeoutError:
        raise
    except OSError:
        pass
    if len(data) >= 5 and 4 <= int.from_bytes(data[:4], "big") <= 10_000:
        for field in data[4:].split(b"\0"):
            if field[:1] == b"M":
                return field[1:].decode("utf-8", "replace")
    text = data.split(b"\0", 1)[0].decode("utf-8", "replace")
    return " ".join(text.split())[:300] or "no message"


def connect(host: str, port: int, timeout: float, deadline: float | None = None) -> socket.socket:
    """A TCP connection to ``host:port`` within ``timeout`` (or what is left until ``deadline``).

    Raises:
        WireError: no connection; the message says why in one sentence.
    """
    if deadline is None:
        deadline = time.monotonic() + timeout
    try:
        return socket.create_connection((host, port), timeout=remaining(deadline))
    except socket.gaierror as exc:
        raise WireError(
            f"cannot resolve the host name ({exc.strerror}); check the spelling and DNS"
        ) from exc
    except ConnectionRefusedError as exc:
        raise WireError(
            "connection refused; is PostgreSQL listening on this address "
            "and port (listen_addresses, port)?"
        ) from exc
    except TimeoutError as exc:
        raise WireError(
            f"no connection within {timeout:g} s; check the host, the port "
            "and any firewall in between",
            "timeout",
        ) from exc
    except OSError as exc:
        raise WireError(
            f"cannot connect ({exc.strerror or exc}); check the host and the port"
        ) from exc


def _ssl_request(raw: socket.socket, timeout: float, deadline: float) -> None:
    try:
        arm(raw, deadline)
        raw.sendall(SSL_REQUEST)
        arm(raw, deadline)
        answer = raw.recv(1)
    except TimeoutError as exc:
        raise WireError(
            f"no answer to the SSLRequest within {timeout:g} s; is this a PostgreSQL server?",
            "timeout",
        ) from exc
    except OSError as exc:
        raise WireError(
            f"the connection failed before an answer to the SSLRequest "
            f"({exc.strerror or exc}); is this a PostgreSQL server?",
            "not-postgres",
        ) from exc
    if answer == b"S":
        return
    if answer == b"N":
        raise WireError("the server refused SSL (ssl = off?)", "no-ssl")
    if answer == b"":
        raise WireError(
            "the server closed the connection without answering the "
            "SSLRequest; is this a PostgreSQL server?",
            "not-postgres",
        )
    if answer == b"E":
        try:
            text = _error_text(raw, deadline)
        except TimeoutError as exc:
            raise WireError(
                f"the server's error answer to the SSLRequest did not end within {timeout:g} s",
                "timeout",
            ) from exc
        raise WireError(f"the server answered the SSLRequest with an error: {text}")
    raise WireError(
        f"the server answered the SSLRequest with {answer!r}, not "
        "'S' or 'N'; is this a PostgreSQL server?",
        "not-postgres",
    )


def handshake(host: str, port: int, timeout: float) -> Presented:
    """SSLRequest and an unverified TLS handshake with ``host:port``, all within ``timeout``.

    Raises:
        WireError: no handshake; the message says why in one sentence.
    """
    version, cipher, chain, _ = handshake_alpn(host, port, timeout, alpn=False)
    return version, cipher, chain


def handshake_alpn(
    host: str,
    port: int,
    timeout: float,
    *,
    alpn: bool = True,
    deadline: float | None = None,
) -> tuple[str | None, str | None, list[Any], str | None]:
    """:func:`handshake` offering ALPN ``postgresql``; also returns the protocol selected.

    Args:
        host: a host name or an IP address.
        port: the PostgreSQL port.
        timeout: seconds for the whole exchange; named in the timeout messages.
        alpn: offer ALPN ``postgresql``.
        deadline: a ``time.monotonic()`` value ending the exchange instead, for a caller whose
            several connections share one ``timeout``.

    Raises:
        WireError: no handshake; the message says why in one sentence.
    """
    if deadline is None:
        deadline = time.monotonic() + timeout
    with connect(host, port, timeout, deadline) as raw:
        # Small writes in a row (SSLRequest, handshake, close_notify) must not wait for
        # delayed ACKs; libpq sets the same option.
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _ssl_request(raw, timeout, deadline)
        try:
            # The ssl module holds one timeout for the whole handshake, not one per read.
            arm(raw, deadline)
            tls = context(alpn).wrap_socket(
                raw, server_hostname=None if is_ip_address(host) else host
            )
        except TimeoutError as exc:
            raise WireError(
                f"the TLS handshake did not finish within {timeout:g} s", "timeout"
            ) from exc
        except ssl.SSLError as exc:
            reason = exc.reason or exc.strerror or str(exc)
            raise WireError(
                f"the TLS handshake failed ({reason}); see the server log for its side",
                "handshake",
            ) from exc
        except OSError as exc:
            raise WireError(
                f"the connection failed during the TLS handshake "
                f"({exc.strerror or exc}); see the server log"
            ) from exc
        try:
            cipher = tls.cipher()
            selected = tls.selected_alpn_protocol() if alpn else None
            return tls.version(), cipher[0] if cipher else None, _peer_chain(tls), selected
        finally:
            close_politely(tls)


def attempt(host: str, port: int, timeout: float) -> Presented | str:
    """:func:`handshake`, or its error as ``"host:port: sentence"``."""
    try:
        return handshake(host, port, timeout)
    except WireError as exc:
        return f"{format_target(host, port)}: {exc}"


def attempt_many(
    pairs: Sequence[tuple[str, int]], timeout: float, max_workers: int
) -> list[Presented | str]:
    """:func:`attempt` for every pair, ``max_workers`` at a time, answers in the order given."""
    if len(pairs) <= 1 or max_workers <= 1:
        return [attempt(host, port, timeout) for host, port in pairs]
    import threading

    context()  # built once, before the threads share it
    answers: list[Presented | str | BaseException | None] = [None] * len(pairs)
    todo = iter(range(len(pairs)))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                index = next(todo, None)
            if index is None:
                return
            try:
                answers[index] = attempt(*pairs[index], timeout)
            except BaseException as exc:  # re-raised in the caller's thread below
                answers[index] = exc

    threads = [
        threading.Thread(target=work, name=f"pgtls-probe-{n}", daemon=True)
        for n in range(min(max_workers, len(pairs)))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done: list[Presented | str] = []
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
        assert answer is not None
        done.append(answer)
    return done
