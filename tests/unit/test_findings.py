"""Every finding code, on chains built to trigger it, and messages a DBA can act on."""

from __future__ import annotations

import datetime as dt

import certfactory
import pytest
from cryptography import x509

from pgtls_helpers.pki.chain import order_chain
from pgtls_helpers.pki.findings import CODES, Finding, check_chain, has_errors

REQUIRED = {
    "missing-issuer",
    "expired",
    "not-yet-valid",
    "expires-soon",
    "key-mismatch",
    "hostname-mismatch",
    "no-server-auth",
    "not-a-ca",
    "weak-key",
    "weak-signature",
    "bad-signature",
}


def codes(findings: list[Finding]) -> set[str]:
    return {f.code for f in findings}


def only(findings: list[Finding], code: str) -> list[Finding]:
    return [f for f in findings if f.code == code]


def assert_actionable(findings: list[Finding]) -> None:
    for f in findings:
        assert f.code in CODES, f.code
        assert f.severity in ("error", "warning", "info")
        assert f.message.endswith(".") and "\n" not in f.message, f.message
        assert f.message[0].isupper(), f.message
        assert "PRIVATE KEY" not in f.message


@pytest.fixture(scope="module")
def art() -> certfactory.Chain:
    return certfactory.article_chain()


def test_required_codes_have_advice() -> None:
    assert REQUIRED <= set(CODES)
    for advice in CODES.values():
        assert advice.endswith(".") and "\n" not in advice


def test_a_good_chain_has_no_findings(art: certfactory.Chain) -> None:
    result = order_chain(art.root_first())
    findings = check_chain(result, key=art.leaf.key, hosts=["db1.example.com", "DB1.example.COM"])
    assert findings == []
    assert not has_errors(findings)


def test_public_key_is_enough_for_the_key_check(art: certfactory.Chain) -> None:
    result = order_chain(art.leaf_first())
    assert check_chain(result, key=art.leaf.key.public_key()) == []


def test_missing_issuer_names_the_missing_ca(art: certfactory.Chain) -> None:
    findings = check_chain(order_chain(art.leaf_first(with_root=False)))
    (f,) = only(findings, "missing-issuer")
    assert f.severity == "error" and '"RootCA"' in f.message
    assert '"IntermediateCA_BAR"' in f.message
    # no option of one command in the finding itself: each reader passes its own way in
    assert "--pool" not in f.message and f.message.endswith("add its file to the files read.")
    assert_actionable(findings)


def test_expired_leaf_and_intermediate() -> None:
    root = certfactory.make_ca("Root")
    inter = certfactory.make_ca("Old Intermediate", issuer=root, expired=True)
    leaf = certfactory.issue(
        "db1.example.com", issuer=inter, sans=["db1.example.com"], expired=True
    )
    findings = check_chain(order_chain([leaf.cert, inter.cert, root.cert]))
    expired = only(findings, "expired")
    assert len(expired) == 2
    assert any(
        'leaf certificate "db1.example.com"' in f.message and "new CSR" in f.message
        for f in expired
    )
    assert any('"Old Intermediate"' in f.message for f in expired)
    assert_actionable(findings)


def test_not_yet_valid() -> None:
    chain = certfactory.article_chain(not_yet_valid=True)
    findings = check_chain(order_chain(chain.leaf_first()))
    (f,) = only(findings, "not-yet-valid")
    assert f.severity == "error" and "clock" in f.message


def test_expires_soon_is_a_warning_with_a_threshold() -> None:
    chain = certfactory.article_chain(days=10)
    result = order_chain(chain.leaf_first())
    findings = check_chain(result)
    (f,) = only(findings, "expires-soon")
    assert f.severity == "warning" and "9 days" in f.message
    assert not has_errors(findings)
    assert check_chain(result, expires_soon_days=5) == []


def test_judged_at_the_given_time(art: certfactory.Chain) -> None:
    result = order_chain(art.leaf_first())
    later = art.leaf.cert.not_valid_after_utc + dt.timedelta(days=1)
    assert "expired" in codes(check_chain(result, now=later))
    earlier = art.leaf.cert.not_valid_before_utc - dt.timedelta(days=1)
    assert "not-yet-valid" in codes(check_chain(result, now=earlier))


def test_key_mismatch(art: certfactory.Chain) -> None:
    other_key = certfactory.make_key("rsa2048")
    findings = check_chain(order_chain(art.leaf_first()), key=other_key)
    (f,) = only(findings, "key-mismatch")
    assert f.severity == "error" and '"db1.example.com"' in f.message


def test_hostname_mismatch_explains_libpq_rule() -> None:
    chain = certfactory.article_chain(leaf_cn="db1.example.com")
    findings = check_chain(
        order_chain(chain.leaf_first()), hosts=["db1.example.com", "db1", "10.0.0.5"]
    )
    mismatches = only(findings, "hostname-mismatch")
    assert len(mismatches) == 2
    assert all("verify-full" in f.message for f in mismatches)
    assert any('"db1"' in f.message and "CN is not consulted" in f.message for f in mismatches)


def test_no_server_auth() -> None:
    chain = certfactory.article_chain(eku=[certfactory.CLIENT_AUTH])
    findings = check_chain(order_chain(chain.leaf_first()))
    (f,) = only(findings, "no-server-auth")
    assert "clientAuth" in f.message and f.severity == "error"


def test_no_eku_at_all_is_fine() -> None:
    chain = certfactory.article_chain(eku=None)
    assert "no-server-auth" not in codes(check_chain(order_chain(chain.leaf_first())))


def test_not_a_ca_without_basic_constraints() -> None:
    root = certfactory.make_ca("Root")
    fake = certfactory.make_ca("Fake Intermediate", issuer=root, basic_constraints=False)
    leaf = certfactory.issue("db1.example.com", issuer=fake, sans=["db1.example.com"])
    findings = check_chain(order_chain([leaf.cert, fake.cert, root.cert]))
    (f,) = only(findings, "not-a-ca")
    assert '"Fake Intermediate" signed "db1.example.com"' in f.message
    assert "basicConstraints" in f.message


def test_not_a_ca_when_a_server_certificate_signed() -> None:
    root = certfactory.make_ca("Root")
    server = certfactory.issue("server.example.com", issuer=root)  # CA:FALSE
    leaf = certfactory.issue("db1.example.com", issuer=server)
    findings = check_chain(order_chain([leaf.cert, server.cert, root.cert]))
    (f,) = only(findings, "not-a-ca")
    assert "CA:FALSE" in f.message


def test_not_a_ca_without_key_cert_sign() -> None:
    root = certfactory.make_ca("Root")
    ku = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    inter = certfactory.make_ca(
        "No Sign Intermediate", issuer=root, key_usage=False, extra_extensions=[(ku, True)]
    )
    leaf = certfactory.issue("db1.example.com", issuer=inter)
    (f,) = only(check_chain(order_chain([leaf.cert, inter.cert, root.cert])), "not-a-ca")
    assert "keyCertSign" in f.message


def test_weak_key() -> None:
    chain = certfactory.article_chain(key_type="rsa2048", leaf_key_type="rsa1024")
    findings = check_chain(order_chain(chain.leaf_first()))
    (f,) = only(findings, "weak-key")
    assert "RSA 1024" in f.message and "new CSR" in f.message


def test_strong_keys_pass() -> None:
    chain = certfactory.article_chain(key_type="rsa2048")
    assert "weak-key" not in codes(check_chain(order_chain(chain.leaf_first())))


@pytest.mark.parametrize("hash_name", ["sha1", "md5"])
def test_weak_signature(hash_name: str) -> None:
    root = certfactory.make_ca("Root", key_type="rsa2048")
    inter = certfactory.make_ca("Intermediate", issuer=root, key_type="rsa2048")
    leaf = certfactory.issue(
        "db1.example.com", issuer=inter, hash_name=hash_name, sans=["db1.example.com"]
    )
    findings = check_chain(order_chain([leaf.cert, inter.cert, root.cert]))
    (f,) = only(findings, "weak-signature")
    assert hash_name.upper() in f.message and "SHA-256" in f.message


def test_a_sha1_self_signature_on_the_root_is_not_flagged() -> None:
    root = certfactory.make_ca("Old Root", key_type="rsa2048", hash_name="sha1")
    inter = certfactory.make_ca("Intermediate", issuer=root, key_type="rsa2048")
    leaf = certfactory.issue(
        "db1.example.com", issuer=inter, sans=["db1.example.com"], eku=[certfactory.SERVER_AUTH]
    )
    findings = check_chain(order_chain([leaf.cert, inter.cert, root.cert]), verify=False)
    assert "weak-signature" not in codes(findings)


def test_bad_signature_when_the_leaf_was_altered(art: certfactory.Chain) -> None:
    bad = certfactory.tamper_signature(art.leaf)
    findings = check_chain(order_chain([bad, *art.leaf_first()[1:]]))
    (f,) = only(findings, "bad-signature")
    assert "damaged or altered" in f.message and "key identifiers match" in f.message
    assert "missing-issuer" in codes(findings)
    assert_actionable(findings)


def test_bad_signature_from_a_same_name_decoy(art: certfactory.Chain) -> None:
    foo = art.intermediates[1]
    decoy = certfactory.decoy_of(foo, issuer=art.intermediates[0])
    findings = check_chain(
        order_chain([art.leaf.cert, decoy.cert, art.intermediates[0].cert, art.root.cert])
    )
    (f,) = only(findings, "bad-signature")
    assert "right name but a different key" in f.message and '"IntermediateCA_FOO"' in f.message
    (missing,) = only(findings, "missing-issuer")
    assert "No certificate among the files signed" in missing.message
    assert_actionable(findings)


def test_bad_self_signature_on_the_root(art: certfactory.Chain) -> None:
    bad_root = certfactory.tamper_signature(art.root)
    findings = check_chain(order_chain([*art.leaf_first(with_root=False), bad_root]))
    assert any("self-signature" in f.message for f in only(findings, "bad-signature"))


def test_decoy_next_to_the_real_issuer_is_a_warning(art: certfactory.Chain) -> None:
    decoy = certfactory.decoy_of(art.intermediates[1], issuer=art.intermediates[0])
    findings = check_chain(order_chain([decoy.cert, *art.leaf_first()]))
    (f,) = only(findings, "unused-certificate")
    assert f.severity == "warning" and "same name" in f.message
    assert not has_errors(findings)


def test_unrelated_certificate_is_info(art: certfactory.Chain) -> None:
    stray = certfactory.make_ca("Stray CA")
    findings = check_chain(order_chain([*art.leaf_first(), stray.cert]))
    assert [(f.severity, f.code) for f in findings] == [("info", "unused-certificate")]


def test_only_ca_certificates_is_no_leaf(art: certfactory.Chain) -> None:
    for verify in (False, True):
        findings = check_chain(
            order_chain(art.root_first()[:3]), hosts=["db1.example.com"], verify=verify
        )
        assert findings[0].severity == "error" and findings[0].code == "no-leaf"
        assert "no-san" not in codes(findings) and "hostname-mismatch" not in codes(findings)
        assert has_errors(findings)


def test_a_lone_root_is_no_leaf(art: certfactory.Chain) -> None:
    findings = check_chain(order_chain([art.root.cert]))
    assert [(f.severity, f.code) for f in findings] == [("error", "no-leaf")]


def test_leaf_is_ca_when_a_server_certificate_is_left_over(art: certfactory.Chain) -> None:
    stray = certfactory.issue("stray.example.com", issuer=certfactory.make_ca("Stray CA"))
    result = order_chain([*art.root_first()[:3], stray.cert], leaf=art.intermediates[1].cert)
    findings = check_chain(result, verify=False)
    assert "leaf-is-ca" in codes(findings) and "no-leaf" not in codes(findings)


def test_cn_only_certificate_is_a_warning_since_libpq_accepts_it() -> None:
    # CN only, no SAN: libpq matches the CN, RFC 5280 verification wants a SAN.
    root = certfactory.make_ca("Root")
    inter = certfactory.make_ca("Intermediate", issuer=root)
    leaf = certfactory.issue("db1.example.com", issuer=inter, eku=[certfactory.SERVER_AUTH])
    result = order_chain([leaf.cert, inter.cert, root.cert])
    findings = check_chain(result, hosts=["db1.example.com"])
    assert [(f.severity, f.code) for f in findings] == [("warning", "no-san")]
    assert "subjectAltName" in findings[0].message and "libpq" in findings[0].message
    assert check_chain(result, hosts=["db1.example.com"], verify=False) == []


def test_chain_rejected_when_only_cryptography_objects() -> None:
    # A path-length constraint: none of our own checks looks at it, the verifier does.
    root = certfactory.make_ca("Root")
    inter = certfactory.make_ca("Intermediate", issuer=root, path_length=0)
    sub = certfactory.make_ca("Sub", issuer=inter)
    leaf = certfactory.issue(
        "db1.example.com", issuer=sub, sans=["db1.example.com"], eku=[certfactory.SERVER_AUTH]
    )
    result = order_chain([leaf.cert, sub.cert, inter.cert, root.cert])
    findings = check_chain(result, hosts=["db1.example.com"])
    assert [(f.severity, f.code) for f in findings] == [("error", "chain-rejected")]
    assert check_chain(result, hosts=["db1.example.com"], verify=False) == []


def test_errors_come_first(art: certfactory.Chain) -> None:
    stray = certfactory.make_ca("Stray CA")
    chain = certfactory.article_chain(days=5)
    findings = check_chain(
        order_chain([stray.cert, *chain.leaf_first()]), hosts=["nope.example.com"]
    )
    order = [f.severity for f in findings]
    assert order == sorted(order, key=["error", "warning", "info"].index)
    assert order[0] == "error" and order[-1] == "info"


def test_empty_result() -> None:
    findings = check_chain(order_chain([]))
    assert has_errors(findings)
    assert_actionable(findings)
