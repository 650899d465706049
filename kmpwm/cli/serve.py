"""``kmpwm serve`` as a command: the long-lived runner (running/serve.py), its log lines on
stderr, and the document ``--json`` prints when it stops."""

from __future__ import annotations

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
        try:
            state_file(paths, os.getpid()).unlink()
        except OSError:
            pass
    signo = runner.signals.flags.get("signo")
    expired = runner.report.expired
    if code == 75 and signo in (signal.SIGTERM, signal.SIGINT):
        serve.log(f"stopped ({signal.Signals(signo).name}); {len(expired)} running task(s) savepointed and released")
        code = 0
    elif code == 75:
        serve.log(f"the run expired ({runner.expire_reason}); running tasks savepointed and released")
    if as_json:  # one document, at the end: how it stopped and what it handed back
        from kmpwm.cli.output import print_json

        print_json({"stopped_by": signal.Signals(signo).name if signo else None, "expired": expired, "exit_code": code})
    return code
