"""Built-in workers fit together: download -> compress -> upload hand the file over through
``data.path`` with no explicit path after the first step (``chain --file`` + ``run-due``, against
a local HTTP server), and a compress killed mid-archive leaves no temp file after the re-run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile

import pytest
from helpers import jdoc, kmpwm, kmpwm_env
from test_builtin_workers import BLOB, BLOB_SHA, HALF, Handler, Server

pytestmark = pytest.mark.both_stores(long=True)  # PostgreSQL's side runs in scripts/long-tier


class StallingHandler(Handler):
    """``/stall``: a plain GET gets half the blob, then nothing until the test lets go; a Range
    request (the resume) is served at once."""

    def do_GET(self):
        if self.path != "/stall" or self.headers.get("Range"):
            return super().do_GET() if self.path != "/stall" else self._serve_range(BLOB)
        self.send_response(200)
        self.send_header("Content-Length", str(len(BLOB)))
        self.end_headers()
        self.wfile.write(BLOB[:HALF])
        self.wfile.flush()
        self.server.release.wait(60)


@pytest.fixture
def server():
    srv = Server(("127.0.0.1", 0), StallingHandler)
    srv.release = threading.Event()
    srv.expire_ctx = None
    srv.ranges = []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


def test_download_compress_upload_chain(server, tmp_path):
    dest = tmp_path / "dl" / "blob.bin"
    chain = tmp_path / "pipeline.toml"
    chain.write_text(f'''
id = "pipeline"

[[steps]]
worker = "download"
input = {{ url = "{server.base}/blob", path = "{dest}", sha256 = "{BLOB_SHA}" }}

[[steps]]
worker = "compress"

[[steps]]
worker = "upload"
input = {{ url = "{server.base}/upload" }}
''')
    kmpwm("chain", "--file", chain, check=0)
    for _ in range(3):
        kmpwm("run-due", check=0)
    tasks = {t["id"]: t for t in jdoc("inspect-queue", "--all", "pipeline")["tasks"]}
    assert [t["state"] for t in tasks.values()] == ["SUCCEEDED"] * 3, tasks
    archive = str(dest) + ".zip"
    compressed = tasks["pipeline/2/compress"]["last_result"]["data"]
    assert compressed["path"] == archive
    with zipfile.ZipFile(archive) as z:
        assert z.read("blob.bin") == BLOB
    sent = tasks["pipeline/3/upload"]["last_result"]["data"]
    assert sent["path"] == archive and sent["bytes"] == os.path.getsize(archive)
    assert json.loads(sent["response"])["length"] > os.path.getsize(archive)  # the multipart body
    assert sorted(os.listdir(dest.parent)) == ["blob.bin", "blob.bin.zip"]  # no temp file


def test_killed_compress_leaves_no_temp_file_after_the_rerun(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for n in range(6):  # incompressible, so deflating it takes a while
        (src / f"part{n}.bin").write_bytes(os.urandom(24 << 20))
    out = tmp_path / "out" / "src.zip"
    kmpwm("enqueue", "pack", "compress", "--input", json.dumps({"path": str(src), "output": str(out)}), check=0)
    tmp = out.parent / ".src.zip.kmpwm-tmp"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kmpwm", "run-due"],
        env=kmpwm_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not (tmp.exists() and tmp.stat().st_size > 0):
        assert proc.poll() is None, f"run-due ended before compress started writing: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "compress never started writing"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while True:  # the worker dies with run-due (PR_SET_PDEATHSIG): wait until it has
        size = tmp.stat().st_size if tmp.exists() else -1
        time.sleep(0.3)
        if (tmp.stat().st_size if tmp.exists() else -1) == size or time.monotonic() > deadline:
            break
    assert tmp.exists() and not out.exists(), "the kill must land mid-archive for this test to mean anything"
    doc = jdoc("run-due")
    assert [r["status"] for r in doc["ran"]] == ["SUCCESS"], doc
    assert sorted(os.listdir(out.parent)) == ["src.zip"], "the killed run's temp file was left behind"
    with zipfile.ZipFile(out) as z:
        assert (
            hashlib.sha256(z.read("src/part5.bin")).digest()
            == hashlib.sha256((src / "part5.bin").read_bytes()).digest()
        )


def _kill_run_due_when(ready, what: str) -> None:
    """Start run-due, SIGKILL it once ``ready()`` holds, and wait for its worker to be gone."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kmpwm", "run-due"],
        env=kmpwm_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not ready():
        assert proc.poll() is None, f"run-due ended before {what}: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)  # the worker gets SIGKILL with run-due (PR_SET_PDEATHSIG)


def test_killed_download_resumes_and_leaves_no_part_file(server, tmp_path):
    dest = tmp_path / "dl" / "blob.bin"
    part = dest.parent / "blob.bin.part"
    kmpwm(
        "enqueue",
        "fetch",
        "download",
        "--input",
        json.dumps({"url": f"{server.base}/stall", "path": str(dest)}),
        check=0,
    )
    _kill_run_due_when(lambda: part.exists() and part.stat().st_size >= HALF, "half the download")
    assert part.exists() and not dest.exists()
    doc = jdoc("run-due")
    assert [r["status"] for r in doc["ran"]] == ["SUCCESS"], doc
    assert doc["ran"][0]["data"]["resumed_from"] == HALF
    assert dest.read_bytes() == BLOB
    assert sorted(os.listdir(dest.parent)) == ["blob.bin"], "the killed run's .part was left behind"
