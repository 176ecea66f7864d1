"""hypercorn on the plugin's unix socket. The only module that imports hypercorn."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, cast

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

if TYPE_CHECKING:
    from hypercorn.typing import ASGIFramework

    from netplug.dispatch import App

log = logging.getLogger("netplug.server")


def config(socket: Path) -> Config:
    cfg = Config()
    cfg.bind = [f"unix:{socket}"]
    cfg.umask = 0o177  # the socket comes out 0600
    cfg.accesslog = None  # netplug logs one line per call itself
    cfg.errorlog = logging.getLogger("hypercorn.error")
    cfg.keep_alive_timeout = 3600  # dockerd keeps plugin connections open and never closes them
    cfg.keep_alive_max_requests = 1 << 62
    cfg.include_server_header = False
    cfg.include_date_header = False
    cfg.graceful_timeout = 0.5
    return cfg


def _prepare(socket: Path) -> None:
    socket.parent.mkdir(parents=True, exist_ok=True)
    if socket.is_socket():
        socket.unlink()  # a stale socket from a killed run


async def serve_socket(
    app: App,
    socket: Path,
    shutdown: trio.Event,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `shutdown` is set; `task_status.started()` once the socket listens."""
    await trio.to_thread.run_sync(_prepare, socket)
    framework = cast("ASGIFramework", app)
    await serve(
        framework,
        config(socket),
        shutdown_trigger=shutdown.wait,
        task_status=task_status,
        mode="asgi",
    )
