"""``ca_mode: acme``: an ACME CA (RFC 8555: Let's Encrypt, an internal step-ca or Smallstep,
Pebble) signs the CSR after this host answers its ``http-01`` challenge.

``ca_settings``::

    directory: https://acme.example.com/directory
    ca_bundle: /etc/pgtls/acme-ca.pem   # to verify the ACME server's TLS (default: the system's)
    account_key: acme-account.key       # kept in the work root, 0600, made on first use
    email: dba@example.com              # optional contact for the account
    http_port: 80                       # where this host answers http-01 (the CA connects here)
    http_address: 0.0.0.0
    root_file: /etc/pgtls/acme-root.pem # the root above the chain the CA returns, or
    # root_url: https://acme.example.com/roots/0
    eab_kid_env / eab_hmac_env          # External Account Binding, when the CA asks for it
    timeout: 120

The challenge is answered by a small HTTP server of this process for as long as the order
takes; the account key is the only thing kept between runs. The record names the directory and
the order, never a key.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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

__all__ = ["AcmeCA"]

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
)


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
        import requests
        from acme import client, errors, messages

        jwk = self._account_jwk(request.state_dir or out.parent)
        verify: str | bool = self.ca_bundle or True
        import josepy as jose

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
            self._register(acme, messages, errors, jwk)
            order = acme.new_order(request.csr_pem)
            with self._answering(acme, order, jwk):
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

    def _register(self, acme: Any, messages: Any, errors: Any, jwk: Any) -> None:
        eab = None
        if self.eab:
            kid, hmac = (os.environ.get(v, "").strip() for v in self.eab)
            if not kid or not hmac:
                raise CaRefused(
                    f"External Account Binding: {self.eab[0]} or {self.eab[1]} is empty; set "
                    "both and run again"
                )
            eab = messages.ExternalAccountBinding.from_data(
                account_public_key=jwk.public_key(),
                kid=kid,
                hmac_key=hmac,
                directory=acme.directory,
            )
        new = messages.NewRegistration.from_data(
            email=self.email, terms_of_service_agreed=True, external_account_binding=eab
        )
        try:
            acme.new_account(new)
        except errors.ConflictError as exc:  # the key has an account already
            regr = messages.RegistrationResource(uri=exc.location, body=messages.Registration())
            acme.net.account = acme.query_registration(regr)

    @contextmanager
    def _answering(self, acme: Any, order: Any, jwk: Any) -> Iterator[None]:
        """Serve the http-01 answers of every authorization of ``order``, and say so."""
        from acme import challenges

        answers: dict[str, bytes] = {}
        todo = []
        for authz in order.authorizations:
            for body in authz.body.challenges:
                if isinstance(body.chall, challenges.HTTP01):
                    response, validation = body.response_and_validation(jwk)
                    answers[body.chall.path] = validation.encode()
                    todo.append((body, response))
                    break
            else:
                name = authz.body.identifier.value
                raise CaRefused(f"the ACME CA offers no http-01 challenge for {name}")

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
            for body, response in todo:
                acme.answer_challenge(body, response)
            yield
        finally:
            server.shutdown()
            server.server_close()

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
