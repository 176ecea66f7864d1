"""The backend interface, the context backends receive, and the registry that finds them.

A backend programs the kernel for the networks that chose it (`-o backend=NAME`). It is a class
registered in the entry-point group `netplug.backends` and built with a `BackendContext`; the
driver calls it with netplug's records (`model.Network`, `model.Endpoint`), after validation and
before/after persisting them, so a backend never sees HTTP or the store. Every method that
removes something is idempotent: what is already gone counts as removed.

Order of calls, as the driver makes them:
- network: `parse_options` -> `prepare_network` (fills `network.links`, no kernel change) ->
  record saved -> `create_network`; on failure or after a crash `delete_network` undoes it.
- endpoint: `prepare_endpoint` (fills `endpoint.links`/`mac`) -> record saved ->
  `create_endpoint`; `join`; `publish`/`unpublish`; `delete_endpoint`.
- at start: `restore` (make the kernel match the records; report endpoints whose links are gone),
  then `collect_garbage` (remove what carries netplug's names but no record owns).
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import msgspec

from netplug.errors import InvalidOption

if TYPE_CHECKING:
    from netplug.firewall import Firewall
    from netplug.model import Endpoint, Network, PublishedPort
    from netplug.netlink import Kernel

log = logging.getLogger("netplug.backend")

ENTRY_POINT_GROUP = "netplug.backends"

S = TypeVar("S", bound=msgspec.Struct)


class JoinInfo(msgspec.Struct, frozen=True, kw_only=True):
    src_name: str  # the container end, in the host namespace; dockerd moves and renames it
    gateway: str = ""
    gateway_ipv6: str = ""
    disable_gateway_service: bool = False


class Restored(msgspec.Struct, kw_only=True):
    lost_endpoints: list[str] = []  # endpoints whose links are gone (their container is gone)
    repaired: list[str] = []  # what was recreated, for the log


class BackendContext:
    """Shared kernel access. Both are lazy: nothing starts until a backend uses them."""

    def __init__(self, kernel: Kernel | None = None, firewall: Firewall | None = None) -> None:
        self._kernel = kernel
        self._firewall = firewall

    @property
    def kernel(self) -> Kernel:
        if self._kernel is None:
            from netplug.netlink import Kernel

            self._kernel = Kernel()
        return self._kernel

    @property
    def firewall(self) -> Firewall:
        if self._firewall is None:
            from netplug.firewall import Firewall

            self._firewall = Firewall(self.kernel)
        return self._firewall

    def close(self) -> None:
        if self._kernel is not None:
            self._kernel.close()


class Backend(Protocol):
    name: str

    def parse_options(self, options: Mapping[str, str]) -> dict[str, str]:
        """Validate generic `-o` options (Docker's alias keys already mapped to short keys);
        return them normalized. Raise `InvalidOption` naming the option, value and what is
        allowed."""
        ...

    async def prepare_network(self, network: Network, others: list[Network]) -> None: ...

    async def create_network(self, network: Network) -> None: ...

    async def delete_network(self, network: Network) -> None: ...

    def prepare_endpoint(self, network: Network, endpoint: Endpoint) -> None: ...

    async def create_endpoint(self, network: Network, endpoint: Endpoint) -> None: ...

    async def delete_endpoint(self, network: Network, endpoint: Endpoint) -> None: ...

    def join(self, network: Network, endpoint: Endpoint) -> JoinInfo: ...

    async def publish(
        self, network: Network, endpoint: Endpoint, ports: list[PublishedPort]
    ) -> None: ...

    async def unpublish(
        self, network: Network, endpoint: Endpoint, ports: list[PublishedPort]
    ) -> None: ...

    async def restore(self, networks: list[Network], endpoints: list[Endpoint]) -> Restored: ...

    async def collect_garbage(self, records: Records) -> list[str]:
        """Remove kernel objects with this backend's names that no record owns. `records()`
        gives the backend's current records; call it *after* listing the kernel, so that an
        object created meanwhile (record first, kernel second) is never taken for garbage."""
        ...

    async def inspect(self, networks: list[Network], endpoints: list[Endpoint]) -> dict[str, Any]:
        """Kernel reality for `netplug status`."""
        ...


BackendFactory = Callable[[BackendContext], Backend]
Records = Callable[[], "tuple[list[Network], list[Endpoint]]"]


class Registry:
    """Backends by name, from the entry-point group unless given explicitly (tests)."""

    def __init__(
        self, context: BackendContext, factories: Mapping[str, BackendFactory] | None = None
    ) -> None:
        self.context = context
        self._factories: dict[str, BackendFactory | importlib.metadata.EntryPoint] = (
            dict(factories)
            if factories is not None
            else {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
        )
        self._backends: dict[str, Backend] = {}

    def names(self) -> list[str]:
        return sorted(self._factories)

    def get(self, name: str) -> Backend:
        backend = self._backends.get(name)
        if backend is not None:
            return backend
        factory = self._factories.get(name)
        if factory is None:
            raise InvalidOption(
                "backend",
                name,
                f"no such backend; installed backends: {', '.join(self.names()) or 'none'}",
            )
        if isinstance(factory, importlib.metadata.EntryPoint):
            factory = factory.load()
        backend = factory(self.context)
        self._backends[name] = backend
        return backend

    def loaded(self) -> dict[str, Backend]:
        return dict(self._backends)


def convert_options(options: Mapping[str, str], options_type: type[S], *, backend: str) -> S:
    """Turn string options into a typed, validated Struct, with errors that name the option,
    the value given and what is allowed."""
    known = _option_names(options_type)
    for key, value in options.items():
        if key not in known:
            raise InvalidOption(
                key,
                value,
                f"unknown option for backend {backend!r}; its options are: "
                + ", ".join(sorted(known)),
            )
    try:
        return msgspec.convert(dict(options), options_type, strict=False)
    except msgspec.ValidationError as exc:
        text = str(exc)
        key = text.rsplit("$.", 1)[-1].strip("`") if "$." in text else ""
        reason = text.split(" - at ", 1)[0]
        hint = _hints(options_type).get(key, reason)
        raise InvalidOption(key or "options", options.get(key), hint) from exc


@functools.cache
def _option_names(options_type: type[msgspec.Struct]) -> frozenset[str]:
    return frozenset(f.encode_name for f in msgspec.structs.fields(options_type))


def _hints(options_type: type[msgspec.Struct]) -> dict[str, str]:
    hints: dict[str, str] = getattr(options_type, "__hints__", {})
    return hints
