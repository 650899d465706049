"""Room for results: never start a worker unless its result can be written (issue 13.4).

A run's claim is durable before its worker starts, but its result is written only when the
worker ends; if the disk fills in between (the worker's own output, anything else on the
machine), the result cannot be written, the claim's lease runs out, and every later run-due
runs the task again.  So ``journal/reserve`` holds RESERVE_BYTES preallocated on the journal's
file system.  ``run-due`` claims work only while the reserve is whole (it re-creates it when it
can, and claims nothing when it cannot: "the disk is full, nothing was started").  When an
append fails with ENOSPC, run-due gives the reserve up and writes its results into the room it
leaves.  Reserving room first was chosen over recording the run "as possibly done", because
the latter would need a second kind of outcome that a user must resolve by hand, while a
reserve keeps the promise (each run's result is recorded) without asking anything of anyone.
Limits: on copy-on-write file systems (btrfs, ZFS) preallocation does not guarantee room for
other files' later writes; there the reserve narrows the window but cannot close it.
"""

from __future__ import annotations

import errno
import os

RESERVE_NAME = "reserve"
RESERVE_BYTES = 1 << 20  # many times the largest result record run-due writes at once in practice


def path(paths) -> str:
    return os.path.join(paths.journal_dir, RESERVE_NAME)


def ensure(paths) -> bool:
    """Is the reserve whole (creating or completing it now if there is room)?  False means the
    disk is full: claim nothing."""
    p = path(paths)
    try:
        if os.stat(p).st_size >= RESERVE_BYTES:
            return True
    except FileNotFoundError:
        pass
    except OSError:
        return False
    fd = -1
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o600)
        _allocate(fd)
        os.fsync(fd)
        return True
    except OSError:
        release(paths)  # a partial reserve would only hold back room that results need now
        return False
    finally:
        if fd >= 0:
            os.close(fd)


def _allocate(fd: int) -> None:
    """RESERVE_BYTES in ``fd``: fallocated, or written as zeros where there is no fallocate
    (EOPNOTSUPP, macOS); OSError if the disk is full."""
    try:
        os.posix_fallocate(fd, 0, RESERVE_BYTES)
    except (AttributeError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise
        os.lseek(fd, 0, os.SEEK_SET)
        block = bytes(65536)
        for _ in range(RESERVE_BYTES // len(block)):
            os.write(fd, block)


def release(paths) -> bool:
    """Give the reserve up (the disk is full and a result must be written); True if it freed room."""
    try:
        os.unlink(path(paths))
        return True
    except OSError:
        return False
