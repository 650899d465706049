"""``[hooks]`` in config.toml (SPEC section 10): a command or a desktop notification when a task
ends FAILED (``on_failure``) or a run succeeds (``on_success``).

    [hooks]
    on_failure = ["notify-me", "--urgent"]   # argv, never run through a shell
    on_success = "notify"                    # notify-send / osascript, else a log line

run-due starts a hook only after the result is durable, in its own session, and goes on with
other work; a hook has HOOK_TIMEOUT seconds.  Its failure (an exit status other than 0, a
time-out, a command that cannot start) is logged and recorded as a ``hook failed`` event; it never
changes the task.

At most once: run-due starts each hook once, right after the result's record is durable, and
nothing ever starts it again.  A run-due killed between those two moments (a few milliseconds)
skips that hook; the result itself is kept (``events``, ``inspect-queue``, run-due's stderr line).
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import suppress
from dataclasses import dataclass, field

from kmpwm.core import schema
from kmpwm.core.exitcodes import ConfigError

HOOK_TIMEOUT = 30.0
KINDS = ("on_failure", "on_success")


def parse_hooks(path, table) -> dict:
    """The ``[hooks]`` table of config.toml, validated: {"on_failure": argv | "notify", ...}."""
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [hooks] must be a table")
    unknown = sorted(set(table) - set(KINDS))
    if unknown:
        raise ConfigError(f"{path}: [hooks]: unknown key {unknown[0]!r} (expected on_failure, on_success)")
    for kind, value in table.items():
        if not _is_hook(value):
            raise ConfigError(
                f"{path}: [hooks] {kind} must be a command as a list of strings "
                f'(argv, never a shell), e.g. ["notify-me", "--urgent"], or "notify"'
            )
    return dict(table)


def _is_hook(value) -> bool:
    """``"notify"``, or a command: a list of strings that names a program."""
    if value == "notify":
        return True
    return isinstance(value, list) and bool(value) and all(isinstance(a, str) for a in value) and value[0] != ""


def payload(task: dict, status: str, message, data, attempt) -> dict:
    return {
        "id": task["id"],
        "worker": task["worker"],
        "state": task["state"],
        "status": status,
        "message": message,
        "data": data,
        "attempt": attempt,
        "chain_id": task.get("chain_id"),
    }


def _failure_payload(t: dict, run) -> dict:
    """An ``on_failure`` hook's document: of the run (``run``: (job, row)), or of the task that
    failed without a run of its own (upstream failed, window missed)."""
    if run is None:
        return payload(t, "FAILURE", t.get("reason"), None, t["attempts"])
    job, row = run
    return payload(t, row["status"], row["message"], row["data"], job.attempt)


@dataclass
class _Running:
    kind: str
    doc: dict
    proc: object
    out: object
    deadline: float


@dataclass
class HookRunner:
    """Hooks started by one run-due: polled from its loop, waited for (bounded) at its end."""

    paths: object
    hooks: dict
    running: list = field(default_factory=list)
    failures: list = field(default_factory=list)  # (task id, detail) for ``hook failed`` events

    def fire(self, kind: str, doc: dict) -> None:
        spec = self.hooks.get(kind)
        if spec is None:
            return
        try:
            if spec == "notify":
                self._notify(kind, doc)
            else:
                self._start(kind, doc, list(spec))
        except Exception as exc:  # a hook never fails the run
            self._failed(kind, doc, f"could not start: {exc}")

    def fire_results(self, rows: list, failed: list, state: dict) -> None:
        """After a runner's results are durable, once (at most once: nothing starts them again):
        ``on_success`` for each run that succeeded (``rows``: (job, row)), ``on_failure`` for
        each task the record ended FAILED (``failed``: ids), with or without a run of its own."""
        if os.environ.get("KMPWM_CRASH_AT") == "before-hooks":  # crash injection for the tests
            os.kill(os.getpid(), signal.SIGKILL)
        tasks = state["tasks"]
        for job, row in rows:
            if row["status"] == "SUCCESS" and job.id in tasks:
                self.fire("on_success", payload(tasks[job.id], "SUCCESS", row["message"], row["data"], job.attempt))
        self._fire_failures(rows, failed, tasks)

    def _fire_failures(self, rows: list, failed: list, tasks: dict) -> None:
        """``on_failure`` for each task in ``failed`` (once each), of its run in ``rows`` if it had one."""
        ran = {job.id: (job, row) for job, row in rows}
        for tid in dict.fromkeys(failed):
            t = tasks.get(tid)
            if t is not None:
                self.fire("on_failure", _failure_payload(t, ran.get(tid)))

    def _env(self, doc: dict) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KMPWM_") or k in ("KMPWM_HOME",)}
        env.update(
            {
                "KMPWM_TASK_ID": doc["id"],
                "KMPWM_WORKER": doc["worker"],
                "KMPWM_STATE": doc["state"],
                "KMPWM_STATUS": doc["status"],
                "KMPWM_MESSAGE": str(doc["message"] or "").replace("\0", ""),
                "KMPWM_ATTEMPT": str(doc["attempt"]),
                "KMPWM_CHAIN_ID": doc["chain_id"] or "",
            }
        )
        return env

    def _start(self, kind: str, doc: dict, argv: list[str]) -> None:
        import shutil
        import subprocess
        import tempfile

        import orjson

        env = self._env(doc)
        prog = argv[0] if os.sep in argv[0] else shutil.which(argv[0], path=env.get("PATH"))
        if prog is None:
            self._failed(kind, doc, f"command not found: {argv[0]}")
            return
        stdin = tempfile.TemporaryFile()
        stdin.write(orjson.dumps(doc, default=str))
        stdin.seek(0)
        out = tempfile.TemporaryFile()
        try:
            proc = subprocess.Popen(
                [prog, *argv[1:]],
                stdin=stdin,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            out.close()
            self._failed(kind, doc, f"cannot run {argv[0]}: {exc.strerror or exc}")
            return
        finally:
            stdin.close()
        self.running.append(_Running(kind, doc, proc, out, time.monotonic() + _timeout()))

    def _notify(self, kind: str, doc: dict) -> None:
        title = f"kmpwm: {doc['id']} {'failed' if kind == 'on_failure' else 'succeeded'}"
        body = doc["message"] or f"{doc['worker']}: {doc['status']}"
        from kmpwm.running.launch import notify_argv

        argv = notify_argv(title, body)
        if argv is None:
            from kmpwm.storage.logs import logger

            logger(self.paths).info("notification (%s): %s: %s", kind, title, body)
            return
        self._start(kind, doc, argv)

    def poll(self) -> None:
        """Reap finished hooks; kill those past their time limit."""
        if not self.running:
            return
        now = time.monotonic()
        self.running = [h for h in self.running if not self._reaped(h, now)]

    def _reaped(self, h: _Running, now: float) -> bool:
        """Is hook ``h`` over (it ended, or it was killed past its time limit)?  A failure is noted."""
        code = h.proc.poll()
        if code is None and now < h.deadline:
            return False
        if code is None:
            with suppress(OSError):
                os.killpg(h.proc.pid, signal.SIGKILL)
            h.proc.wait()
            self._failed(h.kind, h.doc, f"timed out after {_timeout():g}s", h.out)
        elif code != 0:
            self._failed(
                h.kind, h.doc, f"exited with status {code}" if code > 0 else f"killed by {_signame(-code)}", h.out
            )
        h.out.close()
        return True

    def wait(self) -> None:
        """At run-due's end: wait for the hooks still running (each within its time limit)."""
        while self.running:
            self.poll()
            if self.running:
                time.sleep(0.02)

    def _failed(self, kind: str, doc: dict, why: str, out=None) -> None:
        tail = ""
        if out is not None:
            with suppress(OSError):
                out.seek(0, os.SEEK_END)
                out.seek(max(0, out.tell() - 400))
                tail = " ".join(out.read().decode("utf-8", "replace").split())[-300:]
        error = f"{why}: {tail}" if tail else why
        from kmpwm.storage.logs import logger

        logger(self.paths).warning("hook %s for %s failed: %s", kind, doc["id"], error)
        self.failures.append((doc["id"], {"hook": kind, "error": error}))

    def notes(self) -> list[dict]:
        """Journal ops recording the hooks that failed (shown by ``events`` as ``hook failed``)."""
        ops = [schema.note(tid, "hook failed", detail) for tid, detail in self.failures]
        self.failures = []
        return ops


def _timeout() -> float:
    try:  # KMPWM_HOOK_TIMEOUT: for the tests, which cannot wait 30 s
        return float(os.environ.get("KMPWM_HOOK_TIMEOUT", HOOK_TIMEOUT))
    except ValueError:
        return HOOK_TIMEOUT


def _signame(signo: int) -> str:
    try:
        return signal.Signals(signo).name
    except ValueError:
        return f"signal {signo}"
