"""``kmpwm events``: the history of runs and state changes (the seed's TaskEventBus, kept in the
journal).  Events are what the fold of the journal implies — enqueued, started, ran (with its
status, message, data and duration), succeeded, failed, cancelled, unblocked, kept, released,
runner-lost (a run-due took over a task whose runner was gone: its ``runner``, ``pid`` and ``why``) —
plus the history compaction archived.

:func:`open_events` returns a feed: its ``selected`` events, then, each time it is polled, the
events that came since (the CLI prints them, cli/eventscmd.py).  An event is ``[ts, task id,
kind, detail]``; :func:`event_doc` is its JSON document."""

from __future__ import annotations

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


def open_events(paths: Paths, task: str | None, since) -> JournalEvents | SharedEvents:
    """The events of task ``task`` (an id, its ``ID#n`` or a chain; None: all) newer than
    ``since`` (a duration before now; None: all), from the journal or a shared store."""
    check_all(paths)
    cutoff = time.time() - parse_duration(since, what="--since") if since is not None else None
    from kmpwm.storage.stores import store_url

    if store_url(paths) is not None:
        return SharedEvents(paths, task, cutoff)
    return JournalEvents(paths, task, cutoff)


def _selector(folder: Folder, task: str | None, cutoff: float | None):
    def chain_ids() -> set:
        chain = folder.state["chains"].get(task) if task else None
        return {i for step in chain["steps"] for i in step} if chain else set()

    def wanted(evs):
        ids = chain_ids()
        return [e for e in evs if (cutoff is None or e[0] >= cutoff) and _matches(e, task, ids)]

    return wanted


class JournalEvents:
    """The journal's events; ``damage``: how many damaged regions its scan met (their events are
    missing)."""

    def __init__(self, paths: Paths, task: str | None, cutoff: float | None):
        self.journal = Journal(paths)
        self.folder = Folder()
        scan, self.ino = self.journal.read(0)
        self.folder.feed(scan)
        self.damage = len(scan.damage)
        self.task, self.cutoff = task, cutoff
        self.wanted = _selector(self.folder, task, cutoff)
        self.selected = self.wanted(self.folder.events)
        self.printed = len(self.folder.events)
        self.last_ts = self.folder.events[-1][0] if self.folder.events else 0.0

    def poll(self) -> list:
        """The wanted events that came since the last poll (a compacted journal is folded anew:
        only its events newer than those already seen)."""
        ident = self.journal.identity()
        if ident is None:
            return []
        if ident[0] != self.ino or ident[1] < self.folder.offset:  # compacted: re-derive
            new = self._refold()
        elif ident[1] > self.folder.offset:
            tail, _ = self.journal.read(self.folder.offset)
            self.folder.feed(tail)
            new = self.folder.events[self.printed :]
        else:
            return []
        folder = self.folder
        self.printed = len(folder.events)
        if folder.events:
            self.last_ts = max(self.last_ts, folder.events[-1][0])
        return self.wanted(new)

    def _refold(self) -> list:
        """Fold the compacted journal anew: its events newer than those already seen."""
        self.folder = Folder()
        scan, self.ino = self.journal.read(0)
        self.folder.feed(scan)
        self.wanted = _selector(self.folder, self.task, self.cutoff)  # a chain is looked up in this fold now
        return [e for e in self.folder.events if e[0] > self.last_ts]


class _Rows:
    """Records of a shared store in the shape Folder.feed takes (a journal scan)."""

    def __init__(self, rows: list, after: int):
        self.records = rows
        self.end = rows[-1][0] if rows else after
        self.damage: list = []


class SharedEvents:
    """The events of a shared store: the same fold over its records (storage.pgstore)."""

    damage = 0

    def __init__(self, paths: Paths, task: str | None, cutoff: float | None):
        from kmpwm.storage.stores import open_store

        self.store = open_store(paths)
        self.folder = Folder()
        self.folder.feed(_Rows(list(self.store.records(0)), 0))
        self.wanted = _selector(self.folder, task, cutoff)
        self.selected = self.wanted(self.folder.events)
        self.printed = len(self.folder.events)

    def poll(self) -> list:
        folder = self.folder
        folder.feed(_Rows(list(self.store.records(folder.offset)), folder.offset))
        new = self.wanted(folder.events[self.printed :])
        self.printed = len(folder.events)
        return new
