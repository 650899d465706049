"""The run-output retention sweep (storage.runlog.sweep) rewrites the index with what it keeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from kmpwm.storage import runlog
from kmpwm.storage.paths import resolve


def test_a_kept_run_whose_runner_died_gets_an_end_line_with_a_time(home):
    """A run whose run-due was killed has a start line only; the sweep writes its end (EXPIRED)
    with the time its output was last written, never ``"at": null``."""
    paths = resolve(home)
    d = runlog.runs_dir(paths)
    d.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    lines = [
        {"s": "k1", "id": "old", "attempt": 1, "at": 1000.0, "pid": pid, "token": "x"},
        {"e": "k1", "id": "old", "status": "SUCCEEDED", "at": 1001.0, "truncated": False},
        {"s": "k2", "id": "cut", "attempt": 1, "at": 5000.0, "pid": pid, "token": "x"},
    ]
    (d / runlog.INDEX).write_text("".join(json.dumps(x) + "\n" for x in lines))
    (d / "k2.out").write_text("half a line")
    os.utime(d / "k2.out", (5007.0, 5007.0))
    assert runlog.sweep(paths, cutoff=2000.0, keep=0) == 1  # the old run goes, the cut one stays
    kept = [json.loads(x) for x in (d / runlog.INDEX).read_text().splitlines()]
    assert [x.get("s") or x.get("e") for x in kept] == ["k2", "k2"]
    end = kept[1]
    assert end["status"] == "EXPIRED" and end["at"] == 5007.0
