"""Finished history lives apart from the hot state (store.py): run-due and enqueue read only
journal/state.snap, commands that show history merge journal/history.snap in.  End to end
through the CLI: what users see never depends on which file a task sits in."""

from __future__ import annotations

import os

from helpers import jdoc, kmpwm


def _ids(doc) -> dict:
    return {t["id"]: t for t in doc["tasks"]}


def test_finished_work_stays_visible_across_the_split(home):
    kmpwm("enqueue", "a", "echo", check=0)
    kmpwm("enqueue", "b", "fail", "--max-attempts", "1", check=0)
    kmpwm("chain", "--id", "c1", "echo", "echo", check=0)
    kmpwm("chain", "--id", "c2", "echo", "echo", check=0)
    kmpwm("enqueue", "later", "echo", "--delay", "1h", check=0)
    kmpwm("run-due", check=0)
    before = jdoc("inspect-queue", "--all")
    kmpwm("compact", check=0)  # writes both snapshot files from a fold of the whole journal
    jdir = home / "journal"
    assert (jdir / "state.snap").exists() and (jdir / "history.snap").exists()
    # the hot file holds the live task only; finished work is in the history file
    assert b'"later"' in (jdir / "state.snap").read_bytes()
    assert b'"a"' not in (jdir / "state.snap").read_bytes()
    assert b'"a"' in (jdir / "history.snap").read_bytes()
    after = jdoc("inspect-queue", "--all")
    assert _ids(after) == _ids(before)
    assert {c["id"]: c["state"] for c in after["chains"]} == {"c1": "SUCCEEDED", "c2": "SUCCEEDED"}
    assert _ids(after)["b"]["state"] == "FAILED" and _ids(after)["a"]["state"] == "SUCCEEDED"
    assert "SUCCEEDED" in kmpwm("explain", "a", check=0).stdout
    assert [t["id"] for t in jdoc("inspect-queue", "a")["tasks"]] == ["a"]
    # a finished id enqueued again runs again; the new run wins over the old one in history
    kmpwm("enqueue", "a", "echo", "--input", '{"n": 2}', check=0)
    assert [r["id"] for r in jdoc("run-due")["ran"]] == ["a"]
    a = _ids(jdoc("inspect-queue", "--all"))["a"]
    assert a["state"] == "SUCCEEDED" and a["input"] == '{"n": 2}' and a["attempts"] == 1
    # a chain id in history replaced by a new chain: only the new one shows
    kmpwm("chain", "--id", "c1", "echo", "--policy", "keep", check=0)
    chains = {c["id"]: c for c in jdoc("inspect-queue", "--all")["chains"]}
    assert chains["c1"]["state"] == "ENQUEUED" and len(chains["c1"]["steps"]) == 1
    # cancelling a finished chain is a no-op, not an error
    assert jdoc("cancel", "c2") == {"cancelled": []}
    # without the history file nothing is lost: the journal is the truth
    os.unlink(jdir / "history.snap")
    again = jdoc("inspect-queue", "--all")
    assert _ids(again).keys() == _ids(jdoc("inspect-queue", "--all")).keys() >= {"a", "b", "later", "c1/1/echo"}
    assert (jdir / "history.snap").exists(), "the snapshot files are written anew after a full fold"
    assert _ids(jdoc("inspect-queue", "--all")) == _ids(again)


def _states(home) -> dict:
    return {t["id"]: (t["state"], t["chain_id"]) for t in jdoc("inspect-queue", "--all")["tasks"]}


def _without_snapshots(home) -> dict:
    for name in ("state.snap", "history.snap"):
        (home / "journal" / name).unlink(missing_ok=True)
    return _states(home)


def test_a_finished_chain_stays_finished_when_its_task_id_is_reused(home):
    """A plain task that takes the id of a finished chain's task does not bring the chain back:
    what later commands see (hot state) and what the whole journal folds to agree (found by a
    review: the chain came back in the whole fold only, so a task ran that the journal's own
    fold does not have)."""
    kmpwm("chain", "--id", "c1", "echo", check=0)
    kmpwm("run-due", check=0)
    kmpwm("compact", check=0)
    kmpwm("enqueue", "c1/1/echo", "sleep", "--delay", "1h", check=0)
    doc = jdoc("chain", "--id", "c1", "fail", "--policy", "keep")
    assert doc["action"] == "enqueued" and doc["tasks"] == ["c1/1/fail"]
    assert [r["id"] for r in jdoc("run-due")["ran"]] == ["c1/1/fail"]
    seen = _states(home)
    assert seen == {"c1/1/echo": ("ENQUEUED", None), "c1/1/fail": ("FAILED", "c1")}
    assert _without_snapshots(home) == seen


def test_cancelling_a_finished_chain_leaves_a_task_that_took_its_id(home):
    kmpwm("chain", "--id", "c1", "echo", check=0)
    kmpwm("run-due", check=0)
    kmpwm("compact", check=0)
    kmpwm("enqueue", "c1/1/echo", "sleep", "--delay", "1h", check=0)
    kmpwm("enqueue", "other", "echo", "--delay", "1h", check=0)
    assert jdoc("cancel", "c1", "other") == {"cancelled": ["other"]}
    seen = _states(home)
    assert seen["c1/1/echo"] == ("ENQUEUED", None)
    assert _without_snapshots(home) == seen


def test_enqueue_beside_a_snapshot_answers_like_the_fold(home):
    """An enqueue that has read nothing proves a new id on the bytes of state.snap and the
    journal after it (Store.unmentioned); a mention anywhere sends it to the fold.  Either way
    the answer is the fold's: kept, replaced, appended, enqueued."""
    import json

    kmpwm("enqueue", "live", "echo", "--delay", "1h", check=0)
    kmpwm("enqueue", "other", "echo", "--delay", "1h", "--input", "lookalike", check=0)
    kmpwm("chain", "--id", "ch", "echo", "echo", "--delay", "1h", check=0)
    kmpwm("compact", check=0)
    assert (home / "journal" / "state.snap").exists()
    kmpwm("enqueue", "after-snap", "echo", "--delay", "1h", check=0)  # in the tail, not the snapshot

    def enq(*args):
        return json.loads(kmpwm("enqueue", *args, "--json", check=0).stdout)

    assert enq("live", "echo")["action"] == "kept"  # in the snapshot
    assert enq("after-snap", "echo")["action"] == "kept"  # in the tail after it
    assert enq("lookalike", "echo")["action"] == "enqueued"  # its text is in the bytes, as an input only
    assert enq("brand-new", "echo", "--delay", "2h")["action"] == "enqueued"
    assert enq("brand-new", "echo")["action"] == "kept"
    assert enq("live", "echo", "--policy", "append")["action"] == "appended"
    assert enq("after-snap", "echo", "--policy", "replace")["action"] == "replaced"
    doc = jdoc("inspect-queue")
    states = {t["id"]: t["state"] for t in doc["tasks"]}
    assert {"live", "live#2", "after-snap", "lookalike", "brand-new", "other"} <= set(states)
    assert states["live#2"] == "BLOCKED" and states["brand-new"] == "ENQUEUED"
    assert [t["id"] for t in jdoc("inspect-queue", "--all", "brand-new")["tasks"]] == ["brand-new"]


def test_a_damaged_snapshot_body_is_never_trusted(home):
    """state.snap's first line (the meta and the wake-up summary an idle run-due reads) and its
    state have checksums of their own.  A state whose bytes were changed, even into a valid
    state that lacks a task, is ignored by every reader: an enqueue still finds the task."""
    import json

    kmpwm("enqueue", "live", "echo", "--delay", "1h", check=0)
    kmpwm("compact", check=0)
    snap = home / "journal" / "state.snap"
    blob = snap.read_bytes()
    first, body = blob.split(b"\n", 1)
    assert body.count(b'"live"') >= 1
    snap.write_bytes(first + b"\n" + body.replace(b'"live"', b'"livf"'))  # still valid JSON
    assert json.loads(kmpwm("enqueue", "live", "echo", "--json", check=0).stdout)["action"] == "kept"
    assert [t["id"] for t in jdoc("inspect-queue")["tasks"]] == ["live"]
    assert jdoc("run-due")["ran"] == []
    # a damaged first line: the whole snapshot is ignored, run-due still sees what is due
    kmpwm("enqueue", "now", "echo", check=0)
    blob = snap.read_bytes()
    snap.write_bytes(blob[:20] + bytes([blob[20] ^ 1]) + blob[21:])
    assert [r["id"] for r in jdoc("run-due")["ran"]] == ["now"]


def test_enqueues_proved_new_on_the_bytes_still_refresh_the_snapshot(home, monkeypatch):
    """Enqueues that never read the state would never write a snapshot either; the records after
    it (which every idle run-due reads and every such enqueue searches) must stay bounded all
    the same: past SNAPSHOT_AFTER_RECORDS the enqueue takes the fold, which snapshots."""
    from kmpwm.api import Scheduler
    from kmpwm.storage import store as store_mod
    from kmpwm.storage.journal import Journal
    from kmpwm.storage.paths import resolve

    monkeypatch.setattr(store_mod, "SNAPSHOT_AFTER_RECORDS", 20)
    kmpwm("enqueue", "first", "echo", "--delay", "1h", check=0)
    kmpwm("compact", check=0)
    paths = resolve(str(home))
    for n in range(100):
        assert Scheduler(str(home)).enqueue(f"job-{n}", None, "echo") == "SUCCESS"  # a fresh process each
        meta = Scheduler(str(home)).store._snapshot_parts(body=False)[0]
        tail = Journal(paths).raw_from(meta["offset"])
        assert tail.count(b"\n") <= 20, n
    assert len(jdoc("inspect-queue")["tasks"]) == 101


def test_a_long_lived_reader_keeps_only_the_hot_state(home):
    """serve lives for weeks: its fold must not hold every task it ever ran (issue 19's soak).
    After a snapshot it writes (``forget_history``), or once another process wrote a newer one
    (``rebase``), its in-memory state is the hot state; a full load still has the history."""
    from kmpwm.storage.paths import resolve
    from kmpwm.storage.store import Store

    kmpwm("chain", "--id", "c1", "echo", "echo+echo", check=0)
    kmpwm("enqueue", "a", "echo", check=0)
    kmpwm("enqueue", "later", "echo", "--delay", "1h", check=0)
    mine = Store(resolve(str(home)))
    mine.forget_history = True
    kmpwm("run-due", check=0)
    hot = mine.load(full=False).state
    assert {"a", "c1/1/echo"} <= hot["tasks"].keys()  # folded from the journal: everything so far
    assert mine.write_snapshot()
    hot = mine.load(full=False).state
    assert set(hot["tasks"]) == {"later"} and hot["chains"] == {}
    whole = mine.load(full=True).state
    assert {"a", "later", "c1/1/echo", "c1/2/echo", "c1/2/echo#2"} <= whole["tasks"].keys()
    assert whole["chains"]["c1"]["steps"]
    # more work, and another process writes the newer snapshot: the reader rebases on it
    kmpwm("enqueue", "b", "echo", check=0)
    kmpwm("run-due", check=0)
    kmpwm("enqueue", "after", "echo", "--delay", "1h", check=0)
    assert "b" in mine.load(full=False).state["tasks"]
    other = Store(resolve(str(home)))
    other.load(full=False)
    assert other.write_snapshot()
    assert mine.rebase()
    hot = mine.load(full=False).state
    assert set(hot["tasks"]) == {"later", "after"}
    assert {"a", "b"} <= mine.load(full=True).state["tasks"].keys()
    assert not mine.rebase()  # nothing newer since
    # a compaction (a new journal generation) makes every reader read the new snapshot anyway
    kmpwm("compact", check=0)
    assert set(mine.load(full=False).state["tasks"]) == {"later", "after"}
