"""``events --follow`` over the journal (scheduling.events.JournalEvents): what it selects keeps
up with a compaction that replaces the journal under it."""

from __future__ import annotations

from helpers import kmpwm

from kmpwm.scheduling.events import JournalEvents
from kmpwm.storage.compaction import compact
from kmpwm.storage.paths import resolve


def test_a_chain_enqueued_after_a_compaction_is_still_followed(home):
    """Following chain C: after a compaction the journal is folded anew, and C (enqueued after
    it) is looked up in that fold, so its steps' runs are selected (they were missed before: the
    filter looked chains up in the first fold only)."""
    kmpwm("enqueue", "before", "echo", check=0)
    paths = resolve(home)
    follow = JournalEvents(paths, "C", None)
    assert follow.poll() == []
    compact(paths)
    kmpwm("chain", "--id", "C", "echo", "echo", check=0)
    kmpwm("run-due", check=0)
    kmpwm("run-due", check=0)
    got = [(e[1], e[2]) for e in follow.poll()]
    for step in ("C/1/echo", "C/2/echo"):
        assert (step, "started") in got and (step, "succeeded") in got, got
