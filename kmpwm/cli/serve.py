"""``kmpwm serve`` as a command: the long-lived runner (running/serve.py), its log lines on
stderr, and the document ``--json`` prints when it stops."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from kmpwm.storage.paths import Paths, private_subdir


def log(line: str) -> None:
    sys.stderr.write(f"kmpwm serve: {line}\n")
    sys.stderr.flush()


def serve_command(paths: Paths, *, parallel: int | None, grace: str | None, as_json: bool = False) -> int:
    from kmpwm.cli.rundue import warn
    from kmpwm.core.models import DEFAULT_GRACE
    from kmpwm.core.timeparse import parse_duration
    from kmpwm.running.runner import Runner
    from kmpwm.running.serve import Serve, state_file, write_state

    grace_s = parse_duration(grace, what="grace") if grace is not None else DEFAULT_GRACE
    private_subdir(paths.runners_dir)
    serve = Serve(paths, log=log)

    def done(kind, payload):
        if kind != "done":
            return
        _job, row = payload
        if row["status"] == "FAILURE":
            from kmpwm.cli.output import printable

            serve.log(printable(f"{row['id']} ({row['worker']}) failed: {row['message']}"))

    runner = Runner(paths, grace=grace_s, parallel=parallel, on_event=done, serve=serve, warn=warn)
    write_state(paths)
    serve.log(f"serving {paths.journal_dir.parent} (pid {os.getpid()})")
    try:
        code = runner.run()
    finally:
        serve.close(runner)
        with contextlib.suppress(OSError):
            state_file(paths, os.getpid()).unlink()
    signo = runner.signals.flags.get("signo")
    code = _stopped(serve, runner, code, signo)
    if as_json:  # one document, at the end: how it stopped and what it handed back
        from kmpwm.cli.output import print_json

        stopped_by = signal.Signals(signo).name if signo else None
        print_json({"stopped_by": stopped_by, "expired": runner.report.expired, "exit_code": code})
    return code


def _stopped(serve, runner, code: int, signo) -> int:
    """Log how serve stopped; its exit code (0 when SIGTERM or SIGINT stopped it)."""
    if code != 75:
        return code
    if signo in (signal.SIGTERM, signal.SIGINT):
        expired = runner.report.expired
        serve.log(f"stopped ({signal.Signals(signo).name}); {len(expired)} running task(s) savepointed and released")
        return 0
    serve.log(f"the run expired ({runner.expire_reason}); running tasks savepointed and released")
    return code
