"""Shared fixtures: every test gets its own fresh kmpwm home.

The autouse fixture points ``KMPWM_HOME`` at ``tmp_path / "home"`` (created 0700), clears
``KMPWM_ASSUME`` so real probes or a test's own overrides decide (and ``KMPWM_HOST``), and sets
``KMPWM_LOCK_TIMEOUT`` so a stuck lock fails a test in seconds rather than hanging it.
Subprocesses started through :mod:`tests.helpers` inherit this environment.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import helpers` from any test file


# -- the stores: the behaviour suites run against the journal and against PostgreSQL ----------
#
# A module with ``pytestmark = pytest.mark.both_stores`` runs each of its tests twice: on the
# embedded journal and on a fresh PostgreSQL database (KMPWM_STORE), as River runs one driver
# suite against every driver.  The server: ``KMPWM_TEST_PG`` (a libpq URL whose user may create
# databases), else a throwaway cluster this session starts (scripts/pgcluster.py) and stops.
# ``pytest --store journal`` (or ``postgresql``) runs one side only.  Modules marked
# ``both_stores(long=True)`` run on PostgreSQL only with ``--long-stores`` (scripts/long-tier),
# to keep CI's run short.

ROOT = Path(__file__).resolve().parent.parent


def _faketime_without_stale_semaphores() -> None:
    """Put tests/bin/faketime first on PATH (it removes a dead faketime's semaphore for its pid,
    then execs the real one), for the tests and every process they start."""
    import shutil

    real = shutil.which("faketime")
    here = Path(__file__).resolve().parent / "bin"
    if real is None or Path(real).parent == here:
        return
    os.environ["KMPWM_TEST_REAL_FAKETIME"] = real
    os.environ["PATH"] = f"{here}{os.pathsep}{os.environ.get('PATH', '')}"


_faketime_without_stale_semaphores()


def pytest_addoption(parser):
    parser.addoption(
        "--store", choices=("both", "journal", "postgresql"), default="both", help="stores for both_stores tests"
    )
    parser.addoption(
        "--long-stores",
        action="store_true",
        help="also run the modules marked both_stores(long=True) on PostgreSQL (scripts/long-tier)",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "both_stores: run the module's tests on the journal and on PostgreSQL")
    config.addinivalue_line("markers", "journal_only: a test of the journal's own files (not run on PostgreSQL)")


def pytest_generate_tests(metafunc):
    if "store_kind" not in metafunc.fixturenames:
        return
    if metafunc.definition.get_closest_marker("both_stores") is None:
        return
    choice = metafunc.config.getoption("--store")
    kinds = ["journal", "postgresql"] if choice == "both" else [choice]
    if metafunc.definition.get_closest_marker("both_stores").kwargs.get("long") and not metafunc.config.getoption(
        "--long-stores"
    ):
        kinds = [k for k in kinds if k == "journal"] or kinds  # PostgreSQL's side in the long tier

    if metafunc.definition.get_closest_marker("journal_only") is not None:
        kinds = [k for k in kinds if k == "journal"]
    metafunc.parametrize("store_kind", kinds, indirect=True, ids=[k[:2] if k == "journal" else "pg" for k in kinds])


@pytest.fixture
def store_kind(request) -> str:
    return getattr(request, "param", "journal")


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    """A libpq URL of a PostgreSQL server this session may create databases in."""
    url = os.environ.get("KMPWM_TEST_PG")
    if url:
        yield url
        return
    import shutil
    import subprocess
    import tempfile

    # not under pytest's 0700 temporary tree: the server runs as another user when we are root
    root = tempfile.mkdtemp(prefix="kmpwm-pg-")
    script = ROOT / "scripts" / "pgcluster.py"
    try:
        out = subprocess.run(
            [sys.executable, str(script), "start", str(root)], check=True, capture_output=True, text=True
        )
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"cannot start a PostgreSQL cluster for the tests: {exc.stderr.strip() or exc}")
    try:
        yield out.stdout.strip()
    finally:
        subprocess.run([sys.executable, str(script), "stop", str(root)], check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server) -> str:
    """A fresh, empty database on the test server (dropped at the end of the test)."""
    import uuid

    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = _with_dbname(pg_server, name)
    yield url
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _with_dbname(url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@pytest.fixture(autouse=True)
def kmpwm_home(tmp_path, monkeypatch, store_kind, request) -> Path:
    """The kmpwm home of this test (also in ``os.environ["KMPWM_HOME"]``)."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    os.chmod(home, 0o700)  # mkdir's mode is filtered by the umask
    monkeypatch.setenv("KMPWM_HOME", str(home))
    monkeypatch.delenv("KMPWM_STORE", raising=False)
    if store_kind == "postgresql":
        monkeypatch.setenv("KMPWM_STORE", request.getfixturevalue("pg_url"))
    monkeypatch.delenv("KMPWM_ASSUME", raising=False)
    monkeypatch.delenv("KMPWM_HOST", raising=False)  # the machine's name, unless a test names a host
    monkeypatch.setenv("KMPWM_LOCK_TIMEOUT", "20")
    monkeypatch.setenv("NO_COLOR", "1")
    return home


@pytest.fixture
def home(kmpwm_home) -> Path:
    """Alias of :func:`kmpwm_home` for tests that want the path by a short name."""
    return kmpwm_home


@pytest.fixture
def journal_file(kmpwm_home) -> Path:
    """``$KMPWM_HOME/journal/journal.log`` (may not exist yet)."""
    return kmpwm_home / "journal" / "journal.log"
