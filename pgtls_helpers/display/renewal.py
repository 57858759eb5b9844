"""Renewal and CA rotation: served now against new, the reload's proof, the client-trust change."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pgtls_helpers.display.html import (
    BAD,
    OK,
    WARN,
    Rendered,
    banner,
    heading,
    join,
    table,
)

if TYPE_CHECKING:
    from pgtls_helpers.runbook.enable import EnableResult
    from pgtls_helpers.runbook.install import InstallStepResult
    from pgtls_helpers.runbook.trust import TrustResult

__all__ = ["show_renewal", "show_served", "show_trust", "show_trust_plan"]


def _finding(f: Any) -> dict[str, str]:
    return {"severity": f.severity, "code": f.code, "finding": f.message}


def _cert_rows(rows: Sequence[Mapping[str, Any]]) -> Rendered:
    shown = [
        {
            "#": i,
            "subject": r["subject"],
            "issuer": r["issuer"],
            "until": str(r["not_after"])[:10],
            "days left": r["days_left"],
            "sha256": r["sha256"],
        }
        for i, r in enumerate(rows)
    ]
    return table(shown, mono=("sha256",), nowrap=("sha256", "until"))


def show_renewal(plan: InstallStepResult) -> Rendered:
    """What the server serves now next to what it will serve, and what kind of change it is."""
    ren = plan.renewal
    if ren is None:
        return banner(
            "the server serves no TLS yet: this is a first install, not a renewal", OK, "Renewal"
        )
    colour = {"CA rotation": WARN, "no change": OK}.get(ren.kind, OK)
    what = {
        "renewal": "same root, same intermediates: clients that trust the root notice nothing",
        "renewal, intermediates change": "same root, other intermediates: the server sends "
        "them, clients that trust the root notice nothing",
        "CA rotation": "a different root: every verify-full client must trust the new root "
        "before the server serves this chain",
        "no change": "the server already serves this chain",
    }.get(
        ren.kind,
        "the server serves a certificate shared with other services, which no "
        "client verifies; it stays where it is and the settings move to the new pair",
    )
    parts = [
        banner(what, colour, ren.kind.capitalize()),
        heading("Served now (leaf first):"),
        _cert_rows(ren.served),
        heading("Will be served (leaf first):"),
        _cert_rows(ren.new),
        table(
            [
                {"": "root", "now": ren.served_root or "(not known here)", "new": ren.new_root},
                {"": "subject", "now": ren.subject_before, "new": ren.subject_after},
                {
                    "": "names",
                    "now": "dropped: " + (", ".join(ren.names_dropped) or "none"),
                    "new": "added: " + (", ".join(ren.names_added) or "none"),
                },
            ]
        ),
    ]
    if ren.clients:
        parts += [heading("Listed client OS users:"), table(ren.clients, mono=("root.crt",))]
    if ren.findings:
        parts.append(
            table(
                [
                    {"severity": f.severity, "code": f.code, "finding": f.message}
                    for f in ren.findings
                ],
                colour=lambda r: BAD if r["severity"] == "error" else None,
            )
        )
    return join(*parts)


def show_served(enabled: EnableResult | None) -> Rendered:
    """A renewal's proof: served before and after, and the verify-full client loop's count."""
    if enabled is None or not enabled.renewal:
        return Rendered("", "")
    ren = enabled.renewal
    rows = [
        {"": name, **{k: v for k, v in (ren.get(key) or {}).items() if k != "issuer"}}
        for name, key in (("before", "served_before"), ("after", "served_after"))
    ]
    parts = [heading("Served before and after the reload:"), table(rows, mono=("sha256",))]
    loop = ren.get("client_loop")
    if loop:
        good = loop["failed"] == 0
        parts.append(
            banner(
                f"{loop['connections']} verify-full connections across the reload "
                f"({loop['seconds']} s), {loop['failed']} failed"
                + ("" if good else ": " + "; ".join(loop["errors"])),
                OK if good else BAD,
                "Clients during the reload",
            )
        )
    return join(*parts)


def show_trust_plan(result: TrustResult) -> Rendered:
    """Each user's root.crt now and after, and what the server serves today."""
    parts = [
        heading("The server serves today (leaf first):"),
        _cert_rows(result.served),
        heading("Roots to add:"),
        _cert_rows(result.added),
        heading("Fingerprints to remove:"),
        table([{"sha256": fp} for fp in result.removed], mono=("sha256",)),
        heading("Each client's root.crt (backed up before it changes):"),
        table(
            result.plan,
            ["user", "file", "action", "roots before", "roots after"],
            mono=("file",),
        ),
    ]
    if result.preflight:
        parts.append(
            table(
                [
                    {"severity": f.severity, "code": f.code, "finding": f.message}
                    for f in result.preflight
                ],
                colour=lambda r: BAD if r["severity"] == "error" else None,
            )
        )
    return join(*parts)


def show_trust(result: TrustResult | None) -> Rendered:
    """What was written, and psql with verify-full as each user against today's chain."""
    if result is None:
        return banner(
            "apply is false: the runbook stops at the plan; no root.crt was written. Set apply: "
            "true when the change is approved and run again.",
            WARN,
            "Plan only",
        )
    rows = [
        {
            "check": c.check,
            "observed": c.observed + ("" if c.observed == "ok" else f" ({c.observed_reason})"),
            "libpq said": c.detail,
        }
        for c in result.checks
    ]
    return join(
        table(
            result.installed.as_dicts() if result.installed else [],
            ["target", "action", "sha256", "backup"],
            mono=("target", "sha256", "backup"),
        ),
        banner(
            f"{sum(c.passed for c in result.checks)} of {len(result.checks)} client users verify "
            "the served chain with verify-full",
            OK if result.verdict == "pass" else BAD,
            f"Verdict: {result.verdict}",
        ),
        table(rows),
    )
