"""Steering your work (SPEC section 11): pause, resume, retry, wait and run-now.

The journal ops (``pause``, ``resume``, ``retry``) and their meaning live in state.py; the due
decision for paused tasks in scheduling.plan (via state.pause_of).  This module builds the ops
under the lock, waits for tasks without the lock, and shapes the commands' output.
"""

from __future__ import annotations

import os
import time

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
    op = {"op": "pause", "by": by or who()}
    if all_:
        op["all"] = True
    elif tag is not None:
        op["tag"] = tag
    else:
        op["ids"] = list(ids)
    if until is not None:
        op["until"] = until
    with store.transaction() as txn:
        if not all_ and not steer_targets(txn.state, op, UNFINISHED):
            return []  # nothing to pause: no journal growth
        return txn.commit([op])[0]


def resume(store, ids=(), tag=None, all_=False, by=None) -> list[str]:
    op = {"op": "resume", "by": by or who()}
    if all_:
        op["all"] = True
    elif tag is not None:
        op["tag"] = tag
    else:
        op["ids"] = list(ids)
    with store.transaction() as txn:
        state = txn.state
        if all_:
            if state.get("qpause") is None and not any(t.get("paused") for t in state["tasks"].values()):
                return []
        elif not any(state["tasks"][i].get("paused") for i in steer_targets(state, op, UNFINISHED)):
            return []
        return txn.commit([op])[0]


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
    if failed:
        picked = [i for i, t in full["tasks"].items() if t["state"] == "FAILED"]
        picked.sort(key=lambda i: full["tasks"][i]["seq"])
    else:
        sel = {"tag": tag} if tag is not None else {"ids": list(ids)}
        picked = steer_targets(full, sel, FINISHED - {"SUCCEEDED"})
    if not picked:
        return None
    carry: dict[str, dict] = {}
    chains: dict[str, dict] = {}
    for i in picked:
        t = full["tasks"][i]
        chain = full["chains"].get(t.get("chain_id")) if t.get("chain_id") else None
        if chain is not None:
            if chain["id"] not in hot["chains"]:
                chains[chain["id"]] = chain
            for m in members(full, chain):
                if m["id"] not in hot["tasks"]:
                    carry[m["id"]] = m
        if i not in hot["tasks"]:
            carry[i] = t
    op = {"op": "retry", "ids": picked, "by": by}
    if carry:
        op["tasks"] = [pack_task(t) for t in sorted(carry.values(), key=lambda t: t["seq"])]
    if chains:
        op["chains"] = list(chains.values())
    return op


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
    if tag is not None:
        return steer_targets(state, {"tag": tag}, UNFINISHED | FINISHED)
    return steer_targets(state, {"ids": list(ids)}, UNFINISHED | FINISHED)


def _repeating(t: dict) -> bool:
    from kmpwm.core.triggers import REPEATING

    return t["trigger"]["type"] in REPEATING


def wait(store, ids=(), tag=None, timeout: float | None = None) -> WaitResult:
    """Block until every matching task is finished (a repeating task: until a run of it that
    ends an occurrence finishes after the call began).  No lock is taken: the state is read
    lock-free, incrementally, each time the journal changes (inotify when ``inotify_simple`` is
    installed, else a bounded stat poll)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    # armed before the first read: no change slips between (a shared store: its notifications)
    watcher = _StoreWatcher(store.watch()) if hasattr(store, "watch") else _Watcher(store.paths.journal_dir)
    try:
        state = store.load(full=True).state
        wanted = _matching(state, ids, tag)
        if not wanted:
            what = f"tag {tag!r}" if tag is not None else ", ".join(repr(i) for i in ids)
            raise InvalidParams(f"no task matches {what}", hint="`kmpwm inspect-queue --all` lists them")
        repeating = {i for i in wanted if _repeating(state["tasks"][i])}
        # a repeating task's run in progress began before wait did: the next one counts
        base = {
            i: state["tasks"][i]["attempts"] + (state["tasks"][i]["state"] == "RUNNING" and i in repeating)
            for i in wanted
        }
        while True:
            tasks = state["tasks"]
            done, bad = [], False
            for i in wanted:
                t = tasks.get(i)
                if t is None:
                    continue  # gone (compacted away long after it finished): counts as done
                if t["state"] in FINISHED:
                    done.append(i)
                    bad = bad or t["state"] != "SUCCEEDED"
                elif (
                    i in repeating and t["attempts"] > base[i] and not t.get("occ_attempts") and t["state"] != "RUNNING"
                ):
                    done.append(i)  # an occurrence ended after wait began
                    bad = bad or (t.get("last_result") or {}).get("status") != "SUCCESS"
            docs = [
                {"id": i, "state": tasks[i]["state"], "last_result": tasks[i]["last_result"]}
                for i in wanted
                if i in tasks
            ]
            if len(done) == len(wanted):
                return WaitResult(docs, False, 1 if bad else 0)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return WaitResult(docs, True, EXIT_TIMED_OUT)
            watcher.wait(left)
            state = store.load(full=True).state
    finally:
        watcher.close()


class _StoreWatcher:
    """Sleeps until a shared store notifies a change (storage.pgstore.PgWatch), at most 1 s."""

    def __init__(self, watch):
        self._watch = watch

    def wait(self, left: float | None) -> None:
        import select

        limit = 1.0 if left is None else max(0.0, min(left, 1.0))
        ready, _, _ = select.select([self._watch.fd], [], [], limit)
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
            # a bounded wait even so: a change missed between the read and the watch costs 1 s at most
            limit = 1.0 if left is None else max(0.0, min(left, 1.0))
            self._ino.read(timeout=int(limit * 1000))
            return
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
    from kmpwm.scheduling.plan import Plan, lease_state, order_key, pinned_elsewhere
    from kmpwm.scheduling.probes import unmet

    out = Plan()
    tasks = state["tasks"]
    if host is None:
        host = this_host()
    for i in forced:
        t = tasks.get(i)
        if t is None or i in exclude:
            continue
        st = t["state"]
        if st == "BLOCKED":
            out.skipped.append({"id": i, "reason": "blocked: waiting for an earlier step or task"})
            continue
        if st in FINISHED:
            out.skipped.append({"id": i, "reason": f"finished ({st}); `kmpwm retry {i}` enqueues it again"})
            continue
        if st == "RUNNING":
            ls = lease_state(t, now)
            if ls == "held":
                out.skipped.append({"id": i, "reason": f"running: held by run-due pid {(t['lease'] or {}).get('pid')}"})
                continue
        why = pinned_elsewhere(t, host)
        if why:
            out.skipped.append({"id": i, "reason": f"{why}: it runs only there"})
            continue
        if st == "RUNNING":
            out.broken.add(i)  # its holder is gone or its lease ended (plan.plan)
        if known_worker is not None and not known_worker(t["worker"]):
            out.skipped.append({"id": i, "reason": f"unknown worker {t['worker']!r} (not registered any more)"})
            continue
        reason = None if ignore_constraints else unmet(t["constraints"], device)
        if reason:
            out.skipped.append({"id": i, "reason": reason + " (--ignore-constraints runs it anyway)"})
            continue
        out.due.append(t)
    out.due.sort(key=lambda t: (t.get("step") or 0, order_key(t)))
    return out


# -- the commands ---------------------------------------------------------------------------


def _ids_or_tag(ids, tag, all_) -> str:
    return "the queue" if all_ else (f"tag {tag!r}" if tag is not None else ", ".join(ids))


def pause_command(paths, ids, tag, all_, until, as_json) -> int:
    from kmpwm.cli.output import print_json, say
    from kmpwm.core.timeparse import iso, parse_time
    from kmpwm.storage.stores import open_store

    until_ts = parse_time(until, what="--until") if until is not None else None
    if until_ts is not None and until_ts <= time.time():
        raise InvalidParams(f"invalid --until {until!r}: the time has passed")
    done = pause(open_store(paths), ids, tag, all_, until_ts)
    if as_json:
        print_json({"paused": done})
        return 0
    when = f" until {iso(until_ts)}" if until_ts is not None else ""
    if all_:
        say(f"paused the queue{when}: nothing starts until `kmpwm resume --all`")
    elif done:
        say(f"paused {len(done)} task(s){when}: {', '.join(done)}")
    else:
        say(f"nothing to pause ({_ids_or_tag(ids, tag, all_)}: no unfinished task)")
    return 0


def resume_command(paths, ids, tag, all_, as_json) -> int:
    from kmpwm.cli.output import print_json, say
    from kmpwm.storage.stores import open_store

    done = resume(open_store(paths), ids, tag, all_)
    if as_json:
        print_json({"resumed": done})
        return 0
    if all_:
        say("resumed the queue" + (f" and {len(done)} paused task(s): {', '.join(done)}" if done else ""))
    elif done:
        say(f"resumed {len(done)} task(s): {', '.join(done)}")
    else:
        say(f"nothing to resume ({_ids_or_tag(ids, tag, all_)}: nothing paused)")
    return 0


def retry_command(paths, ids, failed, tag, as_json) -> int:
    from kmpwm.cli.output import print_json, say
    from kmpwm.storage.stores import open_store

    done = retry(open_store(paths), ids, failed, tag)
    if as_json:
        print_json({"retried": done})
    elif done:
        say(f"retried {len(done)} task(s): {', '.join(done)}")
    else:
        say("nothing to retry (no FAILED or CANCELLED task matches)")
    return 0


def wait_command(paths, ids, tag, timeout, as_json) -> int:
    import sys

    from kmpwm.cli.output import print_json, say
    from kmpwm.core.timeparse import parse_duration
    from kmpwm.storage.stores import open_store

    timeout_s = parse_duration(timeout, what="--timeout") if timeout is not None else None
    res = wait(open_store(paths), ids, tag, timeout_s)
    if as_json:
        print_json(res.doc())
    else:
        for t in res.tasks:
            lr = t["last_result"] or {}
            msg = f" ({lr.get('status')}: {lr['message']})" if lr.get("message") else ""
            say(f"{t['id']}: {t['state']}{msg}")
    if res.timed_out:
        sys.stderr.write(f"kmpwm: timed out after {timeout}; not every task has finished\n")
    return res.exit_code


def run_now(paths, ids, ignore_constraints=False, grace=None, on_event=None):
    """Run the named tasks (a chain id: its steps in order) now in this process; returns the
    run-due report document and the exit code (run-due's, or 1 when a task did not run or a run
    did not succeed)."""
    from kmpwm.core.models import DEFAULT_GRACE
    from kmpwm.running.runner import Runner
    from kmpwm.storage.stores import open_store

    store = open_store(paths)
    state = store.load(full=True).state
    forced = expand_ids(state, ids)
    if not forced:
        raise InvalidParams(
            f"no task matches {', '.join(repr(i) for i in ids)}", hint="`kmpwm inspect-queue --all` lists them"
        )
    named = {i for i in forced if i in ids or i.split("#", 1)[0] in ids}
    before = {i: state["tasks"][i]["state"] for i in forced}
    state = None
    runner = Runner(
        paths,
        grace=DEFAULT_GRACE if grace is None else grace,
        parallel=None,
        store=store,
        forced=forced,
        ignore_constraints=ignore_constraints,
        on_event=on_event,
    )
    code = runner.run()
    doc = runner.report.doc()
    ran = {r["id"] for r in doc["ran"]}
    # a chain's tasks that ran once their step came, or that its failure ended, are no skips
    # a chain's later tasks (named through the chain id) wait for their step or end with it: no skips
    doc["skipped"] = [
        s
        for s in doc["skipped"]
        if s["id"] not in ran
        and (s["id"] in named or (before[s["id"]] != "BLOCKED" and not s["reason"].startswith("finished")))
    ]
    if code == 0 and (doc["skipped"] or any(r["status"] != "SUCCESS" for r in doc["ran"])):
        code = 1
    return doc, code, runner.expire_reason


def run_now_command(paths, ids, ignore_constraints, grace, as_json) -> int:
    import sys

    from kmpwm.cli.output import is_tty, print_json, printable
    from kmpwm.cli.rundue import _Progress, _summary
    from kmpwm.core.timeparse import parse_duration

    grace_s = parse_duration(grace, what="--grace") if grace is not None else None
    live = not as_json and is_tty()
    doc, code, why = run_now(paths, ids, ignore_constraints, grace_s, on_event=_Progress().event if live else None)
    if as_json:
        print_json(doc)
    else:
        _summary(doc, False)
        if not live:
            for row in doc["ran"]:
                if row["status"] != "SUCCESS":
                    sys.stderr.write(
                        printable(f"kmpwm: {row['id']} ({row['worker']}): {row['status']}: {row['message']}") + "\n"
                    )
    if code == 75:
        sys.stderr.write(f"kmpwm: the run expired ({why})\n")
    return code
