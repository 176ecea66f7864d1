"""Network-driver semantics: validation, idempotency, rollback, locking and persistence order.

This module knows Docker's protocol (request and response Structs) and netplug's records, but no
HTTP and no kernel. The rules it keeps come from how dockerd behaves:

- CreateNetwork is sent once in a network's life and never replayed, endpoint IDs change at every
  container start, and dockerd retries a request whose connection dropped. So every change is
  written to the store *before* the kernel is touched (state "creating"/"deleting"), then marked
  done; at start, `restore` undoes unfinished creations, finishes unfinished deletions and makes
  the kernel match the records. A retried request finds its own finished work and answers the
  same.
- Leave/DeleteEndpoint/DeleteNetwork errors never reach a user (dockerd logs and forgets), and
  something already gone is success. Ports are unpublished by Revoke, Leave and DeleteEndpoint,
  whichever comes first, since Revoke is not always sent.
- Calls for many containers arrive at once: network creation/deletion is serialized (subnet and
  name checks need a stable view), endpoint calls are serialized per endpoint and run in parallel
  otherwise; host ports are allocated under their own lock.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import msgspec
import trio

from netplug import protocol as p
from netplug.backend import Backend, Registry
from netplug.errors import Conflict, InvalidOption, InvalidRequest, NotFound, Unsupported
from netplug.model import PROTO_NUMBERS, Endpoint, Network, PublishedPort, Subnet
from netplug.store import Store
from netplug.tasks import together

log = logging.getLogger("netplug.driver")

T = TypeVar("T")

# Docker's bridge-driver option keys, accepted with the same meaning.
DOCKER_ALIASES = {
    "com.docker.network.driver.mtu": "mtu",
    "com.docker.network.bridge.name": "bridge_name",
    "com.docker.network.bridge.enable_icc": "icc",
    "com.docker.network.bridge.enable_ip_masquerade": "masquerade",
}
BACKEND_OPTION = "backend"
EPHEMERAL_PORTS = range(49153, 65536)  # Docker's default range for -p without a host port

_DOCKER_ID = re.compile(r"[0-9a-fA-F]{12,64}")
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
_generic_decoder = msgspec.json.Decoder(dict[str, str | int | float | bool] | None)
_bool_decoder = msgspec.json.Decoder(bool | str | None)
_portmap_decoder = msgspec.json.Decoder(list[p.PortBinding] | None)


def check_id(kind: str, value: str) -> str:
    if not _DOCKER_ID.fullmatch(value):
        raise InvalidRequest(
            f"{kind} {value!r} is not a Docker ID: expected 12 to 64 hexadecimal digits"
        )
    return value.lower()


def _option(
    options: dict[str, msgspec.Raw] | None, key: str, decoder: msgspec.json.Decoder[T]
) -> T | None:
    if not options or key not in options:
        return None
    try:
        return decoder.decode(options[key])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InvalidRequest(f"Options[{key!r}]: {exc}") from exc


def _flag(options: dict[str, msgspec.Raw] | None, key: str) -> bool:
    value = _option(options, key, _bool_decoder)
    if isinstance(value, str):
        return value.lower() in {"1", "true", "yes", "on"}
    return bool(value)


def _subnets(kind: str, version: int, data: list[p.IPAMData] | None) -> list[Subnet]:
    subnets: list[Subnet] = []
    for n, entry in enumerate(data or []):
        where = f"{kind}[{n}]"
        if not entry.pool:
            raise InvalidRequest(
                f"{where} has no Pool: give the network a subnet (docker network create "
                "--subnet ...) or use Docker's default IPAM"
            )
        if entry.address_space == "null" or entry.pool in {"0.0.0.0/0", "::/0"}:
            continue  # the null IPAM: no addresses to manage
        try:
            pool = ipaddress.ip_network(entry.pool, strict=False)
        except ValueError as exc:
            raise InvalidRequest(f"{where}.Pool {entry.pool!r} is not a subnet: {exc}") from exc
        if pool.version != version:
            raise InvalidRequest(f"{where}.Pool {entry.pool!r} is not an IPv{version} subnet")
        gateway = entry.gateway
        if gateway:
            try:
                iface = ipaddress.ip_interface(gateway)
            except ValueError as exc:
                raise InvalidRequest(f"{where}.Gateway {gateway!r} is not an address") from exc
            if iface.ip not in pool:
                raise InvalidRequest(
                    f"{where}.Gateway {iface.ip} is outside its pool {pool}: choose a gateway "
                    "inside the subnet (--gateway)"
                )
            gateway = f"{iface.ip}/{pool.prefixlen}"
        subnets.append(Subnet(pool=str(pool), gateway=gateway))
    return subnets


class Driver:
    def __init__(self, store: Store, registry: Registry, *, default_backend: str = "bridge"):
        self.store = store
        self.registry = registry
        self.default_backend = default_backend
        # A semaphore, not a Lock: a network deletion finishing in the background keeps it
        # after the request that took it has answered (see _delete_network).
        self._network_lock = trio.Semaphore(1)
        self._port_lock = trio.Lock()
        self._endpoint_locks: defaultdict[str, trio.Lock] = defaultdict(trio.Lock)
        self._creating: dict[str, Endpoint] = {}  # endpoints whose links are being made
        self._finishing: set[str] = set()  # endpoints being deleted after their answer
        # Where work off the reply path runs; None (tests, tools): everything inline.
        self._background: trio.Nursery | None = None

    def run_in_background(self, nursery: trio.Nursery | None) -> None:
        self._background = nursery

    # --- helpers ---------------------------------------------------------------------------

    def _network(self, network_id: str) -> Network:
        network_id = check_id("NetworkID", network_id)
        net = self.store.networks.get(network_id)
        if net is None or net.state != "ready":
            raise NotFound(
                f"network {network_id[:12]} not found: netplug has no record of it. If netplug's "
                "state directory was lost, remove the network (docker network rm) and create it "
                "again"
            )
        return net

    def _backend(self, net: Network) -> Backend:
        return self.registry.get(net.backend)

    @asynccontextmanager
    async def _endpoint_lock(self, endpoint_id: str) -> AsyncIterator[None]:
        lock = self._endpoint_locks[endpoint_id]
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._endpoint_locks.pop(endpoint_id, None)

    @asynccontextmanager
    async def _maybe_port_lock(self) -> AsyncIterator[None]:
        """The port lock, unless this task already holds it (publish replaces old ports)."""
        if (
            self._port_lock.locked()
            and self._port_lock.statistics().owner is trio.lowlevel.current_task()
        ):
            yield
        else:
            async with self._port_lock:
                yield

    @staticmethod
    async def _shielded(fn: Callable[[], Awaitable[T]]) -> T:
        """Run a change to completion even if the caller goes away: a half-made change is worse
        than a finished one nobody waited for."""
        with trio.CancelScope(shield=True):
            result = await fn()
        return result

    # --- capabilities ----------------------------------------------------------------------

    @staticmethod
    def capabilities() -> p.CapabilitiesResponse:
        return p.CapabilitiesResponse(scope="local", connectivity_scope="local")

    # --- networks --------------------------------------------------------------------------

    async def create_network(self, req: p.CreateNetworkRequest) -> None:
        network_id = check_id("NetworkID", req.network_id)
        generic = _option(req.options, p.GENERIC, _generic_decoder) or {}
        raw = {
            DOCKER_ALIASES.get(k, k): str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in generic.items()
        }
        backend_name = raw.pop(BACKEND_OPTION, self.default_backend)
        backend = self.registry.get(backend_name)
        options = backend.parse_options(raw)
        enable_ipv6 = _flag(req.options, p.ENABLE_IPV6)
        net = Network(
            id=network_id,
            backend=backend_name,
            options=options,
            internal=_flag(req.options, p.INTERNAL),
            enable_ipv6=enable_ipv6,
            ipv4=_subnets("IPv4Data", 4, req.ipv4_data),
            ipv6=_subnets("IPv6Data", 6, req.ipv6_data) if enable_ipv6 else [],
        )
        await self._shielded(lambda: self._create_network(net, backend))

    async def _create_network(self, net: Network, backend: Backend) -> None:
        async with self._network_lock:
            existing = self.store.networks.get(net.id)
            if existing is not None and existing.state == "ready":
                if (existing.backend, existing.options, existing.subnets) == (
                    net.backend,
                    net.options,
                    net.subnets,
                ):
                    return  # a retried request: the work is done
                raise Conflict(f"network {net.id[:12]} exists with other settings")
            others = [n for n in self.store.networks.values() if n.id != net.id]
            self._check_overlap(net, others)
            await backend.prepare_network(net, others)
            await self.store.save(net)
            try:
                await backend.create_network(net)
            except BaseException:
                await self._undo_network(net, backend)
                raise
            net.state = "ready"
            await self.store.save(net)
        log.info(
            "network created",
            extra={"network": net.id, "fields": {"backend": net.backend, **net.links}},
        )

    @staticmethod
    def _check_overlap(net: Network, others: list[Network]) -> None:
        for subnet in net.subnets:
            for other in others:
                for theirs in other.subnets:
                    a, b = subnet.network, theirs.network
                    if a.version == b.version and a.overlaps(b):
                        raise Conflict(
                            f"subnet {a} overlaps subnet {b} of netplug network "
                            f"{other.id[:12]}: choose another --subnet"
                        )

    async def _undo_network(self, net: Network, backend: Backend) -> None:
        with trio.CancelScope(shield=True):
            try:
                await backend.delete_network(net)
            except Exception:
                log.exception("rollback of network %s failed", net.id[:12])
                return  # keep the record: the next start or `netplug gc` finishes it
            await self.store.remove(net)

    async def delete_network(self, network_id: str) -> None:
        network_id = check_id("NetworkID", network_id)
        await self._shielded(lambda: self._delete_network(network_id))

    async def _delete_network(self, network_id: str) -> None:
        await self._network_lock.acquire()
        handed_over = False
        try:
            net = self.store.networks.get(network_id)
            if net is None:
                log.info("network already gone", extra={"network": network_id})
                return
            backend = self._backend(net)
            for ep in self.store.endpoints_of(network_id):
                log.warning(
                    "deleting stale endpoint with its network",
                    extra={"network": network_id, "endpoint": ep.id},
                )
                await self._delete_endpoint(net, ep, backend)
            net.state = "deleting"
            await self.store.save(net)
            if self._background is None:
                await self._remove_network(net, backend)
            else:
                # Answer now and remove the bridge and its rules after (~100 ms: the kernel
                # waits for RCU, iptables is an exec). The lock goes with the work, so the next
                # network call waits until it is done; a crash leaves a "deleting" record that
                # the next start finishes.
                self._background.start_soon(self._finish_network_delete, net, backend)
                handed_over = True
        finally:
            if not handed_over:
                self._network_lock.release()

    async def _remove_network(self, net: Network, backend: Backend) -> None:
        await backend.delete_network(net)
        await self.store.remove(net)

    async def _finish_network_delete(self, net: Network, backend: Backend) -> None:
        """The background half of a network deletion; it owns the network lock."""
        try:
            await self._remove_network(net, backend)
        except Exception:
            log.exception(
                "deleting the network's bridge and rules failed; netplug gc or the next start "
                "retries",
                extra={"network": net.id},
            )
        finally:
            self._network_lock.release()

    @staticmethod
    async def allocate_network(req: p.AllocateNetworkRequest) -> None:
        raise Unsupported(
            "netplug is a local-scope driver: AllocateNetwork is only sent for global-scope "
            "(Swarm) networks"
        )

    @staticmethod
    async def free_network(req: p.NetworkRequest) -> None:
        raise Unsupported(
            "netplug is a local-scope driver: FreeNetwork is only sent for global-scope "
            "(Swarm) networks"
        )

    # --- endpoints -------------------------------------------------------------------------

    async def create_endpoint(self, req: p.CreateEndpointRequest) -> p.CreateEndpointResponse:
        net = self._network(req.network_id)
        endpoint_id = check_id("EndpointID", req.endpoint_id)
        iface = req.interface or p.EndpointInterface()
        for name, value, version in (
            ("Address", iface.address, 4),
            ("AddressIPv6", iface.address_ipv6, 6),
        ):
            if value:
                try:
                    parsed = ipaddress.ip_interface(value)
                except ValueError as exc:
                    raise InvalidRequest(f"Interface.{name} {value!r}: {exc}") from exc
                if parsed.version != version:
                    raise InvalidRequest(f"Interface.{name} {value!r} is not IPv{version}")
                pools = [s.network for s in (net.ipv4 if version == 4 else net.ipv6)]
                if pools and not any(parsed.ip in pool for pool in pools):
                    raise InvalidRequest(
                        f"Interface.{name} {value} is outside the network's subnets "
                        f"({', '.join(map(str, pools))})"
                    )
        if iface.mac_address and not _MAC.fullmatch(iface.mac_address):
            raise InvalidRequest(
                f"Interface.MacAddress {iface.mac_address!r} is not a MAC address "
                "(six hex pairs separated by ':')"
            )
        ep = Endpoint(
            id=endpoint_id,
            network_id=net.id,
            address=iface.address,
            address_ipv6=iface.address_ipv6,
            mac=iface.mac_address.lower(),
        )
        backend = self._backend(net)
        async with self._endpoint_lock(endpoint_id):
            existing = self.store.endpoints.get(endpoint_id)
            if existing is not None and existing.state == "ready":
                if (existing.network_id, existing.address, existing.address_ipv6) != (
                    ep.network_id,
                    ep.address,
                    ep.address_ipv6,
                ):
                    raise Conflict(f"endpoint {endpoint_id[:12]} exists with other settings")
                ep = existing  # a retried request: answer as the first time
            else:
                backend.prepare_endpoint(net, ep)
                self._check_names(ep)
                await self._shielded(lambda: self._create_endpoint(net, ep, backend))
        reply = p.EndpointInterfaceReply()
        if not iface.mac_address and ep.mac:
            reply.mac_address = ep.mac
        return p.CreateEndpointResponse(interface=reply if reply.mac_address else None)

    def _check_names(self, ep: Endpoint) -> None:
        mine = set(ep.links.values())
        owners = {self.store.link_owner(name) for name in mine}
        owners |= {x.id for x in self._creating.values() if mine & set(x.links.values())}
        others = sorted(owner for owner in owners if owner is not None and owner != ep.id)
        if others:
            raise Conflict(
                f"endpoint {ep.id[:12]}: its interface names {sorted(mine)} collide with "
                f"endpoint {others[0][:12]}; retry the container start"
            )

    async def _create_endpoint(self, net: Network, ep: Endpoint, backend: Backend) -> None:
        # One write, made while the kernel works: neither waits for the other. A crash that
        # interrupts one of them is repaired at start: links that carry netplug's names but no
        # record are garbage, a record whose veth is missing is dropped. `_creating` keeps a
        # garbage collection at run time from taking the links meanwhile.
        self._creating[ep.id] = ep
        ep.state = "ready"
        try:
            await together(
                partial(backend.create_endpoint, net, ep),
                partial(self.store.save, ep, concurrent=True),
            )
        except BaseException:
            with trio.CancelScope(shield=True):
                try:
                    await backend.delete_endpoint(net, ep)
                    await self.store.remove(ep)
                except Exception:
                    log.exception("rollback of endpoint %s failed", ep.id[:12])
            raise
        finally:
            del self._creating[ep.id]
        log.info(
            "endpoint created",
            extra={"network": net.id, "endpoint": ep.id, "fields": dict(ep.links)},
        )

    def _endpoint(self, network_id: str, endpoint_id: str) -> tuple[Network, Endpoint]:
        net = self._network(network_id)
        endpoint_id = check_id("EndpointID", endpoint_id)
        ep = self.store.endpoints.get(endpoint_id)
        if ep is None or ep.network_id != net.id or ep.state != "ready":
            raise NotFound(
                f"endpoint {endpoint_id[:12]} not found on network {net.id[:12]}: netplug has "
                "no record of it; restart the container to create it again"
            )
        return net, ep

    async def endpoint_info(self, req: p.EndpointRequest) -> p.EndpointOperInfoResponse:
        net, ep = self._endpoint(req.network_id, req.endpoint_id)
        value: dict[str, Any] = {"backend": net.backend, **ep.links}
        if ep.mac:
            value["mac"] = ep.mac
        if ep.ports:
            value["published"] = [port.describe() for port in ep.ports]
        return p.EndpointOperInfoResponse(value=value)

    async def delete_endpoint(self, req: p.EndpointRequest) -> None:
        network_id = check_id("NetworkID", req.network_id)
        endpoint_id = check_id("EndpointID", req.endpoint_id)
        async with self._endpoint_lock(endpoint_id):
            ep = self.store.endpoints.get(endpoint_id)
            net = self.store.networks.get(ep.network_id) if ep is not None else None
            if ep is None or net is None or ep.network_id != network_id:
                log.info(
                    "endpoint already gone",
                    extra={"network": network_id, "endpoint": endpoint_id},
                )
                return
            backend = self._backend(net)
            if self._background is None:
                await self._shielded(lambda: self._delete_endpoint(net, ep, backend))
                return
            # Off the reply path: unpublish and mark the record, answer, then delete the links
            # (a veth takes ~16 ms to go in the kernel). Nothing can observe the difference: the
            # names are this endpoint's own, and a crash leaves a "deleting" record that the
            # next start finishes.
            await self._shielded(lambda: self._mark_deleting(net, ep, backend))
            self._background.start_soon(self._finish_delete, net, ep, backend)

    async def _mark_deleting(self, net: Network, ep: Endpoint, backend: Backend) -> None:
        await self._unpublish(net, ep, backend, save=False)
        ep.state = "deleting"
        await self.store.save(ep)

    async def _finish_delete(self, net: Network, ep: Endpoint, backend: Backend) -> None:
        self._finishing.add(ep.id)
        try:
            await backend.delete_endpoint(net, ep)
            await self.store.remove(ep)
        except Exception:
            log.exception(
                "deleting endpoint links failed; netplug gc or the next start retries",
                extra={"network": net.id, "endpoint": ep.id},
            )
        finally:
            self._finishing.discard(ep.id)

    async def _delete_endpoint(self, net: Network, ep: Endpoint, backend: Backend) -> None:
        # Kernel first, record last: a crash in between leaves a record whose links are gone,
        # which the next start drops (or a retried DeleteEndpoint finishes).
        await self._unpublish(net, ep, backend, save=False)
        await backend.delete_endpoint(net, ep)
        await self.store.remove(ep)

    # --- join / leave ----------------------------------------------------------------------

    async def join(self, req: p.JoinRequest) -> p.JoinResponse:
        net, ep = self._endpoint(req.network_id, req.endpoint_id)
        info = self._backend(net).join(net, ep)
        # `joined` is kept in memory only (it is written with the record's next change): it
        # informs `netplug status` and nothing depends on it after a restart.
        ep.joined = True
        return p.JoinResponse(
            interface_name=p.InterfaceName(src_name=info.src_name, dst_prefix="eth"),
            gateway=info.gateway,
            gateway_ipv6=info.gateway_ipv6,
            disable_gateway_service=info.disable_gateway_service,
        )

    async def leave(self, req: p.EndpointRequest) -> None:
        try:
            net, ep = self._endpoint(req.network_id, req.endpoint_id)
        except NotFound:
            log.info(
                "leave for an unknown endpoint",
                extra={"network": req.network_id, "endpoint": req.endpoint_id},
            )
            return
        async with self._endpoint_lock(ep.id):
            await self._shielded(lambda: self._leave(net, ep))

    async def _leave(self, net: Network, ep: Endpoint) -> None:
        ep.joined = False
        await self._unpublish(net, ep, self._backend(net))

    # --- published ports -------------------------------------------------------------------

    async def program_external(self, req: p.ExternalConnectivityRequest) -> None:
        net, ep = self._endpoint(req.network_id, req.endpoint_id)
        bindings = _option(req.options, p.PORTMAP, _portmap_decoder) or []
        if net.internal or not bindings:
            return
        backend = self._backend(net)
        async with self._endpoint_lock(ep.id), self._port_lock:
            ports = self._allocate(ep, bindings)
            if set(ports) == set(ep.ports):
                return  # a retried request
            await self._shielded(lambda: self._publish(net, ep, backend, ports))

    async def _publish(
        self, net: Network, ep: Endpoint, backend: Backend, ports: list[PublishedPort]
    ) -> None:
        await self._unpublish(net, ep, backend)
        ep.ports = ports
        await self.store.save(ep)
        try:
            await backend.publish(net, ep, ports)
        except BaseException:
            ep.ports = []
            with trio.CancelScope(shield=True):
                await backend.unpublish(net, ep, ports)
                await self.store.save(ep)
            raise
        log.info(
            "ports published",
            extra={
                "network": net.id,
                "endpoint": ep.id,
                "fields": {"ports": ",".join(x.describe() for x in ports)},
            },
        )

    def _allocate(self, ep: Endpoint, bindings: list[p.PortBinding]) -> list[PublishedPort]:
        taken: dict[tuple[str, int], list[tuple[str, str]]] = defaultdict(list)
        for other in self.store.endpoints.values():
            if other.id != ep.id:
                for port in other.ports:
                    taken[(port.proto, port.host_port)].append((port.host_ip, other.id))
        previous = {(x.proto, x.container_port, x.host_ip): x.host_port for x in ep.ports}
        result: list[PublishedPort] = []

        def free(proto: str, host_port: int, host_ip: str) -> str | None:
            for ip, owner in taken[(proto, host_port)]:
                if not ip or not host_ip or ip == host_ip:
                    return owner
            for port in result:
                if (port.proto, port.host_port) == (proto, host_port) and (
                    not port.host_ip or not host_ip or port.host_ip == host_ip
                ):
                    return ep.id
            return None

        for binding in bindings:
            proto = PROTO_NUMBERS.get(binding.proto)
            if proto is None:
                raise InvalidRequest(
                    f"port {binding.port}: protocol number {binding.proto} is not tcp, udp or sctp"
                )
            host_ip = "" if binding.host_ip in {"", "0.0.0.0", "::"} else binding.host_ip
            try:
                ip_version = ipaddress.ip_address(host_ip).version if host_ip else 0
            except ValueError as exc:
                raise InvalidRequest(f"HostIP {binding.host_ip!r} is not an address") from exc
            if ip_version == 6:
                raise InvalidOption(
                    "-p",
                    f"[{host_ip}]:{binding.host_port}:{binding.port}",
                    "netplug publishes on all addresses or on one IPv4 host address; "
                    "omit the IPv6 host address",
                )
            if not 0 < binding.port < 65536:
                raise InvalidRequest(f"container port {binding.port} is out of range (1-65535)")
            if not 0 <= binding.host_port < 65536 or not 0 <= binding.host_port_end < 65536:
                raise InvalidRequest(
                    f"host port {binding.host_port}-{binding.host_port_end} is out of range "
                    "(1-65535, or 0 to let netplug choose)"
                )
            if binding.host_port == 0:
                want = previous.get((proto, binding.port, host_ip))
                candidates: range | list[int] = [want] if want else EPHEMERAL_PORTS
            else:
                end = max(binding.host_port, binding.host_port_end)
                candidates = range(binding.host_port, end + 1)
            chosen, owner = 0, None
            for candidate in candidates:
                owner = free(proto, candidate, host_ip)
                if owner is None:
                    chosen = candidate
                    break
            if not chosen:
                first = binding.host_port or "ephemeral"
                raise Conflict(
                    f"host port {host_ip + ':' if host_ip else ''}{first}/{proto} is already "
                    f"published by netplug endpoint {(owner or '?')[:12]}: choose another host "
                    "port (-p HOSTPORT:PORT) or stop the other container"
                )
            targets = [ep.ipv4] if ep.ipv4 else []
            if ep.ipv6 and not host_ip:
                targets.append(ep.ipv6)
            result += [
                PublishedPort(
                    proto=proto,
                    host_ip=host_ip,
                    host_port=chosen,
                    container_ip=target,
                    container_port=binding.port,
                )
                for target in targets
            ]
        return result

    async def revoke_external(self, req: p.EndpointRequest) -> None:
        try:
            net, ep = self._endpoint(req.network_id, req.endpoint_id)
        except NotFound:
            return
        async with self._endpoint_lock(ep.id):
            await self._shielded(lambda: self._unpublish(net, ep, self._backend(net)))

    async def _unpublish(
        self, net: Network, ep: Endpoint, backend: Backend, *, save: bool = True
    ) -> None:
        if not ep.ports:
            return
        async with self._maybe_port_lock():
            ports, ep.ports = ep.ports, []
            await backend.unpublish(net, ep, ports)
            if save:
                await self.store.save(ep)
        log.info(
            "ports unpublished",
            extra={
                "network": net.id,
                "endpoint": ep.id,
                "fields": {"ports": ",".join(x.describe() for x in ports)},
            },
        )

    # --- discovery -------------------------------------------------------------------------

    @staticmethod
    async def discover(req: p.DiscoveryNotification) -> None:
        """Node discovery matters only to global-scope drivers; nothing to do."""

    # --- start, repair, status -------------------------------------------------------------

    async def restore(self) -> dict[str, list[str]]:
        """Bring records and kernel in line, before any call that needs state is served."""
        report: dict[str, list[str]] = defaultdict(list)
        report["problems"] += await trio.to_thread.run_sync(self.store.load)
        store = self.store
        for ep in list(store.endpoints.values()):
            net = store.networks.get(ep.network_id)
            if net is None:
                await store.remove(ep)
                report["removed"].append(f"endpoint {ep.id[:12]} (its network is gone)")
            elif ep.state != "ready" or net.state != "ready":
                await self._undo_endpoint(net, ep, report, f"unfinished {ep.state}")
        for net in list(store.networks.values()):
            if net.state != "ready":
                await self._backend(net).delete_network(net)
                await store.remove(net)
                report["removed"].append(f"network {net.id[:12]} (unfinished {net.state})")
        for name, backend in self._backends_in_use().items():
            networks, endpoints = self._records(name)
            before = [dict(net.links) for net in networks]
            restored = await backend.restore(networks, endpoints)
            report["repaired"] += restored.repaired
            for net, links in zip(networks, before, strict=True):
                if net.links != links:  # the backend noted a change (e.g. it made the bridge)
                    await store.save(net)
            for endpoint_id in restored.lost_endpoints:
                ep = store.endpoints[endpoint_id]
                net = store.networks[ep.network_id]
                await self._undo_endpoint(net, ep, report, "its links are gone")
        report["collected"] += await self.collect_garbage()
        return dict(report)

    async def _undo_endpoint(
        self, net: Network, ep: Endpoint, report: dict[str, list[str]], why: str
    ) -> None:
        await self._delete_endpoint(net, ep, self._backend(net))
        report["removed"].append(f"endpoint {ep.id[:12]} ({why})")

    def _backends_in_use(self) -> dict[str, Backend]:
        names = {n.backend for n in self.store.networks.values()} | set(self.registry.loaded())
        if self.default_backend in self.registry.names():
            names.add(self.default_backend)
        return {name: self.registry.get(name) for name in sorted(names)}

    def _records(self, backend: str) -> tuple[list[Network], list[Endpoint]]:
        """The backend's networks and endpoints, endpoints being created included."""
        nets = [n for n in self.store.networks.values() if n.backend == backend]
        ids = {n.id for n in nets}
        endpoints = [*self.store.endpoints.values(), *self._creating.values()]
        return nets, [e for e in endpoints if e.network_id in ids]

    async def collect_garbage(self) -> list[str]:
        collected: list[str] = []
        async with self._network_lock, self._port_lock:
            # Deletions that failed after their answer (their records still say "deleting"):
            # finish them. Network deletions in progress hold the network lock, so none runs
            # now; endpoint deletions in progress are skipped.
            for ep in list(self.store.endpoints.values()):
                net = self.store.networks.get(ep.network_id)
                if ep.state == "deleting" and ep.id not in self._finishing and net is not None:
                    await self._shielded(
                        partial(self._delete_endpoint, net, ep, self._backend(net))
                    )
                    collected.append(f"endpoint {ep.id[:12]} (its deletion finished)")
            for net in list(self.store.networks.values()):
                if net.state == "deleting" and not self.store.endpoints_of(net.id):
                    await self._shielded(partial(self._remove_network, net, self._backend(net)))
                    collected.append(f"network {net.id[:12]} (its deletion finished)")
            for name, backend in self._backends_in_use().items():
                collected += await backend.collect_garbage(partial(self._records, name))
        for item in collected:
            log.info("garbage collected", extra={"fields": {"removed": item}})
        return collected

    async def status(self) -> dict[str, Any]:
        kernel: dict[str, Any] = {}
        for name, backend in self._backends_in_use().items():
            kernel[name] = await backend.inspect(*self._records(name))
        return {
            "networks": [msgspec.to_builtins(n) for n in self.store.networks.values()],
            "endpoints": [msgspec.to_builtins(e) for e in self.store.endpoints.values()],
            "kernel": kernel,
        }
