"""``kmpwm logs ID [--run N | --all] [--tail LINES] [--follow]``: the kept output of a task's runs
(SPEC section 10).  ``--follow`` reads the running run's file as run-due writes it (following its
rotation past 1 MiB like ``tail -F``) and returns when the run ends."""

from __future__ import annotations

import functools
import os
import sys
import time

from kmpwm.core.exitcodes import InvalidParams, NothingMatched
from kmpwm.storage import runlog
from kmpwm.storage.paths import Paths, check_all

POLL = 0.1
STORE_POLL = 0.25  # following a run on another host: the store's copy of its output, this often
SETTLE = 5.0  # the task ended: wait this long at most for its run's last output to reach the store


def _tail(data: bytes, lines: int | None) -> bytes:
    if lines is None:
        return data
    if lines == 0:
        return b""
    parts = data.splitlines(keepends=True)
    return b"".join(parts[-lines:])


def _header(meta: dict) -> str:
    bits = [
        f"run {meta['run']}",
        f"attempt {meta.get('attempt')}",
        str(meta.get("status")),
        f"started {meta.get('started_at')}",
    ]
    if meta.get("finished_at"):
        bits.append(f"finished {meta['finished_at']}")
    if meta.get("truncated"):
        bits.append("truncated: only the last 1 MiB kept")
    return "==> " + ", ".join(bits) + " <=="


def _doc(meta: dict, out: bytes) -> dict:
    return {
        "run": meta["run"],
        "attempt": meta.get("attempt"),
        "started_at": meta.get("started_at"),
        "finished_at": meta.get("finished_at"),
        "status": meta.get("status"),
        "output": out.decode("utf-8", "replace"),
        "truncated": bool(meta.get("truncated")),
    }


def logs_command(
    paths: Paths, task_id: str, run: int | None, all_: bool, tail: int | None, follow: bool, as_json: bool
) -> int:
    from kmpwm.cli.output import print_json

    check_all(paths)
    _check_options(run, all_, follow)
    chosen = _chosen_runs(runlog.runs(paths, task_id), task_id, run, all_)
    if follow and "_store" not in chosen[0]:
        return _follow(paths, task_id, chosen[0], tail, as_json)
    if follow and chosen[0]["status"] == "RUNNING":  # running on another host: from the store
        return _follow_store(paths, task_id, chosen[0], tail, as_json)
    outs = [_tail(runlog.output(paths, m), tail) for m in chosen]
    if as_json:
        print_json({"id": task_id, "runs": [_doc(m, o) for m, o in zip(chosen, outs)]})
    else:
        _write_outputs(chosen, outs, all_)
    return 0


def _check_options(run: int | None, all_: bool, follow: bool) -> None:
    """--all shows every run: it goes with neither --run nor --follow."""
    if run is not None and all_:
        raise InvalidParams("give --run N or --all, not both")
    if follow and all_:
        raise InvalidParams("--follow follows one run: give it without --all")


def _write_outputs(chosen: list[dict], outs: list[bytes], all_: bool) -> None:
    """The runs' output on stdout as it was written: with ``all_``, each run under a header line
    and ending with a newline; else a note on stderr when the run's output was truncated."""
    out = sys.stdout.buffer
    for m, o in zip(chosen, outs):
        if all_:
            out.write((_header(m) + "\n").encode())
        elif m.get("truncated"):
            sys.stderr.write(f"kmpwm: run {m['run']}'s output was truncated: only its last 1 MiB was kept\n")
        out.write(o)
        if all_ and o and not o.endswith(b"\n"):
            out.write(b"\n")
    out.flush()


def _chosen_runs(metas: list[dict], task_id: str, run: int | None, all_: bool) -> list[dict]:
    """The kept runs asked for: run N, all of them, or the last (NothingMatched if none)."""
    if not metas:
        raise NothingMatched(f"no kept run of task {task_id!r}")
    if all_:
        return metas
    if run is None:
        return metas[-1:]
    return _numbered(metas, task_id, run)


def _numbered(metas: list[dict], task_id: str, run: int) -> list[dict]:
    """Run ``run`` among the kept runs (NothingMatched, naming the kept ones, if it is not kept)."""
    chosen = [m for m in metas if m["run"] == run]
    if not chosen:
        raise NothingMatched(
            f"task {task_id!r} has no kept run {run} (kept: {', '.join(str(m['run']) for m in metas)})"
        )
    return chosen


def _follow_store(paths: Paths, task_id: str, meta: dict, tail: int | None, as_json: bool) -> int:
    """A run on another host (a shared store): its output as that host sends it (every second
    while it comes), until the run ends."""
    from kmpwm.cli.output import print_json

    reader = _StoreRun(paths, task_id, meta)
    got = bytearray()
    try:
        chunk = _tail(reader.read(), tail)  # what it wrote so far
        while True:
            got += chunk
            if chunk and not as_json:
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
            if reader.over():
                break
            time.sleep(STORE_POLL)
            chunk = reader.read()
    except KeyboardInterrupt:
        return 0
    if as_json:
        current = _current(paths, task_id, meta)
        print_json({"id": task_id, "runs": [_doc(current or meta, _tail(bytes(got), tail))]})
    return 0


class _StoreRun:
    """A run going on on another host, read from the store's copy of its output."""

    def __init__(self, paths: Paths, task_id: str, meta: dict):
        self.paths, self.task_id, self.meta = paths, task_id, meta
        self.store = meta["_store"]
        self.seen = 0  # bytes of its output read so far
        self.status = "RUNNING"
        self.ended_at: float | None = None  # when its task was seen no longer running

    def read(self) -> bytes:
        """What it wrote since the last reading."""
        self.status, written, chunk = self.store.run_tail(self.task_id, self.meta["key"], self.seen)
        self.seen = max(self.seen, written)
        return chunk

    def over(self) -> bool:
        """Has the run ended (its row says so, a later run began, or its host went quiet)?"""
        if self.status != "RUNNING":
            return True  # its row, read with the last bytes, says how it ended: they were its last
        current = _current(self.paths, self.task_id, self.meta)
        if current is None or current.get("status") != "RUNNING":
            return True  # a later run began: this one ended without a result
        if self.ended_at is None and not _task_running(self.store, self.task_id):
            self.ended_at = time.monotonic()  # its result is recorded: the run's row follows at once
        return self.ended_at is not None and time.monotonic() - self.ended_at > SETTLE


def _task_running(store, task_id: str) -> bool:
    t = store.load(full=False).state["tasks"].get(task_id)
    return t is not None and t["state"] == "RUNNING"


def _follow(paths: Paths, task_id: str, meta: dict, tail: int | None, as_json: bool) -> int:
    """Print what the run has written so far, then the rest as it comes, until the run ends."""
    path = runlog.out_path(paths, meta)
    seen = bytearray()  # under --json: all of it, printed in one document when the run ends
    deliver = seen.extend if as_json else _write_through
    fd = _open(path)
    cut = tail  # only what was written before we started is cut to the last --tail lines
    try:
        while True:
            current = _current(paths, task_id, meta)  # before reading: a finished run wrote all
            running = _running(current)
            fd, chunk = _read_on(fd, path, running)
            chunk, cut = _tail(chunk, cut), None
            deliver(chunk)
            if not running:
                if as_json:
                    _print_followed(paths, task_id, meta, current, seen, tail)
                return 0
            if not chunk:
                time.sleep(POLL)  # while output flows, read on at once: keep up with its rotation
    except KeyboardInterrupt:
        return 0
    finally:
        if fd >= 0:
            os.close(fd)


def _write_through(chunk: bytes) -> None:
    if chunk:
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()


def _read_on(fd: int, path, running: bool) -> tuple[int, bytes]:
    """What the run's file has gained since the last read (opening it once it exists, and
    following it to the new file when it was moved aside at 1 MiB): the descriptor to read on
    and the bytes."""
    if fd < 0:
        fd = _open(path)
    chunk = _read_all(fd)
    if running and fd >= 0 and _rotated(fd, path):  # moved aside at 1 MiB: finish it, go on
        chunk += _read_all(fd)
        os.close(fd)
        fd = _open(path)
        chunk += _read_all(fd)
    return fd, chunk


def _print_followed(paths: Paths, task_id: str, meta: dict, current: dict | None, seen: bytearray, tail) -> None:
    """The JSON document of a followed run that has ended (its kept output, if it was truncated)."""
    from kmpwm.cli.output import print_json

    if current is not None and current.get("truncated"):
        seen = bytearray(runlog.output(paths, meta))
    print_json({"id": task_id, "runs": [_doc(current or meta, _tail(bytes(seen), tail))]})


def _current(paths, task_id: str, meta: dict) -> dict | None:
    return next((m for m in runlog.runs(paths, task_id) if m["key"] == meta["key"]), None)


def _running(meta: dict | None) -> bool:
    """The run is still going (None: it is no longer kept)."""
    return meta is not None and meta.get("status") == "RUNNING"


def _open(path) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError:
        return -1


def _read_all(fd: int) -> bytes:
    if fd < 0:
        return b""
    return b"".join(iter(functools.partial(os.read, fd, 1 << 16), b""))


def _rotated(fd: int, path) -> bool:
    try:
        return os.stat(path).st_ino != os.fstat(fd).st_ino
    except OSError:
        return False
