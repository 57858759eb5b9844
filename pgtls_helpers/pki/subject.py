"""The subject of a server CSR: distinguished-name fields and subject alternative names.

:data:`SUBJECT_FIELDS` is the one list of the fields a server CSR's subject may carry: each
field's name (the parameter, the form's input, the key in ``subject.json``), its OID, the label a
person reads, openssl's short name, an example value and RFC 5280's upper bound. Everything that
builds, checks, shows or reads a subject goes through it.

Build a :class:`Subject` with :func:`make_subject`, which checks every field and returns it
normalized (or raises :class:`~pgtls_helpers.errors.InputError` with one sentence).

>>> s = make_subject("db1.example.com", country="us", organization="Example Corp",
...                  sans=["DB1.example.com", "db1", "10.0.0.5"])
>>> s.sans
('db1.example.com', 'db1', '10.0.0.5')
>>> s.to_x509_name().rfc4514_string()
'CN=db1.example.com,O=Example Corp,C=US'
>>> s.fields()[:2]
[('Common name (CN)', 'db1.example.com'), ('Country (C)', 'US')]
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from pgtls_helpers.errors import InputError

__all__ = [
    "READING_ORDER",
    "SUBJECT_FIELDS",
    "Subject",
    "SubjectField",
    "is_dns_name",
    "is_ip_literal",
    "make_subject",
    "subject_from",
]


@dataclass(frozen=True)
class SubjectField:
    """One attribute of a server CSR's subject (a row of :data:`SUBJECT_FIELDS`)."""

    name: str  # the parameter, the form's input and the key in subject.json
    oid: x509.ObjectIdentifier
    label: str  # what a person reads, in the form, the CSR summary and messages
    short: str  # openssl's short name, as `openssl req -subject` prints it
    example: str  # the form's placeholder
    max_length: int | None  # RFC 5280, Appendix A.1 (characters); None: checked otherwise


# In the order `openssl req` writes a subject (C first, CN after OU, emailAddress last); people
# read the common name first (:data:`READING_ORDER`), because it is the one clients compare.
SUBJECT_FIELDS: tuple[SubjectField, ...] = (
    SubjectField("country", NameOID.COUNTRY_NAME, "Country (C)", "C", "US", None),
    SubjectField(
        "state", NameOID.STATE_OR_PROVINCE_NAME, "State or province (ST)", "ST", "Pennsylvania", 128
    ),
    SubjectField("locality", NameOID.LOCALITY_NAME, "Locality (L)", "L", "Malvern", 128),
    SubjectField(
        "organization", NameOID.ORGANIZATION_NAME, "Organization (O)", "O", "Example Corp", 64
    ),
    SubjectField(
        "organizational_unit",
        NameOID.ORGANIZATIONAL_UNIT_NAME,
        "Organizational unit (OU)",
        "OU",
        "Databases",
        64,
    ),
    SubjectField(
        "common_name", NameOID.COMMON_NAME, "Common name (CN)", "CN", "db1.example.com", 64
    ),
    SubjectField(
        "email", NameOID.EMAIL_ADDRESS, "Email address", "emailAddress", "dba@example.com", 255
    ),
)
READING_ORDER: tuple[SubjectField, ...] = tuple(
    sorted(SUBJECT_FIELDS, key=lambda f: f.name != "common_name")
)
_BY_NAME = {f.name: f for f in SUBJECT_FIELDS}
# RFC 5280, Appendix A.1: upper bounds of the attributes a server CSR uses (characters).
UPPER_BOUNDS = {f.name: f.max_length for f in SUBJECT_FIELDS if f.max_length is not None}

_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+\Z")


@dataclass(frozen=True)
class Subject:
    """What a server CSR names: the fields of :data:`SUBJECT_FIELDS` plus subject alternative
    names.

    Build it with :func:`make_subject`; a ``Subject`` built directly is not checked until
    :meth:`validate` runs. ``sans`` holds every alternative name, the CN first when the CN is a
    host name or an IP literal.
    """

    common_name: str
    country: str | None = None
    state: str | None = None
    locality: str | None = None
    organization: str | None = None
    organizational_unit: str | None = None
    email: str | None = None
    sans: tuple[str, ...] = ()

    def values(self) -> dict[str, str | None]:
        """The fields of :data:`SUBJECT_FIELDS` by name, in reading order (CN first)."""
        return {f.name: getattr(self, f.name) for f in READING_ORDER}

    def validate(self, *, for_verify_full: bool = True) -> Subject:
        """Return a checked and normalized copy (raises :class:`InputError`)."""
        return _checked(self.values(), self.sans, for_verify_full=for_verify_full)

    def alt_names(self) -> tuple[str, ...]:
        """The SAN list a CSR carries: the CN (when it is a name or IP) first, no duplicates."""
        head = (self.common_name,) if _is_san_value(self.common_name) else ()
        return _dedupe(head + tuple(self.sans))

    def to_x509_name(self) -> x509.Name:
        """The distinguished name, in the order ``openssl req`` writes it (C first, CN last)."""
        return x509.Name(
            [
                x509.NameAttribute(f.oid, value)
                for f in SUBJECT_FIELDS
                if (value := getattr(self, f.name))
            ]
        )

    def san_extension(self) -> x509.SubjectAlternativeName:
        """IP literals become ``IPAddress`` entries, everything else ``DNSName``.

        >>> [type(g).__name__ for g in make_subject("db1", sans=["::1"]).san_extension()]
        ['DNSName', 'IPAddress']
        """
        names: list[x509.GeneralName] = []
        for value in self.alt_names():
            ip = _ip(value)
            names.append(x509.IPAddress(ip) if ip is not None else x509.DNSName(value))
        return x509.SubjectAlternativeName(names)

    def fields(self) -> list[tuple[str, str]]:
        """``(label, value)`` pairs of the fields that are set, for display."""
        out = [(f.label, value) for f in READING_ORDER if (value := getattr(self, f.name))]
        out.append(("Subject alternative names", ", ".join(self.alt_names()) or "(none)"))
        return out


def make_subject(
    common_name: str,
    *,
    country: str | None = None,
    state: str | None = None,
    locality: str | None = None,
    organization: str | None = None,
    organizational_unit: str | None = None,
    email: str | None = None,
    sans: Iterable[str] = (),
    for_verify_full: bool = True,
) -> Subject:
    """Check the fields and return a normalized :class:`Subject`.

    Empty strings count as "not given"; surrounding blanks are dropped; the country is
    upper-cased. With ``for_verify_full`` (the default) the CN must be a DNS host name (an
    optional leading ``*.`` wildcard) or an IP literal, because clients using
    ``sslmode=verify-full`` compare it with the host they connect to.

    Raises:
        InputError: a field is out of bounds or malformed; the message names the field.

    >>> make_subject("db1.example.com", country="USA")
    Traceback (most recent call last):
    ...
    pgtls_helpers.errors.InputError: Country (C) must be two letters A-Z, like US or DE; got 'USA'.
    >>> make_subject("my db", for_verify_full=False).sans
    ()
    """
    given = Subject(
        common_name=common_name,
        country=country,
        state=state,
        locality=locality,
        organization=organization,
        organizational_unit=organizational_unit,
        email=email,
    )
    return _checked(given.values(), sans, for_verify_full=for_verify_full)


def subject_from(
    values: Mapping[str, str | None], sans: Iterable[str] = (), *, for_verify_full: bool = True
) -> Subject:
    """:func:`make_subject` from the fields of :data:`SUBJECT_FIELDS` by name (a missing one is
    not given); other names in ``values`` are not looked at.

    >>> subject_from({"common_name": "db1.example.com", "country": "de", "key_type": "rsa4096"})
    Subject(common_name='db1.example.com', country='DE', state=None, locality=None, \
organization=None, organizational_unit=None, email=None, sans=('db1.example.com',))
    """
    return _checked(
        {f.name: values.get(f.name) for f in READING_ORDER}, sans, for_verify_full=for_verify_full
    )


def _checked(
    given: dict[str, str | None], sans: Iterable[str], *, for_verify_full: bool
) -> Subject:
    """The checks of :func:`make_subject`, field by field as :data:`SUBJECT_FIELDS` says."""
    values = {name: _clean(value) for name, value in given.items()}
    cn = values["common_name"]
    if not cn:
        raise InputError(
            f"{_BY_NAME['common_name'].label} is empty; give the host name clients connect to."
        )
    for f in READING_ORDER:
        value = values[f.name]
        if value is None:
            continue
        bad = next((ch for ch in value if ord(ch) < 0x20 or ord(ch) == 0x7F), None)
        if bad is not None:
            raise InputError(f"{f.label} contains a control character; remove it.")
        if f.max_length is not None and len(value) > f.max_length:
            raise InputError(
                f"{f.label} is {len(value)} characters long; RFC 5280 allows at most "
                f"{f.max_length}."
            )

    c = values["country"]
    if c is not None:
        c = c.upper()
        if not re.fullmatch(r"[A-Z]{2}", c):
            raise InputError(
                f"{_BY_NAME['country'].label} must be two letters A-Z, like US or DE; got "
                f"{values['country']!r}."
            )
        values["country"] = c
    e = values["email"]
    if e is not None and (not e.isascii() or not _EMAIL.match(e)):
        raise InputError(f"{_BY_NAME['email'].label} {e!r} is not an address like dba@example.com.")

    if for_verify_full:
        problem = _name_problem(cn, allow_wildcard=True)
        if problem:
            raise InputError(
                f"{_BY_NAME['common_name'].label} {cn!r} {problem}; with sslmode=verify-full "
                "clients compare it with the host name they connect to."
            )
        cn = _normalize_san(cn)
        values["common_name"] = cn

    alt: list[str] = []
    for raw in sans:
        san = _clean(raw)
        if not san:
            continue
        problem = _name_problem(san, allow_wildcard=True)
        if problem:
            raise InputError(f"Subject alternative name {san!r} {problem}.")
        alt.append(_normalize_san(san))
    head = (cn,) if _is_san_value(cn) else ()
    checked: dict[str, Any] = {**values, "common_name": cn}
    return Subject(**checked, sans=_dedupe(head + tuple(alt)))


def is_ip_literal(value: str) -> bool:
    """True for an IPv4 dotted quad or an IPv6 address (no zone index).

    >>> is_ip_literal("10.0.0.5"), is_ip_literal("::1"), is_ip_literal("10.1")
    (True, True, False)
    """
    return _ip(value) is not None


def is_dns_name(value: str, *, allow_wildcard: bool = True) -> bool:
    """True for an LDH host name, optionally with one leading ``*.`` label.

    >>> is_dns_name("db1.example.com"), is_dns_name("*.example.com"), is_dns_name("db_1")
    (True, True, False)
    >>> is_dns_name("a.*.example.com"), is_dns_name("*.com"), is_dns_name("10.1.2")
    (False, False, False)
    """
    return _name_problem(value, allow_wildcard=allow_wildcard, allow_ip=False) is None


# --- internals -------------------------------------------------------------------------------


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    value = str(value).strip()
    return value or None


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        return None
    return ip


def _is_san_value(value: str) -> bool:
    return _name_problem(value, allow_wildcard=True) is None


def _normalize_san(value: str) -> str:
    ip = _ip(value)
    return str(ip) if ip is not None else value


def _dedupe(values: Iterable[str]) -> tuple[str, ...]:
    seen: set[str] = set()
    out: list[str] = []
    for v in values:
        k = v.lower()
        if k not in seen:
            seen.add(k)
            out.append(v)
    return tuple(out)


def _name_problem(value: str, *, allow_wildcard: bool, allow_ip: bool = True) -> str | None:
    """``None`` when ``value`` is a usable host name (or IP literal), else what is wrong."""
    if allow_ip and _ip(value) is not None:
        return None
    if "%" in value and _ip(value.split("%", 1)[0]) is not None:
        return "carries an IPv6 zone index, which certificates cannot hold"
    if not value.isascii():
        try:
            alabel = value.encode("idna").decode("ascii")
        except UnicodeError:
            return "is not a valid host name"
        return f"is not ASCII; write it in its DNS form {alabel!r}"
    if value.endswith("."):
        return "ends with a dot; write it without the trailing dot"
    if len(value) > 253:
        return "is longer than the 253 characters a DNS name may have"
    labels = value.split(".")
    if labels[0] == "*":
        if not allow_wildcard:
            return "is a wildcard, which is not allowed here"
        if len(labels) < 3:
            return "is a wildcard over a top-level domain; use at least *.example.com"
        labels = labels[1:]
    for label in labels:
        if "*" in label:
            return "has a wildcard that is not a whole leading '*.' label"
        if not _LDH_LABEL.match(label):
            return (
                "is not a host name (labels of letters, digits and inner hyphens, 1-63 "
                "characters, separated by dots)"
            )
    if labels[-1].isdigit():
        return "looks like an IP address but is not one (clients would read it as an address)"
    return None
