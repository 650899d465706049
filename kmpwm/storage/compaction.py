"""Compaction: rewrite the journal atomically, keeping every live task, chain and savepoint,
finished work and event history within the retention window (default 7 days).

The old records are read in two phases so that enqueuers are not blocked for long: everything up
to the current end is folded without the lock; then, under the lock, only the records appended
meanwhile are folded before the new generation replaces the file (temp file, fsync, rename,
directory fsync).  A crash at any point leaves either the old journal or the new one.
"""

from __future__ import annotations

import time

from kmpwm.core import schema
from kmpwm.core.exitcodes import JournalError
from kmpwm.core.state import apply, members, new_state, pack_task
from kmpwm.storage.journal import Journal, encode
from kmpwm.storage.paths import Paths, check_all
from kmpwm.storage.store import _no_gc

RETENTION = 7 * 86400.0
EVENTS_PER_RECORD = 1000
OPS_PER_RECORD = 500
AUTO_MIN_BYTES = 1 << 20


class Folder:
    """Fold records while collecting the events they imply (archived events pass through); events
    older than ``cutoff`` are dropped as they come, so a long history never piles up in memory."""

    def __init__(self, cutoff: float = float("-inf")):
        self.state = new_state()
        self.events: list[list] = []
        self.offset = 0
        self.records = 0
        self.cutoff = cutoff

    def emit(self, ts, task_id, kind, detail):
        if ts >= self.cutoff:
            self.events.append([ts, task_id, kind, detail])

    def feed(self, scan) -> None:
        cutoff = self.cutoff
        for _, record in scan.records:
            self.records += 1
            if record.get("arc"):
                self.events.extend(e for e in record.get("ev", ()) if e[0] >= cutoff)
            else:
                apply(self.state, record, self.emit)
        self.offset = scan.end

    def feed_journal(self, journal: Journal, start: int, expect_ino: int | None = None) -> int | None:
        """Fold the journal from ``start`` chunk by chunk; its inode, None if not ``expect_ino``."""
        ino, parts = journal.read_parts(start, expect_ino=expect_ino)
        if parts is None:
            return None
        for scan in parts:
            if scan.damage:
                raise JournalError(
                    f"cannot compact: the journal has damaged records ({scan.damage[0].describe()})",
                    hint="run `kmpwm doctor --repair` first",
                )
            self.feed(scan)
        return ino


def _caught_up(folder: Folder, journal: Journal, ino: int | None) -> Folder:
    """Under the lock: ``folder`` with the records appended since it read the journal ``ino``,
    or a new fold of all of it if the file was rewritten meanwhile."""
    if folder.feed_journal(journal, folder.offset, expect_ino=ino) is not None:
        return folder
    folder = Folder(folder.cutoff)  # someone else rewrote it meanwhile: start over under the lock
    folder.feed_journal(journal, 0)
    return folder


def keep_sets(state: dict, cutoff: float) -> tuple[dict, dict]:
    keep_chains = {cid: chain for cid, chain in state["chains"].items() if _keeps_chain(state, chain, cutoff)}
    keep_tasks = {tid: t for tid, t in state["tasks"].items() if _keeps_task(t, cutoff, keep_chains)}
    return keep_tasks, keep_chains


def _keeps_chain(state: dict, chain: dict, cutoff: float) -> bool:
    """A chain still going, or created or with a task finished since ``cutoff``."""
    own = members(state, chain)
    if any(t["finished_at"] is None or t["finished_at"] >= cutoff for t in own):
        return True
    return chain.get("created_at", 0) >= cutoff


def _keeps_task(t: dict, cutoff: float, keep_chains: dict) -> bool:
    """A task unfinished, finished since ``cutoff``, or of a chain kept."""
    return t["finished_at"] is None or t["finished_at"] >= cutoff or t.get("chain_id") in keep_chains


def hot_ops(state: dict, tasks: dict, chains: dict) -> list[dict]:
    """``tasks`` and ``chains`` (keep_sets) as the ops a fresh state is folded from: puts, then
    the meta op (ids' counters, a queue pause, the fences of cancelled runs still stopping)."""
    ops: list[dict] = [schema.put_task(pack_task(t)) for t in sorted(tasks.values(), key=lambda t: t["seq"])]
    ops += [schema.put_chain(c) for c in chains.values()]
    ops.append(_meta_op(state))
    return ops


def trimmed(state: dict, cutoff: float) -> dict:
    """``state`` without the work that finished before ``cutoff`` (what a compaction drops): a
    state folded afresh from hot_ops, or ``state`` itself when nothing is to be dropped."""
    tasks, chains = keep_sets(state, cutoff)
    if len(tasks) == len(state["tasks"]) and len(chains) == len(state["chains"]):
        return state
    fresh = new_state()
    apply(fresh, {"ts": time.time(), "ops": hot_ops(state, tasks, chains)})
    return fresh


def compact(paths: Paths, *, retention: float = RETENTION, now: float | None = None) -> dict:
    check_all(paths)
    from kmpwm.storage.stores import store_url

    if store_url(paths) is not None:
        return _compact_shared(paths, retention, now)
    journal = Journal(paths)
    now = time.time() if now is None else now
    before = journal.identity()
    if before is None:
        return {"compacted": False, "reason": "no journal yet", "bytes_before": 0, "bytes_after": 0}
    cutoff = now - retention
    folder = Folder(cutoff)
    with _no_gc():  # millions of small objects that all live on: the collector would only rescan them
        ino = folder.feed_journal(journal, 0)
        with journal.locked():
            journal.sweep_temp_files()
            folder = _caught_up(folder, journal, ino)
            tasks, chains = keep_sets(folder.state, cutoff)
            events = folder.events
            _rewrite(journal, paths, folder, tasks, chains, events, now)
    from kmpwm.storage.runlog import sweep

    runs_deleted = sweep(paths, cutoff)  # run output lives as long as its events (and a task's last 5 runs)
    after = journal.identity()
    return {
        "compacted": True,
        "bytes_before": before[1],
        "bytes_after": after[1] if after else 0,
        "records_before": folder.records,
        "tasks_kept": len(tasks),
        "tasks_dropped": len(folder.state["tasks"]) - len(tasks),
        "chains_kept": len(chains),
        "events_kept": len(events),
        "runs_deleted": runs_deleted,
        "retention_days": retention / 86400,
    }


def _compact_shared(paths: Paths, retention: float, now: float | None) -> dict:
    """A shared store keeps every record (PostgreSQL holds millions of rows easily, and the
    events of every host stay whole); what grows the cost of reading is the snapshot (work
    finished before the retention window is left out of it, as a compaction drops it from the
    journal) and the tail after it, so compacting it is writing a snapshot now (and sweeping old
    run output)."""
    from kmpwm.storage.runlog import KEEP
    from kmpwm.storage.stores import open_store

    store = open_store(paths)
    view = store.load(full=False)
    store.write_snapshot(view, retention=retention)
    store.sweep_runs((time.time() if now is None else now) - retention, KEEP)
    reason = f"a shared store keeps its records; snapshot written at record {view.offset}"
    return {"compacted": False, "reason": reason}


def _rewrite(
    journal: Journal, paths: Paths, folder: Folder, tasks: dict, chains: dict, events: list, now: float
) -> None:
    """The new generation (caller holds the lock): archived events, then the live state as puts."""
    records: list[dict] = [
        {"ts": chunk[-1][0], "arc": True, "ev": chunk} for chunk in _batches(events, EVENTS_PER_RECORD)
    ]
    ops = hot_ops(folder.state, tasks, chains)
    records += [{"ts": now, "ops": batch} for batch in _batches(ops, OPS_PER_RECORD)]
    size = sum(len(encode(r)) for r in records)
    journal.rewrite(records, compacted_size=size)
    from kmpwm.storage.store import Store

    store = Store(paths, journal)
    store.drop_snapshot()
    store.write_snapshot(store.load(full=False))


def _batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _meta_op(state: dict) -> dict:
    """The counters, a queue pause and the fences still in force, as one ``meta`` op."""
    meta = schema.meta(state["seq"], state["fam"])
    if state.get("qpause"):
        meta["qpause"] = state["qpause"]  # `pause --all` outlives a compaction
    fences = {i: f for i, f in (state.get("fences") or {}).items() if f.get("until", 0) > time.time()}
    if fences:
        meta["fences"] = fences  # cancelled runs still stopping (state._finish); ended ones are dropped
    return meta


def needs_compaction(paths: Paths) -> bool:
    """Automatic compaction once the journal is over twice its compacted size (and 1 MiB)."""
    journal = Journal(paths)
    ident = journal.identity()
    if ident is None or ident[1] < AUTO_MIN_BYTES:
        return False
    header = journal.header() or {}
    base = header.get("compacted_size", 0)
    return ident[1] > 2 * base + AUTO_MIN_BYTES


def auto_compact(paths: Paths) -> None:
    """Best effort after run-due: never fails the run (errors go to the log)."""
    try:
        if needs_compaction(paths):
            compact(paths)
    except Exception as exc:
        from kmpwm.storage.logs import logger

        logger(paths).warning("automatic compaction skipped: %s", exc)
