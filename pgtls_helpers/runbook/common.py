"""What every step shares: the work directory's state, the server's facts and
where its TLS files go, and small certificate helpers.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pgtls_helpers.errors import InputError, PreflightError
from pgtls_helpers.pki import chain as chainmod
from pgtls_helpers.pki import keys
from pgtls_helpers.postgres.server import Server, ServerFacts
from pgtls_helpers.postgres.targets import TargetPolicy
from pgtls_helpers.runbook.params import Params

#: The runbook's advice for a CA certificate the chain lacks: its one way in is ``ca_files``
#: (``--pool`` belongs to ``pgtls chain``).
ADD_TO_CA_FILES = "add its file to ca_files in the parameters and run again"


def save_step(params: Params, step: str, summary: dict[str, Any]) -> None:
    """Leave a step's archivable summary in the run's record directory, when there is one."""
    if not params.record_dir:
        return
    out = Path(params.record_dir) / "steps"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{step}.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


def key_passphrase(params: Params) -> bytes | None:
    return (
        keys.passphrase_from_env(params.key_passphrase_env) if params.key_passphrase_env else None
    )


def pem_of(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def rfc4514(name: x509.Name) -> str:
    """RFC 4514, with ``emailAddress=`` rather than its dotted OID (the one helper:
    :func:`pgtls_helpers.pki.client.rfc4514_dn`)."""
    from pgtls_helpers.pki.client import rfc4514_dn

    return rfc4514_dn(name)


fingerprint_of = chainmod.fingerprint  # the one fingerprint (pki/chain.py), by its old name


def open_server(params: Params) -> Server:
    """The runbook's connection; its application name names the change (lock holders)."""
    return Server({**params.conninfo(), "application_name": f"pgtls {params.change_id}"[:63]})


def server_before(params: Params, facts: ServerFacts) -> dict[str, object]:
    """How the server is before a change touches it: what rollback must find again."""
    from pgtls_helpers.postgres.probe import probe

    served: str | None = None
    if facts.ssl:
        result = probe(address_of(params.server_host), params.server_port, timeout=5.0)
        if result.error is None and result.chain:
            served = fingerprint_of(result.chain[0])
    return {
        "ssl": facts.ssl,
        "served_sha256": served,
        "data_directory": str(facts.data_directory),
        # with the data directory, where rollback may write (postgres/targets.py)
        "config_files": [str(facts.config_file), str(facts.hba_file)],
        "server_owner": list(facts.data_directory_owner or (os.geteuid(), os.getegid())),
    }


def target_policy(params: Params, facts: ServerFacts) -> TargetPolicy:
    """Where this change may write server files (postgres/targets.py)."""
    return TargetPolicy.of(
        data_directory=facts.data_directory,
        config_files=(facts.config_file, facts.hba_file),
        listed=params.server_file_targets,
        owner=facts.data_directory_owner or (os.geteuid(), os.getegid()),
    )


def check_pgdata(params: Params, facts: ServerFacts) -> None:
    if params.pgdata and Path(params.pgdata).resolve() != Path(facts.data_directory).resolve():
        raise PreflightError(
            f"pgdata is {params.pgdata} but the server on {params.server_host}:"
            f"{params.server_port} says its data directory is {facts.data_directory}; fix pgdata "
            "or the connection parameters"
        )
    if not Path(facts.data_directory).is_dir():
        raise PreflightError(
            f"{facts.data_directory}: the server's data directory is not visible here; run the "
            "runbook on the database host as root or as the server's OS user"
        )


def load_bundle(params: Params) -> tuple[list[x509.Certificate], x509.Certificate | None]:
    bundle = params.work.bundle
    if not bundle.exists():
        raise PreflightError(
            f"{bundle}: no checked chain for change {params.change_id}; run "
            "step 2 (02_ca_response) first"
        )
    certs = x509.load_pem_x509_certificates(bundle.read_bytes())
    root_path = params.work.root
    root = x509.load_pem_x509_certificate(root_path.read_bytes()) if root_path.exists() else None
    return certs, root


def _is_shared(path: Path) -> bool:
    """A certificate or key other services use too: Debian's snakeoil pair, /etc/ssl."""
    return "snakeoil" in path.name or str(path).startswith("/etc/ssl/")


def ssl_targets(facts: ServerFacts) -> tuple[Path, Path, dict[str, str]]:
    """Where the certificate and key go, and the settings that must change to point there.

    Files shared with other services are never replaced: the new pair goes into the data
    directory as ``server.crt``/``server.key`` and step 4 points ``ssl_cert_file`` and
    ``ssl_key_file`` at it.
    """
    cert, key = Path(facts.ssl_cert_file), Path(facts.ssl_key_file)
    if not (_is_shared(cert) or _is_shared(key)):
        return cert, key, {}
    data = Path(facts.data_directory)
    return (
        data / "server.crt",
        data / "server.key",
        {"ssl_cert_file": str(data / "server.crt"), "ssl_key_file": str(data / "server.key")},
    )


def passphrase_or_none(params: Params, path: Path) -> bytes | None:
    return key_passphrase(params) if keys.is_encrypted_pem(path.read_bytes()) else None


def address_of(host: str) -> str:
    try:
        return str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
    except socket.gaierror:
        raise InputError(
            f"server_host '{host}' does not resolve; use a name this machine can "
            "resolve, or an IP address"
        ) from None


def lock_directory(params: Params, facts: ServerFacts) -> tuple[Path, tuple[int, int] | None]:
    """Where the change lock file of this server lives, and who should own it: the data
    directory when this host sees it (every change made here), else the work root, which is
    ours (a client-trust change run from a client host; the advisory lock covers the rest)."""
    if facts.data_directory.is_dir():
        return facts.data_directory, facts.data_directory_owner
    root = params.work.path.parent
    root.mkdir(parents=True, exist_ok=True)
    params.work.check()
    return root, None
