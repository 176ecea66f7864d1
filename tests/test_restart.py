"""Restarts, crashes and reboots of a real `netplug serve` in throwaway namespaces."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import pytest

from tests.kernel import (
    NetNS,
    Plugin,
    binding,
    iptables_leftovers,
    netplug_links,
    nft_leftovers,
    ping,
)
from tests.test_kernel import PORTMAP, Net, assert_clean, tcp_get, tcp_server

pytestmark = pytest.mark.kernel


def drift(plugin: Plugin) -> list[str]:
    status = plugin.call("/Netplug.Status")
    found: list[str] = status["kernel"]["bridge"]["drift"]
    return found


def test_sigterm_stops_fast_and_state_survives(
    plugin: Plugin, topology: tuple[NetNS, NetNS]
) -> None:
    _, world = topology
    net = Net(plugin, 20, "10.90.0.0/24")
    ports = [binding(18090)]
    web, web_ep = net.run(ports)
    client, client_ep = net.run()
    started = time.monotonic()
    assert plugin.stop() == 0
    assert time.monotonic() - started < 1.0
    assert "msg=stopped" in plugin.logs()
    # Running containers keep their connectivity while the plugin is down.
    assert ping(client.ns, web.address)
    plugin.start()
    assert drift(plugin) == []
    status = plugin.call("/Netplug.Status")
    assert {e["id"] for e in status["endpoints"]} == {web_ep, client_ep}
    server = tcp_server(web, 80)
    try:
        assert tcp_get(world, "10.254.0.1", 18090).startswith("hello")
        assert ping(client.ns, "10.254.0.2")
        # a new container after the restart works too
        third, third_ep = net.run()
        assert ping(third.ns, web.address)
    finally:
        server.kill()
        server.wait()
    for container, endpoint in ((web, web_ep), (client, client_ep), (third, third_ep)):
        net.stop(container, endpoint)
    net.delete()
    assert_clean(plugin)


def test_reboot_is_repaired_at_start(plugin: Plugin, topology: tuple[NetNS, NetNS]) -> None:
    host, world = topology
    net = Net(plugin, 21, "10.91.0.0/24", options={"mtu": "1400"})
    old, _ = net.run([binding(18091)])
    assert plugin.stop() == 0
    # A reboot: containers and every kernel object are gone, the state directory is kept.
    old.delete()
    for name in netplug_links(host):
        host.run("ip", "link", "del", name, check=False)
    host.run("nft", "delete", "table", "inet", "netplug")
    host.run("iptables", "-F", "FORWARD")
    assert netplug_links(host) == []
    plugin.start()
    assert drift(plugin) == []
    links = host.links()
    bridge = f"npb{net.id[:12]}"
    assert links[bridge]["mtu"] == 1400
    assert "10.91.0.1" in host.run("ip", "-br", "addr", "show", bridge).stdout
    # The dead container's endpoint is gone, with its published port.
    status = plugin.call("/Netplug.Status")
    assert status["endpoints"] == []
    # dockerd restarts containers with new endpoint IDs: the network works again.
    web, web_ep = net.run([binding(18091)])
    client, client_ep = net.run()
    server = tcp_server(web, 80)
    try:
        assert ping(client.ns, web.address)
        assert ping(client.ns, "10.254.0.2")
        assert tcp_get(world, "10.254.0.1", 18091).startswith("hello")
    finally:
        server.kill()
        server.wait()
    net.stop(web, web_ep)
    net.stop(client, client_ep)
    net.delete()
    assert_clean(plugin)


def test_gc_removes_orphans(plugin: Plugin) -> None:
    host = plugin.host
    host.run("ip", "link", "add", "npb0123456789ab", "type", "bridge")
    host.run(
        "ip", "link", "add", "nph0123456789ab", "type", "veth", "peer", "name", "npc0123456789ab"
    )
    host.run("ip", "link", "add", "npxkeepme", "type", "bridge")  # not a netplug name
    net = Net(plugin, 22, "10.92.0.0/24")
    kept, kept_ep = net.run()
    collected = plugin.call("/Netplug.GC")["collected"]
    assert "bridge npb0123456789ab" in collected
    assert {"veth nph0123456789ab", "veth npc0123456789ab"} & set(collected)
    links = host.links()
    assert not {"npb0123456789ab", "nph0123456789ab", "npc0123456789ab"} & set(links)
    assert "npxkeepme" in links
    assert plugin.call("/Netplug.GC")["collected"] == []
    assert ping(kept.ns, "10.92.0.1")
    net.stop(kept, kept_ep)
    net.delete()
    assert_clean(plugin)


def lifecycle(plugin: Plugin, n: int, *, stop_after: int = 99) -> None:
    """What dockerd sends for `network create`, `run -p`, `stop`, `network rm`."""
    network_id = f"{n:012x}" + "ab" * 26
    endpoint_id = f"{n:012x}" + "cd" * 26
    ids = {"NetworkID": network_id, "EndpointID": endpoint_id}
    third = n % 200 + 10
    ports = [binding(20000 + n)]
    steps: list[tuple[str, dict[str, Any]]] = [
        (
            "CreateNetwork",
            {
                "NetworkID": network_id,
                "Options": {
                    "com.docker.network.enable_ipv6": False,
                    "com.docker.network.generic": {},
                },
                "IPv4Data": [{"Pool": f"10.{third}.0.0/24", "Gateway": f"10.{third}.0.1/24"}],
            },
        ),
        (
            "CreateEndpoint",
            {**ids, "Interface": {"Address": f"10.{third}.0.2/24"}, "Options": {PORTMAP: ports}},
        ),
        ("Join", {**ids, "SandboxKey": "/x", "Options": {PORTMAP: ports}}),
        ("ProgramExternalConnectivity", {**ids, "Options": {PORTMAP: ports}}),
        ("RevokeExternalConnectivity", ids),
        ("Leave", ids),
        ("DeleteEndpoint", ids),
        ("DeleteNetwork", {"NetworkID": network_id}),
    ]
    for name, body in steps[:stop_after]:
        plugin.call(name, body)


def test_kill_9_at_random_points(plugin: Plugin) -> None:
    """kill -9 in the middle of create, join and delete; restart; dockerd retries (the whole
    sequence again) or gives up (only the deletions); nothing leaks, the state is consistent."""
    rng = random.Random(1234)
    trials = 50
    killed_mid_call = 0
    for n in range(trials):
        errors: list[BaseException] = []

        def drive(n: int = n, errors: list[BaseException] = errors) -> None:
            try:
                lifecycle(plugin, n)
            except Exception as exc:  # the kill breaks calls in any way: EOF, reset, bad status
                errors.append(exc)

        worker = threading.Thread(target=drive)
        worker.start()
        time.sleep(rng.uniform(0, 0.12))
        plugin.kill()
        worker.join(30)
        assert not worker.is_alive()
        killed_mid_call += bool(errors)
        plugin.start()
        assert drift(plugin) == [], plugin.logs()[-3000:]
        if n % 2 == 0:
            lifecycle(plugin, n)  # dockerd retries: the same requests again, to the end
        else:
            # dockerd gave up: it deletes what it knows of (idempotent on our side)
            lifecycle(plugin, n, stop_after=0)
            ids = {"NetworkID": f"{n:012x}" + "ab" * 26, "EndpointID": f"{n:012x}" + "cd" * 26}
            plugin.call("Leave", ids)
            plugin.call("DeleteEndpoint", ids)
            plugin.call("DeleteNetwork", {"NetworkID": ids["NetworkID"]})
        assert netplug_links(plugin.host) == [], f"trial {n}"
        assert nft_leftovers(plugin.host) == [], f"trial {n}"
        assert iptables_leftovers(plugin.host) == [], f"trial {n}"
        assert plugin.records() == [], f"trial {n}"
    # The kills must really have landed inside calls, not only between runs.
    assert killed_mid_call >= trials // 2
    assert_clean(plugin)


def test_parallel_endpoints_no_duplicates_no_leaks(plugin: Plugin) -> None:
    net = Net(plugin, 23, "10.93.0.0/24")
    network_id = net.id
    count = 40
    endpoints = [f"{i:012x}" + "ef" * 26 for i in range(count)]
    errors: list[BaseException] = []

    def create(i: int) -> None:
        ids = {"NetworkID": network_id, "EndpointID": endpoints[i]}
        try:
            for _ in range(2):  # a retried request must not create a second pair
                plugin.call(
                    "CreateEndpoint", {**ids, "Interface": {"Address": f"10.93.0.{i + 2}/24"}}
                )
            plugin.call("Join", {**ids, "SandboxKey": "/x"})
        except BaseException as exc:
            errors.append(exc)

    def delete(i: int) -> None:
        ids = {"NetworkID": network_id, "EndpointID": endpoints[i]}
        try:
            plugin.call("Leave", ids)
            plugin.call("DeleteEndpoint", ids)
        except BaseException as exc:
            errors.append(exc)

    for action in (create, delete):
        threads = [threading.Thread(target=action, args=(i,)) for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        if action is create:
            links = netplug_links(plugin.host)
            assert len(links) == 1 + 2 * count  # bridge + one pair per endpoint, no duplicate
            assert drift(plugin) == []
    net.delete()
    assert_clean(plugin)
