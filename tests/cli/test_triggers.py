"""Triggers (SPEC sections 3 and 9): when a task becomes due, end to end and as arithmetic.

End-to-end tests run the real command line in subprocesses (``helpers.kjson``), moving the clock
with Debian's ``faketime``: ``faketime -f +15m`` shifts it, ``faketime '2026-03-29 01:30:00'``
starts it at an absolute time (interpreted in ``TZ``, which DST tests set to Europe/Berlin).
Pure arithmetic (``next_periodic``, ``initial``, window boundaries in ``plan``) is tested in
process, with hypothesis where the property is worth it.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest
from helpers import kjson, kmpwm_env, tasks_by_id
from hypothesis import given, settings
from hypothesis import strategies as st

from kmpwm.core.exitcodes import InvalidParams
from kmpwm.core.timeparse import parse_duration
from kmpwm.core.triggers import Periodic, initial, next_after_run, next_periodic

HOUR = 3600.0
MIN = 60.0


# -- local helpers ------------------------------------------------------------------------------


def fake(clock: str, *args, env: dict | None = None, check: int | None = 0, absolute: bool = False):
    """``kmpwm ARGS --json`` under faketime; ``clock`` is an offset like ``+15m`` (``-f``) or, with
    ``absolute``, a date for faketime's own parser.  Returns (document, exit code)."""
    if not absolute:  # faketime -f understands one unit only ("+1h50m" is not 110 minutes)
        clock = f"+{parse_duration(clock.lstrip('+')):.0f}"
    argv = ["faketime", *([] if absolute else ["-f"]), clock, sys.executable, "-m", "kmpwm", *map(str, args)]
    if "--json" not in args:
        argv.append("--json")
    proc = subprocess.run(argv, capture_output=True, text=True, env=kmpwm_env(env), timeout=60, input="")
    assert "Traceback" not in proc.stderr, proc.stderr
    if check is not None:
        assert proc.returncode == check, f"{argv}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return orjson.loads(proc.stdout), proc.returncode


def at(clock: str, *args, **kw):
    """Like :func:`fake` with an absolute start time."""
    return fake(clock, *args, absolute=True, **kw)


def epoch(iso: str | None) -> float | None:
    if iso is None:
        return None
    assert iso.endswith("Z"), iso
    return datetime.fromisoformat(iso[:-1] + "+00:00").timestamp()


def task(task_id: str, env: dict | None = None) -> dict:
    doc, _ = kjson("inspect-queue", "--all", env=env, check=0)
    return tasks_by_id(doc)[task_id]


def ran_ids(doc: dict) -> list[str]:
    return [r["id"] for r in doc["ran"]]


def run_due(env: dict | None = None) -> dict:
    return kjson("run-due", env=env, check=0)[0]


def enqueue(*args, env: dict | None = None, check: int = 0) -> dict:
    return kjson("enqueue", *args, env=env, check=check)[0]


# -- one-time --delay ---------------------------------------------------------------------------


def test_delay_not_run_before_and_run_after():
    t0 = time.time()
    doc = enqueue("d", "echo", "--delay", "10m")
    t1 = time.time()
    assert t0 + 10 * MIN - 0.01 <= epoch(doc["next_run_at"]) <= t1 + 10 * MIN + 0.01
    assert ran_ids(run_due()) == []
    assert ran_ids(fake("+9m", "run-due")[0]) == []
    assert task("d")["state"] == "ENQUEUED"
    out, _ = fake("+11m", "run-due")
    assert ran_ids(out) == ["d"] and out["ran"][0]["status"] == "SUCCESS"
    t = task("d")
    assert t["state"] == "SUCCEEDED" and t["attempts"] == 1
    assert ran_ids(fake("+12m", "run-due")[0]) == []  # one-time: runs once


# -- periodic --every/--flex --------------------------------------------------------------------


def test_periodic_flex_window_grid_and_coalescing():
    doc = enqueue("p", "echo", "--every", "1h", "--flex", "15m")
    anchor = epoch(doc["next_run_at"])  # first run due at once: the anchor is the enqueue time
    assert abs(anchor - time.time()) < 5
    assert ran_ids(run_due()) == ["p"]
    t = task("p")
    assert t["state"] == "ENQUEUED" and t["attempts"] == 1
    # next: the last 15 minutes of the period after the one holding the run
    assert epoch(t["next_run_at"]) == pytest.approx(anchor + 2 * HOUR - 15 * MIN, abs=0.002)

    # period 1 but before its flex window: not due
    assert ran_ids(fake("+1h", "run-due")[0]) == []
    # inside period 1's flex window [anchor+1h45m, anchor+2h): runs, next in period 2's window
    assert ran_ids(fake("+1h50m", "run-due")[0]) == ["p"]
    assert epoch(task("p")["next_run_at"]) == pytest.approx(anchor + 3 * HOUR - 15 * MIN, abs=0.002)
    assert ran_ids(fake("+1h55m", "run-due")[0]) == []  # once per period

    # asleep for eight periods: runs once (not once per missed period), next stays on the grid
    out, _ = fake("+10h50m", "run-due")
    assert ran_ids(out) == ["p"]
    assert epoch(task("p")["next_run_at"]) == pytest.approx(anchor + 12 * HOUR - 15 * MIN, abs=0.002)
    assert task("p")["attempts"] == 3


def test_periodic_delay_and_default_flex():
    t0 = time.time()
    doc = enqueue("pd", "echo", "--every", "1h", "--delay", "30m")
    anchor = epoch(doc["next_run_at"])
    assert t0 + 30 * MIN - 0.01 <= anchor <= time.time() + 30 * MIN + 0.01  # first run after --delay
    assert ran_ids(run_due()) == []
    assert ran_ids(fake("+31m", "run-due")[0]) == ["pd"]
    t = task("pd")
    assert t["trigger"]["flex"] == 3600  # --flex defaults to the whole interval
    # flex == every: the next period starts at anchor+1h, and may run anywhere in it
    assert epoch(t["next_run_at"]) == pytest.approx(anchor + HOUR, abs=0.002)


@pytest.mark.parametrize("args", [["--every", "59s"], ["--every", "1h", "--flex", "2h"], ["--flex", "5m"]])
def test_periodic_invalid(args):
    doc = enqueue("bad", "echo", *args, check=65)
    assert doc["result"] == "REJECTED_INVALID_PARAMS"


def test_periodic_to_record_bounds():
    assert Periodic(60, 0).to_record(0.0)["flex"] == 0  # 0 <= FLEX <= DUR, DUR >= 60s
    assert Periodic("1h", "1h").to_record(0.0)["flex"] == 3600
    with pytest.raises(InvalidParams):
        Periodic(59.9).to_record(0.0)
    with pytest.raises(InvalidParams):
        Periodic(3600, 3600.5).to_record(0.0)


def test_initial_periodic_due_at_once_or_after_delay():
    trig = Periodic(3600, 900).to_record(1000.0)
    assert initial(trig, 1000.0) == (1000.0, {"anchor": 1000.0})
    trig = Periodic(3600, 900, delay=120).to_record(1000.0)
    assert initial(trig, 1000.0) == (1120.0, {"anchor": 1120.0})


_grid = dict(
    anchor=st.integers(0, 2_000_000_000),
    every=st.integers(60, 30 * 86400),
    flex_frac=st.fractions(0, 1),
    k=st.integers(0, 10_000),
)


def _trig(every: int, flex_frac) -> tuple[dict, int]:
    flex = int(every * flex_frac)
    return {"type": "periodic", "every": float(every), "flex": float(flex), "delay": 0.0}, flex


@settings(max_examples=200, deadline=None, database=None)
@given(**_grid, u=st.fractions(0, 1))
def test_next_periodic_run_inside_window_k_goes_to_window_k_plus_1(anchor, every, flex_frac, k, u):
    trig, flex = _trig(every, flex_frac)
    if flex == 0:
        return
    # a run inside period k's flex window [anchor+(k+1)E-F, anchor+(k+1)E)
    offset = min(int(flex * u), flex - 1)
    ran_at = anchor + (k + 1) * every - flex + offset
    nxt = next_periodic(trig, {"anchor": float(anchor)}, float(ran_at))
    assert nxt == anchor + (k + 2) * every - flex


@settings(max_examples=200, deadline=None, database=None)
@given(**_grid)
def test_next_periodic_window_boundaries(anchor, every, flex_frac, k):
    trig, flex = _trig(every, flex_frac)
    if flex == 0:
        return  # no window to have boundaries
    state = {"anchor": float(anchor)}
    # exactly at the start of period k's window: next is exactly one period later
    start = anchor + (k + 1) * every - flex
    assert next_periodic(trig, state, float(start)) == start + every
    # exactly at the end of period k's window = the start of period k+1 (periods are half-open):
    # it belongs to period k+1, so the next run is in period k+2's window
    end = anchor + (k + 1) * every
    assert next_periodic(trig, state, float(end)) == anchor + (k + 3) * every - flex
    # just before the end: still period k
    assert next_periodic(trig, state, float(end) - 0.5) == anchor + (k + 2) * every - flex


@settings(max_examples=200, deadline=None, database=None)
@given(**_grid, within=st.floats(0, 1, exclude_max=True))
def test_next_periodic_on_grid_strictly_later_and_never_skips_a_period(anchor, every, flex_frac, k, within):
    trig, flex = _trig(every, flex_frac)
    ran_at = anchor + k * every + int(every * within)  # anywhere, e.g. long after a missed period
    nxt = next_periodic(trig, {"anchor": float(anchor)}, float(ran_at))
    assert (nxt - anchor + flex) % every == 0  # in the last FLEX of some period
    assert nxt > ran_at  # never due again at once (no busy loop)
    assert every - flex < nxt - ran_at <= 2 * every - flex  # the next period, not one later
    assert next_after_run(trig, {"anchor": float(anchor)}, float(ran_at)) == nxt


def test_next_periodic_run_before_anchor_goes_to_first_window():
    trig = {"type": "periodic", "every": 3600.0, "flex": 900.0, "delay": 0.0}
    assert next_periodic(trig, {"anchor": 10_000.0}, 9_000.0) == 10_000.0 + 3600 - 900


# -- exact --at ----------------------------------------------------------------------------------


def test_exact_attempt_runs_after_the_time_and_records_lateness():
    t0 = time.time()
    doc = enqueue("x", "echo", "--at", "+10m")
    target = epoch(doc["next_run_at"])
    assert t0 + 10 * MIN - 0.01 <= target <= time.time() + 10 * MIN + 0.01
    assert ran_ids(run_due()) == []
    assert ran_ids(fake("+9m", "run-due")[0]) == []
    before = time.time()
    out, _ = fake("+12m", "run-due")
    after = time.time()
    assert ran_ids(out) == ["x"] and out["ran"][0]["status"] == "SUCCESS"
    t = task("x")
    assert t["state"] == "SUCCEEDED"
    late = t["last_result"]["late_ms"]
    # the run started at (real time + 12m) >= before + 12m; it was due at target
    assert (before + 12 * MIN - target) * 1000 - 5 <= late <= (after + 12 * MIN - target) * 1000 + 5
    assert 119_000 < late < 150_000
    assert ran_ids(fake("+13m", "run-due")[0]) == []  # exact tasks run once


def test_exact_at_absolute_iso_and_epoch():
    target = time.time() + 300
    doc = enqueue("xe", "echo", "--at", f"@{target:.3f}")
    assert epoch(doc["next_run_at"]) == pytest.approx(target, abs=0.002)
    iso = datetime.fromtimestamp(round(target), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    doc = enqueue("xi", "echo", "--at", iso)
    assert doc["next_run_at"] == iso


def test_exact_notify_posts_a_notification_instead_of_running(home):
    enqueue("ping-42", "echo", "--at", "+1m", "--exact-behavior", "notify", "--input", "hello there")
    assert ran_ids(run_due()) == []
    out, _ = fake("+2m", "run-due", env={"PATH": "/usr/bin:/bin"})
    assert ran_ids(out) == ["ping-42"]
    row = out["ran"][0]
    assert row["status"] == "SUCCESS"
    assert row["data"]["notified"] is True
    assert "task" not in row["data"]  # the echo worker did not run
    t = task("ping-42")
    assert t["state"] == "SUCCEEDED" and t["last_result"]["data"]["notified"] is True
    if subprocess.run(["sh", "-c", "command -v notify-send"], capture_output=True).returncode != 0:
        log = (home / "logs" / "kmpwm.log").read_text()
        lines = [ln for ln in log.splitlines() if "ping-42" in ln and "notification" in ln]
        assert lines, log


def test_exact_error_is_rejected_os_policy():
    doc = enqueue("xerr", "echo", "--at", "+1m", "--exact-behavior", "error", check=69)
    assert doc["result"] == "REJECTED_OS_POLICY"
    assert doc["error"]
    doc, _ = kjson("inspect-queue", "--all", check=0)
    assert doc["tasks"] == []


# -- windowed --window ---------------------------------------------------------------------------


def test_window_not_before_runs_inside():
    doc = enqueue("w", "echo", "--window", "+10m", "+20m")
    start = epoch(doc["next_run_at"])
    assert abs(start - (time.time() + 10 * MIN)) < 5
    assert ran_ids(run_due()) == []
    assert ran_ids(fake("+5m", "run-due")[0]) == []
    assert task("w")["state"] == "ENQUEUED"
    assert ran_ids(fake("+15m", "run-due")[0]) == ["w"]
    t = task("w")
    assert t["state"] == "SUCCEEDED" and t["reason"] is None
    assert ran_ids(fake("+16m", "run-due")[0]) == []


def test_window_missed_entirely_fails_at_next_run_due():
    enqueue("wm", "echo", "--window", "+10m", "+20m")
    out, _ = fake("+1h", "run-due")  # the machine was off through the whole window
    assert ran_ids(out) == []
    t = task("wm")
    assert t["state"] == "FAILED"
    assert t["reason"] == "window missed"
    assert t["next_run_at"] is None
    assert ran_ids(fake("+2h", "run-due")[0]) == []


def test_window_end_before_start_is_invalid():
    doc = enqueue("wb", "echo", "--window", "+20m", "+10m", check=65)
    assert doc["result"] == "REJECTED_INVALID_PARAMS"


def test_window_boundaries_in_plan(home):
    """[START, END] is closed: due at START and at END, missed just after END."""
    from kmpwm import Scheduler
    from kmpwm.core import triggers
    from kmpwm.scheduling.plan import plan
    from kmpwm.scheduling.probes import Device

    now = time.time()
    start, end = now + 600.0, now + 1200.0
    s = Scheduler(home=str(home))
    assert s.enqueue("wp", triggers.Windowed(start, end), "echo") == "SUCCESS"
    state = s.state()
    dev = Device(assume={})
    assert [t["id"] for t in plan(state, start - 0.001, dev).due] == []
    assert plan(state, start - 0.001, dev).ops == []
    assert [t["id"] for t in plan(state, start, dev).due] == ["wp"]
    assert [t["id"] for t in plan(state, end, dev).due] == ["wp"]
    p = plan(state, end + 0.001, dev)
    assert p.due == []
    assert [(o["op"], o["id"], o["reason"]) for o in p.ops] == [("fail", "wp", "window missed")]


# -- cron -------------------------------------------------------------------------------------------

UTC = {"TZ": "UTC"}


def _next_quarter(t: float) -> float:
    return (math.floor(t / 900) + 1) * 900.0


def test_cron_quarter_hour_and_next_match():
    t0 = time.time()
    doc = enqueue("c", "echo", "--cron", "*/15 * * * *", env=UTC)
    t1 = time.time()
    first = epoch(doc["next_run_at"])
    assert first % 900 == 0
    assert first in {_next_quarter(t0), _next_quarter(t1)}
    assert ran_ids(run_due(env=UTC)) == []  # not at enqueue: at the next match
    before = time.time()
    out, _ = fake("+16m", "run-due", env=UTC)
    after = time.time()
    assert ran_ids(out) == ["c"]
    t = task("c", env=UTC)
    assert t["state"] == "ENQUEUED"  # cron repeats
    nxt = epoch(t["next_run_at"])
    assert nxt % 900 == 0 and nxt > first
    assert nxt in {_next_quarter(before + 16 * MIN), _next_quarter(after + 16 * MIN)}
    assert ran_ids(fake("+16m", "run-due", env=UTC)[0]) == []  # not again before the next match


@pytest.mark.parametrize("expr", ["61 * * * *", "* * *", "not cron at all", "* * * * * *", "*/0 * * * *"])
def test_cron_invalid(expr):
    doc = enqueue("cbad", "echo", "--cron", expr, check=65)
    assert doc["result"] == "REJECTED_INVALID_PARAMS"


BERLIN = {"TZ": "Europe/Berlin"}


def test_cron_spring_forward_nonexistent_time_runs_once_no_crash_no_loop():
    """2026-03-29 02:00 CET -> 03:00 CEST: 02:30 does not exist that day.  croniter (with a real
    time zone) moves such a time to just after the gap (03:00 CEST = 01:00Z); kmpwm must run the
    job once that day, shortly after the change, not crash, not loop, and then return to 02:30."""
    doc, _ = at("2026-03-28 12:00:00", "enqueue", "cs", "echo", "--cron", "30 2 * * *", env=BERLIN)
    first = epoch(doc["next_run_at"])
    assert epoch("2026-03-29T01:00:00Z") <= first <= epoch("2026-03-29T01:30:00Z")
    out, _ = at("2026-03-29 04:00:00", "run-due", env=BERLIN)
    assert ran_ids(out) == ["cs"]
    assert task("cs", env=BERLIN)["next_run_at"] == "2026-03-30T00:30:00Z"  # 02:30 CEST
    out, _ = at("2026-03-29 04:00:00", "run-due", env=BERLIN)
    assert ran_ids(out) == []


def test_cron_fall_back_daily_job_runs_once_not_twice():
    """2026-10-25 03:00 CEST -> 02:00 CET: 02:30 happens twice (00:30Z and 01:30Z).  A daily
    02:30 job runs at the first one and not again at the repeated one (as cron does)."""
    doc, _ = at("2026-10-24 12:00:00", "enqueue", "cf", "echo", "--cron", "30 2 * * *", env=BERLIN)
    assert doc["next_run_at"] == "2026-10-25T00:30:00Z"  # 02:30 CEST, the first 02:30
    out, _ = at("2026-10-25 00:45:00 UTC", "run-due", env=BERLIN)  # 02:45 CEST
    assert ran_ids(out) == ["cf"]
    out, _ = at("2026-10-25 01:45:00 UTC", "run-due", env=BERLIN)  # 02:45 CET, after the second 02:30
    assert ran_ids(out) == []
    assert task("cf", env=BERLIN)["attempts"] == 1


def test_cron_fall_back_next_day_stays_at_local_0230():
    """After the fall-back day the job is back at 02:30 local time: 2026-10-26 02:30 CET = 01:30Z."""
    at("2026-10-24 12:00:00", "enqueue", "cf2", "echo", "--cron", "30 2 * * *", env=BERLIN)
    out, _ = at("2026-10-25 00:45:00 UTC", "run-due", env=BERLIN)
    assert ran_ids(out) == ["cf2"]
    assert task("cf2", env=BERLIN)["next_run_at"] == "2026-10-26T01:30:00Z"


@pytest.mark.parametrize(
    "enq_at, expected",
    [
        ("2026-03-28 12:00:00", "2026-03-29T07:00:00Z"),  # 09:00 CEST, the day DST starts
        ("2026-10-24 12:00:00", "2026-10-25T08:00:00Z"),  # 09:00 CET, the day DST ends
    ],
)
def test_cron_local_time_across_dst_change(enq_at, expected):
    """Cron expressions are in local time: '0 9 * * *' is 09:00 on the wall clock of that day,
    whatever the UTC offset was when the next time was computed."""
    doc, _ = at(enq_at, "enqueue", "c9", "echo", "--cron", "0 9 * * *", env=BERLIN)
    assert doc["next_run_at"] == expected


# -- on-change ------------------------------------------------------------------------------------


def _old(path: Path, t: float = 1_600_000_000.0) -> None:
    os.utime(path, (t, t))


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "watched"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "f.txt").write_text("one")
    (root / "top.txt").write_text("top")
    for p in (root / "sub" / "f.txt", root / "top.txt", root / "sub", root):
        _old(p)
    return root


def test_on_change_directory_with_descendants(tree):
    enqueue("oc", "echo", "--on-change", str(tree))
    assert ran_ids(run_due()) == []  # baseline taken at enqueue: nothing changed since
    assert ran_ids(run_due()) == []
    _old(tree / "sub" / "f.txt", 1_700_000_000.0)  # a nested file changes
    assert ran_ids(run_due()) == ["oc"]
    assert ran_ids(run_due()) == []  # once per change
    assert task("oc")["state"] == "ENQUEUED"
    (tree / "sub" / "f.txt").write_text("two, longer")
    _old(tree / "sub" / "f.txt", 1_700_000_100.0)
    assert ran_ids(run_due()) == ["oc"]
    assert ran_ids(run_due()) == []
    assert task("oc")["attempts"] == 2


def test_on_change_no_descendants_counts_only_the_directory_itself(tree):
    enqueue("ond", "echo", "--on-change", str(tree), "--no-descendants")
    assert ran_ids(run_due()) == []
    (tree / "sub" / "f.txt").write_text("changed deep down")
    _old(tree / "sub" / "f.txt", 1_700_000_000.0)
    (tree / "top.txt").write_text("a direct child's content changed, no entry added")
    _old(tree / "top.txt", 1_700_000_000.0)
    assert ran_ids(run_due()) == []  # entries of PATH unchanged: not due
    (tree / "new.txt").write_text("new entry")  # an entry is added: the directory itself changed
    assert ran_ids(run_due()) == ["ond"]
    assert ran_ids(run_due()) == []
    (tree / "new.txt").rename(tree / "renamed.txt")
    assert ran_ids(run_due()) == ["ond"]


def test_on_change_single_file(tmp_path):
    f = tmp_path / "conf.ini"
    f.write_text("a=1")
    _old(f)
    enqueue("of", "echo", "--on-change", str(f))
    assert ran_ids(run_due()) == []
    _old(f, 1_700_000_000.0)
    assert ran_ids(run_due()) == ["of"]
    assert ran_ids(run_due()) == []


def test_on_change_missing_path_is_invalid(tmp_path):
    doc = enqueue("om", "echo", "--on-change", str(tmp_path / "nope"), check=65)
    assert doc["result"] == "REJECTED_INVALID_PARAMS"


# -- --when device states ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "state, inside, outside",
    [
        ("battery-low", "battery=10", "battery=50"),
        ("battery-okay", "battery=50", "battery=10"),
        ("storage-low", "storage_low=on", "storage_low=off"),
        ("device-idle", "idle=on", "idle=off"),
    ],
)
def test_when_fires_on_entering_and_rearms_on_leaving(state, inside, outside):
    enqueue("wh", "echo", "--when", state)
    A = lambda v: {"KMPWM_ASSUME": v}  # noqa: E731
    assert ran_ids(run_due(A(inside))) == ["wh"]  # already in the state: fires at the first run-due
    assert ran_ids(run_due(A(inside))) == []  # still inside: not again
    assert ran_ids(run_due(A(outside))) == []  # leaves: re-arms, nothing runs
    assert ran_ids(run_due(A(inside))) == ["wh"]  # enters again: fires again
    assert ran_ids(run_due(A(inside))) == []
    assert task("wh")["attempts"] == 2


def test_when_battery_low_threshold_and_deeper_drop():
    enqueue("bl", "echo", "--when", "battery-low")
    A = lambda v: {"KMPWM_ASSUME": v}  # noqa: E731
    assert ran_ids(run_due(A("battery=15"))) == []  # low is below 15 percent
    assert ran_ids(run_due(A("battery=14"))) == ["bl"]
    assert ran_ids(run_due(A("battery=5"))) == []  # dropping further is not entering again
    assert ran_ids(run_due(A("battery=50"))) == []
    assert ran_ids(run_due(A("battery=5"))) == ["bl"]


def test_when_outside_at_enqueue_waits_for_entering():
    enqueue("wi", "echo", "--when", "device-idle")
    assert ran_ids(run_due({"KMPWM_ASSUME": "idle=off"})) == []
    assert ran_ids(run_due({"KMPWM_ASSUME": "idle=on"})) == ["wi"]


def test_when_unknown_state_is_invalid():
    doc = enqueue("wu", "echo", "--when", "full-moon", check=65)
    assert doc["result"] == "REJECTED_INVALID_PARAMS"


# -- retries of repeating triggers ----------------------------------------------------------------


def _retry_worker(home: Path) -> None:
    cfg = home / "config.toml"
    cfg.write_text(
        f'[workers.again]\ncommand = [{orjson.dumps(sys.executable).decode()}, "-c", "import sys; sys.exit(75)"]\n'
    )
    os.chmod(cfg, 0o600)


def _statuses(doc: dict) -> list[tuple[str, str]]:
    return [(r["id"], r["status"]) for r in doc["ran"]]


def test_on_change_retry_runs_again_after_backoff_without_a_new_change(home, tree):
    """SPEC 3: a run that asks to retry is re-enqueued after the backoff.  The change that made
    the task due was not handled yet, so the retry must not wait for another change."""
    _retry_worker(home)
    enqueue("ocr", "again", "--on-change", str(tree), "--backoff-delay", "10s", "--max-attempts", "3")
    _old(tree / "top.txt", 1_700_000_000.0)
    assert _statuses(run_due()) == [("ocr", "RETRY")]
    assert _statuses(fake("+1m", "run-due")[0]) == [("ocr", "RETRY")]


def test_when_retry_runs_again_after_backoff_while_still_in_the_state(home):
    _retry_worker(home)
    enqueue("wr", "again", "--when", "device-idle", "--backoff-delay", "10s", "--max-attempts", "3")
    idle = {"KMPWM_ASSUME": "idle=on"}
    assert _statuses(run_due(idle)) == [("wr", "RETRY")]
    assert _statuses(fake("+1m", "run-due", env=idle)[0]) == [("wr", "RETRY")]


def test_cron_retry_runs_after_backoff_then_returns_to_schedule(home):
    _retry_worker(home)
    enqueue("cr", "again", "--cron", "0 0 1 1 *", "--backoff-delay", "10s", "--max-attempts", "2", env=UTC)
    first = epoch(task("cr")["next_run_at"])
    out, _ = at(datetime.fromtimestamp(first + 60, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"), "run-due", env=UTC)
    assert _statuses(out) == [("cr", "RETRY")]
    out, _ = at(datetime.fromtimestamp(first + 120, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"), "run-due", env=UTC)
    assert [i for i, _ in _statuses(out)] == ["cr"]  # the last allowed attempt of this occurrence
    t = task("cr", env=UTC)
    assert t["state"] == "ENQUEUED"  # cron repeats: the next occurrence is still scheduled
    assert epoch(t["next_run_at"]) == pytest.approx(first + 365 * 86400, abs=86400)
