"""Judging a lease: is the run that holds a RUNNING task still going?

One function decides it for every command (``run-due`` before it claims, ``inspect-queue``,
``explain``, ``enqueue``'s answer, ``simulate-expire``), so they all tell the same story.

A holder on this host is judged by its liveness alone: its pid and start token (and the boot it
ran in).  A live holder keeps its lease whatever any clock says: the wall clock may step forward
(NTP, a laptop's suspend, ``faketime``) or a stopped run-due may resume long after the lease's
wall-clock end, and its worker is still running all that time; the holder enforces its own time
limits on a monotonic clock.  A holder that is gone frees its lease at once.  Only a holder that
cannot be verified here (another host sharing the home, a platform without process start times)
is judged by the lease's end on the wall clock, the one clock every host can read.
"""

from __future__ import annotations

import os

from kmpwm.platform import procs

STARTED_KEEP = 7 * 86400.0  # a dead runner's start marks are kept this long (then its deaths count)


def lease_state(t: dict, now: float) -> str:
    """'free', 'held', 'expired' (an unverifiable holder's time ran out) or 'orphaned' (the
    holder on this host is gone)."""
    if t["state"] != "RUNNING":
        return "free"
    lease = t.get("lease") or {}
    judged = _liveness(lease) if local(lease) else None
    if judged is not None:
        return judged
    return "expired" if lease.get("until", 0) <= now else "held"


def _liveness(lease: dict) -> str | None:
    """A holder on this host judged by its liveness: 'orphaned' (gone), 'held' (that very process
    is running), or None when only the lease's end can tell (a holder without a start token)."""
    boot = lease.get("boot")
    if boot and boot != procs.boot_id():
        return "orphaned"  # taken before a reboot: every process of that boot is gone
    if not procs.alive(lease.get("pid"), lease.get("token")):
        return "orphaned"
    # that very process is running: nothing else can tell otherwise
    return "held" if lease.get("token") is not None else None


def local(lease: dict) -> bool:
    """Is the lease's holder a process on this host (judged by its liveness, not by a clock)?"""
    return bool(lease.get("pid")) and lease.get("runner", "").split("/", 1)[0] == procs.host()


def lost_why(t: dict, state: str) -> str:
    """Why a RUNNING task's run is over without a result, in the words every view uses."""
    lease = t.get("lease") or {}
    return "its lease ended" if state == "expired" else f"its runner (pid {lease.get('pid')}) is gone"


# -- did the holder start the worker? ----------------------------------------------------------
#
# A task is quarantined after its runner died MAX_CRASHES times in a row while running it: a
# worker that brings its run-due down (memory, a crash in a C extension) must not do so forever.
# A runner killed after it recorded a claim but before it started the worker (OOM, a reboot, a
# systemd timeout) says nothing about the task, so such a death is not counted.  Each runner
# keeps ``runners/<pid>.started``, created before its first claim: its pid's start token and
# boot, then one line per run whose worker it started (the claim's time and the task's id),
# written right after the start.  The file goes when the runner ends; a dead runner's stays
# (up to STARTED_KEEP) for whoever takes its tasks over.  No file, or one of another process
# with that pid: cannot tell, and the death counts, as it always did.


class StartLog:
    def __init__(self, runners_dir, pid: int, token: str | None, boot: str | None):
        self.path = os.path.join(runners_dir, f"{pid}.started")
        self.header = f"{token or ''} {boot or ''}\n"
        self.fd = -1

    def open(self) -> None:
        try:
            self.fd = os.open(
                self.path,
                os.O_WRONLY
                | os.O_CREAT
                | os.O_TRUNC
                | os.O_APPEND
                | getattr(os, "O_NOFOLLOW", 0)
                | getattr(os, "O_CLOEXEC", 0),
                0o600,
            )
            os.write(self.fd, self.header.encode())
        except OSError:
            self.close()  # no file: a death of this runner counts for every task it held

    def add(self, task_id: str, since) -> None:
        if self.fd < 0:
            return
        try:
            os.write(self.fd, _mark(task_id, since))
        except OSError:
            pass

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _mark(task_id: str, since) -> bytes:
    import orjson

    return orjson.dumps([since, task_id]) + b"\n"


def holder_started(runners_dir, t: dict) -> bool | None:
    """Did the runner holding ``t``'s lease (a runner of this host that is gone) start the
    run's worker?  None when it cannot be told (see above)."""
    lease = t.get("lease") or {}
    if not local(lease) or lease.get("since") is None:
        return None
    try:
        with open(os.path.join(runners_dir, f"{lease['pid']}.started"), "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    header, _, marks = data.partition(b"\n")
    if not _same_holder(header, lease):
        return None  # another process had that pid since
    return _mark(t["id"], lease["since"]) in marks.splitlines(keepends=True)


def _same_holder(header: bytes, lease: dict) -> bool:
    """Does a start-marks file's header (its runner's start token and boot) name the lease's holder?"""
    token, _, boot = header.decode("utf-8", "replace").partition(" ")
    return token == (lease.get("token") or "") and (not lease.get("boot") or boot == lease["boot"])


def forget_started(runners_dir) -> None:
    """Remove the start marks of runners that are gone, once older than STARTED_KEEP."""
    try:
        names = [n for n in os.listdir(runners_dir) if n.endswith(".started")]
    except OSError:
        return
    for name in names:
        path = os.path.join(runners_dir, name)
        try:
            if _forgettable(path, int(name[: -len(".started")])):
                os.unlink(path)
        except (OSError, ValueError):
            continue


def _forgettable(path: str, pid: int) -> bool:
    """Are the start marks at ``path`` older than STARTED_KEEP, and is runner ``pid`` that wrote
    them gone?"""
    import time

    if time.time() - os.stat(path).st_mtime < STARTED_KEEP:
        return False
    with open(path, "rb") as fh:
        token = fh.readline().decode("utf-8", "replace").partition(" ")[0]
    return not procs.alive(pid, token or None)
