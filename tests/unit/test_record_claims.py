"""A record being written is never sealed by another run, from the instant it exists.

Real processes: one creates a record (as a change, a rollback or an interactive session does)
and keeps writing it; others look for killed runs' records to seal, all at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from pgtls_helpers.runbook import interrupt
from pgtls_helpers.runbook import record as rec
from pgtls_helpers.runbook.params import Params

ROOT = Path(__file__).resolve().parents[2]


def _params(tmp_path: Path) -> Params:
    return Params(
        change_id="CHG-claims", common_name="db1.example.com", work_dir=str(tmp_path / "w")
    )


def _child(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_a_live_record_is_left_alone_and_a_killed_ones_sealed_once(tmp_path: Path) -> None:
    records = tmp_path / "records"
    writer = _child(
        f"""
        import sys, time
        from pathlib import Path
        from pgtls_helpers.runbook.record import new_record_dir
        path, _ = new_record_dir(Path({str(records)!r}), "CHG-claims")
        print(path, flush=True)
        time.sleep(60)
        """
    )
    try:
        assert writer.stdout is not None
        live = Path(writer.stdout.readline().strip())
        mine, _ = rec.new_record_dir(records, "CHG-claims")
        assert (
            interrupt.seal_unfinished(records, "CHG-claims", _params(tmp_path), exclude=mine) == []
        )
        assert not (live / "manifest.json").exists()
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        if writer.stdout is not None:
            writer.stdout.close()
    # four runs of the change start at once after the kill: one of them seals the record
    sealers = [
        _child(
            f"""
            from pathlib import Path
            from pgtls_helpers.runbook import interrupt
            from pgtls_helpers.runbook.params import Params
            p = Params(change_id="CHG-claims", common_name="db1.example.com",
                       work_dir={str(tmp_path / "w")!r})
            r = Path({str(records)!r})
            print(len(interrupt.seal_unfinished(r, "CHG-claims", p, exclude=Path({str(mine)!r}))))
            """
        )
        for _ in range(4)
    ]
    counts = []
    for s in sealers:
        out, _ = s.communicate(timeout=60)
        assert s.returncode == 0
        counts.append(int(out.strip()))
    assert sorted(counts) == [0, 0, 0, 1]
    sealed = json.loads((live / "manifest.json").read_text())
    assert sealed["outcome"] == "interrupted"
    # this process's own record is still unsealed and still claimed
    assert not (mine / "manifest.json").exists()
    rec.release(mine)
    assert interrupt.seal_unfinished(
        records, "CHG-claims", _params(tmp_path), exclude=tmp_path
    ) == [mine]
    assert oct(os.stat(mine / "manifest.json").st_mode & 0o777) == "0o444"
