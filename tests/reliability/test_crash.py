"""Crash injection (SQLite-style): SIGKILL enqueue, chain, cancel, run-due and compact at random
moments, then check the invariants users rely on (SPEC section 2, README "Exactly once"):

* every enqueue (or batch, or chain) that reported SUCCESS is in the journal, and stays there;
* a task recorded SUCCEEDED (or CANCELLED, or FAILED) never starts again afterwards, and no two
  runs of one task overlap;
* after draining with run-due, every reported task ran and SUCCEEDED (or was cancelled, or was
  quarantined by design after runner deaths while its worker ran), every chain finished, in step
  order;
* the journal always opens, inspect-queue always equals a fresh fold of the journal, and crashes
  never leave damage in the middle (a torn tail at most).

Plus kills aimed at the two atomic rewrites: the snapshot write and compaction.

The fast tier runs 30 trials (a trial = a group of 1-3 concurrent CLI operations, each killed at
its own moment); ``KMPWM_TORTURE_TRIALS=N`` scales it, ``KMPWM_TORTURE_SEED`` fixes the seed, and
``python scripts/torture.py --trials N`` is the long tier.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import crashlib
import pytest
from crashlib import CrashHarness, Home, collect, fold_bytes, trials_from_env

SEED = int(os.environ.get("KMPWM_TORTURE_SEED", "20261122"))


def _report(tally, stats) -> str:
    lines = [f"{len(tally.violations)} of {tally.checks} invariant checks failed; stats: {stats}"]
    lines += [f"  - {v}" for v in tally.violations[:40]]
    if len(tally.violations) > 40:
        lines.append(f"  ... and {len(tally.violations) - 40} more")
    return "\n".join(lines)


@pytest.fixture
def chome(tmp_path) -> Home:
    home = Home(tmp_path / "crash-home")
    home.install_workers()
    return home


def test_crash_injection_invariants_hold(chome):
    trials = trials_from_env(30)
    harness = CrashHarness(chome, seed=SEED)
    tally = harness.run(trials)
    assert harness.stats["killed"] > 0 and harness.stats["trials"] == trials
    assert not tally.violations, _report(tally, harness.stats)


# -- a kill during the snapshot write ---------------------------------------------------------


def _build_big_tail(home: Home, monkeypatch) -> set[str]:
    """A journal whose tail is over SNAPSHOT_AFTER_BYTES (4 MiB), so that the next command that
    loads it writes a snapshot; no snapshot yet.  Built in-process without fsync (setup only)."""
    from kmpwm import Scheduler
    from kmpwm.core import triggers
    from kmpwm.storage import journal as journal_mod

    ids = set()
    with monkeypatch.context() as m:
        m.setattr(journal_mod, "_datasync", lambda fd: None)
        s = Scheduler(home=str(home.path))
        for i in range(5):
            s.enqueue(f"big{i}", triggers.OneTime(3600), "cw", input="x" * 950_000)
            ids.add(f"big{i}")
        with s.batch():
            for i in range(300):
                s.enqueue(f"small{i}", triggers.OneTime(3600), "pw")
                ids.add(f"small{i}")
    try:
        os.unlink(home.snapshot)
    except FileNotFoundError:
        pass
    return ids


def _snapshot_tmp(home: Home) -> list[str]:
    try:
        return [n for n in os.listdir(home.journal_dir) if n.startswith(".state.snap.") and n.endswith(".tmp")]
    except FileNotFoundError:
        return []


def _kill_when(proc: subprocess.Popen, condition, *, extra: float, limit: float = 60.0) -> bool:
    """SIGKILL ``proc`` ``extra`` seconds after ``condition()`` first holds; True if it was killed
    while the condition held (a kill inside the window aimed at)."""
    deadline = time.monotonic() + limit
    hit_at = None
    while proc.poll() is None and time.monotonic() < deadline:
        if hit_at is None and condition():
            hit_at = time.monotonic() + extra
        if hit_at is not None and time.monotonic() >= hit_at:
            inside = condition()
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return inside
        time.sleep(0.0002)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    return False


def _assert_snapshot_consistent(home: Home) -> bool:
    """A snapshot that exists is complete (atomic: kmpwm accepts it) and equals the fold of the
    journal up to its offset.  Returns whether one exists."""
    from kmpwm.storage.paths import resolve
    from kmpwm.storage.store import Store

    if not home.snapshot.exists():
        return False
    view = Store(resolve(str(home.path)))._read_snapshot()
    assert view is not None, "the snapshot on disk is torn or stale: kmpwm ignores it (the write was not atomic)"
    expected, _ = fold_bytes(home.journal.read_bytes()[: view.offset])
    assert {i: t["state"] for i, t in view.state["tasks"].items()} == {
        i: t["state"] for i, t in expected["tasks"].items()
    }, "the snapshot differs from the journal it covers"
    return True


def test_kill_during_snapshot_write(chome, monkeypatch):
    ids = _build_big_tail(chome, monkeypatch)
    rng = random.Random(SEED)
    reported: set[str] = set()
    inside = written = 0
    rounds = max(12, trials_from_env(30) // 3)
    n = 0
    while n < rounds or (inside < 3 and n < rounds * 3):
        n += 1
        kind = rng.choice(["inspect", "enqueue", "events"])
        if kind == "inspect":
            proc = chome.spawn("inspect-queue", "--json")
        elif kind == "events":
            proc = chome.spawn("events", "--json")
        else:
            proc = chome.spawn("enqueue", f"new{n}", "cw", "--delay", "1h", "--json")
        if rng.random() < 0.75:
            inside += _kill_when(
                proc, lambda: bool(_snapshot_tmp(chome)), extra=rng.choice([0, 0, 0.0005, 0.002, 0.005])
            )
        else:
            time.sleep(rng.uniform(0, 0.6))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        out, err = collect(proc)
        assert b"Traceback" not in err
        if kind == "enqueue" and b'"SUCCESS"' in out:
            reported.add(f"new{n}")
        # the journal always opens, and every view equals a fresh fold of it
        doc, rc, err = chome.json("doctor")
        assert rc == 0 and doc["healthy"] and not doc["journal"]["damage"], (rc, err, doc and doc["journal"])
        if _assert_snapshot_consistent(chome):
            written += 1
        view, rc, err = chome.json("inspect-queue", "--all")
        assert rc == 0, err
        state, scan = chome.fold()
        assert {t["id"]: t["state"] for t in view["tasks"]} == {i: t["state"] for i, t in state["tasks"].items()}
        assert ids | reported <= set(state["tasks"])
        if chome.snapshot.exists():
            _assert_snapshot_consistent(chome)
            os.unlink(chome.snapshot)  # re-arm: the next command writes it again
    assert inside >= 3, f"only {inside} kill(s) in {n} rounds landed inside a snapshot write"


# -- a kill during compaction ----------------------------------------------------------------


def _build_history(home: Home, monkeypatch, n: int = 2000) -> None:
    """A journal of a few thousand records: single enqueues (one record each), chains, a cancel,
    then a run-due pass so that there are claims, results and finished tasks."""
    from kmpwm import Scheduler, TaskRequest
    from kmpwm.core import triggers
    from kmpwm.storage import journal as journal_mod

    with monkeypatch.context() as m:
        m.setattr(journal_mod, "_datasync", lambda fd: None)
        s = Scheduler(home=str(home.path))
        for i in range(n):
            due = i % 10 == 0
            s.enqueue(f"h{i}", None if due else triggers.OneTime(3600), "cw" if i % 3 else "pw")
        for c in range(5):
            s.begin_with([TaskRequest("cw"), TaskRequest("pw")]).then(TaskRequest("cw")).with_id(f"hc{c}").enqueue()
        s.cancel(*[f"h{i}" for i in range(1, 200, 7)])
    doc, rc, err = home.json("run-due", "--parallel", "4")
    assert rc == 0, err
    assert len(doc["ran"]) >= n // 10


def _compaction_tmp(home: Home) -> list[str]:
    try:
        return [x for x in os.listdir(home.journal_dir) if x.startswith(".journal.log.") and x.endswith(".tmp")]
    except FileNotFoundError:
        return []


def test_kill_during_compaction(chome, monkeypatch):
    _build_history(chome, monkeypatch)
    base_state, _ = chome.fold()
    baseline = {i: (t["state"], t["finished_at"], t["attempts"]) for i, t in base_state["tasks"].items()}
    starts_before, _, _ = chome.runs()
    ran_before = {s.id for s in starts_before}
    rng = random.Random(SEED + 1)
    reported: set[str] = set()
    gens = set()
    inside = completed = 0
    rounds = max(8, trials_from_env(30) // 4)
    n = 0
    while n < rounds or (inside < 3 and n < rounds * 4):
        n += 1
        proc = chome.spawn("compact", "--json")
        enq = None
        if rng.random() < 0.5:
            enq = chome.spawn("enqueue", f"during{n}", "cw", "--delay", "1h", "--json")
        mode = rng.choice(["tmp", "tmp", "time", "never"])
        if mode == "tmp":
            inside += _kill_when(
                proc, lambda: bool(_compaction_tmp(chome)), extra=rng.choice([0, 0, 0.0005, 0.001, 0.002, 0.005, 0.02])
            )
        elif mode == "time":
            time.sleep(rng.uniform(0, 1.0))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        out, err = collect(proc, timeout=120)
        assert b"Traceback" not in err
        if proc.returncode == 0:
            completed += 1
        else:
            assert proc.returncode == -signal.SIGKILL, err
        if enq is not None:
            eout, eerr = collect(enq, timeout=120)
            assert enq.returncode == 0, eerr
            reported.add(f"during{n}")
        # either the old journal or the new one, never missing a task
        doc, rc, err = chome.json("doctor")
        assert rc == 0 and doc["healthy"] and not doc["journal"]["damage"] and not doc["journal"]["torn_tail"], (
            rc,
            err,
        )
        gens.add(doc["journal"]["generation"])
        state, _ = chome.fold()
        now = {i: (t["state"], t["finished_at"], t["attempts"]) for i, t in state["tasks"].items()}
        missing = {i: v for i, v in baseline.items() if now.get(i) != v}
        assert not missing, f"after a killed compaction ({mode}) tasks changed or vanished: {list(missing.items())[:5]}"
        assert reported <= set(now), reported - set(now)
        view, rc, err = chome.json("inspect-queue", "--all")
        assert rc == 0 and {t["id"]: t["state"] for t in view["tasks"]} == {i: v[0] for i, v in now.items()}
    assert inside >= 3, f"only {inside} kill(s) in {n} rounds landed while the new journal was being written"
    # finally: nothing recorded as done runs again; what is due runs once
    doc, rc, err = chome.json("run-due", "--parallel", "4")
    assert rc == 0, err
    starts, _, _ = chome.runs()
    counts: dict[str, int] = {}
    for s in starts:
        counts[s.id] = counts.get(s.id, 0) + 1
    again = sorted(i for i in ran_before if counts.get(i, 0) > 1)
    assert not again, f"tasks that had SUCCEEDED before the compactions ran again: {again[:10]}"


def test_killed_rewrites_leave_no_temp_files_behind(chome, monkeypatch):
    """A SIGKILL during an atomic rewrite leaves its temp file (a full copy of the journal or of
    the state); the next compaction, or doctor --repair, must clean up what dead processes left,
    or every crash leaks a journal-sized file in journal/."""
    _build_history(chome, monkeypatch, n=1500)
    rng = random.Random(SEED + 2)
    for _ in range(12):
        proc = chome.spawn("compact", "--json")
        _kill_when(proc, lambda: bool(_compaction_tmp(chome)), extra=rng.choice([0, 0.0005, 0.001, 0.002]))
        collect(proc)
        if len(_compaction_tmp(chome)) >= 2:
            break
    left = _compaction_tmp(chome)
    if not left:
        pytest.skip("no kill landed inside the rewrite this time")
    size = sum((chome.journal_dir / x).stat().st_size for x in left)
    doc, rc, err = chome.json("compact")
    assert rc == 0, err
    doc, rc, err = chome.json("doctor", "--repair")
    assert rc == 0, err
    still = _compaction_tmp(chome) + _snapshot_tmp(chome)
    assert not still, (
        f"{len(left)} temp file(s) of killed compactions ({size} bytes) were never removed, "
        f"even by a later compact and doctor --repair: {still}"
    )


def test_runner_deaths_do_not_fail_tasks_that_never_started(chome):
    """README: a task is quarantined (FAILED) after its run-due died 3 times while holding it.
    run-due claims tasks ahead of free slots once it has seen quick runs; when it is killed (OOM,
    a reboot, a systemd timeout) the tasks it had only claimed never ran.  Three such deaths must
    not turn innocent, never-started tasks into FAILED work."""
    for i in range(12):
        doc, rc, err = chome.json("enqueue", f"q{i:02d}", "cw", "--input", "sleep=2")
        assert rc == 0, err
    claimed_ahead = set()
    for death in range(3):
        for j in range(4):  # quick runs first (qos high): run-due then claims the slow ones ahead
            doc, rc, err = chome.json("enqueue", f"quick{death}-{j}", "cw", "--qos", "high")
            assert rc == 0, err
        seen = {s.id for s in chome.runs()[0]}
        proc = chome.spawn("run-due", "--parallel", "1", "--json")
        _kill_when(
            proc,
            lambda: any(s.id.startswith("q0") or s.id.startswith("q1") for s in chome.runs()[0] if s.id not in seen),
            extra=0.05,
        )
        collect(proc)
        assert proc.returncode == -signal.SIGKILL
        state, _ = chome.fold()
        started = {s.id for s in chome.runs()[0]}
        claimed_ahead |= {i for i, t in state["tasks"].items() if t["state"] == "RUNNING" and i not in started}
    starts, _, _ = chome.runs()
    started = {s.id for s in starts}
    doc, rc, err = chome.json("run-due", "--parallel", "12")
    assert rc == 0, err
    state, _ = chome.fold()
    lost = {i: t["reason"] for i, t in state["tasks"].items() if i not in started and t["state"] != "SUCCEEDED"}
    assert not lost, (
        f"{len(lost)} task(s) whose worker never started were FAILED by the deaths of runners "
        f"that had only claimed them (claimed ahead: {sorted(claimed_ahead)}): {sorted(lost.items())[:3]}"
    )


def test_runner_deaths_between_claim_and_start_do_not_quarantine_the_task(chome):
    """A run-due killed after its claim was recorded but before it started the worker
    (``KMPWM_CRASH_AT=before-start``), four times in a row: the task never ran, so none of
    these deaths is its crash; it must not be quarantined, and the next run-due runs it."""
    doc, rc, err = chome.json("enqueue", "nq", "cw")
    assert rc == 0, err
    for death in range(4):
        proc = chome.spawn("run-due", "--json", env={"KMPWM_CRASH_AT": "before-start"})
        _, err = collect(proc, timeout=60)
        state, _ = chome.fold()
        t = state["tasks"]["nq"]
        assert t["state"] == "RUNNING", f"after {death} runner death(s) before its start: {t['state']} {t['reason']}"
        assert proc.returncode == -signal.SIGKILL, (death, proc.returncode, err)
        ex, rc, err = chome.json("explain", "nq")  # explain reads the start marks as run-due does
        assert rc == 0 and ex["code"] == "due" and ex["details"]["worker_started"] is False, (ex, err)
        assert "before it started the worker (not counted as a crash)" in ex["reason"], ex
    assert not _starts(chome, "nq")
    doc, rc, err = chome.json("run-due", "--json")
    assert rc == 0, err
    assert [(r["id"], r["status"]) for r in doc["ran"]] == [("nq", "SUCCESS")], doc
    state, _ = chome.fold()
    assert state["tasks"]["nq"]["state"] == "SUCCEEDED", state["tasks"]["nq"]


def test_runner_deaths_while_the_worker_ran_still_quarantine_the_task(chome):
    """The other side: a run-due killed three times in a row while the task's worker ran (a
    worker that brings its runner down) quarantines the task: FAILED with the reason."""
    doc, rc, err = chome.json("enqueue", "cq", "cw", "--input", "sleep=30")
    assert rc == 0, err
    for death in range(3):
        proc = chome.spawn("run-due", "--json")
        inside = _kill_when(proc, lambda n=death: len(_starts(chome, "cq")) > n, extra=0.3)
        collect(proc)
        assert inside and proc.returncode == -signal.SIGKILL, (death, proc.returncode)
        ex, rc, err = chome.json("explain", "cq")
        assert rc == 0 and ex["details"].get("worker_started") is True, (death, ex, err)
        assert f"(crash {death + 1} of 3 before quarantine)" in ex["reason"], ex
    doc, rc, err = chome.json("run-due", "--json")
    assert rc == 0, err
    state, _ = chome.fold()
    t = state["tasks"]["cq"]
    assert t["state"] == "FAILED" and t["reason"].startswith("quarantined"), t
    assert len(_starts(chome, "cq")) == 3


LEAVER_SH = r"""#!/bin/bash
# starts a background job, notes its pid, then works until killed
sleep 300 &
printf '%s %s\n' "$!" "$$" >> "$CRASH_RUNLOG.children"
sleep 300
"""


def _pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2 :].startswith(("Z", "X"))


@pytest.mark.parametrize("worker", ["sh", "py"])
def test_background_jobs_of_a_killed_runs_workers_are_killed_by_the_next_run(chome, worker):
    """Issue 13 (leftover processes): run-due is SIGKILLed while a worker that started a
    background job runs.  The worker dies with run-due (PR_SET_PDEATHSIG); its background job
    must not keep running beside the re-run: the next run-due kills what is left of the group."""
    script = chome.path / "leaver.sh"
    script.write_text(LEAVER_SH)
    os.chmod(script, 0o700)
    (chome.pylib / "leaverpy.py").write_text(
        "import os, subprocess, time\n"
        "def work(input):\n"
        "    p = subprocess.Popen(['sleep', '300'])\n"
        "    with open(os.environ['CRASH_RUNLOG'] + '.children', 'a') as fh:\n"
        "        fh.write(f'{p.pid} {os.getpid()}\\n')\n"
        "    time.sleep(300)\n"
    )
    cfg = chome.path / "config.toml"
    cfg.write_text(
        f'[workers.leaver]\ncommand = ["/bin/bash", "{script}"]\n[workers.leaverpy]\nentry = "leaverpy:work"\n'
    )
    os.chmod(cfg, 0o600)
    children = Path(str(chome.runlog) + ".children")
    _, rc, err = chome.json("enqueue", "left", "leaver" if worker == "sh" else "leaverpy", "--timeout", "3s")
    assert rc == 0, err
    proc = chome.spawn("run-due", "--grace", "1s")
    deadline = time.monotonic() + 60
    while not children.exists() or not children.read_text().strip():
        assert time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.05)
    proc.kill()
    collect(proc)
    child, leader = map(int, children.read_text().split()[:2])
    deadline = time.monotonic() + 10
    while not _pid_gone(leader):  # PR_SET_PDEATHSIG
        assert time.monotonic() < deadline, "the worker outlived its run-due"
        time.sleep(0.05)
    assert not _pid_gone(child)  # what the fix is for: nothing else ends it
    chome.json("run-due", "--grace", "1s")  # re-claims the orphaned task (it expires again: 3 s)
    deadline = time.monotonic() + 10
    while not _pid_gone(child):
        assert time.monotonic() < deadline, f"the killed run's background job {child} is still running"
        time.sleep(0.05)


def _overlaps(home: Home, tid: str) -> list[str]:
    """Runs of ``tid`` that started while an earlier run of it was still going: a run that has
    no done line counts as going until its process is gone (it was killed, or it still runs)."""
    starts, dones, _ = home.runs()
    starts = sorted((s for s in starts if s.id == tid), key=lambda s: s.t)
    done_at = {d.pid: d.t for d in dones if d.id == tid}
    out = []
    for a, b in zip(starts, starts[1:]):
        end = done_at.get(a.pid)
        if end is not None and b.t < end:
            out.append(f"pid {a.pid} ran {a.t:.6f}..{end:.6f} and pid {b.pid} started at {b.t:.6f}")
        elif end is None and not _pid_gone(a.pid):
            out.append(f"pid {a.pid} (started {a.t:.6f}) is still running beside pid {b.pid}")
    return out


def test_command_worker_whose_run_due_died_starting_it_never_runs_beside_the_rerun(chome):
    """Issue 13.11 (task b25 ran twice at once under load): run-due is SIGKILLed after it forked
    a command worker but before ``setpriv`` armed the death signal and before run-due noted the
    worker's process group (``KMPWM_CRASH_AT=command-fork`` kills it exactly there).  Nothing
    kills that worker when run-due dies, and the task's lease names a dead runner: the next
    run-due must kill the orphan (and what it started) before it runs the task again."""
    doc, rc, err = chome.json("enqueue", "b25", "cw", "--input", "sleep=4")
    assert rc == 0, err
    proc = chome.spawn("run-due", "--json", env={"KMPWM_CRASH_AT": "command-fork"})
    _, err = collect(proc, timeout=60)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, err)
    _wait(lambda: _starts(chome, "b25"), "the orphaned worker to start")
    orphan = _starts(chome, "b25")[0]
    assert not _pid_gone(orphan.pid)  # the window: the worker outlived its run-due
    doc, rc, err = chome.json("run-due", "--json")
    assert rc == 0, err
    assert [(r["id"], r["status"]) for r in doc["ran"]] == [("b25", "SUCCESS")], doc
    runs = _starts(chome, "b25")
    assert len(runs) == 2, runs
    _wait(lambda: _pid_gone(orphan.pid), "the orphan to end", timeout=10)
    time.sleep(max(0.0, orphan.t + 4.5 - time.time()))  # past the time an unkilled orphan would finish
    assert not _overlaps(chome, "b25"), _overlaps(chome, "b25")
    done = [d for d in chome.runs()[1] if d.id == "b25" and d.pid == orphan.pid]
    assert not done, f"the orphaned first run finished at {done[0].t:.6f}, after the re-run started at {runs[1].t:.6f}"
    state, _ = chome.fold()
    assert state["tasks"]["b25"]["state"] == "SUCCEEDED"


def test_command_worker_still_before_its_exec_when_its_run_due_died_is_killed_by_the_next_run(chome):
    """The same window, with the orphan still between its fork and its exec when the next
    run-due looks (a child descheduled on a loaded machine): it is still a copy of the dead
    run-due, with no environment of its own yet.  The next run-due must find it (by the name
    run-due gave it for the start) and kill it, so that it never goes on to run the task beside
    the re-run."""
    doc, rc, err = chome.json("enqueue", "b26", "cw", "--input", "sleep=1")
    assert rc == 0, err
    hold = chome.path / "go-on"
    env = {"KMPWM_CRASH_AT": "command-fork-hold", "KMPWM_CRASH_HOLD": str(hold)}
    proc = chome.spawn("run-due", "--json", env=env)
    _, err = collect(proc, timeout=60)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, err)
    doc, rc, err = chome.json("run-due", "--json")
    assert rc == 0, err
    assert [(r["id"], r["status"]) for r in doc["ran"]] == [("b26", "SUCCESS")], doc
    hold.write_text("")  # an orphan still waiting would now exec and run the task a second time
    time.sleep(1.0)
    runs = _starts(chome, "b26")
    assert len(runs) == 1, f"the task ran {len(runs)} times: {runs}"
    state, _ = chome.fold()
    assert state["tasks"]["b26"]["state"] == "SUCCEEDED"


@pytest.mark.parametrize("how", ["exec", "fork"])
def test_background_job_of_a_forked_python_worker_whose_run_due_died_starting_it_is_killed(chome, how):
    """Issue 13: a Python worker forked for its task (KMPWM_POOL=0) starts a background job (an
    exec'd program, or a forked copy of itself), and run-due is SIGKILLed right after the fork,
    before it noted the worker's process group (``KMPWM_CRASH_AT=python-fork`` kills it exactly
    there, once the job has started).  The worker dies with run-due; the job must not outlive
    the next run-due's start, or it would run beside the task's re-run."""
    hold = chome.path / "bg-started"
    env = {"KMPWM_POOL": "0", "KMPWM_CRASH_HOLD": str(hold)}
    doc, rc, err = chome.json("enqueue", "b27", "pw", "--input", f"bg=4,{how}")
    assert rc == 0, err
    proc = chome.spawn("run-due", "--json", env={**env, "KMPWM_CRASH_AT": "python-fork"})
    _, err = collect(proc, timeout=60)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, err)
    job = int(hold.read_text())
    assert not _pid_gone(job)  # the window: the job outlived its run-due
    hold.unlink()
    doc, rc, err = chome.json("run-due", "--json", env=env)
    assert rc == 0, err
    assert [(r["id"], r["status"]) for r in doc["ran"]] == [("b27", "SUCCESS")], doc
    _wait(lambda: _pid_gone(job), "the left-behind job to end", timeout=10)
    time.sleep(4.5)  # past the time an unkilled job would write
    done = Path(f"{hold}.bg")
    finished = done.read_text().split() if done.exists() else []
    assert str(job) not in finished, f"the job left by the killed run-due ({job}) ran to its end"


# -- leases and claims on a real desktop: stopped runners, clocks that jump, overlapping runners ------------


def _wait(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _starts(home: Home, tid: str) -> list:
    return [s for s in home.runs()[0] if s.id == tid]


def test_stopped_runner_keeps_its_lease_whatever_the_clock_says(chome):
    """Issue 13.1: a run-due stopped mid-task (Ctrl-Z / SIGSTOP, or a laptop suspended) while the
    wall clock moves on (NTP steps it, or another runner's clock is off): the lease's end on the
    wall clock has passed, but its holder on this host is alive, and its worker may still run.
    No other run-due may start the task again, whatever its clock says; every view says RUNNING;
    once resumed, the first runner records its result and the task ran exactly once."""
    trials = max(1, trials_from_env(30) // 15)
    for n in range(trials):
        tid = f"long{n}"
        doc, rc, err = chome.json("enqueue", tid, "cw", "--input", "sleep=1.5")
        assert rc == 0, err
        first = chome.spawn("run-due", "--json")
        _wait(lambda: _starts(chome, tid), f"{tid} to start")
        os.kill(first.pid, signal.SIGSTOP)
        try:
            for offset in ("+2h", "+1d", "-1h"):  # far past the lease's end, and back before its start
                doc, rc, err = chome.json("run-due", faketime=offset)
                assert rc == 0, err
                assert tid not in [r["id"] for r in doc["ran"]], (offset, doc)
                assert len(_starts(chome, tid)) == 1, f"run-due at {offset} started {tid} beside its stopped runner"
                doc, rc, err = chome.json("inspect-queue", tid, faketime=offset)
                assert rc == 0 and doc["tasks"][0]["state"] == "RUNNING", (offset, doc, err)
                doc, rc, err = chome.json("explain", tid, faketime=offset)
                assert rc == 0 and doc["code"] == "lease" and "(stopped" in doc["reason"], (offset, doc, err)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        out, err = collect(first, timeout=60)
        assert first.returncode == 0, err
        assert [(r["id"], r["status"]) for r in crashlib.orjson.loads(out)["ran"]] == [(tid, "SUCCESS")]
        state, _ = chome.fold()
        assert state["tasks"][tid]["state"] == "SUCCEEDED"
        assert len(_starts(chome, tid)) == 1
        crashlib.count("stopped-runners")
    doc, rc, err = chome.json("events")
    assert rc == 0 and not [e for e in doc["events"] if e["event"] in ("stale-result", "runner-lost")], doc


def test_runners_on_different_clocks_run_each_task_once(chome):
    """Issue 13.1 and 13.10: run-due processes at once on clocks an hour behind, right, ten minutes
    and two hours and a day ahead (faketime): every task runs exactly once and succeeds; none
    is taken from a live runner because another runner's clock says its lease ended, and work
    enqueued "now" on the right clock is due now on the clock an hour behind too."""
    import threading

    rounds = max(1, trials_from_env(30) // 15)
    offsets = ["-1h", "+0", "+10m", "+2h", "+1d"]
    total = 0
    for rnd in range(rounds):
        ids = [f"c{rnd}-{i:02d}" for i in range(30)]
        for i, tid in enumerate(ids):
            worker = ("cw", "pw")[i % 2]
            doc, rc, err = chome.json("enqueue", tid, worker, "--input", f"sleep={0.05 * (i % 5):.2f}")
            assert rc == 0, err
        total += len(ids)
        errors: list = []

        def loop(offset: str) -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                proc = chome.run("run-due", "--parallel", "3", faketime=offset)
                if proc.returncode != 0:
                    errors.append((offset, proc.returncode, proc.stderr_text[-500:]))
                    return
                state, _ = chome.fold()
                if all(state["tasks"][t]["state"] == "SUCCEEDED" for t in ids):
                    return

        threads = [threading.Thread(target=loop, args=(o,)) for o in offsets]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        state, _ = chome.fold()
        assert {t: state["tasks"][t]["state"] for t in ids if state["tasks"][t]["state"] != "SUCCEEDED"} == {}
        starts = [s.id for s in chome.runs()[0]]
        twice = sorted({t for t in ids if starts.count(t) > 1})
        assert not twice, f"{len(twice)} task(s) ran twice with runners on clocks {offsets}: {twice[:5]}"
    crashlib.count("clock-skew-tasks", total)
