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


@pytest.fixture(autouse=True)
def kmpwm_home(tmp_path, monkeypatch) -> Path:
    """The kmpwm home of this test (also in ``os.environ["KMPWM_HOME"]``)."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    os.chmod(home, 0o700)  # mkdir's mode is filtered by the umask
    monkeypatch.setenv("KMPWM_HOME", str(home))
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
