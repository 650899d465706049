"""``kmpwm explain ID``: why a task is or is not running now, in words.

The decision is scheduling.decide's, the same that run-due's plan acts on; this module only
puts it into a document (``code``, ``reason``, ``details``) for people.
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple

from kmpwm.core.exitcodes import InvalidParams
from kmpwm.core.hosts import pinned_elsewhere, this_host
from kmpwm.core.state import family, members
from kmpwm.core.timeparse import iso, relative
from kmpwm.scheduling.decide import MAX_CRASHES, Decision, blocked_by, decide, misfire_text, missed_detail
from kmpwm.scheduling.leases import holder_started, local, lost_why
from kmpwm.scheduling.probes import Device
from kmpwm.scheduling.views import lease_host
from kmpwm.storage.paths import Paths
from kmpwm.storage.stores import open_store

READINGS = ("network", "metered", "roaming", "charging", "battery", "storage_low", "idle")


def explain_task(state: dict, t: dict, now: float, device: Device, host: str | None = None, started=None) -> dict:
    """Why ``t`` is or is not running at ``now``, as judged by a runner of ``host`` (default:
    this process's host name).  ``started(t)``: did the gone holder of a RUNNING ``t`` start
    its worker (scheduling.leases.holder_started; None: not asked)."""
    host = this_host() if host is None else host
    d = decide(t, state, now, device, host=host, started=started)
    out = {"id": t["id"], "state": t["state"], "running": False, "code": d.code, "reason": None}
    out["next_run_at"] = iso(d.at)
    out["details"] = _details(t)
    if d.lease in ("orphaned", "expired") and started is not None:  # its run is over without a result
        out["details"]["worker_started"] = False if d.unstarted else started(t)
    render = _TEXT.get("missed" if d.missed is not None else d.code, _due)
    render(out, d, _Ctx(state, t, now, device, host))
    if d.taken_over and not d.due:  # its runner is gone, and run-due does not take it over yet
        out["reason"] = f"{lost_why(t, d.lease)}; {out['reason']}"
    return out


def _details(t: dict) -> dict:
    """The details every document of ``t`` has: its host, a running task's lease."""
    details = {"host": t["host"]} if t.get("host") is not None else {}
    if t["state"] == "RUNNING":
        details["lease"] = _lease_doc(t["lease"] or {})
    return details


class _Ctx(NamedTuple):
    """What a renderer reads besides the decision."""

    state: dict
    t: dict
    now: float
    device: Device
    host: str


def _lease_doc(lease: dict) -> dict:
    return {
        "runner": lease.get("runner"),
        "pid": lease.get("pid"),
        "since": iso(lease.get("since")),
        "until": iso(lease.get("until")),
        "host": lease_host(lease),
    }


# -- one renderer per code: each fills ``reason`` (and ``details``) of the document ---------------


def _finished(out: dict, d: Decision, c: _Ctx) -> None:
    t = c.t
    out["reason"] = f"{t['state']} {relative(t['finished_at'], c.now)}" + (
        f": {t['reason']}" if t.get("reason") else ""
    )


def _blocked(out: dict, d: Decision, c: _Ctx) -> None:
    t, tasks = c.t, c.state["tasks"]
    kind, ids = blocked_by(c.state, t)
    if kind == "step":
        waiting = ", ".join(f"{i} ({tasks[i]['state']})" for i in ids)
        out["reason"] = f"blocked by step {t['step'] - 1} of chain {t['chain_id']}: {waiting}"
    else:
        out["reason"] = "appended: waiting for " + ", ".join(f"{i} ({tasks[i]['state']})" for i in ids)
    out["details"]["blocked_by"] = ids


def _held(out: dict, d: Decision, c: _Ctx) -> None:
    from kmpwm.platform import procs

    lease = c.t["lease"] or {}
    stopped = " (stopped: it goes on when it gets SIGCONT; no other run-due takes the task meanwhile)"
    where = "" if local(lease) else f" on host {lease_host(lease)}"
    until = "while that process lives" if local(lease) else f"lease until {iso(lease.get('until'))}"
    out["running"] = True
    out["reason"] = (
        f"running: held by run-due pid {lease.get('pid')}{where}{stopped if procs.stopped(lease.get('pid')) else ''}"
        f" since {relative(lease.get('since'), c.now)}, {until}"
    )


def _host(out: dict, d: Decision, c: _Ctx) -> None:
    t, pinned = c.t, pinned_elsewhere(c.t, c.host)
    if t["state"] == "RUNNING":
        out["reason"] = (
            f"its run on host {lease_host(t['lease'] or {})} is over without a result; {pinned}: "
            f"a runner on {t['host']} picks it up again"
        )
        return
    when = "due now there" if d.at <= c.now else f"next run {relative(d.at, c.now)} ({iso(d.at)})"
    out["reason"] = f"{pinned}: only a runner on host {t['host']} runs it; {when}"


def _quarantined(out: dict, d: Decision, c: _Ctx) -> None:
    out["code"] = "due"  # this once more: the next run-due ends it FAILED
    _due(out, d, c)


def _stopping(out: dict, d: Decision, c: _Ctx) -> None:
    fence = c.state["fences"][c.t["id"]]
    out["reason"] = (
        f"waiting for the cancelled previous run of {c.t['id']} to stop "
        f"(run-due pid {fence.get('pid')}); it never runs beside it"
    )


def _window_missed(out: dict, d: Decision, c: _Ctx) -> None:
    out["reason"] = "its window ended; the next run-due marks it FAILED (window missed)"


def _paused(out: dict, d: Decision, c: _Ctx) -> None:
    p, tid = d.paused, c.t["id"]
    what = "the queue is paused (`kmpwm resume --all`)" if p["queue"] else f"paused (`kmpwm resume {tid}`)"
    until = f" until {iso(p['until'])} ({relative(p['until'], c.now)})" if p["until"] is not None else " until resumed"
    out["reason"] = f"{what}{until}; it does not start while paused"
    out["details"]["paused"] = {"queue": p["queue"], "until": iso(p["until"])}


def _backoff(out: dict, d: Decision, c: _Ctx) -> None:
    out["reason"] = f"backing off after attempt {c.t['occ_attempts']} until {iso(d.at)} ({relative(d.at, c.now)})"


def _not_due(out: dict, d: Decision, c: _Ctx) -> None:
    trig = c.t["trigger"]
    out["reason"] = {
        "time": lambda: f"not yet due: next run {relative(d.at, c.now)} ({iso(d.at)})",
        "change": lambda: f"waiting for {trig['path']} to change",
        "enter": lambda: f"waiting for the device to enter {trig['state']}",
        "armed": lambda: f"already ran on entering {trig['state']}; re-arms when the device leaves it",
    }[d.wait]()


def _missed(out: dict, d: Decision, c: _Ctx) -> None:
    m = d.missed
    then = (
        f"the next run-due records it missed and moves it to {iso(m['next'])}"
        if m["next"] is not None
        else "the next run-due records it missed and ends it FAILED (missed)"
    )
    out.update(code="missed", reason=f"{misfire_text(m, outcome=False)}: {then}")
    out["details"]["missed"] = dict(missed_detail(m), next=iso(m["next"]))


def _constraint(out: dict, d: Decision, c: _Ctx) -> None:
    t = c.t
    held = t["constraints"].get("misfire_grace") and t["trig_state"].get("held") == t["due"]
    out["reason"] = d.skip + (" (held since it was due: a constraint wait is not a misfire)" if held else "")
    out["details"]["readings"] = {k: c.device.get(k) for k in READINGS}


def _due(out: dict, d: Decision, c: _Ctx) -> None:
    if not d.lease:
        out["reason"] = "due now: the next run-due runs it"
        return
    why = lost_why(c.t, d.lease)
    if d.unstarted:  # its start mark says the worker never started: nothing ran, nothing counts
        why += " before it started the worker (not counted as a crash)"
    elif d.lease == "orphaned" and not (c.t["lease"] or {}).get("ahead"):
        why += f" (crash {c.t.get('crashes', 0) + 1} of {MAX_CRASHES} before quarantine)"
    quarantine = f"; after {MAX_CRASHES} such crashes it is quarantined (FAILED)" if d.code == "quarantined" else ""
    out["reason"] = f"due again: {why}; the next run-due picks it up (at-least-once){quarantine}"


_TEXT = {
    "finished": _finished,
    "blocked": _blocked,
    "lease": _held,
    "host": _host,
    "quarantined": _quarantined,
    "stopping": _stopping,
    "window-missed": _window_missed,
    "paused": _paused,
    "backoff": _backoff,
    "not-due": _not_due,
    "missed": _missed,
    "constraint": _constraint,
    "due": _due,
}


# -- kmpwm explain -----------------------------------------------------------------------------


def explain_ids(state: dict, task_id: str) -> list[str]:
    """The tasks ``explain ID`` covers: a chain's tasks, or ``ID`` with its ``ID#n``."""
    if task_id in state["chains"]:
        return [t["id"] for t in members(state, state["chains"][task_id])]
    if task_id in state["tasks"]:
        return [task_id] + [i for i in family(state, task_id) if i != task_id]
    return family(state, task_id)


def explain(paths: Paths, task_id: str) -> list[dict]:
    """``explain ID``'s documents, one per task it covers (a running task's with its progress)."""
    state = open_store(paths).load().state
    now = time.time()
    device = Device(storage_path=str(paths.journal_dir.parent))
    ids = explain_ids(state, task_id)
    if not ids:
        raise InvalidParams(f"no task or chain {task_id!r}", hint="`kmpwm inspect-queue --all` lists them")
    started = functools.partial(holder_started, paths.runners_dir)  # what run-due's plan asks too
    docs = [explain_task(state, state["tasks"][i], now, device, started=started) for i in ids if i in state["tasks"]]
    for d in docs:
        if d["running"]:
            _add_progress(paths, d)
    return docs


def _add_progress(paths: Paths, doc: dict) -> None:
    """A running task's document: with its latest progress (None: it reported none)."""
    from kmpwm.storage.progress import of_task, text

    doc["progress"] = of_task(paths, doc["id"])
    if doc["progress"]:
        doc["reason"] += f"; progress {text(doc['progress'], False)} (at {doc['progress']['at']})"
