"""Starting a run's worker: a desktop notification (``--exact-behavior notify``), a command (its
own process, through setpriv so that it dies with run-due), a Python worker in a warm pool host
(pool.py), or one forked for the task (``KMPWM_POOL=0``).  A worker that cannot be started fails
its run (``Job.immediate``), never run-due."""

from __future__ import annotations

import functools
import os
import selectors
import sys
import time
from contextlib import suppress

import orjson

from kmpwm.running import child, groups
from kmpwm.running.jobs import Job
from kmpwm.running.pool import Pool
from kmpwm.storage.paths import Paths

MAX_INLINE_ENV_INPUT = 100 * 1024  # larger inputs reach command workers on stdin only


def failure(message: str) -> dict:
    return {"status": "FAILURE", "message": message, "data": None}


class Launcher:
    """How one runner starts workers.  ``groups``: its groups.GroupLog (what the next run-due
    kills if this one dies); ``registry()``: the workers; ``parent_fds()``: the runner's
    descriptors that a worker process must not keep.  ``attach(sel)`` before the first start."""

    def __init__(self, paths: Paths, runner_id: str, groups_log, registry, parent_fds, crash_at=None):
        self.paths = paths
        self.runner_id = runner_id
        self.sel: selectors.BaseSelector | None = None
        self._groups = groups_log
        self._parent_fds = parent_fds
        self._crash_at = crash_at  # crash injection for the tests
        self._base_env: dict | None = None
        self._preloaded: set[str] = set()
        self._use_pool = os.environ.get("KMPWM_POOL", "1") != "0"
        self.pool = Pool(None, groups_log, registry, self.preload, parent_fds)

    def attach(self, sel) -> None:
        self.sel = self.pool.sel = sel

    def preload(self, info) -> None:
        """Import a Python worker's module once in run-due, so that every forked child starts with
        it loaded (no import per task).  A failing import is left for the child to report;
        KMPWM_PRELOAD=0 turns this off for workers whose import has side effects (threads)."""
        if info.name in self._preloaded or os.environ.get("KMPWM_PRELOAD", "1") == "0":
            return
        self._preloaded.add(info.name)
        with suppress(Exception):
            from kmpwm.running.worker_host import load_target

            info.preloaded = load_target(info)

    def start(self, job: Job, info, upstream: dict) -> None:
        """Start ``job``'s worker; when it cannot be, ``job.immediate`` says why (a FAILURE)."""
        try:
            self._launch(job, info, upstream)
        except OSError as exc:
            job.immediate = failure(f"could not start the worker: {exc.strerror or exc}")
        except Exception as exc:  # a process that cannot be started fails its run, never run-due
            job.immediate = failure(f"could not start the worker: {exc}")
        if job.immediate is None and not _has_process(job):
            job.immediate = failure("could not start the worker")

    def _launch(self, job: Job, info, upstream: dict) -> None:
        """A notification, a command, or a Python worker; an unknown worker fails at once."""
        trig = job.task["trigger"]
        if trig["type"] == "exact" and trig.get("behavior") == "notify":
            job.immediate = notify(job.task, self.paths)
        elif info is None:
            job.immediate = failure(f"unknown worker {job.task['worker']!r}")
        elif job.kind == "command":
            self._command(job, info, upstream)
        else:
            self._python(job, info, upstream)

    def env(self, job: Job, upstream: dict) -> dict:
        t = job.task
        env = {
            "KMPWM_TASK_ID": t["id"],
            "KMPWM_ATTEMPT": str(job.attempt),
            "KMPWM_WORKER": t["worker"],
            "KMPWM_UPSTREAM": orjson.dumps(upstream).decode(),
            groups.MARK_ENV: self.runner_id,  # what the next run-due kills if this one dies starting it
        }
        if job.log is not None:
            env["KMPWM_PROGRESS"] = job.log.progress
        if t.get("chain_id"):
            env["KMPWM_CHAIN_ID"] = t["chain_id"]
            env["KMPWM_STEP"] = str(t["step"])
        return env

    def _watch(self, job: Job, fd: int, name: str) -> None:
        os.set_blocking(fd, False)
        job.fds[fd] = name
        self.sel.register(fd, selectors.EVENT_READ, job)

    # -- a command ----------------------------------------------------------------------------

    def _command_env(self, job: Job, cfg, upstream: dict) -> dict:
        if self._base_env is None:
            self._base_env = dict(os.environ)  # copied once per run, not per task
            self._base_env.pop("KMPWM_INPUT", None)
        env = dict(self._base_env)
        env.update(self.env(job, upstream))
        data = job.task["input"]
        if data is not None and len(data) <= MAX_INLINE_ENV_INPUT and "\0" not in data:
            env["KMPWM_INPUT"] = data  # an input with a NUL byte cannot be an environment value: stdin only
        env.update(cfg.env)
        return env

    def _preexec(self):
        preexec = None if child.DEATH_PREFIX else functools.partial(child.die_with_parent, os.getpid())
        if self._crash_at in ("command-fork", "command-fork-hold"):  # crash injection for the tests
            preexec = functools.partial(child.kill_parent_then_go_on, os.getpid(), self._crash_at.endswith("hold"))
        return preexec

    def _command(self, job: Job, info, upstream: dict) -> None:
        cfg = info.config
        env = self._command_env(job, cfg, upstream)
        problem = unstartable(cfg, env)
        if problem:
            job.immediate = failure(problem)
            return
        argv = list(cfg.command)
        prog = resolve(argv[0], cfg.cwd, env.get("PATH"))
        if prog is None:
            job.immediate = failure(f"command not found: {argv[0]}")
            return
        argv[0] = prog
        proc = self._popen(job, cfg, argv, env)
        if proc is None:
            return
        job.proc, job.pid = proc, proc.pid
        self._groups.add(proc.pid)
        for stream, name in ((proc.stdout, "out"), (proc.stderr, "err")):
            # Own a duplicate and close Popen's file object: otherwise its finaliser closes the fd
            # number again later, when it may already belong to another job's pipe.
            fd = os.dup(stream.fileno())
            stream.close()
            self._watch(job, fd, name)

    def _popen(self, job: Job, cfg, argv: list, env: dict):
        """The command's process, or None (``job.immediate`` says why it could not start)."""
        import subprocess
        import tempfile

        data = job.task["input"]
        if data:
            stdin = tempfile.TemporaryFile()
            stdin.write(data.encode("utf-8", "surrogateescape"))
            stdin.seek(0)
        else:
            stdin = open(os.devnull, "rb")  # no input: no temporary file
        # setpriv makes the command die with run-due (PR_SET_PDEATHSIG) without a preexec_fn,
        # which would force Python's slow fork path instead of vfork (measured: 2.3x fewer command
        # tasks per second).  The signal is armed only once setpriv runs, so a run-due killed
        # before that leaves an orphan: the launch line and the marks (groups.py) let the next
        # run-due find and kill it before it claims the task again.
        self._groups.launching()
        try:
            return subprocess.Popen(
                child.DEATH_PREFIX + argv,
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cfg.cwd,
                env=env,
                start_new_session=True,
                close_fds=True,
                preexec_fn=self._preexec(),
            )
        except FileNotFoundError:
            job.immediate = failure(f"command not found: {cfg.command[0]}")
        except PermissionError:
            job.immediate = failure(f"command not executable: {cfg.command[0]}")
        except OSError as exc:
            job.immediate = failure(f"cannot run {cfg.command[0]}: {exc.strerror}")
        finally:
            self._groups.launched()
            stdin.close()
        return None

    # -- a Python worker ----------------------------------------------------------------------

    def _python(self, job: Job, info, upstream: dict) -> None:
        if not self._use_pool:
            return self._forked(job, info, upstream)
        t = job.task
        msg = {
            "id": t["id"],
            "worker": t["worker"],
            "input": t["input"],
            "attempt": job.attempt,
            "upstream": upstream,
            "chain_id": t.get("chain_id"),
            "step": t.get("step"),
            "limit": job.limit,
            "env": self.env(job, upstream),
            "progress": job.log.progress if job.log else None,
        }
        self.pool.start(job, info, msg)

    def _forked(self, job: Job, info, upstream: dict) -> None:
        """One process per run (KMPWM_POOL=0): full isolation, a fork per task."""
        from kmpwm.running import worker_host  # noqa: F401  imported before forking, not in each child

        self.preload(info)
        child.prepare()
        r, w = os.pipe()
        out_r, out_w = os.pipe()
        env = self.env(job, upstream)
        progress = job.log.progress if job.log else None

        def body():
            from kmpwm.running.worker_host import forked_main

            forked_main(
                info,
                job.task,
                attempt=job.attempt,
                upstream=upstream,
                limit=job.limit,
                progress=progress,
                env=env,
                fd=w,
            )

        # The child runs the worker at once, and the worker may start a background job before
        # the group below is noted: the launch line and the mark cover that window, as they do
        # for a command (groups.py).  The child keeps the mark (it never execs).
        self._groups.launching()
        try:
            pid = child.fork([r, out_r, *self._parent_fds()], out_w, self.sel, body, no_gc=True)
            if self._crash_at == "python-fork":  # crash injection for the tests
                child.die_once_exists(os.environ.get("KMPWM_CRASH_HOLD", ""))
            job.pid = pid
            self._groups.add(pid)
        finally:
            self._groups.launched()
        os.close(w)
        os.close(out_w)
        for fd, name in ((r, "result"), (out_r, "out")):
            self._watch(job, fd, name)


def _has_process(job: Job) -> bool:
    """A process runs the job: its own, or a pool host."""
    return bool(job.pid) or job.proc is not None or job.host is not None


def resolve(prog: str, cwd: str | None, path: str | None) -> str | None:
    """The executable a command names, as execvp would find it; None if there is none."""
    import shutil

    if os.sep in prog:
        full = prog if os.path.isabs(prog) or not cwd else os.path.join(cwd, prog)
        return full if os.path.isfile(full) and os.access(full, os.X_OK) else None
    return shutil.which(prog, path=path)


def unstartable(cfg, env: dict) -> str | None:
    """Why a command worker's process cannot be started as configured (None if it can): a NUL
    byte (no argv or environment string can hold one) or a working directory that is missing."""
    for arg in cfg.command:
        if "\0" in arg:
            return f"the worker's command has a NUL byte in the argument {arg.split(chr(0))[0]!r}..."
    for key, value in env.items():
        if "\0" in key or "\0" in value:
            return f"the worker's environment variable {key.split(chr(0))[0]!r} has a NUL byte"
    return None if cfg.cwd is None else _cwd_problem(cfg.cwd)


def _cwd_problem(cwd: str) -> str | None:
    """Why ``cwd`` cannot be a command's working directory (None if it can)."""
    if "\0" in cwd:
        return "the worker's cwd has a NUL byte"
    if not os.path.isdir(cwd):
        why = "is not a directory" if os.path.exists(cwd) else "does not exist"
        return f"the worker's working directory {cwd} {why}"
    return None


def notify(task: dict, paths: Paths) -> dict:
    """``--exact-behavior notify``: post a desktop notification instead of running code."""
    import subprocess

    title = f"kmpwm: {task['id']}"
    body = task["input"] or f"{task['worker']} is due"
    late_ms = int(max(0.0, time.time() - task["trigger"]["at"]) * 1000)
    argv = notify_argv(title, body)
    method = "log"
    if argv is not None:
        try:
            subprocess.run(argv, timeout=5, check=False, capture_output=True)
            method = argv[0]  # notify-send or osascript
        except (OSError, subprocess.SubprocessError):
            method = "log"
    from kmpwm.storage.logs import logger

    logger(paths).info("notification for %s: %s (%s)", task["id"], body, method)
    return {
        "status": "SUCCESS",
        "message": f"notified ({method})",
        "data": {"notified": True, "method": method, "late_ms": late_ms},
    }


def notify_argv(title: str, body: str) -> list[str] | None:
    """The command that posts a desktop notification here: notify-send, else osascript on macOS
    (None: neither)."""
    import shutil

    if shutil.which("notify-send"):
        return ["notify-send", title, body]
    if sys.platform == "darwin" and shutil.which("osascript"):
        return ["osascript", "-e", f"display notification {applescript(body)} with title {applescript(title)}"]
    return None


def applescript(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
