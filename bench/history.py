"""Build journals with a long history, directly in the on-disk format (kmpwm.storage.journal.encode).

A million CLI calls would take hours; these journals are written record by record exactly as
kmpwm writes them (one transaction per line, CRC-32, compact JSON), with the ops of state.py:

- history: finished one-time tasks, each as three records like the ones `kmpwm enqueue` and
  `kmpwm run-due` append -- ``enq``, ``claim``, ``result`` (SUCCESS, with data) -- at timestamps
  spread over the past; all but ``recent_fraction`` of it older than the retention window, so
  compaction may drop it;
- live: ``live`` one-time tasks delayed by a day, and ``live_chains`` three-step chains delayed
  by a day (nothing due), enqueued in the last hour.

``build(path, history_records=0)`` gives the same live set with no history: the baseline.
The result is checked by folding it with kmpwm's own Store (``verify``).
"""

from __future__ import annotations

import os
import time
import uuid

DAY = 86400.0


def _task(tid: str, ts: float, delay: float = 0.0, data: str | None = None) -> dict:
    t = {"id": tid, "worker": "echo", "trigger": {"type": "one_time", "delay": delay}, "created_at": ts}
    if data is not None:
        t["input"] = data
    if delay:
        t["due"] = ts + delay
    return t


def build(
    path: str,
    history_records: int = 1_000_000,
    *,
    live: int = 100,
    live_chains: int = 10,
    now: float | None = None,
    span_days: float = 60.0,
    recent_fraction: float = 0.01,
    retention_days: float = 7.0,
    compacted_size: int | None = None,
) -> dict:
    """Write the journal; returns counts.  ``compacted_size`` goes into the header (automatic
    compaction waits until the journal exceeds twice it plus 1 MiB)."""
    from kmpwm.storage.journal import encode

    now = time.time() if now is None else now
    tasks = history_records // 3
    recent = int(tasks * recent_fraction)
    old = tasks - recent
    runner = f"bench/{os.getpid()}/{uuid.uuid4().hex[:8]}"
    hdr = {"op": "hdr", "gen": uuid.uuid4().hex, "v": 1}
    if compacted_size is not None:
        hdr["compacted_size"] = compacted_size
    t_old_start = now - span_days * DAY
    t_old_end = now - (retention_days + 1) * DAY
    t_recent_start = now - (retention_days - 1) * DAY
    t_recent_end = now - 2 * 3600
    seq = 0
    records = 1
    bytes_recent = 0
    buf: list[bytes] = [encode({"ts": t_old_start - 1, "ops": [hdr]})]
    with open(path, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)
        for i in range(tasks):
            if i < old:
                ts = t_old_start + (t_old_end - t_old_start) * i / max(1, old)
            else:
                ts = t_recent_start + (t_recent_end - t_recent_start) * (i - old) / max(1, recent)
            seq += 1
            tid = f"job-{i}"
            lines = (
                encode(
                    {"ts": ts, "ops": [{"op": "enq", "task": _task(tid, ts, data='{"n": %d}' % i), "policy": "keep"}]}
                ),
                encode(
                    {
                        "ts": ts + 30,
                        "ops": [
                            {
                                "op": "claim",
                                "id": tid,
                                "seq": seq,
                                "runner": runner,
                                "pid": 1,
                                "token": "bench",
                                "until": ts + 30 + 75,
                            }
                        ],
                    }
                ),
                encode(
                    {
                        "ts": ts + 31,
                        "ops": [
                            {
                                "op": "result",
                                "id": tid,
                                "seq": seq,
                                "runner": runner,
                                "status": "SUCCESS",
                                "message": None,
                                "data": {"n": i},
                                "duration_ms": 12,
                            }
                        ],
                    }
                ),
            )
            if i >= old:
                bytes_recent += sum(map(len, lines))
            buf.extend(lines)
            records += 3
            if len(buf) >= 30000:
                fh.write(b"".join(buf))
                buf.clear()
        live_bytes = 0
        t_live = now - 3600
        for j in range(live):
            line = encode(
                {
                    "ts": t_live + j,
                    "ops": [{"op": "enq", "task": _task(f"later-{j}", t_live + j, DAY), "policy": "keep"}],
                }
            )
            live_bytes += len(line)
            buf.append(line)
            records += 1
            seq += 1
        for c in range(live_chains):
            cid = f"chain-{c}"
            ts = t_live + live + c
            steps = [[_task(f"{cid}/{n}/echo", ts, DAY)] for n in (1, 2, 3)]
            line = encode(
                {"ts": ts, "ops": [{"op": "chain", "id": cid, "policy": "replace", "steps": steps, "tags": []}]}
            )
            live_bytes += len(line)
            buf.append(line)
            records += 1
            seq += 3
        fh.write(b"".join(buf))
        os.fsync(fh.fileno())
    return {
        "records": records,
        "history_tasks": tasks,
        "recent_tasks": recent,
        "live_tasks": live + 3 * live_chains,
        "bytes": os.path.getsize(path),
        "bytes_live_and_retention": live_bytes + bytes_recent,
    }


def install(home: str, journal_path: str) -> None:
    """Put a built journal into ``home`` (a copy: the built one is reused)."""
    import shutil

    jdir = os.path.join(home, "journal")
    os.makedirs(jdir, mode=0o700, exist_ok=True)
    for name in ("journal.log", "state.snap"):
        try:
            os.unlink(os.path.join(jdir, name))
        except FileNotFoundError:
            pass
    shutil.copyfile(journal_path, os.path.join(jdir, "journal.log"))
    os.chmod(os.path.join(jdir, "journal.log"), 0o600)


def verify(home: str, expect: dict) -> None:
    """Fold the journal with kmpwm's Store: no damage, the expected numbers of tasks."""
    from kmpwm.storage.paths import resolve
    from kmpwm.storage.store import Store

    store = Store(resolve(home))
    store._maybe_snapshot = lambda view: None  # a check only: leave no snapshot behind
    view = store._full_load()
    tasks = view.state["tasks"]
    live = sum(1 for t in tasks.values() if t["finished_at"] is None)
    done = sum(1 for t in tasks.values() if t["state"] == "SUCCEEDED")
    if view.damage or live != expect["live_tasks"] or done != expect["history_tasks"]:
        raise SystemExit(
            f"built journal is not what was meant: damage={view.damage} live={live} succeeded={done} expected {expect}"
        )
