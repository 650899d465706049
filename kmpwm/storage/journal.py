"""The append-only journal (SPEC section 2): self-checking records, durable appends, damage
detection and repair.

On disk every record is one line: eight hex digits of the CRC-32 of the payload, a space, the
payload (compact JSON, which never contains a raw newline), and ``\\n``::

    1a2b3c4d {"ts":1763800000.0,"ops":[...]}\\n

One record is one transaction: a batch of many enqueues is one record, so a crash can never leave
half a batch.  Bytes after the last newline are a torn tail (a write that never completed, so no
command reported it as done): readers ignore them and the next writer truncates them away.  A
complete line whose checksum fails is damage in the middle: readers report it and still read every
checksum-valid record inside it (a newline flipped into another byte glues two records into one
line: both are valid), ``run-due`` refuses to run, and ``doctor --repair`` keeps every valid
record, restores one whose single flipped bit CRC-32 pinpoints, and moves the bytes that belong to
no record to ``quarantine/``.
"""

from __future__ import annotations

import errno
import os
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from kmpwm.core import schema
from kmpwm.core.exitcodes import JournalError, LockBusy
from kmpwm.storage.paths import Paths, prepare, private_subdir

FORMAT_VERSION = 1
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a write may be partial)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def encode(record: dict) -> bytes:
    payload = orjson.dumps(record)
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def decode(line: bytes) -> dict | None:
    """The record in one line (without its newline), or None if it fails its checksum."""
    if len(line) < 10 or line[8:9] != b" ":
        return None
    payload = line[9:]
    try:
        if int(line[:8], 16) != zlib.crc32(payload):
            return None
    except ValueError:
        return None
    return _loads(payload)


@dataclass
class Damage:
    start: int
    end: int
    torn: bool = False  # True: an incomplete last record, not damage in the middle
    salvaged: int = 0  # checksum-valid records found inside the region (kept, not damage)

    def describe(self) -> str:
        size = self.end - self.start
        if self.torn:
            return f"torn last record ({size} bytes at offset {self.start}; a write that never completed)"
        kept = f"; {self.salvaged} valid record(s) inside it kept" if self.salvaged else ""
        return f"corrupt record ({size} bytes at offset {self.start}{kept})"


@dataclass
class Scan:
    records: list[tuple[int, dict]] = field(default_factory=list)  # (offset after record, record)
    damage: list[Damage] = field(default_factory=list)  # corrupt complete lines
    torn: Damage | None = None
    end: int = 0  # offset after the last complete line


def salvage(data: bytes) -> list[tuple[int, int, dict]]:
    """Every checksum-valid record inside damaged bytes, wherever its line boundaries went: a
    newline flipped into another byte glues two records into one line, a byte flipped into a
    newline splits one.  Returns ``(start, end, record)`` (``end`` after the record's last payload
    byte), left to right, never overlapping.  A record starts with eight hex digits, a space and
    ``{``, and holds no newline; its end is the ``}`` where the checksum holds."""
    out: list[tuple[int, int, dict]] = []
    pos = 0
    while True:
        sep = data.find(b" {", pos + 8)
        if sep < 0:
            return out
        found = _record_at(data, sep)
        if found is None:
            pos = sep - 7  # the next place a checksum could start
            continue
        out.append(found)
        pos = found[1]


def _record_at(data: bytes, sep: int) -> tuple[int, int, dict] | None:
    """The record whose eight hex digits end at ``sep`` (its ``" {"``), if its checksum holds at
    one of the ``}`` on its line: ``(start, end, record)`` as :func:`salvage` gives them."""
    start = sep - 8
    head = data[start:sep]
    if not _HEX_DIGITS.issuperset(head):
        return None
    want = int(head, 16)
    stop = data.find(b"\n", sep)
    stop = len(data) if stop < 0 else stop
    crc, done = 0, sep + 1
    close = data.find(b"}", done, stop)
    while close >= 0:
        crc = zlib.crc32(data[done : close + 1], crc)
        done = close + 1
        if crc == want:
            record = _loads(data[sep + 1 : done])
            if record is not None:
                return start, done, record
        close = data.find(b"}", done, stop)
    return None


def _loads(payload: bytes) -> dict | None:
    try:
        record = orjson.loads(payload)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


_HEX_DIGITS = frozenset(b"0123456789abcdef")


def scan_bytes(data: bytes, base: int = 0) -> Scan:
    """Split ``data`` (the journal from offset ``base``) into records and damaged regions.

    The records checksum-valid inside a damaged region (:func:`salvage`) are records like any
    other; the region is still damage (a byte that belongs to no record, run-due refuses).  Bytes
    after the last newline are a torn tail, unless valid records stand in them with bytes after
    them: that is a flipped last newline, not a write that never completed, so it is damage too
    and the records count (a write that never completed never leaves bytes after a record that
    are not its newline)."""
    out = Scan(end=base)
    complete = data.rfind(b"\n") + 1  # the bytes before it are whole lines
    bad = _scan_lines(out, data, complete, base)
    end = complete
    if complete < len(data):
        if _flipped_last_newline(data[complete:]):
            bad = complete if bad < 0 else bad
            end = len(data)
        else:
            out.torn = Damage(base + complete, base + len(data), torn=True)
    if bad >= 0:
        _close_region(out, data, bad, end, base)
    out.end = base + end
    return out


def _flipped_last_newline(tail: bytes) -> bool:
    """Whether the bytes after the last newline hold valid records with bytes after them: a
    flipped last newline (damage), not a write that never completed (a torn tail)."""
    found = salvage(tail)
    return bool(found) and found[-1][1] < len(tail)


def _scan_lines(out: Scan, data: bytes, stop: int, base: int) -> int:
    """Add the records of the whole lines in ``data[:stop]`` to ``out``, and each damaged region
    a valid line ends; returns where a damaged region still open at ``stop`` starts (-1: none)."""
    pos, bad = 0, -1
    while pos < stop:
        nl = data.find(b"\n", pos)
        record = decode(data[pos:nl])
        if record is None:
            if bad < 0:
                bad = pos
        else:
            if bad >= 0:
                _close_region(out, data, bad, pos, base)
                bad = -1
            out.records.append((base + nl + 1, record))
        pos = nl + 1
    return bad


def _close_region(out: Scan, data: bytes, start: int, end: int, base: int) -> None:
    """Add the damaged region ``data[start:end]`` to ``out``, with the valid records inside it."""
    found = salvage(data[start:end])
    for _, rec_end, record in found:
        out.records.append((base + start + rec_end, record))
    out.damage.append(Damage(base + start, base + end, salvaged=len(found)))


# -- repair: what doctor --repair keeps -----------------------------------------------------

CORRECT_MAX = 1 << 22  # longest damaged line whose flipped bit is searched for (~1 s at worst)
_CRC_TABLE: list[int] = []
_CRC_TOP: dict[int, int] = {}
_CRC_BIT: dict[int, int] = {}


def _crc_tables() -> None:
    """The CRC-32 (zlib's, reflected 0xEDB88320) byte table, the index of each entry by its top
    byte (distinct for this polynomial: one step is invertible) and the entries of single bits."""
    _CRC_TABLE.extend(_crc_entry(i) for i in range(256))
    _CRC_TOP.update((r >> 24, i) for i, r in enumerate(_CRC_TABLE))
    _CRC_BIT.update((_CRC_TABLE[1 << b], b) for b in range(8))


def _crc_entry(byte: int) -> int:
    """The CRC-32 register after shifting ``byte`` through it: eight steps of the polynomial."""
    r = byte
    for _ in range(8):
        r = (r >> 1) ^ (0xEDB88320 if r & 1 else 0)
    return r


def _flipped_bit(payload: bytes, want: int) -> int | None:
    """The bit (``8 * byte + bit``) whose flip gives ``payload`` the CRC-32 ``want``, if one does.

    CRC-32 is linear: flipping bit ``b`` of byte ``j`` changes the CRC by the register value of
    that bit pushed through the ``len - 1 - j`` bytes after it, whatever the data.  So the
    difference is walked back one byte at a time (one table step, inverted) until it is a single
    bit's entry.  For lines under 512 MiB every single-bit error has its own difference (the code's
    Hamming distance is at least 3), so the answer is unique."""
    if not _CRC_TABLE:
        _crc_tables()
    diff = zlib.crc32(payload) ^ want
    table, top, bits = _CRC_TABLE, _CRC_TOP, _CRC_BIT
    for back in range(len(payload)):
        b = bits.get(diff)
        if b is not None:
            return 8 * (len(payload) - 1 - back) + b
        i = top[diff >> 24]
        diff = ((diff ^ table[i]) << 8) | i
    return None


def correct(line: bytes) -> tuple[dict, str] | None:
    """The record ``line`` held before exactly one of its bits flipped, if that is what happened.

    ``line`` is one damaged line, or the lines a byte flipped into a newline made of one record.
    The checksum field, the space or one payload bit may be the flipped one; the answer must pass
    the checksum and parse.  Returns the record and where the bit was, or None."""
    if not 10 <= len(line) <= CORRECT_MAX:
        return None
    fixed = _head_flip(line)
    if fixed is None:
        fixed = _payload_flip(line)
    return fixed


def _head_flip(line: bytes) -> tuple[dict, str] | None:
    """The record and where the bit was, if one flipped bit in the checksum or the space is all
    that is wrong with ``line``."""
    payload = line[9:]
    actual = b"%08x " % zlib.crc32(payload)
    wrong = [i for i in range(9) if line[i] != actual[i]]
    if len(wrong) != 1 or (line[wrong[0]] ^ actual[wrong[0]]).bit_count() != 1:
        return None
    record = _loads(payload)  # the payload is whole: the flip hit the checksum or the space
    if record is None:
        return None
    return record, f"one flipped bit in byte {wrong[0]} of the record"


def _payload_flip(line: bytes) -> tuple[dict, str] | None:
    """The record and where the bit was, if one flipped bit in the payload of ``line`` (whose
    checksum field is whole) is what is wrong with it."""
    if line[8:9] != b" " or not _HEX_DIGITS.issuperset(line[:8]):
        return None
    want = int(line[:8], 16)
    bit = _flipped_bit(line[9:], want)
    if bit is None:
        return None
    fixed = bytearray(line[9:])
    fixed[bit >> 3] ^= 1 << (bit & 7)
    if zlib.crc32(fixed) != want:
        return None
    record = _loads(bytes(fixed))
    if record is None or not isinstance(record.get("ops"), list):
        return None
    return record, f"one flipped bit in byte {9 + (bit >> 3)} of the record"


def _mend_gap(body: bytes) -> list[tuple[int, int, dict, str]]:
    """The records :func:`correct` restores in damaged bytes that hold no valid record: each of
    its lines alone or with the next (a byte flipped into a newline splits one record in two),
    also without a first or last byte (a newline flipped into it glued it to its neighbour)."""
    pieces, pos = [], 0
    for piece in body.split(b"\n"):
        pieces.append((pos, pos + len(piece)))
        pos += len(piece) + 1
    out, i = [], 0
    while i < len(pieces):
        step = 1
        for span in (1, 2)[: len(pieces) - i]:
            fixed = _correct_span(body, pieces[i][0], pieces[i + span - 1][1])
            if fixed is not None:
                lo, hi, (record, where) = fixed
                out.append((lo, hi, record, where))
                step = span
                break
        i += step
    return out


def _correct_span(body: bytes, start: int, end: int) -> tuple[int, int, tuple[dict, str]] | None:
    """What :func:`correct` restores in ``body[start:end]``, also without its first or last byte:
    ``(start, end, (record, where))`` of the bytes it used."""
    for lo, hi in ((0, 0), (1, 0), (0, 1)):
        fixed = correct(body[start + lo : end - hi])
        if fixed is not None:
            return start + lo, end - hi, fixed
    return None


@dataclass
class Mend:
    """What ``doctor --repair`` keeps and moves (see :func:`mend`)."""

    records: list[dict] = field(default_factory=list)  # every valid record, in journal order
    moved: list[tuple[int, int, str]] = field(default_factory=list)  # (start, end, kind) to quarantine
    salvaged: int = 0  # valid records found inside damaged lines
    corrected: list[dict] = field(default_factory=list)  # {"offset", "bit"}: records one flipped bit hid


def mend(data: bytes) -> Mend:
    """Every record the journal ``data`` holds, damage and all: the valid lines, the valid records
    inside damaged ones (:func:`salvage`), and a record one flipped bit damaged (:func:`correct`);
    and the bytes that belong to no record, to be kept in quarantine.  A corrected record's
    damaged bytes are kept there too.  Nothing valid is dropped."""
    scan = scan_bytes(data)
    out = Mend()
    placed = list(scan.records)
    for d in scan.damage:
        _mend_region(out, placed, data[d.start : d.end], d.start)
    if scan.torn is not None:
        out.moved.append((scan.torn.start, scan.torn.end, "torn"))
    placed.sort(key=lambda item: item[0])
    out.records = [r for _, r in placed]
    return out


def _mend_region(out: Mend, placed: list, region: bytes, offset: int) -> None:
    """One damaged region (at ``offset``) for :func:`mend`: the records salvaged or corrected in
    it join ``placed`` as ``(end, record)``, and the bytes between them are moved."""
    found = salvage(region)
    out.salvaged += len(found)
    for gs, ge in _gaps(found, len(region)):
        gap = region[gs:ge]
        body = gap.strip(b"\n")
        if not body:
            continue  # a record's own newline
        at = offset + gs + gap.index(body)  # the newlines around it only frame lines
        fixed = _mend_gap(body)
        for lo, hi, record, where in fixed:
            placed.append((at + hi, record))
            out.corrected.append({"offset": at + lo, "where": where})
        out.moved.append((at, at + len(body), "corrupt-mended" if fixed else "corrupt"))


def _first_record(line: bytes) -> dict | None:
    """The record at the start of ``line``: the line's own, or one whole inside a damaged line."""
    record = decode(line)
    if record is not None:
        return record
    found = salvage(line)
    return found[0][2] if found and found[0][0] == 0 else None


def _header_op(record: dict) -> dict | None:
    """The header op (``hdr``: the journal's generation) of a journal's first record, None if
    the record is not a header."""
    ops = record.get("ops")
    if ops and ops[0].get("op") == "hdr":
        return ops[0]
    return None


def _bad_checksums(data: bytes) -> list[Damage]:
    """The regions of the complete lines in ``data`` whose checksum fails (JSON not parsed)."""
    damage: list[Damage] = []
    pos, crc32, bad = 0, zlib.crc32, -1
    for line in data.split(b"\n")[:-1]:  # the last piece is after the last newline: not a record
        ok = len(line) > 9 and line[8:9] == b" "
        if ok:
            try:
                ok = int(line[:8], 16) == crc32(line[9:])
            except ValueError:
                ok = False
        if not ok and bad < 0:
            bad = pos
        elif ok and bad >= 0:
            damage.append(Damage(bad, pos))
            bad = -1
        pos += len(line) + 1
    if bad >= 0:
        damage.append(Damage(bad, pos))
    return damage


def _gaps(found: list[tuple[int, int, dict]], size: int) -> list[tuple[int, int]]:
    """The spans of a region of ``size`` bytes around and between the records ``found`` in it."""
    return list(zip([0] + [end for _, end, _ in found], [start for start, _, _ in found] + [size]))


def _add_damage(into: list[Damage], more: list[Damage]) -> None:
    """Append damaged regions, joining one that continues the last (split between two reads)."""
    for d in more:
        if into and into[-1].end == d.start:
            into[-1] = Damage(into[-1].start, d.end, salvaged=into[-1].salvaged + d.salvaged)
        else:
            into.append(d)


@contextmanager
def _journal_error(doing: str, hint: str | None = None) -> Iterator[None]:
    """An OSError in the block is raised as JournalError ``cannot <doing>: <reason>``."""
    try:
        yield
    except OSError as exc:
        raise JournalError(f"cannot {doing}: {exc.strerror}", hint=hint) from None


def lock_timeout() -> float:
    """``KMPWM_LOCK_TIMEOUT`` (seconds or a DUR, default 10s).  A value that is not a finite
    duration (``nan``, ``inf``, negative, garbage) is a configuration error (exit 78): guessing
    would either wait forever or not at all."""
    raw = os.environ.get("KMPWM_LOCK_TIMEOUT")
    if raw is None or raw.strip() == "":
        return 10.0
    from kmpwm.core.exitcodes import ConfigError, KmpwmError
    from kmpwm.core.timeparse import parse_duration

    try:
        return parse_duration(raw, what="KMPWM_LOCK_TIMEOUT")
    except KmpwmError as exc:
        raise ConfigError(exc.message, hint="unset it for the default of 10s") from None


class Journal:
    """The journal file of one home: reading needs no lock, appending needs :meth:`locked`."""

    def __init__(self, paths: Paths):
        self.paths = paths
        self.path = paths.journal_file
        self._lock_depth = 0
        self._prepared = False  # permissions checked and directories made, once per process

    # -- reading --------------------------------------------------------------------------

    def identity(self) -> tuple[int, int] | None:
        """(inode, size) of the journal file, None when it does not exist yet."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise JournalError(f"cannot read the journal {self.path}: {exc.strerror}") from None
        return st.st_ino, st.st_size

    def read(self, start: int = 0) -> tuple[Scan, int]:
        """Scan the journal from ``start``; returns the scan and the file's inode (0 if missing)."""
        ino, parts = self.read_parts(start)
        whole = Scan(end=start)
        for part in parts:
            whole.records += part.records
            _add_damage(whole.damage, part.damage)
            whole.torn, whole.end = part.torn, part.end
        return whole, ino

    def read_parts(
        self, start: int = 0, chunk: int = 1 << 24, expect_ino: int | None = None
    ) -> tuple[int, Iterator[Scan] | None]:
        """The journal from ``start`` as consecutive scans of about ``chunk`` bytes each (split at
        record boundaries; the last one carries the torn tail and the end), so that a reader can
        fold a journal of any size without holding all of its records at once.  Returns the
        file's inode (0 if missing) and the scans; the file is read as they are consumed.  The
        scans are None when the file is not the one ``expect_ino`` names."""
        fd = self._open_for_reading()
        if fd is None:
            return 0, iter((Scan(end=start),))
        try:
            ino = os.fstat(fd).st_ino
        except OSError as exc:
            os.close(fd)
            raise JournalError(f"cannot read the journal {self.path}: {exc.strerror}") from None
        if expect_ino is not None and ino != expect_ino:
            os.close(fd)
            return ino, None
        return ino, self._parts(fd, start, chunk)

    def _open_for_reading(self) -> int | None:
        """The journal opened to read (None: there is none yet)."""
        hint = "check that it is a regular file you own"
        with _journal_error(f"open the journal {self.path}", hint), suppress(FileNotFoundError):
            return os.open(self.path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
        return None

    def _parts(self, fd: int, start: int, chunk: int) -> Iterator[Scan]:
        try:
            if start:
                os.lseek(fd, start, os.SEEK_SET)
            pos, carry = start, b""
            for data in self._chunks(fd, chunk):
                buf = carry + data if carry else data
                nl = buf.rfind(b"\n")
                if nl < 0:
                    carry = buf
                    continue
                carry = buf[nl + 1 :]
                part = scan_bytes(buf[: nl + 1], pos)
                pos += nl + 1
                yield part
            yield scan_bytes(carry, pos)  # whatever follows the last newline: a torn tail
        finally:
            os.close(fd)

    def _chunks(self, fd: int, size: int) -> Iterator[bytes]:
        """The file's bytes from ``fd``'s offset to its end, ``size`` at a time."""
        while True:
            with _journal_error(f"read the journal {self.path}"):
                data = os.read(fd, size)
            if not data:
                return
            yield data

    def verify(self, end: int) -> list[Damage]:
        """Checksums of every complete line before ``end``, without parsing JSON: the damage found."""
        return _bad_checksums(self._head(end))

    def _head(self, end: int) -> bytes:
        """The journal's first ``end`` bytes."""
        with _journal_error(f"read the journal {self.path}"), open(self.path, "rb") as fh:
            return fh.read(end)

    def raw_from(self, start: int) -> bytes | None:
        """The journal's bytes from ``start`` to its end, unparsed; None if it is missing or
        cannot be read."""
        try:
            fd = os.open(self.path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
        except OSError:
            return None
        try:
            with os.fdopen(fd, "rb") as fh:
                fh.seek(start)
                return fh.read()
        except OSError:
            return None

    def header(self) -> dict | None:
        """The first record (it names the journal's generation), None if missing or damaged."""
        try:
            with open(self.path, "rb") as fh:
                line = fh.readline(1 << 16)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise JournalError(f"cannot read the journal {self.path}: {exc.strerror}") from None
        if not line.endswith(b"\n"):
            return None
        record = _first_record(line[:-1])
        return None if record is None else _header_op(record)

    # -- writing --------------------------------------------------------------------------

    @contextmanager
    def locked(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the writers' lock (portalocker's flock on ``journal/lock``); re-entrant.

        Waits up to ``KMPWM_LOCK_TIMEOUT`` seconds (default 10), then raises LockBusy (exit 75).
        The lock file is opened per transaction so that no lock descriptor is inherited by
        worker processes forked between transactions.
        """
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        if not self._prepared:
            prepare(self.paths)
            self._prepared = True
        if timeout is None:
            timeout = lock_timeout()
        fh = self._open_lock_file()
        try:
            _wait_for_lock(fh, timeout)
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0
                with suppress(Exception):
                    _unlock(fh)
        finally:
            fh.close()

    def _open_lock_file(self):
        with _journal_error(f"open the lock file {self.paths.lock_file}"):
            fd = os.open(self.paths.lock_file, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
        return os.fdopen(fd, "r+b")

    def _open_for_append(self) -> tuple[int, bool]:
        hint = "it must be a regular file you own (not a symlink)"
        with _journal_error(f"open the journal {self.path} for writing", hint), suppress(FileNotFoundError):
            return os.open(self.path, os.O_RDWR | os.O_APPEND | _O_NOFOLLOW | _O_CLOEXEC), False
        with _journal_error(f"create the journal {self.path}"):
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
        return fd, True

    def append(self, records: list[dict]) -> int:
        """Append records durably (write, fsync); the caller holds :meth:`locked`.

        Repairs a torn tail first. On failure the file is truncated back, so a failed append
        leaves no partial record.  Returns the offset after the last record written.
        """
        assert self._lock_depth, "append without the journal lock"
        fd, created = self._open_for_append()
        try:
            size = self._repair_torn_tail(fd, os.fstat(fd).st_size)
            if size == 0:  # a new journal (or one whose only record was torn) starts with its header
                records = [_new_header(), *records]
            blob = b"".join(encode(r) for r in records)
            self._write_or_cut_back(fd, blob, size)
            if created:
                _fsync_dir(self.path.parent)
            return size + len(blob)
        finally:
            os.close(fd)

    def _write_or_cut_back(self, fd: int, blob: bytes, size: int) -> None:
        """Write ``blob`` durably after ``size`` bytes; on failure cut the file back to ``size``."""
        try:
            write_all(fd, blob)
            _datasync(fd)
        except OSError as exc:
            with suppress(OSError):  # if this fails too, the next writer trims the torn tail
                os.ftruncate(fd, size)
                os.fsync(fd)
            err = JournalError(
                f"cannot write to the journal {self.path}: {_reason(exc)}",
                hint="this record was not written; free space or fix the file system, then try again",
            )
            err.errno = exc.errno  # run-due makes room for results on ENOSPC (reserve.py)
            raise err from None

    def _repair_torn_tail(self, fd: int, size: int) -> int:
        """If the file does not end with a newline, keep the torn bytes in quarantine and cut them off."""
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return size
        pos = _last_line_start(fd, size)
        torn = os.pread(fd, size - pos, pos)
        if _flipped_last_newline(torn):
            # Readers count its records (scan_bytes), so they stay; ending the damaged line keeps it
            # damage for `doctor --repair` to mend, and the records after it start on a line of their own.
            with _journal_error(f"write to the journal {self.path}"):
                write_all(fd, b"\n")
            return size + 1
        self.quarantine(torn, pos, "torn")
        with _journal_error(f"repair the torn end of the journal {self.path}"):
            os.ftruncate(fd, pos)
            os.fsync(fd)
        return pos

    def quarantine(self, data: bytes, offset: int, kind: str) -> Path:
        """Keep damaged bytes in ``journal/quarantine/`` so that nothing is ever silently dropped."""
        qdir = private_subdir(self.paths.quarantine_dir)
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{kind}-at-{offset}-{uuid.uuid4().hex[:6]}.bin"
        path = qdir / name
        try:
            _write_new(path, data)
        except OSError as exc:
            raise JournalError(
                f"cannot keep damaged bytes in {qdir}: {_reason(exc)}",
                hint="nothing was changed; free space, then try again",
            ) from None
        return path

    def sweep_temp_files(self) -> list[str]:
        """Remove what killed writers left: temp files of journal rewrites (made only under the
        lock, so any seen while holding it is stale) and of snapshots whose writer is gone."""
        assert self._lock_depth, "sweep without the journal lock"
        removed = []
        try:
            names = os.listdir(self.paths.journal_dir)
        except OSError:
            return removed
        for name in filter(self._stale_temp_file, names):
            with suppress(OSError):
                os.unlink(self.paths.journal_dir / name)
                removed.append(name)
        return removed

    def _stale_temp_file(self, name: str) -> bool:
        """A journal rewrite's temp file (any is stale under the lock), or a snapshot's whose writer is gone."""
        if not (name.startswith(".") and name.endswith(".tmp")):
            return False
        if name.startswith(f".{self.path.name}."):
            return True
        parts = name.split(".")  # .journal.log.<pid>.<rand>.tmp / .state.snap.<pid>.<rand>.tmp
        if len(parts) < 5 or not parts[-3].isdigit():
            return False
        from kmpwm.platform import procs

        return procs.token(int(parts[-3])) is None

    def rewrite(self, records: list[dict], *, compacted_size: int | None = None) -> None:
        """Atomically replace the journal with a new generation holding ``records`` (caller locked)."""
        assert self._lock_depth, "rewrite without the journal lock"
        header = _new_header(compacted_size)
        atomic_write(self.path, b"".join(encode(r) for r in [header, *records]))


def _new_header(compacted_size: int | None = None) -> dict:
    """The first record of a new journal generation (named by a new id)."""
    hdr = schema.header(uuid.uuid4().hex, FORMAT_VERSION)
    if compacted_size is not None:
        hdr["compacted_size"] = compacted_size  # automatic compaction waits until the journal doubles
    return {"ts": time.time(), "ops": [hdr]}


# The writers' lock is portalocker's POSIX lock: an exclusive flock(2) on journal/lock.  On POSIX
# it is taken with fcntl.flock directly -- the very call portalocker makes there, so it excludes
# and is excluded by a portalocker.lock() on the same file -- because importing portalocker 4
# costs ~15 ms (it reads its version through importlib.metadata), a fifth of a whole idle
# `kmpwm run-due`.  Elsewhere portalocker does it.
try:
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - not POSIX
    _fcntl = None


def _try_lock(fh) -> bool:
    if _fcntl is not None:
        try:
            _fcntl.flock(fh.fileno(), _fcntl.LOCK_EX | _fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
    import portalocker  # pragma: no cover - not POSIX

    try:  # pragma: no cover
        portalocker.lock(fh, portalocker.LockFlags.EXCLUSIVE | portalocker.LockFlags.NON_BLOCKING)
        return True
    except portalocker.exceptions.LockException:  # pragma: no cover
        return False


def _wait_for_lock(fh, timeout: float) -> None:
    """Take the lock on ``fh``, polling with growing pauses; LockBusy after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pause = 0.002
    while not _try_lock(fh):
        if time.monotonic() >= deadline:
            raise LockBusy(
                f"the journal is locked by another kmpwm process (waited {timeout:g}s)",
                hint="try again; set KMPWM_LOCK_TIMEOUT to wait longer",
            ) from None
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def _unlock(fh) -> None:
    if _fcntl is not None:
        _fcntl.flock(fh.fileno(), _fcntl.LOCK_UN)
        return
    import portalocker  # pragma: no cover - not POSIX

    portalocker.unlock(fh)  # pragma: no cover


def _last_line_start(fd: int, size: int) -> int:
    """Where the file's last line begins: after its last newline (0 if it has none)."""
    pos, step = size, 1 << 16
    while pos > 0:
        start = max(0, pos - step)
        nl = os.pread(fd, pos - start, start).rfind(b"\n")
        if nl >= 0:
            return start + nl + 1
        pos = start
    return 0


def _reason(exc: OSError) -> str:
    """An OSError's text, saying so when the disk is full."""
    return exc.strerror + (" (disk full)" if exc.errno == errno.ENOSPC else "")


def _datasync(fd: int) -> None:
    """Make appended bytes durable: data and the new size (fdatasync where there is one)."""
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def _fsync_dir(path: Path) -> None:
    try:
        dfd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with suppress(OSError):
            os.fsync(dfd)
    finally:
        os.close(dfd)


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (never an existing file, never through a symlink), 0600, with ``data``
    written and fsynced; on failure nothing is left behind and the OSError propagates."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    except OSError:
        os.close(fd)
        with suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, rename,
    directory fsync.  A crash leaves either the old file or the new one, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        _write_new(tmp, data)
        os.replace(tmp, path)
    except OSError as exc:
        with suppress(OSError):
            os.unlink(tmp)
        raise JournalError(
            f"cannot write {path}: {_reason(exc)}",
            hint="the previous file is unchanged",
        ) from None
    _fsync_dir(path.parent)
