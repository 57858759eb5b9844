"""fleet/pgtls.yml over real SSH: Debian's sshd on a loopback port, key-based login as root.

This proves what ``ansible_connection: local`` cannot: the wheelhouse copied over SSH and
installed into a fresh venv, ``become`` on the host, and records fetched back over SSH.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from fleetkit import host_files, play, wheelhouse
from support import skip_or_fail

from pgtls_helpers.lab import LabCluster, free_port
from pgtls_helpers.runbook.fleet_report import load_fleet_report

SSHD = Path("/usr/sbin/sshd")
CHANGE = "CHG-ssh"


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"sshd did not listen on 127.0.0.1:{port}")


@pytest.fixture(scope="module")
def sshd() -> Iterator[tuple[int, Path, Path]]:
    """An sshd of this test's own on 127.0.0.1 (root, key only); yields (port, client key,
    its log)."""
    if not SSHD.exists() or shutil.which("ssh") is None:
        skip_or_fail("openssh-server is not installed (apt-get install openssh-server)")
    if os.geteuid() != 0:
        skip_or_fail("logging in as root over SSH needs root")
    base = Path(tempfile.mkdtemp(prefix="pgtls-sshd-"))
    for name in ("host_key", "client_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / name)], check=True
        )
    (base / "authorized_keys").write_text((base / "client_key.pub").read_text())
    port = free_port()
    (base / "sshd_config").write_text(
        f"Port {port}\n"
        "ListenAddress 127.0.0.1\n"
        f"HostKey {base / 'host_key'}\n"
        f"PidFile {base / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {base / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "StrictModes no\n"  # the keys live under /tmp, which is world-writable
        "Subsystem sftp /usr/lib/openssh/sftp-server\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder
    proc = subprocess.Popen(
        [str(SSHD), "-D", "-E", str(base / "sshd.log"), "-f", str(base / "sshd_config")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, proc)
        yield port, base / "client_key", base / "sshd.log"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)


def test_a_host_over_ssh_installs_runs_and_sends_its_record_home(
    sshd: tuple[int, Path, Path],
) -> None:
    port, key, log = sshd
    wheels = wheelhouse()
    base = Path(tempfile.mkdtemp(prefix="pgtls-fleet-ssh-"))
    base.chmod(0o711)  # the cluster runs as postgres
    cluster = LabCluster.create(base / "cluster")
    try:
        cluster.start()
        home, venv = base / "host", base / "venv"  # a venv of its own: installed over SSH
        inventory = {
            "all": {
                "vars": {"change_id": CHANGE, "ca_mode": "files", "apply": True},
                "hosts": {
                    "dbssh": {
                        "ansible_host": "127.0.0.1",
                        "ansible_port": port,
                        "ansible_user": "root",
                        "ansible_ssh_private_key_file": str(key),
                        "ansible_ssh_common_args": "-o StrictHostKeyChecking=no "
                        "-o UserKnownHostsFile=/dev/null",
                        "ansible_python_interpreter": "/usr/bin/python3",
                        "ansible_become_method": "su",
                        "pgtls_python": "/usr/bin/python3",
                        "pgtls_home": str(home),
                        "pgtls_venv": str(venv),
                        "pgtls_environment": {"PGPASSFILE": str(cluster.passfile)},
                        "server_host": cluster.host,
                        "server_port": cluster.port,
                        "common_name": "dbssh.lab.pgtls.test",
                        "key_type": "ecdsa-p256",
                    }
                },
            }
        }
        path = base / "inventory.yml"
        path.write_text(yaml.safe_dump(inventory))
        control = base / "control"
        before = host_files(cluster.pgdata)

        result = play("pgtls.yml", path, control, wheels)

        assert result.returncode == 0, result.tail()
        assert "Accepted publickey for root" in log.read_text()  # it came in over SSH
        assert "changed: [dbssh]" in result.output.split("Install pgtls into the venv")[1]
        assert (venv / "bin" / "pgtls").exists()
        csr = x509.load_pem_x509_csr((control / "csr" / CHANGE / "dbssh.csr").read_bytes())
        assert csr.subject.rfc4514_string().startswith("CN=dbssh.lab.pgtls.test")
        (row,) = load_fleet_report(control / "records" / CHANGE).rows
        assert row.outcome == "waiting-for-ca" and row.record
        manifest = json.loads(
            (control / "records" / CHANGE / row.record / "manifest.json").read_text()
        )
        assert manifest["operator"] == "root"
        assert host_files(cluster.pgdata) == before  # phase 1 leaves the server alone
    finally:
        cluster.remove()
        shutil.rmtree(base, ignore_errors=True)
