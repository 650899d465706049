"""What a finished run comes to: its worker's exit status, result and output become a result
(SUCCESS, FAILURE, RETRY, EXPIRED) and the ``result`` op that records it; and the log lines."""

from __future__ import annotations

import signal
import time

import orjson

from kmpwm.core import schema
from kmpwm.core.triggers import next_after_run, task_offset
from kmpwm.running.jobs import Job
from kmpwm.storage.paths import Paths

RECORDED = ("SUCCESS", "FAILURE", "RETRY")
_UNSUCCESSFUL = ("FAILURE", "RETRY", "EXPIRED")  # logged with the output's tail, as a warning


def outcome(job: Job) -> dict:
    """The result the worker gave (or its death implies), as {"status", "message", "data"}."""
    if job.immediate is not None:
        return job.immediate
    if job.kind == "command":
        return command_outcome(job)
    res = _sent(job)
    if res is not None and res.get("status") in RECORDED:
        return checked_data(res)
    return {"status": "FAILURE", "message": death(job, "the worker process"), "data": None}


def _sent(job: Job) -> dict | None:
    """The result a Python worker's process sent, if any (noting whether it reported progress)."""
    if not job.result:
        return None
    try:
        res = orjson.loads(bytes(job.result))
    except orjson.JSONDecodeError:
        return None
    if not isinstance(res, dict):
        return None
    if res.get("progress"):
        job.progressed = True
    return res


def stopped(job: Job, expire_reason: str) -> dict:
    """A run told to stop does not count, whatever it returned (SPEC section 6; WorkManager
    ignores a stopped worker's result): a worker that exits 0 on SIGTERM has not necessarily
    finished, and a chain must not move on with half-done work."""
    why = "the run expired: " + expire_reason if job.run_expired else f"time limit of {job.limit:g}s reached"
    return {"status": "EXPIRED", "message": why, "data": None}


def release_op(job: Job, runner_id: str) -> dict:
    """Cancelled while it ran: no result (the task stays CANCELLED); the release says its worker
    is gone, which takes down the fence of the cancelled run."""
    t = job.task
    return schema.release(t, runner_id)


def result_op(job: Job, res: dict, duration_ms: int, now: float, runner_id: str, forced: bool) -> dict:
    t = job.task
    status = res["status"]
    op = schema.result(t, runner_id, status, res.get("message"), res.get("data"), duration_ms)
    if status not in RECORDED:
        return op
    if t.get("_trig_update"):
        op["trig_state"] = t["_trig_update"]
    nxt = _next_run(t, now, forced)
    if nxt is not None:
        op["next_run_at"] = nxt
    if "_late_ms" in t:
        op["late_ms"] = t["_late_ms"]
    return op


def _next_run(t: dict, now: float, forced: bool) -> float | None:
    """When the task runs next after this run (None: never)."""
    nxt = next_after_run(t["trigger"], {**t["trig_state"], **(t.get("_trig_update") or {})}, now, task_offset(t))
    if forced and nxt is not None:
        return t["due"]  # run-now: one extra run, the task's schedule unchanged
    return nxt


def result_ops(finished: list[Job], now: float, *, runner_id: str, forced: bool, expire_reason: str, paths: Paths):
    """The ops that record ``finished`` runs, and a row for each run that counts: (job, row)."""
    ops, rows = [], []
    for job in finished:
        if job.cancelled:
            ops.append(release_op(job, runner_id))
            log_stopped(paths, job)
            continue
        res = outcome(job)  # (always: it notes a Python worker's progress file, to remove)
        if job.expiring:
            res = stopped(job, expire_reason)
        duration_ms = int((time.monotonic() - job.started) * 1000)
        ops.append(result_op(job, res, duration_ms, now, runner_id, forced))
        t = job.task
        row = {
            "id": t["id"],
            "worker": t["worker"],
            "status": res["status"],
            "message": res.get("message"),
            "data": res.get("data"),
            "duration_ms": duration_ms,
        }
        rows.append((job, row))
    return ops, rows


def death(job: Job, what: str) -> str:
    code = job.exit_status
    tail = tail_text(job.err or job.out)
    if code is not None and code < 0:
        msg = f"{what} was killed by {_signal_name(-code)}"
    else:
        msg = f"{what} exited with status {code} without a result"
    return f"{msg}: {tail}" if tail else msg


def _signal_name(signo: int) -> str:
    try:
        return signal.Signals(signo).name
    except ValueError:
        return f"signal {signo}"


def tail_text(buf: bytearray, limit: int = 500) -> str:
    text = bytes(buf).decode("utf-8", "replace").strip()
    if not text:
        return ""
    lines = [ln for ln in text.splitlines() if ln.strip()]  # one at least: ``text`` is stripped
    tail = lines[-1]
    if len(lines) > 1 and lines[-1].startswith((" ", "\t")) is False and len(tail) < 80:
        tail = " | ".join(lines[-3:])
    return tail[-limit:]


def checked_data(res: dict) -> dict:
    """A worker's data must fit what kmpwm stores and prints: a JSON object, not too deep."""
    from kmpwm.core.specs import MAX_DEPTH, json_depth

    data = res.get("data")
    if data is not None and (not isinstance(data, dict) or json_depth(data) > MAX_DEPTH):
        return {
            "status": "FAILURE",
            "data": None,
            "message": f"the worker's data must be a JSON object nested at most {MAX_DEPTH} levels",
        }
    return res


def _last_json_object(out: bytearray) -> dict | None:
    """A command's data: its last non-blank output line, when that is a JSON object not too deep."""
    lines = [ln for ln in bytes(out).decode("utf-8", "replace").splitlines() if ln.strip()]
    if not lines:
        return None
    try:
        value = orjson.loads(lines[-1])
    except orjson.JSONDecodeError:
        return None
    if not isinstance(value, dict):
        return None
    from kmpwm.core.specs import MAX_DEPTH, json_depth

    return value if json_depth(value) <= MAX_DEPTH else None


def command_outcome(job: Job) -> dict:
    code = job.exit_status
    if code == 0:
        return {"status": "SUCCESS", "message": None, "data": _last_json_object(job.out)}
    if code == 75:
        return {
            "status": "RETRY",
            "message": tail_text(job.err) or "the worker asked to retry (exit 75)",
            "data": None,
        }
    if code is not None and code < 0:
        return {"status": "FAILURE", "message": death(job, "the command"), "data": None}
    tail = tail_text(job.err)
    return {"status": "FAILURE", "message": tail or f"the command exited with status {code}", "data": None}


def log_stopped(paths: Paths, job: Job) -> None:
    from kmpwm.storage.logs import logger

    logger(paths).info(
        "stopped %s (%s) attempt %d: cancelled while it ran; its result does not count",
        job.id,
        job.task["worker"],
        job.attempt,
    )


def log_runs(paths: Paths, rows: list) -> None:
    """One log write per cycle: every run, with the output tail of those that did not succeed."""
    from kmpwm.storage.logs import logger

    lines = [_log_line(job, row) for job, row in rows]
    worst = 30 if any(row["status"] in _UNSUCCESSFUL for _, row in rows) else 20  # WARNING, else INFO
    logger(paths).log(worst, "\n".join(lines))


def _log_line(job: Job, row: dict) -> str:
    """A run's log line, with its output's tail when it did not succeed."""
    line = f"ran {row['id']} ({row['worker']}) attempt {job.attempt}: {row['status']} in {row['duration_ms']}ms"
    if row["message"]:
        line += f": {row['message']}"
    if row["status"] in _UNSUCCESSFUL:
        tail = bytes(job.err or job.out).decode("utf-8", "replace").strip()
        if tail:
            line += "\n  output tail:\n    " + "\n    ".join(tail.splitlines()[-40:])
    return line
