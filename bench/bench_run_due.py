"""run-due dispatch throughput: N trivial Python entry-point tasks and N trivial command tasks.

    python bench/bench_run_due.py [-n 1000] [--parallel P]

Each figure is one `kmpwm run-due` process over a fresh journal (enqueued beforehand in one
batch, not timed). Prints tasks per second and the wall time per task.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time


def fresh_home(command: bool) -> str:
    home = tempfile.mkdtemp(prefix="kmpwm-bench-")
    os.chmod(home, 0o700)
    if command:
        path = os.path.join(home, "config.toml")
        with open(path, "w") as fh:
            fh.write(f'[workers.true]\ncommand = ["{shutil.which("true")}"]\n')
        os.chmod(path, 0o600)
    return home


def run(n: int, worker: str, parallel: int | None) -> float:
    from kmpwm import Scheduler

    home = fresh_home(worker == "true")
    s = Scheduler(home)
    with s.batch():
        for i in range(n):
            s.enqueue(f"t{i}", None, worker)
    args = [sys.executable, "-m", "kmpwm", "run-due", "--json"]
    if parallel:
        args += ["--parallel", str(parallel)]
    t0 = time.perf_counter()
    out = subprocess.run(args, env=dict(os.environ, KMPWM_HOME=home), capture_output=True, check=True)
    wall = time.perf_counter() - t0
    import json

    ran = json.loads(out.stdout)["ran"]
    bad = [r for r in ran if r["status"] != "SUCCESS"]
    if len(ran) != n or bad:
        raise SystemExit(f"expected {n} successes, got {len(ran)} runs, {len(bad)} not successful")
    shutil.rmtree(home, ignore_errors=True)
    return wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--parallel", type=int, default=None)
    args = ap.parse_args()
    print(f"{'tasks':28} {'n':>6} {'wall s':>8} {'tasks/s':>9} {'ms/task':>8}")
    for label, worker in (("python entry point (echo)", "echo"), ("command (/bin/true)", "true")):
        wall = run(args.n, worker, args.parallel)
        print(f"{label:28} {args.n:6d} {wall:8.2f} {args.n / wall:9.0f} {wall * 1000 / args.n:8.2f}")
    print(f"parallel: {args.parallel or os.cpu_count()} (default: CPUs); goal: >= 500 Python tasks/s on 2 cores")


if __name__ == "__main__":
    main()
