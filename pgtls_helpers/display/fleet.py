"""The fleet report as a page a change manager reads: a row per host, a link to each record."""

from __future__ import annotations

from pgtls_helpers.display.html import BAD, BOX, CELL, MUTED, OK, TABLE, WARN, esc
from pgtls_helpers.runbook.fleet_report import FleetReport, HostRow

__all__ = ["fleet_page", "fleet_text"]

_COLUMNS = (
    "host",
    "wave",
    "outcome",
    "failing step",
    "reason",
    "served sha256",
    "days left",
    "checks",
    "record",
)


def _colour(row: HostRow) -> str:
    if row.outcome == "not reached":
        return MUTED
    return OK if row.good else BAD


def _checks(row: HostRow) -> str:
    if row.checks_total is None:
        return ""
    return f"{row.checks_passed} of {row.checks_total}"


def _cells(row: HostRow) -> list[str]:
    link = f'<a href="{esc(row.page)}">{esc(row.record)}</a>' if row.page else esc(row.record or "")
    fp = row.fingerprint or ""
    return [
        f"<b>{esc(row.host)}</b>",
        esc(row.wave if row.wave is not None else ""),
        f'<span style="color:{_colour(row)};font-weight:600">{esc(row.outcome)}</span>',
        esc(row.failed_step or ""),
        esc(row.reason or ""),
        f'<span title="{esc(fp)}" style="font-family:monospace;font-size:12px">'
        f"{esc(fp[:23] + '…' if len(fp) > 24 else fp)}</span>",
        esc(row.days_left if row.days_left is not None else ""),
        esc(_checks(row)),
        link,
    ]


def _headline(report: FleetReport) -> tuple[str, str]:
    counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(report.counts.items()))
    mode = " (--check: the plan only)" if report.check_mode else ""
    failed = any(not r.good and r.outcome != "not reached" for r in report.rows)
    colour = OK if report.all_good else (BAD if failed else WARN)
    text = f"{len(report.rows)} hosts: {counts}{mode}"
    return text, colour


def fleet_page(report: FleetReport) -> str:
    """One self-contained HTML page (no scripts, no fetches)."""
    text, colour = _headline(report)
    head = "".join(f'<th style="{CELL}background:#f2f4f7">{esc(c)}</th>' for c in _COLUMNS)
    body = "".join(
        "<tr>" + "".join(f'<td style="{CELL}">{c}</td>' for c in _cells(row)) + "</tr>"
        for row in report.rows
    )
    others = (
        f"<p style='color:{MUTED}'>Earlier runs of this change: "
        f"{esc(', '.join(report.other_runs))} (pgtls fleet report --run RUN)</p>"
        if report.other_runs
        else ""
    )
    meta = (
        f"playbook <b>{esc(report.playbook)}</b>, run <code>{esc(report.run)}</code>"
        f", started {esc(report.started_utc or '?')}"
        f", max_fail_percentage {esc(report.max_fail_percentage)}"
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>pgtls fleet report: {esc(report.change_id)}</title></head>"
        "<body style='font-family:system-ui,sans-serif;margin:24px'>"
        f"<h1 style='font-size:20px'>Change {esc(report.change_id)} across the fleet</h1>"
        f"<p>{meta}</p>"
        f'<div style="{BOX}border-left:6px solid {colour};">{esc(text)}</div>'
        f'<table style="{TABLE}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
        f"<p style='color:{MUTED}'>A host <i>not reached</i> was in the play but the waves "
        "stopped before it (max_fail_percentage) or it could not be contacted; nothing ran "
        "there in this run. Each record link opens that host's record as the runbook wrote "
        "it.</p>" + others + "</body></html>\n"
    )


def fleet_text(report: FleetReport) -> str:
    """The same for a terminal."""
    text, _ = _headline(report)
    lines = [f"pgtls fleet report: change {report.change_id}, run {report.run}", text]
    for row in report.rows:
        wave = f"wave {row.wave}" if row.wave is not None else "      "
        line = f"  {row.host:<16} {wave:<7} {row.outcome:<15}"
        if row.failed_step:
            line += f" {row.failed_step}: {row.reason or ''}"
        elif row.outcome == "not due" and row.reason:
            line += f" {row.reason}"
        elif row.checks_total:
            line += f" {_checks(row)} checks"
        if row.days_left is not None:
            line += f", {row.days_left} days left"
        lines.append(line.rstrip())
    return "\n".join(lines)
