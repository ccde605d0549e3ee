"""Registration of kernel-numbered and kernel-sent packets in loss recovery: every ordering."""

from __future__ import annotations

import pytest
from aioquic.quic.packet import QuicPacketType
from aioquic.quic.packet_builder import QuicDeliveryState, QuicSentPacket
from aioquic.quic.rangeset import RangeSet
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.tls import Epoch

from relay.quic.fastpath import WireNumber
from relay.quic.recovery import FastPathRecovery, PacketNumberCollision

SIZE = 1000


class Deliveries:
    def __init__(self) -> None:
        self.seen: list[tuple[int, QuicDeliveryState]] = []

    def handler(self, pn: int):  # type: ignore[no-untyped-def]
        return (lambda state, number: self.seen.append((number, state)), (pn,))

    def of(self, state: QuicDeliveryState) -> list[int]:
        return [pn for pn, s in self.seen if s == state]


def recovery(kernel_numbers_packets: bool = True) -> tuple[FastPathRecovery, QuicPacketSpace]:
    loss = FastPathRecovery(kernel_numbers_packets=kernel_numbers_packets,
                            congestion_control_algorithm="reno", initial_rtt=0.1,
                            max_datagram_size=1200, peer_completed_address_validation=True,
                            send_probe=lambda: None)
    space = QuicPacketSpace(is_application_data=True)
    loss.spaces = [space]
    loss.handshake_confirmed = True
    loss.track_external()
    return loss, space


def packet(pn: int, deliveries: Deliveries, sent_time: float = 0.0) -> QuicSentPacket:
    p = QuicSentPacket(epoch=Epoch.ONE_RTT, in_flight=True, is_ack_eliciting=True,
                       is_crypto_packet=False, packet_number=pn, packet_type=QuicPacketType.ONE_RTT,
                       sent_time=sent_time, sent_bytes=SIZE)
    p.delivery_handlers.append(deliveries.handler(pn))
    return p


def ack(loss: FastPathRecovery, space: QuicPacketSpace, *ranges: range, now: float = 0.01) -> None:
    loss.on_ack_received(ack_rangeset=RangeSet(ranges), ack_delay=0.0, now=now, space=space)


# --- forwarded (kernel-sent) packets ------------------------------------------------------

def test_insert_record_before_ack() -> None:
    loss, space = recovery()
    d = Deliveries()
    for pn in range(5):
        loss.insert(packet=packet(pn, d), space=space)
    assert loss.bytes_in_flight == 5 * SIZE
    ack(loss, space, range(0, 5))
    assert d.of(QuicDeliveryState.ACKED) == [0, 1, 2, 3, 4]
    assert space.sent_packets == {} and loss.bytes_in_flight == 0
    assert loss.acked_before_registration == 0


def test_insert_ack_before_record() -> None:
    loss, space = recovery()
    d = Deliveries()
    ack(loss, space, range(0, 3))  # the ring buffer is behind: nothing known yet
    assert d.seen == []
    for pn in range(4):
        assert loss.insert(packet=packet(pn, d), space=space) is (pn == 3)
    assert d.of(QuicDeliveryState.ACKED) == [0, 1, 2]
    assert list(space.sent_packets) == [3]
    assert loss.bytes_in_flight == SIZE  # early-acked packets never count in flight
    assert loss.acked_before_registration == 3
    # Not declared lost later either, though largest_acked already passed them.
    ack(loss, space, range(3, 4))
    assert d.of(QuicDeliveryState.LOST) == []
    assert d.of(QuicDeliveryState.ACKED) == [0, 1, 2, 3]


def test_duplicate_ack_does_not_mark_later_records_acked() -> None:
    loss, space = recovery()
    d = Deliveries()
    loss.insert(packet=packet(0, d), space=space)
    ack(loss, space, range(0, 1))
    ack(loss, space, range(0, 1))  # repeated: 0 is registered, so not remembered as early
    loss.insert(packet=packet(1, d), space=space)
    assert list(space.sent_packets) == [1]
    assert d.of(QuicDeliveryState.ACKED) == [0]


def test_out_of_order_records_stay_sorted() -> None:
    loss, space = recovery()
    d = Deliveries()
    for pn in (10, 2, 3):
        loss.insert(packet=packet(pn, d), space=space)
    assert list(space.sent_packets) == [2, 3, 10]
    assert loss.out_of_order_inserts == 2
    ack(loss, space, range(2, 4))
    # The notes' pitfall: unsorted [10, 2, 3] would have fired packet 10's ACK handler too.
    assert d.of(QuicDeliveryState.ACKED) == [2, 3]
    assert list(space.sent_packets) == [10]


def test_late_record_below_the_packet_threshold_is_lost_not_acked() -> None:
    loss, space = recovery()
    d = Deliveries()
    for pn in range(5, 10):
        loss.insert(packet=packet(pn, d), space=space)
    ack(loss, space, range(5, 10))
    loss.insert(packet=packet(1, d), space=space)  # not in any ACK: a gap the peer saw
    loss.insert(packet=packet(10, d), space=space)
    ack(loss, space, range(5, 11))  # loss detection runs on an ACK that acknowledges something
    assert d.of(QuicDeliveryState.LOST) == [1]
    assert 1 not in d.of(QuicDeliveryState.ACKED)


def test_mixed_order_registration_and_acks() -> None:
    loss, space = recovery()
    d = Deliveries()
    order = [4, 0, 7, 1, 2, 6, 3, 5]
    for pn in order[:4]:
        loss.insert(packet=packet(pn, d), space=space)
    ack(loss, space, range(0, 3), range(5, 7))
    for pn in order[4:]:
        loss.insert(packet=packet(pn, d), space=space)
    assert list(space.sent_packets) == sorted(space.sent_packets)
    ack(loss, space, range(3, 5), range(7, 8))
    assert sorted(d.of(QuicDeliveryState.ACKED)) == list(range(8))
    assert d.of(QuicDeliveryState.LOST) == []
    assert loss.bytes_in_flight == 0


# --- userspace packets numbered by the kernel ------------------------------------------------

def test_userspace_packet_waits_for_its_wire_number() -> None:
    loss, space = recovery()
    d = Deliveries()
    built = packet(0x10005, d)
    loss.on_packet_sent(packet=built, space=space)
    assert space.sent_packets == {} and loss.parked_packets == 1
    assert loss.bytes_in_flight == 0
    inserted = loss.on_wire_number(WireNumber(built_pn=0x0005, wire_pn=42, size=900, sent_time=1.5))
    assert inserted is built
    assert list(space.sent_packets) == [42]
    assert (built.packet_number, built.sent_time, built.sent_bytes) == (42, 1.5, 900)
    assert loss.bytes_in_flight == 900 and loss.parked_packets == 0
    ack(loss, space, range(42, 43), now=1.6)
    assert d.of(QuicDeliveryState.ACKED) == [0x10005]


def test_wire_number_before_the_packet_is_parked() -> None:
    loss, space = recovery()
    d = Deliveries()
    assert loss.on_wire_number(WireNumber(built_pn=7, wire_pn=3, size=SIZE, sent_time=0.0)) is None
    loss.on_packet_sent(packet=packet(7, d), space=space)
    assert list(space.sent_packets) == [3]
    assert loss.numbered_before_parked == 1


def test_userspace_and_forwarded_interleave_by_wire_number() -> None:
    loss, space = recovery()
    d = Deliveries()
    loss.on_packet_sent(packet=packet(100, d), space=space)
    loss.on_packet_sent(packet=packet(101, d), space=space)
    loss.insert(packet=packet(1, d), space=space)  # forwarded, wire 1
    loss.on_wire_number(WireNumber(built_pn=101, wire_pn=2, size=SIZE, sent_time=0.0))
    loss.on_wire_number(WireNumber(built_pn=100, wire_pn=0, size=SIZE, sent_time=0.0))
    assert list(space.sent_packets) == [0, 1, 2]


def test_two_parked_packets_with_the_same_low_bytes_collide() -> None:
    loss, space = recovery()
    d = Deliveries()
    loss.on_packet_sent(packet=packet(0x00001, d), space=space)
    with pytest.raises(PacketNumberCollision):
        loss.on_packet_sent(packet=packet(0x10001, d), space=space)


def test_packet_the_kernel_never_sent_is_lost() -> None:
    loss, space = recovery()
    d = Deliveries()
    loss.on_packet_sent(packet=packet(9, d), space=space)
    assert loss.discard_parked(9) is not None
    assert d.of(QuicDeliveryState.LOST) == [9]
    assert loss.parked_packets == 0


def test_without_kernel_numbering_packets_go_straight_in() -> None:
    loss, space = recovery(kernel_numbers_packets=False)
    d = Deliveries()
    loss.on_packet_sent(packet=packet(5, d), space=space)
    assert list(space.sent_packets) == [5] and loss.parked_packets == 0
