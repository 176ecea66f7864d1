"""A kernel-free backend: it keeps what it would have made in memory.

It serves the dispatch and driver tests and the HTTP-only benchmarks, and is a readable example
of the backend interface for third parties.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import msgspec

from netplug.backend import BackendContext, JoinInfo, Records, Restored, convert_options
from netplug.model import Endpoint, Network, PublishedPort


class MemoryOptions(msgspec.Struct, forbid_unknown_fields=True):
    mtu: int | None = None
    __hints__: ClassVar[dict[str, str]] = {"mtu": "expected an integer"}


class MemoryBackend:
    name = "memory"

    def __init__(self, context: BackendContext | None = None) -> None:
        self.networks: set[str] = set()
        self.endpoints: set[str] = set()
        self.ports: dict[str, list[PublishedPort]] = {}
        self.calls: list[tuple[str, str]] = []

    def parse_options(self, options: Mapping[str, str]) -> dict[str, str]:
        convert_options(options, MemoryOptions, backend=self.name)
        return dict(options)

    async def prepare_network(self, network: Network, others: list[Network]) -> None:
        network.links = {"name": f"mem-{network.id[:12]}"}

    async def create_network(self, network: Network) -> None:
        self.calls.append(("create_network", network.id))
        self.networks.add(network.id)

    async def delete_network(self, network: Network) -> None:
        self.calls.append(("delete_network", network.id))
        self.networks.discard(network.id)

    def prepare_endpoint(self, network: Network, endpoint: Endpoint) -> None:
        endpoint.links = {"peer": f"mem{endpoint.id[:12]}"}

    async def create_endpoint(self, network: Network, endpoint: Endpoint) -> None:
        self.calls.append(("create_endpoint", endpoint.id))
        self.endpoints.add(endpoint.id)

    async def delete_endpoint(self, network: Network, endpoint: Endpoint) -> None:
        self.calls.append(("delete_endpoint", endpoint.id))
        self.endpoints.discard(endpoint.id)

    def join(self, network: Network, endpoint: Endpoint) -> JoinInfo:
        gateway = network.ipv4[0].gateway_ip if network.ipv4 and not network.internal else ""
        return JoinInfo(src_name=endpoint.links["peer"], gateway=gateway)

    async def publish(
        self, network: Network, endpoint: Endpoint, ports: list[PublishedPort]
    ) -> None:
        self.ports[endpoint.id] = list(ports)

    async def unpublish(
        self, network: Network, endpoint: Endpoint, ports: list[PublishedPort]
    ) -> None:
        self.ports.pop(endpoint.id, None)

    async def restore(self, networks: list[Network], endpoints: list[Endpoint]) -> Restored:
        self.networks = {n.id for n in networks}
        lost = [ep.id for ep in endpoints if ep.id not in self.endpoints]
        return Restored(lost_endpoints=lost)

    async def collect_garbage(self, records: Records) -> list[str]:
        _, endpoints = records()
        owned = {ep.id for ep in endpoints}
        garbage = sorted(self.endpoints - owned)
        self.endpoints -= set(garbage)
        return [f"memory endpoint {x[:12]}" for x in garbage]

    async def inspect(self, networks: list[Network], endpoints: list[Endpoint]) -> dict[str, Any]:
        return {"networks": sorted(self.networks), "endpoints": sorted(self.endpoints)}
