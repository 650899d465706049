"""The pool of warm worker hosts (kmpwm/running/pool.py): its end."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from kmpwm.running.pool import _reap_within


def test_a_pool_host_that_will_not_die_does_not_hang_the_run_end():
    """Pool.shutdown's wait for a killed host is bounded (a process stuck in the kernel)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    t = time.monotonic()
    _reap_within(proc.pid, 0.3)  # it is alive: given up after 0.3 s
    assert 0.25 <= time.monotonic() - t < 5
    proc.kill()
    _reap_within(proc.pid, 5.0)  # reaped as soon as it is gone: no zombie left
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)
