"""The controller against the real maps: what it writes is what the programs read.

One upstream, subscribers written by FastPathController; a publisher packet through
the ingress program is cloned to all 64 subscribers; a clone through the egress program
comes out for the subscriber; the ring record becomes a ForwardedPacket; stream ids
reserved from Python and taken by the kernel come from one counter; live fields change
only through the sub-op program.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from relay import bpfload
from relay.errors import FastrelayError
from relay.fastpath import layout as L
from relay.fastpath.controller import FastPathController, SubscriberPath
from relay.fastpath.loader import FastPath
from relay.fastpath.reasons import Reason as R
from relay.quic.fastpath import ForwardedFrame, ForwardedPacket
from tests.kernel import packets as P

pytestmark = pytest.mark.root

TC_ACT_UNSPEC = 0xFFFFFFFF
UP_CID = bytes.fromhex("a1a2a3a4a5a6a7a8")
ALIAS = 9
PUB = P.Udp(P.IP4_B, P.IP4_A, 50000, 4433)


@pytest.fixture
def fp() -> Iterator[FastPath]:
    fastpath = FastPath()
    yield fastpath
    fastpath.close()


def _path(i: int) -> SubscriberPath:
    return SubscriberPath(local=(P.IP4_A, 4433), peer=(f"10.1.{i // 250}.{i % 250 + 1}", 40000 + i),
                          ifindex=1, src_mac=P.MAC_A, dst_mac=bytes([2, 0xbb, 0, 0, 0, i]),
                          dcid=bytes([0xc0 + (i % 16)]) * 8)


def _setup(fp: FastPath, n: int):
    ctl = FastPathController(fp, host_cid_len=8)
    up = ctl.add_upstream([UP_CID])
    ctl.forward_track(up, ALIAS)
    subs = []
    for i in range(n):
        sub = ctl.add_subscriber(up, _path(i), max_data=1 << 30, max_streams_uni=100,
                                 initial_max_stream_data=1 << 20, cwnd=1 << 20)
        ctl.subscribe_track(sub, ALIAS)
        subs.append(sub)
    fp.reset_counters()
    return ctl, up, subs


def test_64_subscribers_cloned_and_rewritten(fp: FastPath) -> None:
    ctl, up, subs = _setup(fp, 64)
    data = P.subgroup_header(ALIAS, 1, 3) + b"payload"
    frame = PUB.frame(P.quic_short(UP_CID, 7, P.ack(1) + P.stream_frame(2, data, offset=0)))
    res = bpfload.prog_test_run(fp.ingress.fd, frame, ctx=P.skb_ctx())
    assert res.retval == TC_ACT_UNSPEC and res.data == frame
    assert fp.counters()[R.IN_CLONE] == (64, 64 * len(frame))

    # the copy for subscriber 5, as the egress program on its device makes it
    sub = subs[5]
    path = _path(5)
    res = bpfload.prog_test_run(fp.egress.fd, frame, ctx=P.skb_ctx(mark=L.clone_mark(sub.sub_idx)))
    to = P.Udp(P.IP4_A, path.peer[0], 4433, path.peer[1])
    want = to.frame(P.quic_short(path.dcid, 0, P.padding(len(P.ack(1))) + P.stream_frame(3, data, offset=0)),
                    src_mac=path.src_mac, dst_mac=path.dst_mac)
    assert res.retval == TC_ACT_UNSPEC
    assert res.data.hex() == want.hex()
    [(idx, got)] = [ctl.translate(r) for r in fp.drain()]
    assert idx == sub.sub_idx
    assert isinstance(got, ForwardedPacket)
    assert (got.wire_pn, got.size, got.frames) == (0, len(to.payload(want)),
                                                   (ForwardedFrame(3, 0, len(data), False),))


def test_stream_ids_shared_between_python_and_kernel(fp: FastPath) -> None:
    ctl, up, [sub] = _setup(fp, 1)
    alloc = ctl.stream_id_allocator(sub)
    assert alloc.reserve(2) == [3, 7]                 # userspace opens two streams first
    data = P.subgroup_header(ALIAS, 1, 3) + b"x"
    frame = PUB.frame(P.quic_short(UP_CID, 7, P.stream_frame(2, data, offset=0)))
    bpfload.prog_test_run(fp.ingress.fd, frame, ctx=P.skb_ctx())   # learns the stream
    bpfload.prog_test_run(fp.egress.fd, frame, ctx=P.skb_ctx(mark=L.clone_mark(sub.sub_idx)))
    [rec] = fp.drain()
    assert rec.frames[0].sub_sid == 11                 # the kernel takes the next one
    assert alloc.reserve(1) == [15]


def test_sub_ops(fp: FastPath) -> None:
    ctl, up, [sub] = _setup(fp, 1)
    i = sub.sub_idx
    assert fp.sub_add(i, "next_pn", 5) == 0
    assert fp.sub_add(i, "next_pn", 1) == 5
    assert fp.sub_store(i, "cwnd", 777) == 1 << 20
    assert fp.sub_add(i, "bytes_in_flight", -0) == 0
    fp.sub_add(i, "bytes_in_flight", 1500)
    fp.sub_add(i, "bytes_in_flight", -1200)            # acknowledged: two's complement add
    s = fp.lookup("fr_subs", i, L.FrSub)
    assert (s.next_pn, s.cwnd, s.bytes_in_flight) == (6, 777, 300)
    fp.sub_write(i, "dcid_len", b"\x05")
    assert fp.lookup("fr_subs", i, L.FrSub).dcid_len == 5
    with pytest.raises(FastrelayError, match="refused"):
        fp.sub_write(i, "cwnd", bytes(8))               # counters only through add/store
    with pytest.raises(FastrelayError, match="refused"):
        fp.sub_op(i, L.SUB_OP_ADD, 4, 1)                # misaligned
    with pytest.raises(FastrelayError, match="refused"):
        fp.sub_op(10**6, L.SUB_OP_ADD, 0, 1)            # no such slot


def test_stream_credit_raised_live(fp: FastPath) -> None:
    ctl = FastPathController(fp, host_cid_len=8)
    up = ctl.add_upstream([UP_CID])
    ctl.forward_track(up, ALIAS)
    sub = ctl.add_subscriber(up, _path(0), max_data=1 << 30, max_streams_uni=100,
                             initial_max_stream_data=30, cwnd=1 << 20)
    ctl.subscribe_track(sub, ALIAS)
    head = P.subgroup_header(ALIAS, 1, 3) + b"a" * 10
    first = PUB.frame(P.quic_short(UP_CID, 7, P.stream_frame(2, head, offset=0)))
    bpfload.prog_test_run(fp.ingress.fd, first, ctx=P.skb_ctx())
    mark = P.skb_ctx(mark=L.clone_mark(sub.sub_idx))
    assert bpfload.prog_test_run(fp.egress.fd, first, ctx=mark).retval == TC_ACT_UNSPEC
    more = PUB.frame(P.quic_short(UP_CID, 8, P.stream_frame(2, b"b" * 40, offset=len(head))))
    assert bpfload.prog_test_run(fp.egress.fd, more, ctx=mark).retval == 2      # over 30: punted
    assert R.PUNT_NO_STREAM_CREDIT in fp.counters()
    ctl.set_stream_credit(sub, 2, 1000)
    more2 = PUB.frame(P.quic_short(UP_CID, 9, P.stream_frame(2, b"c" * 40, offset=len(head) + 40)))
    assert bpfload.prog_test_run(fp.egress.fd, more2, ctx=mark).retval == TC_ACT_UNSPEC
    with pytest.raises(FastrelayError, match="refused"):
        ctl.set_stream_credit(sub, 6, 1000)                  # no such stream yet
