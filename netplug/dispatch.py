"""The ASGI application: route table, body cap, decode, call the driver, encode, and the one place
where exceptions become Docker's `{"Err": "..."}` answers.

It knows HTTP and the protocol Structs, not the kernel and not the server that runs it (hypercorn
in production, httpx's ASGITransport in tests).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import msgspec
import trio

from netplug import protocol as p
from netplug.driver import Driver
from netplug.errors import InvalidRequest, NetplugError, TooLarge

log = logging.getLogger("netplug.dispatch")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_BODY = 1 << 20  # 1 MiB: Docker's largest bodies are a few KiB
CONTENT_TYPE = b"application/vnd.docker.plugins.v1+json"

Handler = Callable[[Any], Awaitable[Any]]

_encoder = msgspec.json.Encoder()
_STATIC = frozenset({"/Plugin.Activate", "/NetworkDriver.GetCapabilities"})
_EMPTY = b"{}"


class Route(msgspec.Struct, frozen=True):
    request: type[msgspec.Struct] | None  # None: the body is ignored (it may be empty)
    handler: Handler
    quiet: bool = False  # log at debug level: called on every inspect / health check
    decoder: msgspec.json.Decoder[Any] | None = None


def routes(driver: Driver) -> dict[str, Route]:
    async def activate(_: None) -> p.ActivateResponse:
        return p.ActivateResponse(implements=["NetworkDriver"])

    async def capabilities(_: None) -> p.CapabilitiesResponse:
        return driver.capabilities()

    async def delete_network(req: p.NetworkRequest) -> None:
        await driver.delete_network(req.network_id)

    async def status(_: None) -> dict[str, Any]:
        return await driver.status()

    async def collect(_: None) -> dict[str, Any]:
        return {"collected": await driver.collect_garbage()}

    table: dict[str, tuple[type[msgspec.Struct] | None, Handler, bool]] = {
        "/Plugin.Activate": (None, activate, True),
        "/NetworkDriver.GetCapabilities": (None, capabilities, True),
        "/NetworkDriver.CreateNetwork": (p.CreateNetworkRequest, driver.create_network, False),
        "/NetworkDriver.DeleteNetwork": (p.NetworkRequest, delete_network, False),
        "/NetworkDriver.AllocateNetwork": (
            p.AllocateNetworkRequest,
            driver.allocate_network,
            False,
        ),
        "/NetworkDriver.FreeNetwork": (p.NetworkRequest, driver.free_network, False),
        "/NetworkDriver.CreateEndpoint": (p.CreateEndpointRequest, driver.create_endpoint, False),
        "/NetworkDriver.DeleteEndpoint": (p.EndpointRequest, driver.delete_endpoint, False),
        "/NetworkDriver.EndpointOperInfo": (p.EndpointRequest, driver.endpoint_info, True),
        "/NetworkDriver.Join": (p.JoinRequest, driver.join, False),
        "/NetworkDriver.Leave": (p.EndpointRequest, driver.leave, False),
        "/NetworkDriver.ProgramExternalConnectivity": (
            p.ExternalConnectivityRequest,
            driver.program_external,
            False,
        ),
        "/NetworkDriver.RevokeExternalConnectivity": (
            p.EndpointRequest,
            driver.revoke_external,
            False,
        ),
        "/NetworkDriver.DiscoverNew": (p.DiscoveryNotification, driver.discover, False),
        "/NetworkDriver.DiscoverDelete": (p.DiscoveryNotification, driver.discover, False),
        # netplug's own calls, for `netplug status` / `netplug gc` (dockerd never sends them)
        "/Netplug.Status": (None, status, True),
        "/Netplug.GC": (None, collect, False),
    }
    return {
        path: Route(
            request=request,
            handler=handler,
            quiet=quiet,
            decoder=msgspec.json.Decoder(request) if request is not None else None,
        )
        for path, (request, handler, quiet) in table.items()
    }


class App:
    """The ASGI callable served on the plugin socket."""

    def __init__(
        self, driver: Driver, *, max_body: int = MAX_BODY, ready: trio.Event | None = None
    ) -> None:
        self.routes = routes(driver)
        self.max_body = max_body
        # Set once the driver has restored its state; until then calls that need it wait
        # (the static Activate and GetCapabilities answer at once).
        self.ready = ready

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        call = path.rsplit(".", 1)[-1] if "." in path else path
        route = self.routes.get(path)
        if route is None or scope["method"] != "POST":
            if route is None:
                status, message = 404, f"{path} is not part of the network driver protocol"
            else:
                status, message = 405, f"{path} takes POST, not {scope['method']}"
            await _reply(send, status, _error(message))
            log.warning("call", extra={"call": call, "fields": {"status": status, "err": message}})
            return
        if self.ready is not None and path not in _STATIC and not self.ready.is_set():
            await self.ready.wait()
        started = time.perf_counter()
        status, body, request = 200, _EMPTY, None
        try:
            raw = await _read_body(receive, self.max_body)
            request = _decode(route, raw, call)
            result = await route.handler(request)
            if result is not None:
                body = _encoder.encode(result)
        except NetplugError as exc:
            status, body = exc.status, _error(exc.message)
        except Exception as exc:
            log.exception("%s failed unexpectedly", call, extra=_ids(request, call))
            status = 500
            body = _error(f"netplug internal error in {call}: {exc!r}; see the plugin log")
        await _reply(send, status, body)
        elapsed = (time.perf_counter() - started) * 1e3
        level = logging.DEBUG if route.quiet and status == 200 else logging.INFO
        if status != 200:
            level = logging.WARNING if status < 500 else logging.ERROR
        if log.isEnabledFor(level):
            extra = _ids(request, call)
            extra["fields"] = {"status": status, "ms": f"{elapsed:.2f}"}
            if status != 200:
                extra["fields"]["err"] = msgspec.json.decode(body)["Err"]
            log.log(level, "call", extra=extra)


def _decode(route: Route, raw: bytes, call: str) -> Any:
    if route.decoder is None:
        return None
    try:
        return route.decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"invalid {call} request: {exc}") from exc
    except msgspec.DecodeError as exc:
        what = "empty body" if not raw.strip() else f"malformed JSON ({exc})"
        raise InvalidRequest(f"invalid {call} request: {what}; expected a JSON object") from exc
    except RecursionError as exc:
        raise InvalidRequest(f"invalid {call} request: JSON nested too deeply") from exc


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"request body over {limit} bytes; Docker's bodies are a few KiB")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _error(message: str) -> bytes:
    return _encoder.encode(p.ErrorResponse(err=message))


def _ids(request: Any, call: str) -> dict[str, Any]:
    extra: dict[str, Any] = {"call": call}
    if request is not None:
        for attr, key in (("network_id", "network"), ("endpoint_id", "endpoint")):
            value = getattr(request, attr, None)
            if value:
                extra[key] = value
    return extra


async def _reply(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", CONTENT_TYPE),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
