"""Helpers for the kernel tests: throwaway network namespaces and a real `netplug serve`.

The topology every kernel test gets:

    world (10.254.0.2) --veth-- host (10.254.0.1, uplink `up0`) -- netplug bridges -- containers

`host` plays the Docker host: netplug works there, iptables' FORWARD policy is DROP and
br_netfilter hands bridged traffic to iptables, as dockerd leaves a host. `world` plays the
internet: it has no route to container subnets, so only NAT'd traffic gets answers. Containers are
namespaces into which the test moves the veth end netplug made, as dockerd does. All traffic stays
inside these namespaces.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from netplug.cli import call

_counter = itertools.count()


def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr}")
    return result


class NetNS:
    def __init__(self, role: str) -> None:
        self.name = f"npt{os.getpid() % 100000}{role}{next(_counter)}"
        sh("ip", "netns", "add", self.name)
        self.run("ip", "link", "set", "lo", "up")

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.name, *cmd, check=check, timeout=timeout)

    def ok(self, *cmd: str, timeout: float = 30) -> bool:
        return self.run(*cmd, check=False, timeout=timeout).returncode == 0

    def popen(self, *cmd: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["ip", "netns", "exec", self.name, *cmd],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    def sysctl(self, key: str, value: str) -> None:
        self.run("sysctl", "-qw", f"{key}={value}")

    def links(self) -> dict[str, dict[str, Any]]:
        data = json.loads(self.run("ip", "-j", "-d", "link", "show").stdout)
        return {item["ifname"]: item for item in data}

    def delete(self) -> None:
        # Under load `ip netns del` can fail while the last process of the namespace is still
        # exiting; try again before giving up, so that no namespace outlives its test.
        for _ in range(50):
            if not Path(f"/run/netns/{self.name}").exists():
                return
            if sh("ip", "netns", "del", self.name, check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError(f"namespace {self.name} could not be deleted")


def ping(ns: NetNS, address: str, count: int = 1) -> bool:
    six = ":" in address
    return ns.ok("ping", "-6" if six else "-4", "-c", str(count), "-W", "1", "-q", address)


class Plugin:
    """`netplug serve` in the host namespace, driven over its socket like dockerd does."""

    def __init__(self, host: NetNS, workdir: Path) -> None:
        self.host = host
        self.socket = workdir / "netplug.sock"
        self.state_dir = workdir / "state"
        self.log = workdir / "netplug.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_level = "debug"

    @property
    def exe(self) -> str:
        found = shutil.which("netplug") or str(Path(sys.executable).parent / "netplug")
        return found

    def start(self, *, wait: bool = True) -> None:
        # The process runs in the host namespace, as the managed plugin runs in the host's.
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.host.name,
                    self.exe,
                    "serve",
                    "--socket",
                    str(self.socket),
                    "--state-dir",
                    str(self.state_dir),
                    "--log-level",
                    self.log_level,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"netplug exited {self.proc.returncode}:\n{self.logs()}")
            try:
                call(self.socket, "/Netplug.Status", timeout=30)  # waits for the restore
                return
            except OSError:
                time.sleep(0.02)
        raise AssertionError(f"netplug did not listen in {timeout}s:\n{self.logs()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def logs(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def call(
        self, name: str, body: dict[str, Any] | None = None, *, settle: bool = True
    ) -> dict[str, Any]:
        """One call over the socket. netplug answers DeleteEndpoint and DeleteNetwork before
        their links are gone; with `settle` this waits for that work, so that what follows
        sees the kernel as the deletion leaves it."""
        data = json.dumps(body).encode() if body is not None else b""
        path = name if name.startswith("/") else f"/NetworkDriver.{name}"
        result: dict[str, Any] = call(self.socket, path, data)
        if settle and name in {"DeleteEndpoint", "DeleteNetwork"}:
            self.settle()
        return result

    def settle(self, timeout: float = 10) -> None:
        """Wait until no deletion is finishing in the background (its record goes last)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.call("/Netplug.Status")
            pending = [
                record["id"][:12]
                for record in status["networks"] + status["endpoints"]
                if record["state"] == "deleting"
            ]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"still deleting after {timeout}s: {pending}")
            time.sleep(0.01)

    def records(self) -> list[str]:
        return sorted(
            str(p.relative_to(self.state_dir)) for p in self.state_dir.rglob("*") if p.is_file()
        )


def make_topology() -> tuple[NetNS, NetNS]:
    host, world = NetNS("h"), NetNS("w")
    host.run("ip", "link", "add", "up0", "type", "veth", "peer", "name", "wan0")
    host.run("ip", "link", "set", "wan0", "netns", world.name)
    host.run("ip", "addr", "add", "10.254.0.1/24", "dev", "up0")
    host.run("ip", "link", "set", "up0", "up")
    world.run("ip", "addr", "add", "10.254.0.2/24", "dev", "wan0")
    world.run("ip", "link", "set", "wan0", "up")
    host.sysctl("net.ipv4.ip_forward", "1")
    host.sysctl("net.ipv6.conf.all.forwarding", "1")
    # What dockerd leaves on a host: FORWARD policy DROP, bridged traffic through iptables.
    host.run("iptables", "-P", "FORWARD", "DROP")
    host.run("ip6tables", "-P", "FORWARD", "DROP")
    if Path("/proc/sys/net/bridge").exists():
        host.sysctl("net.bridge.bridge-nf-call-iptables", "1")
        host.sysctl("net.bridge.bridge-nf-call-ip6tables", "1")
    return host, world


class Container:
    """A namespace holding the container end of an endpoint, configured as dockerd would."""

    def __init__(
        self, host: NetNS, join: dict[str, Any], address: str, mac: str = "", address6: str = ""
    ) -> None:
        self.ns = NetNS("c")
        src = join["InterfaceName"]["SrcName"]
        prefix = join["InterfaceName"]["DstPrefix"]
        host.run("ip", "link", "set", src, "netns", self.ns.name)
        run = self.ns.run
        run("ip", "link", "set", src, "name", f"{prefix}0")
        if mac:
            run("ip", "link", "set", f"{prefix}0", "address", mac)
        if address:
            run("ip", "addr", "add", address, "dev", f"{prefix}0")
        if address6:
            run("ip", "addr", "add", address6, "dev", f"{prefix}0", "nodad")
        run("ip", "link", "set", f"{prefix}0", "up")
        if join.get("Gateway"):
            run("ip", "route", "add", "default", "via", join["Gateway"])
        if join.get("GatewayIPv6"):
            run("ip", "-6", "route", "add", "default", "via", join["GatewayIPv6"])
        self.address = address.split("/")[0]

    def delete(self) -> None:
        self.ns.delete()


def netplug_links(ns: NetNS) -> list[str]:
    from netplug.netlink import OWNED_NAME

    return sorted(name for name in ns.links() if OWNED_NAME.match(name))


def nft_table(ns: NetNS) -> dict[str, Any]:
    result = ns.run("nft", "-j", "list", "table", "inet", "netplug", check=False)
    if result.returncode != 0:
        return {}
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def nft_leftovers(ns: NetNS) -> list[str]:
    """Network chains and map elements in netplug's table (the skeleton itself is fine)."""
    found = []
    for item in nft_table(ns).get("nftables", []):
        if "chain" in item and item["chain"]["name"].startswith("net_"):
            found.append(f"chain {item['chain']['name']}")
        if "map" in item and item["map"].get("elem"):
            found.append(f"map {item['map']['name']} {item['map']['elem']}")
    return found


def iptables_leftovers(ns: NetNS) -> list[str]:
    out = ns.run("iptables", "-S", "FORWARD").stdout + ns.run("ip6tables", "-S", "FORWARD").stdout
    return [line for line in out.splitlines() if "netplug" in line]


def binding(host_port: int, *, port: int = 80, proto: int = 6, host_ip: str = "") -> dict[str, Any]:
    """One `com.docker.network.portmap` entry, as dockerd sends it for `-p`."""
    return {
        "Proto": proto,
        "IP": "",
        "Port": port,
        "HostIP": host_ip,
        "HostPort": host_port,
        "HostPortEnd": host_port,
    }


def nid(n: int) -> str:
    return f"{n:x}".rjust(12, "a") + "0" * 52


def eid(n: int) -> str:
    return f"{n:x}".rjust(12, "e") + "1" * 52


def ids(n: int) -> Iterator[str]:
    return (eid(i) for i in range(n))
