"""Certificate authorities that sign a CSR with no person carrying it: one interface, several
back-ends, chosen by ``ca_mode`` and configured by ``ca_settings`` in the parameters.

A back-end takes the change's CSR and the names it must carry, asks its CA, and writes what the
CA returned (the certificate, the chain, the root when the CA gives it) as files into a folder;
step 2 then reads those files with the same intake, chain order and trust verdict as files a
person brought, so a back-end cannot smuggle a bad chain past step 2. Settings name secrets only
by reference (an environment variable or a file), never by value, and no secret reaches a record,
a log or an exception.

``acme`` orders from an ACME CA (RFC 8555) and answers its http-01 challenge, or its dns-01
challenge through a hook that publishes the TXT record; ``command`` runs
any program (step-ca, cfssl, EJBCA's client, ``openssl ca``, an in-house script) with ``{csr}``
and ``{out}`` in its arguments; ``vault`` signs through the ``pki/sign/<role>`` API of Vault or
OpenBao.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pgtls_helpers.errors import InputError, PgtlsError

__all__ = [
    "BACKENDS",
    "Backend",
    "CaError",
    "CaRefused",
    "CaUnavailable",
    "SignRequest",
    "Signed",
    "backend_for",
]


class CaError(PgtlsError):
    """The CA did not sign; nothing was installed and the server is untouched."""

    exit_code = 1
    kind = "failed"


class CaUnavailable(CaError):
    """The CA could not be reached, or did not answer in time: try again later."""

    exit_code = 4
    kind = "unavailable"


class CaRefused(CaError):
    """The CA answered and refused: policy, role, rate limit, credentials."""

    exit_code = 5
    kind = "refused"


@dataclass(frozen=True)
class SignRequest:
    """What the CA is asked to sign: the CSR as the CA reads it, and the names it must carry."""

    csr_pem: bytes
    common_name: str
    names: tuple[str, ...]  # DNS names and IP addresses (the CN among them)
    change_id: str
    state_dir: Path | None = None  # where a back-end keeps what lasts between changes (0700)


@dataclass(frozen=True)
class Signed:
    """What the CA returned, as files step 2 reads, and what the record says about it."""

    files: tuple[Path, ...]
    ca: str  # which CA signed, e.g. "vault https://vault:8200 pki/sign/pg"
    reference: str | None  # the CA's serial or order, never a token


class Backend(Protocol):
    """A CA that signs: ``sign`` writes the CA's answer into ``out`` (an empty folder)."""

    @property
    def name(self) -> str: ...

    def sign(self, request: SignRequest, out: Path) -> Signed: ...


def _command(settings: Mapping[str, object], source: str) -> Backend:
    from pgtls_helpers.ca.command import CommandCA

    return CommandCA.from_settings(settings, source)


def _acme(settings: Mapping[str, object], source: str) -> Backend:
    from pgtls_helpers.ca.acme import AcmeCA

    return AcmeCA.from_settings(settings, source)


def _vault(settings: Mapping[str, object], source: str) -> Backend:
    from pgtls_helpers.ca.vault import VaultCA

    return VaultCA.from_settings(settings, source)


# ca_mode -> how its settings become a back-end (raises InputError naming the setting)
BACKENDS: dict[str, Callable[[Mapping[str, object], str], Backend]] = {
    "acme": _acme,
    "command": _command,
    "vault": _vault,
}


def backend_for(mode: str, settings: Mapping[str, object], source: str) -> Backend:
    """The back-end of ``ca_mode`` with its ``ca_settings``; :class:`InputError` (one sentence
    naming ``source`` and the setting) when they are unusable."""
    make = BACKENDS.get(mode)
    if make is None:
        raise InputError(
            f"{source}: ca_mode '{mode}' is not one of lab, files, {', '.join(BACKENDS)}"
        )
    return make(settings, source)


def text_setting(
    settings: Mapping[str, object], name: str, source: str, *, mode: str, default: str | None = None
) -> str:
    """A required (or defaulted) text setting of ``ca_settings``."""
    value = settings.get(name, default)
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{source}: ca_settings.{name} is missing; ca_mode {mode} needs it")
    return value.strip()


def known_settings(
    settings: Mapping[str, object], known: tuple[str, ...], source: str, *, mode: str
) -> None:
    unknown = sorted(str(k) for k in settings if k not in known)
    if unknown:
        raise InputError(
            f"{source}: ca_settings: {', '.join(unknown)} is not a setting of ca_mode {mode}; "
            f"its settings are {', '.join(known)}"
        )
