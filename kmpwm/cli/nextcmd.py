"""``kmpwm next``: print scheduling.preview's due times, like ``systemd-analyze calendar``."""

from __future__ import annotations

import sys
import time
from datetime import datetime

from kmpwm.cli.output import print_json, say
from kmpwm.core.timeparse import iso, relative
from kmpwm.core.triggers import zone
from kmpwm.scheduling.preview import next_times


def human_line(epoch: float, now: float, tz: str | None) -> str:
    zone_info = zone(tz)
    local = (
        datetime.fromtimestamp(epoch, zone_info)
        if zone_info is not None
        else datetime.fromtimestamp(epoch).astimezone()
    )
    return f"{local.strftime('%a %Y-%m-%d %H:%M:%S %Z')}  ({iso(epoch)}, {relative(epoch, now)})"


def next_command(
    paths,
    task_id: str | None,
    cron: str | None,
    every: str | None,
    flex: str | None,
    n: int,
    tz: str | None,
    as_json: bool,
) -> int:
    now = time.time()
    times, note, tz = next_times(paths, task_id, cron, every, flex, n, tz, now)
    if as_json:
        print_json({"times": [iso(t) for t in times]})
        if note:
            sys.stderr.write(f"kmpwm: {note}\n")
    else:
        _say_times(times, note, now, tz)
    return 0


def _say_times(times: list[float], note: str | None, now: float, tz: str | None) -> None:
    """One line per time, then the note (if there is one)."""
    for t in times:
        say(human_line(t, now, tz))
    if note:
        say(note)
