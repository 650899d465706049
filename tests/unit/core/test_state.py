"""The state is a pure fold of journal records (kmpwm/state.py): folding from scratch equals
folding a prefix, round-tripping the state through JSON (a snapshot), then folding the rest.
Plus invariants of the fold, and the same property through kmpwm.storage.store.Store on a real file."""

from __future__ import annotations

import copy
import os
import tempfile
from contextlib import contextmanager

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmpwm.core.state import apply, new_state

IDS = ["a", "b", "c"]
CHAINS = ["C1", "C2"]
TAGS = ["t1", "t2"]
RUNNERS = ["host/1/r1", "host/2/r2"]
UNFINISHED = {"ENQUEUED", "BLOCKED", "RUNNING"}

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_task(
    task_id: str, ts: float, *, repeating: bool, max_attempts: int, backoff: str, tags: list[str], host=None
) -> dict:
    """A task record shaped like the ones Scheduler.build_task writes (``host`` only when pinned)."""
    trigger = (
        {"type": "periodic", "every": 60.0, "flex": 60.0, "delay": 0.0}
        if repeating
        else {"type": "one_time", "delay": 0.0}
    )
    return {
        "id": task_id,
        "worker": "w",
        "input": None,
        "trigger": trigger,
        "constraints": {
            "requires_network": False,
            "network_type": "not-required",
            "requires_charging": False,
            "battery_not_low": False,
            "storage_not_low": False,
            "device_idle": False,
            "heavy": False,
            "expedited": False,
            "qos": "default",
            "timeout": None,
            "backoff": backoff,
            "backoff_delay": 10.0,
            "max_attempts": max_attempts,
        },
        "tags": tags,
        "created_at": ts,
        "due": ts,
        "trig_state": {"anchor": ts} if repeating else {},
        **({"host": host} if host is not None else {}),
    }


def draw_task(data, task_id: str, ts: float) -> dict:
    return make_task(
        task_id,
        ts,
        repeating=data.draw(st.booleans().map(lambda b: b and task_id in IDS), label="repeating"),
        max_attempts=data.draw(st.integers(1, 3), label="max_attempts"),
        backoff=data.draw(st.sampled_from(["exponential", "linear"]), label="backoff"),
        tags=data.draw(st.lists(st.sampled_from(TAGS), unique=True, max_size=2), label="tags"),
        host=data.draw(st.sampled_from([None, None, "h1", "h2"]), label="host"),  # --host: pinned
    )


def pick_task(data, state: dict, prefer: tuple[str, ...] = ()):
    """An existing task id (or a made-up one), and a seq that is usually its current one;
    mostly one in a state in ``prefer`` when there is such a task."""
    candidates = sorted(state["tasks"]) + ["nope"]
    preferred = sorted(i for i, t in state["tasks"].items() if t["state"] in prefer)
    if preferred and data.draw(st.integers(0, 9), label="prefer") < 8:
        candidates = preferred
    tid = data.draw(st.sampled_from(candidates), label="target")
    t = state["tasks"].get(tid)
    seq = t["seq"] if t else 1
    if data.draw(st.integers(0, 9), label="stale") == 0:
        seq += 1  # a stale op from a runner that saw an older task with this id
    return tid, t, seq


PREFER = {
    "claim": ("ENQUEUED",),
    "result": ("RUNNING",),
    "release": ("RUNNING",),
    "fail": ("ENQUEUED", "BLOCKED"),
    "trig": ("ENQUEUED",),
    "run": ("ENQUEUED",),
}


def draw_ops(data, state: dict, ts: float) -> list[dict]:
    """One op, or a claim and its result together (a quick run, as run-due records it)."""
    op = draw_op(data, state, ts)
    if op["op"] != "run":
        return [op]
    claim = dict(op, op="claim")
    result = {
        "op": "result",
        "id": op["id"],
        "seq": op["seq"],
        "runner": op["runner"],
        "status": data.draw(st.sampled_from(["SUCCESS", "SUCCESS", "FAILURE", "RETRY", "EXPIRED"]), label="st"),
        "message": None,
        "data": {"k": data.draw(st.integers(0, 3))},
        "duration_ms": 1,
    }
    t = state["tasks"].get(op["id"])
    if t and t["trigger"]["type"] == "periodic" and result["status"] != "EXPIRED":
        result["next_run_at"] = ts + 60.0
    return [claim, result]


def draw_op(data, state: dict, ts: float) -> dict:
    kind = data.draw(
        st.sampled_from(
            [
                "enq",
                "enq",
                "enq",
                "chain",
                "cancel",
                "claim",
                "result",
                "result",
                "run",
                "run",
                "run",
                "release",
                "fail",
                "trig",
                "pause",
                "resume",
                "retry",
                "update",
            ]
        ),
        label="kind",
    )
    if kind in ("pause", "resume"):  # SPEC 11: per id, per tag, or the queue itself
        how = data.draw(st.sampled_from(["ids", "ids", "tag", "all"]), label="how")
        op = {"op": kind, "by": "test"}
        if how == "all":
            op["all"] = True
        elif how == "tag":
            op["tag"] = data.draw(st.sampled_from(TAGS))
        else:
            op["ids"] = data.draw(
                st.lists(st.sampled_from(IDS + CHAINS + sorted(state["tasks"])), min_size=1, max_size=2)
            )
        if kind == "pause" and data.draw(st.booleans(), label="until?"):
            op["until"] = ts + data.draw(st.sampled_from([1.0, 100.0]), label="for")
        return op
    if kind == "retry":  # built as steering.retry_op does, carrying every record (any cut may be hot)
        from kmpwm.core.state import new_state as _empty
        from kmpwm.scheduling.steering import retry_op

        pool = IDS + CHAINS + sorted(state["tasks"])
        failed = data.draw(st.integers(0, 3), label="--failed?") == 0
        op = retry_op(
            state,
            _empty(),
            () if failed else data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=2)),
            failed=failed,
            by="test",
        )
        return op or {"op": "cancel", "ids": ["nope"]}
    if kind == "update":
        tid = data.draw(st.sampled_from(IDS), label="id")
        return {"op": "enq", "task": draw_task(data, tid, ts), "policy": "update", "by": "test"}
    if kind == "enq":
        # now and then an id that a chain's task has (or had): it takes that id over
        tid = data.draw(st.sampled_from(IDS + ["C1/1/w", "C2/2/w"]), label="id")
        policy = data.draw(st.sampled_from(["keep", "replace", "append", "append-or-replace"]), label="policy")
        return {"op": "enq", "task": draw_task(data, tid, ts), "policy": policy}
    if kind == "chain":
        cid = data.draw(st.sampled_from(CHAINS), label="chain")
        widths = data.draw(st.lists(st.integers(1, 2), min_size=1, max_size=3), label="widths")
        steps = []
        for number, width in enumerate(widths, 1):
            steps.append(
                [draw_task(data, f"{cid}/{number}/w" + (f"#{k}" if k > 1 else ""), ts) for k in range(1, width + 1)]
            )
        named = data.draw(st.sampled_from([None, None, "a", "C1/1/w", "C2/1/w"]), label="a task named by the user")
        if named is not None and all(t["id"] != named for step in steps for t in step):
            steps[-1][0] = draw_task(data, named, ts)  # ids chosen by the user: maybe another chain's
        from kmpwm.api import _check_chain_ids
        from kmpwm.core.exitcodes import InvalidParams

        op = {
            "op": "chain",
            "id": cid,
            "policy": data.draw(st.sampled_from(["keep", "replace"]), label="cpol"),
            "steps": steps,
            "tags": data.draw(st.lists(st.sampled_from(TAGS), unique=True, max_size=1)),
        }
        try:  # what the API refuses (a chain taking over an unrelated unfinished task) never reaches a journal
            _check_chain_ids(state, op)
        except InvalidParams:
            return {"op": "cancel", "ids": ["nope"]}
        return op
    if kind == "cancel":
        how = data.draw(st.sampled_from(["ids", "ids", "tag", "all"]), label="how")
        if how == "all":
            return {"op": "cancel", "all": True}
        if how == "tag":
            return {"op": "cancel", "tag": data.draw(st.sampled_from(TAGS))}
        pool = IDS + CHAINS + ["a#2", "b#3", "nope"] + sorted(state["tasks"])
        return {"op": "cancel", "ids": data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3))}
    tid, t, seq = pick_task(data, state, PREFER[kind])
    holder = (t or {}).get("lease") or {}
    runner = holder.get("runner") if holder and data.draw(st.integers(0, 5)) else data.draw(st.sampled_from(RUNNERS))
    if kind in ("claim", "run"):
        if kind == "run":
            return {"op": "run", "id": tid, "seq": seq, "runner": runner, "pid": 1, "token": "x", "until": ts + 50.0}
        return {
            "op": "claim",
            "id": tid,
            "seq": seq,
            "runner": runner,
            "pid": 1,
            "token": "x",
            "until": ts + data.draw(st.sampled_from([0.0, 5.0, 50.0, 500.0]), label="lease"),
            **({"broken": True} if data.draw(st.integers(0, 4), label="broken") == 0 else {}),
        }
    if kind == "result":
        status = data.draw(st.sampled_from(["SUCCESS", "FAILURE", "RETRY", "EXPIRED"]), label="status")
        op = {
            "op": "result",
            "id": tid,
            "seq": seq,
            "runner": runner,
            "status": status,
            "message": data.draw(st.sampled_from([None, "msg"])),
            "data": {"n": 1} if status == "SUCCESS" else None,
            "duration_ms": 5,
        }
        if t and t["trigger"]["type"] == "periodic" and status != "EXPIRED":
            op["next_run_at"] = ts + 60.0
        return op
    if kind == "release":
        return {
            "op": "release",
            "id": tid,
            "seq": seq,
            "runner": runner,
            **({"due": ts + 10.0} if data.draw(st.booleans()) else {}),
        }
    if kind == "fail":
        return {"op": "fail", "id": tid, "seq": seq, "reason": "window missed"}
    return {"op": "trig", "id": tid, "seq": seq, "due": ts + 30.0}


def draw_records(data, max_records: int = 30) -> list[dict]:
    """Random journal records (ops chosen against the state they will meet), increasing ts."""
    n = data.draw(st.integers(1, max_records), label="records")
    state = new_state()
    ts = 1_800_000_000.0
    records = []
    for _ in range(n):
        ts += data.draw(st.sampled_from([0.0, 1.0, 7.5, 60.0, 400.0]), label="dt")
        ops = [op for _ in range(data.draw(st.integers(1, 3), label="ops")) for op in draw_ops(data, state, ts)]
        record = {"ts": ts, "ops": ops}
        apply(state, copy.deepcopy(record))  # the state the next ops are drawn against
        records.append(record)
    return records


@contextmanager
def temp_home():
    """The paths of a fresh kmpwm home (0700) in a temporary directory, removed afterwards."""
    from kmpwm.storage.paths import resolve

    with tempfile.TemporaryDirectory() as tmp:
        home = os.path.join(tmp, "home")
        os.mkdir(home, 0o700)
        yield resolve(home)


def fresh(record: dict) -> dict:
    """The record as a reader would see it: decoded from its bytes, sharing nothing."""
    return orjson.loads(orjson.dumps(record))


def fold(records, state=None) -> dict:
    state = new_state() if state is None else state
    for r in records:
        apply(state, fresh(r))
    return state


@SETTINGS
@given(st.data())
def test_fold_from_snapshot_equals_fold_from_scratch(data):
    records = draw_records(data)
    cut = data.draw(st.integers(0, len(records)), label="cut")
    whole = fold(records)
    snapshot = orjson.loads(orjson.dumps(fold(records[:cut])))
    resumed = fold(records[cut:], snapshot)
    assert resumed == whole
    # folding is deterministic: twice from scratch gives the same state
    assert fold(records) == whole
    # the fold never writes into the records it reads (nor shares objects a later op changes)
    encoded = [orjson.dumps(r) for r in records]
    shared = new_state()
    for r in records:
        apply(shared, r)
    assert [orjson.dumps(r) for r in records] == encoded
    assert shared == whole


def hot_part(state: dict) -> dict:
    """``state`` without its history (what state.snap holds), as a separate copy."""
    from kmpwm.core.state import split_history

    cold_tasks, cold_chains = split_history(state)
    hot = orjson.loads(orjson.dumps(state))
    for i in cold_tasks:
        del hot["tasks"][i]
    for c in cold_chains:
        del hot["chains"][c]
    return hot


@SETTINGS
@given(st.data())
def test_history_never_changes_what_later_ops_do(data):
    """run-due and enqueue fold over the hot state only (finished work of live chains, everything
    unfinished): every later op must give the same result as over the whole state, the hot parts
    must stay equal, and history must stay untouched unless a new task or chain takes its id."""
    from kmpwm.core.state import pack_task, split_history, unpack_task

    records = draw_records(data)
    cut = data.draw(st.integers(0, len(records)), label="cut")
    whole = fold(records[:cut])
    cold_before = {i: copy.deepcopy(whole["tasks"][i]) for i in split_history(whole)[0]}
    hot = hot_part(whole)
    for r in records[cut:]:
        assert apply(whole, fresh(r)) == apply(hot, fresh(r)), f"op results differ for {r}"
    assert hot["seq"] == whole["seq"] and hot["fam"] == whole["fam"] and hot["waiters"] == whole["waiters"]
    for i, t in hot["tasks"].items():
        assert whole["tasks"][i] == t, f"task {i} differs between the hot state and the whole one"
    for i, t in whole["tasks"].items():
        if i not in hot["tasks"]:
            assert cold_before.get(i) == t, f"task {i} is missing from the hot state but was not history"
    for c, chain in whole["chains"].items():
        assert hot["chains"].get(c, chain) == chain
    assert all(c in hot["chains"] for c in whole["chains"] if c not in split_history(whole)[1])
    # what the hot state leaves out stays out of its hot part, and packing round-trips
    for t in whole["tasks"].values():
        assert unpack_task(orjson.loads(orjson.dumps(pack_task(t)))) == t
    assert hot_part(hot) == hot_part(whole)


def check_invariants(after: dict, history: dict) -> None:
    """SUCCEEDED is final; attempts never decrease; later chain steps never run too early."""
    for tid, t in after["tasks"].items():
        key = (tid, t["seq"])
        prev = history.get(key)
        if prev is not None and prev["state"] in ("FAILED", "CANCELLED") and t["state"] in ("ENQUEUED", "BLOCKED"):
            assert t["attempts"] == 0, f"{tid}: retried with attempts {t['attempts']}"  # kmpwm retry
            history.setdefault("revived", set()).add(key)
        elif prev is not None:
            # (a retry resets attempts; one in this record may be followed by a cancel in it)
            assert t["attempts"] >= prev["attempts"] or key in history.get("revived_now", ()), (
                f"{tid}: attempts went down"
            )
            if prev["state"] == "SUCCEEDED":
                assert t["state"] == "SUCCEEDED", f"{tid}: SUCCEEDED became {t['state']}"
        history[key] = {"attempts": t["attempts"], "state": t["state"]}
    tasks = after["tasks"]
    for cid, chain in after["chains"].items():
        for number, step in enumerate(chain["steps"], 1):
            if number == 1:
                continue
            earlier = [tasks.get(i) for s in chain["steps"][: number - 1] for i in s]
            # an id a later task took over is no longer the chain's (state.member)
            earlier = [e for e in earlier if e is None or e.get("chain_id") == cid]
            for tid in step:
                t = tasks.get(tid)
                if t is None or t.get("chain_id") != cid or t.get("step") != number:
                    continue
                if t["state"] in ("ENQUEUED", "RUNNING"):
                    bad = [e["id"] for e in earlier if e is None or e["state"] != "SUCCEEDED"]
                    assert not bad, f"{tid} is {t['state']} while earlier step tasks {bad} are not SUCCEEDED"
                if t["state"] == "BLOCKED":
                    assert t["attempts"] == 0
    # tasks appended after another run only once it finished
    released = history.setdefault("released", set())
    for tid, t in tasks.items():
        if t["state"] in ("ENQUEUED", "RUNNING") and t.get("after"):
            if (tid, t["seq"]) in released:
                # judged when it was released; a retry of its predecessor later (maybe from history) sets them apart
                continue
            released.add((tid, t["seq"]))
            for dep in t["after"]:
                d = tasks.get(dep)
                # (a task enqueued under that id after this one is another task: seq tells)
                if d is not None and (dep, d["seq"]) in history.get("revived", ()):
                    continue  # retried after this one was released: the two are apart now
                assert d is None or d["state"] not in UNFINISHED or d["seq"] > t["seq"], (
                    f"{tid} runs before {dep} finished"
                )


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fold_invariants(data):
    records = draw_records(data, max_records=40)
    state = new_state()
    history: dict = {}
    for r in records:
        rec = fresh(r)
        results = apply(state, rec)
        history["revived_now"] = set()
        for op, res in zip(rec.get("ops", ()), results):
            if op.get("op") == "retry":  # revived in this record (maybe with a fail before it in the same record)
                history["revived_now"].update((i, state["tasks"][i]["seq"]) for i in res or ())
            elif op.get("op") == "enq" and op.get("policy") == "update" and res and res.get("action") == "updated":
                history.setdefault("updated", set()).add((res["id"], state["tasks"][res["id"]]["seq"]))
        history.setdefault("revived", set()).update(history["revived_now"])
        check_invariants(state, history)
        for t in state["tasks"].values():
            assert t["state"] in {"ENQUEUED", "BLOCKED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"}
            assert (t["lease"] is not None) == (t["state"] == "RUNNING")
            if t["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
                assert t["finished_at"] is not None
            # attempts of the current occurrence stay within the limit (an update may have lowered the
            # limit, or made a periodic task with many runs a one-time one, under a task)
            assert (
                t["occ_attempts"] <= t["constraints"]["max_attempts"]
                or t["trigger"]["type"] == "periodic"
                or (t["id"], t["seq"]) in history.get("updated", ())
            )


def test_host_field_folds_packs_and_updates():
    """``host`` (--host) is on every task, null unless pinned; it survives packing (snapshots,
    compaction's put ops) and ``--policy update`` takes the new request's value, null included."""
    from kmpwm.core.state import pack_task, unpack_task

    ts = 1_800_000_000.0
    t = lambda i, host=None: make_task(  # noqa: E731
        i, ts, repeating=False, max_attempts=3, backoff="exponential", tags=[], host=host
    )
    s = new_state()
    apply(s, {"ts": ts, "ops": [{"op": "enq", "task": t("a", "h1"), "policy": "keep"}]})
    apply(s, {"ts": ts, "ops": [{"op": "enq", "task": t("b"), "policy": "keep"}]})
    assert s["tasks"]["a"]["host"] == "h1" and s["tasks"]["b"]["host"] is None
    assert pack_task(s["tasks"]["a"])["host"] == "h1" and "host" not in pack_task(s["tasks"]["b"])
    assert unpack_task(orjson.loads(orjson.dumps(pack_task(s["tasks"]["a"])))) == s["tasks"]["a"]
    assert unpack_task(pack_task(s["tasks"]["b"]))["host"] is None
    events = []
    emit = lambda ts_, tid, kind, detail: events.append((tid, kind, detail))  # noqa: E731
    r = apply(s, {"ts": ts + 1, "ops": [{"op": "enq", "task": t("a", "h2"), "policy": "update"}]}, emit)
    assert r[0]["action"] == "updated" and s["tasks"]["a"]["host"] == "h2"
    assert ("a", "updated", {"changed": ["host"], "by": None}) in events
    apply(s, {"ts": ts + 2, "ops": [{"op": "enq", "task": t("a"), "policy": "update"}]})
    assert s["tasks"]["a"]["host"] is None  # the new request is not pinned: neither is the task
    apply(s, {"ts": ts + 3, "ops": [{"op": "enq", "task": t("b", "h1"), "policy": "keep"}]})
    assert s["tasks"]["b"]["host"] is None  # keep: the old request stands


def test_fold_examples():
    """A few hand-written sequences with known outcomes."""
    ts = 1_800_000_000.0
    t = lambda i, **kw: make_task(i, ts, repeating=False, max_attempts=kw.get("m", 3), backoff="exponential", tags=[])
    s = new_state()
    apply(s, {"ts": ts, "ops": [{"op": "enq", "task": t("a"), "policy": "keep"}]})
    r = apply(s, {"ts": ts + 1, "ops": [{"op": "enq", "task": t("a"), "policy": "append"}]})
    assert r[0]["id"] == "a#2" and r[0]["action"] == "appended"
    assert s["tasks"]["a#2"]["state"] == "BLOCKED"
    seq = s["tasks"]["a"]["seq"]
    assert apply(
        s, {"ts": ts + 2, "ops": [{"op": "claim", "id": "a", "seq": seq, "runner": "r", "until": ts + 100}]}
    ) == [True]
    # another runner cannot claim a held lease
    assert apply(
        s, {"ts": ts + 3, "ops": [{"op": "claim", "id": "a", "seq": seq, "runner": "q", "until": ts + 100}]}
    ) == [False]
    apply(s, {"ts": ts + 4, "ops": [{"op": "result", "id": "a", "seq": seq, "runner": "r", "status": "RETRY"}]})
    assert s["tasks"]["a"]["state"] == "ENQUEUED" and s["tasks"]["a"]["attempts"] == 1
    assert s["tasks"]["a"]["due"] == ts + 4 + 10.0  # first backoff: the backoff delay
    apply(s, {"ts": ts + 20, "ops": [{"op": "claim", "id": "a", "seq": seq, "runner": "r", "until": ts + 100}]})
    apply(s, {"ts": ts + 21, "ops": [{"op": "result", "id": "a", "seq": seq, "runner": "r", "status": "EXPIRED"}]})
    assert s["tasks"]["a"]["attempts"] == 1 and s["tasks"]["a"]["state"] == "ENQUEUED"  # expiry does not count
    apply(s, {"ts": ts + 22, "ops": [{"op": "claim", "id": "a", "seq": seq, "runner": "r", "until": ts + 100}]})
    apply(s, {"ts": ts + 23, "ops": [{"op": "result", "id": "a", "seq": seq, "runner": "r", "status": "SUCCESS"}]})
    assert s["tasks"]["a"]["state"] == "SUCCEEDED" and s["tasks"]["a"]["attempts"] == 2
    assert s["tasks"]["a#2"]["state"] == "ENQUEUED"  # the appended task runs once the first finished
    # keep: a#2 is still unfinished, so the family exists
    r = apply(s, {"ts": ts + 30, "ops": [{"op": "enq", "task": t("a"), "policy": "keep"}]})
    assert r[0]["action"] == "kept"
    assert apply(s, {"ts": ts + 31, "ops": [{"op": "cancel", "ids": ["a"]}]}) == [["a#2"]]
    # a finished task does not count for keep: the same id is enqueued anew
    r = apply(s, {"ts": ts + 32, "ops": [{"op": "enq", "task": t("a"), "policy": "keep"}]})
    assert r[0]["action"] == "enqueued" and r[0]["id"] == "a"
    assert s["tasks"]["a"]["state"] == "ENQUEUED" and s["tasks"]["a"]["attempts"] == 0

    # chains: a failure fails the later steps with "upstream failed"
    c = new_state()
    steps = [[t("C/1/w")], [t("C/2/w"), t("C/2/w#2")], [t("C/3/w")]]
    apply(c, {"ts": ts, "ops": [{"op": "chain", "id": "C", "policy": "replace", "steps": steps, "tags": []}]})
    assert [c["tasks"][i]["state"] for i in ("C/1/w", "C/2/w", "C/3/w")] == ["ENQUEUED", "BLOCKED", "BLOCKED"]
    seq = c["tasks"]["C/1/w"]["seq"]
    apply(
        c,
        {
            "ts": ts + 1,
            "ops": [
                {"op": "claim", "id": "C/1/w", "seq": seq, "runner": "r", "until": ts + 60},
                {"op": "result", "id": "C/1/w", "seq": seq, "runner": "r", "status": "SUCCESS"},
            ],
        },
    )
    assert c["tasks"]["C/2/w"]["state"] == c["tasks"]["C/2/w#2"]["state"] == "ENQUEUED"
    assert c["tasks"]["C/3/w"]["state"] == "BLOCKED"
    seq = c["tasks"]["C/2/w"]["seq"]
    apply(c, {"ts": ts + 2, "ops": [{"op": "fail", "id": "C/2/w", "seq": seq, "reason": "boom"}]})
    assert c["tasks"]["C/3/w"]["state"] == "FAILED" and c["tasks"]["C/3/w"]["reason"] == "upstream failed"


# -- through the store, with a real journal file --------------------------------------------


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_store_snapshot_and_reload_equal_scratch_fold(data):
    from kmpwm.storage.store import Store

    records = draw_records(data, max_records=12)
    snap_at = data.draw(st.integers(0, len(records)), label="snapshot after")
    with temp_home() as paths:
        store = Store(paths)
        for n, record in enumerate(records):
            with store.transaction() as txn:
                txn.commit(fresh(record)["ops"], ts=record["ts"])
            if n + 1 == snap_at:
                store.write_snapshot(store.load())
        expected = fold(records)
        assert store.load().state == expected  # the writer's own incremental view
        reloaded = Store(paths).load()
        if snap_at:
            assert reloaded.from_snapshot
        assert reloaded.state == expected
        assert not reloaded.damage and reloaded.torn is None
        os.unlink(paths.snapshot_file) if paths.snapshot_file.exists() else None
        assert Store(paths).load().state == expected


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_snapshots_by_several_writers_keep_history(data):
    """Two processes (stores) write, and snapshot at random points, in turns: a new reader's
    full state equals the scratch fold; its hot state holds every unfinished task and live chain
    and nothing that differs; with history.snap gone, the full state is still right."""
    from kmpwm.storage.store import Store

    records = draw_records(data, max_records=16)
    with temp_home() as paths:
        stores = [Store(paths), Store(paths)]
        for record in records:
            store = stores[data.draw(st.integers(0, 1), label="writer")]
            with store.transaction() as txn:
                txn.commit(fresh(record)["ops"], ts=record["ts"])
            if data.draw(st.integers(0, 3), label="snapshot?") == 0:
                stores[data.draw(st.integers(0, 1), label="snapshotter")].write_snapshot()
        expected = fold(records)
        for store in (*stores, Store(paths)):
            assert store.load().state == expected
        hot = Store(paths).load(full=False).state
        want = hot_part(expected)
        assert set(want["tasks"]) <= set(hot["tasks"]) and set(want["chains"]) <= set(hot["chains"])
        for i, t in hot["tasks"].items():
            assert expected["tasks"][i] == t
        if paths.history_file.exists():
            paths.history_file.unlink()
            assert Store(paths).load().state == expected
            assert Store(paths).load().state == expected  # the snapshot files written anew


@SETTINGS
@given(st.data())
def test_results_without_folding_equal_the_fold(data):
    """Transaction.commit answers a batch of brand-new tasks without folding it (the fold waits
    for the next read): its answers must be exactly the fold's, and it must decline otherwise."""
    from kmpwm.storage.store import _new_tasks_only

    records = draw_records(data)
    state = new_state()
    for _n, r in enumerate(records):
        ids = data.draw(st.lists(st.sampled_from(["n1", "n2", "a", "C1/1/w"]), max_size=3), label="new ids")
        batch = {
            "ts": r["ts"],
            "ops": [
                {
                    "op": "enq",
                    "task": make_task(i, r["ts"] - 1, repeating=False, max_attempts=1, backoff="linear", tags=[]),
                    "policy": "keep",
                }
                for i in ids
            ],
        }
        for rec in (fresh(r), batch):
            quick = _new_tasks_only(state, rec)
            before = copy.deepcopy(state)
            results = apply(state, fresh(rec))
            if quick is not None:
                assert quick == results
                assert all(o["op"] == "enq" and o["task"]["id"] not in before["tasks"] for o in rec["ops"])
        if all(i in state["tasks"] for i in ids) and ids:
            assert _new_tasks_only(state, batch) is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_idle_means_plan_has_nothing(data):
    """An idle `run-due` decides from state.idle_at alone, without planning: whenever it says
    idle, the full plan must have nothing to run and nothing to write, on any device."""
    from kmpwm.core.state import idle_at
    from kmpwm.scheduling.plan import plan
    from kmpwm.scheduling.probes import Device

    records = draw_records(data)
    state = fold(records)
    now = records[-1]["ts"] + data.draw(st.sampled_from([-100.0, 0.0, 5.0, 61.0, 3600.0, 86400.0]), label="later")
    assume = {
        "network": data.draw(st.booleans()),
        "charging": data.draw(st.booleans()),
        "battery_low": data.draw(st.booleans()),
        "idle": data.draw(st.booleans()),
    }
    host = data.draw(st.sampled_from([None, "h1", "h2"]), label="this host")
    if idle_at(state, now, host):
        p = plan(state, now, Device(assume=assume), known_worker=lambda name: True, host=host)
        assert not p.due and not p.ops and not p.trig_updates


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_idle_without_loading_never_hides_work(data):
    """run-due first asks the snapshot's summary and the records after it whether anything can
    be due (Store.idle_without_loading), without parsing the state: whenever it says idle, the
    loaded state must be idle too (state.idle_at, which test_idle_means_plan_has_nothing ties
    to the full plan)."""
    from kmpwm.core.state import idle_at
    from kmpwm.storage.store import Store

    records = draw_records(data, max_records=14)
    with temp_home() as paths:
        store = Store(paths)
        future = data.draw(st.booleans(), label="delayed tasks")
        for record in records:
            ops = fresh(record)["ops"]
            if future:  # tasks due an hour on, so that "idle" is often the answer
                for op in ops:
                    for task in (
                        [op["task"]]
                        if op["op"] == "enq"
                        else [t for step in op["steps"] for t in step]
                        if op["op"] == "chain"
                        else []
                    ):
                        task["due"] = task["created_at"] + 3600
            with store.transaction() as txn:
                txn.commit(ops, ts=record["ts"])
            if data.draw(st.integers(0, 3), label="snapshot?") == 0:
                store.write_snapshot()
        last = records[-1]["ts"]
        for now in (last - 50, last + 1, last + 100, last + 3599, last + 3601, last + 86400):
            if Store(paths).idle_without_loading(now):
                assert idle_at(Store(paths).load(full=False).state, now), now


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_enqueue_proved_new_on_the_bytes_equals_the_fold(data):
    """A process that has read nothing answers an enqueue of a few tasks by searching the
    snapshot's and the tail's bytes for their ids (Store.unmentioned) instead of parsing the
    state.  Whatever it answers must be exactly what the fold of the whole journal answers, and
    the journal it leaves must fold to the same state; ids that are mentioned nowhere must take
    that path (else it is dead code)."""
    from kmpwm.storage.store import Store

    records = draw_records(data, max_records=14)
    with temp_home() as paths:
        writer = Store(paths)
        for record in records:
            with writer.transaction() as txn:
                txn.commit(fresh(record)["ops"], ts=record["ts"])
            if data.draw(st.integers(0, 2), label="snapshot?") == 0:
                writer.write_snapshot()
        ts = records[-1]["ts"] + 1
        known = sorted({*fold(records)["tasks"], *fold(records)["chains"], *IDS})
        ids = data.draw(
            st.lists(st.sampled_from([*known, "new1", "new2", "in-input"]), min_size=1, max_size=3), label="ids"
        )
        ops = []
        for i in ids:
            task = make_task(i, ts, repeating=False, max_attempts=1, backoff="linear", tags=[])
            task["input"] = "in-input"  # mentioned in the journal's bytes, but never as a task id
            ops.append({"op": "enq", "task": task, "policy": data.draw(st.sampled_from(["keep", "replace"]))})
        expected_state = fold(records)
        expected = apply(expected_state, fresh({"ts": ts, "ops": ops}))
        reader = Store(paths)
        with reader.transaction() as txn:
            answers = txn.commit(orjson.loads(orjson.dumps(ops)), ts=ts)
            took_bytes_path = txn._view is None
        assert answers == expected
        assert Store(paths).load().state == expected_state
        whole_new = len(set(ids)) == len(ids) and not set(ids) & {*known, "in-input"}
        if whole_new and paths.snapshot_file.exists():
            assert took_bytes_path


def test_a_claim_of_a_consumed_occurrence_is_refused():
    """Issue 13.2: every claim names the occurrence it consumes (state.occurrence); the fold refuses
    one that a run already consumed, although the task is ENQUEUED and due, as a stale plan sees it."""
    from kmpwm.core.state import occurrence

    ts = 1_800_000_000.0
    base = make_task("x", ts, repeating=False, max_attempts=3, backoff="linear", tags=[])
    on_change = dict(
        base,
        id="c",
        trigger={"type": "on_change", "path": "/p", "descendants": True, "delay": 0.0},
        trig_state={"baseline": [1, 2, 3]},
    )
    when = dict(
        base, id="w", trigger={"type": "device_state", "state": "battery-low", "delay": 0.0}, trig_state={"armed": True}
    )
    periodic = make_task("p", ts, repeating=True, max_attempts=3, backoff="linear", tags=[])
    s = new_state()
    apply(s, {"ts": ts, "ops": [{"op": "enq", "task": t, "policy": "keep"} for t in (on_change, when, periodic)]})
    tasks = s["tasks"]
    occ = {"c": occurrence(tasks["c"], [4, 5, 6]), "w": occurrence(tasks["w"]), "p": occurrence(tasks["p"])}
    trig = {"c": {"baseline": [4, 5, 6]}, "w": {"armed": False}, "p": None}
    for n, tid in enumerate(("c", "w", "p")):
        seq = tasks[tid]["seq"]
        claim = {"op": "claim", "id": tid, "seq": seq, "runner": "r", "until": ts + 100, "occ": occ[tid]}
        result = {
            "op": "result",
            "id": tid,
            "seq": seq,
            "runner": "r",
            "status": "SUCCESS",
            "next_run_at": ts + 2 if tid != "p" else ts + 120,
        }
        if trig[tid]:
            result["trig_state"] = trig[tid]
        assert apply(s, {"ts": ts + 1, "ops": [claim, result]}) == [True, True]
        assert tasks[tid]["state"] == "ENQUEUED" and tasks[tid]["attempts"] == 1
        stale = dict(claim, runner="q")  # planned before that run: the same occurrence
        assert apply(s, {"ts": ts + 3 + n, "ops": [stale]}) == [False], tid
        assert tasks[tid]["state"] == "ENQUEUED"
    # a new change, a new entry into the state (the trigger re-armed), the next slot: claimable
    apply(
        s,
        {
            "ts": ts + 10,
            "ops": [{"op": "trig", "id": "w", "seq": tasks["w"]["seq"], "trig_state": {"armed": True, "entry": 1}}],
        },
    )
    fresh_occ = {"c": occurrence(tasks["c"], [7, 8, 9]), "w": occurrence(tasks["w"]), "p": occurrence(tasks["p"])}
    assert all(fresh_occ[k] != occ[k] for k in occ)
    for tid in ("c", "w", "p"):
        claim = {
            "op": "claim",
            "id": tid,
            "seq": tasks[tid]["seq"],
            "runner": "q",
            "until": ts + 300,
            "occ": fresh_occ[tid],
        }
        assert apply(s, {"ts": ts + 200, "ops": [claim]}) == [True], tid


def test_due_now_work_stays_due_now_after_the_clock_goes_back():
    """Issue 13.10: work due "now" (plus its delay) that was written while the clock was ahead is
    judged due from the corrected clock, not after the offset; named times and grids stay."""
    from kmpwm.core.state import due_at, idle_at

    ts = 1_800_000_000.0
    s = new_state()
    once = make_task("once", ts + 3600, repeating=False, max_attempts=3, backoff="linear", tags=[])
    later = dict(
        make_task("later", ts + 3600, repeating=False, max_attempts=3, backoff="linear", tags=[]),
        trigger={"type": "one_time", "delay": 600.0},
        due=ts + 3600 + 600,
    )
    at = dict(
        make_task("at", ts + 3600, repeating=False, max_attempts=3, backoff="linear", tags=[]),
        trigger={"type": "exact", "at": ts + 7200, "behavior": "attempt"},
        due=ts + 7200,
    )
    apply(s, {"ts": ts + 3600, "ops": [{"op": "enq", "task": t, "policy": "keep"} for t in (once, later, at)]})
    now = ts  # the clock was an hour ahead when they were enqueued, and was set back
    assert due_at(s["tasks"]["once"], now) == now
    assert due_at(s["tasks"]["later"], now) == now + 600
    assert due_at(s["tasks"]["at"], now) == ts + 7200  # a time the user named stays where it is
    assert not idle_at(s, now)
    # the same records with the clock right: nothing changes
    assert due_at(s["tasks"]["once"], ts + 3600) == ts + 3600
    assert due_at(s["tasks"]["later"], ts + 3600) == ts + 4200
