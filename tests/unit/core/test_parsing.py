"""The pure parts users type and the arithmetic behind them: durations, times, trigger
arithmetic (kmpwm/triggers.py) and flat task specs (kmpwm/specs.py)."""

from __future__ import annotations

import json
import math
import time
from datetime import UTC, datetime, timedelta

import pytest
from helpers import kjson
from hypothesis import given, settings
from hypothesis import strategies as st

from kmpwm.core import triggers
from kmpwm.core.exitcodes import InvalidParams
from kmpwm.core.models import BACKOFF_CAP, Constraints, TaskRequest
from kmpwm.core.specs import request_from_spec
from kmpwm.core.timeparse import format_duration, iso, parse_duration, parse_time
from kmpwm.core.triggers import backoff_delay, next_periodic

# -- durations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("500ms", 0.5),
        ("30s", 30),
        ("15m", 900),
        ("2h", 7200),
        ("1d", 86400),
        ("1h30m", 5400),
        ("90", 90),
        ("0", 0),
        ("1d2h3m4s", 93784),
        ("2h500ms", 7200.5),
        (" 15m ", 900),
        ("2H", 7200),
        ("1.5h", 5400),
        ("0s", 0),
    ],
)
def test_parse_duration_accepts(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "   ", "-5s", "1x", "s", "5 parsecs", "1h-30m", "h1", "--5", "1e3", "nan", "inf", "1h 30m x", "5ss"]
)
def test_parse_duration_rejects(text):
    with pytest.raises(InvalidParams) as exc:
        parse_duration(text)
    assert exc.value.exit_code == 65
    assert str(text) in exc.value.message or text.strip() == ""


def test_parse_duration_space_inside():
    # "5 m" is not in SPEC's grammar: rejecting it or reading 5 minutes are both fine, nothing else
    try:
        assert parse_duration("5 m") == 300
    except InvalidParams:
        pass


def test_parse_duration_other_types():
    assert parse_duration(timedelta(minutes=2, milliseconds=5)) == pytest.approx(120.005)
    assert parse_duration(7) == 7 and parse_duration(2.5) == 2.5
    for bad in (True, None, [1], -1, timedelta(seconds=-1), float("nan")):
        with pytest.raises(InvalidParams):
            parse_duration(bad)


UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(list(UNITS)), st.integers(0, 500)), min_size=1, max_size=5, unique_by=lambda p: p[0]
    )
)
def test_parse_duration_combinations(parts):
    order = list(UNITS)
    parts = sorted(parts, key=lambda p: order.index(p[0]))
    text = "".join(f"{n}{u}" for u, n in parts)
    assert parse_duration(text) == pytest.approx(sum(n * UNITS[u] for u, n in parts))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 10 * 365 * 86400))
def test_format_duration_round_trips(seconds):
    assert parse_duration(format_duration(seconds)) == seconds


# -- times ----------------------------------------------------------------------------------


def test_parse_time_forms():
    now = 1_800_000_000.0
    assert parse_time("2026-11-22T08:00:00Z") == datetime(2026, 11, 22, 8, tzinfo=UTC).timestamp()
    assert parse_time("2026-11-22T10:00:00+02:00") == datetime(2026, 11, 22, 8, tzinfo=UTC).timestamp()
    assert parse_time("@1800000000") == 1_800_000_000
    assert parse_time("@1800000000.25") == 1_800_000_000.25
    assert parse_time("+90s", now=now) == now + 90
    assert parse_time("+1h30m", now=now) == now + 5400
    assert parse_time(datetime(2030, 1, 1, tzinfo=UTC)) == datetime(2030, 1, 1, tzinfo=UTC).timestamp()
    before = time.time()
    assert before + 59 <= parse_time("+1m") <= time.time() + 61


@pytest.mark.parametrize(
    "text", ["", "tomorrow", "@abc", "+-5s", "+", "2026-13-01T00:00:00", "2026-11-22T25:00", "@", "+5x"]
)
def test_parse_time_rejects(text):
    with pytest.raises(InvalidParams):
        parse_time(text, now=1_800_000_000.0)


def test_parse_time_rejects_naive_datetime_object():
    with pytest.raises(InvalidParams):
        parse_time(datetime(2030, 1, 1))


@pytest.fixture
def tz_tokyo(monkeypatch):
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_naive_time_is_local_time(tz_tokyo):
    # Tokyo is UTC+9 with no daylight saving time
    assert parse_time("2030-01-01T09:00:00") == datetime(2030, 1, 1, 0, tzinfo=UTC).timestamp()


def test_naive_time_is_local_time_end_to_end():
    doc, rc = kjson("enqueue", "x", "echo", "--at", "2030-01-01T08:00:00", env={"TZ": "Asia/Tokyo"})
    assert rc == 0, doc
    assert doc["next_run_at"] == "2029-12-31T23:00:00Z"
    q, _ = kjson("inspect-queue", env={"TZ": "UTC"}, check=0)
    assert q["tasks"][0]["trigger"]["at"] == "2029-12-31T23:00:00Z"


def test_iso_output():
    assert iso(None) is None
    assert iso(0) == "1970-01-01T00:00:00Z"
    assert iso(1.5) == "1970-01-01T00:00:01.500Z"
    assert iso(datetime(2026, 11, 22, 8, tzinfo=UTC).timestamp()) == "2026-11-22T08:00:00Z"


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 4_000_000_000))
def test_iso_round_trips_through_parse_time(epoch):
    assert parse_time(iso(epoch)) == epoch


# -- trigger arithmetic ---------------------------------------------------------------------


@st.composite
def periodic_case(draw):
    every = draw(st.integers(60, 30 * 86400))
    flex = draw(st.integers(0, every))
    anchor = draw(st.integers(1_600_000_000, 2_000_000_000))
    # a run at or after the first due time, possibly many periods later (the machine slept)
    ran_at = anchor + draw(st.one_of(st.integers(0, 3 * every), st.integers(0, 10_000 * every)))
    return anchor, every, flex, ran_at


@settings(max_examples=300, deadline=None)
@given(periodic_case())
def test_next_periodic_stays_on_grid_and_coalesces(case):
    anchor, every, flex, ran_at = case
    trig = {"type": "periodic", "every": float(every), "flex": float(flex), "delay": 0.0}
    nxt = next_periodic(trig, {"anchor": float(anchor)}, float(ran_at))
    period_start = anchor + ((ran_at - anchor) // every) * every
    assert nxt > period_start
    assert nxt >= ran_at  # never due again before the run that just happened
    assert nxt <= ran_at + 2 * every  # missed periods coalesce into one run
    # in the last FLEX of a grid period: the next grid point is at most FLEX away
    grid_end = anchor + math.ceil((nxt - anchor) / every) * every
    assert grid_end - flex <= nxt <= grid_end
    assert grid_end > ran_at
    # not in the period the run happened in (once per period)
    assert nxt >= period_start + every - flex


@settings(max_examples=100, deadline=None)
@given(st.floats(60, 1e6), st.floats(0, 1), st.floats(1.6e9, 2e9), st.floats(0, 1e8))
def test_next_periodic_float_inputs(every, flex_fraction, anchor, after):
    flex = every * flex_fraction
    ran_at = anchor + after
    nxt = next_periodic({"every": every, "flex": flex}, {"anchor": anchor}, ran_at)
    eps = 1e-6 * max(1.0, abs(ran_at))
    assert ran_at - eps <= nxt <= ran_at + 2 * every + eps


def test_next_periodic_examples():
    trig = {"every": 3600.0, "flex": 600.0}
    anchor = 1_800_000_000.0
    # ran inside the first period: next is the last 10 minutes of the second period
    assert next_periodic(trig, {"anchor": anchor}, anchor + 100) == anchor + 2 * 3600 - 600
    # asleep for a day and a half: one run, still on the grid
    nxt = next_periodic(trig, {"anchor": anchor}, anchor + 36 * 3600 + 5)
    assert nxt == anchor + 38 * 3600 - 600
    # flex = interval: due at the start of the next period
    assert next_periodic({"every": 3600.0, "flex": 3600.0}, {"anchor": anchor}, anchor + 10) == anchor + 3600


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["exponential", "linear"]), st.floats(0.001, 20_000), st.integers(1, 200))
def test_backoff_delay_grows_and_is_capped(policy, delay, retries):
    value = backoff_delay(policy, delay, retries)
    assert 0 < value <= BACKOFF_CAP == 5 * 3600
    assert backoff_delay(policy, delay, retries + 1) >= value
    expected = delay * (2 ** (retries - 1) if policy == "exponential" else retries)
    assert value == pytest.approx(min(expected, BACKOFF_CAP))


def test_backoff_delay_examples():
    assert [backoff_delay("exponential", 10, n) for n in (1, 2, 3, 4)] == [10, 20, 40, 80]
    assert [backoff_delay("linear", 10, n) for n in (1, 2, 3, 4)] == [10, 20, 30, 40]
    assert backoff_delay("exponential", 10, 100) == 5 * 3600
    assert backoff_delay("linear", 3600, 6) == 5 * 3600


def test_trigger_records_validate():
    now = 1_800_000_000.0
    assert triggers.Periodic(60).to_record(now)["every"] == 60
    assert triggers.Periodic(timedelta(hours=1)).to_record(now)["flex"] == 3600
    for bad in (
        lambda: triggers.Periodic(59.9),
        lambda: triggers.Periodic("1h", "2h"),
        lambda: triggers.Windowed(now + 20, now + 10),
        lambda: triggers.Windowed(now - 20, now - 10),
        lambda: triggers.Cron("* * *"),
        lambda: triggers.Cron("61 * * * *"),
        lambda: triggers.OnChange("/no/such/path/for/kmpwm"),
        lambda: triggers.DeviceState("raining"),
        lambda: triggers.Exact("whenever"),
        lambda: triggers.OneTime("-1s"),
    ):
        with pytest.raises(InvalidParams):
            bad().to_record(now)
    w = triggers.Windowed("+1h", "+2h").to_record(now)
    assert (w["start"], w["end"]) == (now + 3600, now + 7200)
    assert triggers.DeviceState("Battery_Low").to_record(now)["state"] == "battery-low"
    assert triggers.BatteryOkay().to_record(now)["state"] == "battery-okay"
    e = triggers.Exact(datetime(2030, 1, 1, tzinfo=UTC)).to_record(now)
    assert e["at"] == datetime(2030, 1, 1, tzinfo=UTC).timestamp()
    due, _ = triggers.initial(triggers.OneTime(timedelta(minutes=5)).to_record(now), now)
    assert due == now + 300


# -- flat task specs ------------------------------------------------------------------------


def test_triggers_are_immutable_values():
    """Triggers are values: equal and hashed alike when of the same class with equal fields (the
    API caches validated records by trigger), immutable, printable, picklable."""
    import copy
    import pickle

    assert triggers.Periodic(3600, "15m") == triggers.Periodic(3600, "15m")
    assert hash(triggers.Periodic(3600)) == hash(triggers.Periodic(3600, None, 0))
    assert triggers.Periodic(3600) != triggers.Periodic(7200)
    # same field values, different kinds of trigger: never equal
    assert triggers.Cron("* * * * *") != triggers.DeviceState("* * * * *")
    assert triggers.OneTime(0) != (0,) and triggers.OneTime(0) != 0
    assert len({triggers.Cron("* * * * *"), triggers.DeviceState("* * * * *"), triggers.Cron("* * * * *")}) == 2
    assert repr(triggers.Exact("+1h", "notify")) == "Exact(at='+1h', behavior='notify', delay=0)"
    assert repr(triggers.OnChange("/tmp", descendants=False)) == "OnChange(path='/tmp', descendants=False, delay=0)"
    t = triggers.Windowed("+1h", "+2h", delay=5)
    assert (t.start, t.end, t.delay) == ("+1h", "+2h", 5)
    for mutate in (lambda: setattr(t, "start", "+3h"), lambda: delattr(t, "end"), lambda: setattr(t, "other", 1)):
        with pytest.raises(AttributeError):
            mutate()
    assert pickle.loads(pickle.dumps(t)) == t and copy.deepcopy(t) == t and copy.copy(t) is not None
    with pytest.raises(TypeError):
        triggers.Cron()


@pytest.mark.parametrize(
    "name",
    ["Scheduler", "TaskRequest", "Constraints", "WorkerResult", "ScheduleResult", "triggers", "TaskState", "Outcome"],
)
def test_public_names_import_in_a_fresh_process(name):
    """`from kmpwm import triggers` alone once recursed until the stack ran out."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", f"from kmpwm import {name}; print({name}.__name__)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().rsplit(".", 1)[-1] == name


def test_spec_basic_and_defaults():
    req, policy = request_from_spec({"id": "a", "worker": "echo"})
    assert isinstance(req, TaskRequest)
    assert (req.id, req.worker, req.input, req.tags, policy) == ("a", "echo", None, [], "keep")
    assert isinstance(req.trigger, triggers.OneTime)
    _, policy = request_from_spec({"id": "a", "worker": "echo"}, default_policy="replace")
    assert policy == "replace"


def test_spec_values():
    req, policy = request_from_spec(
        {
            "id": "a",
            "worker": "echo",
            "input": {"x": [1, 2]},
            "every": "2h",
            "flex": "10m",
            "tags": ["t"],
            "requires_network": True,
            "qos": "HIGH",
            "max_attempts": 3,
            "policy": "Append_Or_Replace",
        }
    )
    assert json.loads(req.input) == {"x": [1, 2]}
    assert isinstance(req.trigger, triggers.Periodic)
    rec = req.trigger.to_record(0)
    assert rec["every"] == 7200 and rec["flex"] == 600
    assert policy == "append-or-replace"
    c = req.constraints.to_record()
    assert c["requires_network"] is True and c["qos"] == "high" and c["max_attempts"] == 3
    assert req.tags == ["t"]
    req, _ = request_from_spec({"id": "w", "worker": "echo", "window": ["@1900000000", "@1900003600"]})
    assert isinstance(req.trigger, triggers.Windowed)
    assert request_from_spec({"id": "n", "worker": "echo", "input": 42})[0].input == "42"
    assert request_from_spec({"id": "n", "worker": "echo", "input": "42"})[0].input == "42"
    assert request_from_spec({"id": "n", "worker": "echo", "input": None})[0].input is None
    assert request_from_spec({"id": "n", "worker": "echo", "input": False})[0].input == "false"
    assert request_from_spec({"worker": "echo"}, need_id=False)[0].id is None


@pytest.mark.parametrize(
    "spec",
    [
        {"worker": "echo"},  # no id
        {"id": "a"},  # no worker
        {"id": 5, "worker": "echo"},
        {"id": "a", "worker": "echo", "bogus": 1},  # unknown key
        {"id": "a", "worker": "echo", "every": "1h", "cron": "* * * * *"},  # two triggers
        {"id": "a", "worker": "echo", "window": "+1h"},  # window not a pair
        {"id": "a", "worker": "echo", "window": ["+1h"]},
        {"id": "a", "worker": "echo", "requires_network": "yes"},  # a switch takes a JSON boolean
        {"id": "a", "worker": "echo", "flex": "5m"},  # flex needs every
        {"id": "a", "worker": "echo", "exact_behavior": "notify"},  # needs at
        {"id": "a", "worker": "echo", "no_descendants": True},  # needs on_change
        {"id": "a", "worker": "echo", "policy": "sometimes"},
        {"id": "a", "worker": "echo", "tags": [1, 2]},
        {"id": "a", "worker": "echo", "input": "x", "input_file": "/etc/hostname"},
        {"id": "a", "worker": "echo", "input_file": "/no/such/file/kmpwm"},
        "not a dict",
    ],
)
def test_spec_rejects(spec):
    with pytest.raises(InvalidParams):
        req, _ = request_from_spec(spec, where="line 3")
        req.trigger.to_record(time.time())
        req.constraints.to_record()


def test_spec_errors_name_the_line():
    with pytest.raises(InvalidParams) as exc:
        request_from_spec({"id": "a", "worker": "echo", "bogus": 1}, where="line 7")
    assert exc.value.message.startswith("line 7")


@pytest.mark.parametrize(
    "kw",
    [
        {"max_attempts": 0},
        {"max_attempts": True},
        {"max_attempts": "many"},
        {"timeout": "0s"},
        {"timeout": "soon"},
        {"qos": "urgent"},
        {"backoff": "random"},
        {"network_type": "5g"},
        {"backoff_delay": "-1s"},
        {"requires_network": "yes"},
    ],
)
def test_constraints_reject(kw):
    with pytest.raises(InvalidParams):
        Constraints(**kw).to_record()


def test_constraints_record():
    c = Constraints(
        network_type="Unmetered", timeout=timedelta(minutes=1), backoff="LINEAR", backoff_delay="1m", max_attempts="4"
    ).to_record()
    assert c["network_type"] == "unmetered" and c["requires_network"] is True
    assert c["timeout"] == 60 and c["backoff"] == "linear" and c["backoff_delay"] == 60 and c["max_attempts"] == 4
    d = Constraints().to_record()
    assert d["network_type"] == "not-required" and d["requires_network"] is False
    assert d["backoff"] == "exponential" and d["backoff_delay"] == 10 and d["max_attempts"] == 10
    assert Constraints(requires_network=True).to_record()["network_type"] == "connected"
