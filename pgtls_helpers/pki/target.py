"""Targets as a person writes them: ``HOST[:PORT]``, IPv6 as ``[ADDRESS]:PORT``."""

from __future__ import annotations

import socket

from pgtls_helpers.errors import InputError

__all__ = ["DEFAULT_PORT", "format_target", "is_ip_address", "parse_target"]

DEFAULT_PORT = 5432


def format_target(host: str, port: int) -> str:
    """``host:port`` as a user would type it.

    >>> format_target("db1.example.com", 5432)
    'db1.example.com:5432'
    >>> format_target("::1", 5433)
    '[::1]:5433'
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_ipv6_address(text: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6, text.split("%", 1)[0])
    except (OSError, ValueError):
        return False
    return True


def is_ip_address(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET, host)
    except (OSError, ValueError):
        return is_ipv6_address(host)
    return True


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
        if close < 0 or (rest and not rest.startswith(":")) or not is_ipv6_address(raw[1:close]):
            raise InputError(
                f"{text!r}: an IPv6 address is written [ADDRESS]:PORT, for example [::1]:5432"
            )
        host, port_text = raw[1:close], rest[1:]
    elif raw.count(":") == 1:
        host, port_text = raw.split(":")
    elif raw.count(":") > 1 and not is_ipv6_address(raw):
        raise InputError(f"{text!r}: not HOST:PORT; write IPv6 addresses as [ADDRESS]:PORT")
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
