"""The four outputs of ``pgtls watch``: pure functions from results to text.

* :func:`render_table` for people (worst first, days left coloured on a terminal);
* :func:`render_json` for scripts;
* :func:`render_prometheus` for node_exporter's textfile collector;
* :func:`render_nagios` for the monitoring-plugins contract (one status line, perfdata shaped
  like check_ssl_cert's ``days_chain_elem1=396;30;15;;``), with its exit code.

Severity when results are sorted or combined: critical, then unknown, then warning, then ok.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime

from pgtls_helpers.pki.posture import STATUSES, TargetResult, status_rank, summary

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


def worst_status(results: Sequence[TargetResult]) -> str:
    """The status that sums up all targets (``ok`` for none)."""
    return max((r.status for r in results), key=_SEVERITY.__getitem__, default="ok")


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


def exit_code(results: Sequence[TargetResult], fmt: str) -> int:
    """Nagios: 0, 1, 2, 3 by the worst status; other formats: 0 when all are ok, else 1."""
    if fmt == "nagios":
        return status_rank(worst_status(results))
    return 0 if all(r.status == "ok" for r in results) else 1


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


def render_table(
    results: Sequence[TargetResult], *, warn_days: int, crit_days: int, colour: bool = False
) -> str:
    """One row per target, worst first; ``colour`` adds ANSI colours (for a terminal)."""
    head = (
        "STATUS",
        "TARGET",
        "DAYS",
        "TLS",
        "NEGOTIATION",
        "VERIFIED",
        "HOST",
        "PLAIN",
        "REASONS",
    )
    ordered = sort_worst_first(results)
    rows = [
        [
            r.status,
            r.target,
            "-" if r.days_left is None else str(r.days_left),
            r.tls_version or "-",
            "+".join(r.negotiation) or "-",
            _yes_no(r.verified),
            _yes_no(r.hostname_ok),
            r.plaintext or "-",
            ", ".join(r.reasons) or "-",
        ]
        for r in ordered
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    for result, row in zip(ordered, rows, strict=True):
        paints = {
            0: _COLOURS[result.status],
            2: _days_colour(result.days_left, warn_days, crit_days),
        }
        cells = [
            _paint(text, w, paints.get(i), colour)
            for i, (text, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    counts = summary(results)
    lines.append("")
    lines.append(", ".join(f"{counts[s]} {s}" for s in STATUSES))
    for r in ordered:
        for detail in r.details:
            lines.append(f"{r.target}: {detail}")
    return "\n".join(lines) + "\n"


# --- json ------------------------------------------------------------------------------------


def render_json(results: Sequence[TargetResult], *, checked_at: datetime | None = None) -> str:
    """``{"targets": [...], "summary": {...}}``, targets in the order given."""
    doc: dict[str, object] = {
        "targets": [r.as_json() for r in results],
        "summary": summary(results),
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


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def render_prometheus(results: Sequence[TargetResult]) -> str:
    """Text exposition format, every metric with HELP and TYPE, for the textfile collector."""
    samples: dict[str, list[str]] = {name: [] for name, _ in _METRICS}
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
    lines = []
    for name, text in _METRICS:
        lines.append(f"# HELP {name} {text}")
        lines.append(f"# TYPE {name} gauge")
        lines.extend(f"{name}{sample}" for sample in samples[name])
    return "\n".join(lines) + "\n"


# --- nagios ----------------------------------------------------------------------------------

_PLAIN_LABEL = re.compile(r"^[A-Za-z0-9_.-]+$")


def _perf_label(label: str) -> str:
    # monitoring-plugins: a label with other characters is quoted; a quote inside is doubled
    return label if _PLAIN_LABEL.match(label) else "'" + label.replace("'", "''") + "'"


def _line(r: TargetResult) -> str:
    if r.status == "ok":
        days = f", {r.days_left} days left" if r.days_left is not None else ""
        return f"{r.target} ok ({r.tls_version}{days})"
    return f"{r.target} {', '.join(r.reasons)}"


def render_nagios(results: Sequence[TargetResult], *, warn_days: int, crit_days: int) -> str:
    """``PGTLS STATUS - text | perfdata`` then one line per target (the long output)."""
    status = worst_status(results).upper()
    ordered = sort_worst_first(results)
    counts = summary(results)
    if len(results) == 1:
        text = _line(results[0])
    else:
        by_severity = sorted(STATUSES, key=_SEVERITY.__getitem__, reverse=True)
        tally = ", ".join(f"{counts[s]} {s}" for s in by_severity if counts[s])
        bad = [_line(r) for r in ordered if r.status != "ok"]
        text = tally + (": " + "; ".join(bad) if bad else "")
    perf = []
    for r in results:
        for index, element in enumerate(r.chain, 1):
            name = f"days_chain_elem{index}"
            label = name if len(results) == 1 else f"{r.target} {name}"
            perf.append(f"{_perf_label(label)}={element.days_left};{warn_days};{crit_days};;")
    first = f"PGTLS {status} - {text.replace('|', '/')}"
    if perf:
        first += " | " + " ".join(perf)
    long = [f"{r.target} {r.status}: {'; '.join(r.details) or 'ok'}" for r in ordered]
    return "\n".join([first, *(line.replace("|", "/") for line in long)]) + "\n"


def render(
    results: Sequence[TargetResult],
    fmt: str,
    *,
    warn_days: int,
    crit_days: int,
    colour: bool = False,
    checked_at: datetime | None = None,
) -> str:
    """The text of ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "table":
        return render_table(results, warn_days=warn_days, crit_days=crit_days, colour=colour)
    if fmt == "json":
        return render_json(results, checked_at=checked_at)
    if fmt == "prometheus":
        return render_prometheus(results)
    if fmt == "nagios":
        return render_nagios(results, warn_days=warn_days, crit_days=crit_days)
    raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
