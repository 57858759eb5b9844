"""One change's private work directory, and the name of every file in it, defined once.

``work/<change_id>/`` (mode 0700) holds what must not be archived: the new private key until it
is installed, the CSR, the CA's answer as a checked chain, the lab CA, and the journals that
rollback reads. Records never point into it for key bytes.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from pgtls_helpers.errors import PreflightError

__all__ = ["ClientWork", "WorkDir"]


@dataclass(frozen=True)
class WorkDir:
    """``path`` is absolute: it is resolved when the parameters are read, from the parameters
    file's folder (or given absolute), never from the directory a kernel happens to start in."""

    path: Path

    @property
    def key(self) -> Path:
        """The new private key, from step 1 until step 3 installs it."""
        return self.path / "server.key"

    @property
    def csr(self) -> Path:
        """The signing request sent to the CA."""
        return self.path / "server.csr"

    @property
    def subject(self) -> Path:
        """The subject chosen in the interactive form ("Use these values")."""
        return self.path / "subject.json"

    @property
    def client_subjects(self) -> Path:
        """The clients' roles, subjects and pg_ident.conf lines chosen in step c1's form."""
        return self.path / "client_subjects.json"

    @property
    def bundle(self) -> Path:
        """Leaf and intermediates in signing order, checked by step 2."""
        return self.path / "server.crt"

    @property
    def root(self) -> Path:
        """The CA's root, for the clients' ``~/.postgresql/root.crt``."""
        return self.path / "root.crt"

    @property
    def unrelated_root(self) -> Path:
        """A root that did not sign the chain: step 5 proves verify-ca refuses it."""
        return self.path / "unrelated-root.crt"

    @property
    def lab_ca(self) -> Path:
        """What the throwaway CA of ``ca_mode: lab`` returned for this change."""
        return self.path / "ca"

    @property
    def shared_lab_ca(self) -> Path:
        """The throwaway CA itself, once per work directory (beside the changes' folders):
        every lab change signs with it, so a second lab change is a same-root renewal."""
        return self.path.parent / "lab-ca"

    @property
    def journal(self) -> Path:
        """The write-ahead journal of steps 3 and 4 (or of a client-trust change): each
        change recorded before it is made."""
        return self.path / "journal.jsonl"

    @property
    def backups(self) -> Path:
        """The bytes of every server file the change replaced (0700, removed when sealed)."""
        return self.path / "backups"

    @property
    def client_loop_roots(self) -> Path:
        """The roots the renewal's client loop trusts while it connects across the reload."""
        return self.path / "client-loop-roots.crt"

    @property
    def clients(self) -> Path:
        """The client certificates of ``pgtls clients``: one folder per client OS user."""
        return self.path / "clients"

    @property
    def client_roots(self) -> Path:
        """The distinct roots that issued the clients' certificates, for the server's
        ``ssl_ca_file``."""
        return self.clients / "roots.pem"

    def client(self, os_user: str) -> ClientWork:
        """The files of one client OS user's certificate."""
        return ClientWork(self.clients / os_user)

    def create(self) -> Path:
        """Create the directory 0700 (tightening one that others could read) and return it.

        The work root and this directory must be ours (see :meth:`check`): what is in them
        (the journal, the backups) decides what rollback writes as root.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _check_ours(self.path.parent, "the work directory")
        self.path.mkdir(exist_ok=True, mode=0o700)
        _check_ours(self.path, "the change's work directory")
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:  # on the directory judged ours, never through a link swapped in since
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, 0o700)
        finally:
            os.close(fd)
        return self.path

    def check(self) -> None:
        """Refuse a work root or change directory that another user owns or could write."""
        for path, what in (
            (self.path.parent, "the work directory"),
            (self.path, "the change's work directory"),
        ):
            if os.path.lexists(path):
                _check_ours(path, what)


@dataclass(frozen=True)
class ClientWork:
    """``work/<change_id>/clients/<os_user>/`` (0700): one client's key from c1 until c3
    installs it, its CSR, what the CA returned, and the checked certificate."""

    path: Path

    @property
    def key(self) -> Path:
        """The client's private key (0600), until it is installed as ``postgresql.key``."""
        return self.path / "postgresql.key"

    @property
    def csr(self) -> Path:
        """The client's signing request."""
        return self.path / "postgresql.csr"

    @property
    def ca_response(self) -> Path:
        """What the lab CA returned for this client (``ca_mode: lab``)."""
        return self.path / "ca"

    @property
    def bundle(self) -> Path:
        """The client's certificate and the intermediates, leaf first: ``postgresql.crt``."""
        return self.path / "postgresql.crt"

    @property
    def root(self) -> Path:
        """The root the client's certificate chains to."""
        return self.path / "root.crt"


def _check_ours(path: Path, what: str) -> None:
    st = os.lstat(path)
    me = os.geteuid()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        problem = "is not a real directory (a symbolic link or a file)"
    elif st.st_uid != me:
        problem = f"belongs to uid {st.st_uid}, not to the user running pgtls (uid {me})"
    elif st.st_mode & 0o022:
        problem = f"can be written by others (mode {stat.S_IMODE(st.st_mode):04o})"
    else:
        return
    raise PreflightError(
        f"{path}: {what} {problem}, and what it holds decides what pgtls writes; use a work "
        "directory of your own that only you can write (chmod go-w), or remove this one"
    )
