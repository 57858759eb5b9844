"""The lab CA: a throwaway CA shaped like the article's.

root → ``IntermediateCA_BAR`` → ``IntermediateCA_FOO`` → server or client; it hands back the files
a real CA would (``SERVER-FQDN.crt``, the two intermediates, ``RootCA.crt``).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pgtls_helpers.errors import InputError

CAKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _name(cn: str, ou: str | None = None) -> x509.Name:
    attrs = [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pgtls lab CA"),
    ]
    if ou:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _ca_key() -> ec.EllipticCurvePrivateKey:
    # CA keys are ECDSA P-256: a lab CA is made per run and RSA 4096 generation costs seconds.
    return ec.generate_private_key(ec.SECP256R1())


def _builder_common(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: object,
    issuer_key: CAKey,
    *,
    not_before: datetime,
    not_after: datetime,
    key_ids: bool = True,
) -> x509.CertificateBuilder:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if not key_ids:  # the minimal profile: no subject or authority key identifier
        return builder
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)  # type: ignore[arg-type]
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
    return builder.add_extension(ski, critical=False).add_extension(aki, critical=False)


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _server_usage(public_key: object) -> x509.KeyUsage:
    is_rsa = isinstance(public_key, rsa.RSAPublicKey)
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=is_rsa,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _client_usage() -> x509.KeyUsage:
    # a TLS client signs the handshake (TLS 1.3, and ECDHE with either key type): nothing else
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def pem_of(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, repr=False)
class LabCA:
    """A throwaway CA: root → IntermediateCA_BAR → IntermediateCA_FOO.

    Build one with :meth:`create`; the keys stay in memory and are never written anywhere.
    """

    root: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]  # signing order: FOO (signs leaves), BAR
    _signer_key: CAKey
    _keys: tuple[CAKey, ...] = field(default=())
    #: the minimal-extension profile many own CAs produce (``openssl req -x509`` with OpenSSL
    #: 3.0's defaults, hand-written extension files, appliances): a root with basicConstraints
    #: only, no key identifiers anywhere, leaves with nothing but their subjectAltName
    minimal: bool = False

    def __repr__(self) -> str:
        return f"LabCA(root={self.root.subject.rfc4514_string()!r})"

    @classmethod
    def create(
        cls,
        names: Sequence[str] = ("IntermediateCA_BAR", "IntermediateCA_FOO"),
        *,
        root_name: str = "RootCA",
        days: int = 3650,
        minimal: bool = False,
    ) -> LabCA:
        """Create a root and a line of intermediates, each signing the next (``minimal``: the
        minimal-extension profile, see :attr:`minimal`)."""
        now = datetime.now(timezone.utc) - timedelta(minutes=5)
        root_key = _ca_key()
        root_subject = _name(root_name)
        root_builder = _builder_common(
            root_subject,
            root_subject,
            root_key.public_key(),
            root_key,
            not_before=now,
            not_after=now + timedelta(days=days),
            key_ids=not minimal,
        ).add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=not minimal)
        if not minimal:
            root_builder = root_builder.add_extension(_ca_usage(), critical=True)
        root = root_builder.sign(root_key, hashes.SHA256())
        made, made_keys = _intermediates(root, root_key, names, now=now, days=days, minimal=minimal)
        keys: list[CAKey] = [root_key, *made_keys]
        issuer_key = keys[-1]
        return cls(
            root=root,
            intermediates=tuple(reversed(made)),
            _signer_key=issuer_key,
            _keys=tuple(keys),
            minimal=minimal,
        )

    @property
    def signer(self) -> x509.Certificate:
        """The CA certificate that signs server certificates (IntermediateCA_FOO)."""
        return self.intermediates[0] if self.intermediates else self.root

    def sign_csr(
        self,
        csr: x509.CertificateSigningRequest,
        *,
        days: int = 397,
        not_before: datetime | None = None,
    ) -> x509.Certificate:
        """Sign a CSR into a server certificate: the CSR's SANs (or its CN), serverAuth."""
        if not csr.is_signature_valid:
            raise InputError("the CSR's signature does not verify; generate the CSR again")
        try:
            sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if not cns:
                raise InputError(
                    "the CSR has neither a common name nor subject alternative names; "
                    "give it the host name clients use"
                ) from None
            sans = x509.SubjectAlternativeName([_general_name(str(cns[0].value))])
        return self._issue(csr.subject, csr.public_key(), sans, days=days, not_before=not_before)

    def sign_client_csr(
        self,
        csr: x509.CertificateSigningRequest,
        *,
        days: int = 397,
        not_before: datetime | None = None,
        server_auth_only: bool = False,
    ) -> x509.Certificate:
        """Sign a CSR into a client certificate: the CSR's subject as it is, clientAuth.

        ``server_auth_only`` makes what a CA's wrong profile gives instead (extendedKeyUsage
        serverAuth alone), which the server refuses from a client, for tests.
        """
        if not csr.is_signature_valid:
            raise InputError("the CSR's signature does not verify; generate the CSR again")
        if not csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
            raise InputError("the CSR has no common name; give it the role the client logs in as")
        start = not_before or datetime.now(timezone.utc) - timedelta(minutes=5)
        eku = (
            ExtendedKeyUsageOID.SERVER_AUTH if server_auth_only else ExtendedKeyUsageOID.CLIENT_AUTH
        )
        public_key = csr.public_key()
        builder = (
            _builder_common(
                csr.subject,
                self.signer.subject,
                public_key,
                self._signer_key,
                not_before=start,
                not_after=start + timedelta(days=days),
                key_ids=not self.minimal,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_client_usage(), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        )
        return builder.sign(self._signer_key, hashes.SHA256())

    def sign_crl(
        self,
        *,
        last_update: datetime,
        next_update: datetime,
        revoked: Sequence[x509.Certificate] = (),
    ) -> x509.CertificateRevocationList:
        """A CRL from the CA that signs leaves (:attr:`signer`), revoking ``revoked``; dates
        in the past make the stale CRL a server refuses every client certificate for."""
        return _crl(self.signer, self._signer_key, last_update, next_update, revoked)

    def sign_crls(
        self,
        *,
        last_update: datetime,
        next_update: datetime,
        revoked: Sequence[x509.Certificate] = (),
    ) -> list[x509.CertificateRevocationList]:
        """A CRL from each CA of this one, root first, each revoking those of ``revoked`` it
        issued: PostgreSQL checks every certificate of a client's chain against a CRL of its
        issuer, so a CRL of the signer alone makes every client login fail. Needs a CA made
        by :meth:`create` in this process (only the signer's key is saved)."""
        cas = [self.root, *reversed(self.intermediates)]
        if len(self._keys) != len(cas):
            raise InputError("this lab CA was loaded from disk; only its signer's key is kept")
        return [
            _crl(ca, key, last_update, next_update, [c for c in revoked if c.issuer == ca.subject])
            for ca, key in zip(cas, self._keys, strict=True)
        ]

    def issue(
        self, hosts: Sequence[str], *, key_type: str = "ecdsa-p256", days: int = 397
    ) -> tuple[CAKey, x509.Certificate]:
        """Make a server key and certificate for ``hosts`` (first is the CN), for tests."""
        key: CAKey
        if key_type.startswith("rsa"):
            key = rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[3:]))
        else:
            key = _ca_key()
        sans = x509.SubjectAlternativeName([_general_name(h) for h in hosts])
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
        return key, self._issue(subject, key.public_key(), sans, days=days)

    def _issue(
        self,
        subject: x509.Name,
        public_key: object,
        sans: x509.SubjectAlternativeName,
        *,
        days: int,
        not_before: datetime | None = None,
    ) -> x509.Certificate:
        start = not_before or datetime.now(timezone.utc) - timedelta(minutes=5)
        builder = _builder_common(
            subject,
            self.signer.subject,
            public_key,
            self._signer_key,
            not_before=start,
            not_after=start + timedelta(days=days),
            key_ids=not self.minimal,
        ).add_extension(sans, critical=False)
        if not self.minimal:
            builder = (
                builder.add_extension(
                    x509.BasicConstraints(ca=False, path_length=None), critical=True
                )
                .add_extension(_server_usage(public_key), critical=True)
                .add_extension(
                    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
                )
            )
        return builder.sign(self._signer_key, hashes.SHA256())

    def response_files(self, leaf: x509.Certificate) -> dict[str, bytes]:
        """What a CA hands back, by file name, as in the article."""
        cns = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        leaf_name = f"{str(cns[0].value) if cns else 'SERVER-FQDN'}.crt"
        files = {leaf_name: pem_of(leaf)}
        for cert in self.intermediates:
            cn = str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
            files[f"{cn}.crt"] = pem_of(cert)
        files["RootCA.crt"] = pem_of(self.root)
        return files

    def write_response(self, leaf: x509.Certificate, directory: str | Path) -> list[Path]:
        """Write :meth:`response_files` into ``directory`` (created if missing)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name, data in self.response_files(leaf).items():
            path = out / name
            path.write_bytes(data)
            written.append(path)
        return written

    def with_new_intermediates(
        self, names: Sequence[str] = ("IntermediateCA_BAZ",), *, days: int = 3650
    ) -> LabCA:
        """The same root over a new line of intermediates (an intermediate change); needs a
        CA made by :meth:`create` in this process (the root key is never saved)."""
        if not self._keys:
            raise InputError("this lab CA was loaded from disk; its root key is not kept")
        now = datetime.now(timezone.utc) - timedelta(minutes=5)
        made, made_keys = _intermediates(
            self.root, self._keys[0], names, now=now, days=days, minimal=self.minimal
        )
        issuer_key = made_keys[-1] if made_keys else self._keys[0]
        return LabCA(
            root=self.root,
            intermediates=tuple(reversed(made)),
            _signer_key=issuer_key,
            _keys=(self._keys[0],),
            minimal=self.minimal,
        )

    # ------------------------------------------------------------------ once per work directory

    def save(self, directory: str | Path) -> Path:
        """Keep this CA in ``directory`` (0700): ``root.crt``, ``intermediates.crt`` and the
        signing key (``signer.key``, 0600 from its first byte), so later changes reuse it."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            os.fchmod(fd, 0o700)  # on the folder itself, never through a link put in its place
        finally:
            os.close(fd)
        key = self._signer_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = out / f".signer.key.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
        (out / "intermediates.crt").write_bytes(b"".join(pem_of(c) for c in self.intermediates))
        (out / "root.crt").write_bytes(pem_of(self.root))
        os.replace(tmp, out / "signer.key")
        return out

    @classmethod
    def load(cls, directory: str | Path) -> LabCA:
        """The CA :meth:`save` kept in ``directory``."""
        base = Path(directory)
        try:
            root = x509.load_pem_x509_certificate((base / "root.crt").read_bytes())
            chain_bytes = (base / "intermediates.crt").read_bytes()
            inters = tuple(x509.load_pem_x509_certificates(chain_bytes)) if chain_bytes else ()
            key = serialization.load_pem_private_key((base / "signer.key").read_bytes(), None)
        except (OSError, ValueError) as exc:
            raise InputError(
                f"{base}: not a lab CA directory ({exc}); remove it to start a new lab CA"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise InputError(f"{base}/signer.key: not an EC or RSA key")
        try:  # a root without keyUsage: the minimal profile, whose leaves stay minimal too
            root.extensions.get_extension_for_class(x509.KeyUsage)
            minimal = False
        except x509.ExtensionNotFound:
            minimal = True
        return cls(root=root, intermediates=inters, _signer_key=key, minimal=minimal)

    @classmethod
    def load_or_create(
        cls, directory: str | Path, *, root_name: str = "RootCA", minimal: bool = False
    ) -> LabCA:
        """The lab CA kept in ``directory``, made (and kept) on first use."""
        base = Path(directory)
        if (base / "signer.key").exists():
            return cls.load(base)
        ca = cls.create(root_name=root_name, minimal=minimal)
        ca.save(base)
        return ca


def _intermediates(
    issuer: x509.Certificate,
    issuer_key: CAKey,
    names: Sequence[str],
    *,
    now: datetime,
    days: int,
    minimal: bool = False,
) -> tuple[list[x509.Certificate], list[CAKey]]:
    """A line of intermediate CAs under ``issuer``, each signing the next, with their keys."""
    made: list[x509.Certificate] = []
    keys: list[CAKey] = []
    for name in names:
        key = _ca_key()
        cert = (
            _builder_common(
                _name(name),
                issuer.subject,
                key.public_key(),
                issuer_key,
                not_before=now,
                not_after=now + timedelta(days=days),
                key_ids=not minimal,
            )
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_ca_usage(), critical=True)
            .sign(issuer_key, hashes.SHA256())
        )
        made.append(cert)
        keys.append(key)
        issuer, issuer_key = cert, key
    return made, keys


def _crl(
    issuer: x509.Certificate,
    key: CAKey,
    last_update: datetime,
    next_update: datetime,
    revoked: Sequence[x509.Certificate],
) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(last_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(1), critical=False)
    )
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(last_update)
            .build()
        )
    return builder.sign(key, hashes.SHA256())


def _general_name(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)
