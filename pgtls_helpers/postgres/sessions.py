"""Who would be turned away: sessions connected now without SSL that a planned ``pg_hba.conf``
refuses on their next connection.

``pg_stat_ssl`` joined to ``pg_stat_activity`` lists the client backends connected over TCP
without SSL; each is matched against the planned file's lines in order, as the server does for
a new connection (connection type, database, user, address; the first line that matches
decides). Unix-socket sessions are not listed: ``local`` lines are not changed by the runbook.
Group (``+role``) and ``@file`` entries are treated as matching, so a doubtful case is listed
rather than missed.
"""

from __future__ import annotations

import ipaddress
from typing import Any

__all__ = ["NON_SSL_SESSIONS_SQL", "refused_by", "refused_sessions"]

NON_SSL_SESSIONS_SQL = """
SELECT a.pid, a.usename, a.datname, host(a.client_addr), a.application_name
FROM pg_stat_activity a JOIN pg_stat_ssl s ON s.pid = a.pid
WHERE a.backend_type = 'client backend' AND a.client_addr IS NOT NULL AND NOT s.ssl
  AND a.pid <> pg_backend_pid()
ORDER BY a.usename, a.datname, a.pid
"""


def _fields(line: str) -> list[str] | None:
    text = line.split("#", 1)[0].strip()
    if not text or text.startswith("include"):
        return None
    return text.split()


def _matches_list(value: str, entry: str, *, user: str, is_db: bool) -> bool:
    for item in entry.split(","):
        item = item.strip('"')
        if item == "all" or item == value or item.startswith(("+", "@")):
            return True
        if is_db and item == "sameuser" and value == user:
            return True
        if is_db and item in ("samerole", "samegroup"):
            return True
    return False


def _matches_address(addr: str, fields: list[str]) -> tuple[bool, int]:
    """Whether the address field(s) match; returns (match, fields used)."""
    spec = fields[0]
    if spec == "all":
        return True, 1
    if spec in ("samehost", "samenet"):
        return True, 1  # doubtful: listed rather than missed
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False, 1
    try:
        if "/" in spec:
            return ip in ipaddress.ip_network(spec, strict=False), 1
        host_ip = ipaddress.ip_address(spec)
    except ValueError:
        return False, 1  # a host name: the server resolves it, we do not guess
    if len(fields) > 1:
        try:
            net = ipaddress.ip_network(f"{spec}/{fields[1]}", strict=False)
            return ip in net, 2
        except ValueError:
            pass
    return ip == host_ip, 1


def refused_by(hba_text: str, *, user: str, database: str, address: str) -> int | None:
    """The 1-based line of ``hba_text`` that refuses a new non-SSL TCP connection (a
    ``reject`` line, or 0 when no line matches), or ``None`` when it would be let in.

    >>> text = "local all all peer\\nhostnossl all all all reject\\nhost all all all trust\\n"
    >>> refused_by(text, user="app", database="db", address="10.0.0.5")
    2
    >>> refused_by("host all all 10.0.0.0/8 md5\\n", user="app", database="db",
    ...            address="10.0.0.5") is None
    True
    """
    for number, line in enumerate(hba_text.splitlines(), start=1):
        fields = _fields(line)
        if not fields or fields[0] not in ("host", "hostnossl") or len(fields) < 5:
            continue
        if not _matches_list(database, fields[1], user=user, is_db=True):
            continue
        if not _matches_list(user, fields[2], user=user, is_db=False):
            continue
        matched, used = _matches_address(address, fields[3:])
        if not matched:
            continue
        method = fields[3 + used] if len(fields) > 3 + used else ""
        return number if method == "reject" else None
    return 0


def refused_sessions(conn: Any, planned_hba: str) -> list[dict[str, Any]]:
    """The sessions connected now without SSL over TCP that ``planned_hba`` would refuse.

    ``conn`` is an open psycopg connection as a superuser (others see no addresses).
    """
    rows = conn.execute(NON_SSL_SESSIONS_SQL).fetchall()
    out = []
    for pid, user, database, addr, app in rows:
        line = refused_by(planned_hba, user=user or "", database=database or "", address=addr)
        if line is not None:
            out.append(
                {
                    "pid": pid,
                    "user": user,
                    "database": database,
                    "client_addr": addr,
                    "application_name": app or "",
                    "line": f"planned line {line}" if line else "no line matches",
                }
            )
    return out
