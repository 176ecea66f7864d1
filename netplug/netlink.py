"""Netlink (and other kernel calls) off the event loop.

The kernel runs an rtnetlink request inside the sender's `sendmsg()`, so a call made on the trio
thread stalls every other request for its whole duration (a veth delete takes ~16 ms). `Kernel`
owns a few worker threads; each one enters the configured network namespace, opens its own
pyroute2 `IPRoute` (pyroute2 objects must not be shared across threads) and runs the functions
trio tasks hand it. Deletions are serialized per netlink socket in the kernel, so several threads
multiply their throughput.

This module is also the one place that maps netlink errno values to netplug errors and that
derives interface names from Docker IDs. pyroute2 is imported inside the worker threads only:
the server listens before the heavy import happens.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import queue
import re
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import outcome
import trio

from netplug.errors import InvalidRequest, KernelError, LinkExists, LinkMissing

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


class Link(msgspec.Struct, frozen=True):
    index: int
    name: str
    kind: str
    master: int
    mtu: int
    mac: str
    up: bool


@contextmanager
def kernel_errors(what: str) -> Iterator[None]:
    """Translate pyroute2's NetlinkError into netplug errors that say what failed."""
    from pyroute2 import NetlinkError

    try:
        yield
    except NetlinkError as exc:
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
        if code == errno.EOPNOTSUPP:
            raise KernelError(f"{what}: the kernel does not support it ({text})") from exc
        raise KernelError(f"{what}: {text} (errno {code})") from exc


class Worker:
    """What a function running on a kernel thread receives: the thread's own resources."""

    def __init__(self, ipr: IPRoute, indexes: dict[str, int] | None = None) -> None:
        self.ipr = ipr
        self.resources: dict[str, Any] = {}
        self._indexes = indexes if indexes is not None else {}

    def cached_index(self, name: str) -> int:
        """The index of a long-lived link (a bridge), remembered across calls and threads.
        Whoever deletes or recreates that link calls `forget`."""
        index = self._indexes.get(name)
        if index is None:
            index = self._indexes[name] = self.index(name)
        return index

    def forget(self, name: str) -> None:
        self._indexes.pop(name, None)

    # --- typed wrappers over the parts of IPRoute netplug uses -----------------------------

    def link(self, name: str) -> Link | None:
        indexes = self.ipr.link_lookup(ifname=name)
        if not indexes:
            return None
        with kernel_errors(f"reading link {name}"):
            (msg,) = self.ipr.get_links(indexes[0])
        return _link_of(msg)

    def links(self) -> list[Link]:
        with kernel_errors("listing links"):
            return [_link_of(msg) for msg in self.ipr.get_links()]

    def add_bridge(self, name: str, *, mtu: int | None, mac: str) -> int:
        extra: dict[str, Any] = {"mtu": mtu} if mtu else {}
        with kernel_errors(f"creating bridge {name}"):
            self.ipr.link("add", ifname=name, kind="bridge", address=mac, **extra)
        return self.index(name)

    def add_veth(
        self, host: str, peer: str, *, master: int, mtu: int | None, peer_mac: str
    ) -> None:
        """One RTM_NEWLINK: the pair, the host end on the bridge and up, MTU on both ends."""
        extra: dict[str, Any] = {"mtu": mtu} if mtu else {}
        with kernel_errors(f"creating veth {host}/{peer}"):
            self.ipr.link(
                "add",
                ifname=host,
                kind="veth",
                peer={"ifname": peer, "address": peer_mac, **extra},
                master=master,
                state="up",
                **extra,
            )

    def set_link(self, name: str, **attrs: Any) -> None:
        with kernel_errors(f"configuring link {name}"):
            self.ipr.link("set", index=self.index(name), **attrs)

    def set_ipv4_conf(self, name: str, key: int, value: int) -> None:
        """Set one per-interface IPv4 setting (`net.ipv4.conf.<name>.*`) through netlink.

        Inside a managed plugin /proc/sys is read-only, but RTM_SETLINK with
        IFLA_AF_SPEC/AF_INET/IFLA_INET_CONF sets the same values with CAP_NET_ADMIN alone.
        pyroute2 decodes that attribute but cannot encode it, so the message is built here.
        """
        index = self.index(name)

        def nla(kind: int, payload: bytes) -> bytes:
            length = 4 + len(payload)
            return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)

        conf = nla(key, struct.pack("=I", value))
        body = nla(_IFLA_AF_SPEC | _NESTED, nla(socket.AF_INET | _NESTED, nla(1 | _NESTED, conf)))
        message = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, 0, 0) + body
        header = struct.pack("=IHHII", 16 + len(message), _RTM_SETLINK, 0x1 | 0x4, 1, 0)
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
            sock.send(header + message)
            reply = sock.recv(4096)
        code = -struct.unpack("=i", reply[16:20])[0]
        if code:
            raise KernelError(
                f"setting ipv4 conf {key}={value} on {name}: {os.strerror(code)} (errno {code})"
            )

    def set_bridge_port(self, name: str, **attrs: int) -> None:
        """Bridge-port flags (IFLA_BRPORT_*): mode=1 is hairpin, isolated=1 port isolation."""
        with kernel_errors(f"configuring bridge port {name}"):
            self.ipr.brport("set", index=self.index(name), **attrs)

    def delete_link(self, name: str) -> bool:
        """Delete a link by name; False when it was already gone (that is success)."""
        try:
            with kernel_errors(f"deleting link {name}"):
                self.ipr.link("del", ifname=name)
        except LinkMissing:
            return False
        return True

    def index(self, name: str) -> int:
        indexes = self.ipr.link_lookup(ifname=name)
        if not indexes:
            raise LinkMissing(f"link {name}: no such device")
        return int(indexes[0])

    def addresses(self, index: int) -> set[str]:
        with kernel_errors(f"listing addresses of link {index}"):
            return {
                f"{msg.get('IFA_ADDRESS')}/{msg['prefixlen']}"
                for msg in self.ipr.get_addr(index=index)
            }

    def add_address(self, index: int, cidr: str) -> bool:
        """Add an address; False when it was already there."""
        address, prefix = cidr.split("/")
        try:
            with kernel_errors(f"adding address {cidr}"):
                self.ipr.addr("add", index=index, address=address, prefixlen=int(prefix))
        except LinkExists:
            return False
        return True

    def delete_address(self, index: int, cidr: str) -> None:
        address, prefix = cidr.split("/")
        try:
            with kernel_errors(f"deleting address {cidr}"):
                self.ipr.addr("del", index=index, address=address, prefixlen=int(prefix))
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


_RTM_SETLINK = 19
_IFLA_AF_SPEC = 26
_NESTED = 0x8000
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
            from pyroute2 import IPRoute

            # pyroute2 sets its own loggers' levels when imported; keep them quiet.
            logging.getLogger("pyroute2").setLevel(max(logging.WARNING, log.getEffectiveLevel()))
            worker = Worker(IPRoute(ext_ack=True), self._indexes)
        except BaseException as exc:  # reported to the caller of _start
            ready.put(exc)
            return
        ready.put(None)
        try:
            while (job := self._queue.get()) is not None:
                fn, done = job
                done(outcome.capture(fn, worker))
        finally:
            for resource in worker.resources.values():
                close = getattr(resource, "close", None)
                if close is not None:
                    close()
            worker.ipr.close()

    def close(self) -> None:
        threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            thread.join(timeout=5)
