"""The entry-point list is cached in the home (kmpwm/registry.py), keyed by the interpreter and
the modification times of every sys.path entry: a package installed or removed must be seen by
the very next command, and a damaged cache must cost nothing but time."""

from __future__ import annotations

import os
import time
from pathlib import Path

from helpers import kmpwm

MODULE = "def work(ctx):\n    return None\n"


def _install(site: Path, dist: str, worker: str, *, age: float = 60) -> None:
    """A package in ``site`` as pip leaves it, installed ``age`` seconds ago."""
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[kmpwm.workers]\n{worker} = {dist}_mod:work\n")
    (site / f"{dist}_mod.py").write_text(MODULE)
    if age:
        _age(info, age)


def _age(path: Path, seconds: float) -> None:
    """Make a directory look modified ``seconds`` ago (as if installed a while back)."""
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_install_and_removal_are_seen_at_once(tmp_path, home):
    """Each change below leaves the site directory's own time alone on purpose: what counts
    is the metadata directories (a reinstall of the same version makes a new one)."""
    site = tmp_path / "site"
    site.mkdir()
    env = {"PYTHONPATH": str(site)}
    _install(site, "plugone", "one")
    kmpwm("enqueue", "a", "one", env=env, check=0)
    cache = home / "cache" / "entry-points.json"
    assert cache.exists() and b'"one"' in cache.read_bytes()
    kmpwm("enqueue", "b", "one", env=env, check=0)  # from the cache
    # a second package appears (its directory's time changes): found by the next command
    _install(site, "plugtwo", "two", age=30)
    kmpwm("enqueue", "c", "two", env=env, check=0)
    # reinstalled in place (same name, a new directory): its new entry point is seen
    info = site / "plugtwo-1.0.dist-info"
    for f in info.iterdir():
        f.unlink()
    info.rmdir()
    _install(site, "plugtwo", "three", age=25)
    (site / "plugtwo_mod.py").write_text(MODULE)
    kmpwm("enqueue", "c3", "three", env=env, check=0)
    assert kmpwm("enqueue", "c2", "two", env=env).returncode == 65
    # removed: the next command says so, not the stale cache
    for p in site.glob("plugone*"):
        if p.is_dir():
            for f in p.iterdir():
                f.unlink()
            p.rmdir()
        else:
            p.unlink()
    proc = kmpwm("enqueue", "d", "one", env=env)
    assert proc.returncode == 65 and "unknown worker 'one'" in proc.stderr, proc.stderr


def test_fresh_install_is_scanned_not_cached(tmp_path, home):
    """A directory changed within the last seconds may still change within the same clock
    tick: such an environment is scanned every time and never cached."""
    site = tmp_path / "site"
    site.mkdir()
    _install(site, "plugnew", "fresh", age=0)
    kmpwm("enqueue", "a", "fresh", env={"PYTHONPATH": str(site)}, check=0)
    cache = home / "cache" / "entry-points.json"
    assert not cache.exists() or b'"fresh"' not in cache.read_bytes()


def test_damaged_or_foreign_cache_is_ignored(home):
    kmpwm("enqueue", "a", "echo", check=0)
    cache = home / "cache" / "entry-points.json"
    for junk in (b"", b"{", b"[]", b'{"key": 1, "entry_points": [[1, 2, 3]]}', b"\xff\xfe"):
        cache.write_bytes(junk)
        kmpwm("enqueue", "b", "echo", "--policy", "replace", check=0)
    # a cache written for another environment lists a worker that does not exist here
    cache.write_bytes(b'{"key": ["elsewhere"], "entry_points": [["ghost", "nowhere:work", null]]}')
    proc = kmpwm("enqueue", "c", "ghost")
    assert proc.returncode == 65, proc.stderr
    assert {w for w in kmpwm("workers", check=0).stdout.split()} >= {"echo", "sleep", "fail"}
