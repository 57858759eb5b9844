"""The one exception family: every message is a sentence a DBA can act on."""

from __future__ import annotations

__all__ = ["InputError", "PgtlsError", "PreflightError", "ServerError"]


class PgtlsError(Exception):
    """Root of every error this package raises on purpose.

    ``str(err)`` is one sentence that names the file or object and the fix; the
    original exception, when there is one, is kept as ``__cause__``.
    """


class InputError(PgtlsError, ValueError):
    """A file or value given to us cannot be used (the CLI exits with status 2)."""


class PreflightError(PgtlsError):
    """A check before a change failed; nothing was written."""


class ServerError(PgtlsError):
    """The PostgreSQL server refused, failed, or is not reachable."""
