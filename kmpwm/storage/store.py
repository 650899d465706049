"""The journal folded into state, kept cheap to read: a snapshot plus the tail after it.

The snapshot is only a cache of the state folded up to a byte offset of a named journal
generation, in two files:

``journal/state.snap``    the *hot* state: unfinished tasks, chains still going (with their
                          finished steps), counters.  What ``run-due`` and ``enqueue`` need, so
                          their cost does not grow with finished history.
``journal/history.snap``  finished work nothing can change any more (state.split_history), in
                          append-only frames; read only by commands that show history
                          (``inspect-queue --all``, ``explain``, ``events``...).

Both are ignored whenever they do not match the journal (another generation, an offset past the
end, a bad checksum): the state is then folded from the journal, and deleting them changes
nothing a user sees.
"""

from __future__ import annotations

import os
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import orjson

from kmpwm.core import schema
from kmpwm.core.exitcodes import KmpwmError
from kmpwm.core.state import apply, new_state, pack_task, split_history, unpack_task
from kmpwm.storage.journal import (
    _O_CLOEXEC,
    _O_NOFOLLOW,
    Damage,
    Journal,
    _add_damage,
    _header_op,
    _journal_error,
    atomic_write,
    encode,
    scan_bytes,
    write_all,
)
from kmpwm.storage.paths import Paths, check_all, resolve

SNAPSHOT_MAGIC = b"KMPWMSNAP4 "
HISTORY_MAGIC = b"KMPWMHIST1 "
# Write a new snapshot once the tail after the last one holds this many records or bytes.
SNAPSHOT_AFTER_RECORDS = 2000
SNAPSHOT_AFTER_BYTES = 4 << 20
# An enqueue of at most this many tasks into a home whose state was not read yet asks
# Store.unmentioned, on the bytes, whether their ids are new, instead of parsing the state.
PROVE_NEW_MAX_IDS = 16
# run-due re-checks the checksums of the part of the journal a snapshot covers up to this size,
# so damage there is found even though the state came from the snapshot.
VERIFY_COVERED_BYTES = 8 << 20


class OptimisticMiss(Exception):
    """An optimistic transaction (a shared store's, ``transaction(guess=True)``) could not be
    made: nothing was written and the state is as it was; make it again the usual way.
    ``stale``: because a record came that it had not folded (else: it staged what only a usual
    transaction may)."""

    def __init__(self, message: str, stale: bool = False):
        super().__init__(message)
        self.stale = stale


@dataclass
class View:
    """A consistent reading of the journal."""

    _state: dict
    offset: int = 0  # bytes of the journal folded into ``state`` (with ``pending``)
    gen: str | None = None
    damage: list[Damage] = field(default_factory=list)  # corrupt records seen (not torn tails)
    torn: Damage | None = None
    from_snapshot: bool = False
    verified: bool = False
    # partial: ``state`` lacks the history written to history.snap before the snapshot it came
    # from (``load(full=True)`` merges it in).  hid/hist: the history file this state continues
    # and how many of its bytes belong to it.
    partial: bool = False
    hid: str | None = None
    hist: int = 0
    # history this process already wrote: id -> the very object written (a task or chain
    # replaced since is a new object and gets written again)
    flushed: dict = field(default_factory=dict, repr=False)
    merged_from: View | None = field(default=None, repr=False)
    # records this process appended whose fold was not needed to answer it (new tasks only):
    # folded on the next read of ``state``; a one-shot ``kmpwm enqueue`` never pays for it
    pending: list = field(default_factory=list, repr=False)

    @property
    def state(self) -> dict:
        if self.pending:
            records, self.pending = self.pending, []
            for record in records:
                apply(self._state, record)
        return self._state


@contextmanager
def _no_gc():
    import gc

    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class Store:
    """One home's journal and its folded state; the layer every command goes through."""

    def __init__(self, paths: Paths | None = None, journal: Journal | None = None):
        self.paths = paths or resolve()
        self.journal = journal or Journal(self.paths)  # pass the caller's if it holds the lock
        self._view: View | None = None
        self._ino = 0
        self._tail_records = 0  # records folded since the snapshot we started from
        self._tail_bytes = 0
        self._checked = False
        self._hist_cache: tuple | None = None  # (hid, length, tasks, chains)
        self._base_offset = 0  # the journal offset of the snapshot our in-memory state grew from
        # a long-lived reader (serve): after each snapshot, keep only the hot state in memory
        self.forget_history = False

    # -- reading --------------------------------------------------------------------------

    def _check_paths(self) -> None:
        """The permission checks (exit 77), once per process: a long run-due does not re-stat
        every cycle."""
        if not self._checked:
            check_all(self.paths)
            self._checked = True

    def exists(self) -> bool:
        """Whether anything was ever written (no journal: no task, nothing to lock)."""
        return os.path.lexists(self.paths.journal_file)

    def load(self, full: bool = True) -> View:
        """The current state: incremental after the first call (only new records are folded).

        ``full=False`` may leave out finished history (``View.partial``): enough for everything
        that schedules, runs or enqueues, and its cost does not grow with history."""
        self._check_paths()
        view = self._view = self._caught_up()
        self._maybe_snapshot(view)
        if not (full and view.partial):
            return view
        merged = self._merged(view)
        if merged is None:  # the history file is gone or damaged: fold everything from the journal
            merged = self._refold()
        return merged

    def _caught_up(self) -> View:
        """The cached view with the records appended since folded in, or the state read anew
        (snapshot and tail) when there is none or the journal was replaced or cut."""
        ident = self.journal.identity()
        view = self._view
        if not self._continues(view, ident):
            return self._full_load()
        if ident[1] > view.offset and not self._fold_tail(view, expect_ino=self._ino):
            return self._full_load()  # the file was replaced (compaction) between stat and open
        return view

    def _continues(self, view: View | None, ident: tuple[int, int] | None) -> bool:
        """Whether the journal file ``ident`` (inode, size) is the one ``view`` was folded from,
        not cut below what it folded."""
        return view is not None and ident is not None and ident[0] == self._ino and ident[1] >= view.offset

    def _refold(self) -> View:
        """The whole state folded from the journal alone, and a good pair of snapshot files left behind."""
        view = self._view = self._full_load(use_snapshot=False)
        self._tail_records = SNAPSHOT_AFTER_RECORDS
        self._maybe_snapshot(view)
        return view

    def position(self) -> tuple[int, int] | None:
        """(inode, offset) of the journal folded into the cached state (inode 0: no journal yet);
        None before the first load.  A reader compares it to tell whether records came since."""
        if self._view is None:
            return None
        return self._ino, self._view.offset

    def _full_load(self, use_snapshot: bool = True) -> View:
        with _no_gc():  # bulk parsing makes millions of objects; the collector would rescan them all
            for _ in range(5):  # a compaction may replace the file while we read: start again
                self._tail_records = self._tail_bytes = 0
                ident = self.journal.identity()
                view = self._starting_view(use_snapshot)
                self._base_offset = view.offset
                if self._fold_tail(view, expect_ino=ident[0] if ident else None):
                    return view
        return view

    def _starting_view(self, use_snapshot: bool) -> View:
        """The snapshot's view (with ``use_snapshot``, if it is usable), else an empty state."""
        view = self._read_snapshot() if use_snapshot else None
        return View(new_state()) if view is None else view

    def _fold_tail(self, view: View, expect_ino: int | None = None) -> bool:
        """Fold the records after ``view.offset``; False (nothing applied) if the file read is not
        the one ``expect_ino`` names, so that an offset is never used in another file."""
        ino, parts = self.journal.read_parts(view.offset, expect_ino=expect_ino or None)
        if parts is None:
            return False
        self._ino = ino
        start = view.offset
        first = start == 0 and view.gen is None
        for scan in parts:  # chunk by chunk: a huge journal is never all in memory at once
            if first and scan.records:
                view.gen = _header_gen(scan.records[0][1])
                first = False
            _fold_scan(view, scan)
            self._tail_records += len(scan.records)
        self._tail_bytes += view.offset - start
        return True

    # -- history --------------------------------------------------------------------------

    def _merged(self, view: View) -> View | None:
        """``view`` with the history it continues merged in (None if that cannot be read)."""
        hist = self._read_history(view.hid, view.hist)
        if hist is None:
            return None
        tasks, chains = hist
        state = dict(view.state)
        state["tasks"] = {**tasks, **view.state["tasks"]}  # what the view holds is newer
        state["chains"] = {**chains, **view.state["chains"]}
        return View(
            state,
            offset=view.offset,
            gen=view.gen,
            damage=view.damage,
            torn=view.torn,
            from_snapshot=view.from_snapshot,
            verified=view.verified,
            hid=view.hid,
            hist=view.hist,
            merged_from=view,
        )

    def _read_history(self, hid: str | None, length: int) -> tuple[dict, dict] | None:
        cached = self._cached_history(hid, length)
        if cached is not None:
            return cached[2], cached[3]
        data = _read_private(self.paths.history_file, length)
        head = _history_header(hid)
        if hid is None or data is None or len(data) != length or not data.startswith(head):
            return None
        history = _history_frames(data, len(head))
        if history is not None:
            self._hist_cache = (hid, length, *history)
        return history

    def _cached_history(self, hid: str | None, length: int) -> tuple | None:
        """The history held in memory, if it is the first ``length`` bytes of history ``hid``."""
        cached = self._hist_cache
        if cached is not None and cached[:2] == (hid, length):
            return cached
        return None

    # -- snapshot -------------------------------------------------------------------------

    def _snapshot_parts(self, body: bool = True) -> tuple[dict, memoryview | None] | None:
        """The snapshot's meta and (with ``body``) its state bytes, if intact and of this journal.

        Format: ``KMPWMSNAP4 <crc32 A> <crc32 B> <meta json>\n<state json>``, checksums as 8 hex
        digits: A covers the rest of the first line (B and the meta: generation, offset, history,
        wake-up summary), B covers the state.  ``body=False`` reads and checks the first line
        only: what an idle run-due needs, whatever the size of the state."""
        try:
            fd = os.open(self.paths.snapshot_file, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
            with os.fdopen(fd, "rb") as fh:
                blob = fh.read() if body else fh.readline(1 << 20)
        except OSError:
            return None
        try:
            meta, nl = _snapshot_meta(blob)
            if not self._names_this_journal(meta):
                return None
            if not body:
                return meta, None
            return meta, _snapshot_state(blob, nl)
        except (ValueError, KeyError, TypeError):
            return None

    def _meta_on_disk(self) -> dict | None:
        """The meta of the snapshot on disk, None if there is none intact of this journal."""
        parts = self._snapshot_parts()
        return None if parts is None else parts[0]

    def _names_this_journal(self, meta: dict) -> bool:
        """Whether a snapshot's meta names this journal's generation, an offset inside it and a
        history (KeyError or TypeError if it lacks one)."""
        header = self.journal.header()
        ident = self.journal.identity()
        offset = meta["offset"]
        if header is None or ident is None or header.get("gen") != meta["gen"] or not 0 < offset <= ident[1]:
            return False
        return isinstance(meta.get("hid"), str) and isinstance(meta.get("hist"), int)

    def _read_snapshot(self) -> View | None:
        """The snapshot's (hot) state, if intact and of this journal; None means fold from scratch."""
        parts = self._snapshot_parts()
        if parts is None:
            return None
        meta, body = parts
        if not self._at_record_boundary(meta["offset"]):
            return None
        try:
            state = orjson.loads(body)
            state["tasks"] = {i: unpack_task(t) for i, t in state["tasks"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        return View(
            state,
            offset=meta["offset"],
            gen=meta["gen"],
            from_snapshot=True,
            partial=True,
            hid=meta["hid"],
            hist=meta["hist"],
        )

    def idle_without_loading(self, now: float) -> bool:
        """True when the snapshot's summary and the records after it prove that nothing is due at
        ``now`` (state.idle_at), without parsing the state: an idle ``run-due`` then costs the
        same with 100,000 waiting tasks as with none.  False means "load and look"."""
        self._check_paths()
        parts = self._snapshot_parts(body=False)  # its first line, checksummed, of this generation
        if parts is None or not _summary_idle(parts[0], now):
            return False
        offset = parts[0]["offset"]
        if not self._at_record_boundary(offset):
            return False
        if offset <= VERIFY_COVERED_BYTES and self.journal.verify(offset):
            return False  # damage where the snapshot stands in: run-due must see it and refuse
        return self._records_keep_idle(offset, now)

    def _records_keep_idle(self, offset: int, now: float) -> bool:
        """Whether the records after ``offset`` are undamaged and each leaves nothing due at ``now``."""
        _, tail = self.journal.read_parts(offset)
        for scan in tail or ():
            if scan.damage:  # (a torn tail is not damage: readers ignore it, run-due runs)
                return False
            if not all(_tail_keeps_idle(record, now) for _, record in scan.records):
                return False
        return True

    def unmentioned(self, ids: list[str]) -> bool:
        """True when none of ``ids`` occurs in the hot state or in the records after it, proved on
        their bytes: the snapshot (checksummed, of this journal generation) and the journal after
        it are searched for each id as orjson writes it, a JSON string with its quotes.  orjson
        wrote every id in both, so an id that is there is found.  Any mention (a task, a chain,
        an input that holds the same text) answers False, and the caller folds the state as
        usual.  An enqueue beside 100,000 waiting tasks then needs no parsing of them.  Ids with
        a ``#`` are never proved new: the fold makes ``base#n`` ids itself (policy append), and
        those appear in no record.

        Call it holding the writers' lock (nothing may append or compact meanwhile)."""
        if any("#" in task_id for task_id in ids):
            return False
        self._check_paths()
        parts = self._snapshot_parts()
        if parts is None:
            return False
        meta, body = parts
        tail = self._short_tail(meta["offset"])
        if tail is None:
            return False
        snapshot = body.obj  # the whole file: its first line (meta) holds no ids, searching it is harmless
        return not any(needle in snapshot or needle in tail for needle in map(orjson.dumps, ids))

    def _short_tail(self, offset: int) -> bytes | None:
        """The journal's bytes after a snapshot's ``offset`` (a record boundary), None if they
        cannot be read or are due for a new snapshot."""
        if not self._at_record_boundary(offset):
            return None
        tail = self.journal.raw_from(offset)
        if tail is None:
            return None
        if len(tail) >= SNAPSHOT_AFTER_BYTES or tail.count(b"\n") >= SNAPSHOT_AFTER_RECORDS:
            return None  # time for a new snapshot: the fold's load() writes one, so the tail stays short
        return tail

    def _at_record_boundary(self, offset: int) -> bool:
        try:
            with open(self.journal.path, "rb") as fh:
                fh.seek(offset - 1)
                return fh.read(1) == b"\n"
        except OSError:
            return False

    def _maybe_snapshot(self, view: View) -> None:
        if view.damage or view.gen is None:
            return  # never cache over damage: it must stay visible until repaired
        if self._tail_records < SNAPSHOT_AFTER_RECORDS and self._tail_bytes < SNAPSHOT_AFTER_BYTES:
            return
        with suppress(KmpwmError):  # a cache that could not be written costs time, not correctness
            self.write_snapshot(view)

    def write_snapshot(self, view: View | None = None) -> bool:
        """Write the snapshot of ``view`` (default: this store's current state): its new history
        appended to history.snap, then state.snap replaced atomically.  Skipped (False) when
        another process holds the journal lock or already wrote a newer snapshot."""
        view = view or self._view
        if view is None:
            return False
        if view.merged_from is not None:
            view = view.merged_from
        if view.gen is None or view.damage:
            return False
        from kmpwm.core.exitcodes import LockBusy

        try:
            with self.journal.locked(timeout=0):  # writers of the snapshot files take turns
                return self._write_snapshot_locked(view)
        except LockBusy:
            return False

    def _write_snapshot_locked(self, view: View) -> bool:
        meta = self._meta_on_disk()
        if _as_new(meta, view):
            return False  # already as new as ours (a state folded from scratch rewrites it: a repair)
        cold_ids, cold_chain_ids = split_history(view.state)
        new_tasks, new_chains = _unflushed(view, cold_ids, cold_chain_ids)
        frame = encode({"tasks": [pack_task(t) for t in new_tasks.values()], "chains": list(new_chains.values())})
        written = self._write_history(view, meta, frame)
        if written is None:
            return False
        hid, hist = written
        self._write_state_file(view, hid, hist, set(cold_ids), set(cold_chain_ids))
        self._note_flushed(view, hid, hist, hist - len(frame), new_tasks, new_chains)
        if self.forget_history and view is self._view:
            _forget_history(view, cold_ids, cold_chain_ids)
            self._base_offset = view.offset
        return True

    def _note_flushed(self, view: View, hid: str, hist: int, before: int, new_tasks: dict, new_chains: dict) -> None:
        """After a snapshot: the view, its flushed marks and the history cache know what went cold."""
        cached = self._cached_history(hid, before)
        if cached is not None:
            _, _, ctasks, cchains = cached  # keep the cache in step with what we appended
            ctasks.update(new_tasks)
            cchains.update(new_chains)
            self._hist_cache = (hid, hist, ctasks, cchains)
        view.flushed.update(new_tasks)
        view.flushed.update({"\0" + c: chain for c, chain in new_chains.items()})
        view.hid, view.hist = hid, hist
        if view is self._view:
            self._tail_records = self._tail_bytes = 0

    def _write_history(self, view: View, meta: dict | None, frame: bytes) -> tuple[str, int] | None:
        """Append ``frame`` (the tasks and chains gone cold) to the history this state continues,
        or start a history file of its own; its id and new length, None if it cannot continue."""
        if view.hid is None:  # a state folded from the whole journal: a history file of its own
            return self._new_history(frame)
        hid = view.hid
        on_disk = meta is not None and meta["hid"] == hid  # the snapshot there continues it too
        start = max(view.hist, meta["hist"] if on_disk else 0)
        if not self._append_history(hid, start, frame):
            # the history this state continues is gone (deleted, damaged, another generation's):
            # retire the snapshot that needs it, so the next reader folds everything and starts anew
            if on_disk:
                self.drop_snapshot()
            return None
        return hid, start + len(frame)

    def _new_history(self, frame: bytes) -> tuple[str, int]:
        """Replace history.snap with a new history holding ``frame``; its id and length."""
        hid = uuid.uuid4().hex
        head = _history_header(hid)
        atomic_write(self.paths.history_file, head + frame)
        return hid, len(head) + len(frame)

    def _write_state_file(self, view: View, hid: str, hist: int, cold_tasks: set, cold_chains: set) -> None:
        """Replace state.snap: the hot tasks and chains, and the summary a cheap reader needs."""
        tasks, chains = view.state["tasks"], view.state["chains"]
        hot = dict(view.state)
        hot["tasks"] = {i: pack_task(t) for i, t in tasks.items() if i not in cold_tasks}
        hot["chains"] = {c: ch for c, ch in chains.items() if c not in cold_chains}
        body = orjson.dumps(hot)
        next_due, running, latest = _wake_summary(tasks)
        meta_out = orjson.dumps(
            {
                "gen": view.gen,
                "offset": view.offset,
                "hid": hid,
                "hist": hist,
                "next_due": next_due,
                "running": running,
                "latest": latest,
                "written_at": time.time(),
            }
        )
        line = b"%08x " % zlib.crc32(body) + meta_out
        atomic_write(self.paths.snapshot_file, SNAPSHOT_MAGIC + b"%08x " % zlib.crc32(line) + line + b"\n" + body)

    def _append_history(self, hid: str, start: int, frame: bytes) -> bool:
        """Put ``frame`` at ``start`` of the history file (bytes after ``start`` belong to no
        snapshot: a writer that died before replacing state.snap).  False if the file is not
        the history ``hid`` names."""
        head = _history_header(hid)
        try:
            fd = os.open(self.paths.history_file, os.O_RDWR | _O_NOFOLLOW | _O_CLOEXEC)
        except OSError:
            return False
        try:
            with _journal_error(f"write {self.paths.history_file}"):
                if os.pread(fd, len(head), 0) != head or os.fstat(fd).st_size < start:
                    return False
                os.ftruncate(fd, start)
                os.lseek(fd, start, os.SEEK_SET)
                write_all(fd, frame)
                os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def drop_snapshot(self) -> None:
        for path in (self.paths.snapshot_file, self.paths.history_file):
            with _journal_error(f"remove {path}"), suppress(FileNotFoundError):
                os.unlink(path)
        self._hist_cache = None

    def verify_covered(self, view: View) -> None:
        """Fail-closed readers (run-due): find damage in the region the snapshot stands in for.
        CRC-only, and only while that region is small; beyond it, `kmpwm doctor` checks it."""
        if view.from_snapshot and not getattr(view, "verified", False) and view.offset <= VERIFY_COVERED_BYTES:
            first = min((d.start for d in view.damage), default=float("inf"))
            view.damage[:0] = [d for d in self.journal.verify(view.offset) if d.start < first]
            view.verified = True

    def invalidate(self) -> None:
        """Forget the in-memory state (after the journal was rewritten)."""
        self._view = None
        self._ino = 0

    def rebase(self) -> bool:
        """For a long-lived reader (serve): when another process wrote a snapshot past the point
        our in-memory state grew from, drop that state; the next load reads the snapshot and the
        records after it, the hot state only, so memory does not grow with every task run.
        (A snapshot this process writes trims its state itself: ``forget_history``.)"""
        view = self._view
        if view is None or view.pending or view.merged_from is not None:
            return False
        parts = self._snapshot_parts(body=False)
        if parts is None or not self._base_offset < parts[0].get("offset", 0) <= view.offset:
            return False
        self._view = None
        return True

    # -- writing --------------------------------------------------------------------------

    @contextmanager
    def transaction(self, timeout: float | None = None) -> Iterator[Transaction]:
        """Hold the writers' lock with the state brought up to date under it.  Ops staged with
        :meth:`Transaction.stage` are written as one record when the block ends without error."""
        with self.journal.locked(timeout):
            txn = Transaction(self)
            try:
                yield txn
                txn.flush()
            except BaseException:
                if txn.staged:
                    self.invalidate()  # the in-memory state saw ops that never reached the disk
                raise

    def _committed(self, view: View, records: list[dict], end: int) -> list:
        results = []
        for record in records:
            header = _header_op(record)
            if header is not None:
                self._adopt_generation(view, header)
                continue
            results = apply(view.state, record)
        ident = self.journal.identity()
        self._ino = ident[0] if ident else 0
        self._tail_records += len(records)
        self._tail_bytes += end - view.offset
        view.offset = end
        return results

    def _adopt_generation(self, view: View, header: dict) -> None:
        """A header was committed: ``view`` takes its generation (read back from the journal for
        the header append() writes itself)."""
        written = self.journal.header() if header.get("_pending") else header
        view.gen = written.get("gen") if written else None


class Transaction:
    """Writes made while holding the lock: ``commit`` appends one durable record now; ``stage``
    applies ops to the in-memory state at once (so that later decisions see them) and the whole
    transaction's staged ops become one record, with one fsync, when it ends."""

    def __init__(self, store: Store):
        self.store = store
        self._view: View | None = None
        self.staged: list[dict] = []
        self.ts = time.time()
        self.emit = None  # set to see the events the staged ops imply (run-due's hooks)

    @property
    def view(self) -> View:
        """The state brought up to date under the lock, read at first use."""
        if self._view is None:
            self._view = self.store.load(full=False)
        return self._view

    @property
    def state(self) -> dict:
        return self.view.state

    def stage(self, ops: list[dict], emit=None) -> list:
        """Apply ``ops`` now (at the transaction's timestamp); they are written on flush.
        ``emit`` sees the fold's events of these ops (state.apply)."""
        if not ops:
            return []
        self.staged.extend(ops)
        return apply(self.view.state, {"ts": self.ts, "ops": ops}, self._hook(emit))

    def _hook(self, emit):
        """``emit`` and the transaction's own ``emit`` (run-due's hooks see the events too)."""
        if self.emit is None:
            return emit
        return self.emit if emit is None else (lambda *e, _a=emit, _b=self.emit: (_a(*e), _b(*e)))

    def flush(self) -> None:
        if not self.staged:
            return
        ops, self.staged = self.staged, []
        record = {"ts": self.ts, "ops": ops}
        records = self._with_header(record)
        end = self.store.journal.append([record])
        self.store._committed(self.view, records[:-1], end)  # the header only: ops were applied when staged

    def commit(self, ops: list[dict], ts: float | None = None) -> list:
        """Append ``ops`` as one record (all or nothing), fsynced; returns the fold's results."""
        if not ops:
            return []
        record = self._commit_record(ops, ts)
        quick = self._append_unread(record)
        if quick is not None:
            return quick  # the state stays unread: the next load() folds this record too
        records = self._with_header(record)
        quick = _new_tasks_only(self.view.state, record)
        end = self.store.journal.append([record])
        if quick is None:
            return self.store._committed(self.view, records, end)
        self.store._committed(self.view, records[:-1], end)  # the header, if any
        self.view.pending.append(record)
        return quick

    def _commit_record(self, ops: list[dict], ts: float | None) -> dict:
        """The record commit() writes: ``ops`` at ``ts`` (default: now); never after stage()."""
        if self.staged:
            raise RuntimeError("commit() after stage(): flush first")
        return {"ts": time.time() if ts is None else ts, "ops": ops}

    def _append_unread(self, record: dict) -> list | None:
        """Nothing read yet in this process: a record of a few new tasks, proved new on the bytes,
        is appended without reading the state; the fold's results (None: not so, nothing written)."""
        if self._view is not None or self.store._view is not None or len(record["ops"]) > PROVE_NEW_MAX_IDS:
            return None
        quick = _new_tasks_only(_NOTHING, record)
        if quick is None or not self.store.unmentioned([r["id"] for r in quick]):
            return None
        self.store.journal.append([record])
        return quick

    def _with_header(self, record: dict) -> list[dict]:
        if self.view.gen is None and self.view.offset == 0:
            # a new journal: append() writes a header first; fold it too so the view knows its generation
            return [{"ts": record["ts"], "ops": [dict(schema.header(None), _pending=True)]}, record]
        return [record]


def _forget_history(view: View, cold_tasks: list, cold_chains: list) -> None:
    """Drop from ``view`` the history a snapshot just wrote to history.snap (it becomes partial:
    ``load(full=True)`` merges the history back in), so that a long-lived reader holds the hot
    state only and does not grow with every task it ever ran."""
    state, flushed = view.state, view.flushed
    for i in cold_tasks:
        state["tasks"].pop(i, None)
        flushed.pop(i, None)
    for c in cold_chains:
        state["chains"].pop(c, None)
        flushed.pop("\0" + c, None)
    view.partial = True


def _fold_scan(view: View, scan) -> None:
    """Fold one scan of the journal into ``view``: its records, its damage, its end."""
    state = view.state
    for _, record in scan.records:
        apply(state, record)
    _add_damage(view.damage, scan.damage)
    view.torn = scan.torn
    view.offset = scan.end


def _history_header(hid: str | None) -> bytes:
    return HISTORY_MAGIC + (hid or "").encode() + b"\n"


def _history_frames(data: bytes, start: int) -> tuple[dict, dict] | None:
    """The tasks and chains in the frames of history.snap's bytes ``data`` (frames from
    ``start``); None if any frame is damaged, torn or malformed."""
    with _no_gc():
        scan = scan_bytes(data[start:], start)
        if scan.damage or scan.torn or scan.end != len(data):
            return None
        try:
            return _unpack_frames(frame for _, frame in scan.records)
        except (KeyError, TypeError, AttributeError):
            return None


def _unpack_frames(frames) -> tuple[dict, dict]:
    """The tasks (unpacked) and chains of history frames, by id, later frames winning."""
    tasks: dict = {}
    chains: dict = {}
    for frame in frames:
        tasks.update((packed["id"], unpack_task(packed)) for packed in frame.get("tasks", ()))
        chains.update((chain["id"], chain) for chain in frame.get("chains", ()))
    return tasks, chains


def _read_private(path, size: int = -1) -> bytes | None:
    """Up to ``size`` bytes of ``path`` (-1: all), never through a symlink; None if unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
        with os.fdopen(fd, "rb") as fh:
            return fh.read(size)
    except OSError:
        return None


def _snapshot_meta(blob: bytes) -> tuple[dict, int]:
    """The meta in a snapshot's first line and where that line ends; ValueError if the line is
    not a snapshot's or fails its checksum."""
    start = len(SNAPSHOT_MAGIC)
    if not blob.startswith(SNAPSHOT_MAGIC):
        raise ValueError("not a snapshot")
    nl = blob.index(b"\n", start)
    if zlib.crc32(memoryview(blob)[start + 9 : nl]) != int(blob[start : start + 8], 16):
        raise ValueError("snapshot meta fails its checksum")
    return orjson.loads(blob[start + 18 : nl]), nl


def _snapshot_state(blob: bytes, nl: int) -> memoryview:
    """The state bytes after a snapshot's first line (ending at ``nl``); ValueError if they fail
    their checksum."""
    start = len(SNAPSHOT_MAGIC)
    state = memoryview(blob)[nl + 1 :]
    if zlib.crc32(state) != int(blob[start + 9 : start + 17], 16):
        raise ValueError("snapshot state fails its checksum")
    return state


def _as_new(meta: dict | None, view: View) -> bool:
    """Whether the snapshot ``meta`` describes is as new as ``view`` (a state folded from scratch,
    without a history of its own yet, rewrites one at the same offset)."""
    if meta is None:
        return False
    return meta["offset"] > view.offset or (meta["offset"] == view.offset and bool(view.hid))


def _unflushed(view: View, cold_ids: list, cold_chain_ids: list) -> tuple[dict, dict]:
    """The cold tasks and chains (by id) that this process has not written to history.snap yet."""
    tasks, chains, flushed = view.state["tasks"], view.state["chains"], view.flushed
    new_tasks = {i: tasks[i] for i in cold_ids if flushed.get(i) is not tasks[i]}
    new_chains = {c: chains[c] for c in cold_chain_ids if flushed.get("\0" + c) is not chains[c]}
    return new_tasks, new_chains


def _header_gen(record: dict) -> str | None:
    """The generation a journal's first record names, None if it is not a header."""
    header = _header_op(record)
    return None if header is None else header.get("gen")


_NOTHING: dict = {"tasks": {}, "fam": {}}  # for _new_tasks_only's checks within one record


def _new_tasks_only(state: dict, record: dict) -> list | None:
    """The fold's results for ``record`` if it only enqueues tasks under ids never seen (the
    common batch), without folding it; None when the fold has to decide."""
    tasks, fam = state["tasks"], state["fam"]
    seen: set = set()
    results = []
    ts = record["ts"]
    for op in record["ops"]:
        if op.get("op") != "enq":
            return None
        task = op["task"]
        tid = task["id"]
        if tid in tasks or tid in fam or tid in seen:
            return None
        seen.add(tid)
        results.append({"action": "enqueued", "id": tid, "due": _due(task, ts), "state": "ENQUEUED"})
    return results


def _wake_summary(tasks: dict) -> tuple[float | None, bool, float]:
    """The earliest due time of an enqueued task (None: none), whether any task is running and
    the latest time an enqueued task's due time was set (before it, the clock went back and
    state.due_at judges due times anew): all state.idle_at needs, kept in the snapshot's meta."""
    enqueued = [t for t in tasks.values() if t["state"] == "ENQUEUED"]
    next_due = min((t["due"] for t in enqueued), default=None)
    latest = max([0.0, *(t["updated_at"] for t in enqueued)])
    running = any(t["state"] == "RUNNING" for t in tasks.values())
    return next_due, running, latest


def _summary_idle(meta: dict, now: float) -> bool:
    """Whether a snapshot's wake-up summary says nothing runs and nothing is due at ``now``."""
    if max(meta.get("written_at", 0), meta.get("latest", 0)) > now:
        return False  # the clock went back since: due times are judged anew (state.due_at)
    if meta.get("running", True):
        return False
    next_due = meta.get("next_due", 0)
    return next_due is None or (isinstance(next_due, (int, float)) and next_due > now)


def _tail_keeps_idle(record: dict, now: float) -> bool:
    """Whether a record after the snapshot provably leaves nothing due at ``now``: only new tasks
    and chains whose first tasks are due later, and cancels.  Anything else: load and look."""
    if record.get("arc"):
        return True
    if record.get("ts", 0) > now:
        return False  # written before the clock went back: load and look (state.due_at)
    return all(_op_keeps_idle(op, now, record.get("ts", 0.0)) for op in record.get("ops", ()))


_IDLE_OPS = ("cancel", "hdr", "note")  # note: a failed hook, changes nothing


def _op_keeps_idle(op: dict, now: float, ts: float) -> bool:
    if op.get("op") in _IDLE_OPS:
        return True
    tasks = _first_tasks(op)
    return tasks is not None and all(_due_later(task, ts, now) for task in tasks)


def _first_tasks(op: dict) -> list | None:
    """The tasks an ``enq`` or ``chain`` op makes runnable first; None for any other op."""
    kind = op.get("op")
    if kind == "enq":
        return [op.get("task") or {}]
    if kind == "chain":
        return (op.get("steps") or [[]])[0]
    return None


def _due_later(task: dict, ts: float, now: float) -> bool:
    due = _due(task, ts)
    return isinstance(due, (int, float)) and due > now


def _due(task: dict, ts: float):
    """A new task's due time as the fold sets it (none given: when it was created, else ``ts``)."""
    return task["due"] if "due" in task else task.get("created_at", ts)
