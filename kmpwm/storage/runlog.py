"""Every run's output, kept per run (SPEC section 10), and where a running run reports progress.

Under the log directory::

    logs/runs/index.jsonl       one line when a run starts, one when it ends (appended in batches)
    logs/runs/KEY.out           the run's output, stdout and stderr interleaved (only if it wrote any)
    logs/runs/KEY.progress      its progress (only if it reported any; kmpwm.storage.progress)

KEY is unique per run (start time, run-due's pid, a counter).  Creating files is what costs on a
busy disk, so a run that prints nothing creates none: its start and end are lines in the index,
written once per batch of runs.  A run's number N (its id's N-th run, from 1 in start order) is
its place among the id's start lines; the retention sweep writes N into the lines it keeps.

run-due writes output to the file as it arrives (nothing accumulates in memory): once the file
passes CAP bytes it becomes ``KEY.out.1`` and a new ``KEY.out`` begins, so at most 2 x CAP bytes
are on disk during a run; when the run ends the last CAP bytes are kept and the run is marked
truncated.  ``kmpwm logs --follow`` notices the switch as ``tail -F`` does.

Retention: a run is kept as long as its events are (the retention window) and always for a
task's last KEEP runs; ``sweep`` applies it (compaction calls it).
"""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path

CAP = 1 << 20
KEEP = 5
RUNS_DIR = "runs"
INDEX = "index.jsonl"
_NEW = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def runs_dir(paths) -> Path:
    return Path(paths.log_dir) / RUNS_DIR


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    from kmpwm.core.timeparse import iso

    return iso(ts)


_ready: set = set()


def prepare(paths) -> Path:
    """The private runs directory (checked once per process)."""
    d = runs_dir(paths)
    if d not in _ready:
        from kmpwm.storage.paths import private_log_dir, private_subdir

        private_log_dir(paths)
        private_subdir(d)
        _ready.add(d)
    return d


def append_index(paths, lines: list[bytes]) -> None:
    """Append lines to the index in one write, under a shared lock (the sweep takes it exclusive,
    so that a rewrite never loses a line)."""
    import fcntl

    path = prepare(paths) / INDEX
    data = b"".join(lines)
    for _ in range(5):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                if os.stat(path).st_ino != os.fstat(fd).st_ino:
                    continue  # swept and replaced meanwhile: append to the new one
            except FileNotFoundError:
                continue
            os.write(fd, data)
            return
        finally:
            os.close(fd)


class RunLog:
    """One run's output, written by run-due as the worker's output arrives."""

    __slots__ = ("dir", "key", "task_id", "fd", "size", "rotated", "progress", "written", "total", "live")

    def __init__(self, d: str, key: str, task_id: str):
        self.dir, self.key, self.task_id = d, key, task_id  # plain strings: this runs per task
        self.fd = -1
        self.size = 0
        self.rotated = False
        self.written = False
        self.progress = f"{d}/{key}.progress"
        self.total = 0  # bytes of output so far
        self.live: bytearray | None = None  # a shared store: output not yet sent to it (Starter)

    def start_line(self, attempt: int, started: float, pid: int, token) -> bytes:
        import orjson

        return (
            orjson.dumps(
                {
                    "s": self.key,
                    "id": self.task_id,
                    "attempt": attempt,
                    "at": round(started, 3),
                    "pid": pid,
                    "token": token,
                }
            )
            + b"\n"
        )

    def end_line(self, status: str, finished: float) -> bytes:
        import orjson

        return (
            orjson.dumps(
                {
                    "e": self.key,
                    "id": self.task_id,
                    "status": status,
                    "at": round(finished, 3),
                    "truncated": self.rotated,
                }
            )
            + b"\n"
        )

    def write(self, chunk: bytes) -> None:
        if self.fd < 0 and not self._open():
            return  # could not be opened: the run goes on without it
        try:
            os.write(self.fd, chunk)  # a regular file: the whole chunk
        except OSError:
            return
        self.size += len(chunk)
        self.total += len(chunk)
        if self.live is not None:
            self.live += chunk
        if self.size > CAP:
            self._rotate()

    def _open(self) -> bool:
        """Create the output file at the run's first output (once: False if it cannot be)."""
        if self.written:
            return False
        self.written = True
        try:
            self.fd = os.open(f"{self.dir}/{self.key}.out", _NEW, 0o600)
        except OSError:
            return False
        return True

    def _rotate(self) -> None:
        cur = f"{self.dir}/{self.key}.out"
        try:
            os.replace(cur, cur + ".1")
            os.close(self.fd)
            self.fd = os.open(cur, _NEW, 0o600)
        except OSError:
            self.fd = -1
            return
        self.size = 0
        self.rotated = True

    def close(self) -> None:
        """The run ended: close its output, keeping the last CAP bytes."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.rotated:
            with suppress(OSError):
                _join(Path(self.dir), self.key)


def _join(d: Path, key: str) -> None:
    cur, old = d / f"{key}.out", d / f"{key}.out.1"
    with open(cur, "rb") as fh:
        tail = fh.read()
    need = CAP - len(tail)
    head = b""
    if need > 0:
        with open(old, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - need))
            head = fh.read()
    tmp = d / f"{key}.out.tmp"
    fd = os.open(tmp, _NEW, 0o600)
    try:
        os.write(fd, head + tail[-CAP:])
    finally:
        os.close(fd)
    os.replace(tmp, cur)
    os.unlink(old)


FLUSH_EVERY = 0.1  # index lines wait at most this long, so that a busy run-due writes ~10 times a second
LIVE_EVERY = 1.0  # a shared store: a running run's new output is sent this often (logs --follow elsewhere)


class Starter:
    """run-due's side: new RunLogs, their index lines batched (one write per FLUSH_EVERY)."""

    def __init__(self, paths, pid: int, token, store=None, host: str = ""):
        self.paths, self.pid, self.token = paths, pid, token
        self.store, self.host = store, host  # a shared store: runs are numbered and kept there too
        self.starts: list = []
        self.start_error: Exception | None = None
        self.dir: str | None = None
        self.count = 0
        self.pending: list[bytes] = []
        self.last = 0.0
        self.live: list[RunLog] = []  # a shared store: the runs whose output goes to it as it comes
        self.live_last = 0.0

    def start(self, task_id: str, attempt: int, started: float) -> RunLog | None:
        try:
            if self.dir is None:
                self.dir = str(prepare(self.paths))
        except Exception:
            return None
        self.count += 1
        log = RunLog(self.dir, f"{int(started * 1000)}-{self.pid}-{self.count}", task_id)
        self.pending.append(log.start_line(attempt, started, self.pid, self.token))
        if self.store is not None:
            self.starts.append((task_id, f"{self.host}:{log.key}", self.host, attempt, started))
            log.live = bytearray()
            self.live.append(log)
        return log

    def flush_starts(self) -> None:
        """Tell a shared store which runs started (before any of them is said to have ended)."""
        if self.starts:
            starts, self.starts = self.starts, []
            try:
                self.store.start_runs(starts)
            except Exception as exc:  # the runs go on; `kmpwm logs` elsewhere misses their start
                self.start_error = exc  # the runner says so (runlog never prints)

    def end(self, log: RunLog, status: str, finished: float, progress: bool) -> None:
        """The run's result is durable: close its output, drop its progress (``progress``: it may
        have some), and say how it ended in the index."""
        if log.live is not None:
            log.live = None  # its whole output goes to the store with its result (shared_row)
            self.live.remove(log)
        self.pending.append(log.end_line(status, finished))
        if log.rotated:
            # Its file is about to be rewritten down to the last CAP bytes (a new inode): say
            # first that the run ended, or `logs --follow` would take the rewrite for a rotation
            # and print that last MiB again.
            self.flush(force=True)
        log.close()
        if progress:
            with suppress(OSError):
                os.unlink(log.progress)

    def flush(self, force: bool = False) -> float | None:
        """Write the waiting lines if FLUSH_EVERY has passed (or ``force``), and send running
        runs' new output to a shared store every LIVE_EVERY; returns how long until what still
        waits is due (None: nothing waits)."""
        import time

        now = time.monotonic()
        later = self._send_live(now) if self.live else None
        if not self.pending:
            return later
        if not force and now - self.last < FLUSH_EVERY:
            wait = self.last + FLUSH_EVERY - now
            return wait if later is None else min(wait, later)
        self.last = now
        self.flush_starts()
        lines, self.pending = self.pending, []
        with suppress(Exception):  # the runs go on; only their record in the index is lost
            append_index(self.paths, lines)
        return later

    def _send_live(self, now: float) -> float | None:
        """Running runs' output since the last send, to the shared store (``kmpwm logs --follow``
        on another host reads it); returns how long until the next send is due (None: nothing
        waits).  Best effort: what cannot be sent now goes with the run's result."""
        if not any(log.live for log in self.live):
            return None
        if now - self.live_last < LIVE_EVERY:
            return self.live_last + LIVE_EVERY - now
        self.live_last = now
        rows = [(bytes(log.live), log.total, log.task_id, f"{self.host}:{log.key}") for log in self.live if log.live]
        for log in self.live:
            log.live.clear()
        with suppress(Exception):
            self.flush_starts()  # a run's row exists before its output is added to it
            self.store.append_output(rows)
        return None


# -- reading ---------------------------------------------------------------------------------


def _scan(paths, wanted: set | None = None) -> dict:
    """Runs by task id from the index: {id: [meta, ...]} in start order (only ``wanted`` ids)."""
    import orjson

    try:
        data = (runs_dir(paths) / INDEX).read_bytes()
    except OSError:
        return {}
    if wanted is None:
        by_id = _fold_index(data.splitlines())
    else:
        found = _fold_index(_lines(data, [b'"id":' + orjson.dumps(i) for i in wanted]))
        by_id = {k: v for k, v in found.items() if k in wanted}
    _expire_dead(paths, by_id)
    return by_id


def _fold_index(lines) -> dict:
    """{id: [meta, ...]} from index lines: a start line makes a run's meta, its end line completes it."""
    import orjson

    by_id: dict = {}
    by_key: dict = {}
    for line in lines:
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # a torn line (a crash mid-append)
        if "s" in rec:
            lst = by_id.setdefault(rec.get("id"), [])
            meta = _start_meta(rec, lst[-1]["run"] + 1 if lst else 1)
            lst.append(meta)
            by_key[rec["s"]] = meta
        elif "e" in rec and rec["e"] in by_key:
            _end_meta(by_key[rec["e"]], rec)
    return by_id


def _start_meta(rec: dict, next_run: int) -> dict:
    """A run's meta from its start line (numbered ``next_run`` unless the line says)."""
    return {
        "run": rec.get("n") or next_run,
        "attempt": rec.get("attempt"),
        "started_at": _iso(rec.get("at")),
        "finished_at": None,
        "status": "RUNNING",
        "truncated": False,
        "key": rec["s"],
        "pid": rec.get("pid"),
        "token": rec.get("token"),
        "_start": rec.get("at"),
    }


def _end_meta(meta: dict, rec: dict) -> None:
    """A run's meta completed from its end line."""
    meta.update(
        status=rec.get("status"),
        finished_at=_iso(rec.get("at")),
        truncated=bool(rec.get("truncated")),
        _end=rec.get("at"),
    )


def _expire_dead(paths, by_id: dict) -> None:
    """Runs whose run-due died never reached a result: EXPIRED, ended when they last wrote."""
    running = [meta for lst in by_id.values() for meta in lst if meta["status"] == "RUNNING"]
    if not running:
        return
    from functools import cache

    from kmpwm.platform.procs import alive

    alive_now = cache(alive)  # many runs of one run-due: asked once
    for meta in running:
        if not alive_now(meta["pid"], meta["token"]):
            meta["status"] = "EXPIRED"
            meta["_end"] = _last_written(paths, meta)  # (the retention sweep writes it into the end line)
            meta["finished_at"] = _iso(meta["_end"])


def _last_written(paths, meta: dict) -> float:
    """When a run's output was last written, as far as anyone can tell (no output: its start)."""
    try:
        return out_path(paths, meta).stat().st_mtime
    except OSError:
        return meta["_start"]


def _lines(data: bytes, needles: list[bytes]):
    """The index's lines that hold one of ``needles``, in file order (found with bytes.find, so
    a large index is not split line by line to find one task's runs)."""
    starts = set()
    for needle in needles:
        at = data.find(needle)
        while at >= 0:
            starts.add(data.rfind(b"\n", 0, at) + 1)
            at = data.find(needle, at + len(needle))
    out = []
    for start in sorted(starts):
        end = data.find(b"\n", start)
        out.append(data[start:] if end < 0 else data[start:end])
    return out


def runs(paths, task_id: str) -> list[dict]:
    """The kept runs of ``task_id`` (oldest first), each its meta.  On a shared store (SPEC
    section 14) every host's runs, from the store: its run table numbers them and keeps the
    output of those that ended; a run still marked RUNNING that a later run followed, or whose
    runner on this host is gone, ended without a result (EXPIRED)."""
    from kmpwm.storage.stores import store_url

    local = _scan(paths, {task_id}).get(task_id, [])
    if store_url(paths) is None:
        return local
    from kmpwm.platform.procs import host
    from kmpwm.storage.stores import open_store

    store = open_store(paths)
    mine = {f"{host()}:{m['key']}": m for m in local}
    rows = store.runs(task_id)
    return [_shared_meta(r, mine.get(r["key"]), n + 1 < len(rows), store, task_id) for n, r in enumerate(rows)]


def _shared_meta(r: dict, local: dict | None, followed: bool, store, task_id: str) -> dict:
    """One row of ``store``'s run table as a meta (``local``: its meta if it ran on this host;
    ``followed``: a later run exists)."""
    status, finished = _shared_end(r, local, followed)
    meta = {
        "run": r["run"],
        "attempt": r["attempt"],
        "started_at": _iso(r["started"]),
        "finished_at": _iso(finished),
        "status": status,
        "truncated": r["truncated"],
        "key": r["key"],
        "host": r["host"],
        "_start": r["started"],
    }
    if r["status"] == "RUNNING" and local is not None:
        # it ran here and never reached a result: its output is this host's file (followable)
        meta.update(key=local["key"], pid=local["pid"], token=local["token"])
    else:
        meta.update(_store=store, _task=task_id)
    return meta


def _shared_end(r: dict, local: dict | None, followed: bool) -> tuple:
    """(status, finished) of a run-table row: one still marked RUNNING that a later run followed,
    or that ended on this host without a result, is EXPIRED."""
    if r["status"] == "RUNNING" and (followed or (local is not None and local["status"] != "RUNNING")):
        return "EXPIRED", (local or {}).get("_end") or r["started"]
    return r["status"], r["finished"]


def shared_row(log: RunLog, host: str, attempt: int, started: float, finished: float, row: dict) -> tuple:
    """A finished run for a shared store's run table (``PgStore.save_runs``)."""
    try:
        out = Path(f"{log.dir}/{log.key}.out").read_bytes()[-CAP:]
    except OSError:
        out = b""
    return (
        log.task_id,
        f"{host}:{log.key}",
        host,
        attempt,
        started,
        finished,
        row["status"],
        log.rotated,
        out,
        log.total,
    )


def running_runs(paths, task_ids) -> dict:
    """{id: meta of its run in progress} for those of ``task_ids`` that have one."""
    if not task_ids:
        return {}
    out = {}
    for tid, lst in _scan(paths, set(task_ids)).items():
        if lst and lst[-1]["status"] == "RUNNING":
            out[tid] = lst[-1]
    return out


def out_path(paths, meta: dict) -> Path:
    return runs_dir(paths) / f"{meta['key']}.out"


def progress_path(paths, meta: dict) -> Path:
    return runs_dir(paths) / f"{meta['key']}.progress"


def output(paths, meta: dict) -> bytes:
    if "_store" in meta:
        return meta["_store"].run_output(meta["_task"], meta["key"])
    try:
        return out_path(paths, meta).read_bytes()
    except OSError:
        return b""


# -- retention -------------------------------------------------------------------------------


def _orphans(d: Path, by_id: dict, cutoff: float) -> None:
    """Output files no index line names (their run-due was killed before it wrote the run's
    line), once older than the window."""
    known = {m["key"] for lst in by_id.values() for m in lst}
    try:
        names = os.listdir(d)
    except OSError:
        return
    for name in names:
        if not (name.startswith(INDEX) or name.split(".", 1)[0] in known):
            _unlink_if_older(d / name, cutoff)


def _unlink_if_older(path: Path, cutoff: float) -> None:
    """Delete ``path`` if it was last written before ``cutoff`` (if it can be)."""
    with suppress(OSError):
        if os.stat(path).st_mtime < cutoff:
            os.unlink(path)


def sweep(paths, cutoff: float, keep: int = KEEP) -> int:
    """Delete runs that ended before ``cutoff``, except each task's last ``keep``; rewrite the
    index with the rest (their numbers written out).  Returns how many runs were deleted."""
    import fcntl

    d = runs_dir(paths)
    path = d / INDEX
    try:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return 0
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        by_id = _scan(paths)
        lines, dropped = _partition(by_id, cutoff, keep)
        _orphans(d, by_id, cutoff)
        if not dropped:
            return 0
        _replace_index(path, lines)
        for meta in dropped:
            for suffix in (".out", ".out.1", ".progress"):
                with suppress(OSError):
                    os.unlink(d / f"{meta['key']}{suffix}")
        return len(dropped)
    finally:
        os.close(fd)


def _partition(by_id: dict, cutoff: float, keep: int) -> tuple[list, list]:
    """(the index lines of the runs kept, each with the time it sorts by; the runs to delete)."""
    lines, dropped = [], []
    for tid, lst in by_id.items():
        for i, meta in enumerate(lst):
            if _ended_before(meta, cutoff) and i < len(lst) - keep:
                dropped.append(meta)
            else:
                lines += _index_lines(tid, meta)
    return lines, dropped


def _ended_before(meta: dict, cutoff: float) -> bool:
    ended = meta.get("_end") or (None if meta["status"] == "RUNNING" else meta.get("_start"))
    return ended is not None and ended < cutoff


def _index_lines(tid: str, meta: dict) -> list[tuple[float, bytes]]:
    """A kept run's start line (its number written out) and, if it ended, its end line."""
    import orjson

    start = {
        "s": meta["key"],
        "id": tid,
        "n": meta["run"],
        "attempt": meta["attempt"],
        "at": meta.get("_start"),
        "pid": meta["pid"],
        "token": meta["token"],
    }
    lines = [(meta.get("_start") or 0, orjson.dumps(start) + b"\n")]
    if meta["status"] != "RUNNING":
        end = {
            "e": meta["key"],
            "id": tid,
            "status": meta["status"],
            "at": meta.get("_end"),
            "truncated": meta["truncated"],
        }
        lines.append((meta.get("_end") or meta.get("_start") or 0, orjson.dumps(end) + b"\n"))
    return lines


def _replace_index(path: Path, lines: list[tuple[float, bytes]]) -> None:
    """Replace the index with ``lines`` in time order (temp file, fsync, rename)."""
    lines.sort(key=lambda x: x[0])
    tmp = path.with_name(INDEX + ".tmp")
    out = os.open(tmp, _NEW, 0o600)
    try:
        os.write(out, b"".join(line for _, line in lines))
        os.fsync(out)
    finally:
        os.close(out)
    os.replace(tmp, path)
