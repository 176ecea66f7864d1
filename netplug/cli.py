"""`netplug serve | status | gc | version`."""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
from pathlib import Path
from typing import Any

from netplug import __version__, config
from netplug.errors import NetplugError


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self.path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def call(socket_path: Path, path: str, body: bytes = b"", timeout: float = 60) -> Any:
    """POST to the plugin socket the way dockerd does; returns the decoded JSON answer."""
    conn = _UnixConnection(socket_path, timeout)
    try:
        conn.request("POST", path, body, {"Accept": "application/vnd.docker.plugins.v1.2+json"})
        response = conn.getresponse()
        data = json.loads(response.read() or b"{}")
    finally:
        conn.close()
    if response.status != 200:
        raise NetplugError(f"{path}: {response.status} {data.get('Err', data)}")
    return data


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="netplug", description="Docker network driver plugin with pluggable backends"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the plugin socket (the plugin's entrypoint)")
    serve.add_argument("--socket", help=f"default {config.DEFAULT_SOCKET} ($NETPLUG_SOCKET)")
    serve.add_argument(
        "--state-dir", help=f"default {config.DEFAULT_STATE_DIR} ($NETPLUG_STATE_DIR)"
    )
    serve.add_argument("--log-level", help="debug|info|warning|error ($NETPLUG_LOG_LEVEL)")
    serve.add_argument("--netns", help="do the kernel work in this network namespace")
    for name, text in (
        ("status", "records beside kernel reality, from the running plugin"),
        ("gc", "remove links and rules with netplug's names that no record owns"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--socket", help=f"default {config.DEFAULT_SOCKET} ($NETPLUG_SOCKET)")
        if name == "status":
            cmd.add_argument("--json", action="store_true", help="machine-readable output")
    bench = sub.add_parser("bench", help="benchmark the hot paths (see bench/README.md)")
    bench.add_argument("--only", nargs="+", metavar="NAME", help="run only these scenarios")
    bench.add_argument("--quick", action="store_true", help="small counts; under a minute")
    bench.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON")
    bench.add_argument("--compare", type=Path, metavar="FILE", help="ratios against a report")
    sub.add_parser("version", help="print the version")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "version":
            print(f"netplug {__version__}")
            return 0
        if args.command == "serve":
            return _serve(args)
        if args.command == "bench":
            from netplug import benchrun

            return benchrun.run_bench(args.only, args.quick, args.json, args.compare)
        settings = config.load(socket=args.socket)
        if args.command == "status":
            data = call(settings.socket, "/Netplug.Status")
            print(json.dumps(data, indent=2) if args.json else format_status(data))
        else:
            collected = call(settings.socket, "/Netplug.GC")["collected"]
            print("\n".join(f"removed {item}" for item in collected) or "nothing to collect")
    except NetplugError as exc:
        print(f"netplug: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"netplug: cannot reach the plugin socket: {exc}", file=sys.stderr)
        return 2
    return 0


def _serve(args: argparse.Namespace) -> int:
    import trio

    from netplug import app, logs

    settings = config.load(
        socket=args.socket, state_dir=args.state_dir, log_level=args.log_level, netns=args.netns
    )
    logs.setup(settings.log_level)
    trio.run(app.run, settings)
    return 0


def format_status(data: dict[str, Any]) -> str:
    lines = []
    endpoints = data.get("endpoints", [])
    for net in data.get("networks", []):
        links = " ".join(f"{k}={v}" for k, v in net.get("links", {}).items())
        subnets = ",".join(s["pool"] for s in [*net.get("ipv4", []), *net.get("ipv6", [])])
        flags = " internal" if net.get("internal") else ""
        lines.append(
            f"network {net['id'][:12]} backend={net['backend']} {net['state']} "
            f"subnets={subnets or '-'} {links}{flags}"
        )
        for ep in endpoints:
            if ep["network_id"] != net["id"]:
                continue
            ports = ",".join(
                f"{x['host_ip'] + ':' if x['host_ip'] else ''}{x['host_port']}->"
                f"{x['container_port']}/{x['proto']}"
                for x in ep.get("ports", [])
            )
            links = " ".join(f"{k}={v}" for k, v in ep.get("links", {}).items())
            lines.append(
                f"  endpoint {ep['id'][:12]} {ep['state']} {'joined' if ep['joined'] else 'idle'}"
                f" {ep['address'] or '-'} mac={ep['mac'] or '-'} {links}"
                + (f" ports={ports}" if ports else "")
            )
    if not lines:
        lines.append("no networks")
    for backend, view in data.get("kernel", {}).items():
        drift = view.get("drift", [])
        lines.append(f"kernel ({backend}): " + ("in sync" if not drift else "DRIFT"))
        lines += [f"  {item}" for item in drift]
    return "\n".join(lines)
