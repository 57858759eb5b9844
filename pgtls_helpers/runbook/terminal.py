"""What ``pgtls run``, ``pgtls trust`` and ``pgtls rollback`` say on the terminal at the end:
one screen, in the words of the record's summary page, drawn from the typed
:class:`~pgtls_helpers.runbook.manifest.Manifest`; every command in it runs as printed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pgtls_helpers.runbook.manifest import Check, Manifest
from pgtls_helpers.runbook.record import change_command

__all__ = ["failed_checks", "rollback_summary", "run_summary"]


def failed_checks(checks: Sequence[Check]) -> list[str]:
    """Each connection check that did not behave as it must, with libpq's own message."""
    return [
        f"  check failed: {c.check}: expected {c.expect}, got {c.observed}; libpq: {c.detail}"
        for c in checks
        if not c.passed
    ]


_COMMAND = {"trust": "trust", "clients": "clients"}


def run_summary(m: Manifest, record_dir: Path) -> str:
    """A screenful: the outcome first, each step, what changed or would change, the proof,
    what is in place after a failure and the exact rollback command, and the record."""
    result = m.result
    lines = [
        f"pgtls {_COMMAND.get(m.kind, 'run')}: change {m.change_id} on {m.server}, "
        f"ca_mode {m.ca_mode}, apply {str(m.apply).lower()}"
    ]
    if m.lab is not None:  # said once: nothing below points into what is gone
        both = f" and client OS user {m.lab.client_user}, both" if m.lab.client_user else ","
        lines.append(
            f"  on a throwaway lab cluster (port {m.lab.port}){both} removed after the run"
        )
    if m.clients_used is not None and m.clients_used.from_form:
        lines.append(f"  {m.clients_used.source}")
    last_note = None
    for s in m.steps:
        took = f"{s.seconds:5.1f} s" if s.status in ("ok", "failed") else ""
        lines.append(f"  {s.step[:2]} {s.title:<22} {s.status:<8} {took}".rstrip())
        if s.error:
            lines.append(f"     {s.error}")
        elif s.note and s.note != last_note:
            lines.append(f"     {s.note}")
        last_note = s.note
    lines += failed_checks(m.checks)
    if result.startswith("plan"):
        lines.append("plan only: nothing changed")
        lines += _plan_lines(m)
    elif result.startswith("no change"):
        lines.append("no change: already as planned")
    elif m.outcome == "failed":
        # the failed step's reason is printed under it; a set-up failure has no step
        named = any(s.error for s in m.steps)
        lines.append(result if named else f"{result}: {m.error}")
        if m.in_place and m.lab is None:
            lines.append("in place now:")
            lines += [f"  {x}" for x in m.in_place]
    if m.renewal is not None and m.outcome != "failed":
        lines.append(_renewal_line(m))
    if m.verdict:
        lines.append(
            f"verdict: {m.verdict} ({m.checks_passed} of {len(m.checks)} connection checks "
            "as they must be)"
        )
    leaf = m.leaf
    if m.signed_by:
        lines.append(f"signed by {m.signed_by}" + (f", {m.ca_reference}" if m.ca_reference else ""))
    if leaf and m.apply and m.outcome != "failed":
        lines.append(f"certificate: {leaf.cn}, until {leaf.not_after[:10]}, sha256 {leaf.sha256}")
    for f in m.written if m.outcome != "failed" and m.lab is None else ():  # see "in place now"
        lines.append(
            f"wrote {f.target} ({f.action}" + (f", backup {f.backup}" if f.backup else "") + ")"
        )
    if m.outcome == "waiting-for-ca":
        again = change_command(
            _COMMAND.get(m.kind, "run"),
            m.parameters_file,
            str(m.parameters["work_dir"]),
            record_dir.parent.parent,  # records/<change_id>/<stamp>
        )
        lines.append(
            f"next: send {m.csr_file} to your CA; then list the files it returns "
            f"in ca_files and run again: {again}"
        )
    if m.rollback_command and (m.changed or m.outcome == "failed"):
        lines.append(f"to roll back: {m.rollback_command}")
    lines.append(f"took {m.seconds:.1f} s; record: {record_dir / 'index.html'}")
    return "\n".join(lines)


def _renewal_line(m: Manifest) -> str:
    r = m.renewal
    assert r is not None
    line = f"{r.kind}"
    if r.loop is not None:
        line += (
            f": a verify-full client connected {r.loop.connections} times through the reload, "
            f"{r.loop.failed} failed"
        )
    return line


def _plan_lines(m: Manifest) -> list[str]:
    out = []
    for p in m.planned_files:
        if p.would_write:
            who = f" for {p.user}" if p.user else ""
            out.append(f"  would write {p.target}{who} ({p.action})")
    for s in m.settings:
        if s.changes:
            out.append(f"  would run ALTER SYSTEM SET {s.name} = '{s.after}' (now: '{s.before}')")
    if m.hba_added:
        out.append("  would add to pg_hba.conf:")
        out += [f"    {line}" for line in m.hba_added]
    refused = m.sessions_refused or ()
    if refused:
        out.append(f"  {len(refused)} session(s) connected now without SSL would be refused:")
        out += [
            f"    {r.user}@{r.database} from {r.client_addr}"
            f" ({r.application_name or 'no application name'})"
            for r in refused
        ]
    return out


def rollback_summary(m: Manifest, record_dir: Path | None) -> str:
    """What a rollback did (or, as a dry run, would do), and where its record is."""
    dry = m.dry_run
    lines = [f"pgtls rollback{' --dry-run' if dry else ''}: change {m.change_id} on {m.server}"]
    for f in m.backout:
        verb = f.what if not dry else "would be " + f.what
        lines.append(f"{verb}: {f.target}" + (f" (from {f.backup})" if f.backup else ""))
    for name, value in m.reset_settings.items():
        shown = f"'{value}'" if value is not None else "its postgresql.conf value (RESET)"
        verb = "would set" if dry else "ALTER SYSTEM:"
        lines.append(f"{verb} {name} back to {shown}")
    if dry:
        lines.append("dry run: nothing restored, nothing reloaded")
    elif m.outcome == "failed":
        lines.append(f"rollback failed: {m.error}")
    elif m.server_running is False or m.server_after is None:  # down, or a client-trust change
        lines.append(str(m.reloaded))
    else:
        after = m.server_after
        state = (after.settings.get("ssl") if after else None) or "unknown"
        served = after.served if after else None
        leaf = served.subject if served else "no certificate"
        lines.append(f"{m.reloaded or 'reloaded'}; {m.server} has ssl {state} and presents {leaf}")
    if record_dir is not None:
        lines.append(f"record: {record_dir / 'index.html'}")
    return "\n".join(lines)
