"""``kmpwm run-due`` as a command: parse its options, run (runner.py), report.

Cron starts it every minute and almost every time nothing is due, so that case is decided from
the hot state alone, before the runner and its device probes, worker registry and process
machinery are even imported.
"""

from __future__ import annotations

import os
import sys
import time
from typing import NamedTuple

from kmpwm.cli.options import duration_or_none
from kmpwm.core.exitcodes import KmpwmError
from kmpwm.core.hosts import pinned_elsewhere, this_host
from kmpwm.core.state import due_at, idle_at
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
    skipped += _pinned_elsewhere(view.state, now, host)
    return True


def _pinned_elsewhere(state: dict, now: float, host: str) -> list[dict]:
    """The due tasks that only another host runs, each with the reason."""
    return [
        {"id": t["id"], "reason": pinned_elsewhere(t, host)}
        for t in state["tasks"].values()
        if t["state"] == "ENQUEUED" and t.get("host") not in (None, host) and due_at(t, now) <= now
    ]


def run_due_command(paths: Paths, *, budget, grace, parallel, max_tasks, dry_run, as_json) -> int:
    from kmpwm.cli.output import is_tty

    budget_s = duration_or_none(budget, "budget")
    grace_s = duration_or_none(grace, "grace")
    live = not as_json and is_tty()
    store = open_store(paths)
    skipped: list = []
    if not dry_run and _idle(store, skipped):
        run = _Run(0, {"ran": [], "expired": [], "skipped": skipped}, None, [])
    else:
        options = {"budget": budget_s, "grace": grace_s, "parallel": parallel, "max_tasks": max_tasks}
        run = _run(paths, store, options, dry_run=dry_run, live=live)  # the runner is freed on return
    store = None  # the automatic compaction below folds the journal again
    if not dry_run:
        _mark_last_run(paths)
        _compact_if_needed(paths)
    _report(run, as_json=as_json, live=live, dry_run=dry_run)
    return run.code


class _Run(NamedTuple):
    """What a run-due leaves to report: its exit code, its document, why it expired (if it did)
    and the tasks that ended FAILED in it."""

    code: int
    doc: dict
    expire_reason: str | None
    failed: list


def _run(paths: Paths, store: Store, options: dict, *, dry_run: bool, live: bool) -> _Run:
    """Run what is due with a Runner (its state, maybe large, is freed when this returns)."""
    from kmpwm.core.models import DEFAULT_GRACE
    from kmpwm.running.runner import Runner

    grace = DEFAULT_GRACE if options["grace"] is None else options["grace"]
    runner = Runner(
        paths,
        budget=options["budget"],
        grace=grace,
        parallel=options["parallel"],
        max_tasks=options["max_tasks"],
        dry_run=dry_run,
        on_event=_progress if live else None,
        store=store,
        warn=warn,
    )
    code = runner.run()
    doc = runner.report.doc()
    if runner.disk_full:
        _warn_disk_full(doc)
        code = code or 74
    return _Run(code, doc, runner.expire_reason, runner.report.failed)


def _warn_disk_full(doc: dict) -> None:
    done = "every result of this run was recorded, no more work was started" if doc["ran"] else "no work was started"
    sys.stderr.write(f"kmpwm: the disk holding the journal is full: {done}; free space, then run again\n")


def _compact_if_needed(paths: Paths) -> None:
    from kmpwm.storage.compaction import auto_compact, needs_compaction

    if needs_compaction(paths):
        import gc

        gc.collect()  # the run's state, freed by now, may sit in reference cycles
        auto_compact(paths)


def _report(run: _Run, *, as_json: bool, live: bool, dry_run: bool) -> None:
    """The document under ``--json``; a summary on a terminal or for ``--dry-run``; else only the failures."""
    if as_json:
        from kmpwm.cli.output import print_json

        print_json(run.doc)
        return
    if live or dry_run:
        _summary(run.doc, dry_run, run.failed)
    else:
        _failures(run.doc, run.failed)
    if run.code == 75:
        expired = len(run.doc["expired"])
        sys.stderr.write(f"kmpwm: the run expired ({run.expire_reason}); {expired} task(s) savepointed and released\n")


def _failures(doc: dict, failed: list) -> None:
    """SPEC section 10, failures are never silent: off a terminal, one line on stderr for every
    task that ended FAILED in this run (whatever the cause) and for every failed or expired run."""
    from kmpwm.cli.output import printable

    ended = {f["id"]: f for f in failed}
    lines = []
    for row in doc["ran"]:
        lines.append(_ran_line(row, ended.pop(row["id"], None)))
    lines += _missed_lines(doc["skipped"], ended)
    for f in ended.values():  # ended FAILED without a run of its own: window missed, upstream failed, ...
        lines.append(f"kmpwm: {f['id']} ({f['worker']}) failed: {f['reason']}")
    for line in filter(None, lines):
        sys.stderr.write(printable(line) + "\n")


def _missed_lines(skipped: list, ended: dict) -> list[str]:
    """--misfire-grace: a line for every occurrence that did not run (never silent); a one-time
    task's "FAILED (missed)" is in it already, so it leaves ``ended``."""
    lines = []
    for s in skipped:
        if s["reason"].startswith("missed:"):
            ended.pop(s["id"], None)
            lines.append(f"kmpwm: {s['id']} {s['reason']}")
    return lines


_RAN_VERBS = {"FAILURE": "failed", "EXPIRED": "expired"}


def _ran_line(row: dict, ended: dict | None) -> str | None:
    """The line for a task that ran and ended FAILED (``ended``), or whose run failed or expired;
    None for the others."""
    if ended is not None:
        return f"kmpwm: {row['id']} ({row['worker']}) failed: {ended['reason'] or row['message']}"
    verb = _RAN_VERBS.get(row["status"])
    if verb is None:
        return None
    return f"kmpwm: {row['id']} ({row['worker']}) {verb}: {row['message']}"


def warn(text: str) -> None:
    """A runner's warning (Runner's ``warn``), as it happens: on stderr."""
    from kmpwm.cli.output import printable

    sys.stderr.write(f"kmpwm: {printable(text)}\n")  # it may name a task id
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


def _progress(kind: str, payload) -> None:
    """One line per task as it starts and ends, on a terminal (a Runner's ``on_event``)."""
    from kmpwm.cli.output import printable  # ids, worker names and messages are the user's: escaped

    line = _PROGRESS_LINES[kind](payload) if kind in _PROGRESS_LINES else None
    if line is not None:
        sys.stdout.write(printable(line) + "\n")
    sys.stdout.flush()


def _started_line(job) -> str:
    return f"  started  {job.id} ({job.task['worker']})"


def _ended_line(payload) -> str:
    _job, row = payload
    mark = {"SUCCESS": "ok", "FAILURE": "FAILED", "RETRY": "retry", "EXPIRED": "expired"}[row["status"]]
    msg = f": {row['message']}" if row["message"] and row["status"] != "SUCCESS" else ""
    return f"  {mark:<8} {row['id']} in {row['duration_ms']}ms{msg}"


def _expiring_line(job) -> str | None:
    return None if job.cancelled else f"  stopping {job.id} (told to expire)"


def _cancelling_line(job) -> str:
    return f"  stopping {job.id} (cancelled)"


_PROGRESS_LINES = {
    "start": _started_line,
    "done": _ended_line,
    "expiring": _expiring_line,
    "cancelling": _cancelling_line,
}


def _summary(doc: dict, dry_run: bool, failed: list = ()) -> None:
    from kmpwm.cli.output import say

    _say_ran(doc["ran"], dry_run)
    for s in doc["skipped"]:
        say(f"skipped {s['id']}: {s['reason']}")
    ran = {r["id"] for r in doc["ran"]}
    for f in failed:
        if f["id"] not in ran:
            say(f"failed {f['id']}: {f['reason']}")


def _say_ran(ran: list, dry_run: bool) -> None:
    """The tasks that ran (or with ``dry_run``, would run), as a table."""
    from kmpwm.cli.output import say, table

    if not ran:
        say("nothing is due" if dry_run else "nothing was due")
    elif dry_run:
        table(["WOULD RUN", "WORKER"], [[r["id"], r["worker"]] for r in ran])
    else:
        table(["ID", "WORKER", "STATUS", "TIME", "MESSAGE"], [_ran_row(r) for r in ran], style_column=2)


def _ran_row(r: dict) -> list:
    return [r["id"], r["worker"], r["status"], f"{r['duration_ms']}ms", (r["message"] or "")[:60]]
