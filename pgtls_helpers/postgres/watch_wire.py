"""The network half of ``pgtls watch``: PostgreSQL 17's direct TLS, plaintext posture, on disk.

The SSLRequest handshake and the presented chain come from :mod:`pgtls_helpers.postgres.wire`;
this module adds the two other questions ``watch`` asks a server without logging in (what it
learns by logging in is :mod:`pgtls_helpers.postgres.watch_login`'s):

* :func:`direct_tls`: does it speak PostgreSQL 17's direct TLS? A ClientHello with ALPN
  ``postgresql`` and no SSLRequest; the answer is yes only when the server selects that ALPN
  protocol *and* answers a StartupMessage sent over the connection. A completed handshake alone
  proves nothing: a 17 server completes it without ALPN and only then drops the connection.
* :func:`plaintext_posture`: would it let a client log in without TLS? A StartupMessage (user
  ``pgtls_watch``, database ``postgres``) on a plain connection; an authentication request means
  ``accepted``, a refusal from ``pg_hba.conf`` (SQLSTATE 28000: "no encryption") ``rejected``.
  No password is ever sent: the connection is closed at the first answer.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from dataclasses import dataclass
from typing import Literal

from pgtls_helpers.postgres.wire import ALPN, WireError, arm, close_politely, connect, context

__all__ = [
    "ALPN",
    "WATCH_USER",
    "BackendMessage",
    "DirectAnswer",
    "PlaintextAnswer",
    "direct_tls",
    "plaintext_posture",
    "startup_message",
]

#: The user name of the plaintext and direct probes; it needs to exist nowhere.
WATCH_USER = "pgtls_watch"
_PROTOCOL_3_0 = 196608  # 3 << 16
# Messages a server sends first after a StartupMessage: an authentication request, an error,
# or (for a newer protocol than asked) NegotiateProtocolVersion.
_FIRST_MESSAGES = {b"R", b"E", b"v"}
#: The longest first message read; a larger length field is not PostgreSQL talking.
MAX_MESSAGE = 30_000


def startup_message(user: str = WATCH_USER, database: str = "postgres") -> bytes:
    """A protocol 3.0 StartupMessage: length, version 3.0, then ``name NUL value NUL`` pairs.

    >>> message = startup_message("u", "d")
    >>> int.from_bytes(message[:4], "big") == len(message), message[4:8].hex()
    (True, '00030000')
    """
    params = f"user\0{user}\0database\0{database}\0application_name\0pgtls-watch\0\0".encode()
    return struct.pack("!ii", 8 + len(params), _PROTOCOL_3_0) + params


@dataclass(frozen=True)
class BackendMessage:
    """The first message a server sends after a StartupMessage.

    Attributes:
        kind: the message type byte as a one-character string (``R``, ``E``, ``v``).
        sqlstate: for an error, its SQLSTATE (field ``C``), else None.
        message: for an error, its primary message (field ``M``), else None.
    """

    kind: str
    sqlstate: str | None = None
    message: str | None = None


def _recv_exactly(
    sock: socket.socket | ssl.SSLSocket, count: int, deadline: float | None = None
) -> bytes:
    """Up to ``count`` bytes, fewer when the peer closes.

    Raises:
        TimeoutError: ``deadline`` passed first (checked before every read).
    """
    data = b""
    while len(data) < count:
        if deadline is not None:
            arm(sock, deadline)
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _read_first_message(
    sock: socket.socket | ssl.SSLSocket, deadline: float | None = None
) -> BackendMessage | None:
    """The server's first message, or None when what came back is not PostgreSQL's protocol.

    Raises:
        TimeoutError: ``deadline`` passed before the message was complete.
    """
    head = _recv_exactly(sock, 5, deadline)
    if len(head) < 5 or head[:1] not in _FIRST_MESSAGES:
        return None
    length = int.from_bytes(head[1:], "big")
    if not 4 <= length <= MAX_MESSAGE:
        return None
    body = _recv_exactly(sock, length - 4, deadline)
    if len(body) < length - 4:
        return None
    kind = head[:1].decode()
    if kind != "E":
        return BackendMessage(kind)
    fields = {f[:1]: f[1:].decode("utf-8", "replace") for f in body.split(b"\0") if f}
    return BackendMessage(kind, fields.get(b"C"), fields.get(b"M"))


@dataclass(frozen=True)
class DirectAnswer:
    """Whether ``host:port`` speaks direct TLS, and why not when it does not."""

    supported: bool
    detail: str


def _server_hostname(host: str) -> str | None:
    # SNI carries names only, never addresses (RFC 6066).
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host.split("%", 1)[0])
            return None
        except (OSError, ValueError):
            continue
    return host


def direct_tls(
    host: str, port: int, timeout: float, *, deadline: float | None = None
) -> DirectAnswer:
    """Try PostgreSQL 17's direct TLS: ClientHello with ALPN ``postgresql``, then a StartupMessage.

    The whole exchange ends by ``deadline`` (a ``time.monotonic()`` value) when given, else
    within ``timeout``. Never raises for a server that does not take part; the answer says
    what happened.
    """
    if deadline is None:
        deadline = time.monotonic() + timeout
    try:
        raw = connect(host, port, timeout, deadline)
    except WireError as exc:
        return DirectAnswer(False, str(exc))
    with raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            arm(raw, deadline)
            tls = context(alpn=True).wrap_socket(raw, server_hostname=_server_hostname(host))
        except TimeoutError:
            return DirectAnswer(False, f"no TLS handshake without SSLRequest within {timeout:g} s")
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc.strerror or str(exc) or "closed"
            return DirectAnswer(False, f"no TLS handshake without SSLRequest ({reason})")
        try:
            selected = tls.selected_alpn_protocol()
            if selected != ALPN:
                return DirectAnswer(
                    False,
                    f"the handshake completed without ALPN {ALPN!r} "
                    f"(selected: {selected or 'none'})",
                )
            try:
                arm(tls, deadline)
                tls.sendall(startup_message())
                first = _read_first_message(tls, deadline)
            except TimeoutError:
                return DirectAnswer(
                    False, f"no answer to a StartupMessage over direct TLS within {timeout:g} s"
                )
            except (OSError, ssl.SSLError) as exc:
                return DirectAnswer(False, f"no answer to a StartupMessage over direct TLS ({exc})")
            if first is None:
                return DirectAnswer(False, "no PostgreSQL answer to a StartupMessage over it")
            return DirectAnswer(True, f"ALPN {ALPN!r}, StartupMessage answered with {first.kind!r}")
        finally:
            close_politely(tls)


Plaintext = Literal["accepted", "rejected"]


@dataclass(frozen=True)
class PlaintextAnswer:
    """``accepted``, ``rejected`` or None (could not tell), and what the server said."""

    verdict: Plaintext | None
    detail: str


def plaintext_posture(
    host: str, port: int, timeout: float, *, deadline: float | None = None
) -> PlaintextAnswer:
    """Whether the server would authenticate a client that did not ask for TLS.

    Sends a StartupMessage on a plain connection and reads the first answer, all by
    ``deadline`` (a ``time.monotonic()`` value) when given, else within ``timeout``; never
    sends a password and never raises for a misbehaving server.
    """
    if deadline is None:
        deadline = time.monotonic() + timeout
    try:
        raw = connect(host, port, timeout, deadline)
    except WireError as exc:
        return PlaintextAnswer(None, str(exc))
    # Closed at the first answer: a client that leaves before sending a password is not
    # logged by the server, and none is ever sent.
    with raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            arm(raw, deadline)
            raw.sendall(startup_message())
            first = _read_first_message(raw, deadline)
        except TimeoutError:
            return PlaintextAnswer(
                None, f"no answer to a plaintext StartupMessage in {timeout:g} s"
            )
        except OSError as exc:
            return PlaintextAnswer(None, f"the plaintext connection failed ({exc.strerror or exc})")
    if first is None:
        return PlaintextAnswer(None, "no PostgreSQL answer to a plaintext StartupMessage")
    if first.kind == "R":
        return PlaintextAnswer(
            "accepted", "the server asked a plaintext login to authenticate (no password sent)"
        )
    if first.kind == "E" and first.sqlstate == "28000":
        return PlaintextAnswer("rejected", first.message or "refused by pg_hba.conf")
    return PlaintextAnswer(None, first.message or f"answered with {first.kind!r}")
