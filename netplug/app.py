"""The composition root: build everything, restore state, listen, stop cleanly.

Nothing is built at import time. `run` loads the records and makes the kernel match them
*before* the socket opens, so dockerd never reaches a plugin that has forgotten a network.
"""

from __future__ import annotations

import logging
import signal
import time

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

    started = time.monotonic()
    driver = build(settings, registry)
    shutdown = trio.Event()
    try:
        report = await driver.restore()
        for key, items in report.items():
            for item in items:
                log.info("restore", extra={"fields": {key: item}})
        log.info(
            "state loaded",
            extra={
                "fields": {
                    "networks": len(driver.store.networks),
                    "endpoints": len(driver.store.endpoints),
                    "ms": f"{(time.monotonic() - started) * 1e3:.1f}",
                }
            },
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, shutdown)
            await nursery.start(serve_socket, App(driver), settings.socket, shutdown)
            log.info(
                "listening",
                extra={"fields": {"socket": settings.socket, "state": settings.state_dir}},
            )
            task_status.started(driver)
            await shutdown.wait()
            nursery.cancel_scope.deadline = trio.current_time() + 1
        log.info("stopped")
    finally:
        driver.registry.context.close()


async def _watch_signals(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("stopping", extra={"fields": {"signal": signal.Signals(signum).name}})
            shutdown.set()
            return
