"""serve's optimistic claims on the fleet store (pgstore: notifications that carry their records,
``transaction(guess=True)``), against a real PostgreSQL server.

A serve folds what its watch hears instead of reading it, plans on that, and sends the lock, a
check and its claims in one statement.  What must hold: a claim is written only when the state
it was planned on was complete (every record up to it folded, nothing newer); when it was not,
nothing is written, the state is as it was, and the next reading brings it up to date; a record
the notifications missed is never silently skipped.
"""

from __future__ import annotations

import time

import orjson
import psycopg
import pytest

from kmpwm import Scheduler
from kmpwm.core import schema
from kmpwm.core.state import apply, new_state
from kmpwm.storage import pgstore
from kmpwm.storage.paths import resolve
from kmpwm.storage.store import OptimisticMiss

RUNNER = "a/1/abcdef12"


@pytest.fixture
def writer(pg_url, home, monkeypatch):
    """Another process's writes: a Scheduler on a store (a connection) of its own."""
    monkeypatch.setenv("KMPWM_STORE", pg_url)
    s = Scheduler(home)
    yield s
    s.store.close()


@pytest.fixture
def serve(pg_url, home):
    """The store and watch of a serve: it follows the notifications, and has read once after its
    watch began to listen (as serve's first transaction does)."""
    store = pgstore.PgStore(resolve(home), pg_url)
    store.follow_notifications = True
    watch = store.watch()
    store.load()
    yield store, watch
    watch.close()
    store.close()


def hear(watch, within: float = 5.0) -> None:
    """Wait until the watch has something to drain, and drain it."""
    deadline = time.monotonic() + within
    while not watch.drain():
        assert time.monotonic() < deadline, "no notification came"
        time.sleep(0.005)


def claim_op(task: dict) -> dict:
    return schema.claim(task, RUNNER, 1, "tok", time.time() + 60)


def every_record(url: str) -> dict:
    """The tasks the records give, folded from scratch (leases aside: a reader writes the
    database's clock into them)."""
    state = new_state()
    with psycopg.connect(url) as conn:
        for (body,) in conn.execute("SELECT body FROM kmpwm_records ORDER BY seq"):
            apply(state, orjson.loads(body))
    return without_leases(state["tasks"])


def without_leases(tasks: dict) -> dict:
    return {i: {k: v for k, v in t.items() if k != "lease"} for i, t in tasks.items()}


def claims_rows(url: str) -> list:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT task_id, runner FROM kmpwm_claims ORDER BY task_id").fetchall()


def test_a_heard_enqueue_is_folded_without_a_reading_and_claimed_in_one_statement(pg_url, writer, serve):
    store, watch = serve
    writer.enqueue("t1", None, "echo")
    hear(watch)
    with store.transaction(guess=True) as txn:
        assert txn.guess is not None  # optimistic: the notification brought the task
        task = txn.state["tasks"]["t1"]
        assert txn.stage([claim_op(task)]) == [True]
    assert claims_rows(pg_url) == [("t1", RUNNER)]
    assert store._view.state["tasks"]["t1"]["state"] == "RUNNING"
    # the state is the one the records give, and the next reading finds nothing missing
    assert without_leases(store.load().state["tasks"]) == every_record(pg_url)
    assert store._read_at == store._view.offset


def test_a_record_not_heard_yet_makes_the_guess_miss_and_nothing_is_written(pg_url, writer, serve):
    store, watch = serve
    writer.enqueue("t1", None, "echo")
    hear(watch)
    writer.cancel("t1")  # committed, but the watch has not been drained since
    with pytest.raises(OptimisticMiss):
        with store.transaction(guess=True) as txn:
            txn.stage([claim_op(txn.state["tasks"]["t1"])])
    assert claims_rows(pg_url) == []
    assert store._view is not None and store._view.state["tasks"]["t1"]["state"] == "ENQUEUED"  # as it was
    # the usual transaction then reads the cancel: nothing to claim
    with store.transaction() as txn:
        assert txn.state["tasks"]["t1"]["state"] == "CANCELLED"
    assert without_leases(store.load().state["tasks"]) == every_record(pg_url)


def test_a_record_the_notifications_missed_is_found_and_the_state_read_again(pg_url, writer, serve):
    store, watch = serve
    writer.enqueue("t1", None, "echo")
    writer.enqueue("t2", None, "echo")
    deadline = time.monotonic() + 5
    heard: list = []
    pg = watch._conn.pgconn
    while len(heard) < 2:  # take both notifications, and keep back the first one's
        assert time.monotonic() < deadline
        pg.consume_input()
        while (n := pg.notifies()) is not None:
            heard.append(pgstore._carried(n.extra))
        time.sleep(0.005)
    store.feed(heard[1:])
    with pytest.raises(OptimisticMiss):
        with store.transaction(guess=True) as txn:
            assert "t1" not in txn.state["tasks"]  # the state skipped a record...
            txn.stage([claim_op(txn.state["tasks"]["t2"])])
    assert claims_rows(pg_url) == []  # ...so the claim was not written
    assert store._view is None  # and the state is read again from scratch
    assert set(store.load().state["tasks"]) == {"t1", "t2"}

    # the same when the state skipped a record and nothing was claimed: the next reading counts
    writer.enqueue("t3", None, "echo")
    writer.enqueue("t4", None, "echo")
    heard = []
    while len(heard) < 2:
        pg.consume_input()
        while (n := pg.notifies()) is not None:
            heard.append(pgstore._carried(n.extra))
        time.sleep(0.005)
    store.feed(heard[1:])
    assert store._fold_heard() and "t3" not in store._view.state["tasks"]
    with store.transaction() as txn:  # its reading counts the records folded unread
        assert set(txn.state["tasks"]) == {"t1", "t2", "t3", "t4"}
    assert without_leases(store.load().state["tasks"]) == every_record(pg_url)


def test_only_claims_of_waiting_tasks_are_made_optimistically(pg_url, writer, serve):
    store, watch = serve
    writer.enqueue("t1", None, "echo")
    hear(watch)
    with pytest.raises(OptimisticMiss):
        with store.transaction(guess=True) as txn:
            txn.stage([schema.cancel(ids=["t1"])])
    assert store._view.state["tasks"]["t1"]["state"] == "ENQUEUED"
    with pytest.raises(OptimisticMiss):
        with store.transaction(guess=True) as txn:
            task = txn.state["tasks"]["t1"]
            txn.stage([claim_op(task)])
            txn.stage([claim_op(task)])  # a second claim of a task now RUNNING: a take-over
    assert store._view.state["tasks"]["t1"]["state"] == "ENQUEUED"  # the first claim undone too
    assert claims_rows(pg_url) == []
    assert without_leases(store.load().state["tasks"]) == every_record(pg_url)


def test_a_record_too_long_to_ride_in_its_notification_is_read(pg_url, writer, serve):
    store, watch = serve
    writer.enqueue("big", None, "echo", input={"blob": "x" * (pgstore.PAYLOAD_MAX + 100)})
    hear(watch)
    assert store._feed and store._feed[-1][1] is None  # heard, not carried
    with store.transaction(guess=True) as txn:
        assert txn.guess is None  # a usual transaction: it reads the record
        assert "big" in txn.state["tasks"]
    writer.enqueue("small", None, "echo")
    hear(watch)
    with store.transaction(guess=True) as txn:
        assert txn.guess is not None and "small" in txn.state["tasks"]


def test_our_own_records_are_no_news_and_a_plan_position_is_compared(pg_url, writer, serve):
    store, watch = serve
    writer.enqueue("t1", None, "echo")
    hear(watch)
    with store.transaction(guess=True) as txn:
        txn.stage([claim_op(txn.state["tasks"]["t1"])])
    planned = store.position()
    hear(watch)  # our own claim's notification
    assert not store.news_since(planned)
    writer.enqueue("t2", None, "echo")
    hear(watch)
    assert store.news_since(planned)
    assert store.news_since(None)  # no plan yet: plan
