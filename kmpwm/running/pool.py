"""The warm pool: host processes that run Python tasks one after another (worker_host.host_main),
forked warm (kmpwm and the workers' modules already imported), replaced after a task told to stop,
after a crash, and after HOST_MAX_TASKS tasks."""

from __future__ import annotations

import os
import selectors
import signal
import time
from contextlib import suppress
from dataclasses import dataclass, field

import orjson

from kmpwm.running import child, pipes
from kmpwm.running.jobs import Job, output

HOST_MAX_TASKS = 500  # a pool host is replaced after this many tasks (bounded leaks)


@dataclass
class Host:
    """A pool process that runs Python tasks one after another (see worker_host.host_main)."""

    pid: int
    to_host: int
    results: int
    output: int
    buf: bytearray = field(default_factory=bytearray)
    job: Job | None = None
    tasks: int = 0
    dead: bool = False
    retire: bool = False
    exit_status: int | None = None

    @property
    def idle(self) -> bool:
        """It may take a task now."""
        return self.job is None and not self.dead and not self.retire

    @property
    def ended(self) -> bool:
        """It exited, was waited for, and runs nothing."""
        return self.dead and self.exit_status is not None and self.job is None


class Pool:
    """The hosts of one runner.  ``sel``: the runner's selector (a host's pipes are watched
    there, with the Host as their key's data); ``groups``: the runner's groups.GroupLog;
    ``registry()``: the workers; ``preload(info)``: import a worker's module before forking;
    ``parent_fds()``: the runner's other descriptors, which a host must not keep."""

    def __init__(self, sel, groups, registry, preload, parent_fds):
        self.sel = sel
        self.hosts: list[Host] = []
        self._groups = groups
        self._registry = registry
        self._preload = preload
        self._parent_fds = parent_fds

    def start(self, job: Job, info, msg: dict) -> None:
        """Hand ``job`` (described by ``msg``) to an idle host, a new one if none is idle."""
        host = next((h for h in self.hosts if h.idle), None)
        if host is None:
            host = self._spawn(info)
        from kmpwm.running.worker_host import write_frame

        host.job = job
        job.host = host
        job.pid = host.pid
        try:
            write_frame(host.to_host, orjson.dumps(msg))
        except OSError:
            host.dead = True  # it died between tasks: the job fails over to the death path

    def _spawn(self, info) -> Host:
        """Fork a pool host, warm: kmpwm and the first worker's module are already imported."""
        from kmpwm.running import worker_host  # noqa: F401  imported here, before forking, not in each host

        self._preload(info)
        child.prepare()
        task_r, task_w = os.pipe()
        res_r, res_w = os.pipe()
        out_r, out_w = os.pipe()
        parent_fds = [fd for h in self.hosts for fd in (h.to_host, h.results, h.output) if fd >= 0]
        parent_fds += self._parent_fds()
        registry = self._registry()

        def body():
            from kmpwm.running.worker_host import host_main

            host_main(task_r, res_w, registry)

        pid = child.fork([task_w, res_r, out_r, *parent_fds], out_w, self.sel, body)
        for fd in (task_r, res_w, out_w):
            os.close(fd)
        self._groups.add(pid)
        host = Host(pid, task_w, res_r, out_r)
        for fd in (res_r, out_r):
            os.set_blocking(fd, False)
            self.sel.register(fd, selectors.EVENT_READ, host)
        self.hosts.append(host)
        return host

    def drain(self, host: Host, fd: int) -> None:
        """Read a host's pipe: its output goes to its job's; a result ends its job's run."""
        if fd == host.output:
            closed = pipes.drain(fd, lambda chunk: self._output(host, chunk))
        else:
            closed = pipes.drain(fd, lambda chunk: self._results(host, fd, chunk))
        if closed:
            self._gone(host)

    def _output(self, host: Host, chunk: bytes) -> None:
        if host.job is not None:
            output(host.job, chunk)

    def _results(self, host: Host, fd: int, chunk: bytes) -> None:
        host.buf += chunk
        for frame in pipes.frames(host.buf):
            if fd != host.output and host.output >= 0:
                self.drain(host, host.output)  # its output, written before the result
            if host.job is not None:
                self._answered(host, frame)

    def _answered(self, host: Host, frame: bytes) -> None:
        """``frame`` is the result of the host's job: that run ends, and the host takes another
        task unless it is to retire."""
        job = host.job
        job.result = bytearray(frame)
        job.answered = True
        job.exit_status = 0
        host.job = None
        host.tasks += 1
        if host.retire or host.tasks >= HOST_MAX_TASKS:
            self.close(host)

    def _gone(self, host: Host) -> None:
        """The host's pipes closed: it exited or was killed; its running job (if any) ends."""
        if host.dead and host.results < 0:
            return
        host.dead = True
        for fd in (host.results, host.output, host.to_host):
            if fd >= 0:
                pipes.close(self.sel, fd)
        host.results = host.output = host.to_host = -1
        self.reap(host)

    def reap(self, host: Host) -> None:
        if host.exit_status is not None:
            return
        try:
            pid, status = os.waitpid(host.pid, os.WNOHANG)
        except ChildProcessError:
            host.exit_status = -1
            return
        if pid:
            host.exit_status = os.waitstatus_to_exitcode(status)

    def close(self, host: Host) -> None:
        """Retire an idle host: end of input makes it exit; its pipes then close."""
        host.retire = True
        if host.to_host >= 0:
            with suppress(OSError):
                os.close(host.to_host)
            host.to_host = -1

    def retire(self) -> None:
        """The workers changed (serve's reload): idle hosts exit now, busy ones after their task."""
        for host in self.hosts:
            if host.job is None:
                self.close(host)
            else:
                host.retire = True

    def forget_ended(self) -> None:
        """Drop the hosts that exited, were waited for and run nothing."""
        for host in self.hosts:
            if host.dead:
                self.reap(host)
        self.hosts = [h for h in self.hosts if not h.ended]

    def fds(self) -> list[int]:
        return [fd for h in self.hosts for fd in (h.to_host, h.results, h.output) if fd >= 0]

    def _await_exits(self, deadline: float) -> None:
        """Read the hosts' pipes until every host is gone, or until ``deadline``."""
        while any(not h.dead for h in self.hosts) and time.monotonic() < deadline:
            for key, _ in self.sel.select(0.05):
                if isinstance(key.data, Host):
                    self.drain(key.data, key.fd)

    def shutdown(self) -> None:
        """At the end of a run: every host is told to exit, killed if it has not within 2 s, and
        waited for."""
        for host in self.hosts:
            self.close(host)
        self._await_exits(time.monotonic() + 2)
        for host in self.hosts:
            if not host.dead:
                with suppress(OSError):
                    os.killpg(host.pid, signal.SIGKILL)
            if host.exit_status is None:
                _reap_within(host.pid, 2.0)


def _reap_within(pid: int, seconds: float) -> None:
    """Wait for a killed host, ``seconds`` at most: one stuck in the kernel (an NFS read, a
    device) must not hang the run's end; its zombie goes with this process."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done or time.monotonic() >= deadline:
            return
        time.sleep(0.01)
