"""``kmpwm run-due`` as a command: parse its options, run (runner.py), report.

Cron starts it every minute and almost every time nothing is due, so that case is decided from
the hot state alone, before the runner and its device probes, worker registry and process
machinery are even imported.
"""

from __future__ import annotations

import os
import sys
import time

from kmpwm.core.exitcodes import KmpwmError
from kmpwm.core.hosts import pinned_elsewhere, this_host
from kmpwm.core.state import due_at, idle_at
from kmpwm.core.timeparse import parse_duration
from kmpwm.storage.paths import Paths, private_subdir
from kmpwm.storage.store import Store
from kmpwm.storage.stores import open_store


def _idle(store: Store, skipped: list) -> bool:
    """Nothing to run, release, fail or re-check at this moment (and a healthy journal).  Due
    tasks pinned to another host (``--host``) never run here: they go to ``skipped`` with the
    reason scheduling.plan gives, as when a plan is made."""
    if store.idle_without_loading(time.time()):
        return True
    view = store.load(full=False)
    store.verify_covered(view)
    now = time.time()
    host = this_host()
    if view.damage or not idle_at(view.state, now, host):
        return False
    for t in view.state["tasks"].values():
        if t["state"] == "ENQUEUED" and t.get("host") not in (None, host) and due_at(t, now) <= now:
            skipped.append({"id": t["id"], "reason": pinned_elsewhere(t, host)})
    return True


def run_due_command(paths: Paths, *, budget, grace, parallel, max_tasks, dry_run, as_json) -> int:
    from kmpwm.cli.output import is_tty, print_json

    budget_s = parse_duration(budget, what="budget") if budget is not None else None
    grace_s = parse_duration(grace, what="grace") if grace is not None else None
    live = not as_json and is_tty()
    store = open_store(paths)
    skipped: list = []
    if not dry_run and _idle(store, skipped):
        code, doc, expire_reason, failed = 0, {"ran": [], "expired": [], "skipped": skipped}, None, []
    else:
        from kmpwm.core.models import DEFAULT_GRACE
        from kmpwm.running.runner import Runner

        grace_s = DEFAULT_GRACE if grace_s is None else grace_s
        progress = _Progress() if live else None
        runner = Runner(
            paths,
            budget=budget_s,
            grace=grace_s,
            parallel=parallel,
            max_tasks=max_tasks,
            dry_run=dry_run,
            on_event=progress.event if progress else None,
            store=store,
            warn=warn,
        )
        code = runner.run()
        doc, expire_reason, failed = runner.report.doc(), runner.expire_reason, runner.report.failed
        if runner.disk_full:
            done = (
                "every result of this run was recorded, no more work was started"
                if doc["ran"]
                else "no work was started"
            )
            sys.stderr.write(f"kmpwm: the disk holding the journal is full: {done}; free space, then run again\n")
            code = code or 74
        runner = None  # its state may be large (a first fold of a long journal): free it before
    store = None  # the automatic compaction below folds the journal again
    if not dry_run:
        _mark_last_run(paths)
        from kmpwm.storage.compaction import auto_compact, needs_compaction

        if needs_compaction(paths):
            import gc

            gc.collect()  # the run's state, freed above, may sit in reference cycles
            auto_compact(paths)
    if as_json:
        print_json(doc)
    elif live or dry_run:
        _summary(doc, dry_run, failed)
    else:
        _failures(doc, failed)
    if code == 75 and not as_json:
        sys.stderr.write(
            f"kmpwm: the run expired ({expire_reason}); {len(doc['expired'])} task(s) savepointed and released\n"
        )
    return code


def _failures(doc: dict, failed: list) -> None:
    """SPEC section 10, failures are never silent: off a terminal, one line on stderr for every
    task that ended FAILED in this run (whatever the cause) and for every failed or expired run."""
    from kmpwm.cli.output import printable

    lines = []
    ended = {f["id"]: f for f in failed}
    for row in doc["ran"]:
        f = ended.pop(row["id"], None)
        if f is not None:
            lines.append(f"kmpwm: {row['id']} ({row['worker']}) failed: {f['reason'] or row['message']}")
        elif row["status"] == "FAILURE":
            lines.append(f"kmpwm: {row['id']} ({row['worker']}) failed: {row['message']}")
        elif row["status"] == "EXPIRED":
            lines.append(f"kmpwm: {row['id']} ({row['worker']}) expired: {row['message']}")
    for s in doc["skipped"]:  # --misfire-grace: an occurrence that did not run is never silent
        if s["reason"].startswith("missed:"):
            ended.pop(s["id"], None)  # a one-time task's "FAILED (missed)" is in this line already
            lines.append(f"kmpwm: {s['id']} {s['reason']}")
    for f in ended.values():  # ended FAILED without a run of its own: window missed, upstream failed, ...
        lines.append(f"kmpwm: {f['id']} ({f['worker']}) failed: {f['reason']}")
    for line in lines:
        sys.stderr.write(printable(line) + "\n")


def warn(text: str) -> None:
    """A runner's warning (Runner's ``warn``), as it happens: on stderr."""
    sys.stderr.write(f"kmpwm: {text}\n")
    sys.stderr.flush()


def _mark_last_run(paths: Paths) -> None:
    """Touch ``runners/last-run`` so that doctor and ``schedule status`` can say when run-due last ran."""
    try:
        path = private_subdir(paths.runners_dir) / "last-run"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        os.close(fd)
        os.utime(path)
    except (OSError, KmpwmError):
        pass


class _Progress:
    """One line per task as it starts and ends, on a terminal."""

    def event(self, kind: str, payload) -> None:
        from kmpwm.cli.output import printable  # ids, worker names and messages are the user's: escaped

        if kind == "start":
            sys.stdout.write(printable(f"  started  {payload.id} ({payload.task['worker']})") + "\n")
        elif kind == "done":
            job, row = payload
            mark = {"SUCCESS": "ok", "FAILURE": "FAILED", "RETRY": "retry", "EXPIRED": "expired"}[row["status"]]
            msg = f": {row['message']}" if row["message"] and row["status"] != "SUCCESS" else ""
            sys.stdout.write(printable(f"  {mark:<8} {row['id']} in {row['duration_ms']}ms{msg}") + "\n")
        elif kind == "expiring" and not payload.cancelled:
            sys.stdout.write(printable(f"  stopping {payload.id} (told to expire)") + "\n")
        elif kind == "cancelling":
            sys.stdout.write(printable(f"  stopping {payload.id} (cancelled)") + "\n")
        sys.stdout.flush()


def _summary(doc: dict, dry_run: bool, failed: list = ()) -> None:
    from kmpwm.cli.output import say, table

    if dry_run:
        if doc["ran"]:
            table(["WOULD RUN", "WORKER"], [[r["id"], r["worker"]] for r in doc["ran"]])
        else:
            say("nothing is due")
    elif doc["ran"]:
        table(
            ["ID", "WORKER", "STATUS", "TIME", "MESSAGE"],
            [
                [r["id"], r["worker"], r["status"], f"{r['duration_ms']}ms", (r["message"] or "")[:60]]
                for r in doc["ran"]
            ],
            style_column=2,
        )
    else:
        say("nothing was due")
    for s in doc["skipped"]:
        say(f"skipped {s['id']}: {s['reason']}")
    ran = {r["id"] for r in doc["ran"]}
    for f in failed:
        if f["id"] not in ran:
            say(f"failed {f['id']}: {f['reason']}")
