"""The `bridge` backend: a Linux bridge per network, a veth pair per endpoint, nftables for NAT,
isolation and published ports. What a user of Docker's own bridge driver expects, done through
netlink (pyroute2) and one nftables table.

Names are derived from Docker IDs (`npb` + network ID, `nph`/`npc` + endpoint ID, 15 bytes), so
whatever a crash leaves behind can be found and removed. A bridge named with `-o bridge_name=`
that already exists is adopted: netplug adds its gateway addresses and rules and, on
`docker network rm`, removes those but leaves the bridge.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from functools import partial
from typing import Annotated, Any, ClassVar

import msgspec

from netplug.backend import BackendContext, JoinInfo, Records, Restored, convert_options
from netplug.errors import Conflict, LinkExists, LinkMissing
from netplug.firewall import NetworkRules, chain_name
from netplug.model import Endpoint, Network, PublishedPort
from netplug.netlink import (
    BRIDGE_PREFIX,
    HOST_PREFIX,
    IPV4_CONF_ROUTE_LOCALNET,
    OWNED_NAME,
    PEER_PREFIX,
    Worker,
    check_ifname,
    ifname,
    mac_from_ipv4,
    stable_mac,
    write_sysctl,
)
from netplug.tasks import together

log = logging.getLogger("netplug.bridge")


class BridgeOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    mtu: Annotated[int, msgspec.Meta(ge=68, le=65535)] | None = None
    bridge_name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,15}$")] | None = None
    masquerade: bool = True
    icc: bool = True

    __hints__: ClassVar[dict[str, str]] = {
        "mtu": "use an integer from 68 to 65535",
        "bridge_name": "use 1 to 15 characters from letters, digits, '_', '-' and '.'",
        "masquerade": "use true or false",
        "icc": "use true or false",
    }


def _options(network: Network) -> BridgeOptions:
    return _parsed(tuple(sorted(network.options.items())))


@functools.lru_cache(maxsize=1024)
def _parsed(options: tuple[tuple[str, str], ...]) -> BridgeOptions:
    return convert_options(dict(options), BridgeOptions, backend=BridgeBackend.name)


def _rules(network: Network, opts: BridgeOptions) -> NetworkRules:
    return NetworkRules(
        key=network.id[:12],
        bridge=network.links["bridge"],
        pools4=tuple(s.pool for s in network.ipv4),
        pools6=tuple(s.pool for s in network.ipv6),
        masquerade=opts.masquerade,
        icc=opts.icc,
        internal=network.internal,
    )


class BridgeBackend:
    name = "bridge"

    def __init__(self, context: BackendContext) -> None:
        self.context = context

    # --- networks --------------------------------------------------------------------------

    def parse_options(self, options: Mapping[str, str]) -> dict[str, str]:
        convert_options(options, BridgeOptions, backend=self.name)
        return dict(options)

    async def prepare_network(self, network: Network, others: list[Network]) -> None:
        opts = _options(network)
        name = opts.bridge_name or ifname(BRIDGE_PREFIX, network.id)
        for other in others:
            if other.links.get("bridge") == name:
                raise Conflict(
                    f"bridge {name} is already used by netplug network {other.id[:12]}: "
                    "choose another -o bridge_name"
                )
        link = await self.context.kernel.run(lambda w: w.link(name))
        adopted = False
        if link is not None:
            if link.kind != "bridge":
                raise Conflict(
                    f"-o bridge_name={name}: a {link.kind or 'non-bridge'} link of that name "
                    "exists; choose another name"
                )
            adopted = opts.bridge_name is not None  # a leftover of ours is simply reused
        network.links = {"bridge": name, "adopted": "1" if adopted else "0"}

    async def create_network(self, network: Network) -> None:
        opts = _options(network)
        # The rules name the bridge, they do not need it to exist: both at once.
        await together(
            partial(self.context.kernel.run, lambda w: _ensure_bridge(w, network, opts)),
            partial(self.context.firewall.add_network, _rules(network, opts)),
        )

    async def delete_network(self, network: Network) -> None:
        bridge = network.links.get("bridge")
        if not bridge:
            return
        await self.context.firewall.remove_network(network.id[:12], bridge)

        def remove(w: Worker) -> None:
            w.forget(bridge)
            if network.links.get("adopted") == "1":
                _remove_addresses(w, network)
            else:
                w.delete_link(bridge)

        await self.context.kernel.run(remove)

    # --- endpoints -------------------------------------------------------------------------

    def prepare_endpoint(self, network: Network, endpoint: Endpoint) -> None:
        endpoint.links = {
            "host": ifname(HOST_PREFIX, endpoint.id),
            "peer": ifname(PEER_PREFIX, endpoint.id),
        }
        if not endpoint.mac:
            # Stable across restarts of the container (same IP, same MAC): peers' ARP caches
            # stay valid, as with Docker's bridge.
            endpoint.mac = (
                mac_from_ipv4(endpoint.ipv4) if endpoint.ipv4 else stable_mac(endpoint.id)
            )

    async def create_endpoint(self, network: Network, endpoint: Endpoint) -> None:
        opts = _options(network)
        await self.context.kernel.run(lambda w: _create_veth(w, network, endpoint, opts))

    async def delete_endpoint(self, network: Network, endpoint: Endpoint) -> None:
        def delete(w: Worker) -> None:
            for name in (endpoint.links.get("host"), endpoint.links.get("peer")):
                if name and w.delete_link(name):
                    return  # deleting one end of a veth deletes the pair

        await self.context.kernel.run(delete)

    def join(self, network: Network, endpoint: Endpoint) -> JoinInfo:
        if network.internal:
            return JoinInfo(src_name=endpoint.links["peer"])
        gateway = next((s.gateway_ip for s in network.ipv4 if s.gateway), "")
        gateway6 = next((s.gateway_ip for s in network.ipv6 if s.gateway), "")
        gateway = gateway if endpoint.ipv4 else ""
        gateway6 = gateway6 if endpoint.ipv6 else ""
        return JoinInfo(
            src_name=endpoint.links["peer"],
            gateway=gateway,
            gateway_ipv6=gateway6,
            # With no gateway at all (e.g. --ipam-driver null) dockerd would add a second
            # interface on its docker_gwbridge network; never do that behind a user's back.
            disable_gateway_service=not (gateway or gateway6),
        )

    async def publish(
        self, network: Network, endpoint: Endpoint, ports: list[PublishedPort]
    ) -> None:
        # hairpin: with br_netfilter, a container reaching its own published port has its packet
        # DNAT'd at bridge level and sent back out of the port it came in on.
        host = endpoint.links["host"]
        await self.context.kernel.run(lambda w: w.set_bridge_port(host, hairpin=True))
        await self.context.firewall.publish(ports)

    async def unpublish(
        self, network: Network, endpoint: Endpoint, ports: list[PublishedPort]
    ) -> None:
        await self.context.firewall.unpublish(ports)

    # --- start, garbage, status ------------------------------------------------------------

    async def restore(self, networks: list[Network], endpoints: list[Endpoint]) -> Restored:
        restored = Restored()

        def repair(w: Worker) -> None:
            present = {link.name for link in w.links()}
            for net in networks:
                if net.links["bridge"] not in present:
                    restored.repaired.append(f"bridge {net.links['bridge']} recreated")
                    net.links["adopted"] = "0"  # netplug made this one: it deletes it too
                _ensure_bridge(w, net, _options(net))
            restored.lost_endpoints += [
                ep.id for ep in endpoints if ep.links.get("host") not in present
            ]

        await self.context.kernel.run(repair)
        lost = set(restored.lost_endpoints)
        ports = [port for ep in endpoints if ep.id not in lost for port in ep.ports]
        await self.context.firewall.rebuild([_rules(net, _options(net)) for net in networks], ports)
        return restored

    async def collect_garbage(self, records: Records) -> list[str]:
        links = await self.context.kernel.run(lambda w: w.links())
        networks, endpoints = records()  # after listing: see Backend.collect_garbage
        owned = _owned_names(networks, endpoints)
        garbage = [link for link in links if OWNED_NAME.match(link.name) and link.name not in owned]
        garbage.sort(key=lambda link: link.kind == "bridge")  # veths before bridges

        def delete(w: Worker) -> list[str]:
            return [f"{link.kind} {link.name}" for link in garbage if w.delete_link(link.name)]

        removed = await self.context.kernel.run(delete) if garbage else []
        await self.context.firewall.rebuild(
            [_rules(net, _options(net)) for net in networks],
            [port for ep in endpoints for port in ep.ports],
        )
        return removed

    async def inspect(self, networks: list[Network], endpoints: list[Endpoint]) -> dict[str, Any]:
        links = {link.name: link for link in await self.context.kernel.run(lambda w: w.links())}
        table = await self.context.firewall.dump()
        chains = {item["chain"]["name"] for item in table.get("nftables", []) if "chain" in item}
        drift: list[str] = []
        for net in networks:
            bridge = net.links.get("bridge", "")
            link = links.get(bridge)
            if link is None:
                drift.append(f"network {net.id[:12]}: bridge {bridge} missing")
            elif not link.up:
                drift.append(f"network {net.id[:12]}: bridge {bridge} is down")
            if chain_name(net.id[:12], "in") not in chains:
                drift.append(f"network {net.id[:12]}: nftables chains missing")
        for ep in endpoints:
            host = ep.links.get("host", "")
            if host not in links:
                drift.append(f"endpoint {ep.id[:12]}: veth {host} missing")
        owned = _owned_names(networks, endpoints)
        drift += [
            f"orphan {link.kind} {name} (netplug gc removes it)"
            for name, link in links.items()
            if OWNED_NAME.match(name) and name not in owned
        ]
        return {
            "links": sorted(name for name in links if OWNED_NAME.match(name) or name in owned),
            "nft_chains": sorted(chains),
            "drift": drift,
        }


def _owned_names(networks: list[Network], endpoints: list[Endpoint]) -> set[str]:
    """Every link name a record owns."""
    owned = {net.links.get("bridge", "") for net in networks}
    return owned | {name for ep in endpoints for name in ep.links.values()}


# --- kernel work, run on kernel threads ------------------------------------------------------


def _ensure_bridge(w: Worker, network: Network, opts: BridgeOptions) -> None:
    """Create (or adopt) the bridge and give it its addresses; idempotent."""
    name = check_ifname(network.links["bridge"])
    w.forget(name)
    link = w.link(name)
    if link is None:
        index = w.add_bridge(name, mtu=opts.mtu, mac=stable_mac("bridge" + network.id))
    else:
        index = link.index
        if opts.mtu and link.mtu != opts.mtu and network.links.get("adopted") != "1":
            w.set_link(name, mtu=opts.mtu)
    if network.ipv6:
        write_sysctl(f"net/ipv6/conf/{name}/disable_ipv6", "0")
        write_sysctl(f"net/ipv6/conf/{name}/accept_ra", "0")
        write_sysctl("net/ipv6/conf/all/forwarding", "1")
    # 127.0.0.1:port on the host reaches published ports through this bridge.
    w.set_ipv4_conf(name, IPV4_CONF_ROUTE_LOCALNET, 1)
    if not network.internal:
        write_sysctl("net/ipv4/ip_forward", "1")  # dockerd sets it too; a host may not have
    for subnet in network.subnets:
        if subnet.gateway:
            w.add_address(index, subnet.gateway)  # already there (a restart) is fine
    w.set_link(name, up=True)


def _remove_addresses(w: Worker, network: Network) -> None:
    try:
        index = w.index(network.links["bridge"])
    except LinkMissing:
        return
    for subnet in network.subnets:
        if subnet.gateway:
            w.delete_address(index, subnet.gateway)


def _create_veth(w: Worker, network: Network, endpoint: Endpoint, opts: BridgeOptions) -> None:
    """One RTM_NEWLINK in the common case; the slow path only after a crash or a retry."""
    host, peer = endpoint.links["host"], endpoint.links["peer"]
    bridge = network.links["bridge"]
    mtu = opts.mtu
    if mtu is None and network.links.get("adopted") == "1":
        link = w.link(bridge)
        mtu = link.mtu if link is not None else None
    master = w.cached_index(bridge)
    try:
        w.add_veth(host, peer, master=master, mtu=mtu, peer_mac=endpoint.mac)
    except LinkExists:
        existing = w.link(host)
        if existing is None or existing.master != master or not existing.up:
            # Someone else's leftover under our name (a crash between create and record, a
            # container end moved back by dockerd): replace it.
            w.delete_link(host)
            w.delete_link(peer)
            w.add_veth(host, peer, master=master, mtu=mtu, peer_mac=endpoint.mac)
    if not opts.icc:
        w.set_bridge_port(host, isolated=True)  # ports of an isolated bridge cannot talk
