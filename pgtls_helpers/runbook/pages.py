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
_TAG = re.compile(r"(<[^>]*>)")


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def breakable(fragment: str) -> str:
    """HTML with a line-break opportunity after each ``/`` and every 16 hex digits of a hash,
    and none anywhere else (``word-break:break-all`` styles are turned off)."""
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
    kind = output.get("output_type")
    if kind == "stream":
        return f"<pre>{text(''.join(output.get('text', '')))}</pre>"
    if kind == "error":
        return ""  # the step's own statement says where and why it stopped
    data = output.get("data", {})
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
        tags = set(cell.get("metadata", {}).get("tags", []))
        if tags & {"parameters", "injected-parameters", "papermill-error-cell-tag"}:
            continue
        source = cell.get("source", "")
        if cell.get("cell_type") == "markdown":
            out.append(_markdown(source))
            continue
        if cell.get("cell_type") != "code" or not source.strip():
            continue
        count = cell.get("execution_count")
        label = f"In [{count}]" if count else "not run"
        out.append(f'<div class="in">{label}</div><pre>{text(source)}</pre>')
        parts = [_output_html(o) for o in cell.get("outputs", [])]
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
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


def _first(error: Mapping[str, Any]) -> str:
    ansi = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
    value = ansi.sub("", str(error.get("evalue", ""))).strip()
    return f"{error.get('ename', 'Error')}: {value}"


# --------------------------------------------------------------------------- run summary


def _sha_pair(row: Mapping[str, Any]) -> str:
    before = row.get("previous_sha256") or "(none: new file)"
    return f"{before} → {row.get('sha256') or ''}"


_ACTIONS = {"create": "created", "replace": "replaced", "unchanged": "unchanged"}


def _files_section(m: Mapping[str, Any], s3: Mapping[str, Any]) -> str:
    rows = []
    for f in m.get("files", []):
        rows.append(
            {
                "file": f.get("target"),
                "kind": f.get("kind"),
                "action": _ACTIONS.get(str(f.get("action")), f.get("action")),
                "sha256 before → after": _sha_pair(f),
                "backup": f.get("backup") or "",
            }
        )
    if rows:
        return _table(rows, ["file", "kind", "action", "sha256 before → after", "backup"])
    plan = s3.get("plan") or []
    if not plan:
        return '<p class="muted">No file was written.</p>'
    would = [
        {
            "file": r.get("file"),
            "kind": r.get("kind"),
            "would be": {"create": "created", "replace": "replaced"}.get(
                str(r.get("action")), r.get("action")
            ),
            "sha256 now → planned": f"{r.get('sha256 (current)') or '(none: new file)'} → "
            f"{r.get('sha256 (new)')}",
            "backup": f"{r.get('file')}.pgtls-backup-<stamp>"
            if r.get("action") == "replace"
            else "",
        }
        for r in plan
    ]
    return "<p>No file was written. The plan:</p>" + _table(
        would, ["file", "kind", "would be", "sha256 now → planned", "backup"]
    )


def _settings_section(m: Mapping[str, Any]) -> str:
    before = (m.get("server_before") or {}).get("settings") or {}
    after = (m.get("server_after") or {}).get("settings") or {}
    names = list(dict.fromkeys([*before, *after]))
    rows = [
        {
            "setting": n,
            "before": before.get(n, ""),
            "after": after.get(n, ""),
            "": "changed" if before.get(n) != after.get(n) else "",
        }
        for n in names
    ]
    return _table(rows, ["setting", "before", "after", ""])


def _served(state: Mapping[str, Any] | None) -> str:
    if not state:
        return "not looked at"
    if state.get("error"):
        return f"could not tell: {state['error']}"
    served = state.get("served")
    if not served:
        return "no certificate (SSL is off)"
    return (
        f"{served.get('subject')}; sha256 {served.get('sha256')}; until "
        f"{str(served.get('not_after', ''))[:10]} ({served.get('days_left')} days left)"
    )


def _checks_section(checks: Sequence[Mapping[str, Any]]) -> str:
    rows = [
        {
            "check": c.get("check"),
            "expected": c.get("expect"),
            "observed": c.get("observed"),
            "as it must be": "yes" if c.get("passed") else "NO",
            "libpq says": c.get("detail") or c.get("observed_reason"),
        }
        for c in checks
    ]
    return _table(rows, ["check", "expected", "observed", "as it must be", "libpq says"])


def _line_class(result: str) -> str:
    if result.startswith(("failed", "rollback failed")):
        return "bad"
    if result.startswith(("changed and proven", "rolled back", "no change")):
        return "ok"
    return "warn"


def run_page(m: Mapping[str, Any]) -> str:
    """``index.html`` of one run: who, where, when and the outcome in one line, then what
    changed and the proof."""
    from pgtls_helpers.runbook.record import result_line

    steps = {s.get("step"): s for s in m.get("steps", [])}
    s3 = dict((steps.get("03_install_files") or {}).get("summary") or {})
    s4 = dict((steps.get("04_enable_ssl") or {}).get("summary") or {})
    result = result_line(m)
    kind = m.get("kind", "change")
    host = m.get("host") or ""
    if m.get("host_fqdn"):
        host += f" ({m['host_fqdn']})"
    title = f"{m.get('change_id')} · {kind} · {str(m.get('started_utc', ''))[:19]}"
    out = [
        '<nav><a href="../index.html">all runs of this change</a>'
        '<a href="manifest.json">manifest.json</a></nav>',
        f"<h1>{esc(title)}</h1>",
        f'<p class="line {_line_class(result)}" id="summary">'
        f"change <b>{esc(m.get('change_id'))}</b> on <b>{esc(m.get('server'))}</b> · "
        f"operator {esc(m.get('operator'))} on {esc(host)} · "
        f"{esc(m.get('started_utc'))} · <b>{esc(result)}</b></p>",
    ]
    if m.get("error"):
        out.append(f'<p class="line bad" id="error">{text(m["error"])}</p>')
    if m.get("in_place"):
        out.append("<h2>In place now</h2><ul>")
        out += [f"<li>{text(x)}</li>" for x in m["in_place"]]
        out.append("</ul>")
    if kind == "rollback":
        out += _rollback_body(m)
    else:
        out += _change_body(m, s3, s4)
    if m.get("rollback_command"):
        out.append(
            "<h2>Rollback</h2><p>To back this change out, run:</p>"
            f'<pre id="rollback">{text(m["rollback_command"])}</pre>'
        )
    links = "".join(
        f'<li><a href="{esc(s["html"])}">step {esc(str(s["step"])[:2].lstrip("0"))} · '
        f"{esc(s.get('title'))}</a> ({esc(s.get('status'))})</li>"
        if s.get("html")
        else f"<li>step {esc(str(s['step'])[:2].lstrip('0'))} · {esc(s.get('title'))} "
        f"({esc(s.get('status'))}{': ' + esc(s['note']) if s.get('note') else ''})</li>"
        for s in m.get("steps", [])
    )
    if links:
        out.append(f"<h2>Steps</h2><ul>{links}</ul>")
    out.append(
        '<p class="muted">Every file of this record is hashed in '
        '<a href="manifest.json">manifest.json</a>, with parameters (secrets redacted), '
        "versions and each step's status.</p>"
    )
    return _page(title, "".join(out))


def _change_body(m: Mapping[str, Any], s3: Mapping[str, Any], s4: Mapping[str, Any]) -> list[str]:
    out = ["<h2>Files</h2>", _files_section(m, s3)]
    out += ["<h2>Settings before → after</h2>", _settings_section(m)]
    planned = [x for x in s4.get("messages", []) if str(x).startswith("ALTER SYSTEM")]
    if planned and not s4.get("changed"):
        out.append("<p>Planned, not run:</p><ul>")
        out += [f"<li><code>{text(x)}</code></li>" for x in planned]
        out.append("</ul>")
    if s4.get("hba_diff"):
        verb = "" if s4.get("changed") else " (planned, not written)"
        out += [f"<h2>pg_hba.conf{verb}</h2>", _diff(str(s4["hba_diff"]))]
        if s4.get("changed") or not m.get("apply"):
            out.append(
                '<p class="muted">Unix-socket (<code>local</code>) lines are not affected: '
                "only TCP connections are turned away when they do not use SSL.</p>"
            )
    sessions = m.get("sessions_refused")
    if sessions is not None:
        out.append("<h2>Sessions the new pg_hba.conf would refuse</h2>")
        out.append(
            _table(sessions, ["user", "database", "client_addr", "application_name", "line"])
            if sessions
            else '<p class="muted">None: no session connected over TCP without SSL when '
            "the plan was made.</p>"
        )
    out += [
        "<h2>Certificate served</h2>",
        _table(
            [
                {"when": "before", "certificate": _served(m.get("server_before"))},
                {"when": "after", "certificate": _served(m.get("server_after"))},
            ],
            ["when", "certificate"],
        ),
    ]
    if m.get("checks"):
        out += ["<h2>Connection checks</h2>", _checks_section(m["checks"])]
    if m.get("verdict"):
        cls = "ok" if m["verdict"] == "pass" else "bad"
        out.append(f'<p class="line {cls}" id="verdict">verdict: {esc(m["verdict"])}</p>')
    return out


def _rollback_body(m: Mapping[str, Any]) -> list[str]:
    rows = [
        {"file": f.get("target"), "what": f.get("what"), "from backup": f.get("backup") or ""}
        for f in m.get("files", [])
    ]
    settings = [
        {"setting": k, "back to": v if v is not None else "(its postgresql.conf value)"}
        for k, v in (m.get("settings") or {}).items()
    ]
    verb = "would be" if m.get("dry_run") else "were"
    return [
        f"<h2>Files that {verb} put back</h2>",
        _table(rows, ["file", "what", "from backup"]),
        f"<h2>Settings that {verb} reset (ALTER SYSTEM)</h2>",
        _table(settings, ["setting", "back to"]),
        "<h2>Certificate served</h2>",
        _table(
            [
                {"when": "before", "certificate": _served(m.get("server_before"))},
                {"when": "after", "certificate": _served(m.get("server_after"))},
            ],
            ["when", "certificate"],
        ),
    ]


# --------------------------------------------------------------------------- change index


def change_page(change_id: str, runs: Iterable[tuple[str, Mapping[str, Any]]]) -> str:
    """``records/<change_id>/index.html``: every run, newest first, with its outcome."""
    from pgtls_helpers.runbook.record import result_line

    runs = list(runs)
    rows = []
    proven = next(
        (
            (name, m)
            for name, m in runs
            if m.get("kind", "change") == "change" and m.get("verdict") == "pass"
        ),
        None,
    )
    newest = runs[0] if runs else None
    head = []
    if newest is not None:
        head.append(
            f'<p class="line {_line_class(result_line(newest[1]))}" id="now">newest run: '
            f'<a href="{esc(newest[0])}/index.html">{esc(newest[0])}</a>, '
            f"{esc(result_line(newest[1]))}</p>"
        )
    if proven is not None:
        head.append(
            f'<p id="proven">last proven by step 5: <a href="{esc(proven[0])}/index.html">'
            f"{esc(proven[0])}</a> ({esc(result_line(proven[1]))})</p>"
        )
    for name, m in runs:
        result = result_line(m) if "steps" in m or "kind" in m else str(m.get("outcome"))
        when = m.get("started_utc") or name
        try:
            when = datetime.fromisoformat(str(when)).strftime("%Y-%m-%d %H:%M:%S UTC")
        except ValueError:
            pass
        rows.append(
            f'<tr><td><a href="{esc(name)}/index.html">{esc(when)}</a></td>'
            f"<td>{esc(m.get('kind', 'change'))}</td>"
            f"<td>{esc(_mode(m))}</td>"
            f'<td class="{_line_class(result)}">{esc(result)}</td>'
            f"<td>{esc(m.get('operator', ''))}</td></tr>"
        )
    body = (
        f"<h1>{esc(change_id)}: every run</h1>{''.join(head)}<p>Newest first. Each run's "
        "record is written "
        "once; this list is rewritten after each run.</p>"
        "<table><thead><tr><th>started</th><th>kind</th><th>mode</th><th>result</th>"
        f"<th>operator</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
    return _page(f"{change_id} · all runs", body)


def _mode(m: Mapping[str, Any]) -> str:
    if m.get("kind") == "rollback":
        return "dry run" if m.get("dry_run") else "rollback"
    if m.get("outcome") == "waiting-for-ca":
        return "phase 1 (CSR)"
    return "apply" if m.get("apply") else "plan"
