"""``ca_mode: acme`` against a real Pebble (the ACME test server of the Let's Encrypt project)
started here, with its DNS answered by pebble-challtestsrv, so Pebble's own validation
connects to this host's http-01 answer: an order placed, validated and finalized for a CSR,
then one ``pgtls run`` from key to proven TLS, and Pebble down leaving the server untouched."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from support import skip_or_fail

from pgtls_helpers.ca import CaUnavailable, SignRequest, backend_for
from pgtls_helpers.cli import main as cli_main
from pgtls_helpers.lab import LabCA, LabCluster
from pgtls_helpers.pki.chain import order_chain
from pgtls_helpers.pki.intake import read_ca_response
from pgtls_helpers.pki.keys import serialize_key


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_tcp(port: int, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


@dataclass(frozen=True)
class Pebble:
    settings: dict[str, object]  # ca_settings for the acme back-end
    home: Path


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pebble]:
    """Pebble on loopback ports, its TLS from a lab CA, its DNS from pebble-challtestsrv (every
    name is 127.0.0.1), and the port its validation connects to for http-01."""
    for tool in ("pebble", "pebble-challtestsrv"):
        if shutil.which(tool) is None:
            skip_or_fail(f"{tool} is not installed (Debian: apt-get install pebble)")
    home = tmp_path_factory.mktemp("pebble")
    lab = LabCA.create(root_name="Pebble Listener Root")
    key, cert = lab.issue(["localhost", "127.0.0.1"])
    (home / "listener.key").write_bytes(serialize_key(key))
    (home / "listener.pem").write_bytes(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (cert, *lab.intermediates))
    )
    (home / "bundle.pem").write_bytes(lab.root.public_bytes(serialization.Encoding.PEM))
    acme, manage, http, dns = (_free_port() for _ in range(4))
    config = {
        "pebble": {
            "listenAddress": f"127.0.0.1:{acme}",
            "managementListenAddress": f"127.0.0.1:{manage}",
            "certificate": str(home / "listener.pem"),
            "privateKey": str(home / "listener.key"),
            "httpPort": http,
            "tlsPort": _free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
    }
    (home / "pebble.json").write_text(json.dumps(config))
    env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}
    dns_srv = subprocess.Popen(
        ["pebble-challtestsrv", "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""]
        + ["-dns01", f"127.0.0.1:{dns}", "-http01", "", "-https01", "", "-tlsalpn01", ""]
        + ["-management", f"127.0.0.1:{_free_port()}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = (home / "pebble.log").open("wb")
    server = subprocess.Popen(
        ["pebble", "-config", str(home / "pebble.json"), "-dnsserver", f"127.0.0.1:{dns}"],
        cwd=home,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_tcp(acme)
        _wait_tcp(manage)
        yield Pebble(
            {
                "directory": f"https://127.0.0.1:{acme}/dir",
                "ca_bundle": str(home / "bundle.pem"),
                "http_port": http,
                "http_address": "127.0.0.1",
                "root_url": f"https://127.0.0.1:{manage}/roots/0",
                "timeout": 60,
            },
            home,
        )
    finally:
        server.terminate()
        dns_srv.terminate()
        server.wait(10)
        dns_srv.wait(10)
        log.close()


def _csr(names: list[str]) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM)


def test_pebble_validates_the_http01_answer_and_issues_a_chain_to_its_root(
    pebble: Pebble, tmp_path: Path
) -> None:
    key, csr = _csr(["db1.lab.pgtls.test", "127.0.0.1"])
    ca = backend_for("acme", pebble.settings, "p.yaml")
    request = SignRequest(csr, "db1.lab.pgtls.test", ("127.0.0.1",), "C", state_dir=tmp_path)
    signed = ca.sign(request, tmp_path / "answer")
    assert signed.ca == f"acme {pebble.settings['directory']}"
    assert (signed.reference or "").startswith("order https://127.0.0.1:")
    account = tmp_path / "acme-account.key"
    assert account.stat().st_mode & 0o777 == 0o600
    certs = [s.cert for s in read_ca_response(list(signed.files)).certificates]
    leaf = next(c for c in certs if c.public_key() == key.public_key())
    chain = order_chain(certs, leaf=leaf)
    assert chain.complete and chain.root is not None
    # a second order with the same account key finds its account, and is issued too
    _, again = _csr(["db2.lab.pgtls.test"])
    ca.sign(SignRequest(again, "db2.lab.pgtls.test", (), "C", state_dir=tmp_path), tmp_path / "b")
    # the account key never reaches the answer's files
    for path in signed.files:
        assert b"PRIVATE KEY" not in path.read_bytes()


def test_pebble_down_is_unavailable(pebble: Pebble, tmp_path: Path) -> None:
    _, csr = _csr(["db1.lab.pgtls.test"])
    down = {**pebble.settings, "directory": f"https://127.0.0.1:{_free_port()}/dir"}
    with pytest.raises(CaUnavailable, match="is not reachable .*run again later"):
        backend_for("acme", down, "p").sign(
            SignRequest(csr, "db1.lab.pgtls.test", (), "C", state_dir=tmp_path), tmp_path / "a"
        )


def test_one_run_from_key_to_proven_tls_with_pebble(
    pebble: Pebble,
    fresh_cluster: LabCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PGPASSFILE", str(fresh_cluster.passfile))
    values = {
        "change_id": "CHG-acme",
        "ca_mode": "acme",
        "ca_settings": pebble.settings,
        "apply": True,
        "server_host": "127.0.0.1",
        "server_port": fresh_cluster.port,
        "server_log_file": str(fresh_cluster.log_path),
        "common_name": "db1.lab.pgtls.test",
        "subject_alt_names": ["127.0.0.1"],
        "key_type": "ecdsa-p256",
        "hba_rules": [
            {
                "type": "hostssl",
                "database": "all",
                "user": "all",
                "address": "127.0.0.1/32",
                "method": "scram-sha-256",
            }
        ],
    }
    params = tmp_path / "acme.yaml"
    params.write_text(yaml.safe_dump(values, sort_keys=False))
    records = tmp_path / "records"
    argv = ["run", str(params), "--records", str(records), "--work", str(tmp_path / "work")]
    code = cli_main([*argv, "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "signed by acme https://127.0.0.1:" in out and "verdict: pass" in out, out
    (manifest,) = (records / "CHG-acme").glob("*/manifest.json")
    m = json.loads(manifest.read_text())
    assert m["verdict"] == "pass" and (m["ca_reference"] or "").startswith("order ")
