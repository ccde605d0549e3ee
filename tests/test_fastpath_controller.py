"""relay.fastpath.controller with an in-memory stand-in for the maps (no kernel)."""

from __future__ import annotations

import ctypes
import errno

import pytest

from relay.errors import FastrelayError
from relay.fastpath import layout as L
from relay.fastpath.controller import FastPathController, MapCounter, Punt, SubscriberPath
from relay.fastpath.reasons import Reason
from relay.quic.fastpath import (
    CongestionChanged,
    CongestionSnapshot,
    CreditChanged,
    CreditSnapshot,
    ForwardedFrame,
    ForwardedPacket,
    PeerConnectionIdChanged,
    WireNumber,
)


class FakeMaps:
    def __init__(self) -> None:
        self.data: dict[tuple[str, bytes], bytes] = {}
        self.ops: list[tuple] = []

    @staticmethod
    def _k(key) -> bytes:
        return key.to_bytes(4, "little") if isinstance(key, int) else bytes(key)

    def update(self, name, key, value, flags=0) -> None:
        if flags == 1 and (name, self._k(key)) in self.data:  # BPF_NOEXIST
            raise OSError(errno.EEXIST, "exists")
        self.data[(name, self._k(key))] = bytes(value)

    def keys(self, name) -> list[bytes]:
        return [k for n, k in self.data if n == name]

    def lookup(self, name, key, cls):
        raw = self.data.get((name, self._k(key)))
        return None if raw is None else cls.from_buffer_copy(raw)

    def delete(self, name, key) -> None:
        self.data.pop((name, self._k(key)), None)

    def _sub(self, i: int) -> L.FrSub:
        return self.lookup("fr_subs", i, L.FrSub)

    def sub_add(self, i, field, delta) -> int:
        s = self._sub(i)
        old = getattr(s, field)
        setattr(s, field, (old + delta) & (2**64 - 1))
        self.update("fr_subs", i, s)
        self.ops.append(("add", i, field, delta))
        return old

    def sub_store(self, i, field, value) -> int:
        s = self._sub(i)
        old = getattr(s, field)
        setattr(s, field, value)
        self.update("fr_subs", i, s)
        self.ops.append(("store", i, field, value))
        return old

    def sub_write(self, i, field, data) -> None:
        raw = bytearray(self.data[("fr_subs", self._k(i))])
        off = getattr(L.FrSub, field).offset
        assert off >= L.SUB_COUNTERS_END, "counters only through add/store"
        raw[off:off + len(data)] = data
        self.data[("fr_subs", self._k(i))] = bytes(raw)
        self.ops.append(("write", i, field, data))


PATH = SubscriberPath(local=("10.0.0.1", 4433), peer=("10.0.9.9", 60000), ifindex=7,
                      src_mac=bytes.fromhex("02aa00000001"), dst_mac=bytes.fromhex("02bb00000002"),
                      dcid=bytes(range(8)))


def _ctl() -> tuple[FastPathController, FakeMaps]:
    maps = FakeMaps()
    return FastPathController(maps, host_cid_len=8), maps


def test_subscriber_written_then_activated() -> None:
    ctl, maps = _ctl()
    up = ctl.add_upstream([b"A" * 8])
    sub = ctl.add_subscriber(up, PATH, max_data=1000, max_streams_uni=10,
                             initial_max_stream_data=500, cwnd=12000, first_uni_index=2)
    s = maps.lookup("fr_subs", sub.sub_idx, L.FrSub)
    assert s.flags == L.SUB_ACTIVE and s.ifindex == 7 and s.family == 4
    assert bytes(s.dcid[:8]) == PATH.dcid and s.dcid_len == 8
    assert s.dst_port == int.from_bytes((60000).to_bytes(2, "big"), "little")
    assert (s.largest_acked, s.next_uni_index, s.max_data, s.cwnd) == (L.PN_NONE, 2, 1000, 12000)
    assert maps.ops[-1] == ("write", sub.sub_idx, "flags", b"\x01\x00\x00\x00"), "activated last"
    ups = maps.lookup("fr_upstreams", up.up_idx, ctl.Upstream)
    assert ups.n_subs == 1 and ups.subs[0] == sub.sub_idx
    conn = maps.lookup("fr_conns", sub.conn_idx, L.FrConn)
    assert (conn.role, conn.role_idx) == (L.ROLE_SUBSCRIBER, sub.sub_idx)
    peer = maps.lookup("fr_peers", L.addr_key(bytes([10, 0, 9, 9]), 60000), ctypes.c_uint32)
    assert peer.value == sub.conn_idx
    assert maps.lookup("fr_cids", L.cid_key(b"A" * 8), ctypes.c_uint32).value == up.conn_idx


def test_remove_subscriber_frees_everything() -> None:
    ctl, maps = _ctl()
    up = ctl.add_upstream([b"A" * 8])
    a = ctl.add_subscriber(up, PATH, max_data=1, max_streams_uni=1, initial_max_stream_data=1, cwnd=1)
    b = ctl.add_subscriber(up, PATH, max_data=1, max_streams_uni=1, initial_max_stream_data=1, cwnd=1)
    ctl.remove_subscriber(a, PATH.peer)
    ups = maps.lookup("fr_upstreams", up.up_idx, ctl.Upstream)
    assert ups.n_subs == 1 and ups.subs[0] == b.sub_idx
    assert maps.lookup("fr_subs", a.sub_idx, L.FrSub).flags == 0
    assert maps.lookup("fr_conns", a.conn_idx, L.FrConn).role == L.ROLE_NONE


def test_events_change_live_fields_without_whole_writes() -> None:
    ctl, maps = _ctl()
    up = ctl.add_upstream([b"A" * 8])
    sub = ctl.add_subscriber(up, PATH, max_data=1, max_streams_uni=1, initial_max_stream_data=1, cwnd=1)
    before = len([k for k in maps.data if k[0] == "fr_subs"])
    maps.ops.clear()
    ctl.on_event(sub, CreditChanged(CreditSnapshot(max_data=9000, data_used=10, max_streams_uni=50,
                                                   max_streams_bidi=0, initial_max_stream_data_uni=777,
                                                   initial_max_stream_data_bidi=0)))
    ctl.on_event(sub, CongestionChanged(CongestionSnapshot(congestion_window=30000, bytes_in_flight=1200)))
    ctl.on_event(sub, PeerConnectionIdChanged(old=PATH.dcid, new=b"\x09" * 5, sequence_number=1))
    s = maps.lookup("fr_subs", sub.sub_idx, L.FrSub)
    assert (s.max_data, s.max_streams_uni, s.initial_max_stream_data, s.cwnd, s.bytes_in_flight) == \
        (9000, 50, 777, 30000, 1200)
    assert (bytes(s.dcid[:5]), s.dcid_len) == (b"\x09" * 5, 5)
    assert {op[0] for op in maps.ops} <= {"store", "write"}
    assert len([k for k in maps.data if k[0] == "fr_subs"]) == before


def test_stream_ids_from_the_shared_counter() -> None:
    ctl, maps = _ctl()
    up = ctl.add_upstream([b"A" * 8])
    sub = ctl.add_subscriber(up, PATH, max_data=1, max_streams_uni=1, initial_max_stream_data=1,
                             cwnd=1, first_uni_index=3)
    alloc = ctl.stream_id_allocator(sub)
    assert alloc.reserve(2) == [15, 19]
    assert MapCounter(maps, sub.sub_idx).fetch_add(1) == 5      # the kernel's next index


def test_host_cid_length_is_checked() -> None:
    ctl, _ = _ctl()
    with pytest.raises(FastrelayError, match="8 bytes"):
        ctl.add_upstream([b"short"])


def _rec(kind: int, **kw):
    rec = L.FrRecord(kind=kind, sub_idx=2, wire_pn=41, ts_ns=2_000_000_000, size=1200, **kw)
    return rec


def test_records_translate() -> None:
    ctl, _ = _ctl()
    user = _rec(L.REC_SENT_USER, built_pn=0x1234, pn_len=2)
    assert ctl.translate(user) == (2, WireNumber(built_pn=0x1234, wire_pn=41, size=1200, sent_time=2.0))
    clone = _rec(L.REC_SENT_CLONE, n_frames=2)
    clone.frames[0] = L.FrFrameRec(sub_sid=3, up_sid=2, offset=0, length=100, type=0x0e,
                                   action=L.FA_FORWARDED)
    clone.frames[1] = L.FrFrameRec(length=9, type=0x31, action=L.FA_FORWARDED)
    assert ctl.translate(clone) == (2, ForwardedPacket(wire_pn=41, size=1200, sent_time=2.0,
                                                       frames=(ForwardedFrame(3, 0, 100, False),)))
    punt = _rec(L.REC_PUNT_CLONE, reason=int(Reason.PUNT_NO_CWND), n_frames=1)
    punt.frames[0] = L.FrFrameRec(sub_sid=7, up_sid=6, offset=50, length=10, type=0x0f, fin=1,
                                  action=L.FA_PUNTED)
    got = ctl.translate(punt)[1]
    assert got == Punt(sub_idx=2, reason=Reason.PUNT_NO_CWND, clone=True,
                       frames=(ForwardedFrame(7, 50, 10, True),), upstream_stream_ids=(6,))
    seen = []
    assert ctl.dispatch([user, clone, punt], lambda s, r: seen.append((s, type(r).__name__))) == 3
    assert seen == [(2, "WireNumber"), (2, "ForwardedPacket"), (2, "Punt")]


def test_stream_ownership_is_decided_once() -> None:
    maps = FakeMaps()
    ctl = FastPathController(maps, host_cid_len=8)
    up = ctl.add_upstream([bytes(8)])
    sub = ctl.add_subscriber(up, PATH, max_data=1 << 20, max_streams_uni=100,
                             initial_max_stream_data=1 << 16, cwnd=1 << 16)
    # the kernel forwarded stream 2 first: it owns it, with the id it took
    key = L.FrSubStreamKey(sub_idx=sub.sub_idx, up_idx=up.up_idx, up_sid=2)
    maps.update("fr_sub_streams", key, L.FrSubStream(sub_sid=7))
    assert ctl.claim_stream(sub, up, 2) == 7
    # stream 6 nobody forwarded yet: userspace takes it, the kernel will pad it
    assert ctl.claim_stream(sub, up, 6) is None
    taken = maps.lookup("fr_sub_streams", L.FrSubStreamKey(sub_idx=sub.sub_idx, up_idx=up.up_idx,
                                                           up_sid=6), L.FrSubStream)
    assert taken.flags & L.SS_SKIPPED
    assert ctl.claim_stream(sub, up, 6) is None  # and stays userspace's
    ctl.forget_stream(up, 2, [sub.sub_idx])
    assert maps.lookup("fr_sub_streams", key, L.FrSubStream) is None


def test_track_start_group_and_upstream_removal() -> None:
    maps = FakeMaps()
    ctl = FastPathController(maps, host_cid_len=8)
    up = ctl.add_upstream([bytes(8), bytes([1] * 8)])
    sub = ctl.add_subscriber(up, PATH, max_data=1 << 20, max_streams_uni=100,
                             initial_max_stream_data=1 << 16, cwnd=1 << 16)
    ctl.forward_track(up, 5)
    ctl.subscribe_track(sub, 5, start_group=12)
    st = maps.lookup("fr_sub_tracks", L.FrSubTrackKey(sub_idx=sub.sub_idx, up_idx=up.up_idx,
                                                      alias=5), L.FrSubTrack)
    assert (st.sub_alias, st.start_group) == (5, 12)
    ctl.remove_upstream(up, [bytes(8), bytes([1] * 8)])
    left = {name for name, _ in maps.data if name in ("fr_cids", "fr_tracks", "fr_sub_tracks")}
    assert left == set()
    assert maps.lookup("fr_conns", up.conn_idx, L.FrConn).role == 0


def test_capacities_from_the_command_line() -> None:
    caps = L.Capacities.parse(["max_subscribers_per_upstream=128", "max-subscribers=2048"])
    assert (caps.max_subscribers_per_upstream, caps.max_subscribers) == (128, 2048)
    assert "-DMAX_SUBSCRIBERS_PER_UPSTREAM=128" in caps.cflags()
    assert L.Capacities.parse([]) == L.Capacities()
    with pytest.raises(ValueError, match="power of two"):
        L.Capacities.parse(["ringbuf_pages=100"])
