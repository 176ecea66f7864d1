"""The ASGI app in-process (httpx's ASGITransport under trio) with the memory backend: every route,
Docker's error conventions, and property tests that no body makes the plugin fail with a 500."""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import AsyncIterator, Mapping, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

import httpx
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from netplug import protocol as p
from netplug.backend import BackendContext, BackendFactory, Registry
from netplug.dispatch import App
from netplug.driver import EPHEMERAL_PORTS, Driver
from netplug.errors import KernelError
from netplug.model import Endpoint, Network, PublishedPort
from netplug.store import Store

if TYPE_CHECKING:
    # mypy cannot follow setuptools' editable finder that maps `netplug_backends` onto
    # `backends/`; in this checkout it knows that file as `backends.memory`. At run time the
    # installed name is the only one used.
    from backends.memory import MemoryBackend
else:
    from netplug_backends.memory import MemoryBackend

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "fixtures"
CONTENT_TYPE = "application/vnd.docker.plugins.v1+json"


def fixture(call: str) -> dict[str, Any]:
    if not FIXTURES.is_dir():
        pytest.fail(
            f"Docker's captured bodies are missing: expected them in {FIXTURES} (the shared/ "
            "folder must sit beside the repository clone)",
            pytrace=False,
        )
    body = json.loads((FIXTURES / f"{call}.request.json").read_text())
    assert isinstance(body, dict)
    return body


# IDs and addresses as in the capture: CreateEndpoint/Join/ProgramExternalConnectivity share them.
NID = "a21ceeaa03409d648ba32a9e4cbb1c1cfeb50a0407b0543b163c4f563dbd3dd9"
EID = "ad7a6aada53ba54115762fe91f18f37684036223ad6bc59c4c977774a5d25445"
EID2 = "c6858a38a89c76e4a63edf2789f1284f9e7fb0c96c97317c669bb1ff2f1f5398"
NID2 = "322ea7d3f31e83b210a6b5a582ea42f59964e893ffa4b6264f6d59aa4186c39e"
UNKNOWN = "e573f7fda32b153c0fac4cea5a35487b211f449ca73feae4a37ca18360d471d5"
POOL, GATEWAY = "10.201.1.0/24", "10.201.1.1/24"


class MacBackend(MemoryBackend):
    """The memory backend plus a MAC when dockerd gave none, as the bridge backend does."""

    def prepare_endpoint(self, network: Network, endpoint: Endpoint) -> None:
        super().prepare_endpoint(network, endpoint)
        if not endpoint.mac:
            octets = endpoint.ipv4.split(".") if endpoint.ipv4 else ["0"] * 4
            endpoint.mac = "02:42:" + ":".join(f"{int(x):02x}" for x in octets)


class Plugin:
    def __init__(self, driver: Driver, client: httpx.AsyncClient) -> None:
        self.driver = driver
        self.client = client

    @property
    def memory(self) -> MemoryBackend:
        backend = self.driver.registry.get("memory")
        assert isinstance(backend, MemoryBackend)
        return backend

    async def post(self, call: str, body: object = None) -> httpx.Response:
        """POST `body` (bytes as they are, anything else as JSON; None: no body) to a call."""
        if body is None:
            content = b""
        elif isinstance(body, bytes):
            content = body
        else:
            content = json.dumps(body).encode() + b"\n"  # Go's json.Encoder adds the newline
        path = call if call.startswith("/") else f"/{call}"
        if "." not in call:
            path = f"/NetworkDriver.{call}"
        return await self.client.post(path, content=content)

    async def ok(self, call: str, body: object = None) -> Any:
        response = await self.post(call, body)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == CONTENT_TYPE
        data = response.json()
        assert isinstance(data, dict)
        return data

    async def err(self, call: str, body: object = None, status: int = 400) -> str:
        response = await self.post(call, body)
        return error_of(response, status)


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == CONTENT_TYPE
    data = response.json()
    assert isinstance(data, dict), data
    assert isinstance(data.get("Err"), str), data
    assert data["Err"], data
    return cast(str, data["Err"])


@asynccontextmanager
async def make_plugin(
    state_dir: Path,
    *,
    max_body: int | None = None,
    backends: Mapping[str, BackendFactory] | None = None,
) -> AsyncIterator[Plugin]:
    registry = Registry(BackendContext(), backends or {"memory": MemoryBackend})
    driver = Driver(Store(state_dir, fsync=False), registry, default_backend="memory")
    await driver.restore()
    app = App(driver) if max_body is None else App(driver, max_body=max_body)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://plugin.moby.localhost"
    ) as client:
        yield Plugin(driver, client)


@pytest.fixture
async def plug(tmp_path: Path) -> AsyncIterator[Plugin]:
    async with make_plugin(tmp_path) as value:
        yield value


def network_body(
    nid: str = NID,
    pool: str = POOL,
    gateway: str = GATEWAY,
    generic: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The captured CreateNetwork body with another ID, subnet and generic options."""
    body = fixture("NetworkDriver.CreateNetwork")
    body["NetworkID"] = nid
    body["IPv4Data"][0].update(Pool=pool, Gateway=gateway, AuxAddresses=None)
    if not gateway:
        del body["IPv4Data"][0]["Gateway"]
    body["Options"][p.GENERIC] = generic or {}
    body["Options"].update(options or {})
    return body


def endpoint_body(
    eid: str = EID, nid: str = NID, address: str = "10.201.1.2/24", mac: str = ""
) -> dict[str, Any]:
    body = fixture("NetworkDriver.CreateEndpoint")
    body.update(NetworkID=nid, EndpointID=eid)
    body["Interface"].update(Address=address, MacAddress=mac)
    return body


def ids(eid: str = EID, nid: str = NID) -> dict[str, str]:
    return {"NetworkID": nid, "EndpointID": eid}


def portmap_body(bindings: list[dict[str, Any]], eid: str = EID) -> dict[str, Any]:
    body = fixture("NetworkDriver.ProgramExternalConnectivity")
    body.update(ids(eid))
    body["Options"][p.PORTMAP] = [
        {"Proto": 6, "IP": "", "HostIP": "", "HostPort": 0, "HostPortEnd": 0, **b} for b in bindings
    ]
    return body


async def with_endpoints(plug: Plugin, *eids: str) -> None:
    await plug.ok("CreateNetwork", network_body())
    for n, eid in enumerate(eids):
        await plug.ok("CreateEndpoint", endpoint_body(eid, address=f"10.201.1.{n + 2}/24"))
        join = fixture("NetworkDriver.Join")
        join.update(ids(eid))
        await plug.ok("Join", join)


def host_ports(plug: Plugin, eid: str) -> list[int]:
    return [port.host_port for port in plug.driver.store.endpoints[eid].ports]


# --- handshake -------------------------------------------------------------------------------


async def test_activate(plug: Plugin) -> None:
    assert await plug.ok("/Plugin.Activate") == {"Implements": ["NetworkDriver"]}
    assert await plug.ok("/Plugin.Activate", {}) == {"Implements": ["NetworkDriver"]}


async def test_get_capabilities(plug: Plugin) -> None:
    expected = {"Scope": "local", "ConnectivityScope": "local"}
    assert await plug.ok("GetCapabilities") == expected  # dockerd sends no body
    assert await plug.ok("GetCapabilities", b"null") == expected


# --- networks --------------------------------------------------------------------------------


async def test_create_and_delete_network(plug: Plugin) -> None:
    assert await plug.ok("CreateNetwork", network_body()) == {}
    net = plug.driver.store.networks[NID]
    assert (net.state, net.backend) == ("ready", "memory")
    assert net.ipv4[0].pool == POOL
    assert net.ipv4[0].gateway == GATEWAY
    assert NID in plug.memory.networks
    assert (plug.driver.store.root / "networks" / f"{NID}.json").is_file()

    delete = fixture("NetworkDriver.DeleteNetwork")
    delete["NetworkID"] = NID
    assert await plug.ok("DeleteNetwork", delete) == {}
    assert NID not in plug.driver.store.networks
    assert NID not in plug.memory.networks
    assert not (plug.driver.store.root / "networks" / f"{NID}.json").exists()


async def test_create_network_docker_option_aliases(plug: Plugin) -> None:
    body = network_body(generic={"com.docker.network.driver.mtu": "1400"})
    assert await plug.ok("CreateNetwork", body) == {}
    assert plug.driver.store.networks[NID].options == {"mtu": "1400"}


async def test_create_network_flags(plug: Plugin) -> None:
    body = network_body(options={p.INTERNAL: True})
    await plug.ok("CreateNetwork", body)
    assert plug.driver.store.networks[NID].internal


async def test_create_network_retry_is_idempotent(plug: Plugin) -> None:
    assert await plug.ok("CreateNetwork", network_body()) == {}
    assert await plug.ok("CreateNetwork", network_body()) == {}
    assert plug.memory.calls.count(("create_network", NID)) == 1


async def test_create_network_with_other_settings_conflicts(plug: Plugin) -> None:
    await plug.ok("CreateNetwork", network_body())
    message = await plug.err("CreateNetwork", network_body(pool="10.99.0.0/24", gateway=""))
    assert NID[:12] in message


async def test_delete_unknown_network_is_success(plug: Plugin) -> None:
    assert await plug.ok("DeleteNetwork", {"NetworkID": UNKNOWN}) == {}
    assert await plug.ok("DeleteNetwork", fixture("NetworkDriver.DeleteNetwork")) == {}


async def test_delete_network_twice(plug: Plugin) -> None:
    await plug.ok("CreateNetwork", network_body())
    assert await plug.ok("DeleteNetwork", {"NetworkID": NID}) == {}
    assert await plug.ok("DeleteNetwork", {"NetworkID": NID}) == {}


async def test_delete_network_removes_stale_endpoints(plug: Plugin) -> None:
    await with_endpoints(plug, EID)
    assert await plug.ok("DeleteNetwork", {"NetworkID": NID}) == {}
    assert plug.driver.store.endpoints == {}
    assert plug.memory.endpoints == set()


async def test_overlapping_subnet_names_both(plug: Plugin) -> None:
    await plug.ok("CreateNetwork", network_body())
    body = network_body(NID2, pool="10.201.0.0/16", gateway="10.201.0.1/16")
    message = await plug.err("CreateNetwork", body)
    assert "10.201.0.0/16" in message
    assert "10.201.1.0/24" in message
    assert NID2 not in plug.driver.store.networks


async def test_disjoint_subnets_coexist(plug: Plugin) -> None:
    await plug.ok("CreateNetwork", network_body())
    await plug.ok("CreateNetwork", network_body(NID2, pool="10.201.2.0/24", gateway=""))
    assert set(plug.driver.store.networks) == {NID, NID2}


async def test_gateway_outside_pool(plug: Plugin) -> None:
    message = await plug.err("CreateNetwork", network_body(gateway="10.9.9.1/24"))
    assert "10.9.9.1" in message
    assert POOL in message
    assert NID not in plug.driver.store.networks


async def test_ipv4_data_without_pool(plug: Plugin) -> None:
    body = network_body()
    body["IPv4Data"] = [{"AddressSpace": "LocalDefault"}]
    message = await plug.err("CreateNetwork", body)
    assert "Pool" in message


async def test_null_ipam_is_accepted(plug: Plugin) -> None:
    body = network_body()
    body["IPv4Data"] = [{"AddressSpace": "null", "Pool": "0.0.0.0/0"}]
    assert await plug.ok("CreateNetwork", body) == {}
    assert plug.driver.store.networks[NID].ipv4 == []


async def test_go_nulls_in_create_network(plug: Plugin) -> None:
    body = {"NetworkID": NID, "Options": None, "IPv4Data": None, "IPv6Data": None}
    assert await plug.ok("CreateNetwork", body) == {}


async def test_unknown_backend_names_installed_ones(plug: Plugin) -> None:
    message = await plug.err("CreateNetwork", network_body(generic={"backend": "nosuch"}))
    assert "backend" in message
    assert "nosuch" in message
    assert "memory" in message


async def test_unknown_option_is_named(plug: Plugin) -> None:
    # the captured body carries `-o nb.key=value`, which the memory backend does not know
    body = fixture("NetworkDriver.CreateNetwork")
    message = await plug.err("CreateNetwork", body)
    assert "nb.key" in message
    assert "mtu" in message  # and what it does know


async def test_bad_option_value_is_named(plug: Plugin) -> None:
    message = await plug.err("CreateNetwork", network_body(generic={"mtu": "lots"}))
    assert "mtu" in message
    assert "lots" in message


async def test_allocate_and_free_network_are_refused(plug: Plugin) -> None:
    body = {"NetworkID": NID, "Options": {"a": "b"}, "IPv4Data": None, "IPv6Data": None}
    assert "local" in await plug.err("AllocateNetwork", body)
    assert "local" in await plug.err("FreeNetwork", {"NetworkID": NID})


# --- endpoints -------------------------------------------------------------------------------


async def test_create_endpoint_fixture(plug: Plugin) -> None:
    await plug.ok("CreateNetwork", network_body())
    assert await plug.ok("CreateEndpoint", fixture("NetworkDriver.CreateEndpoint")) == {}
    ep = plug.driver.store.endpoints[EID]
    assert (ep.state, ep.network_id, ep.address) == ("ready", NID, "10.201.1.2/24")
    assert EID in plug.memory.endpoints


async def test_create_endpoint_fills_mac_only_when_not_given(tmp_path: Path) -> None:
    async with make_plugin(tmp_path, backends={"memory": MacBackend}) as plug:
        await plug.ok("CreateNetwork", network_body())
        reply = await plug.ok("CreateEndpoint", endpoint_body())
        # only the MAC, never the Address dockerd set
        assert reply == {"Interface": {"MacAddress": "02:42:0a:c9:01:02"}}
        given = endpoint_body(EID2, address="10.201.1.3/24", mac="02:00:00:00:00:42")
        assert await plug.ok("CreateEndpoint", given) == {}
        assert plug.driver.store.endpoints[EID2].mac == "02:00:00:00:00:42"


async def test_create_endpoint_given_mac_is_not_echoed(plug: Plugin) -> None:
    await plug.ok("CreateNetwork", network_body())
    body = endpoint_body(mac="02:00:00:00:00:4A")
    assert await plug.ok("CreateEndpoint", body) == {}
    assert plug.driver.store.endpoints[EID].mac == "02:00:00:00:00:4a"


async def test_create_endpoint_null_interface(plug: Plugin) -> None:
    await plug.ok("CreateNetwork", network_body())
    body = {**ids(), "Interface": None, "Options": None}
    assert await plug.ok("CreateEndpoint", body) == {}
    assert plug.driver.store.endpoints[EID].address == ""


async def test_retried_create_endpoint_same_answer(plug: Plugin) -> None:
    await plug.ok("CreateNetwork", network_body())
    first = await plug.ok("CreateEndpoint", endpoint_body())
    again = await plug.ok("CreateEndpoint", endpoint_body())
    assert first == again == {}
    assert plug.memory.calls.count(("create_endpoint", EID)) == 1


async def test_retried_create_endpoint_same_mac(tmp_path: Path) -> None:
    async with make_plugin(tmp_path, backends={"memory": MacBackend}) as plug:
        await plug.ok("CreateNetwork", network_body())
        first = await plug.ok("CreateEndpoint", endpoint_body())
        again = await plug.ok("CreateEndpoint", endpoint_body())
        assert first == again
        assert first["Interface"]["MacAddress"]
        assert plug.memory.calls.count(("create_endpoint", EID)) == 1


async def test_retried_create_endpoint_other_address_conflicts(plug: Plugin) -> None:
    await plug.ok("CreateNetwork", network_body())
    await plug.ok("CreateEndpoint", endpoint_body())
    message = await plug.err("CreateEndpoint", endpoint_body(address="10.201.1.9/24"))
    assert EID[:12] in message


async def test_endpoint_ids_whose_link_names_collide(plug: Plugin) -> None:
    """Link names carry 12 hex digits of the endpoint ID: a second ID with the same prefix is
    refused, and accepted once the first endpoint is gone."""
    twin = EID[:12] + "f" * (len(EID) - 12)
    assert twin != EID
    await plug.ok("CreateNetwork", network_body())
    await plug.ok("CreateEndpoint", endpoint_body())
    message = await plug.err("CreateEndpoint", endpoint_body(eid=twin, address="10.201.1.3/24"))
    assert f"collide with endpoint {EID[:12]}" in message
    assert twin not in plug.driver.store.endpoints
    await plug.ok("DeleteEndpoint", ids())
    await plug.ok("CreateEndpoint", endpoint_body(eid=twin, address="10.201.1.3/24"))
    assert plug.driver.store.endpoints[twin].links == {"peer": f"mem{EID[:12]}"}


async def test_create_endpoint_unknown_network(plug: Plugin) -> None:
    message = await plug.err("CreateEndpoint", fixture("NetworkDriver.CreateEndpoint"))
    assert NID[:12] in message
    assert EID not in plug.driver.store.endpoints


async def test_create_endpoint_bad_address(plug: Plugin) -> None:
    await plug.ok("CreateNetwork", network_body())
    assert "Address" in await plug.err("CreateEndpoint", endpoint_body(address="10.201.1.999/24"))
    assert "IPv4" in await plug.err("CreateEndpoint", endpoint_body(address="fd00::2/64"))


async def test_endpoint_oper_info(plug: Plugin) -> None:
    await with_endpoints(plug, EID)
    body = fixture("NetworkDriver.EndpointOperInfo")
    body.update(ids())
    reply = await plug.ok("EndpointOperInfo", body)
    assert reply == {"Value": {"backend": "memory", "peer": f"mem{EID[:12]}"}}


async def test_endpoint_oper_info_unknown(plug: Plugin) -> None:
    await plug.err("EndpointOperInfo", fixture("NetworkDriver.EndpointOperInfo"))
    await plug.ok("CreateNetwork", network_body())
    assert UNKNOWN[:12] in await plug.err("EndpointOperInfo", ids(UNKNOWN))


async def test_delete_endpoint(plug: Plugin) -> None:
    await with_endpoints(plug, EID)
    body = fixture("NetworkDriver.DeleteEndpoint")
    body.update(ids())
    assert await plug.ok("DeleteEndpoint", body) == {}
    assert EID not in plug.driver.store.endpoints
    assert EID not in plug.memory.endpoints
    assert await plug.ok("DeleteEndpoint", body) == {}  # again: already gone is success


async def test_delete_unknown_endpoint_is_success(plug: Plugin) -> None:
    assert await plug.ok("DeleteEndpoint", fixture("NetworkDriver.DeleteEndpoint")) == {}
    await plug.ok("CreateNetwork", network_body())
    assert await plug.ok("DeleteEndpoint", ids(UNKNOWN)) == {}


# --- join / leave ----------------------------------------------------------------------------


async def test_join(plug: Plugin) -> None:
    await plug.ok("CreateNetwork", network_body())
    await plug.ok("CreateEndpoint", fixture("NetworkDriver.CreateEndpoint"))
    reply = await plug.ok("Join", fixture("NetworkDriver.Join"))
    assert reply["InterfaceName"] == {"SrcName": f"mem{EID[:12]}", "DstPrefix": "eth"}
    assert reply["Gateway"] == "10.201.1.1"  # no prefix length
    assert reply.get("GatewayIPv6", "") == ""
    assert reply.get("StaticRoutes") is None
    assert reply.get("DisableGatewayService", False) is False
    assert plug.driver.store.endpoints[EID].joined
    # a repeated Join answers the same
    assert await plug.ok("Join", fixture("NetworkDriver.Join")) == reply


async def test_join_internal_network_has_no_gateway(plug: Plugin) -> None:
    await plug.ok("CreateNetwork", network_body(options={p.INTERNAL: True}))
    await plug.ok("CreateEndpoint", endpoint_body())
    reply = await plug.ok("Join", {**ids(), "SandboxKey": "/x", "Options": None})
    assert reply.get("Gateway", "") == ""


async def test_join_unknown_network(plug: Plugin) -> None:
    message = await plug.err("Join", fixture("NetworkDriver.Join"))
    assert NID[:12] in message


async def test_join_unknown_endpoint(plug: Plugin) -> None:
    await plug.ok("CreateNetwork", network_body())
    message = await plug.err("Join", fixture("NetworkDriver.Join"))
    assert EID[:12] in message


async def test_leave(plug: Plugin) -> None:
    await with_endpoints(plug, EID)
    body = fixture("NetworkDriver.Leave")
    body.update(ids())
    assert await plug.ok("Leave", body) == {}
    assert not plug.driver.store.endpoints[EID].joined
    assert await plug.ok("Leave", body) == {}


async def test_leave_unknown_is_success(plug: Plugin) -> None:
    # dockerd sends Leave after a failed Join, for an endpoint that may not exist
    assert await plug.ok("Leave", fixture("NetworkDriver.Leave")) == {}


# --- published ports -------------------------------------------------------------------------


async def test_program_external_fixture(plug: Plugin) -> None:
    await with_endpoints(plug, EID)
    body = fixture("NetworkDriver.ProgramExternalConnectivity")
    assert await plug.ok("ProgramExternalConnectivity", body) == {}
    expected = PublishedPort(
        proto="tcp", host_ip="", host_port=18080, container_ip="10.201.1.2", container_port=80
    )
    assert plug.driver.store.endpoints[EID].ports == [expected]
    assert plug.memory.ports[EID] == [expected]
    info = await plug.ok("EndpointOperInfo", ids())
    assert info["Value"]["published"] == ["18080/tcp"]
    # a retried request changes nothing
    assert await plug.ok("ProgramExternalConnectivity", body) == {}
    assert plug.driver.store.endpoints[EID].ports == [expected]


async def test_program_external_range_picks_first_free(plug: Plugin) -> None:
    await with_endpoints(plug, EID, EID2)
    exact = portmap_body([{"Port": 80, "HostPort": 8000, "HostPortEnd": 8000}], EID2)
    await plug.ok("ProgramExternalConnectivity", exact)
    ranged = portmap_body([{"Port": 80, "HostPort": 8000, "HostPortEnd": 8005}])
    await plug.ok("ProgramExternalConnectivity", ranged)
    assert host_ports(plug, EID) == [8001]
    assert host_ports(plug, EID2) == [8000]


async def test_program_external_ephemeral(plug: Plugin) -> None:
    await with_endpoints(plug, EID, EID2)
    await plug.ok("ProgramExternalConnectivity", portmap_body([{"Port": 80}]))
    assert host_ports(plug, EID) == [EPHEMERAL_PORTS[0]] == [49153]
    await plug.ok("ProgramExternalConnectivity", portmap_body([{"Port": 80}], EID2))
    assert host_ports(plug, EID2) == [49154]


async def test_program_external_several_ports_and_protocols(plug: Plugin) -> None:
    await with_endpoints(plug, EID)
    body = portmap_body(
        [
            {"Port": 80, "HostPort": 8080, "HostPortEnd": 8080},
            {"Proto": 17, "Port": 53, "HostIP": "127.0.0.1", "HostPort": 5353},
            {"Proto": 17, "Port": 80, "HostPort": 8080},  # same number, other protocol
        ]
    )
    await plug.ok("ProgramExternalConnectivity", body)
    ports = plug.driver.store.endpoints[EID].ports
    assert sorted(x.describe() for x in ports) == ["127.0.0.1:5353/udp", "8080/tcp", "8080/udp"]


async def test_program_external_conflict_names_port(plug: Plugin) -> None:
    await with_endpoints(plug, EID, EID2)
    body = fixture("NetworkDriver.ProgramExternalConnectivity")
    await plug.ok("ProgramExternalConnectivity", body)
    other = copy.deepcopy(body)
    other["EndpointID"] = EID2
    message = await plug.err("ProgramExternalConnectivity", other)
    assert "18080" in message
    assert EID[:12] in message  # and who holds it
    assert host_ports(plug, EID2) == []
    # a full range conflicts too
    ranged = portmap_body([{"Port": 80, "HostPort": 18080, "HostPortEnd": 18080}], EID2)
    assert "18080" in await plug.err("ProgramExternalConnectivity", ranged)


async def test_program_external_bad_protocol(plug: Plugin) -> None:
    await with_endpoints(plug, EID)
    message = await plug.err(
        "ProgramExternalConnectivity", portmap_body([{"Proto": 1, "Port": 80}])
    )
    assert "protocol" in message


async def test_program_external_internal_network_publishes_nothing(plug: Plugin) -> None:
    await plug.ok("CreateNetwork", network_body(options={p.INTERNAL: True}))
    await plug.ok("CreateEndpoint", endpoint_body())
    body = fixture("NetworkDriver.ProgramExternalConnectivity")
    assert await plug.ok("ProgramExternalConnectivity", body) == {}
    assert host_ports(plug, EID) == []


async def test_program_external_unknown_endpoint(plug: Plugin) -> None:
    body = fixture("NetworkDriver.ProgramExternalConnectivity")
    await plug.err("ProgramExternalConnectivity", body)


async def test_revoke_external(plug: Plugin) -> None:
    await with_endpoints(plug, EID, EID2)
    await plug.ok(
        "ProgramExternalConnectivity", fixture("NetworkDriver.ProgramExternalConnectivity")
    )
    revoke = fixture("NetworkDriver.RevokeExternalConnectivity")
    revoke.update(ids())
    assert await plug.ok("RevokeExternalConnectivity", revoke) == {}
    assert host_ports(plug, EID) == []
    assert EID not in plug.memory.ports
    assert await plug.ok("RevokeExternalConnectivity", revoke) == {}
    # the port is free for another endpoint now
    other = portmap_body([{"Port": 80, "HostPort": 18080, "HostPortEnd": 18080}], EID2)
    await plug.ok("ProgramExternalConnectivity", other)
    assert host_ports(plug, EID2) == [18080]


async def test_revoke_unknown_is_success(plug: Plugin) -> None:
    assert (
        await plug.ok(
            "RevokeExternalConnectivity", fixture("NetworkDriver.RevokeExternalConnectivity")
        )
        == {}
    )


async def test_leave_and_delete_unpublish(plug: Plugin) -> None:
    await with_endpoints(plug, EID, EID2)
    await plug.ok("ProgramExternalConnectivity", portmap_body([{"Port": 80, "HostPort": 9000}]))
    await plug.ok("Leave", ids())  # no Revoke first: Leave unpublishes
    assert host_ports(plug, EID) == []
    await plug.ok(
        "ProgramExternalConnectivity", portmap_body([{"Port": 80, "HostPort": 9000}], EID2)
    )
    await plug.ok("DeleteEndpoint", ids(EID2))
    assert EID2 not in plug.memory.ports
    await plug.ok("ProgramExternalConnectivity", portmap_body([{"Port": 80, "HostPort": 9000}]))
    assert host_ports(plug, EID) == [9000]


@pytest.mark.parametrize("host_port", [-1, 65536, 1 << 40])
async def test_host_port_out_of_range_is_rejected(plug: Plugin, host_port: int) -> None:
    await with_endpoints(plug, EID)
    body = portmap_body([{"Port": 80, "HostPort": host_port, "HostPortEnd": host_port}])
    message = await plug.err("ProgramExternalConnectivity", body)
    assert str(host_port) in message
    assert host_ports(plug, EID) == []


# --- discovery and netplug's own calls -------------------------------------------------------


@pytest.mark.parametrize("call", ["DiscoverNew", "DiscoverDelete"])
async def test_discovery(plug: Plugin, call: str) -> None:
    body = {"DiscoveryType": 1, "DiscoveryData": {"Address": "10.0.0.1", "BindAddress": ""}}
    assert await plug.ok(call, body) == {}
    assert await plug.ok(call, {"DiscoveryType": 2, "DiscoveryData": None}) == {}


async def test_status_and_gc(plug: Plugin) -> None:
    await with_endpoints(plug, EID)
    status = await plug.ok("/Netplug.Status")
    assert [n["id"] for n in status["networks"]] == [NID]
    assert [e["id"] for e in status["endpoints"]] == [EID]
    assert await plug.ok("/Netplug.GC") == {"collected": []}


class FlakyBackend(MemoryBackend):
    """The memory backend whose first endpoint and first network deletion fail."""

    failed: ClassVar[set[str]] = set()

    async def delete_endpoint(self, network: Network, endpoint: Endpoint) -> None:
        if "endpoint" not in self.failed:
            self.failed.add("endpoint")
            raise KernelError("deleting link nphx: device busy (errno 16)")
        await super().delete_endpoint(network, endpoint)

    async def delete_network(self, network: Network) -> None:
        if "network" not in self.failed:
            self.failed.add("network")
            raise KernelError("deleting bridge npbx: device busy (errno 16)")
        await super().delete_network(network)


async def test_gc_finishes_deletions_that_failed_after_the_answer(tmp_path: Path) -> None:
    FlakyBackend.failed.clear()
    async with (
        make_plugin(tmp_path, backends={"memory": FlakyBackend}) as plug,
        trio.open_nursery() as nursery,
    ):
        plug.driver.run_in_background(nursery)
        await with_endpoints(plug, EID)
        assert await plug.ok("DeleteEndpoint", ids()) == {}  # answered; then it fails
        await trio.testing.wait_all_tasks_blocked()
        status = await plug.ok("/Netplug.Status")
        assert [(e["id"], e["state"]) for e in status["endpoints"]] == [(EID, "deleting")]
        collected = (await plug.ok("/Netplug.GC"))["collected"]
        assert collected == [f"endpoint {EID[:12]} (its deletion finished)"]
        assert plug.driver.store.endpoints == {}

        assert await plug.ok("DeleteNetwork", {"NetworkID": NID}) == {}
        await trio.testing.wait_all_tasks_blocked()
        assert [n.state for n in plug.driver.store.networks.values()] == ["deleting"]
        collected = (await plug.ok("/Netplug.GC"))["collected"]
        assert collected == [f"network {NID[:12]} (its deletion finished)"]
        assert plug.driver.store.networks == {}
        assert plug.memory.calls.count(("delete_network", NID)) == 1  # the one that worked
        nursery.cancel_scope.cancel()


# --- HTTP and decoding errors ----------------------------------------------------------------


async def test_unknown_path_is_404(plug: Plugin) -> None:
    for path in ("/NetworkDriver.Frobnicate", "/", "/IpamDriver.GetCapabilities", "/favicon.ico"):
        response = await plug.client.post(path, content=b"{}")
        assert path in error_of(response, 404)
    error_of(await plug.client.get("/nope"), 404)


async def test_wrong_method_is_405(plug: Plugin) -> None:
    for path in ("/Plugin.Activate", "/NetworkDriver.GetCapabilities", "/NetworkDriver.Join"):
        message = error_of(await plug.client.get(path), 405)
        assert "POST" in message
        error_of(await plug.client.put(path, content=b"{}"), 405)


@pytest.mark.parametrize(
    "body", [b"{", b"not json", b'{"NetworkID": }', b"\xff\xfe", b'{"NetworkID": "x"}}']
)
async def test_malformed_json_is_400(plug: Plugin, body: bytes) -> None:
    message = await plug.err("CreateNetwork", body)
    assert "CreateNetwork" in message


async def test_empty_body_where_one_is_needed(plug: Plugin) -> None:
    assert "empty" in await plug.err("CreateNetwork", b"")
    assert "empty" in await plug.err("Join", b"\n")


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
        "AllocateNetwork",
        "FreeNetwork",
    ],
)
async def test_missing_network_id(plug: Plugin, call: str) -> None:
    message = await plug.err(call, {"EndpointID": EID})
    assert "NetworkID" in message


@pytest.mark.parametrize("body", [[], "x", 1, None])
async def test_body_not_an_object(plug: Plugin, body: object) -> None:
    raw = json.dumps(body).encode()
    await plug.err("DeleteNetwork", raw)


async def test_wrong_field_type_names_the_path(plug: Plugin) -> None:
    message = await plug.err("CreateEndpoint", {**ids(), "Interface": {"Address": 5}})
    assert "Interface.Address" in message


@pytest.mark.parametrize("value", ["nothex", "abc", "0" * 11, "g" * 64, "0" * 65])
async def test_network_id_must_be_a_docker_id(plug: Plugin, value: str) -> None:
    assert "NetworkID" in await plug.err("CreateNetwork", network_body(value))
    assert "NetworkID" in await plug.err("DeleteNetwork", {"NetworkID": value})


async def test_ids_with_trailing_newline_are_rejected(plug: Plugin) -> None:
    # `re.match("^...$")` lets "<hex>\n" through; the newline then lands in file names and logs.
    await plug.err("CreateNetwork", network_body(NID + "\n"))
    assert plug.driver.store.networks == {}
    assert list((plug.driver.store.root / "networks").iterdir()) == []


async def asgi_post(app: App, path: str, chunks: list[bytes]) -> tuple[int, bytes]:
    """Drive the ASGI app by hand, delivering the body in `chunks` (httpx's transport always
    sends one chunk and complains when the app stops reading early)."""
    pending = [
        {"type": "http.request", "body": chunk, "more_body": n < len(chunks) - 1}
        for n, chunk in enumerate(chunks)
    ]
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        if pending:
            return pending.pop(0)
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"plugin.moby.localhost")],
        "client": None,
        "server": None,
    }
    await app(scope, receive, send)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    headers = dict(sent[0]["headers"])
    assert headers[b"content-type"] == CONTENT_TYPE.encode()
    body: bytes = sent[1]["body"]
    assert int(headers[b"content-length"]) == len(body)
    status: int = sent[0]["status"]
    return status, body


def asgi_error(status: int, body: bytes, expected: int) -> str:
    assert status == expected, body
    data = json.loads(body)
    assert isinstance(data, dict)
    assert isinstance(data.get("Err"), str)
    assert data["Err"]
    return cast(str, data["Err"])


async def test_body_over_the_cap_is_413(tmp_path: Path) -> None:
    async with make_plugin(tmp_path, max_body=1024) as plug:
        app = App(plug.driver, max_body=1024)
        create = "/NetworkDriver.CreateNetwork"
        big = json.dumps({"NetworkID": NID, "Padding": "x" * 2000}).encode()
        message = asgi_error(*await asgi_post(app, create, [big]), 413)
        assert "1024" in message
        # the cap counts the whole body, however it is split
        message = asgi_error(*await asgi_post(app, create, [big[:600], big[600:1200]]), 413)
        assert NID not in plug.driver.store.networks
        # bodiless calls are capped too
        asgi_error(*await asgi_post(app, "/NetworkDriver.GetCapabilities", [b" " * 1025]), 413)
        # right at the cap is fine, in one piece or several
        body = json.dumps({"NetworkID": NID}).encode()
        exact = body + b" " * (1024 - len(body))
        assert len(exact) == 1024
        assert await asgi_post(app, create, [exact[:10], exact[10:], b""]) == (200, b"{}")
        assert await plug.ok("CreateNetwork", exact) == {}


async def test_deeply_nested_json_is_a_client_error(plug: Plugin) -> None:
    depth = 5000  # 10 KB: well under the body cap
    nested = b"[" * depth + b"]" * depth
    body = b'{"DiscoveryType": 1, "DiscoveryData": ' + nested + b"}"
    await plug.err("DiscoverNew", body)
    body = b'{"NetworkID": "' + NID.encode() + b'", "Options": {"x": ' + nested + b"}}"
    await plug.err("CreateNetwork", body)


async def test_full_container_lifecycle_from_fixtures(plug: Plugin) -> None:
    """The order dockerd uses for `docker run -p 18080:80` then `docker rm -f`."""
    await plug.ok("CreateNetwork", network_body())
    await plug.ok("CreateEndpoint", fixture("NetworkDriver.CreateEndpoint"))
    await plug.ok("EndpointOperInfo", ids())
    await plug.ok("Join", fixture("NetworkDriver.Join"))
    await plug.ok(
        "ProgramExternalConnectivity", fixture("NetworkDriver.ProgramExternalConnectivity")
    )
    await plug.ok("EndpointOperInfo", ids())
    for call in ("RevokeExternalConnectivity", "Leave", "DeleteEndpoint"):
        body = fixture(f"NetworkDriver.{call}")
        body.update(ids())
        assert await plug.ok(call, body) == {}
    await plug.ok("DeleteNetwork", {"NetworkID": NID})
    assert plug.driver.store.networks == {}
    assert plug.driver.store.endpoints == {}
    assert plug.memory.networks == set()
    assert plug.memory.endpoints == set()
    assert plug.memory.ports == {}


# --- properties: whatever arrives, the answer is 200 or a 4xx with Err -------------------------

ROUTES = [
    "/Plugin.Activate",
    "/NetworkDriver.GetCapabilities",
    "/NetworkDriver.CreateNetwork",
    "/NetworkDriver.DeleteNetwork",
    "/NetworkDriver.AllocateNetwork",
    "/NetworkDriver.FreeNetwork",
    "/NetworkDriver.CreateEndpoint",
    "/NetworkDriver.DeleteEndpoint",
    "/NetworkDriver.EndpointOperInfo",
    "/NetworkDriver.Join",
    "/NetworkDriver.Leave",
    "/NetworkDriver.ProgramExternalConnectivity",
    "/NetworkDriver.RevokeExternalConnectivity",
    "/NetworkDriver.DiscoverNew",
    "/NetworkDriver.DiscoverDelete",
    "/Netplug.Status",
    "/Netplug.GC",
]

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=16,
)


def check_answer(response: httpx.Response) -> None:
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"] == CONTENT_TYPE
    data = response.json()
    assert isinstance(data, dict), data
    if response.status_code != 200:
        error_of(response, response.status_code)


def test_routes_cover_the_app() -> None:
    app = App(
        Driver(
            Store(Path("/nonexistent/netplug-test"), fsync=False),
            Registry(BackendContext(), {"memory": MemoryBackend}),
        )
    )
    assert sorted(app.routes) == sorted(ROUTES)


@FUZZ
@given(body=st.binary(max_size=300))
async def test_any_bytes_never_fail(body: bytes) -> None:
    with tempfile.TemporaryDirectory() as state:
        async with make_plugin(Path(state)) as plug:
            for path in ROUTES:
                check_answer(await plug.client.post(path, content=body))


@FUZZ
@given(value=json_values)
async def test_any_json_never_fails(value: Any) -> None:
    body = json.dumps(value).encode()
    with tempfile.TemporaryDirectory() as state:
        async with make_plugin(Path(state)) as plug:
            for path in ROUTES:
                check_answer(await plug.client.post(path, content=body))


# Near-valid requests: Docker's field names, IDs of things that exist, plausible values.
EID3 = "365ca53cb9c8d4fb0a010fa7ff97ff13e067dabaaf69cf22c46304ad48953a12"
docker_ids = st.sampled_from([NID, EID, NID2, UNKNOWN, ""]) | st.from_regex(
    r"\A[0-9a-fA-F]{10,66}\Z"
)
id_pairs = st.sampled_from(
    [(NID, EID), (NID, EID), (NID, EID2), (NID, EID3), (NID2, EID3), (NID.upper(), EID.upper())]
) | st.tuples(docker_ids, docker_ids)
anything = json_values
pools = st.sampled_from(
    ["10.201.1.0/24", "10.201.0.0/16", "10.77.0.0/24", "0.0.0.0/0", "::/0", "fd00::/64", "x", ""]
)
addresses = st.sampled_from(
    ["", "10.201.1.2/24", "10.201.1.9/24", "10.77.0.5/24", "fd00::2/64", "10.201.1.2", "bad"]
) | st.ip_addresses().map(str)
port_numbers = st.sampled_from([0, 80, 8000, 18080, 49153, 65535, 65536]) | st.integers(
    min_value=-(2**63), max_value=2**64 - 1
)
port_bindings = st.fixed_dictionaries(
    {"Proto": st.sampled_from([6, 17, 132]) | st.integers(), "Port": port_numbers},
    optional={
        "IP": st.sampled_from(["", "10.201.1.2"]),
        "HostIP": st.sampled_from(["", "0.0.0.0", "::", "127.0.0.1", "::1", "nope"]),
        "HostPort": port_numbers,
        "HostPortEnd": port_numbers,
    },
)
generic_options = st.dictionaries(
    st.sampled_from(["backend", "mtu", "com.docker.network.driver.mtu", "nb.key"])
    | st.text(max_size=8),
    st.sampled_from(["memory", "bridge", "1500", ""]) | json_scalars,
    max_size=3,
)
options = st.fixed_dictionaries(
    {},
    optional={
        p.GENERIC: generic_options | anything,
        p.ENABLE_IPV6: st.booleans() | anything,
        p.INTERNAL: st.booleans() | st.sampled_from(["true", "0"]) | anything,
        p.PORTMAP: st.lists(port_bindings, max_size=3) | anything,
        p.EXPOSED_PORTS: anything,
        "other": anything,
    },
)
ipam = st.fixed_dictionaries(
    {},
    optional={
        "AddressSpace": st.sampled_from(["LocalDefault", "null", ""]),
        "Pool": pools,
        "Gateway": addresses,
        "AuxAddresses": st.none() | st.dictionaries(st.text(max_size=4), addresses, max_size=2),
    },
)
interfaces = st.fixed_dictionaries(
    {},
    optional={
        "Address": addresses,
        "AddressIPv6": addresses,
        "MacAddress": st.sampled_from(["", "02:42:0a:c9:01:02", "zz"]),
    },
)
optional_fields: dict[str, st.SearchStrategy[Any]] = {
    "Options": st.none() | options | options | anything,
    "IPv4Data": st.none() | st.lists(ipam, max_size=2),
    "IPv6Data": st.none() | st.lists(ipam, max_size=2),
    "Interface": st.none() | interfaces,
    "SandboxKey": st.text(max_size=8),
    "DiscoveryType": st.integers(),
    "DiscoveryData": anything,
}
rest = st.fixed_dictionaries({}, optional=optional_fields)
docker_shaped = st.builds(
    lambda pair, fields: {"NetworkID": pair[0], "EndpointID": pair[1], **fields}, id_pairs, rest
)
loose = st.fixed_dictionaries(
    {},
    optional={"NetworkID": docker_ids | anything, "EndpointID": docker_ids | anything}
    | optional_fields,
)
requests = docker_shaped | docker_shaped | loose
# the calls that reach the driver's deeper paths, drawn more often
weighted_routes = st.sampled_from(
    [
        *ROUTES,
        "/NetworkDriver.CreateNetwork",
        "/NetworkDriver.CreateEndpoint",
        "/NetworkDriver.CreateEndpoint",
        "/NetworkDriver.Join",
        "/NetworkDriver.ProgramExternalConnectivity",
        "/NetworkDriver.ProgramExternalConnectivity",
        "/NetworkDriver.ProgramExternalConnectivity",
    ]
)


async def populate(plug: Plugin) -> None:
    """A network with two joined endpoints, one of them publishing 18080/tcp."""
    await with_endpoints(plug, EID, EID2)
    await plug.ok(
        "ProgramExternalConnectivity", fixture("NetworkDriver.ProgramExternalConnectivity")
    )


def check_invariants(plug: Plugin) -> None:
    store = plug.driver.store
    for ep in store.endpoints.values():
        assert ep.network_id in store.networks, ep
    seen: dict[tuple[str, int], list[tuple[str, str]]] = {}
    for ep in store.endpoints.values():
        for port in ep.ports:
            for ip, owner in seen.get((port.proto, port.host_port), []):
                if owner != ep.id:
                    # the same host port twice only on two distinct host addresses
                    clash = f"{port.describe()} published by {owner[:12]} and {ep.id[:12]}"
                    assert ip, clash
                    assert port.host_ip, clash
                    assert ip != port.host_ip, clash
            seen.setdefault((port.proto, port.host_port), []).append((port.host_ip, ep.id))


@FUZZ
@given(calls=st.lists(st.tuples(weighted_routes, requests), min_size=1, max_size=4))
async def test_docker_shaped_requests_never_fail(calls: list[tuple[str, dict[str, Any]]]) -> None:
    with tempfile.TemporaryDirectory() as state:
        async with make_plugin(Path(state)) as plug:
            await populate(plug)
            for path, body in calls:
                response = await plug.client.post(path, content=json.dumps(body).encode())
                check_answer(response)
                event(f"{path.rsplit('.', 1)[-1]} {response.status_code}")
                check_invariants(plug)
