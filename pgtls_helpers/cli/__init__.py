"""Command line: ``pgtls chain``, ``csr``, ``probe``, ``watch``, ``run``, ``rollback``,
``record``, ``trust``, ``clients``, ``lab``, ``fleet``.

Each command's body lives in a small ``_cli_*`` module so that importing the CLI stays cheap
(``chain inspect`` must not pay for pandas or papermill unless it needs them).
Exit status: 0 fine, 1 a check failed (an error finding, a refused connection), 2 the input is
unusable. A :class:`PgtlsError` is printed as one line on stderr, never as a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from pgtls_helpers.errors import InputError, PgtlsError

__all__ = ["main"]


def _add_chain(sub: argparse._SubParsersAction) -> None:
    chain = sub.add_parser("chain", help="read, order and check what a CA returned")
    csub = chain.add_subparsers(dest="chain_cmd", required=True)

    ins = csub.add_parser("inspect", help="order a chain leaf first and list findings")
    ins.add_argument("paths", nargs="+", metavar="FILE_OR_DIR")
    ins.add_argument("--key", metavar="KEYFILE", help="private key the leaf must match")
    ins.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="host name clients use with verify-full (repeatable)",
    )
    ins.add_argument(
        "--pool",
        action="append",
        default=[],
        metavar="DIR_OR_FILE",
        help="extra certificates to complete the chain from (repeatable)",
    )
    ins.add_argument(
        "--password-env",
        metavar="VAR",
        help="environment variable holding the PKCS#12 or key password",
    )
    ins.add_argument("--expires-soon-days", type=int, default=30, metavar="DAYS")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.set_defaults(func=_lazy("pgtls_helpers.cli.chain", "inspect"))

    bun = csub.add_parser("bundle", help="write server.crt (leaf + intermediates) and root.crt")
    bun.add_argument("paths", nargs="+", metavar="FILE_OR_DIR")
    bun.add_argument("--out", required=True, metavar="server.crt")
    bun.add_argument("--root-out", metavar="root.crt")
    bun.add_argument("--pool", action="append", default=[], metavar="DIR_OR_FILE")
    bun.add_argument("--password-env", metavar="VAR")
    bun.set_defaults(func=_lazy("pgtls_helpers.cli.chain", "bundle"))


def _add_csr(sub: argparse._SubParsersAction) -> None:
    csr = sub.add_parser("csr", help="generate server.key (0600) and server.csr")
    csr.add_argument("--cn", required=True, help="common name: the host name clients use")
    csr.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="NAME",
        help="subject alternative name, DNS name or IP (repeatable)",
    )
    csr.add_argument("--country", "-C", metavar="CC")
    csr.add_argument("--state", "-ST")
    csr.add_argument("--locality", "-L")
    csr.add_argument("--organization", "-O")
    csr.add_argument("--organizational-unit", "-OU")
    csr.add_argument("--email")
    csr.add_argument(
        "--key-type",
        default="rsa4096",
        help="rsa2048, rsa3072, rsa4096 (default), ecdsa-p256, ecdsa-p384",
    )
    csr.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="encrypt the key with the passphrase in this environment variable",
    )
    csr.add_argument(
        "--passphrase-prompt",
        action="store_true",
        help="encrypt the key with a passphrase typed at the terminal",
    )
    csr.add_argument(
        "--challenge-password-env",
        metavar="VAR",
        help="add a challenge password attribute (only if your CA asks for one)",
    )
    csr.add_argument("--out-dir", required=True, metavar="DIR")
    csr.add_argument("--force", action="store_true", help="replace existing files (kept as .bak)")
    csr.set_defaults(func=_lazy("pgtls_helpers.cli.csr", "main"))


def _add_probe(sub: argparse._SubParsersAction) -> None:
    probe = sub.add_parser("probe", help="what a server presents: TLS version, cipher, chain")
    probe.add_argument("targets", nargs="+", metavar="HOST[:PORT]")
    probe.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS")
    probe.add_argument("--json", action="store_true", help="one JSON object per host per line")
    probe.set_defaults(func=_lazy("pgtls_helpers.cli.probe", "main"))


def _add_watch(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser(
        "watch", help="expiry and TLS posture of many servers: table, JSON, Prometheus, Nagios"
    )
    w.add_argument("targets", nargs="*", metavar="HOST[:PORT]")
    w.add_argument("--targets-file", metavar="FILE", help="one HOST[:PORT] a line, # comments")
    w.add_argument("--root", metavar="ROOT.crt", help="verify the chains against this root")
    w.add_argument("--warn-days", type=int, default=30, metavar="DAYS")
    w.add_argument("--crit-days", type=int, default=15, metavar="DAYS")
    w.add_argument("--format", choices=("table", "json", "prometheus", "nagios"), default="table")
    w.add_argument("--out", metavar="FILE", help="write there atomically instead of stdout")
    w.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS")
    w.add_argument("--concurrency", type=int, default=32, metavar="N")
    w.add_argument(
        "--on-disk",
        action="store_true",
        help="also read ssl_cert_file (and ssl_crl_file, ssl_crl_dir) through libpq: renewed "
        "on disk but not reloaded?",
    )
    w.add_argument(
        "--user",
        metavar="ROLE",
        help="--on-disk, --sessions: the role libpq logs in as (default: $PGUSER, else the OS "
        "user, as psql); the password from PGPASSWORD, PGPASSFILE or ~/.pgpass",
    )
    w.add_argument(
        "--dbname",
        default="postgres",
        help="--on-disk, --sessions: the database libpq logs in to (default: %(default)s)",
    )
    w.add_argument(
        "--client-user",
        action="append",
        default=[],
        metavar="USER",
        help="also that OS user's ~/.postgresql/postgresql.crt and .key (repeatable)",
    )
    w.add_argument(
        "--crl",
        action="append",
        default=[],
        metavar="FILE",
        help="also this CRL's nextUpdate (repeatable); --on-disk reads ssl_crl_file too",
    )
    w.add_argument(
        "--sessions",
        action="store_true",
        help="log in and count pg_stat_ssl's client-certificate sessions by issuer",
    )
    w.set_defaults(func=_lazy("pgtls_helpers.cli.watch", "main"))


def _add_run(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run the five runbook notebooks and archive the record")
    run.add_argument("params", metavar="PARAMS.yaml")
    run.add_argument("--records", default="records", metavar="DIR")
    run.add_argument(
        "--work",
        default="work",
        metavar="DIR",
        help="private per-change work directories (keys, CSRs, CA files)",
    )
    run.add_argument("--no-progress", action="store_true")
    run.set_defaults(func=_lazy("pgtls_helpers.cli.run", "main"))


def _add_renew(sub: argparse._SubParsersAction) -> None:
    renew = sub.add_parser(
        "renew",
        help="renew the served certificate when it is due, through the CA of ca_mode",
        description="Probe the server; when its certificate is due (by default at two thirds "
        "of its lifetime), run a renewal change (change_id-renew-<date>) with the CA of "
        "ca_mode and its record; otherwise say when it will be due. Exit status: 0 renewed or "
        "not due, 1 the renewal failed (undone), 2 unusable parameters, 3 no certificate is "
        "served, 4 the CA is unavailable (run again later), 5 the CA refused.",
    )
    renew.add_argument("params", metavar="PARAMS.yaml")
    when = renew.add_mutually_exclusive_group()
    when.add_argument(
        "--due-days", type=int, metavar="N", help="due N days before the certificate ends"
    )
    when.add_argument(
        "--due-fraction",
        type=float,
        metavar="F",
        help="due at this share of its lifetime (default 0.67)",
    )
    renew.add_argument("--records", default="records", metavar="DIR")
    renew.add_argument("--work", default="work", metavar="DIR")
    renew.add_argument("--no-progress", action="store_true")
    renew.set_defaults(func=_lazy("pgtls_helpers.cli.renew", "main"))


def _add_clients(sub: argparse._SubParsersAction) -> None:
    clients = sub.add_parser(
        "clients",
        help="the client-certificate runbook: clients log in with CA-signed certificates",
        description="Give each client OS user in `clients` a key and a CA-signed client "
        "certificate in ~/.postgresql, make the server trust the client-issuing roots "
        "(ssl_ca_file), add the cert lines of hba_rules and the maps of ident_maps, and prove "
        "that each client logs in with its certificate and that the wrong ones are refused. "
        "Exit status: 0 done (or planned), 1 failed (undone), 2 unusable parameters.",
    )
    clients.add_argument("params", metavar="PARAMS.yaml")
    clients.add_argument("--records", default="records", metavar="DIR")
    clients.add_argument("--work", default="work", metavar="DIR")
    clients.add_argument("--no-progress", action="store_true")
    clients.set_defaults(func=_lazy("pgtls_helpers.cli.clients", "main"))


def _add_trust(sub: argparse._SubParsersAction) -> None:
    trust = sub.add_parser(
        "trust",
        help="CA rotation: add (add_roots) or retire (remove_roots) roots in the clients' "
        "root.crt, proven with verify-full, and archive the record",
    )
    trust.add_argument("params", metavar="PARAMS.yaml")
    trust.add_argument("--records", default="records", metavar="DIR")
    trust.add_argument("--work", default="work", metavar="DIR")
    trust.add_argument("--no-progress", action="store_true")
    trust.set_defaults(func=_lazy("pgtls_helpers.cli.trust", "main"))


def _add_rollback(sub: argparse._SubParsersAction) -> None:
    back = sub.add_parser(
        "rollback",
        help="back out an applied change: pg_hba.conf, settings and files from their backups",
        description="Back out an applied or interrupted change from its journal, reload, check "
        "that the server is as before, and record it. --dry-run makes the same checks first "
        "and refuses alike, but writes nothing.",
        epilog="exit status: 0 rolled back (or, with --dry-run, it would be); 0 also when there "
        "is nothing to roll back (the change was never applied, or was already rolled back), "
        "said in one sentence; 1 a check refused (a file changed after the change: roll back "
        "the later change first, or --force; the change lock held by a live change) or the "
        "server is not as before afterwards; 2 unusable input",
    )
    back.add_argument("params", metavar="PARAMS.yaml", help="the parameters file of the change")
    back.add_argument(
        "--work",
        default="work",
        metavar="DIR",
        help="where the change's work directory (its journals) lives",
    )
    back.add_argument(
        "--records",
        default="records",
        metavar="DIR",
        help="where the change's records are; the rollback's record goes beside them (and a "
        "record a killed run left is sealed)",
    )
    back.add_argument(
        "--dry-run",
        action="store_true",
        help="make every check the rollback makes and show what would be removed, restored "
        "and reset; write nothing (same refusals, same exit status)",
    )
    back.add_argument(
        "--force",
        action="store_true",
        help="restore even files someone changed after the change (their edits are lost)",
    )
    back.set_defaults(func=_lazy("pgtls_helpers.cli.rollback", "main"))


def _add_record(sub: argparse._SubParsersAction) -> None:
    record = sub.add_parser("record", help="a run's record in other forms")
    rsub = record.add_subparsers(dest="record_cmd", required=True)
    pdf = rsub.add_parser("pdf", help="the summary and step pages of a run in one PDF")
    pdf.add_argument("record", metavar="RECORD_DIR", help="records/<change_id>/<stamp>/")
    pdf.add_argument("--out", metavar="FILE.pdf", help="default: records/<change_id>/<stamp>.pdf")
    pdf.set_defaults(func=_lazy("pgtls_helpers.cli.record", "pdf"))


def _add_lab(sub: argparse._SubParsersAction) -> None:
    lab = sub.add_parser("lab", help="throwaway CA and PostgreSQL cluster to explore")
    lsub = lab.add_subparsers(dest="lab_cmd", required=True)
    up = lsub.add_parser("up", help="create and start a throwaway cluster (SSL off)")
    up.add_argument("--dir", default="work/lab", metavar="DIR")
    up.add_argument("--port", type=int, default=None)
    up.set_defaults(func=_lazy("pgtls_helpers.cli.lab", "up"))
    down = lsub.add_parser("down", help="stop and remove the throwaway cluster")
    down.add_argument("--dir", default="work/lab", metavar="DIR")
    down.set_defaults(func=_lazy("pgtls_helpers.cli.lab", "down"))
    status = lsub.add_parser("status", help="show the throwaway cluster's connection string")
    status.add_argument("--dir", default="work/lab", metavar="DIR")
    status.set_defaults(func=_lazy("pgtls_helpers.cli.lab", "status"))
    nb = lsub.add_parser(
        "notebook",
        help="JupyterLab on the runbook notebooks, prepared with "
        "a parameters file (with lab parameters, on the lab cluster)",
    )
    nb.add_argument("--params", default="parameters/lab.yaml", metavar="PARAMS.yaml")
    nb.add_argument("--dir", default="work/lab", metavar="DIR", help="the lab cluster's directory")
    nb.add_argument("--work", default="work", metavar="DIR")
    nb.add_argument(
        "--records",
        default="records",
        metavar="DIR",
        help="where an interactive change's record goes",
    )
    nb.add_argument(
        "--port",
        type=int,
        default=None,
        help="JupyterLab's port (default 8888, or a free one when that is taken)",
    )
    nb.set_defaults(func=_lazy("pgtls_helpers.cli.lab", "notebook"))
    unattended = lsub.add_parser(
        "demo-unattended",
        help="a real CA (OpenBao, or Pebble for ACME) signs with no person in the loop: one "
        "pgtls run, then pgtls renew, on a throwaway cluster; the records stay",
    )
    unattended.add_argument("--ca", choices=("vault", "acme"), default="vault")
    unattended.add_argument(
        "--dir", default="work/lab-unattended", metavar="DIR", help="where its parameters go"
    )
    unattended.add_argument("--records", default="records", metavar="DIR")
    unattended.add_argument("--work", default="work", metavar="DIR")
    unattended.set_defaults(func=_lazy("pgtls_helpers.cli.lab_unattended", "main"))
    demo = lsub.add_parser(
        "demo-clients",
        help="the client-certificate runbook on a throwaway cluster, CA and client OS user "
        "(as root); the records stay, the rest is removed",
    )
    demo.add_argument(
        "--dir", default="work/lab-clients", metavar="DIR", help="where its parameters files go"
    )
    demo.add_argument("--records", default="records", metavar="DIR")
    demo.add_argument("--work", default="work", metavar="DIR")
    demo.set_defaults(func=_lazy("pgtls_helpers.cli.lab", "demo_clients"))
    ca = lsub.add_parser(
        "ca",
        help="a throwaway CA of its own (another root, for CA rotation drills); with --sign, "
        "sign a CSR and write what a CA returns",
    )
    ca.add_argument("--dir", required=True, metavar="DIR", help="where the CA is kept")
    ca.add_argument("--name", default="RootCA", metavar="NAME", help="the root's common name")
    ca.add_argument("--sign", metavar="CSR", help="sign this CSR; files go to DIR/signed/")
    ca.add_argument(
        "--minimal",
        action="store_true",
        help="a new CA of the minimal-extension profile (a root with basicConstraints only, no "
        "key identifiers, leaves with only their subjectAltName), as many own CAs make them",
    )
    ca.set_defaults(func=_lazy("pgtls_helpers.cli.lab", "ca"))


def _add_fleet(sub: argparse._SubParsersAction) -> None:
    fleet = sub.add_parser("fleet", help="the runbook on many servers (fleet/pgtls.yml)")
    fsub = fleet.add_subparsers(dest="fleet_cmd", required=True)
    rep = fsub.add_parser(
        "report", help="one page (HTML and JSON) with a row per host of a fleet run"
    )
    rep.add_argument("directory", metavar="records/CHANGE_ID/")
    rep.add_argument("--run", metavar="RUN", help="an earlier run (default: the latest)")
    rep.add_argument("--out", metavar="FILE.html", help="default: fleet-report.html in the folder")
    rep.add_argument("--json", action="store_true", help="print the JSON instead of a summary")
    rep.set_defaults(func=_lazy("pgtls_helpers.cli.fleet", "report"))


def _lazy(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    def call(args: argparse.Namespace) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), name)(args))

    return call


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgtls", description="Move a PostgreSQL server to verified TLS, with evidence."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_chain(sub)
    _add_csr(sub)
    _add_probe(sub)
    _add_watch(sub)
    _add_run(sub)
    _add_rollback(sub)
    _add_trust(sub)
    _add_clients(sub)
    _add_renew(sub)
    _add_record(sub)
    _add_lab(sub)
    _add_fleet(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as exc:
        print(f"pgtls: {exc}", file=sys.stderr)
        return 2
    except PgtlsError as exc:
        print(f"pgtls: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a path we were told to use cannot be used
        where = exc.filename or "a file"
        print(
            f"pgtls: {where}: {exc.strerror or exc}; check the path and its permissions",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("pgtls: interrupted", file=sys.stderr)
        return 130
