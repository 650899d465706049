"""Every run's output, kept per run (SPEC section 10), and the latest progress of a running run.

Layout under the log directory, one private directory per task id::

    logs/runs/<id, %-encoded>/<N>.out        the run's output (stdout and stderr interleaved)
    logs/runs/<id, %-encoded>/<N>.meta       {"run", "attempt", "started_at", "finished_at",
                                              "status", "truncated", "pid", "token"}
    logs/runs/<id, %-encoded>/<N>.progress   the latest progress line (while it runs)

N counts the task id's runs from 1 in start order.  run-due writes output to the file as it
arrives (nothing accumulates in memory): once ``<N>.out`` passes CAP bytes it is renamed to
``<N>.out.1`` and a new ``<N>.out`` begins, so at most 2 x CAP bytes are on disk during a run; when
the run ends the last CAP bytes of the two are kept and the run is marked truncated.  A reader
following the file (``kmpwm logs --follow``) notices the rename as ``tail -F`` does.

Retention: a run is kept as long as its events are (the retention window) and always for a
task's last KEEP runs; ``sweep`` applies it (compaction calls it).
"""

from __future__ import annotations

import os
from pathlib import Path

CAP = 1 << 20
KEEP = 5
RUNS_DIR = "runs"
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def task_dir(paths, task_id: str) -> Path:
    from urllib.parse import quote

    name = quote(task_id, safe="-_")  # '.' and '/' encoded: never '.', '..' or a path
    if len(name) > 200:
        import hashlib

        name = name[:150] + "~" + hashlib.sha256(task_id.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return Path(paths.log_dir) / RUNS_DIR / name


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    from .timeparse import iso

    return iso(ts)


def _write_meta(path: Path, meta: dict) -> None:
    import orjson

    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, _FLAGS, 0o600)
    try:
        os.write(fd, orjson.dumps(meta))
    finally:
        os.close(fd)
    os.replace(tmp, path)


def run_numbers(d: Path) -> list[int]:
    try:
        names = os.listdir(d)
    except OSError:
        return []
    return sorted(int(n[:-5]) for n in names if n.endswith(".meta") and n[:-5].isdigit())


_made: set = set()


class RunLog:
    """The output file of one run, written by run-due as the worker's output arrives."""

    __slots__ = ("dir", "n", "fd", "size", "rotated", "meta", "progress")

    def __init__(self, d: Path, n: int, fd: int, meta: dict):
        self.dir, self.n, self.fd, self.meta = d, n, fd, meta
        self.size = 0
        self.rotated = False
        self.progress = str(d / f"{n}.progress")

    @classmethod
    def start(cls, paths, task_id: str, attempt: int, started: float, pid: int, token) -> "RunLog | None":
        """Open the next run's files; None if the log directory cannot be written (the run goes on)."""
        d = task_dir(paths, task_id)
        try:
            from .paths import private_subdir

            if d.parent not in _made:
                if paths.home is None and Path(paths.log_dir).parent.name == "kmpwm":
                    from .paths import ensure_dir

                    ensure_dir(Path(paths.log_dir).parent)
                private_subdir(Path(paths.log_dir))
                private_subdir(d.parent)
                _made.add(d.parent)
            private_subdir(d)
            nums = run_numbers(d)
            n = (nums[-1] + 1) if nums else 1
            fd = os.open(d / f"{n}.out", _FLAGS, 0o600)
            meta = {"run": n, "attempt": attempt, "started_at": _iso(started), "finished_at": None,
                    "status": "RUNNING", "truncated": False, "pid": pid, "token": token}
            _write_meta(d / f"{n}.meta", meta)
        except Exception:
            return None
        return cls(d, n, fd, meta)

    def write(self, chunk: bytes) -> None:
        if self.fd < 0:
            return
        try:
            os.write(self.fd, chunk)  # a regular file: the whole chunk
        except OSError:
            return
        self.size += len(chunk)
        if self.size > CAP:
            self._rotate()

    def _rotate(self) -> None:
        cur = self.dir / f"{self.n}.out"
        try:
            os.replace(cur, self.dir / f"{self.n}.out.1")
            os.close(self.fd)
            self.fd = os.open(cur, _FLAGS, 0o600)
        except OSError:
            self.fd = -1
            return
        self.size = 0
        self.rotated = True

    def finish(self, status: str, finished: float) -> None:
        """Close the output (keeping its last CAP bytes) and record how the run ended."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            if self.rotated:
                self._join()
            meta = dict(self.meta, finished_at=_iso(finished), status=status, truncated=self.rotated)
            _write_meta(self.dir / f"{self.n}.meta", meta)
        except OSError:
            pass
        try:
            os.unlink(self.progress)
        except OSError:
            pass

    def _join(self) -> None:
        cur, old = self.dir / f"{self.n}.out", self.dir / f"{self.n}.out.1"
        with open(cur, "rb") as fh:
            tail = fh.read()
        need = CAP - len(tail)
        head = b""
        if need > 0:
            with open(old, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - need))
                head = fh.read()
        tmp = self.dir / f"{self.n}.out.tmp"
        fd = os.open(tmp, _FLAGS, 0o600)
        try:
            os.write(fd, head + tail[-CAP:])
        finally:
            os.close(fd)
        os.replace(tmp, cur)
        os.unlink(old)


# -- reading ---------------------------------------------------------------------------------


def read_meta(d: Path, n: int) -> dict | None:
    import orjson

    try:
        meta = orjson.loads((d / f"{n}.meta").read_bytes())
    except (OSError, ValueError):
        return None
    if meta.get("status") == "RUNNING" and not _alive(meta):
        meta["status"] = "EXPIRED"  # its run-due died: the run never reached a result
        meta["finished_at"] = meta.get("finished_at") or _iso(_mtime(d / f"{n}.out"))
    return meta


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _alive(meta: dict) -> bool:
    from .procs import alive

    return alive(meta.get("pid"), meta.get("token"))


def runs(paths, task_id: str) -> list[dict]:
    """The kept runs of ``task_id`` (oldest first), each its meta."""
    d = task_dir(paths, task_id)
    out = []
    for n in run_numbers(d):
        meta = read_meta(d, n)
        if meta is not None:
            out.append(meta)
    return out


def output(paths, task_id: str, n: int) -> bytes:
    try:
        return (task_dir(paths, task_id) / f"{n}.out").read_bytes()
    except OSError:
        return b""


def running(paths, task_id: str) -> dict | None:
    """The meta of the task's run in progress, if any (its latest run, still RUNNING)."""
    d = task_dir(paths, task_id)
    nums = run_numbers(d)
    if not nums:
        return None
    meta = read_meta(d, nums[-1])
    return meta if meta is not None and meta.get("status") == "RUNNING" else None


# -- retention -------------------------------------------------------------------------------


def sweep(paths, cutoff: float, keep: int = KEEP) -> int:
    """Delete runs that finished before ``cutoff``, except each task's last ``keep``; returns how
    many runs were deleted.  Directories left empty are removed."""
    root = Path(paths.log_dir) / RUNS_DIR
    try:
        names = os.listdir(root)
    except OSError:
        return 0
    deleted = 0
    for name in names:
        d = root / name
        nums = run_numbers(d)
        for n in nums[:-keep] if keep else nums:
            meta = read_meta(d, n)
            if meta is None or meta.get("status") == "RUNNING":
                continue
            ended = _mtime(d / f"{n}.meta")
            if ended is not None and ended >= cutoff:
                continue
            for suffix in (".out", ".out.1", ".progress", ".meta"):
                try:
                    os.unlink(d / f"{n}{suffix}")
                except OSError:
                    pass
            deleted += 1
        try:
            os.rmdir(d)  # only when empty
        except OSError:
            pass
    return deleted
