"""pg_hba.conf as data: which ``hostssl`` and ``hostnossl … reject`` lines, and where.

Parsing is pgtoolkit's; this module holds the policy. The first matching line wins, so the new
lines go before the first TCP line that could let a connection in, and existing lines are never
sorted or rewritten: comments, spacing and order stay as the DBA left them.
"""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pgtoolkit.hba import HBARecord

from pgtls_helpers.errors import InputError

__all__ = [
    "RULE_KEYS",
    "HbaPlan",
    "HbaRule",
    "KNOWN_METHODS",
    "parse_rules",
    "plan_hba",
    "reject_rules",
]

KNOWN_METHODS = (
    "trust",
    "reject",
    "scram-sha-256",
    "md5",
    "password",
    "gss",
    "sspi",
    "ident",
    "peer",
    "ldap",
    "radius",
    "cert",
    "pam",
    "bsd",
)
TCP_TYPES = ("host", "hostssl", "hostnossl", "hostgssenc", "hostnogssenc")
_KEYWORD_ADDRESSES = ("all", "samehost", "samenet")


@dataclass(frozen=True)
class HbaRule:
    """One pg_hba.conf record the change wants: ``type database user address method [options]``."""

    type: str
    database: str
    user: str
    address: str
    method: str
    options: tuple[str, ...] = ()

    def line(self) -> str:
        """The record as a pg_hba.conf line, aligned like the stock file.

        >>> HbaRule("hostssl", "mydb", "app", "10.0.0.0/8", "scram-sha-256").line()
        'hostssl mydb            app             10.0.0.0/8              scram-sha-256'
        """
        cols = [
            f"{self.type:<7}",
            f"{self.database:<15}",
            f"{self.user:<15}",
            f"{self.address:<23}",
            self.method,
            *self.options,
        ]
        return " ".join(cols).rstrip()

    def key(self) -> tuple[str, ...]:
        return (self.type, self.database, self.user, self.address, self.method, *self.options)


def _check_field(value: str, name: str, where: str) -> None:
    """One pg_hba.conf field: no whitespace, control characters, '#' or quotes, which would
    end the field, start a comment or add a line."""
    bad = [c for c in value if c.isspace() or ord(c) < 32 or ord(c) == 127 or c in '#"']
    if not value or bad:
        shown = repr(bad[0]) if bad else "an empty value"
        raise InputError(
            f"{where}: {name} '{value.encode('unicode_escape').decode()}' contains {shown}, "
            "which pg_hba.conf would read as the end of the field or a new line; give a plain "
            "name without spaces, quotes, '#' or line breaks"
        )


INSECURE_METHODS = ("trust", "password")


def insecure_reason(rule: HbaRule) -> str | None:
    """Why a rule would let clients in without TLS or without authentication, or None."""
    if rule.method == "reject":
        return None
    if rule.method == "trust":
        return f"'{rule.line()}' lets anyone in without a password (trust)"
    if rule.type in ("host", "hostnossl", "hostnogssenc"):
        return f"'{rule.line()}' accepts connections without TLS ({rule.type})"
    return None


def _check_rule(rule: HbaRule, where: str) -> None:
    for name, value in (
        ("type", rule.type),
        ("database", rule.database),
        ("user", rule.user),
        ("address", rule.address),
        ("method", rule.method),
    ):
        _check_field(value, name, where)
    for option in rule.options:
        _check_field(option, "option", where)
    if rule.type not in TCP_TYPES:
        raise InputError(
            f"{where}: connection type '{rule.type}' is not one of {', '.join(TCP_TYPES)}; "
            "use hostssl for the clients' lines"
        )
    if rule.method not in KNOWN_METHODS:
        close = difflib.get_close_matches(rule.method, KNOWN_METHODS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(KNOWN_METHODS)}"
        raise InputError(
            f"{where}: '{rule.method}' is not an authentication method PostgreSQL knows; {hint}"
        )
    addr = rule.address
    if addr not in _KEYWORD_ADDRESSES and not addr.startswith("."):
        if "/" in addr:
            try:
                ipaddress.ip_network(addr, strict=False)
            except ValueError:
                raise InputError(
                    f"{where}: address '{addr}' is not a valid CIDR block such as 10.0.0.0/8"
                ) from None
        elif not all(part and part.replace("-", "").isalnum() for part in addr.split(".")):
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                raise InputError(
                    f"{where}: address '{addr}' is neither a CIDR block, a host name, nor all"
                ) from None


# The keys of one rule in the parameters' ``hba_rules``; ``options`` is the only optional one.
RULE_KEYS = ("type", "database", "user", "address", "method", "options")


def parse_rules(
    rules: Sequence[Mapping[str, object]], *, where: str = "hba_rules"
) -> list[HbaRule]:
    """Rules from parameters: a list of ``{type, database, user, address, method}``."""
    parsed = []
    if isinstance(rules, str | bytes) or not isinstance(rules, Sequence):
        raise InputError(f"{where}: expected a list of rules, got {type(rules).__name__}")
    for i, raw in enumerate(rules):
        here = f"{where}[{i}]"
        if not isinstance(raw, Mapping):
            raise InputError(
                f"{here}: expected a mapping with type, database, user, address and method, "
                f"got {type(raw).__name__}"
            )
        missing = [k for k in ("type", "database", "user", "address", "method") if not raw.get(k)]
        if missing:
            raise InputError(
                f"{here}: missing {', '.join(missing)}; every rule needs "
                "type, database, user, address and method"
            )
        opts = raw.get("options") or ()
        rule = HbaRule(
            str(raw["type"]),
            str(raw["database"]),
            str(raw["user"]),
            str(raw["address"]),
            str(raw["method"]),
            tuple(str(o) for o in opts)
            if isinstance(opts, list | tuple)
            else tuple(str(opts).split()),
        )
        _check_rule(rule, here)
        parsed.append(rule)
    return parsed


_INCLUDES = ("include_if_exists", "include_dir", "include")


def included_tcp_lines(hba_file: Path, text: str) -> dict[int, bool]:
    """For each include line of ``text`` (PostgreSQL 16+), whether what it brings in holds
    TCP lines (nested includes followed; a missing ``include_if_exists`` file holds none)."""
    out: dict[int, bool] = {}
    for i, line in enumerate(text.splitlines(), start=1):
        words = line.split("#", 1)[0].split()
        if len(words) >= 2 and words[0] in _INCLUDES:
            out[i] = _has_tcp(hba_file.parent, words[0], words[1].strip('"'), depth=0)
    return out


def _has_tcp(base: Path, kind: str, name: str, *, depth: int) -> bool:
    if depth > 10:
        return True
    target = Path(name) if Path(name).is_absolute() else base / name
    paths = sorted(target.glob("*.conf")) if kind == "include_dir" else [target]
    for path in paths:
        try:
            text = path.read_text()
        except OSError:
            if kind == "include":
                return True  # the server will refuse it anyway; be safe
            continue
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            if words[0] in TCP_TYPES:
                return True
            if words[0] in _INCLUDES and len(words) >= 2:
                if _has_tcp(path.parent, words[0], words[1].strip('"'), depth=depth + 1):
                    return True
    return False


def reject_rules() -> list[HbaRule]:
    """Non-SSL TCP is refused for every database, and for replication (``all`` excludes it)."""
    return [
        HbaRule("hostnossl", "all", "all", "all", "reject"),
        HbaRule("hostnossl", "replication", "all", "all", "reject"),
    ]


@dataclass(frozen=True)
class HbaPlan:
    """The file before and after, what was added, and where."""

    path: str
    before: str
    after: str
    added: tuple[str, ...]
    insert_at: int  # 1-based line number the new block starts at

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


def _records(text: str, path: str) -> list[tuple[int, HBARecord]]:
    out = []
    for i, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith(("include", "include_if_exists", "include_dir")):
            continue
        try:
            record = HBARecord.parse(line)
        except (ValueError, AssertionError) as exc:
            raise InputError(
                f"{path}:{i}: '{stripped}' is not a pg_hba.conf record ({exc or 'too short'}); "
                "fix that line first"
            ) from None
        method = getattr(record, "method", "")
        if method not in KNOWN_METHODS:
            close = difflib.get_close_matches(method, KNOWN_METHODS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else "fix the method"
            raise InputError(
                f"{path}:{i}: '{method}' is not an authentication method PostgreSQL knows; {hint}"
            )
        out.append((i, record))
    return out


def _record_key(record: HBARecord) -> tuple[str, ...]:
    opts = tuple(f"{k}={v}" for k, v in record.auth_options)
    addr = getattr(record, "address", "")
    if netmask := getattr(record, "netmask", None):
        addr = f"{addr}/{netmask}"
    method = str(getattr(record, "method", ""))
    return (str(record.conntype), record.database, record.user, addr, method, *opts)


def plan_hba(
    text: str,
    rules: Sequence[HbaRule],
    *,
    reject_non_ssl: bool = True,
    path: str = "pg_hba.conf",
    label: str = "pgtls",
    included: Mapping[int, bool] | None = None,
) -> HbaPlan:
    """Add ``rules`` (and the non-SSL rejects) before the first TCP line that would shadow them.

    Idempotent: rules already present before that point are not added again. ``included``
    maps the line numbers of ``include``/``include_dir``/``include_if_exists`` lines to whether
    the files they bring in hold TCP lines (see :func:`included_tcp_lines`): such an include
    counts as a TCP line. The file's line ending (LF or CRLF) is kept.

    >>> stock = "local all all peer\\nhost all all 127.0.0.1/32 scram-sha-256\\n"
    >>> plan = plan_hba(stock, [HbaRule("hostssl", "all", "all", "127.0.0.1/32",
    ...                                 "scram-sha-256")])
    >>> print(plan.after, end="")
    local all all peer
    # pgtls: TLS only; non-SSL TCP connections are rejected before any other TCP line
    hostnossl all             all             all                     reject
    hostnossl replication     all             all                     reject
    hostssl all             all             127.0.0.1/32            scram-sha-256
    host all all 127.0.0.1/32 scram-sha-256
    >>> plan_hba(plan.after, [HbaRule("hostssl", "all", "all", "127.0.0.1/32",
    ...                               "scram-sha-256")]).changed
    False
    """
    for i, rule in enumerate(rules):
        _check_rule(rule, f"hba rule {i + 1}")
    wanted = (reject_rules() if reject_non_ssl else []) + list(rules)
    wanted_keys = {r.key() for r in wanted}
    records = _records(text, path)
    lines = text.splitlines(keepends=True)
    eol = "\r\n" if "\r\n" in text else "\n"
    tcp_includes = sorted(n for n, has_tcp in (included or {}).items() if has_tcp)

    # The first TCP record that is not one we want: everything we add must come before it.
    insert_line = len(lines) + 1
    present: set[tuple[str, ...]] = set()
    for lineno, record in records:
        if tcp_includes and tcp_includes[0] < lineno:
            insert_line = tcp_includes[0]
            break
        key = _record_key(record)
        if record.conntype in TCP_TYPES and key not in wanted_keys:
            insert_line = lineno
            break
        present.add(key)
    else:
        if tcp_includes:
            insert_line = min(insert_line, tcp_includes[0])
    missing = [r for r in wanted if r.key() not in present]
    if not missing:
        return HbaPlan(path, text, text, (), insert_line)

    # Comments directly above the line we go before describe that line: stay above them.
    at = insert_line - 1
    if insert_line <= len(lines):
        while at > 0 and lines[at - 1].lstrip().startswith("#"):
            at -= 1
    block = (
        [f"# {label}: TLS only; non-SSL TCP connections are rejected before any other TCP line"]
        if reject_non_ssl
        else [f"# {label}: client TLS rules"]
    )
    block = [b + eol for b in block] + [r.line() + eol for r in missing]
    if at > 0 and not lines[at - 1].endswith("\n"):
        lines[at - 1] += eol
    after = "".join(lines[:at] + block + lines[at:])
    return HbaPlan(path, text, after, tuple(r.line() for r in missing), at + 1)
