"""The fast path on real veths in the namespace lab: one UDP datagram shaped like a QUIC
short-header packet, sent by pub1 to the relay, reaches the relay's socket unchanged and
every subscriber's socket rewritten for it (addresses, ports, DCID, PN, stream id);
the senders' TX checksum offload is off, so every UDP checksum is a full one that the
receivers verify (Udp InCsumErrors stays 0).
"""

from __future__ import annotations

import socket

import pytest

from hw.lab import Lab
from hw.topology import loads_topology
from relay.fastpath.controller import FastPathController, SubscriberPath
from relay.fastpath.loader import FastPath
from relay.fastpath.reasons import Reason as R
from tests.kernel import packets as P

pytestmark = pytest.mark.root

TOPOLOGY = """
name = "fplive"
[addressing]
ipv4 = "10.210.0.0/16"
ipv6 = "fd00:fa58::/48"
[[host]]
name = "pub1"
role = "publisher"
[[host]]
name = "relay"
role = "relay"
[[host]]
name = "sub"
role = "subscriber"
count = 3
[[link]]
hosts = ["relay", "pub1"]
tx_checksum = false
[[link]]
hosts = ["relay", "sub"]
tx_checksum = false
"""
UP_CID = bytes.fromhex("a1a2a3a4a5a6a7a8")
ALIAS = 3
RELAY_PORT, SUB_PORT, PUB_PORT = 4433, 50001, 50000


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _csum_errors(lab: Lab, host: str, family: int) -> int:
    if family == 4:
        out = lab.run(host, ["cat", "/proc/net/snmp"], capture_output=True, text=True, check=True).stdout
        udp = [line.split() for line in out.splitlines() if line.startswith("Udp:")]
        return int(udp[1][udp[0].index("InCsumErrors")])
    out = lab.run(host, ["cat", "/proc/net/snmp6"], capture_output=True, text=True, check=True).stdout
    return int(dict(line.split() for line in out.splitlines() if line.strip())["Udp6InCsumErrors"])


@pytest.mark.parametrize("family", [4, 6])
def test_one_packet_cloned_to_every_subscriber(family: int) -> None:
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    with Lab.up(loads_topology(TOPOLOGY, source="fplive")) as lab:
        fp = FastPath()
        try:
            ctl = FastPathController(fp, host_cid_len=8)
            up = ctl.add_upstream([UP_CID])
            ctl.forward_track(up, ALIAS)
            subs = {}
            for i, name in enumerate(lab.subscribers):
                path = SubscriberPath(local=(lab.address("relay", name, family), RELAY_PORT),
                                      peer=(lab.address(name, "relay", family), SUB_PORT),
                                      ifindex=lab.ifindex("relay", name),
                                      src_mac=_mac(lab.mac("relay", name)),
                                      dst_mac=_mac(lab.mac(name, "relay")),
                                      dcid=bytes([0xd0 + i]) * 8)
                sub = ctl.add_subscriber(up, path, max_data=1 << 30, max_streams_uni=100,
                                         initial_max_stream_data=1 << 20, cwnd=1 << 20)
                ctl.subscribe_track(sub, ALIAS)
                subs[name] = (sub, path)
                fp.attach(lab.ifindex("relay", name), netns=lab.netns("relay"), ingress=False)
            fp.attach(lab.ifindex("relay", "pub1"), netns=lab.netns("relay"), egress=False)
            fp.reset_counters()

            relay_sock = lab.socket("relay", af)
            relay_sock.bind((lab.address("relay", "pub1", family), RELAY_PORT))
            sub_socks = {}
            for name in lab.subscribers:
                s = lab.socket(name, af)
                s.bind((lab.address(name, "relay", family), SUB_PORT))
                s.settimeout(3)
                sub_socks[name] = s
            relay_sock.settimeout(3)
            pub = lab.socket("pub1", af)
            pub.bind((lab.address("pub1", "relay", family), PUB_PORT))

            data = P.subgroup_header(ALIAS, 1, 5) + b"live object " * 20
            original = P.quic_short(UP_CID, 1234, P.ack(10) + P.stream_frame(2, data, offset=0))
            pub.sendto(original, (lab.address("relay", "pub1", family), RELAY_PORT))

            got, src = relay_sock.recvfrom(4096)
            assert got == original and src[:2] == (lab.address("pub1", "relay", family), PUB_PORT)
            for i, name in enumerate(lab.subscribers):
                got, src = sub_socks[name].recvfrom(4096)
                sub, path = subs[name]
                want = P.quic_short(path.dcid, 0, P.padding(len(P.ack(10))) + P.stream_frame(3, data, offset=0))
                assert got == want, name
                assert src[:2] == (lab.address("relay", name, family), RELAY_PORT), name
                assert _csum_errors(lab, name, family) == 0, name
            counts = {r: n for r, (n, _) in fp.counters().items()}
            assert counts[R.IN_CLONE] == 3 and counts[R.EG_SENT_CLONE] == 3
            records = fp.drain()
            assert sorted(ctl.translate(r)[0] for r in records) == sorted(s.sub_idx for s, _ in subs.values())
        finally:
            fp.close()
