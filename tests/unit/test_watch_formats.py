"""``pgtls watch``'s pure parts: targets, classification of chains, and the four formats."""

from __future__ import annotations

import datetime as _dt
import functools
import json
import re
from pathlib import Path

import certfactory
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgtls_helpers.display.watch_formats import (
    exit_code,
    render_json,
    render_nagios,
    render_prometheus,
    render_table,
    sort_worst_first,
)
from pgtls_helpers.errors import InputError
from pgtls_helpers.pki.posture import (
    REASONS,
    ChainElement,
    Target,
    TargetResult,
    WatchOptions,
    classify,
)
from pgtls_helpers.postgres.watch import load_roots, parse_targets

NOW = _dt.datetime(2026, 6, 1, 12, 0, tzinfo=_dt.UTC)
# check_ssl_cert writes "days_chain_elem1=396;30;15;;": label=value;warn;crit;min;max
PERFDATA = re.compile(r"^(days_chain_elem\d+|'[^']+ days_chain_elem\d+')=-?\d+;\d+;\d+;;$")


def element(days: int, role: str = "leaf", subject: str = "CN=db1") -> ChainElement:
    return ChainElement(
        sha256="ab" * 32,
        subject=subject,
        issuer="CN=CA",
        not_after=NOW + _dt.timedelta(days=days, hours=1),
        days_left=days,
        role=role,
    )


def result(
    target: str, status: str, reasons: tuple[str, ...] = (), days: int = 300
) -> TargetResult:
    host, port = target.rsplit(":", 1)
    answered = status != "unknown"
    return TargetResult(
        target=target,
        host=host,
        port=int(port),
        status=status,
        reasons=reasons,
        details=tuple(f"because {r}" for r in reasons),
        tls_version="TLSv1.3" if answered else None,
        negotiation=("sslrequest", "direct") if answered else (),
        chain=(element(days), element(days + 3000, "intermediate", 'CN=CA "x", O=a\\b'))
        if answered
        else (),
        verified=True if answered else None,
        hostname_ok=True if answered else None,
        plaintext="rejected" if answered else None,
        days_left=days if answered else None,
        error=None if answered else f"{target}: connection refused",
    )


FLEET = [
    result("db1:5432", "ok"),
    result("db2:5432", "warning", ("expires-soon",), days=20),
    result("db3:5432", "critical", ("expired", "plaintext-accepted"), days=-2),
    result("db4:5432", "unknown", ("unreachable",)),
]


# --- targets and options ---------------------------------------------------------------------


def test_targets_file_with_comments_blank_lines_and_duplicates(tmp_path: Path) -> None:
    f = tmp_path / "targets.txt"
    f.write_text("# production\ndb1.example.com\n\n  db2:6432   # replica\n[::1]:5433\ndb1\n")
    got = parse_targets(["db3"], f)
    assert [t.text for t in got] == [
        "db3:5432",
        "db1.example.com:5432",
        "db2:6432",
        "[::1]:5433",
        "db1:5432",
    ]


def test_a_bad_line_names_the_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "targets.txt"
    f.write_text("db1\ndb2:http\n")
    with pytest.raises(InputError, match=r"targets.txt line 2: 'db2:http': the port must be"):
        parse_targets([], f)


def test_missing_file_and_no_targets_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such targets file"):
        parse_targets([], tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n")
    with pytest.raises(InputError, match="no targets"):
        parse_targets([], empty)
    with pytest.raises(InputError, match="port must be a number"):
        parse_targets(["db1:0"])


def test_roots_file_must_hold_a_certificate(tmp_path: Path) -> None:
    bad = tmp_path / "root.crt"
    bad.write_text("not a certificate\n")
    with pytest.raises(InputError, match="no certificate in it"):
        load_roots(bad)
    good = certfactory.write_pem(tmp_path / "ok.crt", certfactory.make_ca("R"))
    assert len(load_roots(good)) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"warn_days": 10, "crit_days": 20}, "critical days <= warning days"),
        ({"timeout": 0}, "above zero"),
        ({"concurrency": 0}, "at least 1"),
    ],
)
def test_options_refuse_nonsense(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(InputError, match=message):
        WatchOptions(**kwargs)  # type: ignore[arg-type]


# --- classification (pure) -------------------------------------------------------------------


def codes(
    chain: certfactory.Chain | list,
    host: str = "db1.example.com",
    at: _dt.datetime = NOW,
    **kw: object,
) -> list[str]:
    certs = chain.leaf_first(with_root=False) if isinstance(chain, certfactory.Chain) else chain
    opts = WatchOptions(**kw)  # type: ignore[arg-type]
    found, *_ = classify(Target(host), tls_version="TLSv1.3", chain=certs, options=opts, at=at)
    return [c for c, _ in found]


def old_root() -> certfactory.Issued:
    """A root valid at ``NOW`` (which lies before the real now)."""
    return certfactory.make_ca(
        "Root", not_before=NOW - _dt.timedelta(days=1000), not_after=NOW + _dt.timedelta(days=3000)
    )


def leaf_until(ca: certfactory.Issued, end: _dt.datetime) -> certfactory.Issued:
    return certfactory.issue(
        "db1.example.com",
        issuer=ca,
        sans=["db1.example.com"],
        not_before=end - _dt.timedelta(days=400),
        not_after=end,
    )


def test_days_left_round_down_and_thresholds_decide_the_severity() -> None:
    root = old_root()
    for delta, expect in [
        (_dt.timedelta(days=30, minutes=1), []),
        (_dt.timedelta(days=30, minutes=-1), ["expires-soon"]),  # 29 days and change
        (_dt.timedelta(days=15, minutes=-1), ["expires-soon"]),
        (_dt.timedelta(minutes=1), ["expires-soon"]),
        (_dt.timedelta(minutes=-1), ["expired"]),
    ]:
        leaf = leaf_until(root, NOW + delta).cert
        found, _, _, days = classify(
            Target("db1.example.com"),
            tls_version="TLSv1.3",
            chain=[leaf],
            options=WatchOptions(roots=(root.cert,)),
            at=NOW,
        )
        assert [c for c, _ in found] == expect, delta
        assert days == (NOW + delta - NOW).days


def test_the_worst_element_counts_not_only_the_leaf() -> None:
    root = old_root()
    inter = certfactory.make_ca(
        "Inter",
        issuer=root,
        not_before=NOW - _dt.timedelta(days=900),
        not_after=NOW + _dt.timedelta(days=9, minutes=-1),
    )
    leaf = leaf_until(inter, NOW + _dt.timedelta(days=300))
    found, verified, host_ok, days = classify(
        Target("db1.example.com"),
        tls_version="TLSv1.3",
        chain=[leaf.cert, inter.cert],
        options=WatchOptions(roots=(root.cert,)),
        at=NOW,
    )
    assert [c for c, _ in found] == ["expires-soon"] and days == 8
    assert "intermediate CN=Inter" in found[0][1]
    assert verified is True and host_ok is True


def test_chain_order_and_completeness_without_and_with_root() -> None:
    chain = certfactory.article_chain()
    leaf, foo, bar = chain.leaf_first(with_root=False)
    # judged at NOW, before these certificates begin: libpq refuses them until then
    assert codes([leaf, foo, bar]) == ["not-yet-valid"]
    at_now = functools.partial(codes, at=_dt.datetime.now(_dt.UTC))
    assert at_now([leaf, foo, bar]) == []
    assert at_now([leaf, bar, foo]) == ["incomplete-chain"]  # out of order
    assert at_now([leaf, bar]) == ["incomplete-chain"]  # a gap
    roots = (chain.root.cert,)
    assert at_now([leaf], roots=roots) == ["incomplete-chain"]  # leaf only
    assert at_now([leaf, foo, bar], roots=roots) == []
    other = certfactory.make_ca("Other Root")
    assert at_now([leaf, foo, bar], roots=(other.cert,)) == ["untrusted"]
    assert at_now([leaf, foo, bar], host="db2.example.com", roots=roots) == ["hostname-mismatch"]


def test_every_reason_has_a_status() -> None:
    assert set(REASONS.values()) == {"warning", "critical", "unknown"}


# --- formats ---------------------------------------------------------------------------------


def test_table_sorts_worst_first_and_colours_only_when_asked() -> None:
    assert [r.target for r in sort_worst_first(FLEET)] == [
        "db3:5432",
        "db4:5432",
        "db2:5432",
        "db1:5432",
    ]
    plain = render_table(FLEET, warn_days=30, crit_days=15)
    rows = plain.splitlines()
    assert rows[0].split()[:3] == ["STATUS", "TARGET", "DAYS"]
    assert [r.split()[1] for r in rows[1:5]] == ["db3:5432", "db4:5432", "db2:5432", "db1:5432"]
    assert "\x1b[" not in plain
    assert "1 ok, 1 warning, 1 critical, 1 unknown" in plain
    assert "db3:5432: because expired" in plain
    coloured = render_table(FLEET, warn_days=30, crit_days=15, colour=True)
    assert "\x1b[31m-2" in coloured and "\x1b[33m20" in coloured and "\x1b[32m300" in coloured


def test_json_has_the_documented_keys() -> None:
    doc = json.loads(render_json(FLEET, checked_at=NOW))
    assert doc["summary"] == {"ok": 1, "warning": 1, "critical": 1, "unknown": 1}
    first = doc["targets"][0]
    for key in (
        "target", "host", "port", "status", "reasons", "tls_version", "negotiation",
        "chain", "verified", "verifier", "hostname_ok", "plaintext", "error",
    ):  # fmt: skip
        assert key in first
    if first["verified"] is not None:
        assert first["verifier"].startswith("OpenSSL ")
    assert set(first["chain"][0]) >= {"sha256", "subject", "issuer", "not_after", "days_left"}
    assert first["negotiation"] == ["sslrequest", "direct"]
    assert doc["targets"][3]["verified"] is None


def test_prometheus_output_parses_with_prometheus_client() -> None:
    text = render_prometheus(FLEET)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(families) >= {
        "pgtls_probe_success",
        "pgtls_status",
        "pgtls_cert_not_after_timestamp_seconds",
        "pgtls_tls_version_info",
        "pgtls_plaintext_accepted",
        "pgtls_direct_tls",
    }
    for family in families.values():
        assert family.type == "gauge" and family.documentation
    status = {s.labels["target"]: s.value for s in families["pgtls_status"].samples}
    assert status == {"db1:5432": 0, "db2:5432": 1, "db3:5432": 2, "db4:5432": 3}
    success = {s.labels["target"]: s.value for s in families["pgtls_probe_success"].samples}
    assert success["db4:5432"] == 0 and success["db1:5432"] == 1
    certs = families["pgtls_cert_not_after_timestamp_seconds"].samples
    assert {s.labels["role"] for s in certs} == {"leaf", "intermediate"}
    # a subject with quotes and backslashes survives the escaping
    assert 'CN=CA "x", O=a\\b' in {s.labels["subject"] for s in certs}
    leaf = next(s for s in certs if s.labels["target"] == "db1:5432" and s.labels["role"] == "leaf")
    assert leaf.value == int((NOW + _dt.timedelta(days=300, hours=1)).timestamp())


def test_nagios_status_line_perfdata_and_exit_codes() -> None:
    one = render_nagios([FLEET[0]], warn_days=30, crit_days=15).splitlines()
    status, perf = one[0].split(" | ")
    assert status == "PGTLS OK - db1:5432 TLSv1.3, 300 days left"
    assert len(one) == 1  # the status line says it all: no "db1:5432 ok: ok"
    assert perf.split() == ["days_chain_elem1=300;30;15;;", "days_chain_elem2=3300;30;15;;"]
    many = render_nagios(FLEET, warn_days=30, crit_days=15).splitlines()
    assert many[0].startswith("PGTLS CRITICAL - 1 critical, 1 unknown, 1 warning, 1 ok: db3:5432")
    labels = re.findall(r"('[^']+'|\S+)=(\S+)", many[0].split(" | ", 1)[1])
    assert labels and all(PERFDATA.match(f"{k}={v}") for k, v in labels)
    assert len(many) == 1 + len(FLEET)
    assert exit_code(FLEET, "nagios") == 2
    assert exit_code(FLEET[:2], "nagios") == 1
    assert exit_code(FLEET[3:], "nagios") == 3
    assert exit_code(FLEET[:1], "nagios") == 0
    assert exit_code(FLEET[:1], "json") == 0 and exit_code(FLEET[:2], "table") == 1


def test_nagios_says_each_thing_once() -> None:
    bad = render_nagios([FLEET[2]], warn_days=30, crit_days=15).splitlines()
    assert bad[0].split(" | ")[0] == "PGTLS CRITICAL - db3:5432 expired, plaintext-accepted"
    assert bad[1:] == ["db3:5432: because expired; because plaintext-accepted"]
    fine = render_nagios([FLEET[0], result("db5:5432", "ok", days=40)], warn_days=30, crit_days=15)
    lines = fine.splitlines()
    assert lines[0].split(" | ")[0] == "PGTLS OK - 2 targets, fewest days left 40 (db5:5432)"
    assert lines[1:] == [
        "db5:5432 ok: TLSv1.3, 40 days left",
        "db1:5432 ok: TLSv1.3, 300 days left",
    ]
    many = render_nagios(FLEET, warn_days=30, crit_days=15).splitlines()
    assert many[1:] == [
        "db3:5432 critical: because expired; because plaintext-accepted",
        "db4:5432 unknown: because unreachable",
        "db2:5432 warning: because expires-soon",
        "db1:5432 ok: TLSv1.3, 300 days left",
    ]
    for text in (*bad, *lines, *many):
        assert not re.search(r"\bok: ok\b|\bok \(", text), text


ON_DISK = (
    "--on-disk: libpq could not log in as role postgres (database postgres): connection to "
    'server at "127.0.0.1", port 5432 failed: fe_sendauth: no password supplied'
)


def test_an_unread_on_disk_part_is_unknown_in_every_format() -> None:
    chain = certfactory.make_chain()
    certs = chain.leaf_first(with_root=False)
    opts = WatchOptions()
    found, *_ = classify(
        Target("db1.example.com"), tls_version="TLSv1.3", chain=certs, options=opts,
        on_disk_error=ON_DISK.removeprefix("--on-disk: "),
    )  # fmt: skip
    assert found == [("on-disk-unreadable", ON_DISK)]
    assert REASONS["on-disk-unreadable"] == "unknown"
    unread = TargetResult(
        target="db1:5432", host="db1", port=5432, status="unknown",
        reasons=("on-disk-unreadable",), details=(ON_DISK,), tls_version="TLSv1.3",
        chain=(element(300),), days_left=300,
    )  # fmt: skip
    table = render_table([unread], warn_days=30, crit_days=15).splitlines()
    assert table[1].split()[0] == "unknown" and table[1].endswith("on-disk-unreadable")
    assert table[-1] == f"db1:5432: {ON_DISK}"
    nagios = render_nagios([unread], warn_days=30, crit_days=15).splitlines()
    assert nagios[0].startswith("PGTLS UNKNOWN - db1:5432 on-disk-unreadable | ")
    assert nagios[1] == f"db1:5432: {ON_DISK}"
    assert exit_code([unread], "nagios") == 3
    doc = json.loads(render_json([unread]))["targets"][0]
    assert (doc["status"], doc["reasons"], doc["details"]) == (
        "unknown", ["on-disk-unreadable"], [ON_DISK],
    )  # fmt: skip


def test_names_print_as_rfc4514_with_email_address() -> None:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from pgtls_helpers.postgres.watch import _element

    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "db1.example.com"),
            x509.NameAttribute(NameOID.EMAIL_ADDRESS, "dba@example.com"),
        ]
    )
    root = certfactory.make_ca("Root")
    leaf = certfactory.issue(name, issuer=root, sans=["db1.example.com"], expired=True)
    row = _element(leaf.cert, "leaf", NOW)
    assert row.subject == "emailAddress=dba@example.com,CN=db1.example.com"
    found, *_ = classify(
        Target("db1.example.com"), tls_version="TLSv1.3", chain=[leaf.cert],
        options=WatchOptions(), at=_dt.datetime.now(_dt.UTC),
    )  # fmt: skip
    assert found[0][0] == "expired"
    assert "the leaf emailAddress=dba@example.com,CN=db1.example.com expired on" in found[0][1]
    assert "1.2.840.113549" not in " ".join(s for _, s in found)
