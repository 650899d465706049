"""End-to-end tests of ``kmpwm run-due`` with real processes (SPEC sections 3-6, 9).

Every test gets its own KMPWM_HOME (the autouse fixture of conftest.py; ``home`` is its path).  Command
workers are small Python scripts written into
tmp_path and declared in ``$KMPWM_HOME/config.toml``; their behaviour is driven by their input
(or argv), and they record what they saw (env, stdin, timestamps) in JSON Lines files written
with single O_APPEND writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from helpers import jdoc as kjson  # kjson(ARGS, expect=N) -> the --json document
from helpers import kmpwm

pytestmark = pytest.mark.both_stores(long=True)  # PostgreSQL's side runs in scripts/long-tier

PY = sys.executable
HOUR = 3600.0

# -- local helpers (self-contained on purpose) ------------------------------------------------


def ts(iso: str | None) -> float | None:
    if iso is None:
        return None
    assert iso.endswith("Z"), iso
    return datetime.fromisoformat(iso[:-1] + "+00:00").timestamp()


def tasks(*args) -> dict:
    doc = kjson("inspect-queue", "--all", *args)
    return {t["id"]: t for t in doc["tasks"]}


def chains() -> dict:
    doc = kjson("inspect-queue", "--all")
    return {c["id"]: c for c in doc["chains"]}


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_config(home: Path, workers: dict[str, dict]) -> None:
    lines = []
    for name, spec in workers.items():
        lines.append(f"[workers.{name}]")
        for key, value in spec.items():
            lines.append(f"{key} = {json.dumps(value)}")  # JSON strings/lists of strings are valid TOML
        lines.append("")
    path = home / "config.toml"
    path.write_text("\n".join(lines))
    os.chmod(path, 0o600)


# A generic command worker.  Its configuration comes from argv[1] (JSON) if given, else from the
# input on stdin (JSON object).  Keys:
#   log      file to append one JSON record to when the run ends
#   started  file to append one JSON record to when the run starts
#   counter  file counting runs (one line per run); with ``exits`` picks the exit code per run
#   exits    list of exit codes, one per run (the last one repeats)
#   exit     exit code (default 0)
#   sleep    seconds to sleep; ``fast_if`` names a file whose existence makes the sleep 0
#   stdout / stderr   text to print
#   out      JSON object printed as the last stdout line
#   ignore_term       ignore SIGTERM
WORKER = r"""
import json, os, signal, sys, time

raw = sys.stdin.read()
if len(sys.argv) > 1:
    cfg = json.loads(sys.argv[1])
else:
    try:
        cfg = json.loads(raw) if raw.strip() else {}
    except ValueError:
        cfg = {}
    if not isinstance(cfg, dict):
        cfg = {}
if cfg.get("ignore_term"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

def append(path, rec):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(rec) + "\n").encode())
    finally:
        os.close(fd)

rec = {"id": os.environ.get("KMPWM_TASK_ID"), "pid": os.getpid(), "attempt": os.environ.get("KMPWM_ATTEMPT"),
       "upstream": os.environ.get("KMPWM_UPSTREAM"), "env_input": os.environ.get("KMPWM_INPUT"),
       "stdin": raw, "start": time.time(), "name": cfg.get("name")}
if cfg.get("started"):
    append(cfg["started"], rec)
code = cfg.get("exit", 0)
if cfg.get("counter"):
    try:
        with open(cfg["counter"]) as fh:
            n = len(fh.read().splitlines())
    except FileNotFoundError:
        n = 0
    append(cfg["counter"], {"run": n + 1})
    exits = cfg.get("exits") or [code]
    code = exits[min(n, len(exits) - 1)]
seconds = cfg.get("sleep", 0)
if cfg.get("fast_if") and os.path.exists(cfg["fast_if"]):
    seconds = 0
time.sleep(seconds)
rec["end"] = time.time()
if cfg.get("log"):
    append(cfg["log"], rec)
if cfg.get("stdout"):
    sys.stdout.write(cfg["stdout"] + "\n")
if cfg.get("out") is not None:
    sys.stdout.write(json.dumps(cfg["out"]) + "\n")
if cfg.get("stderr"):
    sys.stderr.write(cfg["stderr"] + "\n")
sys.stdout.flush()
sys.stderr.flush()
sys.exit(code)
"""


@pytest.fixture
def script(tmp_path) -> Path:
    p = tmp_path / "worker.py"
    p.write_text(WORKER)
    return p


@pytest.fixture
def cmd_worker(home, script):
    """Declare ``w`` (config from the input) plus any ``name=cfg`` workers (config from argv)."""

    def declare(**named):
        workers = {"w": {"command": [PY, str(script)]}}
        for name, cfg in named.items():
            workers[name] = {"command": [PY, str(script), json.dumps(cfg)]}
        write_config(home, workers)

    return declare


# -- exactly once -----------------------------------------------------------------------------


def test_concurrent_run_due_runs_every_task_exactly_once(tmp_path, cmd_worker):
    cmd_worker()
    log = tmp_path / "runs.jsonl"
    ids = [f"t{i:02d}" for i in range(40)]
    lines = "".join(
        json.dumps({"id": i, "worker": "w", "input": json.dumps({"log": str(log), "sleep": 0.05})}) + "\n" for i in ids
    )
    doc = kjson("enqueue", "--from", "-", input=lines)
    assert [r["result"] for r in doc["results"]] == ["SUCCESS"] * 40

    procs = [
        subprocess.Popen(
            [PY, "-m", "kmpwm", "run-due", "--parallel", "2", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, (p.returncode, out, err)
        outs.append(json.loads(out))

    runs = read_log(log)
    seen = [r["id"] for r in runs]
    assert sorted(seen) == ids, "every task must run exactly once across the concurrent run-due processes"
    reported = [row["id"] for doc in outs for row in doc["ran"]]
    assert sorted(reported) == ids
    assert all(row["status"] == "SUCCESS" for doc in outs for row in doc["ran"])

    state = tasks()
    assert len(state) == 40
    assert {t["state"] for t in state.values()} == {"SUCCEEDED"}
    assert all(t["attempts"] == 1 for t in state.values())


# -- chains -----------------------------------------------------------------------------------


def test_chain_order_parallel_step_and_upstream_merge(tmp_path, cmd_worker):
    log = tmp_path / "chain.jsonl"
    cmd_worker(
        wA={"name": "A", "log": str(log), "sleep": 0.2, "out": {"a": 1}},
        wB={"name": "B", "log": str(log), "sleep": 1.5, "out": {"k": "from-B", "b": 2}},
        wC={"name": "C", "log": str(log), "sleep": 1.5, "out": {"k": "from-C", "c": 3}},
        wD={"name": "D", "log": str(log), "out": {"d": 4}},
    )
    doc = kjson("chain", "--id", "ch", "wA", "wB+wC", "wD")
    assert doc["result"] == "SUCCESS"
    assert doc["tasks"] == ["ch/1/wA", "ch/2/wB", "ch/2/wC", "ch/3/wD"]

    run = kjson("run-due", "--parallel", "2")
    assert sorted(r["id"] for r in run["ran"]) == sorted(doc["tasks"])

    recs = {r["name"]: r for r in read_log(log)}
    assert set(recs) == {"A", "B", "C", "D"}
    a, b, c, d = recs["A"], recs["B"], recs["C"], recs["D"]
    assert a["end"] <= b["start"] and a["end"] <= c["start"], "step 2 started before step 1 ended"
    assert max(b["end"], c["end"]) <= d["start"], "step 3 started before step 2 ended"
    assert b["start"] < c["end"] and c["start"] < b["end"], "B and C (one step) did not run concurrently"

    assert json.loads(a["upstream"]) == {}
    assert json.loads(b["upstream"]) == {"a": 1}
    assert json.loads(c["upstream"]) == {"a": 1}
    # declaration order B then C, later keys win; step 1's data is not passed on to step 3
    assert json.loads(d["upstream"]) == {"k": "from-C", "b": 2, "c": 3}

    state = tasks()
    assert all(state[i]["state"] == "SUCCEEDED" for i in doc["tasks"])
    assert state["ch/3/wD"]["last_result"]["data"] == {"d": 4}
    ch = chains()["ch"]
    assert ch["state"] == "SUCCEEDED"
    assert ch["steps"] == [["ch/1/wA"], ["ch/2/wB", "ch/2/wC"], ["ch/3/wD"]]
    assert ch["next_step"] is None


def test_echo_chain_passes_merged_upstream(tmp_path):
    doc = kjson("chain", "--id", "e", "echo", "echo+echo", "echo")
    run = kjson("run-due", "--parallel", "2")
    rows = {r["id"]: r for r in run["ran"]}
    assert set(rows) == set(doc["tasks"])
    last = rows["e/3/echo"]["data"]
    # both parallel tasks return key "task"; the one declared later (echo#2) wins
    assert last["upstream"]["task"] == "e/2/echo#2"


def test_failing_step_fails_the_rest_of_the_chain(tmp_path, cmd_worker):
    log = tmp_path / "ran.jsonl"
    cmd_worker(ok={"log": str(log)}, bad={"log": str(log), "exit": 3, "stderr": "step two broke"})
    doc = kjson("chain", "--id", "f", "ok", "bad", "ok", "ok")
    assert doc["tasks"] == ["f/1/ok", "f/2/bad", "f/3/ok", "f/4/ok"]
    run = kjson("run-due")
    assert sorted(r["id"] for r in run["ran"]) == ["f/1/ok", "f/2/bad"]
    assert sorted(r["id"] for r in read_log(log)) == ["f/1/ok", "f/2/bad"]

    state = tasks()
    assert state["f/1/ok"]["state"] == "SUCCEEDED"
    assert state["f/2/bad"]["state"] == "FAILED"
    assert state["f/2/bad"]["last_result"]["status"] == "FAILURE"
    assert "step two broke" in state["f/2/bad"]["last_result"]["message"]
    for later in ("f/3/ok", "f/4/ok"):
        assert state[later]["state"] == "FAILED"
        assert state[later]["reason"] == "upstream failed"
        assert state[later]["attempts"] == 0
    ch = chains()["f"]
    assert ch["state"] == "FAILED"

    # nothing of the failed chain runs later
    again = kjson("run-due")
    assert again["ran"] == []


def test_failing_builtin_in_parallel_step(tmp_path):
    kjson("chain", "--id", "g", "echo", "fail+echo", "echo")
    run = kjson("run-due", "--parallel", "2")
    assert "g/3/echo" not in {r["id"] for r in run["ran"]}
    state = tasks()
    assert state["g/2/fail"]["state"] == "FAILED"
    assert state["g/3/echo"]["state"] == "FAILED"
    assert state["g/3/echo"]["reason"] == "upstream failed"
    assert chains()["g"]["state"] == "FAILED"


# -- retries ----------------------------------------------------------------------------------


def test_retry_backoff_then_success(tmp_path, cmd_worker):
    counter, log = tmp_path / "count", tmp_path / "runs.jsonl"
    cmd_worker(flaky={"counter": str(counter), "exits": [75, 75, 0], "log": str(log), "out": {"done": True}})
    kjson("enqueue", "r", "flaky", "--backoff-delay", "10s")

    before = time.time()
    run = kjson("run-due")
    after = time.time()
    assert [(r["id"], r["status"]) for r in run["ran"]] == [("r", "RETRY")]
    t = tasks()["r"]
    assert t["state"] == "ENQUEUED"
    assert t["attempts"] == 1
    assert t["last_result"]["status"] == "RETRY"
    nra = ts(t["next_run_at"])
    assert before + 10 - 0.5 <= nra <= after + 10 + 0.5, (nra - before, nra - after)

    # backing off: an immediate second run-due runs nothing
    again = kjson("run-due")
    assert again["ran"] == []
    assert len(read_log(log)) == 1

    # 15 s later the first retry is due (backoff 10 s); the next backoff is 20 s (exponential)
    before = time.time()
    run = kjson("run-due", faketime="+15")
    after = time.time()
    assert [(r["id"], r["status"]) for r in run["ran"]] == [("r", "RETRY")]
    t = tasks()["r"]
    assert t["state"] == "ENQUEUED" and t["attempts"] == 2
    nra = ts(t["next_run_at"])
    assert before + 15 + 20 - 0.5 <= nra <= after + 15 + 20 + 0.5

    # still backing off at +15 s
    assert kjson("run-due", faketime="+15")["ran"] == []

    run = kjson("run-due", faketime="+60")
    assert [(r["id"], r["status"]) for r in run["ran"]] == [("r", "SUCCESS")]
    assert run["ran"][0]["data"] == {"done": True}
    t = tasks()["r"]
    assert t["state"] == "SUCCEEDED" and t["attempts"] == 3
    assert t["next_run_at"] is None
    assert [r["attempt"] for r in read_log(log)] == ["1", "2", "3"]


def test_max_attempts_ends_failed(tmp_path, cmd_worker):
    counter = tmp_path / "count"
    cmd_worker(always={"counter": str(counter), "exit": 75, "stderr": "not yet"})
    kjson("enqueue", "m", "always", "--max-attempts", "2", "--backoff-delay", "10s")
    kjson("run-due")
    t = tasks()["m"]
    assert t["state"] == "ENQUEUED" and t["attempts"] == 1
    kjson("run-due", faketime="+60")
    t = tasks()["m"]
    assert t["state"] == "FAILED"
    assert t["attempts"] == 2
    assert t["reason"]
    assert len(counter.read_text().splitlines()) == 2
    # FAILED means it never runs again
    assert kjson("run-due", faketime="+3600")["ran"] == []
    assert len(counter.read_text().splitlines()) == 2


def test_linear_and_exponential_backoff_spacing(tmp_path, cmd_worker):
    cmd_worker(always={"exit": 75})
    kjson("enqueue", "lin", "always", "--backoff", "linear", "--backoff-delay", "10s")
    kjson("enqueue", "exp", "always", "--backoff", "exponential", "--backoff-delay", "10s")
    kjson("enqueue", "dflt", "always", "--backoff-delay", "10s")  # exponential is the default

    expected = {"lin": [10, 20, 30], "exp": [10, 20, 40], "dflt": [10, 20, 40]}
    for n, offset in enumerate([0, 15, 60]):
        before = time.time() + offset
        run = kjson("run-due", faketime=f"+{offset}")
        after = time.time() + offset
        assert sorted(r["id"] for r in run["ran"]) == ["dflt", "exp", "lin"], (n, run)
        state = tasks()
        for tid, delays in expected.items():
            t = state[tid]
            assert t["state"] == "ENQUEUED" and t["attempts"] == n + 1
            nra = ts(t["next_run_at"])
            assert before + delays[n] - 0.5 <= nra <= after + delays[n] + 0.5, (tid, n, nra - before, nra - after)


# -- periodic ---------------------------------------------------------------------------------


def test_periodic_runs_once_per_period_and_coalesces_missed_periods(tmp_path, cmd_worker):
    log = tmp_path / "runs.jsonl"
    cmd_worker(tick={"log": str(log)})
    doc = kjson("enqueue", "p", "tick", "--every", "1h")
    anchor = ts(doc["next_run_at"])
    assert abs(anchor - time.time()) < 30

    run = kjson("run-due")
    assert [r["id"] for r in run["ran"]] == ["p"]
    t = tasks()["p"]
    assert t["state"] == "ENQUEUED"
    assert abs(ts(t["next_run_at"]) - (anchor + HOUR)) < 0.01
    assert kjson("run-due")["ran"] == []  # not due again within the hour

    # the machine "slept" for a day: 24 missed periods run once
    before = time.time() + 86400
    run = kjson("run-due", faketime="+86400")
    assert [r["id"] for r in run["ran"]] == ["p"]
    assert len(read_log(log)) == 2
    t = tasks()["p"]
    assert t["state"] == "ENQUEUED"
    nra = ts(t["next_run_at"])
    periods = (nra - anchor) / HOUR
    assert abs((nra - anchor) - round(periods) * HOUR) < 0.01, "next_run_at left the anchor's hour grid"
    assert before < nra <= before + HOUR + 5
    # and nothing more at the same faked time
    assert kjson("run-due", faketime="+86400")["ran"] == []
    assert len(read_log(log)) == 2


# -- command workers --------------------------------------------------------------------------


def test_command_worker_exit_codes_and_environment(tmp_path, home, script):
    log = tmp_path / "env.jsonl"
    write_config(
        home,
        {
            "w": {"command": [PY, str(script)]},
            "missing": {"command": [str(tmp_path / "no-such-dir" / "kmpwm-no-such-program")]},
        },
    )
    inputs = {
        "okjson": {"log": str(log), "stdout": "some chatter\nmore chatter", "out": {"k": 1, "s": "x"}},
        "oktext": {"stdout": "just text, no JSON"},
        "retry": {"exit": 75, "stderr": "try later"},
        "three": {"exit": 3, "stderr": "noise line\nthe real reason xyz"},
    }
    texts = {}
    for tid, cfg in inputs.items():
        texts[tid] = json.dumps(cfg)
        kjson("enqueue", tid, "w", "--input", texts[tid])
    kjson("enqueue", "nf", "missing")

    run = kjson("run-due")
    rows = {r["id"]: r for r in run["ran"]}
    assert set(rows) == {"okjson", "oktext", "retry", "three", "nf"}

    assert rows["okjson"]["status"] == "SUCCESS"
    assert rows["okjson"]["data"] == {"k": 1, "s": "x"}
    assert rows["oktext"]["status"] == "SUCCESS"
    assert rows["oktext"]["data"] is None
    assert rows["retry"]["status"] == "RETRY"
    assert rows["three"]["status"] == "FAILURE"
    assert "the real reason xyz" in rows["three"]["message"]
    assert rows["nf"]["status"] == "FAILURE"
    assert rows["nf"]["message"] and "kmpwm-no-such-program" in rows["nf"]["message"]

    state = tasks()
    assert state["okjson"]["state"] == "SUCCEEDED"
    assert state["okjson"]["last_result"]["status"] == "SUCCESS"
    assert state["okjson"]["last_result"]["data"] == {"k": 1, "s": "x"}
    assert state["oktext"]["last_result"]["data"] is None
    assert state["retry"]["state"] == "ENQUEUED" and state["retry"]["attempts"] == 1
    assert state["three"]["state"] == "FAILED"
    assert "the real reason xyz" in state["three"]["last_result"]["message"]
    assert state["nf"]["state"] == "FAILED"

    [rec] = read_log(log)
    assert rec["stdin"] == texts["okjson"]
    assert rec["env_input"] == texts["okjson"]
    assert rec["id"] == "okjson"
    assert rec["attempt"] == "1"
    assert rec["upstream"] is not None and json.loads(rec["upstream"]) == {}


# -- run-due output ---------------------------------------------------------------------------


def test_run_due_json_shape_and_network_constraint(tmp_path):
    kjson("enqueue", "plain", "echo", "--input", '{"x": 1}')
    kjson("enqueue", "net", "echo", "--requires-network")

    off = kjson("run-due", env={"KMPWM_ASSUME": "network=off"})
    assert set(off) >= {"ran", "expired", "skipped"}
    assert off["expired"] == []
    [row] = off["ran"]
    assert set(row) >= {"id", "worker", "status", "message", "data", "duration_ms"}
    assert row["id"] == "plain" and row["worker"] == "echo" and row["status"] == "SUCCESS"
    assert row["data"]["x"] == 1 and row["data"]["task"] == "plain"
    assert isinstance(row["duration_ms"], int) and row["duration_ms"] >= 0
    assert [s["id"] for s in off["skipped"]] == ["net"]
    assert set(off["skipped"][0]) >= {"id", "reason"}
    assert isinstance(off["skipped"][0]["reason"], str) and off["skipped"][0]["reason"]
    t = tasks()["net"]
    assert t["state"] == "ENQUEUED" and t["attempts"] == 0

    on = kjson("run-due", env={"KMPWM_ASSUME": "network=on"})
    assert [(r["id"], r["status"]) for r in on["ran"]] == [("net", "SUCCESS")]
    assert on["skipped"] == []
    assert tasks()["net"]["state"] == "SUCCEEDED"


def test_run_due_is_silent_on_success_without_a_terminal(tmp_path):
    r = kmpwm("run-due")  # nothing due
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    kjson("enqueue", "quiet", "echo", "--input", "hello")
    r = kmpwm("run-due")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert tasks()["quiet"]["state"] == "SUCCEEDED"


def test_max_tasks_and_dry_run(tmp_path, cmd_worker):
    log = tmp_path / "runs.jsonl"
    cmd_worker(rec={"log": str(log)})
    for tid in ("m1", "m2", "m3"):
        kjson("enqueue", tid, "rec")

    run = kjson("run-due", "--max-tasks", "1")
    assert len(run["ran"]) == 1
    assert len(read_log(log)) == 1
    state = tasks()
    assert sorted(t["state"] for t in state.values()) == ["ENQUEUED", "ENQUEUED", "SUCCEEDED"]
    remaining = sorted(i for i, t in state.items() if t["state"] == "ENQUEUED")

    r = kmpwm("run-due", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    json.loads(r.stdout)  # one JSON document naming what would run
    for tid in remaining:
        assert tid in r.stdout
    r = kmpwm("run-due", "--dry-run")
    assert r.returncode == 0, r.stderr
    for tid in remaining:
        assert tid in r.stdout + r.stderr
    assert len(read_log(log)) == 1, "--dry-run ran a worker"
    state = tasks()
    assert all(state[i]["state"] == "ENQUEUED" and state[i]["attempts"] == 0 for i in remaining)

    run = kjson("run-due")
    assert sorted(r["id"] for r in run["ran"]) == remaining


# -- events -----------------------------------------------------------------------------------


def _event_list(doc) -> list[dict]:
    if isinstance(doc, list):
        return doc
    lists = [v for v in doc.values() if isinstance(v, list)]
    assert lists, doc
    return lists[0]


def _kind(ev: dict):
    return ev.get("event", ev.get("type", ev.get("kind")))


def _task(ev: dict):
    return ev.get("task", ev.get("id", ev.get("task_id")))


def test_events_record_runs(tmp_path):
    kjson("enqueue", "ev1", "echo")
    kjson("enqueue", "ev2", "fail", "--input", "nope")
    kjson("run-due")

    events = _event_list(kjson("events"))
    ran = {_task(e): e for e in events if _kind(e) == "ran"}
    assert set(ran) >= {"ev1", "ev2"}
    assert ran["ev1"]["status"] == "SUCCESS"
    assert ran["ev2"]["status"] == "FAILURE"
    for e in events:
        assert e["ts"].endswith("Z")

    only = _event_list(kjson("events", "--task", "ev1"))
    assert only and {_task(e) for e in only} == {"ev1"}
    assert [e["status"] for e in only if _kind(e) == "ran"] == ["SUCCESS"]


def test_a_worker_forked_as_run_due_dies_never_runs(tmp_path):
    """PR_SET_PDEATHSIG is armed in the child after fork: if run-due was SIGKILLed in between
    (right after it recorded the claim), no signal would ever come and the worker would run
    as an orphan beside the run-due that claims the task again.  The child checks that its
    parent is still the one that forked it, and exits otherwise."""
    import subprocess
    import sys

    log = tmp_path / "child.log"
    code = f"""
import os, sys, time
from kmpwm.running import child

parent = os.getpid()
if os.fork() == 0:
    while os.getppid() == parent:  # wait until the forking process is gone
        time.sleep(0.005)
    with open({str(log)!r}, "a") as f:
        f.write("arming\\n")
    child.die_with_parent(parent)
    with open({str(log)!r}, "a") as f:
        f.write("survived\\n")
    os._exit(0)
os._exit(0)  # the parent dies at once, as a SIGKILLed run-due would
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    deadline = time.time() + 10
    while time.time() < deadline and "arming" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.02)
    time.sleep(0.3)
    assert log.read_text() == "arming\n"


# -- the clock set back; one truth about leases (issues 13.10, 14.10) -------------------------


def test_work_enqueued_while_the_clock_was_ahead_is_due_now_once_it_is_set_back(tmp_path, cmd_worker):
    """Issue 13.10: the clock was an hour ahead when work was enqueued "for now" (and when the
    snapshot was written); once it is set back, the work is due now, not in an hour, and a delay
    counts from now."""
    log = tmp_path / "runs.jsonl"
    cmd_worker(tick={"log": str(log)})
    kjson("enqueue", "now", "tick", faketime="+1h")
    kjson("enqueue", "soon", "tick", "--delay", "10m", faketime="+1h")
    kmpwm("compact", check=0, faketime="+1h")  # the snapshot's summary of due times is an hour ahead too
    before = time.time()
    t = tasks()
    assert ts(t["now"]["next_run_at"]) <= time.time()
    assert before + 600 - 1 <= ts(t["soon"]["next_run_at"]) <= time.time() + 600
    row = next(line for line in kmpwm("inspect-queue", check=0).stdout.splitlines() if line.startswith("now "))
    assert "now" in row.split()[3:] and "1h" not in row, row
    assert kjson("explain", "now")["code"] == "due"
    run = kjson("run-due")
    assert [r["id"] for r in run["ran"]] == ["now"]
    assert [r["id"] for r in read_log(log)] == ["now"]
    # that run-due journaled the corrected due time of "soon": it does not move on with the clock
    assert kjson("run-due", faketime="+300")["ran"] == []
    later = kjson("run-due", faketime="+700")
    assert [r["id"] for r in later["ran"]] == ["soon"]


def test_every_view_tells_the_same_truth_about_a_dead_runner(tmp_path, cmd_worker):
    """Issue 14.10: a run-due killed mid-task (its worker dies with it) leaves a RUNNING task whose
    runner is gone.  inspect-queue (plain and JSON), explain and enqueue's answer all say it is
    due again, for that reason; the next run-due takes it over and ``events`` records the loss."""
    from helpers import kmpwm_env

    started = tmp_path / "started.jsonl"
    cmd_worker(slow={"sleep": 60, "started": str(started)})
    kjson("enqueue", "s", "slow")
    proc = subprocess.Popen(
        [PY, "-m", "kmpwm", "run-due"], env=kmpwm_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while not read_log(started) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert read_log(started), "the worker never started"
    proc.kill()
    proc.wait(timeout=30)
    t = tasks()["s"]
    assert t["state"] == "ENQUEUED" and "is gone" in (t["reason"] or ""), t
    assert ts(t["next_run_at"]) <= time.time()
    plain = kmpwm("inspect-queue", check=0).stdout
    row = next(line for line in plain.splitlines() if line.startswith("s "))
    assert "RUNNING" not in row and "ENQUEUED" in row and "is gone" in row, plain
    ex = kjson("explain", "s")
    assert ex["code"] == "due" and f"pid {proc.pid}) is gone" in ex["reason"], ex
    out = kmpwm("enqueue", "s", "slow", check=0).stdout
    assert out.startswith("kept the existing s") and "next run now" in out, out
    assert not [e for e in _event_list(kjson("events", "--task", "s")) if _kind(e) == "runner-lost"]
    cmd_worker(slow={"started": str(started)})
    run = kjson("run-due")
    assert [(r["id"], r["status"]) for r in run["ran"]] == [("s", "SUCCESS")]
    lost = [e for e in _event_list(kjson("events", "--task", "s")) if _kind(e) == "runner-lost"]
    assert len(lost) == 1 and lost[0]["pid"] == proc.pid and lost[0]["why"] == "its process is gone", lost


def test_enqueue_answers_the_state_of_a_kept_task(tmp_path, cmd_worker):
    """Issue 14.10: ``enqueue X`` for a task that waits for an earlier chain step (BLOCKED) keeps it
    and says so, not "next run now"; JSON has no next run for it."""
    cmd_worker()
    kjson("chain", "--id", "C", "w", "w")
    out = kmpwm("enqueue", "C/2/w", "w", check=0).stdout
    assert out.startswith("kept the existing C/2/w") and "BLOCKED" in out and "next run" not in out, out
    doc = kjson("enqueue", "C/2/w", "w")
    assert doc["action"] == "kept" and doc["next_run_at"] is None, doc
