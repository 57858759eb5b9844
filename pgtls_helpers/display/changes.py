"""Steps 3 to 5: plans, what was installed and enabled, and the connection checks."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar

from cryptography import x509

from pgtls_helpers.errors import PgtlsError
from pgtls_helpers.runbook import interactive
from pgtls_helpers.runbook.params import Params

if TYPE_CHECKING:
    from pgtls_helpers.runbook.enable import EnableResult
    from pgtls_helpers.runbook.install import InstallStepResult
    from pgtls_helpers.runbook.verify import VerifyResult
from pgtls_helpers.display.html import (
    BAD,
    BOX,
    INFO,
    MONO,
    OK,
    WARN,
    Rendered,
    banner,
    esc,
    heading,
    join,
    show_now,
    table,
)

_T = TypeVar("_T")
# --------------------------------------------------------------------------- steps 3 and 4


def apply_step(step: Callable[[Params], _T], params: Params) -> _T | None:
    """Run a step that changes the server, when ``apply`` is true; else return None.

    In a session of ``make notebook`` against a real server the step first needs the DBA's
    confirmation (the button at the top of the notebook): before it, this refuses in one
    sentence and changes nothing; after it, the step is noted for the session's record. A
    headless run has no session and is not asked. A failure is shown as a red box before it is
    raised again, so the notebook and its record say plainly what went wrong and what was
    undone.

    Raises:
        NotConfirmed: an interactive session's server is not confirmed yet.
    """
    if not params.apply:
        return None
    interactive.require_confirmation(params)
    interactive.note_applied(params, getattr(step, "__name__", repr(step)))
    try:
        return step(params)
    except PgtlsError as exc:
        show_now(banner(str(exc), BAD, "Failed"))
        raise


def _apply_false(what: str) -> Rendered:
    return banner(
        f"apply is false: the runbook stops at the plan; {what}. Set apply: true "
        "when the change is approved and run again.",
        WARN,
        "Plan only",
    )


def show_install_plan(plan: InstallStepResult) -> Rendered:
    """Where the files go (from the server's own settings), owners, modes, and the checks."""
    facts = plan.facts
    about = [
        {"setting": k, "value": ("on" if facts.get(k) else "off") if k == "ssl" else facts.get(k)}
        for k in ("version", "data_directory", "ssl_cert_file", "ssl_key_file", "hba_file", "ssl")
    ]
    parts = [
        heading("What the server says about itself:"),
        table(about, mono=("value",)),
        heading("The plan (each replaced file is backed up first):"),
        table(
            plan.plan,
            ["file", "kind", "action", "owner", "mode", "sha256 (new)"],
            mono=("file", "sha256 (new)"),
        ),
    ]
    if plan.preflight:
        parts += [
            heading("Checks before the install:"),
            table(
                [
                    {"severity": f.severity, "code": f.code, "finding": f.message}
                    for f in plan.preflight
                ]
            ),
        ]
    else:
        parts.append(
            banner("the key matches the certificate and the chain is complete", OK, "Checks")
        )
    return join(*parts)


def show_installed(installed: InstallStepResult | None) -> Rendered:
    """What the install wrote, the backups it made, and the sha256 of each file."""
    if installed is None:
        return _apply_false("no file was written")
    rows = installed.installed.as_dicts() if installed.installed else []
    note = (
        "every file was already in place; nothing was written"
        if not installed.changed
        else "installed, nothing reloaded yet; the key was removed from the work directory, so "
        "the installed file (and the backup of a key it replaced) holds it now"
    )
    return join(
        banner(note, OK, "Install"),
        table(
            rows,
            ["target", "kind", "action", "sha256", "backup"],
            mono=("target", "sha256", "backup"),
        ),
    )


def _diff(text: str) -> Rendered:
    if not text:
        return banner("pg_hba.conf already has the rules; no change", OK, "pg_hba.conf")
    lines = []
    for line in text.splitlines():
        colour = (
            OK
            if line.startswith("+") and not line.startswith("+++")
            else BAD
            if line.startswith("-") and not line.startswith("---")
            else INFO
            if line.startswith("@@")
            else "inherit"
        )
        weight = "600" if colour in (OK, BAD) else "400"
        lines.append(f'<span style="color:{colour};font-weight:{weight}">{esc(line)}</span>')
    return Rendered(
        f'<pre style="{BOX}{MONO}background:#f9fafb">' + "\n".join(lines) + "</pre>", text
    )


def show_ssl_plan(plan: EnableResult) -> Rendered:
    """``SHOW ssl`` now, the setting to change, and the pg_hba.conf diff."""
    ssl = "on" if plan.ssl_before else "off"
    settings = [m for m in plan.messages if m.startswith("ALTER SYSTEM")]
    steps = [{"now": f"SHOW ssl → {ssl}", "planned": s} for s in settings] or [
        {"now": f"SHOW ssl → {ssl}", "planned": "no setting to change"}
    ]
    steps += [
        {
            "now": f"{len(plan.hba_added)} line(s) to add to pg_hba.conf",
            "planned": "let the server parse the planned file (pg_hba_file_rules) before "
            "anything is reloaded",
        },
        {
            "now": "",
            "planned": "pg_reload_conf(), then a TLS handshake from outside must see the new "
            "certificate and chain; undo everything if it does not",
        },
        {
            "now": "",
            "planned": "only then write pg_hba.conf (with a backup) and reload it",
        },
    ]
    parts = [table(steps), heading("pg_hba.conf, current against planned:"), _diff(plan.hba_diff)]
    parts += _sessions_refused(plan)
    if plan.presented:
        parts += [
            heading("The server presents now:"),
            _presented(plan.presented),
        ]
    return join(*parts)


def _sessions_refused(plan: EnableResult) -> list[Rendered]:
    """Who is connected now without SSL and would be turned away on the next connection."""
    local = "Unix-socket (local) lines are not affected: sessions over the socket keep working."
    if not plan.hba_added:
        return []
    if not plan.sessions_refused:
        return [
            heading("Sessions connected now:"),
            banner(
                "no session is connected over TCP without SSL, so none would be refused. " + local,
                OK,
            ),
        ]
    return [
        heading(
            f"{len(plan.sessions_refused)} session(s) connected now without SSL would be "
            "refused by the new pg_hba.conf on their next connection:"
        ),
        table(
            plan.sessions_refused,
            ["user", "database", "client_addr", "application_name", "line"],
        ),
        banner(local, INFO),
    ]


def show_enabled(enabled: EnableResult | None) -> Rendered:
    """The reload and the proof from outside: the chain the server now presents."""
    if enabled is None:
        return _apply_false("SSL and pg_hba.conf are unchanged, nothing was reloaded")
    if not enabled.changed:
        head = banner("; ".join(enabled.messages) or "nothing to change", OK, "No change")
    else:
        head = banner(
            f"ssl {'on' if enabled.ssl_after else 'off'}; a handshake from outside "
            f"({enabled.tls_version or 'TLS'}) sees the new certificate and chain; "
            f"pg_hba.conf accepted by the server and reloaded"
            + (f" ({'; '.join(enabled.messages)})" if enabled.messages else "")
            + (
                f"; the runbook's own new connection: {enabled.runbook_connection}"
                if enabled.runbook_connection
                else ""
            ),
            OK if enabled.confirmed else BAD,
            "Enabled",
        )
    return join(
        head,
        heading("The chain the server presents (leaf first):"),
        _presented(enabled.presented),
    )


def _name_text(rfc4514: str) -> str:
    """An RFC 4514 name as people write it (``emailAddress=``, not the dotted OID)."""
    from pgtls_helpers.pki.csr import format_name

    try:
        return format_name(x509.Name.from_rfc4514_string(rfc4514))
    except ValueError:
        return rfc4514


def _presented(rows: Sequence[Mapping[str, str]]) -> Rendered:
    shown = [
        {
            "#": i,
            "subject": _name_text(r["subject"]),
            "issuer": _name_text(r["issuer"]),
            "sha256": r["sha256"],
        }
        for i, r in enumerate(rows)
    ]
    return table(shown, ["#", "subject", "issuer", "sha256"], mono=("sha256",), nowrap=("sha256",))


# --------------------------------------------------------------------------- step 5


def show_checks(verify: VerifyResult) -> Rendered:
    """Every connection check: what must happen, what libpq did, and whether they agree."""
    rows = []
    for c in verify.checks:
        rows.append(
            {
                "check": c.check,
                "sslmode": c.sslmode,
                "host": c.host,
                "expected": c.expect
                + ("" if c.expect_reason == "connected" else f" ({c.expect_reason})"),
                "observed": c.observed + ("" if c.observed == "ok" else f" ({c.observed_reason})"),
                "agrees": "✓" if c.passed else "✗",
                "libpq said": c.detail if len(c.detail) <= 160 else c.detail[:157] + "…",
            }
        )
    return table(
        rows, colour=lambda r: BAD if r["agrees"] == "✗" else None, nowrap=("sslmode", "agrees")
    )


def require_pass(verify: VerifyResult, params: Params) -> Rendered:
    """The verdict; raises when it is *fail* after an applied change, so the run fails."""
    failed = [c for c in verify.checks if not c.passed]
    if verify.passed:
        return banner(
            f"all {len(verify.checks)} checks behaved as they must: the server "
            "accepts verified TLS and refuses what it should",
            OK,
            "Verdict: pass",
        )
    summary = "; ".join(
        f"{c.check}: expected {c.expect}, got {c.observed} ({c.observed_reason})" for c in failed
    )
    if not params.apply:
        return banner(
            f"plan only (apply is false), so this describes the server as it is now: {summary}",
            WARN,
            "Verdict: fail, not enforced",
        )
    show_now(banner(summary, BAD, "Verdict: fail"))
    raise PgtlsError(
        f"{len(failed)} of {len(verify.checks)} connection checks did not behave as "
        f"they must: {'; '.join(c.check for c in failed)}"
    )
