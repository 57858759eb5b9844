"""The server as a record shows it before and after a run: its TLS settings and the certificate
it serves. Read-only; a server that cannot be reached is noted, never fatal."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pgtls_helpers.runbook.params import Params

__all__ = ["SETTINGS", "server_state"]

SETTINGS = (
    "ssl",
    "ssl_cert_file",
    "ssl_key_file",
    "ssl_ca_file",
    "ssl_crl_file",
    "ssl_min_protocol_version",
    "hba_file",
)


def server_state(params: Params) -> dict[str, Any]:
    """``{"settings": {...}, "served": {...} or None, "error": str or None}``."""
    from pgtls_helpers.pki.chain import fingerprint
    from pgtls_helpers.postgres.probe import probe
    from pgtls_helpers.postgres.server import Server
    from pgtls_helpers.runbook.common import address_of, rfc4514

    state: dict[str, Any] = {"settings": {}, "served": None, "error": None}
    try:
        with Server({**params.conninfo(), "connect_timeout": 5}) as server:
            state["settings"] = {name: server.show(name) for name in SETTINGS}
    except Exception as exc:  # the record says what it could not see
        state["error"] = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        return state
    if state["settings"].get("ssl") != "on":
        return state
    try:
        result = probe(address_of(params.server_host), params.server_port, timeout=5.0)
    except Exception as exc:
        state["error"] = f"TLS probe failed: {exc}"
        return state
    if result.error is not None or not result.chain:
        state["error"] = f"TLS probe: {result.error or 'no certificate presented'}"
        return state
    leaf = result.chain[0]
    not_after = leaf.not_valid_after_utc
    state["served"] = {
        "subject": rfc4514(leaf.subject),
        "sha256": fingerprint(leaf),
        "not_after": not_after.isoformat(),
        "days_left": (not_after - datetime.now(timezone.utc)).days,
        "tls_version": result.tls_version,
    }
    return state
