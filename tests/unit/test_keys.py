"""Keys: generation, PEM round trips checked against openssl, key/cert match, 0600 writes."""

from __future__ import annotations

import os
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import certfactory
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pgtls_helpers.errors import InputError
from pgtls_helpers.pki.keys import (
    KEY_TYPES,
    describe_key,
    generate_key,
    is_encrypted_pem,
    key_size_bits,
    load_key,
    passphrase_from_env,
    public_key_matches,
    serialize_key,
)
from pgtls_helpers.postgres.keyfiles import write_private_key

PASSPHRASE = b"correct horse battery staple"

EXPECTED = {
    "rsa2048": ("RSA 2048", 2048),
    "rsa3072": ("RSA 3072", 3072),
    "rsa4096": ("RSA 4096", 4096),
    "ecdsa-p256": ("ECDSA P-256", 256),
    "ecdsa-p384": ("ECDSA P-384", 384),
}


@pytest.fixture(scope="module", params=KEY_TYPES)
def generated(request: pytest.FixtureRequest) -> tuple[str, object]:
    return request.param, generate_key(request.param)


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def openssl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *args], capture_output=True, text=True, env=env, check=False, timeout=60
    )


def test_key_types_are_the_documented_ones() -> None:
    assert set(KEY_TYPES) == set(EXPECTED)
    assert generate_key.__defaults__ == ("rsa4096",)


def test_generate_and_describe(generated: tuple[str, object]) -> None:
    key_type, key = generated
    assert describe_key(key.public_key()) == EXPECTED[key_type][0]  # type: ignore[attr-defined]
    assert describe_key(key) == EXPECTED[key_type][0]  # type: ignore[arg-type]
    assert key_size_bits(key.public_key()) == EXPECTED[key_type][1]  # type: ignore[attr-defined]
    if key_type.startswith("rsa"):
        assert isinstance(key, rsa.RSAPrivateKey)
        assert key.private_numbers().public_numbers.e == 65537
    else:
        assert isinstance(key, ec.EllipticCurvePrivateKey)


def test_unknown_key_type() -> None:
    with pytest.raises(InputError, match="rsa2048, rsa3072, rsa4096, ecdsa-p256, ecdsa-p384"):
        generate_key("rsa1024")


def test_describe_other_key_types() -> None:
    ed = certfactory.make_key("ed25519")
    assert describe_key(ed.public_key()) == "Ed25519"
    assert key_size_bits(ed.public_key()) == 256


def test_plain_pem_is_pkcs8_and_openssl_reads_it(
    generated: tuple[str, object], tmp_path: Path
) -> None:
    key_type, key = generated
    pem = serialize_key(key)  # type: ignore[arg-type]
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert not is_encrypted_pem(pem)
    path = tmp_path / "server.key"
    path.write_bytes(pem)
    out = openssl("pkey", "-in", str(path), "-noout", "-text")
    assert out.returncode == 0, out.stderr
    assert f"{EXPECTED[key_type][1]} bit" in out.stdout
    loaded = load_key(pem, source="server.key")
    assert public_key_matches(loaded, _self_signed(key))


def test_encrypted_pem_round_trip_and_openssl(tmp_path: Path) -> None:
    key = generate_key("ecdsa-p256")
    pem = serialize_key(key, PASSPHRASE)
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert is_encrypted_pem(pem)
    assert PASSPHRASE not in pem
    path = tmp_path / "server.key"
    path.write_bytes(pem)
    env = dict(os.environ, PGTLS_TEST_PASS=PASSPHRASE.decode())
    out = openssl("pkey", "-in", str(path), "-passin", "env:PGTLS_TEST_PASS", "-noout", env=env)
    assert out.returncode == 0, out.stderr
    bad = openssl("pkey", "-in", str(path), "-passin", "pass:wrong", "-noout")
    assert bad.returncode != 0
    loaded = load_key(pem, PASSPHRASE)
    assert public_key_matches(loaded, _self_signed(key))


def test_empty_passphrase_is_refused() -> None:
    with pytest.raises(InputError, match="passphrase is empty"):
        serialize_key(generate_key("ecdsa-p256"), b"")


def test_encrypted_key_without_passphrase_message() -> None:
    pem = serialize_key(generate_key("ecdsa-p256"), PASSPHRASE)
    with pytest.raises(InputError) as info:
        load_key(pem, source="server.key")
    assert str(info.value) == (
        "server.key is encrypted; give the passphrase through --password-env or the "
        "environment variable named by key_passphrase_env."
    )


def test_wrong_passphrase_message_does_not_leak() -> None:
    pem = serialize_key(generate_key("ecdsa-p256"), PASSPHRASE)
    with pytest.raises(InputError, match="passphrase does not open") as info:
        load_key(pem, b"not-the-passphrase-xyz", source="server.key")
    assert b"not-the-passphrase-xyz".decode() not in str(info.value)
    assert PASSPHRASE.decode() not in str(info.value)
    assert "MII" not in str(info.value)


@pytest.mark.parametrize("algorithm", ["RSA", "EC"])
def test_openssl_traditional_keys_load(tmp_path: Path, algorithm: str) -> None:
    """Keys as `openssl genpkey` / older `openssl req -nodes` write them, plain and encrypted."""
    plain = tmp_path / "plain.key"
    opt = "rsa_keygen_bits:2048" if algorithm == "RSA" else "ec_paramgen_curve:P-256"
    gen = openssl("genpkey", "-algorithm", algorithm, "-pkeyopt", opt, "-out", str(plain))
    assert gen.returncode == 0, gen.stderr
    trad = tmp_path / "trad.key"
    enc = tmp_path / "enc.key"
    assert openssl("pkey", "-in", str(plain), "-traditional", "-out", str(trad)).returncode == 0
    conv = openssl(
        "pkey",
        "-in",
        str(plain),
        "-traditional",
        "-aes256",
        "-passout",
        "pass:pw1",
        "-out",
        str(enc),
    )
    assert conv.returncode == 0, conv.stderr
    assert trad.read_bytes().startswith(f"-----BEGIN {algorithm} PRIVATE KEY-----".encode())
    assert b"Proc-Type: 4,ENCRYPTED" in enc.read_bytes()
    k1 = load_key(plain.read_bytes())
    k2 = load_key(trad.read_bytes().replace(b"\n", b"\r\n"))
    k3 = load_key(enc.read_bytes(), b"pw1")
    assert is_encrypted_pem(enc.read_bytes())
    cert = _self_signed(k1)
    assert public_key_matches(k2, cert) and public_key_matches(k3, cert)
    with pytest.raises(InputError, match="enc.key is encrypted"):
        load_key(enc.read_bytes(), source="enc.key")


def test_der_keys_load(tmp_path: Path) -> None:
    key = generate_key("ecdsa-p256")
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert public_key_matches(load_key(der), _self_signed(key))
    enc_der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(PASSPHRASE),
    )
    with pytest.raises(InputError, match="k.der is encrypted"):
        load_key(enc_der, source="k.der")
    assert public_key_matches(load_key(enc_der, PASSPHRASE), _self_signed(key))
    with pytest.raises(InputError, match="passphrase does not open"):
        load_key(enc_der, b"wrong", source="k.der")


def test_key_with_text_around_it() -> None:
    key = generate_key("ecdsa-p256")
    pem = b"Bag Attributes\n    localKeyID: 01\n" + serialize_key(key) + b"\ntrailing words\n"
    assert public_key_matches(load_key(pem), _self_signed(key))


def test_not_a_key_messages() -> None:
    chain = certfactory.make_chain()
    csr = _csr_pem(chain.leaf.key)
    pub = chain.leaf.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    cases = {
        b"": "server.key is empty",
        b" \n": "server.key is empty",
        chain.leaf.cert_pem(): "server.key is a certificate, not a private key",
        chain.leaf.cert_der(): "server.key is a certificate, not a private key",
        csr: "server.key is a certificate signing request, not a private key",
        pub: "server.key is a public key, not a private key",
        b"<!DOCTYPE html><html><body>Login</body></html>": "looks like an HTML page",
        b"\x00\x01\x02garbage": "is not a PEM or DER private key",
    }
    for data, message in cases.items():
        with pytest.raises(InputError) as info:
            load_key(data, source="server.key")
        assert message in str(info.value)


def test_public_key_matches_every_key_type() -> None:
    for key_type in ("rsa2048", "ecdsa-p256", "ecdsa-p384", "ed25519"):
        chain = certfactory.make_chain(key_type=key_type)
        other = certfactory.make_chain(key_type=key_type)
        assert public_key_matches(chain.leaf.key, chain.leaf.cert)
        assert public_key_matches(chain.leaf.key.public_key(), chain.leaf.cert)
        assert not public_key_matches(other.leaf.key, chain.leaf.cert)
        assert not public_key_matches(chain.leaf.key, chain.issuer_of_leaf.cert)


def test_same_modulus_different_exponent_is_not_a_match() -> None:
    """The article compares moduli only; two RSA keys can share one and still differ."""
    key = generate_key("rsa2048")
    assert isinstance(key, rsa.RSAPrivateKey)
    n = key.public_key().public_numbers().n
    other_public = rsa.RSAPublicNumbers(3, n).public_key()
    assert not public_key_matches(other_public, _self_signed(key))


def test_passphrase_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGTLS_KEY_PASS", "s3cret-value")
    assert passphrase_from_env("PGTLS_KEY_PASS") == b"s3cret-value"
    monkeypatch.setenv("PGTLS_KEY_PASS", "")
    with pytest.raises(InputError, match="PGTLS_KEY_PASS is empty"):
        passphrase_from_env("PGTLS_KEY_PASS")
    monkeypatch.delenv("PGTLS_KEY_PASS")
    with pytest.raises(InputError, match="PGTLS_KEY_PASS is not set") as info:
        passphrase_from_env("PGTLS_KEY_PASS")
    assert "s3cret" not in str(info.value)


def test_write_private_key_mode_under_umask_zero(tmp_path: Path, umask_zero: None) -> None:
    path = write_private_key(tmp_path / "server.key", b"key bytes")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == b"key bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.key"]


def test_write_private_key_is_0600_from_the_first_byte(tmp_path: Path, umask_zero: None) -> None:
    """Watch the directory while a large write is under way: no name is ever wider than 0600."""
    seen: dict[str, int] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for entry in os.scandir(tmp_path):
                try:
                    seen.setdefault(entry.name, stat.S_IMODE(entry.stat().st_mode))
                except FileNotFoundError:
                    pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        write_private_key(tmp_path / "server.key", b"k" * (64 * 1024 * 1024))
    finally:
        done.set()
        watcher.join()
    temporaries = [n for n in seen if n.startswith(".server.key.tmp-")]
    assert temporaries, "the temporary file was never observed; the write finished too fast"
    assert set(seen.values()) == {0o600}, seen


def test_write_private_key_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "server.key"
    write_private_key(path, b"first")
    with pytest.raises(InputError, match="already exists; refusing to replace a private key"):
        write_private_key(path, b"second")
    assert path.read_bytes() == b"first"
    write_private_key(path, b"second", overwrite=True)
    assert path.read_bytes() == b"second"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.key"]


def test_write_private_key_failure_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "server.key"
    with pytest.raises(TypeError):
        write_private_key(path, "not bytes")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="is not a directory"):
        write_private_key(tmp_path / "missing" / "server.key", b"x")


def _self_signed(key: object) -> object:
    return certfactory.issue("k.example.com", key=key).cert  # type: ignore[arg-type]


def _csr_pem(key: object) -> bytes:
    from pgtls_helpers.pki.csr import build_csr, csr_pem
    from pgtls_helpers.pki.subject import make_subject

    return csr_pem(build_csr(make_subject("db1.example.com"), key))  # type: ignore[arg-type]
