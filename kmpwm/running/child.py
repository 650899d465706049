"""Worker processes' set-up: forking one, what it does first (its own session, death with
run-due, default signals, none of run-due's descriptors), and the death signal of a command."""

from __future__ import annotations

import gc
import os
import signal
import sys
import time
from contextlib import suppress

_PR_SET_PDEATHSIG = 1
_libc = None
_frozen = False


def prepare() -> None:
    """In run-due, before its first fork: load libc (children do not import ctypes each) and
    move everything run-due has allocated out of the collector's reach, so that a child's
    garbage collection does not touch (and copy-on-write) every inherited page."""
    global _frozen
    load_libc()
    if not _frozen:
        gc.freeze()
        _frozen = True


def fork(close: list[int], out_w: int, sel, body, *, no_gc: bool = False) -> int:
    """Fork a worker process that runs ``body()`` once set up (``setup``), then exits; returns
    its pid.  ``no_gc``: a short-lived child, no collections (fewer copied pages)."""
    from kmpwm.running.worker_host import child_failed, flush_streams

    flush_streams()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        status = 0
        try:
            if no_gc:
                gc.disable()
            setup(close, out_w, parent, sel)
            body()
        except BaseException:
            status = child_failed()
        finally:
            os._exit(status)
    return pid


def setup(close: list[int], out_w: int, parent: int, sel) -> None:
    """In a freshly forked worker process: its own session (so expiry signals reach everything
    it starts), death with run-due (``parent``), default signals, none of run-due's
    descriptors, stdin from /dev/null, stdout and stderr into ``out_w``."""
    os.setsid()
    die_with_parent(parent)
    signal.set_wakeup_fd(-1)
    for signo in (signal.SIGUSR1, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(signo, signal.SIG_DFL)
    for fd in close:
        with suppress(OSError):
            os.close(fd)
    if sel is not None:
        with suppress(Exception):
            sel.close()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out_w, 1)
    os.dup2(out_w, 2)


def load_libc():
    """Loaded in run-due before forking, so that children do not import ctypes each."""
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            import ctypes

            _libc = ctypes.CDLL(None, use_errno=True)
        except Exception:
            _libc = False
    return _libc


def die_with_parent(parent: int) -> None:
    """Linux: the worker gets SIGKILL if run-due dies, so an orphan never runs beside a re-run.

    The signal is armed after fork, so run-due may already be dead by then (SIGKILLed just after
    it recorded the claim): the child was handed to another parent and no signal will come.
    Such a child sees that its parent is no longer ``parent`` (run-due's pid before the fork)
    and exits at once instead; the task's lease names a dead runner, so the next run-due claims
    it again."""
    libc = load_libc()
    if libc:
        with suppress(Exception):
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(75)


def kill_parent_then_go_on(parent: int, hold: bool) -> None:
    """Crash injection (``KMPWM_CRASH_AT=command-fork``), in a command worker's child before it
    execs: SIGKILL run-due, wait until it is gone, then go on to exec setpriv and the command --
    the window in which setpriv has not yet armed the death signal and run-due has not noted
    the worker's process group.  ``command-fork-hold``: before going on, wait (up to a minute)
    for the file ``KMPWM_CRASH_HOLD`` names to exist, as a child stuck before its exec would."""
    os.kill(parent, signal.SIGKILL)
    while os.getppid() == parent:
        time.sleep(0.001)
    hold_file = os.environ.get("KMPWM_CRASH_HOLD") if hold else None
    deadline = time.monotonic() + 60
    while hold_file and not os.path.exists(hold_file) and time.monotonic() < deadline:
        time.sleep(0.01)


def die_once_exists(path: str) -> None:
    """Crash injection (``KMPWM_CRASH_AT=python-fork``), in run-due right after it forked a
    Python worker, before it notes the worker's process group: wait (up to a minute) for the file
    ``path`` (the worker makes it once it has started a background job), then SIGKILL run-due."""
    deadline = time.monotonic() + 60
    while path and not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(os.getpid(), signal.SIGKILL)


def _death_prefix() -> list[str]:
    import shutil

    if not sys.platform.startswith("linux"):
        return []
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


DEATH_PREFIX = _death_prefix()
