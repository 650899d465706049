"""``kmpwm simulate-expire`` as a command: deliver the expiration signal (running/expiry.py), say to whom."""

from __future__ import annotations

import sys

from kmpwm.storage.paths import Paths


def simulate_expire_command(paths: Paths, ids: list[str], all_: bool, grace, as_json: bool) -> int:
    from kmpwm.cli.options import duration_or_none
    from kmpwm.cli.output import print_json, say
    from kmpwm.running.expiry import simulate_expire

    signalled = simulate_expire(paths, ids, all_, duration_or_none(grace, "grace"))
    code = 0 if signalled else 1
    if as_json:
        print_json({"signalled": signalled, "exit_code": code})
    elif signalled:
        for s in signalled:
            say(f"sent the expiration signal to run-due pid {s['pid']} (running {', '.join(s['tasks'])})")
    else:
        sys.stderr.write("kmpwm: nothing matching is running\n")
    return code
