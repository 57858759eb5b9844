"""A lab fleet: throwaway clusters on this machine as the inventory hosts ``db1``…``dbN``.

``make fleet-demo`` and the fleet tests use it to run ``fleet/pgtls.yml`` without servers of
their own. Each host is one throwaway cluster (its own port and data directory) reached with
``ansible_connection: local``, and has its own ``pgtls_home`` (parameters, work directory,
records), as a separate machine would. Between the two phases, :func:`sign` plays the CA: one
shared lab CA signs every collected CSR, so a client trusts the whole fleet with one root.

Run as ``python -m pgtls_helpers.lab.fleet up|sign|down --dir DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509

from pgtls_helpers.errors import InputError, PgtlsError
from pgtls_helpers.lab import LabCA, LabCluster

__all__ = ["LAB_CHANGE_ID", "build_wheelhouse", "down", "inventory", "sign", "up"]

LAB_CHANGE_ID = "lab-fleet"
_DOMAIN = "lab.pgtls.test"


def _host_vars(name: str, cluster: LabCluster, home: Path) -> dict[str, Any]:
    return {
        "ansible_connection": "local",
        "ansible_python_interpreter": "/usr/bin/python3",
        "pgtls_python": "/usr/bin/python3",
        # root already; su (which needs no password for root) proves the become path
        "ansible_become_method": "su",
        "pgtls_home": str(home),
        "pgtls_environment": {"PGPASSFILE": str(cluster.passfile)},
        "server_port": cluster.port,
        "server_log_file": str(cluster.log_path),
        "common_name": f"{name}.{_DOMAIN}",
        "subject_alt_names": ["localhost", cluster.host],
    }


def inventory(
    base: Path, clusters: dict[str, LabCluster], *, change_id: str, venv: Path | None = None
) -> dict[str, Any]:
    """The inventory of a lab fleet: common parameters as group vars, the rest per host."""
    return {
        "all": {
            "vars": {
                # where the playbook installs the wheel: one venv serves every lab host, since
                # they are all this machine (a real fleet has one per host)
                "pgtls_venv": str(venv or base / "venv"),
                "change_id": change_id,
                "ca_mode": "files",
                "apply": True,
                "server_host": "127.0.0.1",
                "server_user": "postgres",
                "server_dbname": "postgres",
                "organization": "pgtls lab",
                "organizational_unit": "Databases",
                "key_type": "ecdsa-p256",
                "hba_rules": [
                    {
                        "type": "hostssl",
                        "database": "all",
                        "user": "all",
                        "address": "127.0.0.1/32",
                        "method": "scram-sha-256",
                    }
                ],
                "reject_non_ssl": True,
                "client_system_users": [],
            },
            "children": {
                "pgtls_servers": {
                    "hosts": {
                        name: _host_vars(name, cluster, base / "hosts" / name)
                        for name, cluster in clusters.items()
                    }
                }
            },
        }
    }


def up(
    base: str | Path,
    *,
    hosts: int = 4,
    change_id: str = LAB_CHANGE_ID,
    venv: str | Path | None = None,
) -> Path:
    """Start ``hosts`` throwaway clusters under ``base`` and write ``base/inventory.yml``
    (``venv``: where the hosts' venv goes, by default ``base/venv``)."""
    root = Path(base).resolve()
    if (root / "clusters").exists():
        raise InputError(
            f"{root}: a lab fleet is already there; run 'python -m pgtls_helpers.lab.fleet "
            f"down --dir {base}' first"
        )
    (root / "clusters").mkdir(parents=True, exist_ok=True)
    clusters: dict[str, LabCluster] = {}
    # one initdb, never started, that every host's cluster is a copy of
    template = LabCluster.create(root / "template")
    try:
        for i in range(1, hosts + 1):
            name = f"db{i}"
            cluster = LabCluster.create(root / "clusters" / name, template=template)
            clusters[name] = cluster
            cluster.start()
            (root / "hosts" / name).mkdir(parents=True, exist_ok=True)
    except BaseException:
        for cluster in clusters.values():
            cluster.remove()
        raise
    finally:
        template.remove()
    target = root / "inventory.yml"
    target.write_text(
        "# A lab fleet: throwaway clusters on this machine (python -m pgtls_helpers.lab.fleet)\n"
        + yaml.safe_dump(
            inventory(root, clusters, change_id=change_id, venv=Path(venv) if venv else None),
            sort_keys=False,
        )
    )
    return target


def clusters_of(base: str | Path) -> dict[str, LabCluster]:
    """The lab fleet's clusters by host name."""
    found = sorted((Path(base).resolve() / "clusters").glob("db*"), key=lambda p: int(p.name[2:]))
    return {p.name: LabCluster.attach(p) for p in found if (p / "lab.json").exists()}


def sign(control: str | Path, change_id: str, *, ca: LabCA | None = None) -> dict[str, Path]:
    """Play the CA between the phases: sign ``csr/<change_id>/<host>.csr`` into
    ``ca/<change_id>/<host>/`` with one lab CA; its root also goes to ``ca/<change_id>/root.crt``.
    """
    base = Path(control)
    csrs = sorted((base / "csr" / change_id).glob("*.csr"))
    if not csrs:
        raise InputError(
            f"{base / 'csr' / change_id}: no CSRs to sign; run phase 1 of the fleet first"
        )
    authority = ca or LabCA.create()
    out: dict[str, Path] = {}
    for path in csrs:
        csr = x509.load_pem_x509_csr(path.read_bytes())
        target = base / "ca" / change_id / path.stem
        if target.exists():
            shutil.rmtree(target)
        authority.write_response(authority.sign_csr(csr), target)
        out[path.stem] = target
    from cryptography.hazmat.primitives.serialization import Encoding

    (base / "ca" / change_id / "root.crt").write_bytes(authority.root.public_bytes(Encoding.PEM))
    return out


def build_wheelhouse(
    source: str | Path,
    target: str | Path,
    *,
    python: str | Path | None = None,
    dependencies: str | Path | None = None,
) -> Path:
    """``target`` (a .tar): the pgtls wheel built from the checkout ``source`` and a wheel of
    every dependency, the CA back-ends' (the ``ca`` extra: hvac, acme) among them, so a host
    installs with ``pip --no-index``.

    The dependencies are resolved by ``python``: the hosts' interpreter (or one of the same
    version and platform), run from a throwaway venv so its own packages do not matter. A
    dependency's newest release may need a newer Python than the hosts have (Debian 12 ships
    3.11.2), so resolving with this machine's interpreter is not enough.

    ``dependencies``: a folder that keeps the dependency wheels between builds. Empty or
    missing, the build resolves them and leaves them there; holding wheels, only the pgtls
    wheel is built and those wheels go with it. The caller keys the folder by what the
    dependencies come from (``pyproject.toml`` and ``python``).
    """
    out = Path(target).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = Path(dependencies).resolve() if dependencies is not None else None
    reuse = kept is not None and any(kept.glob("*.whl"))
    with tempfile.TemporaryDirectory(prefix="pgtls-wheels-") as tmp:
        pip = [sys.executable, "-m", "pip"]
        # the pgtls wheel alone is pure Python: only resolving dependencies needs ``python``
        if python is not None and not reuse:
            venv = Path(tmp) / "venv"
            _check_run([str(python), "-m", "venv", str(venv)], f"making a venv with {python}")
            pip = [str(venv / "bin" / "python"), "-m", "pip"]
        wheels = Path(tmp) / "wheels"
        clean = source_copy(Path(source), Path(tmp) / "source")
        _check_run(
            # with the ca extra: a host whose ca_mode is vault or acme installs pgtls[ca]
            [*pip, "wheel", "-q", "-w", str(wheels), f"{clean}[ca]"]
            if not reuse
            else [*pip, "wheel", "-q", "--no-deps", "-w", str(wheels), str(clean)],
            f"building the wheelhouse from {source}",
        )
        if kept is not None:
            own = {w.name for w in wheels.glob("pgtls-*.whl")}
            if reuse:
                for wheel in kept.glob("*.whl"):
                    shutil.copy2(wheel, wheels / wheel.name)
            else:
                partial_dir = kept.with_name(f".{kept.name}.tmp")
                shutil.rmtree(partial_dir, ignore_errors=True)
                partial_dir.mkdir(parents=True)
                for wheel in wheels.glob("*.whl"):
                    if wheel.name not in own:
                        shutil.copy2(wheel, partial_dir / wheel.name)
                shutil.rmtree(kept, ignore_errors=True)
                os.replace(partial_dir, kept)
        partial = out.with_name(f".{out.name}.tmp")
        with tarfile.open(partial, "w") as tar:
            for wheel in sorted(wheels.glob("*.whl")):
                tar.add(wheel, arcname=wheel.name)
        os.replace(partial, out)
    return out


# What a checkout holds besides its source: a build from the checkout itself would reuse a stale
# build/lib (setuptools never deletes from it), and a renamed module would ship twice. The
# scratch folders count only at the top of the checkout (pgtls_helpers/ca/ is source).
_NOT_SOURCE_TOP = (".git", ".venv", "build", "dist", "records", "work", "csr", "ca")
_NOT_SOURCE = ("*.egg-info", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache")


def source_copy(source: Path, dest: Path) -> Path:
    """A copy of the project's source alone, to build a wheel from."""
    caches = shutil.ignore_patterns(*_NOT_SOURCE)
    top = source.resolve()

    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = set(caches(folder, names))
        if Path(folder).resolve() == top:
            skipped |= {n for n in names if n in _NOT_SOURCE_TOP}
        return skipped

    shutil.copytree(source, dest, ignore=ignore, symlinks=True)
    return dest


def _check_run(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise PgtlsError(f"{what} failed: {last}")


def down(base: str | Path) -> None:
    """Stop and remove every cluster of the lab fleet, and the directory."""
    root = Path(base).resolve()
    for cluster in clusters_of(root).values():
        cluster.remove()
    shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pgtls_helpers.lab.fleet")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="start the lab fleet and write its inventory")
    p_up.add_argument("--dir", required=True)
    p_up.add_argument("--hosts", type=int, default=4)
    p_up.add_argument("--change-id", default=LAB_CHANGE_ID)
    p_sign = sub.add_parser("sign", help="sign csr/<change>/*.csr with one lab CA")
    p_sign.add_argument("--control", default=".", help="where csr/ and ca/ are")
    p_sign.add_argument("--change-id", default=LAB_CHANGE_ID)
    p_wheels = sub.add_parser("wheels", help="build the wheelhouse the playbook installs")
    p_wheels.add_argument("--source", default=".", help="the pgtls checkout")
    p_wheels.add_argument("--out", default="dist/pgtls-wheelhouse.tar")
    p_wheels.add_argument("--python", help="the hosts' Python, which resolves the dependencies")
    p_down = sub.add_parser("down", help="stop and remove the lab fleet")
    p_down.add_argument("--dir", required=True)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "up":
            path = up(args.dir, hosts=args.hosts, change_id=args.change_id)
            sys.stdout.write(f"lab fleet of {args.hosts} hosts; inventory: {path}\n")
        elif args.cmd == "sign":
            signed = sign(args.control, args.change_id)
            sys.stdout.write(
                json.dumps({host: str(p) for host, p in signed.items()}, indent=2) + "\n"
            )
        elif args.cmd == "wheels":
            sys.stdout.write(
                f"wheelhouse: {build_wheelhouse(args.source, args.out, python=args.python)}\n"
            )
        else:
            down(args.dir)
    except InputError as exc:
        sys.stderr.write(f"pgtls lab fleet: {exc}\n")
        return 2
    except PgtlsError as exc:
        sys.stderr.write(f"pgtls lab fleet: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
