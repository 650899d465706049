"""run-due's signals: SIGUSR1 (simulate-expire), SIGTERM and SIGINT expire the run (a second
SIGINT kills the workers at once), SIGHUP too, except in ``serve`` where it re-reads config.toml;
SIGCHLD marks a worker's end.  The handlers only set flags, which the loop reads; a wake-up pipe
(``signal.set_wakeup_fd``) that the loop's selector watches ends its wait at once."""

from __future__ import annotations

import os
import selectors
import signal
from contextlib import suppress

REASONS = {
    signal.SIGUSR1: "simulate-expire delivered the expiration signal",
    signal.SIGTERM: "run-due received SIGTERM",
    signal.SIGINT: "run-due was interrupted",
}


class Signals:
    def __init__(self):
        self.flags = {"expire": False, "child": False, "force": False, "signo": 0}
        self.reason = ""  # why the first expiring signal came
        self.wake_r = self.wake_w = -1
        self._old: dict = {}
        self._old_wakeup = -1

    def install(self, sel: selectors.BaseSelector, *, hup_expires: bool) -> None:
        """Handle the signals and register the wake-up pipe in ``sel`` (its key's data: None)."""
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        sel.register(self.wake_r, selectors.EVENT_READ, None)
        self._old_wakeup = signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for signo, handler in (
            (signal.SIGUSR1, self._on_expire),
            (signal.SIGTERM, self._on_expire),
            (signal.SIGINT, self._on_expire),
            (signal.SIGHUP, self._on_expire if hup_expires else self._on_hup),
            (signal.SIGCHLD, self._on_child),
        ):
            self._old[signo] = signal.signal(signo, handler)

    def drain(self) -> None:
        """Empty the wake-up pipe (its bytes only woke the loop)."""
        with suppress(BlockingIOError, InterruptedError):
            while os.read(self.wake_r, 512):
                pass

    def restore(self) -> None:
        """The handlers from before install(); the wake-up pipe closed."""
        for signo, old in self._old.items():
            signal.signal(signo, old)
        with suppress(ValueError, AttributeError):
            signal.set_wakeup_fd(self._old_wakeup)
        for fd in (self.wake_r, self.wake_w):
            if fd >= 0:
                os.close(fd)

    def fds(self) -> list[int]:
        return [self.wake_r, self.wake_w]

    def _on_expire(self, signo, frame) -> None:
        if signo == signal.SIGINT and self.flags["expire"]:
            self.flags["force"] = True  # a second Ctrl-C: do not wait out the grace period
        self.flags["expire"] = True
        self.flags["signo"] = signo
        if not self.reason:
            self.reason = REASONS.get(signo, "signal")

    def _on_child(self, signo, frame) -> None:
        self.flags["child"] = True

    def _on_hup(self, signo, frame) -> None:
        self.flags["hup"] = True
