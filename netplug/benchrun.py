"""`netplug bench`: the hot paths, measured against their baselines in the same run.

Scenarios (each named; `--only` picks some):
- codec      msgspec decode + encode of each protocol body
- dispatch   the in-process ASGI call per route (memory backend)
- socket     the real server over its unix socket with Docker's request bytes and keep-alive, 1
             and 16 connections; baseline: a minimal stdlib threaded HTTP server on a unix socket
- endpoints  CreateEndpoint -> Join -> Leave -> DeleteEndpoint on real netlink in a throwaway
             namespace, 1/100/1000 endpoints on one network, parallel deletes; baseline: one `ip`
             exec per operation
- network    network create/delete with its firewall rules; port publish/unpublish
- memory     RSS of `netplug serve` idle and with 1000 endpoints
- docker     through a real dockerd (the test harness in tests/dockerenv.py, from a checkout):
             `docker run --rm` on netplug vs Docker's bridge vs none, -p, 20 parallel starts and
             removals, network create/rm, RTT, TCP throughput, first byte through a published port

Numbers are medians over interleaved repetitions; wall-clock on a shared 2-core machine drifts,
so server CPU per request (from /proc) is reported beside the latencies.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import msgspec
import trio

from netplug import __version__
from netplug import protocol as p

TARGETS: dict[tuple[str, str], tuple[str, float]] = {
    ("socket", "GetCapabilities 1 conn p50 us"): ("<=", 400),
    ("socket", "GetCapabilities 1 conn p99 us"): ("<=", 1000),
    ("socket", "GetCapabilities 16 conn req/s"): (">=", 2500),
    ("endpoints", "create+join p50 ms (1 endpoint)"): ("<=", 2.0),
    ("endpoints", "create+join p50 ms (1000 vs 1)"): ("<=", 1.2),
    ("endpoints", "create+join p50 ms (100 vs 1)"): ("<=", 1.2),
    ("endpoints", "speed-up vs ip exec (create)"): (">=", 4.0),
    ("memory", "RSS idle MB"): ("<=", 45),
    ("memory", "RSS growth MB per 1000 endpoints"): ("<=", 5),
    ("docker", "run --rm netplug / bridge"): ("<=", 1.0),
    ("docker", "run --rm -p netplug / bridge"): ("<=", 1.0),
    ("docker", "20 parallel starts netplug / bridge"): ("<=", 0.9),
    ("docker", "20 parallel removals netplug / bridge"): ("<=", 0.7),
    ("docker", "network create netplug / bridge"): ("<=", 0.6),
    ("docker", "network rm netplug / bridge"): ("<=", 0.4),
    ("docker", "RTT netplug / bridge"): ("<=", 1.05),
    ("docker", "TCP throughput netplug / bridge"): (">=", 0.95),
    ("docker", "first byte through -p netplug / bridge"): ("<=", 1.0),
}

NET = "a" * 64
GO_HEADERS = (
    "Host: plugin.moby.localhost\r\nUser-Agent: Go-http-client/1.1\r\n"
    "Content-Length: {length}\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\n"
    "Accept-Encoding: gzip\r\n\r\n"
)


PORT_18080 = {  # -p 18080:80, as dockerd sends it
    "Proto": 6,
    "IP": "",
    "Port": 80,
    "HostIP": "",
    "HostPort": 18080,
    "HostPortEnd": 18080,
}


def _endpoint_id(n: int) -> str:
    return f"{n:012x}" + "e" * 52  # interface names come from the first 12 hex digits


BODIES: dict[str, tuple[type[msgspec.Struct], dict[str, Any], msgspec.Struct | None]] = {
    "CreateNetwork": (
        p.CreateNetworkRequest,
        {
            "NetworkID": NET,
            "Options": {
                "com.docker.network.enable_ipv6": False,
                "com.docker.network.generic": {"mtu": "1400"},
            },
            "IPv4Data": [
                {
                    "AddressSpace": "LocalDefault",
                    "Pool": "10.201.0.0/16",
                    "Gateway": "10.201.0.1/16",
                    "AuxAddresses": None,
                }
            ],
            "IPv6Data": [],
        },
        None,
    ),
    "CreateEndpoint": (
        p.CreateEndpointRequest,
        {
            "NetworkID": NET,
            "EndpointID": _endpoint_id(1),
            "Interface": {"Address": "10.201.0.2/16", "AddressIPv6": "", "MacAddress": ""},
            "Options": {
                "com.docker.network.endpoint.exposedports": [{"Proto": 6, "Port": 80}],
                "com.docker.network.portmap": [PORT_18080],
            },
        },
        p.CreateEndpointResponse(
            interface=p.EndpointInterfaceReply(mac_address="02:42:0a:c9:00:02")
        ),
    ),
    "Join": (
        p.JoinRequest,
        {
            "NetworkID": NET,
            "EndpointID": _endpoint_id(1),
            "SandboxKey": "/var/run/docker/netns/42f96f843951",
            "Options": {},
        },
        p.JoinResponse(
            interface_name=p.InterfaceName(src_name="npc" + "0" * 12, dst_prefix="eth"),
            gateway="10.201.0.1",
        ),
    ),
    "Leave": (p.EndpointRequest, {"NetworkID": NET, "EndpointID": _endpoint_id(1)}, None),
    "DeleteEndpoint": (p.EndpointRequest, {"NetworkID": NET, "EndpointID": _endpoint_id(1)}, None),
    "GetCapabilities": (
        p.EmptyResponse,
        {},
        p.CapabilitiesResponse(scope="local", connectivity_scope="local"),
    ),
}


# --- small statistics helpers ----------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Run:
    """One benchmark invocation: settings, results, progress."""

    def __init__(self, *, quick: bool) -> None:
        self.quick = quick
        self.results: dict[str, dict[str, dict[str, Any]]] = {}

    def n(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def record(
        self,
        scenario: str,
        metric: str,
        value: float,
        unit: str = "",
        baseline: float | None = None,
    ) -> None:
        entry: dict[str, Any] = {"value": round(value, 3), "unit": unit}
        target = TARGETS.get((scenario, metric))
        if target is not None:
            op, limit = target
            entry["target"] = f"{op} {limit:g}"
            entry["ok"] = value <= limit if op == "<=" else value >= limit
        if baseline is not None:
            entry["baseline"] = round(baseline, 3)
        self.results.setdefault(scenario, {})[metric] = entry
        print(f"    {metric}: {value:.3g} {unit}".rstrip(), flush=True)


# --- 1. codec ----------------------------------------------------------------------------------


def bench_codec(run: Run) -> None:
    encoder = msgspec.json.Encoder()
    loops = run.n(20000, 2000)
    for name, (kind, body, reply) in BODIES.items():
        raw = json.dumps(body).encode() + b"\n"
        decoder = msgspec.json.Decoder(kind)

        def batch(
            decoder: msgspec.json.Decoder[Any] = decoder,
            raw: bytes = raw,
            reply: msgspec.Struct | None = reply,
        ) -> None:
            for _ in range(loops):
                decoder.decode(raw)
                if reply is not None:
                    encoder.encode(reply)

        best = min(timed(batch, 5)) / loops
        run.record("codec", f"{name} decode+encode us", best * 1e6, "us")


# --- 2. dispatch ---------------------------------------------------------------------------


def _memory_driver(state_dir: Path) -> Any:
    from netplug.backend import BackendContext, Registry
    from netplug.driver import Driver
    from netplug.store import Store

    registry = Registry(BackendContext())  # backends from the entry points, as in production
    return Driver(Store(state_dir, fsync=False), registry, default_backend="memory")


def bench_dispatch(run: Run) -> None:
    from netplug.dispatch import App

    loops = run.n(3000, 300)

    async def main(state_dir: Path) -> None:
        driver = _memory_driver(state_dir)
        await driver.restore()
        app = App(driver)

        async def call(path: str, body: bytes) -> None:
            sent = False

            async def receive() -> MutableMapping[str, Any]:
                nonlocal sent
                if sent:
                    return {"type": "http.disconnect"}
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}

            async def send(message: MutableMapping[str, Any]) -> None:
                return None

            scope = {"type": "http", "method": "POST", "path": path}
            await app(scope, receive, send)

        create_net = json.dumps(BODIES["CreateNetwork"][1]).encode()
        await call("/NetworkDriver.CreateNetwork", create_net)
        for name in (
            "GetCapabilities",
            "CreateEndpoint+DeleteEndpoint",
            "Join",
            "Leave",
            "EndpointOperInfo",
        ):
            times = []
            for i in range(loops):
                ids = {"NetworkID": NET, "EndpointID": _endpoint_id(i + 10)}
                start = time.perf_counter()
                if name == "GetCapabilities":
                    await call("/NetworkDriver.GetCapabilities", b"")
                elif name == "CreateEndpoint+DeleteEndpoint":
                    body = {**ids, "Interface": {"Address": _address(i)}}
                    await call("/NetworkDriver.CreateEndpoint", json.dumps(body).encode())
                    await call("/NetworkDriver.DeleteEndpoint", json.dumps(ids).encode())
                else:
                    body_ids = {"NetworkID": NET, "EndpointID": _endpoint_id(5)}
                    if i == 0:
                        ep = {**body_ids, "Interface": {"Address": "10.201.0.5/16"}}
                        await call("/NetworkDriver.CreateEndpoint", json.dumps(ep).encode())
                        start = time.perf_counter()
                    await call(f"/NetworkDriver.{name}", json.dumps(body_ids).encode())
                times.append(time.perf_counter() - start)
            run.record("dispatch", f"{name} p50 us", pct(times, 0.5) * 1e6, "us")

    with tempfile.TemporaryDirectory() as tmp:
        trio.run(main, Path(tmp))


# --- 3. socket round trip -----------------------------------------------------------------


STDLIB_SERVER = r"""
import socketserver, sys, os
from http.server import BaseHTTPRequestHandler
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        body = b'{"Scope":"local","ConnectivityScope":"local"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
class S(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    def get_request(self):
        request, _ = super().get_request()
        return request, ("local", 0)
path = sys.argv[1]
with S(path, H) as server:
    os.chmod(path, 0o600)
    server.serve_forever()
"""


def _address(i: int) -> str:
    """The `i`th container address in the bench's 10.201.0.0/16 network."""
    return f"10.201.{i // 250 % 250}.{i % 250 + 2}/16"


def _request(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\n" + GO_HEADERS.format(length=len(body))).encode() + body


def _read_response(sock: socket.socket, buffer: bytearray) -> None:
    """Read one HTTP response with Content-Length from `sock` (keeping leftovers)."""
    while True:
        if b"\r\n\r\n" in buffer:
            try:
                _parse_complete(buffer)
                return
            except ValueError:
                pass
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buffer += chunk


def _wait_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            sock.sendall(_request("/NetworkDriver.GetCapabilities", b""))
            _read_response(sock, bytearray())
            return
        time.sleep(0.02)
    raise RuntimeError(f"{path} did not answer in {timeout}s")


def _sequential(path: Path, request: bytes, n: int) -> list[float]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        buffer = bytearray()
        out = []
        for _ in range(n):
            t = time.perf_counter()
            sock.sendall(request)
            _read_response(sock, buffer)
            out.append(time.perf_counter() - t)
    return out


def _concurrent(path: Path, request: bytes, conns: int, n: int) -> tuple[float, list[float]]:
    """`conns` keep-alive connections, one request in flight each; returns (req/s, latencies)."""
    selector = selectors.DefaultSelector()
    socks = []
    latencies: list[float] = []
    started: dict[socket.socket, float] = {}
    buffers: dict[socket.socket, bytearray] = {}
    remaining = n
    for _ in range(conns):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(path))
        socks.append(sock)
        buffers[sock] = bytearray()
        selector.register(sock, selectors.EVENT_READ)
    begin = time.perf_counter()
    for sock in socks:
        started[sock] = time.perf_counter()
        sock.sendall(request)
        remaining -= 1
    done = 0
    while done < n:
        for key, _ in selector.select():
            sock = key.fileobj  # type: ignore[assignment]
            buffers[sock] += sock.recv(65536)
            while b"\r\n\r\n" in buffers[sock]:
                try:
                    _parse_complete(buffers[sock])
                except ValueError:
                    break
                latencies.append(time.perf_counter() - started[sock])
                done += 1
                if remaining > 0:
                    started[sock] = time.perf_counter()
                    sock.sendall(request)
                    remaining -= 1
    elapsed = time.perf_counter() - begin
    for sock in socks:
        selector.unregister(sock)
        sock.close()
    return n / elapsed, latencies


def _parse_complete(buffer: bytearray) -> None:
    head_end = buffer.find(b"\r\n\r\n")
    head = bytes(buffer[:head_end]).lower()
    start = head.find(b"content-length:")
    length = int(head[start + 15 :].split(b"\r\n", 1)[0]) if start >= 0 else 0
    total = head_end + 4 + length
    if len(buffer) < total:
        raise ValueError("incomplete")
    del buffer[:total]


@contextlib.contextmanager
def _server(cmd: list[str], sock: Path, env: dict[str, str] | None = None) -> Iterator[int]:
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})}
    )
    try:
        _wait_socket(sock, proc)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _netplug_cmd(sock: Path, state: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "netplug",
        "serve",
        "--socket",
        str(sock),
        "--state-dir",
        str(state),
        "--log-level",
        "warning",
        *extra,
    ]


def bench_socket(run: Run) -> None:
    n1, n16 = run.n(5000, 800), run.n(8000, 1600)
    caps = _request("/NetworkDriver.GetCapabilities", b"")
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        root = Path(tmp)
        results: dict[str, dict[str, float]] = {}
        for label, cmd, env in (
            (
                "netplug",
                _netplug_cmd(root / "np.sock", root / "state"),
                {"NETPLUG_DEFAULT_BACKEND": "memory"},
            ),
            ("stdlib", [sys.executable, "-c", STDLIB_SERVER, str(root / "std.sock")], {}),
        ):
            path = root / ("np.sock" if label == "netplug" else "std.sock")
            with _server(cmd, path, env) as pid:
                _sequential(path, caps, 300)  # warm up
                cpu = cpu_seconds(pid)
                lat = _sequential(path, caps, n1)
                cpu_per = (cpu_seconds(pid) - cpu) / n1
                rate, lat16 = _concurrent(path, caps, 16, n16)
                results[label] = {
                    "p50": pct(lat, 0.5),
                    "p99": pct(lat, 0.99),
                    "rate": rate,
                    "cpu": cpu_per,
                    "p99_16": pct(lat16, 0.99),
                }
                if label == "netplug":
                    body = json.dumps(BODIES["CreateNetwork"][1]).encode()
                    _sequential(path, _request("/NetworkDriver.CreateNetwork", body), 1)
                    for call in ("CreateEndpoint", "Join"):
                        times = []
                        for i in range(run.n(1000, 200)):
                            ids = {"NetworkID": NET, "EndpointID": _endpoint_id(1000 + i)}
                            payload = {
                                **ids,
                                "Interface": {"Address": _address(i)},
                            }
                            if call == "Join":
                                payload = {**ids, "SandboxKey": "/x"}
                            req = _request(f"/NetworkDriver.{call}", json.dumps(payload).encode())
                            times += _sequential(path, req, 1)
                        results[label][call] = pct(times, 0.5)
        np_, std = results["netplug"], results["stdlib"]
        run.record(
            "socket", "GetCapabilities 1 conn p50 us", np_["p50"] * 1e6, "us", std["p50"] * 1e6
        )
        run.record(
            "socket", "GetCapabilities 1 conn p99 us", np_["p99"] * 1e6, "us", std["p99"] * 1e6
        )
        run.record("socket", "GetCapabilities 16 conn req/s", np_["rate"], "req/s", std["rate"])
        run.record(
            "socket",
            "GetCapabilities 16 conn p99 us",
            np_["p99_16"] * 1e6,
            "us",
            std["p99_16"] * 1e6,
        )
        run.record("socket", "server CPU per request us", np_["cpu"] * 1e6, "us", std["cpu"] * 1e6)
        run.record(
            "socket",
            "CreateEndpoint 1 conn p50 us (memory backend, new conn)",
            np_["CreateEndpoint"] * 1e6,
            "us",
        )
        run.record("socket", "Join 1 conn p50 us (new conn)", np_["Join"] * 1e6, "us")


# --- 4/5. kernel scenarios -----------------------------------------------------------------


@contextlib.contextmanager
def _netns() -> Iterator[str]:
    name = f"npbench{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _create_network_request() -> p.CreateNetworkRequest:
    raw = json.dumps(BODIES["CreateNetwork"][1]).encode()
    return msgspec.json.decode(raw, type=p.CreateNetworkRequest)


def _bridge_driver(netns: str, state_dir: Path) -> Any:
    from netplug.backend import BackendContext, Registry
    from netplug.driver import Driver
    from netplug.netlink import Kernel
    from netplug.store import Store

    registry = Registry(BackendContext(Kernel(netns=netns)))
    return Driver(Store(state_dir), registry, default_backend="bridge")


def bench_endpoints(run: Run) -> None:
    counts = (1, 100) if run.quick else (1, 100, 1000)

    async def main(netns: str, state_dir: Path) -> dict[str, float]:
        driver = _bridge_driver(netns, state_dir)
        await driver.restore()
        await driver.create_network(_create_network_request())
        out: dict[str, float] = {}
        serial = 0

        async def cycle(count: int) -> dict[str, list[float]]:
            """`count` endpoints created and joined, then left and deleted."""
            nonlocal serial
            times: dict[str, list[float]] = {"create+join": [], "leave+delete": []}
            ids = []
            for _ in range(count):
                serial += 1
                eid = _endpoint_id(10_000 + serial)
                ids.append(eid)
                addr = _address(serial)
                t = time.perf_counter()
                await driver.create_endpoint(
                    p.CreateEndpointRequest(
                        network_id=NET, endpoint_id=eid, interface=p.EndpointInterface(address=addr)
                    )
                )
                await driver.join(p.JoinRequest(network_id=NET, endpoint_id=eid))
                times["create+join"].append(time.perf_counter() - t)
            for eid in ids:
                req = p.EndpointRequest(network_id=NET, endpoint_id=eid)
                t = time.perf_counter()
                await driver.leave(req)
                await driver.delete_endpoint(req)
                times["leave+delete"].append(time.perf_counter() - t)
            return times

        await cycle(5)  # warm up: kernel threads, pyroute2, libnftables
        # one endpoint on the network at a time, many times over
        single: dict[str, list[float]] = {"create+join": [], "leave+delete": []}
        for _ in range(run.n(50, 15)):
            for key, values in (await cycle(1)).items():
                single[key] += values
        results = {1: single}
        for count in counts[1:]:
            results[count] = await cycle(count)
        for count, times in results.items():
            label = f"{count} endpoint{'s' if count > 1 else ''}"
            out[f"create+join p50 ms ({label})"] = pct(times["create+join"], 0.5) * 1e3
            out[f"create+join p99 ms ({label})"] = pct(times["create+join"], 0.99) * 1e3
            out[f"leave+delete p50 ms ({label})"] = pct(times["leave+delete"], 0.5) * 1e3
        # parallel deletes: 100 endpoints removed at once
        ids = []
        for i in range(100):
            eid = _endpoint_id(90_000 + i)
            ids.append(eid)
            await driver.create_endpoint(
                p.CreateEndpointRequest(
                    network_id=NET,
                    endpoint_id=eid,
                    interface=p.EndpointInterface(address=f"10.201.200.{i + 2}/16"),
                )
            )
        t = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for eid in ids:
                nursery.start_soon(
                    driver.delete_endpoint, p.EndpointRequest(network_id=NET, endpoint_id=eid)
                )
        out["parallel deletes per s (100)"] = 100 / (time.perf_counter() - t)
        await driver.delete_network(NET)
        driver.registry.context.close()
        return out

    with _netns() as netns, tempfile.TemporaryDirectory() as tmp:
        out = trio.run(main, netns, Path(tmp))
        base = _ip_exec_baseline(netns, run.n(100, 30))
        floor = trio.run(_kernel_floor, netns, counts[-1])  # last: the namespace's end cleans up
    for key, value in floor.items():
        run.record("endpoints", f"kernel floor: a veth onto the bridge p50 ms ({key})", value, "ms")
    first = "create+join p50 ms (1 endpoint)"
    for metric, value in out.items():
        unit = "/s" if "per s" in metric else "ms"
        run.record("endpoints", metric, value, unit)
    last = f"create+join p50 ms ({counts[-1]} endpoints)"
    run.record("endpoints", f"create+join p50 ms ({counts[-1]} vs 1)", out[last] / out[first])
    run.record("endpoints", "ip exec create+up p50 ms (baseline)", base["create"], "ms")
    run.record("endpoints", "ip exec delete p50 ms (baseline)", base["delete"], "ms")
    run.record("endpoints", "speed-up vs ip exec (create)", base["create"] / out[first])


async def _kernel_floor(netns: str, ports: int) -> dict[str, float]:
    """The kernel alone: one RTM_NEWLINK per veth pair onto a bridge, no netplug around it, up
    to `ports` ports. Adding a port gets slower as the bridge grows (the kernel walks its ports),
    which is what the flatness of the endpoint numbers is measured against."""
    from netplug.netlink import Kernel

    def create(w: Any) -> list[float]:
        rtnl = w.rtnl
        rtnl.add_bridge("npfloor", mtu=None, mac="02:00:00:00:00:fe")
        index = rtnl.link_index("npfloor")
        rtnl.set_link(index, up=True)
        times = []
        for i in range(ports):
            t = time.perf_counter()
            rtnl.add_veth(f"fh{i}", f"fp{i}", master=index, mtu=None, peer_mac="02:00:00:00:00:01")
            times.append(time.perf_counter() - t)
        return times

    kernel = Kernel(threads=1, netns=netns)
    try:
        times = await kernel.run(create)
    finally:
        kernel.close()
    out = {"first 100 ports": pct(times[:100], 0.5) * 1e3}
    if ports > 200:
        out[f"ports {ports - 100} to {ports}"] = pct(times[-100:], 0.5) * 1e3
    return out


def _ip_exec_baseline(netns: str, n: int) -> dict[str, float]:
    def ip(*args: str) -> None:
        subprocess.run(["ip", "-n", netns, *args], check=True)

    ip("link", "add", "bbr0", "type", "bridge")
    ip("link", "set", "bbr0", "up")
    create, delete = [], []
    for i in range(n):
        t = time.perf_counter()
        ip("link", "add", f"bh{i}", "type", "veth", "peer", "name", f"bc{i}")
        ip("link", "set", f"bh{i}", "master", "bbr0", "up")
        create.append(time.perf_counter() - t)
    for i in range(n):
        t = time.perf_counter()
        ip("link", "del", f"bh{i}")
        delete.append(time.perf_counter() - t)
    ip("link", "del", "bbr0")
    return {"create": pct(create, 0.5) * 1e3, "delete": pct(delete, 0.5) * 1e3}


def bench_network(run: Run) -> None:
    reps = run.n(20, 5)

    async def main(netns: str, state_dir: Path) -> None:
        driver = _bridge_driver(netns, state_dir)
        await driver.restore()
        times: dict[str, list[float]] = defaultdict(list)
        request = _create_network_request()
        portmap = msgspec.json.encode([PORT_18080])
        # Alone, the network is the first and the last one: the table and the iptables accept
        # rules come and go with it. With another network present (the usual case) they stay.
        resident = msgspec.structs.replace(
            request,
            network_id="b" * 64,
            ipv4_data=[p.IPAMData(pool="10.202.0.0/16", gateway="10.202.0.1/16")],
        )
        for case in ("alone", "another present"):
            if case != "alone":
                await driver.create_network(resident)
            for i in range(reps):
                t = time.perf_counter()
                await driver.create_network(request)
                times[f"CreateNetwork p50 ms ({case})"].append(time.perf_counter() - t)
                eid = _endpoint_id(i + 1)
                await driver.create_endpoint(
                    p.CreateEndpointRequest(
                        network_id=NET,
                        endpoint_id=eid,
                        interface=p.EndpointInterface(address="10.201.0.2/16"),
                    )
                )
                t = time.perf_counter()
                await driver.program_external(
                    p.ExternalConnectivityRequest(
                        network_id=NET, endpoint_id=eid, options={p.PORTMAP: msgspec.Raw(portmap)}
                    )
                )
                times["publish a port p50 ms"].append(time.perf_counter() - t)
                t = time.perf_counter()
                await driver.revoke_external(p.EndpointRequest(network_id=NET, endpoint_id=eid))
                times["unpublish a port p50 ms"].append(time.perf_counter() - t)
                await driver.delete_endpoint(p.EndpointRequest(network_id=NET, endpoint_id=eid))
                t = time.perf_counter()
                await driver.delete_network(NET)
                times[f"DeleteNetwork p50 ms ({case}, all the work)"].append(
                    time.perf_counter() - t
                )
        await driver.delete_network(resident.network_id)
        driver.registry.context.close()
        for metric, values in times.items():
            run.record("network", metric, pct(values, 0.5) * 1e3, "ms")

    with _netns() as netns, tempfile.TemporaryDirectory() as tmp:
        trio.run(main, netns, Path(tmp))


def bench_memory(run: Run) -> None:
    """RSS idle, then the growth per endpoint: measured from after the network and a few
    endpoints exist (first use loads libnftables, opens netlink sockets and warms caches once),
    with the requests on one keep-alive connection, as dockerd sends them."""
    count, warm = run.n(1000, 200), 20
    with _netns() as netns, tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        root = Path(tmp)
        sock = root / "np.sock"
        cmd = ["ip", "netns", "exec", netns, *_netplug_cmd(sock, root / "state")]
        with _server(cmd, sock) as _, socket.socket(socket.AF_UNIX) as conn:
            pid = _find_pid(str(sock))
            time.sleep(0.5)
            idle = rss_mb(pid)
            conn.connect(str(sock))
            buffer = bytearray()

            def call(name: str, body: dict[str, Any]) -> None:
                conn.sendall(_request(f"/NetworkDriver.{name}", json.dumps(body).encode()))
                _read_response(conn, buffer)

            call("CreateNetwork", BODIES["CreateNetwork"][1])
            for i in range(warm + count):
                if i == warm:
                    base = rss_mb(pid)
                ids = {"NetworkID": NET, "EndpointID": _endpoint_id(50_000 + i)}
                call("CreateEndpoint", {**ids, "Interface": {"Address": _address(i)}})
                call("Join", {**ids, "SandboxKey": "/x"})
            loaded = rss_mb(pid)
    run.record("memory", "RSS idle MB", idle, "MB")
    run.record("memory", f"RSS with {warm} endpoints MB", base, "MB")
    run.record("memory", f"RSS with {warm + count} endpoints MB", loaded, "MB")
    run.record("memory", "RSS growth MB per 1000 endpoints", (loaded - base) * 1000 / count, "MB")


def _find_pid(marker: str) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                if marker.encode() in cmdline and b"serve" in cmdline:
                    return int(entry.name)
    raise RuntimeError("netplug serve process not found")


# --- 6. through Docker ---------------------------------------------------------------------


def bench_docker(run: Run) -> None:
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "tests" / "dockerenv.py").exists() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    try:
        from tests import dockerenv  # the harness lives with the tests, in a checkout
    except ImportError:
        print("    skipped: run from a netplug checkout (tests/dockerenv.py starts the engine)")
        run.results["docker"] = {"skipped": {"value": 0, "unit": "no harness"}}
        return
    reps = run.n(10, 3)
    root = Path(tempfile.mkdtemp(prefix="netplug-bench-", dir="/tmp"))
    with dockerenv.engine_with_registry(root) as (engine, registry):
        dockerenv.busybox_image(engine)
        dockerenv.build_plugin(engine, root / "plugin")
        ref, _ = dockerenv.install_plugin(engine, registry, root / "plugin")

        def docker(*args: str) -> float:
            t = time.perf_counter()
            engine.docker(*args)
            return time.perf_counter() - t

        docker("network", "create", "-d", ref, "--subnet", "10.40.0.0/16", "np")
        docker("network", "create", "--subnet", "10.41.0.0/16", "br")
        runs: dict[str, list[float]] = {k: [] for k in ("np", "br", "none", "np-p", "br-p")}
        for i in range(reps):  # interleaved
            for key, net, extra in (
                ("np", "np", ()),
                ("br", "br", ()),
                ("none", "none", ()),
                ("np-p", "np", ("-p", f"{20000 + i}:80")),
                ("br-p", "br", ("-p", f"{21000 + i}:80")),
            ):
                runs[key].append(docker("run", "--rm", "--network", net, *extra, "busybox", "true"))
        med = {k: statistics.median(v) for k, v in runs.items()}
        for key in ("np", "br", "none", "np-p", "br-p"):
            run.record("docker", f"run --rm {key} median ms", med[key] * 1e3, "ms")
        run.record("docker", "run --rm netplug / bridge", med["np"] / med["br"])
        run.record("docker", "run --rm -p netplug / bridge", med["np-p"] / med["br-p"])
        cli = [dockerenv.DOCKER, "-H", f"unix://{engine.socket}"]
        parallel: dict[tuple[str, str], list[float]] = defaultdict(list)
        plugin_ms: dict[str, list[float]] = defaultdict(list)
        for i in range(run.n(3, 1)):  # rounds, the order alternating
            for net in ("np", "br") if i % 2 == 0 else ("br", "np"):
                names = [f"{net}{i}x{k}" for k in range(20)]
                commands: list[tuple[str, list[list[str]]]] = [
                    ("starts", [["run", "-d", "--name", n, "--network", net] for n in names]),
                    ("removals", [["rm", "-f", n] for n in names]),
                ]
                for verb, argv in commands:
                    tail = ["busybox", "sleep", "600"] if verb == "starts" else []
                    mark = len(engine.logs())
                    t = time.perf_counter()
                    procs = [
                        subprocess.Popen([*cli, *a, *tail], stdout=subprocess.DEVNULL) for a in argv
                    ]
                    for proc in procs:
                        proc.wait()
                    parallel[(verb, net)].append(time.perf_counter() - t)
                    if net == "np":
                        plugin_ms[verb] += _plugin_call_ms(engine.logs()[mark:])
        for verb in ("starts", "removals"):
            np_s, br_s = (statistics.median(parallel[(verb, net)]) for net in ("np", "br"))
            run.record("docker", f"20 parallel {verb} s (np)", np_s, "s")
            run.record("docker", f"20 parallel {verb} s (br)", br_s, "s")
            run.record("docker", f"20 parallel {verb} netplug / bridge", np_s / br_s)
            # how long netplug's calls took, summed over the calls of one container (from the
            # `ms=` of its log lines, so including the waits 20 containers at once cause)
            calls = plugin_ms[verb]
            run.record(
                "docker",
                f"20 parallel {verb}: netplug ms per container",
                sum(calls) / (20 * run.n(3, 1)),
                "ms",
            )
        creates: dict[str, list[float]] = {"np": [], "br": []}
        removes: dict[str, list[float]] = {"np": [], "br": []}
        for i in range(reps):
            for key, net_args in (("np", ("-d", ref)), ("br", ())):
                creates[key].append(
                    docker(
                        "network",
                        "create",
                        *net_args,
                        "--subnet",
                        f"10.{50 + i}.{key == 'br':d}.0/24",
                        f"t{key}{i}",
                    )
                )
                removes[key].append(docker("network", "rm", f"t{key}{i}"))
        _record_ratio(run, "network create netplug / bridge", creates)
        _record_ratio(run, "network rm netplug / bridge", removes)
        docker_cli = f"{dockerenv.DOCKER} -H unix://{engine.socket}"
        _container_traffic(run, engine, docker_cli, dockerenv.python_image(), reps)
        shutil.rmtree(root, ignore_errors=True)


FIRST_BYTE = r"""
import socket, subprocess, sys, time
docker, port = sys.argv[1:3]
start = time.perf_counter()
subprocess.run([*docker.split(), *sys.argv[3:]], check=True, stdout=subprocess.DEVNULL)
while time.perf_counter() - start < 30:
    try:
        with socket.create_connection(("127.0.0.1", int(port)), timeout=1) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            if s.recv(1):
                print(time.perf_counter() - start)
                break
    except OSError:
        time.sleep(0.002)
"""


SINK = r"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5001))
s.listen(4)
while True:
    c, _ = s.accept()
    while c.recv(1 << 20):
        pass
    c.close()
"""

SEND = r"""
import socket, sys, time
address, megabytes = sys.argv[1], int(sys.argv[2])
chunk = bytes(1 << 20)
c = socket.create_connection((address, 5001))
start = time.perf_counter()
for _ in range(megabytes):
    c.sendall(chunk)
c.shutdown(socket.SHUT_WR)
c.recv(1)  # the sink closes once it has read everything
print(time.perf_counter() - start)
"""


def _container_traffic(
    run: Run, engine: Any, docker_cli: str, python_image: str, reps: int
) -> None:
    """RTT, TCP throughput and first byte through a published port, netplug against Docker's
    bridge, interleaved: long-lived containers on each network, `docker exec` for each
    measurement and the timing inside the container, so the exec is not in the numbers."""
    address = {}
    for net in ("np", "br"):
        engine.docker(
            "run", "-d", "--name", f"srv{net}", "--network", net, python_image,
            "python3", "-c", SINK,
        )  # fmt: skip
        for name, image in ((f"cli{net}", "busybox"), (f"send{net}", python_image)):
            engine.docker(
                "run", "-d", "--name", name, "--network", net, image, "sleep", "600"
            )  # fmt: skip
        address[net] = engine.docker(
            "inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{net}").IPAddress}}}}',
            f"srv{net}",
        ).stdout.strip()  # fmt: skip
    rtt: dict[str, list[float]] = {"np": [], "br": []}
    rate: dict[str, list[float]] = {"np": [], "br": []}
    first: dict[str, list[float]] = {"np": [], "br": []}
    size = 200 if run.quick else 1000
    for i in range(max(3, reps // 2)):
        for net in ("np", "br") if i % 2 == 0 else ("br", "np"):
            ping = engine.docker(
                "exec", f"cli{net}", "ping", "-c", "10", "-i", "0.2", address[net]
            ).stdout
            rtt[net].append(float(ping.rsplit("=", 1)[1].split("/")[1]))
            seconds = float(
                engine.docker(
                    "exec", f"send{net}", "python3", "-c", SEND, address[net], str(size)
                ).stdout
            )  # fmt: skip
            rate[net].append(size * 1.048576 / seconds)
            port = 22000 + i * 2 + (net == "br")
            result = engine.ns(
                sys.executable, "-c", FIRST_BYTE, docker_cli, str(port),
                "run", "-d", "--name", f"fb{net}{i}", "--network", net, "-p", f"{port}:80",
                "busybox", "httpd", "-f", "-p", "80",
            )  # fmt: skip
            first[net].append(float(result.stdout.strip()))
            engine.docker("rm", "-f", f"fb{net}{i}")
    for net in ("np", "br"):
        run.record("docker", f"ping RTT avg ms ({net})", statistics.median(rtt[net]), "ms")
        run.record("docker", f"TCP MB/s ({net})", statistics.median(rate[net]), "MB/s")
        run.record(
            "docker",
            f"first byte through -p ms ({net})",
            statistics.median(first[net]) * 1e3,
            "ms",
        )
    _record_ratio(run, "RTT netplug / bridge", rtt)
    _record_ratio(run, "TCP throughput netplug / bridge", rate)
    _record_ratio(run, "first byte through -p netplug / bridge", first)


def _plugin_call_ms(log: str) -> list[float]:
    """The `ms=` of every call netplug logged (dockerd tags the plugin's lines `plugin=`)."""
    return [
        float(line.split(" ms=", 1)[1].split()[0].strip('"'))
        for line in log.splitlines()
        if "plugin=" in line and " call=" in line and " ms=" in line
    ]


def _record_ratio(run: Run, metric: str, values: dict[str, list[float]]) -> None:
    """Median on netplug's network over the median on Docker's bridge."""
    run.record("docker", metric, statistics.median(values["np"]) / statistics.median(values["br"]))


# --- running, reporting ---------------------------------------------------------------------

SCENARIOS: dict[str, tuple[Callable[[Run], None], bool]] = {
    "codec": (bench_codec, False),
    "dispatch": (bench_dispatch, False),
    "socket": (bench_socket, False),
    "endpoints": (bench_endpoints, True),
    "network": (bench_network, True),
    "memory": (bench_memory, True),
    "docker": (bench_docker, True),
}


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load": os.getloadavg()[0],
    }


def run_bench(
    only: list[str] | None, quick: bool, json_path: Path | None, compare: Path | None
) -> int:
    names = only or [n for n in SCENARIOS if not (quick and n == "docker")]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(
            f"netplug bench: unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}",
            file=sys.stderr,
        )
        return 2
    run = Run(quick=quick)
    started = time.monotonic()
    for i, name in enumerate(names, 1):
        fn, needs_root = SCENARIOS[name]
        print(f"[{i}/{len(names)}] {name}", flush=True)
        if needs_root and os.geteuid() != 0:
            print("    skipped: needs root (network namespaces)")
            continue
        t = time.monotonic()
        fn(run)
        run.results.setdefault(name, {})["_seconds"] = {
            "value": round(time.monotonic() - t, 1),
            "unit": "s",
        }
    report = {
        "netplug": __version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "seconds": round(time.monotonic() - started, 1),
        "machine": machine(),
        "scenarios": run.results,
    }
    print(format_table(report, json.loads(compare.read_text()) if compare else None))
    if json_path:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {json_path}")
    return 0


def format_table(report: dict[str, Any], previous: dict[str, Any] | None = None) -> str:
    rows = [("scenario", "metric", "value", "target", "baseline", "vs previous")]
    for scenario, metrics in report["scenarios"].items():
        for metric, entry in metrics.items():
            if metric.startswith("_"):
                continue
            value = f"{entry['value']:.4g} {entry.get('unit', '')}".strip()
            target = entry.get("target", "")
            if target:
                target += " ok" if entry.get("ok") else " MISSED"
            base = entry.get("baseline")
            base_text = f"{base:.4g}" if base is not None else ""
            ratio = ""
            if previous:
                old = previous.get("scenarios", {}).get(scenario, {}).get(metric)
                if old and old.get("value"):
                    ratio = f"x{entry['value'] / old['value']:.2f}"
            rows.append((scenario, metric, value, target, base_text, ratio))
    widths = [max(len(str(row[i])) for row in rows) for i in range(6)]
    lines = ["  ".join(str(cell).ljust(widths[i]) for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
