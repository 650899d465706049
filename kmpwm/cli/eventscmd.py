"""``kmpwm events``: print scheduling.events' feed, once or following it."""

from __future__ import annotations

import sys
import time

from kmpwm.cli.output import print_json, print_json_line, say
from kmpwm.core.timeparse import iso
from kmpwm.scheduling.events import event_doc, open_events
from kmpwm.storage.paths import Paths

POLL = 0.3  # --follow's pause between looks (s)


def _line(ev: list) -> str:
    ts, tid, kind, detail = ev
    bits = []
    if kind == "ran":
        bits.append(f"{detail.get('status')} in {detail.get('duration_ms')}ms")
        if detail.get("message"):
            bits.append(str(detail["message"])[:100])
    else:
        bits += [f"{k}={v}" for k, v in detail.items() if v not in (None, "", {})]
    return f"{iso(ts)}  {tid}  {kind}  {' '.join(bits)}".rstrip()


def events_command(paths: Paths, task: str | None, since, follow: bool, as_json: bool) -> int:
    feed = open_events(paths, task, since)
    if feed.damage:
        _warn_damage(feed.damage)
    if not follow:
        return _print_all(feed.selected, as_json)
    return _follow(feed, _json_line if as_json else _say_line)


def _follow(feed, emit) -> int:
    """``emit`` the selected events, then each new one as it comes, until interrupted."""
    new = feed.selected
    try:
        while True:
            for e in new:
                emit(e)
            sys.stdout.flush()
            time.sleep(POLL)
            new = feed.poll()
    except KeyboardInterrupt:
        return 130  # interrupted by SIGINT, like any Unix tool (and inspect-queue --watch)


def _warn_damage(regions: int) -> None:
    sys.stderr.write(
        f"kmpwm: warning: the journal has {regions} damaged region(s); "
        "events from them are missing; run `kmpwm doctor --repair`\n"
    )


def _json_line(ev: list) -> None:
    print_json_line(event_doc(ev))


def _say_line(ev: list) -> None:
    say(_line(ev))


def _print_all(selected: list, as_json: bool) -> int:
    if as_json:
        print_json({"events": [event_doc(e) for e in selected]})
    elif selected:
        for e in selected:
            say(_line(e))
    else:
        say("no events")
    return 0
