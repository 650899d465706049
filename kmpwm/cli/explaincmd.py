"""``kmpwm explain ID``: print scheduling.explain's documents."""

from __future__ import annotations

from kmpwm.cli.output import print_json, say
from kmpwm.scheduling.explain import explain
from kmpwm.storage.paths import Paths


def explain_command(paths: Paths, task_id: str, as_json: bool) -> int:
    docs = explain(paths, task_id)
    if as_json:
        print_json(docs[0] if len(docs) == 1 else {"id": task_id, "tasks": docs})
    else:
        for d in docs:
            say(f"{d['id']}: {d['state']} — {d['reason']}")
    return 0
