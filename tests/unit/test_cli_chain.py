"""``pgtls chain inspect`` and ``chain bundle``: names, JSON shape and exit codes are a contract."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import certfactory
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pgtls_helpers.cli import main
from pgtls_helpers.pki.chain import fingerprint


@pytest.fixture(scope="module")
def art() -> certfactory.Chain:
    return certfactory.article_chain(key_type="rsa2048")


@pytest.fixture
def response(art: certfactory.Chain, tmp_path: Path) -> Path:
    """The article's four files, as a CA hands them over, plus the server key beside them."""
    d = tmp_path / "ca"
    d.mkdir()
    certfactory.write_pem(d / "RootCA.crt", art.root)
    certfactory.write_pem(d / "IntermediateCA_BAR.crt", art.intermediates[0])
    certfactory.write_pem(d / "IntermediateCA_FOO.crt", art.intermediates[1])
    certfactory.write_pem(d / "db1.example.com.crt", art.leaf, crlf=True)
    art.leaf.write_key(tmp_path / "server.key")
    return d


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:
    code = main(["chain", "inspect", *argv, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_json_shape(response: Path, art: certfactory.Chain, capsys) -> None:
    code, doc = run_json(
        capsys,
        str(response),
        "--key",
        str(response.parent / "server.key"),
        "--host",
        "db1.example.com",
    )
    assert code == 0
    assert set(doc) == {"ready", "verifier", "chain", "unused", "findings"}
    assert doc["ready"] is True
    assert doc["verifier"].startswith("OpenSSL ")  # who decided: libpq's OpenSSL
    assert [e["role"] for e in doc["chain"]] == ["leaf", "intermediate", "intermediate", "root"]
    files = ["db1.example.com.crt", "IntermediateCA_FOO.crt", "IntermediateCA_BAR.crt"]
    files.append("RootCA.crt")
    for entry, cert, name in zip(doc["chain"], art.leaf_first(), files, strict=True):
        assert set(entry) == {
            "sha256",
            "role",
            "subject",
            "issuer",
            "not_after",
            "days_left",
            "key_type",
            "source",
            "from_pool",
        }
        assert entry["sha256"] == fingerprint(cert)
        assert entry["subject"] == cert.subject.rfc4514_string()
        assert entry["issuer"] == cert.issuer.rfc4514_string()
        when = dt.datetime.fromisoformat(entry["not_after"])
        assert when == cert.not_valid_after_utc and when.tzinfo is not None
        assert Path(entry["source"]) == response / name
        assert entry["from_pool"] is False
        assert entry["key_type"] == "RSA 2048"
        assert isinstance(entry["days_left"], int) and entry["days_left"] > 0
    assert doc["unused"] == [] and doc["findings"] == []


def test_json_days_left_is_counted_from_the_given_time(art: certfactory.Chain) -> None:
    from pgtls_helpers.cli.chain import to_json
    from pgtls_helpers.pki.chain import order_chain

    result = order_chain(art.leaf_first())
    leaf_end = art.leaf.cert.not_valid_after_utc
    doc = to_json(result, [], now=leaf_end - dt.timedelta(days=10, hours=1))
    assert doc["chain"][0]["days_left"] == 10
    assert doc["chain"][0]["source"] is None  # no file names given


def test_pool_members_say_so(response: Path, art: certfactory.Chain, capsys) -> None:
    (response / "RootCA.crt").rename(response.parent / "root-pool.pem")
    code, doc = run_json(capsys, str(response), "--pool", str(response.parent / "root-pool.pem"))
    assert code == 0 and doc["ready"] is True
    root = doc["chain"][-1]
    assert root["role"] == "root" and root["from_pool"] is True and root["source"] is None


def test_only_ca_certificates_is_no_leaf_and_not_ready(
    response: Path, art: certfactory.Chain, capsys
) -> None:
    (response / "db1.example.com.crt").unlink()
    code, doc = run_json(capsys, str(response))
    assert code == 1
    assert doc["ready"] is False
    codes = [f["code"] for f in doc["findings"]]
    assert codes[0] == "no-leaf"
    assert "no-san" not in codes  # a CA certificate carries no host names, nor should it
    assert main(["chain", "inspect", str(response)]) == 1
    text = capsys.readouterr().out
    assert "error    no-leaf:" in text and "NOT READY" in text and "\nOK" not in text


def test_unused_and_findings_entries(response: Path, art: certfactory.Chain, capsys) -> None:
    decoy = certfactory.decoy_of(art.intermediates[1], issuer=art.intermediates[0])
    certfactory.write_pem(response / "decoy.pem", decoy)
    code, doc = run_json(capsys, str(response), "--host", "nope.example.com")
    assert code == 1 and doc["ready"] is False
    assert [u["sha256"] for u in doc["unused"]] == [fingerprint(decoy.cert)]
    assert Path(doc["unused"][0]["source"]) == response / "decoy.pem"
    assert {"hostname-mismatch", "unused-certificate"} <= {f["code"] for f in doc["findings"]}
    for f in doc["findings"]:
        assert set(f) == {"severity", "code", "message"}
        assert f["severity"] in ("error", "warning", "info")
    assert doc["findings"][0]["severity"] == "error"


def test_exit_1_on_an_error_finding(response: Path, capsys) -> None:
    other = certfactory.make_key("ecdsa-p256")
    key_path = response.parent / "other.key"
    key_path.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    code, doc = run_json(capsys, str(response), "--key", str(key_path))
    assert code == 1
    assert [f["code"] for f in doc["findings"]] == ["key-mismatch"]


def test_exit_0_with_only_warnings(tmp_path: Path, capsys) -> None:
    chain = certfactory.article_chain(days=3)
    certfactory.write_pem(tmp_path / "bundle.pem", *chain.leaf_first())
    code, doc = run_json(capsys, str(tmp_path / "bundle.pem"))
    assert code == 0
    assert [f["code"] for f in doc["findings"]] == ["expires-soon"]


def test_exit_2_on_unusable_input(tmp_path: Path, capsys) -> None:
    page = tmp_path / "chain.crt"
    page.write_text("<!DOCTYPE html><html><body>Sign in</body></html>")
    assert main(["chain", "inspect", str(page), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "chain.crt" in lines[0] and "Traceback" not in captured.err


def test_exit_2_on_a_missing_key_file(response: Path, capsys) -> None:
    assert main(["chain", "inspect", str(response), "--key", str(response / "nope.key")]) == 2
    assert "nope.key" in capsys.readouterr().err


def test_exit_2_on_an_unset_password_variable(response: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("PGTLS_TEST_UNSET", raising=False)
    assert main(["chain", "inspect", str(response), "--password-env", "PGTLS_TEST_UNSET"]) == 2
    assert "PGTLS_TEST_UNSET" in capsys.readouterr().err


def test_encrypted_key_with_password_env(response: Path, art, capsys, monkeypatch) -> None:
    key_path = response.parent / "enc.key"
    key_path.write_bytes(art.leaf.key_pem(b"s3cret-pass"))
    monkeypatch.setenv("PGTLS_TEST_PASS", "s3cret-pass")
    code = main(
        [
            "chain",
            "inspect",
            str(response),
            "--key",
            str(key_path),
            "--password-env",
            "PGTLS_TEST_PASS",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert "s3cret-pass" not in captured.out + captured.err
    # Without the passphrase the key cannot be opened: unusable input.
    monkeypatch.delenv("PGTLS_TEST_PASS")
    assert main(["chain", "inspect", str(response), "--key", str(key_path)]) == 2
    assert "encrypted" in capsys.readouterr().err


def test_pool_completes_the_chain(response: Path, tmp_path: Path, capsys) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    for name in ("RootCA.crt", "IntermediateCA_BAR.crt", "IntermediateCA_FOO.crt"):
        (response / name).rename(pool / name)
    code, doc = run_json(capsys, str(response / "db1.example.com.crt"))
    assert code == 1 and "missing-issuer" in {f["code"] for f in doc["findings"]}
    code, doc = run_json(capsys, str(response / "db1.example.com.crt"), "--pool", str(pool))
    assert code == 0 and len(doc["chain"]) == 4


def test_key_picks_the_leaf_among_two(response: Path, art, tmp_path: Path, capsys) -> None:
    other = certfactory.issue(
        "db2.example.com",
        issuer=art.intermediates[1],
        sans=["db2.example.com"],
        eku=[certfactory.SERVER_AUTH],
    )
    certfactory.write_pem(response / "aaa-db2.crt", other)  # read first
    other.write_key(tmp_path / "db2.key")
    code, doc = run_json(capsys, str(response), "--key", str(tmp_path / "db2.key"))
    assert code == 0
    assert doc["chain"][0]["subject"] == "CN=db2.example.com"
    assert len(doc["unused"]) == 1
    code, doc = run_json(capsys, str(response), "--key", str(response.parent / "server.key"))
    assert code == 0 and doc["chain"][0]["subject"] == "CN=db1.example.com"


def test_private_key_in_the_bundle_is_reported_not_shown(response: Path, art, capsys) -> None:
    (response / "with-key.pem").write_bytes(art.leaf.cert_pem() + art.leaf.key_pem())
    code, doc = run_json(capsys, str(response))
    assert code == 0
    (note,) = [f for f in doc["findings"] if f["code"] == "private-key-in-bundle"]
    assert note["severity"] == "warning" and "with-key.pem" in note["message"]
    assert "BEGIN" not in json.dumps(doc)


def test_readable_output(response: Path, capsys) -> None:
    code = main(["chain", "inspect", str(response), "--host", "db1.example.com"])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["#", "role", "subject", "issuer"]
    assert lines[1].split()[:3] == ["0", "leaf", "db1.example.com"]
    assert "IntermediateCA_FOO.crt" in lines[2]
    assert lines[-1].startswith("OK:")


def test_readable_output_with_errors(response: Path, capsys) -> None:
    (response / "RootCA.crt").unlink()
    code = main(["chain", "inspect", str(response), "--host", "db9.example.com"])
    out = capsys.readouterr().out
    assert code == 1
    assert "error    missing-issuer:" in out and "error    hostname-mismatch:" in out
    assert "The chain stops" in out and out.rstrip().splitlines()[-1].startswith("NOT READY")


def test_bundle_writes_server_and_root(response: Path, art, tmp_path: Path, capsys) -> None:
    out, root = tmp_path / "server.crt", tmp_path / "root.crt"
    code = main(["chain", "bundle", str(response), "--out", str(out), "--root-out", str(root)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert x509.load_pem_x509_certificates(out.read_bytes()) == art.leaf_first(with_root=False)
    assert x509.load_pem_x509_certificates(root.read_bytes()) == [art.root.cert]
    assert "2 intermediate certificates in signing order" in text
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    proc = subprocess.run(
        ["openssl", "verify", "-CAfile", str(root), "-untrusted", str(out), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_bundle_without_the_root_still_writes_server_crt(response: Path, tmp_path, capsys) -> None:
    (response / "RootCA.crt").unlink()
    out = tmp_path / "server.crt"
    code = main(["chain", "bundle", str(response), "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and out.exists() and "note     missing-issuer" in text
    assert len(x509.load_pem_x509_certificates(out.read_bytes())) == 3
    # root.crt cannot be written: exit 1, and nothing is written at all.
    out.unlink()
    root = tmp_path / "root.crt"
    code = main(["chain", "bundle", str(response), "--out", str(out), "--root-out", str(root)])
    assert code == 1 and not out.exists() and not root.exists()
    assert "Nothing written" in capsys.readouterr().out


def test_bundle_refuses_a_broken_chain(response: Path, art, tmp_path: Path, capsys) -> None:
    (response / "db1.example.com.crt").write_bytes(
        certfactory.pem(certfactory.tamper_signature(art.leaf))
    )
    out = tmp_path / "server.crt"
    out.write_bytes(b"previous content\n")
    assert main(["chain", "bundle", str(response), "--out", str(out)]) == 1
    assert out.read_bytes() == b"previous content\n"
    assert "bad-signature" in capsys.readouterr().out


def test_bundle_exit_2_on_unusable_input(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.crt"
    empty.write_bytes(b"")
    code = main(["chain", "bundle", str(empty), "--out", str(tmp_path / "server.crt")])
    assert code == 2 and not (tmp_path / "server.crt").exists()
    assert "empty.crt" in capsys.readouterr().err


def test_startup_imports_stay_small(response: Path) -> None:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "pgtls_helpers",
            "chain",
            "inspect",
            str(response),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {
        line.split("|")[-1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "pgtls_helpers.pki.chain" in imported
    for heavy in ("pandas", "numpy", "psycopg", "papermill", "nbformat", "IPython"):
        assert heavy not in imported, f"chain inspect imports {heavy}"
