"""pg_ident.conf as data: the lines a change adds, their exact text, and the DN a map matches.

A ``cert`` line of pg_hba.conf with ``map=M`` looks the certificate's identity up in the map
``M``: its common name (``clientname=CN``, the default) or its whole subject
(``clientname=DN``), which the server prints in RFC 2253 form with OpenSSL's escaping
(``CN=alice,OU=dba,O=Example``: last RDN first, commas between them). ``pg_stat_ssl`` shows the
same subject in another form (``/O=Example/OU=dba/CN=alice``); :func:`server_dn` and
:func:`stat_ssl_dn` give both, so the plan can show the DN exactly as the server will match it.

Lines are only ever appended: existing lines, comments and spacing stay as the DBA left them.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from pgtls_helpers.errors import InputError

__all__ = [
    "IdentEntry",
    "IdentLine",
    "IdentPlan",
    "parse_ident",
    "parse_maps",
    "plan_ident",
    "server_dn",
    "stat_ssl_dn",
]

_INCLUDES = ("include", "include_if_exists", "include_dir")
_STAT_SSL_FORM = re.compile(r"^/[A-Za-z.0-9]+=[^/]*(/[A-Za-z.0-9]+=[^/]*)*$")

# OpenSSL's short names (OBJ_nid2sn) of the attributes client subjects carry
_SHORT = {
    NameOID.COMMON_NAME: "CN",
    NameOID.ORGANIZATION_NAME: "O",
    NameOID.ORGANIZATIONAL_UNIT_NAME: "OU",
    NameOID.COUNTRY_NAME: "C",
    NameOID.STATE_OR_PROVINCE_NAME: "ST",
    NameOID.LOCALITY_NAME: "L",
    NameOID.STREET_ADDRESS: "street",
    NameOID.DOMAIN_COMPONENT: "DC",
    NameOID.USER_ID: "UID",
    NameOID.EMAIL_ADDRESS: "emailAddress",
    NameOID.SERIAL_NUMBER: "serialNumber",
    NameOID.GIVEN_NAME: "GN",
    NameOID.SURNAME: "SN",
    NameOID.TITLE: "title",
}


def _short(oid: x509.ObjectIdentifier) -> str:
    return _SHORT.get(oid, oid.dotted_string)


def _escape_2253(value: str) -> str:
    """A value escaped as OpenSSL's ``XN_FLAG_RFC2253`` prints it: ``,+"\\<>;`` with a
    backslash, a leading ``#`` or space and a trailing space too, control characters and every
    byte of a non-ASCII character as ``\\XX``."""
    out = []
    raw = value.encode()
    for i, byte in enumerate(raw):
        ch = chr(byte)
        if byte < 0x20 or byte == 0x7F or byte >= 0x80:
            out.append(f"\\{byte:02X}")
        elif ch in ',+"\\<>;' or (i == 0 and ch in "# ") or (i == len(raw) - 1 and ch == " "):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def server_dn(name: x509.Name) -> str:
    """The subject as a ``clientname=DN`` map matches it (RFC 2253, as OpenSSL prints it:
    every attribute in reverse order, within a multi-valued RDN too, so pass the name as read
    from the certificate, whose order is the DER one).

    >>> server_dn(x509.Name.from_rfc4514_string("CN=alice,OU=dba,O=Example"))
    'CN=alice,OU=dba,O=Example'
    """
    return ",".join(
        "+".join(f"{_short(a.oid)}={_escape_2253(str(a.value))}" for a in reversed(list(rdn)))
        for rdn in reversed(name.rdns)
    )


def stat_ssl_dn(name: x509.Name) -> str:
    """The subject (or issuer) as ``pg_stat_ssl`` shows it: each attribute in certificate
    order, ``/short=value``.

    >>> stat_ssl_dn(x509.Name.from_rfc4514_string("CN=alice,OU=dba,O=Example"))
    '/O=Example/OU=dba/CN=alice'
    """
    return "".join(f"/{_short(a.oid)}={a.value!s}" for a in name)


def _needs_quotes(value: str) -> bool:
    return any(c.isspace() or c in ",#" for c in value) or value in ("all",) or value[:1] == "+"


def _token(value: str) -> str:
    return f'"{value}"' if _needs_quotes(value) else value


@dataclass(frozen=True)
class IdentLine:
    """One pg_ident.conf line the change wants: ``map system_user role``."""

    map: str
    system_user: str  # the certificate's CN, or its DN in RFC 2253 form (clientname=DN)
    role: str

    def line(self) -> str:
        """The line as written, aligned like the stock file's header; quoted where the
        value holds a comma or a space (a DN does), so it stays one field.

        >>> IdentLine("certmap", "CN=alice,OU=dba,O=Example", "alice").line()
        'certmap         "CN=alice,OU=dba,O=Example" alice'
        """
        system = _token(self.system_user)
        return f"{_token(self.map):<15} {system:<23} {_token(self.role)}".rstrip()

    def key(self) -> tuple[str, str, str]:
        return (self.map, self.system_user, self.role)


@dataclass(frozen=True)
class IdentEntry:
    """One line of an existing pg_ident.conf, unquoted."""

    line_number: int
    map: str
    system_user: str
    role: str


def _check_value(value: str, name: str, where: str) -> None:
    bad = [c for c in value if ord(c) < 32 or ord(c) == 127 or c == '"']
    if not value.strip() or bad:
        shown = repr(bad[0]) if bad else "an empty value"
        raise InputError(
            f"{where}: {name} {value!r} contains {shown}, which pg_ident.conf cannot hold in "
            "one field; give the name without double quotes or line breaks"
        )


def parse_maps(
    maps: Sequence[Mapping[str, object]], *, where: str = "ident_maps"
) -> list[IdentLine]:
    """The parameters' ``ident_maps`` as lines; refuses what pg_ident.conf would misread."""
    out = []
    for i, raw in enumerate(maps):
        here = f"{where}[{i}]"
        line = IdentLine(
            str(raw.get("map") or ""), str(raw.get("system_user") or ""), str(raw.get("role") or "")
        )
        _check_value(line.map, "map", here)
        _check_value(line.system_user, "system_user", here)
        _check_value(line.role, "role", here)
        for name, value in (("map", line.map), ("role", line.role)):
            if any(c.isspace() or c in ",#" for c in value):
                raise InputError(f"{here}: {name} {value!r} must be one plain word")
        if _STAT_SSL_FORM.match(line.system_user):
            raise InputError(
                f"{here}: system_user {line.system_user!r} is a DN as pg_stat_ssl prints it, "
                "which pg_ident.conf reads as a regular expression (it starts with '/'); the "
                "server matches a certificate's DN in RFC 2253 form, last RDN first "
                "(CN=alice,OU=dba,O=Example)"
            )
        out.append(line)
    return out


def _tokens(line: str) -> list[str]:
    """The fields of one line: whitespace-separated, double quotes kept together, ``#``
    outside quotes starts a comment."""
    fields: list[str] = []
    current: list[str] = []
    quoted = started = False
    for ch in line:
        if ch == '"':
            quoted = not quoted
            started = True
            continue
        if not quoted and ch == "#":
            break
        if not quoted and ch.isspace():
            if started:
                fields.append("".join(current))
                current, started = [], False
            continue
        current.append(ch)
        started = True
    if started:
        fields.append("".join(current))
    return fields


def parse_ident(text: str) -> list[IdentEntry]:
    """The map lines of a pg_ident.conf (``include`` lines of PostgreSQL 16+ are skipped).

    >>> parse_ident('# c\\ncertmap "CN=a,O=X" a  # x\\n')
    [IdentEntry(line_number=2, map='certmap', system_user='CN=a,O=X', role='a')]
    """
    out = []
    for i, line in enumerate(text.splitlines(), start=1):
        fields = _tokens(line)
        if len(fields) != 3 or fields[0] in _INCLUDES:
            continue
        out.append(IdentEntry(i, fields[0], fields[1], fields[2]))
    return out


@dataclass(frozen=True)
class IdentPlan:
    """The file before and after, and the lines added (appended at its end)."""

    path: str
    before: str
    after: str
    added: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def diff(self) -> str:
        return "".join(
            difflib.unified_diff(
                self.before.splitlines(keepends=True),
                self.after.splitlines(keepends=True),
                fromfile=f"{self.path} (current)",
                tofile=f"{self.path} (planned)",
            )
        )

    def has(self, map_name: str, system_user: str, role: str) -> bool:
        """The planned file maps ``system_user`` to ``role`` in ``map_name``: a line naming it,
        or a regular-expression line (``/pattern``) that matches it, read with Python's
        ``re`` (close to, not exactly, the server's POSIX regexes) and ``\\1`` replaced."""
        for e in parse_ident(self.after):
            if e.map != map_name:
                continue
            if not e.system_user.startswith("/"):
                if (e.system_user, e.role) == (system_user, role):
                    return True
                continue
            try:
                found = re.search(e.system_user[1:], system_user)
            except re.error:
                continue
            if found is None:
                continue
            wanted = e.role
            if "\\1" in wanted and found.groups():
                wanted = wanted.replace("\\1", found.group(1) or "")
            if wanted in (role, "all"):
                return True
        return False


def plan_ident(
    text: str, lines: Sequence[IdentLine], *, path: str = "pg_ident.conf", label: str = "pgtls"
) -> IdentPlan:
    """Append the ``lines`` not already in ``text``; idempotent, keeps the line ending.

    >>> plan = plan_ident("# none\\n", [IdentLine("certmap", "alice", "app")], label="pgtls C1")
    >>> print(plan.after, end="")
    # none
    # pgtls C1: client certificate maps
    certmap         alice                   app
    >>> plan_ident(plan.after, [IdentLine("certmap", "alice", "app")]).changed
    False
    """
    present = {(e.map, e.system_user, e.role) for e in parse_ident(text)}
    missing = [ln for ln in dict.fromkeys(lines) if ln.key() not in present]
    if not missing:
        return IdentPlan(path, text, text, ())
    eol = "\r\n" if "\r\n" in text else "\n"
    head = text if not text or text.endswith("\n") else text + eol
    block = [f"# {label}: client certificate maps", *(ln.line() for ln in missing)]
    after = head + "".join(b + eol for b in block)
    return IdentPlan(path, text, after, tuple(ln.line() for ln in missing))
