"""On the control machine: unpack a host's record and write the fleet's notes.

Called by the fleet's playbooks with the playbook's own Python (standard library only):

    receive.py run NOTE_JSON RUNS_DIR            records/<change>/fleet-runs/<run>.json
    receive.py host NOTE_JSON HOST_DIR [TAR [CSR_OUT]]
        unpacks TAR (<stamp>/ and, in phase 1, server.csr or the clients' CSRs) into
        HOST_DIR/<stamp>/ and CSR_OUT, and writes HOST_DIR/<stamp>.fleet.json (or
        <run>-no-record.fleet.json)

CSR_OUT is the file for server.csr (fleet/pgtls.yml: csr/<change>/<host>.csr), or the folder
for the clients' CSRs (fleet/clients.yml: clients/<os_user>/postgresql.csr in the tar becomes
csr/<change>/<host>/<os_user>.csr).
"""

from __future__ import annotations

import json
import os
import re
import sys
import tarfile
from pathlib import Path


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# a client's CSR in the tar; the OS user's name becomes a file name on the control machine, so
# it may hold no separator and not start with a dot
_CLIENT_CSR = re.compile(r"clients/([A-Za-z0-9_][A-Za-z0-9_.-]*)/postgresql\.csr")


def _csr_target(member: str, csr_out: Path) -> Path | None:
    """Where a CSR entry of the tar goes on the control machine; None for any other entry."""
    if member == "server.csr":
        return csr_out
    client = _CLIENT_CSR.fullmatch(member)
    return csr_out / f"{client.group(1)}.csr" if client else None


def _unpack(tar_path: Path, host_dir: Path, csr_out: Path | None) -> None:
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            name = Path(member.name)
            if name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir()):
                raise SystemExit(f"receive.py: {tar_path}: refusing the entry {member.name}")
            if member.name == "server.csr" or member.name.startswith("clients/"):
                target = _csr_target(member.name, csr_out) if csr_out is not None else None
                if target is not None and member.isfile():
                    data = tar.extractfile(member)
                    assert data is not None
                    _write(target, data.read().decode())
                continue
            if hasattr(tarfile, "data_filter"):  # Python 3.11.4 and later
                tar.extract(member, host_dir, filter="data")
            else:
                tar.extract(member, host_dir)
    tar_path.unlink()


def main(argv: list[str]) -> int:
    kind, note = argv[0], json.loads(argv[1])
    if kind == "run":
        _write(Path(argv[2]) / f"{note['run']}.json", json.dumps(note, indent=2) + "\n")
        return 0
    host_dir = Path(argv[2])
    host_dir.mkdir(parents=True, exist_ok=True)
    stamp = note.get("record") or None
    if stamp and len(argv) > 3:
        _unpack(Path(argv[3]), host_dir, Path(argv[4]) if len(argv) > 4 and argv[4] else None)
    name = stamp or f"{note['run']}-no-record"
    _write(host_dir / f"{name}.fleet.json", json.dumps(note, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
