"""bpf/fastpath_ingress.c through BPF_PROG_TEST_RUN: crafted packet in, verdict, output
bytes (always the input: the original goes up unchanged), counters and map state out.

BPF_PROG_TEST_RUN cannot deliver a clone to another device's egress program, so clones
go to the loopback device (ifindex 1, no filter there) and are counted; the clone's
rewrite is tested in test_fastpath_egress.py with the clone's mark as ctx. A subscriber
on a missing ifindex exercises the clone-error count.
"""

from __future__ import annotations

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
LO = 1
NO_SUCH_IFINDEX = 0x7FFFFFF0

UP_CID = bytes.fromhex("a1a2a3a4a5a6a7a8")
SUB_CID = bytes.fromhex("b1b2b3b4b5b6b7b8")
ALIAS = 5
PUB = P.Udp(P.IP4_B, P.IP4_A, 50000, 4433)       # publisher -> relay
PUB6 = P.Udp(P.IP6_B, P.IP6_A, 50000, 4433)
UP_SID = 2                                          # publisher (client) uni stream


@pytest.fixture(scope="module")
def fp() -> Iterator[FastPath]:
    fastpath = FastPath()
    yield fastpath
    fastpath.close()


def _reset(fp: FastPath) -> None:
    for name in ("fr_cids", "fr_peers", "fr_tracks", "fr_sub_tracks", "fr_up_streams",
                 "fr_sub_streams"):
        fp.clear(name)
    for name, cls in (("fr_conns", L.FrConn), ("fr_subs", L.FrSub)):
        for i in range(4):
            fp.update(name, i, cls())
    fp.update("fr_upstreams", 0, fp.Upstream())
    fp.reset_counters()
    fp.drain()


@dataclass
class World:
    """Map state: one upstream connection (conn 0, upstream 0) with subscribers."""

    subs: list[int] = field(default_factory=lambda: [LO, LO, LO])   # ifindex per subscriber
    listed: int | None = None          # n_subs written (default len(subs))
    inactive: tuple[int, ...] = ()
    protection: int = L.PROT_CLEAR
    tag_len: int = 0
    track_forward: bool = True
    cid_len: int = 8

    def install(self, fp: FastPath) -> None:
        _reset(fp)
        fp.update("fr_config", 0, L.FrConfig(host_cid_len=self.cid_len))
        fp.update("fr_cids", L.cid_key(UP_CID[:self.cid_len]), _U32(0))
        fp.update("fr_conns", 0, L.FrConn(role=L.ROLE_UPSTREAM, protection=self.protection,
                                          tag_len=self.tag_len, role_idx=0))
        if self.cid_len:     # with 0-byte CIDs one connection owns the empty key
            fp.update("fr_cids", L.cid_key(SUB_CID[:self.cid_len]), _U32(1))
        fp.update("fr_conns", 1, L.FrConn(role=L.ROLE_SUBSCRIBER, role_idx=0))
        up = fp.Upstream(n_subs=len(self.subs) if self.listed is None else self.listed)
        for i in range(fp.caps.max_subscribers_per_upstream):
            up.subs[i] = i if i < len(self.subs) else 999   # 999: a slot never filled
        fp.update("fr_upstreams", 0, up)
        for i, ifindex in enumerate(self.subs[:16]):
            fp.update("fr_subs", i, L.FrSub(ifindex=ifindex, conn_idx=1,
                                            flags=0 if i in self.inactive else L.SUB_ACTIVE))
        if self.track_forward:
            fp.update("fr_tracks", L.FrTrackKey(up_idx=0, alias=ALIAS), L.FrTrack(flags=L.TRACK_FORWARD))


def _U32(v: int):
    import ctypes

    return ctypes.c_uint32(v)


def stream0(data: bytes = b"object-0", *, sid: int = UP_SID, priority: int = 7) -> bytes:
    return P.stream_frame(sid, P.subgroup_header(ALIAS, 1, priority) + data, offset=0)


def pkt(payload: bytes, *, udp: P.Udp = PUB, cid: bytes = UP_CID, pn: int = 7, pn_len: int = 2) -> bytes:
    return udp.frame(P.quic_short(cid, pn, payload, pn_len=pn_len))


@dataclass
class Case:
    name: str
    frame: bytes
    counts: dict[R, int]
    world: World = field(default_factory=World)
    ctx: dict = field(default_factory=dict)


CASES = [
    Case("stream at offset 0 of a forwarded track: one clone per subscriber",
         pkt(stream0()), {R.IN_SEEN: 1, R.IN_CLONED: 1, R.IN_CLONE: 3}),
    Case("IPv6", pkt(stream0(), udp=PUB6), {R.IN_SEEN: 1, R.IN_CLONED: 1, R.IN_CLONE: 3}),
    Case("aioquic shape: ACK then STREAM", pkt(P.ack(20, first_range=3) + stream0()),
         {R.IN_SEEN: 1, R.IN_CLONED: 1, R.IN_CLONE: 3}),
    Case("quic-go shape: PADDING first, 1-byte PN", pkt(P.padding(3) + stream0(), pn_len=1),
         {R.IN_SEEN: 1, R.IN_CLONED: 1, R.IN_CLONE: 3}),
    Case("several frames: ACK-ECN with ranges, MAX_DATA, NEW_CONNECTION_ID, STREAM, PADDING",
         pkt(P.ack(900, first_range=2, ranges=((1, 3), (4, 5)), ecn=(1, 2, 3)) + P.max_data(1 << 20)
             + P.new_connection_id(3, 1, bytes(8)) + stream0() + P.padding(20)),
         {R.IN_SEEN: 1, R.IN_CLONED: 1, R.IN_CLONE: 3}),
    Case("STREAM without length bit (runs to the end)",
         pkt(P.ping() + P.stream_frame(UP_SID, P.subgroup_header(ALIAS, 1, 7) + b"x", offset=0,
                                       length=False)),
         {R.IN_SEEN: 1, R.IN_CLONED: 1, R.IN_CLONE: 3}),
    Case("object DATAGRAM of a forwarded track", pkt(P.datagram(P.object_datagram(ALIAS, 1, 0, 9, b"d"))),
         {R.IN_SEEN: 1, R.IN_CLONED: 1, R.IN_CLONE: 3}),
    Case("track not forwarded", pkt(stream0()), {R.IN_SEEN: 1, R.IN_PASS_NOT_FORWARDED: 1},
         World(track_forward=False)),
    Case("unknown stream, not at offset 0 (joined late)",
         pkt(P.stream_frame(UP_SID, b"middle", offset=100)), {R.IN_SEEN: 1, R.IN_PASS_NOT_FORWARDED: 1}),
    Case("control frames only", pkt(P.ack(3) + P.max_data(10)), {R.IN_SEEN: 1, R.IN_PASS_NOT_FORWARDED: 1}),
    Case("long header", PUB.frame(P.quic_long(UP_CID, SUB_CID)), {R.IN_SEEN: 1, R.IN_PASS_LONG_HEADER: 1}),
    # The shim parses past IPv4 options (it must protect such packets); the fast path does not
    # forward them, even verified (parse.h, FR_PARSE_IPV4_OPTIONS).
    Case("IPv4 options, verified by the shim", P.ipv4_variant(pkt(stream0() + bytes(16)), options=bytes([1, 1, 1, 0])),
         {R.IN_SEEN: 1, R.IN_PASS_IP_OPTIONS: 1}, World(protection=L.PROT_OFFLOAD_KEYS, tag_len=16),
         ctx={"cb": (L.CB_MAGIC | L.CB_VERIFIED, 0)}),
    Case("IPv4 fragment", P.ipv4_variant(pkt(stream0()), frag_off=0x2000), {R.IN_SEEN: 1, R.IN_PASS_FRAGMENT: 1}),
    Case("unknown DCID", pkt(stream0(), cid=bytes(8)), {R.IN_SEEN: 1, R.IN_PASS_UNKNOWN_CID: 1}),
    Case("a subscriber's packet", pkt(stream0(), cid=SUB_CID), {R.IN_SEEN: 1, R.IN_PASS_NOT_UPSTREAM: 1}),
    Case("GSO super-packet", pkt(stream0()), {R.IN_SEEN: 1, R.IN_PASS_GSO: 1}, ctx={"gso_segs": 2, "gso_size": 1000}),
    Case("unknown frame type", pkt(b"\x40\x99" + stream0()), {R.IN_SEEN: 1, R.IN_PASS_FRAME_LIMIT: 1}),
    Case("frame runs past the payload", pkt(P.stream_frame(UP_SID, b"abc", offset=0)[:-1]),
         {R.IN_SEEN: 1, R.IN_PASS_BAD_FRAME: 1}),
    Case("more frames than MAX_FRAMES", pkt(P.ping() * 30 + stream0()), {R.IN_SEEN: 1, R.IN_PASS_FRAME_LIMIT: 1}),
    Case("inactive subscriber skipped", pkt(stream0()),
         {R.IN_SEEN: 1, R.IN_CLONED: 1, R.IN_CLONE: 2, R.IN_SUB_SKIPPED: 1}, World(inactive=(1,))),
    Case("clone to a missing device counted", pkt(stream0()),
         {R.IN_SEEN: 1, R.IN_CLONED: 1, R.IN_CLONE: 1, R.IN_CLONE_ERR: 1}, World(subs=[LO, NO_SUCH_IFINDEX])),
    Case("subscriber list longer than the kernel serves", pkt(stream0()),
         {R.IN_SEEN: 1, R.IN_CLONED: 1, R.IN_CLONE: 16, R.IN_SUB_SKIPPED: 48, R.IN_FANOUT_LIMIT: 1},
         World(subs=[LO] * 16, listed=70)),
    Case("offloaded upstream without the shim's verdict", pkt(stream0()),
         {R.IN_SEEN: 1, R.IN_PASS_NOT_VERIFIED: 1}, World(protection=L.PROT_OFFLOAD_KEYS, tag_len=16)),
    Case("offloaded upstream, verdict for another connection", pkt(stream0() + bytes(16)),
         {R.IN_SEEN: 1, R.IN_PASS_NOT_VERIFIED: 1}, World(protection=L.PROT_OFFLOAD_KEYS, tag_len=16),
         ctx={"cb": (L.CB_MAGIC | L.CB_VERIFIED, 9)}),
    Case("offloaded upstream, verified by the shim (tag slot not walked)", pkt(stream0() + b"\xff" * 16),
         {R.IN_SEEN: 1, R.IN_CLONED: 1, R.IN_CLONE: 3}, World(protection=L.PROT_OFFLOAD_KEYS, tag_len=16),
         ctx={"cb": (L.CB_MAGIC | L.CB_VERIFIED, 0)}),
    Case("upstream protected by userspace", pkt(stream0()), {R.IN_SEEN: 1, R.IN_PASS_PROTECTED: 1},
         World(protection=L.PROT_USERSPACE)),
    Case("zero-length connection ids", pkt(stream0(), cid=b""), {R.IN_SEEN: 1, R.IN_CLONED: 1, R.IN_CLONE: 3},
         World(cid_len=0)),
    Case("20-byte connection ids", pkt(stream0(), cid=UP_CID + bytes(12)),
         {R.IN_SEEN: 1, R.IN_CLONED: 1, R.IN_CLONE: 3}, World(cid_len=20)),
]


def _run(fp: FastPath, frame: bytes, **ctx) -> bpfload.TestRunResult:
    return bpfload.prog_test_run(fp.ingress.fd, frame, ctx=P.skb_ctx(**ctx))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_ingress(fp: FastPath, case: Case) -> None:
    world = case.world
    world.install(fp)
    if world.cid_len == 20:
        fp.update("fr_cids", L.cid_key(UP_CID + bytes(12)), _U32(0))
    res = _run(fp, case.frame, mark=0x1234, **case.ctx)
    assert res.retval == TC_ACT_UNSPEC, case.name
    assert res.data == case.frame, f"{case.name}: the original must go up unchanged"
    assert P.skb_ctx_field(res.ctx, "mark") == 0x1234, f"{case.name}: mark restored"
    got = {r: n for r, (n, _) in fp.counters().items()}
    assert got == case.counts, case.name


def test_stream_learnt_at_offset_0(fp: FastPath) -> None:
    World().install(fp)
    _run(fp, pkt(stream0(priority=42)))
    us = fp.lookup("fr_up_streams", L.FrUpStreamKey(up_idx=0, sid=UP_SID), L.FrUpStream)
    assert (us.alias, us.flags, us.priority, us.group) == (ALIAS, L.UPS_FORWARD, 42, 1)
    # later frames of that stream are forwarded by the entry, whatever their offset
    fp.reset_counters()
    _run(fp, pkt(P.stream_frame(UP_SID, b"more", offset=500)))
    assert fp.counters()[R.IN_CLONE][0] == 3


def test_truncated_at_every_boundary_goes_up_untouched(fp: FastPath) -> None:
    World().install(fp)
    for udp in (PUB, PUB6):
        full = pkt(P.ack(3) + stream0(), udp=udp)
        # BPF_PROG_TEST_RUN itself refuses frames shorter than the IP header their
        # EtherType announces (EINVAL), so cuts start at the UDP header.
        for cut in range(udp.l4_offset, len(full)):
            fp.reset_counters()
            res = _run(fp, full[:cut])
            assert res.retval == TC_ACT_UNSPEC
            assert res.data == full[:cut]
            assert R.IN_CLONE not in fp.counters(), f"cut at {cut} was cloned"


def test_random_bytes_never_cloned(fp: FastPath) -> None:
    World().install(fp)
    rng = random.Random(5)
    base = pkt(P.ack(3) + stream0())
    for _ in range(300):
        frame = bytearray(base)
        hdr = PUB.payload_offset + 1 + 8 + 2     # mutate only the frames: the headers stay valid
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(hdr, len(frame))
            frame[i] = rng.randrange(256)
        res = _run(fp, bytes(frame))
        assert res.retval == TC_ACT_UNSPEC and res.data == bytes(frame)
    for _ in range(200):
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
        res = _run(fp, junk) if len(junk) >= 14 else None
        if res is not None:
            assert res.retval == TC_ACT_UNSPEC and res.data == junk
