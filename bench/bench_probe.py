"""How long seeing what 50 servers present takes: one ``pgtls probe`` against openssl s_client.

A DBA checking many servers (or one server many times, behind a load balancer) would loop over
``openssl s_client -starttls postgres -showcerts``, one process per host. This benchmark starts a
throwaway cluster that serves a lab CA chain (leaf + IntermediateCA_FOO + IntermediateCA_BAR)
and times, as whole processes, in the same run:

(a) ONE ``python -m pgtls_helpers probe --json`` process given 50 ``127.0.0.1:PORT`` arguments;
(b) a shell loop of 50 ``openssl s_client -starttls postgres -showcerts`` processes;

and prints both wall times and their ratio (goal: at least 10x). It also prints, inside one
Python process, the sequential time of one :func:`probe` next to the floor it cannot beat on
this machine (see :func:`_floor`). Run::

    .venv/bin/python bench/bench_probe.py [--targets 50] [--repeat 5]

It prints figures; it asserts nothing beyond both tools seeing the served chain.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography.hazmat.primitives import hashes

from pgtls_helpers.errors import PgtlsError
from pgtls_helpers.lab import LabCA, LabCluster
from pgtls_helpers.postgres.probe import probe
from pgtls_helpers.postgres.wire import SSL_REQUEST, context

REPO = Path(__file__).resolve().parents[1]
GOAL = 10.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=int, default=50, help="host:port arguments / processes")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement (median)")
    args = parser.parse_args(argv)
    if args.targets < 1 or args.repeat < 1:
        parser.error("--targets and --repeat must be at least 1")
    if shutil.which("openssl") is None:
        print("openssl is not on PATH; the comparison cannot be run.", file=sys.stderr)
        return 2
    try:
        cluster = LabCluster.create()
    except PgtlsError as exc:
        print(f"no throwaway cluster: {exc}", file=sys.stderr)
        return 2
    try:
        cluster.start()
        ca = LabCA.create()
        key, leaf = ca.issue(["localhost", "127.0.0.1"])
        served = [leaf, *ca.intermediates]
        cluster.serve_certificate(key, served)
        want = [c.fingerprint(hashes.SHA256()).hex() for c in served]
        return _run(cluster, want, args.targets, args.repeat)
    finally:
        cluster.remove()


def _run(cluster: LabCluster, want: list[str], n: int, repeat: int) -> int:
    target = f"{cluster.host}:{cluster.port}"
    ours = [sys.executable, "-m", "pgtls_helpers", "probe", "--json", *[target] * n]
    one_openssl = (
        f"openssl s_client -starttls postgres -connect {target} -showcerts "
        "</dev/null >/dev/null 2>&1"
    )
    theirs = ["sh", "-c", f"i=0; while [ $i -lt {n} ]; do {one_openssl}; i=$((i+1)); done"]

    # Both tools must see the served chain before either is timed. The first run of ours also
    # compiles the package's bytecode, as any first run does where PYTHONDONTWRITEBYTECODE is
    # not set; the timed runs then start the way an installed command starts.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    out = subprocess.run(ours, capture_output=True, text=True, cwd=REPO, env=env, check=False)
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    if (
        out.returncode != 0
        or len(lines) != n
        or any([row["sha256"] for row in obj["chain"]] != want for obj in lines)
    ):
        print(f"pgtls probe did not see the served chain: {out.stderr.strip()}", file=sys.stderr)
        return 1
    shown = subprocess.run(
        ["openssl", "s_client", "-starttls", "postgres", "-connect", target, "-showcerts"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    if len(re.findall("-----BEGIN CERTIFICATE-----", shown)) != len(want):
        print("openssl s_client did not show the served chain", file=sys.stderr)
        return 1

    ours_runs: list[tuple[float, float]] = []
    theirs_runs: list[tuple[float, float]] = []
    for _ in range(repeat):  # interleaved, so that other load on the machine hits both
        ours_runs.append(_timed(ours))
        theirs_runs.append(_timed(theirs))
    ours_t, ours_cpu = _medians(ours_runs)
    theirs_t, theirs_cpu = _medians(theirs_runs)
    startup_t, _ = _medians([_timed([sys.executable, "-c", "pass"]) for _ in range(repeat)])
    single_t, _ = _medians([_timed(ours[: len(ours) - n + 1]) for _ in range(repeat)])

    seq_probe, seq_floor, server_cpu = _in_process(cluster, n)

    cores = os.cpu_count() or 1
    ratio = theirs_t / ours_t
    verdict = "met" if ratio >= GOAL else "NOT met"

    def line(label: str, value: str, note: str = "") -> None:
        print(f"  {label:<46}{value:>10}{'   ' + note if note else ''}")

    def ms(seconds: float, digits: int = 1) -> str:
        return f"{seconds * 1000:.{digits}f} ms"

    print(
        f"{n} probes of {target}: PostgreSQL lab cluster, {len(want)} certificates presented, "
        f"{lines[0]['tls_version']}; {cores} cores; medians of {repeat} runs"
    )
    line(
        f"(a) pgtls probe, one process, {n} arguments",
        ms(ours_t),
        f"client CPU {ms(ours_cpu)}, fastest run {ms(min(w for w, _ in ours_runs))}",
    )
    line(
        f"(b) openssl s_client, {n} processes",
        ms(theirs_t),
        f"client CPU {ms(theirs_cpu)}, fastest run {ms(min(w for w, _ in theirs_runs))}",
    )
    line("ratio (b)/(a)", f"{ratio:.1f}x", f"goal {GOAL:g}x: {verdict}")
    print("where (a) goes")
    line("python start-up alone (python -c pass)", ms(startup_t))
    line("pgtls probe with one argument", ms(single_t))
    line(
        f"server CPU for {n} connections, over {cores} cores",
        ms(server_cpu * n / cores),
        "a backend forks, handshakes and exits per probe",
    )
    print(f"in one process, sequential, per probe (mean of {n})")
    line("probe()", ms(seq_probe, 2))
    line(
        "floor: connect + SSLRequest + handshake",
        ms(seq_floor, 2),
        "python ssl, no chain, no parsing",
    )
    line("server CPU per connection", ms(server_cpu, 2), "partly alongside the client's")
    line("probe() / floor", f"{seq_probe / seq_floor:.2f}x")
    return 0


def _timed(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, with its children) of one process."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    _, _, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = 0  # reaped above
    return wall, usage.ru_utime + usage.ru_stime


def _medians(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)


def _wall(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _floor(host: str, port: int, ctx: ssl.SSLContext) -> None:
    """The least a probe can do: connect, SSLRequest, full TLS handshake, close_notify.

    Same socket options and context as :func:`probe`, but no chain extraction, no certificate
    parsing, no result object. Its time is mostly the server's: PostgreSQL forks a backend per
    connection and that backend does the server half of the handshake, on the same two cores.
    """
    with socket.create_connection((host, port), timeout=5) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.sendall(SSL_REQUEST)
        if raw.recv(1) != b"S":
            raise RuntimeError("the server refused SSL")
        tls = ctx.wrap_socket(raw)
        tls.setblocking(False)
        try:
            tls.unwrap()
        except ssl.SSLError:
            pass
        tls.close()


def _in_process(cluster: LabCluster, n: int) -> tuple[float, float, float]:
    """Mean sequential seconds per probe(), per floor handshake, and server CPU per connection."""

    ctx = context()
    host, port = cluster.host, cluster.port
    for _ in range(3):  # warm: imports, first connections
        probe(host, port)
        _floor(host, port, ctx)
    probe_s: list[float] = []
    floor_s: list[float] = []
    for _ in range(n):  # interleaved again
        probe_s.append(_wall(lambda: probe(host, port)))
        floor_s.append(_wall(lambda: _floor(host, port, ctx)))
    connections = max(200, n)  # CPU time is counted in clock ticks (10 ms): take many
    cpu_before = _server_cpu(cluster)
    for _ in range(connections):
        _floor(host, port, ctx)
    time.sleep(0.2)  # the postmaster reaps its backends, which adds their CPU to its children's
    server = (_server_cpu(cluster) - cpu_before) / connections
    return statistics.fmean(probe_s), statistics.fmean(floor_s), server


def _server_cpu(cluster: LabCluster) -> float:
    """User + system CPU seconds of the postmaster and its reaped children (the backends)."""
    pid = (cluster.pgdata / "postmaster.pid").read_text().split()[0]
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    sys.exit(main())
