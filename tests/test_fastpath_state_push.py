"""Which congestion fields the runtime stores in fr_subs (relay.fastpath.controller
`congestion_writes`): only those that change what the kernel decides, never leaving the
kernel more permissive than aioquic."""

from __future__ import annotations

import random

from relay.fastpath import layout as L
from relay.fastpath.controller import (
    LOW_ROOM,
    PN_SLACK,
    KernelView,
    congestion_writes,
    pn_len_needed,
)

SIZE = 1100


def test_pn_len_needed_mirrors_the_kernel() -> None:
    # bpf/quic.h quic_pn_len_needed: twice the unacknowledged count must fit
    assert pn_len_needed(0, L.PN_NONE) == 1
    assert pn_len_needed(126, L.PN_NONE) == 1
    assert pn_len_needed(127, L.PN_NONE) == 2
    assert pn_len_needed(1000, 873) == 1
    assert pn_len_needed(1000, 872) == 2
    assert pn_len_needed(1 << 15, 0) == 3
    assert pn_len_needed(1 << 23, 0) == 4
    assert pn_len_needed(1 << 31, 0) == 5


def test_an_unknown_view_is_stored_whole() -> None:
    view = KernelView()
    writes = congestion_writes(view, 12000, 2200, 5)
    assert writes == {"cwnd": 12000, "bytes_in_flight": 2200, "largest_acked": 5}
    assert (view.cwnd, view.bytes_in_flight, view.largest_acked) == (12000, 2200, 5)
    assert congestion_writes(view, 12000, 2200, 5) == {}


def test_forwarded_packets_are_counted_by_the_kernel_itself() -> None:
    view = KernelView(cwnd=12000, bytes_in_flight=0, largest_acked=0, next_pn=10)
    bif = 0
    for pn in range(10, 15):
        view.forwarded(pn, SIZE)  # the egress program added it to bytes_in_flight
        bif += SIZE               # aioquic counts the registered packet alike
    assert congestion_writes(view, 12000, bif, 0) == {}
    assert view.next_pn == 15


def test_acks_in_a_wide_window_are_stored_once_the_kernel_is_a_quarter_too_strict() -> None:
    cwnd = 4 * LOW_ROOM
    view = KernelView(cwnd=cwnd, bytes_in_flight=0, largest_acked=0, next_pn=0)
    for pn in range(40):
        view.forwarded(pn, SIZE)
    bif = 40 * SIZE
    room_before = cwnd - bif
    acked = 0
    while True:
        acked += 1
        writes = congestion_writes(view, cwnd, bif - acked * SIZE, acked - 1)
        room = cwnd - (bif - acked * SIZE)
        if writes:
            break
        # skipped: the kernel's room is smaller than aioquic's, by less than a quarter
        assert room_before <= room and room_before >= room - room // 4
    assert acked > 1
    assert writes["bytes_in_flight"] == bif - acked * SIZE
    assert "cwnd" not in writes  # unchanged: not stored again


def test_acks_in_a_narrow_window_are_stored_at_once() -> None:
    view = KernelView(cwnd=12000, bytes_in_flight=0, largest_acked=0, next_pn=0)
    for pn in range(8):
        view.forwarded(pn, SIZE)
    assert congestion_writes(view, 12000, 7 * SIZE, 0) == {"bytes_in_flight": 7 * SIZE}


def test_a_smaller_window_is_stored_at_once() -> None:
    view = KernelView(cwnd=20000, bytes_in_flight=4400, largest_acked=3, next_pn=8)
    # a loss: aioquic halved the window, the kernel must not send into the old one
    writes = congestion_writes(view, 10000, 4400, 3)
    assert writes == {"cwnd": 10000}


def test_largest_acked_is_stored_before_it_would_lengthen_packet_numbers() -> None:
    view = KernelView(cwnd=20000, bytes_in_flight=0, largest_acked=0, next_pn=2)
    assert congestion_writes(view, 20000, 0, 1) == {}  # one byte of PN either way
    view.next_pn = 128 - PN_SLACK
    writes = congestion_writes(view, 20000, 0, 60)
    assert writes == {"largest_acked": 60}
    assert congestion_writes(view, 20000, 0, 59) == {}  # never backwards


def test_random_runs_keep_the_kernel_never_more_permissive() -> None:
    rng = random.Random(7)
    for _ in range(50):
        view = KernelView(cwnd=12000, bytes_in_flight=0, next_pn=0)
        cwnd, in_flight, unacked, largest, next_pn, stores = 12000, 0, [], 0, 0, 0
        for _ in range(400):
            what = rng.random()
            if what < 0.5:  # the kernel forwards a packet, the record is applied
                size = rng.randint(100, 1200)
                view.forwarded(next_pn, size)
                unacked.append((next_pn, size))
                in_flight += size
                next_pn += 1
            elif what < 0.9 and unacked:  # an ACK of the oldest packets
                n = rng.randint(1, len(unacked))
                for pn, size in unacked[:n]:
                    in_flight -= size
                    cwnd += size // 2
                    largest = max(largest, pn)
                del unacked[:n]
            elif what < 0.95:  # a loss: the window shrinks, the packet leaves the flight
                cwnd = max(2400, cwnd // 2)
                if unacked:
                    in_flight -= unacked.pop(0)[1]
            writes = congestion_writes(view, cwnd, in_flight, largest)
            stores += len(writes)
            assert view.cwnd is not None and view.bytes_in_flight is not None
            kernel_room, room = view.cwnd - view.bytes_in_flight, cwnd - in_flight
            assert kernel_room <= room
            assert kernel_room == room or kernel_room >= max(LOW_ROOM, room - room // 4)
            ahead = next_pn + PN_SLACK
            assert pn_len_needed(ahead, view.largest_acked) == pn_len_needed(ahead, largest)
        assert stores < 400  # far fewer stores than state changes
