"""The steering commands (SPEC section 11): pause, resume, retry, wait and run-now, printed.

The work is scheduling.steering's (the ops, waiting) and api.run_now's (the forced run)."""

from __future__ import annotations

import sys
import time

from kmpwm.cli.output import is_tty, print_json, printable, say
from kmpwm.core.exitcodes import InvalidParams
from kmpwm.core.timeparse import iso, parse_duration, parse_time
from kmpwm.scheduling import steering
from kmpwm.storage.stores import open_store


def _ids_or_tag(ids, tag, all_) -> str:
    return "the queue" if all_ else (f"tag {tag!r}" if tag is not None else ", ".join(ids))


def pause_command(paths, ids, tag, all_, until, as_json) -> int:
    until_ts = parse_time(until, what="--until") if until is not None else None
    if until_ts is not None and until_ts <= time.time():
        raise InvalidParams(f"invalid --until {until!r}: the time has passed")
    done = steering.pause(open_store(paths), ids, tag, all_, until_ts)
    if as_json:
        print_json({"paused": done})
        return 0
    when = f" until {iso(until_ts)}" if until_ts is not None else ""
    if all_:
        say(f"paused the queue{when}: nothing starts until `kmpwm resume --all`")
    elif done:
        say(f"paused {len(done)} task(s){when}: {', '.join(done)}")
    else:
        say(f"nothing to pause ({_ids_or_tag(ids, tag, all_)}: no unfinished task)")
    return 0


def resume_command(paths, ids, tag, all_, as_json) -> int:
    done = steering.resume(open_store(paths), ids, tag, all_)
    if as_json:
        print_json({"resumed": done})
        return 0
    if all_:
        say("resumed the queue" + (f" and {len(done)} paused task(s): {', '.join(done)}" if done else ""))
    elif done:
        say(f"resumed {len(done)} task(s): {', '.join(done)}")
    else:
        say(f"nothing to resume ({_ids_or_tag(ids, tag, all_)}: nothing paused)")
    return 0


def retry_command(paths, ids, failed, tag, as_json) -> int:
    done = steering.retry(open_store(paths), ids, failed, tag)
    if as_json:
        print_json({"retried": done})
    elif done:
        say(f"retried {len(done)} task(s): {', '.join(done)}")
    else:
        say("nothing to retry (no FAILED or CANCELLED task matches)")
    return 0


def wait_command(paths, ids, tag, timeout, as_json) -> int:
    timeout_s = parse_duration(timeout, what="--timeout") if timeout is not None else None
    res = steering.wait(open_store(paths), ids, tag, timeout_s)
    if as_json:
        print_json(res.doc())
    else:
        for t in res.tasks:
            lr = t["last_result"] or {}
            msg = f" ({lr.get('status')}: {lr['message']})" if lr.get("message") else ""
            say(f"{t['id']}: {t['state']}{msg}")
    if res.timed_out:
        sys.stderr.write(f"kmpwm: timed out after {timeout}; not every task has finished\n")
    return res.exit_code


def run_now_command(paths, ids, ignore_constraints, grace, as_json) -> int:
    from kmpwm.api import run_now
    from kmpwm.cli.rundue import _Progress, _summary, warn

    grace_s = parse_duration(grace, what="--grace") if grace is not None else None
    live = not as_json and is_tty()
    progress = _Progress().event if live else None
    doc, code, why = run_now(paths, ids, ignore_constraints, grace_s, on_event=progress, warn=warn)
    if as_json:
        print_json(doc)
    else:
        _summary(doc, False)
        if not live:
            for row in doc["ran"]:
                if row["status"] != "SUCCESS":
                    sys.stderr.write(
                        printable(f"kmpwm: {row['id']} ({row['worker']}): {row['status']}: {row['message']}") + "\n"
                    )
    if code == 75:
        sys.stderr.write(f"kmpwm: the run expired ({why})\n")
    return code
