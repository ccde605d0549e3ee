"""What the fast path and a relay connection tell each other: records, snapshots, events, stream ids.

The kernel (eBPF on TC) sends packets on a subscriber connection's behalf and numbers every
1-RTT packet of that connection; userspace (aioquic, subclassed in `connection.py` and
`recovery.py`) stays the source of truth. This module holds the plain data both sides
exchange and the one stream-id allocator they share; it has no aioquic state.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

#: The builder always writes 2-byte packet numbers (aioquic `PACKET_NUMBER_SEND_SIZE`): the
#: kernel reports these bytes so userspace can find the packet it built.
BUILT_PN_MASK = 0xFFFF


# --- registration records (kernel → userspace) -------------------------------------------

@dataclass(frozen=True)
class ForwardedFrame:
    """One STREAM frame the kernel forwarded, already in the subscriber's stream-id space."""

    stream_id: int
    offset: int
    length: int
    fin: bool = False

    @property
    def stop(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class ForwardedPacket:
    """A packet the kernel built and sent on the connection's behalf (a clone of a publisher packet)."""

    wire_pn: int
    size: int
    sent_time: float
    frames: tuple[ForwardedFrame, ...] = ()
    #: The key phase the kernel protected it with (None: unknown).
    key_phase: int | None = None
    #: DATAGRAM-only or STREAM packets are ack-eliciting and in flight; PADDING-only ones are not.
    ack_eliciting: bool = True


@dataclass(frozen=True)
class WireNumber:
    """The kernel renumbered a packet userspace built: `built_pn` is the 2-byte PN aioquic wrote."""

    built_pn: int
    wire_pn: int
    size: int
    sent_time: float
    key_phase: int | None = None


# --- snapshots (userspace → maps) ----------------------------------------------------------

@dataclass(frozen=True)
class CreditSnapshot:
    """Connection-level send credit granted by the peer (RFC 9000 §4), shared by kernel and userspace."""

    #: Peer's MAX_DATA and what both paths used of it (shadow writes included).
    max_data: int
    data_used: int
    #: Peer's MAX_STREAMS: stream ids below 4 × limit may be opened.
    max_streams_uni: int
    max_streams_bidi: int
    #: Initial MAX_STREAM_DATA for streams opened from now on.
    initial_max_stream_data_uni: int
    initial_max_stream_data_bidi: int

    @property
    def data_available(self) -> int:
        return max(0, self.max_data - self.data_used)


@dataclass(frozen=True)
class StreamCreditSnapshot:
    stream_id: int
    max_stream_data: int
    #: Highest offset sent on the stream by either path (the stream's flow-control use).
    highest_offset: int


@dataclass(frozen=True)
class CongestionSnapshot:
    congestion_window: int
    bytes_in_flight: int
    #: Userspace-built packets the kernel has not reported yet (not in bytes_in_flight).
    parked_packets: int = 0
    #: Largest 1-RTT packet number the peer acknowledged (the kernel sizes packet numbers by it).
    largest_acked: int = 0

    @property
    def available(self) -> int:
        return max(0, self.congestion_window - self.bytes_in_flight)


# --- events (userspace → whoever keeps the maps) ------------------------------------------

@dataclass(frozen=True)
class FastPathEvent:
    """Base class of what a relay connection reports to the fast-path controller."""


@dataclass(frozen=True)
class CreditChanged(FastPathEvent):
    credit: CreditSnapshot


@dataclass(frozen=True)
class StreamCreditChanged(FastPathEvent):
    credit: StreamCreditSnapshot


@dataclass(frozen=True)
class CongestionChanged(FastPathEvent):
    congestion: CongestionSnapshot


@dataclass(frozen=True)
class HostConnectionIdIssued(FastPathEvent):
    """A relay CID (ingress demux key) exists; reported before it is announced to the peer."""

    sequence_number: int
    cid: bytes
    stateless_reset_token: bytes


@dataclass(frozen=True)
class HostConnectionIdRetired(FastPathEvent):
    sequence_number: int
    cid: bytes


@dataclass(frozen=True)
class PeerConnectionIdChanged(FastPathEvent):
    """The DCID the relay (and so the kernel) must write toward the peer changed."""

    old: bytes | None
    new: bytes
    sequence_number: int | None


@dataclass(frozen=True)
class PeerAddressChanged(FastPathEvent):
    old: tuple[str, int] | None
    new: tuple[str, int]


@dataclass(frozen=True)
class ForwardedPacketLost(FastPathEvent):
    """A forwarded packet was declared lost; aioquic retransmits its stream ranges on the same ids."""

    packet: ForwardedPacket


FastPathListener = Callable[[FastPathEvent], None]


# --- stream ids: one allocator per subscriber, shared with the kernel ---------------------

@runtime_checkable
class StreamIdAllocator(Protocol):
    """Hands out stream ids of one kind (e.g. server-initiated uni) from the subscriber's counter.

    The kernel takes ids for forwarded streams from the same counter, so every id is handed
    out once, to one of the two paths, in increasing order of reservation (not of use).
    """

    #: The low two bits of every id handed out (RFC 9000 §2.1).
    kind: int

    def reserve(self, count: int) -> list[int]:
        """Reserve `count` consecutive ids; never returns an id twice."""
        ...


class AtomicCounter(Protocol):
    """A per-subscriber counter with fetch-and-add.

    Seam for the BPF map: the kernel does `__sync_fetch_and_add` on the same slot; the
    map-backed implementation does it from Python (BPF_F_LOCK or a tiny syscall program).
    """

    def fetch_add(self, delta: int) -> int:
        """Add `delta`, return the value before."""
        ...


class InMemoryCounter:
    """`AtomicCounter` for tests and for running without the fast path."""

    def __init__(self, start: int = 0) -> None:
        self._value = start
        self._lock = threading.Lock()

    def fetch_add(self, delta: int) -> int:
        with self._lock:
            value = self._value
            self._value += delta
            return value

    @property
    def value(self) -> int:
        return self._value


class CounterStreamIdAllocator:
    """Stream ids from a counter of stream *indexes*: id = 4 × index + kind (RFC 9000 §2.1).

    kind: 0 client bidi, 1 server bidi, 2 client uni, 3 server uni.
    """

    def __init__(self, counter: AtomicCounter, kind: int) -> None:
        if kind not in (0, 1, 2, 3):
            raise ValueError(f"Stream kind must be 0..3, not {kind}")
        self.counter = counter
        self.kind = kind

    def reserve(self, count: int) -> list[int]:
        if count < 1:
            raise ValueError("Reserve at least one stream id")
        first = self.counter.fetch_add(count)
        return [4 * (first + i) + self.kind for i in range(count)]
