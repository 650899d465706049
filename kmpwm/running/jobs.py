"""A run in progress (``Job``), what a pass reports (``Report``), and the worker process's
control: poll it, signal its process group, keep the tail of its output."""

from __future__ import annotations

import errno
import os
import signal
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kmpwm.running.pool import Host
    from kmpwm.storage import runlog

TAIL = 8192
STDOUT_TAIL = 65536


@dataclass
class Job:
    task: dict
    attempt: int
    kind: str  # python | command
    limit: float
    started: float  # monotonic
    started_wall: float
    pid: int = 0
    proc: object = None
    fds: dict = field(default_factory=dict)  # fd -> "result" | "out" | "err"
    result: bytearray = field(default_factory=bytearray)
    out: bytearray = field(default_factory=bytearray)
    err: bytearray = field(default_factory=bytearray)
    kill_at: float | None = None
    expiring: bool = False
    run_expired: bool = False  # told to stop because the whole run expired
    cancelled: bool = False  # told to stop because the task was cancelled or replaced
    exit_status: int | None = None  # raw wait status / returncode
    immediate: dict | None = None  # a result known without a process (start failure, notify)
    ended: float = 0.0  # monotonic time it was reaped
    host: Host | None = None  # the pool process running it (Python workers)
    answered: bool = False  # the host sent this job's result
    log: runlog.RunLog | None = None  # where its output goes as it arrives
    progressed: bool = False  # a Python worker that reported progress (its file is to remove)

    @property
    def id(self) -> str:
        return self.task["id"]

    @property
    def running(self) -> bool:
        """Its worker has not ended yet (nor was it known without one)."""
        return self.immediate is None and self.exit_status is None

    @property
    def working(self) -> bool:
        """Running, and no result sent yet (a pool host's job ends with its answer)."""
        return self.running and not self.answered


@dataclass
class Report:
    ran: list = field(default_factory=list)
    expired: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    failed: list = field(default_factory=list)  # tasks that ended FAILED in this run: {"id", "worker", "reason"}
    warnings: list = field(default_factory=list)  # what the run warned about (Runner's warn callback)

    def doc(self) -> dict:
        return {
            "ran": self.ran,
            "expired": self.expired,
            "skipped": [{"id": k, "reason": v} for k, v in self.skipped.items()],
        }


def output(job: Job, chunk: bytes) -> None:
    """A worker's stdout (a Python worker's: stdout and stderr): to its run's file as it arrives;
    only a bounded tail stays in memory (a command's last JSON line, a failure's message)."""
    _keep(job, job.out, chunk, STDOUT_TAIL)


def errors(job: Job, chunk: bytes) -> None:
    """A command worker's stderr: to its run's file; a bounded tail for the failure message."""
    _keep(job, job.err, chunk, TAIL)


def _keep(job: Job, buf: bytearray, chunk: bytes, limit: int) -> None:
    """``chunk`` to the run's file, and to ``buf``, which keeps its last ``limit`` bytes."""
    if job.log is not None:
        job.log.write(chunk)
    buf += chunk
    if len(buf) > limit:
        del buf[:-limit]


def kill(job: Job, signo: int) -> None:
    if not job.pid or job.exit_status is not None:
        return
    if job.host is not None:
        job.host.retire = True  # a host told to stop is not reused
    try:
        os.killpg(job.pid, signo)  # the worker and anything it started
    except ProcessLookupError:
        pass
    except PermissionError:
        with suppress(OSError):
            os.kill(job.pid, signo)


def end_group_if_exited(pid: int) -> None:
    """When a worker process has exited, SIGKILL what is left of its process group.

    Every worker starts in a session and process group of its own (``start_new_session`` for a
    command, ``setsid`` for a forked Python worker), so the processes it started and left behind
    (``cmd &``, a daemon that did not call setsid itself) are still in that group when it exits.
    As systemd ends a unit's cgroup, run-due ends the group: a run is over when its worker exits,
    and nothing it started keeps running (and writing) beside the next run.  Processes that left
    the group on purpose (setsid, double-fork daemons) are not tracked.  The group is killed
    while the worker is still an unreaped zombie (``WNOWAIT``), so its number cannot have been
    reused by an unrelated group.  (Python workers in a pool host: see worker_host._end_leftovers.)"""
    if pid <= 0 or not hasattr(os, "waitid"):
        return
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except (ChildProcessError, OSError):
        return
    if info is None or info.si_pid == 0:
        return
    with suppress(OSError):
        os.killpg(pid, signal.SIGKILL)


def poll(job: Job) -> int | None:
    if job.proc is not None:
        end_group_if_exited(job.pid)
        return job.proc.poll()
    if job.pid <= 0:
        return -1  # never started: waitpid(0) would reap another task's process
    end_group_if_exited(job.pid)
    return _wait_nohang(job.pid)


def _wait_nohang(pid: int) -> int | None:
    """The exit status of our child ``pid`` if it ended (reaped now), else None; -1 if it is not ours."""
    try:
        ended, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return -1
    except OSError as exc:
        if exc.errno == errno.EINTR:
            return None
        raise
    if ended == 0:
        return None
    return os.waitstatus_to_exitcode(status)
