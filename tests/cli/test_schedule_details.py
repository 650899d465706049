"""Scheduling details (SPEC section 12): ``--tz``, ``--jitter``, ``--misfire-grace`` and
``kmpwm next``.

End to end through the real command line under Debian's ``faketime`` (absolute start times with
a ``UTC`` suffix, so the machine's ``TZ`` only matters where a test means it to): DST changes in
Europe/Berlin and America/New_York, with the machine in another zone than the task's.  The jitter
spread and the pure grid arithmetic are tested in process (hypothesis where it fits).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import orjson
import pytest
from helpers import kjson, kmpwm, kmpwm_env, tasks_by_id
from hypothesis import given, settings
from hypothesis import strategies as st

from kmpwm.core.triggers import (
    Cron,
    cron_next,
    first_due_after,
    initial,
    jitter_offset,
    next_after_run,
)

pytestmark = pytest.mark.both_stores(long=True)  # PostgreSQL's side runs in scripts/long-tier

BERLIN, NEW_YORK, TOKYO = "Europe/Berlin", "America/New_York", "Asia/Tokyo"
HOST = {"KMPWM_HOST": "host-a"}


def at(clock: str, *args, tz: str = TOKYO, env: dict | None = None, check: int | None = 0):
    """``kmpwm ARGS --json`` under faketime started at ``clock`` (UTC), on a machine whose zone
    is ``tz``.  Returns (document, exit code)."""
    argv = ["faketime", clock, sys.executable, "-m", "kmpwm", *map(str, args)]
    if "--json" not in args:
        argv.append("--json")
    proc = subprocess.run(
        argv, capture_output=True, text=True, env=kmpwm_env({"TZ": tz, **HOST, **(env or {})}), timeout=60, input=""
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    if check is not None:
        assert proc.returncode == check, f"{argv}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return orjson.loads(proc.stdout), proc.returncode


def epoch(iso: str) -> float:
    assert iso.endswith("Z"), iso
    return datetime.fromisoformat(iso[:-1] + "+00:00").timestamp()


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def task(task_id: str, clock: str = "2030-01-01 00:00:00 UTC", tz: str = TOKYO) -> dict:
    doc, _ = at(clock, "inspect-queue", "--all", tz=tz)
    return tasks_by_id(doc)[task_id]


def ran(doc: dict) -> list[str]:
    return [r["id"] for r in doc["ran"]]


def events(task_id: str) -> list[dict]:
    doc, _ = kjson("events", "--task", task_id, check=0)
    return doc["events"] if isinstance(doc, dict) else doc


# -- --tz: cron across both DST changes, two zones, the machine in a third ------------------------

CRON_DST_CASES = [
    # zone, expression, enqueue at (UTC), first due, a run-due after it, the due after that run
    # Berlin, spring forward 2026-03-29 02:00 CET -> 03:00 CEST: 09:00 stays 09:00
    (BERLIN, "0 9 * * *", "2026-03-28 12:00:00", "2026-03-29T07:00:00Z", "2026-03-29 07:05:00", "2026-03-30T07:00:00Z"),
    # Berlin: 02:30 does not exist on 2026-03-29: the shifted instant (03:30 CEST), then 02:30 again
    (
        BERLIN,
        "30 2 * * *",
        "2026-03-28 12:00:00",
        "2026-03-29T01:30:00Z",
        "2026-03-29 01:35:00",
        "2026-03-30T00:30:00Z",
    ),
    # Berlin, fall back 2026-10-25 03:00 CEST -> 02:00 CET: 02:30 twice, runs at the first
    (
        BERLIN,
        "30 2 * * *",
        "2026-10-24 12:00:00",
        "2026-10-25T00:30:00Z",
        "2026-10-25 00:45:00",
        "2026-10-26T01:30:00Z",
    ),
    # New York, spring forward 2026-03-08 02:00 EST -> 03:00 EDT: 02:30 shifted to 03:30 EDT
    (
        NEW_YORK,
        "30 2 * * *",
        "2026-03-07 12:00:00",
        "2026-03-08T07:30:00Z",
        "2026-03-08 07:35:00",
        "2026-03-09T06:30:00Z",
    ),
    # New York, fall back 2026-11-01 02:00 EDT -> 01:00 EST: 01:30 twice, runs at the first
    (
        NEW_YORK,
        "30 1 * * *",
        "2026-10-31 12:00:00",
        "2026-11-01T05:30:00Z",
        "2026-11-01 05:45:00",
        "2026-11-02T06:30:00Z",
    ),
    (
        NEW_YORK,
        "0 9 * * *",
        "2026-10-31 14:00:00",
        "2026-11-01T14:00:00Z",
        "2026-11-01 14:05:00",
        "2026-11-02T14:00:00Z",
    ),
]


@pytest.mark.parametrize("zone, expr, enq, first, run_at, after", CRON_DST_CASES)
def test_cron_tz_across_dst_with_the_machine_in_other_zones(zone, expr, enq, first, run_at, after):
    doc, _ = at(f"{enq} UTC", "enqueue", "c", "echo", "--cron", expr, "--tz", zone, tz=TOKYO)
    assert doc["next_run_at"] == first
    t = task("c", f"{enq} UTC", tz=TOKYO)
    assert t["trigger"]["tz"] == zone and t["trigger"]["expr"] == expr  # the zone is stored with the task
    # the machine's zone changes (Tokyo -> Honolulu): the stored time does not move, and the next
    # one is computed in the task's zone, not the machine's
    out, _ = at(f"{run_at} UTC", "run-due", tz="Pacific/Honolulu")
    assert ran(out) == ["c"]
    assert task("c", f"{run_at} UTC", tz="Pacific/Honolulu")["next_run_at"] == after


def test_cron_tz_repeated_hour_runs_once():
    """New York's 01:30 happens twice on 2026-11-01 (05:30Z EDT, 06:30Z EST): one run."""
    at("2026-10-31 12:00:00 UTC", "enqueue", "r", "echo", "--cron", "30 1 * * *", "--tz", NEW_YORK, tz=BERLIN)
    assert ran(at("2026-11-01 05:31:00 UTC", "run-due", tz=BERLIN)[0]) == ["r"]
    assert ran(at("2026-11-01 06:31:00 UTC", "run-due", tz=BERLIN)[0]) == []
    assert task("r")["attempts"] == 1


def test_cron_without_tz_follows_the_machine_zone_and_with_tz_does_not():
    """The contrast: a task without --tz is in the machine's zone at each computation."""
    at("2026-06-01 00:00:00 UTC", "enqueue", "local", "echo", "--cron", "0 9 * * *", tz=BERLIN)
    at("2026-06-01 00:00:00 UTC", "enqueue", "zoned", "echo", "--cron", "0 9 * * *", "--tz", BERLIN, tz=BERLIN)
    assert task("local")["next_run_at"] == task("zoned")["next_run_at"] == "2026-06-01T07:00:00Z"
    at("2026-06-01 07:01:00 UTC", "run-due", tz=NEW_YORK)  # the machine moved to New York
    assert task("local")["next_run_at"] == "2026-06-01T13:00:00Z"  # 09:00 EDT
    assert task("zoned")["next_run_at"] == "2026-06-02T07:00:00Z"  # 09:00 CEST, as before


@pytest.mark.parametrize(
    "when, expected",
    [
        ("2026-03-29T02:30:00", "2026-03-29T01:30:00Z"),  # does not exist in Berlin: the shifted instant
        ("2026-10-25T02:30:00", "2026-10-25T00:30:00Z"),  # exists twice: the first
        ("2026-07-01T09:00:00", "2026-07-01T07:00:00Z"),
        ("2026-07-01T09:00:00+00:00", "2026-07-01T09:00:00Z"),  # an explicit offset wins over --tz
    ],
)
def test_at_tz_reads_naive_times_in_the_zone(when, expected):
    doc, _ = at("2026-03-01 00:00:00 UTC", "enqueue", "a", "echo", "--at", when, "--tz", BERLIN, tz=NEW_YORK)
    assert doc["next_run_at"] == expected
    t = task("a", "2026-03-01 00:00:00 UTC")
    assert t["trigger"]["tz"] == BERLIN and t["trigger"]["at"] == expected


def test_window_tz():
    at(
        "2026-03-01 00:00:00 UTC",
        "enqueue",
        "w",
        "echo",
        "--window",
        "2026-03-08T01:00:00",
        "2026-03-08T04:00:00",
        "--tz",
        NEW_YORK,
        tz=BERLIN,
    )
    trig = task("w", "2026-03-01 00:00:00 UTC")["trigger"]
    assert (trig["start"], trig["end"], trig["tz"]) == ("2026-03-08T06:00:00Z", "2026-03-08T08:00:00Z", NEW_YORK)


@pytest.mark.parametrize(
    "args",
    [
        ["enqueue", "x", "echo", "--cron", "0 9 * * *", "--tz", "Mars/Olympus_Mons"],
        ["enqueue", "x", "echo", "--at", "+1h", "--tz", "Europe/Nowhere"],
        ["enqueue", "x", "echo", "--cron", "0 9 * * *", "--tz", "../../etc/passwd"],
        ["enqueue", "x", "echo", "--every", "1h", "--tz", BERLIN],  # --tz has nothing to read there
        ["enqueue", "x", "echo", "--on-change", "/tmp", "--jitter", "1m"],
        ["enqueue", "x", "echo", "--jitter", "1m"],
        ["enqueue", "x", "echo", "--window", "+1h", "+2h", "--misfire-grace", "1m"],
        ["enqueue", "x", "echo", "--every", "1h", "--misfire-grace", "0"],
        ["enqueue", "x", "echo", "--every", "1h", "--jitter", "soon"],
        ["next", "--cron", "0 9 * * *", "--tz", "Not/AZone"],
        ["next", "--every", "30s"],
        ["next", "--cron", "61 * * * *"],
        ["next", "--cron", "0 9 * * *", "-n", "0"],
        ["next", "no-such-task"],
    ],
)
def test_invalid_is_65(args):
    doc, rc = kjson(*args)
    assert rc == 65, doc
    assert "error" in doc or doc.get("result") == "REJECTED_INVALID_PARAMS"
    assert kjson("inspect-queue", "--all", check=0)[0]["tasks"] == []


def test_next_usage_errors_are_2():
    assert kmpwm("next").returncode == 2
    assert kmpwm("next", "--cron", "* * * * *", "--every", "1h").returncode == 2


# -- --jitter -----------------------------------------------------------------------------------


def test_jitter_offsets_spread_evenly_over_1000_ids_and_are_stable():
    jitter = 600.0
    offsets = [jitter_offset(f"task-{i}", jitter, host="host-a") for i in range(1000)]
    assert all(0 <= o < jitter for o in offsets)
    deciles = [0] * 10
    for o in offsets:
        deciles[int(o / jitter * 10)] += 1
    # 100 expected per decile; a binomial sd of 9.5: 60..140 is a generous (4 sd) bound
    assert all(60 <= n <= 140 for n in deciles), deciles
    chi2 = sum((n - 100) ** 2 / 100 for n in deciles)
    assert chi2 < 27.9, (chi2, deciles)  # p = 0.001 for 9 degrees of freedom
    # the same id and host: the same offset, always (it is a hash, not a draw)
    assert offsets == [jitter_offset(f"task-{i}", jitter, host="host-a") for i in range(1000)]
    # an appended ID#2 is the same unique-work name
    assert jitter_offset("task-7#2", jitter, host="host-a") == offsets[7]
    # another host: other offsets (a fleet spreads out)
    other = [jitter_offset(f"task-{i}", jitter, host="host-b") for i in range(1000)]
    assert sum(a != b for a, b in zip(offsets, other)) >= 990


def test_jitter_in_next_run_at_stable_per_id_and_host():
    doc, _ = at(
        "2026-06-01 08:00:00 UTC",
        "enqueue",
        "j",
        "echo",
        "--cron",
        "0 9 * * *",
        "--tz",
        BERLIN,
        "--jitter",
        "30m",
        tz=NEW_YORK,
    )
    off = jitter_offset("j", 1800, host="host-a")
    assert epoch(doc["next_run_at"]) == pytest.approx(utc("2026-06-02 07:00:00") + off, abs=0.002)
    assert task("j")["constraints"]["jitter"] == 1800
    # another host computes another offset; the same host the same one
    doc2, _ = at(
        "2026-06-01 08:00:00 UTC",
        "enqueue",
        "j",
        "echo",
        "--cron",
        "0 9 * * *",
        "--tz",
        BERLIN,
        "--jitter",
        "30m",
        "--policy",
        "replace",
        env={"KMPWM_HOST": "host-b"},
    )
    assert epoch(doc2["next_run_at"]) == pytest.approx(
        utc("2026-06-02 07:00:00") + jitter_offset("j", 1800, host="host-b"), abs=0.002
    )
    assert doc2["next_run_at"] != doc["next_run_at"]
    doc3, _ = at(
        "2026-06-01 08:00:00 UTC",
        "enqueue",
        "j",
        "echo",
        "--cron",
        "0 9 * * *",
        "--tz",
        BERLIN,
        "--jitter",
        "30m",
        "--policy",
        "replace",
    )
    assert doc3["next_run_at"] == doc["next_run_at"]
    # not due before its offset, due after it; the next time keeps the same offset
    assert ran(at("2026-06-02 07:00:00 UTC", "run-due")[0]) == ([] if off > 1 else ["j"])
    out, _ = at("2026-06-02 07:31:00 UTC", "run-due")
    assert "j" in ran(out) or off <= 1
    assert epoch(task("j")["next_run_at"]) == pytest.approx(utc("2026-06-03 07:00:00") + off, abs=0.002)


def test_jitter_on_every_and_at():
    doc, _ = at("2026-06-01 08:00:00 UTC", "enqueue", "p", "echo", "--every", "1h", "--jitter", "20m")
    off = jitter_offset("p", 1200, host="host-a")
    first = epoch(doc["next_run_at"])
    assert utc("2026-06-01 08:00:00") + off <= first <= utc("2026-06-01 08:00:05") + off
    anchor = first - off
    at(f"{datetime.fromtimestamp(first + 30, UTC):%Y-%m-%d %H:%M:%S} UTC", "run-due")
    # the next due time stays on the un-jittered grid, plus the same offset
    assert epoch(task("p")["next_run_at"]) == pytest.approx(anchor + 3600 + off, abs=0.002)
    doc, _ = at("2026-06-01 08:00:00 UTC", "enqueue", "x", "echo", "--at", "2026-06-01T12:00:00Z", "--jitter", "20m")
    assert epoch(doc["next_run_at"]) == pytest.approx(
        utc("2026-06-01 12:00:00") + jitter_offset("x", 1200, host="host-a"), abs=0.002
    )


# -- --misfire-grace ----------------------------------------------------------------------------


def test_misfire_periodic_missed_event_and_next_grid_slot():
    at("2026-06-01 08:00:00 UTC", "enqueue", "m", "echo", "--every", "1h", "--misfire-grace", "5m")
    assert ran(at("2026-06-01 08:00:01 UTC", "run-due")[0]) == ["m"]
    anchor = epoch(task("m")["next_run_at"]) - 3600
    # the machine slept from 08:00 to 10:30: the 09:00 occurrence is 1h30m late, beyond the grace
    doc, _ = at("2026-06-01 10:30:00 UTC", "explain", "m")
    assert doc["code"] == "missed" and "missed" in doc["reason"]
    out, _ = at("2026-06-01 10:30:00 UTC", "run-due")
    assert ran(out) == []
    skipped = {s["id"]: s["reason"] for s in out["skipped"]}
    assert skipped["m"].startswith("missed: due at 2026-06-01T09:00:0")
    t = task("m")
    assert t["state"] == "ENQUEUED" and t["attempts"] == 1
    assert epoch(t["next_run_at"]) == pytest.approx(anchor + 3 * 3600, abs=0.002)  # 11:00, on the grid
    missed = [e for e in events("m") if e["event"] == "missed"]
    assert len(missed) == 1 and missed[0]["due"].startswith("2026-06-01T09:00:0")
    assert missed[0]["next"] == t["next_run_at"]
    # within the grace of the next occurrence: it runs
    assert ran(at("2026-06-01 11:02:00 UTC", "run-due")[0]) == ["m"]


def test_misfire_next_occurrence_on_time_runs_in_the_same_pass():
    at("2026-06-01 08:00:00 UTC", "enqueue", "m2", "echo", "--every", "1h", "--misfire-grace", "10m")
    at("2026-06-01 08:00:01 UTC", "run-due")
    # 11:03: 09:00 is missed, 11:00 is 3 minutes late, within the grace: runs now
    out, _ = at("2026-06-01 11:03:00 UTC", "run-due")
    assert ran(out) == ["m2"]
    assert [e["event"] for e in events("m2")].count("missed") == 1
    assert task("m2")["next_run_at"].startswith("2026-06-01T12:00:0")


def test_misfire_cron_in_a_zone():
    at(
        "2026-03-28 12:00:00 UTC",
        "enqueue",
        "mc",
        "echo",
        "--cron",
        "0 9 * * *",
        "--tz",
        BERLIN,
        "--misfire-grace",
        "30m",
        tz=NEW_YORK,
    )
    out, _ = at("2026-03-29 08:00:00 UTC", "run-due", tz=NEW_YORK)  # 10:00 CEST, an hour late
    assert ran(out) == [] and out["skipped"][0]["reason"].startswith("missed")
    assert task("mc")["next_run_at"] == "2026-03-30T07:00:00Z"
    assert ran(at("2026-03-30 07:20:00 UTC", "run-due", tz=NEW_YORK)[0]) == ["mc"]


def test_misfire_one_time_at_fails_missed():
    at("2026-06-01 08:00:00 UTC", "enqueue", "once", "echo", "--at", "2026-06-01T09:00:00Z", "--misfire-grace", "15m")
    out, rc = at("2026-06-01 09:20:00 UTC", "run-due")
    assert rc == 0 and ran(out) == []
    t = task("once")
    assert t["state"] == "FAILED" and t["reason"] == "missed"
    kinds = [e["event"] for e in events("once")]
    assert "missed" in kinds and "failed" in kinds
    # within the grace it runs, late
    at("2026-06-01 08:00:00 UTC", "enqueue", "once2", "echo", "--at", "2026-06-01T09:00:00Z", "--misfire-grace", "15m")
    assert ran(at("2026-06-01 09:14:00 UTC", "run-due")[0]) == ["once2"]


def test_misfire_without_grace_runs_late_once_as_before():
    at("2026-06-01 08:00:00 UTC", "enqueue", "late", "echo", "--at", "2026-06-01T09:00:00Z")
    assert ran(at("2026-06-01 15:00:00 UTC", "run-due")[0]) == ["late"]


def test_constraint_wait_is_not_a_misfire():
    """Seen due in time and held by a constraint: it runs once the constraint holds, however late.
    First seen too late (the machine slept), with the constraint unmet: missed all the same."""
    at(
        "2026-06-01 08:00:00 UTC",
        "enqueue",
        "held",
        "echo",
        "--at",
        "2026-06-01T09:00:00Z",
        "--misfire-grace",
        "5m",
        "--requires-charging",
    )
    at(
        "2026-06-01 08:00:00 UTC",
        "enqueue",
        "slept",
        "echo",
        "--at",
        "2026-06-01T10:00:00Z",
        "--misfire-grace",
        "5m",
        "--requires-charging",
    )
    off = {"KMPWM_ASSUME": "charging=off"}
    on = {"KMPWM_ASSUME": "charging=on"}
    out, _ = at("2026-06-01 09:01:00 UTC", "run-due", env=off)
    assert ran(out) == [] and "charging" in {s["id"]: s["reason"] for s in out["skipped"]}["held"]
    doc, _ = at("2026-06-01 11:00:00 UTC", "explain", "held", env=off)
    assert doc["code"] == "constraint" and "not a misfire" in doc["reason"]
    out, _ = at("2026-06-01 11:00:00 UTC", "run-due", env=off)  # slept from before 10:00 to 11:00
    assert ran(out) == []
    assert task("slept")["state"] == "FAILED" and task("slept")["reason"] == "missed"
    assert ran(at("2026-06-01 12:00:00 UTC", "run-due", env=on)[0]) == ["held"]
    assert task("held")["state"] == "SUCCEEDED"


def test_misfire_does_not_judge_a_retry(home):
    """A retry after its backoff continues an occurrence that started: not a misfire."""
    (home / "config.toml").write_text('[workers.again]\ncommand = ["sh", "-c", "exit 75"]\n')
    (home / "config.toml").chmod(0o600)
    at(
        "2026-06-01 08:00:00 UTC",
        "enqueue",
        "rt",
        "again",
        "--at",
        "2026-06-01T09:00:00Z",
        "--misfire-grace",
        "5m",
        "--max-attempts",
        "3",
    )
    out, _ = at("2026-06-01 09:01:00 UTC", "run-due")
    assert [r["status"] for r in out["ran"]] == ["RETRY"]
    out, _ = at("2026-06-01 12:00:00 UTC", "run-due")  # the retry is hours late: still runs
    assert [r["status"] for r in out["ran"]] == ["RETRY"]
    assert "missed" not in [e["event"] for e in events("rt")]


# -- kmpwm next ----------------------------------------------------------------------------------


def test_next_cron_tz_and_n():
    doc, _ = at("2026-03-27 12:00:00 UTC", "next", "--cron", "30 2 * * *", "--tz", BERLIN, "-n", "4", tz=NEW_YORK)
    assert doc == {
        "times": ["2026-03-28T01:30:00Z", "2026-03-29T01:30:00Z", "2026-03-30T00:30:00Z", "2026-03-31T00:30:00Z"]
    }
    doc, _ = at("2026-10-31 12:00:00 UTC", "next", "--cron", "30 1 * * *", "--tz", NEW_YORK, tz=BERLIN)
    assert doc["times"][:2] == ["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"] and len(doc["times"]) == 5


def test_next_every_first_is_now():
    t0 = time.time()
    doc, _ = kjson("next", "--every", "1h", "--flex", "15m", "-n", "3", check=0)
    t = [epoch(x) for x in doc["times"]]
    assert t0 - 1 <= t[0] <= time.time() + 1
    assert t[1] - t[0] == pytest.approx(2 * 3600 - 900, abs=0.002)
    assert t[2] - t[1] == pytest.approx(3600, abs=0.002)


def test_next_of_a_task_has_its_jitter_and_zone():
    at("2026-06-01 08:00:00 UTC", "enqueue", "nj", "echo", "--cron", "0 9 * * 1-5", "--tz", NEW_YORK, "--jitter", "10m")
    off = jitter_offset("nj", 600, host="host-a")
    doc, _ = at("2026-06-01 08:00:00 UTC", "next", "nj", "-n", "3")
    expected = [utc(d) + off for d in ("2026-06-01 13:00:00", "2026-06-02 13:00:00", "2026-06-03 13:00:00")]
    assert [epoch(x) for x in doc["times"]] == pytest.approx(expected, abs=0.002)
    assert doc["times"][0] == task("nj")["next_run_at"]
    # human output: the task's zone, the UTC time and the relative time, one per line
    proc = subprocess.run(
        ["faketime", "2026-06-01 08:00:00 UTC", sys.executable, "-m", "kmpwm", "next", "nj", "-n", "2"],
        capture_output=True,
        text=True,
        env=kmpwm_env({"TZ": TOKYO, **HOST}),
        timeout=60,
    )
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 2
    assert " EDT " in lines[0] and doc["times"][0] in lines[0] and "in 5h" in lines[0]
    proc = subprocess.run(
        [sys.executable, "-m", "kmpwm", "next", "nj", "-n", "1", "--tz", BERLIN],
        capture_output=True,
        text=True,
        env=kmpwm_env({**HOST}),
        timeout=60,
    )
    assert " CEST " in proc.stdout


def test_next_of_one_time_and_event_tasks():
    at("2026-06-01 08:00:00 UTC", "enqueue", "one", "echo", "--at", "2026-06-02T00:00:00Z")
    assert at("2026-06-01 08:00:00 UTC", "next", "one")[0] == {"times": ["2026-06-02T00:00:00Z"]}
    kjson("enqueue", "oc", "echo", "--on-change", "/tmp", check=0)
    assert kjson("next", "oc", check=0)[0] == {"times": []}


# -- the same keys elsewhere ----------------------------------------------------------------------


def test_enqueue_from_and_chain_file_and_chain_flags():
    lines = "\n".join(
        json.dumps(x)
        for x in (
            {"id": "f1", "worker": "echo", "cron": "0 9 * * *", "tz": BERLIN, "jitter": "5m", "misfire_grace": "1h"},
            {"id": "f2", "worker": "echo", "at": "2026-07-01T09:00:00", "tz": NEW_YORK},
        )
    )
    proc = subprocess.run(
        ["faketime", "2026-06-01 08:00:00 UTC", sys.executable, "-m", "kmpwm", "enqueue", "--from", "-", "--json"],
        input=lines,
        capture_output=True,
        text=True,
        env=kmpwm_env(HOST),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    f1 = task("f1", "2026-06-01 08:00:00 UTC")
    assert (
        f1["trigger"]["tz"] == BERLIN
        and f1["constraints"]["jitter"] == 300
        and f1["constraints"]["misfire_grace"] == 3600
    )
    assert task("f2", "2026-06-01 08:00:00 UTC")["next_run_at"] == "2026-07-01T13:00:00Z"
    bad = json.dumps({"id": "f3", "worker": "echo", "cron": "0 9 * * *", "tz": "Nowhere/Land"})
    assert kjson("enqueue", "--from", "-", input=bad)[1] == 65
    chain = {
        "id": "ch",
        "steps": [[{"worker": "echo", "at": "2026-07-01T09:00:00", "tz": BERLIN, "misfire_grace": "10m"}], ["echo"]],
    }
    proc = subprocess.run(
        ["faketime", "2026-06-01 08:00:00 UTC", sys.executable, "-m", "kmpwm", "chain", "--file", "-", "--json"],
        input=json.dumps(chain),
        capture_output=True,
        text=True,
        env=kmpwm_env(HOST),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    first = task("ch/1/echo", "2026-06-01 08:00:00 UTC")
    assert first["next_run_at"] == "2026-07-01T07:00:00Z" and first["constraints"]["misfire_grace"] == 600
    # chain flags apply to every task of the chain
    doc, _ = at(
        "2026-06-01 08:00:00 UTC",
        "chain",
        "--id",
        "cf",
        "echo",
        "echo",
        "--at",
        "2026-07-01T09:00:00",
        "--tz",
        NEW_YORK,
        "--jitter",
        "5m",
        "--misfire-grace",
        "1h",
    )
    for tid in doc["tasks"]:
        t = task(tid, "2026-06-01 08:00:00 UTC")
        assert t["trigger"]["tz"] == NEW_YORK and t["constraints"]["jitter"] == 300
        assert t["constraints"]["misfire_grace"] == 3600


def test_python_api(home):
    from kmpwm import Constraints, Scheduler, ScheduleResult
    from kmpwm.core import triggers

    s = Scheduler(home=str(home))
    r = s.enqueue(
        "api",
        triggers.Cron("0 9 * * *", tz=BERLIN),
        "echo",
        constraints=Constraints(jitter=timedelta(minutes=5), misfire_grace="1h"),
    )
    assert r == ScheduleResult.SUCCESS
    assert (
        s.enqueue("api2", triggers.Cron("0 9 * * *", tz="Bad/Zone"), "echo") == ScheduleResult.REJECTED_INVALID_PARAMS
    )
    assert s.enqueue("api3", triggers.Exact("2030-01-01T09:00:00", tz=NEW_YORK), "echo") == ScheduleResult.SUCCESS
    assert (
        s.enqueue("api4", triggers.Windowed("2030-01-01T09:00:00", "2030-01-01T10:00:00", tz=NEW_YORK), "echo")
        == ScheduleResult.SUCCESS
    )
    tasks = tasks_by_id(kjson("inspect-queue", check=0)[0])
    assert tasks["api"]["trigger"]["tz"] == BERLIN and tasks["api"]["constraints"]["jitter"] == 300
    assert tasks["api3"]["next_run_at"] == "2030-01-01T14:00:00Z"
    assert tasks["api4"]["trigger"]["start"] == "2030-01-01T14:00:00Z"
    assert repr(triggers.Cron("* * * * *", tz=BERLIN)) == "Cron(expr='* * * * *', delay=0, tz='Europe/Berlin')"


# -- pure arithmetic ------------------------------------------------------------------------------

ZONES = [BERLIN, NEW_YORK, "Australia/Lord_Howe", "Asia/Kolkata", "UTC"]
YEAR = 365 * 86400.0
T2026 = utc("2026-01-01 00:00:00")


@settings(max_examples=200, deadline=None)
@given(
    zone=st.sampled_from(ZONES),
    after=st.floats(T2026, T2026 + YEAR),
    hour=st.integers(0, 23),
    minute=st.integers(0, 59),
)
def test_cron_next_in_a_zone_is_later_and_at_that_wall_time(zone, after, hour, minute):
    nxt = cron_next(f"{minute} {hour} * * *", after, zone)
    assert after < nxt <= after + 2 * 86400
    wall = datetime.fromtimestamp(nxt, ZoneInfo(zone))
    if (wall.hour, wall.minute) != (hour, minute):  # only when that wall time did not exist that day
        naive = wall.replace(tzinfo=None)
        shifted = naive - (wall.utcoffset() - datetime.fromtimestamp(nxt - 7200, ZoneInfo(zone)).utcoffset())
        assert (shifted.hour, shifted.minute) == (hour, minute), (wall, hour, minute)


@settings(max_examples=200, deadline=None)
@given(
    anchor=st.floats(T2026, T2026 + YEAR),
    every=st.sampled_from([60.0, 900.0, 3600.0, 86400.0]),
    flex_frac=st.sampled_from([0.0, 0.25, 1.0]),
    after_k=st.floats(0, 50),
    offset=st.floats(0, 3599),
)
def test_first_due_after_is_the_next_grid_time(anchor, every, flex_frac, after_k, offset):
    flex = every * flex_frac
    trig = {"type": "periodic", "every": every, "flex": flex, "delay": 0.0}
    after = anchor + offset + after_k * every
    due = first_due_after(trig, {"anchor": anchor}, after, offset)
    assert due > after
    base = due - offset
    k = round((base - anchor + flex) / every) - 1
    assert k >= 1 and base == pytest.approx(anchor + (k + 1) * every - flex, abs=1e-6)
    # nothing on the grid between: the one before is at or before `after`
    prev = anchor + k * every - flex + offset if k >= 2 else anchor + offset
    assert prev <= after + 1e-6


@settings(max_examples=200, deadline=None)
@given(
    zone=st.sampled_from(ZONES), start=st.floats(T2026, T2026 + YEAR), offset=st.floats(0, 1800), late=st.floats(0, 800)
)
def test_jitter_keeps_the_grid(zone, start, offset, late):
    """A jittered cron run (at its due time or late) is followed by the next grid time plus the
    same offset: the jitter never drifts and never skips an occurrence."""
    trig = Cron("*/15 * * * *", tz=zone).to_record(start)
    due, _ = initial(trig, start, offset)
    nxt = next_after_run(trig, {}, due + late, offset)
    assert nxt - offset == cron_next(trig["expr"], due - offset, zone)
