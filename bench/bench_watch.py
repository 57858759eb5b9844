"""How long watching a fleet of 500 PostgreSQL servers takes: ``pgtls watch`` against sslyze.

N throwaway clusters (SSL on, the lab CA's chain, a leaf whose SANs name every address) each
listen on many loopback addresses (127.0.0.2, 127.0.0.3, ...: all of 127.0.0.0/8 reaches ``lo``
on Linux), so that ``address:port`` pairs make 500 distinct targets. Then, on the same targets,
each as one command:

(a) ``pgtls watch --format json --root ROOT --targets-file FILE`` (SSLRequest handshake and
    chain, direct TLS, plaintext posture, verification, host name: three connections a target);
(b) ``sslyze --starttls postgres --certinfo TARGET...`` (one STARTTLS scan of the certificate).

It prints both wall times, their ratio (goal: at least 10x), pgtls's wall time against its
goal (500 targets in under 5 s on a 2-core machine) and pgtls's peak memory. sslyze is taken
from ``--sslyze PATH``, the PATH, or a venv it installs into ``/tmp/pgtls-bench-sslyze`` (pip);
when none of those works the comparison is skipped with a message, and pgtls alone is timed.
Run::

    .venv/bin/python bench/bench_watch.py [--targets 500] [--clusters 8] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from pgtls_helpers.errors import PgtlsError
from pgtls_helpers.lab import LabCA, LabCluster

REPO = Path(__file__).resolve().parents[1]
GOAL_RATIO = 10.0
GOAL_SECONDS = 5.0
SSLYZE_VENV = Path("/tmp/pgtls-bench-sslyze")  # noqa: S108 - a scratch venv for the comparison


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=int, default=500)
    parser.add_argument("--clusters", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=32, help="pgtls watch --concurrency")
    parser.add_argument("--sslyze", metavar="PATH", help="the sslyze command to compare with")
    parser.add_argument("--no-sslyze", action="store_true", help="time pgtls watch alone")
    args = parser.parse_args(argv)
    if args.targets < 1 or args.clusters < 1:
        parser.error("--targets and --clusters must be at least 1")
    per_cluster = -(-args.targets // args.clusters)
    if per_cluster > 250:
        parser.error("at most 250 addresses per cluster; give more --clusters")
    addresses = [f"127.0.0.{i}" for i in range(2, 2 + per_cluster)]
    clusters: list[LabCluster] = []
    with tempfile.TemporaryDirectory(prefix="pgtls-bench-watch-") as scratch:
        try:
            ca = LabCA.create()
            for _ in range(args.clusters):
                clusters.append(_cluster(ca, addresses))
            targets = [
                f"{address}:{cluster.port}" for cluster in clusters for address in addresses
            ][: args.targets]
            work = Path(scratch)
            (work / "targets.txt").write_text("\n".join(targets) + "\n")
            (work / "root.crt").write_bytes(ca.root.public_bytes(serialization.Encoding.PEM))
            sslyze = None if args.no_sslyze else _sslyze(args.sslyze)
            return _run(work, targets, clusters, args.concurrency, sslyze)
        except PgtlsError as exc:
            print(f"no throwaway clusters: {exc}", file=sys.stderr)
            return 2
        finally:
            for cluster in clusters:
                cluster.remove()


def _cluster(ca: LabCA, addresses: list[str]) -> LabCluster:
    cluster = LabCluster.create()
    with open(cluster.pgdata / "postgresql.conf", "a") as conf:
        conf.write(
            f"listen_addresses = '{','.join(addresses)}'\n"
            "max_connections = 300\n"
            "log_min_messages = warning\n"
        )
    with open(cluster.pgdata / "pg_hba.conf", "a") as hba:
        hba.write("host all all 127.0.0.0/8 scram-sha-256\n")
    cluster.host = addresses[0]
    cluster.start()
    key, leaf = ca.issue(["db.bench.pgtls.test", *addresses])
    cluster.serve_certificate(key, [leaf, *ca.intermediates])
    return cluster


def _sslyze(given: str | None) -> list[str] | None:
    if given:
        return [given]
    found = shutil.which("sslyze")
    if found:
        return [found]
    venv_sslyze = SSLYZE_VENV / "bin" / "sslyze"
    if not venv_sslyze.exists():
        print(f"installing sslyze into {SSLYZE_VENV} (once) ...", file=sys.stderr)
        made = subprocess.run(
            f"{sys.executable} -m venv {SSLYZE_VENV} && {SSLYZE_VENV}/bin/pip install -q sslyze",
            shell=True,  # noqa: S602 - fixed command
            capture_output=True,
            text=True,
            check=False,
        )
        if made.returncode != 0:
            last = (made.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"sslyze is not available ({last}); comparison skipped", file=sys.stderr)
            return None
    return [str(venv_sslyze)]


class _Run:
    """One timed command: wall time, its own CPU and peak RSS, and the servers' CPU meanwhile."""

    def __init__(self, argv: list[str], clusters: Sequence[LabCluster]) -> None:
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            servers_before = _servers_cpu(clusters)
            start = time.perf_counter()
            proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True, cwd=REPO)
            _, status, usage = os.wait4(proc.pid, 0)
            self.wall = time.perf_counter() - start
            time.sleep(0.5)  # the last backends exit and are reaped by their postmaster
            self.servers_cpu = _servers_cpu(clusters) - servers_before
            self.cpu = usage.ru_utime + usage.ru_stime
            self.peak_kib = usage.ru_maxrss
            self.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            err.seek(0)
            self.stdout, self.stderr = out.read(), err.read()


def _servers_cpu(clusters: Sequence[LabCluster]) -> float:
    """CPU seconds of the postmasters and their exited backends (``/proc``: utime..cstime)."""
    total = 0
    for cluster in clusters:
        pid = (cluster.pgdata / "postmaster.pid").read_text().split()[0]
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(x) for x in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def _run(
    work: Path,
    targets: list[str],
    clusters: Sequence[LabCluster],
    concurrency: int,
    sslyze: list[str] | None,
) -> int:
    n = len(targets)
    ours = [
        sys.executable, "-m", "pgtls_helpers", "watch", "--format", "json",
        "--root", str(work / "root.crt"), "--targets-file", str(work / "targets.txt"),
        "--concurrency", str(concurrency),
    ]  # fmt: skip
    subprocess.run([*ours[:4], "--help"], capture_output=True, cwd=REPO, check=False)  # bytecode
    run = _Run(ours, clusters)
    try:
        doc = json.loads(run.stdout)
    except json.JSONDecodeError:
        print(f"pgtls watch failed: {run.stderr.strip()[-500:]}", file=sys.stderr)
        return 1
    checked = [t for t in doc["targets"] if t["chain"]]
    met = "met" if run.wall < GOAL_SECONDS else "NOT met"
    print(f"targets: {n} distinct address:port pairs on {len(clusters)} clusters")
    print(
        f"pgtls watch: {run.wall:.2f} s wall; its CPU {run.cpu:.2f} s, the servers' CPU "
        f"{run.servers_cpu:.2f} s; peak RSS {run.peak_kib / 1024:.0f} MiB; {doc['summary']}"
    )
    print(f"  every target's chain seen: {len(checked) == n}")
    print(f"  goal: {n} targets in under {GOAL_SECONDS:.0f} s: {met} ({os.cpu_count()} cores)")
    if sslyze is None:
        return 0 if len(checked) == n else 1
    theirs = _Run([*sslyze, "--starttls", "postgres", "--certinfo", *targets], clusters)
    if theirs.returncode != 0:
        print(f"sslyze failed: {theirs.stderr.strip()[-500:]}", file=sys.stderr)
        return 1
    seen = theirs.stdout.count("Certificates Information:")
    ratio = theirs.wall / run.wall
    print(
        f"sslyze --starttls postgres --certinfo: {theirs.wall:.2f} s wall; its CPU "
        f"{theirs.cpu:.2f} s, the servers' CPU {theirs.servers_cpu:.2f} s; {seen} of {n} scanned"
    )
    met = "met" if ratio >= GOAL_RATIO else "NOT met"
    print(f"ratio (wall): {ratio:.1f}x (goal: at least {GOAL_RATIO:.0f}x): {met}")
    print(f"ratio (client CPU): {theirs.cpu / run.cpu:.1f}x")
    return 0 if len(checked) == n else 1


if __name__ == "__main__":
    raise SystemExit(main())
