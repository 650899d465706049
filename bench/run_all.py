"""The benchmark suite: one table of figures, each with its goal and a ratio.

    python bench/run_all.py [--quick] [--only startup,enqueue,dispatch,memory,history]

Figures, not pass/fail: each row says what was measured (medians; process figures are whole
processes), the goal from the issue, and a ratio whose meaning is given in the row ("x / floor",
"figure / goal", ...).  The load average is printed before and after each part, since the machine
is shared.  The full suite takes 11-15 minutes on 2 cores (most of it the 1,000,000-record
history); --quick is a smoke test with small sizes and few runs whose figures are not the goals'.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import ROOT, Row, loadavg, print_table, say  # noqa: E402

PARTS = ("startup", "enqueue", "dispatch", "memory", "history")


def _commit() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "kmpwm"], capture_output=True, text=True
        ).stdout.strip()
        return rev + (" (kmpwm/ modified)" if dirty else "")
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description="kmpwm benchmark suite")
    ap.add_argument("--quick", action="store_true", help="small sizes, few runs: a smoke test of the suite")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts among {','.join(PARTS)}")
    args = ap.parse_args()
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    import kmpwm

    head = (
        f"kmpwm {kmpwm.__version__} @ {_commit()}; Python {platform.python_version()}; "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M:%S')}"
        + ("; QUICK (smoke test sizes)" if args.quick else "")
    )
    print(head)
    print(f"start: {loadavg()}")
    sys.stdout.flush()
    rows: list[Row] = []
    t_all = time.perf_counter()
    for part in parts:
        before = loadavg()
        say(f"== {part} ({before})")
        t0 = time.perf_counter()
        if part == "startup":
            import bench_startup as mod
        elif part == "enqueue":
            import bench_enqueue as mod
        elif part == "dispatch":
            import bench_run_due as mod
        elif part == "memory":
            import bench_memory as mod
        else:
            import bench_history as mod
        part_rows = mod.rows(quick=args.quick)
        after = loadavg()
        part_rows[0].note = f"[{before.split(' on ')[0]} -> {after.split(' on ')[0]}; {time.perf_counter() - t0:.0f} s]"
        rows += part_rows
    print(f"end: {loadavg()}; suite took {time.perf_counter() - t_all:.0f} s")
    print_table("kmpwm benchmarks (figures are medians; ratio as stated per row)", rows)


if __name__ == "__main__":
    main()
