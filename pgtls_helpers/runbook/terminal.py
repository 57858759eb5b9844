"""What ``pgtls run`` and ``pgtls rollback`` say on the terminal at the end: one screen, in the
words of the record's summary page, and every command in it runs as printed."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pgtls_helpers.runbook.record import changed, result_line

__all__ = ["failed_checks", "rollback_summary", "run_summary"]


def _summary(m: Mapping[str, Any], step: str) -> dict[str, Any]:
    for s in m.get("steps", []):
        if s.get("step") == step:
            return dict(s.get("summary") or {})
    return {}


def failed_checks(checks: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each connection check that did not behave as it must, with libpq's own message."""
    return [
        f"  check failed: {c.get('check')}: expected {c.get('expect')}, got "
        f"{c.get('observed')}; libpq: {c.get('detail') or c.get('observed_reason')}"
        for c in checks
        if not c.get("passed")
    ]


def run_summary(m: Mapping[str, Any], record_dir: Path) -> str:
    """A screenful: the outcome first, each step, what changed or would change, the proof,
    what is in place after a failure and the exact rollback command, and the record."""
    result = result_line(m)
    trust = any(s.get("step") == "client_trust" for s in m.get("steps", []))
    lines = [
        f"pgtls {'trust' if trust else 'run'}: change {m['change_id']} on {m['server']}, ca_mode "
        f"{m['parameters'].get('ca_mode')}, apply {str(m['apply']).lower()}"
    ]
    if m.get("lab"):
        lines.append(
            f"  on a throwaway lab cluster (port {m['lab']['port']}), removed after the run"
        )
    last_note = None
    for s in m.get("steps", []):
        took = f"{s['seconds']:5.1f} s" if s["status"] in ("ok", "failed") else ""
        lines.append(f"  {s['step'][:2]} {s['title']:<15} {s['status']:<8} {took}".rstrip())
        if s.get("error"):
            lines.append(f"     {s['error']}")
        elif s.get("note") and s["note"] != last_note:
            lines.append(f"     {s['note']}")
        last_note = s.get("note")
    lines += failed_checks(m.get("checks", []))
    if result.startswith("plan"):
        lines.append("plan only: nothing changed")
        lines += _plan_lines(m)
    elif result.startswith("no change"):
        lines.append("no change: already as planned")
    elif m.get("outcome") == "failed":
        # the failed step's reason is printed under it; a set-up failure has no step
        named = any(s.get("error") for s in m.get("steps", []))
        lines.append(result if named else f"{result}: {m.get('error')}")
        if m.get("in_place"):
            lines.append("in place now:")
            lines += [f"  {x}" for x in m["in_place"]]
    if m.get("verdict"):
        checks = m.get("checks", [])
        good = sum(1 for c in checks if c.get("passed"))
        lines.append(
            f"verdict: {m['verdict']} ({good} of {len(checks)} connection checks as they must be)"
        )
    leaf = next((c for c in m.get("certificates", []) if c.get("role") == "leaf"), None)
    if leaf and m.get("apply") and m.get("outcome") != "failed":
        cn = re.search(r"(?:^|,)CN=((?:[^,\\]|\\.)+)", leaf["subject"])
        lines.append(
            f"certificate: {cn.group(1) if cn else leaf['subject']}, until "
            f"{leaf['not_after'][:10]}, sha256 {leaf['sha256']}"
        )
    for f in m.get("files", []) if m.get("outcome") != "failed" else []:  # see "in place now"
        if f.get("action") in ("create", "replace"):
            lines.append(
                f"wrote {f['target']} ({f['action']}"
                + (f", backup {f['backup']}" if f.get("backup") else "")
                + ")"
            )
    if m.get("outcome") == "waiting-for-ca":
        lines.append(
            f"next: send {m['csr_file']} to your CA; then list the files it returns "
            f"in ca_files and run again: pgtls run {m['parameters_file']}"
        )
    if m.get("rollback_command") and (changed(m) or m.get("outcome") == "failed"):
        lines.append(f"to roll back: {m['rollback_command']}")
    lines.append(f"took {m['seconds']:.1f} s; record: {record_dir / 'index.html'}")
    return "\n".join(lines)


def _plan_lines(m: Mapping[str, Any]) -> list[str]:
    s3 = _summary(m, "03_install_files")
    s4 = _summary(m, "04_enable_ssl")
    out = []
    for row in s3.get("plan", []):
        if row.get("action") in ("create", "replace"):
            out.append(f"  would write {row.get('file')} ({row.get('action')})")
    for msg in s4.get("messages", []):
        if msg.startswith("ALTER SYSTEM"):
            out.append(f"  would run {msg}")
    added = s4.get("hba_added") or []
    if added:
        out.append("  would add to pg_hba.conf:")
        out += [f"    {line}" for line in added]
    refused = m.get("sessions_refused") or []
    if refused:
        out.append(f"  {len(refused)} session(s) connected now without SSL would be refused:")
        out += [
            f"    {r.get('user')}@{r.get('database')} from {r.get('client_addr')}"
            f" ({r.get('application_name') or 'no application name'})"
            for r in refused
        ]
    return out


def rollback_summary(m: Mapping[str, Any], record_dir: Path | None) -> str:
    """What a rollback did (or, as a dry run, would do), and where its record is."""
    dry = bool(m.get("dry_run"))
    lines = [
        f"pgtls rollback{' --dry-run' if dry else ''}: change {m['change_id']} on {m['server']}"
    ]
    for f in m.get("files", []):
        verb = f["what"] if not dry else "would be " + f["what"]
        lines.append(
            f"{verb}: {f['target']}" + (f" (from {f['backup']})" if f.get("backup") else "")
        )
    for name, value in (m.get("settings") or {}).items():
        shown = f"'{value}'" if value is not None else "its postgresql.conf value (RESET)"
        verb = "would set" if dry else "ALTER SYSTEM:"
        lines.append(f"{verb} {name} back to {shown}")
    if dry:
        lines.append("dry run: nothing restored, nothing reloaded")
    elif m.get("outcome") == "failed":
        lines.append(f"rollback failed: {m.get('error')}")
    elif m.get("server_running") is False:
        lines.append(str(m.get("reloaded")))
    else:
        after = m.get("server_after") or {}
        state = (after.get("settings") or {}).get("ssl", "unknown")
        served = after.get("served")
        leaf = served["subject"] if served else "no certificate"
        how = str(m.get("reloaded") or "reloaded")
        lines.append(f"{how}; {m['server']} has ssl {state} and presents {leaf}")
    if record_dir is not None:
        lines.append(f"record: {record_dir / 'index.html'}")
    return "\n".join(lines)
