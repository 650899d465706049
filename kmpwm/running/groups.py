"""Process groups of workers whose run-due was killed (the crash case of leftover processes).

Every worker starts in a process group of its own, and run-due kills what is left of the group
when the worker ends (jobs.end_group_if_exited).  If run-due itself is killed, its workers
get SIGKILL (PR_SET_PDEATHSIG), but what they started does not: a background job would keep
running beside the re-run of its task.  So run-due notes each worker's group in
``runners/<pid>.groups`` (the group's number and its leader's start token, one line each), and
removes the file when it ends.  The next run-due finds the files of runners that are gone and
kills what is left of those groups, before it claims anything (at its start, and again before it
claims a task whose holder it finds gone).

A group is only killed when it can still be the one noted: same boot, a leader that is gone or
still has the noted start token (a pid is never reused while a process group of that number
has members, so a group whose leader is gone is the noted one), and a member started no earlier
than the leader.  The age of a note does not matter: a worker of a dead runner that is still
running is a double run waiting to happen, however long ago it started.

Command workers have one more gap.  They start as ``setpriv --pdeathsig KILL -- CMD`` (vfork and
exec, fast), and the death signal is armed only once setpriv runs, so a run-due killed between the
fork and that moment leaves a worker that nothing kills; and if it dies before it noted the group,
no note names it.  So run-due writes a ``launch`` line before it starts a command (the file exists
from then on), and marks what it starts: the worker's environment carries ``KMPWM_RUNNER`` (the
runner's id), and while the child has not exec'd yet its name (``comm``, inherited from run-due,
which names itself ``kmpwm:<id>`` for the length of the start) says the same.  A dead runner whose
last line is ``launch`` died while starting a command: the sweep then kills every process of this
user that carries its mark (and the process group each one leads), whatever it is by then, and
waits for them to die before the caller claims anything.

A Python worker forked for one task (``KMPWM_POOL=0``) has the same window: it dies with run-due,
but it may start a background job before run-due notes its group.  Its start is marked the same
way; the child never execs, so it wears the name for its life, and a process it forks inherits
it (one it execs carries ``KMPWM_RUNNER``).  A pool host needs none of this: its group is noted
before it is given a task.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import suppress

from kmpwm.platform import procs

MARK_ENV = "KMPWM_RUNNER"  # in a worker's environment: the id of the runner that started it
DEATH_WAIT = 2.0  # how long a sweep waits for the processes it killed to be gone
EXEC_WAIT = 0.2  # how long it waits for a process in the middle of an exec to show its environment


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def comm_mark(runner_id: str) -> bytes:
    """The name (``comm``, at most 15 bytes) run-due takes while it starts a command."""
    return b"kmpwm:" + runner_id.rsplit("/", 1)[-1][:8].encode()


class GroupLog:
    def __init__(self, runners_dir, pid: int, token: str | None, runner_id: str = ""):
        self.path = os.path.join(runners_dir, f"{pid}.groups")
        self.header = f"{token or ''} {_boot_id()} {runner_id}\n"
        self.fd = -1
        self.mark = comm_mark(runner_id) if runner_id else b""
        self._comm: bytes | None = None  # run-due's own name, while it wears the mark

    def _write(self, line: str) -> None:
        with suppress(OSError):  # best effort: the worker itself still dies with run-due
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
            os.write(self.fd, line.encode())

    def add(self, pgid: int) -> None:
        self._write(f"{pgid} {procs.token(pgid) or ''}\n")

    def launching(self) -> None:
        """Before a worker process starts: a ``launch`` line, and run-due takes the name that
        marks the child (a command's until it execs, a forked Python worker's for its life; see
        the module's docstring).  ``add`` or ``launched`` follows."""
        self._write("launch\n")
        if self.mark:
            self._comm = _set_comm(self.mark)

    def launched(self) -> None:
        """The start is over (started or not): run-due's own name back."""
        if self._comm is not None:
            _set_comm(self._comm)
            self._comm = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            with suppress(OSError):
                os.unlink(self.path)


def _set_comm(name: bytes) -> bytes | None:
    """Name the calling thread ``name``; returns its previous name (None where that cannot be
    done).  A child forked meanwhile keeps the name until it execs."""
    try:
        fd = os.open("/proc/thread-self/comm", os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        old = os.read(fd, 64).rstrip(b"\n")
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, name)
        return old
    except OSError:
        return None
    finally:
        os.close(fd)


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return None


def _processes() -> dict[int, tuple[int, int, bytes]]:
    """pid -> (process group, start ticks, state letter) of every process."""
    out = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        stat = _read(f"/proc/{name}/stat")
        if not stat:
            continue
        try:
            fields = stat[stat.rindex(b")") + 2 :].split()
            out[int(name)] = (int(fields[2]), int(fields[19]), fields[0])  # pgrp, starttime, state
        except (ValueError, IndexError):
            continue
    return out


def _gone(pid: int) -> bool:
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return True
    try:
        return stat[stat.rindex(b")") + 2 :][:1] in (b"Z", b"X")
    except ValueError:
        return True


def sweep(runners_dir) -> int:
    """Kill what is left of the workers of run-due processes that are gone, wait (a little) for
    it to be gone, and remove their notes; returns the number of processes signalled."""
    dead = _dead_runners(runners_dir)
    if not dead:
        return 0
    table = _processes()
    killed: set[int] = set()
    for _, notes, starting, since in dead:
        for line in notes:
            killed |= _kill_group(line, table)
        if starting:
            killed |= _kill_marked(starting, since, table)
    _wait_gone(killed)
    for path, *_ in dead:
        with suppress(OSError):
            os.unlink(path)
    return len(killed)


def _dead_runners(runners_dir) -> list[tuple[str, list[str], str, int]]:
    """The notes of every run-due that is gone (see _dead_runner)."""
    try:
        names = [n for n in os.listdir(runners_dir) if n.endswith(".groups")]
    except OSError:
        return []
    boot: list[str | None] = []  # read once, when a dead runner needs it
    found = (_dead_runner(os.path.join(runners_dir, name), name, boot) for name in names)
    return [d for d in found if d is not None]


def _wait_gone(pids: set[int]) -> None:
    """Wait for the processes ``pids`` to be gone (DEATH_WAIT at most)."""
    deadline = time.monotonic() + DEATH_WAIT
    while pids and time.monotonic() < deadline:
        pids = {p for p in pids if not _gone(p)}
        if pids:
            time.sleep(0.005)


def _dead_runner(path: str, name: str, boot: list) -> tuple[str, list[str], str, int] | None:
    """The notes of a run-due that is gone: (path, group lines, its runner id if it died while
    starting a command, its start); None while it runs (or the file is unreadable or empty)."""
    try:
        pid = int(name[: -len(".groups")])
        with open(path) as fh:
            lines = fh.read().splitlines()
    except (OSError, ValueError):
        return None
    if not lines:
        return None
    token, boot_noted, runner_id = (lines[0].split(" ") + ["", ""])[:3]
    if procs.alive(pid, token or None):
        return None  # that run-due is still running
    if not boot:
        boot.append(_boot_id())
    if boot_noted != boot[0]:
        return path, [], "", 0  # another boot: every process of it is gone
    return (path, *_leftovers(lines, runner_id, token))


def _leftovers(lines: list[str], runner_id: str, token: str) -> tuple[list[str], str, int]:
    """What a dead runner's notes name: its group lines, its runner id if it died while starting
    a command (its last line is ``launch``), its start."""
    notes = [ln for ln in lines[1:] if ln != "launch"]
    starting = runner_id if len(lines) > 1 and lines[-1] == "launch" else ""
    try:
        since = int(token)
    except ValueError:
        since = 0
    return notes, starting, since


def _kill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except OSError:
        return False


def _kill_group(line: str, table: dict) -> set[int]:
    pgid_s, _, token = line.partition(" ")
    try:
        pgid, start = int(pgid_s), int(token)
    except ValueError:
        return set()
    leader = procs.token(pgid)
    if leader is not None and leader != token:
        return set()  # the number belongs to another process now
    return {m for m in _members(table, pgid, start) if _kill(m)}


def _members(table: dict, pgid: int, start: int) -> list[int]:
    """The processes of group ``pgid`` that started no earlier than ``start`` (ticks)."""
    return [m for m, (g, started, _) in table.items() if g == pgid and started >= start]


def _kill_marked(runner_id: str, since: int, table: dict) -> set[int]:
    """Kill every process of this user that the runner ``runner_id`` (started at ``since``
    ticks) marked, with the process group each one leads.  A process is marked by its name
    before it execs and by its environment after; an exec in progress shows neither for a
    moment (new name, environment not set up yet), so a process with an empty environment is
    looked at again for up to EXEC_WAIT."""
    env_mark = f"{MARK_ENV}={runner_id}".encode()
    comm = comm_mark(runner_id)
    uid = os.getuid()
    killed: set[int] = set()

    def marked(pid: int) -> bool | None:
        """True, False, or None (cannot tell yet: no environment to read)."""
        name = _read(f"/proc/{pid}/comm")
        env = _read(f"/proc/{pid}/environ")
        again = _read(f"/proc/{pid}/comm")
        if comm in ((name or b"").rstrip(b"\n"), (again or b"").rstrip(b"\n")):
            return True
        if env:
            return env_mark in env.split(b"\0")
        return None if not _gone(pid) else False

    mine = (pid for pid, proc in table.items() if _may_be_marked(pid, proc, since, uid))
    unsure = _kill_if_marked(mine, marked, table, killed)
    deadline = time.monotonic() + EXEC_WAIT
    while unsure and time.monotonic() < deadline:
        time.sleep(0.005)
        unsure = _kill_if_marked(unsure, marked, table, killed)
    return killed


def _may_be_marked(pid: int, proc: tuple[int, int, bytes], since: int, uid: int) -> bool:
    """A live process of user ``uid``, not this one, started no earlier than ``since``."""
    _, started, state = proc
    if started < since or state in (b"Z", b"X") or pid == os.getpid():
        return False
    try:
        return os.stat(f"/proc/{pid}").st_uid == uid
    except OSError:
        return False


def _kill_if_marked(pids, marked, table: dict, killed: set[int]) -> list[int]:
    """Kill (into ``killed``) each of ``pids`` that ``marked`` says is marked; returns those it
    cannot tell yet."""
    unsure = []
    for pid in pids:
        verdict = marked(pid)
        if verdict:
            killed |= _kill_tree(pid, table)
        elif verdict is None:
            unsure.append(pid)
    return unsure


def _kill_tree(pid: int, table: dict) -> set[int]:
    """Kill ``pid`` and, when it leads its process group, the group (what it started there)."""
    out = {pid} if _kill(pid) else set()
    pgid, start, _ = table.get(pid, (0, 0, b""))
    if pgid == pid:
        with suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        out.update(_members(table, pid, start))
    return out
