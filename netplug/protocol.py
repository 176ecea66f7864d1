"""Docker's remote network driver protocol as msgspec Structs. No logic lives here.

Field names are Go's (`NetworkID`, `IPv4Data`, `AddressIPv6`); attributes stay snake_case through
one rename function. Go encodes nil maps, slices and pointers as `null`, so every such field is
`X | None = None`. Unknown fields are ignored, so newer dockerd versions keep working.
"""

from __future__ import annotations

from typing import Any

import msgspec

_ACRONYMS = {"id": "ID", "ip": "IP", "ipv4": "IPv4", "ipv6": "IPv6"}


def go_name(name: str) -> str:
    """`network_id` -> `NetworkID`, `ipv4_data` -> `IPv4Data`, `host_ip` -> `HostIP`."""
    return "".join(_ACRONYMS.get(part, part.capitalize()) for part in name.split("_"))


class Message(msgspec.Struct, rename=go_name, kw_only=True):
    """Base of every protocol body."""


# --- plugin handshake -----------------------------------------------------------------------


class ActivateResponse(Message):
    implements: list[str]


class CapabilitiesResponse(Message):
    scope: str
    connectivity_scope: str


class ErrorResponse(Message):
    err: str


class EmptyResponse(Message):
    """`{}`: dockerd expects a JSON object even when there is nothing to say."""


# --- networks -------------------------------------------------------------------------------


class IPAMData(Message):
    address_space: str = ""
    pool: str = ""
    gateway: str = ""
    aux_addresses: dict[str, str] | None = None


class CreateNetworkRequest(Message):
    network_id: str
    options: dict[str, msgspec.Raw] | None = None
    ipv4_data: list[IPAMData] | None = None
    ipv6_data: list[IPAMData] | None = None


class NetworkRequest(Message):
    """DeleteNetwork and FreeNetwork."""

    network_id: str


class AllocateNetworkRequest(Message):
    network_id: str
    options: dict[str, str] | None = None
    ipv4_data: list[IPAMData] | None = None
    ipv6_data: list[IPAMData] | None = None


# --- endpoints ------------------------------------------------------------------------------


class EndpointInterface(Message):
    address: str = ""
    address_ipv6: str = ""
    mac_address: str = ""


class CreateEndpointRequest(Message):
    network_id: str
    endpoint_id: str
    interface: EndpointInterface | None = None
    options: dict[str, msgspec.Raw] | None = None


class EndpointInterfaceReply(Message, omit_defaults=True):
    """Only the fields dockerd left empty may be filled; the rest must stay out of the reply."""

    address: str = ""
    address_ipv6: str = ""
    mac_address: str = ""


class CreateEndpointResponse(Message, omit_defaults=True):
    interface: EndpointInterfaceReply | None = None


class EndpointRequest(Message):
    """DeleteEndpoint, EndpointOperInfo, Leave, RevokeExternalConnectivity."""

    network_id: str
    endpoint_id: str


class EndpointOperInfoResponse(Message):
    value: dict[str, Any]


class JoinRequest(Message):
    network_id: str
    endpoint_id: str
    sandbox_key: str = ""
    options: dict[str, msgspec.Raw] | None = None


class InterfaceName(Message):
    src_name: str
    dst_prefix: str


class StaticRoute(Message):
    destination: str
    route_type: int
    next_hop: str = ""


class JoinResponse(Message):
    interface_name: InterfaceName
    gateway: str = ""
    gateway_ipv6: str = ""
    static_routes: list[StaticRoute] | None = None
    disable_gateway_service: bool = False


class ExternalConnectivityRequest(Message):
    network_id: str
    endpoint_id: str
    options: dict[str, msgspec.Raw] | None = None


class DiscoveryNotification(Message):
    discovery_type: int
    discovery_data: Any = None


# --- values found inside option maps ------------------------------------------------------


class PortBinding(Message):
    """One entry of `com.docker.network.portmap` (Go's types.PortBinding)."""

    proto: int
    port: int
    ip: str = ""
    host_ip: str = ""
    host_port: int = 0
    host_port_end: int = 0


class TransportPort(Message):
    proto: int
    port: int


# Keys dockerd uses inside Options maps.
GENERIC = "com.docker.network.generic"
ENABLE_IPV6 = "com.docker.network.enable_ipv6"
ENABLE_IPV4 = "com.docker.network.enable_ipv4"
INTERNAL = "com.docker.network.internal"
PORTMAP = "com.docker.network.portmap"
EXPOSED_PORTS = "com.docker.network.endpoint.exposedports"
