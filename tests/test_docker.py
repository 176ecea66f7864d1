"""netplug as a managed plugin under the real dockerd, driven by the real docker CLI.

One engine for the session (tests/dockerenv.py): dockerd in its own namespace with iptables on,
a registry on 127.0.0.1, busybox, and the plugin built from the Dockerfile, pushed and installed.
A "world" namespace hangs off the engine's namespace (10.254.0.2, the engine host is 10.254.0.1)
and plays the internet. After every test nothing of netplug's may remain that no Docker object
owns: links, nftables chains and port elements, iptables rules, state records.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from netplug.netlink import OWNED_NAME
from tests import dockerenv
from tests.dockerenv import Dockerd, Registry

pytestmark = pytest.mark.docker

SUBNET = "10.30.{}.0/24"


@dataclass
class Env:
    engine: Dockerd
    registry: Registry
    ref: str
    plugin_dir: Path
    timings: dict[str, float] = field(default_factory=dict)

    def docker(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return self.engine.docker(*args, check=check, input=input, timeout=timeout)

    def fails(self, *args: str) -> str:
        """Run a docker command that must fail; returns what it printed."""
        result = self.docker(*args, check=False)
        assert result.returncode != 0, f"docker {' '.join(args)} succeeded:\n{result.stdout}"
        return result.stdout + result.stderr

    @property
    def plugin_id(self) -> str:
        return dockerenv.plugin_id(self.engine, self.ref)

    @property
    def state_dir(self) -> Path:
        return self.engine.root / "netplug-state"

    def world(self, *cmd: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return dockerenv.run(
            "ip", "netns", "exec", f"{self.engine.netns}w", *cmd, check=check, timeout=60
        )

    def host(self, *cmd: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return self.engine.ns(*cmd, check=check)

    def ip_of(self, container: str, network: str) -> str:
        out = self.docker(
            "inspect",
            "-f",
            f'{{{{(index .NetworkSettings.Networks "{network}").IPAddress}}}}',
            container,
        ).stdout.strip()
        return out

    def sh(
        self, container: str, command: str, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        return self.docker("exec", container, "sh", "-c", command, check=check, timeout=60)

    def leftovers(self) -> list[str]:
        found = []
        links = json.loads(self.host("ip", "-j", "link", "show", check=True).stdout)
        found += [f"link {item['ifname']}" for item in links if OWNED_NAME.match(item["ifname"])]
        table = self.host("nft", "-j", "list", "table", "inet", "netplug").stdout
        if (
            table
            and not self.docker(
                "network", "ls", "-q", "--filter", f"driver={self.ref}"
            ).stdout.strip()
        ):
            found.append("nft table inet netplug with no netplug network")
        for item in json.loads(table or "{}").get("nftables", []):
            if "chain" in item and item["chain"]["name"].startswith("net_"):
                found.append(f"chain {item['chain']['name']}")
            if "map" in item and item["map"].get("elem"):
                found.append(f"map {item['map']['name']}")
        rules = self.host("iptables", "-S", "FORWARD").stdout
        found += [f"iptables {line}" for line in rules.splitlines() if "netplug" in line]
        found += [f"record {p.name}" for p in self.state_dir.rglob("*.json")]
        return found


@pytest.fixture(scope="session")
def env() -> Iterator[Env]:
    dockerenv.ensure_packages()
    root = Path(tempfile.mkdtemp(prefix="netplug-e2e-", dir="/tmp"))
    with (
        dockerenv.engine_with_registry(root) as (engine, registry),
        dockerenv.world(engine),
    ):
        started = time.monotonic()
        dockerenv.busybox_image(engine)
        timings = dockerenv.build_plugin(engine, root / "plugin")
        ref, install = dockerenv.install_plugin(engine, registry, root / "plugin")
        timings.update(install)
        timings["session setup"] = time.monotonic() - started
        yield Env(engine, registry, ref, root / "plugin", timings)


@pytest.fixture(autouse=True)
def nothing_left(env: Env) -> Iterator[None]:
    yield
    env.docker("plugin", "enable", env.ref, check=False)  # if a test left it disabled
    for cid in env.docker("ps", "-aq", "--filter", "label=netplug-test").stdout.split():
        env.docker("rm", "-f", cid, check=False)
    for net in env.docker("network", "ls", "-q", "--filter", "label=netplug-test").stdout.split():
        env.docker("network", "rm", net, check=False)
    # netplug answers `network rm` and `rm` before the last links go (~100 ms later)
    deadline = time.monotonic() + 10
    while (found := env.leftovers()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert found == []


def net_create(env: Env, name: str, n: int, *args: str) -> str:
    env.docker(
        "network",
        "create",
        "-d",
        env.ref,
        "--label",
        "netplug-test",
        "--subnet",
        SUBNET.format(n),
        *args,
        name,
    )
    return name


def run_d(env: Env, name: str, *args: str) -> str:
    env.docker("run", "-d", "--label", "netplug-test", "--name", name, *args, timeout=120)
    return name


HTTPD = ("busybox", "httpd", "-f", "-p", "80", "-h", "/www")
UDP_ECHO = (
    "import socket\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('0.0.0.0',53))\n"
    "while True:\n d,a=s.recvfrom(512);s.sendto(b'pong:'+d,a)\n"
)
UDP_ASK = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(3)\n"
    "s.sendto(b'ping',('{}',{}));sys.stdout.write(s.recv(512).decode())\n"
)


def http_get(host: str, port: int = 80) -> list[str]:
    """Arguments for a busybox container that fetches http://host:port/ (busybox's wget
    crashes with -T, so nc with its own timeout does the fetch)."""
    request = "GET / HTTP/1.0\\r\\n\\r\\n"
    return ["sh", "-c", f"printf '{request}' | nc -w 5 {host} {port}"]


def test_plugin_is_enabled_and_debuggable(env: Env) -> None:
    listing = env.docker("plugin", "ls", "--format", "{{.Name}} {{.Enabled}}").stdout
    assert f"{env.ref} true" in listing
    plugin_id = env.plugin_id
    # the socket answers curl, on the host path dockerd uses
    answer = env.engine.in_engine(
        "curl",
        "-s",
        "--unix-socket",
        f"/run/docker/plugins/{plugin_id}/netplug.sock",
        "-XPOST",
        "http://localhost/NetworkDriver.GetCapabilities",
    ).stdout
    assert json.loads(answer) == {"Scope": "local", "ConnectivityScope": "local"}
    # `netplug status` inside the plugin through runc
    status = env.engine.in_engine(
        "runc",
        "--root",
        f"{env.engine.root}/exec/runtime-runc/plugins.moby",
        "exec",
        plugin_id,
        "netplug",
        "status",
    ).stdout
    assert "kernel (bridge): in sync" in status
    # its log lines reach dockerd's log, tagged with the plugin ID, at the right levels
    lines = [line for line in env.engine.logs().splitlines() if f"plugin={plugin_id}" in line]
    assert any("msg=listening" in line for line in lines)
    assert not [line for line in lines if "level=error" in line.split(" msg=")[0]]


def test_install_prompt_and_privileges(env: Env) -> None:
    alias = "netplug-prompt:latest"
    source = env.engine.root / "prompt-state"
    source.mkdir(exist_ok=True)
    install = ("plugin", "install", "--alias", alias, env.ref, f"state.source={source}")
    refused = env.docker(*install, input="n\n", check=False)
    assert refused.returncode != 0
    assert "- network: [host]" in refused.stdout
    assert "- capabilities: [CAP_NET_ADMIN]" in refused.stdout
    assert "netplug-prompt" not in env.docker("plugin", "ls").stdout
    accepted = env.docker(*install, input="y\n", timeout=900)
    assert "Installed plugin" in accepted.stdout
    prompt = accepted.stdout.split("Do you grant")[0]
    privileges = sorted(line.strip() for line in prompt.splitlines() if line.startswith(" - "))
    assert privileges == [
        "- capabilities: [CAP_NET_ADMIN]",
        f"- mount: [{dockerenv.STATE_MOUNT_SOURCE}]",
        "- network: [host]",
    ]
    enabled = env.docker("plugin", "ls", "--format", "{{.Name}} {{.Enabled}}").stdout
    assert "netplug-prompt:latest true" in enabled
    env.docker("plugin", "disable", alias)
    env.docker("plugin", "rm", alias)


def test_containers_nat_ports_mtu(env: Env) -> None:
    net = net_create(env, "app", 1, "-o", "mtu=1400")
    run_d(env, "web", "--network", net, "-p", "8080:80", *HTTPD)
    run_d(
        env,
        "udp",
        "--network",
        net,
        "-p",
        "5353:53/udp",
        dockerenv.python_image(),  # busybox has no UDP server
        "python3",
        "-c",
        UDP_ECHO,
    )
    web_ip = env.ip_of("web", net)
    # container to container, by address and by name
    client = ["run", "--rm", "--label", "netplug-test", "--network", net, "busybox"]
    assert "hello from netplug" in env.docker(*client, "wget", "-qO-", f"http://{web_ip}/").stdout
    assert "hello from netplug" in env.docker(*client, "wget", "-qO-", "http://web/").stdout
    # MTU applied inside the container
    assert "mtu 1400" in env.sh("web", "ip link show eth0").stdout
    # egress through NAT to "the internet" (which has no route back to 10.30.1.0/24)
    assert env.docker(*client, "ping", "-c1", "-W2", "10.254.0.2", check=False).returncode == 0
    # the published port: from the host, from another host, from another container
    assert "hello from netplug" in env.host("curl", "-s", "-m5", "http://127.0.0.1:8080/").stdout
    assert "hello from netplug" in env.world("curl", "-s", "-m5", "http://10.254.0.1:8080/").stdout
    assert "hello from netplug" in env.docker(*client, *http_get("10.254.0.1", 8080)).stdout
    # UDP: a datagram from another host is answered through the published port
    udp = env.world("python3", "-c", UDP_ASK.format("10.254.0.1", 5353))
    assert udp.stdout == "pong:ping", udp
    # a container on Docker's own bridge reaches it through the host's address too
    bridge_client = ["run", "--rm", "--label", "netplug-test", "busybox"]
    assert "hello from netplug" in env.docker(*bridge_client, *http_get("10.254.0.1", 8080)).stdout
    env.docker("rm", "-f", "web", "udp")
    env.docker("network", "rm", net)


def test_isolation_internal_ipv6_static_addresses(env: Env) -> None:
    a = net_create(env, "neta", 2)
    b = net_create(env, "netb", 3)
    internal = net_create(env, "neti", 4, "--internal")
    v6 = net_create(env, "net6", 5, "--ipv6", "--subnet", "fd00:30:5::/64")
    run_d(
        env,
        "a1",
        "--network",
        a,
        "--ip",
        "10.30.2.50",
        "--mac-address",
        "02:00:00:30:02:50",
        "busybox",
        "sleep",
        "600",
    )
    run_d(env, "b1", "--network", b, "busybox", "sleep", "600")
    run_d(env, "d1", "busybox", "sleep", "600")  # Docker's own bridge
    run_d(env, "i1", "--network", internal, "busybox", "sleep", "600")
    run_d(env, "i2", "--network", internal, "busybox", "sleep", "600")
    run_d(env, "s1", "--network", v6, "busybox", "sleep", "600")
    run_d(env, "s2", "--network", v6, "busybox", "sleep", "600")
    assert env.ip_of("a1", a) == "10.30.2.50"
    assert "02:00:00:30:02:50" in env.sh("a1", "ip link show eth0").stdout
    b1 = env.ip_of("b1", b)
    d1 = env.docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", "d1").stdout.strip()
    a1 = "10.30.2.50"
    ping = "ping -c1 -W1 "
    assert env.sh("a1", ping + "10.30.2.1").returncode == 0
    assert env.sh("a1", ping + b1).returncode != 0
    assert env.sh("b1", ping + a1).returncode != 0
    assert env.sh("a1", ping + d1).returncode != 0
    assert env.sh("d1", ping + a1).returncode != 0
    assert env.sh("i1", ping + env.ip_of("i2", internal)).returncode == 0
    assert env.sh("i1", ping + "10.254.0.2").returncode != 0
    s2_v6 = env.docker(
        "inspect", "-f", '{{(index .NetworkSettings.Networks "net6").GlobalIPv6Address}}', "s2"
    ).stdout.strip()
    assert s2_v6.startswith("fd00:30:5::")
    assert env.sh("s1", f"ping -6 -c1 -W2 {s2_v6}").returncode == 0
    assert env.sh("s1", "ping -6 -c1 -W2 fd00:30:5::1").returncode == 0


def test_connect_disconnect_and_container_restart(env: Env) -> None:
    a = net_create(env, "netc", 6)
    b = net_create(env, "netd", 7)
    run_d(env, "c1", "--network", a, "busybox", "sleep", "600")
    run_d(env, "peer", "--network", b, "busybox", "sleep", "600")
    env.docker("network", "connect", b, "c1")
    assert env.sh("c1", "ping -c1 -W1 " + env.ip_of("peer", b)).returncode == 0
    env.docker("network", "disconnect", b, "c1")
    assert "eth1" not in env.sh("c1", "ip link").stdout
    before = (env.ip_of("c1", a), env.sh("c1", "cat /sys/class/net/eth0/address").stdout)
    env.docker("restart", "-t", "1", "c1")
    after = (env.ip_of("c1", a), env.sh("c1", "cat /sys/class/net/eth0/address").stdout)
    assert before == after  # same address and, derived from it, the same MAC
    assert env.sh("c1", "ping -c1 -W1 10.30.6.1").returncode == 0


def test_twenty_parallel_containers(env: Env) -> None:
    net = net_create(env, "many", 8)
    errors: list[str] = []

    def start(i: int) -> None:
        result = env.docker(
            "run",
            "-d",
            "--label",
            "netplug-test",
            "--name",
            f"p{i}",
            "--network",
            net,
            "busybox",
            "sleep",
            "600",
            check=False,
            timeout=300,
        )
        if result.returncode != 0:
            errors.append(result.stderr)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    ips = {env.ip_of(f"p{i}", net) for i in range(20)}
    assert len(ips) == 20
    assert env.sh("p0", "ping -c1 -W1 " + env.ip_of("p19", net)).returncode == 0
    links = json.loads(env.host("ip", "-j", "link", "show", check=True).stdout)
    ours = [x["ifname"] for x in links if OWNED_NAME.match(x["ifname"])]
    assert len(ours) == 1 + 20  # the bridge and one host end per container, nothing duplicated


def test_bad_input_is_explained(env: Env) -> None:
    def create(*args: str) -> str:
        return env.fails(
            "network", "create", "-d", env.ref, "--label", "netplug-test", *args, "badnet"
        )

    assert "no such backend" in create("--subnet", SUBNET.format(9), "-o", "backend=nope")
    assert "68 to 65535" in create("--subnet", SUBNET.format(9), "-o", "mtu=40")
    assert "unknown option" in create("--subnet", SUBNET.format(9), "-o", "colour=blue")
    net_create(env, "taken", 10)
    assert "overlaps" in create("--subnet", "10.30.10.128/25")
    # the tag is needed by dockerd (the driver is registered under the full reference)
    untagged = env.fails("network", "create", "-d", env.ref.rsplit(":", 1)[0], "nonet")
    assert "could not resolve driver" in untagged
    # a host port already published by another container
    run_d(env, "first", "--network", "taken", "-p", "8090:80", *HTTPD)
    out = env.fails(
        "run",
        "--rm",
        "--label",
        "netplug-test",
        "--network",
        "taken",
        "-p",
        "8090:80",
        "busybox",
        "true",
    )
    assert "already published" in out
    assert env.docker("network", "ls", "-q", "--filter", "name=badnet").stdout.strip() == ""


def test_disable_in_use_and_upgrade(env: Env) -> None:
    net = net_create(env, "keep", 12)
    run_d(env, "u1", "--network", net, "busybox", "sleep", "600")
    # Docker's rule: a plugin with networks is in use (this runs before any dockerd restart,
    # after which dockerd no longer counts the references; see docs/operations.md)
    refused = env.fails("plugin", "disable", env.ref)
    assert "in use" in refused
    env.docker("rm", "-f", "u1")
    env.docker("plugin", "disable", "-f", env.ref)
    env.docker(
        "plugin",
        "upgrade",
        "--grant-all-permissions",
        "--skip-remote-check",
        env.ref,
        env.ref,
        timeout=900,
    )
    # make sure the state mount still points at the same directory: dockerd can reset a
    # plugin's settings to the new version's defaults on upgrade (docs/operations.md)
    env.docker("plugin", "set", env.ref, f"state.source={env.state_dir}")
    env.docker("plugin", "enable", env.ref)
    run_d(env, "u2", "--network", net, "busybox", "sleep", "600")
    assert env.sh("u2", "ping -c1 -W1 10.30.12.1").returncode == 0


def test_plugin_kill_9_and_dockerd_restart(env: Env) -> None:
    net = net_create(env, "tough", 11)
    run_d(env, "r1", "--network", net, "--restart", "always", "-p", "8091:80", *HTTPD)
    run_d(env, "r2", "--network", net, "busybox", "sleep", "600")
    pid = dockerenv.plugin_pid(env.engine, env.ref)
    env.engine.ns("kill", "-9", str(pid))
    # running containers keep their connectivity while dockerd restarts the plugin
    assert env.sh("r2", "ping -c1 -W1 " + env.ip_of("r1", net)).returncode == 0
    deadline = time.monotonic() + 30
    while dockerenv.plugin_pid(env.engine, env.ref) == pid and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "hello" in env.host("curl", "-s", "-m5", "http://127.0.0.1:8091/").stdout
    run_d(env, "r3", "--network", net, "busybox", "sleep", "600")
    assert env.sh("r3", "ping -c1 -W1 " + env.ip_of("r1", net)).returncode == 0
    env.docker("rm", "-f", "r2", "r3")
    # dockerd restart: the --restart always container comes back with connectivity
    env.engine.restart()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (
            env.docker("inspect", "-f", "{{.State.Running}}", "r1", check=False).stdout.strip()
            == "true"
        ):
            break
        time.sleep(0.5)
    assert "hello" in env.host("curl", "-s", "-m5", "http://127.0.0.1:8091/").stdout
    assert "hello" in env.world("curl", "-s", "-m5", "http://10.254.0.1:8091/").stdout


def test_host_reboot(env: Env) -> None:
    net = net_create(env, "boot", 13)
    run_d(env, "b1", "--network", net, "--restart", "always", "-p", "8092:80", *HTTPD)
    env.engine.stop()
    # what a reboot leaves: no processes, no netplug links, no rules; state files kept
    for name in json.loads(env.host("ip", "-j", "link", "show", check=True).stdout):
        if OWNED_NAME.match(name["ifname"]):
            env.host("ip", "link", "del", name["ifname"])
    env.host("nft", "flush", "ruleset")
    env.engine.restart()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if "hello" in env.host("curl", "-s", "-m2", "http://127.0.0.1:8092/").stdout:
            break
        time.sleep(0.5)
    assert "hello" in env.world("curl", "-s", "-m5", "http://10.254.0.1:8092/").stdout
    run_d(env, "b2", "--network", net, "busybox", "sleep", "600")
    assert env.sh("b2", "ping -c1 -W1 " + env.ip_of("b1", net)).returncode == 0
    assert (
        env.docker(
            "run",
            "--rm",
            "--label",
            "netplug-test",
            "--network",
            net,
            "busybox",
            "ping",
            "-c1",
            "-W2",
            "10.254.0.2",
            check=False,
        ).returncode
        == 0
    )


def test_plugin_builds_on_a_registry_base_image(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """`make plugin BASE_IMAGE=<ref>`: the base comes from a registry (here the local one, with
    the debootstrap base pushed to it) and the build runs with the engine's network."""
    base = f"{env.registry.address}/netplug-base:test"
    env.docker("tag", dockerenv.BASE_TAG, base)
    env.docker("push", base, timeout=600)
    env.docker("rmi", base)
    monkeypatch.setenv("BASE_IMAGE", base)
    out = env.engine.root / "plugin-from-registry"
    dockerenv.build_plugin(env.engine, out)
    assert env.docker("image", "inspect", base, check=False).returncode == 0  # it was pulled
    assert (out / "rootfs/usr/local/bin/netplug").is_symlink()
    assert json.loads((out / "config.json").read_text())["interface"]["socket"] == "netplug.sock"
