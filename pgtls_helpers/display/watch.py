"""What ``notebooks/watch.ipynb`` shows: the fleet by days left, bars against the thresholds,
and the earliest expiries on a timeline.

Pictures are inline SVG built here (no plotting library), so the executed notebook's HTML is a
self-contained report that a team lead opens without Jupyter.
"""

from __future__ import annotations

import datetime as _dt
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509

from pgtls_helpers.display.html import Rendered, table
from pgtls_helpers.display.watch_formats import all_crls
from pgtls_helpers.pki.client_posture import ClientCertResult, CrlResult
from pgtls_helpers.pki.posture import STATUSES, TargetResult, WatchOptions, summary
from pgtls_helpers.postgres.watch import load_roots, parse_targets, watch
from pgtls_helpers.postgres.watch_clients import (
    check_client_users,
    check_crl_files,
    resolve_watch_users,
)

if TYPE_CHECKING:
    import pandas

__all__ = [
    "ClientFiles",
    "check_client_files",
    "client_table",
    "days_picture",
    "expiry_timeline",
    "run_watch",
    "show_reasons",
    "sessions_table",
    "show_summary",
    "watch_table",
]

_COLOURS = {"ok": "#1a7f37", "warning": "#b54708", "critical": "#b42318", "unknown": "#667085"}
_MUTED = "#667085"


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


@dataclass(frozen=True)
class ClientFiles:
    """What the watch read on this machine: each client user's ``postgresql.crt`` (and key) and
    each CRL file, as ``pgtls watch --client-user --crl`` reads them."""

    clients: tuple[ClientCertResult, ...] = ()
    crls: tuple[CrlResult, ...] = ()
    known: tuple[x509.Certificate, ...] = ()  # the certificates read, to know sessions by


def check_client_files(
    client_users: Sequence[str] = (),
    crl_files: Sequence[str] = (),
    *,
    warn_days: int = 30,
    crit_days: int = 15,
) -> ClientFiles:
    """The client users' certificates and the CRL files, judged against the thresholds."""
    now = _dt.datetime.now(_dt.UTC)
    rows, known = check_client_users(
        resolve_watch_users(client_users), warn_days=warn_days, crit_days=crit_days, now=now
    )
    return ClientFiles(tuple(rows), tuple(check_crl_files(crl_files, now=now)), known)


def run_watch(
    targets: Sequence[str],
    *,
    root: str = "",
    warn_days: int = 30,
    crit_days: int = 15,
    timeout: float = 5.0,
    concurrency: int = 32,
    sessions: bool = False,
    login_user: str | None = None,
    dbname: str = "postgres",
    clients: ClientFiles | None = None,
) -> list[TargetResult]:
    """The notebook's parameters in, ``pgtls watch``'s results out (the same checks); with
    ``sessions``, each server's client-certificate sessions by issuer (a login as
    ``login_user``), the sessions of ``clients``' certificates known by serial."""
    options = WatchOptions(
        roots=load_roots(root) if root else None,
        root_path=root or None,
        warn_days=warn_days,
        crit_days=crit_days,
        timeout=timeout,
        concurrency=concurrency,
        now=_dt.datetime.now(_dt.UTC),
        sessions=sessions,
        user=login_user,
        dbname=dbname,
        client_certs=clients.known if clients else (),
    )
    return watch(parse_targets(targets), options)


def _by_days(row: Mapping[str, object]) -> tuple[bool, int, str]:
    days = row["days_left"]
    return (days is None, days if isinstance(days, int) else 0, str(row["of"]))


def client_table(files: ClientFiles, results: Sequence[TargetResult] = ()) -> Rendered:
    """One row per client certificate and per CRL (the files', then the servers'
    ``ssl_crl_file``), fewest days left first; every path in full."""
    certs: list[Mapping[str, object]] = [
        {
            "what": "client certificate",
            "of": c.os_user,
            "path": c.path,
            "status": c.status,
            "days_left": c.days_left,
            "subject or issuer": c.subject or c.error,
            "until": c.not_after,
            "key matches": c.key_matches,
            "reasons": ", ".join(c.reasons),
        }
        for c in files.clients
    ]
    crls: list[Mapping[str, object]] = [
        {
            "what": "CRL",
            "of": c.target or "file",
            "path": c.path,
            "status": c.status,
            "days_left": c.days_left,
            "subject or issuer": c.issuer or c.error,
            "until": c.next_update,
            "key matches": None,
            "reasons": ", ".join(c.reasons),
        }
        for c in all_crls(results, files.crls)
    ]
    return table(
        sorted([*certs, *crls], key=_by_days),
        colour=lambda r: _COLOURS.get(str(r["status"])) if r["status"] != "ok" else None,
        mono=("path",),
        nowrap=("until",),
    )


def sessions_table(results: Sequence[TargetResult]) -> Rendered:
    """Per server and issuer: the sessions presenting a client certificate now, how many are
    listed client users', and the fewest days those have left (``pg_stat_ssl``)."""
    rows: list[dict[str, object]] = []
    for r in results:
        inv = r.sessions
        if inv is None:
            continue
        if inv.error:
            rows.append({"target": r.target, "issuer": None, "note": inv.error})
            continue
        rows.extend(
            {
                "target": r.target,
                "issuer": g.issuer_dn,
                "client_cert_sessions": g.client_cert_sessions,
                "known": g.known,
                "fewest_days_left": g.fewest_days_left,
                "note": None,
            }
            for g in inv.by_issuer
        )
        note = f"{inv.tls} over TLS, {inv.without_tls} over TCP without, {inv.unix_socket} local"
        rows.append({"target": r.target, "issuer": "(every session)", "note": note})
    columns = ["target", "issuer", "client_cert_sessions", "known", "fewest_days_left", "note"]
    return table(rows, columns)


def _expires(result: TargetResult) -> _dt.datetime | None:
    return min((e.not_after for e in result.chain), default=None)


def show_summary(results: Sequence[TargetResult]) -> Rendered:
    """How many servers have each status, as coloured badges."""
    counts = summary(results)
    badges = "".join(
        f'<span style="display:inline-block;margin:2px 8px 2px 0;padding:3px 10px;'
        f'border-radius:10px;color:#fff;background:{_COLOURS[s]}">{counts[s]} {s}</span>'
        for s in STATUSES
    )
    return Rendered(
        f'<div style="margin:6px 0">{badges}</div>',
        ", ".join(f"{counts[s]} {s}" for s in STATUSES),
    )


def watch_table(results: Sequence[TargetResult]) -> pandas.DataFrame:
    """One row per server, fewest days left first (servers without a chain last)."""
    import pandas

    rows = [
        {
            "target": r.target,
            "status": r.status,
            "days_left": r.days_left,
            "expires": _expires(r),
            "tls": r.tls_version,
            "negotiation": "+".join(r.negotiation),
            "verified": r.verified,
            "hostname_ok": r.hostname_ok,
            "plaintext": r.plaintext,
            "reasons": ", ".join(r.reasons),
        }
        for r in results
    ]
    frame = pandas.DataFrame(rows, columns=list(rows[0]) if rows else None)
    if frame.empty:
        return frame
    frame["days_left"] = frame["days_left"].astype("Int64")
    return frame.sort_values(["days_left", "target"], na_position="last").reset_index(drop=True)


def days_picture(
    results: Sequence[TargetResult], *, warn_days: int, crit_days: int, limit: int = 40
) -> Rendered:
    """Days left per server as bars, with the warning and critical thresholds as lines."""
    shown = sorted((r for r in results if r.days_left is not None), key=lambda r: r.days_left or 0)
    shown = shown[:limit]
    if not shown:
        return Rendered("<div>(no server presented a certificate)</div>", "(no certificates)")
    days = [r.days_left or 0 for r in shown]
    low, high = min(0, *days), max(warn_days * 2, *days)
    label_w, plot_w, row_h, top = 190, 520, 20, 24
    height = top + row_h * len(shown) + 10

    def x(value: float) -> float:
        return label_w + plot_w * (value - low) / (high - low)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + plot_w + 90}" '
        f'height="{height}" font-family="sans-serif" font-size="12">'
    ]
    for i, r in enumerate(shown):
        y = top + i * row_h
        d = r.days_left or 0
        x0, x1 = sorted((x(0), x(d)))
        parts.append(f'<text x="4" y="{y + 14}">{_e(r.target[:28])}</text>')
        parts.append(
            f'<rect x="{x0:.1f}" y="{y + 3}" width="{max(x1 - x0, 2):.1f}" height="{row_h - 6}" '
            f'fill="{_COLOURS[r.status]}" fill-opacity="0.8"><title>{_e(r.target)}: {d} days '
            f"left ({_e(r.status)})</title></rect>"
        )
        parts.append(
            f'<text x="{max(x0, x1) + 4:.1f}" y="{y + 14}" font-size="10" fill="{_MUTED}">'
            f"{d} d</text>"
        )
    bottom = top + row_h * len(shown)
    for value, name, colour in (
        (crit_days, "critical", _COLOURS["critical"]),
        (warn_days, "warning", _COLOURS["warning"]),
    ):
        parts.append(
            f'<line x1="{x(value):.1f}" y1="{top - 4}" x2="{x(value):.1f}" y2="{bottom}" '
            f'stroke="{colour}" stroke-dasharray="4,3"/><text x="{x(value):.1f}" y="{top - 8}" '
            f'font-size="10" text-anchor="middle" fill="{colour}">{name} {value} d</text>'
        )
    parts.append("</svg>")
    text = "\n".join(f"{r.target:<28} {r.days_left:>6} days  {r.status}" for r in shown)
    return Rendered(f'<div style="margin:6px 0">{"".join(parts)}</div>', text)


def expiry_timeline(
    results: Sequence[TargetResult], *, now: _dt.datetime | None = None, limit: int = 15
) -> Rendered:
    """The earliest expiries (each server's first certificate to expire) on one time axis."""
    at = now or _dt.datetime.now(_dt.UTC)
    dated = sorted(
        ((end, r) for r in results if (end := _expires(r)) is not None), key=lambda p: p[0]
    )[:limit]
    if not dated:
        return Rendered("<div>(no server presented a certificate)</div>", "(no certificates)")
    lo = min(at, dated[0][0]) - _dt.timedelta(days=3)
    hi = max(at + _dt.timedelta(days=30), dated[-1][0]) + _dt.timedelta(days=3)
    span = (hi - lo).total_seconds()
    label_w, plot_w, row_h, top = 190, 520, 20, 24
    height = top + row_h * len(dated) + 30

    def x(t: _dt.datetime) -> float:
        return label_w + plot_w * (t - lo).total_seconds() / span

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + plot_w + 110}" '
        f'height="{height}" font-family="sans-serif" font-size="12">'
    ]
    for i, (end, r) in enumerate(dated):
        y = top + i * row_h
        parts.append(f'<text x="4" y="{y + 14}">{_e(r.target[:28])}</text>')
        parts.append(
            f'<line x1="{label_w}" y1="{y + 10}" x2="{x(end):.1f}" y2="{y + 10}" '
            f'stroke="#d0d5dd"/><circle cx="{x(end):.1f}" cy="{y + 10}" r="5" '
            f'fill="{_COLOURS[r.status]}"><title>{_e(r.target)}: {end:%Y-%m-%d}</title></circle>'
        )
        parts.append(
            f'<text x="{x(end) + 8:.1f}" y="{y + 14}" font-size="10" fill="{_MUTED}">'
            f"{end:%Y-%m-%d}</text>"
        )
    axis = top + row_h * len(dated) + 4
    parts.append(
        f'<line x1="{label_w}" y1="{axis}" x2="{label_w + plot_w}" y2="{axis}" stroke="{_MUTED}"/>'
    )
    for tick in (lo + (hi - lo) * k / 4 for k in range(5)):
        parts.append(
            f'<text x="{x(tick):.1f}" y="{axis + 14}" font-size="10" text-anchor="middle" '
            f'fill="{_MUTED}">{tick:%Y-%m-%d}</text>'
        )
    parts.append(
        f'<line x1="{x(at):.1f}" y1="{top - 6}" x2="{x(at):.1f}" y2="{axis}" '
        f'stroke="{_COLOURS["critical"]}" stroke-dasharray="4,3"/><text x="{x(at):.1f}" '
        f'y="{top - 9}" font-size="10" text-anchor="middle" fill="{_COLOURS["critical"]}">'
        "today</text></svg>"
    )
    text = "\n".join(f"{r.target:<28} {end:%Y-%m-%d}  {r.status}" for end, r in dated)
    return Rendered(f'<div style="margin:6px 0">{"".join(parts)}</div>', text)


def show_reasons(results: Sequence[TargetResult], files: ClientFiles | None = None) -> Rendered:
    """Each server (and client certificate, and CRL) that is not ok, every reason in a
    sentence."""
    named: list[tuple[str, str, Sequence[str], Sequence[str]]] = [
        (r.target, r.status, r.reasons, r.details) for r in results
    ]
    if files is not None:
        named += [(f"{c.os_user} {c.path}", c.status, c.reasons, c.details) for c in files.clients]
        named += [(c.source, c.status, c.reasons, c.details) for c in all_crls(results, files.crls)]
    bad = [n for n in named if n[1] != "ok"]
    if not bad:
        return Rendered('<div style="color:#1a7f37">Every server is ok.</div>', "every server ok")
    items = "".join(
        f'<li><b style="color:{_COLOURS[status]}">{_e(name)}</b> ({_e(status)}): '
        + "; ".join(f"<code>{_e(c)}</code> {_e(d)}" for c, d in zip(codes, details, strict=True))
        + "</li>"
        for name, status, codes, details in bad
    )
    text = "\n".join(f"{name} {status}: {'; '.join(details)}" for name, status, _, details in bad)
    return Rendered(f"<ul>{items}</ul>", text)
