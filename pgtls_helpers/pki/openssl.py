"""The trust verdict as libpq reaches it: OpenSSL's own chain verification, in process.

libpq checks a server's chain with the OpenSSL it is linked with: ``X509_verify_cert`` with
the roots of ``root.crt`` as the only trust anchors, the certificates the server sent as
untrusted intermediates, the ``ssl_server`` purpose (the default of a client-side TLS
connection), and the security level of the OpenSSL configuration (Debian's sets level 2). It
then matches the host name by its own rules (:mod:`pgtls_helpers.pki.hostname`). The server,
for its part, loads ``server.crt`` with ``SSL_CTX_use_certificate_chain_file``, which refuses
a key or a signature below the same security level.

This module asks that same library, through :mod:`ctypes`, the same questions: no
reimplementation of X.509 path validation, and the answer of the OpenSSL build libpq uses (the
system's ``libcrypto.so.3`` by default; ``PGTLS_LIBPQ`` names another libpq, whose libcrypto is
then used, for a client that runs a libpq of its own). ``cryptography``'s bundled OpenSSL is a
different build (and its verifier a stricter RFC 5280 profile), so it is not asked for the
verdict.

>>> openssl_name().startswith("OpenSSL")
True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as _dt
import functools
import os
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

__all__ = ["Checked", "LoadProblem", "load_problem", "openssl_name", "security_level", "verify"]

LIBPQ_ENV = "PGTLS_LIBPQ"

_p = ctypes.c_void_p


@dataclass(frozen=True)
class Checked:
    """OpenSSL's verdict on one chain.

    Attributes:
        ok: ``X509_verify_cert`` accepted the chain.
        reason: OpenSSL's own words for the error (``unable to get local issuer
            certificate``), None when ok.
        code: the ``X509_V_ERR_*`` number (0 when ok).
        depth: the depth of the certificate the error is about (0: the leaf).
        subject: that certificate's subject, as OpenSSL saw it.
        verifier: which library decided (``OpenSSL 3.0.19 ... (libcrypto path)``).
    """

    ok: bool
    reason: str | None
    code: int
    depth: int
    subject: str | None
    verifier: str


@dataclass(frozen=True)
class LoadProblem:
    """Why a server would refuse to load the pair (``SSL_CTX_use_certificate`` and friends)."""

    depth: int
    reason: str


class _Lib:
    """The OpenSSL of one libpq (its libcrypto and libssl, found through the libpq's own
    handle), with the prototypes this module calls."""

    def __init__(self, handle: ctypes.CDLL, crypto_path: str):
        self.path = crypto_path
        self.crypto = self.ssl = handle
        for name, res, args in (
            ("d2i_X509", _p, [_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_long]),
            ("X509_free", None, [_p]),
            ("X509_STORE_new", _p, []),
            ("X509_STORE_free", None, [_p]),
            ("X509_STORE_add_cert", ctypes.c_int, [_p, _p]),
            ("OPENSSL_sk_new_null", _p, []),
            ("OPENSSL_sk_push", ctypes.c_int, [_p, _p]),
            ("OPENSSL_sk_free", None, [_p]),
            ("X509_STORE_CTX_new", _p, []),
            ("X509_STORE_CTX_free", None, [_p]),
            ("X509_STORE_CTX_init", ctypes.c_int, [_p, _p, _p, _p]),
            ("X509_STORE_CTX_set_default", ctypes.c_int, [_p, ctypes.c_char_p]),
            ("X509_STORE_CTX_get0_param", _p, [_p]),
            ("X509_VERIFY_PARAM_set_auth_level", None, [_p, ctypes.c_int]),
            ("X509_VERIFY_PARAM_set_time", None, [_p, ctypes.c_int64]),
            ("X509_verify_cert", ctypes.c_int, [_p]),
            ("X509_STORE_CTX_get_error", ctypes.c_int, [_p]),
            ("X509_STORE_CTX_get_error_depth", ctypes.c_int, [_p]),
            ("X509_STORE_CTX_get_current_cert", _p, [_p]),
            ("X509_verify_cert_error_string", ctypes.c_char_p, [ctypes.c_long]),
            ("X509_get_subject_name", _p, [_p]),
            ("X509_NAME_oneline", ctypes.c_char_p, [_p, ctypes.c_char_p, ctypes.c_int]),
            ("OpenSSL_version", ctypes.c_char_p, [ctypes.c_int]),
            ("ERR_get_error", ctypes.c_ulong, []),
            ("ERR_error_string_n", None, [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_size_t]),
            ("ERR_clear_error", None, []),
            ("TLS_client_method", _p, []),
            ("TLS_server_method", _p, []),
            ("SSL_CTX_new", _p, [_p]),
            ("SSL_CTX_free", None, [_p]),
            ("SSL_CTX_get_security_level", ctypes.c_int, [_p]),
            ("SSL_CTX_use_certificate", ctypes.c_int, [_p, _p]),
            ("SSL_CTX_ctrl", ctypes.c_long, [_p, ctypes.c_int, ctypes.c_long, _p]),
        ):
            fn = getattr(handle, name)
            fn.restype, fn.argtypes = res, args

    def x509(self, cert: x509.Certificate) -> int:
        der = cert.public_bytes(Encoding.DER)
        buf = ctypes.c_char_p(der)
        ptr = self.crypto.d2i_X509(None, ctypes.byref(buf), len(der))
        if not ptr:
            raise ValueError("OpenSSL cannot read the certificate")
        return int(ptr)

    def errors(self) -> str:
        """OpenSSL's error queue as one line (and the queue emptied)."""
        out = []
        buf = ctypes.create_string_buffer(256)
        while code := self.crypto.ERR_get_error():
            self.crypto.ERR_error_string_n(code, buf, len(buf))
            out.append(buf.value.decode(errors="replace").rsplit(":", 1)[-1])
        return "; ".join(dict.fromkeys(out)) or "no reason given"


def _libcrypto_of(library: str) -> str | None:
    """The libcrypto a library is linked with, as the dynamic loader resolves it."""
    try:
        out = subprocess.run(
            ["ldd", library], capture_output=True, text=True, check=False, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"^\s*libcrypto\.so\S*\s+=>\s+(\S+)", out, re.M)
    return found.group(1) if found else None


@functools.lru_cache(maxsize=4)
def _lib(crypto: str | None) -> _Lib:
    """The OpenSSL whose libcrypto is ``crypto`` (loaded first, by its path, so the libssl
    beside it binds to it), or the system libpq's when None."""
    if crypto:
        ctypes.CDLL(crypto)
        return _Lib(ctypes.CDLL(str(Path(crypto).with_name("libssl.so.3"))), crypto)
    for soname in ("libpq.so.5", "libssl.so.3"):  # by soname: no subprocess on the way
        try:
            handle = ctypes.CDLL(soname)
        except OSError:
            continue
        return _Lib(handle, _mapped("libcrypto.so") or "libcrypto.so.3")
    return _Lib(ctypes.CDLL(ctypes.util.find_library("ssl") or "libssl.so.3"), "libcrypto.so.3")


def _mapped(prefix: str) -> str | None:
    """The path of the library named ``prefix…`` this process has mapped (``/proc/self/maps``)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(None, 1)[-1]
                if "/" in path and os.path.basename(path).startswith(prefix):
                    return path
    except OSError:
        return None
    return None


@functools.lru_cache(maxsize=4)
def _other_crypto(libpq: str) -> str | None:
    """The libcrypto of ``PGTLS_LIBPQ`` when it is not the one this process uses (then the
    verdict is asked of a helper process that loads it), else None."""
    crypto = _libcrypto_of(libpq) if os.path.exists(libpq) else None
    if crypto is None:
        from pgtls_helpers.errors import InputError

        raise InputError(
            f"{LIBPQ_ENV}={libpq}: not a libpq linked with OpenSSL's libcrypto; name the "
            "libpq.so of the client whose verdict you want, or unset the variable"
        )
    here = _lib(None).path
    return None if os.path.realpath(crypto) == os.path.realpath(here) else crypto


def _current() -> _Lib:
    return _lib(os.environ.get(_CRYPTO_ENV) or None)


_CRYPTO_ENV = "PGTLS_OPENSSL_LIBCRYPTO"  # set for the helper process only


def _remote() -> str | None:
    libpq = os.environ.get(LIBPQ_ENV)
    if not libpq or os.environ.get(_CRYPTO_ENV):
        return None
    return _other_crypto(libpq)


def _ask(crypto: str, request: dict[str, object]) -> dict[str, object]:
    """One question to a helper process that uses the libcrypto ``crypto``."""
    import json
    import sys

    # the whole helper binds to that libcrypto (Python's own hashlib too), so nothing in it
    # loads the system's copy under the same soname first
    libdir = str(Path(crypto).parent)
    search = [libdir, *filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(":"))]
    env = {**os.environ, _CRYPTO_ENV: crypto, "LD_LIBRARY_PATH": ":".join(search)}
    proc = subprocess.run(
        [sys.executable, "-m", "pgtls_helpers.pki.openssl"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    if proc.returncode != 0:
        raise ValueError(f"the OpenSSL of {crypto} could not be asked: {proc.stderr[-300:]}")
    answer: dict[str, object] = json.loads(proc.stdout)
    return answer


def openssl_name() -> str:
    """``OpenSSL 3.0.19 27 Jan 2026 (/lib/x86_64-linux-gnu/libcrypto.so.3)``: who decides."""
    if crypto := _remote():
        return str(_ask(crypto, {"op": "name"})["name"])
    lib = _current()
    version = (lib.crypto.OpenSSL_version(0) or b"OpenSSL").decode()
    return f"{version} ({lib.path})"


@functools.lru_cache(maxsize=4)
def _security_level(path: str) -> int:
    lib = _current()
    ctx = lib.ssl.SSL_CTX_new(lib.ssl.TLS_client_method())
    if not ctx:
        return 1
    try:
        return int(lib.ssl.SSL_CTX_get_security_level(ctx))
    finally:
        lib.ssl.SSL_CTX_free(ctx)


def security_level() -> int:
    """The security level a libpq connection gets from this machine's OpenSSL configuration."""
    if crypto := _remote():
        return int(str(_ask(crypto, {"op": "level"})["level"]))
    return _security_level(_current().path)


def verify(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    *,
    at: _dt.datetime | None = None,
) -> Checked:
    """OpenSSL's verdict on the chain ``leaf`` + ``intermediates`` against ``roots`` (the
    whole of a ``root.crt``), as libpq gets it; ``at`` judges at another time than now."""
    if crypto := _remote():
        answer = _ask(
            crypto,
            {
                "op": "verify",
                "leaf": _b64(leaf),
                "intermediates": [_b64(c) for c in intermediates],
                "roots": [_b64(c) for c in roots],
                "at": at.timestamp() if at is not None else None,
            },
        )
        return Checked(**answer)  # type: ignore[arg-type]
    lib = _current()
    c = lib.crypto
    level = security_level()
    made: list[int] = []
    store = c.X509_STORE_new()
    stack = c.OPENSSL_sk_new_null()
    ctx = c.X509_STORE_CTX_new()
    try:
        for root in roots:
            ptr = lib.x509(root)
            made.append(ptr)
            c.X509_STORE_add_cert(store, ptr)  # a duplicate is refused harmlessly
        for cert in intermediates:
            ptr = lib.x509(cert)
            made.append(ptr)
            c.OPENSSL_sk_push(stack, ptr)
        target = lib.x509(leaf)
        made.append(target)
        if c.X509_STORE_CTX_init(ctx, store, target, stack) != 1:
            raise ValueError(f"OpenSSL cannot start a verification: {lib.errors()}")
        c.X509_STORE_CTX_set_default(ctx, b"ssl_server")
        param = c.X509_STORE_CTX_get0_param(ctx)
        c.X509_VERIFY_PARAM_set_auth_level(param, level)
        if at is not None:
            c.X509_VERIFY_PARAM_set_time(param, int(at.timestamp()))
        ok = c.X509_verify_cert(ctx) == 1
        code = int(c.X509_STORE_CTX_get_error(ctx))
        depth = int(c.X509_STORE_CTX_get_error_depth(ctx))
        subject = None
        current = c.X509_STORE_CTX_get_current_cert(ctx)
        if current and not ok:
            raw = c.X509_NAME_oneline(c.X509_get_subject_name(current), None, 0)
            subject = raw.decode(errors="replace") if raw else None
        reason = None if ok else (c.X509_verify_cert_error_string(code) or b"").decode()
        c.ERR_clear_error()
        return Checked(ok, reason, 0 if ok else code, depth, subject, openssl_name())
    finally:
        c.X509_STORE_CTX_free(ctx)
        c.OPENSSL_sk_free(stack)
        c.X509_STORE_free(store)  # frees the roots' references it took
        for ptr in made:
            c.X509_free(ptr)


_SSL_CTRL_CHAIN_CERT = 89  # SSL_CTX_add1_chain_cert is SSL_CTX_ctrl(ctx, 89, 1, x509)


def load_problem(chain: Sequence[x509.Certificate]) -> LoadProblem | None:
    """Why a server with this machine's OpenSSL configuration would refuse to load
    ``server.crt`` holding ``chain`` (leaf first), or None: the key and signature checks of
    ``SSL_CTX_use_certificate`` and of each appended chain certificate."""
    if crypto := _remote():
        answer = _ask(crypto, {"op": "load", "chain": [_b64(c) for c in chain]})
        return LoadProblem(**answer["problem"]) if answer.get("problem") else None  # type: ignore[arg-type]
    lib = _current()
    ctx = lib.ssl.SSL_CTX_new(lib.ssl.TLS_server_method())
    if not ctx:
        return None
    made: list[int] = []
    try:
        lib.crypto.ERR_clear_error()
        for depth, cert in enumerate(chain):
            ptr = lib.x509(cert)
            made.append(ptr)
            if depth == 0:
                ok = lib.ssl.SSL_CTX_use_certificate(ctx, ptr) == 1
            else:
                ok = lib.ssl.SSL_CTX_ctrl(ctx, _SSL_CTRL_CHAIN_CERT, 1, ptr) == 1
            if not ok:
                return LoadProblem(depth, lib.errors())
        return None
    finally:
        lib.ssl.SSL_CTX_free(ctx)
        for ptr in made:
            lib.crypto.X509_free(ptr)


def _b64(cert: x509.Certificate) -> str:
    import base64

    return base64.b64encode(cert.public_bytes(Encoding.DER)).decode()


def _cert(text: str) -> x509.Certificate:
    import base64

    return x509.load_der_x509_certificate(base64.b64decode(text))


def _serve() -> None:
    """The helper process: one question on stdin, its answer on stdout (JSON)."""
    import dataclasses
    import json
    import sys

    q = json.loads(sys.stdin.read())
    out: dict[str, object]
    if q["op"] == "name":
        out = {"name": openssl_name()}
    elif q["op"] == "level":
        out = {"level": security_level()}
    elif q["op"] == "verify":
        at = _dt.datetime.fromtimestamp(q["at"], _dt.UTC) if q["at"] is not None else None
        checked = verify(
            _cert(q["leaf"]),
            [_cert(c) for c in q["intermediates"]],
            [_cert(c) for c in q["roots"]],
            at=at,
        )
        out = dataclasses.asdict(checked)
    else:
        problem = load_problem([_cert(c) for c in q["chain"]])
        out = {"problem": dataclasses.asdict(problem) if problem else None}
    sys.stdout.write(json.dumps(out))


if __name__ == "__main__":
    _serve()
