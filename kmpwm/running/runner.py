"""``run-due``: claim what is due, run every task in its own process, record what happened.

One pass: (1) under the journal lock, fold the latest state, plan what is due, and append one
record of leases (runner id, pid, start token, lease end) for the tasks it will run; (2) start a
process per task: a forked child for Python workers, the command itself for command workers;
(3) wait for them in a single-threaded loop over their pipes, with time limits, the run's
budget and expiry signals; (4) append each finished run's result, durably, before anything
that depends on it (the next chain step) is claimed.  Two run-due processes never hold the lease
of the same task at once, so every due occurrence runs exactly once across them.
"""

from __future__ import annotations

import errno
import functools
import gc
import os
import selectors
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field

import orjson

from kmpwm.core.exitcodes import ConfigError, JournalError, KmpwmError
from kmpwm.core.models import DEFAULT_GRACE
from kmpwm.core.state import due_at, occurrence_open, pause_of
from kmpwm.core.triggers import next_after_run, task_offset
from kmpwm.platform import procs
from kmpwm.running import groups
from kmpwm.running.declare import declared_limit
from kmpwm.scheduling.leases import StartLog, forget_started, holder_started, lease_state
from kmpwm.scheduling.plan import plan, time_limit, upstream_of
from kmpwm.scheduling.probes import Device
from kmpwm.storage import reserve, runlog
from kmpwm.storage.paths import Paths, private_subdir
from kmpwm.storage.store import Store
from kmpwm.storage.stores import open_store

LEASE_MARGIN = 10.0
TAIL = 8192
STDOUT_TAIL = 65536
MAX_INLINE_ENV_INPUT = 100 * 1024  # larger inputs reach command workers on stdin only
RECLAIM_EVERY = 1.0
LOST_STORE_MARGIN = 3.0  # a shared store's lease: stop our runs this long before it could end
CANCEL_WATCH = 0.5  # how often running tasks are checked for a cancel (lock-free, the journal's tail)
HOST_MAX_TASKS = 500  # a pool host is replaced after this many tasks (bounded leaks)
GROUP_WAIT = 0.010  # a finished run's result waits at most this long to share a record with others
PREFETCH_MARGIN = 5.0  # a claimed task may wait briefly for a free slot before it starts
START_SLACK = 0.5  # scheduling delay between claiming a task and starting it


@dataclass
class Job:
    task: dict
    attempt: int
    kind: str  # python | command
    limit: float
    started: float  # monotonic
    started_wall: float
    pid: int = 0
    proc: object = None
    fds: dict = field(default_factory=dict)  # fd -> "result" | "out" | "err"
    result: bytearray = field(default_factory=bytearray)
    out: bytearray = field(default_factory=bytearray)
    err: bytearray = field(default_factory=bytearray)
    kill_at: float | None = None
    expiring: bool = False
    run_expired: bool = False  # told to stop because the whole run expired
    cancelled: bool = False  # told to stop because the task was cancelled or replaced
    exit_status: int | None = None  # raw wait status / returncode
    immediate: dict | None = None  # a result known without a process (start failure, notify)
    ended: float = 0.0  # monotonic time it was reaped
    host: Host | None = None  # the pool process running it (Python workers)
    answered: bool = False  # the host sent this job's result
    log: runlog.RunLog | None = None  # where its output goes as it arrives
    progressed: bool = False  # a Python worker that reported progress (its file is to remove)

    @property
    def id(self) -> str:
        return self.task["id"]


@dataclass
class Host:
    """A pool process that runs Python tasks one after another (see worker_host.host_main)."""

    pid: int
    to_host: int
    results: int
    output: int
    buf: bytearray = field(default_factory=bytearray)
    job: Job | None = None
    tasks: int = 0
    dead: bool = False
    retire: bool = False
    exit_status: int | None = None


@dataclass
class Report:
    ran: list = field(default_factory=list)
    expired: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    failed: list = field(default_factory=list)  # tasks that ended FAILED in this run: {"id", "worker", "reason"}

    def doc(self) -> dict:
        return {
            "ran": self.ran,
            "expired": self.expired,
            "skipped": [{"id": k, "reason": v} for k, v in self.skipped.items()],
        }


class Runner:
    def __init__(
        self,
        paths: Paths,
        *,
        budget: float | None = None,
        grace: float = DEFAULT_GRACE,
        parallel: int | None = None,
        max_tasks: int | None = None,
        dry_run: bool = False,
        on_event=None,
        store: Store | None = None,
        forced: list[str] | None = None,
        ignore_constraints: bool = False,
        serve=None,
    ):
        self.paths = paths
        # run-now (SPEC section 11): only these task ids, whatever their due time (steering.plan_forced)
        self.forced = forced
        self.ignore_constraints = ignore_constraints
        self.serve = serve  # serve.Serve: run() then never ends by itself (kmpwm serve)
        self._poke = False  # the queue changed (serve's watch): plan again at once
        # (journal inode, offset) that the last plan saw, our own records of its transaction
        # included: serve may take a due task left unstarted for one that waits for a
        # constraint only while the journal has nothing after this (serve._sleep)
        self.planned_at: tuple[int, int] | None = None
        self._replanned = False
        self.store = store or open_store(paths)
        self.budget = budget
        self.grace = grace
        self.parallel = parallel or os.cpu_count() or 1
        self.max_tasks = max_tasks
        self.dry_run = dry_run
        self.on_event = on_event or (lambda kind, payload: None)
        self.pid = os.getpid()
        self.token = procs.token(self.pid)
        self.boot = procs.boot_id()
        # the host name (KMPWM_HOST, else the machine's): leases name it, pinned tasks match it
        self.host = procs.host()
        self.runner_id = f"{self.host}/{self.pid}/{uuid.uuid4().hex[:8]}"
        self.device = Device(storage_path=str(paths.journal_dir.parent))
        self.jobs: dict[str, Job] = {}
        self.done: set[str] = set()
        self.claimed_count = 0
        self._prefetch = max(8, 4 * self.parallel)  # at most this many claimed ahead of free slots
        self._avg_run: float | None = None  # moving average of run times (s), for the prefetch depth
        self._ready: list = []  # claimed, not started yet: (task, info, limit, upstream)
        self._pending: list[Job] = []  # finished, result not written yet
        self._release: list = []  # claimed but never started (the run expired): hand back
        self.report = Report()
        self.run_expired = False
        self.expire_reason = ""
        self._registry = None
        self._sel: selectors.BaseSelector | None = None
        self._wake_r = self._wake_w = -1
        self._signals: dict = {}
        self._flags = {"expire": False, "child": False, "force": False, "signo": 0}
        self._forced = False
        self._known_cache: dict[str, bool] = {}
        self._preloaded: set[str] = set()
        self._frozen = False
        self._hosts: list[Host] = []
        self._base_env: dict | None = None
        self._pool = os.environ.get("KMPWM_POOL", "1") != "0"
        self._queue: list[dict] = []  # candidates of the last plan, best last
        self._broken: set[str] = set()
        self._fence_broken: set[str] = set()
        self._trig: dict[str, dict] = {}
        self._on_fold = None
        self._groups = groups.GroupLog(paths.runners_dir, self.pid, self.token, self.runner_id)
        self.disk_full = False  # no room to record results: claim nothing more (reserve.py)
        self._occ: dict[str, str] = {}
        self._trim_at = 0.0
        shared = self.store if getattr(self.store, "kind", "journal") != "journal" else None
        # each run's output (kmpwm.storage.runlog); on a shared store, kept there too
        self._runlogs = runlog.Starter(paths, self.pid, self.token, shared, self.host)
        # a shared store (storage.pgstore): leases on the database's clock, renewed while runs last
        self._renew = getattr(self.store, "renew", None)
        self._lease_base = 0.0  # monotonic time of the oldest moment our leases were last pushed on
        self._renew_at = 0.0
        self._store_retry_at = 0.0  # after a failed write to a shared store: try again from then
        self._hooks = None  # kmpwm.running.hooks.HookRunner, when config.toml has [hooks]
        self._hooks_read = False
        self._crash_at = os.environ.get("KMPWM_CRASH_AT")  # crash injection for the tests
        self._starts = StartLog(paths.runners_dir, self.pid, self.token, self.boot)  # leases.holder_started

    @property
    def registry(self):
        if self._registry is None:
            from kmpwm.running.registry import Registry

            self._registry = Registry(self.paths)
        return self._registry

    # -- the pass -------------------------------------------------------------------------

    def run(self) -> int:
        """Run what is due; returns 75 if the run itself expired, else 0."""
        view = self.store.load(full=False)
        self.store.verify_covered(view)
        if view.damage:
            raise JournalError(
                f"the journal has {len(view.damage)} damaged record(s) ({view.damage[0].describe()}); "
                "run-due refuses to run, because a lost cancel or completion could run work twice",
                hint="run `kmpwm doctor --repair` to quarantine the damage, then try again",
            )
        # A broken config.toml stops the run before anything is claimed, skipped or counted (exit 78):
        # otherwise every task would be skipped as "unknown worker", silently under cron.
        self.registry.check()
        if self._renew is not None and self.store.lease() <= self.grace + LOST_STORE_MARGIN + 2:
            raise ConfigError(
                f"KMPWM_LEASE ({self.store.lease():g}s) must exceed the grace period ({self.grace:g}s) by more than "
                f"{LOST_STORE_MARGIN + 2:g}s: a run that loses the store must be stopped before its lease ends"
            )
        if self.dry_run:
            return self._dry_run(view.state)
        # Nothing due and nothing to record: done, without the lock (the common case under cron).
        idle = self._plan(view.state, time.time(), set())
        if not idle.due and not idle.ops and self.serve is None:
            for s in idle.skipped:
                self.report.skipped[s["id"]] = s["reason"]
            return 0
        deadline = time.monotonic() + self.budget if self.budget is not None else None
        if self._renew is not None:
            self.store.note_runner(self.runner_id.split("/", 1)[0], self.runner_id)
        self._setup()
        groups.sweep(self.paths.runners_dir)  # what workers of killed runners left behind
        forget_started(self.paths.runners_dir)
        try:
            need_claim, last_claim, last_watch = True, 0.0, time.monotonic()
            while True:
                if self.serve is not None:
                    self.serve.tick(self)
                now_m = time.monotonic()
                if deadline is not None and now_m >= deadline and not self.run_expired:
                    self._expire_run("the run's --budget ended")
                if self._flags["expire"] and not self.run_expired:
                    self._expire_run(self.expire_reason or "the expiration signal arrived")
                for job in self._reap():
                    self._pending.append(job)
                self._start_ready()
                periodic = now_m - last_claim >= RECLAIM_EVERY or self._poke
                slots = len(self.jobs) + len(self._ready) < self.parallel + self._prefetch
                low = len(self._ready) < self.parallel  # claim ahead only when the ready queue runs low
                want = (
                    not self.run_expired and not self.disk_full and self._room() and slots and (need_claim or periodic)
                )
                if (self._must_write(now_m) or (want and (low or periodic))) and now_m >= self._store_retry_at:
                    wrote = bool(self._pending)
                    claimed = self._cycle(want, replan=periodic or self._unblocks(self._pending))
                    if want:
                        last_claim = time.monotonic()
                        need_claim = claimed > 0
                        self._poke = False
                    if wrote:
                        need_claim = True  # a result may have made something due (a chain's next step)
                    if claimed or wrote:
                        continue
                if not self.jobs and not self._ready and not self._pending and not self._release:
                    if self.run_expired or self.disk_full or not self._room() or not need_claim:
                        if self.serve is None or self.run_expired or self.disk_full:
                            break  # nothing left that this run may start
                        need_claim = self.serve.idle(self)  # until something is due or changes
                    continue
                later = self._runlogs.flush()  # the runs started and ended meanwhile, one write
                timeout = self._timeout(deadline)
                if self._renew is not None and (self.jobs or self._pending):
                    timeout = min(timeout, max(0.0, min(self._renew_at, self._store_retry_at) - time.monotonic()))
                self._wait(timeout if later is None else min(timeout, later))
                self._check_limits()
                if self._renew is not None:
                    self._renew_leases()
                if self.jobs and time.monotonic() - last_watch >= CANCEL_WATCH:
                    last_watch = time.monotonic()
                    self._watch_cancels()
                if self._hooks:
                    self._hooks.poll()
            self._runlogs.flush(force=True)
            self._end_hooks()
        finally:
            self._teardown()
        return 75 if self.run_expired else 0

    def _plan(self, state: dict, now: float, exclude):
        if self.forced is None:
            return plan(
                state,
                now,
                self.device,
                exclude=exclude,
                known_worker=self._known,
                host=self.host,
                started=self._started_by,
            )
        from kmpwm.scheduling.steering import plan_forced

        return plan_forced(
            state,
            now,
            self.device,
            self.forced,
            exclude=exclude,
            known_worker=self._known,
            ignore_constraints=self.ignore_constraints,
            host=self.host,
        )

    def _unblocks(self, finished: list[Job]) -> bool:
        """Could these completions make other tasks due (a chain's next step, an appended task)?"""
        waiters = self.store._view.state["waiters"] if self.store._view else {}
        return any(job.task.get("chain_id") or job.id in waiters for job in finished)

    def _room(self) -> bool:
        return self.max_tasks is None or self.claimed_count < self.max_tasks

    def _dry_run(self, state: dict) -> int:
        p = plan(state, time.time(), self.device, known_worker=self._known, host=self.host)
        for t in p.due[: self.max_tasks or None]:
            self.report.ran.append(
                {
                    "id": t["id"],
                    "worker": t["worker"],
                    "status": None,
                    "message": "would run",
                    "data": None,
                    "duration_ms": 0,
                }
            )
        for s in p.skipped:
            self.report.skipped[s["id"]] = s["reason"]
        return 0

    def _known(self, name: str) -> bool:
        known = self._known_cache.get(name)
        if known is None:
            try:
                known = self.registry.get(name) is not None
            except KmpwmError:
                raise  # the configuration: checked in run() already, never a silent "unknown worker"
            except Exception:
                known = False
            self._known_cache[name] = known
        return known

    def _preload(self, info) -> None:
        """Import a Python worker's module once in run-due, so that every forked child starts with
        it loaded (no import per task).  A failing import is left for the child to report;
        KMPWM_PRELOAD=0 turns this off for workers whose import has side effects (threads)."""
        if info.name in self._preloaded or os.environ.get("KMPWM_PRELOAD", "1") == "0":
            return
        self._preloaded.add(info.name)
        try:
            from kmpwm.running.worker_host import load_target

            info.preloaded = load_target(info)
        except Exception:
            pass

    # -- one cycle: record what finished, claim what is due -------------------------------

    def _must_write(self, now_m: float) -> bool:
        """Group commit: results share a record unless waiting would hold anything up."""
        if self._release:
            return True
        if not self._pending:
            return False
        return (
            not self.jobs
            or self.run_expired
            or len(self._pending) >= self._prefetch
            or (not self._ready and len(self.jobs) < self.parallel)
            or now_m - self._pending[0].ended >= GROUP_WAIT
        )

    def _cycle(self, claim: bool, *, replan: bool) -> int:
        """Write what finished and claim what is due (_cycle_once); when the disk is full, give
        up the reserve (reserve.py) and write the results alone, then without their data."""
        if self._renew is None:
            return self._cycle_journal(claim, replan=replan)
        held = bool(self.jobs)
        start = time.monotonic()
        try:
            claimed = self._cycle_journal(claim, replan=replan)
        except JournalError as exc:
            if not held or self.run_expired and not self.jobs:
                raise  # nothing of ours is running: say so and stop (exit 74)
            # Our runs go on while the store is away; their leases are renewed when it is back,
            # and stopped by the expiry protocol before they could end (_renew_leases).
            self._store_retry_at = time.monotonic() + 1.0
            if not getattr(self, "_store_said", False):
                self._store_said = True
                sys.stderr.write(f"kmpwm: {exc.message}; retrying while {len(self.jobs)} run(s) go on\n")
            return 0
        if claimed and not held:
            self._lease_base = start  # the first leases of this stretch begin with this write
            self._renew_at = start + self.store.lease() / 4
        return claimed

    def _look(self) -> dict | None:
        """The state, read lock-free; None when a shared store cannot be reached while our runs go
        on (they are stopped in time by _renew_leases, not abandoned by an exit)."""
        unchanged = getattr(self.store, "unchanged_view", None)  # a shared store: no write since
        view = unchanged() if unchanged is not None else None
        if view is not None:
            return view.state
        try:
            return self.store.load(full=False).state
        except JournalError as exc:
            if self._renew is None or not self.jobs:
                raise
            if not getattr(self, "_store_said", False):
                self._store_said = True
                sys.stderr.write(f"kmpwm: {exc.message}; retrying while {len(self.jobs)} run(s) go on\n")
            return None

    def _renew_leases(self) -> None:
        """Push our leases on (every KMPWM_LEASE/4) while runs last; when the store cannot be
        reached, stop the runs by the expiry protocol in time for them to end (grace included)
        before their leases do, so that no other host ever runs one of them beside us."""
        now = time.monotonic()
        if not self.jobs:
            return
        lease = self.store.lease()
        if now >= self._renew_at:
            if self._renew(self.runner_id):
                self._lease_base = now
                self._renew_at = now + lease / 4
            else:
                self._renew_at = now + 1.0
        ends = self._lease_base + lease
        if not self.run_expired and now >= ends - self.grace - LOST_STORE_MARGIN:
            self._expire_run("the store cannot be reached: its leases would end before the runs do")

    def _cycle_journal(self, claim: bool, *, replan: bool) -> int:
        for attempt in range(3):
            try:
                return self._cycle_once(claim and attempt == 0, replan=replan, lite=attempt == 2)
            except JournalError as exc:
                if getattr(exc, "errno", None) != errno.ENOSPC:
                    raise
                self.disk_full = True  # claim nothing more in this run
                if not self._pending and not self._release:
                    return 0  # only claims were refused: nothing was started
                if attempt == 2:
                    ids = ", ".join(j.id for j in self._pending) or ", ".join(t["id"] for t, *_ in self._release)
                    raise JournalError(
                        f"cannot record the outcome of {ids}: the disk holding the journal is full, "
                        "even with kmpwm's reserve given up",
                        hint="they ran (or were claimed) and, unrecorded, will run again once their leases end; "
                        "free space now",
                    ) from None
                reserve.release(self.paths)
        return 0

    def _cycle_once(self, claim: bool, *, replan: bool, lite: bool = False) -> int:
        """One transaction, one record, one fsync: the results of finished jobs, tasks handed
        back unstarted, then leases for due tasks.  Results are folded first, so a chain step
        that just finished unblocks the next one within the same record."""
        finished, self._pending = self._pending, []
        released, self._release = self._release, []
        rows: list = []
        claimed: list = []
        failed: list = []

        def on_fold(ts, task_id, kind, detail):
            # every task this record ends FAILED, whatever the cause (its run, its last attempt,
            # too many expiries, a missed window, an upstream failure, quarantine): never silent
            if kind == "failed":
                t = txn.state["tasks"].get(task_id) or {}
                failed.append({"id": task_id, "worker": t.get("worker"), "reason": detail.get("reason")})

        self._on_fold = on_fold
        hooks = self._hook_runner()
        self._replanned = False
        try:
            with self.store.transaction() as txn:
                if txn.view.damage:
                    raise JournalError(
                        "the journal was damaged during the run; stopping", hint="run `kmpwm doctor --repair`"
                    )
                now = txn.ts
                if finished:
                    ops, rows = self._result_ops(finished, now)
                    if lite:  # the disk is full: the outcome matters, the data may not fit
                        for op in ops:
                            if op.get("data") is not None:
                                op["data"] = None
                                op["message"] = (op.get("message") or "") + " (its data was not kept: the disk is full)"
                        rows = [(job, dict(row, data=None)) for job, row in rows]
                    txn.stage(ops, on_fold)
                if released:
                    txn.stage(
                        [
                            {
                                "op": "release",
                                "id": t["id"],
                                "seq": t["seq"],
                                "born": t["created_at"],
                                "runner": self.runner_id,
                            }
                            for t, *_ in released
                        ]
                    )
                if claim:
                    claimed = self._claim(txn, now, replan=replan or not self._queue)
        except BaseException:
            self._pending = finished + self._pending  # not written: keep them for the teardown's try
            self._release = released + self._release
            raise
        if self._replanned:  # the lock was held from the plan to our record: nothing came between
            self.planned_at = self.store.position()
        self.report.failed += failed
        shared: list = []
        for job, row in rows:  # durable now
            if job.log is not None:
                ended = time.time()
                self._runlogs.end(job.log, row["status"], ended, job.kind == "command" or job.progressed)
                if self._renew is not None:
                    shared.append(runlog.shared_row(job.log, self.host, job.attempt, job.started_wall, ended, row))
            self.report.ran.append(row)
            if row["status"] == "EXPIRED":
                self.report.expired.append({"id": row["id"], "worker": row["worker"]})
            self.on_event("done", (job, row))
        if shared:
            self._runlogs.flush_starts()  # a run's start reaches the store before its end
            try:
                self.store.save_runs(shared)  # kmpwm logs on every host (a shared store)
            except KmpwmError as exc:
                sys.stderr.write(f"kmpwm: warning: {exc.message} (the output stays in this host's logs)\n")
        if self._runlogs.start_error is not None:
            exc, self._runlogs.start_error = self._runlogs.start_error, None
            sys.stderr.write(f"kmpwm: warning: {getattr(exc, 'message', exc)} (run starts not kept in the store)\n")
        if rows:
            _log_runs(self.paths, rows)
        self._runlogs.flush()
        if hooks is not None and (rows or failed):
            self._fire_hooks(hooks, rows, [f["id"] for f in failed], txn.state)
        self._ready.extend(claimed)
        self.claimed_count += len(claimed)
        # On a shared store a look costs a round trip; the state this transaction read under the
        # lock and committed a moment ago is as fresh as one (the journal's look is a stat).
        self._start_ready(txn.state if self._renew is not None else None)
        return len(claimed)

    # -- hooks (kmpwm.running.hooks) -----------------------------------------------------------------

    def _hook_runner(self):
        if not self._hooks_read:
            self._hooks_read = True
            if os.path.lexists(self.paths.config_file):
                hooks = self.registry.config.hooks
                if hooks:
                    from kmpwm.running.hooks import HookRunner

                    self._hooks = HookRunner(self.paths, hooks)
        return self._hooks

    def _fire_hooks(self, hooks, rows: list, failed: list, state: dict) -> None:
        """Right after the results are durable, once (at most once: nothing starts them again)."""
        if os.environ.get("KMPWM_CRASH_AT") == "before-hooks":  # crash injection for the tests
            os.kill(os.getpid(), signal.SIGKILL)
        from kmpwm.running.hooks import payload

        ran = {job.id: (job, row) for job, row in rows}
        tasks = state["tasks"]
        for job, row in rows:
            if row["status"] == "SUCCESS" and job.id in tasks:
                hooks.fire("on_success", payload(tasks[job.id], "SUCCESS", row["message"], row["data"], job.attempt))
        for tid in dict.fromkeys(failed):
            t = tasks.get(tid)
            if t is None:
                continue
            if tid in ran:
                job, row = ran[tid]
                doc = payload(t, row["status"], row["message"], row["data"], job.attempt)
            else:  # failed without a run of its own (upstream failed, window missed)
                doc = payload(t, "FAILURE", t.get("reason"), None, t["attempts"])
            hooks.fire("on_failure", doc)

    def _end_hooks(self) -> None:
        """Wait for the hooks still running, then record those that failed (``hook failed``)."""
        if not self._hooks:
            return
        self._hooks.wait()
        notes = self._hooks.notes()
        if notes:
            with self.store.transaction() as txn:
                txn.stage(notes)

    def _start_ready(self, fresh: dict | None = None) -> None:
        if not self._ready or len(self.jobs) >= self.parallel or self.run_expired:
            return
        # A task claimed ahead may have been cancelled or replaced since: look (lock-free, only
        # the records appended meanwhile) before starting it; ``fresh``: the state just read and
        # written under the store's lock.
        whole = fresh if fresh is not None else self._look()
        if whole is None:
            return  # the shared store is away: start nothing until it is back
        state = whole["tasks"]
        while self._ready and len(self.jobs) < self.parallel and not self.run_expired:
            task, info, limit, upstream, start_by = self._ready.pop(0)
            now_t = state.get(task["id"])
            if (
                now_t is None
                or now_t["seq"] != task["seq"]
                or now_t["state"] != "RUNNING"
                or (now_t["lease"] or {}).get("runner") != self.runner_id
            ):
                # no longer ours to run (cancelled or replaced): a release takes down the fence
                # its cancel left (state._finish), so the id may run again at once
                self._release.append((task, info, limit, upstream, start_by))
                continue
            if self.forced is None and pause_of(whole, now_t, time.time()) is not None:
                self._release.append((task, info, limit, upstream, start_by))  # claimed ahead, then paused
                continue
            if time.monotonic() > start_by:
                # it waited longer than its lease allows for: hand it back rather than run it unleased
                self._release.append((task, info, limit, upstream, start_by))
                continue
            self._start(task, info, limit, upstream)

    def _prefetch_depth(self) -> int:
        """How many tasks to claim beyond the free slots: only as many as recent run times say
        will start within PREFETCH_MARGIN (slow tasks are never claimed ahead)."""
        if self._avg_run is None:
            return 0
        return min(self._prefetch, int(PREFETCH_MARGIN * self.parallel / max(self._avg_run, 1e-3)))

    def _claim(self, txn, now: float, *, replan: bool) -> list:
        free = self.parallel + self._prefetch_depth() - len(self.jobs) - len(self._ready)
        if self.max_tasks is not None:
            free = min(free, self.max_tasks - self.claimed_count)
        if free <= 0:
            return []
        if self._renew is None and not reserve.ensure(self.paths):  # (a shared store keeps its own room)
            self.disk_full = True  # no room to record results: start nothing (reserve.py)
            return []
        state = txn.state
        done, jobs = self.done, self.jobs
        if replan:
            self._replanned = True
            p = self._plan(state, now, _Union(done, jobs))
            for s in p.skipped:
                self.report.skipped[s["id"]] = s["reason"]
            txn.stage(p.ops, self._on_fold)
            self._queue = p.due
            self._queue.reverse()  # pop() from the end takes the best first
            self._broken, self._trig, self._fence_broken = p.broken, p.trig_updates, p.fence_broken
            self._occ = p.occ
        ready_ids = {t["id"] for t, *_ in self._ready}
        picks = []
        while self._queue and len(picks) < free:
            cand = self._queue.pop()
            t = state["tasks"].get(cand["id"])
            if t is None or t["seq"] != cand["seq"] or t["id"] in done or t["id"] in jobs or t["id"] in ready_ids:
                continue
            if t.get("host") not in (None, self.host):
                continue  # pinned to another host since the plan (--policy update)
            if self.forced is None and pause_of(state, t, now) is not None:
                continue  # paused since the plan (`pause --all` while we claim)
            # The queue may be a cycle old and another run-due may have run the task meanwhile:
            # the occurrence planned must still be the one the task waits for (state.occurrence).
            occ = self._occ.get(t["id"])
            if occ is not None and not occurrence_open(t, occ):
                continue
            if t["state"] == "ENQUEUED" and (due_at(t, now) <= now or self.forced is not None):
                picks.append(t)
            elif t["state"] == "RUNNING" and lease_state(t, now) != "held":
                picks.append(t)
        if not picks:
            return []
        if any(t["state"] == "RUNNING" or t["id"] in self._fence_broken for t in picks):
            # Taking over from a runner that is gone (it died since this run began, or while this
            # run planned): first kill whatever of its runs is left, so that no worker of the old
            # run is still going when this one starts (a command it was starting has no death
            # signal yet: groups.py).
            groups.sweep(self.paths.runners_dir)
        ops, prepared = [], []
        slots = self.parallel - len(self.jobs) - len(self._ready)
        for n, t in enumerate(picks):
            info = self.registry.get(t["worker"])
            limit = time_limit(t, declared_limit(info, self._preload, t))  # a task's --timeout wins
            op = {
                "op": "claim",
                "id": t["id"],
                "seq": t["seq"],
                "born": t["created_at"],
                "runner": self.runner_id,
                "pid": self.pid,
                "token": self.token,
                "until": now + limit + self.grace + LEASE_MARGIN + PREFETCH_MARGIN + START_SLACK,
            }
            occ = self._occ.get(t["id"])  # the occurrence this claim consumes (state.occurrence)
            if occ is not None:
                op["occ"] = occ
            if self.boot:
                op["boot"] = self.boot
            if t["id"] in self._broken:
                op["broken"] = "expired" if lease_state(t, now) == "expired" else True
            if t["id"] in self._fence_broken:
                op["fence_broken"] = True  # the cancelled run's holder is gone
            if t["state"] == "RUNNING" and self._started_by(t) is False:
                op["unstarted"] = True  # its gone holder never started the worker: not the task's crash
            if self.forced is not None:
                op["forced"] = True  # run-now: a pause does not hold it
            if n >= slots:
                op["ahead"] = True  # its runner dying before it starts is not the task's crash
            ops.append(op)
            # the lease covers a run that starts within PREFETCH_MARGIN (plus scheduling slack)
            prepared.append((t, info, limit, upstream_of(state, t), time.monotonic() + PREFETCH_MARGIN + START_SLACK))
        starts = []
        for (t, info, limit, upstream, until), ok in zip(prepared, txn.stage(ops)):
            if ok:
                task = dict(state["tasks"][t["id"]])
                task["_trig_update"] = self._trig.get(t["id"])
                starts.append((task, info, limit, upstream, until))
        return starts

    # -- starting -------------------------------------------------------------------------

    def _start(self, task: dict, info, limit: float, upstream: dict) -> None:
        if self._crash_at == "before-start":  # crash injection for the tests: claimed, not started
            os.kill(os.getpid(), signal.SIGKILL)
        attempt = task["occ_attempts"] + 1
        job = Job(task, attempt, info.kind if info else "python", limit, time.monotonic(), time.time())
        self.jobs[job.id] = job
        job.log = self._runlogs.start(job.id, attempt, job.started_wall)
        self.on_event("start", job)
        trig = task["trigger"]
        try:
            if trig["type"] == "exact" and trig.get("behavior") == "notify":
                job.immediate = _notify(task, self.paths)
            elif info is None:
                job.immediate = {"status": "FAILURE", "message": f"unknown worker {task['worker']!r}", "data": None}
            elif job.kind == "command":
                self._start_command(job, info, upstream)
            else:
                self._start_python(job, info, upstream)
        except OSError as exc:
            job.immediate = {
                "status": "FAILURE",
                "message": f"could not start the worker: {exc.strerror or exc}",
                "data": None,
            }
        except Exception as exc:  # a process that cannot be started fails its run, never run-due
            job.immediate = {"status": "FAILURE", "message": f"could not start the worker: {exc}", "data": None}
        if job.immediate is None and not job.pid and job.proc is None and job.host is None:
            job.immediate = {"status": "FAILURE", "message": "could not start the worker", "data": None}
        if trig["type"] == "exact" and job.immediate is None:
            job.task["_late_ms"] = int(max(0.0, job.started_wall - trig["at"]) * 1000)
        if job.immediate is None:
            self._starts.add(job.id, (task.get("lease") or {}).get("since"))  # its worker started

    def _started_by(self, t: dict):
        """Did the gone holder of RUNNING task ``t`` start its worker? (leases.holder_started)"""
        if (t.get("lease") or {}).get("ahead"):
            return None
        return holder_started(self.paths.runners_dir, t)

    def _env(self, job: Job, upstream: dict) -> dict:
        t = job.task
        env = {
            "KMPWM_TASK_ID": t["id"],
            "KMPWM_ATTEMPT": str(job.attempt),
            "KMPWM_WORKER": t["worker"],
            "KMPWM_UPSTREAM": orjson.dumps(upstream).decode(),
            groups.MARK_ENV: self.runner_id,  # what the next run-due kills if this one dies starting it
        }
        if job.log is not None:
            env["KMPWM_PROGRESS"] = job.log.progress
        if t.get("chain_id"):
            env["KMPWM_CHAIN_ID"] = t["chain_id"]
            env["KMPWM_STEP"] = str(t["step"])
        return env

    def _start_command(self, job: Job, info, upstream: dict) -> None:
        import subprocess
        import tempfile

        cfg = info.config
        if self._base_env is None:
            self._base_env = dict(os.environ)  # copied once per run, not per task
            self._base_env.pop("KMPWM_INPUT", None)
        env = dict(self._base_env)
        env.update(self._env(job, upstream))
        data = job.task["input"]
        if data is not None and len(data) <= MAX_INLINE_ENV_INPUT and "\0" not in data:
            env["KMPWM_INPUT"] = data  # an input with a NUL byte cannot be an environment value: stdin only
        env.update(cfg.env)
        problem = _unstartable(cfg, env)
        if problem:
            job.immediate = {"status": "FAILURE", "message": problem, "data": None}
            return
        if data:
            stdin = tempfile.TemporaryFile()
            stdin.write(data.encode("utf-8", "surrogateescape"))
            stdin.seek(0)
        else:
            stdin = open(os.devnull, "rb")  # no input: no temporary file
        argv = list(cfg.command)
        prog = _resolve(argv[0], cfg.cwd, env.get("PATH"))
        if prog is None:
            stdin.close()
            job.immediate = {"status": "FAILURE", "message": f"command not found: {argv[0]}", "data": None}
            return
        argv[0] = prog
        preexec = None if _DEATH_PREFIX else functools.partial(_die_with_parent, os.getpid())
        if self._crash_at in ("command-fork", "command-fork-hold"):  # crash injection for the tests
            preexec = functools.partial(_kill_parent_then_go_on, os.getpid(), self._crash_at.endswith("hold"))
        # setpriv makes the command die with run-due (PR_SET_PDEATHSIG) without a preexec_fn,
        # which would force Python's slow fork path instead of vfork (measured: 2.3x fewer command
        # tasks per second).  The signal is armed only once setpriv runs, so a run-due killed
        # before that leaves an orphan: the launch line and the marks (groups.py) let the next
        # run-due find and kill it before it claims the task again.
        self._groups.launching()
        try:
            proc = subprocess.Popen(
                _DEATH_PREFIX + argv,
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cfg.cwd,
                env=env,
                start_new_session=True,
                close_fds=True,
                preexec_fn=preexec,
            )
        except FileNotFoundError:
            job.immediate = {"status": "FAILURE", "message": f"command not found: {cfg.command[0]}", "data": None}
            return
        except PermissionError:
            job.immediate = {"status": "FAILURE", "message": f"command not executable: {cfg.command[0]}", "data": None}
            return
        except OSError as exc:
            job.immediate = {
                "status": "FAILURE",
                "message": f"cannot run {cfg.command[0]}: {exc.strerror}",
                "data": None,
            }
            return
        finally:
            self._groups.launched()
            stdin.close()
        job.proc, job.pid = proc, proc.pid
        self._groups.add(proc.pid)
        for stream, name in ((proc.stdout, "out"), (proc.stderr, "err")):
            # Own a duplicate and close Popen's file object: otherwise its finaliser closes the fd
            # number again later, when it may already belong to another job's pipe.
            fd = os.dup(stream.fileno())
            stream.close()
            os.set_blocking(fd, False)
            job.fds[fd] = name
            self._sel.register(fd, selectors.EVENT_READ, job)

    def _start_python(self, job: Job, info, upstream: dict) -> None:
        if not self._pool:
            return self._start_forked(job, info, upstream)
        host = next((h for h in self._hosts if h.job is None and not h.dead and not h.retire), None)
        if host is None:
            host = self._spawn_host(info)
        t = job.task
        msg = {
            "id": t["id"],
            "worker": t["worker"],
            "input": t["input"],
            "attempt": job.attempt,
            "upstream": upstream,
            "chain_id": t.get("chain_id"),
            "step": t.get("step"),
            "limit": job.limit,
            "env": self._env(job, upstream),
            "progress": job.log.progress if job.log else None,
        }
        from kmpwm.running.worker_host import write_frame

        host.job = job
        job.host = host
        job.pid = host.pid
        try:
            write_frame(host.to_host, orjson.dumps(msg))
        except OSError:
            host.dead = True  # it died between tasks: the job fails over to the death path

    def _spawn_host(self, info) -> Host:
        """Fork a pool host, warm: kmpwm and the first worker's module are already imported."""
        from kmpwm.running import worker_host  # noqa: F401  imported here, before forking, not in each host

        self._preload(info)
        _load_libc()
        if not self._frozen:
            gc.freeze()  # keep the collector off inherited objects: fewer pages copied into hosts
            self._frozen = True
        task_r, task_w = os.pipe()
        res_r, res_w = os.pipe()
        out_r, out_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        parent_fds = (
            [self._wake_r, self._wake_w]
            + [fd for h in self._hosts for fd in (h.to_host, h.results, h.output) if fd >= 0]
            + [fd for j in self.jobs.values() for fd in j.fds]
        )
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                self._child_setup([task_w, res_r, out_r, *parent_fds], out_w, parent)
                from kmpwm.running.worker_host import host_main

                host_main(task_r, res_w, self.registry)
            except BaseException:
                status = _child_failed()
            finally:
                os._exit(status)
        for fd in (task_r, res_w, out_w):
            os.close(fd)
        self._groups.add(pid)
        host = Host(pid, task_w, res_r, out_r)
        for fd in (res_r, out_r):
            os.set_blocking(fd, False)
            self._sel.register(fd, selectors.EVENT_READ, host)
        self._hosts.append(host)
        return host

    def _child_setup(self, close: list[int], out_w: int, parent: int) -> None:
        """In a freshly forked worker process: its own session (so expiry signals reach everything
        it starts), death with run-due (``parent``), default signals, none of run-due's
        descriptors, stdin from /dev/null, stdout and stderr into ``out_w``."""
        os.setsid()
        _die_with_parent(parent)
        signal.set_wakeup_fd(-1)
        for signo in (signal.SIGUSR1, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signo, signal.SIG_DFL)
        for fd in close:
            try:
                os.close(fd)
            except OSError:
                pass
        if self._sel is not None:
            try:
                self._sel.close()
            except Exception:
                pass
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(out_w, 2)

    def _drain_host(self, host: Host, fd: int) -> None:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._host_gone(host)
                return
            if fd == host.output:
                if host.job is not None:
                    _output(host.job, chunk)
                continue
            host.buf += chunk
            while len(host.buf) >= 4:
                size = int.from_bytes(host.buf[:4], "big")
                if len(host.buf) < 4 + size:
                    break
                frame = bytes(host.buf[4 : 4 + size])
                del host.buf[: 4 + size]
                if fd != host.output and host.output >= 0:
                    self._drain_host(host, host.output)  # its output, written before the result
                job = host.job
                if job is not None:
                    job.result = bytearray(frame)
                    job.answered = True
                    job.exit_status = 0
                    host.job = None
                    host.tasks += 1
                    if host.retire or host.tasks >= HOST_MAX_TASKS:
                        self._close_host(host)

    def _host_gone(self, host: Host) -> None:
        """The host's pipes closed: it exited or was killed; its running job (if any) ends."""
        if host.dead and host.results < 0:
            return
        host.dead = True
        for fd in (host.results, host.output, host.to_host):
            if fd < 0:
                continue
            try:
                self._sel.unregister(fd)
            except (KeyError, ValueError):
                pass
            try:
                os.close(fd)
            except OSError:
                pass
        host.results = host.output = host.to_host = -1
        self._reap_host(host)

    def _reap_host(self, host: Host) -> None:
        if host.exit_status is not None:
            return
        try:
            pid, status = os.waitpid(host.pid, os.WNOHANG)
        except ChildProcessError:
            host.exit_status = -1
            return
        if pid:
            host.exit_status = os.waitstatus_to_exitcode(status)

    def _close_host(self, host: Host) -> None:
        """Retire an idle host: end of input makes it exit; its pipes then close."""
        host.retire = True
        if host.to_host >= 0:
            try:
                os.close(host.to_host)
            except OSError:
                pass
            host.to_host = -1

    def _start_forked(self, job: Job, info, upstream: dict) -> None:
        """One process per run (KMPWM_POOL=0): full isolation, a fork per task."""
        from kmpwm.running import worker_host  # noqa: F401  imported before forking, not in each child
        from kmpwm.running.context import WorkerContext

        self._preload(info)
        _load_libc()
        if not self._frozen:
            # Move everything run-due has allocated out of the collector's reach, so that a child's
            # garbage collection does not touch (and copy-on-write) every inherited page.
            gc.freeze()
            self._frozen = True
        r, w = os.pipe()
        out_r, out_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        parent_fds = [fd for j in self.jobs.values() for fd in j.fds] + [self._wake_r, self._wake_w]
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            status = 0
            try:
                gc.disable()  # a short-lived child: no collections, fewer copied pages
                self._child_setup([r, out_r, *parent_fds], out_w, parent)
                from kmpwm.running.worker_host import run_in_child

                t = job.task
                ctx = WorkerContext(
                    task_id=t["id"],
                    attempt=job.attempt,
                    upstream=upstream,
                    input=t["input"],
                    worker=t["worker"],
                    chain_id=t.get("chain_id"),
                    step=t.get("step"),
                    deadline=time.monotonic() + job.limit,
                    progress_file=job.log.progress if job.log else None,
                )
                os.environ.update(self._env(job, upstream))
                result = run_in_child(info, t["input"], ctx)
                try:
                    blob = orjson.dumps(result, default=str)
                except TypeError as exc:
                    blob = orjson.dumps(
                        {"status": "FAILURE", "message": f"result not JSON-serialisable: {exc}", "data": None}
                    )
                sys.stdout.flush()
                sys.stderr.flush()
                from kmpwm.storage.journal import write_all

                write_all(w, blob)
            except BaseException:
                status = _child_failed()
            finally:
                os._exit(status)
        os.close(w)
        os.close(out_w)
        job.pid = pid
        self._groups.add(pid)
        for fd, name in ((r, "result"), (out_r, "out")):
            os.set_blocking(fd, False)
            job.fds[fd] = name
            self._sel.register(fd, selectors.EVENT_READ, job)

    # -- waiting --------------------------------------------------------------------------

    def _setup(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

        def on_expire(signo, frame):
            if signo == signal.SIGINT and self._flags["expire"]:
                self._flags["force"] = True  # a second Ctrl-C: do not wait out the grace period
            self._flags["expire"] = True
            self._flags["signo"] = signo
            if not self.expire_reason:
                self.expire_reason = {
                    signal.SIGUSR1: "simulate-expire delivered the expiration signal",
                    signal.SIGTERM: "run-due received SIGTERM",
                    signal.SIGINT: "run-due was interrupted",
                }.get(signo, "signal")

        def on_child(signo, frame):
            self._flags["child"] = True

        def on_hup(signo, frame):
            self._flags["hup"] = True

        for signo, handler in (
            (signal.SIGUSR1, on_expire),
            (signal.SIGTERM, on_expire),
            (signal.SIGINT, on_expire),
            (signal.SIGHUP, on_expire if self.serve is None else on_hup),
            (signal.SIGCHLD, on_child),
        ):
            self._signals[signo] = signal.signal(signo, handler)
        private_subdir(self.paths.runners_dir)
        self._starts.open()  # before the first claim: its absence would count every death

    def _teardown(self) -> None:
        # Anything still running here means an unexpected error: stop it and hand the tasks back.
        self._release.extend(self._ready)
        self._ready = []
        for job in self.jobs.values():
            _kill(job, signal.SIGKILL)
        deadline = time.monotonic() + 2
        while (self.jobs or self._pending or self._release) and time.monotonic() < deadline:
            self._pending.extend(self._reap())
            if self._pending or self._release:
                try:
                    self._cycle(False, replan=False)
                except Exception:
                    break
            if self.jobs:
                time.sleep(0.01)
        for host in self._hosts:
            self._close_host(host)
        deadline = time.monotonic() + 2
        while any(not h.dead for h in self._hosts) and time.monotonic() < deadline:
            for key, _ in self._sel.select(0.05):
                if isinstance(key.data, Host):
                    self._drain_host(key.data, key.fd)
        for host in self._hosts:
            if not host.dead:
                try:
                    os.killpg(host.pid, signal.SIGKILL)
                except OSError:
                    pass
            if host.exit_status is None:
                try:
                    os.waitpid(host.pid, 0)
                except ChildProcessError:
                    pass
        self._runlogs.flush(force=True)
        for signo, old in self._signals.items():
            signal.signal(signo, old)
        try:
            signal.set_wakeup_fd(self._old_wakeup)
        except (ValueError, AttributeError):
            pass
        if self._sel is not None:
            self._sel.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        try:
            os.unlink(self._expire_file())
        except OSError:
            pass
        self._groups.close()
        self._starts.close()

    def _expire_file(self):
        return self.paths.runners_dir / f"{self.pid}.expire"

    def _timeout(self, deadline: float | None) -> float:
        now = time.monotonic()
        t = RECLAIM_EVERY
        for job in self.jobs.values():
            if job.immediate is not None:
                return 0.0
            t = min(t, (job.kill_at if job.kill_at is not None else job.started + job.limit) - now)
        if deadline is not None and not self.run_expired:
            t = min(t, deadline - now)
        if self._pending:
            t = min(t, self._pending[0].ended + GROUP_WAIT - now)
        return max(0.0, t)

    def _wait(self, timeout: float) -> None:
        for key, _ in self._sel.select(timeout):
            if key.data is None:
                try:
                    while os.read(self._wake_r, 512):
                        pass
                except (BlockingIOError, InterruptedError):
                    pass
                continue
            if isinstance(key.data, Host):
                self._drain_host(key.data, key.fd)
            elif callable(key.data):  # serve's watches (the journal, lease holders)
                key.data()
            else:
                self._drain(key.data, key.fd)

    def _drain(self, job: Job, fd: int) -> None:
        name = job.fds.get(fd)
        if name is None:
            return
        while True:
            try:
                chunk = os.read(fd, 65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._sel.unregister(fd)
                os.close(fd)
                del job.fds[fd]
                return
            if name == "result":
                job.result += chunk
            elif name == "out":
                _output(job, chunk)
            else:
                if job.log is not None:
                    job.log.write(chunk)
                job.err += chunk
                if len(job.err) > TAIL:
                    del job.err[:-TAIL]

    def _check_limits(self) -> None:
        now = time.monotonic()
        if now >= self._trim_at:  # command workers append progress lines: keep their files small
            self._trim_at = now + 1.0
            from kmpwm.storage.progress import trim

            for job in self.jobs.values():
                if job.kind == "command" and job.log is not None:
                    trim(job.log.progress)
        if self._flags["expire"] and not self.run_expired:
            self._expire_run(self.expire_reason)
        if self._flags["force"] and not self._forced:
            self._forced = True
            running = [j for j in self.jobs.values() if j.immediate is None and j.exit_status is None]
            if running:
                sys.stderr.write(
                    f"kmpwm: interrupted again: killing {len(running)} worker(s) now, "
                    "without waiting for the grace period\n"
                )
                sys.stderr.flush()
            for job in running:
                job.expiring = True
                _kill(job, signal.SIGKILL)
                job.kill_at = now + 3600  # once
        for job in self.jobs.values():
            if job.immediate is not None or job.exit_status is not None:
                continue
            if job.kill_at is not None and now >= job.kill_at:
                _kill(job, signal.SIGKILL)
                job.kill_at = now + 3600  # once
            elif not job.expiring and now >= job.started + job.limit:
                self._expire_job(job, self.grace)

    def _watch_cancels(self) -> None:
        """A cancel (or a replace) reaches a running worker through the expiry protocol: every
        CANCEL_WATCH seconds, the journal's new records (lock-free) say whether each running
        task is still ours; one that is not gets SIGTERM, then SIGKILL after the grace period.
        Its result never counts: the task stays CANCELLED, and run-due writes a release once
        the worker is gone, which lets a replacing task of the same id start (never beside it)."""
        whole = self._look()
        if whole is None:
            return  # the shared store is away: look again at the next watch
        state = whole["tasks"]
        for job in self.jobs.values():
            if job.cancelled or job.immediate is not None or job.exit_status is not None or job.answered:
                continue
            t = state.get(job.id)
            if (
                t is not None
                and t["seq"] == job.task["seq"]
                and t["state"] == "RUNNING"
                and (t["lease"] or {}).get("runner") == self.runner_id
            ):
                continue
            job.cancelled = True
            self.on_event("cancelling", job)
            if job.expiring:
                continue  # already told to stop
            self._expire_job(job, self.grace)

    def _expire_job(self, job: Job, grace: float) -> None:
        if job.expiring or job.immediate is not None or job.exit_status is not None or job.answered:
            return  # (a run that already ended keeps its result: it was not stopped)
        job.expiring = True
        job.kill_at = time.monotonic() + grace
        _kill(job, signal.SIGTERM)
        self.on_event("expiring", job)

    def _expire_run(self, reason: str) -> None:
        self.run_expired = True
        self.expire_reason = reason
        self._release.extend(self._ready)  # claimed but not started: hand them back untouched
        self._ready = []
        grace = self.grace
        try:
            raw = self._expire_file().read_text()
            grace = float(raw.strip())
        except (OSError, ValueError):
            pass
        running = 0
        for job in self.jobs.values():
            job.run_expired = True
            running += job.immediate is None and job.exit_status is None and not job.expiring
            self._expire_job(job, grace)
        if running and self._flags.get("signo") == signal.SIGINT and not self._flags["force"]:
            sys.stderr.write(
                f"kmpwm: interrupted: stopping {running} worker(s), up to {grace:g}s "
                "(interrupt again to kill them now)\n"
            )
            sys.stderr.flush()

    # -- finishing ------------------------------------------------------------------------

    def _reap(self) -> list[Job]:
        self._flags["child"] = False
        finished = []
        for job in list(self.jobs.values()):
            if job.immediate is not None:
                finished.append(job)
                continue
            if job.host is not None:
                if job.answered:
                    finished.append(job)
                elif job.host.dead:
                    self._reap_host(job.host)
                    if job.host.exit_status is not None:
                        job.exit_status = job.host.exit_status
                        finished.append(job)
                continue
            if job.exit_status is None:
                job.exit_status = _poll(job)
            if job.exit_status is not None:
                for fd in list(job.fds):
                    self._drain(job, fd)  # what the process left in its pipes
                if job.fds and not job.kind == "command" and "result" in job.fds.values():
                    continue  # result still arriving
                for fd in list(job.fds):  # a grandchild may hold a pipe open: stop reading it
                    self._sel.unregister(fd)
                    os.close(fd)
                job.fds.clear()
                finished.append(job)
        now = time.monotonic()
        for job in finished:
            job.ended = now
            del self.jobs[job.id]
        for host in self._hosts:
            if host.dead:
                self._reap_host(host)
        self._hosts = [h for h in self._hosts if not (h.dead and h.exit_status is not None and h.job is None)]
        return finished

    def _outcome(self, job: Job) -> dict:
        if job.immediate is not None:
            return job.immediate
        if job.kind == "command":
            return _command_outcome(job)
        if job.result:
            try:
                res = orjson.loads(bytes(job.result))
                if isinstance(res, dict) and res.get("progress"):
                    job.progressed = True
                if isinstance(res, dict) and res.get("status") in ("SUCCESS", "FAILURE", "RETRY"):
                    return _checked_data(res)
            except orjson.JSONDecodeError:
                pass
        return {"status": "FAILURE", "message": _death(job, "the worker process"), "data": None}

    def _result_ops(self, finished: list[Job], now: float) -> tuple[list, list]:
        ops, rows = [], []
        for job in finished:
            if job.cancelled:
                # cancelled while it ran: no result (the task stays CANCELLED); the release says
                # its worker is gone, which takes down the fence of the cancelled run
                t = job.task
                ops.append({"op": "release", "id": t["id"], "seq": t["seq"], "runner": self.runner_id})
                _log_stopped(self.paths, job)
                continue
            res = self._outcome(job)
            status = res["status"]
            if job.expiring:
                # A run told to stop does not count, whatever it returned (SPEC section 6; WorkManager
                # ignores a stopped worker's result): a worker that exits 0 on SIGTERM has not
                # necessarily finished, and a chain must not move on with half-done work.
                status = "EXPIRED"
                res = {
                    "status": "EXPIRED",
                    "message": (
                        "the run expired: " + self.expire_reason
                        if job.run_expired
                        else f"time limit of {job.limit:g}s reached"
                    ),
                    "data": None,
                }
            duration_ms = int((time.monotonic() - job.started) * 1000)
            run_s = duration_ms / 1000
            self._avg_run = run_s if self._avg_run is None else 0.8 * self._avg_run + 0.2 * run_s
            t = job.task
            op = {
                "op": "result",
                "id": t["id"],
                "seq": t["seq"],
                "born": t["created_at"],
                "runner": self.runner_id,
                "status": status,
                "message": res.get("message"),
                "data": res.get("data"),
                "duration_ms": duration_ms,
            }
            if t.get("lease"):
                op["claimed"] = t["lease"]["since"]  # the claim it ran under: a lost claim loses no result
            if status in ("SUCCESS", "FAILURE", "RETRY"):
                if t.get("_trig_update"):
                    op["trig_state"] = t["_trig_update"]
                nxt = next_after_run(
                    t["trigger"], {**t["trig_state"], **(t.get("_trig_update") or {})}, now, task_offset(t)
                )
                if self.forced is not None and nxt is not None:
                    nxt = t["due"]  # run-now: one extra run, the task's schedule unchanged
                if nxt is not None:
                    op["next_run_at"] = nxt
                if "_late_ms" in t:
                    op["late_ms"] = t["_late_ms"]
            ops.append(op)
            rows.append(
                (
                    job,
                    {
                        "id": t["id"],
                        "worker": t["worker"],
                        "status": status,
                        "message": res.get("message"),
                        "data": res.get("data"),
                        "duration_ms": duration_ms,
                    },
                )
            )
            self.done.add(t["id"])
        return ops, rows


# -- helpers -------------------------------------------------------------------------------


def _output(job: Job, chunk: bytes) -> None:
    """A worker's stdout (a Python worker's: stdout and stderr): to its run's file as it arrives;
    only a bounded tail stays in memory (a command's last JSON line, a failure's message)."""
    if job.log is not None:
        job.log.write(chunk)
    job.out += chunk
    if len(job.out) > STDOUT_TAIL:
        del job.out[:-STDOUT_TAIL]


_PR_SET_PDEATHSIG = 1
_libc = None


def _child_failed() -> int:
    """In a worker process that failed outside the worker: the traceback to its output (which
    run-due logs), and the exit status that says so."""
    try:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
    except BaseException:
        pass
    return 70


def _load_libc():
    """Loaded in run-due before forking, so that children do not import ctypes each."""
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            import ctypes

            _libc = ctypes.CDLL(None, use_errno=True)
        except Exception:
            _libc = False
    return _libc


def _die_with_parent(parent: int) -> None:
    """Linux: the worker gets SIGKILL if run-due dies, so an orphan never runs beside a re-run.

    The signal is armed after fork, so run-due may already be dead by then (SIGKILLed just after
    it recorded the claim): the child was handed to another parent and no signal will come.
    Such a child sees that its parent is no longer ``parent`` (run-due's pid before the fork)
    and exits at once instead; the task's lease names a dead runner, so the next run-due claims
    it again."""
    libc = _load_libc()
    if libc:
        try:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except Exception:
            pass
    if os.getppid() != parent:
        os._exit(75)


def _kill_parent_then_go_on(parent: int, hold: bool) -> None:
    """Crash injection (``KMPWM_CRASH_AT=command-fork``), in a command worker's child before it
    execs: SIGKILL run-due, wait until it is gone, then go on to exec setpriv and the command --
    the window in which setpriv has not yet armed the death signal and run-due has not noted
    the worker's process group.  ``command-fork-hold``: before going on, wait (up to a minute)
    for the file ``KMPWM_CRASH_HOLD`` names to exist, as a child stuck before its exec would."""
    os.kill(parent, signal.SIGKILL)
    while os.getppid() == parent:
        time.sleep(0.001)
    hold_file = os.environ.get("KMPWM_CRASH_HOLD") if hold else None
    deadline = time.monotonic() + 60
    while hold_file and not os.path.exists(hold_file) and time.monotonic() < deadline:
        time.sleep(0.01)


def _death_prefix() -> list[str]:
    import shutil

    if not sys.platform.startswith("linux"):
        return []
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


_DEATH_PREFIX = _death_prefix()


def _resolve(prog: str, cwd: str | None, path: str | None) -> str | None:
    """The executable a command names, as execvp would find it; None if there is none."""
    import shutil

    if os.sep in prog:
        full = prog if os.path.isabs(prog) or not cwd else os.path.join(cwd, prog)
        return full if os.path.isfile(full) and os.access(full, os.X_OK) else None
    return shutil.which(prog, path=path)


def _unstartable(cfg, env: dict) -> str | None:
    """Why a command worker's process cannot be started as configured (None if it can): a NUL
    byte (no argv or environment string can hold one) or a working directory that is missing."""
    for arg in cfg.command:
        if "\0" in arg:
            return f"the worker's command has a NUL byte in the argument {arg.split(chr(0))[0]!r}..."
    for key, value in env.items():
        if "\0" in key or "\0" in value:
            return f"the worker's environment variable {key.split(chr(0))[0]!r} has a NUL byte"
    if cfg.cwd is not None:
        if "\0" in cfg.cwd:
            return "the worker's cwd has a NUL byte"
        if not os.path.isdir(cfg.cwd):
            why = "is not a directory" if os.path.exists(cfg.cwd) else "does not exist"
            return f"the worker's working directory {cfg.cwd} {why}"
    return None


def _kill(job: Job, signo: int) -> None:
    if not job.pid or job.exit_status is not None:
        return
    if job.host is not None:
        job.host.retire = True  # a host told to stop is not reused
    try:
        os.killpg(job.pid, signo)  # the worker and anything it started
    except ProcessLookupError:
        pass
    except PermissionError:
        try:
            os.kill(job.pid, signo)
        except OSError:
            pass


def _end_group_if_exited(pid: int) -> None:
    """When a worker process has exited, SIGKILL what is left of its process group.

    Every worker starts in a session and process group of its own (``start_new_session`` for a
    command, ``setsid`` for a forked Python worker), so the processes it started and left behind
    (``cmd &``, a daemon that did not call setsid itself) are still in that group when it exits.
    As systemd ends a unit's cgroup, run-due ends the group: a run is over when its worker exits,
    and nothing it started keeps running (and writing) beside the next run.  Processes that left
    the group on purpose (setsid, double-fork daemons) are not tracked.  The group is killed
    while the worker is still an unreaped zombie (``WNOWAIT``), so its number cannot have been
    reused by an unrelated group.  (Python workers in a pool host: see worker_host._end_leftovers.)"""
    if pid <= 0 or not hasattr(os, "waitid"):
        return
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except (ChildProcessError, OSError):
        return
    if info is None or info.si_pid == 0:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def _poll(job: Job) -> int | None:
    if job.proc is not None:
        _end_group_if_exited(job.pid)
        code = job.proc.poll()
        return None if code is None else code
    if job.pid <= 0:
        return -1  # never started: waitpid(0) would reap another task's process
    _end_group_if_exited(job.pid)
    try:
        pid, status = os.waitpid(job.pid, os.WNOHANG)
    except ChildProcessError:
        return -1
    except OSError as exc:
        if exc.errno == errno.EINTR:
            return None
        raise
    if pid == 0:
        return None
    return os.waitstatus_to_exitcode(status)


def _death(job: Job, what: str) -> str:
    code = job.exit_status
    tail = _tail_text(job.err or job.out)
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        msg = f"{what} was killed by {name}"
    else:
        msg = f"{what} exited with status {code} without a result"
    return f"{msg}: {tail}" if tail else msg


def _tail_text(buf: bytearray, limit: int = 500) -> str:
    text = bytes(buf).decode("utf-8", "replace").strip()
    if not text:
        return ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    tail = lines[-1] if lines else text
    if len(lines) > 1 and lines[-1].startswith((" ", "\t")) is False and len(tail) < 80:
        tail = " | ".join(lines[-3:])
    return tail[-limit:]


def _checked_data(res: dict) -> dict:
    """A worker's data must fit what kmpwm stores and prints: a JSON object, not too deep."""
    from kmpwm.core.specs import MAX_DEPTH, json_depth

    data = res.get("data")
    if data is not None and (not isinstance(data, dict) or json_depth(data) > MAX_DEPTH):
        return {
            "status": "FAILURE",
            "data": None,
            "message": f"the worker's data must be a JSON object nested at most {MAX_DEPTH} levels",
        }
    return res


def _command_outcome(job: Job) -> dict:
    code = job.exit_status
    if code == 0:
        data = None
        lines = [ln for ln in bytes(job.out).decode("utf-8", "replace").splitlines() if ln.strip()]
        if lines:
            try:
                value = orjson.loads(lines[-1])
                if isinstance(value, dict):
                    from kmpwm.core.specs import MAX_DEPTH, json_depth

                    data = value if json_depth(value) <= MAX_DEPTH else None
            except orjson.JSONDecodeError:
                pass
        return {"status": "SUCCESS", "message": None, "data": data}
    if code == 75:
        return {
            "status": "RETRY",
            "message": _tail_text(job.err) or "the worker asked to retry (exit 75)",
            "data": None,
        }
    if code is not None and code < 0:
        return {"status": "FAILURE", "message": _death(job, "the command"), "data": None}
    tail = _tail_text(job.err)
    return {"status": "FAILURE", "message": tail or f"the command exited with status {code}", "data": None}


def _notify(task: dict, paths: Paths) -> dict:
    """``--exact-behavior notify``: post a desktop notification instead of running code."""
    import shutil
    import subprocess

    title = f"kmpwm: {task['id']}"
    body = task["input"] or f"{task['worker']} is due"
    late_ms = int(max(0.0, time.time() - task["trigger"]["at"]) * 1000)
    method = "log"
    try:
        if shutil.which("notify-send"):
            subprocess.run(["notify-send", title, body], timeout=5, check=False, capture_output=True)
            method = "notify-send"
        elif sys.platform == "darwin" and shutil.which("osascript"):
            script = f"display notification {_applescript(body)} with title {_applescript(title)}"
            subprocess.run(["osascript", "-e", script], timeout=5, check=False, capture_output=True)
            method = "osascript"
    except (OSError, subprocess.SubprocessError):
        method = "log"
    from kmpwm.storage.logs import logger

    logger(paths).info("notification for %s: %s (%s)", task["id"], body, method)
    return {
        "status": "SUCCESS",
        "message": f"notified ({method})",
        "data": {"notified": True, "method": method, "late_ms": late_ms},
    }


def _applescript(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _log_stopped(paths: Paths, job: Job) -> None:
    from kmpwm.storage.logs import logger

    logger(paths).info(
        "stopped %s (%s) attempt %d: cancelled while it ran; its result does not count",
        job.id,
        job.task["worker"],
        job.attempt,
    )


def _log_runs(paths: Paths, rows: list) -> None:
    """One log write per cycle: every run, with the output tail of those that did not succeed."""
    from kmpwm.storage.logs import logger

    lines = []
    worst = "INFO"
    for job, row in rows:
        line = f"ran {row['id']} ({row['worker']}) attempt {job.attempt}: {row['status']} in {row['duration_ms']}ms"
        if row["message"]:
            line += f": {row['message']}"
        if row["status"] in ("FAILURE", "RETRY", "EXPIRED"):
            worst = "WARNING"
            tail = bytes(job.err or job.out).decode("utf-8", "replace").strip()
            if tail:
                line += "\n  output tail:\n    " + "\n    ".join(tail.splitlines()[-40:])
        lines.append(line)
    logger(paths).log(30 if worst == "WARNING" else 20, "\n".join(lines))


class _Union:
    """Membership in either of two collections, without building their union each cycle."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def __contains__(self, item) -> bool:
        return item in self.a or item in self.b
