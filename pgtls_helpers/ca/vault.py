"""``ca_mode: vault``: Vault's or OpenBao's PKI secrets engine signs the CSR
(``POST <mount>/sign/<role>``).

``ca_settings``::

    address: https://vault.example.com:8200
    mount: pki                 # the PKI engine's path (default pki)
    role: postgres-server      # the role whose policy the certificate follows
    token_env: VAULT_TOKEN     # the token by reference: a variable, or
    # token_file: /etc/pgtls/vault-token
    # approle_role_id_env: VAULT_ROLE_ID, approle_secret_id_env: VAULT_SECRET_ID
    #   AppRole login instead of a token: the variables holding role_id and secret_id
    ca_bundle: /etc/pgtls/vault-ca.pem   # to verify the Vault server's TLS
    ttl: 2160h                 # optional: the certificate's lifetime (the role caps it)
    timeout: 30

The CSR's names are sent as the request's ``common_name``, ``alt_names`` and ``ip_sans``;
Vault's answer (the certificate, the issuing CA and the chain) is written as PEM files for step
2. The record names the address, mount, role and the certificate's serial, never the token.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgtls_helpers.ca import (
    CaRefused,
    CaUnavailable,
    Signed,
    SignRequest,
    known_settings,
    text_setting,
)
from pgtls_helpers.errors import InputError

__all__ = ["VaultCA"]

_KNOWN = (
    "address",
    "mount",
    "role",
    "token_env",
    "token_file",
    "approle_role_id_env",
    "approle_secret_id_env",
    "ca_bundle",
    "ttl",
    "timeout",
)


@dataclass(frozen=True)
class VaultCA:
    """A Vault (or OpenBao) PKI role that signs CSRs; secrets only by reference."""

    address: str
    mount: str
    role: str
    token_env: str | None = None
    token_file: str | None = None
    approle: tuple[str, str] | None = None  # the variables holding role_id and secret_id
    ca_bundle: str | None = None
    ttl: str | None = None
    timeout: float = 30.0

    @property
    def name(self) -> str:
        return f"vault {self.address} {self.mount}/sign/{self.role}"

    @classmethod
    def from_settings(cls, settings: Mapping[str, object], source: str) -> VaultCA:
        known_settings(settings, _KNOWN, source, mode="vault")
        address = text_setting(settings, "address", source, mode="vault")
        if not address.startswith(("https://", "http://")):
            raise InputError(f"{source}: ca_settings.address must be an http(s):// URL")
        ways = [k for k in ("token_env", "token_file", "approle_role_id_env") if settings.get(k)]
        if len(ways) != 1:
            raise InputError(
                f"{source}: ca_settings needs exactly one of token_env, token_file or "
                "approle_role_id_env (with approle_secret_id_env); secrets are named, never given"
            )
        approle = None
        if settings.get("approle_role_id_env"):
            approle = (
                text_setting(settings, "approle_role_id_env", source, mode="vault"),
                text_setting(settings, "approle_secret_id_env", source, mode="vault"),
            )
        bundle = settings.get("ca_bundle")
        if bundle is not None and not Path(str(bundle)).is_file():
            raise InputError(f"{source}: ca_settings.ca_bundle {bundle} is not a file")
        timeout = settings.get("timeout", 30)
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
            raise InputError(f"{source}: ca_settings.timeout must be a number of seconds above 0")
        return cls(
            address=address.rstrip("/"),
            mount=text_setting(settings, "mount", source, mode="vault", default="pki").strip("/"),
            role=text_setting(settings, "role", source, mode="vault"),
            token_env=str(settings["token_env"]) if settings.get("token_env") else None,
            token_file=str(settings["token_file"]) if settings.get("token_file") else None,
            approle=approle,
            ca_bundle=str(bundle) if bundle else None,
            ttl=str(settings["ttl"]) if settings.get("ttl") else None,
            timeout=float(timeout),
        )

    def _secret(self, env: str, what: str) -> str:
        value = os.environ.get(env, "").strip()
        if not value:
            raise CaRefused(f"{what}: the variable {env} is empty or unset; set it and run again")
        return value

    def _client(self) -> Any:
        import hvac

        client = hvac.Client(url=self.address, verify=self.ca_bundle or True, timeout=self.timeout)
        if self.token_env:
            client.token = self._secret(self.token_env, "the Vault token")
        elif self.token_file:
            try:
                client.token = Path(self.token_file).read_text().strip()
            except OSError as exc:
                raise CaRefused(
                    f"the Vault token file {self.token_file} cannot be read ({exc.strerror})"
                ) from None
        elif self.approle:
            self._login(client, *self.approle)
        return client

    def _login(self, client: Any, role_id_env: str, secret_id_env: str) -> None:
        """AppRole's login: its token stays in ``client``; a refusal names the variables."""
        import hvac.exceptions

        role_id = self._secret(role_id_env, "the AppRole role_id")
        secret_id = self._secret(secret_id_env, "the AppRole secret_id")
        try:
            client.auth.approle.login(role_id=role_id, secret_id=secret_id)
        except hvac.exceptions.VaultDown:
            raise
        except hvac.exceptions.VaultError as exc:
            why = "; ".join(str(e) for e in (exc.errors or [])) or str(exc).splitlines()[0]
            for secret in (secret_id, role_id):  # a server may echo what it was sent
                why = why.replace(secret, "…")
            raise CaRefused(
                f"Vault at {self.address} refused the AppRole login of {role_id_env} and "
                f"{secret_id_env}: {why[:300]}; check both variables, nothing was installed"
            ) from None

    def sign(self, request: SignRequest, out: Path) -> Signed:
        import hvac.exceptions
        import requests

        dns, ips = [], []
        for name in request.names:
            try:
                ipaddress.ip_address(name)
                ips.append(name)
            except ValueError:
                if name.lower() != request.common_name.lower():
                    dns.append(name)
        extra: dict[str, str] = {"format": "pem"}
        if dns:
            extra["alt_names"] = ",".join(dns)
        if ips:
            extra["ip_sans"] = ",".join(ips)
        if self.ttl:
            extra["ttl"] = self.ttl
        where = f"Vault at {self.address} ({self.mount}/sign/{self.role})"
        try:
            answer = self._client().secrets.pki.sign_certificate(
                name=self.role,
                csr=request.csr_pem.decode(),
                common_name=request.common_name,
                extra_params=extra,
                mount_point=self.mount,
            )
        except (requests.ConnectionError, requests.Timeout, hvac.exceptions.VaultDown) as exc:
            raise CaUnavailable(
                f"{where} is not reachable ({type(exc).__name__.lower()}); nothing was "
                "installed, run again later"
            ) from None
        except hvac.exceptions.VaultError as exc:
            why = "; ".join(str(e) for e in (exc.errors or [])) or str(exc).splitlines()[0]
            raise CaRefused(
                f"{where} refused the CSR: {why[:300]}; nothing was installed"
            ) from None
        data = answer.get("data") or {}
        certificate = data.get("certificate")
        if not certificate:
            raise CaRefused(f"{where} answered without a certificate; nothing was installed")
        out.mkdir(mode=0o700, exist_ok=True)
        files = [out / "certificate.pem"]
        files[0].write_text(certificate.strip() + "\n")
        chain = [c for c in (data.get("ca_chain") or []) if c] or [data.get("issuing_ca") or ""]
        chain = [c.strip() + "\n" for c in chain if c.strip()]
        if chain:
            files.append(out / "ca_chain.pem")
            files[1].write_text("".join(chain))
        return Signed(
            files=tuple(files), ca=self.name, reference=f"serial {data.get('serial_number')}"
        )
