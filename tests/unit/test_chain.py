"""Ordering a CA response: by issuer name and signature, decoys, pools, bundles, the table."""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path

import certfactory
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from pgtls_helpers.errors import InputError
from pgtls_helpers.pki import chain as chainmod
from pgtls_helpers.pki.chain import (
    TABLE_COLUMNS,
    ChainResult,
    bundle_pem,
    fingerprint,
    inspection_table,
    is_self_signed,
    order_chain,
    raw_names,
    root_pem,
    same_name,
    signed_by,
)
from pgtls_helpers.pki.findings import verify_with_cryptography


def cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def cns(certs: tuple[x509.Certificate, ...] | list[x509.Certificate]) -> list[str]:
    return [cn(c) for c in certs]


ARTICLE_ORDER = ["db1.example.com", "IntermediateCA_FOO", "IntermediateCA_BAR", "RootCA"]


@pytest.fixture(scope="module")
def art() -> certfactory.Chain:
    return certfactory.article_chain()


def assert_article_path(result: ChainResult) -> None:
    assert cns(result.path) == ARTICLE_ORDER
    assert result.roles == ("leaf", "intermediate", "intermediate", "root")
    assert result.missing_issuer is None
    assert result.complete


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_every_input_order_gives_leaf_to_root(art: certfactory.Chain, order: tuple) -> None:
    certs = art.leaf_first()
    result = order_chain([certs[i] for i in order])
    assert_article_path(result)
    assert result.unused == ()
    assert result.leaf == art.leaf.cert and result.root == art.root.cert
    assert cns(result.intermediates) == ["IntermediateCA_FOO", "IntermediateCA_BAR"]


@pytest.mark.parametrize("key_type", ["rsa2048", "ecdsa-p384", "ed25519"])
def test_key_types(key_type: str) -> None:
    chain = certfactory.article_chain(key_type=key_type)
    assert_article_path(order_chain(chain.root_first()))


def test_empty_input() -> None:
    result = order_chain([])
    assert (result.path, result.roles, result.leaf, result.root) == ((), (), None, None)
    assert not result.complete


def test_duplicates_are_ignored(art: certfactory.Chain) -> None:
    result = order_chain(art.leaf_first() + art.leaf_first())
    assert_article_path(result)
    assert result.unused == ()


def test_same_name_decoy_signed_by_the_real_parent_is_not_used(art: certfactory.Chain) -> None:
    foo, bar = art.intermediates[1], art.intermediates[0]
    decoy = certfactory.decoy_of(foo, issuer=bar)  # same name, different key, chains upwards
    assert decoy.cert.subject == foo.cert.subject
    for certs in ([decoy.cert, *art.leaf_first()], [*art.leaf_first(), decoy.cert]):
        result = order_chain(certs)
        assert_article_path(result)
        assert result.path[1] == foo.cert
        assert result.unused == (decoy.cert,)


def test_self_signed_decoy_is_not_taken_for_the_root(art: certfactory.Chain) -> None:
    decoy_root = certfactory.decoy_of(art.root)
    result = order_chain([decoy_root.cert, *art.leaf_first()])
    assert_article_path(result)
    assert result.root == art.root.cert
    assert result.unused == (decoy_root.cert,)


def test_only_the_decoy_present_means_the_issuer_is_missing(art: certfactory.Chain) -> None:
    foo = art.intermediates[1]
    decoy = certfactory.decoy_of(foo, issuer=art.intermediates[0])
    result = order_chain([art.leaf.cert, decoy.cert, art.intermediates[0].cert, art.root.cert])
    assert result.path == (art.leaf.cert,)
    assert result.missing_issuer == foo.cert.subject
    assert set(result.unused) == {decoy.cert, art.intermediates[0].cert, art.root.cert}


def test_missing_root_names_it(art: certfactory.Chain) -> None:
    result = order_chain(art.leaf_first(with_root=False))
    assert cns(result.path) == ARTICLE_ORDER[:3]
    assert result.roles == ("leaf", "intermediate", "intermediate")
    assert result.missing_issuer == art.root.cert.subject
    assert result.root is None and not result.complete


def test_missing_middle_link(art: certfactory.Chain) -> None:
    result = order_chain([art.leaf.cert, art.intermediates[0].cert, art.root.cert])
    assert result.path == (art.leaf.cert,)
    assert result.missing_issuer == art.intermediates[1].cert.subject
    assert set(result.unused) == {art.intermediates[0].cert, art.root.cert}


def test_pool_completes_a_lone_leaf(art: certfactory.Chain) -> None:
    unrelated = certfactory.make_chain(root_name="Other Root").leaf_first()
    pool = [*unrelated, *art.leaf_first()[1:]]
    result = order_chain([art.leaf.cert], pool)
    assert_article_path(result)
    assert set(result.from_pool) == set(art.leaf_first()[1:])
    assert result.unused == ()  # the pool's leftovers are not "unused" input


def test_input_issuer_is_preferred_to_the_pool(art: certfactory.Chain) -> None:
    result = order_chain(art.leaf_first(with_root=False), [art.root.cert])
    assert_article_path(result)
    assert result.from_pool == (art.root.cert,)


def test_a_pool_of_thousands_is_indexed(
    art: certfactory.Chain, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = certfactory.make_ca("Bulk CA")
    key = certfactory.make_key()
    # 3,000 CA certificates that share nothing with the chain but a key type.
    pool = [
        certfactory.issue(f"Bulk Intermediate {i}", issuer=ca, key=key, is_ca=True).cert
        for i in range(3000)
    ]
    pool += art.leaf_first()[1:]
    checked: list[str] = []
    real = chainmod.signed_by

    def counting(child: x509.Certificate, issuer: x509.Certificate) -> bool:
        checked.append(issuer.subject.rfc4514_string())
        return real(child, issuer)

    monkeypatch.setattr(chainmod, "signed_by", counting)
    result = order_chain([art.leaf.cert], pool)
    assert_article_path(result)
    # Candidates are found by name and key identifier, so only the chain's own issuers have
    # their signatures checked; a scan of the pool would check thousands (the time this takes
    # is measured by bench/bench_chain.py, not here).
    assert checked and not [s for s in checked if "Bulk" in s], checked[:5]
    assert len(checked) <= 2 * len(ARTICLE_ORDER), len(checked)


def test_two_leaves_one_is_used_the_other_unused(art: certfactory.Chain) -> None:
    other = certfactory.issue(
        "db2.example.com", issuer=art.intermediates[1], sans=["db2.example.com"]
    )
    certs = [*art.leaf_first(), other.cert]
    result = order_chain(certs)
    assert_article_path(result)  # the first given wins a tie
    assert result.unused == (other.cert,)
    chosen = order_chain(certs, leaf=other.cert)
    assert cns(chosen.path) == ["db2.example.com", *ARTICLE_ORDER[1:]]
    assert chosen.unused == (art.leaf.cert,)


def test_leaf_with_the_longer_path_wins(art: certfactory.Chain) -> None:
    stray_ca = certfactory.make_ca("Stray CA")
    stray_leaf = certfactory.issue("stray.example.com", issuer=stray_ca)
    result = order_chain([stray_leaf.cert, *art.root_first()])
    assert_article_path(result)
    assert result.unused == (stray_leaf.cert,)


def test_a_non_ca_is_preferred_as_leaf(art: certfactory.Chain) -> None:
    # A second, unrelated CA certificate also issued nothing in the set.
    lone_ca = certfactory.make_ca("Lone Intermediate", issuer=art.root)
    result = order_chain([lone_ca.cert, *art.root_first()])
    assert result.leaf == art.leaf.cert
    assert result.unused == (lone_ca.cert,)


def test_only_ca_certificates(art: certfactory.Chain) -> None:
    result = order_chain(art.root_first()[:3])
    assert cns(result.path) == ARTICLE_ORDER[1:]
    assert result.roles == ("leaf", "intermediate", "root")


def test_a_single_self_signed_certificate() -> None:
    lone = certfactory.issue("selfsigned.example.com", sans=["selfsigned.example.com"])
    result = order_chain([lone.cert])
    assert result.path == (lone.cert,) and result.roles == ("leaf",)
    assert result.complete and result.missing_issuer is None


def test_tampered_leaf_stops_the_path(art: certfactory.Chain) -> None:
    bad = certfactory.tamper_signature(art.leaf)
    result = order_chain([bad, *art.leaf_first()[1:]])
    assert result.path == (bad,)
    assert result.missing_issuer == art.intermediates[1].cert.subject
    assert not signed_by(bad, art.intermediates[1].cert)


def test_sha1_and_md5_signatures_are_still_ordered() -> None:
    root = certfactory.make_ca("Old Root", key_type="rsa2048")
    inter = certfactory.make_ca(
        "Old Intermediate", issuer=root, key_type="rsa2048", hash_name="sha1"
    )
    leaf = certfactory.issue("old.example.com", issuer=inter, hash_name="md5")
    result = order_chain([root.cert, leaf.cert, inter.cert])
    assert cns(result.path) == ["old.example.com", "Old Intermediate", "Old Root"]
    assert result.complete


def test_names_that_differ_only_in_encoding_and_case_still_chain() -> None:
    root = certfactory.make_ca(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Mixed  Root", _ASN1Type.UTF8String)])
    )
    # The same issuer written as a PrintableString, in other case, with single spacing.
    odd_issuer = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "MIXED ROOT", _ASN1Type.PrintableString)]
    )
    leaf_key = certfactory.make_key()
    now = root.cert.not_valid_before_utc
    leaf = (
        x509.CertificateBuilder()
        .subject_name(certfactory.name("mixed.example.com"))
        .issuer_name(odd_issuer)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(root.cert.not_valid_after_utc)
        .sign(root.key, certfactory._HASHES["sha256"])
    )
    assert raw_names(leaf)[0] != raw_names(root.cert)[1]
    assert same_name(leaf.issuer, root.cert.subject)
    result = order_chain([root.cert, leaf])
    assert result.path == (leaf, root.cert) and result.complete


def test_chain_without_key_identifiers() -> None:
    root = certfactory.make_ca("Plain Root", ski=False, aki=False)
    inter = certfactory.make_ca("Plain Intermediate", issuer=root, ski=False, aki=False)
    leaf = certfactory.issue("plain.example.com", issuer=inter, ski=False, aki=False)
    result = order_chain([leaf.cert, root.cert, inter.cert])
    assert cns(result.path) == ["plain.example.com", "Plain Intermediate", "Plain Root"]


def test_cross_signed_loop_terminates() -> None:
    key_a, key_b = certfactory.make_key(), certfactory.make_key()
    a_self = certfactory.make_ca("CA A", key=key_a)
    b_self = certfactory.make_ca("CA B", key=key_b)
    a_by_b = certfactory.make_ca("CA A", issuer=b_self, key=key_a)
    b_by_a = certfactory.make_ca("CA B", issuer=a_self, key=key_b)
    leaf = certfactory.issue("loop.example.com", issuer=a_self)
    result = order_chain([leaf.cert, a_by_b.cert, b_by_a.cert])
    assert cns(result.path) == ["loop.example.com", "CA A", "CA B"]
    assert result.missing_issuer == a_self.cert.subject
    assert len(set(result.path)) == len(result.path)


def test_is_self_signed(art: certfactory.Chain) -> None:
    assert is_self_signed(art.root.cert)
    assert not is_self_signed(art.intermediates[0].cert)
    assert not is_self_signed(certfactory.tamper_signature(art.root))


def test_raw_names_match_the_parsed_names(art: certfactory.Chain) -> None:
    certs = art.leaf_first()
    store = Path("/etc/ssl/certs")
    if store.is_dir():
        from pgtls_helpers.pki.intake import load_pool

        certs += load_pool([store])
    assert len(certs) >= 4
    for cert in certs:
        assert raw_names(cert) == (cert.issuer.public_bytes(), cert.subject.public_bytes())


def test_bundle_pem_is_leaf_then_intermediates_in_signing_order(art: certfactory.Chain) -> None:
    result = order_chain(art.root_first())
    bundle = x509.load_pem_x509_certificates(bundle_pem(result))
    assert cns(bundle) == ARTICLE_ORDER[:3]
    assert x509.load_pem_x509_certificate(root_pem(result)) == art.root.cert


def test_bundle_without_root_keeps_every_member(art: certfactory.Chain) -> None:
    result = order_chain(art.leaf_first(with_root=False))
    assert cns(x509.load_pem_x509_certificates(bundle_pem(result))) == ARTICLE_ORDER[:3]
    with pytest.raises(InputError, match="RootCA"):
        root_pem(result)


def test_bundle_of_nothing_is_an_input_error() -> None:
    with pytest.raises(InputError):
        bundle_pem(order_chain([]))


def test_cryptography_accepts_a_good_chain(art: certfactory.Chain) -> None:
    result = order_chain(art.leaf_first())
    assert verify_with_cryptography(result, "db1.example.com") is None
    assert verify_with_cryptography(result) is None  # the leaf's own SAN


def test_cryptography_rejects_the_wrong_host(art: certfactory.Chain) -> None:
    finding = verify_with_cryptography(order_chain(art.leaf_first()), "other.example.com")
    assert finding is not None and finding.code == "chain-rejected"
    assert finding.severity == "error" and "db1.example.com" in finding.message


def test_cryptography_reads_ip_hosts_as_libpq_does() -> None:
    chain = certfactory.make_chain(leaf_cn="127.0.0.1", leaf_sans=["127.0.0.1"])
    result = order_chain(chain.leaf_first())
    assert verify_with_cryptography(result, "127.1") is None  # inet_aton's short form
    finding = verify_with_cryptography(result, "127.0.0.2")
    assert finding is not None and finding.code == "chain-rejected"
    assert finding.severity == "error" and "127.0.0.2" in finding.message


def test_cryptography_rejects_an_expired_leaf() -> None:
    chain = certfactory.article_chain(expired=True)
    finding = verify_with_cryptography(order_chain(chain.leaf_first()), "db1.example.com")
    assert finding is not None and finding.code == "chain-rejected"
    assert finding.severity == "error" and "db1.example.com" in finding.message


def test_cryptography_judges_at_the_given_time(art: certfactory.Chain) -> None:
    result = order_chain(art.leaf_first())
    later = art.leaf.cert.not_valid_after_utc.replace(
        year=art.leaf.cert.not_valid_after_utc.year + 1
    )
    finding = verify_with_cryptography(result, "db1.example.com", at=later)
    assert finding is not None and finding.code == "chain-rejected"
    inside = art.leaf.cert.not_valid_before_utc + dt.timedelta(days=1)
    assert verify_with_cryptography(result, "db1.example.com", at=inside) is None


def test_cryptography_needs_a_root(art: certfactory.Chain) -> None:
    finding = verify_with_cryptography(order_chain(art.leaf_first(with_root=False)))
    assert finding is not None and finding.code == "chain-rejected"
    assert finding.severity == "error" and "root" in finding.message


def test_inspection_table(art: certfactory.Chain) -> None:
    decoy = certfactory.decoy_of(art.intermediates[1], issuer=art.intermediates[0])
    result = order_chain([*art.leaf_first(), decoy.cert])
    frame = inspection_table(result)
    assert tuple(frame.columns) == TABLE_COLUMNS
    assert list(frame["role"]) == ["leaf", "intermediate", "intermediate", "root", "unused"]
    assert list(frame["position"].iloc[:4]) == [0, 1, 2, 3]
    assert frame["position"].isna().iloc[4]
    leaf_row = frame.iloc[0]
    assert leaf_row["subject"] == "CN=db1.example.com"
    assert leaf_row["issuer"] == "CN=IntermediateCA_FOO"
    assert leaf_row["sha256"] == fingerprint(art.leaf.cert)
    assert leaf_row["sans"] == "DNS:db1.example.com"
    assert leaf_row["key"] == "ECDSA P-256"
    assert leaf_row["signature_algorithm"] == "ecdsa-with-SHA256"
    assert 360 <= leaf_row["days_left"] <= 365
    assert leaf_row["not_after"] == art.leaf.cert.not_valid_after_utc
    assert int(leaf_row["serial"], 16) == art.leaf.cert.serial_number
    assert leaf_row["aki"] == frame.iloc[1]["ski"] != ""
    assert len(inspection_table(result, include_unused=False)) == 4


def test_pem_round_trip_keeps_order_for_openssl(art: certfactory.Chain, tmp_path: Path) -> None:
    import subprocess

    result = order_chain(art.root_first())
    (tmp_path / "server.crt").write_bytes(bundle_pem(result))
    (tmp_path / "root.crt").write_bytes(root_pem(result))
    (tmp_path / "leaf.crt").write_bytes(art.leaf.cert.public_bytes(serialization.Encoding.PEM))
    proc = subprocess.run(
        ["openssl", "verify", "-CAfile", "root.crt", "-untrusted", "server.crt", "leaf.crt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
