"""On the control machine: unpack a host's record and write the fleet's notes.

Called by fleet/pgtls.yml and fleet/rollback.yml with the playbook's own Python (standard
library only):

    receive.py run NOTE_JSON RUNS_DIR            records/<change>/fleet-runs/<run>.json
    receive.py host NOTE_JSON HOST_DIR [TAR [CSR_OUT]]
        unpacks TAR (<stamp>/ and, in phase 1, server.csr) into HOST_DIR/<stamp>/ and CSR_OUT,
        and writes HOST_DIR/<stamp>.fleet.json (or <run>-no-record.fleet.json)
"""

from __future__ import annotations

import json
import os
import sys
import tarfile
from pathlib import Path


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _unpack(tar_path: Path, host_dir: Path, csr_out: Path | None) -> None:
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            name = Path(member.name)
            if name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir()):
                raise SystemExit(f"receive.py: {tar_path}: refusing the entry {member.name}")
            if member.name == "server.csr":
                if csr_out is not None:
                    data = tar.extractfile(member)
                    assert data is not None
                    _write(csr_out, data.read().decode())
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
