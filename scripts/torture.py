#!/usr/bin/env python3
"""The long tier of kmpwm's reliability tests.

    python scripts/torture.py --trials 300

1. Crash injection (tests/crashlib.CrashHarness): ``--trials`` groups of 1-3 concurrent CLI
   operations (enqueue, batches, chains, cancel, run-due, compact, inspect-queue), each SIGKILLed
   at a random moment, with the invariants checked after every group and after a final drain.
   A fresh home every ``--per-home`` trials keeps each journal realistic in size.
2. Concurrency torture (tests/crashlib.torture): ``--runners`` run-due loops, ``--enqueuers``
   enqueuers and a compactor over ``--tasks`` tasks and ``--chains`` chains with parallel steps.
3. The pytest reliability files with the long settings: kills during the snapshot write and
   compaction (scaled by KMPWM_TORTURE_TRIALS), the corruption sweeps and the input fuzzing
   (``--fuzz-examples`` hypothesis examples per property); runners SIGSTOPped mid-task while
   others run on clocks hours ahead or behind, runners on five faketime offsets at once, and
   overlapping runners over on-change and ``--when`` tasks (also scaled by the trials).
4. Journal damage (tests/reliability/flipsweep.py): every bit of every byte of a small journal made through
   the CLI flipped in turn, and every byte destroyed, each followed by ``doctor.repair`` on a real
   home: every succeeded task stays succeeded; ``--flip-cli`` of those trials at random also run
   ``doctor --repair``, ``doctor`` and ``run-due`` through the command line.  ``--only-flips``
   runs just this part, ``--skip-flips`` leaves it out.

Prints a table of figures; exit status 0 only when every invariant held and every test passed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "reliability"))

import crashlib  # noqa: E402


def categorise(message: str) -> str:
    rules = [
        ("quarantined" in message or "worker started only" in message, "never-run work FAILED by runner deaths"),
        ("started again" in message, "ran again after being recorded finished"),
        ("two runs at once" in message, "two runs of one task at once"),
        (message.startswith("lost") or "is not in the journal" in message, "reported work lost"),
        ("chain" in message and ("before" in message or "not finished" in message), "chain order / chain unfinished"),
        ("stuck" in message, "stuck after draining"),
        ("Traceback" in message or "internal error" in message, "traceback / internal error"),
        ("does not open" in message or "damage" in message or "doctor" in message, "journal integrity"),
        ("differs from a fresh fold" in message, "view differs from the journal"),
        ("exited" in message, "command failed without being killed"),
    ]
    for hit, name in rules:
        if hit:
            return name
    return "other"


def run_crash(trials: int, per_home: int, seed: int, workdir: Path) -> dict:
    stats = Counter()
    checks = held = 0
    violations: list[str] = []
    done = 0
    round_no = 0
    while done < trials:
        n = min(per_home, trials - done)
        home = crashlib.Home(workdir / f"crash-{round_no}")
        home.install_workers()
        harness = crashlib.CrashHarness(home, seed=seed + round_no)
        t0 = time.monotonic()
        tally = harness.run(n)
        for key in (
            "trials",
            "ops",
            "killed",
            "completed",
            "reruns_before_record",
            "quarantined",
            "tasks",
            "chains",
            "reported_enqueues",
            "reported_chains",
        ):
            stats[key] += harness.stats.get(key, 0)
        for mode, c in harness.stats["kill_modes"].items():
            stats[f"mode:{mode}"] += c
        checks += tally.checks
        held += tally.held
        violations += [f"[seed {seed + round_no}] {v}" for v in tally.violations]
        done += n
        round_no += 1
        print(
            f"  crash round {round_no}: {n} trials in {time.monotonic() - t0:.0f}s, "
            f"{tally.checks} checks, {len(tally.violations)} violations",
            flush=True,
        )
    return {"stats": stats, "checks": checks, "held": held, "violations": violations}


def run_pytest(trials: int, fuzz_examples: int, workdir: Path) -> dict:
    counts_file = workdir / "counts.txt"
    env = dict(
        os.environ,
        KMPWM_TORTURE_TRIALS=str(trials),
        KMPWM_FUZZ_EXAMPLES=str(fuzz_examples),
        KMPWM_TORTURE_COUNTS=str(counts_file),
    )
    tests = [
        "tests/reliability/test_crash.py::test_kill_during_snapshot_write",
        "tests/reliability/test_crash.py::test_kill_during_compaction",
        "tests/reliability/test_crash.py::test_killed_rewrites_leave_no_temp_files_behind",
        "tests/reliability/test_crash.py::test_runner_deaths_do_not_fail_tasks_that_never_started",
        "tests/reliability/test_crash.py::test_background_jobs_of_a_killed_runs_workers_are_killed_by_the_next_run",
        "tests/reliability/test_corruption.py",
        "tests/reliability/test_salvage.py",
        "tests/reliability/test_fuzz_input.py",
        "tests/reliability/test_faults.py",
        "tests/reliability/test_security.py",
        "tests/reliability/test_torture.py::test_cancelled_task_claimed_ahead_never_starts",
        "tests/reliability/test_torture.py::test_replace_and_cancel_storm_never_overlaps_runs_of_one_id",
        "tests/reliability/test_torture.py::test_readers_see_a_consistent_journal_while_compaction_runs",
        "tests/reliability/test_crash.py::test_stopped_runner_keeps_its_lease_whatever_the_clock_says",
        "tests/reliability/test_crash.py::test_runners_on_different_clocks_run_each_task_once",
        "tests/reliability/test_torture.py::test_overlapping_runners_run_each_event_occurrence_once",
    ]
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *tests],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    counts = Counter()
    if counts_file.exists():
        for line in counts_file.read_text().splitlines():
            kind, n = line.split()
            counts[kind] += int(n)
    summary = next((ln for ln in reversed(proc.stdout.splitlines()) if re.search(r"\d+ (passed|failed)", ln)), "")
    failed = [ln[len("FAILED ") :] for ln in proc.stdout.splitlines() if ln.startswith("FAILED ")]
    if not summary:
        summary = "did not run: " + (proc.stdout + proc.stderr).strip()[-800:]
    return {
        "counts": counts,
        "summary": summary.strip("= "),
        "failed": failed,
        "rc": proc.returncode,
        "seconds": time.monotonic() - t0,
    }


def run_flips(workdir: Path, cli_trials: int, seed: int) -> dict:
    import random

    import flipsweep

    t0 = time.monotonic()
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):  # tens of thousands of fsyncing repairs
        workdir = Path(tempfile.mkdtemp(prefix="kmpwm-flips-", dir="/dev/shm"))
        os.chmod(workdir, 0o700)
    home = flipsweep.build(workdir / "flips-template")
    tpl = flipsweep.template(home)
    case = workdir / "flips-case"
    import shutil

    shutil.copytree(home.path, case)
    report = flipsweep.sweep(tpl, bits="all", case=case, real_every=1, seed=seed)
    rng = random.Random(seed)
    cli = flipsweep.Report()
    for _ in range(cli_trials):
        pos = rng.randrange(len(tpl.data))
        value = tpl.data[pos] ^ (1 << rng.randrange(8) if rng.random() < 0.5 else 0xFF)
        flipsweep.cli_trial(tpl, home, workdir, pos, value, cli)
    if workdir.parent == Path("/dev/shm"):
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "bytes": len(tpl.data),
        "records": len(tpl.records),
        "report": report,
        "cli": cli,
        "seconds": time.monotonic() - t0,
    }


def table(rows: list[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=300, help="crash-injection trials (default 300)")
    ap.add_argument("--per-home", type=int, default=100, help="trials per fresh home (default 100)")
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--chains", type=int, default=100)
    ap.add_argument("--runners", type=int, default=8)
    ap.add_argument("--enqueuers", type=int, default=4)
    ap.add_argument("--fuzz-examples", type=int, default=300, help="hypothesis examples per property")
    ap.add_argument("--skip-pytest", action="store_true", help="only the crash harness and the torture")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--skip-flips", action="store_true", help="leave out the journal damage sweep")
    ap.add_argument("--only-flips", action="store_true", help="only the journal damage sweep")
    ap.add_argument("--flip-cli", type=int, default=40, help="damage trials also run through the CLI (default 40)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kmpwm-torture-"))
    os.chmod(work, 0o700)
    started = time.monotonic()
    print(f"kmpwm long tier: seed {args.seed}, work directory {work}", flush=True)

    if args.only_flips:
        return _report_flips(run_flips(work, args.flip_cli, args.seed), work, args.keep, started)

    print(f"[1/3] crash injection: {args.trials} trials", flush=True)
    t0 = time.monotonic()
    crash = run_crash(args.trials, args.per_home, args.seed, work)
    crash_s = time.monotonic() - t0

    print(
        f"[2/3] concurrency torture: {args.tasks} tasks, {args.chains} chains, {args.runners} run-due, "
        f"{args.enqueuers} enqueuers, a compactor",
        flush=True,
    )
    home = crashlib.Home(work / "torture")
    home.install_workers()
    tort = crashlib.torture(
        home, tasks=args.tasks, chains=args.chains, runners=args.runners, enqueuers=args.enqueuers, seed=args.seed
    )
    f = tort.figures

    py = None
    if not args.skip_pytest:
        print(
            f"[3/3] pytest reliability files (snapshot/compaction kills x{args.trials}, corruption, "
            f"{args.fuzz_examples} examples per fuzz property, faults, security)",
            flush=True,
        )
        py = run_pytest(args.trials, args.fuzz_examples, work)

    flips = None
    if not args.skip_flips:
        print("[4/4] journal damage: every bit of every byte, then repair", flush=True)
        flips = run_flips(work, args.flip_cli, args.seed)

    s = crash["stats"]
    rows = [
        ("crash trials run", s["trials"]),
        ("  operations spawned / SIGKILLed / ran to the end", f"{s['ops']} / {s['killed']} / {s['completed']}"),
        ("  kill moments", ", ".join(f"{k[5:]} {v}" for k, v in sorted(s.items()) if k.startswith("mode:"))),
        ("  tasks / chains in the journals", f"{s['tasks']} / {s['chains']}"),
        ("  enqueues / chains reported SUCCESS", f"{s['reported_enqueues']} / {s['reported_chains']}"),
        ("  re-runs before a result was recorded (allowed)", s["reruns_before_record"]),
        ("  tasks quarantined by runner deaths", s["quarantined"]),
        ("  invariants checked / held / violated", f"{crash['checks']} / {crash['held']} / {len(crash['violations'])}"),
        ("  crash time", f"{crash_s:.0f}s"),
        ("torture tasks + chain tasks / chains", f"{f['tasks']} + {f['chain_tasks']} / {f['chains']}"),
        ("  run-due loops / enqueuers / compactions", f"{f['runners']} / {f['enqueuers']} / {f['compactions']}"),
        (
            "  runs / duplicates / losses / order violations",
            f"{f['runs']} / {f['duplicates']} / {f['losses']} / {f['order_violations']}",
        ),
        (
            "  invariants checked / held / violated",
            f"{tort.tally.checks} / {tort.tally.held} / {len(tort.tally.violations)}",
        ),
        ("  time / runs per second", f"{f['seconds']}s / {f['runs_per_second']}"),
    ]
    if py is not None:
        rows += [
            ("corruptions tried", py["counts"]["corruptions"]),
            ("inputs fuzzed", py["counts"]["inputs"]),
            ("runners SIGSTOPped mid-task while others ran at +2h/+1d/-1h", py["counts"]["stopped-runners"]),
            ("tasks run by 5 run-due at once on clocks -1h..+1d", py["counts"]["clock-skew-tasks"]),
            ("on-change/--when occurrences under 4 overlapping runners", py["counts"]["event-occurrences"]),
            ("pytest reliability files", f"{py['summary']} ({py['seconds']:.0f}s)"),
        ]
    if flips is not None:
        rows += _flip_rows(flips)
    rows.append(("total time", f"{time.monotonic() - started:.0f}s"))
    print()
    print(table(rows))
    if flips is not None:
        _flip_violations(flips)
    if crash["violations"]:
        print("\ncrash-injection violations by kind:")
        for kind, n in Counter(categorise(v.split("] ", 1)[1]) for v in crash["violations"]).most_common():
            print(f"  {n:5d}  {kind}")
        print("first violations:")
        for v in crash["violations"][:15]:
            print(f"  - {v[:300]}")
    if tort.tally.violations:
        print("\ntorture violations:")
        for v in tort.tally.violations[:15]:
            print(f"  - {v[:300]}")
    if py is not None and py["failed"]:
        print("\nfailed tests:")
        for name in py["failed"]:
            print(f"  - {name[:250]}")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    ok = not crash["violations"] and not tort.tally.violations and (py is None or py["rc"] == 0)
    ok = ok and (flips is None or not (flips["report"].violations or flips["cli"].violations))
    return 0 if ok else 1


def _flip_rows(flips: dict) -> list[tuple[str, object]]:
    r, c = flips["report"], flips["cli"]
    return [
        (
            "journal damage trials (bytes x 8 bits + destroyed)",
            f"{r.trials} over {flips['bytes']} bytes, {flips['records']} records",
        ),
        ("  invariants checked / violated", f"{r.checks} / {len(r.violations)}"),
        ("  trials after which every record was kept", r.restored),
        ("  through the CLI: trials / checks / violated", f"{c.trials} / {c.checks} / {len(c.violations)}"),
        ("  time", f"{flips['seconds']:.0f}s"),
    ]


def _flip_violations(flips: dict) -> None:
    bad = flips["report"].violations + flips["cli"].violations
    if bad:
        print("\njournal damage violations:")
        for v in bad[:15]:
            print(f"  - {v[:300]}")


def _report_flips(flips: dict, work: Path, keep: bool, started: float) -> int:
    print()
    print(table(_flip_rows(flips) + [("total time", f"{time.monotonic() - started:.0f}s")]))
    _flip_violations(flips)
    if not keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 1 if flips["report"].violations or flips["cli"].violations else 0


if __name__ == "__main__":
    sys.exit(main())
