"""How runs end (issue 13 items 4-6, 8, 14; issue 14 item 12): a stopped run's result never
counts, a cancel reaches a running worker, a worker's leftover processes end with its run,
failures are never silent off a terminal, a process that cannot start fails its task (never
run-due), Ctrl-C twice forces the stop.  Real processes and real signals only; every wait is a
polling loop with a deadline (no timing assertions).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import jdoc, kmpwm, kmpwm_env

pytestmark = pytest.mark.both_stores(long=True)  # PostgreSQL's side runs in scripts/long-tier

PY = sys.executable

# A command worker configured by argv[1] (JSON); every event is a JSON line in ``marker``:
#   {"ev": "start"|"term"|"end", "pid", "t", "id"}
#   sleep     seconds to sleep
#   on_term   "exit0": exit 0 at once; "ignore": keep sleeping; "linger": sleep ``linger`` s, then exit 0
#   child     start ``sleep 300`` in the background (its pid in the start line) and go on
#   exit      the exit status at the end (default 0)
WORKER = r"""
import json, os, signal, subprocess, sys, time
cfg = json.loads(sys.argv[1])
def mark(ev, **kw):
    fd = os.open(cfg["marker"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, (json.dumps(dict(ev=ev, pid=os.getpid(), t=time.time(), id=os.environ.get("KMPWM_TASK_ID"), **kw)) + "\n").encode())
    os.close(fd)
def on_term(signo, frame):
    mark("term")
    if cfg.get("on_term") == "exit0":
        mark("end")
        os._exit(0)
    if cfg.get("on_term") == "linger":
        time.sleep(cfg.get("linger", 1))
        mark("end")
        os._exit(0)
signal.signal(signal.SIGTERM, on_term)
extra = {}
if cfg.get("child"):
    extra["child"] = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL).pid
mark("start", **extra)
end = time.monotonic() + cfg.get("sleep", 0)
while time.monotonic() < end:
    time.sleep(0.05)
mark("end")
sys.exit(cfg.get("exit", 0))
"""

# A Python entry worker (in the pool or forked) that leaves ``sleep 300`` running.
ENTRY = r"""
import json, os, subprocess

def leave_child(input):
    pid = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL).pid
    with open(input, "a") as fh:
        fh.write(json.dumps({"ev": "start", "child": pid, "pid": os.getpid()}) + "\n")
"""


def write_config(home: Path, text: str) -> None:
    path = home / "config.toml"
    path.write_text(text)
    os.chmod(path, 0o600)


@pytest.fixture
def declare(home, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)

    def declare(**workers):
        out = []
        for name, cfg in workers.items():
            out += [f"[workers.{name}]", f"command = {json.dumps([PY, str(script), json.dumps(cfg)])}", ""]
        write_config(home, "\n".join(out))

    return declare


def marks(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (an unreaped zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2 :].startswith(("Z", "X"))


def tasks() -> dict:
    return {t["id"]: t for t in jdoc("inspect-queue", "--all")["tasks"]}


def start_run_due(*extra) -> subprocess.Popen:
    return subprocess.Popen(
        [PY, "-m", "kmpwm", "run-due", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=kmpwm_env(),
    )


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert "Traceback" not in err, err
    return proc.returncode, out, err


# -- 13.6: a stopped run's result never counts ---------------------------------------------------


def test_worker_exiting_0_on_sigterm_is_expired_and_its_chain_does_not_move_on(tmp_path, declare):
    m = tmp_path / "m"
    declare(half={"marker": str(m), "sleep": 30, "on_term": "exit0"}, nxt={"marker": str(m)})
    jdoc("chain", "--id", "c", "half", "nxt", "--timeout", "1s")
    doc = jdoc("run-due", "--grace", "5s")
    assert [(r["id"], r["status"]) for r in doc["ran"]] == [("c/1/half", "EXPIRED")]
    assert [e["ev"] for e in marks(m)] == ["start", "term", "end"]  # it did exit 0 on SIGTERM
    t = tasks()
    assert t["c/1/half"]["state"] == "ENQUEUED" and t["c/1/half"]["attempts"] == 0
    assert t["c/2/nxt"]["state"] == "BLOCKED", "the chain moved on with half-done work"


def test_run_expired_by_simulate_expire_does_not_count_a_clean_exit(tmp_path, declare):
    m = tmp_path / "m"
    declare(half={"marker": str(m), "sleep": 30, "on_term": "exit0"})
    jdoc("enqueue", "h", "half")
    proc = start_run_due("--json")
    wait_for(lambda: marks(m), 30, "the worker to start")
    kmpwm("simulate-expire", "h", check=0)
    rc, out, _ = finish(proc)
    assert rc == 75
    assert [(r["id"], r["status"]) for r in json.loads(out)["ran"]] == [("h", "EXPIRED")]
    assert tasks()["h"]["state"] == "ENQUEUED"


# -- 13.5: a cancel reaches a running worker ----------------------------------------------------


@pytest.mark.parametrize("on_term", ["linger", "ignore"])
def test_cancel_of_a_running_task_stops_its_worker(tmp_path, declare, on_term):
    m = tmp_path / "m"
    declare(long={"marker": str(m), "sleep": 120, "on_term": on_term, "linger": 0.5})
    jdoc("enqueue", "job", "long")
    proc = start_run_due("--grace", "2s", "--json")
    [start] = wait_for(lambda: marks(m), 30, "the worker to start")
    assert jdoc("cancel", "job")["cancelled"] == ["job"]
    wait_for(lambda: gone(start["pid"]), 30, "the cancelled task's worker to be stopped")
    rc, out, _ = finish(proc)
    assert rc == 0
    assert json.loads(out)["ran"] == []  # a stopped run has no result
    assert [e["ev"] for e in marks(m)][:2] == ["start", "term"]  # told to stop first (SIGTERM)
    t = tasks()["job"]
    assert t["state"] == "CANCELLED" and t["reason"] == "cancelled"
    assert jdoc("run-due")["ran"] == []


@pytest.mark.parametrize("how", ["replace", "cancel-then-enqueue"])
def test_replace_of_a_running_task_never_overlaps_the_old_run(tmp_path, declare, how):
    old, new = tmp_path / "old", tmp_path / "new"
    declare(v1={"marker": str(old), "sleep": 120, "on_term": "linger", "linger": 3}, v2={"marker": str(new)})
    jdoc("enqueue", "sync", "v1")
    first = start_run_due("--grace", "10s", "--json")
    wait_for(lambda: marks(old), 30, "the old run to start")
    if how == "replace":
        assert jdoc("enqueue", "sync", "v2", "--policy", "replace")["action"] == "replaced"
    else:  # the old task is finished (CANCELLED) at once: the new one is simply enqueued
        assert jdoc("cancel", "sync")["cancelled"] == ["sync"]
        assert jdoc("enqueue", "sync", "v2")["action"] == "enqueued"
    if len(marks(old)) < 3:  # the old worker is still stopping (it lingers 3 s after SIGTERM)
        why = jdoc("explain", "sync")
        assert why["code"] == "stopping" or len(marks(old)) == 3, why
    # Another runner right away: the old worker is still stopping (it lingers after SIGTERM).
    second = start_run_due("--json")
    finish(second)
    finish(first)
    if not marks(new):
        jdoc("run-due")
    o, n = marks(old), marks(new)
    assert [e["ev"] for e in o] == ["start", "term", "end"]
    assert [e["ev"] for e in n] == ["start", "end"], "the replacing task did not run exactly once"
    assert n[0]["t"] >= o[-1]["t"], "the new run started while the old one was still running"
    t = tasks()["sync"]
    assert t["state"] == "SUCCEEDED" and t["worker"] == "v2"


def test_an_id_cancelled_while_running_runs_again_when_enqueued_again(tmp_path, declare):
    """The fence a cancelled run leaves comes down once its worker is gone."""
    m = tmp_path / "m"
    declare(w={"marker": str(m), "sleep": 120, "on_term": "exit0"}, quick={"marker": str(m)})
    jdoc("enqueue", "a", "w")
    proc = start_run_due("--parallel", "1", "--grace", "1s", "--json")
    wait_for(lambda: marks(m), 30, "a to start")
    jdoc("cancel", "a")
    finish(proc)
    jdoc("enqueue", "a", "quick")
    doc = jdoc("run-due")
    assert [(r["id"], r["status"]) for r in doc["ran"]] == [("a", "SUCCESS")]


# -- a worker's leftover processes end with its run ---------------------------------------------


def test_background_child_of_a_command_worker_is_killed_when_it_exits(tmp_path, declare):
    m = tmp_path / "m"
    declare(bg={"marker": str(m), "child": True})
    jdoc("enqueue", "bg", "bg")
    doc = jdoc("run-due")
    assert [(r["id"], r["status"]) for r in doc["ran"]] == [("bg", "SUCCESS")]
    child = marks(m)[0]["child"]
    wait_for(lambda: gone(child), 10, f"the worker's background child {child} to be killed")


@pytest.mark.parametrize("pool", ["1", "0"])
def test_background_child_of_a_python_worker_is_killed_when_it_returns(tmp_path, home, pool):
    (tmp_path / "leaver.py").write_text(ENTRY)
    write_config(home, f'[workers.leave]\nentry = "leaver:leave_child"\ncwd = "{tmp_path}"\n')
    m = tmp_path / "m"
    jdoc("enqueue", "l1", "leave", "--input", str(m))
    jdoc("enqueue", "l2", "leave", "--input", str(m))
    doc = jdoc("run-due", "--parallel", "1", env={"KMPWM_POOL": pool})
    assert sorted((r["id"], r["status"]) for r in doc["ran"]) == [("l1", "SUCCESS"), ("l2", "SUCCESS")]
    for child in [rec["child"] for rec in marks(m)]:
        wait_for(lambda c=child: gone(c), 10, f"the worker's background child {child} to be killed")


# -- 13.14, cwd: a process that cannot be started fails its task, never run-due -----------------


def test_missing_cwd_of_a_command_worker_is_named(tmp_path, home):
    write_config(home, f'[workers.w]\ncommand = ["true"]\ncwd = "{tmp_path / "nowhere"}"\n')
    jdoc("enqueue", "t", "w")
    r = kmpwm("run-due", "--json")
    if r.returncode == 78:  # refused up front at config load: also clear
        assert "nowhere" in r.stderr
        return
    assert r.returncode == 0, r.stderr
    [row] = json.loads(r.stdout)["ran"]
    assert row["status"] == "FAILURE"
    assert "working directory" in row["message"] and "nowhere" in row["message"], row["message"]


def test_nul_byte_in_a_config_env_value_fails_the_task_not_run_due(home):
    write_config(home, '[workers.w]\ncommand = ["true"]\n[workers.ok]\ncommand = ["true"]\n')
    jdoc("enqueue", "bad", "w")
    jdoc("enqueue", "good", "ok")
    # the NUL arrives after enqueue (enqueue itself refuses such a config: 78)
    write_config(home, '[workers.w]\ncommand = ["true"]\nenv = { X = "a\\u0000b" }\n[workers.ok]\ncommand = ["true"]\n')
    r = kmpwm("run-due", "--json")
    assert r.returncode != 70 and "embedded null byte" not in r.stderr, r.stderr
    if r.returncode == 78:  # refused up front at config load: also clear
        return
    assert r.returncode == 0, r.stderr
    rows = {row["id"]: row for row in json.loads(r.stdout)["ran"]}
    assert rows["good"]["status"] == "SUCCESS"
    assert rows["bad"]["status"] == "FAILURE" and "NUL" in rows["bad"]["message"]


def test_nul_byte_in_an_input_reaches_a_command_worker_on_stdin(tmp_path, home):
    out = tmp_path / "got"
    write_config(home, f'[workers.cat]\ncommand = ["sh", "-c", "cat > {out}"]\n')
    src = tmp_path / "in"
    src.write_bytes(b"a\0b")
    r = kmpwm("enqueue", "n", "cat", "--input-file", src, "--json")
    if r.returncode == 65:  # refused up front at enqueue: also clear
        return
    assert r.returncode == 0, r.stderr
    r = kmpwm("run-due", "--json")
    assert r.returncode == 0, r.stderr
    [row] = json.loads(r.stdout)["ran"]
    assert row["status"] == "SUCCESS", row
    assert out.read_bytes() == b"a\0b"


def test_poll_of_a_job_never_started_does_not_reap_another_process():
    from kmpwm.running.jobs import Job
    from kmpwm.running.jobs import poll as _poll

    child = subprocess.Popen(["true"])
    wait_for(lambda: gone(child.pid), 10, "the child to exit")
    job = Job(task={"id": "x"}, attempt=1, kind="python", limit=1.0, started=0.0, started_wall=0.0)
    assert _poll(job) == -1
    assert child.wait(timeout=10) == 0, "waitpid(0) reaped another task's process"


# -- 13.8: failures are never silent off a terminal ---------------------------------------------


def test_every_task_that_ends_failed_gets_a_line_on_stderr(tmp_path, declare):
    m = tmp_path / "m"
    declare(retry={"marker": str(m), "exit": 75}, bad={"marker": str(m), "exit": 3}, ok={"marker": str(m)})
    kmpwm("enqueue", "last-try", "retry", "--max-attempts", "1", check=0)
    kmpwm("chain", "--id", "ch", "bad", "ok", check=0)
    r = kmpwm("run-due")  # stdout and stderr are pipes: not a terminal
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert any(ln.startswith("kmpwm: last-try (retry) failed: gave up after 1 attempts") for ln in lines), lines
    assert any(ln.startswith("kmpwm: ch/1/bad (bad) failed") for ln in lines), lines
    assert any(ln.startswith("kmpwm: ch/2/ok (ok) failed: upstream failed") for ln in lines), lines
    assert len(lines) == 3, lines


def test_a_missed_window_and_expired_runs_get_a_line_on_stderr(tmp_path, declare):
    m = tmp_path / "m"
    declare(slow={"marker": str(m), "sleep": 30})
    now = time.time()
    kmpwm("enqueue", "win", "slow", "--window", f"@{int(now) + 3600}", f"@{int(now) + 3660}", check=0)
    r = kmpwm("run-due", faketime="+2h")
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == ["kmpwm: win (slow) failed: window missed"]
    kmpwm("enqueue", "slow", "slow", "--timeout", "1s", check=0)
    for n in range(1, 6):
        r = kmpwm("run-due", "--grace", "1s")
        lines = r.stderr.splitlines()
        if n < 5:
            assert lines == ["kmpwm: slow (slow) expired: time limit of 1s reached"], (n, lines)
        else:
            assert lines == ["kmpwm: slow (slow) failed: expired 5 times in a row"], lines


# -- issue 14.12: Ctrl-C ------------------------------------------------------------------------


def test_second_ctrl_c_forces_the_stop(tmp_path, declare, monkeypatch):
    # a shared store's lease must outlast the grace period (else run-due refuses, exit 78)
    monkeypatch.setenv("KMPWM_LEASE", "15m")
    m = tmp_path / "m"
    declare(deaf={"marker": str(m), "sleep": 300, "on_term": "ignore"})
    jdoc("enqueue", "deaf", "deaf")
    proc = start_run_due("--grace", "10m")
    [start] = wait_for(lambda: marks(m), 30, "the worker to start")
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: len(marks(m)) >= 2, 30, "the worker to be told to stop")
    assert proc.poll() is None, "run-due did not wait for the grace period"
    proc.send_signal(signal.SIGINT)
    rc, _, err = finish(proc, timeout=60)  # without the second Ctrl-C: 10 minutes
    assert rc == 75
    assert "interrupt again to kill them now" in err, err
    assert "interrupted again: killing 1 worker(s) now" in err, err
    assert gone(start["pid"])
    t = tasks()["deaf"]
    assert t["state"] == "ENQUEUED" and t["last_result"]["status"] == "EXPIRED"


@pytest.mark.parametrize("argv", [["events", "--follow"], ["inspect-queue", "--watch"]])
def test_ctrl_c_of_a_following_command_exits_130(argv):
    jdoc("enqueue", "a", "echo")
    proc = subprocess.Popen(
        [PY, "-m", "kmpwm", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=kmpwm_env()
    )
    assert proc.stdout.readline()  # it has printed: it is in its loop
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 130


# -- 13.4: disk full after the claim: the result is still written, the run never repeats -------


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A kmpwm home on its own 4 MiB tmpfs (we need root to mount one; skipped otherwise)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    home = mnt / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("KMPWM_HOME", str(home))
    try:
        yield home
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def fill_worker(home: Path, marker: Path, filler: Path) -> None:
    """[workers.fill]: note the run in ``marker`` (off the small disk), fill the disk, succeed with
    8 KB of data (more than the slack in the journal file's last page)."""
    script = (
        f"echo run >> {marker}; dd if=/dev/zero of={filler} bs=4k 2>/dev/null; "
        """printf '{"filled": true, "pad": "%s"}\\n' "$(head -c 8000 /dev/zero | tr '\\0' x)" """
    )
    write_config(
        home, f'[workers.fill]\ncommand = {json.dumps(["sh", "-c", script])}\n[workers.ok]\ncommand = ["true"]\n'
    )


# A shared store records claims and results in the database, not on this disk (issue 20): a full
# local disk stops only run output there, so these two are the journal's.
@pytest.mark.journal_only
def test_disk_filling_during_a_run_still_records_its_result(small_disk, tmp_path):
    marker, filler = tmp_path / "runs", small_disk.parent / "filler"
    fill_worker(small_disk, marker, filler)
    jdoc("enqueue", "fill", "fill")
    r = kmpwm("run-due", "--json")
    doc = json.loads(r.stdout)
    assert [(row["id"], row["status"]) for row in doc["ran"]] == [("fill", "SUCCESS")], (r.stdout, r.stderr)
    assert r.returncode == 74, r.stderr  # it says so: nothing more can start
    assert "full: every result of this run was recorded, no more work was started" in r.stderr
    filler.unlink()  # space again: a later run-due must not run it again
    r = kmpwm("run-due", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ran"] == []
    assert marker.read_text().splitlines() == ["run"], "the task ran again after its result was lost"
    t = tasks()["fill"]
    assert t["state"] == "SUCCEEDED"
    assert t["last_result"]["data"] == {"filled": True, "pad": "x" * 8000}  # the reserve had room for it


def fill(path: Path) -> None:
    """Fill the file system of ``path`` to the last page."""
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=4k"], capture_output=True, check=False)


@pytest.mark.journal_only
def test_no_worker_starts_on_a_full_disk_and_the_message_is_true(small_disk, tmp_path):
    marker = tmp_path / "runs"
    fill_worker(small_disk, marker, small_disk.parent / "unused")
    jdoc("enqueue", "after", "ok")
    filler = small_disk.parent / "filler"
    fill(filler)
    r = kmpwm("run-due")
    assert r.returncode == 74, r.stderr
    assert r.stderr.splitlines() == [
        ("kmpwm: the disk holding the journal is full: no work was started; free space, then run again")
    ], r.stderr
    assert tasks()["after"]["state"] == "ENQUEUED", "a task was claimed without room for its result"
    filler.unlink()
    assert [row["id"] for row in jdoc("run-due")["ran"]] == ["after"]
