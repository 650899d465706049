"""Memory (and time) of run-due with many live tasks: peak RSS of `kmpwm run-due` over 100,000
live tasks, reported.

    python bench/bench_memory.py [--quick] [--tasks N]

The live tasks are one-time tasks delayed by a day (nothing is due, so run-due plans over all of
them and runs none), enqueued as one record each (bench/history.py).  Peak RSS is the run-due
process's own VmHWM (common.PEAK_WRAPPER; pool hosts not included).  Rows: the first
run-due (no snapshot yet: it folds the journal, writes a snapshot, and automatic compaction
rewrites the journal), then the steady state (median of several), against an idle run-due over an
empty home; and `kmpwm enqueue` of one more task with that many live tasks.
"""

from __future__ import annotations

import os

import history
from common import (
    CACHE,
    KMPWM,
    Row,
    bench_env,
    fmt_bytes,
    fmt_ms,
    fresh_home,
    interleaved,
    run_process,
    say,
    section,
)


def rows(quick: bool = False, tasks: int | None = None) -> list[Row]:
    tasks = tasks or (20_000 if quick else 100_000)
    rounds = 3 if quick else 10
    CACHE.mkdir(mode=0o700, exist_ok=True)
    path = str(CACHE / f"live-{tasks}.log")
    info = history.build(path, 0, live=tasks, live_chains=0)
    say(f"memory: {tasks:,} live tasks ({fmt_bytes(info['bytes'])} of journal)")
    home = fresh_home()
    history.install(home, path)
    env = bench_env(home)
    empty = fresh_home()
    empty_env = bench_env(empty)
    run_process(KMPWM + ["enqueue", "later", "echo", "--delay", "1d"], empty_env)
    first = run_process(KMPWM + ["run-due"], env, peak=True)
    jdir = os.path.join(home, "journal")
    snap = os.path.getsize(os.path.join(jdir, "state.snap")) if os.path.exists(os.path.join(jdir, "state.snap")) else 0
    rss: dict[str, list] = {"live": [], "empty": []}

    def idle(key, e):
        def fn():
            r = run_process(KMPWM + ["run-due"], e, peak=True)
            rss[key].append(r.maxrss_kb)
            return r.wall

        return fn

    say(f"  idle run-due, {rounds} interleaved rounds")
    st = interleaved({"live": idle("live", env), "empty": idle("empty", empty_env)}, rounds)
    n = iter(range(10**9))
    en = interleaved(
        {
            "live": lambda: run_process(KMPWM + ["enqueue", f"x{next(n)}", "echo", "--delay", "1d"], env).wall,
            "empty": lambda: run_process(KMPWM + ["enqueue", f"x{next(n)}", "echo", "--delay", "1d"], empty_env).wall,
        },
        max(3, rounds // 2),
        warmup=0,
    )
    os.unlink(path)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    live_kb, empty_kb = med(rss["live"]), med(rss["empty"])
    out = [section(f"Memory: run-due with {tasks:,} live tasks (nothing due)")]
    out.append(
        Row(
            f"peak RSS, idle run-due, {tasks:,} live tasks",
            f"{live_kb / 1024:.0f} MiB",
            "(reported)",
            live_kb / empty_kb,
            "/ empty home",
            f"empty home {empty_kb / 1024:.0f} MiB; snapshot {fmt_bytes(snap)}",
        )
    )
    out.append(
        Row(
            "  first run (no snapshot; folds, snapshots, compacts)",
            f"{first.maxrss_kb / 1024:.0f} MiB",
            "(reported)",
            first.maxrss_kb / empty_kb,
            "/ empty home",
            f"{first.wall:.2f} s wall",
        )
    )
    out.append(
        Row(
            f"  wall, idle run-due, {tasks:,} live tasks",
            fmt_ms(st["live"].median),
            "(reported)",
            st["live"].median / st["empty"].median,
            "/ empty home",
            f"empty {fmt_ms(st['empty'].median)}; {st['live'].spread()}",
        )
    )
    out.append(
        Row(
            f"  wall, enqueue one task beside {tasks:,} live",
            fmt_ms(en["live"].median),
            "(reported)",
            en["live"].median / en["empty"].median,
            "/ empty home",
            f"empty {fmt_ms(en['empty'].median)}; {en['live'].spread()}",
        )
    )
    return out


if __name__ == "__main__":
    import argparse

    from common import loadavg, print_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tasks", type=int, default=None)
    args = ap.parse_args()
    say(loadavg())
    r = rows(args.quick, args.tasks)
    print(loadavg())
    print_table("kmpwm memory", r)
