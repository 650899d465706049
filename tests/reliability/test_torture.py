"""Concurrency torture (SPEC section 6 run-due: "Concurrent run-due processes never run the same
occurrence of a task at once"; README "Exactly once"): many run-due processes, enqueuers and a
compactor at once over tasks and chains with parallel steps — zero duplicates, zero losses, every
chain in step order.  Plus two races pinned down on their own: a task that a runner has claimed
ahead (prefetched) but not started yet, and that is then cancelled, must not start afterwards; and
readers without the lock must see a consistent journal while compaction replaces it.

Fast tier: 200 tasks and 20 chains, 4 run-due loops and 2 enqueuers (``KMPWM_TORTURE_SCALE``
multiplies the sizes; ``python scripts/torture.py`` runs the full 1,000 tasks / 100 chains with
8 run-due loops and 4 enqueuers).
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest
from crashlib import Home, Tally, check_runs_against_state, collect, count, torture, trials_from_env

SCALE = float(os.environ.get("KMPWM_TORTURE_SCALE", "1"))


@pytest.fixture
def thome(tmp_path) -> Home:
    home = Home(tmp_path / "torture-home")
    home.install_workers()
    return home


def test_concurrency_torture(thome):
    result = torture(
        thome,
        tasks=int(200 * SCALE),
        chains=int(20 * SCALE),
        runners=4,
        enqueuers=2,
        seed=int(os.environ.get("KMPWM_TORTURE_SEED", "7")),
    )
    figures, tally = result.figures, result.tally
    assert figures["duplicates"] == 0 and figures["losses"] == 0 and figures["order_violations"] == 0, figures
    assert not tally.violations, "\n".join([str(figures)] + tally.violations[:40])


def _wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _started(home: Home, tid: str) -> list:
    return [s for s in home.runs()[0] if s.id == tid]


def test_cancelled_task_claimed_ahead_never_starts(thome):
    """run-due claims tasks ahead of free slots (it prefetches once it has seen how long runs take).
    A task cancelled while it waits in that queue was reported cancelled, durably: it must not
    start afterwards."""
    for tid in ("f1", "f2", "f3", "f4"):  # quick runs first: run-due then claims ahead
        doc, rc, err = thome.json("enqueue", tid, "cw")
        assert rc == 0, err
    for tid in ("q1", "q2", "q3"):
        doc, rc, err = thome.json("enqueue", tid, "cw", "--input", "sleep=1")
        assert rc == 0, err
    runner = thome.spawn("run-due", "--parallel", "1", "--json")
    _wait_for(lambda: _started(thome, "q1"), what="q1 to start")
    state, _ = thome.fold()
    claimed_ahead = state["tasks"]["q3"]["state"] == "RUNNING" and not _started(thome, "q3")
    doc, rc, err = thome.json("cancel", "q3")
    assert rc == 0 and doc["cancelled"] == ["q3"], err
    cancelled_at = time.time()
    out, err = collect(runner, timeout=60)
    assert runner.returncode == 0, err
    late = [s for s in _started(thome, "q3") if s.t > cancelled_at]
    assert not late, (
        f"q3 was cancelled (durably, `kmpwm cancel` exit 0) at {cancelled_at:.3f} and then started "
        f"{late[0].t - cancelled_at:.3f}s later by the run-due that had claimed it ahead "
        f"(claimed ahead: {claimed_ahead})"
    )
    state, _ = thome.fold()
    assert state["tasks"]["q3"]["state"] == "CANCELLED"


# A worker that stops cleanly on SIGTERM (after a short linger) and logs its end either way, so that
# every run has a known interval; its ``sleep`` runs in the background (left to the group kill).
STOPPABLE_SH = r"""#!/bin/bash
printf 'start %s %s %s %s\n' "$KMPWM_TASK_ID" "$KMPWM_ATTEMPT" "$$" "$EPOCHREALTIME" >> "$CRASH_RUNLOG"
done_() { printf 'done %s %s %s %s\n' "$KMPWM_TASK_ID" "$KMPWM_ATTEMPT" "$$" "$EPOCHREALTIME" >> "$CRASH_DONELOG"; }
trap 'sleep 0.2; done_; exit 0' TERM
sleep "${KMPWM_INPUT#sleep=}" &
wait $!
done_
"""


def test_replace_and_cancel_storm_never_overlaps_runs_of_one_id(thome):
    """Issue 13.5: cancel and ``--policy replace`` of RUNNING tasks while run-due loops run them.
    A cancel reaches the running worker (SIGTERM; it exits 0 after a linger, which must not count),
    and no run of an id starts before the previous run of that id has ended: zero overlaps, no run
    after a task was recorded finished, every replacing task run to the end."""
    script = thome.path / "stoppable.sh"
    script.write_text(STOPPABLE_SH)
    os.chmod(script, 0o700)
    cfg = thome.path / "config.toml"
    cfg.write_text(f'[workers.st]\ncommand = ["/bin/bash", "{script}"]\n')
    os.chmod(cfg, 0o600)
    rng = random.Random(int(os.environ.get("KMPWM_TORTURE_SEED", "13")))
    ids = [f"u{i}" for i in range(3)]
    last: dict[str, str] = {}
    failures: list[str] = []
    stop = threading.Event()

    def runner() -> None:
        while not stop.is_set():
            doc, rc, err = thome.json("run-due", "--grace", "3s", "--parallel", "2", timeout=300)
            if rc != 0 or "Traceback" in err:
                failures.append(f"run-due exited {rc}: {err[-800:]}")
            if doc is not None and not doc.get("ran"):
                stop.wait(rng.uniform(0.1, 0.3))

    threads = [threading.Thread(target=runner) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(int(30 * SCALE)):
            tid = rng.choice(ids)
            if rng.random() < 0.75:
                doc, rc, err = thome.json(
                    "enqueue", tid, "st", "--policy", "replace", "--input", f"sleep={rng.uniform(0.3, 1.5):.2f}"
                )
                last[tid] = "replace"
            else:
                doc, rc, err = thome.json("cancel", tid)
                if doc and tid in doc.get("cancelled", ()):
                    last[tid] = "cancel"  # (a task already finished stays as it ended)
            if rc != 0:
                failures.append(f"{tid}: exit {rc}: {err}")
            time.sleep(rng.uniform(0.1, 0.5))
    finally:
        stop.set()
        for t in threads:
            t.join()
    for _ in range(20):  # drain
        doc, rc, err = thome.json("run-due", "--grace", "3s")
        assert rc == 0, err
        state, _ = thome.fold()
        if all(t["state"] not in ("ENQUEUED", "RUNNING") for t in state["tasks"].values()):
            break
        time.sleep(0.3)
    assert not failures, failures[:5]
    state, _ = thome.fold()
    starts, dones, bad = thome.runs()
    assert bad == 0
    tally = Tally()
    check_runs_against_state(state, starts, dones, tally)
    ended = {(d.id, d.pid) for d in dones}
    tally.check(all((s.id, s.pid) in ended for s in starts), "a run has no end line (killed, not stopped)")
    for tid, action in last.items():
        want = "SUCCEEDED" if action == "replace" else "CANCELLED"
        tally.check(state["tasks"][tid]["state"] == want, f"{tid}: {state['tasks'][tid]['state']}, expected {want}")
    assert not tally.violations, tally.violations[:20]
    assert tally.checks > len(starts) // 2


def test_readers_see_a_consistent_journal_while_compaction_runs(kmpwm_home, monkeypatch):
    """SPEC 2: "a reader never needs the lock to see a consistent state".  Readers (what
    inspect-queue and the start of run-due do: snapshot plus tail, no lock) race a compactor that
    replaces the journal and the snapshot, and an enqueuer.  No reader may see damage that is not
    there (run-due would refuse to run, exit 74) or miss a task."""
    import threading

    from kmpwm import Scheduler
    from kmpwm.core import triggers
    from kmpwm.storage import journal as journal_mod
    from kmpwm.storage.compaction import compact
    from kmpwm.storage.paths import resolve
    from kmpwm.storage.store import Store

    monkeypatch.setattr(journal_mod, "_datasync", lambda fd: None)  # speed: durability is not the point here
    s = Scheduler(home=str(kmpwm_home))
    base = [f"t{i}" for i in range(300)]
    with s.batch():
        for tid in base:
            s.enqueue(tid, triggers.OneTime(3600), "echo")
    paths = resolve(str(kmpwm_home))
    compact(paths)
    stop = time.monotonic() + 4.0 * SCALE
    bad: list[str] = []
    counts = {"loads": 0, "compactions": 0}

    def compactor():
        while time.monotonic() < stop:
            compact(paths)
            counts["compactions"] += 1

    def enqueuer():
        s2, n = Scheduler(home=str(kmpwm_home)), 0
        while time.monotonic() < stop:
            s2.enqueue(f"x{n}", triggers.OneTime(3600), "echo")
            n += 1
            time.sleep(0.002)

    def reader():
        while time.monotonic() < stop:
            view = Store(paths).load()
            counts["loads"] += 1
            if view.damage:
                bad.append(f"phantom damage: {view.damage[0].describe()}")
            missing = [t for t in base if t not in view.state["tasks"]]
            if missing:
                bad.append(f"{len(missing)} task(s) missing, e.g. {missing[0]}")

    threads = [threading.Thread(target=f) for f in (compactor, enqueuer, reader, reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts["compactions"] > 5 and counts["loads"] > 50, counts
    assert not bad, (
        f"{len(bad)} of {counts['loads']} unlocked reads during {counts['compactions']} compactions "
        f"were inconsistent: {bad[:3]}"
    )


def test_overlapping_runners_run_each_event_occurrence_once(thome, tmp_path):
    """Issue 13.2: run-due processes that overlap each plan a queue and claim from it for a while;
    an on-change or ``--when`` task stays due (ENQUEUED, due "now") after it ran, so a runner that
    planned before the run finished would claim it again from its stale queue.  Every claim names
    the occurrence it consumes (the contents it saw; the entry into the device state) and neither
    the claim nor the fold accepts one already consumed: with 4 overlapping runners (``--parallel
    1``, so that each works through a queue), each change and each entry runs exactly once."""
    rounds = max(2, trials_from_env(30) // 10)
    files = [tmp_path / f"watched{i}" for i in range(6)]
    assume = {"KMPWM_ASSUME": "battery=10"}  # battery-low: the --when tasks' state
    for i, f in enumerate(files):
        f.write_text("0")
        doc, rc, err = thome.json("enqueue", f"chg{i}", "cw", "--on-change", str(f))
        assert rc == 0, err
        doc, rc, err = thome.json("enqueue", f"low{i}", "cw", "--when", "battery-low", env=assume)
        assert rc == 0, err
    for rnd in range(1, rounds + 1):
        if rnd > 1:  # leave battery-low (re-arms the --when tasks); nothing else is due
            doc, rc, err = thome.json("run-due", env={"KMPWM_ASSUME": "battery=90"})
            assert rc == 0 and doc["ran"] == [], (doc, err)
        time.sleep(0.02)  # a new mtime for each change
        for f in files:
            f.write_text(str(rnd))
        procs = [thome.spawn("run-due", "--parallel", "1", "--json", env=assume) for _ in range(4)]
        for p in procs:
            out, err = collect(p, timeout=120)
            assert p.returncode == 0, err
        counts = {}
        for s in thome.runs()[0]:
            counts[s.id] = counts.get(s.id, 0) + 1
        want = {f"{k}{i}": rnd for k in ("chg", "low") for i in range(len(files))}
        assert counts == want, (
            f"round {rnd}: runs per task differ from one per change / per entry into "
            f"battery-low: { {k: v for k, v in counts.items() if v != want.get(k)} }"
        )
        count("event-occurrences", len(want))
