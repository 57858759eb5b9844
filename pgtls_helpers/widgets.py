"""What the runbook notebooks show: the CSR form, the tables, the chain picture, the timeline.

Every display here is a :class:`Rendered` value with an HTML and a plain-text form, so an executed
notebook reads the same in JupyterLab and in the HTML of its record. The form (ipywidgets) serves
the interactive path; the values a step actually used are always shown as a plain table too,
because a record has no live kernel to draw widgets with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cryptography import x509
from cryptography.x509.oid import NameOID

from pgtls_helpers.errors import InputError, PgtlsError
from pgtls_helpers.params import PARAMETER_NAMES, Params, load_params, redacted

if TYPE_CHECKING:
    from pgtls_helpers.runbook import (
        CaResponseResult,
        EnableResult,
        InstallStepResult,
        KeyCsrResult,
        VerifyResult,
    )

__all__ = [
    "CsrForm",
    "Rendered",
    "apply_step",
    "chain_picture",
    "csr_form",
    "host_coverage",
    "inspection_table",
    "key_match",
    "notebook_params",
    "plan_only",
    "require_pass",
    "show_checks",
    "show_enabled",
    "show_findings",
    "show_install_plan",
    "show_installed",
    "show_key_and_csr",
    "show_parameters",
    "show_sources",
    "show_ssl_plan",
    "show_values",
    "stop_on_errors",
    "validity_timeline",
]

_T = TypeVar("_T")

# Colours: one palette for every display (readable on white, and printed in grey).
_OK, _BAD, _WARN, _INFO, _MUTED = "#1a7f37", "#b42318", "#b54708", "#175cd3", "#667085"
_ROLE_COLOURS = {"root": "#6941c6", "intermediate": "#175cd3", "leaf": "#1a7f37"}
_BOX = "border:1px solid #d0d5dd;border-radius:6px;padding:8px 12px;margin:6px 0;"
_MONO = "font-family:monospace;font-size:12px;line-height:1.4;"
_TABLE = "border-collapse:collapse;font-size:13px;margin:4px 0;"
_CELL = (
    "border:1px solid #d0d5dd;padding:3px 8px;text-align:left;vertical-align:top;"
    "overflow-wrap:break-word;"
)


@dataclass(frozen=True)
class Rendered:
    """A display for a notebook: HTML for JupyterLab and the record, text for a terminal."""

    html: str
    text: str

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return self.text


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _join(*parts: Rendered) -> Rendered:
    return Rendered("".join(p.html for p in parts), "\n\n".join(p.text for p in parts if p.text))


def _banner(text: str, colour: str, title: str = "") -> Rendered:
    head = f"<b>{_e(title)}</b> " if title else ""
    return Rendered(
        f'<div style="{_BOX}border-left:6px solid {colour};">{head}{_e(text)}</div>',
        f"{title + ': ' if title else ''}{text}",
    )


def _heading(text: str) -> Rendered:
    return Rendered(f'<div style="font-weight:600;margin-top:10px">{_e(text)}</div>', text)


def _table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    colour: Callable[[Mapping[str, Any]], str | None] | None = None,
    mono: Iterable[str] = (),
    nowrap: Iterable[str] = (),
) -> Rendered:
    """A plain HTML table (no pandas needed for a handful of rows) and its text form."""
    cols = list(columns or (list(rows[0]) if rows else []))
    mono_cols, nowrap_cols = set(mono), set(nowrap)
    if not rows:
        return Rendered(f'<div style="color:{_MUTED}">(none)</div>', "(none)")
    head = "".join(f'<th style="{_CELL}background:#f2f4f7">{_e(c)}</th>' for c in cols)
    body = []
    for row in rows:
        style = f"color:{c};" if colour and (c := colour(row)) else ""
        cells = []
        for col in cols:
            font = "font-family:monospace;font-size:12px;" if col in mono_cols else ""
            if col in nowrap_cols:
                font += "white-space:nowrap;"
            elif col in mono_cols:
                font += "word-break:break-all;"
            cells.append(f'<td style="{_CELL}{font}">{_e(_plain(row.get(col)))}</td>')
        body.append(f'<tr style="{style}">{"".join(cells)}</tr>')
    widths = [max(len(c), *(len(_plain(r.get(c))) for r in rows)) for c in cols]
    widths = [min(w, 60) for w in widths]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += [
        "  ".join(_plain(r.get(c))[:60].ljust(w) for c, w in zip(cols, widths, strict=True))
        for r in rows
    ]
    return Rendered(
        f'<table style="{_TABLE}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>",
        "\n".join(lines),
    )


def _plain(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if isinstance(value, list | tuple):
        return ", ".join(_plain(v) for v in value)
    return str(value)


def _pre(text: str) -> Rendered:
    return Rendered(
        f'<pre style="{_BOX}{_MONO}background:#f9fafb;white-space:pre-wrap">{_e(text)}</pre>', text
    )


# --------------------------------------------------------------------------- parameters


def notebook_params(namespace: Mapping[str, Any]) -> Params:
    """The parameters cell's values (and papermill's injected ones) as one checked object.

    Only the runbook's parameter names are read from ``namespace`` (a notebook passes
    ``globals()``). Also makes errors print as one line (``%xmode Minimal``): the messages are
    written for people, the traceback adds nothing for them.
    """
    values = {name: namespace[name] for name in PARAMETER_NAMES if name in namespace}
    params = load_params(values, source="the parameters cell")
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:  # pragma: no cover - IPython comes with ipykernel
        shell = None
    if shell is not None:
        with contextlib.redirect_stdout(io.StringIO()):  # %xmode announces itself
            shell.run_line_magic("xmode", "Minimal")
    return params


def plan_only(params: Params) -> Params:
    """The same parameters with ``apply`` false: the step plans and writes nothing."""
    return dataclasses.replace(params, apply=False)


def _param_rows(params: Params, names: Iterable[str] | None = None) -> list[dict[str, str]]:
    values = {
        f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.name != "extra"
    }
    safe = redacted(values)
    rows = []
    for name in names or PARAMETER_NAMES:
        value = safe.get(name)
        if name == "hba_rules":
            text = "; ".join(
                " ".join(
                    str(r.get(k, "")) for k in ("type", "database", "user", "address", "method")
                )
                for r in value or ()
            )
        else:
            text = _plain(value)
        rows.append({"parameter": name, "value": text})
    return rows


def show_parameters(params: Params, names: Iterable[str] | None = None) -> Rendered:
    """The parameters this notebook runs with (names of secret variables, never values)."""
    mode = (
        "apply: the change is made"
        if params.apply
        else "apply is false: plan only, nothing on the server changes"
    )
    rows = _param_rows(params, names)
    half = (len(rows) + 1) // 2
    pairs = [
        {
            "parameter": left["parameter"],
            "value": left["value"],
            " parameter": right["parameter"] if right else "",
            " value": right["value"] if right else "",
        }
        for left, right in zip(rows[:half], [*rows[half:], None], strict=False)
    ]
    return _join(
        _banner(
            f"change {params.change_id} · {params.server_host}:{params.server_port} · {mode}",
            _OK if params.apply else _WARN,
            "Parameters",
        ),
        _table(pairs),
    )


# --------------------------------------------------------------------------- step 1: the form

_FORM_FIELDS = (
    ("common_name", "Common name (CN)", "db1.example.com"),
    ("country", "Country (C)", "US"),
    ("state", "State or province (ST)", "Pennsylvania"),
    ("locality", "Locality (L)", "Malvern"),
    ("organization", "Organization (O)", "Example Corp"),
    ("organizational_unit", "Organizational unit (OU)", "Databases"),
    ("email", "Email address", "dba@example.com"),
)
_PROBE_CN = "probe.example.com"


def _field_problem(name: str, value: str) -> str | None:
    """The form's inline check: what :func:`make_subject` says about this one field."""
    from pgtls_helpers.subject import make_subject

    try:
        if name == "common_name":
            make_subject(value)
        elif name == "subject_alt_names":
            make_subject(_PROBE_CN, sans=_lines(value))
        else:
            one: dict[str, Any] = {name: value}
            make_subject(_PROBE_CN, **one)
    except InputError as exc:
        return str(exc)
    return None


def _lines(text: str) -> list[str]:
    return [part.strip() for line in text.splitlines() for part in line.split(",") if part.strip()]


class CsrForm:
    """The CSR subject form, prefilled from the parameters; each field is checked as it is typed.

    The values are taken only when the DBA presses *Use these values*; until then (and always
    in a headless run) :attr:`params` are the notebook's parameters unchanged. Build it with
    :func:`csr_form`.
    """

    def __init__(self, params: Params) -> None:
        import ipywidgets as w

        from pgtls_helpers.keys import KEY_TYPES

        self._given = params
        self._chosen: Params | None = None
        style = {"description_width": "190px"}
        wide = w.Layout(width="560px")
        self.inputs: dict[str, Any] = {}
        self._errors: dict[str, Any] = {}
        rows = []
        for name, label, example in _FORM_FIELDS:
            text = w.Text(
                value=getattr(params, name) or "",
                description=label,
                placeholder=example,
                style=style,
                layout=wide,
            )
            self.inputs[name] = text
            self._errors[name] = w.HTML()
            rows += [text, self._errors[name]]
        self.inputs["subject_alt_names"] = w.Textarea(
            value="\n".join(params.subject_alt_names),
            description="Alternative names",
            placeholder="one host name or IP address a line",
            style=style,
            layout=w.Layout(width="560px", height="80px"),
        )
        self._errors["subject_alt_names"] = w.HTML()
        options = list(KEY_TYPES) if params.key_type in KEY_TYPES else [*KEY_TYPES, params.key_type]
        self.inputs["key_type"] = w.Dropdown(
            options=options, value=params.key_type, description="Key type", style=style
        )
        self.button = w.Button(
            description="Use these values",
            button_style="primary",
            icon="check",
            layout=w.Layout(width="200px"),
        )
        self.status = w.HTML()
        rows += [
            self.inputs["subject_alt_names"],
            self._errors["subject_alt_names"],
            self.inputs["key_type"],
            w.HBox([self.button, self.status]),
        ]
        for name, widget in self.inputs.items():
            if name != "key_type":
                widget.observe(self._on_change, names="value")
                self._check(name)
        self.button.on_click(self._on_use)
        self.box = w.VBox([w.HTML("<b>CSR subject</b>"), *rows])

    # the interactive part
    def _check(self, name: str) -> bool:
        problem = _field_problem(name, self.inputs[name].value)
        self._errors[name].value = (
            ""
            if problem is None
            else f'<span style="color:{_BAD};margin-left:196px">{_e(problem)}</span>'
        )
        return problem is None

    def _on_change(self, change: Mapping[str, Any]) -> None:
        owner = change["owner"]
        name = next(n for n, wdg in self.inputs.items() if wdg is owner)
        self._check(name)
        if self._chosen is not None:
            self.status.value = (
                f'<span style="color:{_WARN}">changed since "Use these values" '
                "was pressed; press it again to use the changes</span>"
            )

    def _on_use(self, _button: object = None) -> None:
        try:
            self._chosen = self.values()
        except InputError as exc:
            self._chosen = None
            self.status.value = f'<span style="color:{_BAD}">{_e(exc)}</span>'
            return
        self.status.value = f'<span style="color:{_OK}">the next cells use these values</span>'

    def values(self) -> Params:
        """The form's values as parameters (checked; raises :class:`InputError`)."""
        from pgtls_helpers.subject import make_subject

        for name in self.inputs:
            if name != "key_type" and not self._check(name):
                raise InputError(_field_problem(name, self.inputs[name].value) or "invalid value")
        fields: dict[str, Any] = {
            name: (self.inputs[name].value.strip() or None) for name, _, _ in _FORM_FIELDS
        }
        sans = tuple(_lines(self.inputs["subject_alt_names"].value))
        subject = make_subject(str(fields.pop("common_name") or ""), sans=sans, **fields)
        return dataclasses.replace(
            self._given,
            common_name=subject.common_name,
            country=subject.country,
            state=subject.state,
            locality=subject.locality,
            organization=subject.organization,
            organizational_unit=subject.organizational_unit,
            email=subject.email,
            subject_alt_names=sans,
            key_type=str(self.inputs["key_type"].value),
        )

    @property
    def params(self) -> Params:
        """The parameters the next cells use: the form's after *Use these values*, else the
        notebook's parameters."""
        return self._chosen or self._given

    @property
    def source(self) -> str:
        """Where :attr:`params` came from: ``"the form"`` or ``"the parameters"``."""
        return "the form" if self._chosen is not None else "the parameters"

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle = dict(self.box._repr_mimebundle_(**kwargs) or {})
        bundle["text/plain"] = (
            "[CSR form: interactive in JupyterLab; the values used are listed below]"
        )
        return bundle


def csr_form(params: Params) -> CsrForm:
    """The CSR subject form for step 1, prefilled from ``params``."""
    return CsrForm(params)


def show_values(form: CsrForm) -> Rendered:
    """The subject and key type step 1 uses, as a plain table, and where they came from."""
    from pgtls_helpers.runbook import subject_of

    params = form.params
    subject = subject_of(params)
    rows = [{"field": label, "value": value} for label, value in subject.fields()]
    rows.append({"field": "Key type", "value": params.key_type})
    rows.append(
        {
            "field": "Key passphrase",
            "value": f"from ${params.key_passphrase_env}"
            if params.key_passphrase_env
            else "none (the server reads the key at start without a prompt)",
        }
    )
    return _join(_heading(f"The CSR is made from {form.source}:"), _table(rows))


# --------------------------------------------------------------------------- step 1: the result


def _mode(path: Path) -> str:
    try:
        return f"{path.stat().st_mode & 0o777:04o}"
    except FileNotFoundError:
        return "(gone)"


def show_key_and_csr(result: KeyCsrResult, params: Params) -> Rendered:
    """Where the key and CSR are, the CSR as a reviewer reads it, and what to send to the CA."""
    files = [
        {
            "file": str(result.key_path),
            "what": "private key" + (" (encrypted)" if result.encrypted else ""),
            "mode": _mode(result.key_path),
            "leaves this machine": "never",
        },
        {
            "file": str(result.csr_path),
            "what": "certificate signing request",
            "mode": _mode(result.csr_path),
            "leaves this machine": "yes: send it to the CA",
        },
    ]
    state = (
        "The key and CSR from an earlier run are kept (the CSR may already be with the "
        "CA); nothing was generated."
        if result.reused
        else f"A new {result.key_type} key and its CSR were written."
    )
    if params.ca_mode == "lab":
        todo = (
            "Lab mode: the throwaway CA signs this CSR in step 2; nothing needs to be "
            "sent anywhere."
        )
    else:
        todo = (
            f"Send {result.csr_path} (and only that file) to your CA. When the signed "
            "certificate and the CA's intermediate and root certificates come back, list "
            "them in ca_files and run the next steps. The private key stays where it is."
        )
    return _join(
        _banner(state, _OK, "Key and CSR"),
        _table(files, mono=("file",)),
        _heading("The CSR, as the CA will read it:"),
        _pre(result.csr_text),
        _banner(todo, _INFO, "What to send to the CA"),
    )


# --------------------------------------------------------------------------- step 2


def show_sources(ca: CaResponseResult) -> Rendered:
    """The files read, the bundle written, and notes about anything set aside."""
    rows = [{"read": s} for s in ca.sources]
    parts = [
        _heading("Files read from the CA's response:"),
        _table(rows, mono=("read",)),
        _heading("Written to the work directory:"),
        _table(
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
        parts += [_heading("Set aside:"), _table([{"note": n} for n in ca.notes])]
    return _join(*parts)


def inspection_table(ca: CaResponseResult) -> Rendered:
    """The chain inspection table: one column per certificate, leaf first, unused ones last."""
    from pgtls_helpers.chain import inspection_table as frame_of
    from pgtls_helpers.csr import format_name

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
    head = f'<th style="{_CELL}background:#f2f4f7"></th>' + "".join(
        f'<th style="{_CELL}background:#f2f4f7;color:{_role_colour(c)}">{_e(h)}</th>'
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
                style += f"color:{_BAD};font-weight:600;"
            cells.append(f'<td style="{_CELL}{style}">{_e(_plain(value))}</td>')
        body.append(
            f'<tr><th style="{_CELL}background:#f9fafb;white-space:nowrap">'
            f"{_e(label)}</th>{''.join(cells)}</tr>"
        )
    text = "\n\n".join(
        "\n".join([h] + [f"  {label}: {_plain(c.get(k))}" for k, label in fields])
        for h, c in zip(heads, certs, strict=True)
    )
    return Rendered(
        f'<table style="{_TABLE}table-layout:fixed;width:100%">'
        f'<colgroup><col style="width:130px">' + "".join("<col>" for _ in certs) + "</colgroup>"
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>",
        text,
    )


def _role_colour(row: Mapping[str, Any]) -> str:
    return _ROLE_COLOURS.get(str(row.get("role", "")).split(" ")[0], _MUTED)


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
        colour = _BAD if missing else _ROLE_COLOURS.get(role, _MUTED)
        border = "dashed" if missing else "solid"
        boxes.append(
            f'<div style="display:inline-block;border:2px {border} {colour};border-radius:8px;'
            f'padding:6px 10px;margin:4px;min-width:120px;text-align:center">'
            f'<div style="font-size:11px;color:{colour};text-transform:uppercase">{_e(role)}'
            f'</div><div style="font-weight:600">{_e(label)}</div>'
            f'<div style="font-size:11px;color:{_MUTED}">{_e(detail)}</div></div>'
        )
        if i < len(nodes) - 1:
            boxes.append(f'<span style="font-size:20px;color:{_MUTED}">&#8594;</span>')
    unused = ""
    if chain.unused:
        names = ", ".join(_cn(c) for c in chain.unused)
        unused = (
            f'<div style="color:{_MUTED};font-size:12px">not part of the chain: {_e(names)}</div>'
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
            colour, state = _BAD, "expired" if end < at else "not yet valid"
        elif days < soon_days:
            colour, state = _WARN, f"{days} days left"
        else:
            colour, state = _ROLE_COLOURS.get(role, _MUTED), f"{days} days left"
        label = _cn(cert)
        short = label if len(label) <= 26 else label[:25] + "…"
        parts.append(f'<text x="4" y="{y + 15}">{_e(short)}</text>')
        parts.append(
            f'<rect x="{x(start):.1f}" y="{y + 4}" width="{max(x(end) - x(start), 2):.1f}"'
            f' height="{row_h - 8}" rx="3" fill="{colour}" fill-opacity="0.75">'
            f"<title>{_e(label)} ({role}): {start:%Y-%m-%d} to {end:%Y-%m-%d}, "
            f"{_e(state)}</title></rect>"
        )
        parts.append(
            f'<text x="{x(end) + 4:.1f}" y="{y + 15}" '
            f'font-size="10" fill="{_MUTED}">{_e(state)}</text>'
        )
        text_lines.append(f"{label:<28} {role:<12} {start:%Y-%m-%d} .. {end:%Y-%m-%d}  {state}")
    # the axis: a tick per year (or per month when the span is short)
    axis_y = top + row_h * len(certs) + 4
    parts.append(
        f'<line x1="{label_w}" y1="{axis_y}" x2="{label_w + plot_w}" y2="{axis_y}" '
        f'stroke="{_MUTED}"/>'
    )
    for tick in _ticks(lo, hi):
        tx = x(tick)
        parts.append(
            f'<line x1="{tx:.1f}" y1="{axis_y}" x2="{tx:.1f}" y2="{axis_y + 4}" '
            f'stroke="{_MUTED}"/><text x="{tx:.1f}" y="{axis_y + 16}" font-size="10" '
            f'text-anchor="middle" fill="{_MUTED}">{tick:%Y-%m}</text>'
        )
    nx = x(at)
    parts.append(
        f'<line x1="{nx:.1f}" y1="{top - 6}" x2="{nx:.1f}" y2="{axis_y}" '
        f'stroke="{_BAD}" stroke-dasharray="4,3"/><text x="{nx:.1f}" y="{top - 9}" '
        f'font-size="10" text-anchor="middle" fill="{_BAD}">today</text>'
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
    from pgtls_helpers.csr import load_csr, spki_sha256

    leaf = ca.chain.leaf
    csr_path = params.work / "server.csr"
    if leaf is None:
        return _banner("no leaf certificate among the files", _BAD, "Key match")
    csr = load_csr(csr_path.read_bytes(), source=str(csr_path))
    want, got = spki_sha256(csr.public_key()), spki_sha256(leaf.public_key())
    mismatch = any(f.code == "key-mismatch" for f in ca.findings)
    ok = want == got and not mismatch
    rows = [
        {"public key of": "server.csr (and so server.key)", "SPKI sha256": want},
        {"public key of": f"the leaf, {_cn(leaf)}", "SPKI sha256": got},
    ]
    verdict = _banner(
        "the certificate belongs to this change's private key"
        if ok
        else "the certificate was issued for another key; it cannot be used with server.key",
        _OK if ok else _BAD,
        "Key match",
    )
    return _join(verdict, _table(rows, mono=("SPKI sha256",)))


def host_coverage(ca: CaResponseResult, params: Params) -> Rendered:
    """Each host name clients use, and whether libpq's verify-full accepts the leaf for it."""
    from pgtls_helpers.hostname import explain, matches_host

    leaf = ca.chain.leaf
    if leaf is None:
        return _banner("no leaf certificate to check", _BAD, "Host names")
    rows = [
        {
            "host": h,
            "verify-full": "accepted" if matches_host(leaf, h) else "refused",
            "why": explain(leaf, h),
        }
        for h in params.hosts
    ]
    return _join(
        _heading("Host names clients use, checked as libpq does with sslmode=verify-full:"),
        _table(rows, colour=lambda r: _BAD if r["verify-full"] == "refused" else None),
    )


def show_findings(ca: CaResponseResult) -> Rendered:
    """Every finding, worst first, with what to do about it."""
    from pgtls_helpers.findings import CODES

    if not ca.findings:
        return _banner(
            "no findings: the chain is complete, valid, and fits the key and host names",
            _OK,
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
    colours = {"error": _BAD, "warning": _WARN}
    return _table(rows, colour=lambda r: colours.get(str(r["severity"])))


def stop_on_errors(ca: CaResponseResult) -> Rendered:
    """Stop the runbook here (raise) when any finding is an error; else say the chain is fit."""
    from pgtls_helpers.errors import PreflightError

    errors = [f for f in ca.findings if f.severity == "error"]
    if errors:
        _display(
            _banner(
                f"{len(errors)} error finding(s); the runbook stops here and nothing "
                "goes near the server",
                _BAD,
                "Stop",
            )
        )
        raise PreflightError(
            "the CA's response is not usable: "
            + "; ".join(f"{f.code}: {f.message}" for f in errors)
        )
    return _banner("no error findings: this chain may be installed (step 3)", _OK, "Go")


# --------------------------------------------------------------------------- steps 3 and 4


def _display(obj: object) -> None:
    try:
        from IPython.display import display
    except ImportError:  # pragma: no cover - IPython comes with ipykernel
        return
    display(obj)


def apply_step(step: Callable[[Params], _T], params: Params) -> _T | None:
    """Run a step that changes the server, when ``apply`` is true; else return None.

    A failure is shown as a red box before it is raised again, so the notebook and its record
    say plainly what went wrong and what was undone.
    """
    if not params.apply:
        return None
    try:
        return step(params)
    except PgtlsError as exc:
        _display(_banner(str(exc), _BAD, "Failed"))
        raise


def _apply_false(what: str) -> Rendered:
    return _banner(
        f"apply is false: the runbook stops at the plan; {what}. Set apply: true "
        "when the change is approved and run again.",
        _WARN,
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
        _heading("What the server says about itself:"),
        _table(about, mono=("value",)),
        _heading("The plan (each replaced file is backed up first):"),
        _table(
            plan.plan,
            ["file", "kind", "action", "owner", "mode", "sha256 (new)"],
            mono=("file", "sha256 (new)"),
        ),
    ]
    if plan.preflight:
        parts += [
            _heading("Checks before the install:"),
            _table(
                [
                    {"severity": f.severity, "code": f.code, "finding": f.message}
                    for f in plan.preflight
                ]
            ),
        ]
    else:
        parts.append(
            _banner("the key matches the certificate and the chain is complete", _OK, "Checks")
        )
    return _join(*parts)


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
    return _join(
        _banner(note, _OK, "Install"),
        _table(
            rows,
            ["target", "kind", "action", "sha256", "backup"],
            mono=("target", "sha256", "backup"),
        ),
    )


def _diff(text: str) -> Rendered:
    if not text:
        return _banner("pg_hba.conf already has the rules; no change", _OK, "pg_hba.conf")
    lines = []
    for line in text.splitlines():
        colour = (
            _OK
            if line.startswith("+") and not line.startswith("+++")
            else _BAD
            if line.startswith("-") and not line.startswith("---")
            else _INFO
            if line.startswith("@@")
            else "inherit"
        )
        weight = "600" if colour in (_OK, _BAD) else "400"
        lines.append(f'<span style="color:{colour};font-weight:{weight}">{_e(line)}</span>')
    return Rendered(
        f'<pre style="{_BOX}{_MONO}background:#f9fafb">' + "\n".join(lines) + "</pre>", text
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
    parts = [_table(steps), _heading("pg_hba.conf, current against planned:"), _diff(plan.hba_diff)]
    if plan.presented:
        parts += [
            _heading("The server presents now:"),
            _presented(plan.presented),
        ]
    return _join(*parts)


def show_enabled(enabled: EnableResult | None) -> Rendered:
    """The reload and the proof from outside: the chain the server now presents."""
    if enabled is None:
        return _apply_false("SSL and pg_hba.conf are unchanged, nothing was reloaded")
    if not enabled.changed:
        head = _banner("; ".join(enabled.messages) or "nothing to change", _OK, "No change")
    else:
        head = _banner(
            f"ssl {'on' if enabled.ssl_after else 'off'}; a handshake from outside "
            f"({enabled.tls_version or 'TLS'}) sees the new certificate and chain; "
            f"pg_hba.conf accepted by the server and reloaded"
            + (f" ({'; '.join(enabled.messages)})" if enabled.messages else "")
            + (
                f"; the runbook's own new connection: {enabled.runbook_connection}"
                if enabled.runbook_connection
                else ""
            ),
            _OK if enabled.confirmed else _BAD,
            "Enabled",
        )
    return _join(
        head,
        _heading("The chain the server presents (leaf first):"),
        _presented(enabled.presented),
    )


def _name_text(rfc4514: str) -> str:
    """An RFC 4514 name as people write it (``emailAddress=``, not the dotted OID)."""
    from pgtls_helpers.csr import format_name

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
    return _table(shown, ["#", "subject", "issuer", "sha256"], mono=("sha256",), nowrap=("sha256",))


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
                "expected": c.expect + ("" if c.expect == "ok" else f" ({c.expect_reason})"),
                "observed": c.observed + ("" if c.observed == "ok" else f" ({c.observed_reason})"),
                "agrees": "✓" if c.passed else "✗",
                "libpq said": c.detail if len(c.detail) <= 160 else c.detail[:157] + "…",
            }
        )
    return _table(
        rows, colour=lambda r: _BAD if r["agrees"] == "✗" else None, nowrap=("sslmode", "agrees")
    )


def require_pass(verify: VerifyResult, params: Params) -> Rendered:
    """The verdict; raises when it is *fail* after an applied change, so the run fails."""
    failed = [c for c in verify.checks if not c.passed]
    if verify.passed:
        return _banner(
            f"all {len(verify.checks)} checks behaved as they must: the server "
            "accepts verified TLS and refuses what it should",
            _OK,
            "Verdict: pass",
        )
    summary = "; ".join(
        f"{c.check}: expected {c.expect}, got {c.observed} ({c.observed_reason})" for c in failed
    )
    if not params.apply:
        return _banner(
            f"plan only (apply is false), so this describes the server as it is now: {summary}",
            _WARN,
            "Verdict: fail, not enforced",
        )
    _display(_banner(summary, _BAD, "Verdict: fail"))
    raise PgtlsError(
        f"{len(failed)} of {len(verify.checks)} connection checks did not behave as "
        f"they must ({summary}); see the table above"
    )
