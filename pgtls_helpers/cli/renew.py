"""``pgtls renew PARAMS.yaml``: renew the served certificate when it is due, unattended.

Asks the server what it serves (the watch's probe). When the certificate is not due, says so
and changes nothing. When it is due, runs a renewal change through the runner: a new change id
(the parameters' ``change_id`` with ``-renew-<UTC date>``), a new key unless ``reuse_key``, the
same names (a renewal inherits the served subject and SANs the parameters leave empty), the CA
of ``ca_mode`` (a back-end such as ``vault`` or ``command`` signs without a person), step 3's
checks, the reload watched by a verify-full client loop, and the record.

Exit status, for a scheduler: 0 renewed and proven, or not due; 1 the renewal failed (and was
undone); 2 unusable parameters; 3 the server serves no certificate to renew; 4 the CA is
unavailable (run again later); 5 the CA refused.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

import yaml

from pgtls_helpers.errors import InputError
from pgtls_helpers.runbook.params import load_params, read_params_file, resolve_paths

__all__ = ["due", "main"]

NOT_SERVED = 3
DEFAULT_FRACTION = 2 / 3  # renew at two thirds of the lifetime, as cert-manager does


def due(
    not_before: datetime,
    not_after: datetime,
    *,
    now: datetime,
    days: int | None = None,
    fraction: float | None = None,
) -> tuple[bool, datetime]:
    """Whether a certificate valid from ``not_before`` to ``not_after`` is due at ``now``, and
    when it is (or was) due: ``days`` before its end, or at ``fraction`` of its lifetime.

    >>> start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    >>> end = datetime(2026, 4, 1, tzinfo=timezone.utc)  # 90 days
    >>> due(start, end, now=datetime(2026, 2, 1, tzinfo=timezone.utc))[0]
    False
    >>> due(start, end, now=datetime(2026, 3, 2, tzinfo=timezone.utc))
    (True, datetime.datetime(2026, 3, 2, 0, 0, tzinfo=datetime.timezone.utc))
    >>> due(start, end, now=datetime(2026, 2, 1, tzinfo=timezone.utc), days=60)[0]
    True
    """
    from datetime import timedelta

    if days is not None:
        when = not_after - timedelta(days=days)
    else:
        share = DEFAULT_FRACTION if fraction is None else fraction
        when = not_before + (not_after - not_before) * share
    return now >= when, when


def main(args: argparse.Namespace) -> int:
    """Probe; say "not due" or run the renewal change."""
    from pgtls_helpers.postgres.probe import probe
    from pgtls_helpers.runbook.common import address_of
    from pgtls_helpers.runbook.runner import run

    params_file = Path(args.params)
    values = resolve_paths(read_params_file(params_file), params_file, args.work)
    params = load_params(values, source=str(params_file))
    if params.lab_cluster:
        raise InputError(f"{params_file}: lab_cluster is true; renew a server that stays")
    if args.due_fraction is not None and not 0 < args.due_fraction < 1:
        raise InputError("--due-fraction must be between 0 and 1, such as 0.67")
    where = f"{params.server_host}:{params.server_port}"
    seen = probe(address_of(params.server_host), params.server_port, timeout=10.0)
    if not seen.ok or not seen.chain:
        sys.stderr.write(
            f"pgtls renew: {where} serves no certificate ({seen.error or 'no chain'}); there is "
            "nothing to renew: run the runbook (pgtls run) for the first certificate\n"
        )
        return NOT_SERVED
    leaf = seen.chain[0]
    now = datetime.now(timezone.utc)
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    is_due, when = due(start, end, now=now, days=args.due_days, fraction=args.due_fraction)
    left = (end - now).days
    if not is_due:
        sys.stdout.write(
            f"pgtls renew: not due: {where} serves {leaf.subject.rfc4514_string()} until "
            f"{end:%Y-%m-%d} ({left} days left); due from {when:%Y-%m-%d %H:%M} UTC; nothing "
            "was changed\n"
        )
        return 0
    change_id = f"{params.change_id}-renew-{now:%Y%m%d}"
    renewal = Path(args.work) / f"{change_id}.yaml"
    renewal.parent.mkdir(parents=True, exist_ok=True)
    given = read_params_file(params_file)
    renewal.write_text(
        f"# pgtls renew: {params_file} on {now:%Y-%m-%d}, the served certificate had {left} "
        "days left\n" + yaml.safe_dump({**given, "change_id": change_id}, sort_keys=False)
    )
    sys.stdout.write(
        f"pgtls renew: due: {where} serves a certificate until {end:%Y-%m-%d} ({left} days "
        f"left); renewing as change {change_id}\n"
    )
    outcome = run(
        renewal, records_dir=args.records, work_dir=args.work, progress=not args.no_progress
    )
    sys.stdout.write(outcome.summary() + "\n")
    return outcome.exit_code
