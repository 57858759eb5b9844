"""pg_hba.conf inputs that must never reach the file, CRLF kept, included files followed."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgtls_helpers.errors import InputError
from pgtls_helpers.postgres import hba

RULE = {
    "type": "hostssl",
    "database": "all",
    "user": "all",
    "address": "127.0.0.1/32",
    "method": "scram-sha-256",
}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("user", "app\nhost all all 0.0.0.0/0 trust"),
        ("database", "all all"),
        ("user", "app#x"),
        ("address", "127.0.0.1/32\r"),
        ("method", "scram-sha-256\x00"),
        ("database", '"mydb"'),
    ],
)
def test_a_field_that_would_break_out_of_its_column_is_refused(field: str, value: str) -> None:
    with pytest.raises(InputError, match=f"{field} .*pg_hba.conf would read"):
        hba.parse_rules([{**RULE, field: value}])


def test_an_option_with_a_newline_is_refused() -> None:
    with pytest.raises(InputError, match="option"):
        hba.parse_rules([{**RULE, "options": ["clientcert=verify-full\nhost all all all trust"]}])


@pytest.mark.parametrize("raw", ["hostssl all all all md5", 5, [["hostssl"]]])
def test_rules_of_the_wrong_type_are_one_sentence(raw: object) -> None:
    with pytest.raises(InputError, match="expected"):
        hba.parse_rules(raw if isinstance(raw, list) else raw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "insecure"),
    [
        ({"method": "trust"}, "trust"),
        ({"type": "host"}, "without TLS"),
        ({"type": "hostnossl", "method": "md5"}, "without TLS"),
        ({"type": "hostnossl", "method": "reject"}, None),
        ({"type": "hostnogssenc"}, "without TLS"),
        ({"type": "hostnogssenc", "method": "reject"}, None),
        ({"type": "hostgssenc"}, None),
        ({}, None),
    ],
)
def test_trust_and_non_ssl_rules_are_named(change: dict[str, str], insecure: str | None) -> None:
    (rule,) = hba.parse_rules([{**RULE, **change}])
    reason = hba.insecure_reason(rule)
    assert (reason is None) if insecure is None else (insecure in (reason or ""))


def test_crlf_files_keep_their_line_endings() -> None:
    text = "local all all peer\r\nhost all all 127.0.0.1/32 scram-sha-256\r\n"
    plan = hba.plan_hba(text, hba.parse_rules([RULE]))
    assert plan.changed
    assert plan.after.count("\r\n") == plan.after.count("\n")
    assert "\r\n" in plan.after and not plan.after.replace("\r\n", "").count("\n")


def test_lf_files_stay_lf() -> None:
    text = "local all all peer\nhost all all 127.0.0.1/32 scram-sha-256\n"
    assert "\r" not in hba.plan_hba(text, hba.parse_rules([RULE])).after


def test_an_include_with_tcp_lines_counts_as_a_tcp_line(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "10-apps.conf").write_text("host all app 10.0.0.0/8 md5\n")
    (tmp_path / "local.conf").write_text("local all all peer\n")
    text = (
        "local all all peer\n"
        "include local.conf\n"
        "include_dir conf.d\n"
        "host all all 127.0.0.1/32 scram-sha-256\n"
    )
    hba_file = tmp_path / "pg_hba.conf"
    included = hba.included_tcp_lines(hba_file, text)
    assert included == {2: False, 3: True}
    plan = hba.plan_hba(text, hba.parse_rules([RULE]), included=included)
    lines = plan.after.splitlines()
    reject = lines.index(next(ln for ln in lines if ln.startswith("hostnossl all")))
    assert reject < lines.index("include_dir conf.d")
    assert lines.index("include local.conf") < reject


def test_a_missing_include_if_exists_holds_no_tcp_line(tmp_path: Path) -> None:
    text = "include_if_exists nothing.conf\nhost all all 127.0.0.1/32 md5\n"
    assert hba.included_tcp_lines(tmp_path / "pg_hba.conf", text) == {1: False}
