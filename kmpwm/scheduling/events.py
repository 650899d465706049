"""``kmpwm events``: the history of runs and state changes (the seed's TaskEventBus, kept in the
journal).  Events are what the fold of the journal implies — enqueued, started, ran (with its
status, message, data and duration), succeeded, failed, cancelled, unblocked, kept, released,
runner-lost (a run-due took over a task whose runner was gone: its ``runner``, ``pid`` and ``why``) —
plus the history compaction archived."""

from __future__ import annotations

import sys
import time

from kmpwm.core.state import base_id
from kmpwm.core.timeparse import iso, parse_duration
from kmpwm.storage.compaction import Folder
from kmpwm.storage.journal import Journal
from kmpwm.storage.paths import Paths, check_all


def _matches(ev: list, task: str | None, chain_ids: set) -> bool:
    if task is None:
        return True
    tid = ev[1]
    return tid == task or base_id(tid) == task or tid in chain_ids or ev[3].get("chain") == task


def event_doc(ev: list) -> dict:
    ts, tid, kind, detail = ev
    doc = {"ts": iso(ts), "task": tid, "event": kind}
    doc.update(detail)
    return doc


def _line(ev: list) -> str:
    ts, tid, kind, detail = ev
    bits = []
    if kind == "ran":
        bits.append(f"{detail.get('status')} in {detail.get('duration_ms')}ms")
        if detail.get("message"):
            bits.append(str(detail["message"])[:100])
    else:
        bits += [f"{k}={v}" for k, v in detail.items() if v not in (None, "", {})]
    return f"{iso(ts)}  {tid}  {kind}  {' '.join(bits)}".rstrip()


def events_command(paths: Paths, task: str | None, since, follow: bool, as_json: bool) -> int:
    from kmpwm.cli.output import print_json_line, say

    check_all(paths)
    cutoff = time.time() - parse_duration(since, what="--since") if since is not None else None
    from kmpwm.storage.stores import store_url

    if store_url(paths) is not None:
        return _shared_events(paths, task, cutoff, follow, as_json)
    journal = Journal(paths)
    folder = Folder()
    scan, ino = journal.read(0)
    folder.feed(scan)
    if scan.damage:
        sys.stderr.write(
            f"kmpwm: warning: the journal has {len(scan.damage)} damaged region(s); "
            "events from them are missing; run `kmpwm doctor --repair`\n"
        )

    wanted = _selector(folder, task, cutoff)
    selected = wanted(folder.events)
    if not follow:
        return _print_all(selected, as_json)
    emit = (lambda e: print_json_line(event_doc(e))) if as_json else (lambda e: say(_line(e)))
    for e in selected:
        emit(e)
    sys.stdout.flush()
    printed = len(folder.events)
    last_ts = folder.events[-1][0] if folder.events else 0.0
    try:
        while True:
            time.sleep(0.3)
            ident = journal.identity()
            if ident is None:
                continue
            if ident[0] != ino or ident[1] < folder.offset:  # compacted: re-derive, print only newer events
                folder = Folder()
                scan, ino = journal.read(0)
                folder.feed(scan)
                new = [e for e in folder.events if e[0] > last_ts]
            elif ident[1] > folder.offset:
                tail, _ = journal.read(folder.offset)
                folder.feed(tail)
                new = folder.events[printed:]
            else:
                continue
            for e in wanted(new):
                emit(e)
            sys.stdout.flush()
            printed = len(folder.events)
            if folder.events:
                last_ts = max(last_ts, folder.events[-1][0])
    except KeyboardInterrupt:
        return 130  # interrupted by SIGINT, like any Unix tool (and inspect-queue --watch)


def _selector(folder: Folder, task: str | None, cutoff: float | None):
    def chain_ids() -> set:
        chain = folder.state["chains"].get(task) if task else None
        return {i for step in chain["steps"] for i in step} if chain else set()

    def wanted(evs):
        ids = chain_ids()
        return [e for e in evs if (cutoff is None or e[0] >= cutoff) and _matches(e, task, ids)]

    return wanted


def _print_all(selected: list, as_json: bool) -> int:
    from kmpwm.cli.output import print_json, say

    if as_json:
        print_json({"events": [event_doc(e) for e in selected]})
    elif selected:
        for e in selected:
            say(_line(e))
    else:
        say("no events")
    return 0


class _Rows:
    """Records of a shared store in the shape Folder.feed takes (a journal scan)."""

    def __init__(self, rows: list, after: int):
        self.records = rows
        self.end = rows[-1][0] if rows else after
        self.damage: list = []


def _shared_events(paths: Paths, task: str | None, cutoff: float | None, follow: bool, as_json: bool) -> int:
    """``events`` of a shared store: the same fold over its records (storage.pgstore)."""
    from kmpwm.cli.output import print_json_line, say
    from kmpwm.storage.stores import open_store

    store = open_store(paths)
    folder = Folder()
    folder.feed(_Rows(list(store.records(0)), 0))
    wanted = _selector(folder, task, cutoff)
    if not follow:
        return _print_all(wanted(folder.events), as_json)
    emit = (lambda e: print_json_line(event_doc(e))) if as_json else (lambda e: say(_line(e)))
    printed = 0
    try:
        while True:
            for e in wanted(folder.events[printed:]):
                emit(e)
            sys.stdout.flush()
            printed = len(folder.events)
            time.sleep(0.3)
            folder.feed(_Rows(list(store.records(folder.offset)), folder.offset))
    except KeyboardInterrupt:
        return 130
