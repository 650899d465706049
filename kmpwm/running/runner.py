"""``run-due``: claim what is due, run every task in its own process, record what happened.

One pass: (1) under the journal lock, fold the latest state, plan what is due, and append one
record of leases (runner id, pid, start token, lease end) for the tasks it will run (claims.py);
(2) start a process per task (launch.py: a pool host or a forked child for Python workers, the
command itself for command workers); (3) wait for them in a single-threaded loop over their pipes
(pipes.py, pool.py), with time limits, the run's budget and expiry signals; (4) append each
finished run's result (outcomes.py), durably, before anything that depends on it (the next chain
step) is claimed.  Two run-due processes never hold the lease of the same task at once, so every
due occurrence runs exactly once across them.

Nothing here writes to the terminal: warnings go to the ``warn`` callback (and ``report.warnings``),
progress to ``on_event``; the command (cli/rundue.py) renders them.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import time
import uuid
from contextlib import suppress

from kmpwm.core import schema
from kmpwm.core.exitcodes import ConfigError, JournalError, KmpwmError
from kmpwm.core.models import DEFAULT_GRACE
from kmpwm.core.state import pause_of
from kmpwm.platform import procs
from kmpwm.running import claims, groups, jobs, outcomes, pipes
from kmpwm.running.claims import Claim
from kmpwm.running.declare import declared_limit
from kmpwm.running.jobs import Job, Report
from kmpwm.running.launch import Launcher
from kmpwm.running.pool import Host
from kmpwm.running.signals import Signals
from kmpwm.scheduling.leases import StartLog, forget_started, holder_started
from kmpwm.scheduling.plan import plan, time_limit
from kmpwm.scheduling.probes import Device
from kmpwm.storage import reserve, runlog
from kmpwm.storage.paths import Paths, private_subdir
from kmpwm.storage.store import OptimisticMiss, Store
from kmpwm.storage.stores import open_store

RECLAIM_EVERY = 1.0
STORE_BACKOFF_MAX = 30.0  # serve, a shared store away and nothing running: try it again this often at least
LOST_STORE_MARGIN = 3.0  # a shared store's lease: stop our runs this long before it could end
CANCEL_WATCH = 0.5  # how often running tasks are checked for a cancel (lock-free, the journal's tail)
GROUP_WAIT = 0.010  # a finished run's result waits at most this long to share a record with others


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
        warn=None,
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
        if serve is not None:
            self.store.forget_history = True  # it lives long: it must not hold every task it ever ran
            # a shared store's notifications carry the records: serve's state follows them, and
            # its claims go in one round trip (transaction(guess=True))
            if hasattr(self.store, "news_since"):
                self.store.follow_notifications = True
        self.budget = budget
        self.grace = grace
        self.parallel = parallel or os.cpu_count() or 1
        self.max_tasks = max_tasks
        self.dry_run = dry_run
        self.on_event = on_event or (lambda kind, payload: None)
        self.warn = warn  # warn(text): a warning for the user, as it happens (the CLI prints it)
        self.pid = os.getpid()
        self.token = procs.token(self.pid)
        self.boot = procs.boot_id()
        # the host name (KMPWM_HOST, else the machine's): leases name it, pinned tasks match it
        self.host = procs.host()
        self.runner_id = f"{self.host}/{self.pid}/{uuid.uuid4().hex[:8]}"
        self.who = claims.Identity(self.runner_id, self.pid, self.token, self.boot, self.host)
        self.device = Device(storage_path=str(paths.journal_dir.parent))
        self.jobs: dict[str, Job] = {}
        self.done: set[str] = set()
        self.claimed_count = 0
        self._prefetch = max(8, 4 * self.parallel)  # at most this many claimed ahead of free slots
        self._avg_run: float | None = None  # moving average of run times (s), for the prefetch depth
        self._ready: list[Claim] = []  # claimed, not started yet
        self._pending: list[Job] = []  # finished, result not written yet
        self._release: list[Claim] = []  # claimed but never started (the run expired): hand back
        self.report = Report()
        self.run_expired = False
        self.expire_reason = ""
        self._registry = None
        self._sel: selectors.BaseSelector | None = None
        self.signals = Signals()
        self._forced = False
        self._known_cache: dict[str, bool] = {}
        self._planned = claims.Candidates()  # what the last plan said may be claimed
        self._on_fold = None
        self._groups = groups.GroupLog(paths.runners_dir, self.pid, self.token, self.runner_id)
        self.disk_full = False  # no room to record results: claim nothing more (reserve.py)
        self._trim_at = 0.0
        shared = self.store if getattr(self.store, "kind", "journal") != "journal" else None
        # each run's output (kmpwm.storage.runlog); on a shared store, kept there too
        self._runlogs = runlog.Starter(paths, self.pid, self.token, shared, self.host)
        # a shared store (storage.pgstore): leases on the database's clock, renewed while runs last
        self._renew = getattr(self.store, "renew", None)
        self._lease_base = 0.0  # monotonic time of the oldest moment our leases were last pushed on
        self._renew_at = 0.0
        self._store_retry_at = 0.0  # after a failed write to a shared store: try again from then
        self._store_said = False  # the store's absence was warned about
        self._store_backoff = 0.0  # serve with nothing running: seconds until it tries the store again
        self._hooks = None  # kmpwm.running.hooks.HookRunner, when config.toml has [hooks]
        self._hooks_read = False
        self._crash_at = os.environ.get("KMPWM_CRASH_AT")  # crash injection for the tests
        self._starts = StartLog(paths.runners_dir, self.pid, self.token, self.boot)  # leases.holder_started
        self.launcher = Launcher(
            paths, self.runner_id, self._groups, lambda: self.registry, self._parent_fds, self._crash_at
        )
        self.pool = self.launcher.pool
        # the loop's memory (_loop): claim again? when last claimed, when last watched for cancels
        self._need_claim, self._last_claim, self._last_watch = True, 0.0, 0.0

    @property
    def registry(self):
        if self._registry is None:
            from kmpwm.running.registry import Registry

            self._registry = Registry(self.paths)
        return self._registry

    def _warn(self, text: str) -> None:
        self.report.warnings.append(text)
        if self.warn is not None:
            self.warn(text)

    def _parent_fds(self) -> list[int]:
        """run-due's descriptors that a worker process it forks must close."""
        return self.signals.fds() + [fd for j in self.jobs.values() for fd in j.fds]

    # -- the pass -------------------------------------------------------------------------

    def run(self) -> int:
        """Run what is due; returns 75 if the run itself expired, else 0."""
        view = self.store.load(full=False)
        self._check_runnable(view)
        if self.dry_run:
            return self._dry_run(view.state)
        # Nothing due and nothing to record: done, without the lock (the common case under cron).
        idle = self._plan(view.state, time.time(), set())
        if self._nothing_to_do(idle):
            self._note_skipped(idle.skipped)
            return 0
        deadline = time.monotonic() + self.budget if self.budget is not None else None
        self._setup()
        try:
            self._loop(deadline)
            self._runlogs.flush(force=True)
            self._end_hooks()
        finally:
            self._teardown()
        return 75 if self.run_expired else 0

    def _nothing_to_do(self, p) -> bool:
        """Plan ``p`` has nothing due and nothing to record, and this is no serve."""
        return not p.due and not p.ops and self.serve is None

    def _check_runnable(self, view) -> None:
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

    def _loop(self, deadline: float | None) -> None:
        """Turn until nothing is left that this run may start (serve: until it is stopped)."""
        self._need_claim, self._last_claim, self._last_watch = True, 0.0, time.monotonic()
        while True:
            if self.serve is not None:
                self.serve.tick(self)
            now_m = time.monotonic()
            self._check_expiry(deadline, now_m)
            self._pending.extend(self._reap())
            self._start_ready()
            if self._write_and_claim(now_m):
                continue
            if not (self._ready or self._busy()):
                if not self._more_to_claim():
                    break  # nothing left that this run may start
                continue
            self._wait_turn(deadline)

    def _check_expiry(self, deadline: float | None, now_m: float) -> None:
        if deadline is not None and now_m >= deadline and not self.run_expired:
            self._expire_run("the run's --budget ended")
        self._heed_expiry_signal()

    def _heed_expiry_signal(self) -> None:
        """An expiry signal came (signals.py): the run expires, once."""
        if self.signals.flags["expire"] and not self.run_expired:
            self._expire_run(self.signals.reason)

    def _write_and_claim(self, now_m: float) -> bool:
        """Record what finished and claim what is due when it is time to; True when that wrote or
        claimed something (look again at once)."""
        periodic = now_m - self._last_claim >= RECLAIM_EVERY or self._poke
        want = self._may_claim(periodic)
        if now_m < self._store_retry_at or not self._cycle_due(now_m, want, periodic):
            return False
        wrote = bool(self._pending)
        claimed = self._cycle(want, replan=periodic or self._unblocks(self._pending))
        if want:
            self._last_claim = time.monotonic()
            self._need_claim = claimed > 0
            self._poke = False
        if wrote:
            self._need_claim = True  # a result may have made something due (a chain's next step)
        return bool(claimed or wrote)

    def _may_claim(self, periodic: bool) -> bool:
        """Is this a time to claim (asked to, or periodically), with room to (slots, disk, --max-tasks)?"""
        if self.run_expired or self.disk_full or not self._room():
            return False
        slots = len(self.jobs) + len(self._ready) < self.parallel + self._prefetch
        return slots and (self._need_claim or periodic)

    def _cycle_due(self, now_m: float, want: bool, periodic: bool) -> bool:
        """Is there a result to write now, or a claim to make (``want``)?"""
        low = len(self._ready) < self.parallel  # claim ahead only when the ready queue runs low
        return self._must_write(now_m) or (want and (low or periodic))

    def _more_to_claim(self) -> bool:
        """Nothing runs, waits or is left to write: may this run start anything more?  (serve
        sleeps here until something is due or changes.)"""
        stopped = self.run_expired or self.disk_full
        if not stopped and self._room() and self._need_claim:
            return True
        if self.serve is None or stopped:
            return False
        self._need_claim = self.serve.idle(self)  # until something is due or changes
        return True

    def _wait_turn(self, deadline: float | None) -> None:
        """Wait for the workers (their pipes, signals, the next time limit), then check on them."""
        later = self._runlogs.flush()  # the runs started and ended meanwhile, one write
        timeout = self._timeout(deadline)
        if later is not None:
            timeout = min(timeout, later)
        self._wait(timeout)
        self._check_limits()
        if self._renew is not None:
            self._renew_leases()
        if self.jobs and time.monotonic() - self._last_watch >= CANCEL_WATCH:
            self._last_watch = time.monotonic()
            self._watch_cancels()
        if self._hooks:
            self._hooks.poll()

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
        self._note_skipped(p.skipped)
        return 0

    def _note_skipped(self, skipped: list) -> None:
        """Report the tasks a plan skipped, with its reasons."""
        self.report.skipped.update((s["id"], s["reason"]) for s in skipped)

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
            if not self._ride_out(exc, held):
                raise  # say so and stop (exit 74)
            return 0
        self._store_back()
        if claimed and not held:
            self._lease_base = start  # the first leases of this stretch begin with this write
            self._renew_at = start + self.store.lease() / 4
        return claimed

    def _store_back(self) -> None:
        """A write reached the store: after an outage, say so (once)."""
        if self._store_said:
            self._store_said, self._store_backoff = False, 0.0
            self._warn("the store is reachable again")

    def _ride_out(self, exc: JournalError, held: bool) -> bool:
        """The shared store cannot be reached: go on without it for now (True), or stop (False)?"""
        if self.run_expired and not self.jobs:
            return False  # stopping anyway
        if held:
            # Our runs go on while the store is away; their leases are renewed when it is back,
            # and stopped by the expiry protocol before they could end (_renew_leases).
            self._store_retry_at = time.monotonic() + 1.0
            self._store_away(exc)
            return True
        if self.serve is None:
            return False  # nothing of ours is running
        self.store_unreachable(exc)  # serve outlives the outage (no supervisor restarts a cron @reboot serve)
        return True

    def _store_away(self, exc: JournalError) -> None:
        if not self._store_said:
            self._store_said = True
            going = f" while {len(self.jobs)} run(s) go on" if self.jobs else f" every {STORE_BACKOFF_MAX:g}s at most"
            self._warn(f"{exc.message}; retrying{going}")

    def store_unreachable(self, exc: JournalError) -> None:
        """serve, nothing of ours running, and the shared store cannot be reached: try again after
        a backoff (1 s, doubling to STORE_BACKOFF_MAX), saying so once per outage."""
        self._store_backoff = min(STORE_BACKOFF_MAX, self._store_backoff * 2) if self._store_backoff else 1.0
        self._store_retry_at = time.monotonic() + self._store_backoff
        self._store_away(exc)

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
            self._store_away(exc)
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
            self._push_leases(now, lease)
        ends = self._lease_base + lease
        if not self.run_expired and now >= ends - self.grace - LOST_STORE_MARGIN:
            self._expire_run("the store cannot be reached: its leases would end before the runs do")

    def _push_leases(self, now: float, lease: float) -> None:
        """Renew our leases now; again in a quarter of their length, or in a second if that failed."""
        if self._renew(self.runner_id):
            self._lease_base = now
            self._renew_at = now + lease / 4
        else:
            self._renew_at = now + 1.0

    def _cycle_journal(self, claim: bool, *, replan: bool) -> int:
        for attempt in range(3):
            try:
                return self._cycle_once(claim and attempt == 0, replan=replan, lite=attempt == 2)
            except JournalError as exc:
                if getattr(exc, "errno", None) != errno.ENOSPC:
                    raise
                self.disk_full = True  # claim nothing more in this run
                if not self._unwritten():
                    return 0  # only claims were refused: nothing was started
                if attempt == 2:
                    raise self._unrecordable() from None
                reserve.release(self.paths)
        return 0

    def _unrecordable(self) -> JournalError:
        """The error when even the last try (without the reserve, without data) found no room."""
        ids = ", ".join(j.id for j in self._pending) or ", ".join(c.id for c in self._release)
        return JournalError(
            f"cannot record the outcome of {ids}: the disk holding the journal is full, "
            "even with kmpwm's reserve given up",
            hint="they ran (or were claimed) and, unrecorded, will run again once their leases end; free space now",
        )

    def _cycle_once(self, claim: bool, *, replan: bool, lite: bool = False) -> int:
        """One transaction, one record, one fsync: the results of finished jobs, tasks handed
        back unstarted, then leases for due tasks.  Results are folded first, so a chain step
        that just finished unblocks the next one within the same record."""
        finished, self._pending = self._pending, []
        released, self._release = self._release, []
        failed: list = []
        hooks = self._hook_runner()
        self._replanned = False
        try:
            txn, rows, claimed = self._transact(finished, released, failed, claim, replan=replan, lite=lite)
        except BaseException:
            self._pending = finished + self._pending  # not written: keep them for the teardown's try
            self._release = released + self._release
            raise
        self._written(txn, rows, failed, hooks)
        self._ready.extend(claimed)
        self.claimed_count += len(claimed)
        # On a shared store a look costs a round trip; the state this transaction read under the
        # lock and committed a moment ago is as fresh as one (the journal's look is a stat).
        self._start_ready(txn.state if self._renew is not None else None)
        return len(claimed)

    def _written(self, txn, rows: list, failed: list, hooks) -> None:
        """The record is durable: report the runs and the tasks it ended FAILED, fire the hooks."""
        if self._replanned:  # the lock was held from the plan to our record: nothing came between
            self.planned_at = self.store.position()
        self.report.failed += failed
        self._recorded(rows)
        if hooks is not None and (rows or failed):
            hooks.fire_results(rows, [f["id"] for f in failed], txn.state)

    def _transact(self, finished: list[Job], released: list[Claim], failed: list, claim: bool, *, replan, lite):
        """The transaction of _cycle_once: (the transaction, the rows of the runs that count, the
        claims); every task it ends FAILED is added to ``failed``.  serve on a shared store claims
        optimistically when that is all it does (pgstore: transaction(guess=True)); when that
        cannot be, it plans again in a transaction of the usual kind."""
        if claim and not (finished or released) and getattr(self.store, "follow_notifications", False):
            done = self._transact_guessing(failed, replan=replan, lite=lite)
            if done is not None:
                return done
            replan = True
        return self._transact_once(finished, released, failed, claim, replan=replan, lite=lite)

    def _transact_guessing(self, failed: list, *, replan, lite):
        """An optimistic claim (_transact); once more after reading, when a record came first
        (another host's claim of the same task, mostly); None when it cannot be made."""
        try:
            return self._transact_once([], [], failed, True, replan=replan, lite=lite, guess=True)
        except OptimisticMiss as miss:
            if not miss.stale:
                return None
        self.store.refresh()
        try:
            return self._transact_once([], [], failed, True, replan=True, lite=lite, guess=True)
        except OptimisticMiss:
            return None

    def _transact_once(self, finished, released, failed: list, claim: bool, *, replan, lite, guess=False):
        rows: list = []
        claimed: list = []

        def on_fold(ts, task_id, kind, detail):
            # every task this record ends FAILED, whatever the cause (its run, its last attempt,
            # too many expiries, a missed window, an upstream failure, quarantine): never silent
            if kind == "failed":
                t = txn.state["tasks"].get(task_id) or {}
                failed.append({"id": task_id, "worker": t.get("worker"), "reason": detail.get("reason")})

        self._on_fold = on_fold
        with self.store.transaction(guess=True) if guess else self.store.transaction() as txn:
            if txn.view.damage:
                raise JournalError(
                    "the journal was damaged during the run; stopping", hint="run `kmpwm doctor --repair`"
                )
            if finished:
                rows = self._stage_results(txn, finished, lite, on_fold)
            if released:
                txn.stage([self._release_op(c) for c in released])
            if claim:
                claimed = self._claim(txn, txn.ts, replan=replan or not self._planned.queue)
        return txn, rows, claimed

    def _stage_results(self, txn, finished: list[Job], lite: bool, on_fold) -> list:
        """Stage the ops that record ``finished``; the rows of the runs that count."""
        ops, rows = outcomes.result_ops(
            finished,
            txn.ts,
            runner_id=self.runner_id,
            forced=self.forced is not None,
            expire_reason=self.expire_reason,
            paths=self.paths,
        )
        for _job, row in rows:
            self._note_run_time(row["duration_ms"] / 1000)
            self.done.add(row["id"])
        if lite:  # the disk is full: the outcome matters, the data may not fit
            _drop_data(ops)
            rows = [(job, dict(row, data=None)) for job, row in rows]
        txn.stage(ops, on_fold)
        return rows

    def _note_run_time(self, run_s: float) -> None:
        """The moving average of run times (the prefetch depth follows it)."""
        self._avg_run = run_s if self._avg_run is None else 0.8 * self._avg_run + 0.2 * run_s

    def _release_op(self, c: Claim) -> dict:
        return schema.release(c.task, self.runner_id, born=True)

    def _recorded(self, rows: list) -> None:
        """The results of ``rows`` are durable now: report them, end their runs' output files."""
        shared: list = []
        for job, row in rows:
            kept = self._end_log(job, row)
            if kept is not None:
                shared.append(kept)
            self.report.ran.append(row)
            if row["status"] == "EXPIRED":
                self.report.expired.append({"id": row["id"], "worker": row["worker"]})
            self.on_event("done", (job, row))
        if shared:
            self._share_runs(shared)
        self._warn_start_error()
        if rows:
            outcomes.log_runs(self.paths, rows)
        self._runlogs.flush()

    def _end_log(self, job: Job, row: dict) -> dict | None:
        """End the output file of ``job``'s run; on a shared store, the row that keeps the run
        there too (else None)."""
        if job.log is None:
            return None
        ended = time.time()
        self._runlogs.end(job.log, row["status"], ended, job.kind == "command" or job.progressed)
        if self._renew is None:
            return None
        return runlog.shared_row(job.log, self.host, job.attempt, job.started_wall, ended, row)

    def _warn_start_error(self) -> None:
        """Run starts that a shared store did not take: warn once per failure."""
        if self._runlogs.start_error is not None:
            exc, self._runlogs.start_error = self._runlogs.start_error, None
            self._warn(f"warning: {getattr(exc, 'message', exc)} (run starts not kept in the store)")

    def _share_runs(self, shared: list) -> None:
        self._runlogs.flush_starts()  # a run's start reaches the store before its end
        try:
            self.store.save_runs(shared)  # kmpwm logs on every host (a shared store)
        except KmpwmError as exc:
            self._warn(f"warning: {exc.message} (the output stays in this host's logs)")

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
        if not self._can_start():
            return
        # A task claimed ahead may have been cancelled or replaced since: look (lock-free, only
        # the records appended meanwhile) before starting it; ``fresh``: the state just read and
        # written under the store's lock.
        whole = fresh if fresh is not None else self._look()
        if whole is None:
            return  # the shared store is away: start nothing until it is back
        while self._can_start():
            c = self._ready.pop(0)
            if self._startable(c, whole):
                self._start(c)
            else:
                self._release.append(c)

    def _can_start(self) -> bool:
        """A claimed task waits, a slot is free, and the run goes on."""
        return bool(self._ready) and len(self.jobs) < self.parallel and not self.run_expired

    def _ours(self, t: dict | None, seq: int) -> bool:
        """Does task record ``t`` still run under our lease, as occurrence ``seq``?"""
        return (
            t is not None
            and t["seq"] == seq
            and t["state"] == "RUNNING"
            and (t["lease"] or {}).get("runner") == self.runner_id
        )

    def _startable(self, c: Claim, whole: dict) -> bool:
        """May the claimed-ahead ``c`` start now (else it is handed back)?"""
        now_t = whole["tasks"].get(c.id)
        if not self._ours(now_t, c.task["seq"]):
            # no longer ours to run (cancelled or replaced): a release takes down the fence
            # its cancel left (state._finish), so the id may run again at once
            return False
        if self.forced is None and pause_of(whole, now_t, time.time()) is not None:
            return False  # claimed ahead, then paused
        # one that waited longer than its lease allows for is handed back rather than run unleased
        return time.monotonic() <= c.start_by

    def _prefetch_depth(self) -> int:
        """How many tasks to claim beyond the free slots: only as many as recent run times say
        will start within PREFETCH_MARGIN (slow tasks are never claimed ahead)."""
        if self._avg_run is None:
            return 0
        return min(self._prefetch, int(claims.PREFETCH_MARGIN * self.parallel / max(self._avg_run, 1e-3)))

    def _claim(self, txn, now: float, *, replan: bool) -> list[Claim]:
        free = self._free()
        if free <= 0 or not self._disk_has_room():
            return []
        state = txn.state
        if replan:
            self._replan(txn, now)
        picks = self._pick(state, now, free)
        return self._stage_claims(txn, picks) if picks else []

    def _stage_claims(self, txn, picks: list[Claim]) -> list[Claim]:
        """Stage the claims ``picks``; the ones the fold accepted, to start before their leases allow."""
        state = txn.state
        if any(c.takeover for c in picks):
            # Taking over from a runner that is gone (it died since this run began, or while this
            # run planned): first kill whatever of its runs is left, so that no worker of the old
            # run is still going when this one starts (a command it was starting has no death
            # signal yet: groups.py).
            groups.sweep(self.paths.runners_dir)
        # the lease covers a run that starts within PREFETCH_MARGIN (plus scheduling slack)
        start_by = time.monotonic() + claims.PREFETCH_MARGIN + claims.START_SLACK
        oks = txn.stage([c.op for c in picks])
        return [claims.accepted(c, state, self._planned, start_by) for c, ok in zip(picks, oks) if ok]

    def _free(self) -> int:
        """How many tasks to claim now: free slots and those claimed ahead, within --max-tasks."""
        free = self.parallel + self._prefetch_depth() - len(self.jobs) - len(self._ready)
        if self.max_tasks is None:
            return free
        return min(free, self.max_tasks - self.claimed_count)

    def _disk_has_room(self) -> bool:
        """Room to record results (reserve.py; a shared store keeps its own room); without it,
        start nothing."""
        if self._renew is None and not reserve.ensure(self.paths):
            self.disk_full = True
            return False
        return True

    def _replan(self, txn, now: float) -> None:
        """Plan under the lock: stage the plan's ops, keep its candidates."""
        self._replanned = True
        p = self._plan(txn.state, now, _Union(self.done, self.jobs))
        self._note_skipped(p.skipped)
        txn.stage(p.ops, self._on_fold)
        self._planned = claims.Candidates.of(p)

    def _pick(self, state: dict, now: float, free: int) -> list[Claim]:
        """Up to ``free`` claims of the planned candidates, best first (claims.claim)."""
        taken = _Union(self.done, _Union(self.jobs, {c.id for c in self._ready}))
        slots = self.parallel - len(self.jobs) - len(self._ready)
        picks: list[Claim] = []
        while self._planned.queue and len(picks) < free:
            c = claims.claim(
                state,
                self._planned.queue.pop(),
                now,
                self.who,
                planned=self._planned,
                grace=self.grace,
                limit_of=self._limit_of,
                taken=taken,
                forced=self.forced is not None,
                ahead=len(picks) >= slots,
                started=self._started_by,
            )
            if isinstance(c, Claim):
                picks.append(c)
        return picks

    def _limit_of(self, t: dict):
        info = self.registry.get(t["worker"])
        return info, time_limit(t, declared_limit(info, self.launcher.preload, t))  # a task's --timeout wins

    # -- starting -------------------------------------------------------------------------

    def _start(self, c: Claim) -> None:
        if self._crash_at == "before-start":  # crash injection for the tests: claimed, not started
            os.kill(os.getpid(), signal.SIGKILL)
        task = c.task
        job = Job(task, c.attempt, c.info.kind if c.info else "python", c.limit, time.monotonic(), time.time())
        self.jobs[job.id] = job
        job.log = self._runlogs.start(job.id, job.attempt, job.started_wall)
        self.on_event("start", job)
        self.launcher.start(job, c.info, c.upstream)
        if job.immediate is not None:
            return
        trig = task["trigger"]
        if trig["type"] == "exact":
            job.task["_late_ms"] = int(max(0.0, job.started_wall - trig["at"]) * 1000)
        self._starts.add(job.id, (task.get("lease") or {}).get("since"))  # its worker started

    def _started_by(self, t: dict):
        """Did the gone holder of RUNNING task ``t`` start its worker? (leases.holder_started)"""
        if (t.get("lease") or {}).get("ahead"):
            return None
        return holder_started(self.paths.runners_dir, t)

    # -- waiting --------------------------------------------------------------------------

    def _setup(self) -> None:
        """Before the loop: the selector and the signals, our files in runners/, and what the
        workers of killed runners left behind swept away."""
        if self._renew is not None:
            self.store.note_runner(self.runner_id.split("/", 1)[0], self.runner_id)
        self._sel = selectors.DefaultSelector()
        self.launcher.attach(self._sel)
        self.signals.install(self._sel, hup_expires=self.serve is None)
        private_subdir(self.paths.runners_dir)
        self._starts.open()  # before the first claim: its absence would count every death
        groups.sweep(self.paths.runners_dir)  # what workers of killed runners left behind
        forget_started(self.paths.runners_dir)

    def _teardown(self) -> None:
        # Anything still running here means an unexpected error: stop it and hand the tasks back.
        self._hand_back()
        self.pool.shutdown()
        self._runlogs.flush(force=True)
        if self._sel is not None:
            self._sel.close()
        self.signals.restore()
        with suppress(OSError):
            os.unlink(self._expire_file())
        self._groups.close()
        self._starts.close()

    def _hand_back(self) -> None:
        """Kill what still runs, and record it and what was claimed but not started (2 s at most)."""
        self._unready()
        for job in self.jobs.values():
            jobs.kill(job, signal.SIGKILL)
        deadline = time.monotonic() + 2
        while self._busy() and time.monotonic() < deadline:
            self._pending.extend(self._reap())
            if self._unwritten():
                try:
                    self._cycle(False, replan=False)
                except Exception:
                    break
            if self.jobs:
                time.sleep(0.01)

    def _unready(self) -> None:
        """The tasks claimed but not started: to be handed back untouched."""
        self._release.extend(self._ready)
        self._ready = []

    def _busy(self) -> bool:
        """Runs go on, or their results (or hand-backs) wait to be recorded."""
        return bool(self.jobs) or self._unwritten()

    def _unwritten(self) -> bool:
        """Finished runs or hand-backs wait to be recorded."""
        return bool(self._pending or self._release)

    def _expire_file(self):
        return self.paths.runners_dir / f"{self.pid}.expire"

    def _timeout(self, deadline: float | None) -> float:
        """How long to wait: until the next time limit, the budget's end, a grouped result's write
        or a lease's renewal, RECLAIM_EVERY at most."""
        now = time.monotonic()
        t = self._until_limit(now)
        if deadline is not None and not self.run_expired:
            t = min(t, deadline - now)
        if self._pending:
            t = min(t, self._pending[0].ended + GROUP_WAIT - now)
        if self._renew is not None and (self.jobs or self._pending):  # a lease to renew, a store to try again
            t = min(t, min(self._renew_at, self._store_retry_at) - now)
        return max(0.0, t)

    def _until_limit(self, now: float) -> float:
        """Seconds until a run's time limit (or its kill) comes, RECLAIM_EVERY at most; 0 when a
        run ended without a process."""
        t = RECLAIM_EVERY
        for job in self.jobs.values():
            if job.immediate is not None:
                return 0.0
            t = min(t, (job.kill_at if job.kill_at is not None else job.started + job.limit) - now)
        return t

    def _wait(self, timeout: float) -> None:
        for key, _ in self._sel.select(timeout):
            if key.data is None:
                self.signals.drain()
            elif isinstance(key.data, Host):
                self.pool.drain(key.data, key.fd)
            elif callable(key.data):  # serve's watches (the journal, lease holders)
                key.data()
            else:
                self._drain(key.data, key.fd)

    def _drain(self, job: Job, fd: int) -> None:
        name = job.fds.get(fd)
        if name is None:
            return
        sink = {"result": job.result.extend, "out": lambda chunk: jobs.output(job, chunk)}.get(name)
        if pipes.drain(fd, sink or (lambda chunk: jobs.errors(job, chunk))):
            self._stop_reading(job, fd)

    def _stop_reading(self, job: Job, fd: int) -> None:
        self._sel.unregister(fd)
        os.close(fd)
        del job.fds[fd]

    def _check_limits(self) -> None:
        now = time.monotonic()
        if now >= self._trim_at:  # command workers append progress lines: keep their files small
            self._trim_at = now + 1.0
            self._trim_progress()
        self._heed_signals(now)
        for job in self.jobs.values():
            if job.running:
                self._enforce_limit(job, now)

    def _heed_signals(self, now: float) -> None:
        """An expiry signal expires the run; a second Ctrl-C kills the workers at once."""
        self._heed_expiry_signal()
        if self.signals.flags["force"] and not self._forced:
            self._forced = True
            self._kill_now(now)

    def _enforce_limit(self, job: Job, now: float) -> None:
        """A run past its time limit is told to stop; one past its grace period too is killed (once)."""
        if job.kill_at is not None and now >= job.kill_at:
            jobs.kill(job, signal.SIGKILL)
            job.kill_at = now + 3600  # once
        elif not job.expiring and now >= job.started + job.limit:
            self._expire_job(job, self.grace)

    def _trim_progress(self) -> None:
        from kmpwm.storage.progress import trim

        for job in self.jobs.values():
            if job.kind == "command" and job.log is not None:
                trim(job.log.progress)

    def _kill_now(self, now: float) -> None:
        """A second Ctrl-C: kill the workers without waiting for the grace period."""
        running = [j for j in self.jobs.values() if j.running]
        if running:
            self._warn(f"interrupted again: killing {len(running)} worker(s) now, without waiting for the grace period")
        for job in running:
            job.expiring = True
            jobs.kill(job, signal.SIGKILL)
            job.kill_at = now + 3600  # once

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
            if job.cancelled or not job.working or self._ours(state.get(job.id), job.task["seq"]):
                continue
            job.cancelled = True
            self.on_event("cancelling", job)
            self._expire_job(job, self.grace)  # (unless it was told to stop already)

    def _expire_job(self, job: Job, grace: float) -> None:
        if job.expiring or not job.working:
            return  # (told already; a run that already ended keeps its result: it was not stopped)
        job.expiring = True
        job.kill_at = time.monotonic() + grace
        jobs.kill(job, signal.SIGTERM)
        self.on_event("expiring", job)

    def _expire_run(self, reason: str) -> None:
        self.run_expired = True
        self.expire_reason = reason
        self._unready()
        grace = self._expire_grace()
        running = 0
        for job in self.jobs.values():
            job.run_expired = True
            running += job.running and not job.expiring
            self._expire_job(job, grace)
        if running:
            self._warn_interrupted(running, grace)

    def _warn_interrupted(self, running: int, grace: float) -> None:
        """A Ctrl-C expired the run: say what is being stopped, and how to kill it now instead."""
        flags = self.signals.flags
        if flags.get("signo") == signal.SIGINT and not flags["force"]:
            self._warn(
                f"interrupted: stopping {running} worker(s), up to {grace:g}s (interrupt again to kill them now)"
            )

    def _expire_grace(self) -> float:
        """The grace period simulate-expire asked for (its file), else ours."""
        try:
            return float(self._expire_file().read_text().strip())
        except (OSError, ValueError):
            return self.grace

    # -- finishing ------------------------------------------------------------------------

    def _reap(self) -> list[Job]:
        self.signals.flags["child"] = False
        finished = [job for job in list(self.jobs.values()) if self._ended(job)]
        now = time.monotonic()
        for job in finished:
            job.ended = now
            del self.jobs[job.id]
        self.pool.forget_ended()
        return finished

    def _ended(self, job: Job) -> bool:
        """Has ``job``'s run ended (its result, or its process's end, is in)?"""
        if job.immediate is not None:
            return True
        if job.host is not None:
            return self._host_ended(job)
        return self._process_ended(job)

    def _host_ended(self, job: Job) -> bool:
        """A pool host's job: its result came, or its host died (the host's exit is the run's)."""
        if job.answered:
            return True
        if not job.host.dead:
            return False
        self.pool.reap(job.host)
        if job.host.exit_status is None:
            return False
        job.exit_status = job.host.exit_status
        return True

    def _process_ended(self, job: Job) -> bool:
        """A job of its own process: it exited, and what it left in its pipes is read."""
        if job.exit_status is None:
            job.exit_status = jobs.poll(job)
        if job.exit_status is None:
            return False
        for fd in list(job.fds):
            self._drain(job, fd)  # what the process left in its pipes
        if job.kind != "command" and "result" in job.fds.values():
            return False  # result still arriving
        for fd in list(job.fds):  # a grandchild may hold a pipe open: stop reading it
            self._stop_reading(job, fd)
        return True


def _drop_data(ops: list[dict]) -> None:
    """Result ops without their data, each saying so (the disk is full)."""
    for op in ops:
        if op.get("data") is not None:
            op["data"] = None
            op["message"] = (op.get("message") or "") + " (its data was not kept: the disk is full)"


class _Union:
    """Membership in either of two collections, without building their union each cycle."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def __contains__(self, item) -> bool:
        return item in self.a or item in self.b
