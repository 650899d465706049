"""Bad input (SPEC section 7, section 9 "--json on failure"): hypothesis-driven fuzzing of CLI
arguments, durations, times, JSON Lines batches, chain files and config.toml.

Every example must end with a documented exit code (0, 2 usage, 65 invalid params, 69 OS policy,
78 bad configuration), one or two clear lines on stderr, never a traceback and never an
"internal error" (exit 70); with ``--json`` stdout is one JSON document; a rejected command leaves
the journal byte for byte as it was (nothing half-written), an accepted one appends exactly one
record; and whatever was accepted must not break reading the queue afterwards.

The fuzzing runs the CLI in-process (``kmpwm.cli.app.main``) for speed; the enormous inputs run the
real command line.  ``KMPWM_FUZZ_EXAMPLES`` scales the number of examples per property.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from pathlib import Path

import orjson
import pytest
from crashlib import Home, Tally, check_chain_order, count
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from kmpwm.storage.journal import decode

EXAMPLES = int(os.environ.get("KMPWM_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)
DOCUMENTED = {0, 1, 2, 65, 69, 78}
MIB = 1 << 20


# -- running the CLI in-process ------------------------------------------------------------


class Run:
    def __init__(self, args, rc, out: bytes, err: str):
        self.args, self.rc, self.out, self.err = args, rc, out, err

    def doc(self):
        return orjson.loads(self.out)

    def __repr__(self) -> str:
        return f"kmpwm {self.args!r}: exit {self.rc}\nstdout: {self.out[:500]!r}\nstderr: {self.err[-1500:]}"


def cli(*args, stdin: bytes = b"") -> Run:
    from kmpwm.cli.app import main

    out, err = io.BytesIO(), io.BytesIO()
    o = io.TextIOWrapper(out, encoding="utf-8", errors="strict", write_through=True)  # as a real pipe
    e = io.TextIOWrapper(err, encoding="utf-8", errors="backslashreplace", write_through=True)
    i = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = i, o, e
    try:
        try:
            rc = main([str(a) for a in args])
        except SystemExit as exc:  # noqa: PERF203 - must never happen, but report it as such
            rc = exc.code
        except BaseException:  # escaped main(): a real process would print this traceback
            import traceback

            e.write(traceback.format_exc())
            rc = "uncaught exception"
    finally:
        for s in (o, e):
            try:
                s.flush()
            except Exception:  # noqa: BLE001
                pass
        sys.stdin, sys.stdout, sys.stderr = saved
    return Run(args, rc, out.getvalue(), err.getvalue().decode("utf-8", "replace"))


def journal_bytes() -> bytes:
    path = Path(os.environ["KMPWM_HOME"]) / "journal" / "journal.log"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def assert_clean(r: Run, allowed=DOCUMENTED) -> None:
    """Documented exit code, no traceback, no internal error, short error, one JSON document."""
    count("inputs")
    assert "Traceback" not in r.err and "internal error" not in r.err, r
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", r.err), (
        f"raw control characters (terminal escapes) in the message\n{r}"
    )
    assert r.rc in allowed, r
    if r.rc != 0:
        errors = [ln for ln in r.err.split("\n") if ln.strip() and not ln.startswith("kmpwm: warning")]
        assert 1 <= len(errors) <= 2, r
    options = r.args[: r.args.index("--")] if "--" in r.args else r.args  # after "--", "--json" is an operand
    if "--json" in options and r.out.strip():
        doc = r.doc()  # exactly one document
        if r.rc not in (0, 1):
            assert doc.get("error") or doc.get("result", "SUCCESS") != "SUCCESS", r


def assert_journal_intact(before: bytes, r: Run) -> None:
    """Rejected: unchanged.  Accepted: the old bytes plus complete, valid records."""
    after = journal_bytes()
    if r.rc != 0:
        assert after == before, f"a rejected command changed the journal\n{r}"
        return
    if r.args and r.args[0] == "compact":  # rewrites the journal (atomically): every record valid
        assert not after or (after.endswith(b"\n") and all(decode(ln) is not None for ln in after.split(b"\n")[:-1])), r
        return
    assert after.startswith(before) and after.endswith(b"\n") or not after, r
    for line in after[len(before) :].split(b"\n")[:-1]:
        assert decode(line) is not None, r


def assert_queue_readable() -> None:
    """Whatever was accepted must not break the views (a poisoned queue breaks every user)."""
    for args in (("inspect-queue", "--all", "--json"), ("events", "--json")):
        r = cli(*args)
        assert r.rc == 0 and "internal error" not in r.err, f"after accepting input, {r}"
        r.doc()
    state = Path(os.environ["KMPWM_HOME"]) / "journal" / "journal.log"
    if state.exists():
        from kmpwm.storage.paths import resolve
        from kmpwm.storage.store import Store

        for tid in list(Store(resolve()).load().state["tasks"])[:5]:
            r = cli("explain", tid, "--json")
            assert r.rc == 0 and "internal error" not in r.err, r


# -- strategies ----------------------------------------------------------------------------

# Command-line text: any Unicode a terminal can pass, plus the lone surrogates Python makes of
# bytes that are not UTF-8 (os.fsdecode); never NUL (argv cannot hold it).
arg_char = st.one_of(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    st.sampled_from(["\udcff", "\udc80", "\udce9"]),
)
arg_text = st.text(arg_char, max_size=30)

units = st.sampled_from(["ms", "s", "m", "h", "d", "w", "", "y", "S", "M", " "])
number = st.one_of(
    st.integers(0, 10**12).map(str),
    st.floats(0, 1e12, allow_nan=False).map(lambda f: f"{f:.3f}"),
    st.sampled_from(["0", "00", "1e5", "1E3", ".5", "5.", "-1", "+1", "nan", "inf", "9" * 40, "1_000", "٣"]),
)
duration = st.one_of(
    st.lists(st.tuples(number, units).map("".join), min_size=1, max_size=4).map("".join),
    st.text(st.sampled_from("0123456789.msdhw -+eE_"), max_size=15),
    arg_text,
)


@st.composite
def times(draw):
    kind = draw(st.integers(0, 4))
    if kind == 0:
        tz = draw(st.one_of(st.none(), st.timezones()))
        dt = draw(st.datetimes(timezones=st.just(tz) if tz else st.none()))
        sep = draw(st.sampled_from(["T", " "]))
        return dt.isoformat(sep=sep)
    if kind == 1:
        return "@" + draw(
            st.one_of(number, st.integers(-(10**20), 10**20).map(str), st.floats(allow_nan=True).map(repr))
        )
    if kind == 2:
        return "+" + draw(duration)
    if kind == 3:
        return draw(
            st.sampled_from(
                [
                    "2026-11-22",
                    "2026-11-22T25:00:00",
                    "2026-02-30T00:00:00",
                    "0001-01-01",
                    "9999-12-31T23:59:59",
                    "0001-01-01T00:00:00+14:00",
                    "now",
                    "",
                    "@",
                    "+",
                ]
            )
        )
    return draw(arg_text)


def _at_oracle(value: str) -> bool:
    from kmpwm.core.exitcodes import InvalidParams
    from kmpwm.core.timeparse import parse_time

    try:
        parse_time(value)
        return True
    except InvalidParams:
        return False
    except Exception:  # noqa: BLE001 - an exception kmpwm does not turn into exit 65
        return False


# -- durations and times ---------------------------------------------------------------------


@FUZZ
@given(flag=st.sampled_from(["--delay", "--every", "--timeout", "--backoff-delay", "--flex"]), value=duration)
@example(flag="--delay", value="9" * 400)
@example(flag="--delay", value="")
@example(flag="--every", value="59.999s")
def test_duration_flags(flag, value):
    from kmpwm.core.exitcodes import InvalidParams
    from kmpwm.core.timeparse import parse_duration

    args = ["enqueue", "fz-dur", "echo", f"{flag}={value}", "--policy", "replace", "--json"]
    if flag == "--flex":
        args += ["--every", "1h"]
    before = journal_bytes()
    r = cli(*args)
    assert_clean(r, {0, 65})
    assert_journal_intact(before, r)
    if flag in ("--delay", "--backoff-delay"):
        try:
            parse_duration(value)
            valid = True
        except InvalidParams:
            valid = False
        assert (r.rc == 0) == valid, r
    if r.rc == 0:
        assert r.doc()["result"] == "SUCCESS"
    else:
        doc = r.doc()
        assert doc["result"] == "REJECTED_INVALID_PARAMS" and doc["error"], r


@FUZZ
@given(value=times())
@example(value="0001-01-01T00:00:00")
@example(value="9999-12-31T23:59:59")
def test_at_times(value):
    before = journal_bytes()
    r = cli("enqueue", "fz-at", "echo", f"--at={value}", "--policy", "replace", "--json")
    assert_clean(r, {0, 65})
    assert_journal_intact(before, r)
    if r.rc == 0:
        assert_queue_readable()


@FUZZ
@given(start=times(), end=times())
@example(start="0001-01-01", end="2026-11-22")
def test_windows(start, end):
    line = json.dumps({"id": "fz-win", "worker": "echo", "window": [start, end], "policy": "replace"}).encode()
    before = journal_bytes()
    r = cli("enqueue", "--from", "-", "--json", stdin=line + b"\n")
    assert_clean(r, {0, 65})
    assert_journal_intact(before, r)
    if r.rc == 0:
        assert_queue_readable()


@FUZZ
@given(
    expr=st.one_of(
        st.lists(
            st.sampled_from(
                [
                    "*",
                    "*/0",
                    "*/5",
                    "0",
                    "59",
                    "60",
                    "-1",
                    "1-5",
                    "5-1",
                    "31",
                    "2",
                    "L",
                    "?",
                    "MON",
                    "jan",
                    "1,2,3",
                    "*/99999999",
                    "H",
                    "@daily",
                    "#",
                    "1#2",
                ]
            ),
            min_size=1,
            max_size=7,
        ).map(" ".join),
        arg_text,
    )
)
@example(expr="0 0 31 2 *")
@example(expr="0 0 30 2 *")
def test_cron_expressions(expr):
    before = journal_bytes()
    r = cli("enqueue", "fz-cron", "echo", f"--cron={expr}", "--policy", "replace", "--json")
    assert_clean(r, {0, 65})
    assert_journal_intact(before, r)
    if r.rc == 0:
        assert_queue_readable()


# -- the command line at large ----------------------------------------------------------------

FLAGS = {
    "enqueue": [
        "--input",
        "--input-file",
        "--delay",
        "--every",
        "--flex",
        "--at",
        "--exact-behavior",
        "--cron",
        "--on-change",
        "--when",
        "--network-type",
        "--qos",
        "--timeout",
        "--backoff",
        "--backoff-delay",
        "--max-attempts",
        "--policy",
        "--tag",
        "--window",
    ],
    "chain": ["--id", "--policy", "--delay", "--at", "--qos", "--timeout", "--max-attempts", "--tag", "--window"],
    "cancel": ["--tag"],
    "inspect-queue": ["--tag", "--state"],
    "explain": [],
    "events": ["--task", "--since"],
    "workers": [],
    "compact": [],
}
SWITCHES = [
    "--json",
    "--all",
    "--no-descendants",
    "--requires-network",
    "--requires-charging",
    "--battery-not-low",
    "--storage-not-low",
    "--device-idle",
    "--heavy",
    "--expedited",
    "--bogus",
    "-x",
    "--",
]


@st.composite
def argvs(draw):
    cmd = draw(st.sampled_from(sorted(FLAGS)))
    args = [cmd]
    for _ in range(draw(st.integers(0, 6))):
        choice = draw(st.integers(0, 3))
        if choice == 0 and FLAGS[cmd]:
            flag = draw(st.sampled_from(FLAGS[cmd]))
            args += [flag, draw(arg_text)] + ([draw(arg_text)] if flag == "--window" else [])
        elif choice == 1:
            args.append(draw(st.sampled_from(SWITCHES)))
        else:
            args.append(
                draw(
                    st.one_of(
                        arg_text,
                        st.sampled_from(
                            ["echo", "fail", "sleep", "a", "a+b", "echo+echo", "os:system", "a#2", "x/y", "-", ".."]
                        ),
                    )
                )
            )
    if draw(st.booleans()):
        args.append("--json")
    return args


@FUZZ
@given(args=argvs())
@example(args=["enqueue", "a", "echo", "--input", "\udcff"])
@example(args=["enqueue", "\udcff", "echo"])
@example(args=["enqueue", "a", "echo", "--tag", "caf\udce9"])
@example(args=["enqueue", "a", "echo", "--max-attempts", "9" * 30])
@example(args=["compact", "\udcff", "--json"])
def test_cli_arguments(args):
    assume("--watch" not in args and "--follow" not in args and "--help" not in args and "-h" not in args)
    before = journal_bytes()
    r = cli(*args)
    assert_clean(r)
    assert_journal_intact(before, r)
    if r.rc == 0 and args[0] in ("enqueue", "chain"):
        assert_queue_readable()


# -- JSON Lines batches -------------------------------------------------------------------------

json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e308, -1e308, 1e18, -1e18, 0.5, 2**64]),
    st.text(max_size=20),
    duration,
    times(),
)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)
SPEC_KEYS = [
    "id",
    "worker",
    "input",
    "delay",
    "every",
    "flex",
    "at",
    "window",
    "cron",
    "when",
    "on_change",
    "exact_behavior",
    "requires_network",
    "network_type",
    "heavy",
    "expedited",
    "qos",
    "timeout",
    "backoff",
    "backoff_delay",
    "max_attempts",
    "policy",
    "tags",
    "tag",
    "input_file",
    "no_descendants",
    "bogus",
]


@st.composite
def spec_lines(draw):
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.binary(max_size=60)).replace(b"\n", b" ")
    if kind == 1:
        return json.dumps(draw(json_value)).encode()
    spec = {
        "id": draw(st.one_of(st.sampled_from(["j1", "j2", "j3", "a#2", "x/y", " ", ""]), st.text(max_size=12))),
        "worker": draw(st.sampled_from(["echo", "echo", "echo", "fail", "nope", "os:system"])),
    }
    for key in draw(st.lists(st.sampled_from(SPEC_KEYS), max_size=4, unique=True)):
        spec[key] = draw(json_value)
    if draw(st.booleans()):
        spec["policy"] = "replace"
    return json.dumps(spec).encode()


@FUZZ
@given(lines=st.lists(spec_lines(), min_size=1, max_size=5))
@example(lines=[b'{"id":"big-at","worker":"echo","at":1e308}'])
@example(lines=[b'{"id":"neg-at","worker":"echo","at":-1e18}'])
@example(lines=[b'{"id":"big-win","worker":"echo","window":[0,1e300]}'])
@example(lines=[b'{"id":"j1","worker":"echo","input_file":[]}'])
@example(lines=[b'{"id":"j1","worker":"echo","tag":false}'])
@example(lines=[b'{"id":"a\\u001b[2Jb","worker":"echo"}'])
@example(lines=[b'{"id":"ok","worker":"echo"}', b'{"id":"bad","worker":"echo","delay":"soon"}'])
def test_jsonl_batches(lines):
    before = journal_bytes()
    r = cli("enqueue", "--from", "-", "--json", stdin=b"\n".join(lines) + b"\n")
    assert_clean(r, {0, 65, 69})
    assert_journal_intact(before, r)
    doc = r.doc()
    if r.rc == 0:
        assert all(x["result"] == "SUCCESS" for x in doc["results"]), r
        assert journal_bytes().count(b"\n") - before.count(b"\n") in (1, 2), "one durable append (plus a header)"
        assert_queue_readable()
    else:
        assert "results" in doc and doc.get("error"), r


# -- chain files --------------------------------------------------------------------------------

chain_task = st.one_of(
    st.sampled_from(["echo", "fail", "nope", "echo+echo", "", "+", "echo+", "os:system"]),
    st.fixed_dictionaries(
        {"worker": st.sampled_from(["echo", "fail", "nope", ""])},
        optional={
            k: json_value
            for k in ("id", "input", "delay", "at", "qos", "max_attempts", "every", "policy", "constraints", "bogus")
        },
    ),
    json_value,
)
chain_step = st.one_of(
    chain_task, st.lists(chain_task, max_size=3), st.fixed_dictionaries({"tasks": st.lists(chain_task, max_size=3)})
)
chain_doc = st.one_of(
    st.fixed_dictionaries(
        {"steps": st.lists(chain_step, max_size=4)},
        optional={
            "id": st.one_of(st.text(max_size=10), json_value),
            "policy": st.one_of(st.sampled_from(["keep", "replace", "append"]), json_value),
            "tags": json_value,
            "bogus": json_value,
        },
    ),
    st.lists(chain_step, max_size=3),
    json_value,
)


def _strip_none(value):
    if isinstance(value, dict):
        return {str(k): _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value if v is not None]
    return value


@FUZZ
@given(
    doc=chain_doc,
    fmt=st.sampled_from(["json", "toml", "stdin", "noext"]),
    raw=st.one_of(st.none(), st.binary(max_size=80)),
)
def test_chain_files(tmp_path_factory, doc, fmt, raw):
    import tomli_w

    if raw is not None:
        data = raw
    elif fmt == "toml":
        try:
            data = tomli_w.dumps(_strip_none(doc) if isinstance(doc, dict) else {"steps": _strip_none(doc)}).encode()
        except (TypeError, ValueError):
            data = b"steps = ["
    else:
        data = json.dumps(doc).encode()
    d = tmp_path_factory.mktemp("chainfile")
    path = d / {"json": "c.json", "toml": "c.toml", "noext": "chain", "stdin": "unused"}[fmt]
    path.write_bytes(data)
    before = journal_bytes()
    if fmt == "stdin":
        r = cli("chain", "--file", "-", "--json", stdin=data)
    else:
        r = cli("chain", "--file", path, "--json")
    assert_clean(r, {0, 65, 69})
    assert_journal_intact(before, r)
    out = r.doc()
    if r.rc == 0:
        assert out["result"] == "SUCCESS" and out["tasks"]
        assert_queue_readable()
    else:
        assert out["result"] != "SUCCESS" and out["error"], r


# -- config.toml ------------------------------------------------------------------------------

worker_table = st.fixed_dictionaries(
    {},
    optional={
        "command": st.one_of(st.lists(st.text(max_size=10), max_size=3), st.text(max_size=10), st.integers()),
        "entry": st.one_of(
            st.sampled_from(["mod:attr", "os:system", "kmpwm.workers.builtin:echo", "a.b:c.d", ":", "x"]),
            st.text(max_size=10),
        ),
        "timeout": st.one_of(
            st.sampled_from(["10m", "0s", "-1", "abc", "1e5"]), st.integers(-5, 10**12), st.floats(allow_nan=False)
        ),
        "cwd": st.one_of(st.text(max_size=10), st.integers()),
        "env": st.one_of(
            st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
            st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
            st.text(max_size=5),
        ),
        "bogus": st.text(max_size=5),
    },
)
config_doc = st.one_of(
    st.fixed_dictionaries(
        {
            "workers": st.dictionaries(
                st.one_of(st.sampled_from(["ok", "echo", "a.b", "-x", "x y", "é", "a" * 200]), st.text(max_size=8)),
                st.one_of(worker_table, st.integers(), st.text(max_size=5)),
                max_size=3,
            )
        }
    ),
    st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=5), worker_table), max_size=3),
)


@FUZZ
@example(doc={"workers": {"a\x1b[2J\nb\nc": {"command": ["x"]}}}, raw=None)
@given(
    doc=config_doc,
    raw=st.one_of(
        st.none(), st.binary(max_size=60), st.sampled_from([b"\xff\xfe", b"[workers", b"[workers.x]\ncommand = []"])
    ),
)
def test_config_toml(doc, raw):
    import tomli_w

    cfg = Path(os.environ["KMPWM_HOME"]) / "config.toml"
    if raw is not None:
        data = raw
    else:
        try:
            data = tomli_w.dumps(doc).encode()
        except (TypeError, ValueError):
            data = b"workers = 5"
    fd = os.open(cfg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    try:
        r = cli("workers", "--json")
        assert_clean(r, {0, 78})
        if r.rc == 78:
            assert "config.toml" in r.doc()["error"], r
        before = journal_bytes()
        r2 = cli("enqueue", "cfg-fz", "echo", "--policy", "replace", "--json")
        assert_clean(r2, {0, 65, 78})
        assert_journal_intact(before, r2)
    finally:
        cfg.unlink()


# -- enormous inputs, through the real command line ---------------------------------------------


@pytest.fixture
def bhome(kmpwm_home) -> Home:
    home = Home(kmpwm_home)
    home.install_workers()
    return home


def test_input_file_of_100_mb_is_rejected_naming_the_limit(bhome, tmp_path):
    big = tmp_path / "huge.txt"
    with open(big, "wb") as fh:
        fh.truncate(100 * MIB)
    doc, rc, err = bhome.json("enqueue", "huge", "cw", "--input-file", big)
    assert rc == 65 and "1 MiB" in err and "Traceback" not in err, (rc, err)
    assert doc["result"] == "REJECTED_INVALID_PARAMS" and "1 MiB" in doc["error"]
    assert not bhome.journal.exists() or b"huge" not in bhome.journal.read_bytes()


def test_input_string_of_100_mb_on_stdin_is_rejected_naming_the_limit(bhome):
    data = b'{"id":"ok","worker":"cw"}\n{"id":"huge","worker":"cw","input":"' + b"x" * (100 * MIB) + b'"}\n'
    doc, rc, err = bhome.json("enqueue", "--from", "-", input=data, timeout=300)
    assert rc == 65 and "1 MiB" in err and "Traceback" not in err, (rc, err[-500:])
    assert not bhome.journal.exists(), "a rejected batch must write nothing (all or nothing)"


def test_input_limit_is_exactly_1_mib(bhome, tmp_path):
    exact, over = tmp_path / "exact", tmp_path / "over"
    exact.write_bytes(b"y" * MIB)
    over.write_bytes(b"y" * (MIB + 1))
    doc, rc, err = bhome.json("enqueue", "exact", "cw", "--input-file", exact)
    assert rc == 0, err
    doc, rc, err = bhome.json("enqueue", "over", "cw", "--input-file", over)
    assert rc == 65 and "1 MiB" in err
    spec = orjson.dumps({"id": "chain-big", "steps": [[{"worker": "cw", "input": "z" * (2 * MIB)}]]})
    doc, rc, err = bhome.json("chain", "--file", "-", input=spec)
    assert rc == 65 and "1 MiB" in err and doc["result"] == "REJECTED_INVALID_PARAMS", err


def test_a_1000_step_chain_works_in_order(bhome, tmp_path):
    spec = {"id": "long", "steps": [[{"worker": "pw"}] for _ in range(1000)]}
    path = tmp_path / "long.json"
    path.write_bytes(orjson.dumps(spec))
    doc, rc, err = bhome.json("chain", "--file", path)
    assert rc == 0 and len(doc["tasks"]) == 1000, err
    doc, rc, err = bhome.json("run-due", timeout=600)
    assert rc == 0, err
    state, _ = bhome.fold()
    assert all(state["tasks"][f"long/{n}/pw"]["state"] == "SUCCEEDED" for n in range(1, 1001))
    starts, dones, _ = bhome.runs()
    assert len(starts) == 1000
    tally = Tally()
    check_chain_order(state, starts, dones, tally)
    assert not tally.violations, tally.violations[:5]


def test_chain_task_limit_is_10000(bhome, tmp_path):
    at_limit = {"id": "wide", "steps": [[{"worker": "cw"}] * 100 for _ in range(100)]}
    over = {"id": "wider", "steps": at_limit["steps"] + [["cw"]]}
    p1, p2 = tmp_path / "a.json", tmp_path / "b.json"
    p1.write_bytes(orjson.dumps(at_limit))
    p2.write_bytes(orjson.dumps(over))
    doc, rc, err = bhome.json("chain", "--file", p2)
    assert rc == 65 and "10000" in err.replace(",", "") and doc["result"] == "REJECTED_INVALID_PARAMS", err
    assert not bhome.journal.exists()
    doc, rc, err = bhome.json("chain", "--file", p1)
    assert rc == 0 and len(doc["tasks"]) == 10_000, err


def test_id_limit_is_200_characters(bhome):
    doc, rc, err = bhome.json("enqueue", "i" * 200, "cw")
    assert rc == 0, err
    doc, rc, err = bhome.json("enqueue", "i" * 201, "cw")
    assert rc == 65 and "200" in err


def test_limits_are_documented():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for phrase in ("1 MiB", "10,000", "200 characters"):
        assert phrase in readme, f"the README does not document the limit {phrase!r}"


@pytest.mark.parametrize("depth", [251, 252])
def test_deeply_nested_data_is_rejected_or_handled(bhome, depth):
    """A JSON input nested ~250 levels deep, run by the built-in echo worker (which returns it as
    data — and a 300-step echo chain nests its upstream data the same way).  It must be rejected at
    enqueue (65, a documented limit) or handled: run-due exits 0, other tasks' results are kept,
    and the queue stays readable."""
    nested = '{"a":' * depth + "1" + "}" * depth
    doc, rc, err = bhome.json("enqueue", "deep", "echo", "--input", nested)
    if rc == 65:
        return
    assert rc == 0, err
    doc, rc, err = bhome.json("enqueue", "innocent", "cw")
    assert rc == 0
    for _ in range(3):
        doc, rc, err = bhome.json("run-due")
        assert rc == 0 and "internal error" not in err, (
            f"run-due exit {rc} on a task whose worker returned data nested {depth} deep: {err.strip()}"
        )
    state, _ = bhome.fold()
    assert state["tasks"]["innocent"]["state"] == "SUCCEEDED", state["tasks"]["innocent"]["reason"]
    view, rc, err = bhome.json("inspect-queue", "--all")
    assert rc == 0, f"inspect-queue --all --json exit {rc}: {err.strip()}"
