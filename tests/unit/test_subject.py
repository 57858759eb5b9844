"""Subject fields and SANs: RFC 5280 bounds, host-name rules for verify-full, CN always a SAN."""

from __future__ import annotations

import ipaddress

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from pgtls_helpers.errors import InputError
from pgtls_helpers.pki.subject import Subject, is_dns_name, is_ip_literal, make_subject


def test_full_subject_is_normalized() -> None:
    s = make_subject(
        "  db1.example.com ",
        country="de",
        state="Berlin",
        locality="Berlin",
        organization="Example GmbH",
        organizational_unit="",
        email="dba@example.com",
        sans=["DB1.EXAMPLE.COM", "db1", "", "10.0.0.5", "db1"],
    )
    assert s.common_name == "db1.example.com"
    assert s.country == "DE"
    assert s.organizational_unit is None
    assert s.sans == ("db1.example.com", "db1", "10.0.0.5")


def test_cn_is_first_san_even_when_given_later() -> None:
    s = make_subject("db1.example.com", sans=["replica.example.com", "Db1.Example.com"])
    assert s.sans == ("db1.example.com", "replica.example.com")


def test_x509_name_order_and_types() -> None:
    s = make_subject(
        "db1.example.com",
        country="US",
        state="Pennsylvania",
        locality="Philadelphia",
        organization="Example",
        organizational_unit="DBA",
        email="dba@example.com",
    )
    name = s.to_x509_name()
    assert [a.oid for a in name] == [
        NameOID.COUNTRY_NAME,
        NameOID.STATE_OR_PROVINCE_NAME,
        NameOID.LOCALITY_NAME,
        NameOID.ORGANIZATION_NAME,
        NameOID.ORGANIZATIONAL_UNIT_NAME,
        NameOID.COMMON_NAME,
        NameOID.EMAIL_ADDRESS,
    ]
    assert name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "db1.example.com"


def test_san_extension_kinds() -> None:
    s = make_subject("db1.example.com", sans=["10.0.0.5", "2001:DB8::1", "*.db.example.com"])
    san = s.san_extension()
    assert san.get_values_for_type(x509.DNSName) == ["db1.example.com", "*.db.example.com"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("2001:db8::1"),
    ]


def test_ip_literal_cn_becomes_ip_san() -> None:
    s = make_subject("192.168.10.4")
    assert s.san_extension().get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("192.168.10.4")
    ]
    assert s.san_extension().get_values_for_type(x509.DNSName) == []


def test_fields_for_display() -> None:
    s = make_subject("db1.example.com", country="US", email="dba@example.com", sans=["db1"])
    assert s.fields() == [
        ("Common name (CN)", "db1.example.com"),
        ("Country (C)", "US"),
        ("Email address", "dba@example.com"),
        ("Subject alternative names", "db1.example.com, db1"),
    ]


def test_validate_on_a_directly_built_subject() -> None:
    raw = Subject("DB1.example.com", country="us", sans=("db1.example.com", "x.example.com"))
    checked = raw.validate()
    assert checked.country == "US"
    assert checked.sans == ("DB1.example.com", "x.example.com")
    with pytest.raises(InputError, match="Country"):
        Subject("db1.example.com", country="USA").validate()


def test_direct_subject_still_carries_cn_as_san() -> None:
    s = Subject("db1.example.com")
    assert s.san_extension().get_values_for_type(x509.DNSName) == ["db1.example.com"]


@pytest.mark.parametrize("country", ["USA", "U", "1A", "ÜS", "U S"])
def test_country_must_be_two_letters(country: str) -> None:
    with pytest.raises(InputError, match=r"Country \(C\) must be two letters"):
        make_subject("db1.example.com", country=country)


@pytest.mark.parametrize(
    ("field", "bound"),
    [
        ("organization", 64),
        ("organizational_unit", 64),
        ("locality", 128),
        ("state", 128),
    ],
)
def test_rfc5280_upper_bounds(field: str, bound: int) -> None:
    make_subject("db1.example.com", **{field: "x" * bound})
    with pytest.raises(InputError, match=f"at most {bound}"):
        make_subject("db1.example.com", **{field: "x" * (bound + 1)})


def test_common_name_bound_applies_even_without_verify_full() -> None:
    cn64 = "a" * 30 + "." + "b" * 33
    assert len(cn64) == 64
    assert make_subject(cn64).common_name == cn64
    with pytest.raises(InputError, match="at most 64"):
        make_subject(cn64 + "c")
    with pytest.raises(InputError, match="at most 64"):
        make_subject("My Database " * 6, for_verify_full=False)


def test_email_bound_and_shape() -> None:
    local = "d" * 240
    ok = f"{local}@example.com"
    assert len(ok) == 252
    make_subject("db1.example.com", email=ok)
    with pytest.raises(InputError, match="at most 255"):
        make_subject("db1.example.com", email=f"{local}@example.example.com")
    for bad in ["dba", "dba@", "dba@example", "d ba@example.com", "dbä@example.com"]:
        with pytest.raises(InputError, match="Email address"):
            make_subject("db1.example.com", email=bad)


@pytest.mark.parametrize(
    "cn",
    [
        "db1",
        "db1.example.com",
        "DB1.Example.COM",
        "*.example.com",
        "xn--bcher-kva.example",
        "a-b.example.com",
        "10.0.0.5",
        "::1",
        "2001:db8::10",
        "1db.example.com",
    ],
)
def test_cn_accepted_for_verify_full(cn: str) -> None:
    s = make_subject(cn)
    assert s.sans[0].lower() == cn.lower()


@pytest.mark.parametrize(
    ("cn", "why"),
    [
        ("my database", "not a host name"),
        ("db_1.example.com", "not a host name"),
        ("-db.example.com", "not a host name"),
        ("db-.example.com", "not a host name"),
        ("db1..example.com", "not a host name"),
        ("x" * 64, "not a host name"),
        ("*.com", "wildcard over a top-level domain"),
        ("a.*.example.com", "wildcard"),
        ("db*.example.com", "wildcard"),
        ("*.*.example.com", "wildcard"),
        ("db1.example.com.", "trailing dot"),
        ("10.1.2", "looks like an IP address"),
        ("010.0.0.1", "looks like an IP address"),
        ("fe80::1%eth0", "zone index"),
        ("bücher.example", "xn--bcher-kva.example"),
    ],
)
def test_cn_refused_for_verify_full(cn: str, why: str) -> None:
    with pytest.raises(InputError, match="verify-full") as info:
        make_subject(cn)
    assert why in str(info.value)
    assert str(info.value).startswith("Common name (CN)")


def test_cn_free_text_without_verify_full_is_not_a_san() -> None:
    s = make_subject("Accounting DB", for_verify_full=False, sans=["db1.example.com"])
    assert s.common_name == "Accounting DB"
    assert s.sans == ("db1.example.com",)
    assert s.san_extension().get_values_for_type(x509.DNSName) == ["db1.example.com"]


def test_bad_san_names_the_san() -> None:
    with pytest.raises(InputError, match=r"Subject alternative name 'db 1' is not a host name"):
        make_subject("db1.example.com", sans=["db 1"])


def test_empty_cn_and_control_characters() -> None:
    with pytest.raises(InputError, match="Common name .* is empty"):
        make_subject("   ")
    with pytest.raises(InputError, match="control character"):
        make_subject("db1.example.com", organization="Exa\nmple")


def test_predicates() -> None:
    assert is_ip_literal("127.0.0.1") and is_ip_literal("::ffff:10.0.0.1")
    assert not is_ip_literal("127.1") and not is_ip_literal("db1")
    assert is_dns_name("*.example.com") and not is_dns_name("*.example.com", allow_wildcard=False)
    assert not is_dns_name("10.0.0.1")
