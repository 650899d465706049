"""Helper process of bench_history: run kmpwm's compaction on a home and report its phases.

    python bench/_compact_probe.py HOME

Prints one JSON line: wall-clock times (time.time()) of the start, of taking and releasing the
journal lock, and of the end, plus compaction's own stats and this process's peak RSS.  The lock
times come from wrapping Journal.locked (nothing in kmpwm is changed on disk).
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import time


def main() -> None:
    home = sys.argv[1]
    from kmpwm.storage import journal
    from kmpwm.storage.compaction import compact
    from kmpwm.storage.paths import resolve

    marks: dict = {"start": time.time()}
    original = journal.Journal.locked

    @contextlib.contextmanager
    def locked(self, timeout=None):
        with original(self, timeout):
            if self._lock_depth == 1 and "locked" not in marks:
                marks["locked"] = time.time()
            try:
                yield
            finally:
                if self._lock_depth == 1 and "locked" in marks and "unlocked" not in marks:
                    marks["unlocked"] = time.time()

    journal.Journal.locked = locked
    stats = compact(resolve(home))
    marks["end"] = time.time()
    marks["stats"] = stats
    # VmHWM, not ru_maxrss: this process was started with vfork by a big bench process, whose RSS
    # high-water mark Linux folds into ru_maxrss at exec (see common.PEAK_WRAPPER)
    try:
        with open("/proc/self/status") as fh:
            marks["maxrss_kb"] = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        marks["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(marks))


if __name__ == "__main__":
    main()
