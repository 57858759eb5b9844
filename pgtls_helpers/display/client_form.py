"""Step c1: the clients' subject form (ipywidgets), and the values step c1 actually uses.

One row per entry of ``clients``: the role, the subject (``CN = role`` or a full DN) and the
``pg_ident.conf`` map the subject then needs. Each row is checked as it is typed, with the checks
of the parameters file (:func:`~pgtls_helpers.runbook.client_subjects.checked_clients`), and
shows the DN exactly as the server will see it: as a ``clientname=DN`` option or a map matches it
and as ``pg_stat_ssl.client_dn`` prints it. A subject that the ``pg_hba.conf`` line would not
turn into the role is flagged with step c4's own sentence; that flag does not stop the button,
because c4 also reads the server's ``pg_ident.conf``, where the line may already be.

The values are always shown as a plain table too, because a record has no live kernel to draw
widgets with. Every client notebook shows its parameters with the clients as the steps use them
(:func:`show_client_parameters`): the form's saved values, when there are, and a note saying so
and what the parameters file says.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509

from pgtls_helpers.display.form import TakenForm, show_parameters
from pgtls_helpers.display.html import (
    BAD,
    INFO,
    OK,
    WARN,
    Rendered,
    banner,
    esc,
    heading,
    join,
    table,
)
from pgtls_helpers.errors import InputError
from pgtls_helpers.pki import client as pkiclient
from pgtls_helpers.postgres.ident import IdentLine
from pgtls_helpers.runbook.client_identity import ExpectedIdentity, expected_identity
from pgtls_helpers.runbook.client_subjects import (
    checked_clients,
    client_entries,
    clients_used,
    describe_clients,
    said_by_parameters,
    save_clients,
    saved_clients,
)
from pgtls_helpers.runbook.manifest import ClientsUsed
from pgtls_helpers.runbook.params import Params

__all__ = [
    "CLIENT_PARAMETERS",
    "ClientForm",
    "client_form",
    "show_client_parameters",
    "show_client_values",
]

# what the client-certificate notebooks show of their parameters
CLIENT_PARAMETERS = (
    "change_id",
    "server_host",
    "server_port",
    "clients",
    "ca_mode",
    "client_ca_files",
    "hba_rules",
    "ident_maps",
    "client_driver_files",
    "apply",
)

SOURCE = "the client form"
_CN, _DN = "cn", "dn"
_KINDS = [("CN = role", _CN), ("a full DN", _DN)]
_STYLE = {"description_width": "220px"}
_INDENT = "margin-left:226px"


def _owned_line(params: Params, role: str, rule_map: str | None) -> int | None:
    """The ``ident_maps`` line a client's row edits: the first plain line for its role (in
    the map its ``pg_hba.conf`` line names, when it names one); regular-expression lines are
    never the row's."""
    for k, line in enumerate(params.ident_maps):
        if str(line.get("role")) != role or str(line.get("system_user", "")).startswith("/"):
            continue
        if rule_map is None or str(line.get("map")) == rule_map:
            return k
    return None


class _Row:
    """One client's widgets, prefilled from ``shown`` (the saved choice or the parameters)."""

    def __init__(self, given: Params, shown: Params, index: int) -> None:
        import ipywidgets as w

        entry = shown.clients[index]
        self.os_user = str(entry["os_user"])
        role, subject = str(entry["role"]), str(entry.get("subject") or "")
        name = pkiclient.client_subject(role, subject or None)
        expected = expected_identity(given, self.os_user, role, name)
        # the line the row replaces: looked for in the parameters, where the button found it
        self.owned = _owned_line(given, str(given.clients[index]["role"]), expected.map)
        owned_now = _owned_line(shown, role, expected.map)
        mapped = shown.ident_maps[owned_now].get("map") if owned_now is not None else None
        wide = w.Layout(width="640px")
        self.role = w.Text(value=role, description=f"{self.os_user}: role", style=_STYLE)
        self.kind = w.Dropdown(
            options=_KINDS,
            value=_DN if subject else _CN,
            description=f"{self.os_user}: subject",
            style=_STYLE,
        )
        self.dn = w.Text(
            value=subject,
            description=f"{self.os_user}: DN",
            placeholder="CN=alice,OU=dba,O=Example",
            disabled=not subject,
            style=_STYLE,
            layout=wide,
        )
        self.map = w.Text(
            value=str(expected.map or mapped or ""),
            description=f"{self.os_user}: pg_ident.conf map",
            placeholder="empty: none (CN = role needs none)",
            style=_STYLE,
        )
        self.error = w.HTML()
        self.preview = w.HTML()
        self.inputs = (self.role, self.kind, self.dn, self.map)
        self.box = w.VBox(
            [
                w.HTML(f"<b>Client OS user {esc(self.os_user)}</b>"),
                *self.inputs,
                self.error,
                self.preview,
            ]
        )

    def values(self) -> tuple[str, ...]:
        return tuple(str(i.value) for i in self.inputs)

    def entry(self) -> dict[str, str]:
        """The row as a ``clients`` entry."""
        out = {"os_user": self.os_user, "role": self.role.value.strip()}
        if self.kind.value == _DN:
            out["subject"] = self.dn.value.strip()
        return out

    def ident_line(self, given: Params) -> dict[str, str] | None:
        """The ``pg_ident.conf`` line the row asks for (None: no map), or raises InputError
        when the subject is not a DN yet."""
        map_name = self.map.value.strip()
        if not map_name:
            return None
        entry = self.entry()
        name = pkiclient.client_subject(entry["role"], entry.get("subject"))
        system_user = expected_identity(given, self.os_user, entry["role"], name).system_user
        return {"map": map_name, "system_user": system_user, "role": entry["role"]}


class ClientForm(TakenForm):
    """The clients' subjects for step c1, prefilled from the parameters; each row is checked
    as it is typed.

    The values are taken only when the DBA presses *Use these values*: they are checked as
    the parameters file is, saved in the change's work directory (``client_subjects.json``, so
    steps c1 to c5 and a restarted kernel see the same choice) and used by the next cells. A form
    changed but not taken, or whose values were refused, stops the next cell with the reason
    rather than falling back to the parameters. In a headless run the form is never touched and
    :attr:`params` are the notebook's parameters (or the values saved for this change earlier).
    Build it with :func:`client_form`.
    """

    label = "client form"

    def __init__(self, params: Params) -> None:
        import ipywidgets as w

        client_entries(params)  # no clients, or a subject that is not a DN: the sentence now
        self._given = params
        self._chosen: Params | None = saved_clients(params)
        self._from_file = self._chosen is not None
        self._refused: str | None = None
        shown = self._chosen or params
        self.rows = [_Row(params, shown, i) for i in range(len(params.clients))]
        self.button = w.Button(
            description="Use these values",
            button_style="primary",
            icon="check",
            layout=w.Layout(width="200px"),
        )
        self.status = w.HTML()
        if self._chosen is not None:
            self.status.value = (
                f'<span style="color:{OK}">the values saved for this change in '
                f"{esc(params.work.client_subjects)} are used</span>"
            )
        for row in self.rows:
            for widget in row.inputs:
                widget.observe(self._on_change, names="value")
            self._check(row)
        self._taken = self._current()
        self.button.on_click(self._on_use)
        self.box = w.VBox(
            [
                w.HTML("<b>Client certificate subjects</b>"),
                *(r.box for r in self.rows),
                w.HBox([self.button, self.status]),
            ]
        )

    # the values
    def _current(self) -> list[tuple[str, ...]]:
        return [r.values() for r in self.rows]

    def _ident_maps(self, rows: Sequence[_Row]) -> list[dict[str, object]]:
        """The parameters' ``ident_maps`` with the lines of ``rows`` in place of theirs."""
        owned = {r.owned for r in rows if r.owned is not None}
        kept = [dict(m) for k, m in enumerate(self._given.ident_maps) if k not in owned]
        added: list[dict[str, object]] = [
            dict(line) for r in rows if (line := r.ident_line(self._given)) is not None
        ]
        return kept + [a for i, a in enumerate(added) if a not in kept and a not in added[:i]]

    def _with(self, rows: Sequence[_Row]) -> Params:
        """The parameters with ``rows`` taken from the form, checked (raises InputError)."""
        mine = {r.os_user: r for r in rows}
        clients = [
            mine[str(c["os_user"])].entry() if str(c["os_user"]) in mine else dict(c)
            for c in self._given.clients
        ]
        try:
            ident_maps = self._ident_maps(rows)
        except InputError as exc:
            raise InputError(f"{SOURCE}: {exc}") from None
        return checked_clients(self._given, clients, ident_maps, source=SOURCE)

    def values(self) -> Params:
        """The form's values as parameters (checked; raises :class:`InputError`)."""
        return self._with(self.rows)

    # the interactive part
    def _check(self, row: _Row) -> bool:
        """Check one row with the others as the parameters give them; show what the server
        will see of its subject."""
        row.dn.disabled = row.kind.value != _DN
        try:
            candidate = self._with([row])
        except InputError as exc:
            row.error.value = f'<span style="color:{BAD};{_INDENT}">{esc(exc)}</span>'
            row.preview.value = ""
            return False
        row.error.value = ""
        entry = row.entry()
        name = pkiclient.client_subject(entry["role"], entry.get("subject"))
        expected = expected_identity(candidate, row.os_user, entry["role"], name)
        row.preview.value = _preview(name, expected, row.ident_line(self._given))
        return True

    def _on_change(self, change: Mapping[str, Any]) -> None:
        owner = change["owner"]
        row = next(r for r in self.rows if any(owner is i for i in r.inputs))
        if owner is row.kind and row.kind.value == _DN and not row.dn.value.strip():
            row.dn.value = f"CN={row.role.value.strip()}"  # a start to edit; checks again
        self._check(row)
        if self._current() != self._taken:
            self.status.value = (
                f'<span style="color:{WARN}">changed: press "Use these values" to use the '
                "changes</span>"
            )

    def _on_use(self, _button: object = None) -> None:
        for row in self.rows:
            self._check(row)
        try:
            chosen = self.values()
            saved = save_clients(chosen)
        except (InputError, OSError) as exc:
            self._refused = str(exc)
            self.status.value = (
                f'<span style="color:{BAD}">not taken: {esc(exc)}; fix it and press again</span>'
            )
            return
        self._chosen, self._refused, self._taken = chosen, None, self._current()
        self._from_file = False
        self.status.value = (
            f'<span style="color:{OK}">saved in {esc(saved)}; the next cells use these '
            "values</span>"
        )

    def _saved_in(self) -> Path:
        return self._given.work.client_subjects


def _preview(name: x509.Name, expected: ExpectedIdentity, line: Mapping[str, str] | None) -> str:
    """What the server will see of ``name``, and what step c4 will say of it."""
    rows = [
        ("clientname=DN and a map match", pkiclient.hba_dn(name)),
        ("pg_stat_ssl.client_dn shows", pkiclient.stat_ssl_dn(name)),
        ("its pg_hba.conf line", expected.hba_line or "(none)"),
        (
            "pg_ident.conf line",
            IdentLine(line["map"], line["system_user"], line["role"]).line() if line else "(none)",
        ),
    ]
    cells = "".join(
        f'<tr><td style="padding:1px 8px 1px 0;color:#475467">{esc(k)}</td>'
        f'<td style="font-family:monospace;font-size:12px">{esc(v)}</td></tr>'
        for k, v in rows
    )
    flag = (
        f'<div style="color:{WARN}">step c4 will refuse this: {esc(expected.problem)}</div>'
        if expected.problem
        else ""
    )
    return f'<div style="{_INDENT}"><table>{cells}</table>{flag}</div>'


def client_form(params: Params) -> ClientForm:
    """The clients' subject form for step c1, prefilled from ``params``."""
    return ClientForm(params)


def show_client_parameters(params: Params) -> Rendered:
    """The parameters a client step runs with, its ``clients`` and ``ident_maps`` as the steps
    use them: the values step c1's form saved for this change, when it saved any, under a note
    that names the file and says what the parameters file gives instead.

    Raises:
        InputError: the form's file is damaged or was saved for other clients (as the steps
            refuse it).
    """
    used_params, used = clients_used(params)
    shown = show_parameters(used_params, CLIENT_PARAMETERS)
    if not used.from_form:
        return shown
    return join(_source_note(said_by_parameters(used, params)), shown)


def _source_note(used: ClientsUsed) -> Rendered:
    said = f" ({used.parameters_said})" if used.parameters_said else ""
    return banner(
        f"{used.source}; the values below are the ones this step uses{said}",
        INFO,
        "Clients from the c1 form",
    )


def show_client_values(form: ClientForm) -> Rendered:
    """Each client's subject step c1 uses, as the server will see it, and where it came from."""
    params = form.params
    rows = []
    for entry in client_entries(params):
        expected = expected_identity(params, entry.os_user, entry.role, entry.subject)
        rows.append(
            {
                "OS user": entry.os_user,
                "role": entry.role,
                "subject": pkiclient.rfc4514_dn(entry.subject),
                "clientname=DN": pkiclient.hba_dn(entry.subject),
                "pg_stat_ssl.client_dn": pkiclient.stat_ssl_dn(entry.subject),
                "step c4": f"will refuse: {expected.problem}" if expected.problem else "ok",
            }
        )
    lines = [
        {"pg_ident.conf": IdentLine(str(m["map"]), str(m["system_user"]), str(m["role"])).line()}
        for m in params.ident_maps
    ]
    saved_in = form._saved_in() if form._chosen is not None else None  # taken: saved there
    used = said_by_parameters(describe_clients(params, saved_in=saved_in), form._given)
    source = form.source + (", not the parameters file" if used.differs else "")
    parts = [
        heading(f"The client CSRs are made from {source}:"),
        table(
            rows,
            mono=("subject", "clientname=DN", "pg_stat_ssl.client_dn"),
            colour=lambda r: WARN if r["step c4"] != "ok" else None,
        ),
        heading("The pg_ident.conf lines step c4 adds:"),
        table(lines, mono=("pg_ident.conf",)),
    ]
    if used.parameters_said:
        parts.append(heading(f"Not used: {used.parameters_said}."))
    return join(*parts)
