"""Step 2: read what the CA returned, order the chain and check it against our key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgtls_helpers.errors import PreflightError
from pgtls_helpers.pki import chain as chainmod
from pgtls_helpers.pki import keys
from pgtls_helpers.pki.csr import spki_sha256
from pgtls_helpers.pki.findings import Finding, reasons
from pgtls_helpers.postgres import files
from pgtls_helpers.runbook.common import (
    ADD_TO_CA_FILES,
    fingerprint_of,
    pem_of,
    rfc4514,
    save_step,
)
from pgtls_helpers.runbook.params import Params

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
    signed_by: tuple[str, str | None] | None = None  # a CA back-end's name and reference

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def summary(self) -> dict[str, Any]:
        return {
            "sources": self.sources,
            "chain": [
                {
                    "role": r,
                    "subject": rfc4514(c.subject),
                    "issuer": rfc4514(c.issuer),
                    "sha256": fingerprint_of(c),
                    "not_after": c.not_valid_after_utc.isoformat(),
                    "names": chainmod.names_of(c) if r == "leaf" else [],
                }
                for c, r in zip(self.chain.path, self.chain.roles, strict=True)
            ],
            "unused": [fingerprint_of(c) for c in self.chain.unused],
            "findings": [f.__dict__ for f in self.findings],
            "verifier": _verifier() if self.chain.complete else None,
            "notes": self.notes,
            "bundle_sha256": files.sha256_hex(self.bundle_path.read_bytes()),
            "signed_by": self.signed_by[0] if self.signed_by else None,
            "ca_reference": self.signed_by[1] if self.signed_by else None,
        }


def _verifier() -> str:
    """Who decided the trust verdict: the OpenSSL libpq uses, as libpq verifies."""
    from pgtls_helpers.pki import openssl

    return f"{openssl.openssl_name()}, as libpq verifies (X509_verify_cert, ssl_server)"


def _lab_sign(params: Params, csr_path: Path, ca_dir: Path) -> list[Path]:
    from pgtls_helpers.lab import LabCA
    from pgtls_helpers.pki.csr import load_csr

    csr = load_csr(csr_path.read_bytes(), source=str(csr_path))
    want = spki_sha256(csr.public_key())
    if ca_dir.is_dir():
        from pgtls_helpers.pki.intake import read_ca_response

        existing = read_ca_response([ca_dir])
        if any(spki_sha256(s.cert.public_key()) == want for s in existing.certificates):
            return sorted(ca_dir.iterdir())
    ca = LabCA.load_or_create(params.work.shared_lab_ca)
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
    from pgtls_helpers.pki.findings import check_chain
    from pgtls_helpers.pki.intake import read_ca_response

    wd = params.work
    wd.create()
    csr_path = wd.csr
    if not csr_path.exists():
        raise PreflightError(
            f"{csr_path}: no CSR for change {params.change_id}; run step 1 (01_key_and_csr) first"
        )
    signed_by: tuple[str, str | None] | None = None  # a CA back-end: who, and its serial
    if params.ca_mode == "lab":
        paths: list[Path] = _lab_sign(params, csr_path, wd.lab_ca)
    elif params.ca_mode not in ("files", "lab"):
        from pgtls_helpers.runbook.ca_sign import sign_with_backend

        signed = sign_with_backend(params, csr_path)
        paths, signed_by = list(signed.files), (signed.ca, signed.reference)
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
    from pgtls_helpers.pki.csr import load_csr

    csr = load_csr(csr_path.read_bytes(), source=str(csr_path))
    want = spki_sha256(csr.public_key())
    leaf = next((c for c in certs if spki_sha256(c.public_key()) == want), None)
    if leaf is None:
        raise PreflightError(
            f"none of the CA's files ({', '.join(p.name for p in paths)}) holds a certificate "
            f"for the key behind {csr_path.name}; was this CSR the one submitted?"
        )
    result = chainmod.order_chain(certs, leaf=leaf)
    findings = check_chain(result, key=csr.public_key(), hosts=params.hosts, add=ADD_TO_CA_FILES)
    notes = [
        *intake.private_keys,
        *(f"{d}: duplicate, ignored" for d in intake.duplicates),
        *intake.skipped,
    ]
    bundle = wd.bundle
    root_path: Path | None = wd.root
    files.atomic_write(bundle, chainmod.bundle_pem(result), mode=0o644)
    if result.root is not None and root_path is not None:
        files.atomic_write(root_path, pem_of(result.root), mode=0o644)
    else:
        root_path = None
    out = CaResponseResult(
        [str(p) for p in paths], result, findings, notes, bundle, root_path, signed_by
    )
    save_step(params, "02_ca_response", out.summary())
    if out.errors and check:
        raise PreflightError(f"the CA's response is not usable: {reasons(out.errors)}")
    return out
