"""``kmpwm explain ID``: why a task is or is not running now."""

from __future__ import annotations

import time

from kmpwm.core.exitcodes import InvalidParams
from kmpwm.core.hosts import this_host
from kmpwm.core.state import due_at, family, member, members, pause_of
from kmpwm.core.timeparse import iso, relative
from kmpwm.scheduling.leases import lease_state, local, lost_why
from kmpwm.scheduling.plan import MAX_CRASHES, misfire, misfire_text, pinned_elsewhere
from kmpwm.scheduling.probes import Device, device_state_now, unmet
from kmpwm.scheduling.views import lease_host
from kmpwm.storage.paths import Paths
from kmpwm.storage.stores import open_store


def explain_task(state: dict, t: dict, now: float, device: Device, host: str | None = None) -> dict:
    """Why ``t`` is or is not running at ``now``, as judged by a runner of ``host`` (default:
    this process's host name)."""
    tasks = state["tasks"]
    st = t["state"]
    if host is None:
        host = this_host()
    out = {
        "id": t["id"],
        "state": st,
        "running": False,
        "code": None,
        "reason": None,
        "next_run_at": None,
        "details": {},
    }
    if t.get("host") is not None:
        out["details"]["host"] = t["host"]
    if st in ("SUCCEEDED", "FAILED", "CANCELLED"):
        out["code"] = "finished"
        out["reason"] = f"{st} {relative(t['finished_at'], now)}" + (f": {t['reason']}" if t.get("reason") else "")
        return out
    if st == "RUNNING":
        lease = t["lease"] or {}
        ls = lease_state(t, now)
        out["details"]["lease"] = {
            "runner": lease.get("runner"),
            "pid": lease.get("pid"),
            "since": iso(lease.get("since")),
            "until": iso(lease.get("until")),
            "host": lease_host(lease),
        }
        if ls == "held":
            from kmpwm.platform import procs

            paused = (
                " (stopped: it goes on when it gets SIGCONT; no other run-due takes the task meanwhile)"
                if procs.stopped(lease.get("pid"))
                else ""
            )
            out.update(
                running=True,
                code="lease",
                reason=f"running: held by run-due pid {lease.get('pid')}"
                + ("" if local(lease) else f" on host {lease_host(lease)}")
                + f"{paused} since "
                f"{relative(lease.get('since'), now)}, "
                + ("while that process lives" if local(lease) else f"lease until {iso(lease.get('until'))}"),
            )
        elif (pinned := pinned_elsewhere(t, host)) is not None:
            out.update(
                code="host",
                reason=f"its run on host {lease_host(lease)} is over without a result; {pinned}: "
                f"a runner on {t['host']} picks it up again",
            )
            return out
        else:
            why = lost_why(t, ls)
            extra = (
                f"; after {MAX_CRASHES} such crashes it is quarantined (FAILED)"
                if t.get("crashes", 0) + 1 >= MAX_CRASHES
                else ""
            )
            out.update(code="due", reason=f"due again: {why}; the next run-due picks it up (at-least-once){extra}")
        return out
    if st == "BLOCKED":
        out["code"] = "blocked"
        if t.get("chain_id") and t.get("step", 1) > 1:
            chain = state["chains"].get(t["chain_id"], {"steps": []})
            prev = chain["steps"][t["step"] - 2] if len(chain["steps"]) >= t["step"] - 1 else []
            prev = [i for i in prev if chain.get("id") and (m := member(state, chain, i)) and m["state"] != "SUCCEEDED"]
            waiting = [f"{i} ({tasks[i]['state']})" for i in prev]
            out["reason"] = f"blocked by step {t['step'] - 1} of chain {t['chain_id']}: " + ", ".join(waiting)
            out["details"]["blocked_by"] = prev
        else:
            deps = [
                d
                for d in t.get("after", ())
                if d in tasks and tasks[d]["state"] not in ("SUCCEEDED", "FAILED", "CANCELLED")
            ]
            out["reason"] = "appended: waiting for " + ", ".join(f"{d} ({tasks[d]['state']})" for d in deps)
            out["details"]["blocked_by"] = deps
        return out
    due = due_at(t, now)
    out["next_run_at"] = iso(due)
    pinned = pinned_elsewhere(t, host)  # the same decision as run-due's (scheduling.plan), made first
    if pinned is not None:
        when = "due now there" if due <= now else f"next run {relative(due, now)} ({iso(due)})"
        out.update(code="host", reason=f"{pinned}: only a runner on host {t['host']} runs it; {when}")
        return out
    fence = (state.get("fences") or {}).get(t["id"])
    if fence and lease_state({"state": "RUNNING", "lease": fence}, now) == "held":
        out.update(
            code="stopping",
            reason=f"waiting for the cancelled previous run of {t['id']} to stop "
            f"(run-due pid {fence.get('pid')}); it never runs beside it",
        )
        return out
    paused = pause_of(state, t, now)  # the same decision as run-due's (scheduling.plan)
    if paused is not None:
        what = "the queue is paused (`kmpwm resume --all`)" if paused["queue"] else f"paused (`kmpwm resume {t['id']}`)"
        until = (
            f" until {iso(paused['until'])} ({relative(paused['until'], now)})"
            if paused["until"] is not None
            else " until resumed"
        )
        out.update(code="paused", reason=f"{what}{until}; it does not start while paused")
        out["details"]["paused"] = {"queue": paused["queue"], "until": iso(paused["until"])}
        return out
    trig = t["trigger"]
    lr = t.get("last_result") or {}
    if due > now:
        if lr.get("status") == "RETRY":
            out.update(
                code="backoff",
                reason=f"backing off after attempt {t['occ_attempts']} until {iso(due)} ({relative(due, now)})",
            )
        else:
            out.update(code="not-due", reason=f"not yet due: next run {relative(due, now)} ({iso(due)})")
        return out
    if trig["type"] == "windowed" and now > trig["end"]:
        out.update(code="window-missed", reason="its window ended; the next run-due marks it FAILED (window missed)")
        return out
    m = misfire(t, now)  # the same decision as run-due's (scheduling.plan)
    if m is not None:
        then = (
            f"the next run-due records it missed and moves it to {iso(m['next'])}"
            if m["next"] is not None
            else "the next run-due records it missed and ends it FAILED (missed)"
        )
        out.update(code="missed", reason=f"{misfire_text(m, outcome=False)}: {then}")
        out["details"]["missed"] = {
            "due": iso(m["due"]),
            "late_ms": int(m["late"] * 1000),
            "grace": m["grace"],
            "next": iso(m["next"]),
        }
        return out
    if trig["type"] == "on_change":
        from kmpwm.core.triggers import change_signature

        if change_signature(trig["path"], trig.get("descendants", True)) == t["trig_state"].get("baseline"):
            out.update(code="not-due", reason=f"waiting for {trig['path']} to change")
            return out
    if trig["type"] == "device_state":
        inside = device_state_now(trig["state"], device)
        if not inside or not t["trig_state"].get("armed", True):
            out.update(
                code="not-due",
                reason=(
                    f"waiting for the device to enter {trig['state']}"
                    if not inside
                    else f"already ran on entering {trig['state']}; re-arms when the device leaves it"
                ),
            )
            return out
    reason = unmet(t["constraints"], device)
    if reason:
        if t["constraints"].get("misfire_grace") and t["trig_state"].get("held") == t["due"]:
            reason += " (held since it was due: a constraint wait is not a misfire)"
        out.update(code="constraint", reason=reason)
        out["details"]["readings"] = {
            k: device.get(k) for k in ("network", "metered", "roaming", "charging", "battery", "storage_low", "idle")
        }
        return out
    out.update(code="due", reason="due now: the next run-due runs it")
    return out


def explain_command(paths: Paths, task_id: str, as_json: bool) -> int:
    from kmpwm.cli.output import print_json, say

    state = open_store(paths).load().state
    now = time.time()
    device = Device(storage_path=str(paths.journal_dir.parent))
    tasks = state["tasks"]
    ids = []
    if task_id in state["chains"]:
        chain = state["chains"][task_id]
        ids = [t["id"] for t in members(state, chain)]
    elif task_id in tasks:
        ids = [task_id] + [i for i in family(state, task_id) if i != task_id]
    else:
        ids = family(state, task_id)
    if not ids:
        raise InvalidParams(f"no task or chain {task_id!r}", hint="`kmpwm inspect-queue --all` lists them")
    docs = [explain_task(state, tasks[i], now, device) for i in ids if i in tasks]
    from kmpwm.storage.progress import of_task, text

    for d in docs:
        if d["running"]:
            d["progress"] = of_task(paths, d["id"])
            if d["progress"]:
                d["reason"] += f"; progress {text(d['progress'], False)} (at {d['progress']['at']})"
    if as_json:
        print_json(docs[0] if len(docs) == 1 else {"id": task_id, "tasks": docs})
    else:
        for d in docs:
            say(f"{d['id']}: {d['state']} — {d['reason']}")
    return 0
