"""Device state: real probes, cached for one run-due, overridden by ``KMPWM_ASSUME``.

``KMPWM_ASSUME="network=off,battery=10"`` overrides any probe (keys ``network``, ``metered``,
``roaming``, ``charging``, ``battery``, ``storage_low``, ``idle``).  A probe that fails never fails
the caller: it falls back to the permissive reading and says so in ``errors``.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

from kmpwm.core.exitcodes import ConfigError

BATTERY_LOW_PERCENT = 15
ASSUME_KEYS = {
    "network": "bool",
    "metered": "bool",
    "roaming": "bool",
    "charging": "bool",
    "battery": "percent",
    "storage_low": "bool",
    "idle": "bool",
}
STORAGE_LOW_FRACTION = 0.05
STORAGE_LOW_BYTES = 500 * 1024 * 1024
IDLE_AFTER_SECONDS = 300  # a session idle this long counts as an idle device


def parse_assume(text: str | None) -> dict:
    """Parse ``KMPWM_ASSUME``; a bad value is a configuration error (exit 78)."""
    out: dict = {}
    if not text:
        return out
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip().lower(), value.strip().lower()
        if not sep or key not in ASSUME_KEYS:
            raise ConfigError(f"KMPWM_ASSUME: unknown setting {part!r} (keys: {', '.join(ASSUME_KEYS)})")
        out[key] = _switch(key, value) if ASSUME_KEYS[key] == "bool" else _percent(value)
    return out


_SWITCH = {"on": True, "true": True, "1": True, "yes": True, "off": False, "false": False, "0": False, "no": False}


def _switch(key: str, value: str) -> bool:
    """A KMPWM_ASSUME on/off value."""
    if value not in _SWITCH:
        raise ConfigError(f"KMPWM_ASSUME: {key} must be on or off, not {value!r}")
    return _SWITCH[value]


def _percent(value: str) -> float:
    """KMPWM_ASSUME's battery percentage."""
    try:
        pct = float(value.rstrip("%"))
    except ValueError:
        raise ConfigError(f"KMPWM_ASSUME: battery must be a percentage, not {value!r}") from None
    if not 0 <= pct <= 100:
        raise ConfigError(f"KMPWM_ASSUME: battery must be between 0 and 100, not {value!r}")
    return pct


def _have_networkmanager() -> bool:
    return sys.platform.startswith("linux") and shutil.which("nmcli") is not None


def _have_modemmanager() -> bool:
    # ModemManager knows a cellular modem's registration (home or roaming); without it only
    # KMPWM_ASSUME can say
    return sys.platform.startswith("linux") and shutil.which("mmcli") is not None


# the readings that need a service to be read (the others can always be)
_READABLE_WITH = {"metered": _have_networkmanager, "roaming": _have_modemmanager}


def observable(key: str, assume: dict | None = None) -> bool:
    """Can this platform read ``key`` (a KMPWM_ASSUME key)?"""
    assume = parse_assume(os.environ.get("KMPWM_ASSUME")) if assume is None else assume
    if key in assume:
        return True
    readable = _READABLE_WITH.get(key)
    return readable is None or readable()


def unobservable(constraints: dict, trigger: dict) -> list[str]:
    """Reasons a task could never be judged here (REJECTED_OS_POLICY at enqueue)."""
    assume = parse_assume(os.environ.get("KMPWM_ASSUME"))
    nt = constraints.get("network_type")
    out = []
    if nt in ("unmetered", "metered", "temporarily-unmetered") and not observable("metered", assume):
        out.append(
            f"--network-type {nt}: this platform cannot tell a metered network apart (needs NetworkManager on Linux)"
        )
    if nt == "not-roaming" and not observable("roaming", assume):
        out.append(
            "--network-type not-roaming: this platform cannot tell whether the network is roaming "
            "(needs ModemManager's mmcli on Linux; or set KMPWM_ASSUME=roaming=off)"
        )
    return out


class Device:
    """Readings of one run-due: each probe runs at most once, lazily."""

    def __init__(self, assume: dict | None = None, storage_path: str | None = None):
        self.assume = parse_assume(os.environ.get("KMPWM_ASSUME")) if assume is None else assume
        self.storage_path = storage_path or os.path.expanduser("~")
        self._cache: dict = {}
        self.errors: dict[str, str] = {}

    def get(self, key: str):
        if key in self.assume:
            return self.assume[key]
        if key not in self._cache:
            try:
                self._cache[key] = getattr(self, f"_probe_{key}")()
            except Exception as exc:  # a probe must never take run-due down
                self.errors[key] = f"{type(exc).__name__}: {exc}"
                self._cache[key] = _FALLBACK[key]
        return self._cache[key]

    def _probe_network(self) -> bool:
        # A UDP connect sends no packet: it only asks the kernel for a route.
        import socket  # only run-due probes the network; importing it costs every command

        for family, addr in ((socket.AF_INET, ("192.0.2.1", 9)), (socket.AF_INET6, ("2001:db8::1", 9))):
            try:
                with socket.socket(family, socket.SOCK_DGRAM) as s:
                    s.connect(addr)
                    local = s.getsockname()[0]
                if local and not local.startswith("127.") and local != "::1":
                    return True
            except OSError:
                continue
        return False

    def _battery(self):
        if "battery_raw" not in self._cache:
            import psutil

            self._cache["battery_raw"] = getattr(psutil, "sensors_battery", lambda: None)()
        return self._cache["battery_raw"]

    def _probe_charging(self) -> bool:
        b = self._battery()
        return True if b is None or b.power_plugged is None else bool(b.power_plugged)

    def _probe_battery(self) -> float:
        b = self._battery()
        return 100.0 if b is None else float(b.percent)

    def _probe_storage_low(self) -> bool:
        usage = shutil.disk_usage(self.storage_path)
        # Low: under 5% free, counted against at most 10 GiB so that big disks are not "low" at 50 GiB free.
        return usage.free < min(usage.total * STORAGE_LOW_FRACTION, 20 * STORAGE_LOW_BYTES)

    def _probe_metered(self) -> bool:
        if not _have_networkmanager():
            return False
        return "yes" in _output(["nmcli", "-t", "-f", "GENERAL.METERED", "device", "show"]).lower()

    def _probe_roaming(self) -> bool:
        """Linux with ModemManager: is any modem registered on a roaming network?"""
        if not shutil.which("mmcli"):
            return False
        return any(_modem_roaming(path) for path in _modem_paths())

    def _probe_idle(self) -> bool:
        seconds = self._session_idle_seconds()
        if seconds is not None:
            return seconds >= IDLE_AFTER_SECONDS
        load1 = os.getloadavg()[0]  # a server without a session: idle when barely loaded
        return load1 < 0.25 * (os.cpu_count() or 1)

    def _session_idle_seconds(self) -> float | None:
        """How long the user's session has been idle: logind (Linux) or IOKit (macOS); None if unknown."""
        import subprocess

        try:
            if sys.platform == "darwin":
                return _iokit_idle_seconds()
            out = _logind_idle_hint()
        except (OSError, subprocess.SubprocessError, ValueError):
            return None
        return None if out is None else _logind_idle_seconds(out)

    def battery_low(self) -> bool:
        return self.get("battery") < BATTERY_LOW_PERCENT

    def readings(self) -> dict:
        return {k: self.get(k) for k in ASSUME_KEYS}


def _output(argv: list[str]) -> str:
    """What ``argv`` prints on stdout (it has half a second)."""
    import subprocess

    return subprocess.run(argv, capture_output=True, text=True, timeout=0.5, check=False).stdout


def _modem_paths() -> list[str]:
    """ModemManager's modems."""
    listing = _output(["mmcli", "-L", "-K"])
    return [line.split(":", 1)[1].strip() for line in listing.splitlines() if line.startswith("modem-list.value")]


def _modem_roaming(path: str) -> bool:
    """Is the modem ``path`` registered on a roaming network?"""
    return any(
        line.startswith("modem.3gpp.registration-state") and line.split(":", 1)[1].strip() == "roaming"
        for line in _output(["mmcli", "-m", path, "-K"]).splitlines()
    )


def _iokit_idle_seconds() -> float | None:
    """macOS: the HID idle time IOKit reports."""
    for line in _output(["ioreg", "-c", "IOHIDSystem", "-d", "4"]).splitlines():
        if "HIDIdleTime" in line:
            return int(line.rsplit("=", 1)[1].strip()) / 1e9
    return None


def _logind_idle_hint() -> str | None:
    """logind's idle properties of this session (``loginctl show-session``); None without a session."""
    session = os.environ.get("XDG_SESSION_ID")
    if not session or not shutil.which("loginctl"):
        return None
    return _output(["loginctl", "show-session", session, "-p", "IdleHint", "-p", "IdleSinceHintMonotonic"])


def _logind_idle_seconds(out: str) -> float | None:
    """How long logind's properties ``out`` say the session has been idle (0: active; None: no properties)."""
    props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    if props.get("IdleHint") != "yes":
        return 0.0 if props else None
    since = int(props.get("IdleSinceHintMonotonic", "0") or 0) / 1e6
    return max(0.0, time.monotonic() - since) if since else IDLE_AFTER_SECONDS


_FALLBACK = {
    "network": True,
    "metered": False,
    "roaming": False,
    "charging": True,
    "battery": 100.0,
    "storage_low": False,
    "idle": True,
}


def unmet(constraints: dict, device: Device) -> str | None:
    """The first constraint that does not hold now, with its reading; None if all hold.  A
    reading is probed only for a constraint that asks for it."""
    nt = constraints.get("network_type", "not-required")
    if nt != "not-required" and (reason := _network_unmet(nt, device)):
        return reason
    for key, holds, why in _DEVICE_CHECKS:
        if constraints.get(key) and not holds(device):
            return why(device)
    return None


def _network_unmet(nt: str, device: Device) -> str | None:
    if not device.get("network"):
        return "waiting for a network connection (network: off)"
    if nt not in _NETWORK_CHECKS:
        return None  # any connection will do
    reading, unwanted, why = _NETWORK_CHECKS[nt]
    return why if bool(device.get(reading)) == unwanted else None


# --network-type -> (the reading it looks at, the value that holds the task back, why)
_NETWORK_CHECKS = {
    "unmetered": ("metered", True, "waiting for an unmetered network (metered: on)"),
    "temporarily-unmetered": ("metered", True, "waiting for an unmetered network (metered: on)"),
    "metered": ("metered", False, "waiting for a metered network (metered: off)"),
    "not-roaming": ("roaming", True, "waiting for a non-roaming network (roaming: on)"),
}


# (constraint, does it hold on the device, why not): in the order unmet reports them
_DEVICE_CHECKS = (
    ("requires_charging", lambda d: d.get("charging"), lambda d: "waiting for charging (charging: off)"),
    (
        "battery_not_low",
        lambda d: not d.battery_low(),
        lambda d: f"waiting for the battery to be not low (battery: {d.get('battery'):g}%)",
    ),
    (
        "storage_not_low",
        lambda d: not d.get("storage_low"),
        lambda d: "waiting for storage to be not low (storage_low: on)",
    ),
    ("device_idle", lambda d: d.get("idle"), lambda d: "waiting for the device to be idle (idle: off)"),
)


def device_state_now(name: str, device: Device) -> bool:
    """Is the device in the ``--when`` state ``name`` now?"""
    holds = _WHEN_STATES.get(name)
    return False if holds is None else holds(device)


# --when states: is the device in it?
_WHEN_STATES = {
    "battery-low": lambda d: d.battery_low(),
    "battery-okay": lambda d: not d.battery_low(),
    "storage-low": lambda d: bool(d.get("storage_low")),
    "device-idle": lambda d: bool(d.get("idle")),
}
