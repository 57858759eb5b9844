"""The one exception family: every message is a sentence a DBA can act on."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "InputError",
    "PgtlsError",
    "PreflightError",
    "ServerError",
    "is_refusal",
    "refusal_traceback",
]

# red, as Jupyter shows an error, and nothing else: the sentence is the whole story
_RED, _RESET = "\x1b[0;31m", "\x1b[0m"


def refusal_traceback(message: str) -> list[str]:
    """What a notebook shows for a :class:`PgtlsError`: its sentence, in red, and no traceback.

    >>> refusal_traceback("ca_files is empty")
    ['\\x1b[0;31mca_files is empty\\x1b[0m']
    """
    return [f"{_RED}{message}{_RESET}"]


def is_refusal(traceback: Sequence[str], evalue: str) -> bool:
    """True when a notebook's error output is one of ours (shown as its sentence), False for
    a real bug, whose traceback is the evidence."""
    return list(traceback) == refusal_traceback(evalue)


class PgtlsError(Exception):
    """Root of every error this package raises on purpose.

    ``str(err)`` is one sentence that names the file or object and the fix; the
    original exception, when there is one, is kept as ``__cause__``.

    In a notebook it shows as that sentence alone: IPython asks an exception for
    ``_render_traceback_()`` before it formats a traceback (its documented hook for custom
    tracebacks), and the error output it sends still stops papermill and nbclient. A real bug,
    any other exception, keeps its full traceback.
    """

    def _render_traceback_(self) -> list[str]:
        return refusal_traceback(str(self))


class InputError(PgtlsError, ValueError):
    """A file or value given to us cannot be used (the CLI exits with status 2)."""


class PreflightError(PgtlsError):
    """A check before a change failed; nothing was written."""


class ServerError(PgtlsError):
    """The PostgreSQL server refused, failed, or is not reachable."""
