"""``ca_mode: acme``: an ACME CA (RFC 8555: Let's Encrypt, an internal step-ca or Smallstep,
Pebble) signs the CSR after this host answers its ``http-01`` challenge, or after a hook of
yours publishes its ``dns-01`` TXT record.

``ca_settings``::

    directory: https://acme.example.com/directory
    ca_bundle: /etc/pgtls/acme-ca.pem   # to verify the ACME server's TLS (default: the system's)
    account_key: acme-account.key       # kept in the work root, 0600, made on first use
    email: dba@example.com              # optional contact for the account
    http_port: 80                       # where this host answers http-01 (the CA connects here)
    http_address: 0.0.0.0
    root_file: /etc/pgtls/acme-root.pem # the root above the chain the CA returns, or
    # root_url: https://acme.example.com/roots/0
    eab_kid_env: ACME_EAB_KID           # External Account Binding, when the CA asks for it:
    eab_hmac_env: ACME_EAB_HMAC         # the variables holding its key id and HMAC key
    timeout: 120
    challenge: http-01                  # or dns-01, with:
    dns_hook: [/usr/local/bin/acme-dns, "{action}", "{name}", "{value}"]
    dns_timeout: 60                     # seconds for one run of the hook
    dns_propagation_seconds: 0          # wait after the last present, before the CA looks

With ``http-01`` the challenge is answered by a small HTTP server of this process for as long
as the order takes. With ``dns-01`` the hook runs (no shell, this process's environment, so its
DNS credentials come from its environment or files it reads itself; pgtls puts no secret in its
arguments) once with ``{action}`` = ``present`` for every name before the CA is asked to look,
and once with ``cleanup`` for every name afterwards, also when the order failed. Its other
placeholders are ``{domain}`` (the name, ``*.`` removed), ``{name}`` (``_acme-challenge.`` and
the domain) and ``{value}`` (the TXT record's value, base64url of the SHA-256 of the key
authorization). A hook that exits 75 (EX_TEMPFAIL) or runs longer than ``dns_timeout`` makes
the CA unavailable (exit 4); any other failure is refused (exit 5); both say which name and the
last line of its stderr. A cleanup that fails after an issued order is refused too: the
certificate is not installed until the hook works. An IP address cannot be validated by
``dns-01``.

The account key is the only thing kept between runs. The record names the directory and the
order, never a key.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pgtls_helpers.ca import (
    CaError,
    CaRefused,
    CaUnavailable,
    Signed,
    SignRequest,
    known_settings,
    text_setting,
)
from pgtls_helpers.errors import InputError

__all__ = ["AcmeCA"]


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


_KNOWN = (
    "directory",
    "ca_bundle",
    "account_key",
    "email",
    "http_port",
    "http_address",
    "root_file",
    "root_url",
    "eab_kid_env",
    "eab_hmac_env",
    "timeout",
    "challenge",
    "dns_hook",
    "dns_timeout",
    "dns_propagation_seconds",
)
_DNS_ONLY = ("dns_hook", "dns_timeout", "dns_propagation_seconds")
_PLACEHOLDERS = ("{action}", "{domain}", "{name}", "{value}")


def _seconds(settings: Mapping[str, object], name: str, source: str, default: float) -> float:
    value = settings.get(name, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise InputError(f"{source}: ca_settings.{name} must be a number of seconds")
    return float(value)


def _hook(settings: Mapping[str, object], source: str) -> tuple[str, ...]:
    raw = settings.get("dns_hook")
    if (
        isinstance(raw, str)
        or not isinstance(raw, Sequence)
        or not raw
        or not all(isinstance(a, str) and a for a in raw)
    ):
        raise InputError(
            f"{source}: ca_settings.dns_hook is missing; challenge dns-01 needs the hook's "
            'program and arguments as a list, e.g. [acme-dns, "{action}", "{name}", "{value}"]'
        )
    argv = tuple(str(a) for a in raw)
    for needed in ("{action}", "{value}"):
        if not any(needed in a for a in argv):
            raise InputError(
                f"{source}: ca_settings.dns_hook never names {needed}; the hook must be told "
                "whether to present or clean up the TXT record, and its value"
            )
    return argv


@dataclass(frozen=True)
class AcmeCA:
    """An ACME directory and how this host proves it controls the names (http-01)."""

    directory: str
    account_key: str
    ca_bundle: str | None = None
    email: str | None = None
    http_port: int = 80
    http_address: str = "0.0.0.0"
    root_file: str | None = None
    root_url: str | None = None
    eab: tuple[str, str] | None = None
    timeout: float = 120.0
    challenge: str = "http-01"
    dns_hook: tuple[str, ...] = ()
    dns_timeout: float = 60.0
    dns_propagation_seconds: float = 0.0

    @property
    def name(self) -> str:
        return f"acme {self.directory}"

    @classmethod
    def from_settings(cls, settings: Mapping[str, object], source: str) -> AcmeCA:
        known_settings(settings, _KNOWN, source, mode="acme")
        directory = text_setting(settings, "directory", source, mode="acme")
        if not directory.startswith("https://"):
            raise InputError(f"{source}: ca_settings.directory must be an https:// URL")
        for name in ("ca_bundle", "root_file"):
            value = settings.get(name)
            if value is not None and not Path(str(value)).is_file():
                raise InputError(f"{source}: ca_settings.{name} {value} is not a file")
        port = settings.get("http_port", 80)
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise InputError(f"{source}: ca_settings.http_port must be a port number")
        eab = None
        if settings.get("eab_kid_env") or settings.get("eab_hmac_env"):
            eab = (
                text_setting(settings, "eab_kid_env", source, mode="acme"),
                text_setting(settings, "eab_hmac_env", source, mode="acme"),
            )
        timeout = settings.get("timeout", 120)
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
            raise InputError(f"{source}: ca_settings.timeout must be a number of seconds above 0")
        challenge = settings.get("challenge", "http-01")
        if challenge not in ("http-01", "dns-01"):
            raise InputError(
                f"{source}: ca_settings.challenge '{challenge}' is not http-01 or dns-01"
            )
        dns: dict[str, Any] = {}
        if challenge == "dns-01":
            dns["dns_hook"] = _hook(settings, source)
            dns["dns_timeout"] = _seconds(settings, "dns_timeout", source, 60)
            if dns["dns_timeout"] <= 0:
                raise InputError(f"{source}: ca_settings.dns_timeout must be above 0 seconds")
            dns["dns_propagation_seconds"] = _seconds(
                settings, "dns_propagation_seconds", source, 0
            )
        elif given := [k for k in _DNS_ONLY if k in settings]:
            raise InputError(
                f"{source}: ca_settings.{given[0]} is for challenge dns-01; set "
                "ca_settings.challenge: dns-01 or remove it"
            )
        return cls(
            directory=directory,
            account_key=text_setting(
                settings, "account_key", source, mode="acme", default="acme-account.key"
            ),
            ca_bundle=str(settings["ca_bundle"]) if settings.get("ca_bundle") else None,
            email=str(settings["email"]) if settings.get("email") else None,
            http_port=port,
            http_address=str(settings.get("http_address") or "0.0.0.0"),
            root_file=str(settings["root_file"]) if settings.get("root_file") else None,
            root_url=str(settings["root_url"]) if settings.get("root_url") else None,
            eab=eab,
            timeout=float(timeout),
            challenge=str(challenge),
            **dns,
        )

    # ------------------------------------------------------------------ the account

    def _account_jwk(self, work_root: Path) -> Any:
        import josepy as jose
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        from pgtls_helpers.pki.keys import serialize_key
        from pgtls_helpers.postgres.files import atomic_write

        path = Path(self.account_key)
        if not path.is_absolute():
            path = work_root / path
        if not path.exists():
            key = ec.generate_private_key(ec.SECP256R1())
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write(path, serialize_key(key), mode=0o600)  # 0600 from the first byte
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise CaRefused(f"the ACME account key {path} is not an EC P-256 key")
        return jose.JWKEC(key=loaded)

    # ------------------------------------------------------------------ signing

    def sign(self, request: SignRequest, out: Path) -> Signed:
        if self.challenge == "dns-01":
            ips = [n for n in request.names if _is_ip(n)]
            if ips:
                raise InputError(
                    f"ca_settings.challenge dns-01 cannot prove the IP address {ips[0]} (an ACME "
                    "CA validates IP addresses over http-01 only); set challenge: http-01 or "
                    "leave IP addresses out of subject_alt_names"
                )
        unclean: list[str] = []  # a cleanup that failed, said once the order's end is known
        try:
            signed = self._order(request, out, unclean)
        except CaError as exc:
            if unclean:
                raise type(exc)(f"{exc}; {unclean[0]}") from None
            raise
        if unclean:
            raise CaRefused(
                f"the ACME CA issued, but {unclean[0]}; the certificate is not installed, fix "
                "ca_settings.dns_hook and run again"
            )
        return signed

    def _order(self, request: SignRequest, out: Path, unclean: list[str]) -> Signed:
        import josepy as jose
        import requests
        from acme import client, errors, messages

        jwk = self._account_jwk(request.state_dir or out.parent)
        verify: str | bool = self.ca_bundle or True

        # requests takes a CA bundle's path where the annotation says bool
        net = client.ClientNetwork(
            jwk,
            alg=jose.ES256,
            user_agent="pgtls",
            verify_ssl=verify,  # type: ignore[arg-type]
            timeout=30,
        )
        where = f"the ACME CA at {self.directory}"
        try:
            directory = client.ClientV2.get_directory(self.directory, net)
            acme = client.ClientV2(directory, net=net)
            self._register(acme, messages, errors, jwk, where)
            order = acme.new_order(request.csr_pem)
            with self._answering(acme, order, jwk, unclean):
                deadline = datetime.now() + timedelta(seconds=self.timeout)
                order = acme.poll_and_finalize(order, deadline=deadline)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise CaUnavailable(
                f"{where} is not reachable ({type(exc).__name__}); nothing was installed, run "
                "again later"
            ) from None
        except errors.TimeoutError:
            raise CaUnavailable(
                f"{where} did not issue within {self.timeout:g} s; nothing was installed"
            ) from None
        except OSError as exc:  # the challenge port could not be bound
            raise CaRefused(
                f"cannot answer the http-01 challenge on {self.http_address}:{self.http_port} "
                f"({exc.strerror}); free the port or set ca_settings.http_port"
            ) from None
        except (errors.Error, messages.Error) as exc:
            why = " ".join(str(exc).split())[:300]
            raise CaRefused(f"{where} refused the order: {why}; nothing was installed") from None
        out.mkdir(mode=0o700, exist_ok=True)
        files = [out / "fullchain.pem"]
        files[0].write_text(order.fullchain_pem)
        root = self._root(verify)
        if root is not None:
            files.append(out / "root.pem")
            files[1].write_bytes(root)
        return Signed(files=tuple(files), ca=self.name, reference=f"order {order.uri}")

    def _register(self, acme: Any, messages: Any, errors: Any, jwk: Any, where: str) -> None:
        import binascii

        eab = None
        if self.eab:
            kid, hmac = (os.environ.get(v, "").strip() for v in self.eab)
            if not kid or not hmac:
                raise CaRefused(
                    f"External Account Binding: {self.eab[0]} or {self.eab[1]} is empty; set "
                    "both and run again"
                )
            try:
                eab = messages.ExternalAccountBinding.from_data(
                    account_public_key=jwk.public_key(),
                    kid=kid,
                    hmac_key=hmac,
                    directory=acme.directory,
                )
            except (binascii.Error, ValueError):
                raise CaRefused(
                    f"External Account Binding: {self.eab[1]} does not hold a base64url HMAC "
                    "key; set it to the key the CA gave"
                ) from None
        elif acme.directory.meta.external_account_required:
            raise CaRefused(
                f"{where} requires External Account Binding; set ca_settings.eab_kid_env and "
                "ca_settings.eab_hmac_env to the names of the variables that hold the key id "
                "and the HMAC key the CA gave"
            )
        new = messages.NewRegistration.from_data(
            email=self.email, terms_of_service_agreed=True, external_account_binding=eab
        )
        try:
            acme.new_account(new)
        except errors.ConflictError as exc:  # the key has an account already
            regr = messages.RegistrationResource(uri=exc.location, body=messages.Registration())
            acme.net.account = acme.query_registration(regr)
        except messages.Error as exc:
            if not self.eab or exc.code != "unauthorized":
                raise
            why = " ".join(str(exc).split())[:300]
            raise CaRefused(
                f"{where} refused the External Account Binding of {self.eab[0]} and "
                f"{self.eab[1]}: {why}; check both variables, nothing was installed"
            ) from None

    def _challenges(self, order: Any, jwk: Any) -> list[tuple[Any, Any, str, str]]:
        """For every authorization still to prove: (challenge, response, domain, validation)."""
        from acme import challenges, messages

        kind = challenges.DNS01 if self.challenge == "dns-01" else challenges.HTTP01
        todo = []
        for authz in order.authorizations:
            if authz.body.status == messages.STATUS_VALID:
                continue  # proven already, by an earlier order of this account
            domain = authz.body.identifier.value
            if self.challenge == "dns-01" and authz.body.identifier.typ == messages.IDENTIFIER_IP:
                raise InputError(
                    f"ca_settings.challenge dns-01 cannot prove the IP address {domain}; set "
                    "challenge: http-01 or leave IP addresses out of subject_alt_names"
                )
            for body in authz.body.challenges:
                if isinstance(body.chall, kind):
                    response, validation = body.response_and_validation(jwk)
                    todo.append((body, response, domain, validation))
                    break
            else:
                raise CaRefused(f"the ACME CA offers no {self.challenge} challenge for {domain}")
        return todo

    @contextmanager
    def _answering(self, acme: Any, order: Any, jwk: Any, unclean: list[str]) -> Iterator[None]:
        """Publish the answers of every authorization of ``order``, and say so to the CA."""
        todo = self._challenges(order, jwk)
        if self.challenge == "dns-01":
            with self._dns_records([(d, v) for _, _, d, v in todo], unclean):
                for body, response, _, _ in todo:
                    acme.answer_challenge(body, response)
                yield
            return
        answers = {body.chall.path: validation.encode() for body, _, _, validation in todo}

        class Answer(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                body = answers.get(self.path.split("?", 1)[0])
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, format: str, *args: object) -> None:  # quiet
                return

        server = ThreadingHTTPServer((self.http_address, self.http_port), Answer)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            for body, response, _, _ in todo:
                acme.answer_challenge(body, response)
            yield
        finally:
            server.shutdown()
            server.server_close()

    @contextmanager
    def _dns_records(self, records: list[tuple[str, str]], unclean: list[str]) -> Iterator[None]:
        """The hook's ``present`` for every (domain, value), then ``cleanup`` for each one it
        was run for, however the order ends; a failed cleanup is added to ``unclean``."""
        tried: list[tuple[str, str]] = []
        try:
            for domain, value in records:
                tried.append((domain, value))
                try:
                    self._run_hook("present", domain, value)
                except CaError as exc:
                    raise type(exc)(f"{exc}; nothing was installed") from None
            if records and self.dns_propagation_seconds:
                time.sleep(self.dns_propagation_seconds)
            yield
        finally:
            for domain, value in reversed(tried):
                try:
                    self._run_hook("cleanup", domain, value)
                except CaError as exc:
                    unclean.append(str(exc))

    def _run_hook(self, action: str, domain: str, value: str) -> None:
        name = f"_acme-challenge.{domain}"
        values = {"{action}": action, "{domain}": domain, "{name}": name, "{value}": value}
        argv = []
        for arg in self.dns_hook:
            for key, text in values.items():
                arg = arg.replace(key, text)
            argv.append(arg)
        what = f"the dns_hook {Path(argv[0]).name} {action} for {name}"
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=self.dns_timeout,
                check=False,
            )
        except FileNotFoundError:
            raise CaRefused(
                f"{what}: {argv[0]} was not found; install it or fix ca_settings.dns_hook"
            ) from None
        except subprocess.TimeoutExpired:
            raise CaUnavailable(
                f"{what} did not finish in {self.dns_timeout:g} s; run again later or raise "
                "ca_settings.dns_timeout"
            ) from None
        if done.returncode != 0:
            # its last line of stderr says why; the rest may hold anything, even a secret
            why = (done.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[-1]
            cls = CaUnavailable if done.returncode == 75 else CaRefused
            raise cls(f"{what} exited with status {done.returncode} ({why[:200]})")

    def _root(self, verify: str | bool) -> bytes | None:
        if self.root_file:
            return Path(self.root_file).read_bytes()
        if self.root_url:
            import requests

            try:
                got = requests.get(self.root_url, verify=verify, timeout=30)
                got.raise_for_status()
            except requests.RequestException as exc:
                raise CaUnavailable(
                    f"the ACME CA's root at {self.root_url} cannot be fetched "
                    f"({type(exc).__name__}); nothing was installed"
                ) from None
            return got.content
        return None
