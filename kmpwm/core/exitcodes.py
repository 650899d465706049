"""Named exit codes (SPEC section 7) and the exceptions that carry them.

Every error kmpwm reports to a user is a :class:`KmpwmError`; the CLI turns it into one
line on stderr and its exit code, never a traceback.
"""

from __future__ import annotations

OK = 0
NOTHING_MATCHED = 1
USAGE = 2
INVALID_PARAMS = 65  # REJECTED_INVALID_PARAMS
OS_POLICY = 69  # REJECTED_OS_POLICY
FAILED_UNKNOWN = 70
IO_ERROR = 74  # journal I/O error or corruption that stops the command
TEMPFAIL = 75  # expired, or lock busy: try again
NOPERM = 77  # insecure permissions
CONFIG = 78  # bad configuration


class KmpwmError(Exception):
    """Base of every error reported to the user; ``exit_code`` is the process exit status."""

    exit_code = FAILED_UNKNOWN
    result = "FAILED_UNKNOWN"

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


class InvalidParams(KmpwmError):
    exit_code = INVALID_PARAMS
    result = "REJECTED_INVALID_PARAMS"


class OsPolicy(KmpwmError):
    exit_code = OS_POLICY
    result = "REJECTED_OS_POLICY"


class JournalError(KmpwmError):
    exit_code = IO_ERROR


class LockBusy(KmpwmError):
    exit_code = TEMPFAIL


class Expired(KmpwmError):
    exit_code = TEMPFAIL


class InsecurePermissions(KmpwmError):
    exit_code = NOPERM


class ConfigError(KmpwmError):
    exit_code = CONFIG


class NothingMatched(KmpwmError):
    exit_code = NOTHING_MATCHED
