"""Loss recovery that knows the packets the kernel numbered or sent (aioquic 1.7.2 `recovery.py`).

aioquic keys `QuicPacketSpace.sent_packets` by packet number and, since 1.7.0, relies on
dict insertion order being packet-number order when it processes an ACK (bisect over
`list(space.sent_packets)`). With a fast path:

- the kernel owns the wire packet numbers of 1-RTT packets: a packet userspace built is
  *parked* under the 2 bytes of packet number aioquic wrote until the kernel reports the
  wire number it gave it; only then does it enter `sent_packets` (keyed by wire number,
  so the peer's ACKs apply directly);
- packets the kernel sent on its own (forwarded) are inserted from registration records;
- records arrive late and out of order: insertion keeps `sent_packets` sorted, and an ACK
  that names a wire number not registered yet is remembered, so the packet is taken as
  acknowledged when its record arrives (instead of waiting in flight and being declared
  lost by the packet threshold).
"""

from __future__ import annotations

from typing import Any

from aioquic.quic.packet import QuicPacketType
from aioquic.quic.packet_builder import QuicDeliveryState, QuicSentPacket
from aioquic.quic.rangeset import RangeSet
from aioquic.quic.recovery import QuicPacketRecovery, QuicPacketSpace

from relay.quic.fastpath import BUILT_PN_MASK, WireNumber

#: Acknowledged-but-unregistered ranges kept at most (records that never come, e.g. a
#: ring buffer overrun, must not grow memory without bound).
MAX_EARLY_ACK_RANGES = 256


class PacketNumberCollision(RuntimeError):
    """Two unreported userspace packets share the 2 packet-number bytes aioquic wrote."""


class FastPathRecovery(QuicPacketRecovery):
    def __init__(self, *, kernel_numbers_packets: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: When True, 1-RTT packets built by userspace wait for their wire number.
        self.kernel_numbers_packets = kernel_numbers_packets
        self._parked: dict[int, tuple[QuicSentPacket, QuicPacketSpace]] = {}
        self._numbers_before_packet: dict[int, WireNumber] = {}
        #: Application-space wire numbers ever inserted, and those ACKed before insertion.
        self._registered = RangeSet()
        self._early_acks = RangeSet()
        self._tracks_external = kernel_numbers_packets
        # counters
        self.out_of_order_inserts = 0
        self.acked_before_registration = 0
        self.numbered_before_parked = 0

    # --- what userspace built ---------------------------------------------------------

    @property
    def parked_packets(self) -> int:
        return len(self._parked)

    def parked_packet(self, built_pn: int) -> QuicSentPacket | None:
        parked = self._parked.get(built_pn & BUILT_PN_MASK)
        return parked[0] if parked is not None else None

    def on_packet_sent(self, *, packet: QuicSentPacket, space: QuicPacketSpace) -> None:
        if not (self.kernel_numbers_packets and packet.packet_type == QuicPacketType.ONE_RTT):
            self.insert(packet=packet, space=space)
            return
        key = packet.packet_number & BUILT_PN_MASK
        early = self._numbers_before_packet.pop(key, None)
        if early is not None:
            self._apply_number(packet, space, early)
            return
        if key in self._parked:
            raise PacketNumberCollision(
                f"Packet {packet.packet_number} built while packet "
                f"{self._parked[key][0].packet_number} still awaits its wire number")
        self._parked[key] = (packet, space)

    def on_wire_number(self, number: WireNumber) -> QuicSentPacket | None:
        """The kernel numbered a packet userspace built; returns it once it is in `sent_packets`."""
        key = number.built_pn & BUILT_PN_MASK
        parked = self._parked.pop(key, None)
        if parked is None:
            # The record overtook `datagrams_to_send` (cannot happen with a synchronous
            # egress, can with a batched one): apply it when the packet is parked.
            self._numbers_before_packet[key] = number
            self.numbered_before_parked += 1
            return None
        packet, space = parked
        self._apply_number(packet, space, number)
        return packet

    def _apply_number(self, packet: QuicSentPacket, space: QuicPacketSpace, number: WireNumber) -> None:
        packet.packet_number = number.wire_pn
        packet.sent_time = number.sent_time
        packet.sent_bytes = number.size
        self.insert(packet=packet, space=space)

    def discard_parked(self, built_pn: int) -> QuicSentPacket | None:
        """The kernel never sent this packet (e.g. dropped it for lack of keys): its data is lost."""
        parked = self._parked.pop(built_pn & BUILT_PN_MASK, None)
        if parked is None:
            return None
        packet, _ = parked
        for handler, args in packet.delivery_handlers:
            handler(QuicDeliveryState.LOST, *args)
        return packet

    # --- insertion, in packet-number order --------------------------------------------

    def insert(self, *, packet: QuicSentPacket, space: QuicPacketSpace) -> bool:
        """Track a sent packet; returns False when the peer had already acknowledged it."""
        pn = packet.packet_number
        if space.is_application_data:
            if self._tracks_external and pn in self._early_acks:
                self._early_acks.subtract(pn, pn + 1)
                self._registered.add(pn)
                self.acked_before_registration += 1
                # Never counted in flight: no congestion-control update, only the handlers.
                for handler, args in packet.delivery_handlers:
                    handler(QuicDeliveryState.ACKED, *args)
                return False
            self._registered.add(pn)
        sent = space.sent_packets
        out_of_order = bool(sent) and next(reversed(sent)) > pn
        last_ack_eliciting = self._time_of_last_sent_ack_eliciting_packet
        super().on_packet_sent(packet=packet, space=space)
        if out_of_order:
            self.out_of_order_inserts += 1
            ordered = sorted(sent.items())
            sent.clear()
            sent.update(ordered)
            # A late record must not move the PTO base backwards.
            self._time_of_last_sent_ack_eliciting_packet = max(
                last_ack_eliciting, self._time_of_last_sent_ack_eliciting_packet)
        return True

    def hand_numbering_to_kernel(self, next_pn: int) -> None:
        """From now on 1-RTT packets wait for their wire number; those below `next_pn` were
        numbered by aioquic and are tracked already."""
        self.kernel_numbers_packets = True
        self.track_external()
        if next_pn > 0:
            self._registered.add(0, next_pn)

    def track_external(self) -> None:
        """Packets will be registered from outside (forwarded): remember early ACKs from now on."""
        self._tracks_external = True

    # --- ACKs ---------------------------------------------------------------------------

    def on_ack_received(self, *, ack_rangeset: RangeSet, ack_delay: float, now: float,
                        space: QuicPacketSpace) -> None:
        if self._tracks_external and space.is_application_data:
            for r in ack_rangeset:
                unknown = RangeSet([r])
                for known in self._registered:
                    if known.start >= r.stop:
                        break
                    unknown.subtract(known.start, known.stop)
                for u in unknown:
                    self._early_acks.add(u.start, u.stop)
            while len(self._early_acks) > MAX_EARLY_ACK_RANGES:
                self._early_acks.shift()
        super().on_ack_received(ack_rangeset=ack_rangeset, ack_delay=ack_delay, now=now,
                                space=space)
