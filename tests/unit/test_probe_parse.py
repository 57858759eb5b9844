"""The pure parts of ``probe``: targets, rows and the CLI's JSON object (no network)."""

from __future__ import annotations

import json

import certfactory
import pytest
from cryptography.hazmat.primitives import hashes

from pgtls_helpers._cli_probe import result_dict
from pgtls_helpers.errors import InputError
from pgtls_helpers.probe import ProbeResult, chain_rows, format_target, parse_target


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("db1.example.com", ("db1.example.com", 5432)),
        ("db1.example.com:6432", ("db1.example.com", 6432)),
        ("  db1:5433 ", ("db1", 5433)),
        ("10.0.0.7:5432", ("10.0.0.7", 5432)),
        ("[::1]:5433", ("::1", 5433)),
        ("[2001:db8::7]", ("2001:db8::7", 5432)),
        ("2001:db8::7", ("2001:db8::7", 5432)),
        ("[fe80::1%eth0]:5432", ("fe80::1%eth0", 5432)),
        ("db1:65535", ("db1", 65535)),
    ],
)
def test_parse_target(text: str, expected: tuple[str, int]) -> None:
    assert parse_target(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        ":5432",
        "db1:",
        "db1:0",
        "db1:65536",
        "db1:http",
        "db1:-1",
        "[::1",
        "[::1]5432",
        "[::1]:",
        "a:b:c",
        "[]:5432",
    ],
)
def test_parse_target_refuses(text: str) -> None:
    with pytest.raises(InputError) as info:
        parse_target(text)
    assert repr(text) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("target", ["db1.example.com:5432", "[::1]:5433", "10.0.0.7:6432"])
def test_format_target_round_trips(target: str) -> None:
    assert format_target(*parse_target(target)) == target


def test_chain_rows_and_json_object() -> None:
    chain = certfactory.article_chain()
    presented = tuple(c.cert for c in (chain.leaf, *chain.intermediates))
    result = ProbeResult("db1.example.com", 5432, "TLSv1.3", "TLS_AES_256_GCM_SHA384", presented)
    rows = chain_rows(result)
    assert rows == [
        {
            "sha256": c.fingerprint(hashes.SHA256()).hex(),
            "subject": c.subject.rfc4514_string(),
            "issuer": c.issuer.rfc4514_string(),
        }
        for c in presented
    ]
    assert all(len(r["sha256"]) == 64 and r["sha256"] == r["sha256"].lower() for r in rows)
    obj = result_dict(result)
    assert list(obj) == ["host", "port", "tls_version", "cipher", "chain", "error"]
    assert json.loads(json.dumps(obj)) == {
        "host": "db1.example.com",
        "port": 5432,
        "tls_version": "TLSv1.3",
        "cipher": "TLS_AES_256_GCM_SHA384",
        "chain": rows,
        "error": None,
    }


def test_a_failed_probe_as_json() -> None:
    failed = ProbeResult("::1", 5433, error="[::1]:5433: the server refused SSL (ssl = off?)")
    assert not failed.ok and failed.target == "[::1]:5433"
    assert result_dict(failed) == {
        "host": "::1",
        "port": 5433,
        "tls_version": None,
        "cipher": None,
        "chain": [],
        "error": failed.error,
    }


def test_probe_result_is_frozen() -> None:
    result = ProbeResult("db1", 5432)
    with pytest.raises(AttributeError):
        result.port = 1  # type: ignore[misc]
