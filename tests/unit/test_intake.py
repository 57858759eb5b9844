"""Reading what CAs return: every format, text around PEM, duplicates, keys set aside, refusals."""

from __future__ import annotations

import subprocess
from pathlib import Path

import certfactory
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from support import skip_or_fail

from pgtls_helpers.errors import InputError
from pgtls_helpers.pki.intake import Intake, load_pool, read_ca_response, read_pool


@pytest.fixture(scope="module")
def chain() -> certfactory.Chain:
    return certfactory.article_chain()


@pytest.fixture(scope="module")
def rsa_chain() -> certfactory.Chain:
    return certfactory.make_chain(key_type="rsa2048")


def cns(intake: Intake) -> list[str]:
    return [sc.cert.subject.rfc4514_string() for sc in intake.certificates]


ARTICLE_ORDER = [
    "CN=db1.example.com",
    "CN=IntermediateCA_FOO",
    "CN=IntermediateCA_BAR",
    "CN=RootCA",
]


def openssl(*args: str) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(["openssl", *args], capture_output=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc


def test_pem_bundle_with_text_around_and_crlf(chain: certfactory.Chain, tmp_path: Path) -> None:
    parts = []
    for cert in chain.leaf_first():
        one = certfactory.write_pem(tmp_path / "one.pem", cert)
        parts.append(b"Bag Attributes\n    friendlyName: something\n")
        parts.append(openssl("x509", "-in", str(one), "-text").stdout)  # dump, then the PEM
    bundle = tmp_path / "bundle.txt"
    bundle.write_bytes(b"Your certificates are below.\n" + b"".join(parts).replace(b"\n", b"\r\n"))
    intake = read_ca_response([bundle])
    assert cns(intake) == ARTICLE_ORDER
    assert [sc.source for sc in intake.certificates] == [f"{bundle}#{i}" for i in range(1, 5)]
    assert intake.certs == chain.leaf_first()
    assert intake.duplicates == intake.private_keys == intake.skipped == ()


def test_single_certificate_source_has_no_index(chain: certfactory.Chain, tmp_path: Path) -> None:
    leaf = certfactory.write_pem(tmp_path / "server.crt", chain.leaf)
    intake = read_ca_response([str(leaf)])
    assert [sc.source for sc in intake.certificates] == [str(leaf)]
    assert intake.source_of(chain.leaf.cert) == str(leaf)
    assert intake.source_of(chain.root.cert) is None


def test_duplicates_are_dropped_by_der(chain: certfactory.Chain, tmp_path: Path) -> None:
    leaf = certfactory.write_pem(tmp_path / "leaf.pem", chain.leaf)
    full = certfactory.write_pem(tmp_path / "full.pem", *chain.leaf_first())
    intake = read_ca_response([leaf, full, leaf])
    assert len(intake.certificates) == 4
    assert intake.certificates[0].source == str(leaf)
    assert intake.duplicates == (f"{full}#1", str(leaf))


@pytest.mark.parametrize("name", ["server.cer", "server.der", "server.crt", "no_extension"])
def test_der_files(chain: certfactory.Chain, tmp_path: Path, name: str) -> None:
    path = certfactory.write_der(tmp_path / name, chain.leaf)
    assert read_ca_response([path]).certs == [chain.leaf.cert]
    path.write_bytes(path.read_bytes() + b"\r\n")  # an editor added a line ending
    assert read_ca_response([path]).certs == [chain.leaf.cert]


def test_pkcs7_from_openssl_pem_and_der(chain: certfactory.Chain, tmp_path: Path) -> None:
    pem = certfactory.write_pem(tmp_path / "chain.pem", *chain.leaf_first())
    p7b = tmp_path / "bundle.p7b"
    p7c = tmp_path / "bundle.p7c"
    openssl("crl2pkcs7", "-nocrl", "-certfile", str(pem), "-out", str(p7b))
    openssl("crl2pkcs7", "-nocrl", "-certfile", str(pem), "-outform", "DER", "-out", str(p7c))
    assert p7b.read_bytes().startswith(b"-----BEGIN PKCS7-----")
    assert p7c.read_bytes()[:1] == b"\x30"
    listed = openssl("pkcs7", "-in", str(p7b), "-print_certs", "-noout").stdout.decode()
    for p in (p7b, p7c):
        intake = read_ca_response([p])
        assert set(intake.certs) == set(chain.leaf_first())
        assert [sc.source for sc in intake.certificates] == [f"{p}#{i}" for i in range(1, 5)]
        assert listed.count("subject=") == len(intake.certs)


def test_pkcs7_written_by_cryptography(chain: certfactory.Chain, tmp_path: Path) -> None:
    data = pkcs7.serialize_certificates(chain.leaf_first(), serialization.Encoding.DER)
    path = tmp_path / "from-portal.bin"
    path.write_bytes(data)
    assert set(read_ca_response([path]).certs) == set(chain.leaf_first())


def _export_pfx(chain: certfactory.Chain, tmp_path: Path, *extra: str) -> Path:
    leaf = certfactory.write_pem(tmp_path / "leaf.pem", chain.leaf)
    rest = certfactory.write_pem(tmp_path / "rest.pem", *chain.leaf_first()[1:])
    key = chain.leaf.write_key(tmp_path / "leaf.key")
    out = tmp_path / "bundle.pfx"
    openssl(
        "pkcs12", "-export", "-in", str(leaf), "-inkey", str(key), "-certfile", str(rest),
        "-out", str(out), *extra,
    )  # fmt: skip
    return out


def test_pkcs12_with_password(rsa_chain: certfactory.Chain, tmp_path: Path) -> None:
    pfx = _export_pfx(rsa_chain, tmp_path, "-passout", "pass:pfx-pw")
    with pytest.raises(InputError) as info:
        read_ca_response([pfx])
    assert str(info.value) == f"{pfx} is a PKCS#12 file that needs a password (--password-env)."
    with pytest.raises(
        InputError, match="the given password does not open; check --password-env"
    ) as info:
        read_ca_response([pfx], password=b"wrong-pw")
    assert "wrong-pw" not in str(info.value)
    intake = read_ca_response([pfx], password=b"pfx-pw")
    assert intake.certs[0] == rsa_chain.leaf.cert
    assert set(intake.certs) == set(rsa_chain.leaf_first())
    assert intake.private_keys == (f"{pfx}: an RSA 2048 private key was found and set aside",)
    key_text = rsa_chain.leaf.key_pem().decode().splitlines()[5]
    assert key_text not in repr(intake) and key_text not in str(intake)


def test_pkcs12_without_password_and_without_key(chain: certfactory.Chain, tmp_path: Path) -> None:
    pfx = _export_pfx(chain, tmp_path, "-passout", "pass:")
    intake = read_ca_response([pfx])
    assert set(intake.certs) == set(chain.leaf_first())
    assert intake.private_keys == (f"{pfx}: an ECDSA P-256 private key was found and set aside",)
    nokey = tmp_path / "certs-only.p12"
    all_pem = certfactory.write_pem(tmp_path / "all.pem", *chain.leaf_first())
    openssl("pkcs12", "-export", "-nokeys", "-in", str(all_pem), "-out", str(nokey),
            "-passout", "pass:x")  # fmt: skip
    intake = read_ca_response([nokey], password=b"x")
    assert set(intake.certs) == set(chain.leaf_first())
    assert intake.private_keys == ()


def test_trusted_certificate_block(chain: certfactory.Chain, tmp_path: Path) -> None:
    root = certfactory.write_pem(tmp_path / "root.pem", chain.root)
    trusted = tmp_path / "root-trusted.pem"
    openssl("x509", "-in", str(root), "-trustout", "-addtrust", "serverAuth", "-out", str(trusted))
    assert trusted.read_bytes().startswith(b"-----BEGIN TRUSTED CERTIFICATE-----")
    assert read_ca_response([trusted]).certs == [chain.root.cert]
    assert load_pool([trusted]) == [chain.root.cert]


def test_private_key_in_bundle_is_set_aside(chain: certfactory.Chain, tmp_path: Path) -> None:
    key_pem = chain.leaf.key_pem()
    data = chain.leaf.cert_pem() + key_pem + certfactory.pem(*chain.leaf_first()[1:])
    path = tmp_path / "bundle.pem"
    path.write_bytes(data)
    intake = read_ca_response([path])
    assert intake.certs == chain.leaf_first()
    assert intake.private_keys == (f"{path}: an ECDSA P-256 private key was found and set aside",)
    for line in key_pem.decode().splitlines()[1:-1]:
        assert line not in repr(intake)
    enc = tmp_path / "enc.pem"
    enc.write_bytes(chain.leaf.cert_pem() + chain.leaf.key_pem(b"pw"))
    assert read_ca_response([enc]).private_keys == (
        f"{enc}: an encrypted private key was found and set aside",
    )
    trad = tmp_path / "trad.pem"
    rsa = certfactory.make_chain(key_type="rsa2048").leaf
    trad.write_bytes(rsa.cert_pem() + rsa.key_pem(traditional=True))
    assert read_ca_response([trad]).private_keys == (
        f"{trad}: an RSA 2048 private key was found and set aside",
    )


def test_directory_is_read_sorted_by_content(chain: certfactory.Chain, tmp_path: Path) -> None:
    d = tmp_path / "from-ca"
    d.mkdir()
    certfactory.write_pem(d / "3-root.txt", chain.root)
    certfactory.write_der(d / "1-server.bin", chain.leaf)
    certfactory.write_pem(d / "2-inter.pem", *chain.leaf_first()[1:3])
    (d / "server.csr").write_bytes(_csr(chain.leaf))
    (d / "server.key").write_bytes(chain.leaf.key_pem())
    (d / "README.txt").write_text("Thank you for your order.\n")
    (d / "older").mkdir()
    intake = read_ca_response([d])
    assert cns(intake) == ARTICLE_ORDER
    assert [sc.source for sc in intake.certificates] == [
        f"{d}/1-server.bin",
        f"{d}/2-inter.pem#1",
        f"{d}/2-inter.pem#2",
        f"{d}/3-root.txt",
    ]
    assert intake.private_keys == (
        f"{d}/server.key: an ECDSA P-256 private key was found and set aside",
    )
    assert intake.skipped == (
        f"{d}/README.txt: is not PEM, DER, PKCS#7 or PKCS#12",
        f"{d}/older: a directory, not searched",
        f"{d}/server.csr: a certificate signing request was set aside",
    )


def test_directory_without_certificates(chain: certfactory.Chain, tmp_path: Path) -> None:
    (tmp_path / "server.key").write_bytes(chain.leaf.key_pem())
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(InputError, match=r"holds no certificates \(2 entries read\)"):
        read_ca_response([tmp_path])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="empty holds no certificates"):
        read_ca_response([empty])


def _refusal_cases(chain: certfactory.Chain) -> dict[str, bytes]:
    return {
        "is empty": b"",
        "is empty ": b"\r\n  \n",
        "looks like an HTML page": (
            b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>\n"
        ),
        "looks like a certificate signing request, not a certificate": _csr(chain.leaf),
        "looks like a certificate signing request, not a certificate ": (
            x509.load_pem_x509_csr(_csr(chain.leaf)).public_bytes(serialization.Encoding.DER)
        ),
        "is a private key, not a certificate": chain.leaf.key_pem(),
        "is a private key, not a certificate ": chain.leaf.key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        "is not PEM, DER, PKCS#7 or PKCS#12": b"subject=CN = db1\nissuer=CN = CA\n",
        "is not PEM, DER, PKCS#7 or PKCS#12 ": b"\x00\x01\x02\x03\xff binary",
        "is not PEM, DER, PKCS#7 or PKCS#12  ": b"\x30\x03\x02\x01\x05",
        "has a PEM block that is cut off": chain.leaf.cert_pem()[:-30],
        "is damaged": chain.leaf.cert_pem().replace(b"\n", b"\nAAAA", 1),
    }


def test_refusals_name_the_file_and_what_it_is(chain: certfactory.Chain, tmp_path: Path) -> None:
    for i, (phrase, data) in enumerate(_refusal_cases(chain).items()):
        path = tmp_path / f"input{i}.crt"
        path.write_bytes(data)
        with pytest.raises(InputError) as info:
            read_ca_response([path])
        message = str(info.value)
        assert message.startswith(f"{path} "), message
        assert phrase.strip() in message, message
        assert message.endswith("."), message
        assert message.count(". ") == 0, message


def test_missing_files_and_links(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope\.crt does not exist; check the path\."):
        read_ca_response([tmp_path / "nope.crt"])
    link = tmp_path / "dangling.crt"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(InputError, match="is a broken symbolic link"):
        read_ca_response([link])
    with pytest.raises(InputError, match="No files were given"):
        read_ca_response([])


def test_unusual_encodings(chain: certfactory.Chain, tmp_path: Path) -> None:
    utf16 = tmp_path / "exported.cer"
    utf16.write_bytes(chain.leaf.cert_pem().decode().encode("utf-16"))
    assert read_ca_response([utf16]).certs == [chain.leaf.cert]
    bare = tmp_path / "bare.b64"
    body = b"".join(chain.leaf.cert_pem().splitlines()[1:-1])
    bare.write_bytes(body + b"\n")
    assert read_ca_response([bare]).certs == [chain.leaf.cert]
    bom = tmp_path / "bom.pem"
    bom.write_bytes(b"\xef\xbb\xbf" + chain.leaf.cert_pem())
    assert read_ca_response([bom]).certs == [chain.leaf.cert]


def test_non_positive_serial_does_not_warn(chain: certfactory.Chain, tmp_path: Path) -> None:
    """Some trusted roots carry serial 0; cryptography warns, which pytest turns into errors."""
    cert = certfactory.issue("zero", serial=1).cert
    der = cert.public_bytes(serialization.Encoding.DER)
    version_and_serial = b"\xa0\x03\x02\x01\x02\x02\x01\x01"
    assert der.count(version_and_serial) == 1
    zero = der.replace(version_and_serial, version_and_serial[:-1] + b"\x00")
    path = tmp_path / "zero.der"
    path.write_bytes(zero)
    assert read_ca_response([path]).certs[0].subject == cert.subject
    assert len(load_pool([path])) == 1


def test_pool_is_lenient_and_deduplicated(chain: certfactory.Chain, tmp_path: Path) -> None:
    d = tmp_path / "pool"
    d.mkdir()
    certfactory.write_pem(d / "a.pem", chain.root, chain.intermediates[0])
    certfactory.write_pem(d / "b.pem", chain.root)
    (d / "junk.txt").write_text("not a certificate")
    (d / "broken.pem").symlink_to(d / "gone.pem")
    bundle = certfactory.write_pem(tmp_path / "bundle.crt", *chain.intermediates)
    pool = read_pool([d, bundle, tmp_path / "missing.pem"])
    assert list(pool.certificates) == [chain.root.cert, *[i.cert for i in chain.intermediates]]
    assert pool.files == 6
    assert pool.unreadable == (
        str(d / "broken.pem"),
        str(d / "junk.txt"),
        str(tmp_path / "missing.pem"),
    )
    assert load_pool([d]) == [chain.root.cert, chain.intermediates[0].cert]


def test_system_store_loads() -> None:
    if not Path("/etc/ssl/certs/ca-certificates.crt").exists():
        skip_or_fail("no system CA store here (Debian: apt-get install ca-certificates)")
    pool = read_pool(["/etc/ssl/certs"])
    bundle = load_pool(["/etc/ssl/certs/ca-certificates.crt"])
    assert len(bundle) > 100
    assert set(bundle) <= set(pool.certificates)


def test_a_thousand_files_pem_and_der_by_name_or_folder(tmp_path: Path) -> None:
    # How fast this is goes in bench/bench_chain.py (ratios, not a timed test).
    ca = certfactory.make_ca("Bag CA")
    paths = []
    for i in range(1000):
        leaf = certfactory.issue(f"h{i}.example.com", issuer=ca, key=ca.key, ski=False)
        write = certfactory.write_der if i % 3 == 0 else certfactory.write_pem
        paths.append(write(tmp_path / f"c{i:04}.crt", leaf))
    intake = read_ca_response(paths)
    in_dir = read_ca_response([tmp_path])
    assert len(intake.certificates) == len(in_dir.certificates) == 1000
    assert {c.cert for c in intake.certificates} == {c.cert for c in in_dir.certificates}
    assert not intake.skipped and not in_dir.skipped


def _csr(issued: certfactory.Issued) -> bytes:
    from pgtls_helpers.pki.csr import build_csr, csr_pem
    from pgtls_helpers.pki.subject import make_subject

    return csr_pem(build_csr(make_subject("db1.example.com"), issued.key))  # type: ignore[arg-type]
