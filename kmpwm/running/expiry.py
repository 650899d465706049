"""``simulate-expire``: deliver the expiration signal, like iOS's BGTask expiration handler, to
the run-due processes now running the given tasks.  A process is found through the leases in the
journal (pid and start token), so a recycled pid is never signalled."""

from __future__ import annotations

import os
import signal
import time

from kmpwm.core.state import base_id, members
from kmpwm.platform import procs
from kmpwm.scheduling.leases import lease_state
from kmpwm.storage.paths import Paths, private_subdir
from kmpwm.storage.stores import open_store

EXPIRE_SIGNAL = signal.SIGUSR1


def simulate_expire(paths: Paths, ids: list[str], all_: bool, grace_s: float | None) -> list[dict]:
    """Signal the run-due processes of this host running ``ids`` (chain ids name their tasks;
    ``all_``: every running task); ``grace_s``: the grace period they are to give their workers.
    Returns who was signalled: [{"pid", "runner", "tasks"}]."""
    state = open_store(paths).load(full=False).state
    runners = _holders(state, _wanted(state, ids), all_, time.time())
    signalled = []
    for (pid, token, runner), tasks in runners.items():
        if not procs.alive(pid, token):
            continue
        if grace_s is not None:
            path = private_subdir(paths.runners_dir) / f"{pid}.expire"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{grace_s}\n")
        try:
            os.kill(pid, EXPIRE_SIGNAL)
        except ProcessLookupError:
            continue
        signalled.append({"pid": pid, "runner": runner, "tasks": sorted(tasks)})
    return signalled


def _wanted(state: dict, ids: list[str]) -> set[str]:
    wanted = set(ids)
    chains = state["chains"]
    for cid in ids:
        if cid in chains:
            wanted.update(t["id"] for t in members(state, chains[cid]))
    return wanted


def _is_wanted(task_id: str, wanted: set[str]) -> bool:
    """``task_id`` is wanted, or is a step of a wanted chain (its base id)."""
    return task_id in wanted or base_id(task_id) in wanted


def _holders(state: dict, wanted: set[str], all_: bool, now: float) -> dict[tuple, list[str]]:
    """(pid, token, runner id) -> the wanted tasks it holds a lease on, for runners of this host."""
    runners: dict[tuple, list[str]] = {}
    for t in state["tasks"].values():
        lease = t.get("lease")
        if not lease or lease_state(t, now) != "held" or not (all_ or _is_wanted(t["id"], wanted)):
            continue
        if lease["runner"].split("/", 1)[0] != procs.host():
            continue  # held on another machine sharing this home
        runners.setdefault((lease.get("pid"), lease.get("token"), lease["runner"]), []).append(t["id"])
    return runners
