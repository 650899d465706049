"""Workers that describe themselves (``kmpwm.worker(...)``): ``kmpwm workers NAME`` shows the
declaration, and run-due takes a worker's declared limits (heavy/timeout) when the task sets none."""

from __future__ import annotations

import os
import textwrap

import pytest
from helpers import jdoc, kmpwm

WORKER_MODULE = '''
import kmpwm

@kmpwm.worker(description="Naps.", inputs={"seconds": {"type": "number", "default": 3, "description": "how long"}},
              returns={"slept": "seconds slept"}, timeout="1s")
def short(input, ctx):
    if ctx.wait(3):
        return kmpwm.WorkerResult.Retry("told to stop")
    return kmpwm.WorkerResult.Success(data={"slept": 3})

@kmpwm.worker(heavy=True)
def heavy(input, ctx):
    return kmpwm.WorkerResult.Success(data={"left": ctx.time_left()})

def plain(input, ctx):
    """Does nothing."""
    return kmpwm.WorkerResult.Success(data={"left": ctx.time_left()})
'''


@pytest.fixture
def declared(tmp_path):
    mod = tmp_path / "mods"
    mod.mkdir()
    (mod / "declmod.py").write_text(WORKER_MODULE)
    home = os.environ["KMPWM_HOME"]
    os.makedirs(home, mode=0o700, exist_ok=True)
    cfg = os.path.join(home, "config.toml")
    with open(cfg, "w") as f:
        f.write(
            textwrap.dedent(f'''
            [workers.short]
            entry = "declmod:short"
            cwd = "{mod}"

            [workers.heavy]
            entry = "declmod:heavy"
            cwd = "{mod}"

            [workers.plain]
            entry = "declmod:plain"
            cwd = "{mod}"

            [workers.cmd]
            command = ["true"]
            description = "A command that does nothing."
            inputs = {{ target = {{ type = "string", required = true, description = "where" }}, note = "free text" }}
        ''')
        )
    os.chmod(cfg, 0o600)
    return mod


def _ran(doc, task_id):
    return next(r for r in doc["ran"] if r["id"] == task_id)


def test_declared_timeout_is_the_default_limit(declared):
    kmpwm("enqueue", "nap", "short", check=0)
    doc = jdoc("run-due")
    assert _ran(doc, "nap")["status"] == "EXPIRED", doc  # 1 s declared, not the light 30 s


def test_task_timeout_wins_over_the_declaration(declared):
    kmpwm("enqueue", "nap", "short", "--timeout", "20s", check=0)
    doc = jdoc("run-due")
    assert _ran(doc, "nap")["status"] == "SUCCESS", doc


def test_task_heavy_wins_over_the_declaration(declared):
    kmpwm("enqueue", "nap", "short", "--heavy", check=0)
    doc = jdoc("run-due")
    assert _ran(doc, "nap")["status"] == "SUCCESS", doc


def test_declared_heavy_gets_the_heavy_limit(declared):
    kmpwm("enqueue", "h", "heavy", check=0)
    kmpwm("enqueue", "p", "plain", check=0)
    doc = jdoc("run-due")
    assert 30 < _ran(doc, "h")["data"]["left"] <= 600
    assert _ran(doc, "p")["data"]["left"] <= 30


@pytest.mark.parametrize("worker", ["download", "upload", "compress", "http"])
def test_builtin_transfer_workers_are_heavy(worker):
    doc = jdoc("workers", worker)
    assert doc["heavy"] is True and doc["limit_s"] == 600
    assert {i["name"] for i in doc["inputs"]} >= ({"path", "output"} if worker == "compress" else {"url"})
    assert any(r["name"] == "path" for r in doc["returns"]) or worker == "http"


def test_light_builtin_workers_stay_light():
    for worker in ("echo", "sleep", "fail"):
        doc = jdoc("workers", worker)
        assert doc["heavy"] is False and doc["limit_s"] is None and doc["declared"]


def test_workers_name_prints_inputs_returns_and_limit(declared):
    out = kmpwm("workers", "short", check=0).stdout
    lines = out.splitlines()
    assert lines[0] == "short: Naps."
    assert any(line.split()[:2] == ["limit", "1s"] for line in lines), out
    assert any(line.split()[:3] == ["seconds", "number", "3"] for line in lines), out
    assert any(line.split()[:1] == ["slept"] for line in lines), out
    plain = kmpwm("workers", "plain", check=0).stdout
    assert plain.splitlines()[0] == "plain: Does nothing."
    assert "declares no input keys" in plain


def test_command_worker_declares_in_config(declared):
    doc = jdoc("workers", "cmd")
    assert doc["kind"] == "command" and doc["description"] == "A command that does nothing."
    assert [(i["name"], i["required"]) for i in doc["inputs"]] == [("target", True), ("note", False)]


def test_unknown_worker_is_a_usage_error():
    proc = kmpwm("workers", "nope", check=65)
    assert "unknown worker 'nope'" in proc.stderr


def test_bad_declaration_in_config_is_loud(tmp_path):
    home = os.environ["KMPWM_HOME"]
    os.makedirs(home, mode=0o700, exist_ok=True)
    cfg = os.path.join(home, "config.toml")
    with open(cfg, "w") as f:
        f.write('[workers.x]\ncommand = ["true"]\ninputs = { a = 3 }\n')
    os.chmod(cfg, 0o600)
    proc = kmpwm("workers", "x", check=78)
    assert "input 'a' must be a description or a table" in proc.stderr


def test_decorator_leaves_the_function_alone():
    import kmpwm as api
    from kmpwm.running.declare import spec_of

    def f(input):
        return 1

    g = api.worker(description="d", inputs={"a": "the a"}, timeout=90)(f)
    assert g is f and spec_of(f).default_limit() == 90 and spec_of(f).inputs[0].description == "the a"
    with pytest.raises(ValueError):
        api.worker(inputs={"a": {"kind": "x"}})


def test_worker_that_cannot_be_imported_is_described_as_such(tmp_path):
    home = os.environ["KMPWM_HOME"]
    os.makedirs(home, mode=0o700, exist_ok=True)
    cfg = os.path.join(home, "config.toml")
    with open(cfg, "w") as f:
        f.write(f'[workers.gone]\nentry = "no_such_module_here:run"\ncwd = "{tmp_path}"\n')
    os.chmod(cfg, 0o600)
    proc = kmpwm("workers", "gone", check=78)
    assert proc.stdout.startswith("gone: ")
    assert "cannot import no_such_module_here:run" in proc.stderr
    doc, _ = (jdoc("workers", "gone", expect=78), None)
    assert doc["errors"] and doc["inputs"] == []
