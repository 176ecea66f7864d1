"""`make demo-netns`: a walk through netplug on real netlink, in namespaces it creates and deletes.

It plays dockerd's part: it sends the calls `docker network create`, `docker run -p` and
`docker stop` cause, over the plugin socket, and moves each container's interface into a
namespace of its own. Everything runs in throwaway namespaces; nothing on this host is changed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.kernel import (
    Plugin,
    iptables_leftovers,
    make_topology,
    netplug_links,
    nft_leftovers,
    ping,
)
from tests.test_kernel import Net, tcp_get, tcp_server


def step(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def show(label: str, ok: bool) -> None:
    print(f"    {'ok  ' if ok else 'FAIL'} {label}", flush=True)
    if not ok:
        raise SystemExit(f"demo failed at: {label}")


def main() -> int:
    host, world = make_topology()
    workdir = Path(tempfile.mkdtemp(prefix="netplug-demo-", dir="/tmp"))
    plugin = Plugin(host, workdir)
    servers: list[subprocess.Popen[str]] = []
    finished = False
    try:
        step(
            f"netplug serve in namespace {host.name} (the Docker host); 'world' plays the internet"
        )
        plugin.start()
        out = subprocess.run(
            [
                "curl",
                "-s",
                "--unix-socket",
                str(plugin.socket),
                "-XPOST",
                "http://localhost/NetworkDriver.GetCapabilities",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        print(
            f"    $ curl --unix-socket {plugin.socket} -XPOST "
            "http://localhost/NetworkDriver.GetCapabilities\n    {out}"
        )

        step("docker network create -d netplug --subnet 10.10.0.0/24 -o mtu=1400 app")
        net = Net(plugin, 0xAB, "10.10.0.0/24", options={"mtu": "1400"})
        bridge = f"npb{net.id[:12]}"
        print("    " + host.run("ip", "-br", "addr", "show", bridge).stdout.strip())

        step("docker run -d --name web --network app -p 8080:80 ...; docker run --name client ...")
        web, web_ep = net.run(
            [
                {
                    "Proto": 6,
                    "IP": "",
                    "Port": 80,
                    "HostIP": "",
                    "HostPort": 8080,
                    "HostPortEnd": 8080,
                }
            ]
        )
        client, client_ep = net.run()
        servers.append(tcp_server(web, 80))
        print("    web:    " + web.ns.run("ip", "-br", "addr", "show", "eth0").stdout.strip())
        print("    client: " + client.ns.run("ip", "-br", "addr", "show", "eth0").stdout.strip())

        step("containers talking, NAT, the published port")
        show(f"client -> web ({web.address}) ping", ping(client.ns, web.address))
        show("client -> gateway 10.10.0.1 ping", ping(client.ns, "10.10.0.1"))
        show("client -> world 10.254.0.2 ping (masqueraded)", ping(client.ns, "10.254.0.2"))
        for who, ns, target in (
            ("world -> host 10.254.0.1:8080", world, "10.254.0.1"),
            ("host  -> 127.0.0.1:8080", host, "127.0.0.1"),
            ("client -> host 10.254.0.1:8080 (hairpin)", client.ns, "10.254.0.1"),
        ):
            answer = tcp_get(ns, target, 8080)
            show(f"{who}: {answer.strip()}", answer.startswith("hello"))

        step("netplug status (inside the plugin: runc exec <id> netplug status)")
        status = subprocess.run(
            ["netplug", "status", "--socket", str(plugin.socket)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        print("    " + status.replace("\n", "\n    "))

        step("docker stop web client; docker network rm app")
        for proc in servers:
            proc.kill()
            proc.wait()
        servers.clear()
        net.stop(web, web_ep)
        net.stop(client, client_ep)
        net.delete()
        show("no netplug links left", netplug_links(host) == [])
        show("no nftables chains or port maps left", nft_leftovers(host) == [])
        show("no iptables rules left", iptables_leftovers(host) == [])
        show("no state records left", plugin.records() == [])

        step("the plugin log (dockerd tags each line with plugin=<ID>)")
        plugin.stop()
        for line in plugin.logs().splitlines():
            if "level=debug" not in line:
                print("    " + line)
        print("\ndemo finished: every step worked and nothing was left behind")
        finished = True
        return 0
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()
        plugin.kill()
        for container in getattr(locals().get("net"), "containers", []):
            container.delete()
        host.delete()
        world.delete()
        if finished:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"the plugin's log and state are kept in {workdir}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
