"""Reading workers' pipes: the one loop that empties a non-blocking pipe, and the framing of
the results a pool host sends (a 4-byte big-endian length, then the JSON)."""

from __future__ import annotations

import os
from contextlib import suppress

CHUNK = 65536


def drain(fd: int, sink) -> bool:
    """Hand what ``fd`` holds now to ``sink(chunk)``; True when its writer closed it (end of
    file, or an error reading it), False when it is merely empty for now."""
    while True:
        try:
            chunk = os.read(fd, CHUNK)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
        if not chunk:
            return True
        sink(chunk)


def close(sel, fd: int) -> None:
    """Stop watching ``fd`` and close it (either may have happened already)."""
    with suppress(KeyError, ValueError):
        sel.unregister(fd)
    with suppress(OSError):
        os.close(fd)


def frames(buf: bytearray):
    """The complete frames at the head of ``buf``, each removed from it as it is taken."""
    while len(buf) >= 4:
        size = int.from_bytes(buf[:4], "big")
        if len(buf) < 4 + size:
            return
        frame = bytes(buf[4 : 4 + size])
        del buf[: 4 + size]
        yield frame
