"""How the CA back-ends prove who they are and what they control, against real CAs started
here: ACME ``dns-01`` through a hook that publishes the TXT record in the pebble-challtestsrv
Pebble's validation really asks (no PEBBLE_VA_ALWAYS_VALID), ACME External Account Binding with
a Pebble that requires it, and Vault AppRole login to a real OpenBao."""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from certfactory import csr_for
from support import skip_or_fail

from pgtls_helpers.ca import CaRefused, CaUnavailable, Signed, SignRequest, backend_for
from pgtls_helpers.errors import InputError, PgtlsError
from pgtls_helpers.lab.cas import LabBao, LabPebble, openbao
from pgtls_helpers.lab.cas import pebble as start_pebble
from pgtls_helpers.pki.chain import order_chain
from pgtls_helpers.pki.intake import read_ca_response

# a dns-01 hook as a DNS provider's would be: present / cleanup of one TXT record through an
# HTTP API (here pebble-challtestsrv's), each call appended to a log the tests read
HOOK = """\
import json, sys, urllib.request
action, name, value, api, log = sys.argv[1:6]
with open(log, "a") as f:
    f.write(json.dumps([action, name, value]) + "\\n")
if len(sys.argv) > 6:
    sys.exit(sys.argv[6])  # a failing provider: its message, exit status 1
path, body = ("/set-txt", {"host": name + ".", "value": value})
if action == "cleanup":
    path, body = ("/clear-txt", {"host": name + "."})
req = urllib.request.Request(api + path, data=json.dumps(body).encode(), method="POST")
urllib.request.urlopen(req, timeout=10).read()
"""

EAB_KID = "pgtls-test-kid"


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabPebble]:
    try:
        with start_pebble(tmp_path_factory.mktemp("pebble")) as server:
            yield server
    except PgtlsError as exc:
        skip_or_fail(str(exc))


@pytest.fixture(scope="module")
def eab_hmac() -> str:
    return secrets.token_urlsafe(48)  # base64url, as a CA hands out its HMAC keys


@pytest.fixture(scope="module")
def pebble_eab(tmp_path_factory: pytest.TempPathFactory, eab_hmac: str) -> Iterator[LabPebble]:
    try:
        with start_pebble(tmp_path_factory.mktemp("pebble-eab"), eab={EAB_KID: eab_hmac}) as s:
            yield s
    except PgtlsError as exc:
        skip_or_fail(str(exc))


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabBao]:
    try:
        with openbao(tmp_path_factory.mktemp("bao")) as server:
            yield server
    except PgtlsError as exc:
        skip_or_fail(str(exc))


def _dns01(pebble: LabPebble, tmp_path: Path, *extra: str, value: str = "{value}") -> dict:
    hook = tmp_path / "hook.py"
    hook.write_text(HOOK)
    argv = [sys.executable, str(hook), "{action}", "{name}", value, pebble.dns_management]
    argv += [str(tmp_path / "hook.log"), *extra]
    return {**pebble.settings, "challenge": "dns-01", "dns_hook": argv, "dns_timeout": 20}


def _calls(tmp_path: Path) -> list[list[str]]:
    return [json.loads(line) for line in (tmp_path / "hook.log").read_text().splitlines()]


def _request(cn: str, names: list[str], tmp_path: Path) -> tuple[object, SignRequest]:
    key, csr = csr_for(cn, names)
    return key, SignRequest(csr, cn, tuple(names), "C", state_dir=tmp_path)


def _leaf_chain_complete(signed: Signed, key: object) -> bool:
    certs = [s.cert for s in read_ca_response(list(signed.files)).certificates]
    leaf = next(c for c in certs if c.public_key() == key.public_key())  # type: ignore[attr-defined]
    chain = order_chain(certs, leaf=leaf)
    return chain.complete and chain.root is not None


# ------------------------------------------------------------------ dns-01


def test_dns01_publishes_the_txt_record_pebble_validates_and_cleans_it_up(
    pebble: LabPebble, tmp_path: Path
) -> None:
    key, request = _request(
        "db1.lab.pgtls.test", ["db1.lab.pgtls.test", "db2.lab.pgtls.test"], tmp_path
    )
    signed = backend_for("acme", _dns01(pebble, tmp_path), "p.yaml").sign(request, tmp_path / "a")
    assert _leaf_chain_complete(signed, key)
    calls = _calls(tmp_path)
    names = {"_acme-challenge.db1.lab.pgtls.test", "_acme-challenge.db2.lab.pgtls.test"}
    assert {n for a, n, _ in calls if a == "present"} == names
    assert {n for a, n, _ in calls if a == "cleanup"} == names
    # every present before any cleanup, and cleanup removes what present set
    assert [a for a, _, _ in calls] == ["present"] * 2 + ["cleanup"] * 2
    presented = {(n, v) for a, n, v in calls if a == "present"}
    assert presented == {(n, v) for a, n, v in calls if a == "cleanup"}
    assert all(len(v) == 43 for _, v in presented)  # base64url of a SHA-256, unpadded


def test_dns01_with_a_wrong_txt_value_fails_the_order_and_still_cleans_up(
    pebble: LabPebble, tmp_path: Path
) -> None:
    _, request = _request("db3.lab.pgtls.test", ["db3.lab.pgtls.test"], tmp_path)
    ca = backend_for("acme", _dns01(pebble, tmp_path, value="wrong-{value}"), "p.yaml")
    with pytest.raises(CaRefused, match=r"refused the order: .*db3\.lab\.pgtls\.test.*dns-01"):
        ca.sign(request, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    assert [a for a, _, _ in _calls(tmp_path)] == ["present", "cleanup"]


def test_a_hook_that_fails_names_the_name_and_its_last_line_and_cleanup_still_runs(
    pebble: LabPebble, tmp_path: Path
) -> None:
    _, request = _request("db4.lab.pgtls.test", ["db4.lab.pgtls.test"], tmp_path)
    ca = backend_for("acme", _dns01(pebble, tmp_path, "zone lab.pgtls.test not found"), "p")
    with pytest.raises(CaRefused) as err:
        ca.sign(request, tmp_path / "a")
    message = str(err.value)
    assert "present for _acme-challenge.db4.lab.pgtls.test exited with status 1" in message
    assert "(zone lab.pgtls.test not found); nothing was installed" in message
    assert "cleanup for _acme-challenge.db4.lab.pgtls.test exited with status 1" in message
    assert [a for a, _, _ in _calls(tmp_path)] == ["present", "cleanup"]


def test_a_hook_that_hangs_is_unavailable(pebble: LabPebble, tmp_path: Path) -> None:
    _, request = _request("db5.lab.pgtls.test", ["db5.lab.pgtls.test"], tmp_path)
    hang = [sys.executable, "-c", "import time; time.sleep(30)", "{action}", "{value}"]
    settings = {**pebble.settings, "challenge": "dns-01", "dns_hook": hang, "dns_timeout": 0.5}
    with pytest.raises(CaUnavailable, match=r"present for _acme-challenge\.db5.* did not finish"):
        backend_for("acme", settings, "p").sign(request, tmp_path / "a")


def test_dns01_settings_and_ip_addresses_are_refused_with_their_setting(
    pebble: LabPebble, tmp_path: Path
) -> None:
    base = {**pebble.settings, "challenge": "dns-01"}
    with pytest.raises(InputError, match=r"p\.yaml: ca_settings\.dns_hook is missing"):
        backend_for("acme", base, "p.yaml")
    with pytest.raises(InputError, match=r"dns_hook never names \{value\}"):
        backend_for("acme", {**base, "dns_hook": ["hook", "{action}", "{name}"]}, "p.yaml")
    with pytest.raises(InputError, match=r"ca_settings\.dns_hook is for challenge dns-01"):
        backend_for("acme", {**pebble.settings, "dns_hook": ["h", "{action}", "{value}"]}, "p")
    with pytest.raises(InputError, match="challenge 'tls-alpn-01' is not http-01 or dns-01"):
        backend_for("acme", {**pebble.settings, "challenge": "tls-alpn-01"}, "p")
    _, request = _request("db6.lab.pgtls.test", ["db6.lab.pgtls.test", "127.0.0.1"], tmp_path)
    with pytest.raises(InputError, match=r"dns-01 cannot prove the IP address 127\.0\.0\.1"):
        backend_for("acme", _dns01(pebble, tmp_path), "p").sign(request, tmp_path / "a")
    assert not (tmp_path / "hook.log").exists()  # refused before the hook or the CA


# ------------------------------------------------------------------ External Account Binding


def test_a_ca_that_requires_eab_refuses_without_it_and_issues_with_it(
    pebble_eab: LabPebble, eab_hmac: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, request = _request("db1.lab.pgtls.test", ["db1.lab.pgtls.test"], tmp_path)
    with pytest.raises(CaRefused, match=r"requires External Account Binding; set .*eab_kid_env"):
        backend_for("acme", pebble_eab.settings, "p").sign(request, tmp_path / "a")

    settings = {**pebble_eab.settings, "eab_kid_env": "T_EAB_KID", "eab_hmac_env": "T_EAB_HMAC"}
    monkeypatch.setenv("T_EAB_KID", EAB_KID)
    monkeypatch.setenv("T_EAB_HMAC", secrets.token_urlsafe(48))  # not the CA's key
    with pytest.raises(CaRefused, match="refused the External Account Binding of T_EAB_KID") as err:
        backend_for("acme", settings, "p").sign(request, tmp_path / "b")
    assert eab_hmac not in str(err.value)

    monkeypatch.setenv("T_EAB_HMAC", eab_hmac)
    key, request = _request("db2.lab.pgtls.test", ["db2.lab.pgtls.test"], tmp_path)
    ca = backend_for("acme", settings, "p")
    signed = ca.sign(request, tmp_path / "c")
    assert _leaf_chain_complete(signed, key)
    kept = [p for p in tmp_path.rglob("*") if p.is_file()]  # the answer and the account key
    returned = repr(signed) + repr(ca) + "".join(p.read_text() for p in kept)
    assert eab_hmac not in returned


# ------------------------------------------------------------------ Vault AppRole


def test_openbao_approle_login_signs_and_a_wrong_secret_id_is_refused_without_it(
    bao: LabBao, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {
        "address": bao.address,
        "role": "pg",
        "approle_role_id_env": "T_ROLE_ID",
        "approle_secret_id_env": "T_SECRET_ID",
    }
    monkeypatch.setenv("T_ROLE_ID", bao.role_id)
    monkeypatch.setenv("T_SECRET_ID", bao.secret_id)
    monkeypatch.delenv("PGTLS_LAB_BAO_TOKEN")  # the root token is not what signs
    key, request = _request("db1.lab.pgtls.test", ["db1.lab.pgtls.test"], tmp_path)
    ca = backend_for("vault", settings, "p.yaml")
    signed = ca.sign(request, tmp_path / "a")
    assert _leaf_chain_complete(signed, key)
    returned = repr(signed) + repr(ca) + "".join(p.read_text() for p in signed.files)
    assert bao.secret_id not in returned and bao.token not in returned

    wrong = secrets.token_hex(18)
    monkeypatch.setenv("T_SECRET_ID", wrong)
    with pytest.raises(
        CaRefused, match="refused the AppRole login of T_ROLE_ID and T_SECRET_ID"
    ) as err:
        ca.sign(request, tmp_path / "b")
    assert wrong not in str(err.value) and bao.role_id not in str(err.value)
    assert str(err.value).endswith("nothing was installed")
    # the policy is the pki role's only: a name outside it is the CSR's refusal, not the login's
    monkeypatch.setenv("T_SECRET_ID", bao.secret_id)
    _, outside = _request("db1.example.com", ["db1.example.com"], tmp_path)
    with pytest.raises(CaRefused, match=r"refused the CSR: .*db1\.example\.com") as err:
        ca.sign(outside, tmp_path / "c")
    assert bao.secret_id not in str(err.value)
