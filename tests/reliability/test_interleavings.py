"""Model-based test: random interleavings of several simulated ``run-due`` processes on one state.

Each simulated runner does what ``kmpwm.running.runner.Runner`` does in one ``_cycle``: under the lock it
writes the results of the jobs it finished, hands back claimed-but-unstarted tasks (``release``),
then plans (``kmpwm.scheduling.plan``), stages the plan's bookkeeping ops (quarantine) and claims
due tasks from its (possibly stale) queue with leases, all as ONE journal record.  Runners also
crash (their leases are abandoned), exit, start prefetched tasks, and write "racy" claims decided on
an older view (which only the fold can refuse); the clock advances; chains and tasks are cancelled;
chains and tasks are enqueued again with every policy (keep, replace, append, append-or-replace)
while runners hold them.  Task and chain records are built by the real API (``Scheduler.build_task``,
``Scheduler._chain_op``).  Every record is folded with ``kmpwm.core.state.apply`` and, in the store
variants, also appended to a real journal through ``Store.transaction()`` + ``txn.commit``.
Runners are either on another host (a lease is only taken over once it has run out) or on this
host with ``kmpwm.platform.procs.alive`` simulated (a dead holder's lease is broken at once, and a live
holder keeps its lease however far the clock jumps: no claim ever takes a task from one).  Every
claim names the occurrence it planned (``state.occurrence``); one planned on a stale queue whose
occurrence ran meanwhile is skipped, and the fold refuses it.

Invariants checked after every step: a SUCCEEDED task is never claimed again and never changes;
two runners never both hold an unexpired lease on one task; a chain's step k is never claimed (nor
ENQUEUED/RUNNING) while an earlier step is not SUCCEEDED; no chain or task is ever stuck (an
unfinished chain always has an ENQUEUED or RUNNING task at its first unfinished step; a finished one
has nothing BLOCKED); a result is only refused when the runner's lease could have been taken over
or the task was cancelled; FAILED/CANCELLED only happen for a reason the model caused; the fold from
scratch, from an orjson snapshot plus the tail, and (store variants) the on-disk journal all equal
the incrementally maintained state.  Teardown: every runner finishes what it holds, the clock
advances a day, and plan + claim + SUCCESS is repeated until nothing is due; then every chain must
be SUCCEEDED, or FAILED/CANCELLED only where a failure, a quarantine or a cancel happened.

The last test drives two real ``run-due`` processes (time-scaled) to check that tasks claimed ahead
of a free slot (prefetched) are never run by both.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import os
import shutil
import tempfile

import orjson
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

import kmpwm.platform.procs as procs
from kmpwm.api import Scheduler
from kmpwm.core.models import DEFAULT_GRACE, Constraints, TaskRequest
from kmpwm.core.state import apply, chain_next_step, chain_state, new_state
from kmpwm.core.triggers import next_after_run
from kmpwm.running import claims
from kmpwm.scheduling.plan import MAX_CRASHES, lease_state, plan, time_limit
from kmpwm.scheduling.probes import Device
from kmpwm.scheduling.steering import retry_op
from kmpwm.storage.paths import resolve
from kmpwm.storage.store import Store

T0 = 1_900_000_000.0
FAKE_HOST = "simhost-not-this-machine"
FINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
UNFINISHED = {"ENQUEUED", "BLOCKED", "RUNNING"}
GRACE = DEFAULT_GRACE
STATUSES = ["SUCCESS", "SUCCESS", "SUCCESS", "SUCCESS", "FAILURE", "RETRY", "RETRY", "EXPIRED", "EXPIRED"]

# Simulated liveness of runner processes, by pid (used when runners claim to be on this host).
ALIVE: dict[int, bool] = {}
_PIDS = itertools.count(40_000)


STATS: collections.Counter = collections.Counter()  # what the runs exercised (for tuning)


def event(what: str) -> None:
    STATS[what] += 1


def fake_alive(pid, token) -> bool:
    return ALIVE.get(pid, False)


def fresh(obj):
    """As a reader of the journal sees it: decoded from bytes, sharing nothing."""
    return orjson.loads(orjson.dumps(obj))


def fold(records, state=None) -> dict:
    state = new_state() if state is None else state
    for r in records:
        apply(state, fresh(r))
    return state


_SCHED: list = []


def _scheduler() -> Scheduler:
    """One Scheduler (and worker registry) for building task and chain records in every example;
    it never writes to its own home."""
    if not _SCHED:
        home = tempfile.mkdtemp(prefix="kmpwm-il-sched-")
        os.chmod(home, 0o700)
        atexit.register(shutil.rmtree, home, True)
        _SCHED.append(Scheduler(paths=resolve(home)))
    return _SCHED[0]


class SimRunner:
    """One run-due process: its identity, what it holds (claimed/started) and its plan queue."""

    def __init__(self, slot: int, host: str):
        self.slot = slot
        self.pid = next(_PIDS)
        self.rid = f"{host}/{self.pid}/r{slot}x{self.pid % 1000}"
        self.token = f"tok{self.pid}"
        self.held: dict[str, dict] = {}  # id -> {"seq", "until", "started"}
        self.done: set[str] = set()
        self.planned = claims.Candidates()  # the last plan's candidates, the occurrence each claim names
        self.who = claims.Identity(self.rid, self.pid, self.token, None, host)
        if host == procs.host():
            ALIVE[self.pid] = True  # a pid on another host means nothing here: never "alive" locally


task_spec = st.tuples(st.sampled_from(["echo", "sleep"]), st.sampled_from([10, 10, 2, 1]))  # (worker, max attempts)
chain_spec = st.lists(st.lists(task_spec, min_size=1, max_size=3), min_size=2, max_size=4)


class Interleavings(RuleBasedStateMachine):
    N_RUNNERS = 3
    SAME_HOST = False  # True: runners use this host's name and kmpwm.platform.procs.alive is simulated
    USE_STORE = False  # True: every record also goes through Store.transaction() + commit

    def __init__(self):
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="kmpwm-il-")
        os.chmod(self.tmp, 0o700)
        self.paths = resolve(os.path.join(self.tmp, "home"))
        os.mkdir(self.paths.home, 0o700)
        self.sched = _scheduler()
        self.store = Store(self.paths) if self.USE_STORE else None
        self.host = procs.host() if self.SAME_HOST else FAKE_HOST
        assert self.host != procs.host() or self.SAME_HOST
        self.device = Device(assume={})
        self.clock = T0
        self.state = new_state()
        self.records: list[dict] = []
        self.snapshot: tuple[int, bytes] | None = None
        self.runners = {i: SimRunner(i, self.host) for i in range(self.N_RUNNERS)}
        self.dead_rids: set[str] = set()
        self.succeeded: dict[tuple, tuple] = {}  # (id, seq) -> (attempts, finished_at)
        self.success_results: dict[tuple, int] = {}  # (id, seq) -> accepted SUCCESS results
        self.legit_failed: set[tuple] = set()  # (id, seq) FAILED by a failure/quarantine we caused
        self.cancelled_chains: set[str] = set()  # chains we cancelled (and did not enqueue again)
        self.cancelled_keys: set[tuple] = set()  # (id, seq) of tasks our cancel ops reported
        self.rechained: set[str] = set()  # chain ids enqueued again (the old tasks were replaced)
        self.chain_ids: list[str] = []
        self.single_ids: list[str] = []
        self.late = 0
        self.initialized = False
        self.mpause: dict[tuple, float] = {}  # (id, seq) -> paused until (inf: until resumed)
        self.mqueue: float | None = None  # the queue paused until (inf: until resumed)
        self.retried: set[tuple] = set()  # (id, seq) revived by a retry

    # -- building work through the real API ------------------------------------------------

    def _chain_op(self, cid: str, spec, policy: str = "keep") -> dict:
        steps = [
            [TaskRequest(worker, constraints=Constraints(max_attempts=m, backoff_delay=5)) for worker, m in step]
            for step in spec
        ]
        return self.sched._chain_op(steps, cid, policy, self.clock, ())

    def _enq_op(self, sid: str, worker: str, max_attempts: int, policy: str = "keep") -> dict:
        req = TaskRequest(worker, id=sid, constraints=Constraints(max_attempts=max_attempts, backoff_delay=5))
        return {"op": "enq", "task": self.sched.build_task(req, self.clock), "policy": policy}

    @initialize(
        chains=st.lists(chain_spec, min_size=1, max_size=3), singles=st.lists(task_spec, min_size=0, max_size=3)
    )
    def setup_work(self, chains, singles):
        ops = []
        for n, spec in enumerate(chains, 1):
            ops.append(self._chain_op(f"C{n}", spec))
            self.chain_ids.append(f"C{n}")
        for n, (worker, m) in enumerate(singles, 1):
            ops.append(self._enq_op(f"S{n}", worker, m))
            self.single_ids.append(f"S{n}")
        res = self._write(ops, [])
        assert all(r["action"] == "enqueued" for r in res), res
        self.initialized = True

    # -- writing records -------------------------------------------------------------------

    def _stage(self, ops: list, acc: list) -> list:
        """Like Transaction.stage: apply now (at the cycle's ts), written later as one record."""
        if not ops:
            return []
        res = apply(self.state, fresh({"ts": self.clock, "ops": ops}))
        acc.append((ops, res))
        return res

    def _write(self, ops: list, acc: list) -> list:
        """Apply ``ops`` now and write everything staged in ``acc`` plus them as one record."""
        res = self._stage(ops, acc)
        self._flush(acc)
        return res

    def _flush(self, acc: list) -> None:
        all_ops = [op for ops, _ in acc for op in ops]
        all_res = [r for _, res in acc for r in res]
        if not all_ops:
            return
        record = fresh({"ts": self.clock, "ops": all_ops})
        self.records.append(record)
        if self.store is not None:
            with self.store.transaction() as txn:
                got = txn.commit(fresh(record)["ops"], ts=self.clock)
            assert got == all_res, "the on-disk journal folded this record differently from the model"

    # -- what a run-due cycle does -----------------------------------------------------------

    def _finish_ops(self, r: SimRunner, finished: list[tuple[str, str]]) -> list:
        ops = []
        for tid, status in finished:
            h = r.held[tid]
            t = self.state["tasks"][tid]
            op = {
                "op": "result",
                "id": tid,
                "seq": h["seq"],
                "runner": r.rid,
                "status": status,
                "message": "boom" if status != "SUCCESS" else None,
                "data": {"by": r.rid} if status == "SUCCESS" else None,
                "duration_ms": 7,
            }
            if status != "EXPIRED":
                nxt = next_after_run(t["trigger"], t["trig_state"], self.clock)
                if nxt is not None:
                    op["next_run_at"] = nxt
            ops.append(op)
        return ops

    def _apply_results(self, r: SimRunner, finished: list[tuple[str, str]], acc: list) -> None:
        if not finished:
            return
        holds = {tid: dict(r.held[tid]) for tid, _ in finished}
        res = self._stage(self._finish_ops(r, finished), acc)
        for (tid, status), ok in zip(finished, res):
            h = holds[tid]
            del r.held[tid]
            r.done.add(tid)
            t = self.state["tasks"][tid]
            key = (tid, h["seq"])
            event(f"result {status} {'accepted' if ok else 'refused'}")
            if ok:
                assert t["seq"] == h["seq"]
                if status == "SUCCESS":
                    assert t["state"] == "SUCCEEDED", (tid, t["state"])
                    self.success_results[key] = self.success_results.get(key, 0) + 1
                    assert self.success_results[key] == 1, f"{tid}: a second SUCCESS was accepted"
                if t["state"] == "FAILED":
                    self.legit_failed.add(key)
                    event(f"FAILED by {status}")
            else:
                event(f"result refused ({t['state']})")
                # A result is refused only when the lease could have passed to someone else (it had
                # run out) or the task was cancelled meanwhile; otherwise a completion was lost.
                assert (
                    h["until"] <= self.clock
                    or t["state"] == "CANCELLED"
                    or t["seq"] != h["seq"]
                    or (tid, t["seq"]) in self.retried
                ), (  # cancelled under it, then retried
                    f"{r.rid}'s {status} result for {tid} was refused while its lease was valid until "
                    f"{h['until']} (now {self.clock}); task is {t['state']} lease={t['lease']}"
                )

    def _release(self, r: SimRunner, ids: list[str], acc: list) -> None:
        if not ids:
            return
        ops = [{"op": "release", "id": tid, "seq": r.held[tid]["seq"], "runner": r.rid} for tid in ids]
        res = self._stage(ops, acc)
        for tid, ok in zip(ids, res):
            h = r.held.pop(tid)
            if not ok:
                t = self.state["tasks"][tid]
                assert (
                    h["until"] <= self.clock
                    or t["state"] == "CANCELLED"
                    or t["seq"] != h["seq"]
                    or (tid, t["seq"]) in self.retried
                ), (  # cancelled under it, then retried
                    tid,
                    t["state"],
                    t["lease"],
                )

    def _claim(self, r: SimRunner, acc: list, *, replan: bool, free: int) -> list[str]:
        """What kmpwm.running.runner.Runner._claim does, against the model's state: the plan, then
        the real claim function (kmpwm.running.claims.claim) for its candidates."""
        now = self.clock
        state = self.state
        if replan or not r.planned.queue:
            p = plan(state, now, self.device, exclude=r.done | set(r.held), known_worker=lambda n: True)
            before = {
                op["id"]: (state["tasks"][op["id"]]["state"], lease_state(state["tasks"][op["id"]], now))
                for op in p.ops
            }
            res = self._stage(p.ops, acc)
            for op, ok in zip(p.ops, res):
                assert op["op"] in ("fail", "trig"), op
                if op["op"] == "fail" and ok:
                    assert op["reason"].startswith("quarantined"), op
                    # only a task whose runner is gone (lease ran out, or holder dead) is quarantined
                    assert before[op["id"]][0] == "RUNNING" and before[op["id"]][1] != "held", (op, before[op["id"]])
                    self.legit_failed.add((op["id"], op["seq"]))
                    event("quarantined after crashes")
            r.planned = claims.Candidates.of(p)
            if not self.SAME_HOST:  # another host's lease is taken over only once it ended
                late = {i for i in p.broken if lease_state(state["tasks"][i], now) != "expired"}
                assert not late, f"a lease of another host was taken before it ended: {late}"
        picks = []
        taken = r.done | set(r.held)
        while r.planned.queue and len(picks) < free:
            c = claims.claim(
                state,
                r.planned.queue.pop(),
                now,
                r.who,
                planned=r.planned,
                grace=GRACE,
                limit_of=lambda t: (None, time_limit(t)),
                taken=taken,
            )
            if c == "the planned occurrence ran meanwhile":
                event("claim: the planned occurrence ran meanwhile")
            if isinstance(c, claims.Claim):
                assert c.occurrence == r.planned.occ[c.id], "a claim names the occurrence planned"
                picks.append(c)
        if not picks:
            return []
        ops = [c.op for c in picks]
        res = self._stage(ops, acc)
        claimed = []
        for op, ok in zip(ops, res):
            if not ok:
                continue
            tid = op["id"]
            if op.get("broken") is True:
                event("claim: broke an orphaned lease")
            elif op.get("broken"):
                event("claim: took over a lease that ended")
            if self.state["tasks"][tid]["crashes"]:
                event("claim: took over a lease its holder never finished")
            self._check_claim(r, tid, op["seq"])
            if self.SAME_HOST:  # a live holder on this host keeps its lease whatever the clock says
                for other in self.runners.values():
                    h = other.held.get(tid)
                    assert other is r or not h or h["seq"] != op["seq"] or not ALIVE.get(other.pid), (
                        f"{tid}: {r.rid} claimed it while {other.rid} (alive) holds it (lease until "
                        f"{h['until']}, now {self.clock})"
                    )
                    if other is not r and h and h["seq"] == op["seq"]:
                        event("claim: took over a dead holder's lease")
            r.held[tid] = {"seq": op["seq"], "until": op["until"], "started": False}
            claimed.append(tid)
        return claimed

    def _check_claim(self, r: SimRunner, tid: str, seq: int) -> None:
        key = (tid, seq)
        assert key not in self.succeeded, f"{tid} was claimed again after it SUCCEEDED"
        assert self.mpause.get(key, 0) <= self.clock, f"{tid} was claimed while paused (until {self.mpause[key]})"
        assert (self.mqueue or 0) <= self.clock, f"{tid} was claimed while the queue is paused"
        t = self.state["tasks"][tid]
        assert t["state"] == "RUNNING" and t["lease"]["runner"] == r.rid
        for other in self.runners.values():
            h = other.held.get(tid)
            if other is not r and h and h["seq"] == seq and h["until"] > self.clock:
                raise AssertionError(
                    f"{tid}: {r.rid} claimed it while {other.rid} holds a lease until {h['until']} (now {self.clock})"
                )
        cid = t.get("chain_id")
        if cid and t["step"] > 1:
            chain = self.state["chains"][cid]
            bad = [
                i for s in chain["steps"][: t["step"] - 1] for i in s if self.state["tasks"][i]["state"] != "SUCCEEDED"
            ]
            assert not bad, f"{tid} (step {t['step']}) claimed while earlier-step tasks {bad} are not SUCCEEDED"
        for dep in t.get("after", ()):
            d = self.state["tasks"].get(dep)
            if d is not None and ((dep, d["seq"]) in self.retried or (tid, seq) in self.retried or d["seq"] > seq):
                continue  # a retry (of either) set the two apart; a later seq is another task under that id
            assert d is None or d["state"] in FINAL, f"{tid} claimed before {dep} (it was appended after) finished"

    def _cycle(self, r: SimRunner, finished, released, *, claim: bool, replan: bool, free: int) -> list[str]:
        acc: list = []
        self._apply_results(r, finished, acc)
        self._release(r, released, acc)
        claimed = self._claim(r, acc, replan=replan, free=free) if claim else []
        self._flush(acc)
        return claimed

    # -- rules -----------------------------------------------------------------------------

    @rule(data=st.data())
    def runner_cycle(self, data):
        r = self.runners[data.draw(st.sampled_from(sorted(self.runners)), label="runner")]
        started = sorted(i for i, h in r.held.items() if h["started"])
        waiting = sorted(i for i, h in r.held.items() if not h["started"])
        fin_ids = data.draw(st.lists(st.sampled_from(started), unique=True), label="finish") if started else []
        finished = [(tid, data.draw(st.sampled_from(STATUSES), label=f"status {tid}")) for tid in fin_ids]
        released = []
        if waiting and data.draw(st.integers(0, 5), label="release?") == 0:
            released = data.draw(st.lists(st.sampled_from(waiting), unique=True, min_size=1), label="release")
        claim = data.draw(st.integers(0, 4), label="claim?") > 0
        replan = data.draw(st.booleans(), label="replan")
        free = data.draw(st.integers(1, 3), label="free")
        claimed = self._cycle(r, finished, released, claim=claim, replan=replan, free=free)
        if claimed and data.draw(st.integers(0, 3), label="start now?") > 0:
            for tid in claimed:  # a free slot: the workers start at once (else they wait, prefetched)
                r.held[tid]["started"] = True

    @rule(data=st.data())
    def runner_starts(self, data):
        """A claimed (prefetched) task gets a slot and its worker starts."""
        r = self.runners[data.draw(st.sampled_from(sorted(self.runners)), label="runner")]
        waiting = sorted(i for i, h in r.held.items() if not h["started"])
        for tid in data.draw(st.lists(st.sampled_from(waiting), unique=True), label="start") if waiting else []:
            r.held[tid]["started"] = True

    @rule(data=st.data())
    def racy_claim(self, data):
        """A claim decided on an older view and written without checking it again: the fold alone
        must refuse it when another runner holds a valid lease, the task already finished, or its
        chain step is not yet unblocked (BLOCKED)."""
        r = self.runners[data.draw(st.sampled_from(sorted(self.runners)), label="runner")]
        cands = sorted(i for i in self.state["tasks"] if i not in r.held)
        if not cands or data.draw(st.integers(0, 2), label="racy?"):
            return
        running = [i for i in cands if self.state["tasks"][i]["state"] == "RUNNING"]
        if running and data.draw(st.booleans(), label="racy on a RUNNING task"):
            cands = running  # the interesting case: someone else's lease, valid or run out
        t = self.state["tasks"][data.draw(st.sampled_from(cands), label="racy claim")]
        before, lease_before = t["state"], t["lease"]
        held_by_other = t["state"] == "RUNNING" and t["lease"]["until"] > self.clock
        op = {
            "op": "claim",
            "id": t["id"],
            "seq": t["seq"],
            "runner": r.rid,
            "pid": r.pid,
            "token": r.token,
            "until": claims.lease_end(self.clock, time_limit(t), GRACE),
        }
        [ok] = self._write([op], [])
        event(f"racy claim of a {before} task {'accepted' if ok else 'refused'}")
        if before not in ("ENQUEUED", "RUNNING") or held_by_other:
            assert not ok, f"the fold let {r.rid} claim {t['id']} at {self.clock} ({before}, lease {lease_before})"
        if ok:
            self._check_claim(r, t["id"], t["seq"])
            r.held[t["id"]] = {"seq": t["seq"], "until": op["until"], "started": True}

    @rule(slot=st.integers(0, 2))
    def runner_crashes(self, slot):
        """The process dies: its leases are abandoned; a new run-due takes its place later."""
        slot %= self.N_RUNNERS
        old = self.runners[slot]
        ALIVE[old.pid] = False
        self.dead_rids.add(old.rid)
        self.runners[slot] = SimRunner(slot, self.host)

    @rule(slot=st.integers(0, 2))
    def runner_exits(self, slot):
        """A run-due that holds nothing ends; the next one starts with a fresh ``done`` set."""
        slot %= self.N_RUNNERS
        old = self.runners[slot]
        if old.held:
            return
        ALIVE[old.pid] = False
        self.runners[slot] = SimRunner(slot, self.host)

    @rule(dt=st.sampled_from([0.5, 1.0, 5.0, 20.0, 30.0, 46.0, 51.0, 120.0, 3600.0, 86400.0]))
    def clock_advances(self, dt):
        self.clock += dt

    @rule(data=st.data())
    def cancel(self, data):
        if data.draw(st.integers(0, 3), label="cancel?"):
            return  # cancelling is rarer than running
        target = data.draw(st.sampled_from(self.chain_ids + self.single_ids), label="cancel")
        op = {"op": "cancel", "ids": [target]}
        from kmpwm.api import _cancel_would_change

        if not _cancel_would_change(self.state, op):
            return
        before = {i: t["state"] for i, t in self.state["tasks"].items()}
        [cancelled] = self._write([op], [])
        if cancelled and target in self.state["chains"]:
            self.cancelled_chains.add(target)
        for i in cancelled:
            t = self.state["tasks"][i]
            assert before[i] in UNFINISHED and t["state"] == "CANCELLED"
            self.cancelled_keys.add((i, t["seq"]))
        # cancel covers every unfinished task of the chain / of the id and its ID#n
        for i, t in self.state["tasks"].items():
            if t["chain_id"] == target or i.split("#")[0] == target:
                assert t["state"] in FINAL, (i, t["state"])

    @rule(spec=chain_spec)
    def late_chain(self, spec):
        """``kmpwm chain`` while runners are busy."""
        if self.late >= 2:
            return
        self.late += 1
        cid = f"L{self.late}"
        [res] = self._write([self._chain_op(cid, spec)], [])
        assert res["action"] == "enqueued"
        self.chain_ids.append(cid)

    @rule(data=st.data())
    def chain_again(self, data):
        """``kmpwm chain --id C --policy keep|replace`` for a chain id that exists (busy or done)."""
        if data.draw(st.integers(0, 2), label="chain again?"):
            return
        cid = data.draw(st.sampled_from(self.chain_ids), label="chain id")
        policy = data.draw(st.sampled_from(["keep", "replace"]), label="chain policy")
        spec = data.draw(chain_spec, label="steps")
        [res] = self._write([self._chain_op(cid, spec, policy)], [])
        event(f"chain again: {policy} -> {res['action']}")
        if res["action"] != "kept":
            self.cancelled_chains.discard(cid)  # a new chain under the old id
            self.rechained.add(cid)

    @rule(data=st.data())
    def enqueue_again(self, data):
        """``kmpwm enqueue S... --policy P`` for a single task id that exists (busy or done)."""
        if not self.single_ids or data.draw(st.integers(0, 1), label="enqueue again?"):
            return
        sid = data.draw(st.sampled_from(sorted({i.split("#")[0] for i in self.single_ids})), label="task id")
        policy = data.draw(
            st.sampled_from(["keep", "replace", "append", "append-or-replace", "update"]), label="policy"
        )
        spec = data.draw(task_spec, label="worker, max attempts")
        before = {i: dict(t) for i, t in self.state["tasks"].items()}
        [res] = self._write([self._enq_op(sid, *spec, policy=policy)], [])
        event(f"enqueue again: {policy} -> {res['action']}")
        if res["action"] == "updated":  # same task: id, seq, attempts, state and lease kept
            t, old = self.state["tasks"][res["id"]], before[res["id"]]
            assert (t["seq"], t["attempts"], t["state"], t["lease"]) == (
                old["seq"],
                old["attempts"],
                old["state"],
                old["lease"],
            )
            assert t["worker"] == spec[0] and t["constraints"]["max_attempts"] == spec[1]
        if res["id"] not in self.single_ids:
            self.single_ids.append(res["id"])

    @rule(data=st.data())
    def pause_or_resume(self, data):
        """``kmpwm pause|resume ID|--all [--until]`` while runners are busy."""
        if data.draw(st.integers(0, 2), label="pause?"):
            return
        kind = data.draw(st.sampled_from(["pause", "resume"]), label="pause or resume")
        target = data.draw(st.sampled_from(["*"] + self.chain_ids + self.single_ids), label="target")
        op = {"op": kind, "by": "model"}
        if target == "*":
            op["all"] = True
        else:
            op["ids"] = [target]
        until = float("inf")
        if kind == "pause" and data.draw(st.booleans(), label="until?"):
            until = self.clock + data.draw(st.sampled_from([1.0, 30.0, 3600.0]), label="for")
            op["until"] = until
        before = {i: (t["state"], t["lease"], t["due"]) for i, t in self.state["tasks"].items()}
        [ids] = self._write([op], [])
        event(f"{kind} {'all' if target == '*' else 'ids'}: {len(ids)}")
        for i, t in self.state["tasks"].items():  # pausing changes nothing else: a running task runs on
            assert (t["state"], t["lease"], t["due"]) == before[i], i
        if kind == "pause":
            if target == "*":
                self.mqueue = until
            for i in ids if target != "*" else ():
                self.mpause[(i, self.state["tasks"][i]["seq"])] = until
        else:
            if target == "*":
                self.mqueue = None
            for i in ids:
                self.mpause.pop((i, self.state["tasks"][i]["seq"]), None)

    @rule(data=st.data())
    def retry(self, data):
        """``kmpwm retry ID|--failed`` while runners are busy (the op built as steering.retry does)."""
        if data.draw(st.integers(0, 2), label="retry?"):
            return
        target = data.draw(st.sampled_from([None] + self.chain_ids + self.single_ids), label="retry")
        if self.store is not None:
            full, hot = self.store.load(full=True).state, self.store.load(full=False).state
            assert full == self.state
        else:
            full = hot = self.state
        op = retry_op(full, hot, [target] if target else (), failed=target is None, by="model")
        if op is None:
            return
        event(f"retry carries {len(op.get('tasks', ()))} record(s)")
        before = {i: (t["state"], t["seq"]) for i, t in self.state["tasks"].items()}
        [revived] = self._write([op], [])
        event(f"retried {len(revived)}")
        for i in revived:
            t = self.state["tasks"][i]
            self.retried.add((i, t["seq"]))
            assert before[i][0] in ("FAILED", "CANCELLED") and t["seq"] == before[i][1], (i, before[i])
            assert t["state"] in ("ENQUEUED", "BLOCKED") and t["attempts"] == 0, (i, t["state"])

    @rule()
    def take_snapshot(self):
        self.snapshot = (len(self.records), orjson.dumps(self.state))
        if self.store is not None:
            self.store.write_snapshot(self.store.load())
            self.store.invalidate()  # the next reader starts from the snapshot: hot state, history apart

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def fold_is_pure(self):
        if not self.initialized:
            return
        assert fold(self.records) == self.state, "folding the records from scratch differs from the live state"
        if self.snapshot is not None:
            n, blob = self.snapshot
            assert fold(self.records[n:], orjson.loads(blob)) == self.state, "snapshot + tail differs"

    @invariant()
    def state_invariants(self):
        if not self.initialized:
            return
        now, tasks = self.clock, self.state["tasks"]
        # SUCCEEDED is final and never touched again (parallel siblings' retries/expiries included)
        for (tid, seq), (attempts, fin) in list(self.succeeded.items()):
            t = tasks[tid]
            if t["seq"] != seq:  # a new task took the id (a finished task no longer "exists")
                assert t["seq"] > seq
                del self.succeeded[(tid, seq)]
                continue
            assert t["state"] == "SUCCEEDED", f"{tid} left SUCCEEDED: {t['state']}"
            assert (t["attempts"], t["finished_at"]) == (attempts, fin), f"{tid} changed after it SUCCEEDED"
        for tid, t in tasks.items():
            if t["state"] == "SUCCEEDED":
                self.succeeded.setdefault((tid, t["seq"]), (t["attempts"], t["finished_at"]))
            assert (t["lease"] is not None) == (t["state"] == "RUNNING"), tid
            if t["state"] == "FAILED":
                assert t["reason"] == "upstream failed" or (tid, t["seq"]) in self.legit_failed, (
                    f"{tid} FAILED without a failure, give-up, expiry or quarantine: {t['reason']}"
                )
            if t["state"] == "CANCELLED":
                assert (
                    t["reason"] == "replaced"
                    or (tid, t["seq"]) in self.cancelled_keys
                    or (t["reason"] == "upstream cancelled" and t["chain_id"] in self.rechained)
                ), (tid, t["reason"])
            if t["state"] == "BLOCKED" and not t["chain_id"]:
                # an appended task waits only while what it was appended after is unfinished
                assert any(tasks[d]["state"] in UNFINISHED for d in t["after"] if d in tasks), (
                    f"{tid} stays BLOCKED after {t['after']} finished"
                )
        # at most one runner holds an unexpired lease on a task, and the fold agrees with it
        live = {r.rid: r for r in self.runners.values()}
        holders: dict[tuple, list] = {}
        for r in self.runners.values():
            for tid, h in r.held.items():
                if h["until"] > now:
                    holders.setdefault((tid, h["seq"]), []).append(r.rid)
        for key, rids in holders.items():
            assert len(rids) == 1, f"{key}: runners {rids} all hold unexpired leases at {now}"
        for tid, t in tasks.items():
            lease = t["lease"]
            if t["state"] == "RUNNING" and lease["until"] > now and lease["runner"] in live:
                h = live[lease["runner"]].held.get(tid)
                assert h and h["seq"] == t["seq"], f"{tid}: the fold says {lease['runner']} holds it"
            if t["state"] == "RUNNING":
                assert lease["runner"] in live or lease["runner"] in self.dead_rids, lease
        # chains: order, and nothing ever stuck
        for cid, chain in self.state["chains"].items():
            steps = chain["steps"]
            for k, step in enumerate(steps, 1):
                earlier_ok = all(tasks[i]["state"] == "SUCCEEDED" for s in steps[: k - 1] for i in s)
                for i in step:
                    if tasks[i]["state"] in ("ENQUEUED", "RUNNING") and not earlier_ok:
                        raise AssertionError(
                            f"{i} is {tasks[i]['state']} while an earlier step of {cid} is not SUCCEEDED"
                        )
                    if tasks[i]["state"] == "BLOCKED":
                        assert k > 1 and tasks[i]["attempts"] == 0
            cstate = chain_state(self.state, chain)
            members = [tasks[i] for s in steps for i in s]
            if cstate in FINAL:
                blocked = [t["id"] for t in members if t["state"] == "BLOCKED"]
                assert not blocked, f"chain {cid} is {cstate} but {blocked} stay BLOCKED forever"
            else:
                nxt = chain_next_step(self.state, chain)
                assert nxt is not None, cid
                first = [tasks[i] for i in steps[nxt - 1]]
                assert all(t["state"] in ("ENQUEUED", "RUNNING", "SUCCEEDED") for t in first), (
                    f"chain {cid} ({cstate}) is stuck at step {nxt}: {[(t['id'], t['state']) for t in first]}"
                )

    # -- the final phase -------------------------------------------------------------------

    def teardown(self):
        try:
            if self.initialized:
                self.drain()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def drain(self):
        self._write([{"op": "resume", "all": True, "by": "model"}], [])  # nothing paused any more
        self.mpause.clear()
        self.mqueue = None
        # living runners finish what they started with SUCCESS and hand back the rest
        for r in list(self.runners.values()):
            fin = [(tid, "SUCCESS") for tid, h in sorted(r.held.items()) if h["started"]]
            rel = [tid for tid, h in sorted(r.held.items()) if not h["started"]]
            self._cycle(r, fin, rel, claim=False, replan=False, free=0)
            ALIVE[r.pid] = False
        self.state_invariants()
        self.clock += 86400.0
        event(
            f"chains done before the final phase: {sum(chain_state(self.state, c) in FINAL for c in self.state['chains'].values())}/{len(self.state['chains'])}"  # noqa: E501
        )
        for _ in range(200):
            r = SimRunner(0, self.host)
            self.runners = {0: r}
            claimed = self._cycle(r, [], [], claim=True, replan=True, free=10_000)
            self.clock += 1.0
            self.fold_is_pure()
            self.state_invariants()
            if not claimed:
                break
            for tid in claimed:
                r.held[tid]["started"] = True
            self._cycle(r, [(tid, "SUCCESS") for tid in claimed], [], claim=False, replan=False, free=0)
            self.clock += 1.0
            self.fold_is_pure()
            self.state_invariants()
            ALIVE[r.pid] = False
        else:
            raise AssertionError("plan + claim + SUCCESS did not converge")
        self.runners = {}
        tasks = self.state["tasks"]
        for cid in self.chain_ids:
            chain = self.state["chains"][cid]
            cstate = chain_state(self.state, chain)
            members = [tasks[i] for s in chain["steps"] for i in s]
            detail = [(t["id"], t["state"], t["reason"]) for t in members]
            assert cstate in FINAL, f"chain {cid} is lost: {cstate} {detail}"
            assert all(t["state"] in FINAL for t in members), f"chain {cid} has unfinished tasks: {detail}"
            event(f"final chain {cstate}")
            if cstate == "FAILED":
                assert any((t["id"], t["seq"]) in self.legit_failed for t in members), detail
            if cstate == "CANCELLED":
                assert cid in self.cancelled_chains, detail
            if cid not in self.cancelled_chains and not any((t["id"], t["seq"]) in self.legit_failed for t in members):
                assert cstate == "SUCCEEDED", f"chain {cid} neither failed nor was cancelled, yet is {cstate}"
        for tid, t in tasks.items():
            assert t["state"] in FINAL, f"{tid} is lost: {t['state']}"
            if not t["chain_id"] and t["state"] != "SUCCEEDED":
                assert (
                    (tid, t["seq"]) in self.legit_failed
                    or t["reason"] == "replaced"
                    or (tid, t["seq"]) in self.cancelled_keys
                ), (tid, t["state"], t["reason"])
            if t["chain_id"] and t["state"] == "CANCELLED" and t["reason"] == "upstream cancelled":
                assert (tid, t["seq"]) in self.cancelled_keys or t["chain_id"] in self.rechained
        for key, n in self.success_results.items():
            assert n == 1, key
        if self.store is not None:
            assert self.store.load().state == self.state
            assert Store(self.paths).load().state == self.state  # a fresh reader (snapshot + tail)
            self.store.drop_snapshot()
            assert Store(self.paths).load().state == self.state  # the journal alone


class SameHostInterleavings(Interleavings):
    """Runners on this host: a dead holder's lease is broken at once (``orphaned``), not after it ends."""

    SAME_HOST = True


class StoreInterleavings(Interleavings):
    N_RUNNERS = 2
    USE_STORE = True


class SameHostStoreInterleavings(Interleavings):
    N_RUNNERS = 3
    SAME_HOST = True
    USE_STORE = True


def _settings(n: int, steps: int = 40) -> settings:
    return settings(
        max_examples=n,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
    )


@pytest.fixture
def simulated_liveness(monkeypatch):
    ALIVE.clear()
    monkeypatch.setattr(procs, "alive", fake_alive)
    yield
    ALIVE.clear()


def test_runners_on_other_hosts(simulated_liveness):
    run_state_machine_as_test(Interleavings, settings=_settings(60, 50))


def test_runners_on_this_host(simulated_liveness):
    run_state_machine_as_test(SameHostInterleavings, settings=_settings(50, 50))


def test_through_the_store(simulated_liveness):
    run_state_machine_as_test(StoreInterleavings, settings=_settings(20, 30))


def test_through_the_store_this_host(simulated_liveness):
    run_state_machine_as_test(SameHostStoreInterleavings, settings=_settings(20, 30))


def test_quarantine_after_repeated_crashes(simulated_liveness):
    """A hand-written interleaving: a task whose runners keep dying ends FAILED (quarantined) and
    its chain FAILED, while the parallel sibling that succeeded is not run again."""
    m = Interleavings()
    try:
        m.setup_work(chains=[[[("echo", 10), ("sleep", 10)], [("echo", 10)]]], singles=[])
        a, b = "C1/1/echo", "C1/1/sleep"
        r0 = m.runners[0]
        got = m._cycle(r0, [], [], claim=True, replan=True, free=2)
        assert sorted(got) == [a, b]
        for tid in got:
            r0.held[tid]["started"] = True
        m._cycle(r0, [(b, "SUCCESS")], [], claim=False, replan=False, free=0)
        for crash in range(MAX_CRASHES):
            holder = next(r for r in m.runners.values() if a in r.held)
            # while its holder lives, nobody claims or quarantines it, however often it crashed before
            m.clock_advances(20.0)
            bystander = m.runners[(holder.slot + 2) % m.N_RUNNERS]
            assert m._cycle(bystander, [], [], claim=True, replan=True, free=3) == []
            assert m.state["tasks"][a]["state"] == "RUNNING" and m.state["tasks"][a]["crashes"] == crash
            m.runner_crashes(holder.slot)
            m.clock_advances(31.0)
            m.fold_is_pure()
            m.state_invariants()
            r = m.runners[(holder.slot + 1) % m.N_RUNNERS]
            got = m._cycle(r, [], [], claim=True, replan=True, free=3)
            if crash < MAX_CRASHES - 1:
                assert got == [a], got  # the sibling b SUCCEEDED: never claimed again
                r.held[a]["started"] = True
            else:
                assert got == []
        t = m.state["tasks"][a]
        assert t["state"] == "FAILED" and t["reason"].startswith("quarantined"), t
        assert m.state["tasks"]["C1/2/echo"]["state"] == "FAILED"
        assert m.state["tasks"][b]["attempts"] == 1
        m.state_invariants()
        m.drain()
    finally:
        shutil.rmtree(m.tmp, ignore_errors=True)


def test_expiries_then_give_up_keep_succeeded_sibling(simulated_liveness):
    """A parallel step: one task SUCCEEDS, its sibling expires MAX_EXPIRIES times on alternating
    runners (due again at once, same attempt) and ends FAILED; the chain FAILS, later steps become
    ``upstream failed``, and the succeeded sibling is never claimed again."""
    from kmpwm.core.models import MAX_EXPIRIES

    m = Interleavings()
    try:
        m.setup_work(chains=[[[("echo", 10), ("sleep", 10)], [("echo", 10)], [("sleep", 10)]]], singles=[])
        a, b = "C1/1/echo", "C1/1/sleep"
        r0 = m.runners[0]
        assert sorted(m._cycle(r0, [], [], claim=True, replan=True, free=2)) == [a, b]
        for tid in (a, b):
            r0.held[tid]["started"] = True
        m._cycle(r0, [(b, "SUCCESS")], [], claim=False, replan=False, free=0)
        for n in range(1, MAX_EXPIRIES + 1):
            holder = next(r for r in m.runners.values() if a in r.held)
            m.runner_exits((holder.slot + 1) % m.N_RUNNERS)  # a new run-due: ``done`` does not hide a
            other = m.runners[(holder.slot + 1) % m.N_RUNNERS]
            m.clock_advances(1.0)
            got = m._cycle(holder, [(a, "EXPIRED")], [], claim=False, replan=False, free=0)
            m.fold_is_pure()
            m.state_invariants()
            t = m.state["tasks"][a]
            assert t["expiries"] == n and t["attempts"] == 0
            got = m._cycle(other, [], [], claim=True, replan=True, free=3)
            if n < MAX_EXPIRIES:
                assert got == [a], got  # due again at once; b is not re-run
                other.held[a]["started"] = True
            else:
                assert got == []
        assert m.state["tasks"][a]["state"] == "FAILED"
        assert [m.state["tasks"][i]["reason"] for i in ("C1/2/echo", "C1/3/sleep")] == ["upstream failed"] * 2
        assert m.state["tasks"][b]["attempts"] == 1 and m.state["tasks"][b]["state"] == "SUCCEEDED"
        assert chain_state(m.state, m.state["chains"]["C1"]) == "FAILED"
        m.drain()
    finally:
        shutil.rmtree(m.tmp, ignore_errors=True)


# -- the real run-due: claimed-ahead (prefetched) tasks and their leases --------------------------

# ``python -m kmpwm`` with the lease's fixed safety margins set to 0, so that what takes 15 s of
# waiting with the real margins happens within a second here.  The margins only add a constant to
# every lease; they cannot cover a wait in the ready queue that grows with the number of tasks
# claimed ahead (parallel + prefetch) times their run time.
_SCALED_KMPWM = (
    "import sys, kmpwm.running.claims as c; c.LEASE_MARGIN = 0.0; c.PREFETCH_MARGIN = 0.0; "
    "sys.argv = ['kmpwm'] + sys.argv[1:]; from kmpwm.cli.app import run; run()"
)


def test_concurrent_run_due_never_runs_a_prefetched_task_twice(home):
    """SPEC 6: "Concurrent run-due processes never run the same occurrence of a task at once; a task
    held by a process that died is picked up again after its lease ends."  A run-due that claims
    tasks ahead of free slots must not start one after its lease ended (another run-due may have
    taken it over by then), nor let its lease run out while it waits for a slot."""
    import subprocess
    import sys
    import time

    from kmpwm.storage.journal import Journal

    env = dict(os.environ)
    specs = "\n".join(
        orjson.dumps({"id": f"t{i}", "worker": "sleep", "input": "0.5", "timeout": "1s"}).decode() for i in range(8)
    )
    enq = subprocess.run(
        [sys.executable, "-m", "kmpwm", "enqueue", "--from", "-", "--json"],
        input=specs,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert enq.returncode == 0, enq.stderr
    argv = [sys.executable, "-c", _SCALED_KMPWM, "run-due", "--parallel", "1", "--grace", "0.2", "--json"]
    a = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # wait until run-due A has written its first leases, then until they have run out
        journal = Journal(resolve(str(home)))
        deadline = time.time() + 30
        first_until = None
        while first_until is None and time.time() < deadline:
            scan, _ = journal.read(0)
            untils = [op["until"] for _, rec in scan.records for op in rec.get("ops", ()) if op.get("op") == "claim"]
            first_until = min(untils) if untils else None
            time.sleep(0.02)
        assert first_until is not None, "run-due A claimed nothing"
        time.sleep(max(0.0, first_until - time.time()) + 0.1)
        b = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        out_a, err_a = a.communicate(timeout=60)
    finally:
        if a.poll() is None:
            a.kill()
    assert a.returncode == 0 and b.returncode == 0, (err_a, b.stderr)
    ran_a = [r["id"] for r in orjson.loads(out_a)["ran"]]
    ran_b = [r["id"] for r in orjson.loads(b.stdout)["ran"]]
    both = sorted(set(ran_a) & set(ran_b))
    assert not both, (
        f"tasks {both} were run by both run-due processes (A ran {ran_a}, B ran {ran_b}): A claimed "
        "them ahead of a free slot, their leases ran out while they waited, B took them over, and A "
        "still started them"
    )
