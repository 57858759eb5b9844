"""The building blocks of every display: a value with an HTML and a plain-text form.

Every display is a :class:`Rendered` value, so an executed notebook reads the same in JupyterLab
and in the HTML of its record.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass


# Colours: one palette for every display (readable on white, and printed in grey).
OK, BAD, WARN, INFO, MUTED = "#1a7f37", "#b42318", "#b54708", "#175cd3", "#667085"
ROLE_COLOURS = {"root": "#6941c6", "intermediate": "#175cd3", "leaf": "#1a7f37"}
BOX = "border:1px solid #d0d5dd;border-radius:6px;padding:8px 12px;margin:6px 0;"
MONO = "font-family:monospace;font-size:12px;line-height:1.4;"
TABLE = "border-collapse:collapse;font-size:13px;margin:4px 0;"
CELL = (
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


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def join(*parts: Rendered) -> Rendered:
    return Rendered("".join(p.html for p in parts), "\n\n".join(p.text for p in parts if p.text))


def banner(text: str, colour: str, title: str = "") -> Rendered:
    head = f"<b>{esc(title)}</b> " if title else ""
    return Rendered(
        f'<div style="{BOX}border-left:6px solid {colour};">{head}{esc(text)}</div>',
        f"{title + ': ' if title else ''}{text}",
    )


def heading(text: str) -> Rendered:
    return Rendered(f'<div style="font-weight:600;margin-top:10px">{esc(text)}</div>', text)


def table(
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
        return Rendered(f'<div style="color:{MUTED}">(none)</div>', "(none)")
    head = "".join(f'<th style="{CELL}background:#f2f4f7">{esc(c)}</th>' for c in cols)
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
            cells.append(f'<td style="{CELL}{font}">{esc(plain(row.get(col)))}</td>')
        body.append(f'<tr style="{style}">{"".join(cells)}</tr>')
    widths = [max(len(c), *(len(plain(r.get(c))) for r in rows)) for c in cols]
    widths = [min(w, 60) for w in widths]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += [
        "  ".join(plain(r.get(c))[:60].ljust(w) for c, w in zip(cols, widths, strict=True))
        for r in rows
    ]
    return Rendered(
        f'<table style="{TABLE}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>",
        "\n".join(lines),
    )


def plain(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if isinstance(value, list | tuple):
        return ", ".join(plain(v) for v in value)
    return str(value)


def pre(text: str) -> Rendered:
    return Rendered(
        f'<pre style="{BOX}{MONO}background:#f9fafb;white-space:pre-wrap">{esc(text)}</pre>', text
    )


def show_now(obj: object) -> None:
    try:
        from IPython.display import display
    except ImportError:  # pragma: no cover - IPython comes with ipykernel
        return
    display(obj)
