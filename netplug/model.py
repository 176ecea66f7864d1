"""The records netplug keeps about networks and endpoints: what dockerd asked for and what the
backend made for it. `store` persists them, `driver` changes them, backends read them and note
the kernel objects they own in `links`. No logic beyond small derived views lives here.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

import msgspec

State = Literal["creating", "ready", "deleting"]
Proto = Literal["tcp", "udp", "sctp"]

PROTO_NUMBERS: dict[int, Proto] = {6: "tcp", 17: "udp", 132: "sctp"}


class Subnet(msgspec.Struct, frozen=True):
    pool: str  # "10.10.0.0/24"
    gateway: str = ""  # "10.10.0.1/24" (with the pool's prefix length), "" when none

    @property
    def gateway_ip(self) -> str:
        return self.gateway.split("/", 1)[0] if self.gateway else ""

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(self.pool, strict=False)


class PublishedPort(msgspec.Struct, frozen=True):
    """One published port after allocation: host side concrete, never 0 or a range."""

    proto: Proto
    host_ip: str  # "" for every host address
    host_port: int
    container_ip: str
    container_port: int

    def describe(self) -> str:
        host = f"{self.host_ip}:" if self.host_ip else ""
        return f"{host}{self.host_port}/{self.proto}"


class Network(msgspec.Struct, kw_only=True):
    id: str
    backend: str
    options: dict[str, str] = {}  # validated backend options, short keys
    internal: bool = False
    enable_ipv6: bool = False
    ipv4: list[Subnet] = []
    ipv6: list[Subnet] = []
    state: State = "creating"
    links: dict[str, str] = {}  # backend bookkeeping, e.g. {"bridge": "npb…", "adopted": "0"}

    @property
    def subnets(self) -> list[Subnet]:
        return [*self.ipv4, *self.ipv6]


class Endpoint(msgspec.Struct, kw_only=True):
    id: str
    network_id: str
    address: str = ""  # "10.10.0.2/24"
    address_ipv6: str = ""
    mac: str = ""
    state: State = "creating"
    joined: bool = False
    links: dict[str, str] = {}  # backend bookkeeping, e.g. {"host": "nph…", "peer": "npc…"}
    ports: list[PublishedPort] = []

    @property
    def ipv4(self) -> str:
        return self.address.split("/", 1)[0] if self.address else ""

    @property
    def ipv6(self) -> str:
        return self.address_ipv6.split("/", 1)[0] if self.address_ipv6 else ""
