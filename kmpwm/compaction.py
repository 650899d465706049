"""Compaction: rewrite the journal atomically, keeping every live task, chain and savepoint,
finished work and event history within the retention window (default 7 days).

The old records are read in two phases so that enqueuers are not blocked for long: everything up
to the current end is folded without the lock; then, under the lock, only the records appended
meanwhile are folded before the new generation replaces the file (temp file, fsync, rename,
directory fsync).  A crash at any point leaves either the old journal or the new one.
"""

from __future__ import annotations

import time

from .exitcodes import JournalError
from .journal import Journal, encode
from .paths import Paths, check_all
from .state import apply, new_state, pack_task

RETENTION = 7 * 86400.0
EVENTS_PER_RECORD = 1000
OPS_PER_RECORD = 500
AUTO_MIN_BYTES = 1 << 20


class Folder:
    """Fold records while collecting the events they imply (archived events pass through)."""

    def __init__(self):
        self.state = new_state()
        self.events: list[list] = []
        self.offset = 0
        self.records = 0

    def emit(self, ts, task_id, kind, detail):
        self.events.append([ts, task_id, kind, detail])

    def feed(self, scan) -> None:
        for _, record in scan.records:
            self.records += 1
            if record.get("arc"):
                self.events.extend(record.get("ev", ()))
            else:
                apply(self.state, record, self.emit)
        self.offset = scan.end


def keep_sets(state: dict, cutoff: float) -> tuple[dict, dict]:
    tasks, chains = state["tasks"], state["chains"]
    keep_chains = {}
    for cid, chain in chains.items():
        members = [tasks[i] for step in chain["steps"] for i in step if i in tasks]
        live = any(t["finished_at"] is None for t in members)
        recent = any((t["finished_at"] or 0) >= cutoff for t in members) or chain.get("created_at", 0) >= cutoff
        if live or recent:
            keep_chains[cid] = chain
    keep_tasks = {}
    for tid, t in tasks.items():
        if t["finished_at"] is None or t["finished_at"] >= cutoff or t.get("chain_id") in keep_chains:
            keep_tasks[tid] = t
    return keep_tasks, keep_chains


def compact(paths: Paths, *, retention: float = RETENTION, now: float | None = None) -> dict:
    check_all(paths)
    journal = Journal(paths)
    now = time.time() if now is None else now
    before = journal.identity()
    if before is None:
        return {"compacted": False, "reason": "no journal yet", "bytes_before": 0, "bytes_after": 0}
    folder = Folder()
    scan, ino = journal.read(0)
    if scan.damage:
        raise JournalError(f"cannot compact: the journal has damaged records ({scan.damage[0].describe()})",
                           hint="run `kmpwm doctor --repair` first")
    folder.feed(scan)
    with journal.locked():
        journal.sweep_temp_files()
        tail, ino2 = journal.read(folder.offset)
        if ino2 != ino:  # someone else rewrote it meanwhile: start over under the lock
            folder = Folder()
            tail, ino2 = journal.read(0)
        if tail.damage:
            raise JournalError("cannot compact: the journal has damaged records", hint="run `kmpwm doctor --repair` first")
        folder.feed(tail)
        cutoff = now - retention
        tasks, chains = keep_sets(folder.state, cutoff)
        events = [e for e in folder.events if e[0] >= cutoff]
        records: list[dict] = []
        for i in range(0, len(events), EVENTS_PER_RECORD):
            chunk = events[i:i + EVENTS_PER_RECORD]
            records.append({"ts": chunk[-1][0], "arc": True, "ev": chunk})
        ops = [{"op": "put", "task": pack_task(t)} for t in sorted(tasks.values(), key=lambda t: t["seq"])]
        ops += [{"op": "put", "chain": c} for c in chains.values()]
        ops.append({"op": "meta", "seq": folder.state["seq"], "fam": folder.state["fam"]})
        for i in range(0, len(ops), OPS_PER_RECORD):
            records.append({"ts": now, "ops": ops[i:i + OPS_PER_RECORD]})
        size = sum(len(encode(r)) for r in records)
        journal.rewrite(records, compacted_size=size)
        from .store import Store

        store = Store(paths, journal)
        store.drop_snapshot()
        store.write_snapshot(store.load(full=False))
    after = journal.identity()
    return {
        "compacted": True,
        "bytes_before": before[1] if before else 0,
        "bytes_after": after[1] if after else 0,
        "records_before": folder.records,
        "tasks_kept": len(tasks),
        "tasks_dropped": len(folder.state["tasks"]) - len(tasks),
        "chains_kept": len(chains),
        "events_kept": len(events),
        "retention_days": retention / 86400,
    }


def needs_compaction(paths: Paths) -> bool:
    """Automatic compaction once the journal is over twice its compacted size (and 1 MiB)."""
    journal = Journal(paths)
    ident = journal.identity()
    if ident is None or ident[1] < AUTO_MIN_BYTES:
        return False
    header = journal.header() or {}
    base = header.get("compacted_size", 0)
    return ident[1] > 2 * base + AUTO_MIN_BYTES


def compact_command(paths: Paths, as_json: bool) -> int:
    from .output import print_json, say

    stats = compact(paths)
    if as_json:
        print_json(stats)
    elif stats["compacted"]:
        say(f"compacted: {stats['bytes_before']} -> {stats['bytes_after']} bytes; kept {stats['tasks_kept']} task(s), "
            f"{stats['chains_kept']} chain(s), {stats['events_kept']} event(s); dropped {stats['tasks_dropped']} "
            f"finished task(s) older than {stats['retention_days']:g} days")
    else:
        say(f"nothing to compact ({stats['reason']})")
    return 0


def auto_compact(paths: Paths) -> None:
    """Best effort after run-due: never fails the run (errors go to the log)."""
    try:
        if needs_compaction(paths):
            compact(paths)
    except Exception as exc:
        from .logs import logger

        logger(paths).warning("automatic compaction skipped: %s", exc)
