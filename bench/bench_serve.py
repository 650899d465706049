"""``kmpwm serve``: from ``enqueue`` returning to the worker's first instruction (SPEC section 13).

    python bench/bench_serve.py                   # 1,000 tasks per kmpwm row, 200 for huey
    python bench/bench_serve.py -n 200 --huey 100 --at 100

Figures, never pass/fail.  Each row is a distribution (p50, p90, p99, max) over sequential tasks:
the bench enqueues one task with the Python API in this process, notes ``time.time()`` the
moment ``enqueue`` returns, and waits until the worker has written its own ``time.time()``,
taken as the worker's first instruction, before it enqueues the next one.

- python: a Python worker (``entry = "module:function"`` in config.toml), run by serve's warm
  pool of worker processes (the first 20 tasks warm it and are not counted);
- command: a command worker, ``bash -c 'echo "$EPOCHREALTIME" >> FILE'`` (its figure includes
  bash's own start, a few ms; the goal is for a command worker);
- at: ``--at`` lateness: tasks enqueued together, due 1.5 s ahead and 25 ms apart; the worker's
  time minus the due time;
- huey: the same Python task under huey's consumer (SqliteHuey, one worker thread, the default
  polling: 0.1 s initial delay, x1.15 backoff), enqueued the same way;
- minute: kmpwm driven by a per-minute invoker (cron), computed: the wait is uniform over
  [0, 60) s, so the mean and p50 are 30 s and p99 59.4 s (plus run-due's start-up).

Goals (SPEC 13 / issue 19): python p50 <= 5 ms, command p50 <= 15 ms, at p99 <= 50 ms.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PYTHON, ROOT, bench_env, loadavg, say  # noqa: E402

MARK_PY = """
import os, time

def mark(input):
    t = time.time()
    fd = os.open(os.environ["BENCH_MARKS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, ("%s %.6f\\n" % (os.environ["KMPWM_TASK_ID"], t)).encode())
    os.close(fd)
    return None
"""

HUEY_PY = """
import os, time
from huey import SqliteHuey

huey = SqliteHuey("bench", filename=os.environ["BENCH_HUEY_DB"])

@huey.task()
def mark(task_id):
    t = time.time()
    fd = os.open(os.environ["BENCH_MARKS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, ("%s %.6f\\n" % (task_id, t)).encode())
    os.close(fd)
"""


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def row(name: str, ms: list[float], goal: str) -> str:
    if not ms:
        return f"{name:<34} skipped"
    return (
        f"{name:<34} n={len(ms):<5} p50 {pct(ms, 50):8.2f}  p90 {pct(ms, 90):8.2f}  p99 {pct(ms, 99):8.2f}"
        f"  max {max(ms):8.2f} ms   mean {statistics.fmean(ms):8.2f}   goal {goal}"
    )


class Marks:
    """The worker's timestamps, read as they are appended."""

    def __init__(self, path: Path):
        self.path = path
        self.pos = 0
        self.seen: dict[str, float] = {}
        path.touch()

    def poll(self) -> None:
        with open(self.path, "rb") as fh:
            fh.seek(self.pos)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        self.pos += end
        for line in data[:end].splitlines():
            tid, t = line.split()
            self.seen[tid.decode()] = float(t)

    def wait(self, tid: str, timeout: float = 120.0) -> float:
        deadline = time.monotonic() + timeout
        while tid not in self.seen:
            if time.monotonic() > deadline:
                raise RuntimeError(f"task {tid} never started")
            time.sleep(0.0002)
            self.poll()
        return self.seen[tid]


def make_home(base: Path, name: str) -> tuple[Path, Path]:
    home = base / name
    home.mkdir(mode=0o700)
    os.chmod(home, 0o700)
    marks = base / f"{name}.marks"
    cfg = home / "config.toml"
    cfg.write_text(
        textwrap.dedent(f"""
        [workers.pymark]
        entry = "benchmark_worker:mark"

        [workers.cmdmark]
        command = ["bash", "-c", "echo \\"$KMPWM_TASK_ID $EPOCHREALTIME\\" >> {marks}"]
    """)
    )
    os.chmod(cfg, 0o600)
    return home, marks


def start_serve(home: Path, base: Path, marks: Path) -> subprocess.Popen:
    env = bench_env(str(home), BENCH_MARKS=str(marks), PYTHONPATH=f"{base}{os.pathsep}{ROOT}")
    argv = (
        [PYTHON, os.environ["BENCH_SERVE_PROFILE"]]
        if os.environ.get("BENCH_SERVE_PROFILE")
        else [PYTHON, "-m", "kmpwm", "serve", "--parallel", "2"]
    )
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=open(base / "serve.err", "a"))
    state = home / "journal" / "runners" / f"serve-{proc.pid}.json"
    deadline = time.monotonic() + 30
    while not state.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("serve did not start: see " + str(base / "serve.err"))
        time.sleep(0.01)
    time.sleep(0.3)
    return proc


def kmpwm_latency(base: Path, worker: str, n: int, warm: int = 20) -> list[float]:
    from kmpwm import Scheduler
    from kmpwm.core import triggers

    home, marks_path = make_home(base, f"home-{worker}")
    os.environ["KMPWM_HOME"] = str(home)
    sched = Scheduler(home=str(home))
    sched.enqueue("prime", triggers.OneTime(), worker)  # the journal exists before serve starts
    serve = start_serve(home, base, marks_path)
    marks = Marks(marks_path)
    out = []
    try:
        marks.wait("prime", 60)
        for i in range(warm + n):
            tid = f"t{i}"
            sched.enqueue(tid, triggers.OneTime(), worker)
            t0 = time.time()
            t1 = marks.wait(tid)
            if i >= warm:
                out.append((t1 - t0) * 1000)
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
    return out


def at_lateness(base: Path, n: int) -> list[float]:
    from kmpwm import Scheduler
    from kmpwm.core import triggers

    home, marks_path = make_home(base, "home-at")
    sched = Scheduler(home=str(home))
    sched.enqueue("prime", triggers.OneTime(), "pymark")
    serve = start_serve(home, base, marks_path)
    marks = Marks(marks_path)
    marks.wait("prime", 60)
    start = datetime.now(UTC) + timedelta(seconds=1.5)
    ats = {}
    with sched.batch():
        for i in range(n):
            at = start + timedelta(milliseconds=25 * i)
            sched.enqueue(f"a{i}", triggers.Exact(at), "pymark")
            ats[f"a{i}"] = at.timestamp()
    try:
        return [(marks.wait(tid) - at) * 1000 for tid, at in ats.items()]
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)


def huey_latency(base: Path, n: int, warm: int = 5) -> list[float]:
    try:
        import huey  # noqa: F401
    except ImportError:
        say("huey not installed (pip install -e '.[bench]'): skipped")
        return []
    hdir = base / "huey"
    hdir.mkdir()
    (hdir / "benchhuey.py").write_text(HUEY_PY)
    marks_path = base / "huey.marks"
    os.environ["BENCH_HUEY_DB"] = str(hdir / "huey.db")
    os.environ["BENCH_MARKS"] = str(marks_path)
    sys.path.insert(0, str(hdir))
    import benchhuey

    consumer = subprocess.Popen(
        [PYTHON, "-c", "import benchhuey; benchhuey.huey.create_consumer(workers=1).run()"],
        cwd=hdir,
        env=dict(os.environ, PYTHONPATH=str(hdir)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marks = Marks(marks_path)
    out = []
    try:
        for i in range(warm + n):
            tid = f"h{i}"
            benchhuey.mark(tid)
            t0 = time.time()
            t1 = marks.wait(tid)
            if i >= warm:
                out.append((t1 - t0) * 1000)
    finally:
        consumer.send_signal(signal.SIGINT)
        try:
            consumer.wait(15)
        except subprocess.TimeoutExpired:
            consumer.kill()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=1000, help="tasks per kmpwm latency row (default 1000)")
    ap.add_argument("--huey", type=int, default=200, help="tasks for the huey row (default 200; 0 skips)")
    ap.add_argument("--at", type=int, default=200, help="--at tasks (default 200)")
    args = ap.parse_args()
    say(f"bench_serve: {loadavg()}")
    base = Path(tempfile.mkdtemp(prefix="kmpwm-bench-serve-"))
    (base / "benchmark_worker.py").write_text(MARK_PY)
    sys.path.insert(0, str(base))
    os.environ["BENCH_MARKS"] = str(base / "home-pymark.marks")
    rows = []
    py = kmpwm_latency(base, "pymark", args.n)
    rows.append(row("serve, Python worker (warm pool)", py, "p50 <= 5 ms"))
    os.environ["BENCH_MARKS"] = str(base / "home-at.marks")
    cmd = kmpwm_latency(base, "cmdmark", args.n)
    rows.append(row("serve, command worker (bash)", cmd, "p50 <= 15 ms"))
    at = at_lateness(base, args.at) if args.at else []
    rows.append(row("serve, --at lateness", at, "p99 <= 50 ms"))
    hu = huey_latency(base, args.huey) if args.huey else []
    rows.append(row("huey consumer (SqliteHuey, default)", hu, "reference"))
    rows.append(
        f"{'per-minute invoker (computed)':<34} p50 30000.00  p99 59400.00  mean 30000.00 ms "
        "(uniform wait over [0, 60) s, plus run-due's start-up)"
    )
    say(f"bench_serve: {loadavg()}")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
