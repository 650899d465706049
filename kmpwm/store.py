"""The journal folded into state, kept cheap to read: a snapshot plus the tail after it.

The snapshot (``journal/state.snap``) is only a cache: the state folded up to a byte offset of a
named journal generation.  It is ignored whenever it does not match the journal (another
generation, an offset past the end, a bad checksum), and deleting it changes nothing a user sees.
Reading the state costs the snapshot plus the records appended after it, not the whole history.
"""

from __future__ import annotations

import os
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import orjson

from .exitcodes import JournalError
from .journal import Damage, Journal, atomic_write
from .paths import Paths, check_all, resolve
from .state import apply, new_state

SNAPSHOT_MAGIC = b"KMPWMSNAP2 "
# Write a new snapshot once the tail after the last one holds this many records or bytes.
SNAPSHOT_AFTER_RECORDS = 2000
SNAPSHOT_AFTER_BYTES = 4 << 20
# run-due re-checks the checksums of the part of the journal a snapshot covers up to this size,
# so damage there is found even though the state came from the snapshot.
VERIFY_COVERED_BYTES = 8 << 20


@dataclass
class View:
    """A consistent reading of the journal."""

    state: dict
    offset: int = 0  # bytes of the journal folded into ``state``
    gen: str | None = None
    damage: list[Damage] = field(default_factory=list)  # corrupt records seen (not torn tails)
    torn: Damage | None = None
    from_snapshot: bool = False
    verified: bool = False


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

    def __init__(self, paths: Paths | None = None):
        self.paths = paths or resolve()
        self.journal = Journal(self.paths)
        self._view: View | None = None
        self._ino = 0
        self._tail_records = 0  # records folded since the snapshot we started from
        self._tail_bytes = 0
        self._checked = False

    # -- reading --------------------------------------------------------------------------

    def load(self) -> View:
        """The current state: incremental after the first call (only new records are folded)."""
        if not self._checked:
            check_all(self.paths)  # once per process: a long run-due does not re-stat every cycle
            self._checked = True
        ident = self.journal.identity()
        view = self._view
        if view is None or ident is None or ident[0] != self._ino or ident[1] < view.offset:
            view = self._full_load()
        elif ident[1] > view.offset and not self._fold_tail(view, expect_ino=self._ino):
            view = self._full_load()  # the file was replaced (compaction) between stat and open
        self._view = view
        self._maybe_snapshot(view)
        return view

    def _full_load(self) -> View:
        with _no_gc():  # bulk parsing makes millions of objects; the collector would rescan them all
            for _ in range(5):  # a compaction may replace the file while we read: start again
                self._tail_records = self._tail_bytes = 0
                ident = self.journal.identity()
                view = self._read_snapshot()
                if view is None:
                    view = View(new_state())
                if self._fold_tail(view, expect_ino=ident[0] if ident else None):
                    return view
        return view

    def _fold_tail(self, view: View, expect_ino: int | None = None) -> bool:
        """Fold the records after ``view.offset``; False (nothing applied) if the file read is not
        the one ``expect_ino`` names, so that an offset is never used in another file."""
        scan, ino = self.journal.read(view.offset)
        if expect_ino is not None and ino and ino != expect_ino:
            return False
        self._ino = ino
        state = view.state
        for _, record in scan.records:
            ops = record.get("ops")
            if ops and ops[0].get("op") == "hdr" and view.offset == 0 and view.gen is None:
                view.gen = ops[0].get("gen")
            apply(state, record)
        view.damage.extend(scan.damage)
        view.torn = scan.torn
        self._tail_records += len(scan.records)
        self._tail_bytes += scan.end - view.offset
        view.offset = scan.end
        return True

    # -- snapshot -------------------------------------------------------------------------

    def _read_snapshot(self) -> View | None:
        """The snapshot, if it is intact and belongs to this journal; None means fold from scratch.

        Format: ``KMPWMSNAP2 <crc32 of the rest, 8 hex> <meta json>\n<state json>``: one checksum
        covers the meta (generation, offset) and the state."""
        try:
            with open(self.paths.snapshot_file, "rb") as fh:
                blob = fh.read()
        except OSError:
            return None
        try:
            if not blob.startswith(SNAPSHOT_MAGIC):
                return None
            start = len(SNAPSHOT_MAGIC)
            if zlib.crc32(memoryview(blob)[start + 9:]) != int(blob[start:start + 8], 16):
                return None
            nl = blob.index(b"\n", start)
            meta = orjson.loads(blob[start + 9:nl])
            header = self.journal.header()
            ident = self.journal.identity()
            offset = meta["offset"]
            if header is None or ident is None or header.get("gen") != meta["gen"] or not 0 < offset <= ident[1]:
                return None
            if not self._at_record_boundary(offset):
                return None
            state = orjson.loads(memoryview(blob)[nl + 1:])
        except (ValueError, KeyError, TypeError):
            return None
        return View(state, offset=offset, gen=meta["gen"], from_snapshot=True)

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
        try:
            self.write_snapshot(view)
        except JournalError:
            pass  # a cache that could not be written costs time, not correctness

    def write_snapshot(self, view: View) -> None:
        body = orjson.dumps(view.state)
        meta = orjson.dumps({"gen": view.gen, "offset": view.offset, "written_at": time.time()})
        rest = meta + b"\n" + body
        atomic_write(self.paths.snapshot_file, SNAPSHOT_MAGIC + b"%08x " % zlib.crc32(rest) + rest)
        self._tail_records = self._tail_bytes = 0

    def drop_snapshot(self) -> None:
        try:
            os.unlink(self.paths.snapshot_file)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise JournalError(f"cannot remove {self.paths.snapshot_file}: {exc.strerror}") from None

    def verify_covered(self, view: View) -> None:
        """Fail-closed readers (run-due): find damage in the region the snapshot stands in for.
        CRC-only, and only while that region is small; beyond it, `kmpwm doctor` checks it."""
        if view.from_snapshot and not getattr(view, "verified", False) and view.offset <= VERIFY_COVERED_BYTES:
            start = min((d.start for d in view.damage), default=None)
            found = [d for d in self.journal.verify(view.offset) if start is None or d.start < start]
            view.damage[:0] = found
            view.verified = True

    def invalidate(self) -> None:
        """Forget the in-memory state (after the journal was rewritten)."""
        self._view = None
        self._ino = 0

    # -- writing --------------------------------------------------------------------------

    @contextmanager
    def transaction(self, timeout: float | None = None) -> Iterator["Transaction"]:
        """Hold the writers' lock with the state brought up to date under it.  Ops staged with
        :meth:`Transaction.stage` are written as one record when the block ends without error."""
        with self.journal.locked(timeout):
            view = self.load()
            txn = Transaction(self, view)
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
            ops = record.get("ops")
            if ops and ops[0].get("op") == "hdr":
                header = self.journal.header() if ops[0].get("_pending") else ops[0]
                view.gen = header.get("gen") if header else None
                continue
            results = apply(view.state, record)
        ident = self.journal.identity()
        self._ino = ident[0] if ident else 0
        self._tail_records += len(records)
        self._tail_bytes += end - view.offset
        view.offset = end
        return results


class Transaction:
    """Writes made while holding the lock: ``commit`` appends one durable record now; ``stage``
    applies ops to the in-memory state at once (so that later decisions see them) and the whole
    transaction's staged ops become one record, with one fsync, when it ends."""

    def __init__(self, store: Store, view: View):
        self.store = store
        self.view = view
        self.staged: list[dict] = []
        self.ts = time.time()

    @property
    def state(self) -> dict:
        return self.view.state

    def stage(self, ops: list[dict]) -> list:
        """Apply ``ops`` now (at the transaction's timestamp); they are written on flush."""
        if not ops:
            return []
        self.staged.extend(ops)
        return apply(self.view.state, {"ts": self.ts, "ops": ops})

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
        if self.staged:
            raise RuntimeError("commit() after stage(): flush first")
        record = {"ts": time.time() if ts is None else ts, "ops": ops}
        records = self._with_header(record)
        end = self.store.journal.append([record])
        return self.store._committed(self.view, records, end)

    def _with_header(self, record: dict) -> list[dict]:
        if self.view.gen is None and self.view.offset == 0:
            # a new journal: append() writes a header first; fold it too so the view knows its generation
            return [{"ts": record["ts"], "ops": [{"op": "hdr", "gen": None, "_pending": True}]}, record]
        return [record]
