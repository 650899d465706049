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

from kmpwm.system import procs


def lease_state(t: dict, now: float) -> str:
    """'free', 'held', 'expired' (an unverifiable holder's time ran out) or 'orphaned' (the
    holder on this host is gone)."""
    if t["state"] != "RUNNING":
        return "free"
    lease = t.get("lease") or {}
    pid = lease.get("pid")
    if local(lease):
        boot = lease.get("boot")
        if boot and boot != procs.boot_id():
            return "orphaned"  # taken before a reboot: every process of that boot is gone
        if not procs.alive(pid, lease.get("token")):
            return "orphaned"
        if lease.get("token") is not None:
            return "held"  # that very process is running: nothing else can tell otherwise
    return "expired" if lease.get("until", 0) <= now else "held"


def local(lease: dict) -> bool:
    """Is the lease's holder a process on this host (judged by its liveness, not by a clock)?"""
    return bool(lease.get("pid")) and lease.get("runner", "").split("/", 1)[0] == procs.host()


def lost_why(t: dict, state: str) -> str:
    """Why a RUNNING task's run is over without a result, in the words every view uses."""
    lease = t.get("lease") or {}
    return "its lease ended" if state == "expired" else f"its runner (pid {lease.get('pid')}) is gone"
