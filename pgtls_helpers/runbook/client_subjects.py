"""The clients of a change, as the client-certificate steps read them, and the choice saved by
step c1's form: ``client_subjects.json`` in the change's work directory.

The parameters' ``clients`` and ``ident_maps`` say who gets a certificate and under which
subject. In JupyterLab, step c1's form (:mod:`pgtls_helpers.display.client_form`) may change a
client's role and subject and the ``pg_ident.conf`` line it needs; *Use these values* saves
them here, and steps c1 to c5 read them back (:func:`clients_used`), so the choice
outlives the kernel and reaches every later step. Without the file the parameters are used as
they are.

The file (``format`` 1)::

    {
      "format": 1,
      "clients": [
        {"os_user": "alice", "role": "alice"},
        {"os_user": "bob", "role": "bob_db", "subject": "CN=bob,OU=dba,O=Example"}
      ],
      "ident_maps": [{"map": "certmap", "system_user": "bob", "role": "bob_db"}]
    }

``clients`` and ``ident_maps`` replace the parameters' lists whole. They are checked the way the
parameters file is (:func:`~pgtls_helpers.runbook.params.load_params`), then the way the steps
read them (each subject as a DN with a CN, each ``pg_ident.conf`` line as step c4 writes it),
by :func:`checked_clients`, the one check the form and the saved file go through. The clients'
OS users must be the parameters' own, in the same order: a file saved for another list of
clients is refused, never half used.

Each step says in its summary which clients it used and where they came from
(:func:`clients_used`, a :class:`~pgtls_helpers.runbook.manifest.ClientsUsed`), and the record
adds what the parameters file says (:func:`said_by_parameters`), so it shows the values used and
the parameters file's as not used.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from pgtls_helpers.errors import InputError
from pgtls_helpers.pki import client as pkiclient
from pgtls_helpers.postgres import files, ident
from pgtls_helpers.runbook.manifest import ClientSubject, ClientsUsed, IdentMap
from pgtls_helpers.runbook.params import Params, load_params

__all__ = [
    "FORMAT",
    "ClientChoice",
    "ClientEntry",
    "checked_clients",
    "client_entries",
    "clients_used",
    "describe_clients",
    "said_by_parameters",
    "save_clients",
    "saved_clients",
]

FORMAT = 1
_AGAIN = 'press "Use these values" in step c1 again, or delete it to use the parameters'


@dataclass(frozen=True)
class ClientEntry:
    """One entry of ``params.clients``, with the subject its certificate must carry."""

    os_user: str
    role: str
    subject: x509.Name


def client_entries(params: Params) -> list[ClientEntry]:
    """The clients of ``params``, each with its subject: ``CN=<role>`` or the DN given.

    Raises:
        InputError: no client is listed, an OS user name could not name a folder, or a subject
            is not a DN with a CN.
    """
    if not params.clients:
        raise InputError(
            "clients is empty: list each client as {os_user, role} (and subject, for a DN "
            "other than CN=<role>)"
        )
    out = []
    for i, entry in enumerate(params.clients):
        os_user, role = str(entry["os_user"]), str(entry["role"])
        # the name becomes a folder of the work directory
        if "/" in os_user or os_user.startswith(".") or "\0" in os_user:
            raise InputError(
                f"clients[{i}]: os_user {os_user!r} is not an OS user name; name the client's "
                "OS user"
            )
        raw = entry.get("subject")
        subject = pkiclient.client_subject(role, str(raw) if raw else None)
        out.append(ClientEntry(os_user, role, subject))
    return out


def checked_clients(
    params: Params,
    clients: Sequence[Mapping[str, object]],
    ident_maps: Sequence[Mapping[str, object]],
    *,
    source: str,
) -> Params:
    """``params`` with these ``clients`` and ``ident_maps``, checked as the parameters file is
    and as the steps read them; ``source`` starts every refusal.

    Raises:
        InputError: one sentence naming the field and the fix.
    """
    plain = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
    plain.update(clients=[dict(c) for c in clients], ident_maps=[dict(m) for m in ident_maps])
    chosen = load_params(plain, source=source)
    try:
        client_entries(chosen)
        ident.parse_maps(list(chosen.ident_maps))
    except InputError as exc:
        raise InputError(f"{source}: {exc}") from None
    return chosen


@dataclass(frozen=True)
class ClientChoice:
    """What ``client_subjects.json`` holds: the clients and the ``pg_ident.conf`` lines."""

    clients: tuple[Mapping[str, str], ...]
    ident_maps: tuple[Mapping[str, str], ...]

    @classmethod
    def of(cls, params: Params) -> ClientChoice:
        def strings(items: Sequence[Mapping[str, object]]) -> tuple[dict[str, str], ...]:
            return tuple({str(k): str(v) for k, v in i.items() if v is not None} for i in items)

        return cls(strings(params.clients), strings(params.ident_maps))

    def to_json(self) -> str:
        data = {
            "format": FORMAT,
            "clients": [dict(c) for c in self.clients],
            "ident_maps": [dict(m) for m in self.ident_maps],
        }
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str) -> ClientChoice:
        """Read the file's text; ``source`` names it in a refusal.

        Raises:
            InputError: not JSON, another format, or not lists of string fields.
        """
        try:
            data: Any = json.loads(text)
        except ValueError as exc:
            raise InputError(
                f"{source}: not what the client form saves ({exc}); {_AGAIN}"
            ) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InputError(f"{source}: not a format {FORMAT} client form file; {_AGAIN}")
        lists = []
        for name in ("clients", "ident_maps"):
            items = data.get(name)
            if not isinstance(items, list) or not all(
                isinstance(i, dict) and all(isinstance(v, str) for v in i.values()) for i in items
            ):
                raise InputError(
                    f"{source}: {name} is not a list of fields as the client form saves it; "
                    f"{_AGAIN}"
                )
            lists.append(tuple(items))
        return cls(lists[0], lists[1])


def save_clients(params: Params) -> Path:
    """Write the clients and ``pg_ident.conf`` lines of ``params`` to ``client_subjects.json``
    (renamed into place whole; the work directory is checked as ours first)."""
    params.work.create()
    path = params.work.client_subjects
    files.atomic_write(path, ClientChoice.of(params).to_json().encode(), mode=0o644)
    return path


def saved_clients(params: Params) -> Params | None:
    """``params`` with the clients saved by the form for this change, or None when none were.

    Raises:
        InputError: the file is damaged, fails the parameters' checks, or was saved for other
            client OS users than the parameters list.
    """
    path = params.work.client_subjects
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot be read ({exc}); {_AGAIN}") from None
    choice = ClientChoice.from_json(text, source=str(path))
    saved = [c.get("os_user") for c in choice.clients]
    listed = [c.get("os_user") for c in params.clients]
    if saved != listed:
        raise InputError(
            f"{path}: saved for the clients {', '.join(map(str, saved)) or '(none)'}, but the "
            f"parameters list {', '.join(map(str, listed)) or '(none)'}; {_AGAIN}"
        )
    return checked_clients(params, choice.clients, choice.ident_maps, source=str(path))


def clients_used(params: Params) -> tuple[Params, ClientsUsed]:
    """``params`` with the form's saved clients when there are, else as they are; and what a
    step's summary says of them: the clients and ``pg_ident.conf`` lines used and where they
    came from.

    What the parameters file says is left out: step c1 is handed the form's values, so a step
    cannot tell; the record adds it (:func:`said_by_parameters`).

    Raises:
        InputError: as :func:`saved_clients`.
    """
    saved = saved_clients(params)
    if saved is None:
        return params, describe_clients(params, saved_in=None)
    return saved, describe_clients(saved, saved_in=params.work.client_subjects)


def describe_clients(params: Params, *, saved_in: Path | None) -> ClientsUsed:
    """The clients and ``pg_ident.conf`` lines of ``params``; ``saved_in``: the form's file
    they came from (None: the parameters)."""
    return ClientsUsed(
        saved_in=str(saved_in) if saved_in is not None else None,
        clients=_subjects(params),
        ident_maps=_maps(params),
    )


def said_by_parameters(used: ClientsUsed, given: Params) -> ClientsUsed:
    """``used`` with what the parameters file's values ``given`` say, when the form's values
    replaced them."""
    if not used.from_form:
        return used
    return dataclasses.replace(
        used, parameters_clients=_subjects(given), parameters_ident_maps=_maps(given)
    )


def _subjects(params: Params) -> tuple[ClientSubject, ...]:
    out = []
    for entry in params.clients:
        role, raw = str(entry["role"]), entry.get("subject")
        try:
            subject = pkiclient.rfc4514_dn(
                pkiclient.client_subject(role, str(raw) if raw else None)
            )
        except InputError:  # a parameters file's subject the form replaced: as it was written
            subject = str(raw)
        out.append(ClientSubject(str(entry["os_user"]), role, subject))
    return tuple(out)


def _maps(params: Params) -> tuple[IdentMap, ...]:
    return tuple(
        IdentMap(str(m.get("map", "")), str(m.get("system_user", "")), str(m.get("role", "")))
        for m in params.ident_maps
    )
