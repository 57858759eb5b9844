"""pg_hba.conf policy: where the TLS lines go, what is kept, what is refused."""

from __future__ import annotations

import pytest

from pgtls_helpers.errors import InputError
from pgtls_helpers.postgres.hba import HbaRule, parse_rules, plan_hba

STOCK = """\
# PostgreSQL Client Authentication Configuration File
# TYPE  DATABASE        USER            ADDRESS                 METHOD

# "local" is for Unix domain socket connections only
local   all             all                                     peer
# IPv4 local connections:
host    all             all             127.0.0.1/32            scram-sha-256
# IPv6 local connections:
host    all             all             ::1/128                 scram-sha-256
local   replication     all                                     peer
host    replication     all             127.0.0.1/32            scram-sha-256
"""

APP = HbaRule("hostssl", "mydb", "enterprisedb", "10.0.0.0/24", "scram-sha-256")


def _record_lines(text: str) -> list[str]:
    return [
        ln.split()[0] + " " + " ".join(ln.split()[1:])
        for ln in text.splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]


def test_rejects_and_rules_go_before_the_first_tcp_line_and_nothing_else_moves() -> None:
    plan = plan_hba(STOCK, [APP])
    records = _record_lines(plan.after)
    assert records[0] == "local all all peer"
    assert records[1:4] == [
        "hostnossl all all all reject",
        "hostnossl replication all all reject",
        "hostssl mydb enterprisedb 10.0.0.0/24 scram-sha-256",
    ]
    # every original line is still there, in the original order, byte for byte
    original = STOCK.splitlines()
    after = plan.after.splitlines()
    kept = [ln for ln in after if ln in original]
    assert kept == original
    # the comment that describes the first host line stays attached to it
    idx = after.index("# IPv4 local connections:")
    assert after[idx + 1].startswith("host    all")
    assert after[idx - 1].startswith("hostssl")


def test_a_second_plan_adds_nothing() -> None:
    first = plan_hba(STOCK, [APP])
    second = plan_hba(first.after, [APP])
    assert first.changed and not second.changed
    assert second.diff() == ""


def test_new_rule_on_a_later_run_is_added_once_more_without_touching_the_first_block() -> None:
    first = plan_hba(STOCK, [APP]).after
    other = HbaRule("hostssl", "all", "all", "127.0.0.1/32", "scram-sha-256")
    second = plan_hba(first, [APP, other])
    assert second.added == (other.line(),)
    assert _record_lines(second.after).count("hostnossl all all all reject") == 1


def test_a_specific_host_line_is_never_sorted_above_the_reject() -> None:
    text = "host all all 0.0.0.0/0 md5\nhost mydb bob 10.1.2.3/32 trust\n"
    records = _record_lines(plan_hba(text, [APP]).after)
    assert records.index("hostnossl all all all reject") < records.index(
        "host mydb bob 10.1.2.3/32 trust"
    )
    assert records[-2:] == ["host all all 0.0.0.0/0 md5", "host mydb bob 10.1.2.3/32 trust"]


def test_file_with_only_local_lines_gets_the_block_at_the_end() -> None:
    plan = plan_hba("local all all peer", [APP])
    assert plan.after.splitlines()[0] == "local all all peer"
    assert _record_lines(plan.after)[-1] == "hostssl mydb enterprisedb 10.0.0.0/24 scram-sha-256"


def test_without_reject_only_the_client_rules_are_added() -> None:
    plan = plan_hba(STOCK, [APP], reject_non_ssl=False)
    assert "reject" not in "".join(plan.added)
    assert plan.added == (APP.line(),)


def test_the_articles_eject_typo_is_caught_with_a_suggestion() -> None:
    with pytest.raises(InputError, match="'eject' is not an authentication method.*'reject'"):
        parse_rules(
            [
                {
                    "type": "hostnossl",
                    "database": "all",
                    "user": "all",
                    "address": "all",
                    "method": "eject",
                }
            ]
        )


def test_a_typo_already_in_the_file_is_reported_with_its_line() -> None:
    with pytest.raises(InputError, match=r"pg_hba.conf:2: 'eject'"):
        plan_hba("local all all peer\nhostnossl all all all eject\n", [APP])


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            {
                "type": "hostsll",
                "database": "all",
                "user": "all",
                "address": "all",
                "method": "md5",
            },
            "connection type 'hostsll'",
        ),
        (
            {
                "type": "hostssl",
                "database": "all",
                "user": "all",
                "address": "10.0.0.0/33",
                "method": "md5",
            },
            "not a valid CIDR",
        ),
        ({"type": "hostssl", "database": "all", "user": "all", "method": "md5"}, "missing address"),
    ],
)
def test_bad_rules_get_one_sentence(rule: dict[str, str], message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_rules([rule])


def test_diff_names_the_file_and_shows_only_additions() -> None:
    diff = plan_hba(STOCK, [APP], path="/etc/pg_hba.conf").diff()
    assert "--- /etc/pg_hba.conf (current)" in diff
    changed = [ln for ln in diff.splitlines() if ln[:1] in "+-" and ln[:3] not in ("+++", "---")]
    assert changed and all(ln.startswith("+") for ln in changed)
