"""Enqueue throughput, durable (fsync), full task records, with floors and comparisons.

    python bench/bench_enqueue.py [--quick]

Rows:
- 100 three-step chains through the API in one batch (the seed's headline: 100 chain ids in
  24 ms, ids only, no fsync) -- goal under 2.4 ms;
- 10,000 one-time tasks through the API in one batch (one durable append) -- goal under 60 ms;
- `kmpwm enqueue --from -` of 10,000 JSON lines as one process -- goal under 0.5 s;
- floors: one small append + fdatasync on this disk, and an orjson append of 10,000 task-like
  records with one fsync;
- comparisons (the `bench` extra: `pip install -e .[bench]`, skipped when missing): huey's
  SqliteHuey (default fsync settings) and persist-queue's SQLiteQueue (auto_commit=True), each
  enqueueing the same 10,000 tasks durably, in this same run.  Their ratio is their time over
  kmpwm's.

The in-process figures exclude the import of kmpwm and the creation of the home (its
directories, its journal and its entry-point cache, which any earlier command leaves): each is the
median of several runs on a fresh home holding one earlier task.
"""

from __future__ import annotations

import os
import time

from common import (
    KMPWM,
    Row,
    Stat,
    bench_env,
    drop_home,
    fmt_ms,
    fresh_home,
    run_process,
    say,
    section,
    standalone,
    timed,
)

SEED_100_CHAINS_MS = 24.0
N = 10_000


def _scheduler():
    from kmpwm import Scheduler
    from kmpwm.running.registry import Registry

    home = fresh_home()
    s = Scheduler(home)
    Registry(s.paths).entry_points  # the home's entry-point cache, as any earlier command leaves it
    s.enqueue("earlier", None, "echo")  # the journal exists, as for every enqueue but a home's first
    s.store.load()  # permissions checked once; the directories are made by the first append
    s.store.journal._prepared or s.store.journal.paths.journal_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return home, s


def chains_100() -> float:
    from kmpwm import TaskRequest

    home, s = _scheduler()
    t0 = time.perf_counter()
    with s.batch() as b:
        for i in range(100):
            s.begin_with(TaskRequest("echo")).then(TaskRequest("echo")).then(TaskRequest("echo")).with_id(
                f"chain-{i}"
            ).enqueue()
    dt = time.perf_counter() - t0
    assert len(b.outcomes) == 100 and all(o.ok and len(o.tasks) == 3 for o in b.outcomes)
    drop_home(home)
    return dt


def tasks_10k() -> float:
    home, s = _scheduler()
    t0 = time.perf_counter()
    with s.batch() as b:
        for i in range(N):
            s.enqueue(f"task-{i}", None, "echo", input='{"n": %d}' % i)
    dt = time.perf_counter() - t0
    assert len(b.outcomes) == N and all(o.ok for o in b.outcomes)
    drop_home(home)
    return dt


_LINES = "".join('{"id": "t%d", "worker": "echo", "input": {"n": %d}}\n' % (i, i) for i in range(N)).encode()


def from_stdin_10k() -> float:
    home = fresh_home()
    r = run_process(KMPWM + ["enqueue", "--from", "-"], bench_env(home), stdin=_LINES)
    drop_home(home)
    return r.wall


def fsync_floor() -> float:
    """One small append and fdatasync: the least a durable single enqueue can cost on this disk."""
    home = fresh_home()
    fd = os.open(os.path.join(home, "f"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.write(fd, b"x" * 100 + b"\n")
    os.fsync(fd)
    t0 = time.perf_counter()
    os.write(fd, b"y" * 300 + b"\n")
    os.fdatasync(fd)
    dt = time.perf_counter() - t0
    os.close(fd)
    drop_home(home)
    return dt


def orjson_floor() -> float:
    """orjson-encode 10,000 task-like records, append them, fsync once."""
    import orjson

    home = fresh_home()
    now = time.time()
    path = os.path.join(home, "journal.log")
    t0 = time.perf_counter()
    blob = b"".join(
        orjson.dumps(
            {
                "id": f"task-{i}",
                "worker": "echo",
                "trigger": {"type": "one_time", "delay": 0.0},
                "created_at": now,
                "input": '{"n": %d}' % i,
            }
        )
        + b"\n"
        for i in range(N)
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.write(fd, blob)
    os.fsync(fd)
    os.close(fd)
    dt = time.perf_counter() - t0
    drop_home(home)
    return dt


def huey_10k() -> float | None:
    try:
        from huey import SqliteHuey
    except ImportError:
        return None
    home = fresh_home()
    huey = SqliteHuey("bench", filename=os.path.join(home, "huey.db"))  # default fsync settings

    @huey.task()
    def work(n):
        return n

    huey.storage.enqueue(b"warm")  # the connection and the schema exist before timing
    huey.storage.flush_queue()
    t0 = time.perf_counter()
    for i in range(N):
        work('{"n": %d}' % i)
    dt = time.perf_counter() - t0
    assert huey.pending_count() == N
    huey.storage.close() if hasattr(huey.storage, "close") else None
    drop_home(home)
    return dt


def persistqueue_10k() -> float | None:
    try:
        from persistqueue import SQLiteQueue
    except ImportError:
        return None
    home = fresh_home()
    q = SQLiteQueue(os.path.join(home, "pq"), auto_commit=True, multithreading=False)
    t0 = time.perf_counter()
    for i in range(N):
        q.put({"id": f"task-{i}", "worker": "echo", "input": '{"n": %d}' % i})
    dt = time.perf_counter() - t0
    assert q.qsize() == N
    drop_home(home)
    return dt


def rows(quick: bool = False) -> list[Row]:
    rep = 3 if quick else 9
    say(f"enqueue: {rep} runs each")
    st: dict[str, Stat] = {}
    st["chains"] = timed(chains_100, rep, warmup=2)
    st["10k"] = timed(tasks_10k, rep)
    st["stdin"] = timed(from_stdin_10k, max(3, rep // 2))
    st["fsync"] = timed(fsync_floor, rep * 3)
    st["orjson"] = timed(orjson_floor, rep)
    comp = {}
    for name, fn in (("huey", huey_10k), ("persist-queue", persistqueue_10k)):
        if fn() is None:
            say(f"  {name} is not installed: skipped (pip install -e '.[bench]')")
            continue
        comp[name] = timed(fn, 1 if quick else 3, warmup=0)
    k10 = st["10k"].median
    out = [section("Enqueue (durable; median; in-process figures exclude imports)")]
    c = st["chains"]
    out.append(
        Row(
            "100 three-step chains, API, one batch",
            fmt_ms(c.median),
            "< 2.4 ms",
            c.median / 0.0024,
            "figure / goal",
            f"seed 24 ms (ids only, no fsync) = {SEED_100_CHAINS_MS / 1000 / c.median:.1f}x ours; {c.spread()}",
        )
    )
    out.append(
        Row(
            "10,000 one-time tasks, API, one batch",
            fmt_ms(k10),
            "< 60 ms",
            k10 / 0.060,
            "figure / goal",
            f"{N / k10:,.0f} tasks/s; {st['10k'].spread()}",
        )
    )
    s = st["stdin"]
    out.append(
        Row(
            "enqueue --from - of 10,000 lines (process)",
            fmt_ms(s.median),
            "< 0.5 s",
            s.median / 0.5,
            "figure / goal",
            s.spread(),
        )
    )
    out.append(
        Row(
            "floor: one small append + fdatasync", fmt_ms(st["fsync"].median), "(floor)", None, "", st["fsync"].spread()
        )
    )
    o = st["orjson"].median
    out.append(
        Row(
            "floor: orjson append of 10,000 records, 1 fsync",
            fmt_ms(o),
            "(floor)",
            k10 / o,
            "kmpwm 10k / floor",
            st["orjson"].spread(),
        )
    )
    for name, label in (
        ("huey", "huey SqliteHuey, 10,000 enqueues (default fsync)"),
        ("persist-queue", "persist-queue SQLiteQueue, 10,000 puts (auto_commit)"),
    ):
        if name not in comp:
            out.append(Row(label, "skipped", "(comparison)", None, "", "not installed: pip install -e '.[bench]'"))
            continue
        m = comp[name].median
        out.append(
            Row(
                label,
                fmt_ms(m),
                "(comparison)",
                m / k10,
                f"{name} / kmpwm 10k",
                f"{N / m:,.0f} tasks/s; {comp[name].spread()}",
            )
        )
    return out


if __name__ == "__main__":
    standalone(rows, "kmpwm enqueue")
