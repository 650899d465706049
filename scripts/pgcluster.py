#!/usr/bin/env python3
"""A throwaway PostgreSQL cluster for the tests and benchmarks (never for real data).

    python scripts/pgcluster.py start DIR   # initdb in DIR, start it on a Unix socket in DIR;
                                            # prints the libpq URL to use (KMPWM_TEST_PG)
    python scripts/pgcluster.py stop DIR    # stop it (the files stay; rm -r DIR to drop them)

The server listens on no TCP port, only on ``DIR/socket``, with trust authentication for the
socket (only local users who can reach DIR can connect). PostgreSQL refuses to run as root: run as
root (CI containers), the cluster belongs to the ``postgres`` system user (Debian's package makes
it) or ``nobody``, and DIR is opened to it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import sys
import time


def _bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True):
        return candidate
    sys.exit(f"pgcluster: {name} not found (apt-get install postgresql)")


def _as_owner() -> tuple[list[str], int | None, int | None]:
    """The command prefix that runs the server's programs as an unprivileged user."""
    if os.getuid() != 0:
        return [], None, None
    for name in ("postgres", "nobody"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        return [shutil.which("runuser") or "/sbin/runuser", "-u", name, "--"], pw.pw_uid, pw.pw_gid
    sys.exit("pgcluster: running as root and no unprivileged user (postgres, nobody) to run the server")


def start(root: str) -> str:
    root = os.path.abspath(root)
    data, sock = os.path.join(root, "data"), os.path.join(root, "socket")
    prefix, uid, gid = _as_owner()
    os.makedirs(sock, exist_ok=True)
    if uid is not None:
        for path in (root, sock):
            os.chown(path, uid, gid)
        os.chmod(root, 0o755)  # the server user walks into it; the socket dir is its own
    if not os.path.isdir(data):
        subprocess.run(
            [*prefix, _bin("initdb"), "-D", data, "-U", "kmpwm", "--auth=trust", "-E", "UTF8", "--no-instructions"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    opts = f"-c listen_addresses='' -c unix_socket_directories='{sock}' -c fsync=off -c max_connections=200"
    subprocess.run(
        [*prefix, _bin("pg_ctl"), "-D", data, "-l", os.path.join(root, "server.log"), "-o", opts, "-w", "start"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    for _ in range(100):
        if os.path.exists(os.path.join(sock, ".s.PGSQL.5432")):
            break
        time.sleep(0.05)
    os.chmod(sock, 0o777) if uid is not None else None  # root's tests connect through it
    return f"postgresql://kmpwm@/postgres?host={sock}"


def stop(root: str) -> None:
    data = os.path.join(os.path.abspath(root), "data")
    prefix, _, _ = _as_owner()
    subprocess.run(
        [*prefix, _bin("pg_ctl"), "-D", data, "-m", "fast", "-w", "stop"], check=False, stdout=subprocess.DEVNULL
    )


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__, file=sys.stderr)
        return 64
    if argv[0] == "start":
        print(start(argv[1]))
    else:
        stop(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
