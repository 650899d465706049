"""The vocabulary of kmpwm: one ``str`` Enum per closed set, constraints and task requests.

These mirror the seed API (``Constraints``, ``TaskRequest``, ``ScheduleResult``...) in Python
style.  Field names follow the CLI's long flags with dashes as underscores, so a JSON Lines spec,
a chain file and the Python API all use the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import timedelta
from enum import Enum
from typing import Any

# (Constraints().to_record() runs when this module is imported, see its end: these load with it anyway)
from kmpwm.core.exitcodes import InvalidParams
from kmpwm.core.timeparse import parse_duration


class TaskState(str, Enum):
    ENQUEUED = "ENQUEUED"
    BLOCKED = "BLOCKED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


from kmpwm.core.state import DEFAULT_CONSTRAINTS_RECORD, FINISHED, MAX_EXPIRIES, UNFINISHED  # noqa: E402,F401 (re-exported)


class ScheduleResult(str, Enum):
    SUCCESS = "SUCCESS"
    REJECTED_OS_POLICY = "REJECTED_OS_POLICY"
    REJECTED_INVALID_PARAMS = "REJECTED_INVALID_PARAMS"
    FAILED_UNKNOWN = "FAILED_UNKNOWN"


class RunStatus(str, Enum):
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    RETRY = "RETRY"
    EXPIRED = "EXPIRED"


class BackoffPolicy(str, Enum):
    EXPONENTIAL = "exponential"
    LINEAR = "linear"


class ExistingWorkPolicy(str, Enum):
    KEEP = "keep"
    REPLACE = "replace"
    APPEND = "append"
    APPEND_OR_REPLACE = "append-or-replace"
    UPDATE = "update"  # enqueue only (WorkManager's UPDATE): the task keeps its id, attempts and grid


class NetworkType(str, Enum):
    NOT_REQUIRED = "not-required"
    CONNECTED = "connected"
    UNMETERED = "unmetered"
    NOT_ROAMING = "not-roaming"
    METERED = "metered"
    TEMPORARILY_UNMETERED = "temporarily-unmetered"


class QualityOfService(str, Enum):
    HIGH = "high"
    DEFAULT = "default"
    LOW = "low"


class ExactBehavior(str, Enum):
    ATTEMPT = "attempt"
    NOTIFY = "notify"
    ERROR = "error"


class DeviceStateName(str, Enum):
    BATTERY_LOW = "battery-low"
    BATTERY_OKAY = "battery-okay"
    STORAGE_LOW = "storage-low"
    DEVICE_IDLE = "device-idle"


_ENUM_CACHE: dict = {}


def enum_value(enum: type[Enum], value: Any, *, what: str) -> str:
    """Normalise a user's value (any case, ``_`` or ``-``) to the enum's value, or raise 65."""
    try:
        return _ENUM_CACHE[enum, value]
    except (KeyError, TypeError):
        pass
    if isinstance(value, enum):
        _ENUM_CACHE[enum, value] = value.value
        return value.value
    if isinstance(value, str):
        wanted = value.strip().lower().replace("_", "-")
        for member in enum:
            if member.value.lower() == wanted:
                _ENUM_CACHE[enum, value] = member.value
                return member.value
    choices = "|".join(m.value for m in enum)
    raise InvalidParams(f"invalid {what} {value!r}: expected one of {choices}")


DEFAULT_BACKOFF_DELAY = 10.0
DEFAULT_MAX_ATTEMPTS = 10
MAX_ATTEMPTS_LIMIT = 1_000_000
BACKOFF_CAP = 5 * 3600.0
LIGHT_TIMEOUT = 30.0
HEAVY_TIMEOUT = 600.0
DEFAULT_GRACE = 5.0


# the constraints that are true or false
CONSTRAINT_FLAGS = (
    "requires_network",
    "requires_charging",
    "battery_not_low",
    "storage_not_low",
    "device_idle",
    "heavy",
    "expedited",
)


@dataclass
class Constraints:
    """When a task may run, and how it is retried (seed: ``Constraints``)."""

    requires_network: bool = False
    network_type: NetworkType | str | None = None
    requires_charging: bool = False
    battery_not_low: bool = False
    storage_not_low: bool = False
    device_idle: bool = False
    heavy: bool = False
    expedited: bool = False
    qos: QualityOfService | str = QualityOfService.DEFAULT
    timeout: float | timedelta | str | None = None
    backoff: BackoffPolicy | str = BackoffPolicy.EXPONENTIAL
    backoff_delay: float | timedelta | str = DEFAULT_BACKOFF_DELAY
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    exact_behavior: ExactBehavior | str = ExactBehavior.ATTEMPT
    # Scheduling details (SPEC section 12), for --every, --cron and --at tasks: a fixed per-task
    # delay in [0, jitter) added to every due time, and how late an occurrence may start.
    jitter: float | timedelta | str | None = None
    misfire_grace: float | timedelta | str | None = None

    def key(self) -> tuple:
        """The values that define this object (for caching validated records)."""
        return tuple(self.__dict__.values())

    def to_record(self) -> dict:
        """Validate and return the stored form (plain JSON values)."""
        network_type = self._network_type()
        for name in CONSTRAINT_FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise InvalidParams(f"invalid {name} {getattr(self, name)!r}: expected true or false")
        timeout = _positive_duration(self.timeout, "timeout") if self.timeout is not None else None
        max_attempts = self._max_attempts()
        rec = {
            "requires_network": network_type != "not-required",
            "network_type": network_type,
            "requires_charging": self.requires_charging,
            "battery_not_low": self.battery_not_low,
            "storage_not_low": self.storage_not_low,
            "device_idle": self.device_idle,
            "heavy": self.heavy,
            "expedited": self.expedited,
            "qos": enum_value(QualityOfService, self.qos, what="qos"),
            "timeout": timeout,
            "backoff": enum_value(BackoffPolicy, self.backoff, what="backoff policy"),
            "backoff_delay": parse_duration(self.backoff_delay, what="backoff delay"),
            "max_attempts": max_attempts,
        }
        rec.update(self._scheduling_details())
        return rec

    def _scheduling_details(self) -> dict:
        """``jitter`` and ``misfire_grace``, left out when unset, so that the record of a task
        without them stays DEFAULT_CONSTRAINTS_RECORD."""
        details = {}
        if self.jitter is not None:
            jitter = parse_duration(self.jitter, what="jitter")
            if jitter > 0:
                details["jitter"] = jitter
        if self.misfire_grace is not None:
            details["misfire_grace"] = _positive_duration(self.misfire_grace, "misfire grace")
        return details

    def _network_type(self) -> str:
        """The network type asked for; ``requires_network`` makes "not-required" (or none) "connected"."""
        if self.network_type is None:
            return "connected" if self.requires_network else "not-required"
        network_type = enum_value(NetworkType, self.network_type, what="network type")
        if network_type == "not-required" and self.requires_network:
            return "connected"
        return network_type

    def _max_attempts(self) -> int:
        """``max_attempts`` as a whole number in range (text of digits is taken as one)."""
        max_attempts = self.max_attempts
        if isinstance(max_attempts, str) and max_attempts.strip().lstrip("-").isdigit():
            max_attempts = int(max_attempts)
        if (
            isinstance(max_attempts, bool)
            or not isinstance(max_attempts, int)
            or not 1 <= max_attempts <= MAX_ATTEMPTS_LIMIT
        ):
            raise InvalidParams(
                f"invalid max attempts {self.max_attempts!r}: expected a whole number from 1 to {MAX_ATTEMPTS_LIMIT}"
            )
        return max_attempts


def _positive_duration(value, what: str) -> float:
    seconds = parse_duration(value, what=what)
    if seconds <= 0:
        raise InvalidParams(f"invalid {what}: must be more than 0s")
    return seconds


_CONSTRAINT_FIELDS = tuple(f.name for f in fields(Constraints))
CONSTRAINT_KEYS = frozenset(_CONSTRAINT_FIELDS)


@dataclass
class TaskRequest:
    """One task to enqueue (seed: ``TaskRequest``); ``id`` may be left out inside a chain."""

    worker: str
    id: str | None = None
    input: Any = None
    trigger: Any = None  # a kmpwm.core.triggers object; None means OneTime()
    constraints: Constraints | None = None  # None means Constraints()
    tags: list[str] = field(default_factory=list)
    host: str | None = None  # --host: run only on the runners of this host (None: any host)


if Constraints().to_record() != DEFAULT_CONSTRAINTS_RECORD:  # state.py's copy must be what Constraints() means
    raise RuntimeError("kmpwm: state.DEFAULT_CONSTRAINTS_RECORD differs from Constraints().to_record()")
