"""The trust verdict as libpq reaches it, over the other checks' findings on a chain.

:mod:`pgtls_helpers.pki.findings` names what is wrong with a chain by rules of its own;
OpenSSL (:mod:`pgtls_helpers.pki.openssl`, the build libpq uses) decides whether clients will
verify it and whether the server will load it. Where the two disagree, OpenSSL's verdict
stands; cryptography's stricter RFC 5280 profile is a ``strict-profile`` warning.
"""

from __future__ import annotations

import datetime as _dt

from pgtls_helpers.pki.chain import ChainResult, cert_label, is_ca
from pgtls_helpers.pki.findings import Finding, verify_with_cryptography

__all__ = ["trust_verdict"]


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:] if text[:1].isupper() else text


# What OpenSSL decides when libpq verifies, and the server when it loads the pair: where the
# checks above and OpenSSL disagree, OpenSSL's verdict stands.
_OPENSSL_DECIDES = frozenset({"not-a-ca", "weak-key", "weak-signature", "no-server-auth"})


def trust_verdict(
    result: ChainResult, found: list[Finding], at: _dt.datetime | None = None
) -> list[Finding]:
    """``found`` (the other checks' findings on a complete chain) with the trust verdict as
    libpq reaches it: OpenSSL's ``X509_verify_cert`` against the chain's root and the server's
    load checks (:mod:`pgtls_helpers.pki.openssl`). Host names are judged by libpq's rules
    (:mod:`pgtls_helpers.pki.hostname`), not here. cryptography's RFC 5280 profile, stricter,
    adds a ``strict-profile`` warning, never an error."""
    from pgtls_helpers.pki import openssl

    leaf, root = result.leaf, result.root
    if leaf is None or root is None or is_ca(leaf):
        return found
    served = list(result.path[:-1])
    checked = openssl.verify(leaf, served[1:], [root], at=at)
    load = openssl.load_problem(served)
    out = list(found)
    if checked.ok and load is None:
        # OpenSSL accepts: a heuristic above that says otherwise is wrong for libpq
        out = [
            Finding(
                "warning",
                f.code,
                f"{f.message[:-1] if f.message.endswith('.') else f.message} (libpq's "
                f"{checked.verifier.split(' (')[0]} accepts it, so it does not stop the change).",
            )
            if f.is_error and f.code in _OPENSSL_DECIDES
            else f
            for f in out
        ]
        strict = verify_with_cryptography(result, None, at)
        if strict is not None and strict.code == "chain-rejected":
            out.append(
                Finding(
                    "warning",
                    "strict-profile",
                    f"libpq ({checked.verifier.split(' (')[0]}) accepts the chain of "
                    f"{cert_label(leaf)}, but clients that verify with a strict RFC 5280 / web "
                    "PKI profile (rustls- or webpki-based drivers, for example) may refuse it: "
                    f"{_lower_first(strict.message.split(': ', 1)[-1])}",
                )
            )
        elif strict is not None:
            out.append(strict)
        return out
    if load is not None and not any(f.is_error and f.code.startswith("weak-") for f in out):
        out.append(
            Finding(
                "error",
                "server-cannot-load",
                f"The server would refuse to load server.crt ({_ordinal(load.depth)} "
                f"certificate, {cert_label(served[load.depth])}): OpenSSL says "
                f'"{load.reason}" at security level {openssl.security_level()}; ask the CA for '
                "a certificate with a stronger key or signature.",
            )
        )
    explained = _OPENSSL_DECIDES | {"missing-issuer", "bad-signature", "expired", "not-yet-valid"}
    if not checked.ok and not any(f.is_error and f.code in explained for f in out):
        where = f" at depth {checked.depth} ({checked.subject})" if checked.subject else ""
        out.append(
            Finding(
                "error",
                "chain-rejected",
                f"libpq's OpenSSL ({checked.verifier}) rejects the chain of {cert_label(leaf)}: "
                f'"{checked.reason}"{where}; clients with sslmode=verify-ca or verify-full will '
                "be refused, so ask the CA for a chain that verifies.",
            )
        )
    return out


def _ordinal(depth: int) -> str:
    return "the server's own" if depth == 0 else f"chain certificate {depth} of the"
