"""nftables: NAT, isolation and published ports, in netplug's own table `inet netplug`.

The table has a fixed skeleton (base chains, verdict maps keyed by bridge name, port maps) and
one pair of chains per network. Every change is one nftables transaction sent through
libnftables (loaded with ctypes, on a kernel thread so the worker's network namespace applies),
so the kernel sees each change whole or not at all. `rebuild` replaces the whole table from
netplug's records at start, which repairs whatever a crash or a reboot left.

Packets on a netplug bridge:
- leaving it (`iifname` = bridge, to elsewhere): accepted, or dropped for `--internal` networks;
  traffic to Docker's own bridges (`docker0`, `br-*`) is dropped.
- entering it (`oifname` = bridge): replies (conntrack established), published ports (DNAT),
  and traffic from the same bridge (unless ICC is off) are accepted; everything else, which
  includes every other netplug network, is dropped.
- masquerade: sources in the network's subnets leaving through another interface; hairpin
  (a container reaching a published port of its own network) and 127.0.0.1 clients.

dockerd's iptables set the FORWARD policy to DROP. A packet accepted here still has to pass that
chain, so netplug puts accept rules in iptables' FORWARD, one per direction (through the host's
own `iptables` binary, so iptables-nft and iptables-legacy both work): for `npb+`, every bridge
netplug names itself, made with the first network and removed with the last, and per bridge for
bridges named with `-o bridge_name`. The filtering that matters stays in this table.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import shutil
import subprocess
from collections.abc import Iterable
from functools import partial
from typing import Any

import msgspec

from netplug.errors import KernelError
from netplug.model import PublishedPort
from netplug.netlink import BRIDGE_PREFIX, OWNED_NAME, Kernel, Worker
from netplug.tasks import together

log = logging.getLogger("netplug.firewall")

TABLE = "netplug"
COMMENT = "netplug"


class FirewallError(KernelError):
    pass


class NetworkRules(msgspec.Struct, frozen=True, kw_only=True):
    """What the firewall needs to know of one network."""

    key: str  # short network ID (12 hex), used in chain names
    bridge: str
    pools4: tuple[str, ...] = ()
    pools6: tuple[str, ...] = ()
    masquerade: bool = True
    icc: bool = True
    internal: bool = False


class Nft:
    """A libnftables context: commands in nft's text syntax, output as JSON."""

    _lib: Any = None

    def __init__(self) -> None:
        lib = self._load()
        self._ctx = lib.nft_ctx_new(0)
        if not self._ctx:
            raise FirewallError("libnftables: cannot create a context")
        lib.nft_ctx_output_set_flags(self._ctx, 1 << 4)  # NFT_CTX_OUTPUT_JSON
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)

    @classmethod
    def _load(cls) -> Any:
        if cls._lib is None:
            path = ctypes.util.find_library("nftables") or "libnftables.so.1"
            try:
                lib = ctypes.CDLL(path)
            except OSError as exc:
                raise FirewallError(
                    f"libnftables not found ({exc}); install the 'libnftables1' package"
                ) from exc
            lib.nft_ctx_new.restype = ctypes.c_void_p
            lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
            lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
            lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            cls._lib = lib
        return cls._lib

    def run(self, commands: str) -> str:
        lib = self._lib
        rc = lib.nft_run_cmd_from_buffer(self._ctx, commands.encode())
        out = (lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode()
        err = (lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode()
        if rc != 0:
            first = next((line for line in err.splitlines() if line.strip()), "unknown error")
            raise FirewallError(f"nftables refused the change: {first}")
        return out

    def close(self) -> None:
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None


def _nft(worker: Worker) -> Nft:
    nft = worker.resources.get("nft")
    if nft is None:
        nft = worker.resources["nft"] = Nft()
    assert isinstance(nft, Nft)
    return nft


# --- the ruleset, as nft text ----------------------------------------------------------------

_SKELETON = f"""
table inet {TABLE} {{
    map into {{ type ifname : verdict; }}
    map outof {{ type ifname : verdict; }}
    map nat_into {{ type ifname : verdict; }}
    map nat_outof {{ type ifname : verdict; }}
    map ports4 {{ type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; }}
    map ports4_any {{ type inet_proto . inet_service : ipv4_addr . inet_service; }}
    map ports6_any {{ type inet_proto . inet_service : ipv6_addr . inet_service; }}
    chain ports {{
        meta l4proto {{ tcp, udp, sctp }} dnat ip to ip daddr . meta l4proto . th dport map @ports4
        meta l4proto {{ tcp, udp, sctp }} dnat ip to meta l4proto . th dport map @ports4_any
        meta l4proto {{ tcp, udp, sctp }} dnat ip6 to meta l4proto . th dport map @ports6_any
    }}
    chain filter_forward {{
        type filter hook forward priority filter; policy accept;
        oifname vmap @into
        iifname vmap @outof
    }}
    chain nat_prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        fib daddr type local jump ports
    }}
    chain nat_output {{
        type nat hook output priority -100; policy accept;
        fib daddr type local jump ports
    }}
    chain nat_postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname vmap @nat_into
        iifname vmap @nat_outof
    }}
}}
"""


_SUFFIXES = ("in", "out", "nat_in", "nat_out")
_VMAPS = ("into", "outof", "nat_into", "nat_outof")


def chain_name(net_key: str, suffix: str) -> str:
    """`net_<12 hex>_<suffix>`: nft identifiers cannot be quoted in chain positions."""
    return f"net_{net_key}_{suffix}"


def _q(name: str) -> str:
    return json.dumps(name)  # nft quotes strings like JSON does


def _network_commands(net: NetworkRules) -> str:
    b, k = _q(net.bridge), net.key
    into = ["ct state established,related accept"]
    if not net.internal:
        into.append("ct status dnat accept")  # published ports, hairpin included
    into += [f"iifname {b} {'accept' if net.icc else 'drop'}", "drop"]
    if net.internal:
        outof = [f"oifname != {b} drop"]
    else:
        # replies (a published port reached from Docker's bridge) pass; new connections to
        # Docker's own bridges do not
        outof = [
            "ct state established,related accept",
            'oifname { "docker0", "br-*" } drop',
            "accept",
        ]
    nat_into = ["ip saddr 127.0.0.0/8 masquerade"]
    nat_into += [f"ct status dnat ip saddr {p} masquerade" for p in net.pools4]
    nat_into += [f"ct status dnat ip6 saddr {p} masquerade" for p in net.pools6]
    nat_outof: list[str] = []
    if net.masquerade and not net.internal:
        nat_outof += [f"oifname != {b} ip saddr {p} masquerade" for p in net.pools4]
        nat_outof += [f"oifname != {b} ip6 saddr {p} masquerade" for p in net.pools6]
    lines: list[str] = []
    for suffix, rules in zip(_SUFFIXES, (into, outof, nat_into, nat_outof), strict=True):
        chain = f"inet {TABLE} {chain_name(k, suffix)}"
        lines += [f"add chain {chain}", f"flush chain {chain}"]
        lines += [f"add rule {chain} {rule}" for rule in rules]
    for vmap, suffix in zip(_VMAPS, _SUFFIXES, strict=True):
        lines.append(f"add element inet {TABLE} {vmap} {{ {b} : jump {chain_name(k, suffix)} }}")
    return "\n".join(lines) + "\n"


def _remove_network_commands(net_key: str, bridge: str) -> list[str]:
    b = _q(bridge)
    cmds = [f"delete element inet {TABLE} {vmap} {{ {b} }}" for vmap in _VMAPS]
    cmds += [f"delete chain inet {TABLE} {chain_name(net_key, suffix)}" for suffix in _SUFFIXES]
    return cmds


_PROTO_KEYWORD = {"tcp": "tcp", "udp": "udp", "sctp": "sctp"}


def _port_element(port: PublishedPort, *, with_value: bool) -> tuple[str, str]:
    """(map name, element text) for one published port."""
    proto = _PROTO_KEYWORD[port.proto]
    six = ":" in port.container_ip
    value = f" : {port.container_ip} . {port.container_port}" if with_value else ""
    if six:
        return "ports6_any", f"{proto} . {port.host_port}{value}"
    if port.host_ip:
        return "ports4", f"{port.host_ip} . {proto} . {port.host_port}{value}"
    return "ports4_any", f"{proto} . {port.host_port}{value}"


def _port_commands(ports: Iterable[PublishedPort], verb: str) -> list[str]:
    cmds = []
    for port in ports:
        name, element = _port_element(port, with_value=verb == "add")
        cmds.append(f"{verb} element inet {TABLE} {name} {{ {element} }}")
    return cmds


# --- the API backends use ------------------------------------------------------------------


class Firewall:
    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        # What netplug last made, so that most changes need no listing first (None: unknown
        # until `rebuild`): whether the table exists, and per iptables binary the names (a
        # bridge, or the wildcard) that have accept rules.
        self._table: bool | None = None
        self._accepted: dict[str, set[str]] | None = None

    async def add_network(self, net: NetworkRules) -> None:
        text = _network_commands(net)
        known = self._table

        def add(w: Worker) -> None:
            nft = _nft(w)
            # Listing the table to see whether it exists costs more than the change itself, so
            # it is only done when netplug does not know, or when the change fails (someone
            # removed the table behind netplug's back).
            try:
                if known or _table_exists(nft):
                    nft.run(text)
                    return
            except FirewallError:
                if _table_exists(nft):
                    raise
            nft.run(_SKELETON + text)  # the first network: the table comes with it

        name = accept_name(net.bridge)
        binaries = _IPTABLES if net.pools6 else _IPTABLES[:1]
        missing = [b for b in binaries if self._accepted is None or name not in self._accepted[b]]

        def accept(w: Worker) -> None:
            for binary in missing:
                _iptables_change(binary, add={name})

        # Usually the wildcard is there already, and a network costs no iptables exec at all.
        await together(partial(self.kernel.run, add), partial(self.kernel.run, accept))
        self._table = True
        if self._accepted is not None:
            for binary in missing:
                self._accepted[binary].add(name)

    async def remove_network(self, net_key: str, bridge: str) -> None:
        cmds = _remove_network_commands(net_key, bridge)

        def remove(w: Worker) -> bool:
            nft = _nft(w)
            _run_tolerant(nft, cmds)
            if _table_unused(nft):  # the last network: no table left
                _run_tolerant(nft, [f"delete table inet {TABLE}"])
                return True
            return False

        last = await self.kernel.run(remove)
        self._table = not last
        name = accept_name(bridge)
        if last:  # no netplug network left: no accept rule either
            stale = [b for b in _IPTABLES if self._accepted is None or self._accepted[b]]

            def clear(w: Worker) -> None:
                for binary in stale:
                    _iptables_change(binary, add=set(), keep_only=set())

            await self.kernel.run(clear)
            self._accepted = {binary: set() for binary in _IPTABLES}
        elif name != WILDCARD:
            await self.kernel.run(lambda w: iptables_remove(name))
            if self._accepted is not None:
                for names in self._accepted.values():
                    names.discard(name)

    async def publish(self, ports: list[PublishedPort]) -> None:
        if ports:
            text = "\n".join(_port_commands(ports, "add")) + "\n"
            await self.kernel.run(lambda w: _nft(w).run(text))

    async def unpublish(self, ports: list[PublishedPort]) -> None:
        if ports:
            cmds = _port_commands(ports, "delete")
            await self.kernel.run(lambda w: _run_tolerant(_nft(w), cmds))

    async def rebuild(self, networks: list[NetworkRules], ports: list[PublishedPort]) -> None:
        """Replace the whole table in one transaction, from netplug's records (no networks:
        no table)."""
        text = f"add table inet {TABLE}\ndelete table inet {TABLE}\n"
        if networks or ports:
            text += _SKELETON
        text += "".join(_network_commands(net) for net in networks)
        text += "".join(line + "\n" for line in _port_commands(ports, "add"))
        await self.kernel.run(lambda w: _nft(w).run(text))
        self._table = bool(networks or ports)
        names4 = {accept_name(net.bridge) for net in networks}
        names6 = {accept_name(net.bridge) for net in networks if net.pools6}
        await self.kernel.run(lambda w: iptables_sync(names4, names6))
        self._accepted = {"iptables": names4, "ip6tables": names6}

    async def dump(self) -> dict[str, Any]:
        """The table as nftables JSON (empty when it does not exist)."""

        def list_table(w: Worker) -> dict[str, Any]:
            try:
                out = _nft(w).run(f"list table inet {TABLE}")
            except FirewallError:
                return {}
            data: dict[str, Any] = json.loads(out)
            return data

        return await self.kernel.run(list_table)


def _table_exists(nft: Nft) -> bool:
    try:
        nft.run(f"list table inet {TABLE}")
    except FirewallError:
        return False
    return True


def _table_unused(nft: Nft) -> bool:
    """The table exists and holds no network and no published port."""
    try:
        data = json.loads(nft.run(f"list table inet {TABLE}"))
    except FirewallError:
        return False
    return not any(item["map"].get("elem") for item in data.get("nftables", []) if "map" in item)


def _run_tolerant(nft: Nft, cmds: list[str]) -> None:
    """Run deletions as one transaction; if some object is already gone, run them one by one
    and ignore what is missing (deleting something already gone is success)."""
    if not cmds:
        return
    try:
        nft.run("\n".join(cmds) + "\n")
    except FirewallError:
        for cmd in cmds:
            try:
                nft.run(cmd + "\n")
            except FirewallError as exc:
                log.debug("firewall: %s: %s", cmd, exc)


# --- iptables FORWARD accept rules (coexistence with dockerd's policy DROP) -----------------
#
# Per binary one listing (`-S FORWARD`) and at most one `*-restore --noflush` with all changes:
# two execs instead of one per rule. ip6tables only for networks with IPv6 subnets (without them
# no IPv6 is forwarded through the bridge).

_IPTABLES = ("iptables", "ip6tables")
WILDCARD = BRIDGE_PREFIX + "+"  # iptables' interface wildcard: every name netplug generates


def accept_name(bridge: str) -> str:
    """The name in the accept rules that cover `bridge`."""
    return WILDCARD if OWNED_NAME.match(bridge) and bridge.startswith(BRIDGE_PREFIX) else bridge


def _iptables(
    binary: str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary, "-w", "5", *args] if not binary.endswith("-restore") else [binary, *args],
        capture_output=True,
        text=True,
        input=stdin,
        check=False,
        timeout=30,
    )


def _accept_rules(bridge: str) -> list[str]:
    common = f"-m comment --comment {COMMENT} -j ACCEPT"
    return [f"-A FORWARD -i {bridge} {common}", f"-A FORWARD -o {bridge} {common}"]


def _ours(listing: str) -> dict[str, str]:
    """netplug's rules in a `-S FORWARD` listing: rule text -> bridge."""
    found = {}
    for line in listing.splitlines():
        words = line.split()
        if COMMENT not in words or "--comment" not in words:
            continue
        flag = "-i" if "-i" in words else "-o"
        if flag in words:
            found[line.strip()] = words[words.index(flag) + 1]
    return found


def _iptables_change(
    binary: str, *, add: set[str], keep_only: set[str] | None = None, remove: set[str] | None = None
) -> None:
    """Add the accept rules of the `add` bridges; remove those of `remove`, or (with
    `keep_only`) every netplug rule whose bridge is not in it."""
    if shutil.which(binary) is None:
        return
    listing = _iptables(binary, "-S", "FORWARD")
    if listing.returncode != 0:
        log.warning("%s -S FORWARD: %s", binary, listing.stderr.strip())
        return
    present = _ours(listing.stdout)
    lines = []
    for rule, bridge in present.items():
        gone = (remove is not None and bridge in remove) or (
            keep_only is not None and bridge not in keep_only
        )
        if gone:
            lines.append("-D" + rule[2:])
    for bridge in sorted(add):
        lines += ["-I" + rule[2:] for rule in _accept_rules(bridge) if rule not in present]
    if not lines:
        return
    text = "*filter\n" + "\n".join(lines) + "\nCOMMIT\n"
    result = _iptables(f"{binary}-restore", "--noflush", "-w", "5", stdin=text)
    if result.returncode != 0:
        log.warning("%s-restore: %s", binary, result.stderr.strip())


def iptables_remove(name: str) -> None:
    for binary in _IPTABLES:
        _iptables_change(binary, add=set(), remove={name})


def iptables_sync(bridges4: set[str], bridges6: set[str]) -> None:
    """Exactly the accept rules of these bridges, and no other netplug rule."""
    _iptables_change("iptables", add=bridges4, keep_only=bridges4)
    _iptables_change("ip6tables", add=bridges6, keep_only=bridges6)
