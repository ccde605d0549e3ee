"""bpf/fastpath_egress.c, clones whose fields change size or content for the subscriber:
track aliases rewritten in place (subgroup header at offset 0, OBJECT_DATAGRAM), and the
packet resized in place where the subscriber's packet number needs more bytes, a stream
id a wider varint, or its DCID another length, within fr_sub.max_udp_payload.

Same method as test_fastpath_egress.py: the expected packet is built from scratch by
tests/kernel/packets.py (lengths, IPv4 header and UDP checksums computed in full), so
the program's resize and incremental checksums must equal it byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from relay.fastpath import layout as L
from relay.fastpath.loader import FastPath
from relay.fastpath.reasons import Reason as R
from tests.kernel import packets as P
from tests.kernel.test_fastpath_egress import (
    ALIAS,
    OTHER_ALIAS,
    OTHER_SID,
    PUB4,
    PUB6,
    RELAY_MAC,
    SUB_DCID,
    SUB_MAC,
    TC_ACT_SHOT,
    TC_ACT_UNSPEC,
    TO_SUB4,
    TO_SUB6,
    UP_CID,
    UP_SID,
    Sub,
    clone_run,
    sub_state,
)

pytestmark = pytest.mark.root

SENT = {R.EG_SEEN: 1, R.EG_SENT_CLONE: 1}
RESIZED = {R.EG_SEEN: 1, R.EG_SENT_CLONE: 1, R.EG_RESIZED: 1}


@pytest.fixture(scope="module")
def fp() -> Iterator[FastPath]:
    fastpath = FastPath()
    yield fastpath
    fastpath.close()


def head(alias: int = ALIAS, data: bytes = b"object-0") -> bytes:
    return P.subgroup_header(alias, 1, 7) + data


def up_cid(n: int) -> bytes:
    return (UP_CID * 3)[:n]


@dataclass
class Case:
    """A clone: upstream payload in; subscriber payload out (None: withheld)."""

    name: str
    payload_in: bytes
    payload_out: bytes | None
    counts: dict[R, int]
    sub: Sub = field(default_factory=Sub)
    pn_len: int = 2                     # the publisher's
    pn_len_out: int | None = None       # on the subscriber's copy (None: the same)
    cid_len: int = 8                    # the upstream's (host) CID length
    frames: list[tuple[int, int, int, int]] | None = None   # (sub_sid, up_sid, offset, action)


def stream(sid: int, data: bytes, **kw) -> bytes:
    return P.stream_frame(sid, data, offset=0, **kw)


def dg(alias: int, payload: bytes = b"dg") -> bytes:
    return P.datagram(P.object_datagram(alias, 1, 0, 9, payload))


CASES = [
    # --- 1. track alias rewrite, in place ------------------------------------------------
    Case("alias 1-byte: 5 -> 9 in the subgroup header at offset 0",
         stream(UP_SID, head(5)), stream(3, head(9)), SENT, Sub(alias=5, sub_alias=9)),
    Case("alias 2-byte: 300 -> 16000",
         stream(UP_SID, head(300)), stream(3, head(16000)), SENT, Sub(alias=300, sub_alias=16000)),
    Case("alias 4-byte: 20000 -> 2^29 + 7",
         stream(UP_SID, head(20000)), stream(3, head((1 << 29) + 7)), SENT,
         Sub(alias=20000, sub_alias=(1 << 29) + 7)),
    Case("alias rewritten behind a padded ACK, with the stream id",
         P.ack(20, first_range=3) + stream(UP_SID, head(5)),
         P.padding(len(P.ack(20, first_range=3))) + stream(3, head(9)), SENT, Sub(alias=5, sub_alias=9)),
    Case("alias of the second stream in a packet too",
         stream(UP_SID, head(5, b"a")) + stream(UP_SID + 4, head(5, b"b")),
         stream(3, head(9, b"a")) + stream(7, head(9, b"b")), SENT, Sub(alias=5, sub_alias=9)),
    Case("alias wider than the upstream's: punted",
         stream(UP_SID, head(5)), None, {R.EG_SEEN: 1, R.PUNT_ALIAS_WIDTH: 1},
         Sub(alias=5, sub_alias=100), frames=[(3, UP_SID, 0, L.FA_PUNTED)]),
    Case("a later frame of the stream is not touched (no header there)",
         P.stream_frame(UP_SID, b"\x05\x05\x05", offset=len(head())), None,
         {R.EG_SEEN: 1, R.EG_DROP_EMPTY: 1}, Sub(alias=5, sub_alias=9)),
    Case("OBJECT_DATAGRAM of the track: alias rewritten",
         P.ack(3) + dg(5), P.padding(len(P.ack(3))) + dg(9), SENT, Sub(alias=5, sub_alias=9)),
    Case("OBJECT_DATAGRAM, 2-byte alias",
         dg(300), dg(16000), SENT, Sub(alias=300, sub_alias=16000)),
    Case("OBJECT_DATAGRAM alias that does not fit: punted",
         dg(5), None, {R.EG_SEEN: 1, R.PUNT_ALIAS_WIDTH: 1}, Sub(alias=5, sub_alias=100)),
    # --- 2. packet number grows ---------------------------------------------------------
    Case("PN 1 -> 2 bytes (+1, and a PADDING byte)",
         stream(UP_SID, head()), P.padding(1) + stream(3, head()), RESIZED,
         Sub(next_pn=200), pn_len=1, pn_len_out=2),
    Case("PN 2 -> 4 bytes (+2)",
         stream(UP_SID, head()), stream(3, head()), RESIZED,
         Sub(next_pn=1 << 23), pn_len=2, pn_len_out=4),
    Case("PN 1 -> 4 bytes (+3, and a PADDING byte)",
         stream(UP_SID, head()), P.padding(1) + stream(3, head()), RESIZED,
         Sub(next_pn=1 << 23), pn_len=1, pn_len_out=4),
    Case("PN 2 -> 3 bytes, IPv6",
         stream(UP_SID, head()), P.padding(1) + stream(3, head()), RESIZED,
         Sub(family=6, next_pn=40000), pn_len=2, pn_len_out=3),
    Case("PN 1 -> 2 bytes behind ACK and PING, a frame of another track padded",
         P.ack(5) + P.ping() + stream(OTHER_SID, P.subgroup_header(OTHER_ALIAS, 1, 7) + b"x" * 40)
         + stream(UP_SID, head()),
         P.padding(1) + P.padding(len(P.ack(5))) + P.ping()
         + P.padding(len(stream(OTHER_SID, P.subgroup_header(OTHER_ALIAS, 1, 7) + b"x" * 40)))
         + stream(3, head()), RESIZED, Sub(next_pn=200), pn_len=1, pn_len_out=2),
    Case("PN needs more than 4 bytes: punted",
         stream(UP_SID, head()), None, {R.EG_SEEN: 1, R.PUNT_PN_GROW: 1},
         Sub(next_pn=1 << 32), pn_len=4),
    # --- 2. stream ids grow -------------------------------------------------------------
    Case("SID 1 -> 2 bytes (a PADDING byte before the frame)",
         stream(UP_SID, head()), P.padding(1) + stream(83, head(), sid_size=2), RESIZED,
         Sub(next_uni_index=20), frames=[(83, UP_SID, 0, L.FA_FORWARDED)]),
    Case("SID 2 -> 4 bytes",
         stream(UP_SID, head(), sid_size=2), stream(4 * 5000 + 3, head(), sid_size=4), RESIZED,
         Sub(next_uni_index=5000, max_streams_uni=1 << 40)),
    Case("SID 1 -> 4 bytes, IPv6",
         stream(UP_SID, head()), P.padding(1) + stream(4 * 5000 + 3, head(), sid_size=4), RESIZED,
         Sub(family=6, next_uni_index=5000, max_streams_uni=1 << 40)),
    Case("SID 4 -> 8 bytes",
         stream(UP_SID, head(), sid_size=4), stream(4 * (1 << 28) + 3, head(), sid_size=8), RESIZED,
         Sub(next_uni_index=1 << 28, max_streams_uni=1 << 40)),
    Case("two streams, both ids grow 1 -> 2, the second behind the first's data",
         stream(UP_SID, head(data=b"a" * 100)) + stream(UP_SID + 4, head(data=b"b"), fin=True),
         P.padding(1) + stream(83, head(data=b"a" * 100), sid_size=2)
         + P.padding(1) + stream(87, head(data=b"b"), sid_size=2, fin=True), RESIZED,
         Sub(next_uni_index=20), frames=[(83, UP_SID, 0, L.FA_FORWARDED), (87, UP_SID + 4, 0, L.FA_FORWARDED)]),
    Case("second stream id grows 1 -> 2, the first stays 1 byte",
         stream(UP_SID, head(data=b"a" * 30)) + stream(UP_SID + 4, head(data=b"b")),
         stream(63, head(data=b"a" * 30)) + P.padding(1) + stream(67, head(data=b"b"), sid_size=2),
         RESIZED, Sub(next_uni_index=15)),
    Case("growing stream id past FR_GROW_MAX_HEAD: punted",
         stream(UP_SID, head(data=b"a" * 600)) + stream(UP_SID + 4, head(data=b"b")), None,
         {R.EG_SEEN: 1, R.PUNT_SID_GROW: 1}, Sub(next_uni_index=15)),
    # --- 2. DCID length changes ---------------------------------------------------------
    Case("DCID 8 -> 0", stream(UP_SID, head()), stream(3, head()), RESIZED, Sub(dcid=b"")),
    Case("DCID 8 -> 4", stream(UP_SID, head()), stream(3, head()), RESIZED, Sub(dcid=bytes.fromhex("d1d2d3d4"))),
    Case("DCID 8 -> 20", stream(UP_SID, head()), stream(3, head()), RESIZED, Sub(dcid=bytes(range(1, 21)))),
    Case("DCID 0 -> 8", stream(UP_SID, head()), stream(3, head()), RESIZED, Sub(), cid_len=0),
    Case("DCID 8 -> 5 (odd: a PADDING byte)", stream(UP_SID, head()), P.padding(1) + stream(3, head()),
         RESIZED, Sub(dcid=bytes.fromhex("e1e2e3e4e5"))),
    Case("DCID 8 -> 0, IPv6", stream(UP_SID, head()), stream(3, head()), RESIZED, Sub(family=6, dcid=b"")),
    Case("DCID 8 -> 20, IPv6", stream(UP_SID, head()), stream(3, head()), RESIZED,
         Sub(family=6, dcid=bytes(range(1, 21)))),
    Case("DCID 0 -> 8, IPv6", stream(UP_SID, head()), stream(3, head()), RESIZED, Sub(family=6), cid_len=0),
    # --- 2. everything at once ----------------------------------------------------------
    Case("DCID 8 -> 20, PN 1 -> 2, SID 1 -> 2, alias 5 -> 9, ACK padded",
         P.ack(9) + stream(UP_SID, head(5)),
         P.padding(1) + P.padding(len(P.ack(9))) + P.padding(1) + stream(83, head(9), sid_size=2), RESIZED,
         Sub(dcid=bytes(range(1, 21)), next_pn=200, next_uni_index=20, alias=5, sub_alias=9),
         pn_len=1, pn_len_out=2),
    Case("DCID 8 -> 4 and PN 2 -> 4 cancel out (no room changed)",
         stream(UP_SID, head()), stream(3, head()), RESIZED,
         Sub(dcid=bytes.fromhex("d1d2d3d4"), next_pn=1 << 23), pn_len=2, pn_len_out=4),
    Case("IPv6: DCID 8 -> 0, PN 1 -> 2, two SIDs 1 -> 2, DATAGRAM alias",
         stream(UP_SID, head(data=b"a" * 50)) + stream(UP_SID + 4, head(data=b"b")) + dg(ALIAS),
         P.padding(1) + P.padding(1) + stream(83, head(data=b"a" * 50), sid_size=2)
         + P.padding(1) + stream(87, head(data=b"b"), sid_size=2) + dg(ALIAS), RESIZED,
         Sub(family=6, dcid=b"", next_pn=200, next_uni_index=20), pn_len=1, pn_len_out=2),
    # --- 2. the subscriber's limit ------------------------------------------------------
    Case("limit unknown (0): growth punted",
         stream(UP_SID, head()), None, {R.EG_SEEN: 1, R.PUNT_CID_LEN: 1},
         Sub(dcid=bytes(range(1, 21)), max_udp_payload=0)),
    Case("limit unknown (0): DCID 8 -> 6 but PN 1 -> 4, punted for the PN",
         stream(UP_SID, head()), None, {R.EG_SEEN: 1, R.PUNT_PN_GROW: 1},
         Sub(dcid=bytes(6), next_pn=1 << 23, max_udp_payload=0), pn_len=1),
    Case("limit unknown (0): DCID 8 -> 6 but a stream id 1 -> 4, punted for the stream id",
         stream(UP_SID, head()), None, {R.EG_SEEN: 1, R.PUNT_SID_GROW: 1},
         Sub(dcid=bytes(6), next_uni_index=5000, max_streams_uni=1 << 40, max_udp_payload=0)),
    Case("limit unknown (0): a shrink needs no limit",
         stream(UP_SID, head()), stream(3, head()), RESIZED, Sub(dcid=b"", max_udp_payload=0)),
]


def expected(case: Case, out: bytes, wire_pn: int) -> bytes:
    to = TO_SUB6 if case.sub.family == 6 else TO_SUB4
    return to.frame(P.quic_short(case.sub.dcid, wire_pn, out, pn_len=case.pn_len_out or case.pn_len,
                                 key_phase=case.sub.key_phase), src_mac=RELAY_MAC, dst_mac=SUB_MAC)


def run(fp: FastPath, case: Case, method: str = "head"):
    case.sub.install(fp, case.cid_len)
    if method == "tail":
        fp.update("fr_config", 0, L.FrConfig(host_cid_len=case.cid_len, flags=L.CFG_RESIZE_AT_TAIL))
    pub = PUB6 if case.sub.family == 6 else PUB4
    frame = pub.frame(P.quic_short(up_cid(case.cid_len), 7, case.payload_in, pn_len=case.pn_len))
    before = sub_state(fp)
    res = clone_run(fp, frame)
    counts = {r: n for r, (n, _) in fp.counters().items()}
    return res, counts, fp.drain(), before, sub_state(fp)


@pytest.mark.parametrize("method", ["head", "tail"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_clone(fp: FastPath, case: Case, method: str) -> None:
    """Every case with room made behind the IP header (the head moves) and at the end
    (the tail moves, as for CHECKSUM_PARTIAL clones: fr_config FR_CFG_RESIZE_AT_TAIL)."""
    res, counts, records, before, after = run(fp, case, method)
    assert counts == case.counts
    to = TO_SUB6 if case.sub.family == 6 else TO_SUB4
    if case.payload_out is None:
        assert res.retval == TC_ACT_SHOT
        assert after.bytes_in_flight == before.bytes_in_flight
        if R.EG_DROP_EMPTY not in case.counts:
            [rec] = records
            assert (rec.kind, rec.reason) == (L.REC_PUNT_CLONE, next(r for r in case.counts if r.is_punt))
    else:
        assert res.retval == TC_ACT_UNSPEC
        want = expected(case, case.payload_out, before.next_pn)
        assert res.data.hex() == want.hex()
        assert to.udp_checksum_ok(res.data)
        if case.sub.family == 4:
            assert P.ipv4_header_ok(res.data)
        size = len(to.payload(want))
        assert after.bytes_in_flight == before.bytes_in_flight + size
        assert after.next_pn == before.next_pn + 1
        [rec] = records
        assert (rec.kind, rec.reason, rec.wire_pn, rec.pn_len, rec.size) == \
            (L.REC_SENT_CLONE, 0, before.next_pn, case.pn_len_out or case.pn_len, size)
    if case.frames is not None:
        [rec] = records
        assert [(f.sub_sid, f.up_sid, f.offset, f.action) for f in list(rec.frames)[:rec.n_frames]] \
            == case.frames


def _grown_size(case: Case) -> int:
    to = TO_SUB6 if case.sub.family == 6 else TO_SUB4
    return len(to.payload(expected(case, case.payload_out, 0)))


LIMIT_CASES = [
    Case("PN 1 -> 2", stream(UP_SID, head(data=b"z" * 900)), P.padding(1) + stream(3, head(data=b"z" * 900)),
         RESIZED, Sub(next_pn=200), pn_len=1, pn_len_out=2),
    Case("SID 1 -> 2, IPv6", stream(UP_SID, head(data=b"z" * 900)),
         P.padding(1) + stream(83, head(data=b"z" * 900), sid_size=2), RESIZED, Sub(family=6, next_uni_index=20)),
    Case("DCID 8 -> 20", stream(UP_SID, head(data=b"z" * 900)), stream(3, head(data=b"z" * 900)), RESIZED,
         Sub(dcid=bytes(range(1, 21)))),
]
LIMIT_REASON = {"PN 1 -> 2": R.PUNT_PN_GROW, "SID 1 -> 2, IPv6": R.PUNT_SID_GROW, "DCID 8 -> 20": R.PUNT_CID_LEN}


@pytest.mark.parametrize("method", ["head", "tail"])
@pytest.mark.parametrize("case", LIMIT_CASES, ids=[c.name for c in LIMIT_CASES])
def test_limit(fp: FastPath, case: Case, method: str) -> None:
    """A grown packet of exactly max_udp_payload bytes goes; one byte over, it is punted with
    the reason of the field that grew, and its stream range is handed to userspace."""
    grown = _grown_size(case)
    case.sub.max_udp_payload = grown
    res, counts, records, before, _ = run(fp, case, method)
    assert res.retval == TC_ACT_UNSPEC and counts == case.counts
    assert len(res.data) == len(expected(case, case.payload_out, before.next_pn))

    case.sub.max_udp_payload = grown - 1
    res, counts, records, _, _ = run(fp, case, method)
    reason = LIMIT_REASON[case.name]
    assert res.retval == TC_ACT_SHOT and counts == {R.EG_SEEN: 1, reason: 1}
    [rec] = records
    assert (rec.kind, rec.reason) == (L.REC_PUNT_CLONE, reason)
    assert [(f.up_sid, f.action) for f in list(rec.frames)[:rec.n_frames]] == [(UP_SID, L.FA_PUNTED)]


def test_grown_then_next_packet_continues(fp: FastPath) -> None:
    """After a resized copy the stream's next bytes go at the right offset with the same
    (wider) id, and the subscriber's counters moved by the size actually sent."""
    case = Case("x", stream(UP_SID, head()), P.padding(1) + stream(83, head(), sid_size=2), RESIZED,
                Sub(next_uni_index=20))
    res, _, [rec], before, after = run(fp, case)
    assert res.retval == TC_ACT_UNSPEC
    assert after.bytes_in_flight - before.bytes_in_flight == rec.size == len(TO_SUB4.payload(res.data))
    fp.reset_counters()
    more = PUB4.frame(P.quic_short(UP_CID, 8, P.stream_frame(UP_SID, b"next", offset=len(head()))))
    res = clone_run(fp, more)
    want = TO_SUB4.frame(P.quic_short(SUB_DCID, before.next_pn + 1,
                                      P.padding(1) + P.stream_frame(83, b"next", offset=len(head()), sid_size=2)),
                         src_mac=RELAY_MAC, dst_mac=SUB_MAC)
    assert res.retval == TC_ACT_UNSPEC
    assert res.data.hex() == want.hex()
    assert {r: n for r, (n, _) in fp.counters().items()} == RESIZED


@pytest.mark.parametrize("family", [4, 6])
def test_random_and_truncated_resized_clones_never_sent_malformed(fp: FastPath, family: int) -> None:
    """With every field growing (DCID, PN, stream ids) and an alias to rewrite, a cut or
    mutated clone is dropped or leaves with correct lengths and checksums."""
    import random

    rng = random.Random(11 + family)
    pub, to = (PUB6, TO_SUB6) if family == 6 else (PUB4, TO_SUB4)

    def sub() -> Sub:
        return Sub(family=family, dcid=bytes(range(1, 21)), next_pn=200, next_uni_index=20,
                   alias=5, sub_alias=9)

    quic = P.quic_short(UP_CID, 7, P.ack(5) + stream(UP_SID, head(5, b"a" * 20))
                        + stream(UP_SID + 4, head(5, b"b")) + dg(5), pn_len=1)
    base = pub.frame(quic)
    sub().install(fp)
    res = clone_run(fp, base)
    assert res.retval == TC_ACT_UNSPEC
    for cut in range(pub.l4_offset, len(base)):
        sub().install(fp)
        assert clone_run(fp, base[:cut]).retval == TC_ACT_SHOT, f"cut at {cut}"
    for i in range(200):
        sub().install(fp)
        mutated = bytearray(quic)
        for _ in range(rng.randint(1, 4)):
            j = rng.randrange(1 + 8 + 1, len(mutated))
            mutated[j] = rng.randrange(256)
        res = clone_run(fp, pub.frame(bytes(mutated)))
        if res.retval != TC_ACT_SHOT:
            assert to.udp_checksum_ok(res.data), f"mutation {i}"
            assert len(to.payload(res.data)) + to.payload_offset == len(res.data), f"mutation {i}"
            if family == 4:
                assert P.ipv4_header_ok(res.data), f"mutation {i}"


# --- live: real veths in the namespace lab --------------------------------------------------

LIVE_TOPOLOGY = """
name = "fpgrow"
[addressing]
ipv4 = "10.211.0.0/16"
ipv6 = "fd00:fa59::/48"
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
tx_checksum = {pub_tx}
[[link]]
hosts = ["relay", "sub"]
tx_checksum = false
"""
LIVE_ALIAS = 3
LIVE_PORTS = (4433, 50001, 50000)       # relay, subscriber, publisher


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


@pytest.mark.parametrize("pub_tx", [False, True], ids=["full checksums", "CHECKSUM_PARTIAL"])
@pytest.mark.parametrize("family", [4, 6])
def test_live_resize(family: int, pub_tx: bool) -> None:
    """One publisher packet (1-byte PN) to three subscribers: DCID 8 -> 20 with PN 1 -> 2,
    stream id 1 -> 2 bytes and another alias; DCID 8 -> 0; same sizes. Every copy arrives
    exact. With full checksums (the publisher's TX offload off) the receivers verify them;
    CHECKSUM_PARTIAL clones (offload on) are resized at the tail, the UDP header staying
    where csum_start points."""
    import socket

    from hw.lab import Lab
    from hw.topology import loads_topology
    from relay.fastpath.controller import FastPathController, SubscriberPath
    from tests.kernel.test_fastpath_live import _csum_errors

    relay_port, sub_port, pub_port = LIVE_PORTS
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    topo = loads_topology(LIVE_TOPOLOGY.format(pub_tx="true" if pub_tx else "false"), source="fpgrow")
    dcids = [bytes(range(0xe0, 0xf4)), b"", bytes([0xd2]) * 8]
    with Lab.up(topo) as lab:
        fp = FastPath()
        try:
            ctl = FastPathController(fp, host_cid_len=8)
            up = ctl.add_upstream([UP_CID])
            ctl.forward_track(up, LIVE_ALIAS)
            subs = []
            for i, name in enumerate(lab.subscribers):
                path = SubscriberPath(local=(lab.address("relay", name, family), relay_port),
                                      peer=(lab.address(name, "relay", family), sub_port),
                                      ifindex=lab.ifindex("relay", name),
                                      src_mac=_mac(lab.mac("relay", name)),
                                      dst_mac=_mac(lab.mac(name, "relay")), dcid=dcids[i])
                grow = i == 0
                sub = ctl.add_subscriber(up, path, max_data=1 << 30, max_streams_uni=100,
                                         initial_max_stream_data=1 << 20, cwnd=1 << 20,
                                         first_uni_index=20 if grow else 0, next_pn=200 if grow else 0)
                fp.sub_write(sub.sub_idx, "max_udp_payload", (1452).to_bytes(4, "little"))
                ctl.subscribe_track(sub, LIVE_ALIAS, 9 if grow else None)
                subs.append((name, sub, path))
                fp.attach(lab.ifindex("relay", name), netns=lab.netns("relay"), ingress=False)
            fp.attach(lab.ifindex("relay", "pub1"), netns=lab.netns("relay"), egress=False)
            fp.reset_counters()

            socks = {}
            for name, _, _ in subs:
                s = lab.socket(name, af)
                s.bind((lab.address(name, "relay", family), sub_port))
                s.settimeout(2)
                socks[name] = s
            relay_sock = lab.socket("relay", af)
            relay_sock.bind((lab.address("relay", "pub1", family), relay_port))
            relay_sock.settimeout(3)
            pub = lab.socket("pub1", af)
            pub.bind((lab.address("pub1", "relay", family), pub_port))

            body = b"live object " * 20
            original = P.quic_short(UP_CID, 77, P.ack(10) + P.stream_frame(
                2, P.subgroup_header(LIVE_ALIAS, 1, 5) + body, offset=0), pn_len=1)
            pub.sendto(original, (lab.address("relay", "pub1", family), relay_port))
            assert relay_sock.recvfrom(4096)[0] == original

            wants = [
                P.quic_short(dcids[0], 200, P.padding(1) + P.padding(len(P.ack(10))) + P.padding(1)
                             + P.stream_frame(83, P.subgroup_header(9, 1, 5) + body, offset=0, sid_size=2),
                             pn_len=2),
                P.quic_short(b"", 0, P.padding(len(P.ack(10)))
                             + P.stream_frame(3, P.subgroup_header(LIVE_ALIAS, 1, 5) + body, offset=0),
                             pn_len=1),
                P.quic_short(dcids[2], 0, P.padding(len(P.ack(10)))
                             + P.stream_frame(3, P.subgroup_header(LIVE_ALIAS, 1, 5) + body, offset=0),
                             pn_len=1),
            ]
            for (name, _, _), want in zip(subs, wants):
                got = socks[name].recvfrom(4096)[0]
                assert got.hex() == want.hex(), name
                assert _csum_errors(lab, name, family) == 0, name
            counts = {r: n for r, (n, _) in fp.counters().items()}
            assert counts[R.EG_RESIZED] == 2 and counts[R.EG_SENT_CLONE] == 3, counts
        finally:
            fp.close()
