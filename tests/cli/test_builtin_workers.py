"""The built-in http, download, upload and compress workers, against a local HTTP server."""

from __future__ import annotations

import base64
import email.parser
import hashlib
import json
import os
import socket
import sys
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kmpwm.running.context import WorkerContext
from kmpwm.workers.files import compress
from kmpwm.workers.http import download, http_request, upload

pytestmark = pytest.mark.both_stores(long=True)  # PostgreSQL's side runs in scripts/long-tier

BLOB = hashlib.sha256(b"seed").digest() * (1024 * 1024 // 32)  # 1 MiB, not compressible to nothing
BLOB_SHA = hashlib.sha256(BLOB).hexdigest()
HALF = len(BLOB) // 2


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        route = self.path
        if route == "/text":
            self._reply(200, "héllo".encode(), "text/plain; charset=utf-8")
        elif route == "/binary":
            self._reply(200, bytes(range(256)), "application/octet-stream")
        elif route == "/500":
            self._reply(500, b"boom", "text/plain")
        elif route == "/404":
            self._reply(404, b"nope", "text/plain")
        elif route == "/blob":
            self._serve_range(BLOB)
        elif route == "/no-range":
            self._reply(200, BLOB, "application/octet-stream")  # ignores Range on purpose
        elif route == "/slow":
            self._serve_slow()
        elif route == "/short":
            self.send_response(200)
            self.send_header("Content-Length", str(len(BLOB)))
            self.end_headers()
            self.wfile.write(BLOB[:1000])  # then the connection closes early
        else:
            self._reply(404, b"unknown route", "text/plain")

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path in ("/500", "/404"):
            return self._reply(int(self.path[1:]), b"no", "text/plain")
        echo = {
            "method": self.command,
            "content_type": self.headers.get("Content-Type"),
            "length": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
            "body": base64.b64encode(body).decode() if len(body) < 16 * 1024 else None,
        }
        self._reply(200, json.dumps(echo).encode(), "application/json")

    do_PUT = do_POST

    def _reply(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _serve_range(self, blob):
        requested = self.headers.get("Range")
        self.server.ranges.append(requested)
        if not requested:
            return self._reply(200, blob, "application/octet-stream")
        start = int(requested.removeprefix("bytes=").split("-")[0])
        if start >= len(blob):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(blob)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{len(blob) - 1}/{len(blob)}")
        self.send_header("Content-Length", str(len(blob) - start))
        self.end_headers()
        self.wfile.write(blob[start:])

    def _serve_slow(self):
        """Half the blob, then expire the waiting ctx (if any) before sending the rest."""
        waiting = self.server.expire_ctx
        if waiting is None or self.headers.get("Range"):
            return self._serve_range(BLOB)
        self.server.expire_ctx = None
        self.server.ranges.append(None)
        self.send_response(200)
        self.send_header("Content-Length", str(len(BLOB)))
        self.end_headers()
        self.wfile.write(BLOB[:HALF])
        self.wfile.flush()
        time.sleep(0.2)  # lets the worker take in the first half
        waiting._expired = True
        self.wfile.write(BLOB[HALF:])


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # Workers that stop early hang up mid-exchange; that is what those tests want.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def server():
    srv = Server(("127.0.0.1", 0), Handler)
    srv.expire_ctx = None
    srv.ranges = []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def ctx(**kw):
    return WorkerContext(task_id="t", attempt=1, **kw)


def run(worker, args, context=None):
    return worker(json.dumps(args), context or ctx())


# --- http --------------------------------------------------------------------------------------


def test_http_get_text(server):
    result = run(http_request, {"url": server.base + "/text", "save_body": True})
    assert result.status == "SUCCESS", result.message
    data = result.data
    assert data["status"] == 200
    assert data["body"] == "héllo"
    assert data["bytes"] == len("héllo".encode())
    assert data["headers"]["content-type"].startswith("text/plain")
    assert data["truncated"] is False
    assert isinstance(data["duration_ms"], int)


def test_http_body_left_out_unless_asked_or_binary(server):
    assert "body" not in run(http_request, {"url": server.base + "/text"}).data
    binary = run(http_request, {"url": server.base + "/binary", "save_body": True})
    assert binary.status == "SUCCESS" and "body" not in binary.data and binary.data["bytes"] == 256


def test_http_post_json(server):
    result = run(
        http_request,
        {
            "url": server.base + "/echo",
            "method": "post",
            "json": {"a": [1, 2]},
            "headers": {"X-Test": "1"},
            "save_body": True,
        },
    )
    assert result.status == "SUCCESS", result.message
    echo = json.loads(result.data["body"])
    assert echo["method"] == "POST"
    assert echo["content_type"] == "application/json"
    assert json.loads(base64.b64decode(echo["body"])) == {"a": [1, 2]}


def test_http_status_rules(server):
    assert run(http_request, {"url": server.base + "/500"}).status == "RETRY"
    not_found = run(http_request, {"url": server.base + "/404"})
    assert not_found.status == "FAILURE" and "404" in not_found.message
    assert not_found.data["status"] == 404
    assert run(http_request, {"url": server.base + "/404", "expect_status": 404}).status == "SUCCESS"
    assert run(http_request, {"url": server.base + "/text", "expect_status": [201, 204]}).status == "FAILURE"
    assert run(http_request, {"url": server.base + "/500", "expect_status": [200]}).status == "RETRY"


def test_http_connection_refused_is_retry():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run(http_request, {"url": f"http://127.0.0.1:{port}/", "timeout": 2})
    assert result.status == "RETRY"


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({}), '"url" is required'),
        (json.dumps({"url": "file:///etc/passwd"}), "only http:// and https://"),
        (json.dumps({"url": "ftp://example.com/x"}), "only http:// and https://"),
        (json.dumps({"url": "http://127.0.0.1/", "body": "a", "json": {}}), "not both"),
        (json.dumps({"url": "http://127.0.0.1/", "timeout": -1}), "timeout"),
        (json.dumps({"url": "http://127.0.0.1/", "expect_status": "200"}), "expect_status"),
        (json.dumps({"url": "http://127.0.0.1/", "headers": ["x"]}), "headers"),
    ],
)
def test_http_bad_input_is_failure(raw, fragment):
    result = http_request(raw, ctx())
    assert result.status == "FAILURE"
    assert fragment in result.message


# --- download ----------------------------------------------------------------------------------


def test_download_atomic_with_sha(server, tmp_path):
    dest = tmp_path / "sub" / "blob.bin"
    result = run(download, {"url": server.base + "/blob", "path": str(dest), "sha256": BLOB_SHA.upper()})
    assert result.status == "SUCCESS", result.message
    assert dest.read_bytes() == BLOB
    data = result.data
    assert (data["path"], data["bytes"], data["resumed_from"]) == (str(dest), len(BLOB), 0)
    assert (data["sha256"], data["status"]) == (BLOB_SHA, 200) and data["duration_ms"] >= 0
    assert os.listdir(dest.parent) == ["blob.bin"]


def test_download_sha_mismatch_removes_part(server, tmp_path):
    dest = tmp_path / "blob.bin"
    result = run(download, {"url": server.base + "/blob", "path": str(dest), "sha256": "0" * 64})
    assert result.status == "FAILURE" and "sha256 mismatch" in result.message
    assert not dest.exists() and not (tmp_path / "blob.bin.part").exists()


def test_download_expires_then_resumes(server, tmp_path):
    dest = tmp_path / "blob.bin"
    part = tmp_path / "blob.bin.part"
    first_ctx = ctx()
    server.expire_ctx = first_ctx
    server.ranges.clear()
    first = run(download, {"url": server.base + "/slow", "path": str(dest)}, first_ctx)
    assert first.status == "RETRY" and "will resume" in first.message
    assert not dest.exists()
    kept = part.stat().st_size
    assert 0 < kept < len(BLOB)
    assert part.read_bytes() == BLOB[:kept]

    second = run(download, {"url": server.base + "/slow", "path": str(dest), "sha256": BLOB_SHA})
    assert second.status == "SUCCESS", second.message
    assert server.ranges == [None, f"bytes={kept}-"]
    assert second.data["resumed_from"] == kept and second.data["status"] == 206
    assert second.data["sha256"] == BLOB_SHA
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == BLOB_SHA
    assert not part.exists()


def test_download_restarts_when_server_ignores_range(server, tmp_path):
    dest = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").write_bytes(b"stale bytes from another version")
    result = run(download, {"url": server.base + "/no-range", "path": str(dest), "sha256": BLOB_SHA})
    assert result.status == "SUCCESS", result.message
    assert result.data["resumed_from"] == 0 and dest.read_bytes() == BLOB


def test_download_complete_part_is_finished_on_416(server, tmp_path):
    dest = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").write_bytes(BLOB)
    result = run(download, {"url": server.base + "/blob", "path": str(dest), "sha256": BLOB_SHA})
    assert result.status == "SUCCESS", result.message
    assert result.data["resumed_from"] == len(BLOB) and dest.read_bytes() == BLOB


def test_download_no_resume_starts_over(server, tmp_path):
    dest = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").write_bytes(BLOB[:10])
    server.ranges.clear()
    result = run(download, {"url": server.base + "/blob", "path": str(dest), "resume": False})
    assert result.status == "SUCCESS" and server.ranges == [None] and dest.read_bytes() == BLOB


def test_download_short_body_keeps_part_and_retries(server, tmp_path):
    dest = tmp_path / "blob.bin"
    result = run(download, {"url": server.base + "/short", "path": str(dest)})
    assert result.status == "RETRY" and "1000 of" in result.message
    assert (tmp_path / "blob.bin.part").stat().st_size == 1000 and not dest.exists()


def test_download_url_from_upstream_and_status_rules(server, tmp_path):
    dest = str(tmp_path / "x")
    chained = run(download, {"path": dest}, ctx(upstream={"url": server.base + "/blob"}))
    assert chained.status == "SUCCESS" and chained.data["bytes"] == len(BLOB)
    assert run(download, {"url": server.base + "/404", "path": dest}).status == "FAILURE"
    assert run(download, {"url": server.base + "/500", "path": dest}).status == "RETRY"
    missing = run(download, {"url": server.base + "/blob"})
    assert missing.status == "FAILURE" and '"path"' in missing.message
    assert "sha256" in run(download, {"url": server.base + "/blob", "path": dest, "sha256": "xyz"}).message


# --- upload ------------------------------------------------------------------------------------


def _parts(echo):
    """Parse the echoed multipart body with the stdlib's MIME parser."""
    raw = f"Content-Type: {echo['content_type']}\r\n\r\n".encode() + base64.b64decode(echo["body"])
    message = email.parser.BytesParser().parsebytes(raw)
    return {p.get_param("name", header="content-disposition"): p for p in message.get_payload()}


def test_upload_multipart(server, tmp_path):
    src = tmp_path / "report.txt"
    src.write_bytes(b"line one\r\nline two\n" * 100)
    result = run(upload, {"url": server.base + "/echo", "path": str(src), "field": "doc", "fields": {"note": "hi"}})
    assert result.status == "SUCCESS", result.message
    assert result.data["bytes"] == src.stat().st_size and result.data["status"] == 200
    echo = json.loads(result.data["response"])
    assert echo["content_type"].startswith("multipart/form-data; boundary=kmpwm-")
    parts = _parts(echo)
    assert parts["doc"].get_filename() == "report.txt"
    assert parts["doc"].get_content_type() == "text/plain"
    assert parts["doc"].get_payload(decode=True) == src.read_bytes()
    assert parts["note"].get_payload() == "hi"


def test_upload_raw_large_from_upstream(server, tmp_path):
    src = tmp_path / "blob.bin"
    src.write_bytes(BLOB)
    result = run(
        upload, {"url": server.base + "/echo", "method": "PUT", "multipart": False}, ctx(upstream={"path": str(src)})
    )
    assert result.status == "SUCCESS", result.message
    echo = json.loads(result.data["response"])
    assert echo["method"] == "PUT" and echo["length"] == len(BLOB) and echo["sha256"] == BLOB_SHA
    assert echo["content_type"] == "application/octet-stream"


def test_upload_failures(server, tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("x")
    assert run(upload, {"url": server.base + "/500", "path": str(src)}).status == "RETRY"
    rejected = run(upload, {"url": server.base + "/404", "path": str(src)})
    assert rejected.status == "FAILURE" and rejected.data["response"] == "no"
    missing = run(upload, {"url": server.base + "/echo", "path": str(tmp_path / "nope")})
    assert missing.status == "FAILURE" and "nope" in missing.message
    assert run(upload, {"url": server.base + "/echo"}).status == "FAILURE"
    expired = ctx()
    expired.expire()
    assert run(upload, {"url": server.base + "/echo", "path": str(src)}, expired).status == "RETRY"


# --- compress ----------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "src"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.bin").write_bytes(bytes(range(256)) * 40)
    (root / "sub" / "deeper" / "c.txt").write_text("gamma")
    single = tmp_path / "single.txt"
    single.write_text("solo")
    return root, single


EXPECTED = {
    "src/a.txt": b"alpha",
    "src/sub/b.bin": bytes(range(256)) * 40,
    "src/sub/deeper/c.txt": b"gamma",
    "single.txt": b"solo",
}


def _leftovers(directory):
    return [n for n in os.listdir(directory) if n.endswith(("tmp", ".part"))]


def test_compress_zip_round_trip(tree, tmp_path):
    root, single = tree
    out = tmp_path / "out" / "archive.zip"
    result = run(compress, {"paths": [str(root), str(single)], "output": str(out)})
    assert result.status == "SUCCESS", result.message
    with zipfile.ZipFile(out) as archive:
        files = {i.filename: archive.read(i) for i in archive.infolist() if not i.is_dir()}
        assert "src/empty/" in archive.namelist()
    assert files == EXPECTED
    data = result.data
    assert data["format"] == "zip" and data["files"] == 4 and data["output"] == str(out)
    assert data["bytes_in"] == sum(map(len, EXPECTED.values())) and data["bytes_out"] == out.stat().st_size
    assert _leftovers(out.parent) == []


@pytest.mark.parametrize("name, fmt", [("archive.tar.gz", None), ("archive.tgz", None), ("archive.bin", "tar.gz")])
def test_compress_tar_gz_round_trip(tree, tmp_path, name, fmt):
    root, single = tree
    out = tmp_path / name
    args = {"paths": [str(root), str(single)], "output": str(out)}
    if fmt:
        args["format"] = fmt
    result = run(compress, args)
    assert result.status == "SUCCESS", result.message
    assert result.data["format"] == "tar.gz"
    with tarfile.open(out, "r:gz") as archive:
        files = {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}
    assert files == EXPECTED
    assert _leftovers(tmp_path) == []


def test_compress_path_from_upstream_and_skips_its_own_output(tree):
    root, _ = tree
    out = root / "self.zip"
    out.write_bytes(b"an older archive")
    result = run(compress, {"output": str(out)}, ctx(upstream={"path": str(root)}))
    assert result.status == "SUCCESS", result.message
    with zipfile.ZipFile(out) as archive:
        assert "src/self.zip" not in archive.namelist()
        assert "src/a.txt" in archive.namelist()


def test_compress_expired_leaves_nothing(tree, tmp_path):
    root, _ = tree
    out = tmp_path / "archive.zip"
    expired = ctx()
    expired.expire()
    result = run(compress, {"path": str(root), "output": str(out)}, expired)
    assert result.status == "RETRY"
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "args, fragment",
    [
        ({"paths": ["MISSING"], "output": "OUT"}, "no such file or directory: "),
        ({"output": "OUT"}, "nothing to compress"),
        ({"path": "SRC", "output": ""}, '"output"'),
        ({"path": "SRC", "output": "OUT", "format": "rar"}, "unknown format 'rar'"),
        ({"paths": "SRC", "output": "OUT"}, '"paths" must be a list'),
    ],
)
def test_compress_bad_input(tree, tmp_path, args, fragment):
    root, _ = tree
    subst = {"MISSING": str(tmp_path / "missing"), "OUT": str(tmp_path / "o.zip"), "SRC": str(root)}
    args = {k: [subst[p] for p in v] if isinstance(v, list) else subst.get(v, v) for k, v in args.items()}
    result = run(compress, args)
    assert result.status == "FAILURE"
    assert fragment in result.message
    assert not (tmp_path / "o.zip").exists()


def test_compress_missing_path_is_named(tmp_path):
    missing = str(tmp_path / "gone.txt")
    result = run(compress, {"paths": [missing], "output": str(tmp_path / "o.zip")})
    assert result.status == "FAILURE" and missing in result.message


def test_compress_duplicate_names_and_bad_json(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.txt").write_text("1")
    (tmp_path / "b" / "x.txt").write_text("2")
    dup = run(
        compress,
        {"paths": [str(tmp_path / "a" / "x.txt"), str(tmp_path / "b" / "x.txt")], "output": str(tmp_path / "o.zip")},
    )
    assert dup.status == "FAILURE" and "'x.txt'" in dup.message
    assert compress("{", ctx()).status == "FAILURE"


# --- progress (SPEC section 10) -------------------------------------------------------------------


class Recording(WorkerContext):
    def __init__(self, **kw):
        super().__init__(task_id="t", attempt=1, **kw)
        self.reports = []

    def progress(self, fraction, message=None):
        self.reports.append((fraction, message))
        super().progress(fraction, message)


def test_download_and_upload_report_progress(server, tmp_path):
    from kmpwm.storage.progress import read

    pfile = tmp_path / "download.progress"
    c = Recording(progress_file=str(pfile))
    result = run(download, {"url": server.base + "/blob", "path": str(tmp_path / "b.bin")}, c)
    assert result.status == "SUCCESS", result.message
    c.close()  # a report made within 50 ms of the last write is written when the run ends
    fractions = [f for f, _ in c.reports]
    assert len(fractions) >= 2 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert read(pfile)["message"] == f"downloaded {len(BLOB)} of {len(BLOB)} bytes"
    assert pfile.stat().st_size < 100  # overwritten in place, never appended

    src = tmp_path / "up.bin"
    src.write_bytes(BLOB)
    for multipart in (True, False):
        c = Recording()
        result = run(upload, {"url": server.base + "/echo", "path": str(src), "multipart": multipart}, c)
        assert result.status == "SUCCESS", result.message
        assert c.reports[-1] == (1.0, f"uploaded {len(BLOB)} of {len(BLOB)} bytes")
        assert [f for f, _ in c.reports] == sorted(f for f, _ in c.reports)
