"""The hand-packed rtnetlink requests (netplug/rtnl.py) against the real kernel, in a namespace
made for each test. What they did is read back with iproute2, an independent decoder."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import pytest

from netplug.errors import Conflict, InvalidRequest, KernelError, LinkExists, LinkMissing
from netplug.netlink import IPV4_CONF_ROUTE_LOCALNET, Kernel, Worker
from netplug.rtnl import (
    IFLA_IFNAME,
    IFLA_INFO_KIND,
    IFLA_LINKINFO,
    NLM_F_ACK,
    NLM_F_CREATE,
    RTM_NEWLINK,
    RtnlError,
    ifinfo,
    nested,
    string,
)
from tests.kernel import NetNS

pytestmark = pytest.mark.kernel

T = TypeVar("T")


class Box:
    def __init__(self, ns: NetNS, kernel: Kernel) -> None:
        self.ns = ns
        self.kernel = kernel

    async def run(self, fn: Callable[[Worker], T]) -> T:
        return await self.kernel.run(fn)

    def link(self, name: str) -> dict[str, Any]:
        (item,) = json.loads(self.ns.run("ip", "-j", "-d", "link", "show", name).stdout)
        return dict(item)


def veth(w: Worker, host: str, peer: str, bridge: int) -> None:
    w.add_veth(host, peer, master=bridge, mtu=None, peer_mac="02:00:00:00:00:01")


@pytest.fixture
async def box() -> AsyncIterator[Box]:
    ns = NetNS("rtnl")
    kernel = Kernel(threads=2, netns=ns.name)
    try:
        ns.run("ip", "link", "add", "br0", "mtu", "1400", "type", "bridge")
        ns.run("ip", "link", "set", "br0", "up")
        yield Box(ns, kernel)
    finally:
        kernel.close()
        ns.delete()


async def test_veth_in_one_message(box: Box) -> None:
    bridge = await box.run(lambda w: w.index("br0"))
    assert bridge == box.link("br0")["ifindex"]
    await box.run(
        lambda w: w.add_veth("h1", "p1", master=bridge, mtu=1400, peer_mac="02:42:0a:00:00:07")
    )
    host, peer = box.link("h1"), box.link("p1")
    assert host["master"] == "br0"
    assert "UP" in host["flags"]
    assert host["mtu"] == peer["mtu"] == 1400
    assert peer["address"] == "02:42:0a:00:00:07"
    assert host["linkinfo"]["info_kind"] == peer["linkinfo"]["info_kind"] == "veth"
    assert host["link"] == "p1"  # one pair

    # without an MTU both ends get the kernel's default
    await box.run(
        lambda w: w.add_veth("h2", "p2", master=bridge, mtu=None, peer_mac="02:00:00:00:00:02")
    )
    assert box.link("h2")["mtu"] == box.link("p2")["mtu"] == 1500


async def test_bridge_port_flags_and_ipv4_conf(box: Box) -> None:
    bridge = await box.run(lambda w: w.index("br0"))
    await box.run(lambda w: veth(w, "h1", "p1", bridge))

    def port() -> dict[str, Any]:
        return dict(box.link("h1")["linkinfo"]["info_slave_data"])

    assert port()["hairpin"] is False
    assert port()["isolated"] is False
    await box.run(lambda w: w.set_bridge_port("h1", hairpin=True))
    assert port()["hairpin"] is True
    assert port()["isolated"] is False  # untouched
    await box.run(lambda w: w.set_bridge_port("h1", isolated=True))
    assert port()["hairpin"] is True
    assert port()["isolated"] is True

    conf = "net.ipv4.conf.br0.route_localnet"
    assert box.ns.run("sysctl", "-n", conf).stdout.strip() == "0"
    await box.run(lambda w: w.set_ipv4_conf("br0", IPV4_CONF_ROUTE_LOCALNET, 1))
    assert box.ns.run("sysctl", "-n", conf).stdout.strip() == "1"


async def test_delete_and_errors(box: Box) -> None:
    bridge = await box.run(lambda w: w.index("br0"))
    await box.run(lambda w: veth(w, "h1", "p1", bridge))
    with pytest.raises(LinkExists, match="creating veth h1/p1: already exists"):
        await box.run(lambda w: veth(w, "h1", "p1", bridge))
    assert await box.run(lambda w: w.delete_link("p1")) is True  # one end takes the pair
    assert "h1" not in box.ns.run("ip", "-br", "link").stdout
    assert await box.run(lambda w: w.delete_link("p1")) is False  # already gone is success
    with pytest.raises(LinkMissing, match="link nope: no such device"):
        await box.run(lambda w: w.index("nope"))
    with pytest.raises(LinkMissing):
        await box.run(lambda w: w.set_bridge_port("nope", hairpin=True))
    with pytest.raises(KernelError, match=r"configuring bridge port lo: .*not supported"):
        await box.run(lambda w: w.set_bridge_port("lo", hairpin=True))
    with pytest.raises(InvalidRequest, match="at most 15 bytes"):
        await box.run(
            lambda w: w.add_veth(
                "h" * 16, "p2", master=bridge, mtu=None, peer_mac="02:00:00:00:00:02"
            )
        )
    # a failed request leaves the socket usable: the next answer is the right one
    assert await box.run(lambda w: w.index("br0")) == bridge


async def test_extended_ack_text_reaches_the_error(box: Box) -> None:
    body = (
        ifinfo()
        + string(IFLA_IFNAME, "x1")
        + nested(IFLA_LINKINFO, string(IFLA_INFO_KIND, "no-such-kind"))
    )

    def create(w: Worker) -> None:
        w.rtnl.request(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE, body)

    with pytest.raises(RtnlError) as caught:
        await box.run(create)
    assert caught.value.errno == 95
    assert caught.value.strerror == "Unknown device type (Operation not supported)"


async def test_a_full_bridge_is_named(box: Box) -> None:
    """The kernel takes at most 1023 ports on a bridge; the next veth gets a clear error."""
    bridge = await box.run(lambda w: w.index("br0"))

    def fill(w: Worker) -> int:
        made = 0
        for i in range(1023):
            w.rtnl.add_veth(f"f{i}", f"g{i}", master=bridge, mtu=None, peer_mac="02:00:00:00:00:01")
            made += 1
        return made

    assert await box.run(fill) == 1023
    with pytest.raises(Conflict, match=r"the bridge is full \(the kernel allows 1024 ports"):
        await box.run(lambda w: veth(w, "h1", "p1", bridge))
    assert "h1" not in box.ns.run("ip", "-br", "link").stdout
