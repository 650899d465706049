"""History: idle `run-due` (and `enqueue`) must not grow with history; compaction's cost, size
and how long it blocks an enqueuer.

    python bench/bench_history.py [--quick] [--records N] [--first-runs N]

Journals are built directly in the on-disk format (bench/history.py): 1,000,000 records of
history -- 333,333 finished one-time tasks, each an enq, a claim and a result record -- plus a
live set of 100 delayed tasks and 10 delayed three-step chains (nothing is due).  The baseline is
the same live set with no history.

Scenarios, each `kmpwm run-due` as a whole process (median wall; peak RSS in the notes):
- first time: a journal never compacted, no snapshot.  run-due folds the whole journal, writes a
  snapshot, then automatic compaction rewrites the journal.  Few runs (each takes long);
- first time, auto-compaction held off (the header carries a huge ``compacted_size``): the cost of
  the fold alone;
- steady state with a snapshot, not compacted (auto-compaction held off as above);
- steady state after compaction, history older than the retention window (7 days);
- steady state after compaction, the same history all inside the retention window (a busy
  week): compaction must keep it (SPEC 2), so the state keeps 333,333 finished tasks -- in
  journal/history.snap, apart from the hot state run-due reads.
The steady states and the baseline are run round-robin, >= 10 runs each.  Then `kmpwm enqueue`
(one delayed task) in the same homes, and compaction: its time, the size it leaves, and the
longest wait of an enqueuer (the Python API, one enqueue every few ms) while it runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time

import history
from common import (
    BENCH_DIR,
    CACHE,
    KMPWM,
    PYTHON,
    Row,
    Stat,
    bench_env,
    fmt_bytes,
    fmt_ms,
    fresh_home,
    interleaved,
    run_process,
    say,
    section,
)

HELD_OFF = 10**12  # a compacted_size in the header so large that automatic compaction never starts


def _journal(name: str, records: int, **kw) -> tuple[str, dict]:
    CACHE.mkdir(mode=0o700, exist_ok=True)
    path = str(CACHE / f"{name}.log")
    t0 = time.perf_counter()
    info = history.build(path, records, **kw)
    say(f"  built {name}: {info['records']:,} records, {fmt_bytes(info['bytes'])} in {time.perf_counter() - t0:.1f}s")
    return path, info


def _home_with(path: str) -> tuple[str, dict]:
    home = fresh_home()
    history.install(home, path)
    return home, bench_env(home)


def _sizes(home: str) -> tuple[int, int]:
    j = os.path.join(home, "journal")
    snap = os.path.join(j, "state.snap")
    return os.path.getsize(os.path.join(j, "journal.log")), (os.path.getsize(snap) if os.path.exists(snap) else 0)


def _first_runs(path: str, runs: int) -> tuple[Stat, list, str, dict]:
    """`run-due` on fresh copies of a journal without snapshot; returns the last home (now warm)."""
    st, rss = Stat(), []
    home = env = None
    for i in range(runs):
        home, env = _home_with(path)
        r = run_process(KMPWM + ["run-due"], env, peak=True)
        st.add(r.wall)
        rss.append(r.maxrss_kb)
        say(f"    run {i + 1}/{runs}: {r.wall:.1f}s wall, {r.cpu:.1f}s cpu, peak RSS {r.maxrss_kb / 1024:.0f} MiB")
    return st, rss, home, env


def _compaction_with_enqueuer(path: str, snapshot: str) -> dict:
    """Compact in a separate process while this one enqueues (Python API) every ~5 ms."""
    import shutil

    from kmpwm import Scheduler
    from kmpwm.core import triggers

    home, env = _home_with(path)
    # The steady state of a journal never compacted: the snapshot the first run-due wrote for
    # this very journal (same generation and size), so that the enqueuer starts without a fold.
    shutil.copyfile(snapshot, os.path.join(home, "journal", "state.snap"))
    s = Scheduler(home)
    s.store.load()
    delayed = triggers.OneTime(delay=86400)
    lat: list[tuple[float, float]] = []  # (start wall time, seconds)
    lock_waits: list[tuple[float, float]] = []  # (start wall time, seconds waited for the lock)
    n = [0]
    plain_locked = s.store.journal.locked

    @contextlib.contextmanager
    def timed_locked(timeout=None):
        t0w, t0 = time.time(), time.perf_counter()
        with plain_locked(timeout):
            lock_waits.append((t0w, time.perf_counter() - t0))
            yield

    s.store.journal.locked = timed_locked

    def enqueue_once():
        n[0] += 1
        t0w, t0 = time.time(), time.perf_counter()
        s.enqueue(f"during-{n[0]}", delayed, "echo")
        lat.append((t0w, time.perf_counter() - t0))

    for _ in range(30):  # the enqueuer's own latency without compaction
        enqueue_once()
        time.sleep(0.005)
    before = sorted(x for _, x in lat)
    lat.clear()
    lock_waits.clear()
    proc = subprocess.Popen(
        [PYTHON, str(BENCH_DIR / "_compact_probe.py"), home], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    while proc.poll() is None:
        enqueue_once()
        time.sleep(0.005)
    for _ in range(5):
        enqueue_once()
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"compaction failed: {err.decode()[-2000:]}")
    marks = json.loads(out)
    during = [x for t, x in lat if t <= marks["end"]]
    waits = [x for t, x in lock_waits if t <= marks["end"]]
    worst = max(lat, key=lambda tx: tx[1]) if lat else (0.0, 0.0)
    j, snap = _sizes(home)
    return {
        "wall": marks["end"] - marks["start"],
        "lock": marks["unlocked"] - marks["locked"],
        "max_wait": max(waits) if waits else 0.0,
        "max_latency": max(during) if during else 0.0,
        "worst_after_unlock": worst[0] - marks["unlocked"],
        "enqueues": len(during),
        "median_before": before[len(before) // 2],
        "stats": marks["stats"],
        "rss": marks["maxrss_kb"],
        "journal": j,
        "snap": snap,
    }


def rows(
    quick: bool = False, records: int | None = None, first_runs: int | None = None, rounds: int | None = None
) -> list[Row]:
    records = records or (100_000 if quick else 1_000_000)
    first_runs = first_runs or (1 if quick else 3)
    rounds = rounds or (10 if not quick else 3)
    label = f"{records / 1e6:g}M" if records >= 1_000_000 else f"{records // 1000}k"
    say(f"history: building journals of {records:,} records")
    base_path, base_info = _journal("live-only", 0)
    old_path, old_info = _journal(f"history-{label}-old", records)
    held_path, _ = _journal(f"history-{label}-old-held", records, compacted_size=HELD_OFF)
    recent_path, recent_info = _journal(f"history-{label}-recent", records, recent_fraction=1.0)

    say(f"  first run-due, {label} history, no snapshot, auto-compaction on ({first_runs} runs)")
    first, first_rss, old_home, old_env = _first_runs(old_path, first_runs)
    old_j, old_snap = _sizes(old_home)
    say(f"  first run-due, {label} history, no snapshot, auto-compaction held off ({first_runs} runs)")
    fold, fold_rss, held_home, held_env = _first_runs(held_path, first_runs)
    held_j, held_snap = _sizes(held_home)
    held_snap_copy = str(CACHE / "held.snap")  # taken now: later enqueues in held_home may move on
    import shutil

    shutil.copyfile(os.path.join(held_home, "journal", "state.snap"), held_snap_copy)
    held_snap_path = held_snap_copy
    say(f"  first run-due, {label} history inside the retention window (1 run: compacts it)")
    recent_first, recent_rss, recent_home, recent_env = _first_runs(recent_path, 1)
    rec_j, rec_snap = _sizes(recent_home)
    base_home, base_env = _home_with(base_path)

    homes = {"base": base_env, "held": held_env, "old": old_env, "recent": recent_env}
    rss: dict[str, list] = {k: [] for k in homes}

    def idle(key):
        def fn():
            r = run_process(KMPWM + ["run-due"], homes[key], peak=True)
            rss[key].append(r.maxrss_kb)
            return r.wall

        return fn

    say(f"  steady-state idle run-due, {rounds} interleaved rounds")
    st = interleaved({k: idle(k) for k in homes}, rounds, warmup=1)
    counter = iter(range(10**9))

    def enq(key):
        return lambda: run_process(KMPWM + ["enqueue", f"e{next(counter)}", "echo", "--delay", "1d"], homes[key]).wall

    enq_rounds = max(3, rounds // 2)
    say(f"  enqueue (process) in the same homes, {enq_rounds} interleaved rounds")
    en = interleaved({k: enq(k) for k in homes}, enq_rounds, warmup=0)

    comp_runs = 1 if quick else 3
    say(f"  compaction of the {label} journal with a concurrent enqueuer ({comp_runs} runs)")
    comps = []
    for i in range(comp_runs):
        c = _compaction_with_enqueuer(held_path, held_snap_path)
        comps.append(c)
        say(
            f"    run {i + 1}: compaction {c['wall']:.1f}s, lock held {c['lock'] * 1000:.0f} ms, enqueuer's longest "
            f"lock wait {c['max_wait'] * 1000:.0f} ms, longest enqueue {c['max_latency'] * 1000:.0f} ms (started "
            f"{c['worst_after_unlock']:+.2f}s from the unlock) over {c['enqueues']} enqueues "
            f"(alone: {c['median_before'] * 1000:.1f} ms)"
        )

    for f in (base_path, old_path, held_path, recent_path, held_snap_copy):  # rebuilt each run anyway
        try:
            os.unlink(f)
        except OSError:
            pass

    def med(xs):
        return sorted(xs)[len(xs) // 2]

    b = st["base"].median
    mib = lambda kb: f"{kb / 1024:.0f} MiB"  # noqa: E731
    out = [section(f"History: idle run-due, {label} records of history vs none (whole process, median wall)")]
    out.append(
        Row(
            f"baseline: no history ({base_info['live_tasks']} live tasks)",
            fmt_ms(b),
            "(baseline)",
            1.0,
            "",
            f"peak RSS {mib(med(rss['base']))}; {st['base'].spread()}",
        )
    )
    out.append(
        Row(
            f"first run-due, {label} old history, no snapshot",
            f"{first.median:.1f} s",
            "<= 1.1x baseline",
            first.median / b,
            "run / baseline",
            f"fold + snapshot + auto-compaction; peak RSS {mib(med(first_rss))}; "
            f"journal {fmt_bytes(old_info['bytes'])} -> {fmt_bytes(old_j)}; {first.spread(1, 's')}",
        )
    )
    out.append(
        Row(
            "  same, auto-compaction held off (fold only)",
            f"{fold.median:.1f} s",
            "<= 1.1x baseline",
            fold.median / b,
            "run / baseline",
            f"peak RSS {mib(med(fold_rss))}; writes a {fmt_bytes(held_snap)} snapshot; {fold.spread(1, 's')}",
        )
    )
    out.append(
        Row(
            "steady: snapshot, not compacted",
            fmt_ms(st["held"].median),
            "<= 1.1x baseline",
            st["held"].median / b,
            "run / baseline",
            f"hot snapshot {fmt_bytes(held_snap)}; the {old_info['history_tasks']:,} finished tasks are in "
            f"history.snap, which run-due never reads; peak RSS "
            f"{mib(med(rss['held']))}; {st['held'].spread()}",
        )
    )
    out.append(
        Row(
            "steady: after compaction (history > 7 days old)",
            fmt_ms(st["old"].median),
            "<= 1.1x baseline",
            st["old"].median / b,
            "run / baseline",
            f"journal {fmt_bytes(old_j)}, snapshot {fmt_bytes(old_snap)}; peak RSS {mib(med(rss['old']))}; "
            f"{st['old'].spread()}",
        )
    )
    out.append(
        Row(
            "steady: after compaction (history inside 7 days)",
            fmt_ms(st["recent"].median),
            "<= 1.1x baseline",
            st["recent"].median / b,
            "run / baseline",
            f"first run {recent_first.median:.1f} s; journal {fmt_bytes(rec_j)}, snapshot {fmt_bytes(rec_snap)}; "
            f"peak RSS {mib(med(rss['recent']))}; {st['recent'].spread()}",
        )
    )
    out.append(section("History: enqueue (process, one delayed task) in the same homes; SPEC: O(1) in journal size"))
    eb = en["base"].median
    out.append(Row("enqueue, no history", fmt_ms(eb), "(baseline)", 1.0, "", en["base"].spread()))
    for key, label2 in (
        ("held", "enqueue, snapshot, not compacted"),
        ("old", "enqueue, after compaction (old)"),
        ("recent", "enqueue, after compaction (inside 7 days)"),
    ):
        out.append(
            Row(
                label2,
                fmt_ms(en[key].median),
                "~1x baseline",
                en[key].median / eb,
                "enqueue / baseline",
                en[key].spread(),
            )
        )
    out.append(section("Compaction"))
    wall = Stat([c["wall"] for c in comps])
    out.append(
        Row(
            f"compaction of {label} records (kmpwm.storage.compaction.compact)",
            f"{wall.median:.1f} s",
            "(reported)",
            None,
            "",
            f"peak RSS {mib(med([c['rss'] for c in comps]))}; tasks kept "
            f"{comps[0]['stats']['tasks_kept']:,}, events kept {comps[0]['stats']['events_kept']:,}; "
            f"{wall.spread(1, 's')}",
        )
    )
    lock = Stat([c["lock"] for c in comps])
    out.append(
        Row("  of which under the lock (tail phase + rewrite)", fmt_ms(lock.median), "short", None, "", lock.spread())
    )
    wait = Stat([c["max_wait"] for c in comps])
    before = med([c["median_before"] for c in comps])
    out.append(
        Row(
            "  enqueuer's longest wait for the lock",
            fmt_ms(wait.median),
            "short",
            wait.median / before,
            "wait / enqueue alone",
            f"enqueue alone {fmt_ms(before)}; {sum(c['enqueues'] for c in comps)} "
            f"enqueues (Python API, one every ~5 ms) in all; {wait.spread()}",
        )
    )
    worst = Stat([c["max_latency"] for c in comps])
    out.append(
        Row(
            "  enqueuer's longest enqueue during compaction",
            fmt_ms(worst.median),
            "short",
            worst.median / before,
            "latency / enqueue alone",
            "not only the lock: also the enqueuer's own pauses (reload after the rewrite, GC over its "
            f"state); the worst started {med([c['worst_after_unlock'] for c in comps]):+.2f} s from the "
            f"unlock (negative: before it); {worst.spread()}",
        )
    )
    for _key, j, info, what in (
        ("old", old_j, old_info, "old history"),
        ("recent", rec_j, recent_info, "history inside 7 days"),
    ):
        need = info["bytes_live_and_retention"]
        out.append(
            Row(
                f"journal after compaction ({what})",
                fmt_bytes(j),
                "<= 2x live + retention",
                j / need,
                "journal / (live + retained records)",
                f"live + retained records as first written: {fmt_bytes(need)}; before: {fmt_bytes(info['bytes'])}",
            )
        )
    return out


if __name__ == "__main__":
    import argparse

    from common import loadavg, print_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--records", type=int, default=None, help="records of history (default 1,000,000)")
    ap.add_argument("--first-runs", type=int, default=None, help="runs of the first-time scenarios (default 3)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds of the steady states (default 10)")
    args = ap.parse_args()
    say(loadavg())
    rows_ = rows(args.quick, args.records, args.first_runs, args.rounds)
    print(loadavg())
    print_table("kmpwm history", rows_)
