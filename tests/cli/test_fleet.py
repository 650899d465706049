"""The fleet store (SPEC section 14): one queue on PostgreSQL, shared by several hosts.

The behaviour suites marked ``both_stores`` already run every command against PostgreSQL; this
file tests what only a shared store has: the schema and its migration, URLs (masked, malformed,
unreachable), hosts sharing one queue with real concurrent runners, leases judged by the
database's clock, claims the database refuses twice, serve woken by notifications, and
``store copy``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from helpers import jdoc, kmpwm, kmpwm_env

from kmpwm.storage import pgstore


@pytest.fixture
def pg(pg_url, monkeypatch):
    monkeypatch.setenv("KMPWM_STORE", pg_url)
    return pg_url


def q(url, sql, params=()):
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else None


def write_config(home, text):
    (home / "config.toml").write_text(text)
    os.chmod(home / "config.toml", 0o600)


# -- the schema -------------------------------------------------------------------------------


def test_schema_is_created_on_first_use_and_versioned(pg, home):
    kmpwm("enqueue", "a", "echo", check=0)
    assert q(pg, "SELECT value FROM kmpwm_meta WHERE key = 'schema'") == [(str(pgstore.SCHEMA_VERSION),)]
    assert not (home / "journal" / "journal.log").exists()  # nothing went to the journal
    doc = jdoc("doctor")
    assert doc["store"]["schema"] == pgstore.SCHEMA_VERSION and doc["store"]["records"] == 1
    assert doc["store"]["notify_queue"] == 0.0 and doc["exit_code"] == 0


def test_a_writer_waits_for_the_lock_at_most_its_timeout_then_exits_75(pg):
    """The writers' lock is an advisory lock: a writer that cannot get it within
    KMPWM_LOCK_TIMEOUT says so (exit 75, try again) and writes nothing; once it is free, it writes."""
    kmpwm("enqueue", "first", "echo", check=0)
    with psycopg.connect(pg, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (pgstore.LOCK_KEY,))
        started = time.monotonic()
        r = kmpwm("enqueue", "second", "echo", env={"KMPWM_LOCK_TIMEOUT": "1"}, check=75)
        assert "held the store's lock for 1s" in r.stderr and time.monotonic() - started < 20, r.stderr
    assert [t["id"] for t in jdoc("inspect-queue")["tasks"]] == ["first"]
    kmpwm("enqueue", "second", "echo", env={"KMPWM_LOCK_TIMEOUT": "1"}, check=0)


def test_doctor_says_when_the_notification_queue_fills(pg, home, monkeypatch):
    """A listening session that does not read (a serve stopped for days) holds PostgreSQL's
    notification queue back, and every write fails once it is full: doctor says so first."""
    from kmpwm.storage.paths import resolve
    from kmpwm.system import doctor

    kmpwm("enqueue", "a", "echo", check=0)
    monkeypatch.setattr(doctor, "NOTIFY_QUEUE_FULL", 0.0)  # (filling it for real takes gigabytes)
    store = doctor._check_store(resolve(home))
    assert store["exit_code"] == 74 and "notification queue is 0% full" in store["error"], store


def test_a_store_of_the_first_schema_version_is_migrated_and_keeps_its_tasks(pg):
    with psycopg.connect(pg, autocommit=True) as conn:
        for statement in pgstore.MIGRATIONS[1]:
            conn.execute(statement)
        conn.execute("INSERT INTO kmpwm_meta VALUES ('schema', '1')")
    # a record written by version 1: an enqueue
    kmpwm("enqueue", "old", "echo", check=0)  # migrates first, then writes
    assert q(pg, "SELECT value FROM kmpwm_meta WHERE key = 'schema'") == [(str(pgstore.SCHEMA_VERSION),)]
    assert q(pg, "SELECT to_regclass('kmpwm_hosts') IS NOT NULL") == [(True,)]
    run = jdoc("run-due")
    assert [r["id"] for r in run["ran"]] == ["old"]
    assert [h["host"] for h in jdoc("doctor")["store"]["hosts"]]  # v2's table is in use


def test_a_schema_newer_than_this_kmpwm_is_refused(pg):
    kmpwm("inspect-queue", check=0)
    q(pg, "UPDATE kmpwm_meta SET value = '99' WHERE key = 'schema'")
    r = kmpwm("enqueue", "a", "echo", check=78)
    assert "schema version 99" in r.stderr and "Traceback" not in r.stderr


# -- URLs ---------------------------------------------------------------------------------------


def test_a_password_is_never_printed(pg_server, home):
    url = pg_server.replace("kmpwm@", "nobody_here:s3cr3t-pw@")
    for args in (["--store", url, "enqueue", "a", "echo"], ["--store", url, "doctor", "--json"]):
        r = kmpwm(*args)
        assert r.returncode in (74, 78), r
        assert "s3cr3t" not in r.stdout + r.stderr
        assert "***" in r.stdout + r.stderr
    assert pgstore.mask("postgresql://u:pw@h/db?password=x&sslmode=require") == (
        "postgresql://u:***@h/db?password=***&sslmode=require"
    )


def test_a_malformed_url_is_78_and_an_unreachable_server_74(home, tmp_path):
    r = kmpwm("--store", "postgresql://h:notaport/db", "inspect-queue", check=78)
    assert r.stderr.count("\n") <= 2 and "Traceback" not in r.stderr
    r = kmpwm("--store", "mysql://h/db", "inspect-queue", check=78)
    assert "postgresql://" in r.stderr
    r = kmpwm("--store", f"postgresql://kmpwm@/x?host={tmp_path}&connect_timeout=2", "enqueue", "a", "echo", check=74)
    assert "Traceback" not in r.stderr and r.stderr.startswith("kmpwm: ")


def test_store_url_from_config_toml_and_env_and_flag(pg_url, home, monkeypatch):
    monkeypatch.delenv("KMPWM_STORE", raising=False)
    write_config(home, f'[store]\nurl = "{pg_url}"\n')
    kmpwm("enqueue", "viaconfig", "echo", check=0)
    assert q(pg_url, "SELECT count(*) FROM kmpwm_records") == [(1,)]
    # --store journal wins over the config: the journal is empty
    assert jdoc("--store", "journal", "inspect-queue", "--all")["tasks"] == []
    write_config(home, "[store]\nurl = 42\n")
    kmpwm("inspect-queue", check=78)


def test_an_insecure_pgpass_is_refused(pg, home, tmp_path, monkeypatch):
    pgpass = tmp_path / "pgpass"
    pgpass.write_text("*:*:*:*:pw\n")
    os.chmod(pgpass, 0o644)
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    r = kmpwm("enqueue", "a", "echo", check=77)
    assert "chmod 600" in r.stderr


# -- claims -------------------------------------------------------------------------------------


def test_the_database_refuses_a_second_claim_of_one_occurrence(pg, home):
    """Even if a runner's fold believed it free, the claims table's key refuses a second claim of
    the same occurrence from the same starting point: nothing runs twice."""
    kmpwm("enqueue", "once", "echo", check=0)
    from kmpwm import Scheduler
    from kmpwm.core.state import occurrence

    t = Scheduler(home).task("once")
    # another runner's claim of this very occurrence, as if it committed first
    q(
        pg,
        "INSERT INTO kmpwm_claims (task_id, task_seq, occ, attempt, taken_from, runner) VALUES (%s,%s,%s,%s,'',%s)",
        ("once", t["seq"], occurrence(t), "0.0.0", "elsewhere/1/x"),
    )
    r = kmpwm("run-due", "--json", check=74)
    assert "refused a second claim" in r.stderr
    assert jdoc("inspect-queue", "once")["tasks"][0]["state"] == "ENQUEUED"  # nothing was recorded


def test_hosts_share_one_queue_and_each_task_runs_once(pg, home, tmp_path):
    """Three hosts' runners at once (KMPWM_HOST=a|b|c) on 150 tasks: every task exactly once."""
    marks = tmp_path / "marks"
    marks.mkdir()
    write_config(
        home,
        f'[workers.mark]\ncommand = ["sh", "-c", "echo $KMPWM_HOST >> {marks}/$KMPWM_TASK_ID"]\n',
    )
    from kmpwm import Scheduler

    s = Scheduler(home)
    with s.batch():
        for n in range(150):
            s.enqueue(f"t{n}", None, "mark")
    procs = []
    for _round in range(2):
        for host in "abc":
            env = dict(kmpwm_env(), KMPWM_HOST=host)
            procs.append(subprocess.Popen([sys.executable, "-m", "kmpwm", "run-due", "--parallel", "3"], env=env))
    for p in procs:
        assert p.wait(timeout=120) == 0
    counts = {f.name: f.read_text().split() for f in marks.iterdir()}
    assert len(counts) == 150
    assert all(len(v) == 1 for v in counts.values()), {k: v for k, v in counts.items() if len(v) != 1}
    hosts = {v[0] for v in counts.values()}
    assert hosts <= set("abc")
    done = jdoc("inspect-queue", "--all", "--state", "SUCCEEDED")["tasks"]
    assert len(done) == 150
    assert q(pg, "SELECT count(*) FROM kmpwm_claims") == [(150,)]


def test_a_foreign_lease_is_judged_by_the_database_clock(pg, home, tmp_path, monkeypatch):
    """Host a's runner holds a task (its clock a day ahead); host b, on the real clock, leaves it
    alone while a renews; once a is gone without a word (SIGKILL, a dead machine) b takes the
    task over when the lease ends by the database's clock, not before."""
    monkeypatch.setenv("KMPWM_LEASE", "12s")
    started = tmp_path / "started"
    write_config(
        home,
        f'[workers.slow]\ncommand = ["sh", "-c", "echo $KMPWM_HOST >> {started}; sleep 30"]\n',
    )
    kmpwm("enqueue", "long", "slow", "--timeout", "10m", check=0)
    env_a = dict(kmpwm_env(), KMPWM_HOST="a")
    a = subprocess.Popen(
        ["faketime", "-f", "+1d", sys.executable, "-m", "kmpwm", "run-due"],
        env=env_a,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not (started.exists() and started.read_text()):
            assert time.monotonic() < deadline, "host a never started the task"
            time.sleep(0.1)
        t0 = time.monotonic()
        env_b = dict(kmpwm_env(), KMPWM_HOST="b")
        lease = jdoc("inspect-queue", "long", env=env_b)["tasks"][0]
        assert lease["state"] == "RUNNING"
        time.sleep(14)  # longer than a lease: a renewed it meanwhile
        r = kmpwm("run-due", "--json", env=env_b, check=0)
        assert json.loads(r.stdout)["ran"] == []
        assert started.read_text().split() == ["a"]
        os.killpg(a.pid, 9)  # host a dies, its workers with it
        a.wait()
        killed = time.monotonic()
        # before the lease can have ended: still held
        r = kmpwm("run-due", "--json", env=env_b, check=0)
        if time.monotonic() - killed < 8:
            assert json.loads(r.stdout)["ran"] == []
        time.sleep(max(0.0, 13 - (time.monotonic() - killed)))
        env_b_quick = dict(env_b)
        write_config(home, '[workers.slow]\ncommand = ["sh", "-c", "echo $KMPWM_HOST >> ' + str(started) + '"]\n')
        r = kmpwm("run-due", "--json", env=env_b_quick, check=0)
        assert [x["id"] for x in json.loads(r.stdout)["ran"]] == ["long"], r.stdout
        assert started.read_text().split() == ["a", "b"]
        assert time.monotonic() - t0 > 14
        events = jdoc("events", "--task", "long")["events"]
        assert any(e["event"] == "runner-lost" and e.get("why") == "its lease ended" for e in events)
    finally:
        if a.poll() is None:
            os.killpg(a.pid, 9)


# -- serve and store copy -----------------------------------------------------------------------


def test_serve_wakes_on_the_database_notification(pg, home, tmp_path):
    marks = tmp_path / "ran"
    write_config(home, f'[workers.mark]\ncommand = ["sh", "-c", "echo $KMPWM_TASK_ID >> {marks}"]\n')
    serve = subprocess.Popen(
        [sys.executable, "-m", "kmpwm", "serve"], env=kmpwm_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        time.sleep(1.5)
        for n in range(3):
            kmpwm("enqueue", f"s{n}", "mark", check=0)
            deadline = time.monotonic() + 10
            while not (marks.exists() and f"s{n}" in marks.read_text().split()):
                assert time.monotonic() < deadline, f"serve did not start s{n}"
                time.sleep(0.02)
    finally:
        serve.terminate()
        assert serve.wait(timeout=30) == 0, serve.stderr.read()


def test_store_copy_journal_to_postgresql_and_back(pg_url, home, monkeypatch):
    monkeypatch.delenv("KMPWM_STORE", raising=False)
    write_config(home, '[workers.flaky]\ncommand = ["sh", "-c", "exit 75"]\n')  # 75: retry me
    kmpwm("enqueue", "plain", "echo", "--delay", "1h", check=0)
    kmpwm("enqueue", "done", "echo", check=0)
    jdoc("run-due")  # done: SUCCEEDED, not copied
    kmpwm("chain", "--id", "c", "echo", "flaky", "echo", "--backoff-delay", "1h", check=0)
    jdoc("run-due")  # c/2/fail retries later: the chain's savepoint is step 2
    before = jdoc("inspect-queue", "c")["tasks"]
    doc = jdoc("store", "copy", "--to", pg_url)
    assert doc["copied"] == 4 and doc["chains"] == 1 and "plain" in doc["ids"] and "done" not in doc["ids"]
    there = jdoc("--store", pg_url, "inspect-queue", "--all")
    ids = {t["id"] for t in there["tasks"]}
    assert ids == {"plain", "c/1/echo", "c/2/flaky", "c/3/echo"}
    after = {t["id"]: t for t in jdoc("--store", pg_url, "inspect-queue", "c")["tasks"]}
    for t in before:
        assert after[t["id"]]["state"] == t["state"]
        assert after[t["id"]]["attempts"] == t["attempts"]
    # a second copy would overwrite: refused, nothing written
    r = kmpwm("store", "copy", "--to", pg_url, check=65)
    assert "never overwrites" in r.stderr
    # and back, into an empty journal of another home
    other = home.parent / "other"
    other.mkdir(mode=0o700)
    env = dict(kmpwm_env(), KMPWM_HOME=str(other))
    doc = json.loads(kmpwm("store", "copy", "--from", pg_url, "--json", env=env, check=0).stdout)
    assert doc["copied"] == 4
    back = json.loads(kmpwm("inspect-queue", "--all", "--json", env=env, check=0).stdout)["tasks"]
    assert {t["id"] for t in back} == ids
    # the copied chain goes on from its savepoint: step 1 never runs again
    write_config(home, '[workers.flaky]\ncommand = ["true"]\n')
    r = json.loads(kmpwm("--store", pg_url, "run-now", "c", "--json", check=0).stdout)
    assert [x["id"] for x in r["ran"]] == ["c/2/flaky", "c/3/echo"]


def test_run_output_is_read_on_any_host(pg, home, tmp_path):
    """A run's output goes to the store: `kmpwm logs` on another host (another home) shows it."""
    write_config(home, '[workers.talk]\ncommand = ["sh", "-c", "echo hello from $KMPWM_HOST; echo oops >&2"]\n')
    kmpwm("enqueue", "talk", "talk", "--every", "60s", check=0)
    kmpwm("run-due", env={"KMPWM_HOST": "a"}, check=0)
    other = tmp_path / "other-home"
    other.mkdir(mode=0o700)
    env = {"KMPWM_HOME": str(other), "KMPWM_HOST": "b"}
    r = kmpwm("logs", "talk", env=env, check=0)
    assert r.stdout == "hello from a\noops\n"
    doc = json.loads(kmpwm("logs", "talk", "--all", "--json", env=env, check=0).stdout)
    assert [x["run"] for x in doc["runs"]] == [1] and doc["runs"][0]["status"] == "SUCCESS"
    assert jdoc("compact")["compacted"] is False  # a shared store keeps records; runs are swept by age
    assert json.loads(kmpwm("logs", "talk", "--json", env=env, check=0).stdout)["runs"][0]["output"]


def test_logs_follow_streams_a_run_on_another_host(pg, home, tmp_path):
    """`kmpwm logs ID --follow` on one host while the run goes on on another: what it has written
    so far, then the rest as the runner sends it (every second), returning when the run ends."""
    write_config(
        home,
        '[workers.talk]\ncommand = ["sh", "-c", "for i in 1 2 3 4 5; do echo line $i; sleep 0.6; done"]\n',
    )
    kmpwm("enqueue", "talk", "talk", check=0)
    runner = subprocess.Popen(
        [sys.executable, "-m", "kmpwm", "run-due"],
        env=kmpwm_env({"KMPWM_HOST": "a"}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    other = tmp_path / "other-home"
    other.mkdir(mode=0o700)
    env = {"KMPWM_HOME": str(other), "KMPWM_HOST": "b"}
    try:
        deadline = time.monotonic() + 30
        while not q(pg, "SELECT 1 FROM kmpwm_runs WHERE task_id = 'talk' AND written > 0"):
            assert time.monotonic() < deadline, "the run's first output never reached the store"
            time.sleep(0.05)
        assert runner.poll() is None  # still running: the follow starts in the middle of the run
        r = kmpwm("logs", "talk", "--follow", env=env, check=0)
        assert runner.poll() is not None or runner.wait(timeout=10) == 0  # it returned as the run ended
        assert r.stdout == "".join(f"line {i}\n" for i in range(1, 6)), r.stdout
        doc = json.loads(kmpwm("logs", "talk", "--follow", "--json", env=env, check=0).stdout)
        assert doc["runs"][0]["status"] == "SUCCESS" and doc["runs"][0]["output"].count("line") == 5
    finally:
        if runner.poll() is None:
            runner.kill()
        runner.wait()


def test_compaction_leaves_old_finished_work_out_of_the_snapshot_and_serve_rebases(pg, home):
    """The shared store keeps every record, but its snapshot, which every process starts from,
    holds only what a compaction keeps on the journal: work finished within the retention
    window, and everything unfinished.  A long-lived reader (serve's store) drops the state it
    grew and reads the new snapshot, instead of holding every task it ever saw."""
    from kmpwm.storage.paths import resolve
    from kmpwm.storage.stores import open_store

    for i in range(3):
        kmpwm("enqueue", f"old{i}", "echo", check=0)
    kmpwm("chain", "--id", "oldchain", "echo", "echo", check=0)
    jdoc("run-due")
    jdoc("run-due")  # the chain's second step
    kmpwm("enqueue", "later", "echo", "--at", "2099-01-01T00:00:00Z", check=0)
    reader = open_store(resolve(home))
    reader.forget_history = True
    assert {"old0", "later"} <= set(reader.load().state["tasks"])
    eight_days = str(8 * 86400)
    assert jdoc("compact", faketime=f"+{eight_days}")["compacted"] is False
    doc = jdoc("inspect-queue", "--all")
    assert [t["id"] for t in doc["tasks"]] == ["later"] and doc["chains"] == [], doc
    assert [e for e in jdoc("events", "--task", "old0")["events"]]  # the records, and so the events, stay
    assert reader.rebase() is True
    assert set(reader.load().state["tasks"]) == {"later"}
    reader._rebase_checked = float("-inf")  # (it asks at most once a minute)
    assert reader.rebase() is False  # nothing newer since
    reader.close()
    kmpwm("enqueue", "old0", "echo", check=0)  # its id is free again, as after a journal compaction
    assert [r["id"] for r in jdoc("run-due")["ran"]] == ["old0"]


def test_three_hosts_under_kills_terminations_and_a_restart_keep_every_invariant():
    """A short trial of scripts/fleet_torture.py (its own cluster, which it restarts): three hosts
    with serve and run-due, hosts SIGKILLed, connections terminated, the server restarted, a clock
    jumping; no run of a task beside another, no succeeded step again, no occurrence twice,
    nothing lost.  The long tier runs it at full size."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "fleet_torture.py"
    r = subprocess.run(
        [sys.executable, str(script), "--tasks", "60", "--chains", "6", "--periodic", "4", "--seconds", "15"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    total = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0 and total["violations"] == 0, r.stdout + r.stderr[-3000:]
    assert total["runs"] >= 60 + 6 * 5 + 4 and total["checks"] > 100


@pytest.fixture
def own_cluster():
    """A PostgreSQL server of this test alone (it is stopped and started again)."""
    import shutil
    import tempfile

    script = Path(__file__).resolve().parents[2] / "scripts" / "pgcluster.py"
    root = tempfile.mkdtemp(prefix="kmpwm-pg-own-")
    url = subprocess.run(
        [sys.executable, str(script), "start", root], check=True, capture_output=True, text=True
    ).stdout.strip()

    def ctl(action):
        subprocess.run([sys.executable, str(script), action, root], check=True, capture_output=True)

    yield url, ctl
    subprocess.run([sys.executable, str(script), "stop", root], check=False, capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


def test_a_host_that_loses_the_database_stops_its_run_before_the_lease_ends(own_cluster, home, tmp_path, monkeypatch):
    url, ctl = own_cluster
    monkeypatch.setenv("KMPWM_STORE", url)
    monkeypatch.setenv("KMPWM_LEASE", "10s")
    log = tmp_path / "worker.log"
    write_config(
        home,
        "[workers.long]\n"
        f'command = ["sh", "-c", "echo start >> {log}; trap \'echo stopped >> {log}; exit 0\' TERM; '
        f'sleep 120 & wait"]\n',
    )
    kmpwm("enqueue", "long", "long", "--timeout", "10m", check=0)
    a = subprocess.Popen(
        [sys.executable, "-m", "kmpwm", "run-due", "--grace", "1s"],
        env=kmpwm_env({"KMPWM_HOST": "a"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while not (log.exists() and "start" in log.read_text()):
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.05)
    time.sleep(3)  # a renewal or so
    ctl("stop")  # the database goes away (a partition, from host a's side)
    lost = time.monotonic()
    out, err = a.communicate(timeout=60)
    stopped_after = time.monotonic() - lost
    assert "stopped" in log.read_text(), "the worker was not stopped by the expiry protocol (SIGTERM)"
    assert stopped_after < 10, f"host a stopped its run {stopped_after:.1f}s after losing the store: too late"
    assert a.returncode == 74 and "Traceback" not in err, err
    ctl("start")
    time.sleep(max(0.0, 11 - (time.monotonic() - lost)))  # the lease has ended by now, whatever a did
    write_config(home, '[workers.long]\ncommand = ["true"]\n')
    r = kmpwm("run-due", "--json", "--grace", "1s", env={"KMPWM_HOST": "b"}, check=0)
    assert [x["id"] for x in json.loads(r.stdout)["ran"]] == ["long"]


def test_serve_rides_out_a_database_outage_and_starts_work_when_it_is_back(own_cluster, home, tmp_path, monkeypatch):
    """serve with nothing running outlives the database going away (a cron ``@reboot`` serve has
    no supervisor to restart it): it says so once, tries again with a backoff, says when the
    store is back, and starts what was enqueued; SIGTERM still stops it at once (exit 0)."""
    url, ctl = own_cluster
    monkeypatch.setenv("KMPWM_STORE", url)
    marks = tmp_path / "ran"
    write_config(home, f'[workers.mark]\ncommand = ["sh", "-c", "echo $KMPWM_TASK_ID >> {marks}"]\n')
    err_path = tmp_path / "serve.err"
    with open(err_path, "w") as err:
        serve = subprocess.Popen(
            [sys.executable, "-m", "kmpwm", "serve"], env=kmpwm_env(), stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        kmpwm("enqueue", "before", "mark", check=0)
        deadline = time.monotonic() + 20
        while not (marks.exists() and "before" in marks.read_text()):
            assert time.monotonic() < deadline, "serve did not start the first task"
            time.sleep(0.05)
        ctl("stop")
        time.sleep(6)  # a few failed tries
        assert serve.poll() is None, err_path.read_text()
        said = err_path.read_text()
        assert "failed" in said and "retrying" in said and "Traceback" not in said, said
        assert said.count("retrying") == 1, said  # once per outage, not once per try
        ctl("start")
        kmpwm("enqueue", "after", "mark", check=0)
        deadline = time.monotonic() + 60
        while not (marks.exists() and "after" in marks.read_text()):
            assert time.monotonic() < deadline, "serve did not start work once the database was back:\n" + (
                err_path.read_text()
            )
            time.sleep(0.1)
        deadline = time.monotonic() + 10  # said once the record that started it is written: just after
        while "reachable again" not in err_path.read_text():
            assert time.monotonic() < deadline, err_path.read_text()
            time.sleep(0.05)
    finally:
        serve.terminate()
        code = serve.wait(timeout=30)
    assert code == 0, err_path.read_text()
    assert "Traceback" not in err_path.read_text()


def test_schedule_install_carries_the_store_and_host_but_never_a_password(home, monkeypatch):
    monkeypatch.setenv("KMPWM_STORE", "postgresql://kmpwm@db.internal/kmpwm")
    monkeypatch.setenv("KMPWM_HOST", "server-a")
    r = kmpwm("schedule", "install", "--backend", "cron", "--print", check=0)
    line = next(x for x in r.stdout.splitlines() if "run-due" in x)
    assert "KMPWM_STORE=postgresql://kmpwm@db.internal/kmpwm" in line and "KMPWM_HOST=server-a" in line
    monkeypatch.setenv("KMPWM_STORE", "postgresql://kmpwm:hunter2@db.internal/kmpwm")
    r = kmpwm("schedule", "install", "--backend", "systemd", "--print", check=78)
    assert "hunter2" not in r.stdout + r.stderr and ".pgpass" in r.stderr


def test_a_snapshot_gives_the_state_the_records_give(pg, home):
    """The store's snapshot is a cache: state from snapshot plus tail == state from every record."""
    from kmpwm import Scheduler
    from kmpwm.core.state import apply, new_state
    from kmpwm.storage.paths import resolve

    s = Scheduler(home)
    for n in range(20):
        s.enqueue(f"s{n}", None, "echo")
    kmpwm("run-due", check=0)
    s.store.write_snapshot()
    for n in range(5):
        s.enqueue(f"late{n}", None, "echo")
    fresh = pgstore.PgStore(resolve(home), pg)
    got = fresh.load().state
    assert fresh.load().from_snapshot
    scratch = new_state()
    for _, rec in fresh.records(0):
        apply(scratch, rec)
    assert got["tasks"] == scratch["tasks"] and got["chains"] == scratch["chains"]
    assert len(got["tasks"]) == 25
    kmpwm("compact", check=0)
    assert q(pg, "SELECT count(*) FROM kmpwm_snapshot") == [(1,)]
