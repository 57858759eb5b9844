"""How long checking a CA response takes: ``pgtls chain inspect`` against the article's method.

The article orders a chain by running ``openssl x509 -noout -subject -issuer`` once per
certificate and comparing the lines by eye, and matches the key by hashing two ``-modulus``
outputs. This benchmark times, on the same inputs:

(a) the article's four-certificate chain (RootCA -> IntermediateCA_BAR -> IntermediateCA_FOO ->
    an RSA 4096 server certificate), and
(b) a bag of at least 1,000 certificate files: this machine's CA store plus generated
    article-shaped chains, with the server certificate of (a) among them,

each both ways, as whole processes, and prints the ratios. It also times the four-certificate
inspection inside one Python process (goal: under 50 ms). Run::

    .venv/bin/python bench/bench_chain.py [--repeat 3] [--store /etc/ssl/certs] [--files 1000]

It prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from pgtls_helpers.lab import LabCA

HOST = "db1.example.com"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--store", default="/etc/ssl/certs", help="the machine's CA store")
    parser.add_argument("--files", type=int, default=1000, help="certificate files in the bag")
    parser.add_argument(
        "--article-repeat",
        type=int,
        default=1,
        help="runs of the article's method on the bag (slow)",
    )
    args = parser.parse_args(argv)
    if shutil.which("openssl") is None:
        print("openssl is not on PATH; the article's method cannot be timed.", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="pgtls-bench-") as tmp:
        work = Path(tmp)
        chain_dir, key_path = _article_chain(work / "article")
        chain_files = sorted(chain_dir.iterdir())
        bag = work / "bag"
        n_store, n_generated = _bag(bag, chain_files, Path(args.store), args.files)
        bag_files = sorted(p for p in bag.iterdir() if p.is_file())
        leaf = chain_dir / f"{HOST}.crt"

        print(f"openssl: {_run(['openssl', 'version']).strip()}")
        print(f"python:  {sys.version.split()[0]}; cores: {os.cpu_count()}")
        print(
            f"bag:     {len(bag_files)} files ({n_store} from {args.store}, "
            f"{n_generated} generated, 4 of the article's chain)\n"
        )

        ours_cmd = [sys.executable, "-m", "pgtls_helpers", "chain", "inspect"]
        rows = []
        four_ours = _median(
            args.repeat,
            lambda: _timed_process(
                [
                    *ours_cmd,
                    *map(str, chain_files),
                    "--key",
                    str(key_path),
                    "--host",
                    HOST,
                    "--json",
                ]
            ),
        )
        four_article = _median(args.repeat, lambda: _article_method(chain_files, leaf, key_path))
        rows.append(("(a) article's chain, 4 files", four_article, four_ours))

        bag_ours = _median(
            args.repeat,
            lambda: _timed_process(
                [*ours_cmd, str(bag), "--key", str(key_path), "--host", HOST, "--json"]
            ),
        )
        bag_article = _median(
            args.article_repeat, lambda: _article_method(bag_files, leaf, key_path)
        )
        rows.append((f"(b) bag, {len(bag_files)} files", bag_article, bag_ours))

        print(f"{'input':<32} {'article (s)':>12} {'pgtls (s)':>10} {'ratio':>8}")
        for label, article, ours in rows:
            print(f"{label:<32} {article:>12.3f} {ours:>10.3f} {article / ours:>7.1f}x")
        per_cert = bag_article / len(bag_files)
        print(f"\narticle's method: {per_cert * 1000:.1f} ms per certificate")
        print(f"bag goal: at least 50x -> {'met' if bag_article / bag_ours >= 50 else 'NOT met'}")

        in_proc = _in_process(chain_files, key_path)
        bag_in_proc = _in_process([bag], key_path, runs=5)
        print(
            f"\nin-process, four-certificate inspection: median {in_proc * 1000:.1f} ms "
            f"(goal < 50 ms -> {'met' if in_proc < 0.05 else 'NOT met'})"
        )
        print(f"in-process, bag inspection: median {bag_in_proc * 1000:.1f} ms")
        startup = _median(args.repeat, lambda: _timed_process([sys.executable, "-c", "pass"]))
        print(f"python interpreter start-up alone: {startup * 1000:.0f} ms")
    return 0


# --- inputs ------------------------------------------------------------------------------------


def _article_chain(directory: Path) -> tuple[Path, Path]:
    """The article's files: RootCA.crt, IntermediateCA_BAR/FOO.crt, the server's, server.key."""
    directory.mkdir(parents=True)
    ca = LabCA.create()
    key, leaf = ca.issue([HOST], key_type="rsa4096")
    ca.write_response(leaf, directory)
    key_path = directory.parent / "server.key"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
    return directory, key_path


def _bag(bag: Path, chain_files: list[Path], store: Path, total: int) -> tuple[int, int]:
    """Fill ``bag`` with the store's certificates, the article's chain, and generated chains."""
    bag.mkdir(parents=True)
    n_store = 0
    if store.is_dir():
        for entry in sorted(store.iterdir()):
            # The store's hash links point at the same files as the *.pem names.
            if entry.suffix in (".pem", ".crt") and entry.name != "ca-certificates.crt":
                try:
                    shutil.copyfile(entry, bag / f"store-{entry.name}")
                except OSError:
                    continue
                n_store += 1
    for f in chain_files:
        shutil.copyfile(f, bag / f.name)
    need = max(0, total - n_store - len(chain_files))
    n_chains = math.ceil(need / 4)
    for i in range(n_chains):
        ca = LabCA.create(
            (f"IntermediateCA_BAR {i:04d}", f"IntermediateCA_FOO {i:04d}"),
            root_name=f"RootCA {i:04d}",
        )
        _key, leaf = ca.issue([f"db{i:04d}.example.net"])
        for name, data in ca.response_files(leaf).items():
            (bag / f"{i:04d}-{name.replace(' ', '_')}").write_bytes(data)
    return n_store, 4 * n_chains


# --- the two ways ------------------------------------------------------------------------------


def _article_method(cert_files: Sequence[Path], leaf: Path, key: Path) -> float:
    """One ``openssl x509 -noout -subject -issuer`` per file, then the two modulus hashes."""
    start = time.perf_counter()
    for f in cert_files:
        subprocess.run(
            ["openssl", "x509", "-noout", "-subject", "-issuer", "-in", str(f)],
            capture_output=True,
            check=False,
        )
    subprocess.run(
        f"openssl rsa -noout -modulus -in '{key}' | openssl md5",
        shell=True,
        capture_output=True,
        check=True,
    )
    subprocess.run(
        f"openssl x509 -noout -modulus -in '{leaf}' | openssl md5",
        shell=True,
        capture_output=True,
        check=True,
    )
    return time.perf_counter() - start


def _timed_process(argv: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(argv[:6])} … failed: {proc.stderr.decode()[-300:]}")
    return elapsed


def _in_process(paths: Sequence[Path], key_path: Path, runs: int = 20) -> float:
    from pgtls_helpers.cli.chain import load_key_for_matching
    from pgtls_helpers.pki.chain import order_chain
    from pgtls_helpers.pki.findings import check_chain
    from pgtls_helpers.pki.intake import read_ca_response
    from pgtls_helpers.pki.keys import public_key_matches

    def once() -> float:
        start = time.perf_counter()
        intake = read_ca_response([str(p) for p in paths])
        key = load_key_for_matching(key_path.read_bytes(), None, source=str(key_path))
        certs = [sc.cert for sc in intake.certificates]
        leaf = next((c for c in certs if public_key_matches(key, c)), None)
        result = order_chain(certs, leaf=leaf)
        check_chain(result, key=key, hosts=[HOST])
        return time.perf_counter() - start

    once()  # imports and first-use caches are not what is measured here
    return statistics.median(once() for _ in range(runs))


def _median(n: int, fn: Callable[[], float]) -> float:
    return statistics.median(fn() for _ in range(max(1, n)))


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=False).stdout


if __name__ == "__main__":
    sys.exit(main())
