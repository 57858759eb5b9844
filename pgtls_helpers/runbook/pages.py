"""The record's HTML: a page per step, a summary page per run, an index per change.

Every page is one self-contained file: a few hundred bytes of CSS of its own, pictures inline,
no script, nothing fetched from anywhere, so it reads the same offline, attached to a ticket,
or printed. Long paths and hashes break only at their separators (``/``, or every 16 hex
digits), never mid-word.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from pgtls_helpers.errors import is_refusal
from pgtls_helpers.runbook.manifest import Check, ClientsUsed, Manifest, ServerState

__all__ = ["change_page", "run_page", "step_page"]

_CSS = """\
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;color:#101828;\
max-width:1100px;margin:16px auto;padding:0 16px}
h1{font-size:20px;margin:6px 0}h2{font-size:16px;margin:20px 0 6px;\
border-bottom:1px solid #eaecf0}
table{border-collapse:collapse;font-size:13px;margin:4px 0}
th,td{border:1px solid #d0d5dd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f2f4f7}
pre,code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
pre{background:#f9fafb;border:1px solid #eaecf0;border-radius:6px;padding:8px;\
white-space:pre-wrap;word-break:normal;overflow-wrap:normal}
td,pre,li{word-break:normal;overflow-wrap:normal}
.ok{color:#1a7f37}.bad{color:#b42318}.warn{color:#b54708}.muted{color:#667085}
.line{font-size:15px;padding:8px 12px;border:1px solid #d0d5dd;border-radius:6px;\
border-left:6px solid #667085}
.line.ok{border-left-color:#1a7f37;color:inherit}.line.bad{border-left-color:#b42318;\
color:inherit}.line.warn{border-left-color:#b54708;color:inherit}
.add{color:#1a7f37}.del{color:#b42318}
.in{color:#667085;font-size:11px;margin-top:12px}
.out{margin:4px 0 4px 12px}
nav a{margin-right:12px}
"""

_HEX = re.compile(r"[0-9a-fA-F]{32,}")
# a key identifier or fingerprint written in bytes: ab:cd:ef:... (more than 16 hex digits)
_HEX_BYTES = re.compile(r"(?:[0-9a-fA-F]{2}:){8,}[0-9a-fA-F]{2}")
_TAG = re.compile(r"(<[^>]*>)")


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def breakable(fragment: str) -> str:
    """HTML with a line-break opportunity after each ``/`` and every 16 hex digits of a hash
    (``ab:cd:...`` key identifiers too, after every eighth byte), and none anywhere else
    (``word-break:break-all`` styles are turned off).

    >>> breakable("<td>00:11:22:33:44:55:66:77:88:99</td>")
    '<td>00:11:22:33:44:55:66:77:<wbr>88:99</td>'
    """
    fragment = fragment.replace("word-break:break-all", "word-break:normal").replace(
        "overflow-wrap:break-word", "overflow-wrap:normal"
    )
    parts = _TAG.split(fragment)
    in_style = False
    for i, part in enumerate(parts):
        if i % 2:  # a tag
            low = part.lower()
            if low.startswith("<style"):
                in_style = True
            elif low.startswith("</style"):
                in_style = False
            continue
        if in_style or not part:
            continue
        part = part.replace("/", "/<wbr>")
        part = _HEX_BYTES.sub(
            lambda m: "<wbr>".join(m.group(0)[j : j + 24] for j in range(0, len(m.group(0)), 24)),
            part,
        )
        parts[i] = _HEX.sub(
            lambda m: "<wbr>".join(m.group(0)[j : j + 16] for j in range(0, len(m.group(0)), 16)),
            part,
        )
    return "".join(parts)


def text(value: object) -> str:
    """Escaped, with breaks only at separators."""
    return breakable(esc(value))


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head>"
        f"<body>{body}</body></html>\n"
    )


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return '<p class="muted">(none)</p>'
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{text(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _diff(diff: str) -> str:
    lines = []
    for line in diff.splitlines():
        cls = (
            "add"
            if line.startswith("+") and not line.startswith("+++")
            else "del"
            if line.startswith("-") and not line.startswith("---")
            else ""
        )
        lines.append(f'<span class="{cls}">{text(line)}</span>' if cls else text(line))
    return "<pre>" + "\n".join(lines) + "</pre>"


# --------------------------------------------------------------------------- step pages


def _output_html(output: Mapping[str, Any]) -> str:
    # the fields nbformat 4 requires of each output type are read as required
    kind = output["output_type"]
    if kind == "stream":
        return f"<pre>{text(''.join(output['text']))}</pre>"
    if kind == "error":
        if is_refusal(output["traceback"], output["evalue"]):
            return ""  # the step's own statement says where and why it stopped
        # a real bug: its traceback is the evidence
        traceback = _ANSI.sub("", "\n".join(output["traceback"]))
        return f"<pre>{text(traceback)}</pre>"
    data = output["data"]
    if "text/html" in data:
        fragment = "".join(data["text/html"])
        fragment = re.sub(r"(?is)<script\b.*?</script>", "", fragment)
        return breakable(fragment)
    if "image/svg+xml" in data:
        return "".join(data["image/svg+xml"])
    for mime in ("image/png", "image/jpeg"):
        if mime in data:
            b64 = "".join(data[mime]).replace("\n", "")
            base64.b64decode(b64, validate=True)  # only well-formed pictures go inline
            return f'<img alt="" src="data:{mime};base64,{b64}">'
    if "text/plain" in data:
        return f"<pre>{text(''.join(data['text/plain']))}</pre>"
    return ""


_MARKDOWN: Any = None


def _markdown(source: str) -> str:
    """The runbook's own text (trusted), as Jupyter shows it: tables, code, links."""
    global _MARKDOWN
    if _MARKDOWN is None:
        import mistune

        _MARKDOWN = mistune.create_markdown(escape=False, plugins=["table", "strikethrough"])
    return breakable(str(_MARKDOWN(source)))


def step_page(
    nb: Any,
    *,
    change_id: str,
    number: int,
    title: str,
    statement: str,
    failed: bool,
) -> str:
    """A reviewer's page of one executed notebook: the runbook's text, what ran and what it
    showed. The notebook's default parameters cell is left out (its values are examples, not
    the change's); the injected values appear once, in the step's own parameters table."""
    page_title = f"{change_id} · step {number} · {title}"
    out = [
        '<nav><a href="index.html">run summary</a><a href="manifest.json">manifest.json</a>'
        f'<a href="{esc(_ipynb_name(nb, number))}">notebook</a></nav>',
        f"<h1>{esc(page_title)}</h1>",
        f'<p class="line {"bad" if failed else "ok"}">{text(statement)}</p>',
    ]
    stopped = False
    for cell in nb.cells:
        tags = set(cell["metadata"].get("tags", []))
        if tags & {"parameters", "injected-parameters", "papermill-error-cell-tag"}:
            continue
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            out.append(_markdown(source))
            continue
        if cell["cell_type"] != "code" or not source.strip():
            continue
        count = cell["execution_count"]
        label = f"In [{count}]" if count else "not run"
        out.append(f'<div class="in">{label}</div><pre>{text(source)}</pre>')
        parts = [_output_html(o) for o in cell["outputs"]]
        errors = [o for o in cell["outputs"] if o["output_type"] == "error"]
        if any(parts):
            out.append('<div class="out">' + "".join(p for p in parts if p) + "</div>")
        if errors and not stopped:
            stopped = True
            e = errors[0]
            out.append(f'<p class="line bad">The step stopped here: {text(_first(e))}</p>')
    return _page(page_title, "".join(out))


def _ipynb_name(nb: Any, number: int) -> str:
    name = nb.metadata.get("papermill", {}).get("output_path") or ""
    return name.rsplit("/", 1)[-1] or f"step {number}.ipynb"


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _first(error: Mapping[str, Any]) -> str:
    """A refusal's sentence; for a real bug, the class too (its traceback follows)."""
    value = _ANSI.sub("", str(error["evalue"])).strip()
    if is_refusal(error["traceback"], str(error["evalue"])):
        return value
    return f"an unexpected error ({error['ename']}: {value})"


# --------------------------------------------------------------------------- run summary


def _table_of(rows: Sequence[Sequence[object]], columns: Sequence[str]) -> str:
    return _table([dict(zip(columns, r, strict=True)) for r in rows], columns)


_ACTIONS = {"create": "created", "replace": "replaced", "unchanged": "unchanged"}


def _files_section(m: Manifest) -> str:
    if m.files:
        return _table_of(
            [
                (
                    f.target,
                    f.kind,
                    _ACTIONS.get(f.action, f.action),
                    f"{f.previous_sha256 or '(none: new file)'} → {f.sha256}",
                    f.backup or "",
                )
                for f in m.files
            ],
            ["file", "kind", "action", "sha256 before → after", "backup"],
        )
    if not m.planned_files:
        return '<p class="muted">No file was written.</p>'
    return "<p>No file was written. The plan:</p>" + _table_of(
        [
            (
                p.target,
                p.kind + (f" of {p.user}" if p.user else ""),
                {"create": "created", "replace": "replaced"}.get(p.action, p.action),
                f"{p.current_sha256 or '(none: new file)'} → {p.sha256}",
                f"{p.target}.pgtls-backup-<stamp>" if p.action == "replace" else "",
            )
            for p in m.planned_files
        ],
        ["file", "kind", "would be", "sha256 now → planned", "backup"],
    )


def _settings_section(m: Manifest) -> str:
    if m.settings_applied:
        head = "<h2>Settings before → after</h2>"
        columns = ["setting", "before", "after", ""]
        mark = "changed"
    else:
        head = "<h2>Settings now → planned (not applied)</h2>"
        columns = ["setting", "now", "planned", ""]
        mark = "would change"
    rows = [(s.name, s.before or "", s.after or "", mark if s.changes else "") for s in m.settings]
    return head + _table_of(rows, columns)


def _served(state: ServerState | None) -> str:
    if state is None:
        return "not looked at"
    if state.error:
        return f"could not tell: {state.error}"
    served = state.served
    if served is None:
        return "no certificate (SSL is off)"
    return (
        f"{served.subject}; sha256 {served.sha256}; until {served.not_after[:10]} "
        f"({served.days_left} days left)"
    )


def _served_section(m: Manifest) -> str:
    return "<h2>Certificate served</h2>" + _table_of(
        [("before", _served(m.server_before)), ("after", _served(m.server_after))],
        ["when", "certificate"],
    )


def _certificate_section(m: Manifest) -> str:
    leaf = m.leaf
    if leaf is None:
        return ""
    if m.apply and m.written and m.outcome != "failed":
        head = "Certificate installed"
    else:
        head = "Certificate to be installed"
    rows = [
        ("subject", leaf.subject),
        ("names (subjectAltName)", ", ".join(leaf.names) or "(none)"),
        ("issuer", leaf.issuer),
        ("not after", leaf.not_after),
        ("sha256", leaf.sha256),
        ("chain", " → ".join(c.role for c in m.certificates)),
    ]
    if m.verifier:
        rows.append(("trust verdict by", m.verifier))
    if m.signed_by:
        rows.append(("signed by", f"{m.signed_by} ({m.ca_reference or 'no reference'})"))
    return f'<h2 id="certificate">{head}</h2>' + _table_of(rows, ["", "value"])


def _renewal_section(m: Manifest) -> str:
    r = m.renewal
    if r is None:
        return ""
    rows: list[tuple[str, str]] = [
        ("kind", r.kind),
        ("root served before", r.served_root or ""),
        ("root served after", r.new_root or ""),
    ]
    if r.names_added:
        rows.append(("names added", ", ".join(r.names_added)))
    if r.names_dropped:
        rows.append(("names dropped", ", ".join(r.names_dropped)))
    if r.loop is not None:
        rows.append(
            (
                "verify-full client through the reload",
                f"{r.loop.connections} connections, {r.loop.failed} failed "
                f"({r.loop.seconds:.1f} s)",
            )
        )
    elif m.apply and m.outcome != "failed":
        rows.append(("verify-full client through the reload", "not run (no client trusted it)"))
    return f'<h2 id="renewal">Renewal: {esc(r.kind)}</h2>' + _table_of(rows, ["", "value"])


def _checks_section(checks: Sequence[Check]) -> str:
    return _table_of(
        [(c.check, c.expect, c.observed, "yes" if c.passed else "NO", c.detail) for c in checks],
        ["check", "expected", "observed", "as it must be", "libpq says"],
    )


def _line_class(result: str) -> str:
    if result.startswith(("failed", "rollback failed", "interrupted", "unreadable")):
        return "bad"
    if result.startswith(("changed and proven", "rolled back", "no change", "nothing to roll")):
        return "ok"
    return "warn"


def run_page(m: Manifest) -> str:
    """``index.html`` of one run: who, where, when and the outcome in one line, then what
    changed (or would change) and the proof."""
    result = m.result
    host = m.host + (f" ({m.host_fqdn})" if m.host_fqdn else "")
    title = f"{m.change_id} · {m.kind} · {(m.started_utc or '')[:19]}"
    out = [
        '<nav><a href="../index.html">all runs of this change</a>'
        '<a href="manifest.json">manifest.json</a></nav>',
        f"<h1>{esc(title)}</h1>",
        f'<p class="line {_line_class(result)}" id="summary">'
        f"change <b>{esc(m.change_id)}</b> on <b>{esc(m.server)}</b> · "
        f"operator {esc(m.operator)} on {esc(host)} · "
        f"{esc(m.started_utc)} · <b>{esc(result)}</b></p>",
    ]
    if m.interactive:
        out.append(f'<p class="line warn" id="interactive">{text(m.interactive)}</p>')
    if m.lab is not None:
        out.append(
            f'<p class="muted" id="lab">On a throwaway lab cluster (port {esc(m.lab.port)}) '
            "and a throwaway CA, both removed after the run.</p>"
        )
    if m.error:
        out.append(f'<p class="line bad" id="error">{text(m.error)}</p>')
    if m.in_place:
        out.append("<h2>In place now</h2><ul>")
        out += [f"<li>{text(x)}</li>" for x in m.in_place]
        out.append("</ul>")
    if m.kind == "rollback":
        out += _rollback_body(m)
    elif m.kind == "trust":
        out += _trust_body(m)
    elif m.kind == "clients":
        out += _clients_body(m)
    else:
        out += _change_body(m)
    if m.rollback_command:
        out.append(
            "<h2>Rollback</h2><p>To back this change out, run:</p>"
            f'<pre id="rollback">{text(m.rollback_command)}</pre>'
        )
    links = "".join(
        f'<li><a href="{esc(s.html)}">step {esc(s.number)} · {esc(s.title)}</a> '
        f"({esc(s.status)})</li>"
        if s.html
        else f"<li>step {esc(s.number)} · {esc(s.title)} "
        f"({esc(s.status)}{': ' + esc(s.note) if s.note else ''})</li>"
        for s in m.steps
    )
    if links:
        out.append(f"<h2>Steps</h2><ul>{links}</ul>")
    out.append(
        '<p class="muted" id="format">Every file of this record is hashed in '
        '<a href="manifest.json">manifest.json</a> (record format '
        f"{esc(m.format)}), with parameters (secrets redacted), versions and each step's "
        "status.</p>"
    )
    return _page(title, "".join(out))


def _change_body(m: Manifest) -> list[str]:
    out = [_certificate_section(m), _renewal_section(m)]
    out += ["<h2>Files</h2>", _files_section(m), _settings_section(m)]
    if m.hba_diff:
        if m.hba_written:
            head = "pg_hba.conf (written)"
        elif m.apply and m.outcome != "failed" and not m.hba_added:
            head = ""
        else:
            head = "pg_hba.conf (planned, not written)"
        if head:
            out += [f"<h2>{head}</h2>", _diff(m.hba_diff)]
            out.append(
                '<p class="muted">Unix-socket (<code>local</code>) lines are not affected: '
                "only TCP connections are turned away when they do not use SSL.</p>"
            )
    if m.sessions_refused is not None:
        out.append("<h2>Sessions the new pg_hba.conf would refuse</h2>")
        out.append(
            _table_of(
                [
                    (r.user, r.database, r.client_addr, r.application_name, r.line)
                    for r in m.sessions_refused
                ],
                ["user", "database", "client_addr", "application_name", "line"],
            )
            if m.sessions_refused
            else '<p class="muted">None: no session connected over TCP without SSL when '
            "the plan was made.</p>"
        )
    out.append(_served_section(m))
    out += _proof(m)
    return out


def _clients_used_section(used: ClientsUsed | None) -> list[str]:
    """The clients and pg_ident.conf lines the steps used, and where they came from."""
    if used is None:
        return []
    cls = "warn" if used.differs else "muted"
    out = [
        '<h2 id="clients-used">Clients and pg_ident.conf lines used</h2>',
        f'<p class="{cls}" id="clients-source">{text(used.source)}</p>',
        _table_of(
            [(c.os_user, c.role, c.subject) for c in used.clients],
            ["OS user", "role", "subject asked for"],
        ),
        _table_of(
            [(i.map, i.system_user, i.role) for i in used.ident_maps],
            ["map", "system_user", "role"],
        ),
    ]
    if used.parameters_said:
        out.append(
            f'<p class="muted" id="clients-not-used">Not used: {text(used.parameters_said)}.</p>'
        )
    return out


def _clients_body(m: Manifest) -> list[str]:
    out = _clients_used_section(m.clients_used)
    out.append('<h2 id="clients">Client certificates</h2>')
    out.append(
        _table_of(
            [
                (c.os_user, c.role, c.hba_dn, c.stat_ssl_dn, c.issuer, c.not_after[:10], c.serial)
                for c in m.client_certificates
            ],
            ["OS user", "role", "DN (as a map matches it)", "pg_stat_ssl.client_dn", "issuer"]
            + ["until", "serial"],
        )
    )
    out.append(_renewal_section(m))
    if m.client_crls:
        files = {c.file for c in m.client_crls}
        done = any(f.target in files and f.written for f in m.written)
        state = "installed" if done else "planned, not written"
        out.append(f"<h2>CRLs in ssl_crl_file ({state})</h2>")
        out.append(
            _table_of(
                [
                    (c.issuer, c.last_update[:16], (c.next_update or "")[:16], c.revoked, c.file)
                    for c in m.client_crls
                ],
                ["issuer", "thisUpdate", "nextUpdate", "revoked", "file"],
            )
        )
    if m.trust_removed:
        out.append("<h2>Client roots retired from ssl_ca_file</h2><ul>")
        out += [f"<li>{text(r)}</li>" for r in m.trust_removed]
        out.append("</ul>")
    out += ["<h2>Files</h2>", _files_section(m), _settings_section(m)]
    for name, diff, written in (
        ("pg_hba.conf", m.hba_diff, m.hba_written),
        ("pg_ident.conf", m.ident_diff, any(f.kind == "ident" for f in m.written)),
    ):
        if diff:
            out += [
                f"<h2>{name} ({'written' if written else 'planned, not written'})</h2>",
                _diff(diff),
            ]
    out.append(_served_section(m))
    out += _proof(m)
    return out


def _trust_body(m: Manifest) -> list[str]:
    out = ["<h2>Roots added to root.crt</h2>"]
    out.append(
        _table_of(
            [(c.subject, c.not_after[:10], c.sha256) for c in m.trust_added],
            ["root", "until", "sha256"],
        )
    )
    if m.trust_removed:
        out.append("<h2>Roots removed from root.crt</h2><ul>")
        out += [f"<li>{text(r)}</li>" for r in m.trust_removed]
        out.append("</ul>")
    out += ["<h2>Files</h2>", _files_section(m)]
    out += _proof(m)
    return out


def _proof(m: Manifest) -> list[str]:
    out = []
    if m.checks:
        out += ["<h2>Connection checks</h2>", _checks_section(m.checks)]
    if m.verdict:
        cls = "ok" if m.verdict == "pass" else "bad"
        out.append(
            f'<p class="line {cls}" id="verdict">verdict: {esc(m.verdict)} '
            f"({m.checks_passed} of {len(m.checks)} connection checks as they must be)</p>"
        )
    return out


def _rollback_body(m: Manifest) -> list[str]:
    rows = [
        (
            f.target,
            f.what,
            f.backup or "",
            "" if f.done is None else "yes" if f.done else "no",
        )
        for f in m.backout
    ]
    settings = [
        (k, v if v is not None else "(its postgresql.conf value)")
        for k, v in m.reset_settings.items()
    ]
    verb = "would be" if m.dry_run else "were"
    return [
        f"<h2>Files that {verb} put back</h2>",
        _table_of(rows, ["file", "what", "from backup", "done"]),
        f"<h2>Settings that {verb} reset (ALTER SYSTEM)</h2>",
        _table_of(settings, ["setting", "back to"]),
        _served_section(m),
    ]


# --------------------------------------------------------------------------- change index


def change_page(change_id: str, runs: Iterable[tuple[str, Manifest]]) -> str:
    """``records/<change_id>/index.html``: every run, newest first, with its outcome."""
    runs = list(runs)
    rows = []
    proven = next(
        ((name, m) for name, m in runs if m.kind == "change" and m.verdict == "pass"), None
    )
    newest = runs[0] if runs else None
    head = []
    if newest is not None:
        head.append(
            f'<p class="line {_line_class(newest[1].result)}" id="now">newest run: '
            f'<a href="{esc(newest[0])}/index.html">{esc(newest[0])}</a>, '
            f"{esc(newest[1].result)}</p>"
        )
    if proven is not None:
        head.append(
            f'<p id="proven">last proven by step 5: <a href="{esc(proven[0])}/index.html">'
            f"{esc(proven[0])}</a> ({esc(proven[1].result)})</p>"
        )
    for name, m in runs:
        result = m.result if m.outcome != "unreadable manifest" else m.outcome
        when = m.started_utc or name
        try:
            when = datetime.fromisoformat(when).strftime("%Y-%m-%d %H:%M:%S UTC")
        except ValueError:
            pass
        rows.append(
            f'<tr><td><a href="{esc(name)}/index.html">{esc(when)}</a></td>'
            f"<td>{esc(m.kind)}</td>"
            f"<td>{esc(m.mode)}</td>"
            f'<td class="{_line_class(result)}">{esc(result)}</td>'
            f"<td>{esc(m.operator)}</td></tr>"
        )
    body = (
        f"<h1>{esc(change_id)}: every run</h1>{''.join(head)}<p>Newest first. Each run's "
        "record is written "
        "once; this list is rewritten after each run.</p>"
        "<table><thead><tr><th>started</th><th>kind</th><th>mode</th><th>result</th>"
        f"<th>operator</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
    return _page(f"{change_id} · all runs", body)
