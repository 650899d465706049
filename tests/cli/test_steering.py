"""Steering your work (SPEC section 11): pause/resume, retry, wait, run-now and --policy update,
through the CLI in real subprocesses (and real concurrent processes for the races), plus the
Python API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from helpers import jdoc, kjson, kmpwm, kmpwm_env, tasks_by_id

pytestmark = pytest.mark.both_stores(long=True)  # PostgreSQL's side runs in scripts/long-tier


def queue(*args) -> dict:
    return tasks_by_id(jdoc("inspect-queue", "--all", *args))


def events(task_id: str | None = None) -> list[dict]:
    return jdoc("events", *(["--task", task_id] if task_id else []))["events"]


def started(task_id: str) -> int:
    return sum(1 for e in events(task_id) if e["event"] == "started" and e["task"] == task_id)


def write_config(home: Path, workers: dict[str, dict]) -> None:
    lines = []
    for name, spec in workers.items():
        lines.append(f"[workers.{name}]")
        for key, value in spec.items():
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    path = home / "config.toml"
    path.write_text("\n".join(lines))
    os.chmod(path, 0o600)


def spawn(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kmpwm", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=kmpwm_env(kw.get("env")),
    )


# -- pause / resume -------------------------------------------------------------------------


def test_pause_skips_with_reason_explains_and_resume_runs():
    kmpwm("enqueue", "a", "echo", check=0)
    kmpwm("enqueue", "b", "echo", check=0)
    assert jdoc("pause", "a") == {"paused": ["a"]}
    t = queue()["a"]
    assert t["paused"] is True and t["paused_until"] is None and queue()["b"]["paused"] is False
    doc = jdoc("run-due")
    assert [r["id"] for r in doc["ran"]] == ["b"]
    assert doc["skipped"] == [{"id": "a", "reason": "paused"}]
    ex = jdoc("explain", "a")
    assert ex["code"] == "paused" and "until resumed" in ex["reason"]
    assert jdoc("resume", "a") == {"resumed": ["a"]}
    assert jdoc("resume", "a") == {"resumed": []}  # idempotent
    assert [r["id"] for r in jdoc("run-due")["ran"]] == ["a"]
    kinds = [e["event"] for e in events("a")]
    assert "paused" in kinds and "resumed" in kinds
    assert any(e["event"] == "paused" and "pid" in e["by"] for e in events("a"))  # who paused it


def test_pause_until_ends_by_itself():
    kmpwm("enqueue", "a", "echo", check=0)
    until = time.time() + 3600
    doc = jdoc("pause", "a", "--until", f"@{until:.0f}")
    assert doc == {"paused": ["a"]}
    assert queue()["a"]["paused_until"] is not None
    assert jdoc("run-due")["skipped"] == [{"id": "a", "reason": "paused"}]
    assert "until" in jdoc("explain", "a")["reason"]
    later = jdoc("run-due", faketime="+2h")  # the pause ended: it runs
    assert [r["id"] for r in later["ran"]] == ["a"]


def test_pause_all_is_a_queue_flag_covering_later_tasks():
    kmpwm("enqueue", "a", "echo", "--tag", "t", check=0)
    assert jdoc("pause", "--all") == {"paused": []}
    assert jdoc("inspect-queue")["paused"] is True
    kmpwm("enqueue", "late", "echo", check=0)  # enqueued after the pause: held too
    doc = jdoc("run-due")
    assert doc["ran"] == [] and {s["id"] for s in doc["skipped"]} == {"a", "late"}
    assert all(s["reason"] == "paused" for s in doc["skipped"])
    assert "queue is paused" in jdoc("explain", "late")["reason"]
    kmpwm("pause", "a", check=0)  # paused one by one as well
    assert jdoc("resume", "--all") == {"resumed": ["a"]}
    assert jdoc("inspect-queue")["paused"] is False
    assert {r["id"] for r in jdoc("run-due")["ran"]} == {"a", "late"}


def test_pause_all_survives_compaction():
    kmpwm("enqueue", "a", "echo", check=0)
    kmpwm("pause", "--all", check=0)
    kmpwm("compact", check=0)
    assert jdoc("inspect-queue")["paused"] is True
    assert jdoc("run-due")["ran"] == []


def test_pause_by_tag_and_chain_id():
    kmpwm("enqueue", "a", "echo", "--tag", "net", check=0)
    kmpwm("enqueue", "b", "echo", check=0)
    kmpwm("chain", "--id", "c", "echo", "echo", check=0)
    assert jdoc("pause", "--tag", "net") == {"paused": ["a"]}
    assert jdoc("pause", "c") == {"paused": ["c/1/echo", "c/2/echo"]}
    assert [r["id"] for r in jdoc("run-due")["ran"]] == ["b"]
    assert jdoc("resume", "--tag", "net") == {"resumed": ["a"]}
    assert jdoc("pause", "nothing-here") == {"paused": []}


def test_resume_coalesces_missed_occurrences_of_a_repeating_task():
    kmpwm("enqueue", "p", "echo", "--every", "1m", check=0)
    assert [r["id"] for r in jdoc("run-due")["ran"]] == ["p"]
    kmpwm("pause", "p", check=0)
    assert jdoc("run-due", faketime="+10m")["skipped"] == [{"id": "p", "reason": "paused"}]
    kmpwm("resume", "p", check=0)
    ran = jdoc("run-due", faketime="+10m")["ran"]
    assert [r["id"] for r in ran] == ["p"]  # ten missed periods: one run
    assert queue()["p"]["attempts"] == 2


def test_a_running_task_finishes_its_run_when_paused():
    kmpwm("enqueue", "s", "sleep", "--input", "2", check=0)
    run = spawn("run-due", "--json")
    for _ in range(200):
        if queue()["s"]["state"] == "RUNNING":
            break
        time.sleep(0.05)
    assert jdoc("pause", "s") == {"paused": ["s"]}
    out, _ = run.communicate(timeout=60)
    assert run.returncode == 0
    assert [r["status"] for r in orjson.loads(out)["ran"]] == ["SUCCESS"]
    assert queue()["s"]["state"] == "SUCCEEDED"


def test_pause_usage_errors():
    assert kmpwm("pause").returncode == 2
    assert kmpwm("pause", "a", "--all").returncode == 2
    doc, rc = kjson("pause", "a", "--until", "yesterday-ish")
    assert rc == 65 and doc["exit_code"] == 65


# -- retry ----------------------------------------------------------------------------------


def test_retry_a_failed_task_same_id_attempts_back_to_zero():
    kmpwm("enqueue", "f", "fail", "--max-attempts", "1", check=0)
    jdoc("run-due")
    assert queue()["f"]["state"] == "FAILED"
    assert jdoc("retry", "f") == {"retried": ["f"]}
    t = queue()["f"]
    assert (t["state"], t["attempts"], t["reason"]) == ("ENQUEUED", 0, None)
    assert jdoc("retry", "f") == {"retried": []}  # unfinished tasks are left alone
    jdoc("run-due")
    assert queue()["f"]["attempts"] == 1
    assert any(e["event"] == "retried" for e in events("f"))


def test_retry_resumes_a_chain_at_the_failed_step():
    kmpwm("chain", "--id", "c", "echo", "fail", "echo", check=0)
    jdoc("run-due")
    assert jdoc("inspect-queue", "c")["chains"][0]["state"] == "FAILED"
    assert jdoc("retry", "c/2/fail") == {"retried": ["c/2/fail", "c/3/echo"]}
    q = queue()
    assert [q[i]["state"] for i in ("c/1/echo", "c/2/fail", "c/3/echo")] == ["SUCCEEDED", "ENQUEUED", "BLOCKED"]
    chain = jdoc("inspect-queue", "c")["chains"][0]
    assert chain["state"] != "FAILED" and chain["next_step"] == 2
    jdoc("run-due")
    assert started("c/1/echo") == 1  # the step that succeeded never runs again


def test_retry_a_chain_by_id_then_it_finishes(home):
    write_config(home, {"once": {"command": ["sh", "-c", f"test -e {home}/ok"]}})
    kmpwm("chain", "--id", "c", "echo", "once", "echo", check=0)
    jdoc("run-due")
    assert queue()["c/2/once"]["state"] == "FAILED"
    (home / "ok").touch()
    assert jdoc("retry", "c") == {"retried": ["c/2/once", "c/3/echo"]}
    jdoc("run-due")
    assert jdoc("inspect-queue", "c")["chains"][0]["state"] == "SUCCEEDED"
    assert started("c/1/echo") == 1 and started("c/2/once") == 2 and started("c/3/echo") == 1


def test_retry_failed_and_tag():
    kmpwm("enqueue", "f", "fail", "--max-attempts", "1", "--tag", "t", check=0)
    kmpwm("enqueue", "x", "echo", "--delay", "1h", "--tag", "t", check=0)
    kmpwm("cancel", "x", check=0)
    jdoc("run-due")
    assert jdoc("retry", "--failed") == {"retried": ["f"]}  # not the cancelled one
    jdoc("run-due")
    assert jdoc("retry", "--tag", "t") == {"retried": ["f", "x"]}
    assert kmpwm("retry").returncode == 2


def test_retry_of_history_after_compaction_and_snapshot(home):
    """Finished work lives in history.snap, apart from the hot state run-due reads: the retry
    record carries what it revives, so every reader agrees, snapshot or not."""
    kmpwm("chain", "--id", "c", "echo", "fail", "echo", check=0)
    jdoc("run-due")
    kmpwm("compact", check=0)
    assert jdoc("retry", "c") == {"retried": ["c/2/fail", "c/3/echo"]}
    seen = jdoc("inspect-queue", "--all")
    hot = jdoc("inspect-queue")
    assert {t["id"]: t["state"] for t in hot["tasks"]} == {"c/2/fail": "ENQUEUED", "c/3/echo": "BLOCKED"}
    for name in ("state.snap", "history.snap"):
        (home / "journal" / name).unlink(missing_ok=True)
    assert jdoc("inspect-queue", "--all") == seen  # the journal alone says the same
    jdoc("run-due")
    assert started("c/1/echo") == 1


# -- wait -----------------------------------------------------------------------------------


def test_wait_exit_codes_and_json():
    kmpwm("enqueue", "ok", "echo", check=0)
    kmpwm("enqueue", "bad", "fail", "--max-attempts", "1", check=0)
    jdoc("run-due")
    doc, rc = kjson("wait", "ok")
    assert rc == 0 and doc["timed_out"] is False
    assert doc["tasks"][0]["id"] == "ok" and doc["tasks"][0]["state"] == "SUCCEEDED"
    assert doc["tasks"][0]["last_result"]["status"] == "SUCCESS"
    assert kjson("wait", "ok", "bad")[1] == 1
    kmpwm("enqueue", "later", "echo", "--delay", "1h", check=0)
    doc, rc = kjson("wait", "later", "--timeout", "300ms")
    assert rc == 75 and doc["timed_out"] is True
    doc, rc = kjson("wait", "nope")
    assert rc == 65 and doc["exit_code"] == 65 and "error" in doc
    assert kmpwm("wait").returncode == 2


def test_wait_returns_when_a_concurrent_run_due_finishes_it():
    kmpwm("enqueue", "a", "echo", "--tag", "w", check=0)
    kmpwm("chain", "--id", "c", "echo", "echo", "--tag", "w", check=0)
    waiter = spawn("wait", "--tag", "w", "--json", "--timeout", "60s")
    time.sleep(0.3)
    assert waiter.poll() is None  # still waiting: nothing ran yet
    jdoc("run-due")
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, err
    doc = orjson.loads(out)
    assert {t["id"] for t in doc["tasks"]} == {"a", "c/1/echo", "c/2/echo"} and not doc["timed_out"]


def test_wait_sees_backoff_retries_through_to_the_final_failure(home):
    write_config(home, {"flaky": {"command": ["sh", "-c", "exit 75"]}})
    kmpwm("enqueue", "r", "flaky", "--max-attempts", "2", "--backoff-delay", "1s", check=0)
    waiter = spawn("wait", "r", "--json", "--timeout", "60s")
    jdoc("run-due")
    assert queue()["r"]["state"] == "ENQUEUED"  # retried by its backoff: not finished
    time.sleep(1.2)
    jdoc("run-due")
    out, _ = waiter.communicate(timeout=60)
    assert waiter.returncode == 1
    assert orjson.loads(out)["tasks"][0]["state"] == "FAILED"


def test_wait_on_a_repeating_task_counts_its_next_run():
    kmpwm("enqueue", "p", "echo", "--every", "1h", check=0)
    jdoc("run-due")  # its first run, before wait began
    doc, rc = kjson("wait", "p", "--timeout", "300ms")
    assert rc == 75  # a run from before does not count
    waiter = spawn("wait", "p", "--json", "--timeout", "60s")
    time.sleep(0.3)
    jdoc("run-now", "p")
    out, _ = waiter.communicate(timeout=60)
    assert waiter.returncode == 0
    assert orjson.loads(out)["tasks"][0]["state"] == "ENQUEUED"


# -- run-now --------------------------------------------------------------------------------


def test_run_now_a_future_task_and_a_repeating_one_keeps_its_schedule():
    kmpwm("enqueue", "later", "echo", "--delay", "2h", check=0)
    kmpwm("enqueue", "p", "echo", "--every", "1h", "--delay", "30m", check=0)
    before = queue()["p"]["next_run_at"]
    doc = jdoc("run-now", "later", "p")
    assert {r["id"]: r["status"] for r in doc["ran"]} == {"later": "SUCCESS", "p": "SUCCESS"}
    q = queue()
    assert q["later"]["state"] == "SUCCEEDED"
    assert q["p"]["next_run_at"] == before and q["p"]["attempts"] == 1


def test_run_now_chain_runs_its_steps_and_stops_at_a_failure():
    kmpwm("chain", "--id", "ok", "echo", "echo+echo", "echo", "--delay", "1h", check=0)
    doc = jdoc("run-now", "ok")
    assert len(doc["ran"]) == 4 and doc["skipped"] == []
    kmpwm("chain", "--id", "bad", "echo", "fail", "echo", check=0)
    doc, rc = kjson("run-now", "bad")
    assert rc == 1
    assert [r["id"] for r in doc["ran"]] == ["bad/1/echo", "bad/2/fail"]
    assert queue()["bad/3/echo"]["reason"] == "upstream failed"


def test_run_now_skips_blocked_and_unmet_constraints():
    kmpwm("chain", "--id", "c", "echo", "echo", check=0)
    doc, rc = kjson("run-now", "c/2/echo")
    assert rc == 1 and doc["ran"] == [] and doc["skipped"][0]["id"] == "c/2/echo"
    assert doc["skipped"][0]["reason"].startswith("blocked")
    kmpwm("enqueue", "net", "echo", "--requires-network", env={"KMPWM_ASSUME": "network=off"}, check=0)
    doc, rc = kjson("run-now", "net", env={"KMPWM_ASSUME": "network=off"})
    assert rc == 1 and doc["skipped"][0]["id"] == "net"
    doc, rc = kjson("run-now", "net", "--ignore-constraints", env={"KMPWM_ASSUME": "network=off"})
    assert rc == 0 and doc["ran"][0]["id"] == "net"
    assert kjson("run-now", "nothing")[1] == 65


def test_run_now_runs_a_paused_task_but_run_due_does_not():
    kmpwm("enqueue", "a", "echo", check=0)
    kmpwm("pause", "--all", check=0)
    assert jdoc("run-due")["ran"] == []
    assert [r["id"] for r in jdoc("run-now", "a")["ran"]] == ["a"]


# -- --policy update ------------------------------------------------------------------------


def test_update_keeps_id_attempts_and_grid():
    kmpwm("enqueue", "p", "echo", "--every", "1h", "--input", "old", check=0)
    jdoc("run-due")
    before = queue()["p"]
    doc = jdoc("enqueue", "p", "echo", "--every", "1h", "--input", "new", "--tag", "x", "--policy", "update")
    assert doc["action"] == "updated" and doc["id"] == "p" and doc["next_run_at"] == before["next_run_at"]
    t = queue()["p"]
    assert (t["attempts"], t["next_run_at"], t["input"], t["tags"]) == (1, before["next_run_at"], "new", ["x"])
    doc = jdoc("enqueue", "p", "echo", "--every", "2h", "--delay", "5m", "--policy", "update")
    assert doc["action"] == "updated" and doc["next_run_at"] != before["next_run_at"]
    assert queue()["p"]["trigger"]["type"] == "periodic" and len(queue()) == 1  # exactly one task
    assert any(e["event"] == "updated" and "input" in e["changed"] and "pid" in e["by"] for e in events("p"))
    doc = jdoc("enqueue", "fresh", "echo", "--policy", "update")
    assert doc["action"] == "enqueued"


def test_update_from_jsonl():
    kmpwm("enqueue", "a", "echo", "--delay", "1h", check=0)
    line = json.dumps({"id": "a", "worker": "echo", "input": "v2", "delay": "1h", "policy": "update"})
    doc = jdoc("enqueue", "--from", "-", input=line + "\n")
    assert doc["results"][0]["action"] == "updated"
    assert queue()["a"]["input"] == "v2"


def test_update_while_running_finishes_with_the_old_definition(home):
    kmpwm("enqueue", "s", "sleep", "--input", "1.5", check=0)
    run = spawn("run-due", "--json")
    for _ in range(200):
        if queue()["s"]["state"] == "RUNNING":
            break
        time.sleep(0.05)
    doc = jdoc("enqueue", "s", "echo", "--input", "new", "--policy", "update")
    assert doc["action"] == "updated"
    out, _ = run.communicate(timeout=60)
    ran = orjson.loads(out)["ran"]
    assert ran[0]["worker"] == "sleep" and ran[0]["status"] == "SUCCESS"  # the old definition
    assert queue()["s"]["worker"] == "echo"


# -- races between real processes ----------------------------------------------------------


def test_retry_racing_run_due_never_runs_a_step_twice(home):
    write_config(home, {"flip": {"command": ["sh", "-c", f"test -e {home}/ok"]}})
    kmpwm("chain", "--id", "c", "echo", "flip", "echo", check=0)
    jdoc("run-due")
    (home / "ok").touch()
    procs = []
    for _ in range(3):
        procs.append(spawn("retry", "c", "--json"))
        procs.append(spawn("run-due", "--json"))
    for p in procs:
        p.communicate(timeout=120)
        assert p.returncode == 0
    jdoc("run-due")
    assert jdoc("inspect-queue", "c")["chains"][0]["state"] == "SUCCEEDED"
    assert started("c/1/echo") == 1 and started("c/3/echo") == 1
    assert started("c/2/flip") == 2  # the failed run, then exactly one retried run


def test_resume_racing_run_dues_never_runs_a_step_twice():
    kmpwm("chain", "--id", "c", "echo", "echo+echo", "echo", check=0)
    kmpwm("enqueue", "solo", "echo", check=0)
    kmpwm("pause", "c", "solo", check=0)
    assert jdoc("run-due")["ran"] == []
    procs = [spawn("run-due", "--json") for _ in range(2)] + [spawn("resume", "c", "solo", "--json")]
    procs += [spawn("run-due", "--json") for _ in range(3)]
    for p in procs:
        p.communicate(timeout=120)
        assert p.returncode == 0
    jdoc("run-due")
    assert jdoc("inspect-queue", "c")["chains"][0]["state"] == "SUCCEEDED"
    for tid in ("c/1/echo", "c/2/echo", "c/2/echo#2", "c/3/echo", "solo"):
        assert started(tid) == 1, tid


def test_pause_all_while_run_due_is_claiming():
    lines = "".join(json.dumps({"id": f"t{n}", "worker": "sleep", "input": "0.05"}) + "\n" for n in range(40))
    jdoc("enqueue", "--from", "-", input=lines)
    run = spawn("run-due", "--parallel", "2", "--json")
    time.sleep(0.5)
    jdoc("pause", "--all")
    run.communicate(timeout=120)
    evs = events()
    cut = next(n for n, e in enumerate(evs) if e["event"] == "paused")
    assert not [e for e in evs[cut:] if e["event"] == "started"], "a task started after the queue was paused"
    jdoc("resume", "--all")
    jdoc("run-due", "--parallel", "4")
    assert all(t["state"] == "SUCCEEDED" for t in queue().values())


# -- Python API -----------------------------------------------------------------------------


def test_python_api(home):
    from kmpwm import Scheduler

    s = Scheduler(home)
    s.enqueue("a", None, "echo")
    s.enqueue("f", None, "fail")
    assert s.pause("a") == ["a"]
    assert s.resume("a") == ["a"]
    doc = s.run_now("a", "f")
    assert doc["exit_code"] == 1 and {r["id"] for r in doc["ran"]} == {"a", "f"}
    res = s.wait("a", timeout=5)
    assert res.exit_code == 0 and not res.timed_out and res.tasks[0]["state"] == "SUCCEEDED"
    assert s.wait("f", timeout=0.2).exit_code == 1  # FAILED
    assert s.retry("f") == ["f"]
    assert s.wait("f", timeout=0.2).exit_code == 75
    assert s.task("f")["state"] == "ENQUEUED" and s.task("f")["attempts"] == 0
    assert s.pause(all=True) == [] and s.resume(all=True) == []


def test_wait_without_inotify_falls_back_to_a_bounded_poll(home, monkeypatch):
    """Both ways of sleeping until the journal changes: inotify_simple made unimportable here (the
    stat poll), and whatever this machine has in the subprocess tests above."""
    import threading

    from kmpwm import Scheduler
    from kmpwm.scheduling import steering

    monkeypatch.setitem(sys.modules, "inotify_simple", None)  # import fails: the fallback
    watcher = steering._Watcher(home / "journal")
    assert watcher._ino is None
    watcher.close()
    s = Scheduler(home)
    s.enqueue("a", None, "echo")
    out = {}
    waiter = threading.Thread(target=lambda: out.setdefault("res", s.__class__(home).wait("a", timeout=60)))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive()
    jdoc("run-due")
    waiter.join(60)
    assert out["res"].exit_code == 0 and out["res"].tasks[0]["state"] == "SUCCEEDED"


def test_tasks_claimed_ahead_are_handed_back_when_paused(home):
    """run-due claims a few tasks ahead of a free slot; paused meanwhile, they are released
    unstarted (a claimed task is RUNNING, but its worker has not started: it must not start)."""
    from kmpwm import Scheduler
    from kmpwm.running.runner import Runner
    from kmpwm.storage.paths import resolve

    s = Scheduler(home)
    for n in range(4):
        s.enqueue(f"t{n}", None, "echo")
    runner = Runner(resolve(home), parallel=1)
    runner._avg_run = 0.01  # fast runs so far: it claims ahead
    started_ids = []

    def fake_start(claim):
        started_ids.append(claim.id)
        runner.jobs[claim.id] = None  # the one slot is busy

    runner._start = fake_start
    assert runner._cycle(True, replan=True) == 4  # one started, three claimed ahead
    assert started_ids == ["t0"]
    s.pause(all=True)
    runner.jobs.clear()  # t0 "finished": a slot is free
    runner._start_ready()
    assert started_ids == ["t0"], "a task claimed ahead started although the queue is paused"
    runner._cycle(False, replan=False)  # hands them back
    q = queue()
    assert [q[f"t{n}"]["state"] for n in (1, 2, 3)] == ["ENQUEUED"] * 3
