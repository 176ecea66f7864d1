"""The real server (hypercorn) on a real unix socket, spoken to with dockerd's exact bytes, and the
`netplug serve` entrypoint as a process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from netplug import protocol as p
from netplug.backend import BackendContext, Registry
from netplug.dispatch import App
from netplug.driver import Driver
from netplug.server import serve_socket
from netplug.store import Store

if TYPE_CHECKING:
    # mypy cannot follow setuptools' editable finder that maps `netplug_backends` onto
    # `backends/`; in this checkout it knows that file as `backends.memory`. At run time the
    # installed name is the only one used.
    from backends.memory import MemoryBackend
else:
    from netplug_backends.memory import MemoryBackend

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "fixtures"
NID = "a21ceeaa03409d648ba32a9e4cbb1c1cfeb50a0407b0543b163c4f563dbd3dd9"
EID = "ad7a6aada53ba54115762fe91f18f37684036223ad6bc59c4c977774a5d25445"

# What dockerd 20.10 writes for GetCapabilities, byte for byte: no body, no Content-Type.
DOCKER_GET_CAPABILITIES = (
    b"POST /NetworkDriver.GetCapabilities HTTP/1.1\r\n"
    b"Host: plugin.moby.localhost\r\n"
    b"User-Agent: Go-http-client/1.1\r\n"
    b"Content-Length: 0\r\n"
    b"Accept: application/vnd.docker.plugins.v1.2+json\r\n"
    b"Accept-Encoding: gzip\r\n"
    b"\r\n"
)
CAPABILITIES = {"Scope": "local", "ConnectivityScope": "local"}


def fixture_bytes(call: str) -> bytes:
    if not FIXTURES.is_dir():
        pytest.fail(
            f"Docker's captured bodies are missing: expected them in {FIXTURES} (the shared/ "
            "folder must sit beside the repository clone)",
            pytrace=False,
        )
    return (FIXTURES / f"{call}.request.json").read_bytes()


def docker_request(call: str, body: bytes) -> bytes:
    """A request the way Go's http.Client sends it for dockerd's plugin client."""
    head = (
        f"POST /{call} HTTP/1.1\r\n"
        "Host: plugin.moby.localhost\r\n"
        "User-Agent: Go-http-client/1.1\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Accept: application/vnd.docker.plugins.v1.2+json\r\n"
        "Accept-Encoding: gzip\r\n"
        "\r\n"
    )
    return head.encode() + body


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


class Connection:
    """One keep-alive connection with a minimal HTTP/1.1 response parser (Content-Length only,
    which is all the plugin sends)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> None:
        chunk = await self.stream.receive_some(65536)
        if not chunk:
            raise AssertionError(f"connection closed by the server; unparsed: {self.buffer!r}")
        self.buffer += chunk

    async def response(self) -> Response:
        with trio.fail_after(5):
            while b"\r\n\r\n" not in self.buffer:
                await self._fill()
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            version, status, *_ = status_line.split(" ", 2)
            assert version == "HTTP/1.1", status_line
            headers: dict[str, str] = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers["content-length"])
            while len(self.buffer) < length:
                await self._fill()
            body, self.buffer = self.buffer[:length], self.buffer[length:]
        response = Response(int(status), headers, body)
        assert headers.get("connection", "").lower() != "close", headers
        return response

    async def call(self, call: str, body: bytes) -> Response:
        await self.send(docker_request(call, body))
        return await self.response()


@contextmanager
def short_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory whose socket path fits in sun_path (108 bytes with the NUL)."""
    if len(str(tmp_path / "netplug.sock")) < 100:
        yield tmp_path
        return
    directory = Path(tempfile.mkdtemp(prefix="np-", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def sock_dir(tmp_path: Path) -> Iterator[Path]:
    with short_dir(tmp_path) as directory:
        yield directory


class Server:
    def __init__(self, socket: Path, driver: Driver, urls: list[str]) -> None:
        self.socket = socket
        self.driver = driver
        self.urls = urls

    async def connect(self) -> Connection:
        return Connection(await trio.open_unix_socket(str(self.socket)))


@pytest.fixture
async def server(sock_dir: Path, tmp_path: Path) -> AsyncIterator[Server]:
    driver = Driver(
        Store(tmp_path / "state", fsync=False),
        Registry(BackendContext(), {"memory": MemoryBackend}),
        default_backend="memory",
    )
    await driver.restore()
    socket = sock_dir / "netplug.sock"
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(serve_socket, App(driver), socket, shutdown)
        yield Server(socket, driver, urls)
        shutdown.set()


def network_body() -> bytes:
    body = json.loads(fixture_bytes("NetworkDriver.CreateNetwork"))
    body["NetworkID"] = NID
    body["IPv4Data"][0].update(Pool="10.201.1.0/24", Gateway="10.201.1.1/24", AuxAddresses=None)
    body["Options"][p.GENERIC] = {}
    return json.dumps(body, indent=2).encode() + b"\n"


def check_ok(response: Response) -> Any:
    assert response.status == 200, response.body
    assert response.headers["content-type"] == "application/vnd.docker.plugins.v1+json"
    return response.json()


async def test_socket_is_private(server: Server) -> None:
    mode = server.socket.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    assert server.urls  # started() reported where it listens


async def test_docker_exact_bytes(server: Server) -> None:
    conn = await server.connect()
    async with conn.stream:
        await conn.send(DOCKER_GET_CAPABILITIES)
        response = await conn.response()
        assert check_ok(response) == CAPABILITIES
        assert int(response.headers["content-length"]) == len(response.body)


async def test_activate_with_empty_body(server: Server) -> None:
    conn = await server.connect()
    async with conn.stream:
        assert check_ok(await conn.call("Plugin.Activate", b"")) == {
            "Implements": ["NetworkDriver"]
        }


async def test_keep_alive_sequence_with_fixture_bodies(server: Server) -> None:
    conn = await server.connect()
    async with conn.stream:
        assert check_ok(await conn.call("NetworkDriver.CreateNetwork", network_body())) == {}
        endpoint = fixture_bytes("NetworkDriver.CreateEndpoint")
        assert endpoint.endswith(b"\n")  # as Go's json.Encoder writes it
        assert check_ok(await conn.call("NetworkDriver.CreateEndpoint", endpoint)) == {}
        join = check_ok(await conn.call("NetworkDriver.Join", fixture_bytes("NetworkDriver.Join")))
        assert join["InterfaceName"] == {"SrcName": f"mem{EID[:12]}", "DstPrefix": "eth"}
        assert join["Gateway"] == "10.201.1.1"
        # the same connection keeps answering
        await conn.send(DOCKER_GET_CAPABILITIES)
        assert check_ok(await conn.response()) == CAPABILITIES
    assert server.driver.store.endpoints[EID].joined


async def test_body_ending_with_newline(server: Server) -> None:
    conn = await server.connect()
    async with conn.stream:
        body = json.dumps({"NetworkID": NID}).encode() + b"\n"
        assert check_ok(await conn.call("NetworkDriver.DeleteNetwork", body)) == {}
        assert check_ok(await conn.call("NetworkDriver.CreateNetwork", network_body())) == {}
    assert NID in server.driver.store.networks


async def test_pipelined_requests(server: Server) -> None:
    conn = await server.connect()
    async with conn.stream:
        await conn.send(
            docker_request("NetworkDriver.CreateNetwork", network_body())
            + DOCKER_GET_CAPABILITIES
            + docker_request("Plugin.Activate", b"")
        )
        assert check_ok(await conn.response()) == {}
        assert check_ok(await conn.response()) == CAPABILITIES
        assert check_ok(await conn.response()) == {"Implements": ["NetworkDriver"]}


async def test_errors_over_the_socket(server: Server) -> None:
    conn = await server.connect()
    async with conn.stream:
        for call, body, status in (
            ("NetworkDriver.Nope", b"{}", 404),
            ("NetworkDriver.CreateNetwork", b"{not json", 400),
            ("NetworkDriver.CreateEndpoint", fixture_bytes("NetworkDriver.CreateEndpoint"), 400),
        ):
            response = await conn.call(call, body)
            assert response.status == status, response.body
            data = response.json()
            assert isinstance(data, dict)
            assert isinstance(data["Err"], str)
            assert data["Err"]
        # and the connection survives them
        await conn.send(DOCKER_GET_CAPABILITIES)
        assert check_ok(await conn.response()) == CAPABILITIES


async def test_several_connections_at_once(server: Server) -> None:
    results: list[Any] = []

    async def one() -> None:
        conn = await server.connect()
        async with conn.stream:
            await conn.send(DOCKER_GET_CAPABILITIES)
            results.append(check_ok(await conn.response()))

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(one)
    assert results == [CAPABILITIES] * 8


# --- the entrypoint as a process -------------------------------------------------------------


def netplug_executable() -> str:
    beside = Path(sys.executable).parent / "netplug"
    if beside.is_file():
        return str(beside)
    found = shutil.which("netplug")
    if found is None:
        pytest.fail("the netplug console script is not installed (pip install -e .)")
    return found


def test_cli_serve_answers_and_stops_on_sigterm(tmp_path: Path) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.fail("curl is needed for this test")
    with short_dir(tmp_path) as sock_dir:
        socket = sock_dir / "netplug.sock"
        env = {k: v for k, v in os.environ.items() if not k.startswith("NETPLUG_")}
        env["NETPLUG_DEFAULT_BACKEND"] = "memory"
        command = [netplug_executable(), "serve", "--socket", str(socket)]
        command += ["--state-dir", str(tmp_path / "state")]
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 10
            while not socket.is_socket():
                if process.poll() is not None:
                    out, err = process.communicate()
                    pytest.fail(f"netplug serve exited with {process.returncode}: {out!r} {err!r}")
                if time.monotonic() > deadline:
                    pytest.fail("netplug serve did not create its socket within 10 s")
                time.sleep(0.02)
            answer = subprocess.run(
                [
                    curl,
                    "-sS",
                    "--unix-socket",
                    str(socket),
                    "-XPOST",
                    "http://localhost/NetworkDriver.GetCapabilities",
                ],
                capture_output=True,
                timeout=10,
                check=True,
            )
            assert json.loads(answer.stdout) == CAPABILITIES

            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            out, err = process.communicate(timeout=10)
            elapsed = time.monotonic() - started
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        assert process.returncode == 0, err
        assert elapsed < 1.0, f"took {elapsed:.2f} s to stop"
        lines = out.decode().splitlines()
        assert any("stopped" in line for line in lines), lines
