"""Python workers from a third-party package's ``kmpwm.workers`` entry points (SPEC section 5).

The package in ``tests/plugin_pkg`` exposes one worker of each allowed shape: ``(input)``,
``(input, ctx)``, async, a class with ``do_work``, and ones returning False / None / Retry or
raising.  It is pip-installed (from a copy in a tmp dir, so no build files land in the repo) into
the interpreter that runs kmpwm, and uninstalled afterwards.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import jdoc as kjson  # kjson(ARGS, expect=N) -> the --json document

PY = sys.executable
PKG_DIR = Path(__file__).resolve().parents[1] / "plugin_pkg"
DIST = "kmpwm-test-plugin"
NAMES = [
    "tplug_sync",
    "tplug_ctx",
    "tplug_async",
    "tplug_class",
    "tplug_false",
    "tplug_none",
    "tplug_raise",
    "tplug_retry",
    "tplug_flaky",
]


def tasks() -> dict:
    return {t["id"]: t for t in kjson("inspect-queue", "--all")["tasks"]}


def _pip(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-m", "pip", "--disable-pip-version-check", "--no-input", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """Install the plugin package into the current interpreter for this module's tests."""
    src = tmp_path_factory.mktemp("plugin") / "plugin_pkg"
    shutil.copytree(PKG_DIR, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    r = _pip("install", "--no-deps", "--no-build-isolation", str(src))
    if r.returncode != 0:
        # e.g. no `wheel` in this interpreter for a setuptools that needs it: let pip build it
        # in an isolated environment instead (the package has no dependencies of its own)
        r = _pip("install", "--no-deps", str(src))
    assert r.returncode == 0, f"pip install of the test plugin failed:\n{r.stdout}\n{r.stderr}"
    try:
        yield DIST
    finally:
        _pip("uninstall", "-y", DIST)


def test_workers_lists_entry_point_workers(plugin):
    doc = kjson("workers")
    by_name = {w["name"]: w for w in doc["workers"]}
    for name in NAMES:
        assert name in by_name, f"{name} missing from `kmpwm workers --json`"
        assert by_name[name]["source"] == "entry-point"
    assert "kmpwm_test_plugin" in json.dumps(by_name["tplug_sync"])  # where it comes from
    # the built-ins are entry points too
    assert by_name["echo"]["source"] == "entry-point"


def test_every_worker_shape_runs(plugin):
    names = [n for n in NAMES if n != "tplug_flaky"]
    for name in names:
        kjson("enqueue", f"p-{name}", name, "--input", f"in-{name}")
    run = kjson("run-due")
    rows = {r["id"]: r for r in run["ran"]}
    assert set(rows) == {f"p-{n}" for n in names}

    def row(name):
        return rows[f"p-{name}"]

    assert row("tplug_sync")["status"] == "SUCCESS"
    assert row("tplug_sync")["message"] == "sync ok"
    assert row("tplug_sync")["data"] == {"shape": "sync", "input": "in-tplug_sync"}

    assert row("tplug_ctx")["status"] == "SUCCESS"
    assert row("tplug_ctx")["data"] == {
        "shape": "ctx",
        "input": "in-tplug_ctx",
        "attempt": 1,
        "task_id": "p-tplug_ctx",
        "upstream": {},
    }

    assert row("tplug_async")["status"] == "SUCCESS"
    assert row("tplug_async")["data"] == {"shape": "async", "input": "in-tplug_async"}

    assert row("tplug_class")["status"] == "SUCCESS"
    assert row("tplug_class")["data"] == {
        "shape": "class",
        "input": "in-tplug_class",
        "task_id": "p-tplug_class",
        "attempt": 1,
    }

    assert row("tplug_none")["status"] == "SUCCESS"
    assert row("tplug_none")["data"] is None

    assert row("tplug_false")["status"] == "FAILURE"

    assert row("tplug_raise")["status"] == "FAILURE"
    assert "plugin exploded 42" in row("tplug_raise")["message"]

    assert row("tplug_retry")["status"] == "RETRY"
    assert row("tplug_retry")["message"] == "plugin wants another go"

    state = tasks()
    for name in ("tplug_sync", "tplug_ctx", "tplug_async", "tplug_class", "tplug_none"):
        assert state[f"p-{name}"]["state"] == "SUCCEEDED", name
    assert state["p-tplug_false"]["state"] == "FAILED"
    assert state["p-tplug_raise"]["state"] == "FAILED"
    assert "plugin exploded 42" in state["p-tplug_raise"]["last_result"]["message"]
    assert state["p-tplug_retry"]["state"] == "ENQUEUED"
    assert state["p-tplug_retry"]["attempts"] == 1


def test_ctx_attempt_counts_retries(plugin):
    kjson("enqueue", "fl", "tplug_flaky", "--backoff-delay", "10s")
    first = kjson("run-due")
    assert [(r["id"], r["status"], r["message"]) for r in first["ran"]] == [("fl", "RETRY", "attempt 1: not yet")]
    assert kjson("run-due")["ran"] == []  # backing off
    second = kjson("run-due", faketime="+60")
    assert [(r["id"], r["status"]) for r in second["ran"]] == [("fl", "SUCCESS")]
    assert second["ran"][0]["data"] == {"attempt": 2, "task_id": "fl"}
    t = tasks()["fl"]
    assert t["state"] == "SUCCEEDED" and t["attempts"] == 2


def test_upstream_flows_through_a_chain_of_plugin_workers(plugin):
    kjson("chain", "--id", "pc", "tplug_sync", "tplug_ctx+tplug_class")
    run = kjson("run-due")
    rows = {r["id"]: r for r in run["ran"]}
    assert set(rows) == {"pc/1/tplug_sync", "pc/2/tplug_ctx", "pc/2/tplug_class"}
    ctx_data = rows["pc/2/tplug_ctx"]["data"]
    assert ctx_data["upstream"] == {"shape": "sync", "input": None}
    assert ctx_data["task_id"] == "pc/2/tplug_ctx"
    assert ctx_data["attempt"] == 1
    assert rows["pc/2/tplug_class"]["data"]["task_id"] == "pc/2/tplug_class"
    assert {c["id"]: c for c in kjson("inspect-queue", "--all")["chains"]}["pc"]["state"] == "SUCCEEDED"


def test_entry_point_worker_declares_itself(plugin):
    doc = kjson("workers", "tplug_declared")
    assert doc["description"] == "A worker that declares itself." and doc["distribution"] == DIST
    assert doc["inputs"] == [
        {"name": "n", "type": "integer", "required": False, "description": "a number", "default": 1}
    ]
    assert doc["limit_s"] == 5
    kjson("enqueue", "decl", "tplug_declared")
    ran = kjson("run-due")["ran"]
    assert ran[0]["status"] == "SUCCESS" and 0 < ran[0]["data"]["left"] <= 5  # its own limit, not 30 s
