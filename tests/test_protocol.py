"""Docker's wire format: the captured dockerd bodies decode, our answers use Go's field names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import pytest

from netplug import protocol as p
from netplug.backend import BackendContext, Registry
from netplug.dispatch import routes
from netplug.driver import Driver
from netplug.store import Store

if TYPE_CHECKING:
    # mypy cannot follow setuptools' editable finder that maps `netplug_backends` onto
    # `backends/`; in this checkout it knows that file as `backends.memory`. At run time the
    # installed name is the only one used.
    from backends.memory import MemoryBackend
else:
    from netplug_backends.memory import MemoryBackend

# CI clones main into some folder with a copy of `shared/` beside it: <clone>/../shared.
FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "fixtures"


def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(
            f"Docker's captured bodies are missing: expected them in {FIXTURES} (the shared/ "
            "folder must sit beside the repository clone)",
            pytrace=False,
        )
    return FIXTURES


def fixture_bytes(name: str) -> bytes:
    path = fixtures_dir() / name
    if not path.is_file():
        pytest.fail(f"fixture {path} is missing", pytrace=False)
    return path.read_bytes()


def fixture_json(name: str) -> Any:
    return json.loads(fixture_bytes(name))


# Call -> the Struct its request body decodes into (None: the body is ignored).
REQUESTS: dict[str, type[msgspec.Struct] | None] = {
    "Plugin.Activate": None,
    "NetworkDriver.GetCapabilities": None,
    "NetworkDriver.CreateNetwork": p.CreateNetworkRequest,
    "NetworkDriver.DeleteNetwork": p.NetworkRequest,
    "NetworkDriver.CreateEndpoint": p.CreateEndpointRequest,
    "NetworkDriver.DeleteEndpoint": p.EndpointRequest,
    "NetworkDriver.EndpointOperInfo": p.EndpointRequest,
    "NetworkDriver.Join": p.JoinRequest,
    "NetworkDriver.Leave": p.EndpointRequest,
    "NetworkDriver.ProgramExternalConnectivity": p.ExternalConnectivityRequest,
    "NetworkDriver.RevokeExternalConnectivity": p.EndpointRequest,
}
# Calls dockerd sends that the capture has no body for.
UNCAPTURED: dict[str, type[msgspec.Struct]] = {
    "NetworkDriver.AllocateNetwork": p.AllocateNetworkRequest,
    "NetworkDriver.FreeNetwork": p.NetworkRequest,
    "NetworkDriver.DiscoverNew": p.DiscoveryNotification,
    "NetworkDriver.DiscoverDelete": p.DiscoveryNotification,
}
DECODED = [call for call, struct in REQUESTS.items() if struct is not None]


def route_table() -> dict[str, type[msgspec.Struct] | None]:
    driver = Driver(
        Store(Path("/nonexistent/netplug-test"), fsync=False),
        Registry(BackendContext(), {"memory": MemoryBackend}),
        default_backend="memory",
    )
    return {path.lstrip("/"): route.request for path, route in routes(driver).items()}


def decode(call: str, body: bytes) -> Any:
    struct = REQUESTS[call]
    assert struct is not None
    return msgspec.json.decode(body, type=struct)


# --- the fixtures themselves -------------------------------------------------------------------


def test_every_request_fixture_is_covered() -> None:
    found = {
        path.name.removesuffix(".request.json") for path in fixtures_dir().glob("*.request.json")
    }
    assert found == set(REQUESTS)


def test_dispatch_routes_use_these_structs() -> None:
    table = route_table()
    for call, struct in {**REQUESTS, **UNCAPTURED}.items():
        assert call in table, f"dispatch has no route for {call}"
        assert table[call] is struct, call


@pytest.mark.parametrize("call", DECODED)
def test_fixture_request_decodes(call: str) -> None:
    raw = fixture_bytes(f"{call}.request.json")
    assert raw.endswith(b"\n")  # Go's json.Encoder and the capture both end with a newline
    request = decode(call, raw)
    original = json.loads(raw)
    assert request.network_id == original["NetworkID"]
    if "EndpointID" in original:
        assert request.endpoint_id == original["EndpointID"]
    # Every top-level key Docker sent is a field of the Struct, under Go's spelling.
    names = {f.encode_name for f in msgspec.structs.fields(type(request))}
    assert set(original) <= names


@pytest.mark.parametrize("call", ["Plugin.Activate", "NetworkDriver.GetCapabilities"])
def test_bodiless_calls_need_no_struct(call: str) -> None:
    # GetCapabilities arrives with no body at all (`null` in the capture), Activate with `{}`.
    assert REQUESTS[call] is None
    assert route_table()[call] is None
    fixture_json(f"{call}.request.json")  # present and valid JSON


def test_create_network_fixture_values() -> None:
    req = decode(
        "NetworkDriver.CreateNetwork", fixture_bytes("NetworkDriver.CreateNetwork.request.json")
    )
    assert isinstance(req, p.CreateNetworkRequest)
    assert req.network_id == "322ea7d3f31e83b210a6b5a582ea42f59964e893ffa4b6264f6d59aa4186c39e"
    assert req.ipv4_data == [
        p.IPAMData(
            address_space="LocalDefault",
            pool="10.201.2.0/24",
            gateway="10.201.2.10/24",
            aux_addresses={"nbaux": "10.201.2.11/24"},
        )
    ]
    assert req.ipv6_data == []
    assert req.options is not None
    assert msgspec.json.decode(req.options[p.ENABLE_IPV6]) is False
    assert msgspec.json.decode(req.options[p.GENERIC]) == {"nb.key": "value"}


def test_create_endpoint_fixture_values() -> None:
    raw = fixture_bytes("NetworkDriver.CreateEndpoint.request.json")
    req = decode("NetworkDriver.CreateEndpoint", raw)
    assert isinstance(req, p.CreateEndpointRequest)
    assert req.interface == p.EndpointInterface(address="10.201.1.2/24")
    assert req.options is not None
    ports = msgspec.json.decode(req.options[p.PORTMAP], type=list[p.PortBinding])
    assert ports == [
        p.PortBinding(proto=6, ip="", port=80, host_ip="", host_port=18080, host_port_end=18080)
    ]
    exposed = msgspec.json.decode(req.options[p.EXPOSED_PORTS], type=list[p.TransportPort])
    assert exposed == [p.TransportPort(proto=6, port=81), p.TransportPort(proto=6, port=80)]


def test_join_fixture_values() -> None:
    req = decode("NetworkDriver.Join", fixture_bytes("NetworkDriver.Join.request.json"))
    assert isinstance(req, p.JoinRequest)
    assert req.sandbox_key == "/tmp/dkn/exec/netns/42f96f843951"
    assert req.options is not None
    assert set(req.options) == {p.PORTMAP, p.EXPOSED_PORTS}


def test_program_external_fixture_portmap() -> None:
    raw = fixture_bytes("NetworkDriver.ProgramExternalConnectivity.request.json")
    req = decode("NetworkDriver.ProgramExternalConnectivity", raw)
    assert isinstance(req, p.ExternalConnectivityRequest)
    assert req.options is not None
    (binding,) = msgspec.json.decode(req.options[p.PORTMAP], type=list[p.PortBinding])
    assert (binding.proto, binding.port, binding.host_port, binding.host_port_end) == (
        6,
        80,
        18080,
        18080,
    )


@pytest.mark.parametrize("call", DECODED)
def test_fixture_request_compact_with_trailing_newline(call: str) -> None:
    original = fixture_json(f"{call}.request.json")
    compact = json.dumps(original, separators=(",", ":")).encode()
    for body in (compact, compact + b"\n", compact + b"\r\n", b"  " + compact + b"\n\n"):
        assert decode(call, body) == decode(call, compact)


@pytest.mark.parametrize("call", DECODED)
def test_unknown_fields_are_ignored(call: str) -> None:
    original = fixture_json(f"{call}.request.json")
    future = {"Nested": [1, None, {"x": "y"}], "Flag": True}
    body = {**original, "FutureField": future, "AnotherOne": None}
    if isinstance(body.get("Interface"), dict):
        body["Interface"] = {**body["Interface"], "FutureField": future}
    if isinstance(body.get("IPv4Data"), list):
        body["IPv4Data"] = [{**entry, "FutureField": future} for entry in body["IPv4Data"]]
    assert decode(call, json.dumps(body).encode()) == decode(call, json.dumps(original).encode())


# --- Go's names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "go"),
    [
        ("network_id", "NetworkID"),
        ("endpoint_id", "EndpointID"),
        ("ipv4_data", "IPv4Data"),
        ("ipv6_data", "IPv6Data"),
        ("address_ipv6", "AddressIPv6"),
        ("mac_address", "MacAddress"),
        ("host_ip", "HostIP"),
        ("host_port_end", "HostPortEnd"),
        ("ip", "IP"),
        ("gateway_ipv6", "GatewayIPv6"),
        ("address_space", "AddressSpace"),
        ("aux_addresses", "AuxAddresses"),
        ("sandbox_key", "SandboxKey"),
        ("src_name", "SrcName"),
        ("dst_prefix", "DstPrefix"),
        ("static_routes", "StaticRoutes"),
        ("disable_gateway_service", "DisableGatewayService"),
        ("connectivity_scope", "ConnectivityScope"),
        ("discovery_type", "DiscoveryType"),
        ("err", "Err"),
    ],
)
def test_go_name(name: str, go: str) -> None:
    assert p.go_name(name) == go


# Field names as in moby's libnetwork/drivers/remote/api/api.go (and types.PortBinding).
GO_FIELDS: dict[type[msgspec.Struct], list[str]] = {
    p.ActivateResponse: ["Implements"],
    p.CapabilitiesResponse: ["Scope", "ConnectivityScope"],
    p.ErrorResponse: ["Err"],
    p.EmptyResponse: [],
    p.IPAMData: ["AddressSpace", "Pool", "Gateway", "AuxAddresses"],
    p.CreateNetworkRequest: ["NetworkID", "Options", "IPv4Data", "IPv6Data"],
    p.NetworkRequest: ["NetworkID"],
    p.AllocateNetworkRequest: ["NetworkID", "Options", "IPv4Data", "IPv6Data"],
    p.EndpointInterface: ["Address", "AddressIPv6", "MacAddress"],
    p.CreateEndpointRequest: ["NetworkID", "EndpointID", "Interface", "Options"],
    p.EndpointInterfaceReply: ["Address", "AddressIPv6", "MacAddress"],
    p.CreateEndpointResponse: ["Interface"],
    p.EndpointRequest: ["NetworkID", "EndpointID"],
    p.EndpointOperInfoResponse: ["Value"],
    p.JoinRequest: ["NetworkID", "EndpointID", "SandboxKey", "Options"],
    p.InterfaceName: ["SrcName", "DstPrefix"],
    p.StaticRoute: ["Destination", "RouteType", "NextHop"],
    p.JoinResponse: [
        "InterfaceName",
        "Gateway",
        "GatewayIPv6",
        "StaticRoutes",
        "DisableGatewayService",
    ],
    p.ExternalConnectivityRequest: ["NetworkID", "EndpointID", "Options"],
    p.DiscoveryNotification: ["DiscoveryType", "DiscoveryData"],
    p.PortBinding: ["Proto", "IP", "Port", "HostIP", "HostPort", "HostPortEnd"],
    p.TransportPort: ["Proto", "Port"],
}


def _protocol_structs() -> list[type[msgspec.Struct]]:
    return [
        value
        for value in vars(p).values()
        if isinstance(value, type)
        and issubclass(value, msgspec.Struct)
        and value.__module__ == p.__name__
        and value is not p.Message
    ]


def test_every_protocol_struct_has_go_names() -> None:
    assert set(_protocol_structs()) == set(GO_FIELDS)
    for struct, expected in GO_FIELDS.items():
        names = [f.encode_name for f in msgspec.structs.fields(struct)]
        assert sorted(names) == sorted(expected), struct.__name__


# What netplug decodes from dockerd: requests and the values nested in them.
DECODED_STRUCTS: list[type[msgspec.Struct]] = [
    p.CreateNetworkRequest,
    p.NetworkRequest,
    p.AllocateNetworkRequest,
    p.IPAMData,
    p.CreateEndpointRequest,
    p.EndpointInterface,
    p.EndpointRequest,
    p.JoinRequest,
    p.ExternalConnectivityRequest,
    p.DiscoveryNotification,
    p.PortBinding,
    p.TransportPort,
]


@pytest.mark.parametrize("struct", DECODED_STRUCTS, ids=lambda s: s.__name__)
def test_go_nil_fields_are_optional(struct: type[msgspec.Struct]) -> None:
    """Go encodes nil maps, slices and pointers as null: such fields must accept None."""
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    for field in info.fields:
        assert not isinstance(
            field.type,
            msgspec.inspect.DictType | msgspec.inspect.ListType | msgspec.inspect.StructType,
        ), f"{struct.__name__}.{field.encode_name} rejects Go's null"


NID = "a21ceeaa03409d648ba32a9e4cbb1c1cfeb50a0407b0543b163c4f563dbd3dd9"
EID = "ad7a6aada53ba54115762fe91f18f37684036223ad6bc59c4c977774a5d25445"


@pytest.mark.parametrize(
    ("struct", "body"),
    [
        (
            p.CreateNetworkRequest,
            {"NetworkID": NID, "Options": None, "IPv4Data": None, "IPv6Data": None},
        ),
        (
            p.CreateNetworkRequest,
            {
                "NetworkID": NID,
                "Options": {p.GENERIC: None},
                "IPv4Data": [{"AddressSpace": "", "Pool": "10.0.0.0/24", "AuxAddresses": None}],
            },
        ),
        (
            p.AllocateNetworkRequest,
            {"NetworkID": NID, "Options": None, "IPv4Data": None, "IPv6Data": None},
        ),
        (
            p.CreateEndpointRequest,
            {"NetworkID": NID, "EndpointID": EID, "Interface": None, "Options": None},
        ),
        (p.JoinRequest, {"NetworkID": NID, "EndpointID": EID, "SandboxKey": "", "Options": None}),
        (p.ExternalConnectivityRequest, {"NetworkID": NID, "EndpointID": EID, "Options": None}),
        (p.DiscoveryNotification, {"DiscoveryType": 1, "DiscoveryData": None}),
        (
            p.JoinResponse,
            {
                "InterfaceName": {"SrcName": "veth0", "DstPrefix": "eth"},
                "Gateway": "",
                "GatewayIPv6": "",
                "StaticRoutes": None,
                "DisableGatewayService": False,
            },
        ),
    ],
)
def test_go_null_is_accepted(struct: type[msgspec.Struct], body: dict[str, Any]) -> None:
    decoded = msgspec.json.decode(json.dumps(body).encode() + b"\n", type=struct)
    for key, value in body.items():
        if value is None:
            field = next(f for f in msgspec.structs.fields(struct) if f.encode_name == key)
            assert getattr(decoded, field.name) is None


def test_missing_required_field_names_it() -> None:
    with pytest.raises(msgspec.ValidationError, match="NetworkID"):
        msgspec.json.decode(b'{"EndpointID": "x"}', type=p.EndpointRequest)
    with pytest.raises(msgspec.ValidationError, match="EndpointID"):
        msgspec.json.decode(b'{"NetworkID": "x"}', type=p.CreateEndpointRequest)


def test_snake_case_keys_are_not_docker_keys() -> None:
    # Docker never spells `network_id`; a body that does misses the required field.
    with pytest.raises(msgspec.ValidationError, match="NetworkID"):
        msgspec.json.decode(b'{"network_id": "x"}', type=p.NetworkRequest)


# --- responses -------------------------------------------------------------------------------


def encoded(value: msgspec.Struct) -> Any:
    return json.loads(msgspec.json.encode(value))


def test_activate_response_matches_fixture() -> None:
    expected = fixture_json("Plugin.Activate.response.json")
    assert encoded(p.ActivateResponse(implements=["NetworkDriver"])) == expected


def test_capabilities_response_matches_fixture() -> None:
    expected = fixture_json("NetworkDriver.GetCapabilities.response.json")
    got = encoded(p.CapabilitiesResponse(scope="local", connectivity_scope="local"))
    assert set(got) == set(expected)
    assert got == expected


def test_join_response_uses_docker_keys() -> None:
    expected = fixture_json("NetworkDriver.Join.response.json")
    got = encoded(
        p.JoinResponse(
            interface_name=p.InterfaceName(src_name="rcad7a6aada53b", dst_prefix="eth"),
            gateway="10.201.1.1",
        )
    )
    assert set(expected) <= set(got)
    assert set(got) <= set(GO_FIELDS[p.JoinResponse])
    assert set(got["InterfaceName"]) == set(expected["InterfaceName"])
    for key, value in expected.items():
        assert got[key] == value
    # and what we send decodes back as the Struct dockerd's answer would
    assert msgspec.json.decode(json.dumps(expected).encode(), type=p.JoinResponse) == (
        p.JoinResponse(
            interface_name=p.InterfaceName(src_name="rcad7a6aada53b", dst_prefix="eth"),
            gateway="10.201.1.1",
        )
    )


def test_join_response_static_routes_keys() -> None:
    got = encoded(
        p.JoinResponse(
            interface_name=p.InterfaceName(src_name="x", dst_prefix="eth"),
            gateway_ipv6="fd00::1",
            static_routes=[p.StaticRoute(destination="10.9.0.0/16", route_type=0, next_hop="")],
            disable_gateway_service=True,
        )
    )
    assert got["GatewayIPv6"] == "fd00::1"
    assert got["StaticRoutes"] == [{"Destination": "10.9.0.0/16", "RouteType": 0, "NextHop": ""}]
    assert got["DisableGatewayService"] is True


def test_endpoint_oper_info_response_matches_fixture() -> None:
    expected = fixture_json("NetworkDriver.EndpointOperInfo.response.json")
    assert encoded(p.EndpointOperInfoResponse(value={})) == expected


@pytest.mark.parametrize(
    "call",
    [
        "CreateNetwork",
        "DeleteNetwork",
        "CreateEndpoint",
        "DeleteEndpoint",
        "Leave",
        "ProgramExternalConnectivity",
        "RevokeExternalConnectivity",
    ],
)
def test_empty_responses_match_fixture(call: str) -> None:
    assert fixture_json(f"NetworkDriver.{call}.response.json") == {}
    assert msgspec.json.encode(p.EmptyResponse()) == b"{}"


@pytest.mark.parametrize(
    "call",
    [
        "CreateNetwork",
        "DeleteNetwork",
        "CreateEndpoint",
        "DeleteEndpoint",
        "EndpointOperInfo",
        "Join",
        "Leave",
        "ProgramExternalConnectivity",
        "RevokeExternalConnectivity",
    ],
)
def test_error_response_matches_fixture(call: str) -> None:
    expected = fixture_json(f"NetworkDriver.{call}.error-response.json")["resp"]
    got = encoded(p.ErrorResponse(err=expected["Err"]))
    assert got == expected


def test_create_endpoint_response_without_interface_is_empty() -> None:
    assert msgspec.json.encode(p.CreateEndpointResponse()) == b"{}"
    assert msgspec.json.encode(p.CreateEndpointResponse(interface=None)) == b"{}"
    expected = fixture_json("NetworkDriver.CreateEndpoint.response.json")
    assert encoded(p.CreateEndpointResponse()) == expected


def test_create_endpoint_response_only_carries_filled_fields() -> None:
    reply = p.CreateEndpointResponse(
        interface=p.EndpointInterfaceReply(mac_address="02:42:0a:c9:01:02")
    )
    assert encoded(reply) == {"Interface": {"MacAddress": "02:42:0a:c9:01:02"}}
    reply = p.CreateEndpointResponse(interface=p.EndpointInterfaceReply(address_ipv6="fd00::2/64"))
    assert encoded(reply) == {"Interface": {"AddressIPv6": "fd00::2/64"}}
