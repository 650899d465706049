"""run-due dispatch throughput: N trivial Python entry-point tasks and N trivial command tasks.

    python bench/bench_run_due.py [--quick] [-n 10000] [--commands 1000] [--parallel P]

Each figure is one `kmpwm run-due --json` process over a fresh journal (the tasks enqueued
beforehand in one batch, not timed); the JSON is checked (every task ran and succeeded).
- Python tasks (the built-in `echo` worker, warm pool of host processes): goal at least 1,000
  tasks/s on 2 cores;
- command tasks (`/bin/true` from config.toml): bounded by fork/exec; the floor is this process
  starting the same number of `/bin/true` with the same parallelism, stdout/stderr on pipes, via
  subprocess.Popen -- plainly, and through `setpriv --pdeathsig KILL --` as run-due does on Linux.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

from common import KMPWM, Row, Stat, bench_env, drop_home, fresh_home, run_process, say, section, write_config


def _home(n: int, worker: str) -> str:
    from kmpwm import Scheduler

    home = fresh_home()
    if worker == "true":
        write_config(home, f'[workers.true]\ncommand = ["{shutil.which("true")}"]\n')
    s = Scheduler(home)
    with s.batch():
        for i in range(n):
            s.enqueue(f"t{i}", None, worker)
    return home


def run(n: int, worker: str, parallel: int | None) -> tuple[float, int]:
    import orjson

    home = _home(n, worker)
    args = KMPWM + ["run-due", "--json"]
    if parallel:
        args += ["--parallel", str(parallel)]
    r = run_process(args, bench_env(home), capture=True, peak=True)
    ran = orjson.loads(r.stdout)["ran"]
    bad = [x for x in ran if x["status"] != "SUCCESS"]
    if len(ran) != n or bad:
        raise SystemExit(f"expected {n} successes, got {len(ran)} runs, {len(bad)} not successful: {bad[:2]}")
    drop_home(home)
    return r.wall, r.maxrss_kb


def fork_exec_floor(n: int, parallel: int, prefix: list[str]) -> float:
    true = shutil.which("true")
    running: list[subprocess.Popen] = []
    t0 = time.perf_counter()
    started = 0
    while started < n or running:
        while started < n and len(running) < parallel:
            running.append(
                subprocess.Popen(
                    prefix + [true],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                    close_fds=True,
                )
            )
            started += 1
        p = running.pop(0)
        p.communicate()
    return time.perf_counter() - t0


def rows(quick: bool = False, n: int | None = None, n_cmd: int | None = None, parallel: int | None = None) -> list[Row]:
    n = n or (2000 if quick else 10_000)
    n_cmd = n_cmd or (300 if quick else 1000)
    reps = 1 if quick else 3
    par = parallel or os.cpu_count() or 1
    py, cmd, rss = Stat(), Stat(), []
    say(f"dispatch: {reps} run(s) of {n:,} Python tasks and of {n_cmd:,} command tasks (parallel {par})")
    for _ in range(reps):
        wall, kb = run(n, "echo", parallel)
        py.add(wall)
        rss.append(kb)
        say(f"    python: {n / wall:,.0f} tasks/s")
        wall, _ = run(n_cmd, "true", parallel)
        cmd.add(wall)
        say(f"    command: {n_cmd / wall:,.0f} tasks/s")
    setpriv = shutil.which("setpriv")
    floor, floor_sp = Stat(), Stat()
    for _ in range(reps):
        floor.add(fork_exec_floor(n_cmd, par, []))
        if setpriv:
            floor_sp.add(fork_exec_floor(n_cmd, par, [setpriv, "--pdeathsig", "KILL", "--"]))
    py_rate, cmd_rate = n / py.median, n_cmd / cmd.median
    fl_rate = n_cmd / floor.median
    out = [section(f"Dispatch (one run-due process, parallel {par}; median of {reps})")]
    out.append(
        Row(
            f"run-due over {n:,} trivial Python tasks",
            f"{py_rate:,.0f} tasks/s",
            ">= 1,000 tasks/s",
            py_rate / 1000,
            "figure / goal (>= 1 meets)",
            f"{py.median:.2f} s wall, {py.median * 1000 / n:.2f} ms/task; peak RSS "
            f"{sorted(rss)[len(rss) // 2] / 1024:.0f} MiB; {py.spread(1, 's')}",
        )
    )
    out.append(
        Row(
            f"run-due over {n_cmd:,} command tasks (/bin/true)",
            f"{cmd_rate:,.0f} tasks/s",
            "~ fork/exec floor",
            cmd_rate / fl_rate,
            "figure / floor (1 = at the floor)",
            f"{cmd.median * 1000 / n_cmd:.2f} ms/task; {cmd.spread(1, 's')}",
        )
    )
    out.append(
        Row(
            "floor: Popen /bin/true, same parallelism",
            f"{fl_rate:,.0f} tasks/s",
            "(floor)",
            None,
            "",
            f"{floor.median * 1000 / n_cmd:.2f} ms/task",
        )
    )
    if setpriv:
        sp_rate = n_cmd / floor_sp.median
        out.append(
            Row(
                "floor: Popen setpriv --pdeathsig KILL -- /bin/true",
                f"{sp_rate:,.0f} tasks/s",
                "(floor)",
                cmd_rate / sp_rate,
                "run-due / this floor",
                f"{floor_sp.median * 1000 / n_cmd:.2f} ms/task: run-due's prefix on Linux (two execs per task)",
            )
        )
    return out


if __name__ == "__main__":
    import argparse

    from common import loadavg, print_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("-n", type=int, default=None, help="Python tasks (default 10,000)")
    ap.add_argument("--commands", type=int, default=None, help="command tasks (default 1,000)")
    ap.add_argument("--parallel", type=int, default=None)
    args = ap.parse_args()
    say(loadavg())
    r = rows(args.quick, args.n, args.commands, args.parallel)
    print(loadavg())
    print_table("kmpwm dispatch", r)
