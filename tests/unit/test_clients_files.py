"""root.crt for client OS users: created private, replaced with a backup, or merged."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pgtls_helpers.lab import LabCA
from pgtls_helpers.postgres.clients import ClientUser, classify_error, install_root_crt

ROOT_A = LabCA.create(root_name="Root A").root
ROOT_B = LabCA.create(root_name="Root B").root


def _pem(cert: object) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return cert.public_bytes(Encoding.PEM)  # type: ignore[attr-defined, no-any-return]


def _user(tmp_path: Path) -> ClientUser:
    home = tmp_path / "home"
    home.mkdir()
    return ClientUser("bob", home, os.getuid(), os.getgid())


def test_new_root_crt_in_a_private_directory(tmp_path: Path) -> None:
    user = _user(tmp_path)
    install_root_crt([user], _pem(ROOT_A))
    assert user.root_crt.read_bytes() == _pem(ROOT_A)
    assert stat.S_IMODE(user.root_crt.parent.stat().st_mode) == 0o700


def test_a_different_root_crt_is_kept_as_a_backup(tmp_path: Path) -> None:
    user = _user(tmp_path)
    install_root_crt([user], _pem(ROOT_A))
    result = install_root_crt([user], _pem(ROOT_B))
    assert user.root_crt.read_bytes() == _pem(ROOT_B)
    backup = result.installed[0].backup
    assert backup is not None and backup.read_bytes() == _pem(ROOT_A)


def test_merge_keeps_the_old_root_and_adds_the_new_once(tmp_path: Path) -> None:
    user = _user(tmp_path)
    install_root_crt([user], _pem(ROOT_A))
    install_root_crt([user], _pem(ROOT_B), merge=True)
    again = install_root_crt([user], _pem(ROOT_B), merge=True)
    text = user.root_crt.read_bytes()
    assert text.count(b"BEGIN CERTIFICATE") == 2
    assert _pem(ROOT_A) in text and _pem(ROOT_B) in text
    assert not again.changed


def test_error_classes_follow_libpq_messages() -> None:
    assert classify_error("SSL error: certificate verify failed") == "certificate not trusted"
    assert (
        classify_error("server does not support SSL, but SSL was required") == "server has SSL off"
    )
    assert classify_error('password authentication failed for user "x"') == "password refused"
