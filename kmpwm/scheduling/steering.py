"""Steering your work (SPEC section 11): pause, resume, retry, wait and run-now.

The journal ops (``pause``, ``resume``, ``retry``) and their meaning live in state.py; the due
decision for paused tasks in scheduling.plan (via state.pause_of).  This module builds the ops
under the lock, waits for tasks without the lock, and plans run-now's forced runs
(:func:`plan_forced`); run-now itself runs the Runner (api.run_now), and the commands print in
cli/steercmd.py.
"""

from __future__ import annotations

import os
import time

from kmpwm.core import schema
from kmpwm.core.exitcodes import InvalidParams
from kmpwm.core.state import FINISHED, UNFINISHED, members, pack_task, steer_targets

EXIT_TIMED_OUT = 75
POLL_MAX = 0.2  # the stat-polling fallback's longest sleep (s)


def who() -> str:
    """Who steers: the user, host and process, recorded in the events."""
    try:
        import pwd

        user = pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        user = os.environ.get("USER", "?")
    from kmpwm.platform.procs import host

    return f"{user}@{host()} pid {os.getpid()}"


# -- pause / resume -------------------------------------------------------------------------


def pause(store, ids=(), tag=None, all_=False, until=None, by=None) -> list[str]:
    op = schema.pause(by or who(), ids=ids, tag=tag, all_=all_, until=until)
    with store.transaction() as txn:
        if not all_ and not steer_targets(txn.state, op, UNFINISHED):
            return []  # nothing to pause: no journal growth
        return txn.commit([op])[0]


def resume(store, ids=(), tag=None, all_=False, by=None) -> list[str]:
    op = schema.resume(by or who(), ids=ids, tag=tag, all_=all_)
    with store.transaction() as txn:
        if not _resumes_anything(txn.state, op, all_):
            return []  # nothing paused: no journal growth
        return txn.commit([op])[0]


def _resumes_anything(state: dict, op: dict, all_: bool) -> bool:
    """Is anything paused that ``op`` resumes (``all_``: the queue, or any task)?"""
    if all_:
        return state.get("qpause") is not None or any(t.get("paused") for t in state["tasks"].values())
    return any(state["tasks"][i].get("paused") for i in steer_targets(state, op, UNFINISHED))


# -- retry ----------------------------------------------------------------------------------


def retry(store, ids=(), failed=False, tag=None, by=None) -> list[str]:
    """FAILED / CANCELLED tasks enqueued again (chains resumed at the failed step), under the lock."""
    with store.transaction() as txn:
        hot = txn.state  # up to date under the lock
        full = store.load(full=True).state  # plus history: finished work may live only there
        op = retry_op(full, hot, ids, failed, tag, by or who())
        return txn.commit([op])[0] if op is not None else []


def retry_op(full: dict, hot: dict, ids=(), failed=False, tag=None, by=None) -> dict | None:
    """The ``retry`` op for the tasks named (None: nothing to retry).  ``full`` is the whole
    state, ``hot`` what a reader without history holds: the op carries every record it revives
    (the tasks and their chain's tasks and chain) that ``hot`` lacks, so it folds the same on both."""
    picked = _retryable(full, ids, failed, tag)
    if not picked:
        return None
    carry, chains = _missing_from(full, hot, picked)
    revived = [pack_task(t) for t in sorted(carry.values(), key=lambda t: t["seq"])]
    return schema.retry(picked, by, revived, list(chains.values()))


def _retryable(full: dict, ids, failed: bool, tag) -> list[str]:
    """The ids retry takes: every FAILED task (``failed``), else the FAILED and CANCELLED tasks
    named by ``tag`` or ``ids``, in enqueue order."""
    if failed:
        picked = [i for i, t in full["tasks"].items() if t["state"] == "FAILED"]
        return sorted(picked, key=lambda i: full["tasks"][i]["seq"])
    sel = {"tag": tag} if tag is not None else {"ids": list(ids)}
    return steer_targets(full, sel, FINISHED - {"SUCCEEDED"})


def _missing_from(full: dict, hot: dict, picked: list[str]) -> tuple[dict, dict]:
    """The tasks (``picked`` and their chains' tasks) and chains of ``full`` that ``hot`` lacks."""
    carry: dict[str, dict] = {}
    chains: dict[str, dict] = {}
    for i in picked:
        t = full["tasks"][i]
        chain = full["chains"].get(t.get("chain_id"))
        if chain is not None:
            if chain["id"] not in hot["chains"]:
                chains[chain["id"]] = chain
            carry.update((m["id"], m) for m in members(full, chain) if m["id"] not in hot["tasks"])
        if i not in hot["tasks"]:
            carry[i] = t
    return carry, chains


# -- wait -----------------------------------------------------------------------------------


class WaitResult:
    """What :func:`wait` saw: ``tasks`` (``{"id", "state", "last_result"}``), ``timed_out`` and
    the exit code (0 all SUCCEEDED, 1 any FAILED / CANCELLED or a repeating run that did not
    succeed, 75 time-out)."""

    def __init__(self, tasks: list[dict], timed_out: bool, exit_code: int):
        self.tasks, self.timed_out, self.exit_code = tasks, timed_out, exit_code

    def doc(self) -> dict:
        return {"tasks": self.tasks, "timed_out": self.timed_out}


def _matching(state: dict, ids, tag) -> list[str]:
    """The tasks (finished or not) that ``tag``, else ``ids``, names; InvalidParams if none."""
    wanted = steer_targets(state, {"tag": tag} if tag is not None else {"ids": list(ids)}, UNFINISHED | FINISHED)
    if not wanted:
        what = f"tag {tag!r}" if tag is not None else ", ".join(repr(i) for i in ids)
        raise InvalidParams(f"no task matches {what}", hint="`kmpwm inspect-queue --all` lists them")
    return wanted


def _repeating(t: dict) -> bool:
    from kmpwm.core.triggers import REPEATING

    return t["trigger"]["type"] in REPEATING


def wait(store, ids=(), tag=None, timeout: float | None = None) -> WaitResult:
    """Block until every matching task is finished (a repeating task: until a run of it that
    ends an occurrence finishes after the call began).  No lock is taken: the state is read
    lock-free, incrementally, each time the journal changes (inotify when ``inotify_simple`` is
    installed, else a bounded stat poll)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    watcher = _watcher(store)  # armed before the first read: no change slips between
    try:
        state = store.load(full=True).state
        goal = _WaitGoal(state, ids, tag)
        while True:
            docs, done, bad = goal.progress(state["tasks"])
            if done:
                return WaitResult(docs, False, 1 if bad else 0)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return WaitResult(docs, True, EXIT_TIMED_OUT)
            watcher.wait(left)
            state = store.load(full=True).state
    finally:
        watcher.close()


def _watcher(store) -> _StoreWatcher | _Watcher:
    """What sleeps until ``store`` changes: a shared store's notifications, else the journal directory's."""
    if hasattr(store, "watch"):
        return _StoreWatcher(store.watch())
    return _Watcher(store.paths.journal_dir)


class _WaitGoal:
    """The tasks :func:`wait` waits for, and when each counts as done."""

    def __init__(self, state: dict, ids, tag):
        self.wanted = _matching(state, ids, tag)
        tasks = state["tasks"]
        self.repeating = {i for i in self.wanted if _repeating(tasks[i])}
        # a repeating task's run in progress began before wait did: the next one counts
        self.base = {
            i: tasks[i]["attempts"] + (tasks[i]["state"] == "RUNNING" and i in self.repeating) for i in self.wanted
        }

    def finished(self, i: str, t: dict) -> bool | None:
        """None: not done yet; else done, and whether it went wrong."""
        if t["state"] in FINISHED:
            return t["state"] != "SUCCEEDED"
        if self._occurrence_ended(i, t):
            return (t.get("last_result") or {}).get("status") != "SUCCESS"
        return None

    def _occurrence_ended(self, i: str, t: dict) -> bool:
        """Has a run of repeating task ``i`` that ends an occurrence finished since wait began?"""
        if i not in self.repeating or t["state"] == "RUNNING":
            return False
        return t["attempts"] > self.base[i] and not t.get("occ_attempts")

    def progress(self, tasks: dict) -> tuple[list[dict], bool, bool]:
        """The tasks' documents, whether all are done, and whether one went wrong.  A task that
        is gone from the full state is not counted as done (as wait always did)."""
        ends = [self.finished(i, tasks[i]) if i in tasks else None for i in self.wanted]
        docs = [
            {"id": i, "state": tasks[i]["state"], "last_result": tasks[i]["last_result"]}
            for i in self.wanted
            if i in tasks
        ]
        return docs, all(e is not None for e in ends), any(ends)


def _bounded(left: float | None) -> float:
    """How long a watcher sleeps: ``left``, at most 1 s (a bounded wait even so: a change missed
    between the read and the watch costs 1 s at most)."""
    return 1.0 if left is None else max(0.0, min(left, 1.0))


class _StoreWatcher:
    """Sleeps until a shared store notifies a change (storage.pgstore.PgWatch), at most 1 s."""

    def __init__(self, watch):
        self._watch = watch

    def wait(self, left: float | None) -> None:
        import select

        ready, _, _ = select.select([self._watch.fd], [], [], _bounded(left))
        if ready:
            self._watch.drain()

    def close(self) -> None:
        self._watch.close()


class _Watcher:
    """Sleeps until the journal directory changes (a record appended, the journal replaced by a
    compaction): inotify through ``inotify_simple`` when it is installed, else stat polling with
    a backoff bounded by POLL_MAX."""

    def __init__(self, journal_dir):
        self.dir = str(journal_dir)
        self.file = os.path.join(self.dir, "journal.log")
        self._ino = None
        self._delay = 0.01
        self._last = self._stat()
        try:
            from inotify_simple import INotify, flags

            self._ino = INotify()
            self._ino.add_watch(self.dir, flags.MODIFY | flags.CREATE | flags.MOVED_TO | flags.CLOSE_WRITE)
        except Exception:  # not installed, or no inotify here (not Linux, out of watches)
            self._ino = None

    def _stat(self):
        try:
            st = os.stat(self.file)
            return (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            return None

    def wait(self, left: float | None) -> None:
        if self._ino is not None:
            self._ino.read(timeout=int(_bounded(left) * 1000))
        else:
            self._poll(left)

    def _poll(self, left: float | None) -> None:
        """Stat the journal until it changes, sleeping longer each time (up to POLL_MAX)."""
        while True:
            now = self._stat()
            if now != self._last:
                self._last = now
                self._delay = 0.01
                return
            step = self._delay if left is None else min(self._delay, max(left, 0.0))
            time.sleep(step)
            self._delay = min(self._delay * 2, POLL_MAX)
            if left is not None:
                left -= step
                if left <= 0:
                    return

    def close(self) -> None:
        if self._ino is not None:
            self._ino.close()


# -- run-now --------------------------------------------------------------------------------


def expand_ids(state: dict, ids) -> list[str]:
    """Task ids named by ``ids`` (a chain id: its tasks in step order; ``ID``: with its ``ID#n``)."""
    return steer_targets(state, {"ids": list(ids)}, UNFINISHED | FINISHED)


def plan_forced(
    state: dict,
    now: float,
    device,
    forced: list[str],
    *,
    exclude=(),
    known_worker=None,
    ignore_constraints: bool = False,
    host: str | None = None,
):
    """run-now's plan: the ``forced`` tasks that can start now, whatever their due time (and a
    pause: naming a task is the user's say-so); BLOCKED ones, those running elsewhere, those
    pinned to another host than ``host`` (never run on the wrong host, --ignore-constraints or
    not) and those whose constraints do not hold (unless ``ignore_constraints``) are skipped
    with the reason."""
    from kmpwm.core.hosts import this_host
    from kmpwm.scheduling.plan import Plan, order_key

    out = Plan()
    host = this_host() if host is None else host
    for i in forced:
        t = state["tasks"].get(i)
        if t is None or i in exclude:
            continue
        reason = _not_forcible(t, now, host)
        if reason is None:
            if t["state"] == "RUNNING":
                out.broken.add(i)  # its holder is gone or its lease ended (scheduling.decide)
            reason = _cannot_start(t, device, known_worker, ignore_constraints)
        if reason is None:
            out.due.append(t)
        else:
            out.skipped.append({"id": i, "reason": reason})
    out.due.sort(key=lambda t: (t.get("step") or 0, order_key(t)))
    return out


def _not_forcible(t: dict, now: float, host: str) -> str | None:
    """Why run-now cannot take ``t`` at all: BLOCKED, finished, running, or another host's."""
    from kmpwm.core.hosts import pinned_elsewhere
    from kmpwm.scheduling.leases import lease_state

    st, i = t["state"], t["id"]
    if st == "BLOCKED":
        return "blocked: waiting for an earlier step or task"
    if st in FINISHED:
        return f"finished ({st}); `kmpwm retry {i}` enqueues it again"
    if st == "RUNNING" and lease_state(t, now) == "held":
        return f"running: held by run-due pid {(t['lease'] or {}).get('pid')}"
    why = pinned_elsewhere(t, host)
    return f"{why}: it runs only there" if why else None


def _cannot_start(t: dict, device, known_worker, ignore_constraints: bool) -> str | None:
    """Why run-now cannot start ``t`` here: its worker is gone, or a constraint does not hold."""
    from kmpwm.scheduling.probes import unmet

    if known_worker is not None and not known_worker(t["worker"]):
        return f"unknown worker {t['worker']!r} (not registered any more)"
    reason = None if ignore_constraints else unmet(t["constraints"], device)
    return reason + " (--ignore-constraints runs it anyway)" if reason else None
