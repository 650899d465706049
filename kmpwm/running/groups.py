"""Process groups of workers whose run-due was killed (the crash case of leftover processes).

Every worker starts in a process group of its own, and run-due kills what is left of the group
when the worker ends (runner._end_group_if_exited).  If run-due itself is killed, its workers
get SIGKILL (PR_SET_PDEATHSIG), but what they started does not: a background job would keep
running beside the re-run of its task.  So run-due notes each worker's group in
``runners/<pid>.groups`` (the group's number and its leader's start token, one line each), and
removes the file when it ends.  The next run-due finds the files of runners that are gone and
kills what is left of those groups, before it claims anything.

A group is only killed when it can still be the one noted: same boot, a leader that is gone or
still has the noted start token (a pid is never reused while a process group of that number
has members, so a group whose leader is gone is the noted one), a member started no earlier
than the leader, and a note younger than STALE seconds (older notes are just removed).
"""

from __future__ import annotations

import os
import signal
import time

from kmpwm.system import procs

STALE = 3600.0


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


class GroupLog:
    def __init__(self, runners_dir, pid: int, token: str | None):
        self.path = os.path.join(runners_dir, f"{pid}.groups")
        self.header = f"{token or ''} {_boot_id()}\n"
        self.fd = -1

    def add(self, pgid: int) -> None:
        try:
            if self.fd < 0:
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
            os.write(self.fd, f"{pgid} {procs.token(pgid) or ''}\n".encode())
        except OSError:
            pass  # best effort: the worker itself still dies with run-due

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            try:
                os.unlink(self.path)
            except OSError:
                pass


def _members(pgid: int) -> list[tuple[int, int]]:
    """(pid, start ticks) of the processes in process group ``pgid``."""
    out = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
            fields = stat[stat.rindex(b")") + 2 :].split()
            if int(fields[2]) == pgid:  # field 5: pgrp
                out.append((int(name), int(fields[19])))
        except (OSError, ValueError, IndexError):
            continue
    return out


def sweep(runners_dir) -> int:
    """Kill what is left of the worker groups of run-due processes that are gone; returns the
    number of processes signalled."""
    try:
        names = [n for n in os.listdir(runners_dir) if n.endswith(".groups")]
    except OSError:
        return 0
    killed = 0
    boot = None
    for name in names:
        path = os.path.join(runners_dir, name)
        try:
            pid = int(name[: -len(".groups")])
            with open(path) as fh:
                lines = fh.read().splitlines()
            age = time.time() - os.stat(path).st_mtime
        except (OSError, ValueError):
            continue
        if not lines:
            continue
        token, _, boot_noted = lines[0].partition(" ")
        if procs.alive(pid, token or None):
            continue  # that run-due is still running
        boot = _boot_id() if boot is None else boot
        if age < STALE and boot_noted == boot:
            for line in lines[1:]:
                killed += _kill_group(line)
        try:
            os.unlink(path)
        except OSError:
            pass
    return killed


def _kill_group(line: str) -> int:
    pgid_s, _, token = line.partition(" ")
    try:
        pgid, start = int(pgid_s), int(token)
    except ValueError:
        return 0
    leader = procs.token(pgid)
    if leader is not None and leader != token:
        return 0  # the number belongs to another process now
    n = 0
    for member, started in _members(pgid):
        if started < start:
            continue
        try:
            os.kill(member, signal.SIGKILL)
            n += 1
        except OSError:
            pass
    return n
