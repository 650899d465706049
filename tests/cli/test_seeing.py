"""SPEC section 10, as users meet it: every run's output kept (`kmpwm logs`, `--follow` from another
terminal), hooks on failure and success, progress from both kinds of worker."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import orjson
import pytest
from helpers import kjson, kmpwm, kmpwm_env

pytestmark = pytest.mark.both_stores(long=True)  # PostgreSQL's side runs in scripts/long-tier

PY = sys.executable


def config(home: Path, text: str) -> None:
    path = home / "config.toml"
    path.write_text(textwrap.dedent(text))
    os.chmod(path, 0o600)


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def wait_for(pred, timeout: float = 30.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- run output ------------------------------------------------------------------------------


def test_command_output_both_streams_interleaved_and_data_still_parsed(home, tmp_path):
    talk = script(
        tmp_path,
        "talk.py",
        """
        import sys, time
        for i in range(3):
            print(f"out {i}", flush=True); time.sleep(0.05)
            print(f"err {i}", file=sys.stderr, flush=True); time.sleep(0.05)
        print('{"answer": 42}')
    """,
    )
    config(
        home,
        f"""
        [workers.talk]
        command = ["{PY}", "{talk}"]
    """,
    )
    kmpwm("enqueue", "t", "talk", check=0)
    doc, _ = kjson("run-due", check=0)
    assert doc["ran"][0]["status"] == "SUCCESS" and doc["ran"][0]["data"] == {"answer": 42}
    out = kmpwm("logs", "t", check=0).stdout
    assert out == 'out 0\nerr 0\nout 1\nerr 1\nout 2\nerr 2\n{"answer": 42}\n'
    doc, _ = kjson("logs", "t", check=0)
    assert doc["id"] == "t"
    (run,) = doc["runs"]
    assert run["run"] == 1 and run["attempt"] == 1 and run["status"] == "SUCCESS" and run["truncated"] is False
    assert run["started_at"].endswith("Z") and run["finished_at"].endswith("Z")
    assert run["output"] == out
    for f in (home / "logs" / "runs").rglob("*"):
        assert (f.stat().st_mode & 0o777) == (0o700 if f.is_dir() else 0o600), f


def test_failed_command_keeps_its_message_and_whole_output(home, tmp_path):
    bad = script(
        tmp_path,
        "bad.sh",
        """
        echo "starting"
        echo "disk full" >&2
        exit 3
    """,
    )
    config(
        home,
        f"""
        [workers.bad]
        command = ["sh", "{bad}"]
    """,
    )
    kmpwm("enqueue", "b", "bad", "--max-attempts", "1", check=0)
    doc, _ = kjson("run-due", check=0)
    assert doc["ran"][0]["status"] == "FAILURE" and doc["ran"][0]["message"] == "disk full"
    assert kmpwm("logs", "b", check=0).stdout == "starting\ndisk full\n"
    assert kjson("logs", "b")[0]["runs"][0]["status"] == "FAILURE"


PYWORKER = """
    import logging, sys, time

    def talk(input, ctx):
        print("printed to stdout")
        time.sleep(0.02)
        print("printed to stderr", file=sys.stderr)
        logging.getLogger("mine").info("logged at info")
        logging.warning("logged at warning")
        print("last line")
        return {"ok": True}
"""


@pytest.mark.parametrize("pool", ["1", "0"])
def test_python_worker_stdout_stderr_and_logging_kept(home, tmp_path, pool):
    (tmp_path / "mod").mkdir()
    (tmp_path / "mod" / "talky.py").write_text(textwrap.dedent(PYWORKER))
    config(
        home,
        f"""
        [workers.talky]
        entry = "talky:talk"
        cwd = "{tmp_path / "mod"}"
    """,
    )
    for i in range(3):
        kmpwm("enqueue", f"p{i}", "talky", check=0)
    doc, _ = kjson("run-due", "--parallel", "1", env={"KMPWM_POOL": pool}, check=0)
    assert [r["status"] for r in doc["ran"]] == ["SUCCESS"] * 3
    for i in range(3):  # each run has its own output, none of another task's
        out = kmpwm("logs", f"p{i}", check=0).stdout
        assert out == (
            "printed to stdout\nprinted to stderr\nINFO mine: logged at info\n"
            "WARNING:root:logged at warning\nlast line\n"
        ), out  # logging.warning's basicConfig


def test_output_over_one_mib_keeps_the_last_mib_marked_truncated(home, tmp_path):
    loud = script(
        tmp_path,
        "loud.py",
        """
        import sys
        w = sys.stdout.write
        for i in range(300_000):       # about 3.4 MB
            w(f"line {i:08d}\\n")
    """,
    )
    config(
        home,
        f"""
        [workers.loud]
        command = ["{PY}", "{loud}"]
    """,
    )
    kmpwm("enqueue", "l", "loud", check=0)
    kmpwm("run-due", check=0)
    doc, _ = kjson("logs", "l", check=0)
    run = doc["runs"][0]
    assert run["truncated"] is True
    raw = run["output"].encode()
    assert len(raw) == 1 << 20
    assert raw.endswith(b"line 00299999\n")
    assert b"line 00000000\n" not in raw
    lines = raw.split(b"\n")[1:-1]  # the first may be cut
    assert lines == [f"line {i:08d}".encode() for i in range(300_000 - len(lines), 300_000)]
    files = sorted(p.suffix for p in (home / "logs" / "runs").iterdir())
    assert files == [".jsonl", ".out"]  # the index, and one output file (no rotated part left)
    tail = kmpwm("logs", "l", "--tail", "2")
    assert tail.stdout == "line 00299998\nline 00299999\n" and "truncated" in tail.stderr
    assert kjson("logs", "l", "--tail", "1")[0]["runs"][0]["output"] == "line 00299999\n"


def test_logs_of_an_id_without_runs_exits_1_with_one_line(home):
    proc = kmpwm("logs", "nothing-here", check=1)
    assert proc.stdout == "" and proc.stderr.count("\n") == 1 and "nothing-here" in proc.stderr
    kmpwm("enqueue", "later", "echo", "--delay", "1h", check=0)
    kmpwm("logs", "later", check=1)
    doc, rc = kjson("logs", "later")
    assert rc == 1 and doc["exit_code"] == 1


def test_runs_numbered_all_and_run_n(home):
    for i in range(3):
        kmpwm("enqueue", "e", "echo", "--input", f"in{i}", check=0)
        kmpwm("run-due", check=0)
    doc, _ = kjson("logs", "e", "--all", check=0)
    assert [r["run"] for r in doc["runs"]] == [1, 2, 3]
    assert kjson("logs", "e", "--run", "2")[0]["runs"][0]["run"] == 2
    kmpwm("logs", "e", "--run", "9", check=1)
    kmpwm("logs", "e", "--run", "1", "--all", check=65)
    text = kmpwm("logs", "e", "--all", check=0).stdout
    assert text.count("==> run ") == 3


def test_retention_keeps_last_five_runs_and_recent_ones(home, tmp_path):
    config(
        home,
        """
        [workers.say]
        command = ["sh", "-c", "echo run $KMPWM_INPUT"]
    """,
    )
    for i in range(1, 8):
        kmpwm("enqueue", "r", "say", "--input", str(i), check=0)
        kmpwm("run-due", check=0)
    kmpwm("compact", check=0)  # all within the retention window: all kept
    assert [r["run"] for r in kjson("logs", "r", "--all")[0]["runs"]] == [1, 2, 3, 4, 5, 6, 7]
    kmpwm("compact", faketime="+8d", check=0)  # past the window: only the last five stay
    doc, _ = kjson("logs", "r", "--all", check=0)
    assert [r["run"] for r in doc["runs"]] == [3, 4, 5, 6, 7]
    assert doc["runs"][0]["output"] == "run 3\n"
    kmpwm("enqueue", "r", "say", "--input", "8", check=0)
    kmpwm("run-due", check=0)
    assert kjson("logs", "r")[0]["runs"][0]["run"] == 8  # numbering goes on


def test_logs_follow_streams_a_running_task_from_another_terminal(home, tmp_path):
    gate = tmp_path / "gate"
    slow = script(
        tmp_path,
        "slow.py",
        f"""
        import os, sys, time
        print("first line", flush=True)
        while not os.path.exists({str(gate)!r}):
            time.sleep(0.02)
        print("second line", file=sys.stderr, flush=True)
        while not os.path.exists({str(gate) + "2"!r}):
            time.sleep(0.02)
        print("done")
    """,
    )
    config(
        home,
        f"""
        [workers.slow]
        command = ["{PY}", "{slow}"]
    """,
    )
    kmpwm("enqueue", "s", "slow", check=0)
    rundue = subprocess.Popen(
        [PY, "-m", "kmpwm", "run-due"], env=kmpwm_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        wait_for(lambda: kjson("logs", "s")[0].get("runs", [{}])[0].get("output"), what="the first line")
        follow = subprocess.Popen(
            [PY, "-m", "kmpwm", "logs", "s", "--follow"],
            env=kmpwm_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert follow.stdout.readline() == b"first line\n"
        gate.touch()
        assert follow.stdout.readline() == b"second line\n"
        assert follow.poll() is None  # still running: still following
        Path(str(gate) + "2").touch()
        rest, err = follow.communicate(timeout=30)
        assert rest == b"done\n" and follow.returncode == 0, err
        assert rundue.wait(timeout=30) == 0
    finally:
        rundue.kill()
        rundue.wait()
    # following a finished run prints it and returns
    assert kmpwm("logs", "s", "--follow", check=0).stdout == "first line\nsecond line\ndone\n"


# -- hooks -------------------------------------------------------------------------------------

RECORDER = """
    import json, os, sys
    doc = json.load(sys.stdin)
    env = {k: v for k, v in os.environ.items() if k.startswith("KMPWM_") and k != "KMPWM_HOME"}
    with open(os.path.join(os.environ["KMPWM_HOME"], "hooks.jsonl"), "a") as fh:
        fh.write(json.dumps({"which": sys.argv[1], "stdin": doc, "env": env}) + "\\n")
"""


def hook_calls(home: Path) -> list[dict]:
    path = home / "hooks.jsonl"
    return [orjson.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def hooks_config(home: Path, tmp_path: Path, extra: str = "") -> None:
    rec = script(tmp_path, "rec.py", RECORDER)
    config(
        home,
        f"""
        [hooks]
        on_failure = ["{PY}", "{rec}", "failure"]
        on_success = ["{PY}", "{rec}", "success"]

        [workers.bad]
        command = ["sh", "-c", "echo 'it broke' >&2; exit 4"]
    """
        + extra,
    )


def test_hooks_get_environment_and_stdin_for_success_failure_and_upstream_failure(home, tmp_path):
    hooks_config(home, tmp_path)
    kmpwm("enqueue", "good", "echo", "--input", "x", check=0)
    kmpwm("enqueue", "bad", "bad", "--max-attempts", "1", check=0)
    kmpwm("chain", "--id", "ch", "bad", "echo", check=0)
    kmpwm("run-due", check=0)
    calls = {c["stdin"]["id"]: c for c in hook_calls(home)}
    assert set(calls) == {"good", "bad", "ch/1/bad", "ch/2/echo"}
    good = calls["good"]
    assert good["which"] == "success"
    assert good["stdin"] == {
        "id": "good",
        "worker": "echo",
        "state": "SUCCEEDED",
        "status": "SUCCESS",
        "message": "echo from good",
        "data": {"task": "good", "input": "x"},
        "attempt": 1,
        "chain_id": None,
    }
    assert good["env"] == {
        "KMPWM_TASK_ID": "good",
        "KMPWM_WORKER": "echo",
        "KMPWM_STATE": "SUCCEEDED",
        "KMPWM_STATUS": "SUCCESS",
        "KMPWM_MESSAGE": "echo from good",
        "KMPWM_ATTEMPT": "1",
        "KMPWM_CHAIN_ID": "",
    }
    bad = calls["bad"]
    assert bad["which"] == "failure" and bad["stdin"]["status"] == "FAILURE" and bad["stdin"]["state"] == "FAILED"
    assert bad["env"]["KMPWM_MESSAGE"] == "it broke" and bad["env"]["KMPWM_CHAIN_ID"] == ""
    up = calls["ch/2/echo"]
    assert up["which"] == "failure" and up["env"]["KMPWM_STATUS"] == "FAILURE"
    assert up["env"]["KMPWM_MESSAGE"] == "upstream failed" and up["env"]["KMPWM_CHAIN_ID"] == "ch"
    assert calls["ch/1/bad"]["env"]["KMPWM_CHAIN_ID"] == "ch"
    assert len(hook_calls(home)) == 4  # once each


def test_retry_is_not_a_failure_until_the_last_attempt(home, tmp_path):
    hooks_config(
        home,
        tmp_path,
        """
        [workers.again]
        command = ["sh", "-c", "exit 75"]
    """,
    )
    kmpwm("enqueue", "r", "again", "--max-attempts", "2", "--backoff-delay", "0", check=0)
    kmpwm("run-due", check=0)
    assert hook_calls(home) == []
    kmpwm("run-due", check=0)
    (call,) = hook_calls(home)
    assert call["which"] == "failure" and call["stdin"]["attempt"] == 2 and call["env"]["KMPWM_STATE"] == "FAILED"


def test_failing_and_hanging_hooks_are_events_and_never_touch_the_task(home, tmp_path):
    config(
        home,
        """
        [hooks]
        on_success = ["sh", "-c", "echo cannot page >&2; exit 3"]
        on_failure = ["sleep", "60"]

        [workers.bad]
        command = ["sh", "-c", "exit 1"]
    """,
    )
    kmpwm("enqueue", "a", "echo", check=0)
    kmpwm("enqueue", "b", "bad", "--max-attempts", "1", check=0)
    kmpwm("run-due", env={"KMPWM_HOOK_TIMEOUT": "1"}, check=0)
    doc, _ = kjson("events", check=0)
    failed = {e["task"]: e for e in doc["events"] if e["event"] == "hook failed"}
    assert failed["a"]["hook"] == "on_success" and "exited with status 3: cannot page" in failed["a"]["error"]
    assert failed["b"]["hook"] == "on_failure" and "timed out" in failed["b"]["error"]
    tasks = {t["id"]: t for t in kjson("inspect-queue", "--all")[0]["tasks"]}
    assert tasks["a"]["state"] == "SUCCEEDED" and tasks["a"]["last_result"]["status"] == "SUCCESS"
    assert tasks["b"]["state"] == "FAILED"
    assert "hook failed" in kmpwm("events", "--task", "a", check=0).stdout
    assert "hook on_success for a failed" in (home / "logs" / "kmpwm.log").read_text()


def test_hook_never_runs_twice_when_run_due_is_killed_after_the_result(home, tmp_path):
    """At most once: killed between the durable result and its hook, the hook is skipped, and no
    later run-due starts it (nor runs the task) again."""
    hooks_config(home, tmp_path)
    kmpwm("enqueue", "k", "echo", check=0)
    proc = kmpwm("run-due", env={"KMPWM_CRASH_AT": "before-hooks"})
    assert proc.returncode == -9
    assert kjson("inspect-queue", "k")[0]["tasks"][0]["state"] == "SUCCEEDED"  # the result is durable
    kmpwm("enqueue", "later", "echo", check=0)
    kmpwm("run-due", check=0)
    kmpwm("run-due", check=0)
    calls = [c["stdin"]["id"] for c in hook_calls(home)]
    assert calls == ["later"]
    ran = [e for e in kjson("events", "--task", "k")[0]["events"] if e["event"] == "ran"]
    assert len(ran) == 1


def test_bad_hooks_table_is_a_config_error(home):
    kmpwm("enqueue", "a", "echo", check=0)
    config(
        home,
        """
        [hooks]
        on_failure = "notify-me --urgent"
    """,
    )
    for args in (("workers",), ("enqueue", "b", "echo")):
        proc = kmpwm(*args)
        assert proc.returncode == 78 and "argv, never a shell" in proc.stderr


# -- progress ----------------------------------------------------------------------------------

PROGRESS_WORKER = """
    import os, time

    def work(input, ctx):
        for i in range(100_000):
            ctx.progress(i / 100_000, f"item {i}")
        ctx.progress(0.5, "halfway there")
        while not os.path.exists(input):
            time.sleep(0.02)
        return True
"""


def test_progress_from_python_and_command_workers_while_they_run(home, tmp_path):
    (tmp_path / "mod").mkdir()
    (tmp_path / "mod" / "prog.py").write_text(textwrap.dedent(PROGRESS_WORKER))
    gate = tmp_path / "gate"
    cmd = script(
        tmp_path,
        "cprog.sh",
        f"""
        i=0
        while [ $i -lt 20000 ]; do echo "0.1 step $i" >> "$KMPWM_PROGRESS"; i=$((i+1)); done
        echo "0.25 a quarter" >> "$KMPWM_PROGRESS"
        while [ ! -e {gate} ]; do sleep 0.05; done
    """,
    )
    config(
        home,
        f"""
        [workers.prog]
        entry = "prog:work"
        cwd = "{tmp_path / "mod"}"

        [workers.cprog]
        command = ["sh", "{cmd}"]
    """,
    )
    kmpwm("enqueue", "p", "prog", "--input", str(gate), check=0)
    kmpwm("enqueue", "c", "cprog", check=0)
    kmpwm("enqueue", "idle", "echo", "--delay", "1h", check=0)
    rundue = subprocess.Popen(
        [PY, "-m", "kmpwm", "run-due"], env=kmpwm_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:

        def both():
            tasks = {t["id"]: t for t in kjson("inspect-queue")[0]["tasks"]}
            p, c = tasks["p"]["progress"], tasks["c"]["progress"]
            return tasks if (p and p["message"] == "halfway there" and c and c["message"] == "a quarter") else None

        tasks = wait_for(both, what="progress of both tasks")
        assert tasks["p"]["progress"]["fraction"] == 0.5 and tasks["c"]["progress"]["fraction"] == 0.25
        assert tasks["p"]["progress"]["at"].endswith("Z")
        assert tasks["idle"]["progress"] is None
        table = kmpwm("inspect-queue", check=0).stdout
        assert "50% halfway there" in table and "25% a quarter" in table
        assert "progress 50% halfway there" in kmpwm("explain", "p", check=0).stdout
        assert kjson("explain", "c")[0]["progress"]["fraction"] == 0.25
        watch = subprocess.Popen(
            [PY, "-m", "kmpwm", "inspect-queue", "--watch", "--json"],
            env=kmpwm_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            first = orjson.loads(watch.stdout.readline())
            assert {t["id"]: t["progress"] for t in first["tasks"]}["p"]["message"] == "halfway there"
        finally:
            watch.kill()
            watch.wait()
        # 100,000 reports left one short line; the command's 20,000 lines were cut back
        runs = home / "logs" / "runs"
        (pfile,) = [f for f in runs.glob("*.progress") if b"halfway" in f.read_bytes()]
        assert pfile.stat().st_size < 100
        (cfile,) = [f for f in runs.glob("*.progress") if f != pfile]
        wait_for(lambda: cfile.stat().st_size < 64 * 1024, what="the trim")
        gate.touch()
        assert rundue.wait(timeout=60) == 0
    finally:
        rundue.kill()
        rundue.wait()
    tasks = {t["id"]: t for t in kjson("inspect-queue", "--all")[0]["tasks"]}
    assert tasks["p"]["state"] == "SUCCEEDED" and tasks["p"]["progress"] is None  # only while running
    assert not list(runs.rglob("*.progress"))


def test_progress_bar_on_a_terminal(home, tmp_path):
    pytest.importorskip("pty")
    import pty

    gate = tmp_path / "gate"
    config(
        home,
        f"""
        [workers.bar]
        command = ["sh", "-c", "echo '0.4 copying' >> $KMPWM_PROGRESS; while [ ! -e {gate} ]; do sleep 0.05; done"]
    """,
    )
    kmpwm("enqueue", "b", "bar", check=0)
    rundue = subprocess.Popen(
        [PY, "-m", "kmpwm", "run-due"], env=kmpwm_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        wait_for(
            lambda: (kjson("inspect-queue")[0]["tasks"][0]["progress"] or {}).get("fraction") == 0.4, what="progress"
        )
        pid, fd = pty.fork()
        if pid == 0:
            os.environ["COLUMNS"] = "200"
            os.execv(PY, [PY, "-m", "kmpwm", "inspect-queue"])
        out = b""
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        os.waitpid(pid, 0)
        text = out.decode("utf-8", "replace")
        assert "\u2588" * 5 + "\u2591" * 7 in text and "40% copying" in text, text
    finally:
        gate.touch()
        rundue.wait(timeout=60)


def test_progress_rejects_fractions_outside_0_to_1(tmp_path):
    from kmpwm.running.context import WorkerContext

    c = WorkerContext(task_id="t", attempt=1, progress_file=str(tmp_path / "p"))
    for bad in (1.5, -0.1, float("nan"), "half"):
        with pytest.raises((ValueError, TypeError)):
            c.progress(bad)
    c.progress(1, "done")
    c.close()
    assert (tmp_path / "p").read_text().strip() == "1 done"


def test_follow_keeps_up_across_the_1_mib_rotation(home, tmp_path):
    """--follow streams everything a run writes, also past the point where run-due starts a new
    file (the kept output is the last 1 MiB; the follower saw it all as it came)."""
    gate = tmp_path / "gate"
    writer = script(
        tmp_path,
        "writer.py",
        f"""
        import os, sys, time
        print("ready", flush=True)
        while not os.path.exists({str(gate)!r}):
            time.sleep(0.02)
        for block in range(40):          # 40 x 64 KiB = 2.5 MiB, at a few MB/s
            sys.stdout.write("".join(f"line {{block * 1000 + i:06d}} " + "x" * 52 + "\\n" for i in range(1000)))
            sys.stdout.flush()
            time.sleep(0.03)
    """,
    )
    config(
        home,
        f"""
        [workers.writer]
        command = ["{PY}", "{writer}"]
    """,
    )
    kmpwm("enqueue", "w", "writer", check=0)
    rundue = subprocess.Popen(
        [PY, "-m", "kmpwm", "run-due"], env=kmpwm_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        wait_for(lambda: kjson("logs", "w")[0].get("runs", [{}])[0].get("output"), what="ready")
        follow = subprocess.Popen(
            [PY, "-m", "kmpwm", "logs", "w", "--follow"],
            env=kmpwm_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert follow.stdout.readline() == b"ready\n"
        gate.touch()
        out, err = follow.communicate(timeout=120)
        assert follow.returncode == 0, err
        lines = out.splitlines()
        assert lines == [f"line {n:06d} ".encode() + b"x" * 52 for n in range(40_000)]
        assert rundue.wait(timeout=60) == 0
    finally:
        rundue.kill()
        rundue.wait()
    run = kjson("logs", "w")[0]["runs"][0]
    assert run["truncated"] is True and len(run["output"]) == 1 << 20


def test_a_worker_that_configures_logging_keeps_its_format(home, tmp_path):
    (tmp_path / "mod").mkdir()
    (tmp_path / "mod" / "own.py").write_text(
        textwrap.dedent("""
        import logging

        def work(input, ctx):
            logging.basicConfig(format="mine|%(levelname)s|%(message)s", level=logging.DEBUG)
            logging.debug("details")
            return True
    """)
    )
    config(
        home,
        f"""
        [workers.own]
        entry = "own:work"
        cwd = "{tmp_path / "mod"}"
    """,
    )
    kmpwm("enqueue", "o", "own", check=0)
    kmpwm("run-due", check=0)
    assert kmpwm("logs", "o", check=0).stdout == "mine|DEBUG|details\n"


def test_progress_latest_report_lands_after_a_burst(tmp_path):
    """Writes are at most every 50 ms, yet the last report of a burst reaches the file although
    the worker then goes quiet (and 100,000 reports leave one short line)."""
    from kmpwm.running.context import WorkerContext

    path = tmp_path / "p"
    c = WorkerContext(task_id="t", attempt=1, progress_file=str(path))
    for i in range(100_000):
        c.progress(i / 100_000, f"item {i}")
    c.progress(0.5, "halfway")
    wait_for(lambda: path.read_text().strip() == "0.5 halfway", timeout=10, what="the last report")
    assert path.stat().st_size < 100
    c.close()


def test_run_of_a_killed_run_due_shows_expired_and_the_next_run_is_kept_too(home, tmp_path):
    config(
        home,
        """
        [workers.nap]
        command = ["sh", "-c", "echo napping; sleep 60"]
    """,
    )
    kmpwm("enqueue", "n", "nap", "--timeout", "2s", check=0)
    rundue = subprocess.Popen(
        [PY, "-m", "kmpwm", "run-due"], env=kmpwm_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        wait_for(lambda: kjson("logs", "n")[0].get("runs", [{}])[0].get("output") == "napping\n", what="output")
        assert kjson("logs", "n")[0]["runs"][0]["status"] == "RUNNING"
    finally:
        rundue.kill()
        rundue.wait()
    (run,) = kjson("logs", "n", check=0)[0]["runs"]
    assert run["status"] == "EXPIRED" and run["finished_at"] is not None and run["output"] == "napping\n"
    kmpwm("run-due", faketime="+2m", check=0)  # the lease ended: picked up again, expires at its limit
    runs = kjson("logs", "n", "--all", check=0)[0]["runs"]
    assert [r["run"] for r in runs] == [1, 2] and runs[1]["status"] == "EXPIRED"
    assert runs[1]["output"] == "napping\n"


def test_run_due_goes_on_with_work_while_a_hook_runs(home, tmp_path):
    """The on_success hook of the first task waits for a file that only the second task creates;
    with one slot, the second task can only run if run-due does not wait for the hook."""
    gate = tmp_path / "second-ran"
    hook = script(
        tmp_path,
        "hook.sh",
        f"""
        while [ ! -e {gate} ]; do sleep 0.05; done
        echo "saw the second task" > {tmp_path / "hook-done"}
    """,
    )
    config(
        home,
        f"""
        [hooks]
        on_success = ["sh", "{hook}"]

        [workers.second]
        command = ["touch", "{gate}"]
    """,
    )
    kmpwm("enqueue", "first", "echo", check=0)
    kmpwm("enqueue", "second", "second", "--delay", "1s", check=0)
    time.sleep(1.2)
    kmpwm("run-due", "--parallel", "1", env={"KMPWM_HOOK_TIMEOUT": "60"}, check=0)
    assert (tmp_path / "hook-done").read_text() == "saw the second task\n"
    assert not [e for e in kjson("events")[0]["events"] if e["event"] == "hook failed"]


def test_notify_hook_uses_notify_send(home, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "notify-send"
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path / 'notified'}\n")
    fake.chmod(0o755)
    config(
        home,
        """
        [hooks]
        on_failure = "notify"

        [workers.bad]
        command = ["sh", "-c", "echo 'disk on fire' >&2; exit 1"]
    """,
    )
    kmpwm("enqueue", "b", "bad", "--max-attempts", "1", check=0)
    kmpwm("run-due", env={"PATH": f"{bindir}:{os.environ['PATH']}"}, check=0)
    assert (tmp_path / "notified").read_text() == "kmpwm: b failed\ndisk on fire\n"
