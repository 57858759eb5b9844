"""``pgtls csr``: files, output, exit statuses, and no secret on any stream."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pgtls_helpers.cli import main
from pgtls_helpers.pki.csr import load_csr
from pgtls_helpers.pki.keys import load_key, public_key_matches


def test_csr_command_writes_files_and_explains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "work"
    status = main(
        [
            "csr",
            "--cn", "db1.example.com",
            "--san", "db1",
            "--san", "192.0.2.10",
            "-C", "us",
            "-O", "Example Corp",
            "--key-type", "ecdsa-p256",
            "--out-dir", str(out),
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert status == 0
    assert captured.err == ""
    assert "Subject:             C=US, O=Example Corp, CN=db1.example.com" in captured.out
    assert "DNS:db1.example.com, DNS:db1, IP:192.0.2.10" in captured.out
    assert f"Send only {out / 'server.csr'} to the CA" in captured.out
    assert "never sent" in captured.out
    key_path = out / "server.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    key = load_key(key_path.read_bytes())
    assert "PRIVATE KEY" not in captured.out
    csr = load_csr((out / "server.csr").read_bytes())
    from certfactory import issue

    assert public_key_matches(csr.public_key(), issue("x", key=key).cert)  # type: ignore[arg-type]


def test_passphrase_from_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGTLS_TEST_KEY_PASS", "pass-phrase-987")
    args = ["csr", "--cn", "db1.example.com", "--key-type", "ecdsa-p256"]
    status = main([*args, "--passphrase-env", "PGTLS_TEST_KEY_PASS", "--out-dir", str(tmp_path)])
    captured = capsys.readouterr()
    assert status == 0
    assert "pass-phrase-987" not in captured.out + captured.err
    assert "encrypted with the passphrase" in captured.out
    data = (tmp_path / "server.key").read_bytes()
    assert data.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    load_key(data, b"pass-phrase-987")


def test_refusals_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PGTLS_UNSET_VAR", raising=False)
    base = ["csr", "--out-dir", str(tmp_path), "--key-type", "ecdsa-p256"]
    cases = [
        (["--cn", "db1.example.com", "-C", "USA"], "Country (C) must be two letters"),
        (["--cn", "my db server"], "Common name (CN) 'my db server' is not a host name"),
        (["--cn", "db1.example.com", "--san", "a b"], "Subject alternative name 'a b'"),
        (["--cn", "db1.example.com", "--key-type", "dsa"], "--key-type 'dsa' is not supported"),
        (
            ["--cn", "db1.example.com", "--passphrase-env", "PGTLS_UNSET_VAR"],
            "PGTLS_UNSET_VAR is not set",
        ),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("pgtls: ") and message in err, err
        assert err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_existing_files_need_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "csr",
        "--cn",
        "db1.example.com",
        "--key-type",
        "ecdsa-p256",
        "--out-dir",
        str(tmp_path),
    ]
    assert main(args) == 0
    first = (tmp_path / "server.key").read_bytes()
    assert main(args) == 2
    assert "already exists; use --force" in capsys.readouterr().err
    assert (tmp_path / "server.key").read_bytes() == first
    assert main([*args, "--force"]) == 0
    assert (tmp_path / "server.key").read_bytes() != first
    assert len(list(tmp_path.glob("server.key.bak-*"))) == 1


def test_as_a_process_no_traceback(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONWARNINGS="error")
    proc = subprocess.run(
        [sys.executable, "-m", "pgtls_helpers", "csr", "--cn=-bad-", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("pgtls: Common name (CN) '-bad-'")
    ok = subprocess.run(
        [
            sys.executable, "-m", "pgtls_helpers", "csr", "--cn", "db9.example.com",
            "--out-dir", str(tmp_path / "o"),
        ],
        capture_output=True, text=True, env=env, check=False, timeout=120,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "RSA 4096 bits" in ok.stdout  # the article's key size is the default
    assert "BEGIN" not in ok.stdout


def test_an_unusable_output_directory_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pgtls_helpers",
            "csr",
            "--cn",
            "db1.example.com",
            "--key-type",
            "ecdsa-p256",
            "--out-dir",
            str(blocker / "sub"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert str(blocker / "sub") in proc.stderr


def test_passphrase_prompt_on_a_terminal_encrypts_the_key_and_echoes_nothing(
    tmp_path: Path,
) -> None:
    import pty

    secret = "tty-only passphrase 42"
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI on a real terminal
        os.execv(
            sys.executable,
            [
                sys.executable,
                "-m",
                "pgtls_helpers",
                "csr",
                "--cn",
                "db1.example.com",
                "--key-type",
                "ecdsa-p256",
                "--passphrase-prompt",
                "--out-dir",
                str(tmp_path),
            ],
        )
    seen = b""

    def read_until(marker: bytes) -> None:
        nonlocal seen
        while marker not in seen:
            chunk = os.read(fd, 1024)
            assert chunk, seen
            seen += chunk

    read_until(b"passphrase: ")
    os.write(fd, secret.encode() + b"\n")
    read_until(b"Again: ")
    os.write(fd, secret.encode() + b"\n")
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, seen
    assert secret.encode() not in seen
    key = (tmp_path / "server.key").read_bytes()
    assert b"ENCRYPTED" in key
    load_key(key, secret.encode())


def test_passphrase_prompt_without_a_terminal_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pgtls_helpers",
            "csr",
            "--cn",
            "db1.example.com",
            "--passphrase-prompt",
            "--out-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 2 and "needs a terminal" in proc.stderr
    assert not (tmp_path / "server.key").exists()


def test_a_challenge_password_only_when_asked_and_never_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cryptography.x509.oid import AttributeOID

    plain = tmp_path / "plain"
    assert (
        main(
            ["csr", "--cn", "db1.example.com", "--key-type", "ecdsa-p256", "--out-dir", str(plain)]
        )
        == 0
    )
    csr = load_csr((plain / "server.csr").read_bytes())
    assert not [a for a in csr.attributes if a.oid == AttributeOID.CHALLENGE_PASSWORD]

    monkeypatch.setenv("PGTLS_TEST_CHALLENGE", "ca-revocation-secret")
    asked = tmp_path / "asked"
    assert (
        main(
            [
                "csr",
                "--cn",
                "db1.example.com",
                "--key-type",
                "ecdsa-p256",
                "--challenge-password-env",
                "PGTLS_TEST_CHALLENGE",
                "--out-dir",
                str(asked),
            ]
        )
        == 0
    )
    csr = load_csr((asked / "server.csr").read_bytes())
    attr = csr.attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD)
    assert attr.value == b"ca-revocation-secret"
    out = capsys.readouterr()
    assert "ca-revocation-secret" not in out.out + out.err
    assert "challengePassword" in out.out
    # openssl agrees that the request is intact and carries the attribute
    proc = subprocess.run(
        ["openssl", "req", "-in", str(asked / "server.csr"), "-noout", "-verify", "-text"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "challengePassword" in proc.stdout
