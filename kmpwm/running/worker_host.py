"""Running one Python worker inside its own process (the child side of run-due).

The worker object is a callable ``(input)`` or ``(input, ctx)``, sync or async, or a class with
``do_work`` taking the same; it returns a WorkerResult, True/False/None, or raises (a failure
with the exception's message; the traceback goes to stderr, which run-due logs).
"""

from __future__ import annotations

import importlib
import inspect
import signal
import sys
import time
import traceback
from contextlib import suppress
from typing import Any

from kmpwm.core.results import Failure, WorkerResult, normalise
from kmpwm.running.context import WorkerContext


def load_target(info) -> Any:
    """The object behind a worker: an entry point's, or a config ``entry = "module:attr"``
    (imported with the worker's ``path``, config.toml's directory and its ``cwd`` first on
    ``sys.path``: _add_import_dirs)."""
    if getattr(info, "preloaded", None) is not None:
        return info.preloaded
    if info.entry_point is not None:
        return info.entry_point.load()
    module_name, _, attr = info.config.entry.partition(":")
    _add_import_dirs(info.config)
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _add_import_dirs(cfg) -> None:
    """Put a config entry worker's directories first on ``sys.path``: its ``path``, then
    config.toml's directory, then its ``cwd``."""
    if cfg.cwd and cfg.cwd not in sys.path:
        sys.path.insert(0, cfg.cwd)
    for directory in reversed(cfg.import_dirs):
        if directory not in sys.path:
            sys.path.insert(0, directory)


_WANTS_CTX: dict = {}  # function -> does it take a ctx (inspect.signature costs ~50 us a call)


def _wants_ctx(func) -> bool:
    if inspect.isfunction(func):  # a plain function: the same object every task, so asked once
        known = _WANTS_CTX.get(func)
        if known is None:
            known = _WANTS_CTX[func] = _takes_ctx(func)
        return known
    return _takes_ctx(func)


def _takes_ctx(func) -> bool:
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return True
    return len(positional) >= 2


def call(target: Any, input: str | None, ctx: WorkerContext) -> WorkerResult:
    """Invoke ``target`` the way its signature asks and normalise what it returns."""
    func = _entry(target)
    if func is None:
        return Failure(f"worker object {target!r} is not callable")
    args = (input, ctx) if _wants_ctx(func) else (input,)
    value = func(*args)
    if inspect.isawaitable(value):
        import asyncio  # only async workers pay for it

        value = asyncio.run(_await(value))
    return normalise(value)


def _entry(target: Any):
    """What to call: a class's ``do_work`` (of a new instance), an object's ``do_work``, else the
    callable itself; None when it is not callable."""
    if inspect.isclass(target):
        return target().do_work
    if not callable(target):
        return None
    if hasattr(target, "do_work") and not inspect.isfunction(target):
        return target.do_work
    return target


async def _await(awaitable):
    return await awaitable


_output_ready = False


def capture_output() -> None:
    """In a worker process whose stdout and stderr are run-due's pipe: line-buffered stdout, so
    that the two streams interleave in the order they were written, and ``logging`` records of
    INFO and above on stderr while the worker configures no handler, so they land in the run's
    output too."""
    global _output_ready
    if _output_ready:
        return
    _output_ready = True
    with suppress(Exception):
        sys.stdout.reconfigure(line_buffering=True)
        import logging

        # No handler is added (``logging.basicConfig`` in the worker still takes effect): the
        # handler of last resort, used while the worker configures none, takes INFO and up.
        root = logging.getLogger()
        if not root.handlers and logging.lastResort is not None:
            logging.lastResort.setLevel(logging.INFO)
            logging.lastResort.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            if root.level > logging.INFO:
                root.setLevel(logging.INFO)


def run_in_child(info, input: str | None, ctx: WorkerContext) -> dict:
    """Run the worker; returns the result as a plain dict (never raises)."""
    signal.signal(signal.SIGTERM, lambda signo, frame: ctx.expire())
    capture_output()
    try:
        result = _run(info, input, ctx)
    finally:
        ctx.close()
    if ctx._reporter is not None:
        result["progress"] = True  # run-due removes the progress file when the run ends
    return result


def _run(info, input: str | None, ctx: WorkerContext) -> dict:
    try:
        target = load_target(info)
        info.preloaded = target  # a pool host imports a worker once
        result = call(target, input, ctx)
    except Exception as exc:
        traceback.print_exc()  # to the output tail, which run-due logs
        return {"status": "FAILURE", "message": str(exc) or type(exc).__name__, "data": None}
    except SystemExit as exc:
        if exc.code in (0, None):
            return {"status": "SUCCESS", "message": None, "data": None}
        return {"status": "FAILURE", "message": f"worker exited with {exc.code}", "data": None}
    return {"status": result.status, "message": result.message, "data": result.data}


# -- a forked worker process (KMPWM_POOL=0) and what every worker process shares ---------------


def forked_main(info, task: dict, *, attempt: int, upstream: dict, limit: float, progress, env: dict, fd: int) -> None:
    """The body of a worker process forked for one task: run it, write its result to ``fd``."""
    import os

    ctx = WorkerContext(
        task_id=task["id"],
        attempt=attempt,
        upstream=upstream,
        input=task["input"],
        worker=task["worker"],
        chain_id=task.get("chain_id"),
        step=task.get("step"),
        deadline=time.monotonic() + limit,
        progress_file=progress,
    )
    os.environ.update(env)
    result = run_in_child(info, task["input"], ctx)
    blob = _result_blob(result)
    sys.stdout.flush()
    sys.stderr.flush()
    from kmpwm.storage.journal import write_all

    write_all(fd, blob)


def child_failed() -> int:
    """In a worker process that failed outside the worker: the traceback to its output (which
    run-due logs), and the exit status that says so."""
    with suppress(BaseException):
        traceback.print_exc()
        sys.stderr.flush()
    return 70


def flush_streams() -> None:
    """In run-due, just before it forks a worker process: what run-due has buffered must not
    be written again by the worker as part of its own output."""
    sys.stdout.flush()
    sys.stderr.flush()


# -- the warm pool: a host process runs Python tasks one after another ------------------------

_HEADER = 4


def write_frame(fd: int, payload: bytes) -> None:
    from kmpwm.storage.journal import write_all

    write_all(fd, len(payload).to_bytes(_HEADER, "big") + payload)


def _read_exact(fd: int, n: int) -> bytes | None:
    import os

    chunks, left = [], n
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def host_main(in_fd: int, out_fd: int, registry) -> None:
    """The loop of a pool host: read a task, run it, write its result; exit at end of input.

    Between tasks the host restores its environment, working directory and signal handler, so a
    task sees the same process state as the first one did.  run-due replaces a host after a task
    that was told to stop, after a crash, and after a bounded number of tasks."""
    import os

    base_env = dict(os.environ)
    base_cwd = os.getcwd()
    _become_subreaper()
    capture_output()
    import logging

    root = logging.getLogger()
    base_logging = (list(root.handlers), root.level)
    targets: dict = {}
    while True:
        msg = _read_task(in_fd)
        if msg is None:
            return
        _set_environ(os.environ, {**base_env, **msg["env"]})
        with suppress(OSError):
            os.chdir(base_cwd)
        result = _host_task(msg, registry, targets)
        root.handlers[:] = base_logging[0]  # a basicConfig() in one task is not the next one's
        root.setLevel(base_logging[1])
        sys.stdout.flush()
        sys.stderr.flush()
        _end_leftovers()
        write_frame(out_fd, _result_blob(result))


def _read_task(fd: int) -> dict | None:
    """The next task's message from run-due (None: end of input)."""
    import orjson

    header = _read_exact(fd, _HEADER)
    if header is None:
        return None
    return orjson.loads(_read_exact(fd, int.from_bytes(header, "big")) or b"{}")


def _host_task(msg: dict, registry, targets: dict) -> dict:
    """Run one task in a pool host; ``targets``: the worker objects it loaded so far, by name."""
    info = registry.get(msg["worker"])
    if info is None:
        return {"status": "FAILURE", "message": f"unknown worker {msg['worker']!r}", "data": None}
    if msg["worker"] in targets:
        info.preloaded = targets[msg["worker"]]
    ctx = WorkerContext(
        task_id=msg["id"],
        attempt=msg["attempt"],
        upstream=msg["upstream"],
        input=msg["input"],
        worker=msg["worker"],
        chain_id=msg.get("chain_id"),
        step=msg.get("step"),
        deadline=time.monotonic() + msg["limit"],
        progress_file=msg.get("progress"),
    )
    result = run_in_child(info, msg["input"], ctx)
    if getattr(info, "preloaded", None) is not None:
        targets[msg["worker"]] = info.preloaded
    return result


def _result_blob(result: dict) -> bytes:
    """The result as JSON; one that cannot be is a FAILURE that says so."""
    import orjson

    try:
        return orjson.dumps(result, default=str)
    except TypeError as exc:
        return orjson.dumps({"status": "FAILURE", "message": f"result not JSON-serialisable: {exc}", "data": None})


def _set_environ(environ, target: dict) -> None:
    """Make ``environ`` (os.environ) equal ``target`` by changing only the variables that differ:
    each change is a putenv or unsetenv, and a task changes few of them (clearing and refilling
    the whole environment cost a pool host about 0.3 ms per task)."""
    for key in [k for k in environ if k not in target]:
        del environ[key]
    for key, value in target.items():
        if environ.get(key) != value:
            environ[key] = value


def _become_subreaper() -> None:
    """Linux: processes a task started and orphaned are re-parented to this host (not to init),
    so that _end_leftovers finds them even if they left the host's process group."""
    if not sys.platform.startswith("linux"):
        return
    with suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER


def _children() -> list[int]:
    import os

    pids: list[int] = []
    with suppress(OSError, ValueError):
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as fh:
                pids += [int(p) for p in fh.read().split()]
    return pids


def _end_leftovers() -> None:
    """After a task, before its result is sent: SIGKILL every process it started and left
    running, and reap them (a run is over when its worker returns, as a systemd unit's cgroup is
    ended with its main process).  Orphaned grandchildren come back to this host (a subreaper)
    as their parents die, hence the loop."""
    import time as _time

    for _ in range(50):
        kids = _children()
        if not kids:
            break
        _kill_and_reap(kids)
        _time.sleep(0.001)  # let orphans be re-parented here
    _reap_zombies()


def _kill_and_reap(pids: list[int]) -> None:
    import os
    import signal as _signal

    for pid in pids:
        with suppress(OSError):
            os.kill(pid, _signal.SIGKILL)
    for pid in pids:
        with suppress(OSError):
            os.waitpid(pid, 0)


def _reap_zombies() -> None:
    """Reap the zombies of processes the task started and did not wait for."""
    import os

    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except OSError:
            return
        if pid == 0:
            return
