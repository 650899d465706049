"""End-to-end tests of the core commands (SPEC sections 1, 3, 4, 6, 7, 9), through real
subprocesses: enqueue and its flags, policies, --from batches, chains, cancel, inspect-queue
filters, --json documents, exit codes, permissions, --home, concurrency; plus the Python API."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import kjson, kmpwm, kmpwm_env, tasks_by_id

pytestmark = pytest.mark.both_stores  # each test runs on the journal and on PostgreSQL (conftest.py)

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
TASK_KEYS = {
    "id",
    "worker",
    "state",
    "chain_id",
    "step",
    "attempts",
    "next_run_at",
    "trigger",
    "constraints",
    "input",
    "tags",
    "last_result",
    "reason",
}


def parse_iso(text: str) -> float:
    assert ISO_Z.match(text), text
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def inspect(*args, check=0) -> dict:
    doc, _ = kjson("inspect-queue", *args, check=check)
    return doc


def journal_lines(home: Path) -> list[bytes]:
    path = home / "journal" / "journal.log"
    return path.read_bytes().splitlines() if path.exists() else []


def enq_records(home: Path) -> int:
    """How many journal records hold an enqueue or chain op."""
    return sum(1 for line in journal_lines(home) if b'"op":"enq"' in line or b'"op":"chain"' in line)


def parallel(calls):
    """Run several independent kmpwm calls at once (each a subprocess); results in order."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda c: kmpwm(*c[0], **c[1]), calls))


# -- enqueue: the JSON shapes, every trigger, every constraint ------------------------------


def test_enqueue_json_and_task_fields():
    before = time.time()
    doc, rc = kjson("enqueue", "a", "echo")
    assert rc == 0
    assert doc["result"] == "SUCCESS" and doc["id"] == "a" and doc["action"] == "enqueued"
    assert before - 1 <= parse_iso(doc["next_run_at"]) <= time.time() + 1

    q = inspect()
    assert set(q) >= {"tasks", "chains"}
    (t,) = q["tasks"]
    assert TASK_KEYS <= set(t)
    assert t["id"] == "a" and t["worker"] == "echo" and t["state"] == "ENQUEUED"
    assert t["chain_id"] is None and t["step"] is None
    assert t["attempts"] == 0
    assert t["next_run_at"] == doc["next_run_at"]
    assert isinstance(t["trigger"], dict) and isinstance(t["constraints"], dict)
    assert t["input"] is None and t["tags"] == [] and t["last_result"] is None and t["reason"] is None
    assert q["chains"] == []


def test_every_trigger_flag_parses_and_is_stored(tmp_path):
    watched = tmp_path / "watched.txt"
    watched.write_text("x")
    at = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=3)
    at_text = at.strftime("%Y-%m-%dT%H:%M:%SZ")
    now = time.time()
    calls = [
        (("enqueue", "t-delay", "echo", "--delay", "1h", "--json"), {}),
        (("enqueue", "t-every", "echo", "--every", "1h", "--flex", "10m", "--json"), {}),
        (("enqueue", "t-at", "echo", "--at", at_text, "--json"), {}),
        (("enqueue", "t-window", "echo", "--window", "+1h", "+2h", "--json"), {}),
        (("enqueue", "t-cron", "echo", "--cron", "*/5 * * * *", "--json"), {}),
        (("enqueue", "t-change", "echo", "--on-change", str(watched), "--no-descendants", "--json"), {}),
        (("enqueue", "t-when", "echo", "--when", "battery-low", "--json"), {}),
        (("enqueue", "t-every-delay", "echo", "--every", "2h", "--delay", "30m", "--json"), {}),
    ]
    for proc in parallel(calls):
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["result"] == "SUCCESS"
    tasks = tasks_by_id(inspect())
    assert set(tasks) == {c[0][1] for c in calls}
    for t in tasks.values():
        assert t["state"] == "ENQUEUED"
        assert t["next_run_at"] is None or ISO_Z.match(t["next_run_at"])

    d = tasks["t-delay"]
    assert d["trigger"]["type"] == "one_time" and d["trigger"]["delay"] == 3600
    assert abs(parse_iso(d["next_run_at"]) - (now + 3600)) < 30

    p = tasks["t-every"]["trigger"]
    assert p["type"] == "periodic" and p["every"] == 3600 and p["flex"] == 600
    # periodic: the first run is due at once
    assert abs(parse_iso(tasks["t-every"]["next_run_at"]) - now) < 30
    pd = tasks["t-every-delay"]
    assert pd["trigger"]["every"] == 7200 and pd["trigger"]["flex"] == 7200  # flex defaults to the interval
    assert abs(parse_iso(pd["next_run_at"]) - (now + 1800)) < 30

    e = tasks["t-at"]
    assert e["trigger"]["type"] == "exact"
    assert parse_iso(e["trigger"]["at"]) == at.timestamp()
    assert parse_iso(e["next_run_at"]) == at.timestamp()

    w = tasks["t-window"]["trigger"]
    assert w["type"] == "windowed"
    assert abs(parse_iso(w["start"]) - (now + 3600)) < 30 and abs(parse_iso(w["end"]) - (now + 7200)) < 30
    assert abs(parse_iso(tasks["t-window"]["next_run_at"]) - (now + 3600)) < 30

    c = tasks["t-cron"]
    assert c["trigger"]["type"] == "cron" and c["trigger"]["expr"] == "*/5 * * * *"
    nxt = parse_iso(c["next_run_at"])
    assert now - 1 < nxt <= now + 301 and int(nxt) % 300 == 0

    oc = tasks["t-change"]["trigger"]
    assert oc["type"] == "on_change" and oc["path"] == str(watched) and oc["descendants"] is False

    dv = tasks["t-when"]["trigger"]
    assert dv["type"] == "device_state" and dv["state"] == "battery-low"


def test_every_constraint_flag_parses_and_is_stored():
    doc, rc = kjson(
        "enqueue",
        "c1",
        "echo",
        "--requires-network",
        "--requires-charging",
        "--battery-not-low",
        "--storage-not-low",
        "--device-idle",
        "--heavy",
        "--expedited",
        "--qos",
        "high",
        "--timeout",
        "2m",
        "--backoff",
        "linear",
        "--backoff-delay",
        "30s",
        "--max-attempts",
        "3",
        "--tag",
        "x",
        "--tag",
        "y",
        "--input",
        "hello world",
    )
    assert rc == 0 and doc["result"] == "SUCCESS"
    doc, rc = kjson(
        "enqueue", "c2", "echo", "--network-type", "metered", "--qos", "LOW", env={"KMPWM_ASSUME": "metered=on"}
    )
    assert rc == 0, doc
    tasks = tasks_by_id(inspect())
    c = tasks["c1"]["constraints"]
    assert c["requires_network"] is True
    assert c["network_type"] == "connected"
    for key in ("requires_charging", "battery_not_low", "storage_not_low", "device_idle", "heavy", "expedited"):
        assert c[key] is True, key
    assert c["qos"] == "high"
    assert c["timeout"] == 120
    assert c["backoff"] == "linear" and c["backoff_delay"] == 30 and c["max_attempts"] == 3
    assert tasks["c1"]["tags"] == ["x", "y"]
    assert tasks["c1"]["input"] == "hello world"

    c2 = tasks["c2"]["constraints"]
    assert c2["network_type"] == "metered" and c2["requires_network"] is True and c2["qos"] == "low"
    # the defaults of SPEC section 3
    assert c2["backoff"] == "exponential" and c2["backoff_delay"] == 10 and c2["max_attempts"] == 10
    for key in ("requires_charging", "battery_not_low", "storage_not_low", "device_idle", "heavy", "expedited"):
        assert c2[key] is False, key


def test_input_file(tmp_path):
    text = 'line one\nüñïçødé ✓\n{"not": "parsed"}\n'
    f = tmp_path / "in.txt"
    f.write_text(text, encoding="utf-8")
    kmpwm("enqueue", "f", "echo", "--input-file", f, check=0)
    (t,) = inspect()["tasks"]
    assert t["input"] == text
    # a missing file is a bad value, not a crash
    doc, rc = kjson("enqueue", "g", "echo", "--input-file", tmp_path / "missing.txt")
    assert rc == 65 and doc["result"] == "REJECTED_INVALID_PARAMS" and doc["error"]


# -- policies --------------------------------------------------------------------------------


def test_policy_keep_and_replace():
    kmpwm("enqueue", "a", "echo", "--input", "one", check=0)
    doc, rc = kjson("enqueue", "a", "echo", "--input", "two")
    assert rc == 0 and doc["result"] == "SUCCESS" and doc["action"] == "kept" and doc["id"] == "a"
    (t,) = inspect()["tasks"]
    assert t["input"] == "one"
    doc, rc = kjson("enqueue", "a", "echo", "--input", "three", "--policy", "replace")
    assert rc == 0 and doc["action"] == "replaced" and doc["id"] == "a"
    tasks = inspect("--all")["tasks"]
    live = [t for t in tasks if t["state"] in ("ENQUEUED", "BLOCKED", "RUNNING")]
    assert [(t["id"], t["input"]) for t in live] == [("a", "three")]


def test_policy_append_and_append_or_replace():
    kmpwm("enqueue", "a", "echo", check=0)
    doc, rc = kjson("enqueue", "a", "echo", "--policy", "append", "--input", "2")
    assert rc == 0 and doc["result"] == "SUCCESS" and doc["action"] == "appended" and doc["id"] == "a#2"
    doc, _ = kjson("enqueue", "a", "echo", "--policy", "append", "--input", "3", check=0)
    assert doc["id"] == "a#3" and doc["action"] == "appended"
    doc, _ = kjson("enqueue", "a", "echo", "--policy", "append-or-replace", "--input", "4", check=0)
    assert doc["id"] == "a#4" and doc["action"] == "appended"

    tasks = tasks_by_id(inspect("a"))  # one ID covers its ID#n
    assert list(tasks) == ["a", "a#2", "a#3", "a#4"]
    assert tasks["a"]["state"] == "ENQUEUED"
    for i in ("a#2", "a#3", "a#4"):
        assert tasks[i]["state"] == "BLOCKED" and tasks[i]["next_run_at"] is None
    assert tasks["a#3"]["input"] == "3"
    # naming one appended task exactly shows only it
    assert [t["id"] for t in inspect("a#3")["tasks"]] == ["a#3"]

    # the appended tasks run after the one before them finished: all succeed, in order
    run, _ = kjson("run-due", check=0)
    assert [r["id"] for r in run["ran"]][:1] == ["a"]
    done = tasks_by_id(inspect("--all"))
    assert done["a"]["state"] == "SUCCEEDED"


def test_finished_tasks_do_not_count_for_policies():
    # SUCCEEDED
    kmpwm("enqueue", "s", "echo", "--input", "first", check=0)
    kmpwm("run-due", check=0)
    assert tasks_by_id(inspect("--all"))["s"]["state"] == "SUCCEEDED"
    doc, _ = kjson("enqueue", "s", "echo", "--input", "second", "--delay", "1h", check=0)  # keep: nothing unfinished
    assert doc["action"] == "enqueued" and doc["id"] == "s"
    # FAILED
    kmpwm("enqueue", "f", "fail", "--max-attempts", "1", check=0)
    kmpwm("run-due", "--max-tasks", "2", check=None)
    # CANCELLED
    kmpwm("enqueue", "c", "echo", "--delay", "1h", check=0)
    kmpwm("cancel", "c", check=0)
    before = tasks_by_id(inspect("--all"))
    assert before["f"]["state"] == "FAILED" and before["c"]["state"] == "CANCELLED"

    doc, _ = kjson("enqueue", "f", "echo", "--policy", "append-or-replace", check=0)
    assert doc["action"] == "enqueued" and doc["id"] == "f"
    doc, _ = kjson("enqueue", "c", "echo", "--policy", "append", check=0)
    assert doc["action"] == "enqueued" and doc["id"] == "c"
    after = tasks_by_id(inspect())
    assert after["s"]["input"] == "second" and after["s"]["state"] == "ENQUEUED"
    assert after["f"]["worker"] == "echo" and after["f"]["state"] == "ENQUEUED"
    assert after["c"]["state"] == "ENQUEUED"
    assert "c#2" not in after and "f#2" not in after
    # the old run stays in events
    ev, _ = kjson("events", "--task", "s", check=0)
    assert any(e["event"] == "ran" for e in ev["events"])


# -- enqueue --from ---------------------------------------------------------------------------


@pytest.mark.journal_only  # reads the journal's files
def test_enqueue_from_file(tmp_path, home):
    specs = [
        {"id": "j1", "worker": "echo", "input": {"k": [1, 2], "s": "x"}},
        {"id": "j2", "worker": "echo", "window": ["+1h", "+2h"], "tags": ["x", "y"]},
        {"id": "j3", "worker": "echo", "every": "1h", "flex": "5m", "requires_network": True, "input": 42},
        {"id": "j4", "worker": "echo", "delay": "10m", "input": "plain", "policy": "keep", "qos": "low"},
        {"id": "j1", "worker": "echo", "policy": "append", "input": [1, "two", None]},
    ]
    f = tmp_path / "tasks.jsonl"
    f.write_text(
        "\n".join(json.dumps(s) for s in specs[:2]) + "\n\n" + "\n".join(json.dumps(s) for s in specs[2:]) + "\n"
    )
    doc, rc = kjson("enqueue", "--from", f)
    assert rc == 0, doc
    assert [r["id"] for r in doc["results"]] == ["j1", "j2", "j3", "j4", "j1#2"]
    assert all(r["result"] == "SUCCESS" for r in doc["results"])
    assert [r["action"] for r in doc["results"]] == ["enqueued"] * 4 + ["appended"]
    assert enq_records(home) == 1  # one durable append

    tasks = tasks_by_id(inspect())
    assert json.loads(tasks["j1"]["input"]) == {"k": [1, 2], "s": "x"}
    assert tasks["j3"]["input"] == "42"
    assert tasks["j4"]["input"] == "plain"
    assert json.loads(tasks["j1#2"]["input"]) == [1, "two", None]
    assert tasks["j1#2"]["state"] == "BLOCKED"
    assert tasks["j2"]["tags"] == ["x", "y"] and tasks["j2"]["trigger"]["type"] == "windowed"
    assert tasks["j3"]["trigger"]["type"] == "periodic" and tasks["j3"]["trigger"]["flex"] == 300
    assert tasks["j3"]["constraints"]["requires_network"] is True
    assert tasks["j4"]["constraints"]["qos"] == "low"


def test_enqueue_from_stdin():
    lines = "\n".join(
        json.dumps(s)
        for s in [
            {"id": "s1", "worker": "echo", "input": True},
            {"id": "s2", "worker": "sleep", "delay": 60, "tags": ["t"]},
        ]
    )
    doc, rc = kjson("enqueue", "--from", "-", input=lines)
    assert rc == 0 and [r["id"] for r in doc["results"]] == ["s1", "s2"]
    tasks = tasks_by_id(inspect())
    assert tasks["s1"]["input"] == "true"
    assert tasks["s2"]["worker"] == "sleep" and tasks["s2"]["tags"] == ["t"]


@pytest.mark.parametrize(
    "bad_line, where",
    [
        ('{"id": "b2", "worker": "echo"', "middle"),  # malformed JSON
        ('{"id": "b2", "worker": "no-such-worker"}', "last"),  # unknown worker
        ('{"id": "b2", "worker": "echo", "every": "30s"}', "middle"),  # a bad value
        ('{"id": "b2", "worker": "echo", "bogus_key": 1}', "last"),  # an unknown key
    ],
)
def test_enqueue_from_all_or_nothing(home, bad_line, where):
    good = [json.dumps({"id": f"g{i}", "worker": "echo"}) for i in range(3)]
    lines = good[:1] + [bad_line] + good[1:] if where == "middle" else good + [bad_line]
    doc, rc = kjson("enqueue", "--from", "-", input="\n".join(lines) + "\n")
    assert rc == 65
    assert doc["result"] == "REJECTED_INVALID_PARAMS" and doc["error"]
    assert enq_records(home) == 0
    if "no-such-worker" in bad_line and where == "last":
        # the whole batch was rejected: nothing visible
        assert inspect("--all")["tasks"] == []


# -- chains -------------------------------------------------------------------------------


def test_chain_positional_steps_and_flags_apply_to_every_task():
    doc, rc = kjson(
        "chain",
        "--id",
        "sync",
        "echo",
        "echo+sleep+echo",
        "fail",
        "--delay",
        "1h",
        "--requires-network",
        "--tag",
        "T",
        "--max-attempts",
        "2",
    )
    assert rc == 0, doc
    assert doc["result"] == "SUCCESS" and doc["id"] == "sync" and doc["action"] == "enqueued"
    expected = ["sync/1/echo", "sync/2/echo", "sync/2/sleep", "sync/2/echo#2", "sync/3/fail"]
    assert doc["tasks"] == expected

    q = inspect("sync")
    tasks = tasks_by_id(q)
    assert list(tasks) == expected
    steps = {"sync/1/echo": 1, "sync/2/echo": 2, "sync/2/sleep": 2, "sync/2/echo#2": 2, "sync/3/fail": 3}
    for tid, t in tasks.items():
        assert t["chain_id"] == "sync" and t["step"] == steps[tid]
        assert t["state"] == ("ENQUEUED" if steps[tid] == 1 else "BLOCKED")
        assert t["constraints"]["requires_network"] is True
        assert t["constraints"]["max_attempts"] == 2
        assert t["trigger"]["delay"] == 3600
        assert "T" in t["tags"]
        assert t["worker"] == tid.split("/")[2].split("#")[0]
    (c,) = q["chains"]
    assert c["id"] == "sync" and c["state"] == "ENQUEUED" and c["next_step"] == 1
    assert c["steps"] == [["sync/1/echo"], ["sync/2/echo", "sync/2/sleep", "sync/2/echo#2"], ["sync/3/fail"]]
    # the chain's tag covers all its tasks
    doc, _ = kjson("cancel", "--tag", "T", check=0)
    assert sorted(doc["cancelled"]) == sorted(expected)


def test_chain_without_id_gets_one():
    doc, rc = kjson("chain", "echo", "echo")
    assert rc == 0 and doc["result"] == "SUCCESS"
    cid = doc["id"]
    assert isinstance(cid, str) and cid
    assert doc["tasks"] == [f"{cid}/1/echo", f"{cid}/2/echo"]


CHAIN_TOML = """
id = "tf"
steps = [
  [ { worker = "echo", input = "first", requires_network = true } ],
  [ { worker = "echo", input = "a" }, { worker = "sleep", id = "custom-sleep", input = "0.1", timeout = "1m" } ],
]
"""


def test_chain_file_toml(tmp_path):
    f = tmp_path / "chain.toml"
    f.write_text(CHAIN_TOML)
    doc, rc = kjson("chain", "--file", f, "--tag", "ft")
    assert rc == 0, doc
    assert doc["id"] == "tf" and doc["tasks"] == ["tf/1/echo", "tf/2/echo", "custom-sleep"]
    tasks = tasks_by_id(inspect("tf"))
    assert tasks["tf/1/echo"]["input"] == "first"
    assert tasks["tf/1/echo"]["constraints"]["requires_network"] is True
    assert tasks["tf/2/echo"]["constraints"]["requires_network"] is False
    assert tasks["custom-sleep"]["constraints"]["timeout"] == 60
    assert tasks["custom-sleep"]["chain_id"] == "tf" and tasks["custom-sleep"]["step"] == 2
    assert all("ft" in t["tags"] for t in tasks.values())


def test_chain_file_json_and_stdin(tmp_path):
    chain = {"id": "jf", "steps": [[{"worker": "echo", "input": {"n": 1}}], [{"worker": "echo", "input": 7}]]}
    f = tmp_path / "chain.json"
    f.write_text(json.dumps(chain))
    doc, rc = kjson("chain", "--file", f)
    assert rc == 0 and doc["tasks"] == ["jf/1/echo", "jf/2/echo"]
    chain["id"] = "js"
    doc, rc = kjson("chain", "--file", "-", input=json.dumps(chain))
    assert rc == 0 and doc["tasks"] == ["js/1/echo", "js/2/echo"]
    doc, rc = kjson("chain", "--file", "-", input='id = "tt"\nsteps = [[{worker = "echo"}], [{worker = "sleep"}]]\n')
    assert rc == 0 and doc["tasks"] == ["tt/1/echo", "tt/2/sleep"]
    tasks = tasks_by_id(inspect())
    assert json.loads(tasks["jf/1/echo"]["input"]) == {"n": 1}
    assert tasks["js/2/echo"]["input"] == "7"
    assert tasks["js/2/echo"]["state"] == "BLOCKED"


def test_chain_policy_replace_default_and_keep():
    kjson("chain", "--id", "p", "echo", "--delay", "1h", check=0)
    doc, _ = kjson("chain", "--id", "p", "echo", "sleep", "--delay", "1h", check=0)
    assert doc["action"] == "replaced" and doc["tasks"] == ["p/1/echo", "p/2/sleep"]
    doc, _ = kjson("chain", "--id", "p", "--policy", "keep", "fail", "--delay", "1h", check=0)
    assert doc["result"] == "SUCCESS" and doc["action"] == "kept"
    q = inspect("p")
    assert q["chains"][0]["steps"] == [["p/1/echo"], ["p/2/sleep"]]
    live = [t["id"] for t in q["tasks"] if t["state"] in ("ENQUEUED", "BLOCKED")]
    assert live == ["p/1/echo", "p/2/sleep"]


def test_chain_rejections():
    doc, rc = kjson("chain", "--id", "bad", "echo", "nope")
    assert rc == 65 and doc["result"] == "REJECTED_INVALID_PARAMS" and doc["error"]
    doc, rc = kjson("chain", "--id", "bad", "--policy", "append", "echo")
    assert rc == 65 and doc["result"] == "REJECTED_INVALID_PARAMS"
    assert inspect("--all") == {"tasks": [], "chains": [], "paused": False}  # SPEC 11: the queue flag


# -- cancel ---------------------------------------------------------------------------------


def test_cancel_ids_tag_all_idempotent():
    lines = [
        {"id": "a", "worker": "echo", "delay": "1h"},
        {"id": "a", "worker": "echo", "policy": "append"},
        {"id": "a", "worker": "echo", "policy": "append"},
        {"id": "b", "worker": "echo", "delay": "1h", "tags": ["t"]},
        {"id": "c", "worker": "echo", "delay": "1h", "tags": ["t", "u"]},
        {"id": "d", "worker": "echo", "delay": "1h"},
        {"id": "e", "worker": "echo", "delay": "1h"},
    ]
    kmpwm("enqueue", "--from", "-", input="\n".join(json.dumps(x) for x in lines), check=0)
    doc, rc = kjson("cancel", "a#3")  # one appended task, named exactly
    assert rc == 0 and doc["cancelled"] == ["a#3"]
    doc, rc = kjson("cancel", "a")  # ID covers ID#n
    assert rc == 0 and sorted(doc["cancelled"]) == ["a", "a#2"]
    doc, _ = kjson("cancel", "a", check=0)
    assert doc == {"cancelled": []}
    doc, _ = kjson("cancel", "nope", check=0)
    assert doc == {"cancelled": []}
    doc, _ = kjson("cancel", "--tag", "t", check=0)
    assert sorted(doc["cancelled"]) == ["b", "c"]
    doc, _ = kjson("cancel", "d", "nope", check=0)
    assert doc["cancelled"] == ["d"]
    doc, _ = kjson("cancel", "--all", check=0)
    assert doc["cancelled"] == ["e"]
    doc, _ = kjson("cancel", "--all", check=0)
    assert doc == {"cancelled": []}
    assert inspect()["tasks"] == []
    tasks = inspect("--all")["tasks"]
    assert len(tasks) == 7 and all(t["state"] == "CANCELLED" and t["reason"] for t in tasks)


def test_cancel_chain_id_expands_to_unfinished_tasks(tmp_path):
    chain = {
        "id": "ch",
        "steps": [[{"worker": "echo"}], [{"worker": "echo", "delay": "1h"}, {"worker": "sleep", "delay": "1h"}]],
    }
    kmpwm("chain", "--file", "-", input=json.dumps(chain), check=0)
    run, _ = kjson("run-due", check=0)
    assert [r["id"] for r in run["ran"]] == ["ch/1/echo"]
    doc, rc = kjson("cancel", "ch")
    assert rc == 0 and sorted(doc["cancelled"]) == ["ch/2/echo", "ch/2/sleep"]
    q = inspect("ch")
    states = {t["id"]: t["state"] for t in q["tasks"]}
    assert states == {"ch/1/echo": "SUCCEEDED", "ch/2/echo": "CANCELLED", "ch/2/sleep": "CANCELLED"}
    assert q["chains"][0]["state"] == "CANCELLED" and q["chains"][0]["next_step"] is None
    assert kjson("cancel", "ch", check=0)[0] == {"cancelled": []}


def test_cancel_needs_a_target():
    proc = kmpwm("cancel")
    assert proc.returncode == 2 and proc.stderr.strip()


# -- inspect-queue filters ------------------------------------------------------------------


def test_inspect_queue_filters():
    lines = [
        {"id": "done", "worker": "echo"},
        {"id": "later", "worker": "echo", "delay": "1h", "tags": ["x"]},
        {"id": "app", "worker": "echo", "delay": "1h"},
        {"id": "app", "worker": "echo", "policy": "append", "tags": ["x"]},
        {"id": "other", "worker": "echo", "delay": "1h", "tags": ["y"]},
    ]
    kmpwm("enqueue", "--from", "-", input="\n".join(json.dumps(x) for x in lines), check=0)
    kmpwm("run-due", check=0)
    calls = {
        "default": ("inspect-queue", "--json"),
        "all": ("inspect-queue", "--all", "--json"),
        "succeeded": ("inspect-queue", "--state", "succeeded", "--json"),
        "blocked": ("inspect-queue", "--state", "Blocked", "--json"),
        "enqueued": ("inspect-queue", "--state", "ENQUEUED", "--json"),
        "running": ("inspect-queue", "--state", "running", "--json"),
        "tag": ("inspect-queue", "--tag", "x", "--json"),
        "one": ("inspect-queue", "app", "--json"),
        "tag-all": ("inspect-queue", "--tag", "x", "--all", "--json"),
    }
    procs = dict(zip(calls, parallel([(c, {}) for c in calls.values()])))
    ids = {}
    for name, proc in procs.items():
        assert proc.returncode == 0, (name, proc.stderr)
        ids[name] = [t["id"] for t in json.loads(proc.stdout)["tasks"]]
    assert ids["default"] == ["later", "app", "app#2", "other"]
    assert ids["all"] == ["done", "later", "app", "app#2", "other"]
    assert ids["succeeded"] == ["done"]
    assert ids["blocked"] == ["app#2"]
    assert ids["enqueued"] == ["later", "app", "other"]
    assert ids["running"] == []
    assert ids["tag"] == ["later", "app#2"]
    assert ids["one"] == ["app", "app#2"]
    assert ids["tag-all"] == ["later", "app#2"]
    doc, rc = kjson("inspect-queue", "--state", "bogus")
    assert rc == 65 and "error" in doc


def test_inspect_state_running_while_a_task_runs():
    kmpwm("enqueue", "slow", "sleep", "--input", "2", check=0)
    runner = subprocess.Popen(
        [sys.executable, "-m", "kmpwm", "run-due", "--json"],
        env=kmpwm_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not seen:
            seen = inspect("--state", "RuNnInG")["tasks"]
        assert [t["id"] for t in seen] == ["slow"]
        assert seen[0]["state"] == "RUNNING"
    finally:
        out, err = runner.communicate(timeout=30)
    assert runner.returncode == 0, err
    assert "Traceback" not in err
    assert json.loads(out)["ran"][0]["status"] == "SUCCESS"
    (t,) = inspect("--all")["tasks"]
    assert t["state"] == "SUCCEEDED" and t["attempts"] == 1
    assert t["last_result"]["status"] == "SUCCESS"
    assert set(t["last_result"]) >= {"status", "message", "data"}


# -- --json everywhere ----------------------------------------------------------------------


def test_json_everywhere_is_one_document(tmp_path):
    kmpwm("enqueue", "a", "echo", "--delay", "1h", check=0)
    commands = [
        ("enqueue", "b", "echo"),
        ("chain", "--id", "cj", "echo"),
        ("inspect-queue",),
        ("inspect-queue", "--all"),
        ("explain", "a"),
        ("run-due", "--dry-run"),
        ("run-due",),
        ("events",),
        ("workers",),
        ("doctor",),
        ("compact",),
        ("cancel", "a"),
        ("schedule", "status", "--print"),
    ]
    docs = {}
    for args, proc in zip(commands, parallel([((*a, "--json"), {}) for a in commands])):
        assert proc.returncode == 0, (args, proc.stderr)
        try:
            docs[args] = json.loads(proc.stdout)  # exactly one JSON document
        except ValueError:
            raise AssertionError(f"{args}: stdout is not one JSON document: {proc.stdout!r}") from None
        assert isinstance(docs[args], dict), args
    assert set(docs[("run-due",)]) >= {"ran", "expired", "skipped"}
    names = json.dumps(docs[("workers",)])
    for w in ("echo", "sleep", "fail"):
        assert w in names


def test_json_error_document_for_other_failures():
    doc, rc = kjson("cancel")  # a usage error
    assert rc == 2 and doc["exit_code"] == 2 and doc["error"]


# -- exit codes for bad input ---------------------------------------------------------------


REJECTIONS = [
    (("enqueue", "x", "no-such-worker"), 65),
    (("enqueue", "x", "echo", "--every", "30s"), 65),
    (("enqueue", "x", "echo", "--window", "+2h", "+1h"), 65),
    (("enqueue", "x", "echo", "--delay", "5 parsecs"), 65),
    (("enqueue", "x", "echo", "--delay", "-5s"), 65),
    (("enqueue", "x", "echo", "--at", "tomorrowish"), 65),
    (("enqueue", "x", "echo", "--every", "1h", "--at", "+1h"), 65),
    (("enqueue", "x", "echo", "--max-attempts", "zero"), 65),
    (("enqueue", "x", "echo", "--qos", "urgent"), 65),
    (("enqueue", "x#2", "echo"), 65),
    (("enqueue", "x", "echo", "--input", "a", "--input-file", "/etc/hostname"), 65),
    (("enqueue", "x", "echo", "--window", "+1h", "nonsense"), 65),
    (("enqueue", "x", "echo", "--at", "+1h", "--exact-behavior", "error"), 69),
    (("enqueue", "x", "echo", "--network-type", "unmetered"), 69),
]


def test_rejected_enqueue_exit_codes_and_json(home):
    """SPEC 7/9: a bad value is 65, an unobservable constraint 69; --json still prints
    {"result": ..., "error": ...}; nothing is written."""
    cases = [
        (args, code) for args, code in REJECTIONS if not (code == 69 and "--network-type" in args and _have_nmcli())
    ]
    procs = parallel([((*args, "--json"), {}) for args, _ in cases])
    wrong = []
    for (args, code), proc in zip(cases, procs):
        try:
            doc = json.loads(proc.stdout)
        except ValueError:
            doc = None
        want = "REJECTED_INVALID_PARAMS" if code == 65 else "REJECTED_OS_POLICY"
        if (
            proc.returncode != code
            or not isinstance(doc, dict)
            or doc.get("result") != want
            or not isinstance(doc.get("error"), str)
            or not doc["error"]
        ):
            wrong.append(f"{' '.join(args)}: exit {proc.returncode} (want {code}), stdout {proc.stdout.strip()!r}")
    assert not wrong, "\n".join(wrong)
    assert enq_records(home) == 0


def _have_nmcli() -> bool:
    import shutil

    return sys.platform.startswith("linux") and shutil.which("nmcli") is not None


def test_rejection_without_json_is_one_clear_line_on_stderr():
    proc = kmpwm("enqueue", "x", "echo", "--every", "30s")
    assert proc.returncode == 65
    assert proc.stdout == ""
    assert 1 <= len(proc.stderr.strip().splitlines()) <= 2


def test_network_type_with_assume_is_accepted():
    doc, rc = kjson("enqueue", "x", "echo", "--network-type", "unmetered", env={"KMPWM_ASSUME": "metered=off"})
    assert rc == 0 and doc["result"] == "SUCCESS"
    (t,) = inspect()["tasks"]
    assert t["constraints"]["network_type"] == "unmetered"


USAGE_ERRORS = [
    ("enqueue", "x", "echo", "--no-such-option"),
    ("enqueue", "x", "echo", "--delay"),
    ("enqueue", "x"),
    ("no-such-command",),
    ("inspect-queue", "--state"),
]


def test_usage_errors_exit_2():
    wrong = [
        f"{' '.join(args)}: exit {p.returncode}, stderr {p.stderr!r}"
        for args, p in zip(USAGE_ERRORS, parallel([(a, {}) for a in USAGE_ERRORS]))
        if p.returncode != 2 or not p.stderr.strip()
    ]
    assert not wrong, "\n".join(wrong)


# -- files and permissions ------------------------------------------------------------------


EVERY_COMMAND = [
    ("enqueue", "a", "echo"),
    ("enqueue", "--from", "-"),
    ("chain", "echo"),
    ("cancel", "--all"),
    ("inspect-queue",),
    ("run-due",),
    ("simulate-expire", "--all"),
    ("events",),
    ("explain", "a"),
    ("workers",),
    ("compact",),
    ("doctor",),
    ("doctor", "--repair"),
]


def _all_refused(commands=EVERY_COMMAND, code=77):
    calls = [(args, {"input": '{"id": "z", "worker": "echo"}\n'}) for args in commands]
    wrong = [
        f"{' '.join(args)}: exit {proc.returncode}, stderr {proc.stderr.strip()!r}"
        for args, proc in zip(commands, parallel(calls))
        if proc.returncode != code or not proc.stderr.strip()
    ]
    assert not wrong, f"expected exit {code} from every command:\n" + "\n".join(wrong)


@pytest.mark.journal_only  # reads the journal's files
def test_group_writable_journal_dir_is_refused(home):
    kmpwm("enqueue", "a", "echo", "--delay", "1h", check=0)
    os.chmod(home / "journal", 0o770)
    _all_refused()
    proc = kmpwm("inspect-queue")
    assert "journal" in proc.stderr and ("writable" in proc.stderr or "permission" in proc.stderr.lower())
    os.chmod(home / "journal", 0o700)
    assert [t["id"] for t in inspect()["tasks"]] == ["a"]


def test_world_writable_config_is_refused(home):
    kmpwm("enqueue", "a", "echo", "--delay", "1h", check=0)
    cfg = home / "config.toml"
    cfg.write_text("")
    os.chmod(cfg, 0o666)
    _all_refused([("enqueue", "a", "echo"), ("inspect-queue",), ("run-due",), ("workers",)])
    proc = kmpwm("inspect-queue", "--json")
    assert proc.returncode == 77 and "config" in proc.stderr
    assert json.loads(proc.stdout)["exit_code"] == 77


@pytest.mark.journal_only  # reads the journal's files
def test_journal_dir_owned_by_another_user_is_refused(home):
    if os.getuid() != 0:
        pytest.skip("needs root to give a directory away")
    kmpwm("enqueue", "a", "echo", "--delay", "1h", check=0)
    os.chown(home / "journal", 65534, -1)
    try:
        proc = kmpwm("inspect-queue")
        assert proc.returncode == 77 and "owned" in proc.stderr
        assert kmpwm("enqueue", "b", "echo").returncode == 77
    finally:
        os.chown(home / "journal", 0, -1)


def test_world_writable_home_is_refused(home):
    os.chmod(home, 0o777)
    try:
        proc = kmpwm("enqueue", "a", "echo")
        assert proc.returncode == 77
    finally:
        os.chmod(home, 0o700)
    assert not (home / "journal" / "journal.log").exists()


@pytest.mark.journal_only  # reads the journal's files
def test_home_option_wins_over_env(tmp_path, home):
    other = tmp_path / "other"
    doc, rc = kjson("--home", other, "enqueue", "h", "echo")
    assert rc == 0 and doc["result"] == "SUCCESS"
    assert (other / "journal" / "journal.log").exists()
    assert not (home / "journal" / "journal.log").exists()
    assert inspect()["tasks"] == []
    doc, _ = kjson("--home", other, "inspect-queue", check=0)
    assert [t["id"] for t in doc["tasks"]] == ["h"]
    # without KMPWM_HOME at all, --home still decides
    doc, _ = kjson("--home", other, "inspect-queue", env={"KMPWM_HOME": None}, check=0)
    assert [t["id"] for t in doc["tasks"]] == ["h"]


@pytest.mark.journal_only  # reads the journal's files
def test_files_0600_and_dirs_0700_after_first_enqueue(tmp_path):
    fresh = tmp_path / "fresh-home"  # kmpwm creates it
    kmpwm("enqueue", "a", "echo", env={"KMPWM_HOME": str(fresh)}, check=0)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    found = 0
    for root, dirs, files in os.walk(fresh):
        for d in dirs:
            assert stat.S_IMODE((Path(root) / d).stat().st_mode) == 0o700, Path(root) / d
        for f in files:
            found += 1
            assert stat.S_IMODE((Path(root) / f).stat().st_mode) == 0o600, Path(root) / f
    assert found and (fresh / "journal" / "journal.log").is_file()


# -- concurrency ----------------------------------------------------------------------------


CONCURRENT_SCRIPT = textwrap.dedent("""
    import sys
    from kmpwm.cli.app import main
    who = sys.argv[1]
    for n in range(int(sys.argv[2])):
        rc = main(["enqueue", f"{who}-{n}", "echo", "--delay", "1h", "--tag", who])
        if rc != 0:
            sys.exit(rc)
""")


@pytest.mark.journal_only  # reads the journal's files
def test_concurrent_enqueuers_lose_nothing(home):
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_SCRIPT, f"p{i}", "50"],
            env=kmpwm_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert "Traceback" not in err
    ids = {t["id"] for t in inspect()["tasks"]}
    assert ids == {f"p{i}-{n}" for i in range(4) for n in range(50)}
    doc, rc = kjson("doctor")
    assert rc == 0 and doc["healthy"] is True
    from kmpwm.storage.journal import decode

    lines = journal_lines(home)
    assert all(decode(line) is not None for line in lines)
    assert enq_records(home) == 200


# -- the Python API -------------------------------------------------------------------------


@pytest.mark.journal_only  # reads the journal's files
def test_python_api_enqueue_chain_batch(home):
    from kmpwm import Constraints, Scheduler, ScheduleResult, TaskRequest
    from kmpwm.core import triggers

    s = Scheduler(home)
    assert s.enqueue("p1", None, "echo") == ScheduleResult.SUCCESS
    assert (
        s.enqueue("p2", triggers.Periodic(timedelta(hours=1)), "echo", constraints=Constraints(requires_network=True))
        == ScheduleResult.SUCCESS
    )
    assert s.enqueue("p3", triggers.OneTime(60), "echo", input={"a": 1}) is ScheduleResult.SUCCESS
    assert s.enqueue("p4", None, "no-such-worker") == ScheduleResult.REJECTED_INVALID_PARAMS
    assert isinstance(ScheduleResult.SUCCESS, str) and ScheduleResult.SUCCESS == "SUCCESS"

    outcome = (
        s.begin_with(TaskRequest("echo"))
        .then([TaskRequest("echo"), TaskRequest("sleep")])
        .with_id("api-chain")
        .enqueue()
    )
    assert outcome.result == ScheduleResult.SUCCESS
    assert outcome.tasks == ["api-chain/1/echo", "api-chain/2/echo", "api-chain/2/sleep"]

    before = len(journal_lines(home))
    with s.batch():
        for n in range(25):
            s.enqueue(f"b{n}", None, "echo")
        assert s.enqueue("b-bad", None, "no-such-worker") == ScheduleResult.REJECTED_INVALID_PARAMS
        s.begin_with([TaskRequest("echo"), TaskRequest("echo")]).with_id("batch-chain").enqueue()
    assert len(journal_lines(home)) == before + 1

    tasks = tasks_by_id(inspect())
    assert {f"b{n}" for n in range(25)} <= set(tasks)
    assert {"p1", "p2", "p3", "api-chain/1/echo"} <= set(tasks) and "p4" not in tasks
    assert tasks["p2"]["trigger"]["every"] == 3600 and tasks["p2"]["constraints"]["requires_network"] is True
    assert json.loads(tasks["p3"]["input"]) == {"a": 1}
    assert tasks["api-chain/2/sleep"]["state"] == "BLOCKED"
    assert {"batch-chain/1/echo", "batch-chain/1/echo#2"} <= set(tasks) and "b-bad" not in tasks

    assert sorted(s.cancel("p1")) == ["p1"]
    assert s.cancel("p1") == []
    assert "b0" in s.cancel_all()


def test_entry_point_exit_runs_atexit_handlers_and_keeps_exit_codes(tmp_path):
    """kmpwm.cli.entry pauses the collector while the CLI is imported and freezes what is alive before
    exit; nothing else about the exit may change: atexit handlers run, output is flushed, the
    command's exit code is the process's."""
    import subprocess
    import sys

    marker = tmp_path / "atexit-ran"
    code = (
        "import atexit, sys\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('yes'))\n"
        "sys.argv = ['kmpwm'] + sys.argv[1:]\n"
        "from kmpwm.cli.entry import run\nrun()\n"
    )
    ok = subprocess.run(
        [sys.executable, "-c", code, "enqueue", "e1", "echo", "--json"], capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0 and json.loads(ok.stdout)["id"] == "e1", ok.stderr
    assert marker.read_text() == "yes"
    marker.unlink()
    bad = subprocess.run(
        [sys.executable, "-c", code, "enqueue", "e2", "no-such-worker"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 65 and "unknown worker" in bad.stderr
    assert marker.read_text() == "yes"
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.name == "kmpwm"}
    assert scripts == {"kmpwm": "kmpwm.cli.entry:run"}


def test_entry_point_leaves_the_collector_as_it_found_it(monkeypatch):
    import gc

    from kmpwm.cli import entry

    monkeypatch.setattr(sys, "argv", ["kmpwm", "--version"])
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            with pytest.raises(SystemExit) as exc:
                entry.run()
            assert exc.value.code == 0
            assert gc.isenabled() is enabled
            assert gc.get_freeze_count() > 0
        finally:
            gc.unfreeze()
            gc.enable()


def test_an_io_error_reaching_the_top_says_so_in_one_line(capsys):
    """An OSError no command turned into a message (the file system refused a write): one line,
    exit 74, naming the file (this text once read "I/Opt error" after a rename)."""
    import errno

    from kmpwm.cli import app

    code = app._io_failure(OSError(errno.EIO, "Input/output error", "/home/u/.kmpwm/journal/journal.log"), False)
    err = capsys.readouterr().err
    assert code == 74
    assert err.startswith("kmpwm: error: I/O error: Input/output error (/home/u/.kmpwm/journal/journal.log)"), err


@pytest.mark.parametrize(
    "spec, says",
    [
        ({"id": "a", "worker": "echo", "tags": 5, "tag": "x"}, "invalid tags"),  # was exit 70 (TypeError)
        ({"id": "a", "worker": "echo", "tags": {"k": 1}, "tag": "x"}, "invalid tags"),  # was accepted
        ({"id": "a", "worker": "echo", "tag": ["x", 1]}, "invalid tags"),
        ({"id": "a", "worker": "echo", "input": json.loads("[" * 70 + "]" * 70)}, "nested deeper than 64"),
    ],
)
def test_a_bad_spec_line_is_refused_with_its_line_number(home, tmp_path, spec, says):
    path = tmp_path / "specs.jsonl"
    path.write_text(json.dumps({"id": "ok", "worker": "echo"}) + "\n" + json.dumps(spec) + "\n")
    r = kmpwm("enqueue", "--from", path, check=65)
    assert r.stderr.startswith("kmpwm: error: line 2: ") and says in r.stderr.splitlines()[0], r.stderr
    assert kjson("inspect-queue", "--all")[0]["tasks"] == []  # nothing of the file is enqueued
