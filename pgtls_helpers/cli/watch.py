"""``pgtls watch TARGET...``: expiry and TLS posture of many servers, in four formats.

Exit status: with ``--format nagios`` the plugin contract (0 ok, 1 warning, 2 critical,
3 unknown); otherwise 0 when every target is ok, 1 when any is not, 2 for unusable input.
``--out`` replaces its file atomically (a temporary file in the same directory, then a
rename), so node_exporter's textfile collector never reads half a file.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import os
import sys
from pathlib import Path

from pgtls_helpers.display.watch_formats import exit_code, render
from pgtls_helpers.errors import InputError
from pgtls_helpers.pki.posture import WatchOptions
from pgtls_helpers.postgres.files import atomic_write
from pgtls_helpers.postgres.watch import load_roots, parse_targets, watch
from pgtls_helpers.postgres.watch_clients import (
    check_client_users,
    check_crl_files,
    resolve_watch_users,
)

__all__ = ["main"]


def _check_out(path: str) -> Path:
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise InputError(f"--out {out}: that is a directory; give a file name such as pgtls.prom")
    if not parent.is_dir():
        raise InputError(f"--out {out}: the directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise InputError(f"--out {out}: the directory {parent} is not writable by this user")
    return out


def _colour(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and "NO_COLOR" not in os.environ


def main(args: argparse.Namespace) -> int:
    """Check every target concurrently, then print (or write) one format."""
    local_only = bool(args.client_user or args.crl) and not args.sessions
    if not args.targets and not args.targets_file and not local_only:
        raise InputError("no targets: give HOST[:PORT] arguments or --targets-file FILE")
    targets = (
        parse_targets(args.targets, args.targets_file) if args.targets or args.targets_file else []
    )
    roots = load_roots(args.root) if args.root else None
    users = resolve_watch_users(args.client_user)
    now = _dt.datetime.now(_dt.UTC)
    # the thresholds are checked by WatchOptions before any file is read
    options = WatchOptions(
        roots=roots,
        root_path=str(Path(args.root).resolve()) if args.root else None,
        warn_days=args.warn_days,
        crit_days=args.crit_days,
        timeout=args.timeout,
        concurrency=args.concurrency,
        on_disk=args.on_disk,
        user=args.user,
        dbname=args.dbname,
        now=now,
        sessions=args.sessions,
    )
    out = _check_out(args.out) if args.out else None
    clients, known = check_client_users(
        users, warn_days=args.warn_days, crit_days=args.crit_days, now=now
    )
    crls = check_crl_files(args.crl, now=now)
    options = dataclasses.replace(options, client_certs=known)
    results = watch(targets, options) if targets else []
    text = render(
        results,
        args.format,
        warn_days=args.warn_days,
        crit_days=args.crit_days,
        colour=out is None and _colour(sys.stdout),
        checked_at=options.now,
        clients=clients,
        crls=crls,
    )
    if out is not None:
        atomic_write(out, text.encode("utf-8"), mode=0o644)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    return exit_code(results, args.format, clients=clients, crls=crls)
