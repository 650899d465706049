"""``kmpwm serve``: one long-lived runner that starts work the moment it is due.

It is the Runner of ``run-due`` (runner.py), driven without end: the Runner runs what is due,
and when nothing is left that it may start it calls ``Serve.idle``, which sleeps in the Runner's
own selector until the earliest of

- the next due time in the folded state (an ``--at`` time, a periodic task's next run, a lease
  that ends), computed exactly, so that nothing wakes it before;
- a change of the journal by another process (an enqueue, cancel, retry, resume, run-now): the
  journal directory is watched with inotify on Linux (inotify-simple), kqueue on macOS and the
  BSDs (standard library), else by polling its size and inode with a backoff of at most 1 s;
- the exit of a process on this host that holds a lease (pidfd on Linux), whose tasks are then
  free at once;
- a minute, while due work waits for a constraint or a trigger condition (device state is read
  again each time), or ``MAX_SLEEP`` at the longest while something is due later (a suspended
  machine or a changed clock is noticed within that);
- a signal: SIGTERM or SIGINT (the expiry protocol for running tasks, then exit 0), SIGUSR1
  (``simulate-expire``: the same, then exit 75, as ``run-due``), SIGHUP (``config.toml`` read
  again).

With nothing due and nothing changing it makes no system call at all.  Coexisting with
``run-due`` and other ``serve`` processes is the leases' business, exactly as between two
``run-due``: a task is only ever run under a lease its runner claimed in the journal.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import suppress

from kmpwm.core.exitcodes import JournalError, KmpwmError
from kmpwm.storage.paths import Paths

RECHECK = 60.0  # due work waiting for a constraint or a trigger condition: look again this often
MAX_SLEEP = 900.0  # longest sleep while something is due later (clock changes, suspend)
TRIM_EVERY = 60.0  # while busy: forget finished runs (bounded memory), read the device again
COMPACT_CHECK = 300.0  # at most this often: is an automatic compaction due?
POLL_MIN, POLL_MAX = 0.05, 1.0  # fallback without change notification: stat backoff bounds
STATE_PREFIX = "serve-"  # runners/serve-PID.json: who is serving this home (doctor, schedule status)


# -- watching the journal -------------------------------------------------------------------


class _InotifyWatch:
    """Linux: the journal directory's inotify events for the journal file."""

    def __init__(self, paths: Paths):
        import inotify_simple as ino

        self._ino = ino.INotify(nonblocking=True)
        flags = ino.flags
        self._ino.add_watch(
            str(paths.journal_dir), flags.MODIFY | flags.CLOSE_WRITE | flags.MOVED_TO | flags.CREATE | flags.DELETE
        )
        self._name = paths.journal_file.name
        self.fd = self._ino.fileno()

    def drain(self) -> bool:
        changed = False
        with suppress(BlockingIOError, InterruptedError):
            for event in self._ino.read(timeout=0):
                if event.name == self._name or not event.name:
                    changed = True
        return changed

    def poll_interval(self) -> float | None:
        return None

    def close(self) -> None:
        self._ino.close()


class _KqueueWatch:
    """macOS and the BSDs: kqueue vnode events on the journal file and its directory (a
    compaction renames a new file into place: the directory changes, the file is opened again)."""

    def __init__(self, paths: Paths):
        import select

        self._select = select
        self._paths = paths
        self._kq = select.kqueue()
        self.fd = self._kq.fileno()
        self._fds: list[int] = []
        self._arm()

    def _arm(self) -> None:
        sel = self._select
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        events = []
        for path, fflags in (
            (self._paths.journal_dir, sel.KQ_NOTE_WRITE),
            (
                self._paths.journal_file,
                sel.KQ_NOTE_WRITE | sel.KQ_NOTE_EXTEND | sel.KQ_NOTE_DELETE | sel.KQ_NOTE_RENAME,
            ),
        ):
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_EVTONLY", 0) | os.O_CLOEXEC)
            except OSError:
                continue
            self._fds.append(fd)
            events.append(
                sel.kevent(fd, filter=sel.KQ_FILTER_VNODE, flags=sel.KQ_EV_ADD | sel.KQ_EV_CLEAR, fflags=fflags)
            )
        if events:
            self._kq.control(events, 0, 0)

    def drain(self) -> bool:
        got = self._kq.control(None, 64, 0)
        if got:
            self._arm()  # the file may have been replaced: watch the new one
        return bool(got)

    def poll_interval(self) -> float | None:
        return None

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._kq.close()


class _PollWatch:
    """Anywhere else: the journal file's inode and size, looked at with a backoff (never more
    than POLL_MAX between looks, so a change is seen within a second)."""

    fd = None

    def __init__(self, paths: Paths):
        self._path = paths.journal_file
        self._last = self._ident()
        self._interval = POLL_MIN

    def _ident(self):
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def drain(self) -> bool:
        now = self._ident()
        if now != self._last:
            self._last = now
            self._interval = POLL_MIN
            return True
        self._interval = min(POLL_MAX, self._interval * 2)
        return False

    def poll_interval(self) -> float | None:
        return self._interval

    def close(self) -> None:
        pass


def make_watch(paths: Paths, store=None):
    """The best change notification this platform has (KMPWM_SERVE_WATCH=poll forces the fallback);
    a shared store's own notifications (PostgreSQL's LISTEN) when it has them."""
    if store is not None and hasattr(store, "watch"):
        return store.watch()
    watch = None if os.environ.get("KMPWM_SERVE_WATCH", "") == "poll" else _native_watch(paths)
    return _PollWatch(paths) if watch is None else watch


def _native_watch(paths: Paths):
    """inotify on Linux, kqueue where the platform has it; None when neither can be had."""
    if sys.platform.startswith("linux"):
        with suppress(ImportError, OSError):  # no inotify-simple, or no inotify instances left: poll
            return _InotifyWatch(paths)
    elif hasattr(__import__("select"), "kqueue"):
        with suppress(OSError):
            return _KqueueWatch(paths)
    return None


# -- when to wake ---------------------------------------------------------------------------


def wake_plan(state: dict, now: float, runner_id: str, host: str) -> tuple[float | None, dict]:
    """The next time anything can become due without a change to the journal (None: never), and
    the lease holders on this host whose exit frees a task (pid -> start token).  Tasks pinned
    to another host than ``host`` do not wake it."""
    # pinned to another host: never due here, and its leases are that host's
    here = [t for t in state["tasks"].values() if t.get("host") in (None, host)]
    return _next_wake(here, now), _lease_holders(here, runner_id, host)


def _next_wake(tasks: list, now: float) -> float | None:
    """The earliest future due time or lease end of ``tasks``; within RECHECK while one is due
    yet waits (None: nothing to wake for)."""
    times = []
    waiting = False
    for t in tasks:
        if t["state"] == "ENQUEUED":
            if t["due"] > now:
                times.append(t["due"])
            else:
                waiting = True  # due, yet not run: a constraint, a trigger condition, a pause
        elif t["state"] == "RUNNING":
            times.append((t.get("lease") or {}).get("until") or 0.0)
    if waiting:
        times.append(now + RECHECK)
    return min(times, default=None)


def _lease_holders(tasks: list, runner_id: str, host: str) -> dict:
    """pid -> start token of the other runners on ``host`` that hold leases on ``tasks``."""
    holders = {}
    for t in tasks:
        if t["state"] != "RUNNING":
            continue
        lease = t.get("lease") or {}
        holder = lease.get("runner") or ""
        if holder != runner_id and holder.split("/", 1)[0] == host and lease.get("pid"):
            holders[lease["pid"]] = lease.get("token")
    return holders


# -- the serve ------------------------------------------------------------------------------


class Serve:
    """The Runner's companion in ``kmpwm serve`` (see the module's docstring)."""

    def __init__(self, paths: Paths, *, log=None):
        self.paths = paths
        self.log = log or (lambda line: None)  # log(line): what serve says as it goes (the CLI prints it)
        self.watch = None
        self._registered = False
        self._watched_fd = None  # the watch's socket registered with the Runner's selector
        self._holders: dict[int, int] = {}  # pid -> pidfd
        now = time.monotonic()
        self._trimmed = now
        self._compact_checked = now
        self.stopping = False

    # -- hooks the Runner calls ----------------------------------------------------------

    def tick(self, runner) -> None:
        """At the top of each turn of the Runner's loop: cheap unless there is something to do."""
        # Watch from the first turn on, before the Runner's first plan: a change after that plan is
        # then noticed, one before it is in the plan.  (Armed only when it first fell asleep, the
        # watch missed any enqueue between the last plan and the arming: issue 19.)
        self._start_watching(runner)
        flags = runner.signals.flags
        if flags.get("hup"):
            flags["hup"] = False
            self.reload(runner)
        now = time.monotonic()
        if now - self._trimmed >= TRIM_EVERY and not runner._pending:
            self._fresh_pass(runner)

    def idle(self, runner) -> bool:
        """Nothing left to start: sleep until something may be due; True (claim again, with a
        fresh plan: the Runner's queue of candidates may be stale by then)."""
        runner._poke = False
        self._sleep(runner)
        runner._poke = True
        return True

    def _sleep(self, runner) -> None:
        self._start_watching(runner)
        self._fresh_pass(runner)
        self._maybe_compact()
        while True:
            view = self._look_again(runner)
            if view is None or not self._sleep_once(runner, view):
                return

    def _look_again(self, runner):
        """The state, when nothing calls for a plan at once (else None: wake up)."""
        flags = runner.signals.flags
        # hup: tick() reloads, then the Runner plans with the new workers.  A change since the
        # Runner last planned (another process's enqueue may have been folded into one of our
        # own transactions without a plan): plan once more.
        if flags.get("expire") or flags.get("hup") or (self.watch.drain() and self._news(runner)):
            return None
        view = self._load(runner)
        if view is None:
            return None
        if view.damage:
            raise JournalError(
                f"the journal has {len(view.damage)} damaged record(s) ({view.damage[0].describe()}); "
                "serve stops, because a lost cancel or completion could run work twice",
                hint="run `kmpwm doctor --repair` to quarantine the damage, then start it again",
            )
        if runner.store.position() != runner.planned_at:
            # Records that the Runner's last plan did not see (another process's, folded by
            # this load or by one of our transactions that planned nothing): wake_plan would
            # take a task among them that is due now for one that waits for a constraint,
            # and sleep a minute.  Plan again.
            return None
        return view

    def _load(self, runner):
        """The store's view; None when a shared store is away (waited for a while, then plan
        and write again)."""
        try:
            return runner.store.load(full=False)
        except JournalError as exc:
            if runner._renew is None or runner.run_expired:
                raise  # the journal: a failed read is not an outage to wait out
            runner.store_unreachable(exc)
            runner._wait(max(0.0, runner._store_retry_at - time.monotonic()))
            return None

    def _sleep_once(self, runner, view) -> bool:
        """Sleep until the next due time, a change or a lease holder's exit; False: wake up."""
        now = time.time()
        nxt, holders = wake_plan(view.state, now, runner.runner_id, runner.host)
        if nxt is not None and nxt <= now:
            return False
        poll = self.watch.poll_interval()
        timeout = _sleep_timeout(nxt, now, poll)
        self._watch_holders(runner, holders)
        if runner._poke:
            return False  # a lease holder is gone already
        runner._wait(timeout)
        if self._woken(runner, nxt):
            return False
        # the longest sleep: plan again (a clock change, a suspend)
        return timeout is None or poll is not None or timeout < MAX_SLEEP - 1

    def _woken(self, runner, nxt: float | None) -> bool:
        """After a wait: did a change of the journal, a lease holder's exit or the due time come?"""
        if runner._poke or (self.watch.fd is None and self.watch.drain()):
            self._follow_fd(runner)
            return True  # the journal changed, or a lease holder exited
        if nxt is not None and time.time() >= nxt:
            runner.device = _fresh_device(self.paths)
            return True
        return False

    # -- helpers --------------------------------------------------------------------------

    def _start_watching(self, runner) -> None:
        if self._registered:
            return
        import selectors

        self.watch = make_watch(self.paths, runner.store)
        if self.watch.fd is not None:
            runner._sel.register(self.watch.fd, selectors.EVENT_READ, lambda: self._on_change(runner))
        self._watched_fd = self.watch.fd
        self._registered = True

    def _on_change(self, runner) -> None:
        changed = self.watch.drain()
        self._follow_fd(runner)
        if changed and self._news(runner):
            runner._poke = True

    @staticmethod
    def _news(runner) -> bool:
        """Is there a record the Runner's last plan did not see?  A shared store whose
        notifications carry their records tells (our own records after a plan are not news);
        else any change counts: a record of another process may have been folded into one of our
        transactions without a plan.  (A plan costs little: well under a millisecond for a
        thousand tasks.)"""
        news = getattr(runner.store, "news_since", None)
        return news is None or news(runner.planned_at)

    def _follow_fd(self, runner) -> None:
        """A shared store's listening connection was lost or made anew: watch its new socket (none
        while the store is away: the watch polls, poll_interval)."""
        fd = self.watch.fd
        if fd == self._watched_fd:
            return
        import selectors

        if self._watched_fd is not None:
            runner._sel.unregister(self._watched_fd)
        if fd is not None:
            runner._sel.register(fd, selectors.EVENT_READ, lambda: self._on_change(runner))
        self._watched_fd = fd

    def _watch_holders(self, runner, holders: dict) -> None:
        """pidfds of the processes on this host that hold leases: their exit frees the tasks."""
        for pid in list(self._holders):
            if pid not in holders:
                self._drop_holder(runner, pid)
        if not hasattr(os, "pidfd_open"):
            return
        for pid, token in holders.items():
            if pid not in self._holders and pid != os.getpid():
                self._watch_holder(runner, pid, token)

    def _watch_holder(self, runner, pid: int, token) -> None:
        """Watch one lease holder's exit (its pidfd); one gone already pokes the Runner."""
        import selectors

        from kmpwm.platform import procs

        try:
            fd = os.pidfd_open(pid)
        except OSError:
            runner._poke = True  # gone already: its leases are free now
            return
        if not procs.alive(pid, token):  # the pid was recycled before we opened it
            os.close(fd)
            runner._poke = True
            return
        self._holders[pid] = fd
        runner._sel.register(fd, selectors.EVENT_READ, lambda: self._holder_gone(runner, pid))

    def _holder_gone(self, runner, pid: int) -> None:
        self._drop_holder(runner, pid)
        runner._poke = True

    def _drop_holder(self, runner, pid: int) -> None:
        fd = self._holders.pop(pid, None)
        if fd is None:
            return
        with suppress(KeyError, ValueError):
            runner._sel.unregister(fd)
        os.close(fd)

    def _fresh_pass(self, runner) -> None:
        """What a new run-due would start with: no memory of finished runs, new device readings,
        and the state as the newest snapshot has it (not every task this serve ever saw)."""
        rebase = getattr(runner.store, "rebase", None)
        if rebase is not None and not runner.jobs:
            rebase()
        runner.done.clear()
        from kmpwm.running.jobs import Report

        runner.report = Report()
        runner.device = _fresh_device(self.paths)
        self._trimmed = time.monotonic()

    def _maybe_compact(self) -> None:
        now = time.monotonic()
        if now - self._compact_checked < COMPACT_CHECK:
            return
        self._compact_checked = now
        from kmpwm.storage.compaction import auto_compact, needs_compaction

        try:
            if needs_compaction(self.paths):
                auto_compact(self.paths)
        except KmpwmError as exc:
            self.log(f"automatic compaction failed: {exc}")

    def reload(self, runner) -> None:
        """SIGHUP: read config.toml again; a broken file keeps the workers as they were."""
        from kmpwm.running.registry import Registry

        fresh = Registry(self.paths)
        try:
            fresh.config  # noqa: B018  read and check it now, not at the next claim
        except KmpwmError as exc:
            self.log(f"config.toml not reloaded: {exc}")
            return
        runner._registry = fresh
        runner._known_cache.clear()
        runner.pool.retire()  # pool hosts hold the old workers: idle ones retire now
        runner._poke = True
        self.log("config.toml re-read")

    def close(self, runner) -> None:
        for pid in list(self._holders):
            self._drop_holder(runner, pid)
        if self.watch is not None:
            if self.watch.fd is not None and runner._sel is not None:
                with suppress(KeyError, ValueError):
                    runner._sel.unregister(self.watch.fd)
            self.watch.close()


def _sleep_timeout(nxt: float | None, now: float, poll: float | None) -> float | None:
    """How long to sleep: until ``nxt`` (MAX_SLEEP at most), and no longer than the watch's
    poll interval (None: until something happens)."""
    timeout = None if nxt is None else min(nxt - now + 0.0005, MAX_SLEEP)
    if poll is None:
        return timeout
    return poll if timeout is None else min(timeout, poll)


def _fresh_device(paths: Paths):
    from kmpwm.scheduling.probes import Device

    return Device(storage_path=str(paths.journal_dir.parent))


# -- who is serving ---------------------------------------------------------------------------


def state_file(paths: Paths, pid: int):
    return paths.runners_dir / f"{STATE_PREFIX}{pid}.json"


def write_state(paths: Paths) -> None:
    import orjson

    from kmpwm.platform import procs

    pid = os.getpid()
    doc = {"pid": pid, "token": procs.token(pid), "host": procs.host(), "started_at": time.time()}
    path = state_file(paths, pid)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.write(fd, orjson.dumps(doc))
    finally:
        os.close(fd)
    os.replace(tmp, path)


def running_serves(paths: Paths) -> list[dict]:
    """The ``serve`` processes now serving this home (dead ones' files are removed)."""
    from kmpwm.platform import procs

    found = []
    for path in _state_files(paths):
        doc = _read_state(path)
        if doc is None or doc.get("host") not in (None, procs.host()):
            continue
        pid, token = doc["pid"], doc.get("token")
        if procs.alive(pid, token):
            found.append({"pid": pid, "started_at": doc.get("started_at")})
        else:
            with suppress(OSError):
                path.unlink()
    return found


def _state_files(paths: Paths) -> list:
    """The serve state files in runners/, sorted."""
    try:
        names = sorted(os.listdir(paths.runners_dir))
    except OSError:
        return []
    return [paths.runners_dir / n for n in names if n.startswith(STATE_PREFIX) and n.endswith(".json")]


def _read_state(path) -> dict | None:
    """A serve's state file (write_state); None unless it can be read and names a pid."""
    import orjson

    try:
        doc = orjson.loads(path.read_bytes())
        doc["pid"] = int(doc["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return doc
