"""Crafted packets for kernel-program tests: Ethernet / IPv4 or IPv6 / UDP around a payload.

One builder and one set of constants for every tests/kernel/ module (never hand-typed
hex, except RFC vectors). Checksums are computed here and can be checked on a program's
output with `udp_checksum_ok`.
"""

from __future__ import annotations

import struct

from relay.frames import (  # noqa: F401  (the builder lives with the product; re-exported)
    ETH_HLEN,
    ETH_P_IP,
    ETH_P_IPV6,
    IPPROTO_UDP,
    IPV4_HLEN,
    IPV6_HLEN,
    MAC_A,
    MAC_B,
    UDP_HLEN,
    Udp,
    internet_checksum,
)

IP4_A, IP4_B = "10.0.0.1", "10.0.0.2"
IP6_A, IP6_B = "fd00::1", "fd00::2"
PORT_A, PORT_B = 4433, 50000


# --- QUIC (RFC 9000) short headers and frames, MoQT data headers -------------------------


def varint(value: int, size: int | None = None) -> bytes:
    """RFC 9000 §16 varint; size forces a (possibly non-minimal) width of 1, 2, 4 or 8."""
    if size is None:
        size = 1 if value < 1 << 6 else 2 if value < 1 << 14 else 4 if value < 1 << 30 else 8
    if size not in (1, 2, 4, 8) or value >= 1 << (8 * size - 2):
        raise ValueError(f"{value} does not fit a {size}-byte varint")
    prefix = {1: 0, 2: 1, 4: 2, 8: 3}[size] << (8 * size - 2)
    return (prefix | value).to_bytes(size, "big")


def quic_short(dcid: bytes, pn: int, payload: bytes, *, pn_len: int = 2, key_phase: int = 0,
               spin: int = 0) -> bytes:
    """A 1-RTT packet in plaintext layout (no header protection, no tag): RFC 9000 §17.3.1."""
    first = 0x40 | (spin << 5) | (key_phase << 2) | (pn_len - 1)
    return bytes([first]) + dcid + (pn & ((1 << (8 * pn_len)) - 1)).to_bytes(pn_len, "big") + payload


def quic_long(dcid: bytes, scid: bytes, payload: bytes = b"\x00" * 20) -> bytes:
    """An Initial-shaped long header (version 1, no token, 1-byte PN): enough for demux tests."""
    body = b"\x00" + payload
    return (bytes([0xC0]) + (1).to_bytes(4, "big") + bytes([len(dcid)]) + dcid
            + bytes([len(scid)]) + scid + varint(0) + varint(len(body), 2) + body)


def stream_frame(sid: int, data: bytes, *, offset: int | None = None, fin: bool = False,
                 length: bool = True, sid_size: int | None = None) -> bytes:
    """STREAM (0x08..0x0f): offset None leaves the OFF bit clear (offset 0)."""
    t = 0x08 | (0x04 if offset is not None else 0) | (0x02 if length else 0) | (1 if fin else 0)
    out = bytes([t]) + varint(sid, sid_size)
    if offset is not None:
        out += varint(offset)
    if length:
        out += varint(len(data))
    return out + data


def padding(n: int) -> bytes:
    return bytes(n)


def ping() -> bytes:
    return b"\x01"


def ack(largest: int, *, delay: int = 0, first_range: int = 0,
        ranges: tuple[tuple[int, int], ...] = (), ecn: tuple[int, int, int] | None = None) -> bytes:
    out = bytes([0x03 if ecn else 0x02]) + varint(largest) + varint(delay) + varint(len(ranges))
    out += varint(first_range)
    for gap, rng in ranges:
        out += varint(gap) + varint(rng)
    if ecn:
        out += b"".join(varint(c) for c in ecn)
    return out


def max_data(value: int) -> bytes:
    return b"\x10" + varint(value)


def max_stream_data(sid: int, value: int) -> bytes:
    return b"\x11" + varint(sid) + varint(value)


def max_streams(value: int, *, uni: bool = True) -> bytes:
    return (b"\x13" if uni else b"\x12") + varint(value)


def new_connection_id(seq: int, retire_prior_to: int, cid: bytes, token: bytes = bytes(16)) -> bytes:
    return b"\x18" + varint(seq) + varint(retire_prior_to) + bytes([len(cid)]) + cid + token


def retire_connection_id(seq: int) -> bytes:
    return b"\x19" + varint(seq)


def datagram(data: bytes, *, length: bool = True) -> bytes:
    return (b"\x31" + varint(len(data)) if length else b"\x30") + data


def connection_close(error: int, reason: bytes = b"", *, frame_type: int = 0) -> bytes:
    return b"\x1c" + varint(error) + varint(frame_type) + varint(len(reason)) + reason


def subgroup_header(alias: int, group: int, priority: int, *, type_: int = 0x10,
                    subgroup: int | None = None) -> bytes:
    """MoQT draft-14 SUBGROUP_HEADER (the first bytes of a subgroup stream)."""
    out = varint(type_) + varint(alias) + varint(group)
    if (type_ & 0x6) == 0x4:
        out += varint(subgroup or 0)
    return out + bytes([priority])


def object_datagram(alias: int, group: int, object_id: int, priority: int, payload: bytes) -> bytes:
    """MoQT draft-14 OBJECT_DATAGRAM, type 0x00 (object id present, no extensions)."""
    return varint(0x00) + varint(alias) + varint(group) + varint(object_id) + bytes([priority]) + payload


def ipv4_header_ok(frame: bytes) -> bool:
    """True when the IPv4 header checksum of an Ethernet/IPv4 frame verifies."""
    return internet_checksum(frame[ETH_HLEN:ETH_HLEN + IPV4_HLEN]) == 0


def ipv4_variant(frame: bytes, *, options: bytes = b"", frag_off: int | None = None) -> bytes:
    """An Ethernet/IPv4 frame built by Udp.frame with IPv4 `options` (a multiple of 4 bytes,
    at most 40) after its 20-byte header and/or another flags-and-fragment-offset field;
    IHL, total length and header checksum fixed. The UDP checksum stays right: neither is
    in the pseudo-header."""
    if len(options) % 4 or len(options) > 40:
        raise ValueError(f"{len(options)} bytes of IPv4 options")
    ip = bytearray(frame[ETH_HLEN:ETH_HLEN + IPV4_HLEN] + options)
    ip[0] = 0x40 | (len(ip) // 4)
    struct.pack_into("!H", ip, 2, struct.unpack_from("!H", ip, 2)[0] + len(options))
    if frag_off is not None:
        struct.pack_into("!H", ip, 6, frag_off)
    struct.pack_into("!H", ip, 10, 0)
    struct.pack_into("!H", ip, 10, internet_checksum(bytes(ip)))
    return frame[:ETH_HLEN] + bytes(ip) + frame[ETH_HLEN + IPV4_HLEN:]


# --- struct __sk_buff as BPF_PROG_TEST_RUN's ctx (uapi/linux/bpf.h) --------------------------

SKB_CTX_SIZE = 192
_SKB_OFF = {"mark": 8, "priority": 32, "ingress_ifindex": 36, "ifindex": 40, "cb": 48,
            "tstamp": 152, "wire_len": 160, "gso_segs": 164, "gso_size": 176}


def skb_ctx(*, mark: int = 0, ifindex: int = 0, cb: tuple[int, ...] = (), gso_segs: int = 0,
            gso_size: int = 0) -> bytes:
    """The fields BPF_PROG_TEST_RUN lets a test set (as in the kernel selftests' skb_ctx)."""
    buf = bytearray(SKB_CTX_SIZE)
    struct.pack_into("<I", buf, _SKB_OFF["mark"], mark)
    struct.pack_into("<I", buf, _SKB_OFF["ifindex"], ifindex)
    for i, v in enumerate(cb):
        struct.pack_into("<I", buf, _SKB_OFF["cb"] + 4 * i, v)
    struct.pack_into("<I", buf, _SKB_OFF["gso_segs"], gso_segs)
    struct.pack_into("<I", buf, _SKB_OFF["gso_size"], gso_size)
    return bytes(buf)


def skb_ctx_field(ctx: bytes, name: str, index: int = 0) -> int:
    return struct.unpack_from("<I", ctx, _SKB_OFF[name] + 4 * index)[0]
