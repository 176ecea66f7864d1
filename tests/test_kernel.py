"""The bridge backend on real netlink and nftables, driven through the protocol socket, in
namespaces these tests create and delete (see tests/kernel.py for the topology)."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.kernel import (
    Container,
    NetNS,
    Plugin,
    binding,
    eid,
    iptables_leftovers,
    netplug_links,
    nft_leftovers,
    nft_table,
    nid,
    ping,
)

pytestmark = pytest.mark.kernel

PORTMAP = "com.docker.network.portmap"


def create_network(
    plugin: Plugin,
    network_id: str,
    pool: str,
    *,
    options: dict[str, str] | None = None,
    internal: bool = False,
    pool6: str = "",
) -> None:
    subnet = ipaddress.ip_network(pool)
    gateway = f"{next(subnet.hosts())}/{subnet.prefixlen}"
    body: dict[str, Any] = {
        "NetworkID": network_id,
        "Options": {
            "com.docker.network.enable_ipv6": bool(pool6),
            "com.docker.network.generic": options or {},
        },
        "IPv4Data": [{"AddressSpace": "LocalDefault", "Pool": pool, "Gateway": gateway}],
        "IPv6Data": [],
    }
    if internal:
        body["Options"]["com.docker.network.internal"] = True
    if pool6:
        body["IPv6Data"] = [{"Pool": pool6, "Gateway": pool6.replace("::/", "::1/")}]
    assert plugin.call("CreateNetwork", body) == {}


class Net:
    """One network with helpers to start "containers" on it the way dockerd does."""

    def __init__(self, plugin: Plugin, n: int, pool: str, **kw: Any) -> None:
        self.plugin, self.n, self.id, self.pool = plugin, n, nid(n), pool
        self.pool6 = kw.get("pool6", "")
        create_network(plugin, self.id, pool, **kw)
        self.containers: list[Container] = []
        self._next = 2

    def run(
        self, ports: list[dict[str, Any]] | None = None, mac: str = ""
    ) -> tuple[Container, str]:
        host_part = self._next
        self._next += 1
        address = self.pool.rsplit(".", 1)[0] + f".{host_part}/" + self.pool.split("/")[1]
        address6 = self.pool6.replace("::/", f"::{host_part}/") if self.pool6 else ""
        endpoint = eid(self.n * 1000 + host_part)
        ids = {"NetworkID": self.id, "EndpointID": endpoint}
        reply = self.plugin.call(
            "CreateEndpoint",
            {
                **ids,
                "Interface": {"Address": address, "AddressIPv6": address6, "MacAddress": mac},
                "Options": {PORTMAP: ports} if ports else {},
            },
        )
        mac = mac or reply["Interface"]["MacAddress"]
        join = self.plugin.call(
            "Join", {**ids, "SandboxKey": "/var/run/docker/netns/x", "Options": {}}
        )
        container = Container(self.plugin.host, join, address, mac, address6)
        if ports:
            self.plugin.call("ProgramExternalConnectivity", {**ids, "Options": {PORTMAP: ports}})
        self.containers.append(container)
        return container, endpoint

    def stop(self, container: Container, endpoint: str) -> None:
        """docker stop: Revoke, Leave, the sandbox goes (the veth with it), DeleteEndpoint."""
        ids = {"NetworkID": self.id, "EndpointID": endpoint}
        self.plugin.call("RevokeExternalConnectivity", ids)
        self.plugin.call("Leave", ids)
        container.delete()
        self.plugin.call("DeleteEndpoint", ids)

    def delete(self) -> None:
        assert self.plugin.call("DeleteNetwork", {"NetworkID": self.id}) == {}


def assert_clean(plugin: Plugin) -> None:
    host = plugin.host
    assert netplug_links(host) == []
    assert nft_leftovers(host) == []
    assert nft_table(host) == {}  # with no network left, netplug's table goes too
    assert iptables_leftovers(host) == []
    assert plugin.records() == []
    status = plugin.call("/Netplug.Status")
    assert status["networks"] == []
    assert status["endpoints"] == []


@pytest.fixture
def net(plugin: Plugin) -> Iterator[Net]:
    network = Net(plugin, 1, "10.77.0.0/24", options={"mtu": "1400"})
    yield network
    for c in network.containers:
        c.delete()


def tcp_server(container: Container, port: int) -> Any:
    script = (
        "import socket\n"
        "s=socket.socket(socket.AF_INET);"
        "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
        f"s.bind(('0.0.0.0',{port}));s.listen(16)\n"
        "while True:\n"
        " c,a=s.accept()\n"
        " c.sendall(('hello from %s via %s'%(c.getsockname()[0],a[0])).encode());c.close()\n"
    )
    proc = container.ns.popen("python3", "-c", script)
    time.sleep(0.3)
    return proc


def udp_server(container: Container, port: int) -> Any:
    script = (
        "import socket\n"
        f"s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('0.0.0.0',{port}))\n"
        "while True:\n"
        " d,a=s.recvfrom(100);s.sendto(b'udp:'+d,a)\n"
    )
    proc = container.ns.popen("python3", "-c", script)
    time.sleep(0.3)
    return proc


def tcp_get(ns: NetNS, address: str, port: int) -> str:
    script = (
        "import socket,sys\n"
        f"s=socket.create_connection(('{address}',{port}),timeout=3)\n"
        "sys.stdout.write(s.recv(200).decode())\n"
    )
    result = ns.run("python3", "-c", script, check=False, timeout=10)
    return result.stdout if result.returncode == 0 else f"FAILED: {result.stderr.strip()[-200:]}"


def udp_ask(ns: NetNS, address: str, port: int) -> str:
    script = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(3)\n"
        f"s.sendto(b'ping',('{address}',{port}));sys.stdout.write(s.recv(100).decode())\n"
    )
    result = ns.run("python3", "-c", script, check=False, timeout=10)
    return result.stdout if result.returncode == 0 else "FAILED"


def test_containers_talk_nat_ports_and_cleanup(
    plugin: Plugin, topology: tuple[NetNS, NetNS]
) -> None:
    host, world = topology
    net = Net(plugin, 1, "10.77.0.0/24", options={"mtu": "1400"})
    ports = [
        binding(18080),
        binding(15353, port=53, proto=17),
    ]
    web, web_ep = net.run(ports)
    client, client_ep = net.run()
    servers = [tcp_server(web, 80), udp_server(web, 53)]
    try:
        # containers reach each other and the gateway
        assert ping(client.ns, web.address)
        assert ping(web.ns, "10.77.0.1")
        # MTU on both veth ends and on the bridge
        assert web.ns.links()["eth0"]["mtu"] == 1400
        host_links = host.links()
        assert all(host_links[name]["mtu"] == 1400 for name in netplug_links(host))
        # egress through NAT: world has no route back to 10.77.0.0/24
        assert ping(client.ns, "10.254.0.2")
        # published TCP port: from another host, from the host itself, from a container
        assert tcp_get(world, "10.254.0.1", 18080).startswith("hello from 10.77.0.2")
        assert tcp_get(host, "127.0.0.1", 18080).startswith("hello from 10.77.0.2")
        assert tcp_get(host, "10.254.0.1", 18080).startswith("hello from 10.77.0.2")
        assert tcp_get(client.ns, "10.254.0.1", 18080).startswith("hello from 10.77.0.2")
        # a container reaching its own published port (hairpin)
        assert tcp_get(web.ns, "10.254.0.1", 18080).startswith("hello from 10.77.0.2")
        # UDP
        assert udp_ask(world, "10.254.0.1", 15353) == "udp:ping"
        # the world sees the host's address (NAT), not the container's, for outgoing traffic
        assert "via 10.254.0.2" in tcp_get(world, "10.254.0.1", 18080)
        # nothing unpublished is reachable from outside
        world.run("ip", "route", "add", "10.77.0.0/24", "via", "10.254.0.1")
        assert not ping(world, web.address)
        assert tcp_get(world, web.address, 80).startswith("FAILED")
        # Revoke unpublishes
        ids = {"NetworkID": net.id, "EndpointID": web_ep}
        plugin.call("RevokeExternalConnectivity", ids)
        assert tcp_get(world, "10.254.0.1", 18080).startswith("FAILED")
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()
    net.stop(web, web_ep)
    net.stop(client, client_ep)
    net.delete()
    assert_clean(plugin)


def test_ports_removed_by_leave_and_delete_without_revoke(
    plugin: Plugin, topology: tuple[NetNS, NetNS]
) -> None:
    _, world = topology
    net = Net(plugin, 2, "10.78.0.0/24")
    ports = [binding(18081)]
    web, endpoint = net.run(ports)
    server = tcp_server(web, 80)
    try:
        assert tcp_get(world, "10.254.0.1", 18081).startswith("hello")
        ids = {"NetworkID": net.id, "EndpointID": endpoint}
        plugin.call("Leave", ids)  # no Revoke first (live-restore, HEAD dockerd)
        assert tcp_get(world, "10.254.0.1", 18081).startswith("FAILED")
    finally:
        server.kill()
        server.wait()
    web.delete()  # the sandbox goes: the kernel deletes the pair
    plugin.call("DeleteEndpoint", ids)
    plugin.call("DeleteEndpoint", ids)  # idempotent
    net.delete()
    net.delete()
    assert_clean(plugin)


def test_isolation_between_networks_and_icc(plugin: Plugin) -> None:
    a = Net(plugin, 3, "10.81.0.0/24")
    b = Net(plugin, 4, "10.82.0.0/24")
    c = Net(plugin, 5, "10.83.0.0/24", options={"icc": "false"})
    a1, _ = a.run()
    a2, _ = a.run()
    b1, _ = b.run()
    c1, _ = c.run()
    c2, _ = c.run()
    try:
        assert ping(a1.ns, a2.address)
        assert not ping(a1.ns, b1.address)
        assert not ping(b1.ns, a1.address)
        assert ping(b1.ns, "10.82.0.1")
        # icc=false: no container-to-container traffic, the gateway still answers
        assert not ping(c1.ns, c2.address)
        assert ping(c1.ns, "10.83.0.1")
        assert ping(c1.ns, "10.254.0.2")
    finally:
        for container in (a1, a2, b1, c1, c2):
            container.delete()


def test_internal_network_has_no_way_out(plugin: Plugin) -> None:
    net = Net(plugin, 6, "10.84.0.0/24", internal=True)
    c1, _ = net.run()
    c2, _ = net.run()
    try:
        assert ping(c1.ns, c2.address)
        assert not ping(c1.ns, "10.254.0.2")
        # even with a route added by hand, the host does not forward it
        c1.ns.run("ip", "route", "add", "default", "via", "10.84.0.1")
        assert not ping(c1.ns, "10.254.0.2")
    finally:
        c1.delete()
        c2.delete()


def test_ipv6(plugin: Plugin) -> None:
    net = Net(plugin, 7, "10.85.0.0/24", pool6="fd00:85::/64")
    c1, _ = net.run()
    c2, _ = net.run()
    try:
        assert ping(c1.ns, "fd00:85::3")
        assert ping(c2.ns, "fd00:85::1")
    finally:
        c1.delete()
        c2.delete()


def test_mac_given_is_kept_and_derived_mac_is_stable(plugin: Plugin) -> None:
    net = Net(plugin, 8, "10.86.0.0/24")
    c1, _ = net.run(mac="02:00:00:00:00:42")
    c2, _ = net.run()
    try:
        assert c1.ns.links()["eth0"]["address"] == "02:00:00:00:00:42"
        # derived from the IPv4 address (10.86.0.3), as Docker's bridge does
        assert c2.ns.links()["eth0"]["address"] == "02:42:0a:56:00:03"
    finally:
        c1.delete()
        c2.delete()


def test_bridge_name_adopts_existing_bridge(plugin: Plugin) -> None:
    host = plugin.host
    host.run("ip", "link", "add", "mybr0", "type", "bridge")
    net = Net(plugin, 9, "10.87.0.0/24", options={"com.docker.network.bridge.name": "mybr0"})
    c1, ep = net.run()
    assert ping(c1.ns, "10.87.0.1")
    net.stop(c1, ep)
    net.delete()
    links = host.links()
    assert "mybr0" in links  # adopted: left in place
    addresses = host.run("ip", "-br", "addr", "show", "mybr0").stdout
    assert "10.87.0.1" not in addresses
    assert_clean(plugin)


def test_network_delete_finishes_after_the_answer_before_the_next_network_call(
    plugin: Plugin,
) -> None:
    """DeleteNetwork answers before its bridge is gone; a CreateNetwork right after waits for
    that work, so a network named like the old bridge gets a bridge of its own (not the old
    one adopted and then deleted under it)."""
    host = plugin.host
    for n in range(3):
        Net(plugin, 30 + n, "10.86.0.0/24", options={"bridge_name": "reuse0"})
        plugin.call("DeleteNetwork", {"NetworkID": nid(30 + n)}, settle=False)
    create_network(plugin, nid(40), "10.86.0.0/24", options={"bridge_name": "reuse0"})
    status = plugin.call("/Netplug.Status")
    assert [(x["id"], x["state"]) for x in status["networks"]] == [(nid(40), "ready")]
    assert status["networks"][0]["links"] == {"bridge": "reuse0", "adopted": "0"}
    assert "10.86.0.1/24" in host.run("ip", "-br", "addr", "show", "reuse0").stdout
    plugin.call("DeleteNetwork", {"NetworkID": nid(40)})
    assert "reuse0" not in host.links()  # netplug made it, netplug removed it
    assert_clean(plugin)


def test_iptables_accept_rules_follow_the_networks(plugin: Plugin) -> None:
    """One wildcard pair for the bridges netplug names (made with the first network, removed
    with the last), ip6tables only with an IPv6 network, a pair per `-o bridge_name` bridge."""
    host = plugin.host

    def rules(binary: str) -> list[str]:
        out = host.run(binary, "-S", "FORWARD").stdout
        return sorted(line.split(" -m ")[0] for line in out.splitlines() if "netplug" in line)

    wildcard = ["-A FORWARD -i npb+", "-A FORWARD -o npb+"]
    first = Net(plugin, 50, "10.60.0.0/24")
    assert rules("iptables") == wildcard
    assert rules("ip6tables") == []
    v6 = Net(plugin, 51, "10.61.0.0/24", pool6="fd00:61::/64")
    custom = Net(plugin, 52, "10.62.0.0/24", options={"bridge_name": "custom0"})
    own = ["-A FORWARD -i custom0", "-A FORWARD -o custom0"]
    assert rules("iptables") == sorted([*wildcard, *own])
    assert rules("ip6tables") == wildcard
    c1, ep = first.run()
    assert ping(c1.ns, "10.60.0.1")  # through FORWARD, whose policy is DROP here
    first.stop(c1, ep)
    custom.delete()
    assert rules("iptables") == wildcard
    first.delete()
    assert rules("iptables") == wildcard  # the IPv6 network still uses it
    v6.delete()
    assert rules("iptables") == rules("ip6tables") == []
    assert_clean(plugin)


def test_table_removed_behind_netplugs_back(plugin: Plugin) -> None:
    """netplug remembers that its table exists; if someone deletes it, the next network brings
    it back, and `netplug gc` restores the chains of the networks that were there."""
    host = plugin.host

    def chains() -> set[str]:
        items = nft_table(host).get("nftables", [])
        return {x["chain"]["name"] for x in items if "chain" in x and "net_" in x["chain"]["name"]}

    first = Net(plugin, 60, "10.63.0.0/24")
    host.run("nft", "delete", "table", "inet", "netplug")
    second = Net(plugin, 61, "10.64.0.0/24")
    assert chains() == {f"net_{nid(61)[:12]}_{s}" for s in ("in", "out", "nat_in", "nat_out")}
    plugin.call("/Netplug.GC")
    assert len(chains()) == 8  # both networks again
    c1, ep = first.run()
    assert ping(c1.ns, "10.63.0.1")
    first.stop(c1, ep)
    first.delete()
    second.delete()
    assert_clean(plugin)


def test_bridge_name_in_use_and_bad_input_leave_nothing(plugin: Plugin) -> None:
    Net(plugin, 10, "10.88.0.0/24", options={"bridge_name": "shared0"})
    with pytest.raises(Exception, match="already used by netplug network"):
        create_network(plugin, nid(11), "10.89.0.0/24", options={"bridge_name": "shared0"})
    with pytest.raises(Exception, match=r"at most 15|1 to 15"):
        create_network(plugin, nid(11), "10.89.0.0/24", options={"bridge_name": "x" * 16})
    with pytest.raises(Exception, match="overlaps"):
        create_network(plugin, nid(11), "10.88.0.128/25")
    assert len(netplug_links(plugin.host)) == 0  # shared0 is not a generated name
    assert "shared0" in plugin.host.links()
    assert plugin.records() == [f"networks/{nid(10)}.json"]


def test_masquerade_off_and_host_ip_binding(plugin: Plugin, topology: tuple[NetNS, NetNS]) -> None:
    host, world = topology
    net = Net(plugin, 12, "10.94.0.0/24", options={"masquerade": "false"})
    # -p 127.0.0.1:18094:80 binds only the host's loopback address
    ports = [binding(18094, host_ip="127.0.0.1")]
    web, web_ep = net.run(ports)
    server = tcp_server(web, 80)
    try:
        # no masquerade: the world sees the container's own address, so it needs a route back
        assert not ping(web.ns, "10.254.0.2")
        world.run("ip", "route", "add", "10.94.0.0/24", "via", "10.254.0.1")
        assert ping(web.ns, "10.254.0.2")
        assert tcp_get(host, "127.0.0.1", 18094).startswith("hello from 10.94.0.2")
        assert tcp_get(world, "10.254.0.1", 18094).startswith("FAILED")
    finally:
        server.kill()
        server.wait()
    net.stop(web, web_ep)
    net.delete()
    assert_clean(plugin)


def test_icc_off_and_published_ports(plugin: Plugin, topology: tuple[NetNS, NetNS]) -> None:
    _, world = topology
    net = Net(plugin, 13, "10.95.0.0/24", options={"icc": "false"})
    ports = [binding(18095)]
    web, web_ep = net.run(ports)
    client, client_ep = net.run()
    server = tcp_server(web, 80)
    try:
        assert not ping(client.ns, web.address)  # no direct container-to-container traffic
        # the published port works from outside and from the host...
        assert tcp_get(world, "10.254.0.1", 18095).startswith("hello from 10.95.0.2")
        assert tcp_get(plugin.host, "127.0.0.1", 18095).startswith("hello from 10.95.0.2")
        # ...but not from the same network: with br_netfilter the DNAT'd packet is bridged
        # back between two isolated ports (docs/differences.md)
        assert tcp_get(client.ns, "10.254.0.1", 18095).startswith("FAILED")
    finally:
        server.kill()
        server.wait()
    net.stop(web, web_ep)
    net.stop(client, client_ep)
    net.delete()
    assert_clean(plugin)
