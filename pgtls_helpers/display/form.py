"""Parameters and step 1: the CSR form (ipywidgets) and the values a step actually used.

The form serves the interactive path; the values are always shown as a plain table too, because
a record has no live kernel to draw widgets with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgtls_helpers.errors import InputError
from pgtls_helpers.pki.subject import READING_ORDER, subject_from
from pgtls_helpers.runbook import interactive
from pgtls_helpers.runbook.params import PARAMETER_NAMES, Params, load_params, redacted

if TYPE_CHECKING:
    from pgtls_helpers.runbook.key_and_csr import KeyCsrResult
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
    plain,
    pre,
    show_now,
    table,
)

# --------------------------------------------------------------------------- parameters


def notebook_params(namespace: Mapping[str, Any], *, names_from_csr: bool = False) -> Params:
    """The parameters cell's values (and papermill's injected ones) as one checked object.

    Only the runbook's parameter names are read from ``namespace`` (a notebook passes
    ``globals()``). With ``names_from_csr`` (steps 2 to 5) the common name and SANs are the
    ones of the CSR step 1 made, which may differ from the parameters when they were changed in
    the CSR form; a note says so. A refusal here (or in any later cell) shows as its sentence
    alone (:class:`~pgtls_helpers.errors.PgtlsError` renders itself for IPython); a real bug
    keeps its traceback.

    In a session of ``make notebook`` that changes a real server, the first output is
    :class:`ApplyConfirmation`: which server changes, and the button that lets the apply steps
    change it.
    """
    declared = namespace.get("__annotations__") or {}
    values = {name: namespace[name] for name in PARAMETER_NAMES if name in namespace}
    # a misspelled name in the parameters cell is annotated like the others: refuse it too
    values.update({n: namespace[n] for n in declared if n in namespace and not n.startswith("_")})
    params = load_params(values, source="the parameters cell")
    if not Path(params.work_dir).is_absolute():
        raise InputError(
            f"the parameters cell: work_dir '{params.work_dir}' is relative, and a notebook "
            "cannot tell what it is relative to; start JupyterLab with `make notebook` (it "
            "injects your parameters file) or give an absolute work_dir"
        )
    session = interactive.session_of(params)
    if session is not None and params.apply:
        show_now(ApplyConfirmation(params, session))
    if names_from_csr:
        from pgtls_helpers.runbook.key_and_csr import names_from_csr as csr_names

        given, params = params, csr_names(params)
        if params is not given:
            show_now(names_note(given, params))
    return params


class ApplyConfirmation:
    """Which real server this interactive session changes, and the button that allows it.

    The apply steps (:func:`pgtls_helpers.display.changes.apply_step`) refuse until the button,
    which names the server, is pressed in any notebook of the session; the confirmation is kept
    beside the notebooks (:func:`pgtls_helpers.runbook.interactive.confirm`), so it holds for
    every notebook of the session, and it goes with the session's record.
    """

    def __init__(self, params: Params, session: interactive.Session) -> None:
        import ipywidgets as w

        self._params = params
        server = f"{params.server_host}:{params.server_port}"
        where = (
            f"data directory {session.data_directory}"
            if session.data_directory
            else "data directory not known yet (step 3 asks the server)"
        )
        self.text = (
            f"This session changes the real server {server} ({where}) for change "
            f"{params.change_id}; its apply steps do nothing until you press the button."
        )
        self.button = w.Button(
            description=f"Apply to {server}",
            button_style="danger",
            icon="exclamation-triangle",
            layout=w.Layout(width="auto"),
        )
        self.status = w.HTML()
        done = interactive.confirmation_of(params)
        if done is not None:
            self._confirmed(done)
        self.button.on_click(self._on_confirm)
        warning = banner(self.text, BAD, "A real server")
        self.box = w.VBox([w.HTML(warning.html), w.HBox([self.button, self.status])])

    def _confirmed(self, done: interactive.Confirmation) -> None:
        self.button.disabled = True
        self.status.value = (
            f'<span style="color:{OK};margin-left:8px">confirmed by {esc(done.confirmed_by)} at '
            f"{esc(done.confirmed_utc)}: the apply steps of this session change "
            f"{esc(done.server)}</span>"
        )

    def _on_confirm(self, _button: object = None) -> None:
        self._confirmed(interactive.confirm(self._params))

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle = dict(self.box._repr_mimebundle_(**kwargs) or {})
        done = interactive.confirmation_of(self._params)
        state = (
            f"confirmed by {done.confirmed_by} at {done.confirmed_utc}"
            if done
            else "not confirmed yet"
        )
        bundle["text/plain"] = f"A real server: {self.text} ({state})"
        # what a saved notebook and its record show without a live kernel
        bundle["text/html"] = banner(f"{self.text} ({state})", BAD, "A real server").html
        return bundle


def names_note(given: Params, used: Params) -> Rendered:
    """Why the names below are not the parameters': the CSR was made with others."""
    names = ", ".join(used.hosts)
    return banner(
        f"the host names come from {used.work.csr}, the CSR step 1 made: {names} "
        f"(the parameters say {', '.join(given.hosts)}; the form in step 1 changed them)",
        INFO,
        "Names from the CSR",
    )


def plan_only(params: Params) -> Params:
    """The same parameters with ``apply`` false: the step plans and writes nothing."""
    return dataclasses.replace(params, apply=False)


def _param_rows(params: Params, names: Iterable[str] | None = None) -> list[dict[str, str]]:
    values = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
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
            text = plain(value)
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
    return join(
        banner(
            f"change {params.change_id} · {params.server_host}:{params.server_port} · {mode}",
            OK if params.apply else WARN,
            "Parameters",
        ),
        table(pairs),
    )


# --------------------------------------------------------------------------- step 1: the form

_PROBE_CN = "probe.example.com"


def _field_problem(name: str, value: str) -> str | None:
    """The form's inline check: what :func:`subject_from` says about this one field."""
    try:
        if name == "subject_alt_names":
            subject_from({"common_name": _PROBE_CN}, _lines(value))
        else:
            # any other field beside a CN that passes (the CN itself replaces it)
            subject_from({"common_name": _PROBE_CN, name: value})
    except InputError as exc:
        return str(exc)
    return None


def _lines(text: str) -> list[str]:
    return [part.strip() for line in text.splitlines() for part in line.split(",") if part.strip()]


class TakenForm:
    """What the CSR form and the client form share: the values the next cells use are the ones
    taken by *Use these values* (or saved by an earlier press), never a change not taken.

    A subclass sets ``_given``, ``_chosen``, ``_from_file``, ``_refused``, ``_taken`` and
    ``box``, and names itself in ``label`` and the file it saves in :meth:`_saved_in`.
    """

    label = "form"
    _given: Params
    _chosen: Params | None
    _from_file: bool
    _refused: str | None
    _taken: object
    box: Any

    def _current(self) -> object:
        raise NotImplementedError

    def _saved_in(self) -> Path:
        raise NotImplementedError

    @property
    def params(self) -> Params:
        """The parameters the next cells use: the form's after *Use these values*, else the
        notebook's parameters.

        Raises:
            InputError: the last press was refused, or the form was changed without pressing
                the button; nothing silently falls back to the parameters.
        """
        if self._refused is not None:
            raise InputError(
                f"the {self.label}'s values were not taken ({self._refused}); fix the field and "
                'press "Use these values" again'
            )
        if self._current() != self._taken:
            raise InputError(
                f'the {self.label} was changed but "Use these values" was not pressed; press it '
                "to use the changes, or run the form's cell again to start over"
            )
        return self._chosen or self._given

    @property
    def source(self) -> str:
        """Where :attr:`params` came from: ``"the form"`` (perhaps saved by an earlier press)
        or ``"the parameters"``."""
        if self._chosen is None:
            return "the parameters"
        if self._from_file:
            return f"the form, as saved in {self._saved_in()}"
        return "the form"

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle = dict(self.box._repr_mimebundle_(**kwargs) or {})
        bundle["text/plain"] = (
            f"[{self.label}: interactive in JupyterLab; the values used are listed below]"
        )
        return bundle


class CsrForm(TakenForm):
    """The CSR subject form, prefilled from the parameters; each field is checked as it is typed.

    The values are taken only when the DBA presses *Use these values*: they are checked, saved
    in the change's work directory (``subject.json``, so later notebooks and a restarted kernel
    see the same choice) and used by the next cells. A form that was changed but not taken, or
    whose values were refused, stops the next cell with the reason rather than falling back to
    the parameters. In a headless run the form is never touched and :attr:`params` are the
    notebook's parameters (or the subject saved for this change earlier). Build it with
    :func:`csr_form`.
    """

    label = "CSR form"

    def __init__(self, params: Params) -> None:
        import ipywidgets as w

        from pgtls_helpers.pki.keys import KEY_TYPES
        from pgtls_helpers.runbook.key_and_csr import saved_subject

        self._given = params
        self._chosen: Params | None = saved_subject(params)
        self._from_file = self._chosen is not None
        self._refused: str | None = None
        shown = self._chosen or params
        style = {"description_width": "190px"}
        wide = w.Layout(width="560px")
        self.inputs: dict[str, Any] = {}
        self._errors: dict[str, Any] = {}
        rows = []
        for f in READING_ORDER:  # the subject's fields, as pki.subject lists them
            name = f.name
            text = w.Text(
                value=getattr(shown, name) or "",
                description=f.label,
                placeholder=f.example,
                style=style,
                layout=wide,
            )
            self.inputs[name] = text
            self._errors[name] = w.HTML()
            rows += [text, self._errors[name]]
        self.inputs["subject_alt_names"] = w.Textarea(
            value="\n".join(shown.subject_alt_names),
            description="Alternative names",
            placeholder="one host name or IP address a line",
            style=style,
            layout=w.Layout(width="560px", height="80px"),
        )
        self._errors["subject_alt_names"] = w.HTML()
        options = list(KEY_TYPES) if shown.key_type in KEY_TYPES else [*KEY_TYPES, shown.key_type]
        self.inputs["key_type"] = w.Dropdown(
            options=options, value=shown.key_type, description="Key type", style=style
        )
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
                f"{esc(params.work.subject)} are used</span>"
            )
        rows += [
            self.inputs["subject_alt_names"],
            self._errors["subject_alt_names"],
            self.inputs["key_type"],
            w.HBox([self.button, self.status]),
        ]
        for name, widget in self.inputs.items():
            widget.observe(self._on_change, names="value")
            if name != "key_type":
                self._check(name)
        self._taken = self._current()
        self.button.on_click(self._on_use)
        self.box = w.VBox([w.HTML("<b>CSR subject</b>"), *rows])

    # the interactive part
    def _current(self) -> dict[str, str]:
        return {name: str(widget.value) for name, widget in self.inputs.items()}

    def _check(self, name: str) -> bool:
        problem = _field_problem(name, self.inputs[name].value)
        self._errors[name].value = (
            ""
            if problem is None
            else f'<span style="color:{BAD};margin-left:196px">{esc(problem)}</span>'
        )
        return problem is None

    def _on_change(self, change: Mapping[str, Any]) -> None:
        owner = change["owner"]
        name = next(n for n, wdg in self.inputs.items() if wdg is owner)
        if name != "key_type":
            self._check(name)
        if self._current() != self._taken:
            self.status.value = (
                f'<span style="color:{WARN}">changed: press "Use these values" to use the '
                "changes</span>"
            )

    def _on_use(self, _button: object = None) -> None:
        from pgtls_helpers.runbook.key_and_csr import save_subject

        try:
            chosen = self.values()
            saved = save_subject(chosen)
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

    def values(self) -> Params:
        """The form's values as parameters (checked; raises :class:`InputError`)."""
        for name in self.inputs:
            if name != "key_type" and not self._check(name):
                raise InputError(_field_problem(name, self.inputs[name].value) or "invalid value")
        sans = tuple(_lines(self.inputs["subject_alt_names"].value))
        subject = subject_from(
            {f.name: self.inputs[f.name].value.strip() or None for f in READING_ORDER}, sans
        )
        chosen: dict[str, Any] = {f.name: getattr(subject, f.name) for f in READING_ORDER}
        return dataclasses.replace(
            self._given,
            **chosen,
            subject_alt_names=sans,
            key_type=str(self.inputs["key_type"].value),
        )

    def _saved_in(self) -> Path:
        return self._given.work.subject


def csr_form(params: Params) -> CsrForm:
    """The CSR subject form for step 1, prefilled from ``params``."""
    return CsrForm(params)


def show_values(form: CsrForm) -> Rendered:
    """The subject and key type step 1 uses, as a plain table, and where they came from."""
    from pgtls_helpers.runbook.key_and_csr import subject_of

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
    return join(heading(f"The CSR is made from {form.source}:"), table(rows))


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
    return join(
        banner(state, OK, "Key and CSR"),
        table(files, mono=("file",)),
        heading("The CSR, as the CA will read it:"),
        pre(result.csr_text),
        banner(todo, INFO, "What to send to the CA"),
    )
