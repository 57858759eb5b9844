"""The four outputs of ``pgtls watch``: pure functions from results to text.

* :func:`render_table` for people (worst first, days left coloured on a terminal);
* :func:`render_json` for scripts;
* :func:`render_prometheus` for node_exporter's textfile collector;
* :func:`render_nagios` for the monitoring-plugins contract (one status line, perfdata shaped
  like check_ssl_cert's ``days_chain_elem1=396;30;15;;``), with its exit code.

Severity when results are sorted or combined: critical, then unknown, then warning, then ok.
Client certificates (``--client-user``) and CRLs (``--crl``, a server's ``ssl_crl_file``) are rows
of their own in every format, and count towards the worst status and the exit code; a target's
session inventory (``--sessions``) is shown with it and has no status of its own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime

from pgtls_helpers.pki.client_posture import ClientCertResult, CrlResult, SessionInventory
from pgtls_helpers.pki.posture import STATUSES, TargetResult, status_rank

Row = TargetResult | ClientCertResult | CrlResult

__all__ = [
    "FORMATS",
    "exit_code",
    "render",
    "render_json",
    "render_nagios",
    "render_prometheus",
    "render_table",
    "sort_worst_first",
    "worst_status",
]

FORMATS = ("table", "json", "prometheus", "nagios")
_SEVERITY = {"ok": 0, "warning": 1, "unknown": 2, "critical": 3}
_COLOURS = {"critical": "31", "unknown": "35", "warning": "33", "ok": "32"}


def worst_status(rows: Sequence[Row]) -> str:
    """The status that sums up all rows (``ok`` for none)."""
    return max((r.status for r in rows), key=_SEVERITY.__getitem__, default="ok")


def summary(rows: Sequence[Row]) -> dict[str, int]:
    """How many rows (targets, client certificates, CRLs) have each status."""
    counts = dict.fromkeys(STATUSES, 0)
    for row in rows:
        counts[row.status] += 1
    return counts


def all_crls(results: Sequence[TargetResult], crls: Sequence[CrlResult] = ()) -> list[CrlResult]:
    """The ``--crl`` rows, then each target's ``ssl_crl_file`` rows."""
    return [*crls, *(c for r in results for c in r.crls)]


def _rows(
    results: Sequence[TargetResult], clients: Sequence[ClientCertResult], crls: Sequence[CrlResult]
) -> list[Row]:
    return [*results, *clients, *all_crls(results, crls)]


def sort_worst_first(results: Sequence[TargetResult]) -> list[TargetResult]:
    """Critical first, then unknown, warning, ok; fewest days left first; then by target."""
    return sorted(
        results,
        key=lambda r: (
            -_SEVERITY[r.status],
            r.days_left if r.days_left is not None else 1 << 30,
            r.target,
        ),
    )


def exit_code(
    results: Sequence[TargetResult],
    fmt: str,
    *,
    clients: Sequence[ClientCertResult] = (),
    crls: Sequence[CrlResult] = (),
) -> int:
    """Nagios: 0, 1, 2, 3 by the worst status; other formats: 0 when all are ok, else 1."""
    rows = _rows(results, clients, crls)
    if fmt == "nagios":
        return status_rank(worst_status(rows))
    return 0 if all(r.status == "ok" for r in rows) else 1


# --- table -----------------------------------------------------------------------------------


def _days_colour(days: int | None, warn_days: int, crit_days: int) -> str | None:
    if days is None:
        return None
    if days < crit_days:
        return _COLOURS["critical"]
    if days < warn_days:
        return _COLOURS["warning"]
    return _COLOURS["ok"]


def _paint(text: str, width: int, colour: str | None, enabled: bool) -> str:
    padded = text.ljust(width)
    return f"\x1b[{colour}m{padded}\x1b[0m" if enabled and colour else padded


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else "yes" if value else "no"


def _grid(head: Sequence[str], rows: list[list[str]], paints: list[dict[int, str | None]],
          colour: bool) -> list[str]:  # fmt: skip
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    for row, paint in zip(rows, paints, strict=True):
        cells = [
            _paint(text, w, paint.get(i), colour)
            for i, (text, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def _days(value: int | None) -> str:
    return "-" if value is None else str(value)


def _short_dn(dn: str | None) -> str:
    """The CN of an RFC 4514 name, or the name (a table column, not a key)."""
    if not dn:
        return "-"
    first = re.split(r"(?<!\\),", dn, maxsplit=1)[0]
    return first[3:] if first.startswith("CN=") else dn


def render_table(
    results: Sequence[TargetResult],
    *,
    warn_days: int,
    crit_days: int,
    colour: bool = False,
    clients: Sequence[ClientCertResult] = (),
    crls: Sequence[CrlResult] = (),
) -> str:
    """One row per target, worst first, then client certificates and CRLs, then the sessions
    by issuer; ``colour`` adds ANSI colours (for a terminal)."""
    lines: list[str] = []
    ordered = sort_worst_first(results)
    if results:
        head = (
            "STATUS", "TARGET", "DAYS", "TLS", "NEGOTIATION", "VERIFIED", "HOST", "PLAIN",
            "REASONS",
        )  # fmt: skip
        rows = [
            [
                r.status,
                r.target,
                _days(r.days_left),
                r.tls_version or "-",
                "+".join(r.negotiation) or "-",
                _yes_no(r.verified),
                _yes_no(r.hostname_ok),
                r.plaintext or "-",
                ", ".join(r.reasons) or "-",
            ]
            for r in ordered
        ]
        paints = [
            {0: _COLOURS[r.status], 2: _days_colour(r.days_left, warn_days, crit_days)}
            for r in ordered
        ]
        lines.extend(_grid(head, rows, paints, colour))
    every_crl = all_crls(results, crls)
    extras: list[ClientCertResult | CrlResult] = [*clients, *every_crl]
    if extras:
        if lines:
            lines.append("")
        extra_head = ("KIND", "STATUS", "NAME", "DAYS", "UNTIL", "ISSUER", "KEY", "REASONS")
        rows = []
        paints = []
        for x in extras:
            if isinstance(x, ClientCertResult):
                until, key = x.not_after, _yes_no(x.key_matches)
                colour_days = _days_colour(x.days_left, warn_days, crit_days)
            else:
                until, key = x.next_update, "-"
                colour_days = _days_colour(x.days_left, 1, 0)
            rows.append(
                [
                    x.kind,
                    x.status,
                    x.name,
                    _days(x.days_left),
                    "-" if until is None else f"{until:%Y-%m-%d}",
                    _short_dn(x.issuer),
                    key,
                    ", ".join(x.reasons) or "-",
                ]
            )
            paints.append({1: _COLOURS[x.status], 3: colour_days})
        lines.extend(_grid(extra_head, rows, paints, colour))
    inventories = [(r.target, r.sessions) for r in ordered if r.sessions is not None]
    groups = [(t, g) for t, inv in inventories for g in inv.by_issuer]
    if groups:
        lines.append("")
        rows = [
            [t, g.issuer_dn, str(g.client_cert_sessions), str(g.known), _days(g.fewest_days_left)]
            for t, g in groups
        ]
        paints = [{4: _days_colour(g.fewest_days_left, warn_days, crit_days)} for _, g in groups]
        sessions_head = ("TARGET", "CLIENT CERTIFICATES FROM", "SESSIONS", "KNOWN", "FEWEST DAYS")
        lines.extend(_grid(sessions_head, rows, paints, colour))
    counts = summary(_rows(results, clients, crls))
    lines.append("")
    lines.append(", ".join(f"{counts[s]} {s}" for s in STATUSES))
    for r in ordered:
        for detail in r.details:
            lines.append(f"{r.target}: {detail}")
        if r.sessions is not None:
            lines.append(f"{r.target}: {_sessions_sentence(r.sessions)}")
    for x in extras:
        for detail in x.details:
            lines.append(f"{x.kind} {x.name}: {detail}")
        if x.error and not x.details:
            lines.append(f"{x.kind} {x.error}")
    return "\n".join(lines) + "\n"


def _sessions_sentence(inv: SessionInventory) -> str:
    if inv.error is not None:
        return f"sessions not read: {inv.error}"
    with_cert = sum(g.client_cert_sessions for g in inv.by_issuer)
    text = (
        f"{inv.tls} sessions over TLS ({with_cert} with a client certificate), "
        f"{inv.without_tls} over TCP without TLS, {inv.unix_socket} on the Unix socket"
    )
    return text


# --- json ------------------------------------------------------------------------------------


def render_json(
    results: Sequence[TargetResult],
    *,
    checked_at: datetime | None = None,
    clients: Sequence[ClientCertResult] = (),
    crls: Sequence[CrlResult] = (),
) -> str:
    """``{"targets": [...], "client_certificates": [...], "crls": [...], "summary": {...}}``,
    each in the order given (a server's ``ssl_crl_file`` after the ``--crl`` files)."""
    doc: dict[str, object] = {
        "targets": [r.as_json() for r in results],
        "client_certificates": [c.as_json() for c in clients],
        "crls": [c.as_json() for c in all_crls(results, crls)],
        "summary": summary(_rows(results, clients, crls)),
    }
    if checked_at is not None:
        doc["checked_at"] = checked_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    return json.dumps(doc, indent=2) + "\n"


# --- prometheus ------------------------------------------------------------------------------

_METRICS = (
    (
        "pgtls_probe_success",
        "1 when the target answered the SSLRequest as PostgreSQL does, else 0.",
    ),
    ("pgtls_status", "The target's status: 0 ok, 1 warning, 2 critical, 3 unknown."),
    ("pgtls_reason", "1 for each reason code of the target's status."),
    (
        "pgtls_cert_not_after_timestamp_seconds",
        "Expiry of each presented certificate, in seconds since the epoch.",
    ),
    ("pgtls_tls_version_info", "The TLS version negotiated after SSLRequest."),
    ("pgtls_plaintext_accepted", "1 when a login without TLS is answered, 0 when refused."),
    ("pgtls_direct_tls", "1 when PostgreSQL 17 direct TLS (ALPN postgresql) works, else 0."),
)
#: Written only when their rows exist (--client-user, --crl or ssl_crl_file, --sessions).
_EXTRA_METRICS = (
    (
        "pgtls_client_cert_status",
        "A client user's certificate: 0 ok, 1 warning, 2 critical, 3 unknown.",
    ),
    ("pgtls_client_cert_reason", "1 for each reason code of a client certificate's status."),
    (
        "pgtls_client_cert_not_after_timestamp_seconds",
        "Expiry of a client user's postgresql.crt (its first to expire), seconds since the epoch.",
    ),
    (
        "pgtls_client_cert_key_matches",
        "1 when postgresql.key is the key of postgresql.crt, else 0.",
    ),
    ("pgtls_crl_status", "A CRL: 0 ok, 2 critical (past nextUpdate), 3 unknown."),
    ("pgtls_crl_reason", "1 for each reason code of a CRL's status."),
    ("pgtls_crl_next_update_timestamp_seconds", "A CRL's nextUpdate, in seconds since the epoch."),
    (
        "pgtls_sessions",
        "Client sessions of the target now, by transport (tls, without_tls, unix_socket).",
    ),
    ("pgtls_sessions_client_cert", "Sessions presenting a client certificate, by its issuer_dn."),
    (
        "pgtls_sessions_client_cert_known",
        "Of those, the ones whose certificate is a listed client user's.",
    ),
    (
        "pgtls_sessions_client_cert_min_days_left",
        "The fewest whole days left among the known client certificates of those sessions.",
    ),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def render_prometheus(
    results: Sequence[TargetResult],
    *,
    clients: Sequence[ClientCertResult] = (),
    crls: Sequence[CrlResult] = (),
) -> str:
    """Text exposition format, every metric with HELP and TYPE, for the textfile collector."""
    samples: dict[str, list[str]] = {name: [] for name, _ in (*_METRICS, *_EXTRA_METRICS)}
    for r in results:
        t = r.target
        answered = r.status != "unknown"
        samples["pgtls_probe_success"].append(f"{_labels(target=t)} {int(answered)}")
        samples["pgtls_status"].append(f"{_labels(target=t)} {status_rank(r.status)}")
        for code in r.reasons:
            samples["pgtls_reason"].append(f"{_labels(target=t, reason=code)} 1")
        for e in r.chain:
            labels = _labels(target=t, role=e.role, subject=e.subject, sha256=e.sha256)
            samples["pgtls_cert_not_after_timestamp_seconds"].append(
                f"{labels} {int(e.not_after.timestamp())}"
            )
        if r.tls_version:
            samples["pgtls_tls_version_info"].append(
                f"{_labels(target=t, version=r.tls_version)} 1"
            )
        if r.plaintext is not None:
            samples["pgtls_plaintext_accepted"].append(
                f"{_labels(target=t)} {int(r.plaintext == 'accepted')}"
            )
        if answered:
            samples["pgtls_direct_tls"].append(
                f"{_labels(target=t)} {int('direct' in r.negotiation)}"
            )
        if r.sessions is not None and r.sessions.error is None:
            inv = r.sessions
            for kind, count in (
                ("tls", inv.tls), ("without_tls", inv.without_tls),
                ("unix_socket", inv.unix_socket),
            ):  # fmt: skip
                samples["pgtls_sessions"].append(f"{_labels(target=t, transport=kind)} {count}")
            for g in inv.by_issuer:
                labels = _labels(target=t, issuer_dn=g.issuer_dn)
                samples["pgtls_sessions_client_cert"].append(f"{labels} {g.client_cert_sessions}")
                samples["pgtls_sessions_client_cert_known"].append(f"{labels} {g.known}")
                if g.fewest_days_left is not None:
                    samples["pgtls_sessions_client_cert_min_days_left"].append(
                        f"{labels} {g.fewest_days_left}"
                    )
    for c in clients:
        user = _labels(os_user=c.os_user)
        samples["pgtls_client_cert_status"].append(f"{user} {status_rank(c.status)}")
        for code in c.reasons:
            samples["pgtls_client_cert_reason"].append(
                f"{_labels(os_user=c.os_user, reason=code)} 1"
            )
        if c.not_after is not None:
            labels = _labels(
                os_user=c.os_user, subject=c.subject or "", issuer=c.issuer or "",
                serial=str(c.serial),
            )  # fmt: skip
            samples["pgtls_client_cert_not_after_timestamp_seconds"].append(
                f"{labels} {int(c.not_after.timestamp())}"
            )
        if c.key_matches is not None:
            samples["pgtls_client_cert_key_matches"].append(f"{user} {int(c.key_matches)}")
    for k in all_crls(results, crls):
        where = {"source": k.source, **({"target": k.target} if k.target else {})}
        samples["pgtls_crl_status"].append(f"{_labels(**where)} {status_rank(k.status)}")
        for code in k.reasons:
            samples["pgtls_crl_reason"].append(f"{_labels(**where, reason=code)} 1")
        if k.next_update is not None:
            samples["pgtls_crl_next_update_timestamp_seconds"].append(
                f"{_labels(**where, issuer=k.issuer or '')} {int(k.next_update.timestamp())}"
            )
    lines = []
    for name, text in (*_METRICS, *_EXTRA_METRICS):
        if (name, text) in _EXTRA_METRICS and not samples[name]:
            continue
        lines.append(f"# HELP {name} {text}")
        lines.append(f"# TYPE {name} gauge")
        lines.extend(f"{name}{sample}" for sample in samples[name])
    return "\n".join(lines) + "\n"


# --- nagios ----------------------------------------------------------------------------------

_PLAIN_LABEL = re.compile(r"^[A-Za-z0-9_.-]+$")


def _perf_label(label: str) -> str:
    # monitoring-plugins: a label with other characters is quoted; a quote inside is doubled
    return label if _PLAIN_LABEL.match(label) else "'" + label.replace("'", "''") + "'"


def _ok_facts(r: TargetResult) -> str:
    """What an ok target rests on: ``TLSv1.3, 396 days left``."""
    days = f"{r.days_left} days left" if r.days_left is not None else None
    return ", ".join(f for f in (r.tls_version, days) if f)


def _line(r: TargetResult) -> str:
    """The target in the status line: its reason codes, or for an ok one what it rests on (the
    status is the line's own ``OK``, or counted before the targets)."""
    if r.status == "ok":
        return f"{r.target} {_ok_facts(r)}".rstrip()
    return f"{r.target} {', '.join(r.reasons)}"


def _long_line(r: TargetResult, *, status: bool) -> str:
    """A target in the long output: the sentence of each reason, after its status unless the
    status line's is the target's own."""
    said = "; ".join(r.details) or _ok_facts(r) or "no reason"
    return f"{r.target} {r.status}: {said}" if status else f"{r.target}: {said}"


def _plural(count: int, one: str) -> str:
    return f"{count} {one}" if count == 1 else f"{count} {one}s"


def _extra_phrases(clients: Sequence[ClientCertResult], crls: Sequence[CrlResult]) -> list[str]:
    """Each client certificate and CRL that is not ok by name, the ok ones counted."""
    phrases = []
    for c in clients:
        if c.status != "ok":
            days = f" ({c.days_left} days left)" if c.days_left is not None else ""
            phrases.append(f"client {c.os_user} {', '.join(c.reasons)}{days}")
    good = [c for c in clients if c.status == "ok"]
    if good:
        fewest = min(c.days_left for c in good if c.days_left is not None)
        phrases.append(f"{_plural(len(good), 'client certificate')} ok (fewest {fewest} days left)")
    # the same CRL from a --crl file and a server's ssl_crl_file is said once
    for k in crls:
        if k.status != "ok":
            phrases.append(f"CRL of {_short_dn(k.issuer)} {', '.join(k.reasons)}")
    good_crls = {(k.issuer, k.next_update) for k in crls if k.status == "ok"}
    if good_crls:
        phrases.append(f"{_plural(len(good_crls), 'CRL')} ok")
    return list(dict.fromkeys(phrases))


def render_nagios(
    results: Sequence[TargetResult],
    *,
    warn_days: int,
    crit_days: int,
    clients: Sequence[ClientCertResult] = (),
    crls: Sequence[CrlResult] = (),
) -> str:
    """``PGTLS STATUS - text | perfdata`` then one line per row (the long output).

    The status is the worst of every row; the text says each target, client certificate and
    CRL that is not ok once, and counts the rest.
    """
    every_crl = all_crls(results, crls)
    rows = _rows(results, clients, crls)
    status = worst_status(rows).upper()
    ordered = sort_worst_first(results)
    counts = summary(results)
    parts = []
    if len(results) == 1:
        parts.append(_line(results[0]))
    elif results:
        by_severity = sorted(STATUSES, key=_SEVERITY.__getitem__, reverse=True)
        bad = [_line(r) for r in ordered if r.status != "ok"]
        if bad:
            tally = ", ".join(f"{counts[s]} {s}" for s in by_severity if counts[s])
            parts.append(f"{tally}: {'; '.join(bad)}")
        else:  # every target ok: the status says so, the count and the nearest expiry do not
            soonest = ordered[0]
            nearest = f", fewest days left {soonest.days_left} ({soonest.target})"
            parts.append(
                f"{len(results)} targets" + (nearest if soonest.days_left is not None else "")
            )
    parts.extend(_extra_phrases(clients, every_crl))
    text = "; ".join(parts)
    several = len(results) > 1
    perf = []
    for r in results:
        for index, element in enumerate(r.chain, 1):
            name = f"days_chain_elem{index}"
            label = f"{r.target} {name}" if several else name
            perf.append(f"{_perf_label(label)}={element.days_left};{warn_days};{crit_days};;")
        if r.sessions is not None and r.sessions.error is None:
            label = f"{r.target} sessions_client_cert" if several else "sessions_client_cert"
            with_cert = sum(g.client_cert_sessions for g in r.sessions.by_issuer)
            perf.append(f"{_perf_label(label)}={with_cert};;;0;")
    for c in clients:
        if c.days_left is not None:
            label = _perf_label(f"days_client_{c.os_user}")
            perf.append(f"{label}={c.days_left};{warn_days};{crit_days};;")
    for index, k in enumerate(every_crl, 1):
        if k.days_left is not None:
            perf.append(f"days_crl{index}={k.days_left};;0;;")
    first = f"PGTLS {status} - {text.replace('|', '/')}"
    if perf:
        first += " | " + " ".join(perf)
    # one ok target is said whole by the status line: a line of its own would repeat it
    said_whole = len(results) == 1 and results[0].status == "ok"
    long: list[str] = []
    if not said_whole:
        long = [_long_line(r, status=several or r.status.upper() != status) for r in ordered]
    for r in ordered:
        if r.sessions is not None:
            long.append(f"{r.target} sessions: {_sessions_sentence(r.sessions)}")
    extras: list[ClientCertResult | CrlResult] = [*clients, *every_crl]
    for x in extras:
        said = "; ".join(x.details) or (
            f"{x.days_left} days left" if x.days_left is not None else "ok"
        )
        long.append(f"{x.kind} {x.name} {x.status}: {said}")
    return "\n".join([first, *(line.replace("|", "/") for line in long)]) + "\n"


def render(
    results: Sequence[TargetResult],
    fmt: str,
    *,
    warn_days: int,
    crit_days: int,
    colour: bool = False,
    checked_at: datetime | None = None,
    clients: Sequence[ClientCertResult] = (),
    crls: Sequence[CrlResult] = (),
) -> str:
    """The text of ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "table":
        return render_table(
            results,
            warn_days=warn_days,
            crit_days=crit_days,
            colour=colour,
            clients=clients,
            crls=crls,
        )
    if fmt == "json":
        return render_json(results, checked_at=checked_at, clients=clients, crls=crls)
    if fmt == "prometheus":
        return render_prometheus(results, clients=clients, crls=crls)
    if fmt == "nagios":
        return render_nagios(
            results, warn_days=warn_days, crit_days=crit_days, clients=clients, crls=crls
        )
    raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
