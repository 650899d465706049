"""HTTP built-in workers: ``http`` (one request), ``download`` (atomic, resumable) and ``upload``.

Stdlib only (urllib). Shared rules: only http:// and https:// URLs; a connection error, a
timeout, a 5xx, 408 or 429 is transient (Retry); another 4xx is a Failure. Every worker checks
``ctx.expired`` while moving bytes and stops with Retry when told to.
"""

from __future__ import annotations

import codecs
import hashlib
import http.client
import json
import mimetypes
import os
import re
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request

from kmpwm.core.results import Failure, Retry, Success
from kmpwm.running.declare import worker
from kmpwm.workers.files import elapsed_ms, fsync_dir, given_or_upstream, load_input, nonempty_string

USER_AGENT = "kmpwm/0.1"
CHUNK = 64 * 1024
MAX_TEXT = 64 * 1024  # response text kept in data, which ends up in the journal and in chains
REPORTED_HEADERS = ("content-type", "content-length", "etag", "last-modified", "location", "retry-after")
HEX64 = re.compile(r"[0-9a-fA-F]{64}")
TEXT_TYPES = ("json", "xml", "javascript", "x-www-form-urlencoded", "yaml", "csv")


class _Stopped(Exception):
    """Raised from inside a transfer when the worker was told to expire."""


@worker(
    description="Send one HTTP request; a 5xx, 408, 429 or connection error is retried, another 4xx fails.",
    inputs={
        "url": {"type": "string", "required": True, "description": "http:// or https:// URL"},
        "method": {"type": "string", "default": "GET", "description": "the HTTP method"},
        "headers": {"type": "object", "default": {}, "description": "header names to values"},
        "body": {"type": "string", "description": "the request body (or json, not both)"},
        "json": {"type": "any JSON", "description": "sent as the body with Content-Type application/json"},
        "timeout": {"type": "number", "default": 30, "description": "socket timeout in seconds"},
        "expect_status": {"type": "integer or list", "description": "these statuses succeed, any other fails"},
        "save_body": {"type": "boolean", "default": False, "description": "put the response text in data.body"},
    },
    returns={
        "status": "the response status",
        "url": "the URL after redirects",
        "bytes": "response body size",
        "duration_ms": "how long it took",
        "headers": "content-type, content-length, etag, ... when present",
        "body": "with save_body: the text of a textual response (first 64 KiB)",
        "truncated": "with save_body: true when body was cut",
    },
    heavy=True,
)
def http_request(input, ctx):
    """Send one HTTP request.

    Input (JSON object): ``url``; ``method`` (default GET); ``headers`` ({}); ``body`` (a string)
    or ``json`` (any JSON value, sent with Content-Type application/json); ``timeout`` (seconds,
    default 30); ``expect_status`` (an int or list of ints: these statuses succeed and any other
    fails, 5xx still being retried); ``save_body`` (false: put the response text in ``data``).

    Data: ``status``, ``url`` (after redirects), ``bytes`` (response body size), ``duration_ms``,
    ``headers`` (content-type, content-length, etag, last-modified, location, retry-after when
    present), and with ``save_body`` ``body``: the text of a textual response (its first 64 KiB,
    ``truncated`` true when cut).
    """
    started = time.monotonic()
    args = load_input(input, "http")
    if isinstance(args, Failure):
        return args
    try:
        url, method, headers, timeout, expect = _call_args(args, ctx, method="GET", timeout=30)
        payload = _payload(args.get("body"), args.get("json"), headers)
    except ValueError as exc:
        return Failure(f"http: {exc}")
    request = urllib.request.Request(url, data=payload, headers=headers, method=method)
    outcome = _exchange(request, timeout, ctx, keep=MAX_TEXT if args.get("save_body") else 0)
    if not isinstance(outcome, tuple):
        return outcome
    resp, size, kept = outcome
    data = {
        "status": resp.status,
        "url": resp.geturl(),
        "bytes": size,
        "duration_ms": elapsed_ms(started),
        "headers": _report_headers(resp),
    }
    if args.get("save_body"):
        data.update(_body_data(resp, size, kept))
    return _verdict(f"{method} {url}", resp, expect, data)


def _body_data(resp, size: int, kept: bytes) -> dict:
    """``body`` (the text kept of a textual response) and whether it was ``truncated``; nothing
    for another response."""
    text = _text(resp, kept)
    if text is None:
        return {}
    return {"body": text, "truncated": size > len(kept)}


@worker(
    description="Download a URL to a file, atomically (FILE.part, renamed when complete) and resumably.",
    inputs={
        "url": {"type": "string", "description": "http:// or https:// URL (required unless upstream.url)"},
        "path": {"type": "string", "required": True, "description": "the destination file"},
        "sha256": {"type": "string", "description": "hex digest the file must have"},
        "resume": {"type": "boolean", "default": True, "description": "continue a FILE.part with a Range request"},
        "timeout": {"type": "number", "default": 60, "description": "socket timeout in seconds"},
    },
    returns={
        "path": "the file written",
        "bytes": "its size",
        "resumed_from": "bytes kept from an earlier attempt",
        "sha256": "its digest",
        "status": "the response status",
        "duration_ms": "how long it took",
    },
    heavy=True,
)
def download(input, ctx):
    """Download a URL to a file, atomically and resumably.

    Input (JSON object): ``url`` (falls back to ``upstream["url"]``); ``path`` (destination);
    ``sha256`` (hex digest to verify, optional); ``resume`` (default true); ``timeout`` (60).
    Bytes go to ``path + ".part"``, which is fsynced and renamed onto ``path`` only when complete
    (and verified). A ``.part`` left by an earlier attempt is continued with a Range request; a
    server that ignores Range (200) is downloaded from the start again. Told to expire, it keeps
    the ``.part`` and asks to be retried.

    Data: ``path``, ``bytes`` (file size), ``resumed_from`` (bytes kept from an earlier attempt),
    ``sha256``, ``status``, ``duration_ms``.
    """
    started = time.monotonic()
    args = load_input(input, "download")
    if isinstance(args, Failure):
        return args
    try:
        url, path, expected, timeout = _download_args(args, ctx)
    except ValueError as exc:
        return Failure(f"download: {exc}")
    path = os.path.abspath(os.path.expanduser(path))
    problem = _prepare_destination(path)
    if problem is not None:
        return problem
    part = path + ".part"
    offset = _kept_bytes(part, args.get("resume", True))
    resp = _get_from(url, offset, timeout)
    if isinstance(resp, (Retry, Failure)):
        return resp
    with resp:
        received = _transfer(resp, url, path, part, offset, ctx)
    if not isinstance(received, tuple):
        return received  # a Retry or Failure
    status, offset, actual = received
    if expected is not None and actual != expected.lower():
        return _mismatch(part, url, expected, actual)
    return _downloaded(part, path, status, offset, actual, started)


def _mismatch(part: str, url: str, expected: str, actual: str) -> Failure:
    """The Failure of a file whose sha256 is not the one expected (its .part removed: a retry starts over)."""
    os.remove(part)
    return Failure(f"download {url}: sha256 mismatch: expected {expected.lower()}, got {actual}")


def _downloaded(part: str, path: str, status: int, offset: int, digest: str, started: float) -> Success:
    """Rename the complete, verified ``part`` onto ``path`` (durably); the Success."""
    os.replace(part, path)
    fsync_dir(os.path.dirname(path))
    size = os.path.getsize(path)
    return Success(
        message=f"downloaded {size} bytes to {path}" + (f" (resumed at {offset})" if offset else ""),
        data={
            "path": path,
            "bytes": size,
            "resumed_from": offset,
            "sha256": digest,
            "status": status,
            "duration_ms": elapsed_ms(started),
        },
    )


def _get_from(url: str, offset: int, timeout: float):
    """The response to a GET of ``url`` from byte ``offset`` on, or the Retry/Failure of a
    request that could not be made."""
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return _open(urllib.request.Request(url, headers=headers), timeout)
    except http.client.InvalidURL as exc:
        return Failure(f"download: invalid URL {url!r}: {exc}")
    except (OSError, http.client.HTTPException) as exc:
        return Retry(f"download {url}: {_reason(exc)}")


def _kept_bytes(part: str, resume) -> int:
    """How much of the file an earlier attempt left in ``part`` to resume from (without
    ``resume``, none: the .part is removed)."""
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    if offset and not resume:
        os.remove(part)
        return 0
    return offset


def _transfer(resp, url: str, path: str, part: str, offset: int, ctx):
    """Receive the response into ``part``: (status, where it resumed, the file's sha256), or the
    Retry/Failure that stopped it."""
    status = resp.status
    offset = _resume_offset(resp, offset, part, url)
    if not isinstance(offset, int):
        return offset  # a Retry or Failure
    digest = hashlib.sha256()
    if offset:
        _hash_file(part, digest)
    if status != 416:  # (416: the .part holds the whole file already)
        stopped = _receive(resp, part, offset, digest, ctx)
        if stopped is not None:
            size = os.path.getsize(part)
            return Retry(
                f"download {url}: {stopped} at {size} bytes; will resume",
                data={"path": path, "bytes": size, "resumed_from": offset, "status": status},
            )
    return status, offset, digest.hexdigest()


def _download_args(args: dict, ctx) -> tuple[str, str, str | None, float]:
    """url, destination, expected sha256, timeout (ValueError on a bad one)."""
    url = _url(given_or_upstream(args, ctx, "url"))
    path = nonempty_string(args.get("path"), '"path" (the destination file) is required')
    expected = args.get("sha256")
    if expected is not None and not (isinstance(expected, str) and HEX64.fullmatch(expected)):
        raise ValueError('"sha256" must be 64 hex digits')
    return url, path, expected, _timeout(args.get("timeout", 60), ctx)


def _prepare_destination(path: str):
    """None when ``path`` can be written, else the Failure."""
    if os.path.isdir(path):
        return Failure(f"download: destination is a directory: {path}")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as exc:
        return Failure(f"download: cannot create the destination's directory: {exc}")
    return None


def _resume_offset(resp, offset: int, part: str, url: str):
    """Where the response's bytes go in ``part`` (0: from the start), or the Retry/Failure the
    response calls for."""
    status = resp.status
    if status == 206 or (status == 416 and offset):
        problem = _range_problem(resp, offset)
        if problem is None:
            return offset
        os.remove(part)
        return Retry(f"download {url}: {problem}; will start over")
    if 200 <= status < 300:
        return 0
    verdict = Retry if _transient(status) else Failure
    return verdict(_status_line(f"GET {url}", resp), data={"status": status, "url": url})


def _range_problem(resp, offset: int) -> str | None:
    """Why a 206 (or a 416 to a resume) does not continue the .part's ``offset`` bytes; None if it does."""
    content_range = resp.headers.get("Content-Range")
    if resp.status == 416:
        # The .part may already hold the whole file (an attempt stopped right at the end).
        return None if _range_total(content_range) == offset else f"server refused to resume at byte {offset}"
    return None if _range_start(content_range) == offset else "server sent an unexpected range"


@worker(
    description="Upload a file, streamed from disk, as multipart/form-data or as the raw body.",
    inputs={
        "url": {"type": "string", "required": True, "description": "http:// or https:// URL"},
        "path": {"type": "string", "description": "the file to send (required unless upstream.path)"},
        "method": {"type": "string", "default": "POST", "description": "the HTTP method"},
        "multipart": {"type": "boolean", "default": True, "description": "false: the file is the raw body"},
        "field": {"type": "string", "default": "file", "description": "the form field of the file"},
        "fields": {"type": "object", "default": {}, "description": "extra text form fields (multipart)"},
        "headers": {"type": "object", "default": {}, "description": "header names to values"},
        "timeout": {"type": "number", "default": 60, "description": "socket timeout in seconds"},
        "expect_status": {"type": "integer or list", "description": "these statuses succeed, any other fails"},
    },
    returns={
        "status": "the response status",
        "bytes": "the file's size",
        "url": "the URL after redirects",
        "path": "the file sent",
        "duration_ms": "how long it took",
        "response": "the response text (first 64 KiB)",
    },
    heavy=True,
)
def upload(input, ctx):
    """Upload a file, streamed from disk.

    Input (JSON object): ``url``; ``path`` (falls back to ``upstream["path"]``, so a chain can
    upload what a previous step produced); ``method`` (POST); ``field`` (form field name,
    "file"); ``multipart`` (true: multipart/form-data; false: the file is the raw body);
    ``fields`` (extra text form fields, multipart only); ``headers`` ({}); ``timeout`` (60);
    ``expect_status`` (as for ``http``).

    Data: ``status``, ``bytes`` (file size), ``url``, ``path``, ``duration_ms``, ``response`` (the response
    text, first 64 KiB).
    """
    started = time.monotonic()
    args = load_input(input, "upload")
    if isinstance(args, Failure):
        return args
    try:
        url, method, headers, timeout, expect = _call_args(args, ctx, method="POST", timeout=60)
        field, fields = _form_fields(args)
        path = nonempty_string(given_or_upstream(args, ctx, "path"), '"path" (the file to upload) is required')
    except ValueError as exc:
        return Failure(f"upload: {exc}")
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        return Failure(f"upload: no such file: {path}")
    size = os.path.getsize(path)
    if args.get("multipart", True):
        body, length = _multipart_body(path, size, field, fields, headers, ctx)
    else:
        body, length = _stream(path, ctx, total=size), size
        _set_default(headers, "Content-Type", _content_type(path))
    # Known up front, so servers that refuse chunked uploads still accept the streamed body.
    headers["Content-Length"] = str(length)
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    outcome = _exchange(request, timeout, ctx, keep=MAX_TEXT)
    if not isinstance(outcome, tuple):
        return outcome
    resp, _, kept = outcome
    data = {
        "status": resp.status,
        "bytes": size,
        "url": resp.geturl(),
        "path": path,
        "duration_ms": elapsed_ms(started),
        "response": _text(resp, kept, force=True),
    }
    return _verdict(f"{method} {url} ({size} bytes)", resp, expect, data)


def _form_fields(args: dict) -> tuple[str, dict]:
    """The file's form field and the extra text fields (ValueError on a bad one)."""
    field = nonempty_string(args.get("field", "file"), '"field" must be a non-empty string')
    fields = _text_values(args.get("fields") or {}, '"fields" must be an object of form field names to strings')
    return field, fields


def _content_type(path: str) -> str:
    return mimetypes.guess_type(path)[0] or "application/octet-stream"


def _multipart_body(path: str, size: int, field: str, fields: dict, headers: dict, ctx):
    """The multipart/form-data body, streamed (the text fields, then the file), and its length;
    its Content-Type goes into ``headers`` unless they have one."""
    boundary = "kmpwm-" + secrets.token_hex(16)
    head, tail = _multipart_frame(
        boundary, {k: str(v) for k, v in fields.items()}, field, os.path.basename(path), _content_type(path)
    )
    _set_default(headers, "Content-Type", f"multipart/form-data; boundary={boundary}")
    return _stream(path, ctx, head, tail, size), len(head) + size + len(tail)


# --- input checks (ValueError carries the message of the Failure) -------------------------------


def _call_args(
    args: dict, ctx, *, method: str, timeout: float
) -> tuple[str, str, dict[str, str], float, set[int] | None]:
    """The request's URL, method, headers, socket timeout and expected statuses, ``method`` and
    ``timeout`` being the defaults."""
    return (
        _url(args.get("url")),
        _method(args.get("method", method)),
        _headers(args.get("headers")),
        _timeout(args.get("timeout", timeout), ctx),
        _expect(args.get("expect_status")),
    )


def _url(value) -> str:
    nonempty_string(value, '"url" is required')
    parts = urllib.parse.urlsplit(value)
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"only http:// and https:// URLs are allowed, not {value!r}")
    if not parts.hostname:
        raise ValueError(f"URL has no host: {value!r}")
    return value


def _method(value) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z]+", value):
        raise ValueError(f'"method" must be an HTTP method name, not {value!r}')
    return value.upper()


def _headers(value) -> dict[str, str]:
    value = _text_values({} if value is None else value, '"headers" must be an object of header names to strings')
    headers = {str(k): str(v) for k, v in value.items()}
    _set_default(headers, "User-Agent", USER_AGENT)
    return headers


def _text_values(value, message: str) -> dict:
    """``value`` if it is an object of names to strings (or numbers), else ValueError(``message``)."""
    if not isinstance(value, dict) or not all(isinstance(v, (str, int, float)) for v in value.values()):
        raise ValueError(message)
    return value


def _set_default(headers: dict, name: str, value: str) -> None:
    if not any(k.lower() == name.lower() for k in headers):
        headers[name] = value


def _timeout(value, ctx) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f'"timeout" must be a positive number of seconds, not {value!r}')
    left = ctx.time_left()
    # Never wait on a socket past the task's own time limit (but give it a moment to fail).
    return float(value) if left is None else min(float(value), max(left, 1.0))


def _expect(value) -> set[int] | None:
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if not values or not all(map(_is_status_code, values)):
        raise ValueError(f'"expect_status" must be a status code or a list of them, not {value!r}')
    return set(values)


def _is_status_code(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON's true is not 1 here


def _payload(body, json_value, headers: dict) -> bytes | None:
    if body is not None and json_value is not None:
        raise ValueError('give "body" or "json", not both')
    if body is not None:
        if not isinstance(body, str):
            raise ValueError('"body" must be a string (use "json" for structured data)')
        return body.encode("utf-8")
    if json_value is not None:
        _set_default(headers, "Content-Type", "application/json")
        return json.dumps(json_value).encode("utf-8")
    return None


# --- the exchange ------------------------------------------------------------------------------


def _open(request, timeout: float):
    """The response, including error statuses (urllib raises those; the caller decides)."""
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        return exc


def _exchange(request, timeout: float, ctx, keep: int):
    """Send ``request`` and read the whole response: ``(response, body size, first keep bytes)``,
    or the Retry/Failure that ended it."""
    what = f"{request.get_method()} {request.full_url}"
    try:
        with _open(request, timeout) as resp:
            return resp, *_read_body(resp, ctx, keep)
    except _Stopped:
        return Retry(f"{what}: stopped before the exchange finished")
    except http.client.InvalidURL as exc:
        return Failure(f"{what}: invalid URL: {exc}")
    except (OSError, http.client.HTTPException) as exc:
        return Retry(f"{what}: {_reason(exc)}")


def _read_body(resp, ctx, keep: int) -> tuple[int, bytes]:
    """Read the whole body: its size and its first ``keep`` bytes (_Stopped when told to expire)."""
    size, kept = 0, bytearray()
    while chunk := resp.read1(CHUNK):
        if ctx.expired:
            raise _Stopped
        size += len(chunk)
        kept += chunk[: keep - len(kept)]  # nothing once keep bytes are kept
    return size, bytes(kept)


def _verdict(what: str, resp, expect: set[int] | None, data: dict):
    status = resp.status
    label = _status_line(what, resp)
    if expect is not None and status in expect:
        return Success(message=label, data=data)
    if _transient(status):
        return Retry(label, data=data)
    if status >= 400 or expect is not None:
        return Failure(label + (f" (expected {sorted(expect)})" if expect is not None else ""), data=data)
    return Success(message=label, data=data)


def _status_line(what: str, resp) -> str:
    """``GET URL -> 404 Not Found``."""
    return f"{what} -> {resp.status} {resp.reason or ''}".rstrip()


def _transient(status: int) -> bool:
    return status >= 500 or status in (408, 429)


def _reason(exc: BaseException) -> str:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    return str(reason) or type(reason).__name__


def _report_headers(resp) -> dict[str, str]:
    return {name: resp.headers[name] for name in REPORTED_HEADERS if resp.headers.get(name) is not None}


def _text(resp, raw: bytes, force: bool = False) -> str | None:
    """``raw`` decoded with the response's charset; None for a non-textual response unless
    ``force``. An incremental decoder drops a character cut in half at the 64 KiB limit."""
    if not (force or _looks_textual(resp, raw)):
        return None
    charset = resp.headers.get_content_charset() or "utf-8"
    try:
        decoder = codecs.getincrementaldecoder(charset)(errors="replace")
    except LookupError:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return decoder.decode(raw, final=False)


def _looks_textual(resp, raw: bytes) -> bool:
    """A textual Content-Type, or, without one, a body that is UTF-8."""
    if not resp.headers.get("Content-Type"):
        return _looks_utf8(raw)
    kind = resp.headers.get_content_type()
    return kind.startswith("text/") or any(t in kind for t in TEXT_TYPES)


def _looks_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        # Only a character cut at the 64 KiB limit is forgiven.
        return exc.reason == "unexpected end of data"
    return True


# --- download and upload helpers ---------------------------------------------------------------


def _range_start(content_range: str | None) -> int | None:
    match = re.match(r"\s*bytes\s+(\d+)-", content_range or "")
    return int(match.group(1)) if match else None


def _range_total(content_range: str | None) -> int | None:
    match = re.search(r"/(\d+)\s*$", content_range or "")
    return int(match.group(1)) if match else None


def _hash_file(path: str, digest) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)


def _receive(resp, part: str, offset: int, digest, ctx) -> str | None:
    """Append the response body to ``part`` (from scratch when ``offset`` is 0), feeding
    ``digest``; None once complete, else why it stopped (the .part is fsynced for the resume)."""
    expected = _content_length(resp)
    with open(part, "ab" if offset else "wb") as out:
        try:
            received = _copy_body(resp, out, digest, ctx, offset, offset + expected if expected else None)
            # http.client returns a short body silently when the connection drops.
            if expected is not None and received < expected:
                return f"connection closed after {received} of {expected} bytes"
            return None
        except _Stopped:
            return "stopped"
        except (OSError, http.client.HTTPException) as exc:
            return f"transfer failed ({_reason(exc)})"
        finally:
            out.flush()
            os.fsync(out.fileno())


def _content_length(resp) -> int | None:
    length = resp.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _copy_body(resp, out, digest, ctx, offset: int, total: int | None) -> int:
    """Copy the body to ``out`` (after ``offset`` bytes of ``total``), feeding ``digest`` and
    reporting progress; how many bytes it copied (_Stopped when told to expire)."""
    received = 0
    while True:
        if ctx.expired:
            raise _Stopped
        chunk = resp.read1(CHUNK)
        if not chunk:
            return received
        out.write(chunk)
        digest.update(chunk)
        received += len(chunk)
        if total:
            _progress(ctx, offset + received, total, "downloaded")


def _quote(value: str) -> str:
    # What browsers do for multipart names and filenames (WHATWG HTML, form-data encoding).
    return value.replace("\r", "%0D").replace("\n", "%0A").replace('"', "%22")


def _multipart_frame(
    boundary: str, fields: dict[str, str], field: str, filename: str, content_type: str
) -> tuple[bytes, bytes]:
    """The bytes before and after the file's content in a multipart/form-data body."""
    head = b""
    for name, value in fields.items():
        head += (f'--{boundary}\r\nContent-Disposition: form-data; name="{_quote(name)}"\r\n\r\n{value}\r\n').encode()
    head += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{_quote(field)}"; '
        f'filename="{_quote(filename)}"\r\nContent-Type: {content_type}\r\n\r\n'
    ).encode()
    return head, f"\r\n--{boundary}--\r\n".encode("ascii")


def _progress(ctx, done: int, total: int, verb: str) -> None:
    report = getattr(ctx, "progress", None)
    if report is not None and total > 0:
        report(min(1.0, done / total), f"{verb} {done} of {total} bytes")


def _stream(path: str, ctx, head: bytes = b"", tail: bytes = b"", total: int = 0):
    """The request body as an iterable, so the file is sent in chunks rather than read whole
    (reporting progress as the file's bytes are handed to the connection)."""
    if head:
        yield head
    sent = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            if ctx.expired:
                raise _Stopped
            yield chunk
            sent += len(chunk)
            _progress(ctx, sent, total, "uploaded")
    if tail:
        yield tail
