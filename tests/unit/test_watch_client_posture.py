"""``pgtls watch``'s client side, pure: judging client certificates and CRLs, and the formats
with rows of those kinds (the files and servers are in tests/integration/test_watch_clients.py)."""

from __future__ import annotations

import datetime as _dt
import json

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from pgtls_helpers.display.watch_formats import (
    exit_code,
    render_json,
    render_nagios,
    render_prometheus,
    render_table,
)
from pgtls_helpers.lab import LabCA
from pgtls_helpers.pki.client import build_client_csr, client_subject, stat_ssl_dn
from pgtls_helpers.pki.client_posture import (
    CRL_EXPIRED_ALERT,
    ClientCertResult,
    judge_client_cert,
    judge_crl,
    session_inventory,
    unreadable_crl,
)
from pgtls_helpers.pki.keys import generate_key
from pgtls_helpers.postgres.watch_clients import crls_in

NOW = _dt.datetime.now(_dt.UTC)
DAY = _dt.timedelta(days=1)


@pytest.fixture(scope="module")
def ca() -> LabCA:
    return LabCA.create()


def client_cert(ca: LabCA, role: str, days: int) -> x509.Certificate:
    csr = build_client_csr(client_subject(role), generate_key("ecdsa-p256"))
    # valid from an hour before NOW: NOW is taken once, when the module is imported
    return ca.sign_client_csr(csr, days=days, not_before=NOW - _dt.timedelta(hours=1))


def judge(
    certs: list[x509.Certificate],
    *,
    key_matches: bool | None = True,
    key_problem: tuple[str, str] | None = None,
) -> ClientCertResult:
    return judge_client_cert(
        "alice", "/home/alice/.postgresql/postgresql.crt", certs, sha256="00",
        key_matches=key_matches, key_problem=key_problem, warn_days=30, crit_days=15, now=NOW,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("days", "status", "reasons"),
    [(397, "ok", ()), (21, "warning", ("expires-soon",)), (11, "critical", ("expires-soon",))],
)
def test_client_certificate_against_the_thresholds(
    ca: LabCA, days: int, status: str, reasons: tuple[str, ...]
) -> None:
    row = judge([client_cert(ca, "alice", days)])
    assert (row.status, row.reasons, row.days_left) == (status, reasons, days - 1)


def test_an_intermediate_in_postgresql_crt_that_expires_first_counts(ca: LabCA) -> None:
    short = LabCA.create(days=5)
    leaf = client_cert(short, "alice", 397)
    row = judge([leaf, *short.intermediates])
    assert row.status == "critical" and row.days_left in (4, 5)
    assert "intermediate CN=IntermediateCA_FOO" in row.details[0]


def test_a_key_problem_and_a_mismatch_are_both_said(ca: LabCA) -> None:
    row = judge(
        [client_cert(ca, "alice", 397)],
        key_matches=False,
        key_problem=("key-readable-by-others", "mode 0644"),
    )
    assert row.status == "critical"
    assert row.reasons == ("key-readable-by-others", "key-mismatch")


def test_crls_past_due_not_yet_valid_and_fine(ca: LabCA) -> None:
    stale = ca.sign_crl(last_update=NOW - 8 * DAY, next_update=NOW - DAY / 2)
    row = judge_crl(stale, source="a.crl", path="a.crl", now=NOW)
    assert (row.status, row.reasons, row.days_left) == ("critical", ("crl-expired",), -1)
    assert CRL_EXPIRED_ALERT in row.details[0] and row.revoked == 0
    early = ca.sign_crl(last_update=NOW + DAY, next_update=NOW + 8 * DAY)
    assert judge_crl(early, source="b", path="b", now=NOW).reasons == ("crl-not-yet-valid",)
    fresh = ca.sign_crl(last_update=NOW - DAY, next_update=NOW + DAY / 2)
    ok = judge_crl(fresh, source="c", path="c", now=NOW)
    assert (ok.status, ok.days_left) == ("ok", 0)  # due within the day, still fine


def test_a_file_that_is_not_a_crl_is_unreadable() -> None:
    (row,) = crls_in(b"not a CRL", source="x.crl", path="x.crl", now=NOW)
    assert (row.status, row.reasons) == ("unknown", ("unreadable",))


def test_sessions_are_known_by_serial_and_issuer(ca: LabCA) -> None:
    cert = client_cert(ca, "alice", 11)
    issuer = stat_ssl_dn(cert.issuer)
    rows = [
        (True, True, str(cert.serial_number), issuer),
        (True, True, "12345", issuer),  # someone else's certificate from the same CA
        (True, True, str(cert.serial_number), "/CN=another CA"),  # same serial, other CA
        (True, True, None, None),
        (False, False, None, None),
    ]
    inv = session_inventory(rows, [cert], NOW)
    assert (inv.tls, inv.without_tls, inv.unix_socket) == (4, 0, 1)
    by = {g.issuer_dn: g for g in inv.by_issuer}
    assert (by[issuer].client_cert_sessions, by[issuer].known) == (2, 1)
    assert by[issuer].fewest_days_left == 10
    assert (by["/CN=another CA"].known, by["/CN=another CA"].fewest_days_left) == (0, None)


def test_formats_with_client_rows_and_no_target(ca: LabCA) -> None:
    warn = judge([client_cert(ca, "alice", 21)])
    stale = judge_crl(
        ca.sign_crl(last_update=NOW - 8 * DAY, next_update=NOW - DAY / 2),
        source="a.crl", path="a.crl", now=NOW,
    )  # fmt: skip
    gone = unreadable_crl("b.crl", "b.crl", "b.crl cannot be read (No such file or directory)")
    clients = [warn]
    crls = [stale, stale, gone]
    assert exit_code([], "nagios", clients=clients, crls=crls) == 2  # critical outranks unknown
    assert exit_code([], "json", clients=clients, crls=crls) == 1
    nagios = render_nagios([], warn_days=30, crit_days=15, clients=clients, crls=crls)
    first = nagios.splitlines()[0]
    assert first.startswith("PGTLS CRITICAL - client alice expires-soon (20 days left); ")
    assert first.count("CRL of IntermediateCA_FOO crl-expired") == 1
    assert "days_client_alice=20;30;15;;" in first and "days_crl1=-1;;0;;" in first
    doc = json.loads(render_json([], clients=clients, crls=crls))
    assert doc["targets"] == [] and doc["summary"] == {
        "ok": 0, "warning": 1, "critical": 2, "unknown": 1,
    }  # fmt: skip
    assert [c["reasons"] for c in doc["crls"]] == [["crl-expired"], ["crl-expired"], ["unreadable"]]
    families = {
        f.name: f
        for f in text_string_to_metric_families(render_prometheus([], clients=clients, crls=crls))
    }
    assert [s.value for s in families["pgtls_client_cert_status"].samples] == [1]
    assert "pgtls_sessions" not in families  # only written when asked for
    table = render_table([], warn_days=30, crit_days=15, clients=clients, crls=crls)
    assert table.startswith("KIND ") and "0 ok, 1 warning, 2 critical, 1 unknown" in table


def test_without_client_rows_the_prometheus_output_is_as_before() -> None:
    text = render_prometheus([])
    assert "pgtls_client_cert" not in text and "pgtls_crl" not in text
