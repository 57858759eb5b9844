"""Step 1: the server's private key and the certificate signing request."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from pgtls_helpers.errors import InputError, PreflightError
from pgtls_helpers.pki import keys
from pgtls_helpers.pki.csr import spki_sha256
from pgtls_helpers.pki.subject import SUBJECT_FIELDS, Subject
from pgtls_helpers.postgres import files, keyfiles
from pgtls_helpers.runbook.common import (
    key_passphrase,
    save_step,
)
from pgtls_helpers.runbook.params import Params

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


def subject_of(params: Params) -> Subject:
    """The subject the CSR of ``params`` carries (:attr:`Params.subject`)."""
    return params.subject


def step1_key_and_csr(params: Params) -> KeyCsrResult:
    """Generate the server key (0600 from its first byte) and the CSR to send to the CA.

    A CSR already in the work directory for the same subject is reused, so running the step
    again never replaces a key whose CSR is already with the CA.
    """
    from pgtls_helpers.pki.csr import build_csr, csr_pem, load_csr, render_csr
    from pgtls_helpers.runbook.renewal import inherit_names

    params = inherit_names(params)  # renewal: names the parameters leave empty, as installed
    subject = subject_of(params)
    params.work.create()
    key_path, csr_path = params.work.key, params.work.csr
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
        if have != want and not params.reuse_key:
            raise PreflightError(
                f"{csr_path}: the CSR already made for this change has an {have} key, not "
                f"{want}; set key_type back, or use a new change_id for a new key"
            )
        reused = True
    if not reused and params.reuse_key:  # renewal: the CA re-signs the installed key
        from pgtls_helpers.runbook.renewal import installed_key

        key = installed_key(params)
        files.atomic_write(csr_path, csr_pem(build_csr(subject, key)), mode=0o644)
        csr = load_csr(csr_path.read_bytes(), source=str(csr_path))
        del key
    elif not reused:
        key = keys.generate_key(params.key_type)
        csr = build_csr(subject, key)
        keyfiles.write_private_key(key_path, keys.serialize_key(key, key_passphrase(params)))
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


# --------------------------------------------------------------------------- the chosen names

# What the CSR form chooses; saved in the change's work directory when "Use these values" is
# pressed, so the choice outlives the kernel and every later notebook can see it. The keys of
# subject.json: the fields of SUBJECT_FIELDS, the SANs after the CN, and the key type.
SAVED_FIELDS = (
    "common_name",
    "subject_alt_names",
    *(f.name for f in SUBJECT_FIELDS if f.name != "common_name"),
    "key_type",
)


def save_subject(params: Params) -> Path:
    """Write the subject and key type of ``params`` to ``subject.json`` in the work directory."""
    params.work.create()
    values = {name: getattr(params, name) for name in SAVED_FIELDS}
    values["subject_alt_names"] = list(params.subject_alt_names)
    data = (json.dumps(values, indent=2) + "\n").encode()
    files.atomic_write(params.work.subject, data, mode=0o644)
    return params.work.subject


def saved_subject(params: Params) -> Params | None:
    """``params`` with the subject saved by the form for this change, or None when none was.

    Raises:
        InputError: ``subject.json`` is not what :func:`save_subject` writes.
    """
    path = params.work.subject
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InputError(
            f"{path}: not a subject saved by the CSR form ({exc}); delete it and press "
            '"Use these values" again'
        ) from None
    if not isinstance(values, dict) or set(values) - set(SAVED_FIELDS):
        raise InputError(
            f"{path}: not a subject saved by the CSR form; delete it and press "
            '"Use these values" again'
        )
    from pgtls_helpers.runbook.params import load_params

    plain = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
    # load_params checks the subject as the form does
    return load_params({**plain, **values}, source=str(path))


def names_from_csr(params: Params) -> Params:
    """``params`` with the common name and SANs of the CSR this change actually made.

    Steps 2 to 5 use these, so a name changed in the form (or anywhere after the parameters
    were written) reaches every later step, and ``verify_hosts``, when not set, follows them.
    Without a CSR yet, ``params`` are returned as they are.
    """
    path = params.work.csr
    if not path.exists():
        return params
    from pgtls_helpers.pki.csr import load_csr

    csr = load_csr(path.read_bytes(), source=str(path))
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns:
        return params
    cn = str(cns[0].value)
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = [str(g.value) for g in ext if isinstance(g, x509.DNSName | x509.IPAddress)]
    except x509.ExtensionNotFound:
        sans = []
    others = tuple(n for n in sans if n.lower() != cn.lower())
    try:
        made = subject_of(params).alt_names()
    except InputError:
        made = ()
    if cn == params.common_name and others == tuple(n for n in made if n.lower() != cn.lower()):
        return params  # the CSR was made from these parameters
    return dataclasses.replace(params, common_name=cn, subject_alt_names=others)
