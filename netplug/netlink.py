"""Netlink (and other kernel calls) off the event loop.

The kernel runs an rtnetlink request inside the sender's `sendmsg()`, so a call made on the trio
thread stalls every other request for its whole duration (a veth delete takes ~16 ms). `Kernel`
owns a few worker threads; each one enters the configured network namespace and runs the
functions trio tasks hand it with its own sockets: an `rtnl.Rtnl` for the per-endpoint requests
(packed by hand: pyroute2 spends ~0.85 ms of Python on each) and, opened on first use, a pyroute2
`IPRoute` for everything else (pyroute2 objects must not be shared across threads). Deletions
are serialized per netlink socket in the kernel, so several threads multiply their throughput.

This module is also the one place that maps netlink errno values to netplug errors and that
derives interface names from Docker IDs. pyroute2 is imported inside the worker threads only:
the server listens before the heavy import happens.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import queue
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import outcome
import trio

from netplug.errors import Conflict, InvalidRequest, KernelError, LinkExists, LinkMissing
from netplug.rtnl import Link, Rtnl, RtnlError

if TYPE_CHECKING:
    from pyroute2 import IPRoute

log = logging.getLogger("netplug.netlink")

T = TypeVar("T")

IFNAMSIZ = 15  # usable bytes of an interface name (16 with the NUL)
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")

# Prefixes of every link netplug names itself: 3 letters + 12 hex digits = 15 bytes.
BRIDGE_PREFIX = "npb"
HOST_PREFIX = "nph"
PEER_PREFIX = "npc"
OWNED_NAME = re.compile(r"^np[bhc][0-9a-f]{12}$")


def ifname(prefix: str, docker_id: str) -> str:
    """A deterministic interface name from a Docker ID: `prefix` + the first hex digits."""
    name = prefix + docker_id[: IFNAMSIZ - len(prefix)].lower()
    check_ifname(name)
    return name


def check_ifname(name: str) -> str:
    if not _IFNAME_RE.match(name) or name in {".", ".."}:
        raise InvalidRequest(
            f"invalid interface name {name!r}: use 1 to {IFNAMSIZ} characters from "
            "letters, digits, '_', '-' and '.'"
        )
    return name


def stable_mac(seed: str) -> str:
    """A locally administered unicast MAC derived from `seed` (stable across restarts)."""
    digest = hashlib.sha256(seed.encode()).digest()
    return "02:" + ":".join(f"{b:02x}" for b in digest[:5])


def mac_from_ipv4(address: str) -> str:
    """Docker's bridge convention: 02:42 followed by the four bytes of the IPv4 address."""
    return "02:42:" + ":".join(f"{int(part):02x}" for part in address.split("."))


@contextmanager
def kernel_errors(what: str) -> Iterator[None]:
    """Translate pyroute2's NetlinkError into netplug errors that say what failed."""
    from pyroute2 import NetlinkError

    try:
        yield
    except (NetlinkError, RtnlError) as exc:
        if isinstance(exc, RtnlError):
            code, text = exc.errno, exc.strerror
        else:
            code = exc.code
            text = exc.args[1] if len(exc.args) > 1 else errno.errorcode.get(code, str(code))
        if code == errno.EEXIST:
            raise LinkExists(f"{what}: already exists") from exc
        if code == errno.ENODEV:
            raise LinkMissing(f"{what}: no such device") from exc
        if code == errno.ERANGE:
            raise InvalidRequest(f"{what}: {text} (interface names have at most 15 bytes)") from exc
        if code == errno.EPERM:
            raise KernelError(
                f"{what}: operation not permitted; netplug needs CAP_NET_ADMIN in the host "
                "network namespace (grant it when installing the plugin)"
            ) from exc
        if code == errno.EXFULL:
            raise Conflict(
                f"{what}: the bridge is full (the kernel allows 1024 ports on one bridge); "
                "put further containers on another network"
            ) from exc
        if code == errno.EOPNOTSUPP:
            raise KernelError(f"{what}: the kernel does not support it ({text})") from exc
        raise KernelError(f"{what}: {text} (errno {code})") from exc


class Worker:
    """What a function running on a kernel thread receives: the thread's own resources."""

    def __init__(self, rtnl: Rtnl, indexes: dict[str, int] | None = None) -> None:
        self.rtnl = rtnl
        self.resources: dict[str, Any] = {}
        self._indexes = indexes if indexes is not None else {}
        self._ipr: IPRoute | None = None

    @property
    def ipr(self) -> IPRoute:
        """This thread's pyroute2 socket, opened on first use."""
        if self._ipr is None:
            from pyroute2 import IPRoute

            # pyroute2 sets its own loggers' levels when imported; keep them quiet.
            logging.getLogger("pyroute2").setLevel(max(logging.WARNING, log.getEffectiveLevel()))
            self._ipr = IPRoute(ext_ack=True)
        return self._ipr

    def close(self) -> None:
        for resource in self.resources.values():
            close = getattr(resource, "close", None)
            if close is not None:
                close()
        if self._ipr is not None:
            self._ipr.close()
        self.rtnl.close()

    def cached_index(self, name: str) -> int:
        """The index of a long-lived link (a bridge), remembered across calls and threads.
        Whoever deletes or recreates that link calls `forget`."""
        index = self._indexes.get(name)
        if index is None:
            index = self._indexes[name] = self.index(name)
        return index

    def forget(self, name: str) -> None:
        self._indexes.pop(name, None)

    # --- the kernel calls netplug makes ---------------------------------------------------

    def link(self, name: str) -> Link | None:
        with kernel_errors(f"reading link {name}"):
            return self.rtnl.link(name)

    def links(self) -> list[Link]:
        """Every link: a dump, decoded by pyroute2 (restore, garbage collection, status)."""
        with kernel_errors("listing links"):
            return [_link_of(msg) for msg in self.ipr.get_links()]

    def add_bridge(self, name: str, *, mtu: int | None, mac: str) -> int:
        with kernel_errors(f"creating bridge {name}"):
            self.rtnl.add_bridge(name, mtu=mtu, mac=mac)
        return self.index(name)

    def add_veth(
        self, host: str, peer: str, *, master: int, mtu: int | None, peer_mac: str
    ) -> None:
        """One RTM_NEWLINK: the pair, the host end on the bridge and up, MTU on both ends."""
        with kernel_errors(f"creating veth {host}/{peer}"):
            self.rtnl.add_veth(host, peer, master=master, mtu=mtu, peer_mac=peer_mac)

    def set_link(self, name: str, *, up: bool | None = None, mtu: int | None = None) -> None:
        index = self.index(name)
        with kernel_errors(f"configuring link {name}"):
            self.rtnl.set_link(index, up=up, mtu=mtu)

    def set_ipv4_conf(self, name: str, key: int, value: int) -> None:
        """Set one per-interface IPv4 setting (`net.ipv4.conf.<name>.*`) through netlink:
        inside a managed plugin /proc/sys is read-only."""
        index = self.index(name)
        with kernel_errors(f"setting ipv4 conf {key}={value} on {name}"):
            self.rtnl.set_ipv4_conf(index, key, value)

    def set_bridge_port(
        self, name: str, *, hairpin: bool | None = None, isolated: bool | None = None
    ) -> None:
        """Bridge-port flags: hairpin (a frame may leave by the port it came in on) and
        isolation (isolated ports of a bridge cannot talk to each other)."""
        index = self.index(name)
        with kernel_errors(f"configuring bridge port {name}"):
            self.rtnl.set_bridge_port(index, hairpin=hairpin, isolated=isolated)

    def delete_link(self, name: str) -> bool:
        """Delete a link by name; False when it was already gone (that is success)."""
        try:
            with kernel_errors(f"deleting link {name}"):
                self.rtnl.delete_link(name)
        except LinkMissing:
            return False
        return True

    def index(self, name: str) -> int:
        with kernel_errors(f"link {name}"):
            return self.rtnl.link_index(name)

    def add_address(self, index: int, cidr: str) -> bool:
        """Add an address (IPv6 without duplicate address detection); False when it was
        already there."""
        try:
            with kernel_errors(f"adding address {cidr}"):
                self.rtnl.address(True, index, cidr)
        except LinkExists:
            return False
        return True

    def delete_address(self, index: int, cidr: str) -> None:
        try:
            with kernel_errors(f"deleting address {cidr}"):
                self.rtnl.address(False, index, cidr)
        except (LinkMissing, KernelError):
            pass  # already gone: EADDRNOTAVAIL


def _link_of(msg: Any) -> Link:
    return Link(
        index=int(msg["index"]),
        name=str(msg.get("IFLA_IFNAME")),
        kind=str(msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") or ""),
        master=int(msg.get("IFLA_MASTER") or 0),
        mtu=int(msg.get("IFLA_MTU") or 0),
        mac=str(msg.get("IFLA_ADDRESS") or ""),
        up=bool(msg["flags"] & 1),
    )


IPV4_CONF_ROUTE_LOCALNET = 26  # IPV4_DEVCONF_ROUTE_LOCALNET in linux/ip.h


def write_sysctl(path: str, value: str) -> bool:
    """Write a /proc/sys value (seen through the calling thread's network namespace).

    Returns False when /proc/sys is read-only or the key is absent, which callers log.
    """
    try:
        Path("/proc/sys", path).write_text(value)
    except OSError as exc:
        current = _read_sysctl(path)
        if current != value:
            log.warning(
                "sysctl not set",
                extra={"fields": {"key": path, "want": value, "is": current, "error": exc}},
            )
        return current == value
    return True


def _read_sysctl(path: str) -> str | None:
    try:
        return Path("/proc/sys", path).read_text().strip()
    except OSError:
        return None


_Job = tuple[Callable[[Worker], Any], Callable[[outcome.Outcome[Any]], None]]


class Kernel:
    """A small pool of kernel threads, started on first use and stopped by `close()`."""

    def __init__(self, *, threads: int = 4, netns: str | None = None) -> None:
        self.netns = netns
        self._size = threads
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._indexes: dict[str, int] = {}  # shared by the workers: see Worker.cached_index

    async def run(self, fn: Callable[[Worker], T]) -> T:
        """Run `fn(worker)` on a kernel thread and return its result (or raise its error).

        Once handed over, the call cannot be cancelled: the kernel finishes what it started,
        and the caller learns the result, so no operation is left half-known.
        """
        self._start()
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()

        def done(result: outcome.Outcome[Any]) -> None:
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        self._queue.put((fn, done))

        def abort(_: Any) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.FAILED

        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    def _start(self) -> None:
        if self._threads:
            return
        with self._lock:
            if self._threads:
                return
            ready: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
            for n in range(self._size):
                thread = threading.Thread(
                    target=self._serve, args=(ready,), name=f"netplug-kernel-{n}", daemon=True
                )
                thread.start()
                self._threads.append(thread)
            for _ in range(self._size):
                problem = ready.get()
                if problem is not None:
                    raise KernelError(f"cannot open netlink: {problem}")

    def _serve(self, ready: queue.SimpleQueue[BaseException | None]) -> None:
        try:
            if self.netns:
                from pyroute2 import netns as pyroute2_netns

                pyroute2_netns.setns(self.netns, flags=0)
            worker = Worker(Rtnl(), self._indexes)
        except BaseException as exc:  # reported to the caller of _start
            ready.put(exc)
            return
        ready.put(None)
        try:
            while (job := self._queue.get()) is not None:
                fn, done = job
                done(outcome.capture(fn, worker))
        finally:
            worker.close()

    def close(self) -> None:
        threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            thread.join(timeout=5)
