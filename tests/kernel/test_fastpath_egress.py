"""bpf/fastpath_egress.c through BPF_PROG_TEST_RUN: a clone (the ingress program's mark
in the ctx) or a userspace packet in; verdict, exact rewritten bytes, counters, ring
records and subscriber state out.

The expected packet is built from scratch by tests/kernel/packets.py for the
subscriber (addresses, MACs, DCID, wire packet number, translated stream ids, PADDING
where upstream frames were): the program's incremental checksums must equal the
builder's full ones.
"""

from __future__ import annotations

import ctypes
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from relay import bpfload
from relay.fastpath import layout as L
from relay.fastpath.loader import FastPath
from relay.fastpath.reasons import Reason as R
from tests.kernel import packets as P

pytestmark = pytest.mark.root

TC_ACT_UNSPEC = 0xFFFFFFFF
TC_ACT_SHOT = 2

UP_CID = bytes.fromhex("a1a2a3a4a5a6a7a8")
SUB_DCID = bytes.fromhex("c1c2c3c4c5c6c7c8")
ALIAS = 5
UP_SID = 2                                   # publisher (client) uni stream
OTHER_SID, OTHER_ALIAS = 30, 99              # a forwarded track this subscriber did not subscribe to
RELAY_MAC, SUB_MAC = bytes.fromhex("02aa00000001"), bytes.fromhex("02bb00000002")
SUB4, SUB6 = "10.0.9.9", "fd00::9"
SUB_PORT, RELAY_PORT = 60000, 4433
PUB4 = P.Udp(P.IP4_B, P.IP4_A, 50000, RELAY_PORT)   # the clone still has the publisher's headers
PUB6 = P.Udp(P.IP6_B, P.IP6_A, 50000, RELAY_PORT)
TO_SUB4 = P.Udp(P.IP4_A, SUB4, RELAY_PORT, SUB_PORT)
TO_SUB6 = P.Udp(P.IP6_A, SUB6, RELAY_PORT, SUB_PORT)
BIG = 1 << 40


def u32(v: int) -> ctypes.c_uint32:
    return ctypes.c_uint32(v)


@pytest.fixture(scope="module")
def fp() -> Iterator[FastPath]:
    fastpath = FastPath()
    yield fastpath
    fastpath.close()


@dataclass
class Sub:
    """Subscriber 0 (connection 1) as userspace would publish it."""

    family: int = 4
    dcid: bytes = SUB_DCID
    next_pn: int = 100
    largest_acked: int = L.PN_NONE
    next_uni_index: int = 0
    max_streams_uni: int = 100
    max_data: int = BIG
    data_used: int = 0
    initial_max_stream_data: int = BIG
    cwnd: int = BIG
    bytes_in_flight: int = 0
    priority_threshold: int = 255
    protection: int = L.PROT_CLEAR
    key_phase: int = 0
    subscribed: bool = True
    start_group: int = 0
    max_udp_payload: int = 1472
    alias: int = ALIAS                  # the upstream's alias of the track
    sub_alias: int | None = None        # the subscriber's (None: the same)

    def install(self, fp: FastPath, cid_len: int = 8) -> None:
        for name in ("fr_cids", "fr_peers", "fr_tracks", "fr_sub_tracks", "fr_up_streams",
                     "fr_sub_streams"):
            fp.clear(name)
        fp.reset_counters()
        fp.drain()
        fp.update("fr_config", 0, L.FrConfig(host_cid_len=cid_len))
        fp.update("fr_cids", L.cid_key(UP_CID[:cid_len] if cid_len <= 8 else UP_CID + bytes(cid_len - 8)), u32(0))
        fp.update("fr_conns", 0, L.FrConn(role=L.ROLE_UPSTREAM, role_idx=0))
        fp.update("fr_conns", 1, L.FrConn(role=L.ROLE_SUBSCRIBER, role_idx=0,
                                          protection=self.protection, key_phase=self.key_phase))
        v6 = self.family == 6
        to = TO_SUB6 if v6 else TO_SUB4
        import ipaddress
        src = ipaddress.ip_address(to.src).packed
        dst = ipaddress.ip_address(to.dst).packed
        sub = L.FrSub(next_pn=self.next_pn, largest_acked=self.largest_acked,
                      next_uni_index=self.next_uni_index, max_streams_uni=self.max_streams_uni,
                      max_data=self.max_data, data_used=self.data_used,
                      initial_max_stream_data=self.initial_max_stream_data, cwnd=self.cwnd,
                      bytes_in_flight=self.bytes_in_flight, conn_idx=1, ifindex=1,
                      flags=L.SUB_ACTIVE, max_udp_payload=self.max_udp_payload, family=self.family,
                      dcid_len=len(self.dcid), priority_threshold=self.priority_threshold,
                      src_port=int.from_bytes(RELAY_PORT.to_bytes(2, "big"), "little"),
                      dst_port=int.from_bytes(SUB_PORT.to_bytes(2, "big"), "little"))
        ctypes.memmove(sub.dcid, self.dcid, len(self.dcid))
        ctypes.memmove(sub.src_mac, RELAY_MAC, 6)
        ctypes.memmove(sub.dst_mac, SUB_MAC, 6)
        ctypes.memmove(sub.src_addr, src, len(src))
        ctypes.memmove(sub.dst_addr, dst, len(dst))
        fp.update("fr_subs", 0, sub)
        fp.update("fr_peers", L.addr_key(dst, SUB_PORT), u32(1))
        if self.subscribed:
            fp.update("fr_sub_tracks", L.FrSubTrackKey(sub_idx=0, up_idx=0, alias=self.alias),
                      L.FrSubTrack(sub_alias=self.alias if self.sub_alias is None else self.sub_alias,
                                   start_group=self.start_group))
        # what the ingress program learnt from the stream's first frame
        for sid in (UP_SID, UP_SID + 4, UP_SID + 8):
            fp.update("fr_up_streams", L.FrUpStreamKey(up_idx=0, sid=sid),
                      L.FrUpStream(alias=self.alias, flags=L.UPS_FORWARD, priority=7, group=1))
        fp.update("fr_up_streams", L.FrUpStreamKey(up_idx=0, sid=OTHER_SID),
                  L.FrUpStream(alias=OTHER_ALIAS, flags=L.UPS_FORWARD, priority=7))


def head(data: bytes = b"object-0") -> bytes:
    return P.subgroup_header(ALIAS, 1, 7) + data


def clone_run(fp: FastPath, frame: bytes, **ctx) -> bpfload.TestRunResult:
    return bpfload.prog_test_run(fp.egress.fd, frame, ctx=P.skb_ctx(mark=L.clone_mark(0), **ctx))


def sub_state(fp: FastPath) -> L.FrSub:
    return fp.lookup("fr_subs", 0, L.FrSub)


@dataclass
class Case:
    """A clone: upstream payload in, subscriber payload out (None: withheld)."""

    name: str
    payload_in: bytes
    payload_out: bytes | None
    counts: dict[R, int]
    sub: Sub = field(default_factory=Sub)
    pn_len: int = 2
    record: dict | None = None          # expected record fields (kind, reason, frames...)
    cid_len: int = 8


def stream_out(sub_sid: int, data: bytes, **kw) -> bytes:
    return P.stream_frame(sub_sid, data, **kw)


CASES = [
    Case("a stream of a track the subscriber does not get is padded (long frame)",
         P.ping() + P.stream_frame(OTHER_SID, P.subgroup_header(OTHER_ALIAS, 1, 7) + bytes(range(256)) * 2 + b"xyz",
                                   offset=0) + P.stream_frame(UP_SID, head(), offset=0),
         P.ping() + P.padding(len(P.stream_frame(OTHER_SID, P.subgroup_header(OTHER_ALIAS, 1, 7)
                                                 + bytes(range(256)) * 2 + b"xyz", offset=0)))
         + P.stream_frame(3, head(), offset=0),
         {R.EG_SEEN: 1, R.EG_SENT_CLONE: 1}),
    Case("the same at the other checksum parity (no PING before it)",
         P.stream_frame(OTHER_SID, P.subgroup_header(OTHER_ALIAS, 1, 7) + bytes(range(256)) * 2 + b"xyz",
                        offset=0) + P.stream_frame(UP_SID, head(), offset=0),
         P.padding(len(P.stream_frame(OTHER_SID, P.subgroup_header(OTHER_ALIAS, 1, 7)
                                      + bytes(range(256)) * 2 + b"xyz", offset=0)))
         + P.stream_frame(3, head(), offset=0),
         {R.EG_SEEN: 1, R.EG_SENT_CLONE: 1}),
    Case("one STREAM at offset 0: id 2 -> 3, PN from the counter",
         P.stream_frame(UP_SID, head(), offset=0), P.stream_frame(3, head(), offset=0),
         {R.EG_SEEN: 1, R.EG_SENT_CLONE: 1},
         record={"kind": L.REC_SENT_CLONE, "wire_pn": 100, "frames": [(3, UP_SID, 0, len(head()), L.FA_FORWARDED)]}),
    Case("aioquic shape: ACK + MAX_DATA before STREAM become PADDING",
         P.ack(20, first_range=3) + P.max_data(5000) + P.stream_frame(UP_SID, head(), offset=0),
         P.padding(len(P.ack(20, first_range=3) + P.max_data(5000))) + P.stream_frame(3, head(), offset=0),
         {R.EG_SEEN: 1, R.EG_SENT_CLONE: 1}),
    Case("upstream control frames of every kind become PADDING, PING and PADDING stay",
         P.ping() + P.padding(2) + P.ack(900, first_range=2, ranges=((1, 3),), ecn=(1, 2, 3))
         + P.new_connection_id(3, 1, bytes(8)) + P.retire_connection_id(2) + P.max_streams(9)
         + P.stream_frame(UP_SID, head(), offset=0),
         P.ping() + P.padding(2) + P.padding(len(P.ack(900, first_range=2, ranges=((1, 3),), ecn=(1, 2, 3))
                                                 + P.new_connection_id(3, 1, bytes(8))
                                                 + P.retire_connection_id(2) + P.max_streams(9)))
         + P.stream_frame(3, head(), offset=0),
         {R.EG_SEEN: 1, R.EG_SENT_CLONE: 1}),
    Case("two streams in one packet get consecutive subscriber ids",
         P.stream_frame(UP_SID, head(b"a"), offset=0) + P.stream_frame(UP_SID + 4, head(b"b"), offset=0, fin=True),
         P.stream_frame(3, head(b"a"), offset=0) + P.stream_frame(7, head(b"b"), offset=0, fin=True),
         {R.EG_SEEN: 1, R.EG_SENT_CLONE: 1}),
    Case("stream ids keep their width: 8-byte id in place",
         P.stream_frame(UP_SID, head(), offset=0, sid_size=8), P.stream_frame(3, head(), offset=0, sid_size=8),
         {R.EG_SEEN: 1, R.EG_SENT_CLONE: 1}),
    Case("subscriber id space ahead: 2-byte encoding kept",
         P.stream_frame(UP_SID, head(), offset=0, sid_size=2), P.stream_frame(4 * 40 + 3, head(), offset=0, sid_size=2),
         {R.EG_SEEN: 1, R.EG_SENT_CLONE: 1}, Sub(next_uni_index=40)),
    Case("stream id must grow, subscriber's limit unknown: punted",
         P.stream_frame(UP_SID, head(), offset=0), None,
         {R.EG_SEEN: 1, R.PUNT_SID_GROW: 1}, Sub(next_uni_index=20, max_udp_payload=0),
         record={"kind": L.REC_PUNT_CLONE, "reason": R.PUNT_SID_GROW,
                 "frames": [(83, UP_SID, 0, len(head()), L.FA_PUNTED)]}),
    Case("1-byte packet number (quic-go style)", P.stream_frame(UP_SID, head(), offset=0),
         P.stream_frame(3, head(), offset=0), {R.EG_SEEN: 1, R.EG_SENT_CLONE: 1}, Sub(next_pn=5), pn_len=1),
    Case("3-byte packet number", P.stream_frame(UP_SID, head(), offset=0),
         P.stream_frame(3, head(), offset=0), {R.EG_SEEN: 1, R.EG_SENT_CLONE: 1}, Sub(next_pn=70000), pn_len=3),
    Case("4-byte packet number", P.stream_frame(UP_SID, head(), offset=0),
         P.stream_frame(3, head(), offset=0), {R.EG_SEEN: 1, R.EG_SENT_CLONE: 1},
         Sub(next_pn=1 << 24, largest_acked=(1 << 24) - 2), pn_len=4),
    Case("packet number too short for what the subscriber acknowledged, limit unknown: punted",
         P.stream_frame(UP_SID, head(), offset=0), None, {R.EG_SEEN: 1, R.PUNT_PN_GROW: 1},
         Sub(next_pn=200, max_udp_payload=0), pn_len=1),
    Case("largest acked close: 1 byte is enough", P.stream_frame(UP_SID, head(), offset=0),
         P.stream_frame(3, head(), offset=0), {R.EG_SEEN: 1, R.EG_SENT_CLONE: 1},
         Sub(next_pn=1000, largest_acked=990), pn_len=1),
    Case("IPv6", P.stream_frame(UP_SID, head(), offset=0), P.stream_frame(3, head(), offset=0),
         {R.EG_SEEN: 1, R.EG_SENT_CLONE: 1}, Sub(family=6)),
    Case("key phase bit from the connection", P.stream_frame(UP_SID, head(), offset=0),
         P.stream_frame(3, head(), offset=0), {R.EG_SEEN: 1, R.EG_SENT_CLONE: 1}, Sub(key_phase=1)),
    Case("zero-length connection ids", P.stream_frame(UP_SID, head(), offset=0),
         P.stream_frame(3, head(), offset=0), {R.EG_SEEN: 1, R.EG_SENT_CLONE: 1}, Sub(dcid=b""), cid_len=0),
    Case("20-byte connection ids", P.stream_frame(UP_SID, head(), offset=0),
         P.stream_frame(3, head(), offset=0), {R.EG_SEEN: 1, R.EG_SENT_CLONE: 1},
         Sub(dcid=bytes(range(1, 21))), cid_len=20),
    Case("longer subscriber DCID, limit unknown: punted", P.stream_frame(UP_SID, head(), offset=0), None,
         {R.EG_SEEN: 1, R.PUNT_CID_LEN: 1}, Sub(dcid=bytes(12), max_udp_payload=0)),
    Case("IPv4 clone for an IPv6 subscriber: punted", P.stream_frame(UP_SID, head(), offset=0), None,
         {R.EG_SEEN: 1, R.PUNT_FAMILY: 1}, Sub(family=6)),
    Case("no connection credit: punted", P.stream_frame(UP_SID, head(), offset=0), None,
         {R.EG_SEEN: 1, R.PUNT_NO_CREDIT: 1}, Sub(max_data=10)),
    Case("no stream credit: punted, the record lists the range userspace must send",
         P.stream_frame(UP_SID, head(), offset=0), None,
         {R.EG_SEEN: 1, R.PUNT_NO_STREAM_CREDIT: 1}, Sub(initial_max_stream_data=4),
         record={"kind": L.REC_PUNT_CLONE, "reason": R.PUNT_NO_STREAM_CREDIT,
                 "frames": [(3, UP_SID, 0, len(head()), L.FA_PUNTED)]}),
    Case("MAX_STREAMS reached: punted without a subscriber stream id",
         P.stream_frame(UP_SID, head(), offset=0), None,
         {R.EG_SEEN: 1, R.PUNT_NO_MAX_STREAMS: 1}, Sub(max_streams_uni=0),
         record={"kind": L.REC_PUNT_CLONE, "reason": R.PUNT_NO_MAX_STREAMS,
                 "frames": [(L.NO_SUB_SID, UP_SID, 0, len(head()), L.FA_PUNTED)]}),
    Case("congestion punt lists every stream frame of the packet",
         P.stream_frame(UP_SID, head(b"a"), offset=0) + P.stream_frame(UP_SID + 4, head(b"b"), offset=0),
         None, {R.EG_SEEN: 1, R.PUNT_NO_CWND: 1}, Sub(cwnd=10),
         record={"kind": L.REC_PUNT_CLONE, "reason": R.PUNT_NO_CWND,
                 "frames": [(3, UP_SID, 0, len(head(b"a")), L.FA_PUNTED),
                            (7, UP_SID + 4, 0, len(head(b"b")), L.FA_PUNTED)]}),
    Case("congestion window full: punted", P.stream_frame(UP_SID, head(), offset=0), None,
         {R.EG_SEEN: 1, R.PUNT_NO_CWND: 1}, Sub(cwnd=1000, bytes_in_flight=990)),
    Case("keys not installed: punted", P.stream_frame(UP_SID, head(), offset=0), None,
         {R.EG_SEEN: 1, R.PUNT_NO_KEYS: 1}, Sub(protection=L.PROT_OFFLOAD_NOKEYS)),
    Case("protected by userspace: punted", P.stream_frame(UP_SID, head(), offset=0), None,
         {R.EG_SEEN: 1, R.PUNT_PROTECTED: 1}, Sub(protection=L.PROT_USERSPACE)),
    Case("subscriber not on the track: all padded, dropped", P.stream_frame(UP_SID, head(), offset=0), None,
         {R.EG_SEEN: 1, R.EG_DROP_EMPTY: 1}, Sub(subscribed=False)),
    Case("stream of a group before the subscriber's start (served by the relay): padded",
         P.stream_frame(UP_SID, head(), offset=0), None,
         {R.EG_SEEN: 1, R.EG_DROP_EMPTY: 1}, Sub(start_group=2)),
    Case("stream of the subscriber's start group: forwarded",
         P.stream_frame(UP_SID, head(), offset=0), P.stream_frame(3, head(), offset=0),
         {R.EG_SEEN: 1, R.EG_SENT_CLONE: 1}, Sub(start_group=1)),
    Case("priority above the threshold: skipped whole", P.stream_frame(UP_SID, head(), offset=0), None,
         {R.EG_SEEN: 1, R.EG_DROP_EMPTY: 1}, Sub(priority_threshold=3)),
    Case("stream joined late (not from offset 0): padded", P.stream_frame(UP_SID, b"mid", offset=300), None,
         {R.EG_SEEN: 1, R.EG_DROP_EMPTY: 1}),
    Case("DATAGRAM of a subscribed track forwarded as is",
         P.ack(3) + P.datagram(P.object_datagram(ALIAS, 1, 0, 9, b"dg")),
         P.padding(len(P.ack(3))) + P.datagram(P.object_datagram(ALIAS, 1, 0, 9, b"dg")),
         {R.EG_SEEN: 1, R.EG_SENT_CLONE: 1}),
    Case("more stream frames than a record holds: punted",
         b"".join(P.stream_frame(UP_SID + 4 * i, head(), offset=0) for i in range(3)) +
         P.datagram(P.object_datagram(ALIAS, 1, 0, 9, b"a")) + P.datagram(P.object_datagram(ALIAS, 1, 1, 9, b"b")),
         None, {R.EG_SEEN: 1, R.PUNT_RECORD_FRAMES: 1}),
    Case("unknown frame type: punted", P.stream_frame(UP_SID, head(), offset=0) + b"\x40\x77", None,
         {R.EG_SEEN: 1, R.PUNT_FRAME_LIMIT: 1}),
]


def expected_frame(case: Case, out: bytes, wire_pn: int) -> bytes:
    to = TO_SUB6 if case.sub.family == 6 else TO_SUB4
    return to.frame(P.quic_short(case.sub.dcid, wire_pn, out, pn_len=case.pn_len,
                                 key_phase=case.sub.key_phase),
                    src_mac=RELAY_MAC, dst_mac=SUB_MAC)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_clone(fp: FastPath, case: Case) -> None:
    case.sub.install(fp, case.cid_len)
    pub = PUB6 if (case.sub.family == 6) != ("IPv4 clone" in case.name) else PUB4
    up_cid = UP_CID[:case.cid_len] if case.cid_len <= 8 else UP_CID + bytes(case.cid_len - 8)
    frame = pub.frame(P.quic_short(up_cid, 7, case.payload_in, pn_len=case.pn_len))
    before = sub_state(fp)
    res = clone_run(fp, frame)
    got = {r: n for r, (n, _) in fp.counters().items()}
    assert got == case.counts, case.name
    assert P.skb_ctx_field(res.ctx, "mark") == 0, "the clone's mark is cleared"
    records = fp.drain()
    after = sub_state(fp)
    if case.payload_out is None:
        assert res.retval == TC_ACT_SHOT
        assert after.bytes_in_flight == before.bytes_in_flight
        # New bytes of a punted copy were handed out (userspace sends them): credit used.
        handed_out = sum(f.length for r in records for f in list(r.frames)[:r.n_frames]
                         if f.type < 0x30 and f.sub_sid != L.NO_SUB_SID)
        assert after.data_used - before.data_used == handed_out, case.name
        if R.EG_DROP_EMPTY in case.counts:
            assert records == []
    else:
        assert res.retval == TC_ACT_UNSPEC
        want = expected_frame(case, case.payload_out, before.next_pn)
        assert res.data.hex() == want.hex()
        to = TO_SUB6 if case.sub.family == 6 else TO_SUB4
        assert to.udp_checksum_ok(res.data)
        if case.sub.family == 4:
            assert P.ipv4_header_ok(res.data)
        assert after.next_pn == before.next_pn + 1
        assert after.bytes_in_flight == before.bytes_in_flight + len(to.payload(want))
        assert len(records) == 1
        rec = records[0]
        assert (rec.kind, rec.reason, rec.sub_idx, rec.conn_idx, rec.up_idx, rec.wire_pn, rec.pn_len,
                rec.size) == (L.REC_SENT_CLONE, 0, 0, 1, 0, before.next_pn, case.pn_len,
                              len(to.payload(want)))
        assert rec.ts_ns > 0
        forwarded = sum(rec.frames[i].length for i in range(rec.n_frames) if rec.frames[i].type < 0x30)
        assert after.data_used == before.data_used + forwarded
    if case.record:
        rec = records[0]
        for key, value in case.record.items():
            if key == "frames":
                got_frames = [(f.sub_sid, f.up_sid, f.offset, f.length, f.action)
                              for f in list(rec.frames)[:rec.n_frames]]
                assert got_frames == value
            else:
                assert getattr(rec, key) == value, key


def test_retransmission_is_padded(fp: FastPath) -> None:
    """A publisher retransmission of a range already handed out is not sent again."""
    Sub().install(fp)
    frame = PUB4.frame(P.quic_short(UP_CID, 7, P.stream_frame(UP_SID, head(), offset=0)))
    assert clone_run(fp, frame).retval == TC_ACT_UNSPEC
    ss = fp.lookup("fr_sub_streams", L.FrSubStreamKey(sub_idx=0, up_idx=0, up_sid=UP_SID), L.FrSubStream)
    assert (ss.sub_sid, ss.next_offset) == (3, len(head()))
    fp.reset_counters()
    fp.drain()
    again = PUB4.frame(P.quic_short(UP_CID, 8, P.stream_frame(UP_SID, head(), offset=0)
                                    + P.stream_frame(UP_SID, b"next", offset=len(head()))))
    res = clone_run(fp, again)
    assert res.retval == TC_ACT_UNSPEC
    want = TO_SUB4.frame(P.quic_short(SUB_DCID, 101, P.padding(len(P.stream_frame(UP_SID, head(), offset=0)))
                                      + P.stream_frame(3, b"next", offset=len(head()))),
                         src_mac=RELAY_MAC, dst_mac=SUB_MAC)
    assert res.data.hex() == want.hex()
    [rec] = fp.drain()
    assert [(f.sub_sid, f.offset, f.length) for f in list(rec.frames)[:rec.n_frames]] == [(3, len(head()), 4)]


def test_userspace_packets_renumbered(fp: FastPath) -> None:
    """aioquic's 1-RTT packets to the subscriber take the next PN of the same counter."""
    Sub(next_pn=500).install(fp)
    built = TO_SUB4.frame(P.quic_short(SUB_DCID, 0x1234, P.stream_frame(1, b"ctl") + P.padding(3)))
    res = bpfload.prog_test_run(fp.egress.fd, built, ctx=P.skb_ctx())
    assert res.retval == TC_ACT_UNSPEC
    want = TO_SUB4.frame(P.quic_short(SUB_DCID, 500, P.stream_frame(1, b"ctl") + P.padding(3)))
    assert res.data.hex() == want.hex()
    [rec] = fp.drain()
    assert (rec.kind, rec.wire_pn, rec.built_pn, rec.pn_len, rec.sub_idx, rec.conn_idx) == \
        (L.REC_SENT_USER, 500, 0x1234, 2, 0, 1)
    # a clone after it continues the same space
    clone = PUB4.frame(P.quic_short(UP_CID, 7, P.stream_frame(UP_SID, head(), offset=0)))
    clone_run(fp, clone)
    [rec] = fp.drain()
    assert rec.wire_pn == 501 and sub_state(fp).next_pn == 502
    assert {r: n for r, (n, _) in fp.counters().items()} == \
        {R.EG_SEEN: 2, R.EG_RENUMBERED: 1, R.EG_SENT_CLONE: 1}


@pytest.mark.parametrize("name,frame,setup,verdict,reason", [
    ("long header passes", TO_SUB4.frame(P.quic_long(SUB_DCID, UP_CID)), {}, TC_ACT_UNSPEC, R.EG_PASS_LONG_HEADER),
    ("unknown peer passes", P.Udp(P.IP4_A, "10.9.9.9", RELAY_PORT, 1).frame(P.quic_short(SUB_DCID, 1, P.ping())),
     {}, TC_ACT_UNSPEC, R.EG_PASS_NOT_OURS),
    ("offloaded without keys: dropped", TO_SUB4.frame(P.quic_short(SUB_DCID, 1, P.ping())),
     {"protection": L.PROT_OFFLOAD_NOKEYS}, TC_ACT_SHOT, R.EG_DROP_NO_KEYS),
    ("protected by userspace: untouched", TO_SUB4.frame(P.quic_short(SUB_DCID, 1, P.ping())),
     {"protection": L.PROT_USERSPACE}, TC_ACT_UNSPEC, R.EG_PASS_PROTECTED),
    ("PN does not fit: dropped and reported", TO_SUB4.frame(P.quic_short(SUB_DCID, 1, P.ping(), pn_len=1)),
     {"next_pn": 300}, TC_ACT_SHOT, R.PUNT_USER_PN_GROW),
])
def test_userspace_edges(fp: FastPath, name: str, frame: bytes, setup: dict, verdict: int, reason: R) -> None:
    Sub(**setup).install(fp)
    res = bpfload.prog_test_run(fp.egress.fd, frame, ctx=P.skb_ctx())
    assert res.retval == verdict, name
    if verdict == TC_ACT_UNSPEC:
        assert res.data == frame
    assert {r: n for r, (n, _) in fp.counters().items()} == {R.EG_SEEN: 1, reason: 1}, name


def test_offloaded_subscriber_gets_the_shim_verdict(fp: FastPath) -> None:
    Sub(protection=L.PROT_OFFLOAD_KEYS).install(fp)
    frame = PUB4.frame(P.quic_short(UP_CID, 7, P.stream_frame(UP_SID, head(), offset=0)))
    res = clone_run(fp, frame)
    assert res.retval == TC_ACT_UNSPEC
    cb = [P.skb_ctx_field(res.ctx, "cb", i) for i in range(5)]
    assert cb == [L.CB_MAGIC | L.CB_PROTECT | L.CB_CLONE | L.CB_HAVE_PN, 1,
                  TO_SUB4.payload_offset | (8 << 16) | (2 << 24), 100, 0]


def test_truncated_and_random_clones_never_sent_malformed(fp: FastPath) -> None:
    rng = random.Random(7)
    Sub().install(fp)
    base = PUB4.frame(P.quic_short(UP_CID, 7, P.ack(5) + P.stream_frame(UP_SID, head(), offset=0)))
    for cut in range(PUB4.l4_offset, len(base)):
        res = clone_run(fp, base[:cut])
        assert res.retval == TC_ACT_SHOT, f"cut at {cut}"
    quic = P.quic_short(UP_CID, 7, P.ack(5) + P.stream_frame(UP_SID, head(), offset=0))
    for i in range(300):
        Sub().install(fp)
        mutated = bytearray(quic)
        for _ in range(rng.randint(1, 6)):      # frames only: the headers stay valid
            j = rng.randrange(1 + 8 + 2, len(mutated))
            mutated[j] = rng.randrange(256)
        frame = PUB4.frame(bytes(mutated))      # a correct checksum going in
        res = clone_run(fp, frame)
        if res.retval != TC_ACT_SHOT:
            assert TO_SUB4.udp_checksum_ok(res.data), f"mutation {i}"
            assert P.ipv4_header_ok(res.data), f"mutation {i}"


def test_packets_to_an_upstream_keep_their_numbers(fp: FastPath) -> None:
    """Our packets to the publisher are not renumbered; with offloaded crypto the shim gets
    its verdict with the publisher's CID length."""
    Sub().install(fp)
    pub_addr = ipaddress_packed(P.IP4_B)
    fp.update("fr_peers", L.addr_key(pub_addr, 50000), u32(0))
    fp.update("fr_conns", 0, L.FrConn(role=L.ROLE_UPSTREAM, role_idx=0, protection=L.PROT_OFFLOAD_KEYS,
                                      tag_len=16, peer_cid_len=5))
    to_pub = P.Udp(P.IP4_A, P.IP4_B, RELAY_PORT, 50000)
    frame = to_pub.frame(P.quic_short(b"\x07" * 5, 9, P.ack(4) + bytes(16)))
    res = bpfload.prog_test_run(fp.egress.fd, frame, ctx=P.skb_ctx())
    assert res.retval == TC_ACT_UNSPEC and res.data == frame
    cb = [P.skb_ctx_field(res.ctx, "cb", i) for i in range(3)]
    assert cb == [L.CB_MAGIC | L.CB_PROTECT, 0, to_pub.payload_offset | (5 << 16) | (2 << 24)]
    assert {r: n for r, (n, _) in fp.counters().items()} == {R.EG_SEEN: 1, R.EG_PASS_UPSTREAM: 1}
    assert fp.drain() == []


def ipaddress_packed(addr: str) -> bytes:
    import ipaddress

    return ipaddress.ip_address(addr).packed
