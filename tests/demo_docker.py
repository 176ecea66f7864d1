"""`make demo`: netplug as a Docker managed plugin, from build to cleanup, as a user sees it.

It builds the plugin from the Dockerfile, starts a private registry and a dockerd in temporary
roots and a network namespace of their own (iptables on, as users run it), then runs the docker
commands a user would and prints what they print. Nothing on this host is changed; everything is
removed at the end.
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from tests import dockerenv

BOLD, DIM, RESET = "\033[1m", "\033[2m", "\033[0m"


def step(text: str) -> None:
    print(f"\n{BOLD}==> {text}{RESET}", flush=True)


class Demo:
    def __init__(self, engine: dockerenv.Dockerd) -> None:
        self.engine = engine

    def docker(self, *args: str, input: str | None = None, show: bool = True) -> str:
        shown = " ".join(shlex.quote(a) for a in args)
        if show:
            print(f"$ docker {shown}", flush=True)
        result = self.engine.docker(*args, input=input, check=False, timeout=900)
        out = (result.stdout + result.stderr).rstrip()
        if show and out:
            print(DIM + out + RESET, flush=True)
        if result.returncode != 0 and input is None:
            raise SystemExit(f"demo failed: docker {shown}")
        return out

    def host(self, *cmd: str) -> str:
        print(f"$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        out = self.engine.ns(*cmd, check=False).stdout.rstrip()
        print(DIM + out + RESET, flush=True)
        return out


def main() -> int:
    dockerenv.ensure_packages()
    root = Path(tempfile.mkdtemp(prefix="netplug-demo-", dir="/tmp"))
    with dockerenv.engine_with_registry(root) as (engine, registry):
        demo = Demo(engine)
        with dockerenv.world(engine) as world:
            print(
                f"dockerd {engine.docker('version', '-f', '{{.Server.Version}}').stdout.strip()}"
                f" runs in namespace {engine.netns} with its own roots under {root};"
                f" the registry listens on {registry.address};"
                " namespace 'world' (10.254.0.2) plays the internet."
            )
            dockerenv.busybox_image(engine)

            step("make plugin: Dockerfile -> rootfs, config.json beside it")
            timings = dockerenv.build_plugin(engine, root / "plugin")
            for name, seconds in timings.items():
                print(f"    {name:>16}: {seconds:5.1f} s")
            size = dockerenv.run("du", "-sh", str(root / "plugin/rootfs")).stdout.split()[0]
            print(f"    plugin/rootfs: {size}")

            ref = f"{registry.address}/netplug:latest"
            step("docker plugin create / push, then install from the registry")
            demo.docker("plugin", "create", ref, str(root / "plugin"))
            demo.docker("plugin", "push", ref)
            demo.docker("plugin", "rm", ref)
            state = root / "netplug-state"
            state.mkdir()
            demo.docker("plugin", "install", ref, f"state.source={state}", input="y\n")
            demo.docker("plugin", "ls")
            plugin_id = dockerenv.plugin_id(engine, ref)

            step(
                "docker network create -d <registry>/netplug:latest --subnet 10.10.0.0/24 "
                "-o mtu=1400 app"
            )
            demo.docker(
                "network", "create", "-d", ref, "--subnet", "10.10.0.0/24", "-o", "mtu=1400", "app"
            )
            demo.docker("network", "ls", "--filter", "driver=" + ref)

            step("containers: a web server with a published port, and clients")
            demo.docker(
                "run",
                "-d",
                "--name",
                "web",
                "--network",
                "app",
                "-p",
                "8080:80",
                "busybox",
                "httpd",
                "-f",
                "-p",
                "80",
                "-h",
                "/www",
            )
            web_ip = demo.docker(
                "inspect", "-f", "{{.NetworkSettings.Networks.app.IPAddress}}", "web"
            )
            demo.docker(
                "run", "--rm", "--network", "app", "busybox", "wget", "-qO-", f"http://{web_ip}/"
            )
            demo.docker("run", "--rm", "--network", "app", "busybox", "wget", "-qO-", "http://web/")
            demo.docker("run", "--rm", "--network", "app", "busybox", "ip", "link", "show", "eth0")

            step("egress through NAT: ping 'the internet', which has no route back to 10.10.0.0/24")
            demo.docker("run", "--rm", "--network", "app", "busybox", "ping", "-c1", "10.254.0.2")

            step("the published port, from the host and from another host")
            demo.host("curl", "-s", "http://127.0.0.1:8080/")
            print("$ curl -s http://10.254.0.1:8080/    # from the 'world' namespace", flush=True)
            out = dockerenv.run(
                "ip",
                "netns",
                "exec",
                world,
                "curl",
                "-s",
                "-m5",
                "http://10.254.0.1:8080/",
                check=False,
            ).stdout
            print(DIM + out.rstrip() + RESET)

            step("debugging: the socket, netplug status inside the plugin, the log lines")
            sock = f"/run/docker/plugins/{plugin_id}/netplug.sock"
            print(
                f"$ curl --unix-socket {sock} -XPOST http://localhost/NetworkDriver.GetCapabilities"
            )
            print(
                DIM
                + engine.in_engine(
                    "curl",
                    "-s",
                    "--unix-socket",
                    sock,
                    "-XPOST",
                    "http://localhost/NetworkDriver.GetCapabilities",
                ).stdout
                + RESET
            )
            runc_root = f"{engine.root}/exec/runtime-runc/plugins.moby"
            print(f"$ runc --root {runc_root} exec {plugin_id[:12]}… netplug status")
            print(
                DIM
                + engine.in_engine(
                    "runc", "--root", runc_root, "exec", plugin_id, "netplug", "status"
                ).stdout.rstrip()
                + RESET
            )
            print(f"$ grep plugin={plugin_id[:12]}… dockerd.log")
            lines = [line for line in engine.logs().splitlines() if f"plugin={plugin_id}" in line]
            for line in lines[:12]:
                print(DIM + line.replace(plugin_id, plugin_id[:12] + "…")[:220] + RESET)
            print(f"    … {len(lines)} lines in all")

            step("bad input gets a clear message, and nothing is left behind")
            demo.docker(
                "network", "create", "-d", ref, "--subnet", "10.10.0.128/25", "clash", input=""
            )
            demo.docker(
                "network",
                "create",
                "-d",
                ref,
                "--subnet",
                "10.11.0.0/24",
                "-o",
                "mtu=9",
                "tiny",
                input="",
            )

            step("cleanup: docker rm, docker network rm, docker plugin disable / rm")
            demo.docker("rm", "-f", "web")
            demo.docker("network", "rm", "app")
            # netplug answers before the bridge is gone; the rest follows within ~100 ms
            deadline = time.monotonic() + 5
            while True:
                links = json.loads(engine.ns("ip", "-j", "link", "show").stdout)
                left = [x["ifname"] for x in links if x["ifname"].startswith(("npb", "nph", "npc"))]
                records = list(state.rglob("*.json"))
                if not (left or records) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            print(
                f"netplug links left: {left or 'none'}; state records left: "
                f"{[p.name for p in records] or 'none'}"
            )
            started = time.monotonic()
            demo.docker("plugin", "disable", ref)
            print(f"    (disable took {time.monotonic() - started:.2f} s: SIGTERM is handled)")
            demo.docker("plugin", "rm", ref)
            if left or records:
                raise SystemExit("demo failed: something was left behind")
    print(
        f"\n{BOLD}demo finished: every step worked, and the engine, registry and namespaces "
        f"are gone{RESET}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
