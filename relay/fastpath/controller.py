"""Fast-path controller: slots, map writes and record translation, with the map access
injected (a `FastPath` in the relay, an in-memory fake in unit tests).

- allocates connection, upstream and subscriber slots and writes their map entries
  (fr_conns, fr_cids, fr_peers, fr_upstreams, fr_subs, fr_tracks, fr_sub_tracks), and
  removes every entry of a connection that leaves;
- changes live subscribers only through the race-free sub-op program (`sub_add`,
  `sub_store`, `sub_write`), never by rewriting the whole value;
- decides who owns a subscriber's copy of an upstream stream (`claim_stream`): the kernel
  if it already forwarded its first byte, else userspace, race-free through BPF_NOEXIST;
- turns the relay connection's fast-path events (relay.quic.fastpath) into those writes;
- hands each subscriber connection a `StreamIdAllocator` over the kernel's counter;
- translates ring records into `WireNumber` / `ForwardedPacket` / `Punt` for the relay
  (relay.fastpath.runtime drives all of this from the relay's event loop).
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from relay.errors import FastrelayError
from relay.fastpath import layout as L
from relay.fastpath.reasons import Reason
from relay.quic.fastpath import (
    CongestionChanged,
    CounterStreamIdAllocator,
    CreditChanged,
    FastPathEvent,
    ForwardedFrame,
    ForwardedPacket,
    HostConnectionIdIssued,
    HostConnectionIdRetired,
    PeerAddressChanged,
    PeerConnectionIdChanged,
    WireNumber,
)

NS = 1e-9
DATAGRAM_FRAME_TYPE = 0x30
"""Frame types below it in a record are STREAM frames (DATAGRAM frames: 0x30, 0x31)."""
BPF_NOEXIST = 1


class MapAccess(Protocol):
    """What the controller needs from the loaded programs (relay.fastpath.loader.FastPath)."""

    def update(self, name: str, key: Any, value: ctypes.Structure, flags: int = 0) -> None: ...
    def lookup(self, name: str, key: Any, cls: type[ctypes.Structure]) -> Any: ...
    def delete(self, name: str, key: ctypes.Structure) -> None: ...
    def sub_add(self, sub_idx: int, field: str, delta: int) -> int: ...
    def sub_store(self, sub_idx: int, field: str, value: int) -> int: ...
    def sub_write(self, sub_idx: int, field: str, data: bytes) -> None: ...
    def stream_op(self, key: L.FrSubStreamKey, op: int, field: str, value: int) -> int: ...
    def keys(self, name: str) -> list[bytes]: ...


class MapCounter:
    """`AtomicCounter` over a u64 field of fr_subs[sub_idx], shared with the egress program."""

    def __init__(self, maps: MapAccess, sub_idx: int, field: str = "next_uni_index") -> None:
        self.maps, self.sub_idx, self.field = maps, sub_idx, field

    def fetch_add(self, delta: int) -> int:
        return self.maps.sub_add(self.sub_idx, self.field, delta)


@dataclass(frozen=True)
class Punt:
    """The kernel withheld a packet: userspace sends these bytes itself."""

    sub_idx: int
    reason: Reason
    clone: bool
    frames: tuple[ForwardedFrame, ...] = ()
    #: upstream stream id of each frame (same order), to find the bytes in the upstream stream
    upstream_stream_ids: tuple[int, ...] = ()
    built_pn: int | None = None


@dataclass(frozen=True)
class Upstream:
    conn_idx: int
    up_idx: int


@dataclass(frozen=True)
class Subscriber:
    conn_idx: int
    sub_idx: int
    upstream: Upstream | None = None
    """The upstream it was added with (tracks of others join through `subscribe_track`)."""


@dataclass(frozen=True)
class SubscriberPath:
    """Where and how to send to a subscriber (userspace knows it from the socket and netlink)."""

    local: tuple[str, int]
    peer: tuple[str, int]
    ifindex: int
    src_mac: bytes
    dst_mac: bytes
    dcid: bytes


LOW_ROOM = 16 * 1500
"""Below this much room in the kernel's window (about the packets it may forward to one
subscriber between two ticks), every change of aioquic's window is stored: a window that
is nearly full must not be made any tighter by a stale value."""
PN_SLACK = 64
"""Packets the kernel may number before userspace's next write of largest_acked: a stale
value may only make a packet number longer than needed within that many packets."""


def pn_len_needed(full_pn: int, largest_acked: int) -> int:
    """Bytes of packet number the kernel writes for `full_pn` (bpf/quic.h
    quic_pn_len_needed, RFC 9000 Appendix A.2): 1..4, 5 if four bytes are not enough."""
    unacked = full_pn + 1 if largest_acked == L.PN_NONE else full_pn - largest_acked
    for n, bits in ((1, 7), (2, 15), (3, 23), (4, 31)):
        if unacked < 1 << bits:
            return n
    return 5


@dataclass
class KernelView:
    """What fr_subs holds of one subscriber's congestion state: what userspace last stored,
    plus what the egress program added since (it adds every forwarded packet's size to
    bytes_in_flight). None: never stored."""

    cwnd: int | None = None
    bytes_in_flight: int | None = None
    largest_acked: int = L.PN_NONE
    #: one past the highest wire packet number seen in this subscriber's records
    next_pn: int = 0

    def forwarded(self, wire_pn: int, size: int) -> None:
        """A record of a packet the kernel forwarded (it counted `size` in flight)."""
        if self.bytes_in_flight is not None:
            self.bytes_in_flight += size
        self.numbered(wire_pn)

    def numbered(self, wire_pn: int) -> None:
        if wire_pn >= self.next_pn:
            self.next_pn = wire_pn + 1


def congestion_writes(view: KernelView, cwnd: int, bytes_in_flight: int,
                      largest_acked: int) -> dict[str, int]:
    """The fr_subs fields worth a store (one syscall each) so that the kernel decides as
    aioquic would, and `view` updated as if they were stored.

    - cwnd and bytes_in_flight only matter as the window left (cwnd - bytes_in_flight): the
      kernel punts a clone that does not fit. Stored when the kernel's view is more
      permissive than aioquic's (e.g. after a loss), or stricter than needed with less than
      LOW_ROOM left, or more than a quarter stricter than needed (in a wide window a few
      ACKs behind cost nothing; the kernel's own additions are in `view`);
    - largest_acked only sizes packet numbers: stored when the stale value would make the
      kernel write a longer packet number within the next PN_SLACK packets.
    """
    writes: dict[str, int] = {}
    if view.cwnd is None or view.bytes_in_flight is None:
        stale = True
    else:
        kernel_room = view.cwnd - view.bytes_in_flight
        room = cwnd - bytes_in_flight
        stale = kernel_room > room or (kernel_room < room and (
            kernel_room < LOW_ROOM or kernel_room < room - room // 4))
    if stale:
        if view.cwnd != cwnd:
            writes["cwnd"] = view.cwnd = cwnd
        if view.bytes_in_flight != bytes_in_flight:
            writes["bytes_in_flight"] = view.bytes_in_flight = bytes_in_flight
    if largest_acked != view.largest_acked and largest_acked != L.PN_NONE:
        ahead = max(view.next_pn, largest_acked + 1) + PN_SLACK
        if view.largest_acked == L.PN_NONE or (
                largest_acked > view.largest_acked
                and pn_len_needed(ahead, view.largest_acked) > pn_len_needed(ahead, largest_acked)):
            writes["largest_acked"] = view.largest_acked = largest_acked
    return writes


class _Slots:
    def __init__(self, n: int, what: str) -> None:
        self.free = list(range(n - 1, -1, -1))
        self.what = what

    def take(self) -> int:
        if not self.free:
            raise FastrelayError(f"no free {self.what} slot (raise the capacity)")
        return self.free.pop()

    def give(self, i: int) -> None:
        self.free.append(i)


def _nbo16(port: int) -> int:
    return int.from_bytes(port.to_bytes(2, "big"), "little")


@dataclass
class FastPathController:
    maps: MapAccess
    host_cid_len: int
    caps: L.Capacities = field(default_factory=L.Capacities)

    def __post_init__(self) -> None:
        self._conns = _Slots(self.caps.max_connections, "connection")
        self._ups = _Slots(self.caps.max_upstreams, "upstream")
        self._subs = _Slots(self.caps.max_subscribers, "subscriber")
        self._up_lists: dict[int, list[int]] = {}
        self._sub_conn: dict[int, Subscriber] = {}
        self.Upstream = L.upstream_struct(self.caps.max_subscribers_per_upstream)
        self.maps.update("fr_config", 0, L.FrConfig(host_cid_len=self.host_cid_len))

    # --- connections ------------------------------------------------------------------

    def add_upstream(self, host_cids: Iterable[bytes], *, protection: int = L.PROT_CLEAR,
                     tag_len: int = 0, peer_cid_len: int = 0) -> Upstream:
        ci, ui = self._conns.take(), self._ups.take()
        self.maps.update("fr_conns", ci, L.FrConn(role=L.ROLE_UPSTREAM, protection=protection,
                                                  tag_len=tag_len, role_idx=ui,
                                                  peer_cid_len=peer_cid_len))
        self.maps.update("fr_upstreams", ui, self.Upstream())
        self._up_lists[ui] = []
        for cid in host_cids:
            self.add_host_cid(ci, cid)
        return Upstream(ci, ui)

    def add_host_cid(self, conn_idx: int, cid: bytes) -> None:
        if len(cid) != self.host_cid_len:
            raise FastrelayError(f"relay CIDs are {self.host_cid_len} bytes, not {len(cid)}")
        self.maps.update("fr_cids", L.cid_key(cid), ctypes.c_uint32(conn_idx))

    def retire_host_cid(self, cid: bytes) -> None:
        self.maps.delete("fr_cids", L.cid_key(cid))

    def remove_upstream(self, upstream: Upstream, host_cids: Iterable[bytes]) -> None:
        """The upstream connection left: its CIDs, tracks and streams go, its subscribers stay
        (they may have other upstreams' tracks) but lose it."""
        for cid in host_cids:
            self.retire_host_cid(cid)
        self._delete_where("fr_tracks", L.FrTrackKey, lambda k: k.up_idx == upstream.up_idx)
        self._delete_where("fr_up_streams", L.FrUpStreamKey, lambda k: k.up_idx == upstream.up_idx)
        self._delete_where("fr_sub_tracks", L.FrSubTrackKey, lambda k: k.up_idx == upstream.up_idx)
        self._delete_where("fr_sub_streams", L.FrSubStreamKey, lambda k: k.up_idx == upstream.up_idx)
        self.maps.update("fr_upstreams", upstream.up_idx, self.Upstream())
        self.maps.update("fr_conns", upstream.conn_idx, L.FrConn())
        self._up_lists.pop(upstream.up_idx, None)
        self._conns.give(upstream.conn_idx)
        self._ups.give(upstream.up_idx)

    def _delete_where(self, name: str, key_cls: type[ctypes.Structure],
                      match: Callable[[Any], bool]) -> int:
        n = 0
        for raw in self.maps.keys(name):
            key = key_cls.from_buffer_copy(raw)
            if match(key):
                self.maps.delete(name, key)
                n += 1
        return n

    def add_subscriber(self, upstream: Upstream | None, path: SubscriberPath, *,
                       max_data: int, max_streams_uni: int, initial_max_stream_data: int,
                       cwnd: int, first_uni_index: int = 0, next_pn: int = 0,
                       protection: int = L.PROT_CLEAR, tag_len: int = 0,
                       priority_threshold: int = 255, data_used: int = 0,
                       max_udp_payload: int = 0) -> Subscriber:
        ci, si = self._conns.take(), self._subs.take()
        local, peer = ipaddress.ip_address(path.local[0]), ipaddress.ip_address(path.peer[0])
        if local.version != peer.version:
            raise FastrelayError("local and peer addresses of a subscriber differ in family")
        sub = L.FrSub(next_pn=next_pn, largest_acked=L.PN_NONE, next_uni_index=first_uni_index,
                      data_used=data_used, max_udp_payload=max_udp_payload,
                      max_streams_uni=max_streams_uni, max_data=max_data,
                      initial_max_stream_data=initial_max_stream_data, cwnd=cwnd,
                      conn_idx=ci, ifindex=path.ifindex, flags=0, family=peer.version,
                      dcid_len=len(path.dcid), priority_threshold=priority_threshold,
                      src_port=_nbo16(path.local[1]), dst_port=_nbo16(path.peer[1]))
        ctypes.memmove(sub.dcid, path.dcid, len(path.dcid))
        ctypes.memmove(sub.src_mac, path.src_mac, 6)
        ctypes.memmove(sub.dst_mac, path.dst_mac, 6)
        ctypes.memmove(sub.src_addr, local.packed, len(local.packed))
        ctypes.memmove(sub.dst_addr, peer.packed, len(peer.packed))
        # Whole-value write while inactive; FR_SUB_ACTIVE goes on last, through the op.
        self.maps.update("fr_subs", si, sub)
        self.maps.update("fr_conns", ci, L.FrConn(role=L.ROLE_SUBSCRIBER, protection=protection,
                                                  tag_len=tag_len, role_idx=si,
                                                  peer_cid_len=len(path.dcid)))
        self.maps.update("fr_peers", L.addr_key(peer.packed, path.peer[1]), ctypes.c_uint32(ci))
        self.maps.sub_write(si, "flags", L.SUB_ACTIVE.to_bytes(4, "little"))
        if upstream is not None:
            self._up_lists[upstream.up_idx].append(si)
            self._write_up_list(upstream.up_idx)
        handle = Subscriber(ci, si, upstream)
        self._sub_conn[si] = handle
        return handle

    def remove_subscriber(self, sub: Subscriber, peer: tuple[str, int]) -> None:
        self.maps.sub_write(sub.sub_idx, "flags", (0).to_bytes(4, "little"))
        for up_idx, subs in self._up_lists.items():
            if sub.sub_idx in subs:
                subs.remove(sub.sub_idx)
                self._write_up_list(up_idx)
        self._delete_where("fr_sub_tracks", L.FrSubTrackKey, lambda k: k.sub_idx == sub.sub_idx)
        self._delete_where("fr_sub_streams", L.FrSubStreamKey, lambda k: k.sub_idx == sub.sub_idx)
        self.maps.delete("fr_peers", L.addr_key(ipaddress.ip_address(peer[0]).packed, peer[1]))
        self.maps.update("fr_conns", sub.conn_idx, L.FrConn())
        self._sub_conn.pop(sub.sub_idx, None)
        self._conns.give(sub.conn_idx)
        self._subs.give(sub.sub_idx)

    def _write_up_list(self, up_idx: int) -> None:
        subs = self._up_lists[up_idx]
        value = self.Upstream(n_subs=len(subs))
        for i, s in enumerate(subs[:self.caps.max_subscribers_per_upstream]):
            value.subs[i] = s
        self.maps.update("fr_upstreams", up_idx, value)

    # --- tracks -----------------------------------------------------------------------------

    def forward_track(self, upstream: Upstream, alias: int) -> None:
        self.maps.update("fr_tracks", L.FrTrackKey(up_idx=upstream.up_idx, alias=alias),
                         L.FrTrack(flags=L.TRACK_FORWARD))

    def unforward_track(self, upstream: Upstream, alias: int) -> None:
        self.maps.delete("fr_tracks", L.FrTrackKey(up_idx=upstream.up_idx, alias=alias))

    def subscribe_track(self, sub: Subscriber, alias: int, sub_alias: int | None = None, *,
                        upstream: Upstream | None = None, start_group: int = 0) -> None:
        """`sub` gets the upstream track `alias` from group `start_group` on (earlier groups
        are the relay's to serve); the upstream joins the subscriber's fan-out list."""
        up = upstream or sub.upstream
        if up is None:
            raise FastrelayError("subscribe_track needs the upstream the track comes from")
        if sub.sub_idx not in self._up_lists[up.up_idx]:
            self._up_lists[up.up_idx].append(sub.sub_idx)
            self._write_up_list(up.up_idx)
        self.maps.update("fr_sub_tracks",
                         L.FrSubTrackKey(sub_idx=sub.sub_idx, up_idx=up.up_idx, alias=alias),
                         L.FrSubTrack(sub_alias=alias if sub_alias is None else sub_alias,
                                      start_group=start_group))

    def unsubscribe_track(self, sub: Subscriber, upstream: Upstream, alias: int) -> None:
        self.maps.delete("fr_sub_tracks",
                         L.FrSubTrackKey(sub_idx=sub.sub_idx, up_idx=upstream.up_idx, alias=alias))

    # --- streams ------------------------------------------------------------------------------

    def claim_stream(self, sub: Subscriber, upstream: Upstream, up_sid: int) -> int | None:
        """Who sends `sub` its copy of upstream stream `up_sid`: the subscriber stream id when
        the kernel forwards it, None when userspace does (from now on the kernel pads it)."""
        key = L.FrSubStreamKey(sub_idx=sub.sub_idx, up_idx=upstream.up_idx, up_sid=up_sid)
        try:
            self.maps.update("fr_sub_streams", key, L.FrSubStream(flags=L.SS_SKIPPED),
                             BPF_NOEXIST)
            return None
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
        entry = self.maps.lookup("fr_sub_streams", key, L.FrSubStream)
        if entry is None or entry.flags & L.SS_SKIPPED:
            return None
        return int(entry.sub_sid)

    def forget_stream(self, upstream: Upstream, up_sid: int, sub_idxs: Iterable[int]) -> None:
        """An upstream stream is over: its entries go (after a linger, see the runtime)."""
        self.maps.delete("fr_up_streams", L.FrUpStreamKey(up_idx=upstream.up_idx, sid=up_sid))
        for si in sub_idxs:
            self.maps.delete("fr_sub_streams",
                             L.FrSubStreamKey(sub_idx=si, up_idx=upstream.up_idx, up_sid=up_sid))

    def set_priority_threshold(self, sub: Subscriber, threshold: int) -> None:
        self.maps.sub_write(sub.sub_idx, "priority_threshold", bytes([max(0, min(255, threshold))]))

    def stream_id_allocator(self, sub: Subscriber) -> CounterStreamIdAllocator:
        """Server-initiated uni ids from the same counter the egress program takes from."""
        return CounterStreamIdAllocator(MapCounter(self.maps, sub.sub_idx), kind=3)

    # --- events from the subscriber's connection -------------------------------------------

    def on_event(self, sub: Subscriber, event: FastPathEvent) -> None:
        si = sub.sub_idx
        if isinstance(event, CreditChanged):
            c = event.credit
            self.maps.sub_store(si, "max_data", c.max_data)
            self.maps.sub_store(si, "max_streams_uni", c.max_streams_uni)
            self.maps.sub_store(si, "initial_max_stream_data", c.initial_max_stream_data_uni)
        elif isinstance(event, CongestionChanged):
            self.maps.sub_store(si, "cwnd", event.congestion.congestion_window)
            self.maps.sub_store(si, "bytes_in_flight", event.congestion.bytes_in_flight)
            self.maps.sub_store(si, "largest_acked", event.congestion.largest_acked)
        elif isinstance(event, PeerConnectionIdChanged):
            if len(event.new) > L.QUIC_MAX_CID_LEN:
                raise FastrelayError("a connection id has at most 20 bytes")
            self.maps.sub_write(si, "dcid", event.new.ljust(L.QUIC_MAX_CID_LEN, b"\0"))
            self.maps.sub_write(si, "dcid_len", bytes([len(event.new)]))
        elif isinstance(event, PeerAddressChanged):
            raise FastrelayError("subscriber migration is not handled by the fast path yet")
        elif isinstance(event, HostConnectionIdIssued):
            pass  # subscribers' packets to us are never forwarded: no demux entry needed
        elif isinstance(event, HostConnectionIdRetired):
            pass

    def set_stream_credit(self, sub: Subscriber, upstream_sid: int, max_stream_data: int,
                          upstream: Upstream | None = None) -> None:
        """The subscriber's MAX_STREAM_DATA for the stream the kernel forwards from upstream_sid."""
        up = upstream or sub.upstream
        if up is None:
            raise FastrelayError("set_stream_credit needs the upstream of the stream")
        key = L.FrSubStreamKey(sub_idx=sub.sub_idx, up_idx=up.up_idx, up_sid=upstream_sid)
        self.maps.stream_op(key, L.SUB_OP_STORE, "max_stream_data", max_stream_data)

    def set_largest_acked(self, sub: Subscriber, pn: int) -> None:
        self.maps.sub_store(sub.sub_idx, "largest_acked", pn)

    # --- ring records ------------------------------------------------------------------------

    @staticmethod
    def stream_frames(rec: Any) -> list[Any]:
        """The record's STREAM frames that have a subscriber stream id (a frame punted before
        the kernel gave it one belongs to a stream userspace sends itself)."""
        # slice the ctypes array: list() would convert every slot, used or not
        return [f for f in rec.frames[:rec.n_frames]
                if f.type < DATAGRAM_FRAME_TYPE and f.sub_sid != L.NO_SUB_SID]

    def translate(self, rec: Any, frames: list[Any] | None = None
                  ) -> tuple[int, WireNumber | ForwardedPacket | Punt]:
        """(subscriber index, what the record means for that subscriber's connection).
        `frames`: `stream_frames(rec)` when the caller has it already."""
        if rec.kind == L.REC_SENT_USER:
            return rec.sub_idx, WireNumber(built_pn=rec.built_pn, wire_pn=rec.wire_pn,
                                           size=rec.size, sent_time=rec.ts_ns * NS)
        if frames is None:
            frames = self.stream_frames(rec)
        ff = tuple(ForwardedFrame(stream_id=int(f.sub_sid), offset=int(f.offset),
                                  length=int(f.length), fin=bool(f.fin)) for f in frames)
        if rec.kind == L.REC_SENT_CLONE:
            return rec.sub_idx, ForwardedPacket(wire_pn=rec.wire_pn, size=rec.size,
                                                sent_time=rec.ts_ns * NS, frames=ff)
        if rec.kind in (L.REC_PUNT_CLONE, L.REC_PUNT_USER):
            return rec.sub_idx, Punt(sub_idx=rec.sub_idx, reason=Reason(rec.reason),
                                     clone=rec.kind == L.REC_PUNT_CLONE, frames=ff,
                                     upstream_stream_ids=tuple(int(f.up_sid) for f in frames),
                                     built_pn=rec.built_pn if rec.kind == L.REC_PUNT_USER else None)
        raise FastrelayError(f"unknown record kind {rec.kind}")

    def dispatch(self, records: Iterable[Any],
                 deliver: Callable[[int, WireNumber | ForwardedPacket | Punt], None]) -> int:
        n = 0
        for rec in records:
            deliver(*self.translate(rec))
            n += 1
        return n
