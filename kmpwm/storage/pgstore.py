"""The fleet store: the journal's records in PostgreSQL, shared by many hosts (SPEC section 14).

The same records as the embedded journal, folded by the same fold (``core.state.apply``), so
every command, JSON document and semantic is the journal's.  What the database adds:

* **Order and exclusion.**  A writer takes ``pg_advisory_xact_lock`` (the journal's exclusive
  lock), folds the records after the ones it has seen, decides, and inserts one record in the
  same transaction.  Records get their ``seq`` under that lock, so every reader sees a prefix of
  one order, without a lock of its own.
* **Claims the database refuses twice.**  Every accepted claim inserts a row keyed by the task,
  its generation, the occurrence it consumes, the attempt and the lease it takes over
  (``kmpwm_claims``' primary key).  Two claims of one occurrence from the same starting point can
  never both commit, whatever a runner's fold believed.
* **Leases on the database's clock.**  ``kmpwm_leases`` holds each running claim's end,
  ``now() + KMPWM_LEASE``, renewed by its runner while the run lasts (:meth:`PgStore.renew`).  A
  reader translates each end into its own clock (remaining seconds by the database's clock, added
  to its own ``now``), so hosts whose clocks disagree judge a foreign lease alike.  A holder on the
  reader's own host is still judged by its pid and start token (``scheduling.leases``).
* **Notifications.**  Every record is announced by ``NOTIFY kmpwm`` with its seq and, when it
  is short (PAYLOAD_MAX), the record itself; ``serve`` listens (:class:`PgWatch`), folds the
  records it hears without reading them (:meth:`PgStore.feed`), and claims a task it heard of
  in one statement, ``kmpwm_claim``, which takes the lock and writes only if no record came that
  it did not fold (``transaction(guess=True)``).  Every reading after records were folded unread
  counts them (VERIFY_SQL): one the notifications missed sends the reader back to the snapshot.

psycopg is imported here only: nothing of it loads on the journal's paths.
"""

from __future__ import annotations

import os
import re
import select
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from urllib.parse import urlsplit, urlunsplit

import orjson

from kmpwm.core.exitcodes import ConfigError, JournalError, KmpwmError, LockBusy
from kmpwm.core.state import apply, new_state, pack_task, unpack_task
from kmpwm.storage.paths import Paths, check_all
from kmpwm.storage.store import OptimisticMiss, Transaction, View

SCHEMA_VERSION = 5
LOCK_KEY = 0x6B6D7077  # "kmpw": the advisory lock every writer takes
CHANNEL = "kmpwm"
SNAPSHOT_AFTER_RECORDS = 2000
DEFAULT_LEASE = 60.0
REBASE_EVERY = 60.0  # a long-lived reader looks for a newer snapshot at most this often (rebase)
OUTPUT_CAP = 1 << 20  # a run's output kept in the store: its last MiB (runlog.CAP)

# Reading: the records after what was folded, and each lease's time left by the database's clock
# (record rows have a seq, lease rows none; both in one round trip and from one snapshot).
RECORDS_SQL = "SELECT seq, body, NULL::text, NULL::text, NULL::float8 FROM kmpwm_records WHERE seq > %s"
LEASES_SQL = (
    "SELECT NULL::bigint, NULL::bytea, task_id, runner, extract(epoch FROM expires_at - now())::float8 "
    "FROM kmpwm_leases"
)
# The check a reading makes when records were folded since the last one without being read
# (heard in notifications, see PgStore.feed): how many records there are in that range (seq -1).
VERIFY_SQL = (
    "SELECT -1::bigint, NULL::bytea, NULL::text, NULL::text, count(*)::float8 FROM kmpwm_records "
    "WHERE seq > %s AND seq <= %s"
)
# A record's notification, sent at commit to serve and wait: its seq and, when it is this short,
# the record itself, so that a serve folds it without reading it (PgStore.feed).  Kept short: the
# server's notification queue holds every payload until the slowest listener has taken it.
PAYLOAD_MAX = 2000
_NOTIFY = (
    f"pg_notify('{CHANNEL}', r.seq::text || CASE WHEN octet_length(r.body) <= {PAYLOAD_MAX} "
    "THEN ' ' || convert_from(r.body, 'UTF8') ELSE '' END)"
)
_RECORD = "r AS (INSERT INTO kmpwm_records (host, body) VALUES (%s, %s) RETURNING seq, body)"
# A record, its seq back and its notification, in one round trip.
INSERT_SQL = f"WITH {_RECORD} SELECT r.seq, {_NOTIFY} FROM r"
# The accepted claims of one record and their leases, in one statement: a claim the primary key
# refuses takes no lease and is missing from what it returns.
_CLAIMS = (
    "c AS (INSERT INTO kmpwm_claims (task_id, task_seq, occ, attempt, taken_from, runner) "
    "SELECT * FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::text[], %s::text[], %s::text[]) "
    "ON CONFLICT DO NOTHING RETURNING task_id, runner)"
)
_LEASES = (
    "INSERT INTO kmpwm_leases (task_id, runner, expires_at) "
    "SELECT task_id, runner, now() + make_interval(secs => %s) FROM c "
    "ON CONFLICT (task_id, runner) DO UPDATE SET expires_at = excluded.expires_at "
    "RETURNING task_id"
)
CLAIMS_SQL = f"WITH {_CLAIMS} {_LEASES}"
# The leases that results end.
ENDS_SQL = (
    "DELETE FROM kmpwm_leases l USING unnest(%s::text[], %s::text[]) AS u(task_id, runner) "
    "WHERE l.task_id = u.task_id AND l.runner = u.runner"
)
# run-due's and serve's usual record: results, then claims.  The record, the leases its results
# end, its claims and their leases in one round trip, when no lease is both ended and taken by it
# (then no row is touched twice in the statement); its seq, and the tasks whose claims were taken.
# A claim refused makes the statement fail (so that a COMMIT sent with it in one pipeline is never
# run): the text naming the refused tasks is cast to int (the error carries it; REFUSED finds it).
REFUSED = "kmpwm refused claims: "
_GUARD = (
    "(SELECT CASE WHEN count(*) = cardinality(%s::text[]) THEN 0 ELSE "
    f"('{REFUSED}' || array_to_string(ARRAY(SELECT t FROM unnest(%s::text[]) t "
    "EXCEPT SELECT task_id FROM l), ' '))::int END FROM l)"
)
RECORD_ENDS_CLAIMS_SQL = (
    f"WITH {_RECORD}, e AS ({ENDS_SQL} RETURNING 1), {_CLAIMS}, l AS ({_LEASES}) "
    f"SELECT r.seq, {_NOTIFY}, ARRAY(SELECT task_id FROM l), {_GUARD} FROM r"
)
RECORD_CLAIMS_SQL = (
    f"WITH {_RECORD}, {_CLAIMS}, l AS ({_LEASES}) "
    f"SELECT r.seq, {_NOTIFY}, ARRAY(SELECT task_id FROM l), {_GUARD} FROM r"
)
RECORD_ENDS_SQL = f"WITH {_RECORD}, e AS ({ENDS_SQL} RETURNING 1) SELECT r.seq, {_NOTIFY} FROM r"
# An optimistic transaction's claims (PgStore._guessing), one statement in a transaction of its
# own: kmpwm_claim (schema version 5) takes the lock, checks that the records after the last
# reading are the ones folded since, no more, and writes the record, its claims and their leases;
# it returns the record's seq, or, having written nothing, -1 - how many records there are up to
# what was folded (not an error: a serve that lost a race to another host leaves no line in the
# server's log).
# (The claims are one JSON array of [task_id, task_seq, occ, attempt, taken_from, runner] rows: a
# string costs the client less to send than six arrays.)
CLAIM_SQL = "SELECT kmpwm_claim(%s, %s, %s, %s, %s, %s, %s::jsonb, %s)"
_CLAIM_FUNCTION = f"""CREATE OR REPLACE FUNCTION kmpwm_claim(
    lock_ms text, upto bigint, since bigint, unread bigint, w_host text, w_body bytea, claims jsonb, lease float8)
RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
    n bigint;
    m bigint;
    s bigint;
    ids text[] := ARRAY(SELECT e->>0 FROM jsonb_array_elements(claims) e);
    got text[];
BEGIN
    PERFORM set_config('lock_timeout', lock_ms, true);
    PERFORM pg_advisory_xact_lock({LOCK_KEY});
    PERFORM set_config('lock_timeout', '0', true);
    -- (each statement here sees what committed before it: the records written while we waited)
    SELECT count(*), count(*) FILTER (WHERE r.seq <= upto) INTO n, m FROM kmpwm_records r WHERE r.seq > since;
    IF n <> unread THEN
        RETURN -1 - m;
    END IF;
    INSERT INTO kmpwm_records (host, body) VALUES (w_host, w_body) RETURNING kmpwm_records.seq INTO s;
    PERFORM pg_notify('{CHANNEL}', s::text || CASE WHEN octet_length(w_body) <= {PAYLOAD_MAX}
                                           THEN ' ' || convert_from(w_body, 'UTF8') ELSE '' END);
    WITH c AS (
        INSERT INTO kmpwm_claims (task_id, task_seq, occ, attempt, taken_from, runner)
        SELECT e->>0, (e->>1)::bigint, e->>2, e->>3, e->>4, e->>5 FROM jsonb_array_elements(claims) e
        ON CONFLICT DO NOTHING RETURNING task_id, runner),
    l AS (
        INSERT INTO kmpwm_leases (task_id, runner, expires_at)
        SELECT c.task_id, c.runner, now() + make_interval(secs => lease) FROM c
        ON CONFLICT (task_id, runner) DO UPDATE SET expires_at = excluded.expires_at
        RETURNING kmpwm_leases.task_id)
    SELECT array_agg(l.task_id) INTO got FROM l;
    IF coalesce(cardinality(got), 0) <> cardinality(ids) THEN
        RAISE EXCEPTION '{REFUSED}%', array_to_string(ARRAY(SELECT unnest(ids) EXCEPT SELECT unnest(got)), ' ');
    END IF;
    RETURN s;
END
$fn$"""

# A transaction's start after BEGIN, in one statement: the writers' lock, waiting at most lock_ms,
# then the reading (RECORDS_SQL, LEASES_SQL, VERIFY_SQL as the arguments ask), which sees every
# record committed before the lock was had.  (The client then sends two statements, not five.)
BEGIN_SQL = "SELECT * FROM kmpwm_begin(%s, %s, %s, %s)"
_BEGIN_FUNCTION = f"""CREATE OR REPLACE FUNCTION kmpwm_begin(lock_ms text, after bigint, leases boolean, since bigint)
RETURNS TABLE (o_seq bigint, o_body bytea, o_task text, o_runner text, o_left float8)
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM set_config('lock_timeout', lock_ms, true);
    PERFORM pg_advisory_xact_lock({LOCK_KEY});
    PERFORM set_config('lock_timeout', '0', true);
    IF after IS NOT NULL THEN
        RETURN QUERY SELECT r.seq, r.body, NULL::text, NULL::text, NULL::float8 FROM kmpwm_records r
            WHERE r.seq > after;
    END IF;
    IF leases THEN
        RETURN QUERY SELECT NULL::bigint, NULL::bytea, l.task_id, l.runner,
            extract(epoch FROM l.expires_at - now())::float8 FROM kmpwm_leases l;
    END IF;
    IF since IS NOT NULL THEN
        RETURN QUERY SELECT -1::bigint, NULL::bytea, NULL::text, NULL::text, count(*)::float8
            FROM kmpwm_records r WHERE r.seq > since AND r.seq <= after;
    END IF;
END
$fn$"""

# Each version's statements, applied in order inside one transaction (under the writers' lock).
MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE IF NOT EXISTS kmpwm_meta (key text PRIMARY KEY, value text NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS kmpwm_records (
               seq bigserial PRIMARY KEY,
               written_at timestamptz NOT NULL DEFAULT now(),
               host text NOT NULL DEFAULT '',
               body bytea NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS kmpwm_snapshot (
               id int PRIMARY KEY CHECK (id = 1),
               seq bigint NOT NULL,
               body bytea NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS kmpwm_claims (
               task_id text NOT NULL,
               task_seq bigint NOT NULL,
               occ text NOT NULL,
               attempt text NOT NULL,
               taken_from text NOT NULL,
               runner text NOT NULL,
               claimed_at timestamptz NOT NULL DEFAULT now(),
               PRIMARY KEY (task_id, task_seq, occ, attempt, taken_from))""",
        """CREATE TABLE IF NOT EXISTS kmpwm_leases (
               task_id text NOT NULL,
               runner text NOT NULL,
               expires_at timestamptz NOT NULL,
               PRIMARY KEY (task_id, runner))""",
        """CREATE INDEX IF NOT EXISTS kmpwm_leases_runner ON kmpwm_leases (runner)""",
    ],
    # the hosts that ran work here, and when last (doctor lists them)
    2: [
        """CREATE TABLE IF NOT EXISTS kmpwm_hosts (
               host text PRIMARY KEY,
               last_seen timestamptz NOT NULL DEFAULT now(),
               runner text NOT NULL DEFAULT '')""",
    ],
    # every finished run's output (kmpwm logs on any host), with its place in the run history
    3: [
        """CREATE TABLE IF NOT EXISTS kmpwm_runs (
               task_id text NOT NULL,
               key text NOT NULL,
               run int NOT NULL,
               host text NOT NULL,
               attempt int,
               started double precision NOT NULL,
               finished double precision,
               status text,
               truncated boolean NOT NULL DEFAULT false,
               output bytea NOT NULL,
               PRIMARY KEY (task_id, key))""",
    ],
    # a running run's output as it comes (kmpwm logs --follow on any host): bytes written so far
    4: [
        """ALTER TABLE kmpwm_runs ADD COLUMN IF NOT EXISTS written bigint NOT NULL DEFAULT 0""",
    ],
    # serve's optimistic claims, in one statement (CLAIM_SQL); the lock and a transaction's
    # reading in one statement (BEGIN_SQL)
    5: [_CLAIM_FUNCTION, _BEGIN_FUNCTION],
}


def mask(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for every message and document)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unreadable URL>"
    query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
    return urlunsplit((parts.scheme, _mask_netloc(parts.netloc), parts.path, query, parts.fragment))


def _mask_netloc(netloc: str) -> str:
    """``user:password@host`` as ``user:***@host``."""
    if "@" not in netloc:
        return netloc
    cred, host = netloc.rsplit("@", 1)
    if ":" in cred:
        cred = cred.split(":", 1)[0] + ":***"
    return f"{cred}@{host}"


def check_url(url: str) -> str:
    """A libpq URL kmpwm accepts (exit 78 otherwise); returns it unchanged."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ConfigError(f"malformed store URL {mask(url)}: {exc}") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"unsupported store URL {mask(url)}: expected postgresql://... (or nothing: the journal)")
    if any(ord(c) < 32 for c in url):
        raise ConfigError("malformed store URL: it contains control characters")
    return url


def lease_seconds() -> float:
    """``KMPWM_LEASE``: how long a lease in a shared store lasts without a renewal (default 60s)."""
    raw = os.environ.get("KMPWM_LEASE")
    if not raw:
        return DEFAULT_LEASE
    from kmpwm.core.timeparse import parse_duration

    try:
        value = parse_duration(raw, what="KMPWM_LEASE")
    except KmpwmError as exc:
        raise ConfigError(str(exc)) from None
    if not 5 <= value <= 86400:
        raise ConfigError(f"KMPWM_LEASE={raw!r}: expected a duration between 5s and 1d")
    return value


def _pgpass_check() -> None:
    """A ``.pgpass`` (PGPASSFILE or ~/.pgpass) readable by others is refused (exit 77), as the
    journal directory is: libpq itself would only warn and ignore it."""
    path = os.environ.get("PGPASSFILE") or os.path.expanduser("~/.pgpass")
    try:
        st = os.stat(path)
    except OSError:
        return
    if st.st_mode & 0o077:
        from kmpwm.core.exitcodes import InsecurePermissions

        raise InsecurePermissions(
            f"{path} is readable or writable by others (mode {st.st_mode & 0o777:04o}); chmod 600 it"
        )


class _Psycopg:
    """psycopg, imported on first use, with a clear line when it is not installed."""

    mod = None

    @classmethod
    def get(cls):
        if cls.mod is None:
            try:
                import psycopg
            except ImportError:
                raise ConfigError(
                    "the store is PostgreSQL but psycopg is not installed",
                    hint="pip install 'kmpwm[postgresql]'",
                ) from None
            cls.mod = psycopg
        return cls.mod


def _side_steps(pre: list) -> list:
    """A record's side rows, grouped in order: ("claims", [(op, key)...]) of distinct tasks,
    ("ends", [(id, runner)...]) of results, ("release", op)."""
    steps: list = []
    for op, before in pre:
        side = _side_row(op, before)
        if side is None:
            continue
        kind, row = side
        if kind == "release":
            steps.append(side)
        elif _joins_last(steps, kind, row):
            steps[-1][1].append(row)
        else:
            steps.append((kind, [row]))
    return steps


def _side_row(op: dict, before) -> tuple[str, object] | None:
    """The side step one op needs and its row: an accepted claim, a release or a result of a
    runner; None: none."""
    kind = op.get("op")
    if kind == "claim" and before is not None:
        return "claims", (op, before)
    if not op.get("runner"):
        return None
    if kind == "release":
        return "release", op
    if kind == "result":
        return "ends", (op["id"], op["runner"])
    return None


def _joins_last(steps: list, kind: str, row) -> bool:
    """Whether ``row`` joins the last step: one of its kind (claims: of other tasks only)."""
    if not steps or steps[-1][0] != kind:
        return False
    return kind != "claims" or all(op["id"] != row[0]["id"] for op, _ in steps[-1][1])


def _next_step(steps: list, kind: str) -> list | None:
    """The rows of the first side step if it is of ``kind`` (taken off ``steps``), else None."""
    if steps and steps[0][0] == kind:
        return steps.pop(0)[1]
    return None


def _retakes(ends: list | None, steps: list) -> bool:
    """Whether the claims that come next in ``steps`` take over a lease ``ends`` ends (then they
    cannot share its statement: no row may be touched twice in one)."""
    if not ends or not steps or steps[0][0] != "claims":
        return False
    return bool(set(ends) & {(op["id"], op["runner"]) for op, _ in steps[0][1]})


def _end_cols(ends: list) -> tuple[list, list]:
    """The task ids and runners of ended leases, as the columns unnest takes."""
    return [e[0] for e in ends], [e[1] for e in ends]


def _record_rows(rows: list) -> list[tuple[int, bytes]]:
    """(seq, body) of a reading's record rows (those with a seq), in seq order."""
    return sorted((r[0], r[1]) for r in rows if r[0] is not None and r[0] >= 0)


def _counted(rows: list) -> int:
    """The count of a reading's VERIFY_SQL row (seq -1)."""
    return next(int(r[4]) for r in rows if r[0] == -1)


def _lease_left(rows: list) -> dict:
    """Seconds left per (task, runner), from a reading's lease rows (those without a seq)."""
    return {(r[2], r[3]): r[4] for r in rows if r[0] is None}


def _lease_holders(state: dict) -> list[tuple[str, dict]]:
    """(task id, lease) of every running task's lease and of every fence (a cancelled run still
    stopping): what a foreign lease's end is written into."""
    tasks = state["tasks"].values()
    running = [(t["id"], t["lease"]) for t in tasks if t["state"] == "RUNNING" and t.get("lease")]
    return running + list((state.get("fences") or {}).items())


def _take_notifications(pg) -> list[int]:
    """The backend pids of the notifications waiting on the libpq connection ``pg`` (taken)."""
    pids = []
    while (n := pg.notifies()) is not None:
        pids.append(n.be_pid)
    return pids


def _carried(payload: bytes) -> tuple[int | None, bytes | None]:
    """(seq, record) of a notification's payload (_NOTIFY): record None when it was too long to
    be carried; seq None when there is none (a writer of an older kmpwm)."""
    seq, _, body = payload.partition(b" ")
    return (int(seq) if seq.isdigit() else None), (body or None)


def _dead(conn) -> bool:
    """Whether a connection closed or broke (no connection: False)."""
    return conn is not None and (conn.closed or conn.broken)


def _lock_sql(timeout: float) -> str:
    """The statements that take the writers' lock, waiting at most ``timeout`` seconds for it."""
    return (
        f"SET LOCAL lock_timeout = '{max(1, int(timeout * 1000))}ms'; "
        f"SELECT pg_advisory_xact_lock({int(LOCK_KEY)}); SET LOCAL lock_timeout = 0"
    )


def _busy(timeout: float) -> LockBusy:
    return LockBusy(f"another kmpwm process has held the store's lock for {timeout:g}s", hint="try again")


# The statement that inserts a record, by whether it also ends leases and takes claims.
_RECORD_SQL = {
    (False, False): INSERT_SQL,
    (True, False): RECORD_ENDS_SQL,
    (False, True): RECORD_CLAIMS_SQL,
    (True, True): RECORD_ENDS_CLAIMS_SQL,
}


class PgStore:
    """The store of a PostgreSQL database; the same interface as ``storage.store.Store``."""

    kind = "postgresql"

    def __init__(self, paths: Paths, url: str):
        self.paths = paths
        self.url = check_url(url)
        self._conn = None
        self._view: View | None = None
        self._tail = 0  # records folded since the snapshot we started from
        self._checked = False
        self._lease = None
        self._in_txn = 0
        self._committed = False  # the open transaction's last write committed it (_insert)
        self._read_ahead = None  # (offset, rows, with leases): the reading sent with a transaction's BEGIN
        self._leases_wanted = False  # tasks were running (or fenced) at the last reading
        self._listening = None  # the connection that listens for other sessions' writes (unchanged_view)
        self._heard_other = True  # another session notified a write since our last reading
        self.host = None
        self.forget_history = False  # a long-lived reader (serve): hold what a fresh reader would read
        self._base_seq = 0  # the snapshot our state grew from (rebase)
        self._rebase_checked = float("-inf")  # when rebase last asked for the snapshot's seq
        # serve's notifications, carrying records (feed): the state follows them without reading
        self.follow_notifications = False  # set by serve: keep what the watch hears (feed)
        self._feed: list[tuple[int | None, bytes | None]] | None = None  # heard, in commit order
        self._feed_live = False  # the watch has listened since before the last reading
        self._read_at = 0  # the offset the last reading of records brought the state to
        self._unread = 0  # records folded since then without reading them (heard, or our own)
        self._heard_unread = False  # some of them heard: the next reading counts them (VERIFY_SQL)

    # -- the connection -------------------------------------------------------------------

    def describe(self) -> str:
        return mask(self.url)

    def _error(self, exc: Exception, doing: str) -> JournalError:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return JournalError(
            f"the store {mask(self.url)}: {doing} failed: {msg.replace(self.url, mask(self.url))}",
            hint="check that the server is up and the URL, user and database are right (kmpwm doctor)",
        )

    def conn(self):
        if self._conn is not None and not self._conn.closed:
            return self._conn
        psycopg = _Psycopg.get()
        if not self._checked:
            check_all(self.paths)
            _pgpass_check()
            self._checked = True
        self._conn = self._connect(psycopg)
        self._migrate()
        return self._conn

    def _connect(self, psycopg):
        try:
            # A statement run a second time is prepared (serve and run-due run the same few for
            # every claim and result; the server then neither parses nor plans them again).  The
            # multi-statement strings cannot be prepared: they say prepare=False.
            return psycopg.connect(
                self.url, autocommit=True, connect_timeout=10, application_name="kmpwm", prepare_threshold=1
            )
        except psycopg.ProgrammingError as exc:  # a URL libpq cannot parse
            raise ConfigError(f"malformed store URL {mask(self.url)}: {str(exc).splitlines()[0]}") from None
        except psycopg.Error as exc:
            raise self._error(exc, "connecting") from None

    def close(self) -> None:
        if self._conn is not None:
            with suppress(Exception):  # closing a broken connection may fail; nothing to keep
                self._conn.close()
            self._conn = None

    def _execute(self, sql: str, params=(), doing: str = "a statement"):
        """One statement; outside a transaction, a connection that broke (the server restarted,
        an administrator ended it) is made anew once, and the statement tried again."""
        psycopg = _Psycopg.get()
        for attempt in (1, 2):
            try:
                return self.conn().execute(sql, params)
            except psycopg.Error as exc:
                broken = _dead(self._conn)
                self._drop_broken()
                if not (broken and attempt == 1 and not self._in_txn):
                    raise self._error(exc, doing) from None

    def _drop_broken(self) -> None:
        if _dead(self._conn):
            self._conn = None

    def schema_version(self) -> int | None:
        row = self._conn.execute("SELECT to_regclass('kmpwm_meta') IS NOT NULL").fetchone()
        if not row[0]:
            return None
        row = self._conn.execute("SELECT value FROM kmpwm_meta WHERE key = 'schema'").fetchone()
        return int(row[0]) if row else None

    def _migrate(self) -> None:
        psycopg = _Psycopg.get()
        conn = self._conn
        try:
            version = self.schema_version()
            if version == SCHEMA_VERSION:
                return
            if version is not None and version > SCHEMA_VERSION:
                raise ConfigError(
                    f"the store {mask(self.url)} has schema version {version}, newer than this kmpwm knows "
                    f"({SCHEMA_VERSION})",
                    hint="upgrade kmpwm on this host",
                )
            self._apply_migrations(conn)
        except psycopg.Error as exc:
            self._drop_broken()
            raise self._error(exc, "creating or migrating the schema") from None

    def _apply_migrations(self, conn) -> None:
        """The migrations after the schema's version, in one transaction under the writers' lock."""
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            version = self.schema_version() or 0  # another host may have migrated meanwhile
            for v in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[v]:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO kmpwm_meta (key, value) VALUES ('schema', %s) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (str(v),),
                )

    # -- reading --------------------------------------------------------------------------

    def exists(self) -> bool:
        return True

    def load(self, full: bool = True) -> View:
        """The current state: the snapshot (first time) and the records after what was folded;
        for serve, the records its notifications carried, without a round trip, when no task
        runs (a reading also brings the leases' ends)."""
        view = self._view
        if view is not None and not self._in_txn and self._fold_heard() and not _lease_holders(view.state):
            self._leases_wanted = False
        else:
            view = self._read(view)
        if self._tail >= SNAPSHOT_AFTER_RECORDS and not self._in_txn:
            self.write_snapshot(view)
        return view

    def refresh(self) -> View:
        """The state brought up to date by a reading now (not by what was heard)."""
        return self._read(self._view)

    def _read(self, view: View | None) -> View:
        """The state brought up to date by a reading (from the snapshot when ``view`` is None)."""
        if view is None:
            view = self._read_snapshot()
            if view.from_snapshot:
                self._base_seq = view.offset
            self._tail = 0
            self._unread, self._heard_unread = 0, False
        rows, with_leases, unread = self._reading(view.offset)
        if unread is not None and _counted(rows) != unread:
            # The notifications folded since the last reading missed a record (they never
            # should): start again from the snapshot rather than build on a state missing it.
            self._view = None
            return self._read(None)
        self._fold_new(view, _record_rows(rows))
        self._view = view
        self._read_at, self._unread, self._heard_unread = view.offset, 0, False
        if self._feed:
            self._feed.clear()  # (heard before the reading began: the reading covered it)
        self._overlay_leases(view, _lease_left(rows) if with_leases else None)
        return view

    def _read_snapshot(self) -> View:
        """The snapshot's state (a new state if there is none or it cannot be read)."""
        row = self._execute("SELECT seq, body FROM kmpwm_snapshot WHERE id = 1", doing="reading the snapshot")
        row = row.fetchone()
        if row is None:
            return View(new_state())
        try:
            state = orjson.loads(row[1])
            state["tasks"] = {i: unpack_task(t) for i, t in state["tasks"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            return View(new_state())
        return View(state, offset=row[0], from_snapshot=True)

    def _reading(self, offset: int) -> tuple[list, bool, int | None]:
        """The rows of the records after ``offset`` (and of the leases, if the bool says so; and
        the count of the records folded unread, when the int says how many there should be): the
        reading sent with this transaction's BEGIN, or a new one."""
        ahead, self._read_ahead = self._read_ahead, None
        if ahead is not None and ahead[0] == offset:
            return ahead[1:]
        sql, params, with_leases, unread = self._read_statement(offset)
        self._heard_other = False  # a write heard from now on may be after this reading
        rows = self._execute(sql, params, doing="reading records").fetchall()
        return rows, with_leases, unread

    def _read_wants(self) -> tuple[bool, int | None]:
        """What a reading about to start reads besides the records: the leases, when tasks were
        running at the last reading; the count of the records folded unread since it
        (VERIFY_SQL), when some were heard (int: how many there should be).  What the watch hears
        from now on completes it (the feed is live)."""
        if self._feed is not None:
            self._feed_live = True
        return self._leases_wanted, self._unread if self._heard_unread else None

    def _read_statement(self, offset: int) -> tuple[str, tuple, bool, int | None]:
        """A lock-free reading's statement and parameters (_read_wants)."""
        with_leases, unread = self._read_wants()
        sql = RECORDS_SQL
        params: tuple = (offset,)
        if with_leases:
            sql = f"{sql} UNION ALL {LEASES_SQL}"
        if unread is not None:
            sql = f"{sql} UNION ALL {VERIFY_SQL}"
            params += (self._read_at, offset)
        return sql, params, with_leases, unread

    def _fold_new(self, view: View, records: list) -> None:
        state = view.state
        for seq, body in records:
            apply(state, orjson.loads(body))
            view.offset = seq
            self._tail += 1

    def _overlay_leases(self, view: View, left: dict | None) -> None:
        """Each foreign running lease's end, by the database's clock, on this host's clock
        (``left``: seconds left per (task, runner), read with the records; None: not read)."""
        holders = _lease_holders(view.state)
        self._leases_wanted = bool(holders)
        if not holders:
            return
        if left is None:
            left = _lease_left(self._execute(LEASES_SQL, doing="reading leases").fetchall())
        now = time.time()
        for tid, lease in holders:
            lease["until"] = now + left.get((tid, lease.get("runner")), -1.0)

    def unchanged_view(self) -> View | None:
        """The cached view, without a round trip, when no other session has written since it was
        read: this store's connection listens (``LISTEN kmpwm``, from the first call on) and has
        heard no notification from another backend since its last reading (a write notifies when
        it commits, and an idle listener is told at once).  None: read (``load``).  Lease ends
        are as of the last reading (renewals do not notify): for checks of the records only.
        A store that follows serve's watch (feed) has heard every record already: the view
        brought up to date by them, without a listener of its own."""
        conn = self._conn
        if self._view is None or conn is None or _dead(conn) or self._in_txn:
            return None
        if self.follow_notifications:
            return self._view if self._fold_heard() else None
        if self._listening is not conn:
            self._listen(conn)  # not listening before: read once more
            return None
        if self._stirred():  # the server ending the connection: let the reading find out
            return None
        return None if self._heard_other else self._view

    def _listen(self, conn) -> None:
        """Listen for other sessions' writes on ``conn`` (a connection that broke is dropped)."""
        psycopg = _Psycopg.get()
        try:
            conn.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error:
            self._drop_broken()
            return
        conn.add_notify_handler(self._notified)
        self._listening = conn
        self._heard_other = True

    def _notified(self, n) -> None:
        """A notification psycopg received while reading a result (ours are ignored)."""
        conn = self._listening
        if conn is None or conn.closed or n.pid != conn.info.backend_pid:
            self._heard_other = True

    # -- the records serve hears (notifications that carry them) ---------------------------

    def feed_start(self) -> None:
        """The watch (re)connected and listens: what it hears from now on is kept, and counts
        once a reading has started after this (what was committed before, the reading reads)."""
        self._feed = [] if self.follow_notifications else None
        self._feed_live = False

    def feed_lost(self) -> None:
        """The watch lost its connection: what comes until it listens again is not heard."""
        self._feed, self._feed_live = None, False

    def feed(self, heard: list[tuple[int | None, bytes | None]]) -> None:
        """Records the watch heard: (seq, body) each, in commit order; body None: too long to be
        carried; seq None: a notification without one (a writer of an older kmpwm)."""
        if self._feed is not None:
            self._feed.extend(heard)

    def _fold_heard(self) -> bool:
        """Fold the records heard since the state's last record; False (nothing folded) when the
        feed cannot bring the state up to date: it is not kept or not live, or a record heard is
        not carried (then a reading is needed)."""
        feed, view = self._feed, self._view
        if feed is None or not self._feed_live or view is None:
            return False
        new = [(seq, body) for seq, body in feed if seq is None or seq > view.offset]
        if any(seq is None or body is None for seq, body in new):
            return False
        feed.clear()
        state = view.state
        for seq, body in new:
            if seq <= view.offset:
                continue  # (one connection hears in commit order: never; a guard all the same)
            apply(state, orjson.loads(body))
            view.offset = seq
            self._tail += 1
            self._unread += 1
            self._heard_unread = True
        return True

    def news_since(self, position: tuple[int, int] | None) -> bool:
        """Did the watch hear (or the state fold) a record after ``position`` (a plan's)?  True
        when it cannot tell: serve plans again."""
        view, feed = self._view, self._feed
        if position is None or view is None or feed is None or not self._feed_live:
            return True
        return view.offset > position[1] or any(seq is None or seq > position[1] for seq, _ in feed)

    def records(self, after: int = 0) -> Iterator[tuple[int, dict]]:
        """Every record after ``after`` (events, store copy), oldest first."""
        cur = self._execute(
            "SELECT seq, body FROM kmpwm_records WHERE seq > %s ORDER BY seq", (after,), doing="reading records"
        )
        for seq, body in cur:
            yield seq, orjson.loads(body)

    def position(self) -> tuple[int, int] | None:
        """(0, the last record folded into the cached state); None before the first load."""
        return None if self._view is None else (0, self._view.offset)

    def idle_without_loading(self, now: float) -> bool:
        return False

    def unmentioned(self, ids: list[str]) -> bool:
        return False

    def verify_covered(self, view) -> None:
        return None

    def invalidate(self) -> None:
        self._view = None

    def write_snapshot(self, view: View | None = None, retention: float | None = None) -> bool:
        """The state as of ``view`` (default: now), without the work that finished before the
        retention window (compaction.RETENTION): what every reader starts from."""
        from kmpwm.storage.compaction import RETENTION, trimmed

        view = view or self.load(full=False)
        state = trimmed(view.state, time.time() - (RETENTION if retention is None else retention))
        hot = dict(state)
        hot["tasks"] = {i: pack_task(t) for i, t in state["tasks"].items()}
        body = orjson.dumps(hot)
        self._execute(
            "INSERT INTO kmpwm_snapshot (id, seq, body) VALUES (1, %s, %s) "
            "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, body = excluded.body "
            "WHERE kmpwm_snapshot.seq < excluded.seq",
            (view.offset, body),
            doing="writing the snapshot",
        )
        self._tail = 0
        if self.forget_history and view is self._view and state is not view.state and not self._in_txn:
            view.state = state  # serve: what it ran long ago is not kept in memory
            self._base_seq = view.offset
        return True

    def rebase(self) -> bool:
        """For a long-lived reader (serve), between transactions: when another process wrote a
        snapshot past the one our state grew from (a compaction leaves finished work out of it),
        drop our state; the next load reads that snapshot and the records after it."""
        view = self._view
        now = time.monotonic()
        if view is None or self._in_txn or now - self._rebase_checked < REBASE_EVERY:
            return False  # (serve asks each time it falls idle: a round trip at most this often)
        self._rebase_checked = now
        try:
            row = self._execute("SELECT seq FROM kmpwm_snapshot WHERE id = 1", doing="reading the snapshot").fetchone()
        except JournalError:
            return False  # the store is away: the next reading says so
        if row is None or row[0] <= self._base_seq or row[0] > view.offset:
            return False
        self._view = None
        return True

    def drop_snapshot(self) -> None:
        self._execute("DELETE FROM kmpwm_snapshot", doing="dropping the snapshot")

    def watch(self) -> PgWatch:
        """serve's change notification: LISTEN on a connection of its own."""
        return PgWatch(self)

    # -- leases ---------------------------------------------------------------------------

    def lease(self) -> float:
        if self._lease is None:
            self._lease = lease_seconds()
        return self._lease

    def note_runner(self, host: str, runner: str) -> None:
        """A runner of ``host`` starts (doctor's list of hosts)."""
        self._execute(
            "INSERT INTO kmpwm_hosts (host, runner) VALUES (%s, %s) "
            "ON CONFLICT (host) DO UPDATE SET last_seen = now(), runner = excluded.runner",
            (host, runner),
            doing="noting this host",
        )

    def hosts(self) -> list[dict]:
        rows = self._execute(
            "SELECT host, extract(epoch FROM now() - last_seen), runner FROM kmpwm_hosts ORDER BY host",
            doing="listing hosts",
        ).fetchall()
        return [{"host": h, "seen_ago_s": round(float(a), 1), "runner": r} for h, a, r in rows]

    # -- run output -------------------------------------------------------------------------

    _RUN_NO = "coalesce((SELECT max(run) FROM kmpwm_runs WHERE task_id = %s), 0) + 1"

    def start_runs(self, rows: list[tuple]) -> None:
        """Runs that started: (task_id, key, host, attempt, started) each; numbered per task in
        the order they reach the store (one task's runs never overlap)."""
        self._many(
            "INSERT INTO kmpwm_runs (task_id, key, run, host, attempt, started, status, output) "
            f"VALUES (%s, %s, {self._RUN_NO}, %s, %s, %s, 'RUNNING', '') ON CONFLICT (task_id, key) DO NOTHING",
            [(t, k, t, h, a, st) for t, k, h, a, st in rows],
            "keeping run starts",
        )

    def save_runs(self, rows: list[tuple]) -> None:
        """Finished runs and their output: (task_id, key, host, attempt, started, finished,
        status, truncated, output, bytes written) each."""
        self._many(
            "INSERT INTO kmpwm_runs "
            "(task_id, key, run, host, attempt, started, finished, status, truncated, output, written) "
            f"VALUES (%s, %s, {self._RUN_NO}, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (task_id, key) DO UPDATE SET "
            "finished = excluded.finished, status = excluded.status, truncated = excluded.truncated, "
            "output = excluded.output, written = excluded.written",
            [(r[0], r[1], r[0], *r[2:]) for r in rows],
            "keeping run output",
        )

    def append_output(self, rows: list[tuple]) -> None:
        """Running runs' new output: (bytes, bytes written so far, task_id, key) each; the
        table keeps the last OUTPUT_CAP bytes."""
        self._many(
            "UPDATE kmpwm_runs SET written = %s, output = substring(output || %s FROM "
            f"greatest(1, octet_length(output) + octet_length(%s) - {OUTPUT_CAP} + 1)) "
            "WHERE task_id = %s AND key = %s AND status = 'RUNNING'",
            [(total, chunk, chunk, tid, key) for chunk, total, tid, key in rows],
            "sending run output",
        )

    def run_tail(self, task_id: str, key: str, seen: int) -> tuple[str | None, int, bytes]:
        """(the run's status, bytes it has written, those after the first ``seen`` that the
        table still has); status None: no such run."""
        row = self._execute(
            "SELECT status, written, "
            "substring(output FROM greatest(1, octet_length(output) - (written - %s) + 1)::int) "
            "FROM kmpwm_runs WHERE task_id = %s AND key = %s",
            (seen, task_id, key),
            doing="reading output",
        ).fetchone()
        if row is None:
            return None, seen, b""
        return row[0], row[1], bytes(row[2]) if row[1] > seen else b""

    def _many(self, sql: str, rows: list, doing: str) -> None:
        psycopg = _Psycopg.get()
        try:
            with self.conn().cursor() as cur:
                cur.executemany(sql, rows)
        except psycopg.Error as exc:
            self._drop_broken()
            raise self._error(exc, doing) from None

    def runs(self, task_id: str) -> list[dict]:
        rows = self._execute(
            "SELECT key, run, host, attempt, started, finished, status, truncated FROM kmpwm_runs "
            "WHERE task_id = %s ORDER BY run",
            (task_id,),
            doing="reading runs",
        ).fetchall()
        keys = ("key", "run", "host", "attempt", "started", "finished", "status", "truncated")
        return [dict(zip(keys, r)) for r in rows]

    def run_output(self, task_id: str, key: str) -> bytes:
        row = self._execute(
            "SELECT output FROM kmpwm_runs WHERE task_id = %s AND key = %s", (task_id, key), doing="reading output"
        ).fetchone()
        return bytes(row[0]) if row else b""

    def sweep_runs(self, cutoff: float, keep: int) -> int:
        """Drop runs that ended before ``cutoff`` beyond each task's last ``keep`` (as run output
        files are swept on one host)."""
        cur = self._execute(
            "DELETE FROM kmpwm_runs r WHERE r.finished < %s AND "
            "(SELECT count(*) FROM kmpwm_runs x WHERE x.task_id = r.task_id AND x.run > r.run) >= %s",
            (cutoff, keep),
            doing="sweeping run output",
        )
        return cur.rowcount

    def renew(self, runner: str) -> bool:
        """Push the end of every lease ``runner`` holds to ``now() + KMPWM_LEASE`` (the database's
        clock).  False when the database cannot be reached: the caller counts from its last
        success and stops its runs before the leases end."""
        psycopg = _Psycopg.get()
        try:
            self.conn().execute(
                "UPDATE kmpwm_leases SET expires_at = now() + make_interval(secs => %s) WHERE runner = %s",
                (self.lease(), runner),
            )
            return True
        except (psycopg.Error, JournalError):
            self._drop_broken()
            return False

    # -- writing --------------------------------------------------------------------------

    @contextmanager
    def transaction(self, timeout: float | None = None, guess: bool = False) -> Iterator[PgTransaction]:
        """The writers' lock (an advisory lock, held to the end of one database transaction) with
        the state brought up to date under it; staged ops become one record at the end.

        ``guess``: optimistically, when it can (serve, its notifications heard): the state is
        brought up to date by what the watch heard, and the lock, a check that no other record
        came, the record and COMMIT go in one round trip at the end (none if nothing is written).
        Only claims of waiting tasks may be staged; anything else, or a record that came, raises
        OptimisticMiss with nothing written and the state as it was: make the transaction again
        without ``guess``."""
        psycopg = _Psycopg.get()
        from kmpwm.storage.journal import lock_timeout

        if timeout is None:
            timeout = lock_timeout()
        conn = self._fresh_conn()
        txn = None
        outer = not self._in_txn
        if guess and outer and self._guessable(conn):
            mode = self._guessing
        else:
            mode = self._outermost if outer else self._savepoint
        self._in_txn += 1
        lock = _lock_sql(timeout)
        try:
            with mode(conn, lock, timeout) as txn:
                yield txn
        except psycopg.Error as exc:
            self.invalidate()
            self._drop_broken()
            raise self._error(exc, "a write") from None
        except BaseException:
            if txn is not None and txn.touched:
                self.invalidate()  # the in-memory state saw ops that never reached the database
            raise
        finally:
            self._in_txn -= 1

    def _fresh_conn(self):
        """The connection; outside a transaction, made anew if the server ended it meanwhile."""
        if not self._in_txn and self._conn is not None and self._stirred():
            self._execute("SELECT 1", doing="connecting")
        return self.conn()

    @contextmanager
    def _outermost(self, conn, lock: str, timeout: float) -> Iterator[PgTransaction]:
        """A transaction of its own: BEGIN with the lock, COMMIT or ROLLBACK at the end."""
        self._begin(conn, timeout)
        try:
            txn = PgTransaction(self)
            yield txn
            self._committed = False
            txn.flush(last=True)  # each record notifies (INSERT_SQL): a transaction that wrote nothing, nobody
            if not self._committed:
                conn.execute("COMMIT")
        except BaseException:
            self._rollback(conn)
            raise
        finally:
            self._read_ahead = None
            self._committed = False

    def _begin(self, conn, timeout: float) -> None:
        """BEGIN, the lock and the reading the transaction starts with, in one round trip (one
        pipeline of statements the connection has prepared: the server neither parses nor plans
        them again)."""
        view = self._view
        self._heard_other = view is None  # (as load's reading)
        with_leases, unread = (False, None) if view is None else self._read_wants()
        after = None if view is None else view.offset
        since = None if unread is None else self._read_at
        psycopg = _Psycopg.get()
        try:
            with conn.pipeline() as pipe:
                conn.execute("BEGIN")
                cur = conn.execute(BEGIN_SQL, (f"{max(1, int(timeout * 1000))}ms", after, with_leases, since))
                pipe.sync()
                rows = cur.fetchall()
        except psycopg.errors.LockNotAvailable:
            self._rollback(conn)
            raise _busy(timeout) from None
        except BaseException:
            self._rollback(conn)
            raise
        if view is not None:
            self._read_ahead = (view.offset, rows, with_leases, unread)

    def _guessable(self, conn) -> bool:
        """May an optimistic transaction start: a state to plan on, brought up to date by the
        records heard (_fold_heard)?"""
        return self._view is not None and not _dead(conn) and self._fold_heard()

    @contextmanager
    def _guessing(self, conn, lock: str, timeout: float) -> Iterator[PgTransaction]:
        """An optimistic transaction (see ``transaction``): nothing is sent until its end."""
        txn = PgTransaction(self, guess=(timeout, self._read_at, self._view.offset, self._unread))
        try:
            yield txn
            self._committed = False
            txn.flush(last=True)
            if self._committed:  # the check passed: every record up to ours has been read or heard
                self._read_at, self._unread, self._heard_unread = self._view.offset, 0, False
        except (OptimisticMiss, LockBusy):
            self._rollback(conn)
            txn.undo()
            raise
        except BaseException:
            self._rollback(conn)
            raise
        finally:
            self._committed = False

    def _missed(self, guess: tuple, counted: int) -> None:
        """An optimistic transaction's check found records it did not plan on (CLAIM_SQL), and
        ``counted`` records up to what it folded: OptimisticMiss.  When those are the ones folded
        (the others are newer), they are verified; else the notifications missed one, and the
        state is read again."""
        _timeout, _read_at, offset, unread = guess
        if counted == unread:
            self._read_at, self._unread, self._heard_unread = offset, 0, False
        else:
            self.invalidate()
        raise OptimisticMiss("another record came since the state was brought up to date", stale=True)

    @contextmanager
    def _savepoint(self, conn, lock: str, timeout: float) -> Iterator[PgTransaction]:
        """A transaction inside the open one (a savepoint), taking the lock again."""
        with conn.transaction():
            try:
                conn.execute(lock, prepare=False)
            except _Psycopg.get().errors.LockNotAvailable:
                raise _busy(timeout) from None
            txn = PgTransaction(self)
            yield txn
            txn.flush()

    def _rollback(self, conn) -> None:
        """End the transaction this store began (nothing of it is kept); a connection that broke
        has nothing to end."""
        try:
            if not conn.closed and conn.info.transaction_status != _Psycopg.get().pq.TransactionStatus.IDLE:
                conn.execute("ROLLBACK")
        except Exception:  # noqa: BLE001 -- the error being raised says more than this one
            self._drop_broken()

    def _stirred(self) -> bool:
        """Has the server said something on our idle connection other than notifications (it
        ends a connection with a message before closing it)?  A poll with no wait, instead of a
        round trip per write; notifications waiting are taken (unchanged_view)."""
        try:
            fd = self._conn.fileno()
            if not select.select([fd], [], [], 0)[0]:
                return False
            pg = self._conn.pgconn
            pg.consume_input()
            if any(pid != pg.backend_pid for pid in _take_notifications(pg)):
                self._heard_other = True
            return bool(select.select([fd], [], [], 0)[0]) or pg.status != _Psycopg.get().pq.ConnStatus.OK
        except Exception:  # noqa: BLE001 -- closed or broken: let the probe decide
            return True

    def _insert(self, record: dict, pre: list, commit: bool = False, guess: tuple | None = None) -> int:
        """One record and its side rows (claims, leases), inside the open transaction; returns
        the record's seq.  Consecutive claims (of distinct tasks), and consecutive results, go in
        one statement each, in the record's order (so a lease taken and ended in one record ends);
        run-due's usual record (results, then claims) goes in one statement with them.  ``commit``:
        the transaction's last write; when one statement holds it all, COMMIT is sent with it in
        one pipeline (one round trip), and ``_committed`` says so.  ``guess``: an optimistic
        transaction's (_guessing), whose BEGIN, lock and check go in that pipeline too."""
        steps = _side_steps(pre)
        data = orjson.dumps(record)
        if guess is not None:
            return self._claim_guessed(data, steps, commit, guess)
        sql, params, claims = self._first_statement(data, steps)
        row = self._write(sql, params, claims, commit and not steps)
        if claims is not None:
            self._claims_taken(claims, set(row[2]))
        for kind, arg in steps:
            self._side_statement(kind, arg)
        return row[0]

    def _first_statement(self, data: bytes, steps: list) -> tuple[str, tuple, list | None]:
        """The statement that inserts the record with the first of its side steps it can take
        (ended leases, then claims); those steps are removed from ``steps``."""
        ends = _next_step(steps, "ends")
        claims = None if _retakes(ends, steps) else _next_step(steps, "claims")
        params: tuple = (self.host or "", data)
        if ends is not None:
            params += _end_cols(ends)
        if claims is not None:
            cols = self._claim_cols(claims)
            params += (*cols, self.lease(), cols[0], cols[0])
        return _RECORD_SQL[ends is not None, claims is not None], params, claims

    def _side_statement(self, kind: str, arg) -> None:
        conn = self._conn
        if kind == "claims":
            rows = conn.execute(CLAIMS_SQL, (*self._claim_cols(arg), self.lease())).fetchall()
            self._claims_taken(arg, {r[0] for r in rows})
        elif kind == "ends":
            conn.execute(ENDS_SQL, _end_cols(arg))
        else:
            # a claim handed back unstarted: the occurrence was not consumed
            conn.execute(
                "DELETE FROM kmpwm_claims WHERE task_id = %s AND runner = %s AND claimed_at >= "
                "(SELECT max(claimed_at) FROM kmpwm_claims WHERE task_id = %s AND runner = %s)",
                (arg["id"], arg["runner"], arg["id"], arg["runner"]),
            )
            conn.execute("DELETE FROM kmpwm_leases WHERE task_id = %s AND runner = %s", (arg["id"], arg["runner"]))

    def _claim_guessed(self, data: bytes, steps: list, commit: bool, guess: tuple) -> int:
        """An optimistic transaction's record (its claims only) in one statement, a transaction
        of its own (CLAIM_SQL); its seq.  The lock not had in time is LockBusy, a record not
        folded OptimisticMiss (_missed), a claim refused the error _claims_taken raises."""
        psycopg = _Psycopg.get()
        claims = _next_step(steps, "claims") or []
        if steps or not commit:
            raise OptimisticMiss("an optimistic transaction writes one record of claims")  # (never)
        timeout, read_at, offset, unread = guess
        rows = orjson.dumps([_claim_row(op, before) for op, before in claims]).decode()
        lock_ms = f"{max(1, int(timeout * 1000))}ms"
        params = (lock_ms, offset, read_at, unread, self.host or "", data, rows, self.lease())
        try:
            seq = self._conn.execute(CLAIM_SQL, params).fetchone()[0]
        except psycopg.errors.LockNotAvailable:
            raise _busy(timeout) from None
        except psycopg.errors.RaiseException as exc:
            self._refused(exc, claims)
            raise
        if seq < 0:
            self._missed(guess, -1 - seq)
        self._committed = True
        return seq

    def _write(self, sql: str, params: tuple, claims: list | None, commit: bool):
        """The record's statement (and COMMIT with it, in one pipeline, when ``commit``); its row.
        A claim the database refused is the error _claims_taken raises, the transaction not
        committed."""
        psycopg = _Psycopg.get()
        conn = self._conn
        err = None
        try:
            if not commit:
                return conn.execute(sql, params).fetchone()
            cur, err = self._with_commit(conn, sql, params)
            if err is None:
                self._committed = True
                return cur.fetchone()
        except psycopg.errors.InvalidTextRepresentation as exc:
            err = exc
        if claims is not None and isinstance(err, psycopg.errors.InvalidTextRepresentation):
            self._refused(err, claims)
        raise err

    @staticmethod
    def _with_commit(conn, sql: str, params: tuple):
        """The statement and COMMIT in one pipeline: its cursor, and the error the commit met
        (None: committed)."""
        with conn.pipeline() as pipe:
            cur = conn.execute(sql, params)
            conn.execute("COMMIT")
            try:
                pipe.sync()
            except _Psycopg.get().Error as exc:  # raised after the pipeline ends cleanly
                return cur, exc
        return cur, None

    def _refused(self, err: Exception, claims: list) -> None:
        """If ``err`` is the guard naming claims the database refused: the error _claims_taken
        raises for the first of them."""
        primary = getattr(getattr(err, "diag", None), "message_primary", None) or ""
        if REFUSED in primary:
            refused = set(primary.split(REFUSED, 1)[1].rstrip('"').split())
            taken = {op["id"] for op, _ in claims} - refused
            self._claims_taken(claims, taken)  # raises, naming the first refused claim

    @staticmethod
    def _claim_cols(batch: list) -> tuple[list, ...]:
        """The claims rows of accepted claims (distinct tasks), as the columns unnest takes."""
        cols: tuple[list, ...] = ([], [], [], [], [], [])
        for op, before in batch:
            for col, value in zip(cols, _claim_row(op, before)):
                col.append(value)
        return cols

    @staticmethod
    def _claims_taken(batch: list, taken: set) -> None:
        """A claim the claims table refused (its row existed: another runner's) is an error."""
        for op, before in batch:
            if op["id"] not in taken:
                raise JournalError(
                    f"the database refused a second claim of task {op['id']} "
                    f"(occurrence {op.get('occ')}, attempt {before[0]}): another runner claimed it first",
                    hint="nothing ran twice; run-due will plan again",
                )


def _claim_row(op: dict, before: tuple[str, str]) -> tuple:
    """An accepted claim's row of kmpwm_claims: (task_id, task_seq, occ, attempt, taken_from, runner)."""
    return op["id"], int(op.get("seq") or 0), op.get("occ") or "", before[0], before[1], op["runner"]


def _claim_key(state: dict, op: dict) -> tuple[str, str] | None:
    """(the attempt at its occurrence, the runner whose lease it takes over or '') of a claim
    about to be folded: every legitimate second claim of one occurrence differs in one of them
    (a retry or an expired run counts an attempt, a dead holder's lease is taken over by name, a
    claim handed back unstarted deletes its row)."""
    t = state["tasks"].get(op.get("id"))
    if t is None:
        return None
    taken = (t.get("lease") or {}).get("runner", "") if t["state"] == "RUNNING" else ""
    return f"{t.get('occ_attempts', 0)}.{t.get('crashes', 0)}.{t.get('expiries', 0)}", taken


def _undo_of(state: dict, ops: list[dict]) -> list[tuple[dict, dict]]:
    """(task, its fields) of each op an optimistic transaction stages, before the fold: only
    claims of waiting tasks, whose fold changes nothing but the task's own fields (not a take-over
    of a lease, which needs the leases read); anything else is OptimisticMiss."""
    tasks, fences = state["tasks"], state.get("fences") or {}
    undo = []
    for op in ops:
        t = tasks.get(op.get("id")) if op.get("op") == "claim" else None
        if t is None or t["state"] != "ENQUEUED" or op["id"] in fences:
            raise OptimisticMiss("an optimistic transaction claims waiting tasks only")
        undo.append((t, dict(t)))
    return undo


def _accepted(pre: list, results: list) -> list:
    """(op, claim key) of each op folded, the key kept only where the fold accepted the claim."""
    return [(op, key if ok is True else None) for (op, key), ok in zip(pre, results)]


class PgTransaction(Transaction):
    """Writes made while holding the store's lock (the journal's ``Transaction``: ``view``,
    ``state``, ``stage``, ``commit``), written as rows of the database."""

    def __init__(self, store: PgStore, guess: tuple | None = None):
        super().__init__(store)
        self._pre: list = []  # (op, claim key) of each staged op
        self.touched = False
        # an optimistic transaction's (lock timeout, last reading's offset, offset, records
        # folded unread): its state is the store's as the notifications brought it up to date
        self.guess = guess
        self._undo: list[tuple[dict, dict]] = []  # (task, its fields before) of each claim staged
        if guess is not None:
            self._view = store._view

    def _keys(self, ops: list[dict]) -> list:
        state = self.state
        return [(op, _claim_key(state, op) if op.get("op") == "claim" else None) for op in ops]

    def stage(self, ops: list[dict], emit=None) -> list:
        if not ops:
            return []
        if self.guess is not None:
            self._undo += _undo_of(self.state, ops)
        self.touched = True
        pre = self._keys(ops)
        results = apply(self.state, {"ts": self.ts, "ops": ops}, self._hook(emit))
        accepted = _accepted(pre, results)
        self.staged += [op for op, _ in accepted]
        self._pre += accepted
        return results

    def flush(self, last: bool = False) -> None:
        """Write the staged ops as one record; ``last``: nothing more is written in this
        transaction (the store may commit it with the record)."""
        if not self.staged:
            return
        if self.guess is not None and not last:
            raise OptimisticMiss("an optimistic transaction writes one record")
        ops, pre = self.staged, self._pre
        self.staged, self._pre = [], []
        self._advance(self.store._insert({"ts": self.ts, "ops": ops}, pre, commit=last, guess=self.guess))

    def undo(self) -> None:
        """An optimistic transaction that wrote nothing: its claims' tasks as they were."""
        for task, before in reversed(self._undo):
            task.clear()
            task.update(before)
        self._undo, self.staged, self._pre, self.touched = [], [], [], False

    def commit(self, ops: list[dict], ts: float | None = None) -> list:
        if not ops:
            return []
        if self.guess is not None:
            raise OptimisticMiss("an optimistic transaction writes staged claims only")
        record = self._commit_record(ops, ts)
        self.touched = True
        pre = self._keys(ops)
        results = apply(self.state, record)
        self._advance(self.store._insert(record, _accepted(pre, results)))
        return results

    def _advance(self, seq: int) -> None:
        """Our record is folded already: move past its seq so it is not folded again."""
        self.view.offset = seq
        self.store._tail += 1
        self.store._unread += 1


RECONNECT_EVERY = 2.0  # a lost listening connection: try to listen again this often


class PgWatch:
    """``LISTEN kmpwm`` on a connection of its own: its socket turns readable when any host writes
    (serve's watch interface: ``fd``, ``drain``, ``poll_interval``, ``close``)."""

    def __init__(self, store: PgStore):
        self._store = store
        self._conn = None
        self.fd = None
        self._connect()

    def _connect(self) -> None:
        psycopg = _Psycopg.get()
        conn = None
        try:
            conn = psycopg.connect(self._store.url, autocommit=True, connect_timeout=10, application_name="kmpwm")
            conn.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error as exc:
            if conn is not None:
                conn.close()
            raise self._store._error(exc, "listening for changes") from None
        self._conn, self.fd = conn, conn.fileno()
        self._store.feed_start()

    def drain(self) -> bool:
        """True when something changed, or may have: the connection was lost (and listens anew if
        it can; while the server is away ``fd`` is None and the watch polls)."""
        if self._conn is None:
            return self._reconnect()
        pg = self._conn.pgconn
        try:
            pg.consume_input()
        except Exception:  # noqa: BLE001 -- the connection is gone: listen anew
            self._conn.close()
            self._conn, self.fd = None, None
            self._store.feed_lost()
            self._reconnect()  # the fd changes: serve watches the new one
            return True  # (missed notifications: plan again)
        heard = []
        while (n := pg.notifies()) is not None:
            heard.append(_carried(n.extra))
        self._store.feed(heard)
        return bool(heard)

    def _reconnect(self) -> bool:
        try:
            self._connect()
        except KmpwmError:
            return False  # still away: the runner says so when it tries the store
        return True

    def poll_interval(self) -> float | None:
        return None if self._conn is not None else RECONNECT_EVERY

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
