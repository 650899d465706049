"""The fleet store (SPEC section 14) side by side with procrastinate, on one PostgreSQL server.

    python bench/bench_fleet.py [--quick] [-n 10000] [--dispatch-n 10000] [--latency-n 300]
                                [--parallel 2] [--rounds 3] [--url postgresql://...]
                                [--only enqueue,dispatch,latency]

Figures, not pass/fail.  kmpwm on its PostgreSQL store and procrastinate (the Python queue on
PostgreSQL) do the same work against the same server, each measurement in a database of its own,
made fresh for it (``CREATE DATABASE``) and dropped after.  Without ``--url`` the bench starts a
throwaway cluster with ``scripts/pgcluster.py`` (on a Unix socket, **fsync=off**: durability costs
nothing here for either side, so the figures compare the queues' own work, not the disk).

Parts (runs of compared figures are interleaved, and every figure is a median).  The machine this
was written on has 2 cores shared with other people's test runs: kmpwm's and procrastinate's runs
alternate (and the order within a round alternates from round to round) so that foreign load
falls on both alike; the load average is printed with every round.

- **enqueue**: 10,000 tasks in one batch. kmpwm: the Python API (``with s.batch(): s.enqueue``)
  and ``kmpwm enqueue --from FILE`` as a process. procrastinate: ``task.batch_defer`` (sync
  connector) and ``batch_defer_async``, and a process that imports the app and batch-defers the
  same file. In-process figures start with the connection open and the schema made (one earlier
  task deferred), as bench_enqueue.py's start on a home that exists.
- **dispatch**: N trivial tasks enqueued beforehand (untimed), then H = 1 and 3 hosts started
  together: kmpwm ``run-due --parallel P`` with ``KMPWM_HOST`` a/b/c (each its own home, one
  store), the built-in Python worker ``echo``; procrastinate H worker processes
  (``app.run_worker(wait=False, concurrency=P)``), a trivial sync task. Wall time from the first
  spawn to the last process reaped (each exits when nothing is left); then every task is checked
  SUCCEEDED / succeeded. Same P per host on both sides, so the same total concurrency.
- **latency**: enqueue -> start under a long-running worker: ``kmpwm serve --parallel P`` (one
  host) with a Python worker that appends its ``time.time()`` to a file (bench_serve.py's
  approach), and procrastinate's worker (LISTEN/NOTIFY, concurrency P) with the same task. The
  bench enqueues one task at a time and waits for the mark before the next (20 ms apart);
  ``--rounds`` blocks each (``--latency-n`` split among them), kmpwm's and procrastinate's in
  turn, the order alternating, with only one worker alive at a time (each block's first 20 tasks
  warm it up and are not counted).  p50 and p95 of all samples, and each block's.

CPU time: the processes' own (user + system, from wait4, their waited-for children included) and,
with the bench's own cluster, the server's (the postmaster's and its backends' CPU in /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    KMPWM,
    PYTHON,
    ROOT,
    Row,
    Stat,
    bench_env,
    fmt_ms,
    loadavg,
    print_table,
    run_process,
    say,
    section,
)

N = 10_000
SECTION = "Fleet: kmpwm's PostgreSQL store vs procrastinate, same server"

# The procrastinate side: an app bound to one database's URL, its tasks registered on it.
PC_MODULE = """
import os, time
import procrastinate

def make_app(url):
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

    @app.task(name="noop")
    def noop(n):
        return None

    @app.task(name="mark")
    def mark(tid):
        t = time.time()
        fd = os.open(os.environ["BENCH_MARKS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(fd, ("%s %.6f\\n" % (tid, t)).encode())
        os.close(fd)

    return app

if __name__ == "__main__":
    import sys
    app = make_app(os.environ["BENCH_PC_URL"])
    if sys.argv[1] == "worker":  # worker CONCURRENCY WAIT
        app.run_worker(wait=sys.argv[3] == "1", concurrency=int(sys.argv[2]), name=os.environ.get("BENCH_PC_NAME"))
    elif sys.argv[1] == "defer-file":  # the process row: the same JSON Lines file kmpwm reads
        import json
        with open(sys.argv[2]) as fh:
            args = [{"n": json.loads(line)["input"]["n"]} for line in fh]
        with app.open():
            app.tasks["noop"].batch_defer(*args)
"""

MARK_PY = """
import os, time

def mark(input):
    t = time.time()
    fd = os.open(os.environ["BENCH_MARKS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, ("%s %.6f\\n" % (os.environ["KMPWM_TASK_ID"], t)).encode())
    os.close(fd)
    return None
"""


def missing() -> str | None:
    """Why this part cannot run here, or None."""
    for mod, hint in (("psycopg", "pip install -e '.[postgresql]'"), ("procrastinate", "pip install -e '.[bench]'")):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed ({hint})"
    return None


def _pg_missing() -> str | None:
    sys.path.insert(0, str(ROOT / "scripts"))
    for name in ("initdb", "pg_ctl"):
        if not shutil.which(name) and not list(Path("/usr/lib/postgresql").glob(f"*/bin/{name}")):
            return f"PostgreSQL's {name} is not installed (apt-get install postgresql), and no --url given"
    return None


# -- the server ------------------------------------------------------------------------------


class Server:
    """A PostgreSQL server: the bench's own throwaway cluster, or one at ``url``."""

    def __init__(self, url: str | None):
        self.dir = None
        if url is None:
            sys.path.insert(0, str(ROOT / "scripts"))
            import pgcluster

            self.dir = tempfile.mkdtemp(prefix="kmpwm-bench-pg.")
            self._pgcluster = pgcluster
            url = pgcluster.start(self.dir)
        self.url = url
        self._n = 0
        import psycopg

        self.admin = psycopg.connect(url, autocommit=True)
        self.version = self.admin.execute("SHOW server_version").fetchone()[0]
        self.fsync = self.admin.execute("SHOW fsync").fetchone()[0]
        self.sync_commit = self.admin.execute("SHOW synchronous_commit").fetchone()[0]

    def fresh_db(self, tag: str) -> str:
        self._n += 1
        name = f"kb_{os.getpid()}_{self._n}_{tag}"
        self.admin.execute(f"CREATE DATABASE {name}")
        parts = urlsplit(self.url)
        return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))

    def drop_db(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        self.admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def cpu(self) -> float | None:
        """The server's CPU seconds so far: the postmaster's, its reaped backends' and its live
        children's (only for the bench's own cluster)."""
        if self.dir is None:
            return None
        try:
            pm = int(Path(self.dir, "data", "postmaster.pid").read_text().split()[0])
            tick = os.sysconf("SC_CLK_TCK")
            total = 0
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                pid, ppid = int(proc.name), int(fields[1])
                if pid == pm:
                    total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
                elif ppid == pm:
                    total += int(fields[11]) + int(fields[12])
            return total / tick
        except (OSError, ValueError, IndexError):
            return None

    def close(self) -> None:
        try:
            self.admin.close()
        finally:
            if self.dir is not None:
                self._pgcluster.stop(self.dir)
                shutil.rmtree(self.dir, ignore_errors=True)


class Meter:
    """Wall, the processes' CPU and the server's CPU of one measurement."""

    def __init__(self, server: Server):
        self.server = server
        self.wall = self.cpu = 0.0
        self.server_cpu = None

    def __enter__(self):
        self._s0 = self.server.cpu()
        self._r0 = os.times()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._t0
        r1 = os.times()
        self.cpu = (r1.user - self._r0.user) + (r1.system - self._r0.system)  # this process (in-process rows)
        s1 = self.server.cpu()
        self.server_cpu = None if self._s0 is None or s1 is None else s1 - self._s0


class Work:
    """A directory for homes, files and the procrastinate module; removed at the end."""

    def __init__(self):
        self.base = Path(tempfile.mkdtemp(prefix="kmpwm-bench-fleet-"))
        os.chmod(self.base, 0o700)
        (self.base / "benchpc.py").write_text(PC_MODULE)
        (self.base / "benchmark_worker.py").write_text(MARK_PY)
        sys.path.insert(0, str(self.base))  # the API checks the entry point when it enqueues
        self._n = 0
        self.block = 0

    def lines(self, n: int) -> Path:
        """A JSON Lines file of ``n`` task specs (kmpwm's ``enqueue --from`` format)."""
        path = self.base / f"tasks-{n}.jsonl"
        if not path.exists():
            path.write_text("".join('{"id": "t%d", "worker": "echo", "input": {"n": %d}}\n' % (i, i) for i in range(n)))
        return path

    def home(self, config: str | None = None) -> str:
        self._n += 1
        home = self.base / f"home{self._n}"
        home.mkdir(mode=0o700)
        if config is not None:
            (home / "config.toml").write_text(config)
            os.chmod(home / "config.toml", 0o600)
        return str(home)

    def env(self, home: str | None = None, **extra: str) -> dict:
        return bench_env(home, PYTHONPATH=f"{self.base}{os.pathsep}{ROOT}", **extra)

    def close(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


def kmpwm_scheduler(home: str, url: str):
    """A Scheduler on the store at ``url`` (KMPWM_STORE is read when it is created)."""
    from kmpwm import Scheduler

    old = os.environ.get("KMPWM_STORE")
    os.environ["KMPWM_STORE"] = url
    try:
        return Scheduler(home)
    finally:
        if old is None:
            os.environ.pop("KMPWM_STORE", None)
        else:
            os.environ["KMPWM_STORE"] = old


def pc_app(work: Work, url: str):
    sys.path.insert(0, str(work.base))
    import benchpc

    return benchpc.make_app(url)


def pc_schema(work: Work, url: str) -> None:
    app = pc_app(work, url)
    with app.open():
        app.schema_manager.apply_schema()


# -- 1. enqueue ------------------------------------------------------------------------------


def kmpwm_api(server: Server, work: Work, n: int) -> Meter:
    url = server.fresh_db("ka")
    s = kmpwm_scheduler(work.home(), url)
    s.enqueue("earlier", None, "echo")  # connected, schema made
    with Meter(server) as m, s.batch() as b:
        for i in range(n):
            s.enqueue(f"task-{i}", None, "echo", input={"n": i})
    assert len(b.outcomes) == n and all(o.ok for o in b.outcomes)
    s.store.close()
    server.drop_db(url)
    return m


def kmpwm_file(server: Server, work: Work, n: int) -> Meter:
    url = server.fresh_db("kf")
    home = work.home()
    s = kmpwm_scheduler(home, url)
    s.enqueue("earlier", None, "echo")  # the store exists, as for every enqueue but its first
    s.store.close()
    m = Meter(server)
    with m:
        r = run_process(KMPWM + ["enqueue", "--from", str(work.lines(n))], work.env(home, KMPWM_STORE=url))
    m.cpu = r.cpu
    s = kmpwm_scheduler(home, url)
    assert len(s.state()["tasks"]) == n + 1
    s.store.close()
    server.drop_db(url)
    return m


def pc_sync(server: Server, work: Work, n: int) -> Meter:
    url = server.fresh_db("ps")
    app = pc_app(work, url)
    noop = app.tasks["noop"]
    with app.open():
        app.schema_manager.apply_schema()
        noop.defer(n=-1)  # connected (the pool is open), schema made
        args = [{"n": i} for i in range(n)]
        with Meter(server) as m:
            ids = noop.batch_defer(*args)
    assert len(ids) == n
    server.drop_db(url)
    return m


def pc_async(server: Server, work: Work, n: int) -> Meter:
    url = server.fresh_db("pa")
    app = pc_app(work, url)
    noop = app.tasks["noop"]
    out = {}

    async def go():
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            await noop.defer_async(n=-1)
            args = [{"n": i} for i in range(n)]
            with Meter(server) as m:
                out["ids"] = await noop.batch_defer_async(*args)
            out["m"] = m

    asyncio.run(go())
    assert len(out["ids"]) == n
    server.drop_db(url)
    return out["m"]


def pc_file(server: Server, work: Work, n: int) -> Meter:
    url = server.fresh_db("pf")
    pc_schema(work, url)
    m = Meter(server)
    with m:
        r = run_process(
            [PYTHON, str(work.base / "benchpc.py"), "defer-file", str(work.lines(n))], work.env(BENCH_PC_URL=url)
        )
    m.cpu = r.cpu
    server.drop_db(url)
    return m


# -- 2. dispatch -----------------------------------------------------------------------------


def _wait_all(procs: list[subprocess.Popen], t0: float, what: str) -> tuple[float, float]:
    """Reap every process; (wall from t0 to the last one, CPU of them all)."""
    cpu = 0.0
    for p in procs:
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        cpu += ru.ru_utime + ru.ru_stime
    wall = time.perf_counter() - t0
    bad = [p for p in procs if p.returncode != 0]
    if bad:
        err = bad[0].stderr.read().decode(errors="replace")[-2000:] if bad[0].stderr else ""
        raise RuntimeError(f"{what}: a process exited {bad[0].returncode}: {err}")
    for p in procs:
        if p.stderr:
            p.stderr.close()
    return wall, cpu


def kmpwm_dispatch(server: Server, work: Work, n: int, hosts: int, parallel: int) -> Meter:
    url = server.fresh_db(f"kd{hosts}")
    s = kmpwm_scheduler(work.home(), url)
    with s.batch():
        for i in range(n):
            s.enqueue(f"t{i}", None, "echo")
    s.store.close()
    homes = [work.home() for _ in range(hosts)]
    m = Meter(server)
    with m:
        t0 = time.perf_counter()
        procs = [
            subprocess.Popen(
                KMPWM + ["run-due", "--parallel", str(parallel)],
                env=work.env(home, KMPWM_STORE=url, KMPWM_HOST="abcdefgh"[i]),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for i, home in enumerate(homes)
        ]
        wall, cpu = _wait_all(procs, t0, "run-due")
    s = kmpwm_scheduler(work.home(), url)
    states = [t["state"] for t in s.state()["tasks"].values()]
    s.store.close()
    if len(states) != n or any(st != "SUCCEEDED" for st in states):
        raise RuntimeError(f"kmpwm, {hosts} host(s): {states.count('SUCCEEDED')} of {n} tasks SUCCEEDED")
    server.drop_db(url)
    m.wall, m.cpu = wall, cpu
    return m


def pc_dispatch(server: Server, work: Work, n: int, hosts: int, parallel: int) -> Meter:
    url = server.fresh_db(f"pd{hosts}")
    app = pc_app(work, url)
    with app.open():
        app.schema_manager.apply_schema()
        app.tasks["noop"].batch_defer(*({"n": i} for i in range(n)))
    m = Meter(server)
    with m:
        t0 = time.perf_counter()
        procs = [
            subprocess.Popen(
                [PYTHON, str(work.base / "benchpc.py"), "worker", str(parallel), "0"],
                env=work.env(BENCH_PC_URL=url, BENCH_PC_NAME="abcdefgh"[i]),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for i in range(hosts)
        ]
        wall, cpu = _wait_all(procs, t0, "procrastinate worker")
    import psycopg

    with psycopg.connect(url) as conn:
        rows = dict(conn.execute("SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1").fetchall())
    if rows.get("succeeded") != n:
        raise RuntimeError(f"procrastinate, {hosts} worker(s): jobs {rows}, expected {n} succeeded")
    server.drop_db(url)
    m.wall, m.cpu = wall, cpu
    return m


# -- 3. latency ------------------------------------------------------------------------------


class Marks:
    """The workers' timestamps, read as they are appended (bench_serve.Marks)."""

    def __init__(self, path: Path):
        self.path = path
        self.pos = 0
        self.seen: dict[str, float] = {}
        path.touch()

    def wait(self, tid: str, timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        while tid not in self.seen:
            if time.monotonic() > deadline:
                raise RuntimeError(f"task {tid} never started")
            time.sleep(0.0002)
            with open(self.path, "rb") as fh:
                fh.seek(self.pos)
                data = fh.read()
            end = data.rfind(b"\n") + 1
            self.pos += end
            for line in data[:end].splitlines():
                t, ts = line.split()
                self.seen[t.decode()] = float(ts)
        return self.seen[tid]


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _started(work: Work, marks: Marks, errs, tid: str = "prime") -> None:
    try:
        marks.wait(tid, 60)
    except RuntimeError:
        errs.flush()
        raise RuntimeError(
            "a worker did not start: " + (work.base / "latency.err").read_text(errors="replace")[-3000:]
        ) from None


def kmpwm_latency(server: Server, work: Work, n: int, parallel: int, warm: int, gap: float) -> list[float]:
    """``kmpwm serve`` on a fresh store; ``n`` tasks enqueued one at a time (after ``warm``)."""
    from kmpwm.core import triggers

    url = server.fresh_db("kl")
    work.block += 1
    marks_path = work.base / f"kmpwm-{work.block}.marks"
    home = work.home('[workers.pymark]\nentry = "benchmark_worker:mark"\n')
    sched = kmpwm_scheduler(home, url)
    ok = sched.enqueue("prime", triggers.OneTime(), "pymark")  # the store exists before serve starts
    assert ok.name == "SUCCESS", ok
    errs = open(work.base / "latency.err", "ab")
    serve = subprocess.Popen(
        KMPWM + ["serve", "--parallel", str(parallel)],
        env=work.env(home, KMPWM_STORE=url, KMPWM_HOST="a", BENCH_MARKS=str(marks_path)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=errs,
    )
    marks, out = Marks(marks_path), []
    try:
        _started(work, marks, errs)
        for i in range(warm + n):
            tid = f"t{i}"
            ok = sched.enqueue(tid, triggers.OneTime(), "pymark")
            t0 = time.time()
            assert ok.name == "SUCCESS", ok
            t1 = marks.wait(tid)
            if i >= warm:
                out.append((t1 - t0) * 1000)
            time.sleep(gap)
    finally:
        _stop([serve])
        errs.close()
        sched.store.close()
    server.drop_db(url)
    return out


def pc_latency(server: Server, work: Work, n: int, parallel: int, warm: int, gap: float) -> list[float]:
    """procrastinate's worker (LISTEN/NOTIFY) on a fresh database; the same tasks, the same way."""
    url = server.fresh_db("pl")
    work.block += 1
    marks_path = work.base / f"pc-{work.block}.marks"
    pc_schema(work, url)
    errs = open(work.base / "latency.err", "ab")
    worker = subprocess.Popen(
        [PYTHON, str(work.base / "benchpc.py"), "worker", str(parallel), "1"],
        env=work.env(BENCH_PC_URL=url, BENCH_MARKS=str(marks_path)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=errs,
    )
    app = pc_app(work, url)
    mark = app.tasks["mark"]
    marks, out = Marks(marks_path), []
    try:
        with app.open():
            mark.defer(tid="prime")
            _started(work, marks, errs)
            for i in range(warm + n):
                tid = f"t{i}"
                mark.defer(tid=tid)
                t0 = time.time()
                t1 = marks.wait(tid)
                if i >= warm:
                    out.append((t1 - t0) * 1000)
                time.sleep(gap)
    finally:
        _stop([worker])
        errs.close()
    server.drop_db(url)
    return out


def latency(server: Server, work: Work, n: int, parallel: int, blocks: int = 3, warm: int = 20, gap: float = 0.02):
    """Blocks of n / blocks tasks, kmpwm's and procrastinate's in turn, one worker alive at a time
    (so neither's background work lands in the other's figures); returns every sample, and each
    block's p50 and p95 per side."""
    out: dict[str, list[float]] = {"kmpwm": [], "procrastinate": []}
    per_block: dict[str, list[tuple[float, float]]] = {"kmpwm": [], "procrastinate": []}
    per = max(1, n // blocks)
    for b in range(blocks):
        for name, fn in (("kmpwm", kmpwm_latency), ("procrastinate", pc_latency))[:: 1 if b % 2 == 0 else -1]:
            ms = fn(server, work, per, parallel, warm, gap)
            out[name] += ms
            per_block[name].append((pct(ms, 50), pct(ms, 95)))
            say(f"    block {b + 1}: {name} p50 {pct(ms, 50):.2f} ms, p95 {pct(ms, 95):.2f} ms ({loadavg()})")
    return out, per_block


# -- the table -------------------------------------------------------------------------------


def _cpu_note(st_cpu: Stat, st_srv: Stat) -> str:
    srv = f", server {st_srv.median:.2f} s" if st_srv.values else ""
    return f"CPU: client {st_cpu.median:.2f} s{srv}"


def rows(
    quick: bool = False,
    n: int | None = None,
    dispatch_n: int | None = None,
    latency_n: int | None = None,
    parallel: int | None = None,
    rounds: int | None = None,
    url: str | None = None,
    parts: tuple[str, ...] = ("enqueue", "dispatch", "latency"),
) -> list[Row]:
    why = missing() or (None if url else _pg_missing())
    if why:
        say(f"fleet: skipped: {why}")
        return [section(SECTION), Row("fleet comparison", "skipped", "(comparison)", note=why)]
    n = n or (2000 if quick else N)
    dispatch_n = dispatch_n or (1000 if quick else N)
    latency_n = latency_n or (30 if quick else 300)
    parallel = parallel or os.cpu_count() or 2
    rounds = rounds or (1 if quick else 3)
    server = Server(url)
    work = Work()
    out = [section(SECTION)]
    try:
        say(
            f"fleet: PostgreSQL {server.version} (fsync={server.fsync}, synchronous_commit={server.sync_commit}), "
            f"procrastinate {_pc_version()}"
        )
        cond = (
            f"PostgreSQL {server.version}, fsync={server.fsync}, synchronous_commit={server.sync_commit}, "
            f"{'Unix socket, own cluster' if server.dir else 'given --url'}; procrastinate {_pc_version()}; "
            f"a fresh database per measurement"
        )
        out.append(Row("## conditions:", "", "", note=cond))
        if "enqueue" in parts:
            out += _enqueue_rows(server, work, n, rounds * 2 + (0 if quick else 1))
        if "dispatch" in parts:
            out += _dispatch_rows(server, work, dispatch_n, parallel, rounds)
        if "latency" in parts:
            out += _latency_rows(server, work, latency_n, parallel, rounds)
    finally:
        work.close()
        server.close()
    return out


def _pc_version() -> str:
    from importlib.metadata import version

    return version("procrastinate")


def _enqueue_rows(server: Server, work: Work, n: int, reps: int) -> list[Row]:
    fns = {
        "kmpwm_api": kmpwm_api,
        "kmpwm_file": kmpwm_file,
        "pc_sync": pc_sync,
        "pc_async": pc_async,
        "pc_file": pc_file,
    }
    say(f"fleet enqueue: {reps} interleaved rounds of {n:,} tasks ({loadavg()})")
    wall = {k: Stat() for k in fns}
    cpu = {k: Stat() for k in fns}
    srv = {k: Stat() for k in fns}
    for fn in fns.values():  # warm-up: imports, bytecode, the server's caches
        fn(server, work, min(n, 500))
    for r in range(reps):
        for k, fn in fns.items():
            m = fn(server, work, n)
            wall[k].add(m.wall)
            cpu[k].add(m.cpu)
            if m.server_cpu is not None:
                srv[k].add(m.server_cpu)
        say(f"    round {r + 1}: " + ", ".join(f"{k} {fmt_ms(wall[k].values[-1])}" for k in fns))
    ka, kf = wall["kmpwm_api"].median, wall["kmpwm_file"].median
    ps, pa, pf = wall["pc_sync"].median, wall["pc_async"].median, wall["pc_file"].median
    best = min(ps, pa)
    rows = [section("Fleet 1: batch enqueue")]
    rows[0].note = f"{n:,} tasks in one batch; median of {reps}; {loadavg().split(' on ')[0]}"
    rows.append(
        Row(
            f"kmpwm: {n:,} tasks, API, one batch",
            fmt_ms(ka),
            "ahead of procrastinate",
            best / ka,
            "procrastinate's best / kmpwm (> 1: kmpwm ahead)",
            f"{n / ka:,.0f} tasks/s; {_cpu_note(cpu['kmpwm_api'], srv['kmpwm_api'])}; {wall['kmpwm_api'].spread()}",
        )
    )
    for k, label in (("pc_sync", "batch_defer (sync)"), ("pc_async", "batch_defer_async")):
        rows.append(
            Row(
                f"procrastinate: {n:,} jobs, {label}",
                fmt_ms(wall[k].median),
                "(comparison)",
                None,
                "",
                f"{n / wall[k].median:,.0f} jobs/s; {_cpu_note(cpu[k], srv[k])}; {wall[k].spread()}",
            )
        )
    rows.append(
        Row(
            f"kmpwm: enqueue --from FILE, {n:,} lines (process)",
            fmt_ms(kf),
            "ahead of procrastinate",
            pf / kf,
            "procrastinate process / kmpwm (> 1: kmpwm ahead)",
            f"{_cpu_note(cpu['kmpwm_file'], srv['kmpwm_file'])}; {wall['kmpwm_file'].spread()}",
        )
    )
    rows.append(
        Row(
            "procrastinate: process (import app, batch_defer the file)",
            fmt_ms(pf),
            "(comparison)",
            None,
            "",
            f"procrastinate has no batch CLI; {_cpu_note(cpu['pc_file'], srv['pc_file'])}; {wall['pc_file'].spread()}",
        )
    )
    return rows


def _dispatch_rows(server: Server, work: Work, n: int, parallel: int, rounds: int) -> list[Row]:
    say(f"fleet dispatch: {rounds} interleaved round(s) of {n:,} trivial tasks, parallel {parallel} per host")
    kinds = [("kmpwm", 1), ("pc", 1), ("kmpwm", 3), ("pc", 3)]
    wall = {k: Stat() for k in kinds}
    cpu = {k: Stat() for k in kinds}
    srv = {k: Stat() for k in kinds}
    kmpwm_dispatch(server, work, min(n, 200), 1, parallel)  # warm-up (bytecode caches, the server)
    pc_dispatch(server, work, min(n, 200), 1, parallel)
    for r in range(rounds):
        for who, hosts in kinds if r % 2 == 0 else [(w, h) for h in (1, 3) for w in ("pc", "kmpwm")]:
            fn = kmpwm_dispatch if who == "kmpwm" else pc_dispatch
            m = fn(server, work, n, hosts, parallel)
            wall[(who, hosts)].add(m.wall)
            cpu[(who, hosts)].add(m.cpu)
            if m.server_cpu is not None:
                srv[(who, hosts)].add(m.server_cpu)
            say(f"    round {r + 1}: {who} x{hosts}: {n / m.wall:,.0f} tasks/s ({loadavg().split(' on ')[0]})")
    rows = [section("Fleet 2: dispatch")]
    rows[0].note = (
        f"{n:,} trivial tasks, --parallel / concurrency {parallel} per host, wall to the last process's exit; "
        f"median of {rounds}; {loadavg().split(' on ')[0]}"
    )
    for hosts in (1, 3):
        k, p = wall[("kmpwm", hosts)], wall[("pc", hosts)]
        kr, pr = n / k.median, n / p.median
        hs = "host" if hosts == 1 else "hosts"
        rows.append(
            Row(
                f"kmpwm: {hosts} {hs}, run-due --parallel {parallel}, echo",
                f"{kr:,.0f} tasks/s",
                "ahead of procrastinate",
                kr / pr,
                "kmpwm / procrastinate (> 1: kmpwm ahead)",
                f"{k.median:.2f} s wall; {_cpu_note(cpu[('kmpwm', hosts)], srv[('kmpwm', hosts)])}; {k.spread(1, 's')}",
            )
        )
        rows.append(
            Row(
                f"procrastinate: {hosts} worker{'s' if hosts > 1 else ''}, concurrency {parallel}, sync task",
                f"{pr:,.0f} jobs/s",
                "(comparison)",
                None,
                "",
                f"{p.median:.2f} s wall; {_cpu_note(cpu[('pc', hosts)], srv[('pc', hosts)])}; {p.spread(1, 's')}",
            )
        )
    return rows


def _latency_rows(server: Server, work: Work, n: int, parallel: int, rounds: int) -> list[Row]:
    say(f"fleet latency: {n} tasks each, in blocks, kmpwm's and procrastinate's in turn ({loadavg()})")
    blocks = rounds
    lat, per_block = latency(server, work, n, parallel, blocks=blocks)
    k, p = lat["kmpwm"], lat["procrastinate"]
    rows = [section("Fleet 3: enqueue -> start")]
    load = loadavg().split(" on ")[0]
    rows[0].note = (
        f"under a long-running worker, {n} tasks each in {blocks} blocks taken in turn (the order alternates); "
        f"percentiles of all samples; {load}"
    )
    for name, ms, other in (("kmpwm", k, p), ("procrastinate", p, k)):
        kmpwm_row = name == "kmpwm"
        rows.append(
            Row(
                f"{name}: "
                + (
                    f"serve --parallel {parallel}, Python worker"
                    if kmpwm_row
                    else f"worker, concurrency {parallel}, sync task"
                ),
                f"p50 {pct(ms, 50):.2f} / p95 {pct(ms, 95):.2f} ms",
                "ahead of procrastinate" if kmpwm_row else "(comparison)",
                pct(other, 50) / pct(ms, 50) if kmpwm_row else None,
                "procrastinate p50 / kmpwm p50 (> 1: kmpwm ahead)" if kmpwm_row else "",
                f"p95 {pct(ms, 95):.2f}, p99 {pct(ms, 99):.2f}, max {max(ms):.2f} ms; per block p50/p95 "
                + ", ".join(f"{a:.2f}/{b:.2f}" for a, b in per_block[name])
                + (f"; p95 ratio (procrastinate / kmpwm) {pct(other, 95) / pct(ms, 95):.2f}" if kmpwm_row else ""),
            )
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one round (a smoke test)")
    ap.add_argument("-n", type=int, default=None, help="tasks in the enqueue batch (default 10,000)")
    ap.add_argument("--dispatch-n", type=int, default=None, help="tasks per dispatch run (default 10,000)")
    ap.add_argument("--latency-n", type=int, default=None, help="tasks per latency row (default 200)")
    ap.add_argument("--parallel", type=int, default=None, help="--parallel / concurrency per host (default: CPUs)")
    ap.add_argument("--rounds", type=int, default=None, help="dispatch rounds (default 3; enqueue: 2x+1)")
    ap.add_argument("--url", default=None, help="an existing server (CREATEDB needed) instead of a throwaway cluster")
    ap.add_argument("--only", default="enqueue,dispatch,latency", help="comma-separated: enqueue,dispatch,latency")
    args = ap.parse_args()
    say(loadavg())
    t0 = time.perf_counter()
    r = rows(
        args.quick,
        args.n,
        args.dispatch_n,
        args.latency_n,
        args.parallel,
        args.rounds,
        args.url,
        tuple(p.strip() for p in args.only.split(",")),
    )
    print(f"{loadavg()}; took {time.perf_counter() - t0:.0f} s")
    print_table("kmpwm fleet vs procrastinate (figures are medians; ratio as stated per row)", r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
