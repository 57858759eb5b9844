"""Every preflight refusal of a change, end to end through ``pgtls run``: the run exits
non-zero, and every server file (the TLS pair wherever ``ssl_cert_file``/``ssl_key_file``
point, ``ssl_ca_file``, ``pg_hba.conf``, ``postgresql.conf``, ``postgresql.auto.conf``) and every
client file (each listed OS user's ``~/.postgresql`` and its ``root.crt``) is byte for byte as it
was. A refusal of the parameters file says so in one sentence (exit 2); a refusal of step 3 says
under "in place now:" that nothing was changed (exit 1).

Two clusters per module and major: one with SSL off (a first install), one already serving a
certificate of the module's lab CA (a renewal). A refused run changes nothing on them; a test
that changes a setting for its case puts it back.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from record_checks import HBA_RULE, params_for, write_params
from support import skip_or_fail

from pgtls_helpers import notebook as runbook
from pgtls_helpers.cli import main as cli_main
from pgtls_helpers.lab import LabCA, LabCluster
from pgtls_helpers.lab.ca import pem_of
from pgtls_helpers.pki.chain import fingerprint
from pgtls_helpers.pki.csr import load_csr
from pgtls_helpers.postgres.clients import resolve_client_users
from pgtls_helpers.postgres.probe import probe
from pgtls_helpers.postgres.server import Server
from pgtls_helpers.runbook.params import load_params

NOTHING_CHANGED = "nothing was changed: every server and client file is as it was before"
PASSPHRASE_ENV = "PGTLS_TEST_KEY_PASSPHRASE"


@dataclass(frozen=True)
class Lab:
    """A cluster of this module, the CA that answers its changes' CSRs (the one whose
    certificate it serves, when it serves one), and the two client OS users every change
    lists: one holding that CA's root, one with no ``~/.postgresql`` at all."""

    cluster: LabCluster
    ca: LabCA
    users: tuple[str, ...]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def client_users() -> Iterator[tuple[str, ...]]:
    if os.geteuid() != 0:
        skip_or_fail("creating client OS users needs root")
    names = (f"pgtls_pr{os.getpid()}", f"pgtls_pn{os.getpid()}")
    for name in names:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
    try:
        yield names
    finally:
        for name in names:
            subprocess.run(["userdel", "--remove", name], check=False, capture_output=True)


@pytest.fixture(scope="module")
def module_ca() -> LabCA:
    return LabCA.create()


@pytest.fixture(scope="module")
def plain(pg_bindir: Path, module_ca: LabCA, client_users: tuple[str, ...]) -> Iterator[Lab]:
    """SSL off, the stock pg_hba.conf: the change would be a first install."""
    cluster = LabCluster.create(bindir=pg_bindir)
    try:
        cluster.start()
        yield Lab(cluster, module_ca, client_users)
    finally:
        cluster.remove()


@pytest.fixture(scope="module")
def served(
    pg_bindir: Path,
    module_ca: LabCA,
    client_users: tuple[str, ...],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Lab]:
    """A server that serves a certificate of ``module_ca``, installed by the runbook itself
    (steps 1 to 4, in this process), whose root the first client user holds."""
    cluster = LabCluster.create(bindir=pg_bindir)
    try:
        cluster.start()
        base = tmp_path_factory.mktemp("served")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PGPASSFILE", str(cluster.passfile))
            values = _answered(
                params_for(
                    cluster,
                    change_id="CHG-served",
                    ca_mode="files",
                    client_system_users=[client_users[0]],
                    work_dir=str(base / "work"),
                ),
                module_ca,
                base / "ca-reply",
            )
            params = load_params(values)
            runbook.step2_ca_response(params)
            runbook.step3_install_files(params)
            runbook.step4_enable_ssl(params)
        # a server that also verifies client certificates: ssl_ca_file is one of its files
        client_ca = _server_owned(
            cluster.pgdata / "client-ca.crt", pem_of(module_ca.root), cluster, mode=0o644
        )
        _alter(cluster, [f"ALTER SYSTEM SET ssl_ca_file = '{client_ca}'"])
        (holder, stranger) = resolve_client_users(client_users)
        assert holder.root_crt.is_file() and not stranger.root_crt.parent.exists()
        lab = Lab(cluster, module_ca, client_users)
        assert _everything(lab)[str(client_ca)] is not None
        yield lab
    finally:
        cluster.remove()


# --------------------------------------------------------------------------- helpers


def _answered(values: dict[str, Any], ca: LabCA, out: Path, *, days: int = 397) -> dict[str, Any]:
    """``values`` with ``ca_files``: step 1 makes the change's key and CSR in its work
    directory (the run keeps them), and ``ca`` answers the CSR the way a CA does."""
    params = load_params({**values, "ca_files": []})
    runbook.step1_key_and_csr(params)
    leaf = ca.sign_csr(load_csr(params.work.csr.read_bytes()), days=days)
    return {**values, "ca_files": [str(p) for p in ca.write_response(leaf, out)]}


def _state(path: Path) -> str | None:
    """A file's SHA-256, a link's target, or None when there is nothing at ``path``."""
    if path.is_symlink():
        return f"link to {os.readlink(path)}"
    if not path.exists():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


_SETTINGS = (
    "ssl",
    "ssl_cert_file",
    "ssl_key_file",
    "ssl_ca_file",
    "hba_file",
    "ssl_passphrase_command",
    "ssl_passphrase_command_supports_reload",
)


def _everything(lab: Lab) -> dict[str, object]:
    """Every server and client file a change could touch, by path, with the settings that
    point at them, the data directory's files, and the certificate served now."""
    with Server(lab.cluster.conninfo()) as server:
        facts = server.facts()
        settings = {name: server.show(name) for name in _SETTINGS}
    server_files = [
        facts.ssl_cert_file,
        facts.ssl_key_file,
        facts.hba_file,
        facts.config_file,
        facts.data_directory / "postgresql.auto.conf",
        *([facts.ssl_ca_file] if facts.ssl_ca_file else []),
    ]
    seen: dict[str, object] = {str(p): _state(p) for p in server_files}
    assert seen[str(facts.hba_file)] and seen[str(facts.config_file)]
    seen["settings"] = settings
    seen["data directory"] = sorted(
        p.name for p in facts.data_directory.iterdir() if not p.is_dir()
    )
    for user in resolve_client_users(lab.users):
        folder = user.root_crt.parent
        seen[str(folder)] = sorted(os.listdir(folder)) if folder.is_dir() else None
        seen[str(user.root_crt)] = _state(user.root_crt)
    shown = probe("127.0.0.1", lab.cluster.port, timeout=5.0) if facts.ssl else None
    seen["served"] = fingerprint(shown.chain[0]) if shown and shown.chain else None
    return seen


def _alter(cluster: LabCluster, statements: list[str]) -> None:
    with psycopg.connect(**cluster.conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        for statement in statements:
            conn.execute(statement)
    with Server(cluster.conninfo()) as server:
        server.reload_confirmed()


@contextmanager
def _settings(cluster: LabCluster, **values: str) -> Iterator[None]:
    """``ALTER SYSTEM SET`` each setting and reload; ``RESET`` and reload afterwards."""
    _alter(cluster, [f"ALTER SYSTEM SET {name} = '{value}'" for name, value in values.items()])
    try:
        yield
    finally:
        _alter(cluster, [f"ALTER SYSTEM RESET {name}" for name in values])


def _server_owned(path: Path, data: bytes, cluster: LabCluster, *, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    if cluster.os_user:
        entry = pwd.getpwnam(cluster.os_user)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


# Each case's change to the server, made before the "before" snapshot and undone after the
# test: what makes the refusal happen on that server.


@contextmanager
def _cert_outside(lab: Lab) -> Iterator[None]:
    """ssl_cert_file in a folder beside the data directory (the same certificate there, so a
    serving server goes on serving)."""
    data = lab.cluster.pgdata
    current = data / "server.crt"
    elsewhere = _server_owned(
        lab.cluster.base / "elsewhere" / "server.crt",
        current.read_bytes() if current.exists() else b"",
        lab.cluster,
        mode=0o644,
    )
    try:
        with _settings(lab.cluster, ssl_cert_file=str(elsewhere)):
            yield
    finally:
        shutil.rmtree(elsewhere.parent)


@contextmanager
def _key_through_a_link(lab: Lab) -> Iterator[None]:
    data = lab.cluster.pgdata
    real = _server_owned(data / "pgtls-test-real.key", b"not a key\n", lab.cluster)
    link = data / "pgtls-test-link.key"
    link.symlink_to(real.name)
    try:
        with _settings(lab.cluster, ssl_key_file=str(link)):
            yield
    finally:
        link.unlink()
        real.unlink()


@contextmanager
def _cert_of_another_user(lab: Lab) -> Iterator[None]:
    foreign = lab.cluster.pgdata / "pgtls-test-foreign.crt"
    foreign.write_bytes(b"not a certificate\n")
    stranger = pwd.getpwnam(lab.users[1])
    os.chown(foreign, stranger.pw_uid, stranger.pw_gid)
    try:
        with _settings(lab.cluster, ssl_cert_file=str(foreign)):
            yield
    finally:
        foreign.unlink()


@contextmanager
def _passphrase_command_without_reload(lab: Lab) -> Iterator[None]:
    with _settings(lab.cluster, ssl_passphrase_command="/bin/echo %p"):
        yield


# --------------------------------------------------------------------------- refusals


@dataclass(frozen=True)
class Refusal:
    """One way step 3 refuses a change, on one of the module's servers."""

    finding: str  # the refusal's code, as the terminal and the record say it
    server: str  # "plain" (SSL off: a first install) or "served" (a renewal)
    params: Mapping[str, Any] = field(default_factory=dict)
    new_root: bool = False  # the CA's answer comes from another root (a CA rotation)
    days: int = 397  # the new certificate's validity (the served one has 397 days)
    passphrase: bool = False  # the change's key is passphrase-protected
    setup: Callable[[Lab], AbstractContextManager[None]] | None = None


_CLIENTCERT_MAYBE = {**HBA_RULE, "options": ["clientcert=maybe"]}
_CERT_FOR_POSTGRES = {**HBA_RULE, "user": "postgres", "method": "cert"}

REFUSALS = {
    # renewal policy (runbook/renewal.py assess), on a server serving the module CA's certificate
    "ca-rotation": Refusal("ca-rotation", "served", new_root=True),
    "ca-rotation-client-lacks-new-root": Refusal(
        "new-root-untrusted", "served", {"new_root": "accept"}, new_root=True
    ),
    "shorter-validity": Refusal("shorter-validity", "served", days=30),
    "a-dropped-name": Refusal("names-dropped", "served", {"subject_alt_names": ["127.0.0.1"]}),
    "passphrase-without-reload": Refusal(
        "passphrase-reload",
        "served",
        {"key_passphrase_env": PASSPHRASE_ENV},
        passphrase=True,
        setup=_passphrase_command_without_reload,
    ),
    # an encrypted key the server could not read (runbook/install.py)
    "encrypted-key-first-install": Refusal(
        "encrypted-key", "plain", {"key_passphrase_env": PASSPHRASE_ENV}, passphrase=True
    ),
    "encrypted-key-renewal": Refusal(
        "encrypted-key", "served", {"key_passphrase_env": PASSPHRASE_ENV}, passphrase=True
    ),
    # where the server's settings point (runbook/install.py, postgres/targets.py)
    "cert-outside-first-install": Refusal("target-policy", "plain", setup=_cert_outside),
    "cert-outside-renewal": Refusal("target-policy", "served", setup=_cert_outside),
    "key-through-a-link": Refusal("target-policy", "plain", setup=_key_through_a_link),
    "cert-of-another-user": Refusal("target-policy", "plain", setup=_cert_of_another_user),
    # step 4 rehearsed in step 3 (runbook/enable.py rehearse_enable)
    "hba-server-parse-first-install": Refusal(
        "step4-would-refuse", "plain", {"hba_rules": [_CLIENTCERT_MAYBE]}
    ),
    "hba-server-parse-renewal": Refusal(
        "step4-would-refuse", "served", {"hba_rules": [_CLIENTCERT_MAYBE]}
    ),
    "hba-locks-out-the-runbook-first-install": Refusal(
        "step4-would-refuse", "plain", {"hba_rules": [_CERT_FOR_POSTGRES]}
    ),
    "hba-locks-out-the-runbook-renewal": Refusal(
        "step4-would-refuse", "served", {"hba_rules": [_CERT_FOR_POSTGRES]}
    ),
}


@pytest.mark.spread
@pytest.mark.parametrize("case", list(REFUSALS.values()), ids=list(REFUSALS))
def test_a_refused_change_exits_1_and_leaves_every_server_and_client_file_as_it_was(
    case: Refusal,
    pg_bindir: Path,  # the major: the clusters are requested by name below
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    lab: Lab = request.getfixturevalue(case.server)
    monkeypatch.setenv("PGPASSFILE", str(lab.cluster.passfile))
    if case.passphrase:
        monkeypatch.setenv(PASSPHRASE_ENV, "pp-" + secrets.token_urlsafe(18))
    ca = LabCA.create(root_name="Rotation Root B") if case.new_root else lab.ca
    change_id = f"CHG-{case.finding}"
    with case.setup(lab) if case.setup else nullcontext():
        values = _answered(
            params_for(
                lab.cluster,
                change_id=change_id,
                ca_mode="files",
                client_system_users=list(lab.users),
                work_dir=str(tmp_path / "work"),
                **case.params,
            ),
            ca,
            tmp_path / "ca-reply",
            days=case.days,
        )
        params_file = write_params(tmp_path / "params.yaml", **values)
        before = _everything(lab)
        records = tmp_path / "records"
        code = cli_main(
            ["run", str(params_file), "--records", str(records), "--work", str(tmp_path / "work")]
            + ["--no-progress"]
        )
        out = capsys.readouterr().out
        assert _everything(lab) == before, out
    assert code == 1, out
    assert f"{case.finding}:" in out, out
    assert "in place now:" in out and NOTHING_CHANGED in out, out
    assert "wrote " not in out and "to roll back" not in out, out
    (manifest,) = (records / change_id).glob("*/manifest.json")
    m = json.loads(manifest.read_text())
    assert [s["status"] for s in m["steps"]] == ["ok", "ok", "failed", "not-run", "not-run"]
    assert case.finding in m["steps"][2]["error"] and m["files"] == []


_TYPOS = {
    "method": ({"method": "scram-sha265"}, "'scram-sha265'"),
    "address": ({"address": "127.0.0.1/33"}, "'127.0.0.1/33'"),
    "connection-type": ({"type": "hostssll"}, "'hostssll'"),
    "reject-misprinted": ({"type": "hostnossl", "method": "eject"}, "'eject'"),
    "key": ({"databse": "all"}, "'databse'"),
    "trust": ({"method": "trust"}, "(trust)"),
    "host-without-ssl": ({"type": "host"}, "(host)"),
}


@pytest.mark.spread
@pytest.mark.parametrize("change, quoted", list(_TYPOS.values()), ids=list(_TYPOS))
def test_an_unusable_hba_rule_exits_2_naming_the_file_and_the_rule_and_changes_nothing(
    change: dict[str, str],
    quoted: str,
    served: Lab,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PGPASSFILE", str(served.cluster.passfile))
    rule = {**HBA_RULE, **change}
    if "databse" in change:
        del rule["database"]
    values = params_for(
        served.cluster,
        change_id="CHG-typo",
        client_system_users=list(served.users),
        work_dir=str(tmp_path / "work"),
        hba_rules=[rule],
    )
    params_file = write_params(tmp_path / "params.yaml", **values)
    before = _everything(served)
    records = tmp_path / "records"
    code = cli_main(["run", str(params_file), "--records", str(records), "--no-progress"])
    out, err = capsys.readouterr()
    assert _everything(served) == before
    assert code == 2, err
    # one sentence on stderr naming the parameters file, the rule and what is wrong in it
    assert err.startswith(f"pgtls: {params_file}: hba_rules[0]: ") and err.count("\n") == 1, err
    assert quoted in err, err
    assert out == "" and not records.exists() and not (tmp_path / "work").exists()
