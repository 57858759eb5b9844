"""The client-certificate runbook's evidence: each step's result as a reader checks it.

Each step of ``pgtls clients`` returns a frozen result whose ``summary()`` is what the record
keeps; :func:`show_client_step` draws that summary, section by section: a list of rows as a
table, a diff as text, the rest as one two-column table. Secrets never reach a summary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from pgtls_helpers.display.html import (
    BAD,
    OK,
    WARN,
    Rendered,
    banner,
    heading,
    join,
    pre,
    table,
)

__all__ = ["show_client_step"]

# summary keys that are the record's plumbing, not something a reader checks; the clients used
# are shown with the notebook's parameters (show_client_parameters)
_HIDDEN = frozenset({"plan", "clients_used"})
_HEX = ("sha256", "serial", "fingerprint")


class _Summarised(Protocol):
    def summary(self) -> Mapping[str, Any]: ...


def _title(key: str) -> str:
    return key.replace("_", " ").capitalize()


def _mono(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    return [c for c in cols if any(h in c for h in _HEX) or c in ("target", "file", "path")]


def show_client_step(result: _Summarised | None, *, title: str = "") -> Rendered:
    """A step's summary; ``None`` (a step that did not run: apply is false) says so."""
    if result is None:
        return banner(
            "apply is false: this part is planned, not made; set apply: true when the change "
            "is approved and run again.",
            WARN,
            "Plan only",
        )
    summary = dict(result.summary())
    parts: list[Rendered] = [heading(title)] if title else []
    verdict = summary.get("verdict")
    if verdict:
        parts.append(
            banner(f"verdict: {verdict}", OK if verdict == "pass" else BAD, "Client logins")
        )
    scalars = []
    for key, value in summary.items():
        if key in _HIDDEN or key == "verdict" or value in (None, "", [], {}):
            continue
        if isinstance(value, list) and all(isinstance(v, Mapping) for v in value):
            rows = [{k: v for k, v in row.items() if not isinstance(v, Mapping)} for row in value]
            parts += [heading(_title(key)), table(rows, mono=_mono(rows))]
        elif isinstance(value, str) and "\n" in value:
            parts += [heading(_title(key)), pre(value)]
        elif isinstance(value, Mapping):
            rows = [{"": k, "value": v} for k, v in value.items()]
            parts += [heading(_title(key)), table(rows, ["", "value"], mono=["value"])]
        else:
            scalars.append({"": _title(key), "value": value})
    if scalars:
        parts.insert(1 if title else 0, table(scalars, ["", "value"]))
    return join(*parts)
