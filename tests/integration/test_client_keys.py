"""Steps c1 to c3 of the client-certificate runbook, on real OS users and real files: keys
and CSRs made private, certificates signed for clientAuth or refused for the reason the server
would give, files installed as each client user, a planted link never followed, and a
rollback that gives back what was there."""

from __future__ import annotations

import json
import os
import pwd
import stat
import subprocess
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from support import skip_or_fail

from pgtls_helpers.errors import InputError, PreflightError
from pgtls_helpers.lab import LabCA, LabCluster
from pgtls_helpers.pki import client as pkiclient
from pgtls_helpers.pki import keys
from pgtls_helpers.pki.csr import load_csr
from pgtls_helpers.runbook.client_keys import (
    step_c1_client_keys,
    step_c2_client_certs,
    step_c3_install_clients,
)
from pgtls_helpers.runbook.params import Params, load_params
from pgtls_helpers.runbook.rollback import rollback_change

ParamsFactory = Callable[..., Params]


def _params(tmp_path: Path, clients: list[dict[str, str]], **over: Any) -> Params:
    """A change with no server reachable (c1 to c3 need none: the lock is the work root's)."""
    values: dict[str, Any] = {
        "change_id": "CHG-clients",
        "common_name": "db1.lab.pgtls.test",
        "key_type": "ecdsa-p256",
        "ca_mode": "lab",
        "work_dir": str(tmp_path / "work"),
        "server_host": "127.0.0.1",
        "server_port": 9,  # nothing listens: the runbook's login fails at once
        "apply": True,
        "clients": clients,
    }
    values.update(over)
    return load_params(values, source="test")


@pytest.fixture
def two_users() -> Iterator[tuple[str, str]]:
    """Two client OS users of this test alone, with their homes."""
    if os.geteuid() != 0:
        skip_or_fail("creating client OS users needs root")
    names = (f"pgtls_ka{os.getpid()}", f"pgtls_kb{os.getpid()}")
    for name in names:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
    try:
        yield names
    finally:
        for name in names:
            subprocess.run(["userdel", "--remove", name], check=False, capture_output=True)


def _home(user: str) -> Path:
    return Path(pwd.getpwnam(user).pw_dir)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# --------------------------------------------------------------------------- c1


def test_c1_makes_private_keys_and_csrs_and_keeps_them_on_a_rerun(tmp_path: Path) -> None:
    clients = [
        {"os_user": "alice", "role": "alice"},
        {"os_user": "bob", "role": "bob", "subject": "CN=bob,OU=dba,O=Example"},
    ]
    params = _params(tmp_path, clients)
    first = step_c1_client_keys(params)
    base = params.work.clients
    assert first.directory == base and _mode(base) == 0o700
    for made in first.clients:
        folder = made.key_path.parent
        assert folder == base / made.os_user and _mode(folder) == 0o700
        assert _mode(made.key_path) == 0o600
        assert not made.reused
        csr = load_csr(made.csr_path.read_bytes())
        key = keys.load_key(made.key_path.read_bytes())
        assert keys.describe_key(csr.public_key()) == "ECDSA P-256"
        assert keys.describe_key(key) == "ECDSA P-256"
        assert "Subject:" in made.csr_text and "SPKI SHA-256" in made.csr_text
    bob = first.clients[1]
    assert bob.subject == "CN=bob,OU=dba,O=Example"
    bob_csr = load_csr(bob.csr_path.read_bytes())
    assert [a.value for a in bob_csr.subject] == ["Example", "dba", "bob"]
    assert load_csr(first.clients[0].csr_path.read_bytes()).subject.rfc4514_string() == "CN=alice"
    json.dumps(first.summary())

    before = {c.os_user: (c.key_path.read_bytes(), c.csr_path.read_bytes()) for c in first.clients}
    again = step_c1_client_keys(params)
    assert all(c.reused for c in again.clients)
    assert {
        c.os_user: (c.key_path.read_bytes(), c.csr_path.read_bytes()) for c in again.clients
    } == (before)
    # a CSR already made for another subject is never replaced silently
    other = _params(tmp_path, [{"os_user": "bob", "role": "bob", "subject": "CN=bob,O=Other"}])
    with pytest.raises(
        PreflightError, match=r"bob/postgresql.csr: a CSR for CN=bob,OU=dba,O=Example"
    ):
        step_c1_client_keys(other)


# --------------------------------------------------------------------------- c2


def test_c2_in_lab_mode_signs_each_csr_for_client_auth(tmp_path: Path) -> None:
    clients = [
        {"os_user": "alice", "role": "alice", "subject": "CN=alice,OU=dba,O=Example"},
        {"os_user": "bob", "role": "bob"},
    ]
    params = _params(tmp_path, clients)
    step_c1_client_keys(params)
    result = step_c2_client_certs(params)
    ca = LabCA.load(params.work.shared_lab_ca)
    assert result.errors == []
    assert result.roots_path == params.work.clients / "roots.pem"
    assert x509.load_pem_x509_certificates(result.roots_path.read_bytes()) == [ca.root]
    alice, bob = result.clients
    assert (alice.subject, alice.hba_dn, alice.stat_ssl_dn) == (
        "CN=alice,OU=dba,O=Example",
        "CN=alice,OU=dba,O=Example",
        "/O=Example/OU=dba/CN=alice",
    )
    assert bob.stat_ssl_dn == "/CN=bob" and bob.common_name == "bob"
    assert alice.root_sha256 == bob.root_sha256
    bundle = x509.load_pem_x509_certificates(params.work.client("alice").bundle.read_bytes())
    assert bundle[1:] == list(ca.intermediates)
    eku = bundle[0].extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert alice.serial == f"{bundle[0].serial_number:x}"
    summary = result.summary()
    json.dumps(summary)
    assert summary["roots_file"] == str(params.work.client_roots)
    assert {c["os_user"] for c in summary["clients"]} == {"alice", "bob"}
    # a rerun reads the lab CA's answer again instead of signing anew
    assert step_c2_client_certs(params).clients[0].sha256 == alice.sha256


def _files_answer(
    tmp_path: Path, params: Params, os_user: str, *, sign: Callable[[LabCA, Any], x509.Certificate]
) -> Path:
    """What a CA of our own returns for the client's CSR, as files: leaf, intermediates, root."""
    ca = LabCA.create(root_name="Corp Root")
    csr = load_csr(params.work.client(os_user).csr.read_bytes())
    leaf = sign(ca, csr)
    out = tmp_path / f"answer-{os_user}"
    ca.write_response(leaf, out)
    return out


def test_c2_in_files_mode_refuses_a_server_auth_only_certificate_with_the_servers_words(
    tmp_path: Path,
) -> None:
    clients = [{"os_user": "alice", "role": "alice"}]
    params = _params(tmp_path, clients, ca_mode="files")
    step_c1_client_keys(params)
    with pytest.raises(
        PreflightError, match="client_ca_files is empty: send .*alice/postgresql.csr"
    ):
        step_c2_client_certs(params)
    answer = _files_answer(
        tmp_path,
        params,
        "alice",
        sign=lambda ca, csr: ca.sign_client_csr(csr, server_auth_only=True),
    )
    params = _params(tmp_path, clients, ca_mode="files", client_ca_files=[str(answer)])
    with pytest.raises(PreflightError) as err:
        step_c2_client_certs(params)
    text = str(err.value)
    assert 'client alice: "alice": its extendedKeyUsage is serverAuth, without clientAuth' in text
    assert '"sslv3 alert unsupported certificate"' in text
    assert not params.work.client("alice").bundle.exists()
    assert not params.work.client_roots.exists()
    shown = step_c2_client_certs(params, check=False)
    assert shown.clients[0].problems and shown.roots_path is None


def test_c2_in_files_mode_refuses_an_answer_for_another_key(tmp_path: Path) -> None:
    clients = [{"os_user": "alice", "role": "alice"}]
    params = _params(tmp_path, clients, ca_mode="files")
    step_c1_client_keys(params)

    def other_key(ca: LabCA, csr: Any) -> x509.Certificate:
        stranger = keys.generate_key("ecdsa-p256")
        return ca.sign_client_csr(pkiclient.build_client_csr(csr.subject, stranger))

    answer = _files_answer(tmp_path, params, "alice", sign=other_key)
    params = _params(tmp_path, clients, ca_mode="files", client_ca_files=[str(answer)])
    with pytest.raises(
        PreflightError, match="a certificate for CN=alice is there, but for another key"
    ):
        step_c2_client_certs(params)


def test_c2_in_files_mode_accepts_a_good_answer_and_refuses_an_expired_or_renamed_one(
    tmp_path: Path,
) -> None:
    clients = [{"os_user": "alice", "role": "alice", "subject": "CN=alice,OU=dba,O=Example"}]
    params = _params(tmp_path, clients, ca_mode="files")
    step_c1_client_keys(params)
    good = _files_answer(tmp_path, params, "alice", sign=lambda ca, csr: ca.sign_client_csr(csr))
    ok = step_c2_client_certs(
        _params(
            tmp_path, clients, ca_mode="files", client_ca_files=sorted(map(str, good.iterdir()))
        )
    )
    assert ok.errors == [] and ok.roots[0]["subject"] == "CN=Corp Root,O=pgtls lab CA,C=US"

    past = datetime.now(timezone.utc) - timedelta(days=30)
    expired = _files_answer(
        tmp_path / "e",
        params,
        "alice",
        sign=lambda ca, csr: ca.sign_client_csr(csr, days=1, not_before=past),
    )
    with pytest.raises(PreflightError, match='"alice" expired on'):
        step_c2_client_certs(
            _params(tmp_path, clients, ca_mode="files", client_ca_files=[str(expired)])
        )

    def renamed(ca: LabCA, csr: Any) -> x509.Certificate:
        from cryptography.hazmat.primitives import hashes

        # a CA that drops the OU: signs the same key under another subject
        b = x509.CertificateSigningRequestBuilder().subject_name(
            pkiclient.parse_dn("CN=alice,O=Example")
        )
        return ca.sign_client_csr(
            b.sign(keys.load_key(params.work.client("alice").key.read_bytes()), hashes.SHA256())
        )

    other = _files_answer(tmp_path / "r", params, "alice", sign=renamed)
    with pytest.raises(PreflightError, match="clientname=DN line or map would not match"):
        step_c2_client_certs(
            _params(tmp_path, clients, ca_mode="files", client_ca_files=[str(other)])
        )


# --------------------------------------------------------------------------- c3


def test_c3_plans_then_installs_as_two_real_users(
    tmp_path: Path, two_users: tuple[str, str]
) -> None:
    a, b = two_users
    clients = [
        {"os_user": a, "role": "alice", "subject": "CN=alice,OU=dba,O=Example"},
        {"os_user": b, "role": "bob"},
    ]
    params = _params(tmp_path, clients, client_driver_files=["pk8"], apply=False)
    step_c1_client_keys(params)
    step_c2_client_certs(params)
    keys_before = {u: params.work.client(u).key.read_bytes() for u in two_users}

    planned = step_c3_install_clients(params)
    assert not planned.applied and planned.installed is None
    assert [p.action for p in planned.planned_files] == ["create"] * 6
    assert not (_home(a) / ".postgresql").exists()  # a plan writes nothing
    assert any("tlsv1 alert unknown ca" in n for n in planned.notes)

    params = _params(tmp_path, clients, client_driver_files=["pk8"])
    done = step_c3_install_clients(params)
    assert done.applied and done.changed
    for user in two_users:
        entry = pwd.getpwnam(user)
        folder = _home(user) / ".postgresql"
        assert _mode(folder) == 0o700 and folder.stat().st_uid == entry.pw_uid
        crt, key, pk8 = (folder / n for n in ("postgresql.crt", "postgresql.key", "postgresql.pk8"))
        for path, mode in ((crt, 0o644), (key, 0o600), (pk8, 0o600)):
            st = path.lstat()
            assert stat.S_ISREG(st.st_mode) and _mode(path) == mode, path
            assert (st.st_uid, st.st_gid) == (entry.pw_uid, entry.pw_gid), path
        assert crt.read_bytes() == params.work.client(user).bundle.read_bytes()
        assert key.read_bytes() == keys_before[user]
        leaf = x509.load_pem_x509_certificates(crt.read_bytes())[0]
        assert keys.public_key_matches(
            serialization.load_der_private_key(pk8.read_bytes(), None), leaf
        )
        # the work directory's copy went once installed; the .pk8 was made from it then
        assert not params.work.client(user).key.exists()
    summary = done.summary()
    json.dumps(summary)
    assert len(summary["installed"]) == 6 and len(summary["planned_files"]) == 6
    assert {f["user"] for f in summary["planned_files"]} == {a, b}
    assert {f["kind"] for f in summary["installed"]} == {"client.crt", "client.key"}
    assert sorted(summary["work_keys_removed"]) == sorted(
        str(params.work.client(u).key) for u in two_users
    )
    # a rerun finds everything in place (the key read back from the user's own file)
    again = step_c3_install_clients(params)
    assert [p.action for p in again.planned_files] == ["unchanged"] * 6 and not again.changed


def test_c3_never_follows_a_link_the_client_user_planted(
    tmp_path: Path, own_client_user: str
) -> None:
    entry = pwd.getpwnam(own_client_user)
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's own file\n")
    os.chmod(victim, 0o644)
    as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    folder = _home(own_client_user) / ".postgresql"
    subprocess.run(["mkdir", "-m", "700", str(folder)], check=True, **as_user)  # type: ignore[call-overload]
    subprocess.run(["ln", "-s", str(victim), str(folder / "postgresql.key")], check=True, **as_user)  # type: ignore[call-overload]
    params = _params(tmp_path, [{"os_user": own_client_user, "role": "carol"}])
    step_c1_client_keys(params)
    step_c2_client_certs(params)
    with pytest.raises(
        InputError, match=r"postgresql.key: cannot be read safely .*remove it first"
    ):
        step_c3_install_clients(params)
    assert victim.read_bytes() == b"root's own file\n"
    st = victim.stat()
    assert (st.st_uid, _mode(victim)) == (0, 0o644)
    assert (folder / "postgresql.key").is_symlink()
    assert not (folder / "postgresql.crt").exists()  # refused before the first write
    assert not params.work.journal.exists()


def test_rollback_restores_an_existing_postgresql_crt_byte_for_byte(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, own_client_user: str
) -> None:
    entry = pwd.getpwnam(own_client_user)
    folder = _home(own_client_user) / ".postgresql"
    folder.mkdir(mode=0o700)
    os.chown(folder, entry.pw_uid, entry.pw_gid)
    old = _pem(LabCA.create(root_name="Old Root").issue(["old"])[1])
    crt = folder / "postgresql.crt"
    crt.write_bytes(old)
    os.chown(crt, entry.pw_uid, entry.pw_gid)
    os.chmod(crt, 0o640)
    params = runbook_params(fresh_cluster, clients=[{"os_user": own_client_user, "role": "dave"}])
    step_c1_client_keys(params)
    step_c2_client_certs(params)
    done = step_c3_install_clients(params)
    assert [p.action for p in done.planned_files] == ["replace", "create"]
    assert any(n.startswith(f"{crt} is replaced") for n in done.notes)
    assert crt.read_bytes() != old and (folder / "postgresql.key").exists()

    result = rollback_change(params)
    assert result.ok, result.problems
    assert crt.read_bytes() == old
    st = crt.lstat()
    assert (st.st_uid, st.st_gid, _mode(crt)) == (entry.pw_uid, entry.pw_gid, 0o640)
    assert not (folder / "postgresql.key").exists()  # made by the change: removed again
    assert str(crt) in result.restored


def test_a_later_step_that_saw_the_server_is_the_journals_before_state(tmp_path: Path) -> None:
    """c3 run where the server is out of reach records no server state; the server step
    after it does, and that is what a rollback compares with."""
    from pgtls_helpers.runbook import journal as wal

    params = _params(tmp_path, [{"os_user": "alice", "role": "alice"}])
    wal.Journal.begin(params.work, "clients", {"kind": "client-certificates"})
    wal.Journal.begin(params.work, "server", {"ssl": True, "data_directory": "/srv/pg"})
    entries = wal.read_entries(params.work.journal)
    assert wal.before_state(entries) == {"ssl": True, "data_directory": "/srv/pg"}
    assert wal.before_state(entries[:1]) == {"kind": "client-certificates"}
