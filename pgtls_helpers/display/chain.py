"""Step 2's evidence: the CA's files, the inspection table, the chain picture, the validity
timeline, key match, host coverage and findings.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from pgtls_helpers.runbook.params import Params

if TYPE_CHECKING:
    from pgtls_helpers.runbook.ca_response import CaResponseResult
from pgtls_helpers.display.html import (
    BAD,
    CELL,
    INFO,
    MUTED,
    OK,
    ROLE_COLOURS,
    TABLE,
    WARN,
    Rendered,
    banner,
    esc,
    heading,
    join,
    plain,
    show_now,
    table,
)

# --------------------------------------------------------------------------- step 2


def show_sources(ca: CaResponseResult, params: Params | None = None) -> Rendered:
    """The files read, the bundle written, and notes about anything set aside; with
    ``ca_mode: lab``, first which CA that was (the notebook's text speaks of any CA, and the
    record of a real change shows only what happened in it)."""
    rows = [{"read": s} for s in ca.sources]
    parts = [lab_note(ca)] if params is not None and params.ca_mode == "lab" else []
    parts += [
        heading("Files read from the CA's response:"),
        table(rows, mono=("read",)),
        heading("Written to the work directory:"),
        table(
            [
                {"file": str(ca.bundle_path), "holds": "server.crt: leaf + intermediates"},
                *(
                    [{"file": str(ca.root_path), "holds": "root.crt: the root, for clients"}]
                    if ca.root_path
                    else []
                ),
            ],
            mono=("file",),
        ),
    ]
    if ca.notes:
        parts += [heading("Set aside:"), table([{"note": n} for n in ca.notes])]
    return join(*parts)


def lab_note(ca: CaResponseResult) -> Rendered:
    """What ``ca_mode: lab`` did in step 2: the throwaway CA signed the CSR, then its files were
    read like any CA's."""
    signers = " → ".join(_cn(c) for c in reversed(ca.chain.path[1:])) or "its root"
    return banner(
        f"Lab mode: the throwaway CA ({signers}) signed the CSR of step 1 and handed back its "
        "files the way a real CA would; they are read and checked below like any CA's. A real "
        "change reads the files listed in ca_files instead.",
        INFO,
        "Lab CA",
    )


def inspection_table(ca: CaResponseResult) -> Rendered:
    """The chain inspection table: one column per certificate, leaf first, unused ones last."""
    from pgtls_helpers.pki.chain import inspection_table as frame_of
    from pgtls_helpers.pki.csr import format_name

    frame = frame_of(ca.chain).astype(object)
    certs = frame.where(frame.notna(), None).to_dict("records")
    # the names as people write them (emailAddress, not 1.2.840.113549.1.9.1)
    for row, cert in zip(certs, [*ca.chain.path, *ca.chain.unused], strict=True):
        row["subject"], row["issuer"] = format_name(cert.subject), format_name(cert.issuer)
    fields = [
        ("subject", "subject"),
        ("issuer", "issuer"),
        ("not_before", "not before"),
        ("not_after", "not after"),
        ("days_left", "days left"),
        ("key", "key"),
        ("signature_algorithm", "signature"),
        ("sans", "alternative names"),
        ("serial", "serial"),
        ("ski", "subject key id"),
        ("aki", "authority key id"),
        ("sha256", "sha256"),
    ]
    mono = {"serial", "ski", "aki", "sha256"}
    heads = [f"{'' if c['position'] is None else c['position']} {c['role']}".strip() for c in certs]
    head = f'<th style="{CELL}background:#f2f4f7"></th>' + "".join(
        f'<th style="{CELL}background:#f2f4f7;color:{_role_colour(c)}">{esc(h)}</th>'
        for h, c in zip(heads, certs, strict=True)
    )
    body = []
    for key, label in fields:
        cells = []
        for c in certs:
            value = c.get(key)
            style = (
                "font-family:monospace;font-size:11px;word-break:break-all;"
                if key in mono
                else "overflow-wrap:anywhere;"
            )
            if key == "days_left" and isinstance(value, int) and value < 0:
                style += f"color:{BAD};font-weight:600;"
            cells.append(f'<td style="{CELL}{style}">{esc(plain(value))}</td>')
        body.append(
            # a label may wrap: kept on one line, a squeezed column let it run into its value
            f'<tr><th style="{CELL}background:#f9fafb">{esc(label)}</th>{"".join(cells)}</tr>'
        )
    text = "\n\n".join(
        "\n".join([h] + [f"  {label}: {plain(c.get(k))}" for k, label in fields])
        for h, c in zip(heads, certs, strict=True)
    )
    return Rendered(
        f'<table style="{TABLE}table-layout:fixed;width:100%">'
        f'<colgroup><col style="width:130px">' + "".join("<col>" for _ in certs) + "</colgroup>"
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>",
        text,
    )


def _role_colour(row: Mapping[str, Any]) -> str:
    return ROLE_COLOURS.get(str(row.get("role", "")).split(" ")[0], MUTED)


def _cn(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else cert.subject.rfc4514_string()


def chain_picture(ca: CaResponseResult) -> Rendered:
    """The order as a picture: root → intermediates → leaf, with what is missing or unused."""
    chain = ca.chain
    nodes: list[tuple[str, str, str, bool]] = []  # label, role, detail, missing
    if chain.missing_issuer is not None:
        nodes.append((chain.missing_issuer.rfc4514_string(), "missing", "not in the files", True))
    for cert, role in reversed(list(zip(chain.path, chain.roles, strict=True))):
        nodes.append((_cn(cert), role, f"until {cert.not_valid_after_utc:%Y-%m-%d}", False))
    boxes = []
    for i, (label, role, detail, missing) in enumerate(nodes):
        colour = BAD if missing else ROLE_COLOURS.get(role, MUTED)
        border = "dashed" if missing else "solid"
        boxes.append(
            f'<div style="display:inline-block;border:2px {border} {colour};border-radius:8px;'
            f'padding:6px 10px;margin:4px;min-width:120px;text-align:center">'
            f'<div style="font-size:11px;color:{colour};text-transform:uppercase">{esc(role)}'
            f'</div><div style="font-weight:600">{esc(label)}</div>'
            f'<div style="font-size:11px;color:{MUTED}">{esc(detail)}</div></div>'
        )
        if i < len(nodes) - 1:
            boxes.append(f'<span style="font-size:20px;color:{MUTED}">&#8594;</span>')
    unused = ""
    if chain.unused:
        names = ", ".join(_cn(c) for c in chain.unused)
        unused = (
            f'<div style="color:{MUTED};font-size:12px">not part of the chain: {esc(names)}</div>'
        )
    text = " -> ".join(f"[missing {n[0]}]" if n[3] else f"{n[0]} ({n[1]})" for n in nodes)
    if chain.unused:
        text += "\nnot part of the chain: " + ", ".join(_cn(c) for c in chain.unused)
    return Rendered(f'<div style="margin:6px 0">{"".join(boxes)}</div>{unused}', text)


def validity_timeline(
    ca: CaResponseResult, *, now: datetime | None = None, soon_days: int = 30
) -> Rendered:
    """Each certificate's validity as a bar on one time axis, with today marked (inline SVG)."""
    at = now or datetime.now(timezone.utc)
    certs = list(zip(ca.chain.path, ca.chain.roles, strict=True)) + [
        (c, "unused") for c in ca.chain.unused
    ]
    if not certs:
        return Rendered("", "")
    starts = [c.not_valid_before_utc for c, _ in certs] + [at]
    ends = [c.not_valid_after_utc for c, _ in certs] + [at]
    lo, hi = min(starts), max(ends)
    span = max((hi - lo).total_seconds(), 86400.0)
    lo -= timedelta(seconds=span * 0.02)
    hi += timedelta(seconds=span * 0.02)
    span = (hi - lo).total_seconds()
    label_w, plot_w, row_h, top, right = 210, 540, 24, 22, 120
    height = top + row_h * len(certs) + 26

    def x(t: datetime) -> float:
        return label_w + plot_w * (t - lo).total_seconds() / span

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + plot_w + right}" '
        f'height="{height}" font-family="sans-serif" font-size="12">'
    ]
    text_lines = []
    for i, (cert, role) in enumerate(certs):
        y = top + i * row_h
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        days = (end - at).days
        if end < at or start > at:
            colour, state = BAD, "expired" if end < at else "not yet valid"
        elif days < soon_days:
            colour, state = WARN, f"{days} days left"
        else:
            colour, state = ROLE_COLOURS.get(role, MUTED), f"{days} days left"
        label = _cn(cert)
        short = label if len(label) <= 26 else label[:25] + "…"
        parts.append(f'<text x="4" y="{y + 15}">{esc(short)}</text>')
        parts.append(
            f'<rect x="{x(start):.1f}" y="{y + 4}" width="{max(x(end) - x(start), 2):.1f}"'
            f' height="{row_h - 8}" rx="3" fill="{colour}" fill-opacity="0.75">'
            f"<title>{esc(label)} ({role}): {start:%Y-%m-%d} to {end:%Y-%m-%d}, "
            f"{esc(state)}</title></rect>"
        )
        parts.append(
            f'<text x="{x(end) + 4:.1f}" y="{y + 15}" '
            f'font-size="10" fill="{MUTED}">{esc(state)}</text>'
        )
        text_lines.append(f"{label:<28} {role:<12} {start:%Y-%m-%d} .. {end:%Y-%m-%d}  {state}")
    # the axis: a tick per year (or per month when the span is short)
    axis_y = top + row_h * len(certs) + 4
    parts.append(
        f'<line x1="{label_w}" y1="{axis_y}" x2="{label_w + plot_w}" y2="{axis_y}" '
        f'stroke="{MUTED}"/>'
    )
    for tick in _ticks(lo, hi):
        tx = x(tick)
        parts.append(
            f'<line x1="{tx:.1f}" y1="{axis_y}" x2="{tx:.1f}" y2="{axis_y + 4}" '
            f'stroke="{MUTED}"/><text x="{tx:.1f}" y="{axis_y + 16}" font-size="10" '
            f'text-anchor="middle" fill="{MUTED}">{tick:%Y-%m}</text>'
        )
    nx = x(at)
    parts.append(
        f'<line x1="{nx:.1f}" y1="{top - 6}" x2="{nx:.1f}" y2="{axis_y}" '
        f'stroke="{BAD}" stroke-dasharray="4,3"/><text x="{nx:.1f}" y="{top - 9}" '
        f'font-size="10" text-anchor="middle" fill="{BAD}">today</text>'
    )
    parts.append("</svg>")
    return Rendered(
        f'<div style="margin:6px 0">{"".join(parts)}</div>',
        f"today: {at:%Y-%m-%d}\n" + "\n".join(text_lines),
    )


def _ticks(lo: datetime, hi: datetime) -> list[datetime]:
    years = (hi - lo).days / 365.25
    step_months = 1 if years < 1 else 3 if years < 3 else 12 if years < 12 else 60
    tick = datetime(lo.year, 1, 1, tzinfo=timezone.utc)
    out = []
    while tick <= hi:
        if tick >= lo:
            out.append(tick)
        month = tick.month - 1 + step_months
        tick = tick.replace(year=tick.year + month // 12, month=month % 12 + 1)
    return out


def key_match(ca: CaResponseResult, params: Params) -> Rendered:
    """Whether the leaf belongs to this change's key (the key behind ``server.csr``)."""
    from pgtls_helpers.pki.csr import load_csr, spki_sha256

    leaf = ca.chain.leaf
    csr_path = params.work.csr
    if leaf is None:
        return banner("no leaf certificate among the files", BAD, "Key match")
    csr = load_csr(csr_path.read_bytes(), source=str(csr_path))
    want, got = spki_sha256(csr.public_key()), spki_sha256(leaf.public_key())
    mismatch = any(f.code == "key-mismatch" for f in ca.findings)
    ok = want == got and not mismatch
    rows = [
        {"public key of": "server.csr (and so server.key)", "SPKI sha256": want},
        {"public key of": f"the leaf, {_cn(leaf)}", "SPKI sha256": got},
    ]
    verdict = banner(
        "the certificate belongs to this change's private key"
        if ok
        else "the certificate was issued for another key; it cannot be used with server.key",
        OK if ok else BAD,
        "Key match",
    )
    return join(verdict, table(rows, mono=("SPKI sha256",)))


def host_coverage(ca: CaResponseResult, params: Params) -> Rendered:
    """Each host name clients use, and whether libpq's verify-full accepts the leaf for it."""
    from pgtls_helpers.pki.hostname import explain, matches_host

    leaf = ca.chain.leaf
    if leaf is None:
        return banner("no leaf certificate to check", BAD, "Host names")
    rows = [
        {
            "host": h,
            "verify-full": "accepted" if matches_host(leaf, h) else "refused",
            "why": explain(leaf, h),
        }
        for h in params.hosts
    ]
    return join(
        heading("Host names clients use, checked as libpq does with sslmode=verify-full:"),
        table(rows, colour=lambda r: BAD if r["verify-full"] == "refused" else None),
    )


def show_findings(ca: CaResponseResult) -> Rendered:
    """Every finding, worst first, with what to do about it."""
    from pgtls_helpers.pki.findings import CODES

    if not ca.findings:
        return banner(
            "no findings: the chain is complete, valid, and fits the key and host names",
            OK,
            "Findings",
        )
    rows = [
        {
            "severity": f.severity,
            "code": f.code,
            "finding": f.message,
            "what to do": CODES.get(f.code, ""),
        }
        for f in ca.findings
    ]
    colours = {"error": BAD, "warning": WARN}
    return table(rows, colour=lambda r: colours.get(str(r["severity"])))


def stop_on_errors(ca: CaResponseResult) -> Rendered:
    """Stop the runbook here (raise) when any finding is an error; else say the chain is fit."""
    from pgtls_helpers.errors import PreflightError
    from pgtls_helpers.pki.findings import reasons

    errors = [f for f in ca.findings if f.severity == "error"]
    if errors:
        show_now(
            banner(
                f"{len(errors)} error finding(s); the runbook stops here and nothing "
                "goes near the server",
                BAD,
                "Stop",
            )
        )
        raise PreflightError(f"the CA's response is not usable: {reasons(errors)}")
    return banner("no error findings: this chain may be installed (step 3)", OK, "Go")
