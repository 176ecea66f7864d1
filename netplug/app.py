"""The composition root: build everything, listen, restore state, stop cleanly.

Nothing is built at import time. `run` opens the socket first (dockerd dials it 500 ms after
starting the plugin), then loads the records and makes the kernel match them; until that is done
every call that needs state waits, so dockerd never reaches a plugin that has forgotten a network.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import trio

from netplug.backend import BackendContext, Registry
from netplug.config import Settings
from netplug.dispatch import App
from netplug.driver import Driver
from netplug.store import Store

log = logging.getLogger("netplug.app")


def build(settings: Settings, registry: Registry | None = None) -> Driver:
    if registry is None:
        from netplug.netlink import Kernel

        kernel = Kernel(threads=settings.kernel_threads, netns=settings.netns)
        registry = Registry(BackendContext(kernel))
    store = Store(settings.state_dir, fsync=settings.fsync)
    return Driver(store, registry, default_backend=settings.default_backend)


async def run(
    settings: Settings,
    *,
    registry: Registry | None = None,
    task_status: trio.TaskStatus[Driver] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGTERM/SIGINT (or cancellation)."""
    from netplug.server import serve_socket

    driver = build(settings, registry)
    shutdown = trio.Event()
    ready = trio.Event()
    app = App(driver, ready=ready)
    failure: Exception | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, shutdown)
            # Listen first: dockerd dials the socket 500 ms after starting the plugin and then
            # waits 3 s before trying again. Calls that need state wait for `ready`.
            await nursery.start(serve_socket, app, settings.socket, shutdown)
            log.info(
                "listening",
                extra={
                    "fields": {
                        "socket": settings.socket,
                        "ms_since_exec": f"{_ms_since_exec():.0f}",
                    }
                },
            )
            started = time.monotonic()
            try:
                report = await driver.restore()
            except Exception as exc:
                log.exception("restore failed: netplug cannot serve; fix the cause and restart it")
                failure = exc
                report = {}
                shutdown.set()
            for key, items in report.items():
                for item in items:
                    log.info("restore", extra={"fields": {key: item}})
            if failure is None:
                driver.run_in_background(nursery)
                ready.set()
            log.log(
                logging.ERROR if failure else logging.INFO,
                "ready" if failure is None else "stopping after a failed restore",
                extra={
                    "fields": {
                        "networks": len(driver.store.networks),
                        "endpoints": len(driver.store.endpoints),
                        "restore_ms": f"{(time.monotonic() - started) * 1e3:.1f}",
                        "state": settings.state_dir,
                    }
                },
            )
            task_status.started(driver)
            await shutdown.wait()
            nursery.cancel_scope.deadline = trio.current_time() + 1
        log.info("stopped")
    finally:
        driver.registry.context.close()
    if failure is not None:
        raise failure


def _ms_since_exec() -> float:
    """Milliseconds since this process was created (10 ms resolution)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return (uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")) * 1e3
    except (OSError, ValueError, IndexError):
        return -1.0


async def _watch_signals(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("stopping", extra={"fields": {"signal": signal.Signals(signum).name}})
            shutdown.set()
            return
