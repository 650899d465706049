"""Progress of a running task (SPEC section 10), kept beside its run's output, never in the journal.

A command worker appends lines ``FRACTION [MESSAGE]`` to the file named by ``KMPWM_PROGRESS``; a
Python worker calls ``ctx.progress(fraction, message=None)``, which overwrites one line at the
start of the same file, at most every INTERVAL seconds (a call in between only remembers the
report: 100,000 calls cost a fraction of a second, and the file never grows).  run-due cuts a
command worker's file back to its last line once it passes TRIM bytes.  Readers take the last
complete line; ``at`` is the file's modification time.
"""

from __future__ import annotations

import os
import time
from contextlib import suppress

TRIM = 64 * 1024
MESSAGE_MAX = 200
_TAIL = 4096


INTERVAL = 0.05  # ctx.progress writes at most this often; a later report is written when it is up


def _line(fraction: float, message) -> bytes:
    text = f"{float(fraction):.6g}"
    if message is not None:
        msg = str(message)
        if not msg.isprintable() or len(msg) > MESSAGE_MAX:
            msg = " ".join(msg.split())[:MESSAGE_MAX]
        if msg:
            text += " " + msg
    return text.encode("utf-8", "replace")


class Reporter:
    """The writer behind ``ctx.progress`` (one per run; a no-op without a file).

    A call costs a comparison and a clock read: the file is written at most every INTERVAL
    seconds; a report made sooner waits, and a helper thread writes it when the interval is up,
    so the latest report always reaches the file even if the worker then goes quiet."""

    def __init__(self, path: str | None):
        self.path, self.fd, self.width = path, -1, 0
        self.last = -INTERVAL
        self.pending = None
        self.lock = None
        self.closed = False

    def report(self, fraction, message=None) -> None:
        if not 0.0 <= fraction <= 1.0:  # also NaN; a non-number raises TypeError
            raise ValueError(f"progress fraction must be between 0 and 1, not {fraction!r}")
        if not self.path:
            return
        now = time.monotonic()
        if now - self.last >= INTERVAL and self.lock is None:
            self.last = now
            self._write((fraction, message))
            return
        self.pending = (fraction, message)
        if self.lock is None:
            self._start_helper()
        elif now - self.last >= INTERVAL:
            with self.lock:
                self._flush(now)

    def _start_helper(self) -> None:
        """The helper thread that writes a waiting report when the interval is up."""
        import threading

        self.lock = threading.Lock()
        threading.Thread(target=self._later, name="kmpwm-progress", daemon=True).start()

    def _later(self) -> None:
        while not self.closed:
            time.sleep(INTERVAL)
            with self.lock:
                if self.closed:
                    return
                self._flush(time.monotonic())

    def _flush(self, now: float) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.last = now
            self._write(pending)

    def _write(self, report) -> None:
        line = _line(*report)
        if self.fd < 0:
            try:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
            except OSError:
                self.path = None
                return
        # pad to the longest line so far: one write replaces the whole previous content
        self.width = max(self.width, len(line))
        with suppress(OSError):
            os.pwrite(self.fd, line.ljust(self.width) + b"\n", 0)

    def close(self) -> None:
        """The run is over: write a report still waiting, stop the helper thread."""
        if self.lock is not None:
            with self.lock:
                self.closed = True
                self._flush(time.monotonic())
        self.closed = True
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read(path) -> dict | None:
    """The latest progress in ``path``: ``{"fraction", "message", "at"}``, or None."""
    from kmpwm.core.timeparse import iso

    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            fh.seek(max(0, st.st_size - _TAIL))
            tail = fh.read(_TAIL)
    except OSError:
        return None
    for raw in reversed(tail.splitlines()):
        parsed = _parse(raw)
        if parsed is not None:
            fraction, msg = parsed
            return {
                "fraction": min(1.0, max(0.0, fraction)),
                "message": msg.strip()[:MESSAGE_MAX] or None,
                "at": iso(st.st_mtime),
            }
    return None


def _parse(raw: bytes) -> tuple[float, str] | None:
    """The fraction (``0.5`` or ``50%``) and message of a progress line; None if it holds none."""
    import math

    head, _, msg = raw.decode("utf-8", "replace").strip().partition(" ")
    try:
        fraction = float(head.rstrip("%")) / (100 if head.endswith("%") else 1)
    except ValueError:
        return None
    if math.isnan(fraction):
        return None
    return fraction, msg


def trim(path) -> None:
    """Cut a command worker's progress file back to its last line (it appends; O_APPEND writers
    go on at the new end)."""
    with suppress(OSError):
        if os.stat(path).st_size <= TRIM:
            return
        with open(path, "r+b") as fh:
            size = os.fstat(fh.fileno()).st_size
            fh.seek(size - _TAIL)
            lines = [ln for ln in fh.read().splitlines() if ln.strip()]
            fh.truncate(0)
            fh.seek(0)
            if lines:
                fh.write(lines[-1] + b"\n")


def of_task(paths, task_id: str) -> dict | None:
    """The latest progress of the task's run in progress (None when it reports none)."""
    from kmpwm.storage import runlog

    meta = runlog.running_runs(paths, [task_id]).get(task_id)
    return None if meta is None else read(runlog.progress_path(paths, meta))


def attach(paths, docs: list[dict]) -> None:
    """Fill ``progress`` of the RUNNING task documents (one small read per running task)."""
    from kmpwm.storage import runlog

    ids = [doc["id"] for doc in docs if doc["state"] == "RUNNING"]
    metas = runlog.running_runs(paths, ids)
    for doc in docs:
        if doc["id"] in metas:
            doc["progress"] = read(runlog.progress_path(paths, metas[doc["id"]]))


def text(p: dict | None, tty: bool) -> str:
    """A progress for people: a bar on a terminal, a percentage otherwise, then the message."""
    if not p:
        return ""
    head = bar(p["fraction"]) if tty else f"{p['fraction'] * 100:.0f}%"
    return f"{head} {p['message']}" if p.get("message") else head


def bar(fraction: float, width: int = 12) -> str:
    full = int(fraction * width + 0.5)
    return "\u2588" * full + "\u2591" * (width - full) + f" {fraction * 100:3.0f}%"
