"""The steering commands (SPEC section 11): pause, resume, retry, wait and run-now, printed.

The work is scheduling.steering's (the ops, waiting) and api.run_now's (the forced run)."""

from __future__ import annotations

import sys
import time

from kmpwm.cli.options import duration_or_none
from kmpwm.cli.output import is_tty, print_json, printable, say
from kmpwm.core.exitcodes import InvalidParams
from kmpwm.core.timeparse import iso, parse_time
from kmpwm.scheduling import steering
from kmpwm.storage.stores import open_store


def _ids_or_tag(ids, tag) -> str:
    return f"tag {tag!r}" if tag is not None else ", ".join(ids)


def _until(until: str | None) -> float | None:
    """``--until`` as a time stamp (InvalidParams if it has passed), None if not given."""
    if until is None:
        return None
    until_ts = parse_time(until, what="--until")
    if until_ts <= time.time():
        raise InvalidParams(f"invalid --until {until!r}: the time has passed")
    return until_ts


def pause_command(paths, ids, tag, all_, until, as_json) -> int:
    until_ts = _until(until)
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
        say(f"nothing to pause ({_ids_or_tag(ids, tag)}: no unfinished task)")
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
        say(f"nothing to resume ({_ids_or_tag(ids, tag)}: nothing paused)")
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
    res = steering.wait(open_store(paths), ids, tag, duration_or_none(timeout, "--timeout"))
    if as_json:
        print_json(res.doc())
    else:
        for t in res.tasks:
            say(f"{t['id']}: {t['state']}{_last_message(t['last_result'] or {})}")
    if res.timed_out:
        sys.stderr.write(f"kmpwm: timed out after {timeout}; not every task has finished\n")
    return res.exit_code


def _last_message(last_result: dict) -> str:
    """`` (STATUS: message)`` of a last result with a message, else nothing."""
    if not last_result.get("message"):
        return ""
    return f" ({last_result.get('status')}: {last_result['message']})"


def run_now_command(paths, ids, ignore_constraints, grace, as_json) -> int:
    from kmpwm.api import run_now
    from kmpwm.cli.rundue import _progress, _summary, warn

    grace_s = duration_or_none(grace, "--grace")
    live = not as_json and is_tty()
    doc, code, why = run_now(paths, ids, ignore_constraints, grace_s, on_event=_progress if live else None, warn=warn)
    if as_json:
        print_json(doc)
    else:
        _summary(doc, False)
        if not live:
            _warn_unsuccessful(doc["ran"])
    if code == 75:
        sys.stderr.write(f"kmpwm: the run expired ({why})\n")
    return code


def _warn_unsuccessful(ran: list) -> None:
    """Off a terminal, one line on stderr for every task that did not succeed."""
    for row in ran:
        if row["status"] != "SUCCESS":
            sys.stderr.write(
                printable(f"kmpwm: {row['id']} ({row['worker']}): {row['status']}: {row['message']}") + "\n"
            )
