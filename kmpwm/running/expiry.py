"""``simulate-expire``: deliver the expiration signal, like iOS's BGTask expiration handler, to
the run-due processes now running the given tasks.  A process is found through the leases in the
journal (pid and start token), so a recycled pid is never signalled."""

from __future__ import annotations

import os
import signal
import sys
import time

from kmpwm.core.state import base_id, members
from kmpwm.core.timeparse import parse_duration
from kmpwm.platform import procs
from kmpwm.scheduling.leases import lease_state
from kmpwm.storage.paths import Paths, private_subdir
from kmpwm.storage.stores import open_store

EXPIRE_SIGNAL = signal.SIGUSR1


def simulate_expire_command(paths: Paths, ids: list[str], all_: bool, grace, as_json: bool) -> int:
    from kmpwm.cli.output import print_json, say

    grace_s = parse_duration(grace, what="grace") if grace is not None else None
    state = open_store(paths).load(full=False).state
    now = time.time()
    wanted = set(ids)
    chains = state["chains"]
    for cid in ids:
        if cid in chains:
            wanted.update(t["id"] for t in members(state, chains[cid]))
    runners: dict[tuple, list[str]] = {}
    for t in state["tasks"].values():
        lease = t.get("lease")
        if not lease or lease_state(t, now) != "held":
            continue
        if not all_ and t["id"] not in wanted and base_id(t["id"]) not in wanted:
            continue
        if lease["runner"].split("/", 1)[0] != procs.host():
            continue  # held on another machine sharing this home
        runners.setdefault((lease.get("pid"), lease.get("token"), lease["runner"]), []).append(t["id"])
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
    code = 0 if signalled else 1
    if as_json:
        print_json({"signalled": signalled, "exit_code": code})
    elif signalled:
        for s in signalled:
            say(f"sent the expiration signal to run-due pid {s['pid']} (running {', '.join(s['tasks'])})")
    else:
        sys.stderr.write("kmpwm: nothing matching is running\n")
    return code
