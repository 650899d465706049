"""Logs in the log directory, rotated; tracebacks go here, never to the terminal."""

from __future__ import annotations

import logging
import os
import traceback
from pathlib import Path

LOG_NAME = "kmpwm.log"
MAX_BYTES = 1 << 20
BACKUPS = 5
_logger: logging.Logger | None = None


def logger(paths) -> logging.Logger:
    """The rotating file logger of this home (created on first use)."""
    global _logger
    if _logger is not None:
        return _logger
    from logging.handlers import RotatingFileHandler

    logging.raiseExceptions = False  # a log that cannot be written never prints a traceback
    log = logging.getLogger("kmpwm")
    log.setLevel(logging.INFO)
    log.propagate = False

    class PrivateRotatingFileHandler(RotatingFileHandler):
        """Log files are 0600 whatever the umask, also after rotation, and never a followed symlink."""

        def _open(self):
            fd = os.open(
                self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0), 0o600
            )
            os.fchmod(fd, 0o600)
            return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)

    try:
        from kmpwm.storage.paths import private_log_dir

        path = private_log_dir(paths) / LOG_NAME  # (~/.local/state/kmpwm too: ours, so private)
        handler = PrivateRotatingFileHandler(path, maxBytes=MAX_BYTES, backupCount=BACKUPS, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(message)s"))
        log.addHandler(handler)
    except Exception:  # an unwritable log never fails the command
        log.addHandler(logging.NullHandler())
    _logger = log
    return log


def log_exception(paths, exc: BaseException) -> str | None:
    """Write ``exc`` with its traceback to the log; returns the log's path (None if unwritable)."""
    if paths is None:
        return None
    try:
        log = logger(paths)
        log.error("internal error: %s\n%s", exc, "".join(traceback.format_exception(exc)))
        return str(Path(paths.log_dir) / LOG_NAME)
    except Exception:
        return None
