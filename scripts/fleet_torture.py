#!/usr/bin/env python3
"""Fleet torture (SPEC section 14): three simulated hosts share one PostgreSQL queue while hosts
are SIGKILLed, database connections terminated and the server restarted; then the invariants.

    python scripts/fleet_torture.py [--tasks 1000] [--chains 100] [--periodic 20] [--seconds 60]
                                    [--trials 1] [--seed N] [--pg URL-of-a-server-we-may-restart]

Each host is ``KMPWM_HOST=a|b|c`` with its own home (config, logs) and the same store: one
``kmpwm serve`` and cron-style ``kmpwm run-due`` processes every second; host c's clock jumps
(libfaketime) between rounds.  Workers append a start and an end line (host, task, pid, uptime)
to one file.  Checked at the end, from those lines and from a replay of the store's records:

  overlap     no two runs of one task ever in flight at once (start/end lines)
  succeeded   no step or one-time task started again after a SUCCESS result was recorded
  occurrence  no occurrence of a periodic task with two accepted SUCCESS results
  lost        every one-time task and every chain SUCCEEDED
  claims      the claims the fold accepted are exactly the rows of kmpwm_claims (none refused)

Exit 0 when every invariant held in every trial; prints trials, runs and checks.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import psycopg  # noqa: E402

from kmpwm.core.state import apply, new_state  # noqa: E402

HOSTS = "abc"
WORKER = (
    'u() {{ cut -d" " -f1 /proc/uptime; }}; '
    'echo "$KMPWM_HOST $KMPWM_TASK_ID s $$ $(u)" >> {marks}; '
    "sleep 0.$((RANDOM % 3)); "
    'echo "$KMPWM_HOST $KMPWM_TASK_ID e $$ $(u)" >> {marks}'
)


def kmpwm_cmd(*args, faketime=None):
    argv = [sys.executable, "-m", "kmpwm", *args]
    return ["faketime", "-f", faketime, *argv] if faketime else argv


class Fleet:
    def __init__(self, work: Path, url: str, pgroot: Path | None, rng: random.Random):
        self.work, self.url, self.pgroot, self.rng = work, url, pgroot, rng
        self.marks = work / "marks"
        self.marks.touch()
        self.homes = {}
        for h in HOSTS:
            home = work / f"home-{h}"
            home.mkdir(mode=0o700)
            cfg = home / "config.toml"
            cmd = WORKER.format(marks=self.marks)
            cfg.write_text(f"[workers.mark]\ncommand = {json.dumps(['bash', '-c', cmd])}\n")
            os.chmod(cfg, 0o600)
            self.homes[h] = home
        self.serves: dict[str, subprocess.Popen] = {}
        self.crons: list[tuple[str, subprocess.Popen]] = []
        self.clock = {h: None for h in HOSTS}
        self.kills = self.terminations = self.restarts = 0

    def env(self, h):
        env = dict(os.environ, KMPWM_HOME=str(self.homes[h]), KMPWM_STORE=self.url, KMPWM_HOST=h)
        env.update(KMPWM_LEASE="8s", KMPWM_LOCK_TIMEOUT="30", PYTHONPATH=str(ROOT))
        return env

    def kmpwm(self, h, *args, check=True):
        r = subprocess.run(kmpwm_cmd(*args), env=self.env(h), capture_output=True, text=True, timeout=300)
        if check and r.returncode != 0:
            raise RuntimeError(f"kmpwm {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
        return r

    def start_serve(self, h):
        self.serves[h] = subprocess.Popen(
            kmpwm_cmd("serve", "--parallel", "4", "--grace", "1s", faketime=self.clock[h]),
            env=self.env(h),
            stdout=subprocess.DEVNULL,
            stderr=open(self.work / f"serve-{h}.log", "a"),
            start_new_session=True,
        )

    def cron_tick(self):
        self.crons = [(h, p) for h, p in self.crons if p.poll() is None]
        for h in HOSTS:
            if sum(1 for x, _ in self.crons if x == h) < 2:
                p = subprocess.Popen(
                    kmpwm_cmd("run-due", "--parallel", "3", "--grace", "1s", faketime=self.clock[h]),
                    env=self.env(h),
                    stdout=subprocess.DEVNULL,
                    stderr=open(self.work / f"cron-{h}.log", "a"),
                    start_new_session=True,
                )
                self.crons.append((h, p))

    def kill_host(self, h):
        """A host dies: its serve and its run-dues, with their workers (whole process groups)."""
        victims = [p for x, p in self.crons if x == h] + ([self.serves[h]] if h in self.serves else [])
        for p in victims:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        self.crons = [(x, p) for x, p in self.crons if x != h]
        self.kills += 1
        self.start_serve(h)

    def terminate_backends(self):
        with psycopg.connect(self.url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'kmpwm' AND pid <> pg_backend_pid()"
            ).fetchall()
        self.terminations += sum(1 for (ok,) in rows if ok)

    def restart_server(self):
        if self.pgroot is None:
            return
        subprocess.run([sys.executable, str(ROOT / "scripts/pgcluster.py"), "stop", str(self.pgroot)], check=True)
        time.sleep(self.rng.uniform(0.2, 2.0))
        subprocess.run(
            [sys.executable, str(ROOT / "scripts/pgcluster.py"), "start", str(self.pgroot)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        self.restarts += 1

    def alive_serves(self):
        for h, p in list(self.serves.items()):
            if p.poll() is not None:  # exit 74 when the store went away: its supervisor restarts it
                self.start_serve(h)

    def stop(self):
        for p in list(self.serves.values()) + [p for _, p in self.crons]:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in list(self.serves.values()) + [p for _, p in self.crons]:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def enqueue_work(fleet: Fleet, tasks: int, chains: int, periodic: int) -> None:
    lines = []
    for n in range(tasks):
        lines.append({"id": f"t{n}", "worker": "mark"})
    (fleet.work / "tasks.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    fleet.kmpwm("a", "enqueue", "--from", str(fleet.work / "tasks.jsonl"))
    for n in range(chains):
        fleet.kmpwm("b", "chain", "--id", f"c{n}", "mark", "mark+mark+mark", "mark")
    for n in range(periodic):
        fleet.kmpwm("c", "enqueue", f"p{n}", "mark", "--every", "60s")


def read_marks(path: Path):
    runs: dict[tuple[str, str], dict] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) != 5:
            continue
        host, tid, kind, pid, up = parts
        run = runs.setdefault((tid, pid), {"task": tid, "host": host, "start": None, "end": None})
        run["start" if kind == "s" else "end"] = float(up)
    return list(runs.values())


def check(fleet: Fleet, tasks: int, chains: int) -> tuple[dict, list[str]]:
    violations: list[str] = []
    checks = 0
    runs = read_marks(fleet.marks)
    by_task: dict[str, list] = {}
    for r in runs:
        by_task.setdefault(r["task"], []).append(r)
    # overlap: no two runs of one task in flight at once (a run without an end was killed: it
    # ended when its host died, no later than the next start we see)
    for tid, rs in by_task.items():
        rs.sort(key=lambda r: r["start"] or 0)
        for x, y in zip(rs, rs[1:]):
            checks += 1
            if x["end"] is not None and y["start"] is not None and y["start"] < x["end"] - 0.011:
                violations.append(f"overlap: {tid} ran at once on {x['host']} and {y['host']}")
    # replay the store's records with the fold, as every reader does
    with psycopg.connect(fleet.url) as conn:
        records = [orjson.loads(b) for (b,) in conn.execute("SELECT body FROM kmpwm_records ORDER BY seq")]
        claim_rows = conn.execute("SELECT count(*) FROM kmpwm_claims").fetchone()[0]
    state = new_state()
    events: list = []
    claims_ok = 0
    released = 0
    held: dict[tuple[str, str], int] = {}
    claim_occ: dict[tuple[str, str], str] = {}
    succeeded_occ: dict[tuple[str, str], int] = {}
    for rec in records:
        ops = rec.get("ops", ())
        before = {op.get("id"): (state["tasks"].get(op.get("id")) or {}).get("lease") for op in ops}
        results = apply(state, rec, lambda *e: events.append(e))
        for op, ok in zip(ops, results):
            if op.get("op") == "claim" and ok is True:
                claims_ok += 1
                claim_occ[(op["id"], op["runner"])] = op.get("occ")
                held[(op["id"], op["runner"])] = held.get((op["id"], op["runner"]), 0) + 1
            elif op.get("op") == "release" and op.get("runner") and held.get((op["id"], op["runner"])):
                # a claim handed back (unstarted, or a cancelled run's): its occurrence was not
                # consumed, and the store deletes its row
                held[(op["id"], op["runner"])] -= 1
                released += 1
            elif op.get("op") == "result" and ok is True and op.get("status") == "SUCCESS":
                occ = claim_occ.get((op["id"], op["runner"]))
                if occ is not None and op["id"].startswith("p"):
                    key = (op["id"], occ)
                    succeeded_occ[key] = succeeded_occ.get(key, 0) + 1
        del before
    for key, n in succeeded_occ.items():
        checks += 1
        if n > 1:
            violations.append(f"occurrence: {key[0]} {key[1]} succeeded {n} times")
    # succeeded: nothing of a one-time task or a step started after its SUCCESS was recorded
    done_at: dict[str, float] = {}
    for ts, tid, kind, detail in events:
        if kind == "ran" and detail.get("status") == "SUCCESS" and not tid.startswith("p"):
            done_at.setdefault(tid, ts)
        elif kind == "started" and tid in done_at:
            violations.append(f"succeeded: {tid} started again after it succeeded")
        checks += 1
    # lost: every one-time task and chain finished
    st = state["tasks"]
    for n in range(tasks):
        checks += 1
        if (st.get(f"t{n}") or {}).get("state") != "SUCCEEDED":
            violations.append(f"lost: t{n} is {(st.get(f't{n}') or {}).get('state')}")
    for n in range(chains):
        checks += 1
        ch = state["chains"].get(f"c{n}")
        members = [st[i]["state"] for step in (ch or {"steps": []})["steps"] for i in step if i in st]
        if not ch or any(s != "SUCCEEDED" for s in members):
            violations.append(f"lost: chain c{n} is not finished ({members})")
    checks += 1
    if claims_ok - released != claim_rows:
        violations.append(
            f"claims: the fold accepted {claims_ok} claims and {released} were handed back, "
            f"the claims table holds {claim_rows}"
        )
    stats = {
        "runs": len(runs),
        "records": len(records),
        "claims": claims_ok,
        "periodic_successes": sum(succeeded_occ.values()),
        "checks": checks,
    }
    return stats, violations


def unfinished(fleet: Fleet) -> int:
    r = fleet.kmpwm("a", "inspect-queue", "--json")
    return sum(1 for t in json.loads(r.stdout)["tasks"] if not t["id"].startswith("p"))


def trial(args, seed: int) -> tuple[dict, list[str]]:
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="kmpwm-fleet-"))
    os.chmod(work, 0o755)
    pgroot = None
    try:
        if args.pg:
            url = args.pg
            with psycopg.connect(url, autocommit=True) as conn:
                name = f"fleet_{seed}_{os.getpid()}"
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
                conn.execute(f"CREATE DATABASE {name}")
            url = url.replace("/postgres?", f"/{name}?")
        else:
            pgroot = Path(tempfile.mkdtemp(prefix="kmpwm-fleet-pg-"))
            url = subprocess.run(
                [sys.executable, str(ROOT / "scripts/pgcluster.py"), "start", str(pgroot)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
        fleet = Fleet(work, url, pgroot, rng)
        enqueue_work(fleet, args.tasks, args.chains, args.periodic)
        for h in HOSTS:
            fleet.start_serve(h)
        end = time.monotonic() + args.seconds
        mid = end - args.seconds / 2
        while time.monotonic() < end:
            fleet.cron_tick()
            fleet.alive_serves()
            roll = rng.random()
            if args.restarts and not fleet.restarts and time.monotonic() >= mid:
                fleet.restart_server()  # at least one restart per trial, whatever the rolls
            elif roll < 0.10:
                fleet.kill_host(rng.choice(HOSTS))
            elif roll < 0.16:
                fleet.terminate_backends()
            elif roll < 0.18 and fleet.restarts < args.restarts:
                fleet.restart_server()
            elif roll < 0.25:
                fleet.clock["c"] = rng.choice([None, "+2m", "+10m", "+1h"])
                fleet.kill_host("c")  # its processes start again on the new clock
            time.sleep(1.0)
        # calm: everything finishes (the leases of killed hosts end, others take over)
        calm = time.monotonic() + max(120, args.seconds)
        while time.monotonic() < calm and unfinished(fleet) > 0:
            fleet.cron_tick()
            fleet.alive_serves()
            time.sleep(1.0)
        fleet.stop()
        stats, violations = check(fleet, args.tasks, args.chains)
        stats.update(kills=fleet.kills, terminations=fleet.terminations, restarts=fleet.restarts)
        return stats, violations
    finally:
        if pgroot is not None:
            subprocess.run([sys.executable, str(ROOT / "scripts/pgcluster.py"), "stop", str(pgroot)], check=False)
            shutil.rmtree(pgroot, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--chains", type=int, default=100)
    ap.add_argument("--periodic", type=int, default=20)
    ap.add_argument("--seconds", type=int, default=60, help="of chaos per trial")
    ap.add_argument("--restarts", type=int, default=2, help="server restarts per trial at most")
    ap.add_argument("--trials", type=int, default=1)
    ap.add_argument("--seed", type=int, default=20261203)
    ap.add_argument("--pg", help="a server URL (database postgres) instead of a private cluster (no restarts)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    total = {"trials": 0, "violations": 0}
    for i in range(args.trials):
        stats, violations = trial(args, args.seed + i)
        total["trials"] += 1
        total["violations"] += len(violations)
        for k, v in stats.items():
            total[k] = total.get(k, 0) + v
        print(json.dumps({"trial": i, "seed": args.seed + i, **stats, "violations": violations[:20]}), flush=True)
    print(json.dumps(total))
    return 1 if total["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
