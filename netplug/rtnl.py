"""The rtnetlink requests on netplug's hot paths, packed with `struct` on a plain socket.

pyroute2 builds and parses every message through its generic marshal: a request that the
kernel answers in ~10 µs costs ~0.85 ms of Python on a small VM (bench/README.md). An endpoint
needs only requests whose answer is an ack (create a veth, delete a link, set a port flag) or
one integer (a link's index), so those few messages are written out here, each next to the
kernel structure it fills (`linux/rtnetlink.h`, `linux/if_link.h`). Everything that reads the
kernel's state in bulk (dumps for restore, garbage collection and status) stays with pyroute2.

One `Rtnl` per thread, like pyroute2's `IPRoute`: requests on one socket are answered in order.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import struct

import msgspec

# message types and flags (linux/netlink.h, linux/rtnetlink.h)
NLMSG_ERROR = 2
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_SETLINK = 16, 17, 18, 19
RTM_NEWADDR, RTM_DELADDR = 20, 21
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_EXCL, NLM_F_CREATE = 0x200, 0x400
SOL_NETLINK = 270
NETLINK_CAP_ACK, NETLINK_EXT_ACK = 10, 11
# in an error message's flags: the request's payload left out, extended-ack attributes follow
NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200
NLMSGERR_ATTR_MSG = 1
NLA_F_NESTED = 0x8000

# attributes (linux/if_link.h, linux/if_addr.h)
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_MASTER = 1, 3, 4, 10
IFLA_PROTINFO, IFLA_LINKINFO, IFLA_AF_SPEC, IFLA_EXT_MASK = 12, 18, 26, 29
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VETH_INFO_PEER = 1
IFLA_BRPORT_MODE, IFLA_BRPORT_ISOLATED = 4, 33
IFLA_INET_CONF = 1
RTEXT_FILTER_SKIP_STATS = 1 << 3
IFA_ADDRESS, IFA_LOCAL, IFA_BROADCAST, IFA_FLAGS = 1, 2, 4, 8
IFA_F_NODAD = 0x2
IFF_UP = 0x1
AF_BRIDGE = 7

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, port
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBi")  # ifaddrmsg: family, prefixlen, flags, scope, index
_ATTR = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_ERRNO = struct.Struct("=i")


class Link(msgspec.Struct, frozen=True):
    """What netplug reads of a link."""

    index: int
    name: str
    kind: str  # "" for links without IFLA_LINKINFO (physical ones)
    master: int
    mtu: int
    mac: str
    up: bool


def _text(value: memoryview | None) -> str:
    return bytes(value).rstrip(b"\0").decode() if value is not None else ""


class RtnlError(OSError):
    """The kernel refused a request: `errno` as the kernel gave it, `strerror` its words
    (the extended ack when the kernel sent one)."""


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute: length, type, payload, padded to 4 bytes."""
    length = 4 + len(payload)
    return _ATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def nested(kind: int, *children: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(children))


def string(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def u32(kind: int, value: int) -> bytes:
    return attr(kind, _U32.pack(value))


def u8(kind: int, value: int) -> bytes:
    return attr(kind, bytes((value,)))


def hwaddr(kind: int, value: str) -> bytes:
    return attr(kind, bytes.fromhex(value.replace(":", "")))


def ifinfo(*, family: int = socket.AF_UNSPEC, index: int = 0, up: bool | None = None) -> bytes:
    """An ifinfomsg; `up` True/False changes IFF_UP, None leaves the flags alone."""
    flags = IFF_UP if up else 0
    change = IFF_UP if up is not None else 0
    return _IFINFO.pack(family, 0, index, flags, change)


def parse_attrs(data: bytes | memoryview, offset: int = 0) -> dict[int, memoryview]:
    """The attributes of one level, by type (flags stripped); later duplicates win."""
    view = memoryview(data)
    out: dict[int, memoryview] = {}
    while offset + 4 <= len(view):
        length, kind = _ATTR.unpack_from(view, offset)
        if length < 4:
            break
        out[kind & 0x3FFF] = view[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return out


class Rtnl:
    """A NETLINK_ROUTE socket for single requests. Not thread-safe: one per thread."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self._sock.bind((0, 0))
        for option in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
            with contextlib.suppress(OSError):  # older kernels: plain acks, errno only
                self._sock.setsockopt(SOL_NETLINK, option, 1)
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def request(self, kind: int, flags: int, body: bytes) -> bytes:
        """Send one request and return the kernel's answer (b"" for a bare ack)."""
        self._seq += 1
        seq = self._seq
        self._sock.send(_HEADER.pack(16 + len(body), kind, flags | NLM_F_REQUEST, seq, 0) + body)
        while True:
            reply = self._sock.recv(1 << 16)
            offset = 0
            while offset + 16 <= len(reply):
                length, rtype, rflags, rseq, _ = _HEADER.unpack_from(reply, offset)
                message = reply[offset : offset + length]
                offset += (length + 3) & ~3
                if rseq != seq or length < 16:
                    continue  # an answer to an earlier request that gave up
                if rtype != NLMSG_ERROR:
                    return message[16:]
                (code,) = _ERRNO.unpack_from(message, 16)
                if code == 0:
                    return b""
                raise _error(-code, message, rflags)

    # --- links -----------------------------------------------------------------------------

    def link_index(self, name: str) -> int:
        """The index of link `name` (RtnlError ENODEV when there is none)."""
        body = ifinfo() + string(IFLA_IFNAME, name) + u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)
        reply = self.request(RTM_GETLINK, 0, body)
        index: int = _IFINFO.unpack_from(reply, 0)[2]
        return index

    def link(self, name: str) -> Link | None:
        """What netplug needs to know of link `name`, or None when there is none."""
        body = ifinfo() + string(IFLA_IFNAME, name) + u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)
        try:
            reply = self.request(RTM_GETLINK, 0, body)
        except RtnlError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise
        _, _, index, flags, _ = _IFINFO.unpack_from(reply, 0)
        attrs = parse_attrs(reply, _IFINFO.size)
        linkinfo = parse_attrs(attrs[IFLA_LINKINFO]) if IFLA_LINKINFO in attrs else {}
        return Link(
            index=index,
            name=_text(attrs.get(IFLA_IFNAME)),
            kind=_text(linkinfo.get(IFLA_INFO_KIND)),
            master=_U32.unpack(attrs[IFLA_MASTER])[0] if IFLA_MASTER in attrs else 0,
            mtu=_U32.unpack(attrs[IFLA_MTU])[0] if IFLA_MTU in attrs else 0,
            mac=bytes(attrs.get(IFLA_ADDRESS, b"")).hex(":"),
            up=bool(flags & IFF_UP),
        )

    def add_bridge(self, name: str, *, mtu: int | None, mac: str) -> None:
        body = (
            ifinfo()
            + string(IFLA_IFNAME, name)
            + hwaddr(IFLA_ADDRESS, mac)
            + (u32(IFLA_MTU, mtu) if mtu else b"")
            + nested(IFLA_LINKINFO, string(IFLA_INFO_KIND, "bridge"))
        )
        self.request(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body)

    def set_link(self, index: int, *, up: bool | None = None, mtu: int | None = None) -> None:
        body = ifinfo(index=index, up=up) + (u32(IFLA_MTU, mtu) if mtu else b"")
        self.request(RTM_NEWLINK, NLM_F_ACK, body)

    def address(self, add: bool, index: int, cidr: str) -> None:
        """Add or delete an address (`10.0.0.1/24`, `fd00::1/64`). IPv4 gets the subnet's
        broadcast address, as Docker's bridge has; IPv6 skips duplicate address detection,
        so the address is usable at once."""
        interface = ipaddress.ip_interface(cidr)
        ip = interface.ip.packed
        if interface.version == 4:
            family, flags = socket.AF_INET, 0
            attrs = attr(IFA_LOCAL, ip) + attr(IFA_ADDRESS, ip)
            if add and interface.network.prefixlen < 31:
                attrs += attr(IFA_BROADCAST, interface.network.broadcast_address.packed)
        else:
            family, flags = socket.AF_INET6, IFA_F_NODAD
            attrs = attr(IFA_ADDRESS, ip) + u32(IFA_FLAGS, flags)
        header = _IFADDR.pack(family, interface.network.prefixlen, flags & 0xFF, 0, index)
        if add:
            self.request(RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, header + attrs)
        else:
            self.request(RTM_DELADDR, NLM_F_ACK, header + attrs)

    def add_veth(
        self, host: str, peer: str, *, master: int, mtu: int | None, peer_mac: str
    ) -> None:
        """The pair in one message: the host end on `master` and up, MTU on both ends."""
        mtu_attr = u32(IFLA_MTU, mtu) if mtu else b""
        peer_info = ifinfo() + string(IFLA_IFNAME, peer) + hwaddr(IFLA_ADDRESS, peer_mac) + mtu_attr
        linkinfo = nested(
            IFLA_LINKINFO,
            string(IFLA_INFO_KIND, "veth"),
            nested(IFLA_INFO_DATA, nested(VETH_INFO_PEER, peer_info)),
        )
        body = (
            ifinfo(up=True)
            + string(IFLA_IFNAME, host)
            + u32(IFLA_MASTER, master)
            + mtu_attr
            + linkinfo
        )
        self.request(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body)

    def delete_link(self, name: str) -> None:
        """Delete a link by name (one end of a veth takes the pair with it)."""
        self.request(RTM_DELLINK, NLM_F_ACK, ifinfo() + string(IFLA_IFNAME, name))

    def set_bridge_port(self, index: int, *, hairpin: bool | None, isolated: bool | None) -> None:
        flags = b""
        if hairpin is not None:
            flags += u8(IFLA_BRPORT_MODE, int(hairpin))
        if isolated is not None:
            flags += u8(IFLA_BRPORT_ISOLATED, int(isolated))
        body = ifinfo(family=AF_BRIDGE, index=index) + nested(IFLA_PROTINFO, flags)
        self.request(RTM_SETLINK, NLM_F_ACK, body)

    def set_ipv4_conf(self, index: int, key: int, value: int) -> None:
        """One `net.ipv4.conf.<link>.*` value, settable with CAP_NET_ADMIN even where /proc/sys
        is read-only (inside a managed plugin)."""
        conf = nested(socket.AF_INET, nested(IFLA_INET_CONF, u32(key, value)))
        self.request(RTM_SETLINK, NLM_F_ACK, ifinfo(index=index) + nested(IFLA_AF_SPEC, conf))


def _error(code: int, message: bytes, flags: int) -> RtnlError:
    text = os.strerror(code)
    if flags & NLM_F_ACK_TLVS:
        # nlmsgerr: errno, then the request's header (its payload is capped by NETLINK_CAP_ACK)
        (orig_length,) = _U32.unpack_from(message, 20)
        skip = 16 if flags & NLM_F_CAPPED else orig_length
        tlvs = parse_attrs(message, 20 + ((skip + 3) & ~3))
        if NLMSGERR_ATTR_MSG in tlvs:
            said = bytes(tlvs[NLMSGERR_ATTR_MSG]).rstrip(b"\0").decode(errors="replace")
            text = f"{said} ({text})" if said else text
    return RtnlError(code, text)
