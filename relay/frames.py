"""Crafted Ethernet / IPv4 or IPv6 / UDP frames around a payload, checksums computed: what
BPF_PROG_TEST_RUN is fed (the bench's shim cost, the kernel tests through tests/kernel/packets.py)."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

ETH_HLEN = 14
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
IPPROTO_UDP = 17
IPV4_HLEN = 20
IPV6_HLEN = 40
UDP_HLEN = 8

MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def internet_checksum(data: bytes) -> int:
    """RFC 1071 one's-complement checksum."""
    return ~_sum16(data) & 0xFFFF


@dataclass(frozen=True)
class Udp:
    """A UDP datagram between (src, sport) and (dst, dport), IPv4 or IPv6 by the addresses."""

    src: str
    dst: str
    sport: int
    dport: int

    @property
    def ipv6(self) -> bool:
        return ipaddress.ip_address(self.src).version == 6

    @property
    def l4_offset(self) -> int:
        return ETH_HLEN + (IPV6_HLEN if self.ipv6 else IPV4_HLEN)

    @property
    def payload_offset(self) -> int:
        return self.l4_offset + UDP_HLEN

    def _pseudo(self, udp_len: int) -> bytes:
        src = ipaddress.ip_address(self.src).packed
        dst = ipaddress.ip_address(self.dst).packed
        if self.ipv6:
            return src + dst + struct.pack("!I3xB", udp_len, IPPROTO_UDP)
        return src + dst + struct.pack("!xBH", IPPROTO_UDP, udp_len)

    def frame(self, payload: bytes, *, checksum: bool = True, src_mac: bytes = MAC_A,
              dst_mac: bytes = MAC_B) -> bytes:
        """The Ethernet frame carrying payload (UDP checksum computed unless checksum=False)."""
        udp_len = UDP_HLEN + len(payload)
        csum = 0
        if checksum:
            csum = internet_checksum(
                self._pseudo(udp_len) + struct.pack("!HHHH", self.sport, self.dport, udp_len, 0)
                + payload) or 0xFFFF
        udp = struct.pack("!HHHH", self.sport, self.dport, udp_len, csum)
        src = ipaddress.ip_address(self.src).packed
        dst = ipaddress.ip_address(self.dst).packed
        if self.ipv6:
            ip = struct.pack("!IHBB", 6 << 28, udp_len, IPPROTO_UDP, 64) + src + dst
            eth_type = ETH_P_IPV6
        else:
            header = struct.pack("!BBHHHBBH", 0x45, 0, IPV4_HLEN + udp_len, 0, 0x4000, 64,
                                 IPPROTO_UDP, 0) + src + dst
            ip = header[:10] + struct.pack("!H", internet_checksum(header)) + header[12:]
            eth_type = ETH_P_IP
        return dst_mac + src_mac + struct.pack("!H", eth_type) + ip + udp + payload

    def payload(self, frame: bytes) -> bytes:
        """The UDP payload of a frame built by frame()."""
        (udp_len,) = struct.unpack_from("!H", frame, self.l4_offset + 4)
        return frame[self.payload_offset:self.l4_offset + udp_len]

    def udp_checksum_ok(self, frame: bytes) -> bool:
        """True when the frame's UDP checksum verifies (IPv4: 0 means none and passes)."""
        (udp_len, csum) = struct.unpack_from("!HH", frame, self.l4_offset + 4)
        if csum == 0 and not self.ipv6:
            return True
        datagram = frame[self.l4_offset:self.l4_offset + udp_len]
        return _sum16(self._pseudo(udp_len) + datagram) == 0xFFFF

    def reversed(self) -> Udp:
        return Udp(self.dst, self.src, self.dport, self.sport)
