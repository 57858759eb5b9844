"""The five steps of the runbook, one function each; the notebooks call these and show results.

Every step reads the change's private work directory (``work/<change_id>/``, 0700), does its
part, and returns a result whose ``summary()`` is safe to archive (no key bytes, no passphrase).
Steps that change a server check first, plan, write with backups, prove the outcome from the
outside, and undo their own writes when the proof fails. With ``apply: false`` they stop at the
plan. Running a step again with the same inputs changes nothing and says so.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pgtls_helpers import chain as chainmod
from pgtls_helpers import files, hba, keys
from pgtls_helpers.csr import spki_sha256
from pgtls_helpers.errors import InputError, PgtlsError, PreflightError, ServerError
from pgtls_helpers.findings import Finding
from pgtls_helpers.params import Params

__all__ = [
    "CaResponseResult",
    "EnableResult",
    "InstallStepResult",
    "KeyCsrResult",
    "RollbackResult",
    "VerifyResult",
    "rollback_change",
    "step1_key_and_csr",
    "step2_ca_response",
    "step3_install_files",
    "step4_enable_ssl",
    "step5_verify_clients",
]

KEY_NAME = "server.key"
CSR_NAME = "server.csr"
STATE_NAME = "state.json"
INSTALL_JOURNAL = "install.json"  # step 3: files written, their backups
ENABLE_JOURNAL = "enable.json"  # step 4: settings before, pg_hba.conf backup


# --------------------------------------------------------------------------- work directory


def work_dir(params: Params) -> Path:
    """``work/<change_id>/``, created 0700; one that others could read is tightened."""
    path = params.work
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        os.chmod(path, 0o700)
    return path


def _state(params: Params) -> dict[str, Any]:
    try:
        return dict(json.loads((params.work / STATE_NAME).read_text()))
    except FileNotFoundError:
        return {}


def _save_state(params: Params, **updates: Any) -> dict[str, Any]:
    state = {**_state(params), **updates}
    files.atomic_write(
        work_dir(params) / STATE_NAME,
        (json.dumps(state, indent=2, sort_keys=True) + "\n").encode(),
        mode=0o600,
    )
    return state


def save_step(params: Params, step: str, summary: dict[str, Any]) -> None:
    """Leave a step's archivable summary in the run's record directory, when there is one."""
    if not params.record_dir:
        return
    out = Path(params.record_dir) / "steps"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{step}.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


def _passphrase(params: Params) -> bytes | None:
    return (
        keys.passphrase_from_env(params.key_passphrase_env) if params.key_passphrase_env else None
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _rfc4514(name: x509.Name) -> str:
    """RFC 4514, with ``emailAddress=`` rather than its dotted OID."""
    from cryptography.x509.oid import NameOID

    return name.rfc4514_string({NameOID.EMAIL_ADDRESS: "emailAddress"})


def _fp(cert: x509.Certificate) -> str:
    return chainmod.fingerprint(cert)


# --------------------------------------------------------------------------- step 1


@dataclass(frozen=True)
class KeyCsrResult:
    """Step 1: where the key and CSR are, and the CSR as a reviewer reads it."""

    key_path: Path
    csr_path: Path
    key_type: str
    encrypted: bool
    subject_fields: list[tuple[str, str]]
    csr_text: str
    csr_sha256: str
    public_key_sha256: str
    reused: bool

    def summary(self) -> dict[str, Any]:
        return {
            "key_type": self.key_type,
            "key_encrypted": self.encrypted,
            "subject": dict(self.subject_fields),
            "csr_file": str(self.csr_path),
            "csr_sha256": self.csr_sha256,
            "public_key_sha256": self.public_key_sha256,
            "reused": self.reused,
        }


def subject_of(params: Params) -> Any:
    from pgtls_helpers.subject import make_subject

    return make_subject(
        params.common_name,
        country=params.country,
        state=params.state,
        locality=params.locality,
        organization=params.organization,
        organizational_unit=params.organizational_unit,
        email=params.email,
        sans=params.subject_alt_names,
    )


def step1_key_and_csr(params: Params) -> KeyCsrResult:
    """Generate the server key (0600 from its first byte) and the CSR to send to the CA.

    A CSR already in the work directory for the same subject is reused, so running the step
    again never replaces a key whose CSR is already with the CA.
    """
    from pgtls_helpers.csr import build_csr, csr_pem, load_csr, render_csr

    subject = subject_of(params)
    wd = work_dir(params)
    key_path, csr_path = wd / KEY_NAME, wd / CSR_NAME
    reused = False
    if csr_path.exists():
        csr = load_csr(csr_path.read_bytes(), source=str(csr_path))
        wanted = subject.to_x509_name()
        sans = _csr_sans(csr)
        if csr.subject != wanted or sans != {n.lower() for n in subject.alt_names()}:
            raise PreflightError(
                f"{csr_path}: a CSR for a different subject is already in this change's work "
                "directory; use a new change_id, or delete that directory if the CSR was never "
                "sent"
            )
        have, want = keys.describe_key(csr.public_key()), _key_label(params.key_type)
        if have != want:
            raise PreflightError(
                f"{csr_path}: the CSR already made for this change has an {have} key, not "
                f"{want}; set key_type back, or use a new change_id for a new key"
            )
        reused = True
    if not reused:
        key = keys.generate_key(params.key_type)
        csr = build_csr(subject, key)
        keys.write_private_key(key_path, keys.serialize_key(key, _passphrase(params)))
        files.atomic_write(csr_path, csr_pem(csr), mode=0o644)
        del key
    encrypted = key_path.exists() and keys.is_encrypted_pem(key_path.read_bytes())
    result = KeyCsrResult(
        key_path=key_path,
        csr_path=csr_path,
        key_type=params.key_type,
        encrypted=encrypted,
        subject_fields=subject.fields(),
        csr_text=render_csr(csr),
        csr_sha256=files.sha256_hex(csr_path.read_bytes()),
        public_key_sha256=spki_sha256(csr.public_key()),
        reused=reused,
    )
    _save_state(params, csr_sha256=result.csr_sha256, public_key_sha256=result.public_key_sha256)
    save_step(params, "01_key_and_csr", result.summary())
    return result


def _key_label(key_type: str) -> str:
    """``rsa4096`` → ``RSA 4096``, ``ecdsa-p256`` → ``ECDSA P-256``, as describe_key says it.

    >>> _key_label("ecdsa-p384"), _key_label("rsa2048")
    ('ECDSA P-384', 'RSA 2048')
    """
    if key_type.startswith("rsa"):
        return f"RSA {key_type[3:]}"
    return f"ECDSA {key_type.split('-', 1)[1].upper().replace('P', 'P-')}"


def _csr_sans(csr: x509.CertificateSigningRequest) -> set[str]:
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(v).lower() for v in ext.get_values_for_type(x509.DNSName)} | {
        str(v).lower() for v in ext.get_values_for_type(x509.IPAddress)
    }


# --------------------------------------------------------------------------- step 2


@dataclass(frozen=True)
class CaResponseResult:
    """Step 2: the chain, ordered and checked, and the files the install will use."""

    sources: list[str]
    chain: chainmod.ChainResult
    findings: list[Finding]
    notes: list[str]
    bundle_path: Path
    root_path: Path | None

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def summary(self) -> dict[str, Any]:
        return {
            "sources": self.sources,
            "chain": [
                {
                    "role": r,
                    "subject": _rfc4514(c.subject),
                    "issuer": _rfc4514(c.issuer),
                    "sha256": _fp(c),
                    "not_after": c.not_valid_after_utc.isoformat(),
                }
                for c, r in zip(self.chain.path, self.chain.roles, strict=True)
            ],
            "unused": [_fp(c) for c in self.chain.unused],
            "findings": [f.__dict__ for f in self.findings],
            "notes": self.notes,
            "bundle_sha256": files.sha256_hex(self.bundle_path.read_bytes()),
        }


def _lab_sign(params: Params, csr_path: Path, ca_dir: Path) -> list[Path]:
    from pgtls_helpers.csr import load_csr
    from pgtls_helpers.lab import LabCA

    csr = load_csr(csr_path.read_bytes(), source=str(csr_path))
    want = spki_sha256(csr.public_key())
    if ca_dir.is_dir():
        from pgtls_helpers.intake import read_ca_response

        existing = read_ca_response([ca_dir])
        if any(spki_sha256(s.cert.public_key()) == want for s in existing.certificates):
            return sorted(ca_dir.iterdir())
    ca = LabCA.create()
    leaf = ca.sign_csr(csr)
    ca_dir.mkdir(mode=0o700, exist_ok=True)
    return ca.write_response(leaf, ca_dir)


def step2_ca_response(params: Params, *, check: bool = True) -> CaResponseResult:
    """Read what the CA returned, order it leaf → root, and check it against our key and names.

    In ``lab`` mode the throwaway CA signs the CSR first. Raises :class:`PreflightError` naming
    every error finding: nothing goes near a server with a chain that is wrong. With ``check``
    false the result comes back despite error findings, so a notebook can show them all before
    it stops.
    """
    from pgtls_helpers.findings import check_chain
    from pgtls_helpers.intake import read_ca_response

    wd = work_dir(params)
    csr_path = wd / CSR_NAME
    if not csr_path.exists():
        raise PreflightError(
            f"{csr_path}: no CSR for change {params.change_id}; run step 1 (01_key_and_csr) first"
        )
    if params.ca_mode == "lab":
        paths: list[Path] = _lab_sign(params, csr_path, wd / "ca")
    else:
        if not params.ca_files:
            raise PreflightError(
                f"ca_files is empty: send {csr_path} to your CA, then run again with ca_files "
                "listing the files it returned"
            )
        paths = [Path(p) for p in params.ca_files]
    p12_password = (
        keys.passphrase_from_env(params.ca_files_password_env)
        if params.ca_files_password_env
        else None
    )
    intake = read_ca_response(paths, password=p12_password)
    certs = [s.cert for s in intake.certificates]
    from pgtls_helpers.csr import load_csr

    csr = load_csr(csr_path.read_bytes(), source=str(csr_path))
    want = spki_sha256(csr.public_key())
    leaf = next((c for c in certs if spki_sha256(c.public_key()) == want), None)
    if leaf is None:
        raise PreflightError(
            f"none of the CA's files ({', '.join(p.name for p in paths)}) holds a certificate "
            f"for the key behind {csr_path.name}; was this CSR the one submitted?"
        )
    result = chainmod.order_chain(certs, leaf=leaf)
    findings = check_chain(result, key=csr.public_key(), hosts=params.hosts)
    notes = [
        *intake.private_keys,
        *(f"{d}: duplicate, ignored" for d in intake.duplicates),
        *intake.skipped,
    ]
    bundle = wd / "server.crt"
    root_path: Path | None = wd / "root.crt"
    files.atomic_write(bundle, chainmod.bundle_pem(result), mode=0o644)
    if result.root is not None and root_path is not None:
        files.atomic_write(root_path, _pem(result.root), mode=0o644)
    else:
        root_path = None
    out = CaResponseResult([str(p) for p in paths], result, findings, notes, bundle, root_path)
    _save_state(params, leaf_sha256=_fp(leaf), bundle_sha256=files.sha256_hex(bundle.read_bytes()))
    save_step(params, "02_ca_response", out.summary())
    if out.errors and check:
        raise PreflightError(
            "the CA's response is not usable: "
            + "; ".join(f"{f.code}: {f.message}" for f in out.errors)
        )
    return out


# --------------------------------------------------------------------------- step 3


@dataclass(frozen=True)
class InstallStepResult:
    """Step 3: the plan (always) and what was written (when ``apply``)."""

    facts: dict[str, Any]
    plan: list[dict[str, object]]
    preflight: list[Finding]
    installed: files.InstallResult | None
    applied: bool

    @property
    def changed(self) -> bool:
        return bool(self.installed and self.installed.changed)

    def summary(self) -> dict[str, Any]:
        return {
            "facts": self.facts,
            "plan": self.plan,
            "preflight": [f.__dict__ for f in self.preflight],
            "applied": self.applied,
            "changed": self.changed,
            "installed": self.installed.as_dicts() if self.installed else [],
        }


def _server(params: Params) -> Any:
    from pgtls_helpers.server import Server

    return Server(params.conninfo())


def _check_pgdata(params: Params, facts: Any) -> None:
    if params.pgdata and Path(params.pgdata).resolve() != Path(facts.data_directory).resolve():
        raise PreflightError(
            f"pgdata is {params.pgdata} but the server on {params.server_host}:"
            f"{params.server_port} says its data directory is {facts.data_directory}; fix pgdata "
            "or the connection parameters"
        )
    if not Path(facts.data_directory).is_dir():
        raise PreflightError(
            f"{facts.data_directory}: the server's data directory is not visible here; run the "
            "runbook on the database host as root or as the server's OS user"
        )


def _load_bundle(params: Params) -> tuple[list[x509.Certificate], x509.Certificate | None]:
    wd = params.work
    bundle = wd / "server.crt"
    if not bundle.exists():
        raise PreflightError(
            f"{bundle}: no checked chain for change {params.change_id}; run "
            "step 2 (02_ca_response) first"
        )
    certs = x509.load_pem_x509_certificates(bundle.read_bytes())
    root_path = wd / "root.crt"
    root = x509.load_pem_x509_certificate(root_path.read_bytes()) if root_path.exists() else None
    return certs, root


def _is_shared(path: Path) -> bool:
    """A certificate or key other services use too: Debian's snakeoil pair, /etc/ssl."""
    return "snakeoil" in path.name or str(path).startswith("/etc/ssl/")


def ssl_targets(facts: Any) -> tuple[Path, Path, dict[str, str]]:
    """Where the certificate and key go, and the settings that must change to point there.

    Files shared with other services are never replaced: the new pair goes into the data
    directory as ``server.crt``/``server.key`` and step 4 points ``ssl_cert_file`` and
    ``ssl_key_file`` at it.
    """
    cert, key = Path(facts.ssl_cert_file), Path(facts.ssl_key_file)
    if not (_is_shared(cert) or _is_shared(key)):
        return cert, key, {}
    data = Path(facts.data_directory)
    return (
        data / "server.crt",
        data / "server.key",
        {"ssl_cert_file": str(data / "server.crt"), "ssl_key_file": str(data / "server.key")},
    )


def step3_install_files(params: Params) -> InstallStepResult:
    """Plan and make the installs: key and certificate where the server's settings point,
    ``root.crt`` for each client OS user. Preflight first; backups of all that is replaced."""
    from pgtls_helpers.clients import plan_root_crt, resolve_client_users
    from pgtls_helpers.findings import check_chain

    certs, root = _load_bundle(params)
    leaf = certs[0]
    wd = params.work
    key_path = wd / KEY_NAME
    with _server(params) as server:
        facts = server.facts()
    _check_pgdata(params, facts)
    owner = facts.data_directory_owner or (os.geteuid(), os.getegid())

    cert_target, installed_key, _ = ssl_targets(facts)
    # the key: from the work directory, or already installed by an earlier run
    key_bytes: bytes | None = key_path.read_bytes() if key_path.exists() else None
    if key_bytes is None:
        if installed_key.exists() and keys.public_key_matches(
            keys.load_key(
                installed_key.read_bytes(),
                _passphrase_or_none(params, installed_key),
                source=str(installed_key),
                validate=False,
            ),
            leaf,
        ):
            key_bytes = installed_key.read_bytes()
        else:
            raise PreflightError(
                f"{key_path}: the private key for this change is gone (it is removed once "
                "installed); start a new change from step 1"
            )
    encrypted = keys.is_encrypted_pem(key_bytes)
    # Only the public halves are compared here, as the server's own check does; a key whose
    # private half were damaged fails the handshake in step 4, which then rolls back.
    key = keys.load_key(
        key_bytes,
        _passphrase(params) if encrypted else None,
        source=str(key_path),
        validate=False,
    )
    result = chainmod.order_chain([*certs, *([root] if root else [])], leaf=leaf)
    preflight = check_chain(result, key=key, hosts=params.hosts)
    del key
    if encrypted and not facts.ssl_passphrase_command:
        preflight.append(
            Finding(
                "error",
                "encrypted-key",
                f"{key_path.name} is encrypted but ssl_passphrase_command is not set, so the "
                "server could not read it at reload or restart; set ssl_passphrase_command, or "
                "generate the key without a passphrase",
            )
        )
    # keep a root-owned 0640 key scheme (Debian's ssl-cert group) when that is what is there
    key_owner, key_mode = owner, 0o600
    if installed_key.exists():
        st = installed_key.stat()
        if st.st_uid == 0 and (st.st_mode & 0o777) == 0o640:
            key_owner, key_mode = (0, st.st_gid), 0o640
    server_uid = owner[0]
    if problem := files.key_file_problem(key_mode, key_owner[0], key_owner[1], server_uid):
        preflight.append(
            Finding(
                "error", "key-permissions", f"{installed_key} {problem}; the server would refuse it"
            )
        )
    plan = [
        files.plan_file(installed_key, key_bytes, kind="key", mode=key_mode, owner=key_owner),
        files.plan_file(
            cert_target,
            chainmod.bundle_pem(result),
            kind="certificate",
            mode=0o644,
            owner=owner,
        ),
    ]
    users = resolve_client_users(params.client_system_users)
    if users and root is None:
        preflight.append(
            Finding(
                "error", "missing-issuer", "the chain has no root certificate to give the clients"
            )
        )
    if root is not None:
        plan += [plan_root_crt(u, _pem(root), merge=params.client_root_merge) for u in users]
    rows = [p.describe() for p in plan]
    errors = [f for f in preflight if f.severity == "error"]
    out_facts = facts.as_dict()
    if errors:
        res = InstallStepResult(out_facts, rows, preflight, None, False)
        save_step(params, "03_install_files", res.summary())
        raise PreflightError(
            "nothing was installed: " + "; ".join(f"{f.code}: {f.message}" for f in errors)
        )
    if not params.apply:
        res = InstallStepResult(out_facts, rows, preflight, None, False)
        save_step(params, "03_install_files", res.summary())
        return res
    from pgtls_helpers.clients import install_root_crt

    stamp = files.utc_stamp()
    server_part = files.apply_plan(plan[:2], stamp=stamp)
    try:
        client_part = (
            install_root_crt(users, _pem(root), merge=params.client_root_merge, stamp=stamp)
            if root and users
            else files.InstallResult(())
        )
    except BaseException:
        files.rollback(server_part)
        raise
    installed = files.InstallResult(server_part.installed + client_part.installed)
    if installed.changed or not (wd / INSTALL_JOURNAL).exists():
        # a run that changed nothing must not replace the journal of the one that did
        files.save_journal(installed, wd / INSTALL_JOURNAL)
    # After the install the only copies of the key are the installed one and its backup.
    if key_path.exists():
        key_path.unlink()
    _save_state(
        params,
        installed_cert_sha256=files.sha256_hex(chainmod.bundle_pem(result)),
        key_file=str(installed_key),
        cert_file=str(cert_target),
    )
    res = InstallStepResult(out_facts, rows, preflight, installed, True)
    save_step(params, "03_install_files", res.summary())
    return res


def _passphrase_or_none(params: Params, path: Path) -> bytes | None:
    return _passphrase(params) if keys.is_encrypted_pem(path.read_bytes()) else None


# --------------------------------------------------------------------------- step 4


@dataclass(frozen=True)
class EnableResult:
    """Step 4: SSL on, pg_hba.conf changed, and the proof from outside."""

    ssl_before: bool
    ssl_after: bool
    hba_diff: str
    hba_added: tuple[str, ...]
    reloaded: bool
    presented: list[dict[str, str]]
    tls_version: str | None
    confirmed: bool
    changed: bool
    applied: bool
    messages: list[str] = field(default_factory=list)
    installed: list[dict[str, object]] = field(default_factory=list)
    runbook_connection: str | None = None  # pg_stat_ssl of a new connection afterwards

    def summary(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _expected_leaf(params: Params) -> x509.Certificate:
    certs, _ = _load_bundle(params)
    return certs[0]


def _probe_until(host: str, port: int, want_sha: str, timeout: float = 15.0) -> Any:
    from pgtls_helpers.probe import probe

    deadline = time.monotonic() + timeout
    result = probe(host, port, timeout=5.0)
    while time.monotonic() < deadline:
        if result.error is None and result.chain and _fp(result.chain[0]) == want_sha:
            return result
        time.sleep(0.1)
        result = probe(host, port, timeout=5.0)
    return result


_LOG_PATTERNS = (
    "could not load",
    "private key file",
    "SSL configuration was not reloaded",
    "pg_hba.conf was not reloaded",
    "FATAL",
)


def _log_offset(params: Params) -> int:
    try:
        return Path(params.server_log_file).stat().st_size if params.server_log_file else 0
    except OSError:
        return 0


def _server_log_line(params: Params, server: Any, since: int = 0) -> str | None:
    """What the server logged about the failure: the cause and its verdict, in order."""
    lines: list[str] = []
    if params.server_log_file:
        try:
            with open(params.server_log_file, "rb") as fh:
                fh.seek(since)
                lines = fh.read().decode(errors="replace").splitlines()
        except OSError:
            lines = []
    if not lines:
        for pattern in _LOG_PATTERNS:
            try:
                found = server.log_tail(pattern)
            except PgtlsError:
                found = None
            if found:
                lines.append(str(found))
    hits = [ln.strip() for ln in lines if any(p in ln for p in _LOG_PATTERNS)]
    return " / ".join(dict.fromkeys(hits[-3:])) or None


def step4_enable_ssl(params: Params) -> EnableResult:
    """``ssl = on``, the pg_hba.conf rules, and proof that the server presents the new chain.

    Order matters, because one reload applies everything at once: the pg_hba.conf text is
    checked by the server itself (``pg_hba_file_rules``) before anything is reloaded; then SSL
    is turned on and confirmed from outside; only then is pg_hba.conf written and reloaded, so
    a certificate the server cannot load never leaves it with TLS-only rules and no TLS. Any
    failure rolls back this step's settings, pg_hba.conf and the files of step 3, and reloads.
    The whole step runs on one connection opened before any change, so a rollback never needs
    a new login.
    """
    expected = _expected_leaf(params)
    want_sha = _fp(expected)
    rules = hba.parse_rules(list(params.hba_rules))
    host_ip = _address(params.server_host)
    from pgtls_helpers.probe import probe

    server = _server(params)
    try:
        facts = server.facts()
        hba_text = facts.hba_file.read_text()
        plan = hba.plan_hba(
            hba_text,
            rules,
            reject_non_ssl=params.reject_non_ssl,
            path=str(facts.hba_file),
            label=f"pgtls {params.change_id}",
        )
        before = probe(host_ip, params.server_port, timeout=5.0) if facts.ssl else None
        serving_new = bool(
            before and before.error is None and before.chain and _fp(before.chain[0]) == want_sha
        )
        settings = {} if facts.ssl else {"ssl": "on"}
        settings.update(ssl_targets(facts)[2])
        needs_ssl = bool(settings) or not serving_new
        planned = [
            f"ALTER SYSTEM SET {name} = '{value}' (now: "
            f"'{'off' if name == 'ssl' else facts.as_dict().get(name, '')}')"
            for name, value in settings.items()
        ]
        if not params.apply or not (needs_ssl or plan.changed):
            nothing = not (needs_ssl or plan.changed)
            res = EnableResult(
                facts.ssl,
                facts.ssl,
                plan.diff(),
                plan.added,
                False,
                _chain_rows(before) if before else [],
                before.tls_version if before else None,
                confirmed=nothing,
                changed=False,
                applied=params.apply,
                messages=[
                    "nothing to change: SSL is on, pg_hba.conf has the rules and the "
                    "server presents the new certificate"
                ]
                if nothing
                else ["plan only (apply: false): nothing was changed", *planned],
            )
            save_step(params, "04_enable_ssl", res.summary())
            return res

        stamp = files.utc_stamp()
        hba_st = facts.hba_file.stat()
        hba_mode, hba_owner = hba_st.st_mode & 0o777, (hba_st.st_uid, hba_st.st_gid)
        if plan.changed:
            _validate_hba(server, facts, plan, hba_mode, hba_owner, stamp)

        log_at = _log_offset(params)
        undo = _Undo(params, server, {name: server.auto_conf_value(name) for name in settings})
        after = before
        settings_write = files.InstallResult(())
        if needs_ssl:
            if settings:

                def alter() -> None:
                    for name, value in settings.items():
                        server.alter_system(name, value)

                auto_conf = _auto_conf_change(facts, stamp, alter)
                if auto_conf is not None:
                    settings_write = files.InstallResult((auto_conf,))
            setting_errors = server.file_setting_errors()
            if setting_errors:
                undo.run(reload=False)
                raise PreflightError(
                    f"configuration errors: {'; '.join(setting_errors)}; "
                    "the setting was restored and nothing was reloaded"
                )
            server.reload_and_wait()
            after = _probe_until(host_ip, params.server_port, want_sha, timeout=2.0)
            if not (
                after.error is None
                and after.chain
                and _fp(after.chain[0]) == want_sha
                and _chain_matches_bundle(params, after)
            ):
                undo.run()
                seen = after.error or (
                    f"it presents {after.chain[0].subject.rfc4514_string()} "
                    f"({_fp(after.chain[0])[:16]}…), not the new certificate"
                    if after.chain
                    else "no certificate"
                )
                line = _server_log_line(params, server, log_at)
                raise ServerError(
                    f"{params.server_host}:{params.server_port} did not take the new "
                    f"certificate ({seen}); files and settings were rolled back and the server "
                    "reloaded" + (f"; the server log says: {line}" if line else "")
                )

        hba_write = files.InstallResult(())
        if plan.changed:
            hba_write = files.apply_plan(
                [
                    files.plan_file(
                        facts.hba_file,
                        plan.after.encode(),
                        kind="hba",
                        mode=hba_mode,
                        owner=hba_owner,
                    )
                ],
                stamp=stamp,
            )
            undo.hba = hba_write
            problems = server.hba_errors()
            if not problems:
                server.reload_and_wait()
                problems = _hba_errors_after_reload(params)
            if problems:
                undo.run()
                raise ServerError(
                    f"{facts.hba_file}: {'; '.join(problems)}; pg_hba.conf, settings and files "
                    "were rolled back and the server reloaded"
                )
        assert after is not None
        own = _runbook_tls(params)
        res = EnableResult(
            facts.ssl,
            True,
            plan.diff(),
            plan.added,
            True,
            _chain_rows(after),
            after.tls_version,
            confirmed=True,
            changed=True,
            applied=True,
            messages=planned,
            installed=settings_write.as_dicts() + hba_write.as_dicts(),
            runbook_connection=own,
        )
        _save_state(params, enabled=True, presented_sha256=want_sha)
        _save_enable_journal(params, undo.previous, settings_write, hba_write)
        save_step(params, "04_enable_ssl", res.summary())
        return res
    finally:
        server.close()


def _save_enable_journal(
    params: Params,
    previous: dict[str, str | None],
    settings_write: files.InstallResult,
    hba_write: files.InstallResult,
) -> None:
    """What step 4 changed, for a back-out days later: settings' old values, file backups."""
    path = params.work / ENABLE_JOURNAL
    journal = {
        "settings_previous": previous,
        "files": settings_write.as_dicts() + hba_write.as_dicts(),
    }
    files.atomic_write(path, (json.dumps(journal, indent=2) + "\n").encode(), mode=0o600)


@dataclass(frozen=True)
class RollbackResult:
    """What a back-out restored, and how the server answers afterwards."""

    restored: list[str]
    settings: dict[str, str | None]
    ssl_after: bool
    presented: list[dict[str, str]]

    def summary(self) -> dict[str, Any]:
        return dict(self.__dict__)


def rollback_change(params: Params) -> RollbackResult:
    """Back out a completed (or half-done) change: pg_hba.conf and the settings step 4 changed,
    the files step 3 installed, each put back from its backup (bytes, owner, mode); then one
    reload. The installed key goes back to the work directory, so the change can be redone
    without a new CSR. Raises :class:`PreflightError` when there is nothing to back out.
    """
    from pgtls_helpers.probe import probe

    enable_path = params.work / ENABLE_JOURNAL
    install_path = params.work / INSTALL_JOURNAL
    if not enable_path.exists() and not install_path.exists():
        raise PreflightError(
            f"{params.work}: no install or enable journal for change {params.change_id}; "
            "nothing was applied, or it was already rolled back"
        )
    restored: list[str] = []
    previous: dict[str, str | None] = {}
    stamp = files.utc_stamp()
    with _server(params) as server:
        if enable_path.exists():
            journal = json.loads(enable_path.read_text())
            previous = dict(journal["settings_previous"])
            hba_items = [
                files.Installed.from_dict(i) for i in journal["files"] if i["kind"] == "hba"
            ]
            restored += [str(p) for p in files.rollback(hba_items)]
            for name, value in previous.items():
                server.alter_system(name, value)
            enable_path.rename(enable_path.with_name(f"enable.rolled-back-{stamp}.json"))
        if install_path.exists():
            installed = files.load_journal(install_path)
            _keep_key_for_retry(params, installed)
            restored += [str(p) for p in files.rollback(installed)]
            install_path.rename(install_path.with_name(f"install.rolled-back-{stamp}.json"))
        server.reload_and_wait()
        ssl_after = server.facts().ssl
    after = probe(_address(params.server_host), params.server_port, timeout=5.0)
    _save_state(params, enabled=False, rolled_back=stamp)
    res = RollbackResult(restored, previous, ssl_after, _chain_rows(after) if after.ok else [])
    save_step(params, "rollback", res.summary())
    return res


def _runbook_tls(params: Params) -> str | None:
    """What ``pg_stat_ssl`` says of a new connection of the runbook's own, after the change."""
    try:
        with _server(params) as fresh:
            status = fresh.ssl_status()
    except PgtlsError:
        return None
    if not status.ssl:
        return "no TLS"
    return f"{status.version} {status.cipher} ({status.bits} bits)"


def _auto_conf_change(facts: Any, stamp: str, change: Any) -> files.Installed | None:
    """Run an ``ALTER SYSTEM`` with a backup of ``postgresql.auto.conf`` taken first.

    ``ALTER SYSTEM RESET`` undoes the setting; the backup is for the reviewer and for a DBA
    who wants the file back byte for byte. None when the file is not readable from here.
    """
    path = Path(facts.data_directory) / "postgresql.auto.conf"
    try:
        before = path.read_bytes()
        backup = files.backup_copy(path, stamp)
    except OSError:
        change()
        return None
    change()
    after = path.read_bytes()
    return files.Installed(
        path, "other", "replace", files.sha256_hex(after), files.sha256_hex(before), backup
    )


def _validate_hba(
    server: Any, facts: Any, plan: hba.HbaPlan, mode: int, owner: tuple[int, int], stamp: str
) -> None:
    """Let the server parse the planned pg_hba.conf, then put the current one back.

    While SSL is off the server reports every hostssl line as "cannot match" and parses no
    further, which would hide a bad option; so our new lines are checked as host lines then.
    No reload happens in between: the running server never sees this text.
    """
    check_text = plan.after if facts.ssl else _as_host_lines(plan)
    trial = files.apply_plan(
        [files.plan_file(facts.hba_file, check_text.encode(), kind="hba", mode=mode, owner=owner)],
        stamp=stamp,
    )
    try:
        problems = [
            e for e in server.hba_errors() if not (not facts.ssl and "because SSL is disabled" in e)
        ]
    finally:
        files.rollback(trial)
        for item in trial.installed:
            if item.backup is not None:
                item.backup.unlink(missing_ok=True)
    if problems:
        raise PreflightError(
            f"{facts.hba_file}: the server would reject {'; '.join(problems)}; the file was "
            "left as it was and nothing was reloaded"
        )


class _Undo:
    """Everything step 4 changed, and step 3's files, undone on the one open connection."""

    def __init__(self, params: Params, server: Any, previous: dict[str, str | None]):
        """``previous``: each setting step 4 changes, and its value in postgresql.auto.conf
        before (None: not set there, so RESET)."""
        self.params, self.server, self.previous = params, server, previous
        self.hba: files.InstallResult = files.InstallResult(())

    def run(self, *, reload: bool = True) -> None:
        files.rollback(self.hba)
        journal = self.params.work / INSTALL_JOURNAL
        if journal.exists():
            installed = files.load_journal(journal)
            _keep_key_for_retry(self.params, installed)
            files.rollback(installed)
            journal.rename(journal.with_name(f"install.rolled-back-{files.utc_stamp()}.json"))
        for name, value in self.previous.items():
            self.server.alter_system(name, value)
        if reload:
            self.server.reload_and_wait()


def _keep_key_for_retry(params: Params, installed: files.InstallResult) -> None:
    """Before a rollback overwrites the new key, move it back to the work directory, so that a
    retry needs no new CSR and the key still exists in one place only."""
    work_key = params.work / KEY_NAME
    for item in installed.installed:
        if item.kind == "key" and item.action != "unchanged" and not work_key.exists():
            try:
                data = item.target.read_bytes()
            except OSError:
                continue
            keys.write_private_key(work_key, data)


def _as_host_lines(plan: hba.HbaPlan) -> str:
    added = set(plan.added)
    return "".join(
        ("host   " + line[len("hostssl") :])
        if line.rstrip("\n") in added and line.startswith("hostssl")
        else line
        for line in plan.after.splitlines(keepends=True)
    )


def _hba_errors_after_reload(params: Params) -> list[str]:
    """pg_hba.conf errors as seen by a new connection (which needs the new rules)."""
    try:
        with _server(params) as fresh:
            return [str(e) for e in fresh.hba_errors()]
    except PgtlsError as exc:
        return [str(exc)]


def _chain_rows(result: Any) -> list[dict[str, str]]:
    from pgtls_helpers.probe import chain_rows

    return chain_rows(result)


def _chain_matches_bundle(params: Params, presented: Any) -> bool:
    certs, _ = _load_bundle(params)
    return [_fp(c) for c in presented.chain] == [_fp(c) for c in certs]


def _address(host: str) -> str:
    try:
        return str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
    except socket.gaierror:
        raise InputError(
            f"server_host '{host}' does not resolve; use a name this machine can "
            "resolve, or an IP address"
        ) from None


# --------------------------------------------------------------------------- step 5


@dataclass(frozen=True)
class VerifyResult:
    """Step 5: every connection check, expected against observed, and the verdict."""

    checks: list[Any]
    verdict: str

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    def summary(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "checks": [c.as_dict() for c in self.checks]}


def step5_verify_clients(params: Params) -> VerifyResult:
    """Connect through libpq each way that matters; the ones that must fail must fail for the
    right reason. Also runs ``psql`` as each client OS user with only its ``root.crt``."""
    from pgtls_helpers.clients import connection_checks, psql_as_user, resolve_client_users
    from pgtls_helpers.lab import LabCA

    wd = params.work
    root_crt = wd / "root.crt"
    if not root_crt.exists():
        raise PreflightError(f"{root_crt}: no root certificate for this change; run step 2")
    unrelated = wd / "unrelated-root.crt"
    files.atomic_write(
        unrelated, _pem(LabCA.create(root_name="Unrelated Root CA").root), mode=0o644
    )
    info = params.conninfo()
    if passfile := os.environ.get("PGPASSFILE"):
        info["passfile"] = passfile
    hostaddr = _address(params.server_host)
    checks = connection_checks(
        info,
        hosts=params.hosts,
        hostaddr=hostaddr,
        root_crt=root_crt,
        unrelated_root=unrelated,
        reject_non_ssl=params.reject_non_ssl,
    )
    for user in resolve_client_users(params.client_system_users):
        checks.append(psql_as_user(user, info, host=params.hosts[0], hostaddr=hostaddr))
    verdict = "pass" if all(c.passed for c in checks) else "fail"
    res = VerifyResult(checks, verdict)
    save_step(params, "05_verify_clients", res.summary())
    return res
