"""Shared harness for the reliability tests and the long tier (``scripts/torture.py``).

Three pieces, all driving the real ``kmpwm`` command line in subprocesses:

* :class:`Home` – a kmpwm home with logging workers installed: ``cw`` (a command worker, bash),
  ``cws`` (the same, sleeping 150 ms) and ``pw`` (a Python ``entry`` worker run in run-due's
  pool of host processes).  Each run appends ``start ID ATTEMPT PID EPOCH`` to ``runs.log`` when
  it starts and ``done ...`` to ``done.log`` when it has finished, with ``O_APPEND`` (one
  ``write`` per line, so lines never interleave).  ``fold()`` folds the journal's bytes from
  scratch with :func:`kmpwm.core.state.apply` (no snapshot), the reference every view is compared with.
* :class:`CrashHarness` – SQLite-style crash injection: groups of 1-3 concurrent CLI operations
  (enqueue, ``enqueue --from -`` batches, chains with parallel steps, cancel, run-due, compact,
  inspect-queue) each SIGKILLed at a random moment: after a random delay, right after the
  journal grew, right after a worker started, right after a worker finished (between the run
  and the record of its result), or never.  After every group it checks the invariants; at the
  end it drains the queue with run-due and checks that everything reported ran, exactly once
  after its success was recorded, chains in order.
* :func:`torture` – concurrency torture: run-due processes and enqueuers (and a compactor) at
  once over many tasks and chains with parallel steps; zero duplicates, zero losses, chains in order.

Invariant violations are collected (not raised) so that the long tier can count them; the tests
assert that the list is empty and print it.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

PY = sys.executable
UNFINISHED = {"ENQUEUED", "BLOCKED", "RUNNING"}
LOGGED_WORKERS = ("cw", "cws", "pw")


def count(kind: str, n: int = 1) -> None:
    """Tally work done for the long tier's table (``KMPWM_TORTURE_COUNTS`` names the file)."""
    path = os.environ.get("KMPWM_TORTURE_COUNTS")
    if path:
        with open(path, "a") as fh:
            fh.write(f"{kind} {n}\n")


def trials_from_env(default: int) -> int:
    """How many crash trials to run: ``KMPWM_TORTURE_TRIALS`` (the fast tier's default otherwise)."""
    try:
        return max(1, int(os.environ.get("KMPWM_TORTURE_TRIALS", default)))
    except ValueError:
        return default


# -- the logging workers -------------------------------------------------------------------

WORKER_SH = r"""#!/bin/bash
# crash-harness worker: one line when it starts, one when it has finished (O_APPEND, one write each)
printf 'start %s %s %s %s\n' "$KMPWM_TASK_ID" "$KMPWM_ATTEMPT" "$$" "$EPOCHREALTIME" >> "$CRASH_RUNLOG"
s="${KMPWM_INPUT:-}"
case "$s" in
  sleep=*) sleep "${s#sleep=}" ;;
  *) if [ -n "${CRASH_SLEEP:-}" ]; then sleep "$CRASH_SLEEP"; fi ;;
esac
printf 'done %s %s %s %s\n' "$KMPWM_TASK_ID" "$KMPWM_ATTEMPT" "$$" "$EPOCHREALTIME" >> "$CRASH_DONELOG"
exit 0
"""

WORKER_PY = r'''"""crash-harness Python worker (entry = "crashpw:work"): logs like the bash one."""
import os
import time


def _line(var, kind, ctx):
    fd = os.open(os.environ[var], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{kind} {ctx.task_id} {ctx.attempt} {os.getpid()} {time.time():.6f}\n".encode())
    finally:
        os.close(fd)


def _background(seconds, how):
    """A job the worker leaves behind: it sleeps, then writes its pid to KMPWM_CRASH_HOLD.bg
    (``how``: a forked copy of this process, or an exec'd program)."""
    done = os.environ["KMPWM_CRASH_HOLD"] + ".bg"
    if how == "fork":
        pid = os.fork()
        if pid == 0:
            time.sleep(seconds)
            with open(done, "a") as fh:
                fh.write(f"{os.getpid()}\n")
            os._exit(0)
        return pid
    import subprocess

    return subprocess.Popen(["/bin/sh", "-c", f'sleep {seconds}; echo $$ >> "{done}"']).pid


def work(input, ctx):
    _line("CRASH_RUNLOG", "start", ctx)
    if input and input.startswith("sleep="):
        time.sleep(float(input[6:]))
    if input and input.startswith("bg="):  # bg=SECONDS,exec|fork: leave a job behind, then say so
        seconds, how = input[3:].split(",")
        pid = _background(float(seconds), how)
        with open(os.environ["KMPWM_CRASH_HOLD"] + ".tmp", "w") as fh:
            fh.write(str(pid))
        os.rename(os.environ["KMPWM_CRASH_HOLD"] + ".tmp", os.environ["KMPWM_CRASH_HOLD"])
        time.sleep(1)
    _line("CRASH_DONELOG", "done", ctx)
    return None
'''


@dataclass
class LogLine:
    kind: str  # start | done
    id: str
    attempt: int
    pid: int
    t: float


def parse_log(path: Path) -> tuple[list[LogLine], int]:
    """Lines of a run log, and the number of malformed ones (a torn line would be one)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    out, bad = [], 0
    for raw in data.split(b"\n"):
        if not raw:
            continue
        parts = raw.decode("utf-8", "replace").split(" ")
        try:
            out.append(LogLine(parts[0], parts[1], int(parts[2]), int(parts[3]), float(parts[4])))
        except (IndexError, ValueError):
            bad += 1
    return out, bad


def fold_bytes(data: bytes):
    """Fold journal bytes from scratch: (state, scan) — the reference for every view."""
    from kmpwm.core.state import apply, new_state
    from kmpwm.storage.journal import scan_bytes

    scan = scan_bytes(data)
    state = new_state()
    for _, record in scan.records:
        apply(state, record)
    return state, scan


class Home:
    """A kmpwm home for the harness, with the logging workers registered in config.toml."""

    def __init__(self, path: Path, *, lock_timeout: float = 60.0):
        self.path = Path(path)
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        self.journal_dir = self.path / "journal"
        self.journal = self.journal_dir / "journal.log"
        self.snapshot = self.journal_dir / "state.snap"
        self.runlog = self.path / "runs.log"
        self.donelog = self.path / "done.log"
        self.pylib = self.path / "pylib"
        env = dict(os.environ)
        for key in ("KMPWM_ASSUME", "FAKETIME", "LD_PRELOAD"):
            env.pop(key, None)
        env.update(
            {
                "KMPWM_HOME": str(self.path),
                "CRASH_RUNLOG": str(self.runlog),
                "CRASH_DONELOG": str(self.donelog),
                "KMPWM_LOCK_TIMEOUT": str(lock_timeout),
                "NO_COLOR": "1",
                "PYTHONPATH": os.pathsep.join(
                    [str(self.pylib)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
                ),
            }
        )
        self.env = env

    def install_workers(self) -> None:
        script = self.path / "crash_worker.sh"
        script.write_text(WORKER_SH)
        os.chmod(script, 0o700)
        self.pylib.mkdir(mode=0o700, exist_ok=True)
        (self.pylib / "crashpw.py").write_text(WORKER_PY)
        config = (
            "[workers.cw]\n"
            f'command = ["/bin/bash", "{script}"]\n\n'
            "[workers.cws]\n"
            f'command = ["/bin/bash", "{script}"]\n'
            'env = { CRASH_SLEEP = "0.15" }\n\n'
            "[workers.pw]\n"
            'entry = "crashpw:work"\n'
            'path = "pylib"\n'  # where crashpw is, for enqueue's import check in any process
        )
        cfg = self.path / "config.toml"
        fd = os.open(cfg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(config)
        os.chmod(cfg, 0o600)

    # -- running the CLI ------------------------------------------------------------------

    def argv(self, *args, faketime: str | None = None) -> list[str]:
        """``kmpwm ARGS``; with ``faketime`` (``+2h``, ``-1h``) on a clock that far off (libfaketime)."""
        argv = [PY, "-m", "kmpwm", *map(str, args)]
        return ["faketime", "-f", faketime, *argv] if faketime else argv

    def run(
        self,
        *args,
        input: bytes | None = None,
        timeout: float = 300.0,
        env: dict | None = None,
        faketime: str | None = None,
    ):
        proc = subprocess.run(
            self.argv(*args, faketime=faketime),
            input=input if input is not None else b"",
            capture_output=True,
            env=dict(self.env, **(env or {})),
            timeout=timeout,
        )
        proc.stdout_text = proc.stdout.decode("utf-8", "replace")
        proc.stderr_text = proc.stderr.decode("utf-8", "replace")
        return proc

    def json(
        self,
        *args,
        input: bytes | None = None,
        timeout: float = 300.0,
        env: dict | None = None,
        faketime: str | None = None,
    ):
        """(document or None, exit code, stderr) of ``kmpwm ARGS --json``."""
        if "--json" not in args:
            args = (*args, "--json")
        proc = self.run(*args, input=input, timeout=timeout, env=env, faketime=faketime)
        try:
            doc = orjson.loads(proc.stdout)
        except orjson.JSONDecodeError:
            doc = None
        return doc, proc.returncode, proc.stderr_text

    def spawn(
        self, *args, input: bytes | None = None, env: dict | None = None, faketime: str | None = None
    ) -> subprocess.Popen:
        """Start ``kmpwm ARGS``; its output is drained by threads (a full pipe never blocks it):
        ``collect(proc)`` returns (stdout, stderr) once it has ended."""
        proc = subprocess.Popen(
            self.argv(*args, faketime=faketime),
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(self.env, **(env or {})),
        )
        proc.feeder = None
        if input is not None:
            proc.feeder = threading.Thread(target=_feed, args=(proc, input), daemon=True)
            proc.feeder.start()
        proc.buffers = {"out": bytearray(), "err": bytearray()}
        proc.drainers = [
            threading.Thread(target=_drain, args=(stream, proc.buffers[name]), daemon=True)
            for stream, name in ((proc.stdout, "out"), (proc.stderr, "err"))
        ]
        for t in proc.drainers:
            t.start()
        return proc

    # -- reading --------------------------------------------------------------------------

    def fold(self):
        try:
            data = self.journal.read_bytes()
        except FileNotFoundError:
            data = b""
        return fold_bytes(data)

    def journal_size(self) -> int:
        try:
            return self.journal.stat().st_size
        except FileNotFoundError:
            return 0

    def runs(self) -> tuple[list[LogLine], list[LogLine], int]:
        starts, bad1 = parse_log(self.runlog)
        dones, bad2 = parse_log(self.donelog)
        return starts, dones, bad1 + bad2


def _drain(stream, buf: bytearray) -> None:
    try:
        while True:
            chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
            if not chunk:
                return
            buf += chunk
    except (OSError, ValueError):
        return


def collect(proc: subprocess.Popen, timeout: float = 30.0) -> tuple[bytes, bytes]:
    """(stdout, stderr) of a process started by :meth:`Home.spawn`, after it ended."""
    proc.wait(timeout=timeout)
    if proc.feeder is not None:
        proc.feeder.join(10)
    for t in proc.drainers:
        t.join(timeout)
    return bytes(proc.buffers["out"]), bytes(proc.buffers["err"])


def _feed(proc: subprocess.Popen, data: bytes) -> None:
    try:
        proc.stdin.write(data)
    except (BrokenPipeError, OSError, ValueError):
        pass
    finally:
        try:
            proc.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# -- invariant bookkeeping -----------------------------------------------------------------


@dataclass
class Tally:
    checks: int = 0
    violations: list[str] = field(default_factory=list)

    def check(self, ok: bool, message) -> bool:
        self.checks += 1
        if not ok:
            self.violations.append(message() if callable(message) else message)
        return ok

    @property
    def held(self) -> int:
        return self.checks - len(self.violations)


def check_runs_against_state(
    state: dict, starts: list[LogLine], dones: list[LogLine], tally: Tally, *, strict_cancel: bool = True
) -> None:
    """No run starts after its task was recorded finished; no two runs of a task at once."""
    tasks = state["tasks"]
    by_id: dict[str, list[LogLine]] = {}
    for line in starts:
        by_id.setdefault(line.id, []).append(line)
    for tid, lines in by_id.items():
        t = tasks.get(tid)
        if t is None or t["state"] in UNFINISHED or t.get("finished_at") is None:
            continue
        if t["state"] == "CANCELLED" and not strict_cancel:
            continue
        f = t["finished_at"]
        late = [ln for ln in lines if ln.t > f]
        tally.check(
            not late,
            lambda tid=tid, late=late, f=f, t=t: (
                f"{tid}: started again (pid {late[0].pid}, attempt {late[0].attempt}) at {late[0].t:.6f}, "
                f"{late[0].t - f:.3f}s after it was recorded {t['state']} at {f:.6f}"
            ),
        )
    # concurrent runs of one task: a run starting before another (earlier) run of it finished
    done_at = {(d.id, d.pid): d.t for d in dones}
    for tid, lines in by_id.items():
        lines = sorted(lines, key=lambda ln: ln.t)
        for a, b in zip(lines, lines[1:]):
            end = done_at.get((a.id, a.pid))
            if end is None:
                continue  # that run was killed (its runner died): when exactly is unknown
            tally.check(
                b.t >= end,
                lambda tid=tid, a=a, b=b, end=end: (
                    f"{tid}: two runs at once: pid {a.pid} ran {a.t:.6f}..{end:.6f} and pid {b.pid} started at {b.t:.6f}"  # noqa: E501
                ),
            )


def check_chain_order(state: dict, starts: list[LogLine], dones: list[LogLine], tally: Tally) -> None:
    """Every start of a step-k task comes after every step-(k-1) task of its chain was recorded
    SUCCEEDED (and after its worker finished)."""
    tasks = state["tasks"]
    first_start: dict[str, float] = {}
    for line in starts:
        first_start[line.id] = min(first_start.get(line.id, line.t), line.t)
    last_done: dict[str, float] = {}
    for line in dones:
        last_done[line.id] = max(last_done.get(line.id, line.t), line.t)
    for cid, chain in state["chains"].items():
        steps = chain["steps"]
        for k in range(1, len(steps)):
            prev = [tasks.get(i) for i in steps[k - 1]]
            for tid in steps[k]:
                if tid not in first_start:
                    continue
                s = first_start[tid]
                for p in prev:
                    ok = (
                        p is not None
                        and p["state"] == "SUCCEEDED"
                        and p["finished_at"] is not None
                        and s > p["finished_at"]
                    )
                    tally.check(
                        ok,
                        lambda: (
                            f"chain {cid}: {tid} (step {k + 1}) started at {s:.6f} before step {k}'s "
                            f"{p['id'] if p else '?'} was recorded SUCCEEDED "
                            f"({p['state'] if p else 'missing'} at {p.get('finished_at') if p else None})"
                        ),
                    )
                    if p is not None and p["id"] in last_done:
                        tally.check(
                            s > last_done[p["id"]],
                            lambda: (
                                f"chain {cid}: {tid} started at {s:.6f} before {p['id']} finished at {last_done[p['id']]:.6f}"  # noqa: E501
                            ),
                        )


def _shown_state(t: dict, now: float) -> str:
    """The state inspect-queue shows: a RUNNING task whose runner is gone (on this host: its
    process, whatever the clock says; elsewhere: its lease ran out) is claimable (ENQUEUED)."""
    from kmpwm.scheduling.leases import lease_state

    if t["state"] == "RUNNING" and lease_state(t, now) != "held":
        return "ENQUEUED"
    return t["state"]


def _lease_ending(t: dict | None) -> bool:
    """A lease that ends within seconds of now: the CLI and the fold may disagree by a moment."""
    return bool(t and t["state"] == "RUNNING" and t.get("lease") and abs(t["lease"]["until"] - time.time()) < 5)


def by_design_failure(state: dict, t: dict, starts: dict[str, int]) -> bool:
    """FAILED by design under crash injection: quarantined after its runners died while holding it
    (README: 3 runner deaths in a row) — provided its worker did start at least once; a task
    quarantined without ever having run was failed by other tasks' crashes, not its own (lost
    work).  Or a later chain step of such a task."""
    reason = t.get("reason") or ""
    if reason.startswith("quarantined"):
        return starts.get(t["id"], 0) >= 1
    if reason == "upstream failed" and t.get("chain_id"):
        chain = state["chains"].get(t["chain_id"])
        members = [state["tasks"].get(i) for step in chain["steps"] for i in step] if chain else []
        return any(
            m is not None and by_design_failure(state, m, starts)
            for m in members
            if (m.get("reason") or "").startswith("quarantined")
        )
    return False


# -- crash injection -----------------------------------------------------------------------

KILL_MODES = ("never", "time", "time", "time", "journal-grew", "journal-grew", "worker-started", "worker-done")


@dataclass
class Op:
    kind: str
    args: list
    input: bytes | None = None
    ids: list = field(default_factory=list)  # enqueue: task ids; chain: [chain id]; cancel: targets
    mode: str = "time"
    delay: float = 0.0
    proc: subprocess.Popen | None = None
    started: float = 0.0
    base: dict = field(default_factory=dict)
    kill_at: float | None = None
    killed: bool = False
    rc: int | None = None
    out: bytes = b""
    err: bytes = b""


class CrashHarness:
    """Random operations, killed at random moments; invariants checked after every group."""

    def __init__(self, home: Home, *, seed: int, max_group: int = 3, check_every: int = 1):
        self.home = home
        self.rng = random.Random(seed)
        self.seed = seed
        self.max_group = max_group
        self.check_every = check_every
        self.tally = Tally()
        self.n = 0
        self.enq_attempted: set[str] = set()
        self.enq_reported: dict[str, int] = {}
        self.chain_attempted: set[str] = set()
        self.chain_reported: dict[str, list[str]] = {}
        self.cancel_attempted: set[str] = set()
        self.cancel_reported: set[str] = set()
        self.terminal: dict[str, tuple[str, float]] = {}
        self.stats = {
            "trials": 0,
            "ops": 0,
            "killed": 0,
            "completed": 0,
            "by_kind": {},
            "kill_modes": {},
            "reruns_before_record": 0,
            "quarantined": 0,
            "drain_passes": 0,
        }

    # -- building operations ------------------------------------------------------------

    def _new_id(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def _worker(self) -> str:
        return self.rng.choices(LOGGED_WORKERS, weights=(6, 2, 3))[0]

    def _task_args(self) -> list:
        extra = []
        r = self.rng.random()
        if r < 0.3:
            extra = ["--input", f"sleep={self.rng.choice(['0.02', '0.05', '0.1'])}"]
        return extra

    def make_op(self) -> Op:
        kind = self.rng.choices(
            ["enqueue", "batch", "chain", "run-due", "cancel", "compact", "inspect"], weights=[22, 12, 14, 32, 5, 7, 8]
        )[0]
        if kind == "enqueue":
            tid = self._new_id("e")
            op = Op(kind, ["enqueue", tid, self._worker(), *self._task_args(), "--json"], ids=[tid])
        elif kind == "batch":
            ids, lines = [], []
            for _ in range(self.rng.randint(2, 25)):
                tid = self._new_id("b")
                spec = {"id": tid, "worker": self._worker()}
                if self.rng.random() < 0.2:
                    spec["input"] = "sleep=0.02"
                ids.append(tid)
                lines.append(orjson.dumps(spec))
            op = Op(kind, ["enqueue", "--from", "-", "--json"], input=b"\n".join(lines) + b"\n", ids=ids)
        elif kind == "chain":
            cid = self._new_id("c")
            steps = []
            for _ in range(self.rng.randint(2, 4)):
                steps.append("+".join(self._worker() for _ in range(self.rng.choice([1, 1, 2, 3]))))
            op = Op(kind, ["chain", "--id", cid, *steps, "--json"], ids=[cid])
        elif kind == "run-due":
            op = Op(kind, ["run-due", "--json", "--parallel", str(self.rng.choice([1, 2, 4]))])
        elif kind == "cancel":
            pool = sorted(self.enq_attempted | self.chain_attempted)
            targets = self.rng.sample(pool, min(len(pool), self.rng.randint(1, 2))) if pool else ["nothing"]
            op = Op(kind, ["cancel", *targets, "--json"], ids=targets)
        elif kind == "compact":
            op = Op(kind, ["compact", "--json"])
        else:
            op = Op(kind, ["inspect-queue", "--json"])
        modes = KILL_MODES if kind == "run-due" else ("never", "time", "time", "time", "journal-grew", "journal-grew")
        op.mode = self.rng.choice(modes)
        if op.mode == "time":
            # the brief's 0-300 ms; run-due also gets later moments (its work starts after start-up)
            hi = 0.3 if kind != "run-due" or self.rng.random() < 0.5 else 1.2
            op.delay = self.rng.uniform(0.0, hi)
        else:
            op.delay = self.rng.choice([0.0, 0.0005, 0.002, 0.01, 0.03])
        return op

    # -- one trial: a group of concurrent operations, each killed at its moment ---------

    def trial(self) -> None:
        group = [self.make_op() for _ in range(self.rng.randint(1, self.max_group))]
        for op in group:
            if op.kind == "enqueue" or op.kind == "batch":
                self.enq_attempted.update(op.ids)
            elif op.kind == "chain":
                self.chain_attempted.update(op.ids)
            elif op.kind == "cancel":
                self.cancel_attempted.update(op.ids)
            op.base = {
                "journal": self.home.journal_size(),
                "runs": _size(self.home.runlog),
                "done": _size(self.home.donelog),
            }
            op.proc = self.home.spawn(*op.args, input=op.input)
            op.started = time.monotonic()
            self.stats["ops"] += 1
            self.stats["by_kind"][op.kind] = self.stats["by_kind"].get(op.kind, 0) + 1
            self.stats["kill_modes"][op.mode] = self.stats["kill_modes"].get(op.mode, 0) + 1
        self._supervise(group)
        for op in group:
            self._collect(op)
        self.stats["trials"] += 1
        if self.stats["trials"] % self.check_every == 0:
            self.check_now()

    def _condition(self, op: Op, now: float) -> bool:
        if op.mode == "time":
            return now - op.started >= op.delay
        if op.mode == "journal-grew":
            return self.home.journal_size() != op.base["journal"]
        if op.mode == "worker-started":
            return _size(self.home.runlog) != op.base["runs"]
        if op.mode == "worker-done":
            return _size(self.home.donelog) != op.base["done"]
        return False

    def _supervise(self, group: list[Op], limit: float = 120.0) -> None:
        deadline = time.monotonic() + limit
        while True:
            now = time.monotonic()
            alive = [op for op in group if op.proc.poll() is None]
            if not alive:
                return
            for op in alive:
                if op.mode == "never":
                    continue
                if op.kill_at is None and self._condition(op, now):
                    op.kill_at = now + (op.delay if op.mode != "time" else 0.0)
                if op.kill_at is not None and now >= op.kill_at:
                    _kill(op)
            if now > deadline:
                for op in alive:
                    _kill(op)
                self.tally.check(False, f"seed {self.seed}: {alive[0].args} did not finish in {limit:g}s")
                return
            time.sleep(0.0005)

    def _collect(self, op: Op) -> None:
        try:
            op.out, op.err = collect(op.proc)
        except subprocess.TimeoutExpired:
            op.proc.kill()
            op.out, op.err = collect(op.proc)
            self.tally.check(False, f"{op.args}: did not end 30s after it was killed or finished")
        op.rc = op.proc.returncode
        killed = op.killed and op.rc == -signal.SIGKILL
        self.stats["killed" if killed else "completed"] += 1
        err = op.err.decode("utf-8", "replace")
        self.tally.check(
            "Traceback" not in err and "internal error" not in err,
            lambda: f"{op.args}: traceback or internal error on stderr:\n{err[-3000:]}",
        )
        if not killed:
            self.tally.check(op.rc == 0, lambda: f"{op.args} (not killed) exited {op.rc}: {err[-2000:]}")
        try:
            doc = orjson.loads(op.out) if op.out else None
        except orjson.JSONDecodeError:
            doc = None
            if not killed:
                self.tally.check(False, f"{op.args} (not killed): stdout is not one JSON document: {op.out[-500:]!r}")
        if doc is None:
            return
        if op.kind == "enqueue" and doc.get("result") == "SUCCESS":
            self.enq_reported[doc["id"]] = self.stats["trials"]
            self.tally.check(
                doc["id"] == op.ids[0] and doc.get("action") == "enqueued",
                lambda: f"{op.args}: unexpected success document {doc}",
            )
        elif op.kind == "batch" and "results" in doc:
            results = doc["results"]
            if results and all(r.get("result") == "SUCCESS" for r in results):
                self.tally.check([r["id"] for r in results] == op.ids, lambda: f"batch ids {results} != {op.ids}")
                for r in results:
                    self.enq_reported[r["id"]] = self.stats["trials"]
        elif op.kind == "chain" and doc.get("result") == "SUCCESS":
            self.chain_reported[doc["id"]] = list(doc["tasks"])
        elif op.kind == "cancel" and "cancelled" in doc:
            self.cancel_reported.update(doc["cancelled"])

    # -- invariants ---------------------------------------------------------------------

    def check_now(self, *, final: bool = False) -> dict:
        tally = self.tally
        doc, rc, err = self.home.json("inspect-queue", "--all")
        tally.check(
            rc == 0 and doc is not None, lambda: f"the journal does not open: inspect-queue exit {rc}: {err[-2000:]}"
        )
        tally.check("Traceback" not in err, lambda: f"inspect-queue traceback: {err[-2000:]}")
        state, scan = self.home.fold()
        tally.check(
            not scan.damage,
            lambda: f"crashes left damage in the middle of the journal: {[d.describe() for d in scan.damage]}",
        )
        tasks = state["tasks"]
        if doc is not None:
            shown = {t["id"]: t["state"] for t in doc["tasks"]}
            folded = {i: _shown_state(t, time.time()) for i, t in tasks.items()}
            differ = {
                k: (shown.get(k), folded.get(k))
                for k in set(shown) | set(folded)
                if shown.get(k) != folded.get(k) and not _lease_ending(tasks.get(k))
            }
            tally.check(
                not differ, lambda: f"inspect-queue differs from a fresh fold of the journal: {str(differ)[:2000]}"
            )
        for tid in self.enq_reported:
            tally.check(tid in tasks, f"lost: enqueue of {tid} reported SUCCESS but the task is not in the journal")
        for cid, members in self.chain_reported.items():
            tally.check(cid in state["chains"], f"lost: chain {cid} reported SUCCESS but is not in the journal")
            missing = [i for i in members if i not in tasks]
            tally.check(not missing, lambda: f"lost: chain {cid}'s tasks {missing} are not in the journal")
        for tid in self.cancel_reported:
            t = tasks.get(tid)
            tally.check(
                t is not None and t["state"] in ("CANCELLED", "SUCCEEDED", "FAILED"),
                lambda: f"cancel of {tid} was reported but it is {t and t['state']}",
            )
        for tid, t in tasks.items():
            if t["state"] in UNFINISHED:
                continue
            seen = self.terminal.get(tid)
            if seen is None:
                self.terminal[tid] = (t["state"], t["finished_at"])
            else:
                tally.check(
                    seen == (t["state"], t["finished_at"]),
                    lambda: f"{tid}: was recorded {seen[0]} at {seen[1]}, now {t['state']} at {t['finished_at']}",
                )
        starts, dones, bad = self.home.runs()
        tally.check(bad == 0, f"{bad} malformed line(s) in the run logs")
        check_runs_against_state(state, starts, dones, tally)
        return state

    def drain(self, max_passes: int = 25) -> dict:
        """Run run-due (never killed) until nothing is left to run."""
        state = None
        for _ in range(max_passes):
            doc, rc, err = self.home.json("run-due", "--parallel", "4", timeout=600)
            self.stats["drain_passes"] += 1
            self.tally.check(rc == 0, lambda: f"drain: run-due exited {rc}: {err[-2000:]}")
            self.tally.check("Traceback" not in err, lambda: f"drain: traceback: {err[-2000:]}")
            state, _ = self.home.fold()
            left = [i for i, t in state["tasks"].items() if t["state"] in UNFINISHED]
            if not left:
                break
        return state

    def finish(self) -> None:
        tally = self.tally
        self.drain()
        state = self.check_now(final=True)
        tasks = state["tasks"]
        stuck = sorted(i for i, t in tasks.items() if t["state"] in UNFINISHED)
        tally.check(
            not stuck,
            lambda: f"stuck after draining: {[(i, tasks[i]['state'], tasks[i]['lease']) for i in stuck[:10]]}",
        )
        cancelled_chains = set(self.cancel_attempted) & set(state["chains"])
        starts, dones, _ = self.home.runs()
        start_count: dict[str, int] = {}
        for s in starts:
            start_count[s.id] = start_count.get(s.id, 0) + 1

        def acceptable(t: dict) -> bool:
            if t["state"] == "SUCCEEDED":
                return True
            if t["state"] == "CANCELLED":
                return (
                    t["id"] in self.cancel_attempted
                    or t.get("chain_id") in cancelled_chains
                    or t.get("reason") == "upstream cancelled"
                )
            if t["state"] == "FAILED":
                return by_design_failure(state, t, start_count)
            return False

        for tid in sorted(set(self.enq_reported) | (self.enq_attempted & set(tasks))):
            t = tasks.get(tid)
            tally.check(
                t is not None and acceptable(t),
                lambda: (
                    f"{tid}: ended {t and t['state']} ({t and t['reason']}) although its worker started only "
                    f"{start_count.get(tid, 0)} time(s); expected SUCCEEDED"
                    f"{' or CANCELLED' if tid in self.cancel_attempted else ''}"
                ),
            )
        for cid in sorted(set(self.chain_reported) | (self.chain_attempted & set(state["chains"]))):
            chain = state["chains"].get(cid)
            members = [tasks.get(i) for step in chain["steps"] for i in step] if chain else []
            ok = chain is not None and all(m is not None and acceptable(m) for m in members)
            tally.check(
                ok,
                lambda: (
                    f"chain {cid}: not finished as it should: "
                    f"{[(m['id'], m['state'], m['reason']) for m in members if m]}"
                ),
            )
        done_ids: dict[str, list[float]] = {}
        for d in dones:
            done_ids.setdefault(d.id, []).append(d.t)
        for tid, t in tasks.items():
            if t["state"] == "SUCCEEDED" and t["worker"] in LOGGED_WORKERS:
                ok = any(x <= t["finished_at"] for x in done_ids.get(tid, []))
                tally.check(
                    ok, f"{tid}: recorded SUCCEEDED at {t['finished_at']} but its worker never finished before that"
                )
            if t["state"] == "FAILED" and (t.get("reason") or "").startswith("quarantined"):
                self.stats["quarantined"] += 1
        check_chain_order(state, starts, dones, tally)
        self.stats["reruns_before_record"] = sum(c - 1 for c in start_count.values() if c > 1)
        doc, rc, err = self.home.json("doctor")
        tally.check(
            rc == 0 and doc is not None and doc.get("healthy") is True and not doc["journal"]["damage"],
            lambda: f"doctor after the crashes: exit {rc}, {doc and doc.get('problems')}: {err[-1000:]}",
        )
        self.stats["tasks"] = len(tasks)
        self.stats["chains"] = len(state["chains"])
        self.stats["reported_enqueues"] = len(self.enq_reported)
        self.stats["reported_chains"] = len(self.chain_reported)

    def run(self, trials: int) -> Tally:
        for _ in range(trials):
            self.trial()
        self.finish()
        return self.tally


def _kill(op: Op) -> None:
    if op.proc.poll() is None:
        try:
            op.proc.send_signal(signal.SIGKILL)
            op.killed = True
        except ProcessLookupError:
            pass


# -- concurrency torture -------------------------------------------------------------------


@dataclass
class TortureResult:
    tally: Tally
    figures: dict


def torture(
    home: Home,
    *,
    tasks: int,
    chains: int,
    runners: int,
    enqueuers: int,
    compactor: bool = True,
    seed: int = 0,
    timeout: float = 900.0,
    parallel: int = 2,
) -> TortureResult:
    """``runners`` run-due loops and ``enqueuers`` enqueuers at once (plus a compactor)."""
    rng = random.Random(seed)
    tally = Tally()
    lock = threading.Lock()
    reported_tasks: set[str] = set()
    reported_chains: dict[str, list[list[str]]] = {}
    failures: list[str] = []
    started = time.monotonic()
    stop = threading.Event()
    figures = {"enqueue_calls": 0, "chain_calls": 0, "run_due_calls": 0, "compactions": 0}

    # the work, split between the enqueuers: batches of tasks and chains with parallel steps
    units: list[list] = [[] for _ in range(enqueuers)]
    n = 0
    batch: list[dict] = []
    for i in range(tasks):
        batch.append({"id": f"t{i}", "worker": rng.choices(LOGGED_WORKERS, weights=(7, 1, 3))[0]})
        if len(batch) >= rng.randint(5, 30) or i == tasks - 1:
            units[n % enqueuers].append(("batch", batch))
            batch, n = [], n + 1
    for c in range(chains):
        steps = []
        for _ in range(rng.randint(2, 4)):
            steps.append("+".join(rng.choices(LOGGED_WORKERS, weights=(7, 1, 3))[0] for _ in range(rng.randint(1, 3))))
        units[c % enqueuers].append(("chain", (f"k{c}", steps)))
    for u in units:
        rng.shuffle(u)

    def fail(msg: str) -> None:
        with lock:
            failures.append(msg)

    def enqueuer(work: list) -> None:
        for kind, payload in work:
            if kind == "batch":
                data = b"".join(orjson.dumps(s) + b"\n" for s in payload)
                doc, rc, err = home.json("enqueue", "--from", "-", input=data)
                with lock:
                    figures["enqueue_calls"] += 1
                if rc != 0 or doc is None or any(r.get("result") != "SUCCESS" for r in doc.get("results", [{}])):
                    fail(f"enqueue --from exited {rc}: {err[-1000:]}")
                    continue
                with lock:
                    reported_tasks.update(r["id"] for r in doc["results"])
            else:
                cid, steps = payload
                doc, rc, err = home.json("chain", "--id", cid, *steps)
                with lock:
                    figures["chain_calls"] += 1
                if rc != 0 or doc is None or doc.get("result") != "SUCCESS":
                    fail(f"chain {cid} exited {rc}: {err[-1000:]}")
                    continue
                with lock:
                    reported_chains[cid] = doc["tasks"]
                    reported_tasks.update(doc["tasks"])

    def runner() -> None:
        while not stop.is_set():
            doc, rc, err = home.json("run-due", "--parallel", str(parallel), timeout=600)
            with lock:
                figures["run_due_calls"] += 1
            if rc != 0 or "Traceback" in err:
                fail(f"run-due exited {rc}: {err[-1500:]}")
            if doc is not None and not doc.get("ran"):
                stop.wait(rng.uniform(0.4, 0.9))  # idle: like cron, come back a little later

    def compact_loop() -> None:
        while not stop.wait(rng.uniform(1.5, 3.0)):
            doc, rc, err = home.json("compact")
            with lock:
                figures["compactions"] += 1
            if rc != 0:
                fail(f"compact exited {rc}: {err[-1500:]}")

    threads = [threading.Thread(target=enqueuer, args=(u,), name=f"enq{i}") for i, u in enumerate(units)]
    run_threads = [threading.Thread(target=runner, name=f"run{i}") for i in range(runners)]
    if compactor:
        run_threads.append(threading.Thread(target=compact_loop, name="compactor"))
    for t in threads + run_threads:
        t.start()
    for t in threads:
        t.join()
    enqueued_at = time.monotonic()
    state = None
    while time.monotonic() - started < timeout:
        state, _ = home.fold()
        if not any(t["state"] in UNFINISHED for t in state["tasks"].values()):
            break
        time.sleep(0.3)
    stop.set()
    for t in run_threads:
        t.join()
    elapsed = time.monotonic() - started
    state, scan = home.fold()

    for msg in failures:
        tally.check(False, msg)
    all_tasks = state["tasks"]
    tally.check(not scan.damage, lambda: f"damage in the journal: {[d.describe() for d in scan.damage]}")
    expected = tasks + sum(len(v) for v in reported_chains.values())
    tally.check(len(reported_tasks) == expected, f"{len(reported_tasks)} tasks reported enqueued, expected {expected}")
    starts, dones, bad = home.runs()
    tally.check(bad == 0, f"{bad} malformed run log lines")
    start_count: dict[str, int] = {}
    for s in starts:
        start_count[s.id] = start_count.get(s.id, 0) + 1
    done_count: dict[str, int] = {}
    for d in dones:
        done_count[d.id] = done_count.get(d.id, 0) + 1
    losses = duplicates = 0
    for tid in sorted(reported_tasks):
        t = all_tasks.get(tid)
        if not tally.check(
            t is not None and t["state"] == "SUCCEEDED",
            lambda: f"lost: {tid} is {t and t['state']} ({t and t['reason']})",
        ):
            losses += 1
        runs = start_count.get(tid, 0)
        if not tally.check(
            runs == 1 and done_count.get(tid, 0) == 1,
            lambda: f"{tid} ran {runs} time(s) (finished {done_count.get(tid, 0)}), expected exactly once",
        ):
            if runs > 1:
                duplicates += 1
            elif runs == 0:
                losses += 1
    extra = set(start_count) - reported_tasks
    tally.check(not extra, lambda: f"runs of tasks nobody enqueued: {sorted(extra)[:10]}")
    extra_tasks = set(all_tasks) - reported_tasks
    tally.check(not extra_tasks, lambda: f"tasks in the journal nobody enqueued: {sorted(extra_tasks)[:10]}")
    order_tally = Tally()
    check_chain_order(state, starts, dones, order_tally)
    tally.checks += order_tally.checks
    tally.violations += order_tally.violations
    for cid in reported_chains:
        chain = state["chains"].get(cid)
        tally.check(
            chain is not None and all(all_tasks[i]["state"] == "SUCCEEDED" for s in chain["steps"] for i in s),
            f"chain {cid} did not succeed",
        )
    check_runs_against_state(state, starts, dones, tally)
    doc, rc, err = home.json("doctor")
    tally.check(rc == 0 and doc is not None and doc.get("healthy"), lambda: f"doctor: exit {rc}: {err[-500:]}")
    figures.update(
        {
            "tasks": tasks,
            "chains": chains,
            "chain_tasks": expected - tasks,
            "runners": runners,
            "enqueuers": enqueuers,
            "runs": len(starts),
            "duplicates": duplicates,
            "losses": losses,
            "order_violations": len(order_tally.violations),
            "seconds": round(elapsed, 1),
            "drain_seconds": round(time.monotonic() - enqueued_at, 1),
            "runs_per_second": round(len(starts) / elapsed, 1) if elapsed else 0.0,
        }
    )
    return TortureResult(tally, figures)
