"""Process identity: a pid plus a start token, so that a recycled pid is never taken for the
process that held a lease (and never signalled by ``simulate-expire``)."""

from __future__ import annotations

from kmpwm.core.hosts import this_host


def host() -> str:
    """This runner's host name: ``KMPWM_HOST``, else the machine's name (core.hosts.this_host).
    Leases name it, so two runners with different ``KMPWM_HOST`` on one machine judge each
    other's leases as another host's: by the lease's end, not by pid liveness."""
    return this_host()


def token(pid: int) -> str | None:
    """The start time of process ``pid`` as an opaque string; None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        # the command name (field 2) may hold spaces and parentheses: split after its last ')'
        fields = stat[stat.rindex(b")") + 2 :].split()
        return fields[19].decode()  # field 22, starttime in clock ticks since boot
    except FileNotFoundError:
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return repr(psutil.Process(pid).create_time())
    except Exception:
        return None


def alive(pid: int | None, start_token: str | None) -> bool:
    """Is the process that had ``start_token`` still running as ``pid``?"""
    if not pid:
        return False
    current = token(pid)
    if current is None:
        return False
    if start_token is None:
        return True
    return current == start_token


_BOOT: list = []


def boot_id() -> str | None:
    """This boot of the machine (Linux: a random id the kernel picks at boot); None if unknown.
    A lease taken in another boot of this host names a process that no longer exists."""
    if not _BOOT:
        try:
            with open("/proc/sys/kernel/random/boot_id") as fh:
                _BOOT.append(fh.read().strip() or None)
        except OSError:
            _BOOT.append(None)
    return _BOOT[0]


def stopped(pid: int | None) -> bool:
    """Is process ``pid`` stopped (Ctrl-Z, SIGSTOP, a debugger)?  False when unknown."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        return stat[stat.rindex(b")") + 2 :][:1] in (b"T", b"t")
    except (OSError, ValueError):
        return False
