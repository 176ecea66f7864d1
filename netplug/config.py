"""netplug's settings: command-line flags over environment variables over defaults."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from netplug.errors import InvalidOption

DEFAULT_SOCKET = "/run/docker/plugins/netplug.sock"
DEFAULT_STATE_DIR = "/var/lib/netplug"
LEVELS = ("debug", "info", "warning", "error")


class Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    socket_path: str = msgspec.field(default=DEFAULT_SOCKET, name="socket")
    state_path: str = msgspec.field(default=DEFAULT_STATE_DIR, name="state_dir")
    log_level: str = "info"
    default_backend: str = "bridge"
    netns: str | None = None  # run the kernel work in this network namespace (tests, demo)
    kernel_threads: int = 4
    fsync: bool = True

    @property
    def socket(self) -> Path:
        return Path(self.socket_path)

    @property
    def state_dir(self) -> Path:
        return Path(self.state_path)

    def __post_init__(self) -> None:
        self.log_level = self.log_level.lower()
        if self.log_level not in LEVELS:
            raise InvalidOption("log level", self.log_level, f"use one of {', '.join(LEVELS)}")
        if not 1 <= self.kernel_threads <= 64:
            raise InvalidOption("kernel threads", self.kernel_threads, "use 1 to 64")


ENV = {
    "socket": "NETPLUG_SOCKET",
    "state_dir": "NETPLUG_STATE_DIR",
    "log_level": "NETPLUG_LOG_LEVEL",
    "default_backend": "NETPLUG_DEFAULT_BACKEND",
    "netns": "NETPLUG_NETNS",
    "kernel_threads": "NETPLUG_KERNEL_THREADS",
    "fsync": "NETPLUG_FSYNC",
}


def load(**flags: object) -> Settings:
    """Settings from flags (None = not given), then NETPLUG_* variables, then defaults."""
    values: dict[str, object] = {}
    for field, variable in ENV.items():
        flag = flags.get(field)
        if flag is not None:
            values[field] = flag
        elif os.environ.get(variable):
            values[field] = os.environ[variable]
    try:
        return msgspec.convert(values, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise InvalidOption("settings", None, str(exc)) from exc
