"""The fast-path hooks against unmodified peers, with the kernel played in-process.

The relay is a pass-through server behind `FastPathEmulator` (wire packet numbers, forwarded
packets, key export, loss); the peer is stock aioquic or qh3 (client only: qh3 2.1.0's server
has a known builder quirk, notes/aioquic.md §13).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aioquic.tls import Epoch

from relay.quic.connection import FastrelayQuicConnection, KeyUpdateNotAllowed
from relay.quic.fastpath import (
    CongestionChanged,
    CounterStreamIdAllocator,
    CreditChanged,
    ForwardedFrame,
    ForwardedPacket,
    ForwardedPacketLost,
    HostConnectionIdIssued,
    HostConnectionIdRetired,
    InMemoryCounter,
    PeerAddressChanged,
    PeerConnectionIdChanged,
    StreamCreditChanged,
    StreamIdAllocator,
)
from tests.quic_harness import FastPathEmulator, KernelEmulator, Pair, client_and_server

PEERS = ["aioquic", "qh3"]
LOSS = 0.05
MAX_ROUNDS = 4000
MAX_TIME = 30.0  # simulated seconds


def is_event(event: object, name: str) -> bool:
    return type(event).__name__ == name  # qh3's events are its own classes, same names


def received(pair: Pair, stream_id: int) -> bytes:
    return b"".join(e.data for e in pair.client_events
                    if is_event(e, "StreamDataReceived") and e.stream_id == stream_id)


def received_by_relay(pair: Pair, stream_id: int) -> bytes:
    return b"".join(e.data for e in pair.server_events
                    if is_event(e, "StreamDataReceived") and e.stream_id == stream_id)


@contextmanager
def fast_path(tmp: Path, peer: str = "aioquic", **emulator: Any) -> Iterator[tuple[Pair, FastPathEmulator]]:
    keys = KernelEmulator()
    allocator = CounterStreamIdAllocator(InMemoryCounter(), kind=3)  # server-initiated uni
    with client_and_server(tmp, server_backend=keys, stock_client=peer == "aioquic",
                           qh3_client=peer == "qh3",
                           extra_server_kwargs={"kernel_numbers_packets": True,
                                                "stream_id_allocator": allocator}) as pair:
        emu = FastPathEmulator(pair, keys, allocator, **emulator)
        pair.pump()
        assert any(is_event(e, "HandshakeCompleted") for e in pair.server_events)
        yield pair, emu


def settle(pair: Pair, emu: FastPathEmulator) -> None:
    """Run until quiet (bounded in rounds and simulated time), then drain the last records."""
    start = pair.rounds_run
    relay_space = pair.server._spaces[Epoch.ONE_RTT]
    while pair.rounds_run - start < MAX_ROUNDS and pair.now < MAX_TIME:
        pair.pump(rounds=200, max_time=MAX_TIME)
        emu.flush()  # records of the last packets arm the relay's loss timer
        if (not emu.forwarding and relay_space.ack_eliciting_in_flight == 0
                and pair.server._loss.parked_packets == 0):
            break
    else:
        raise AssertionError(f"not quiet after {pair.rounds_run - start} rounds, t={pair.now:.3f}s")


def payload(seed: int, size: int) -> bytes:
    return bytes((seed * 31 + i * 7) & 0xFF for i in range(size))


def relay_phase(pair: Pair) -> int:
    return pair.server._cryptos[Epoch.ONE_RTT].key_phase


def assert_peer_acked_everything(pair: Pair, peer: str) -> None:
    """The peer has an ACK for a packet of its current phase: it sent data that is now all acknowledged."""
    if peer == "aioquic":
        space = pair.client._spaces[Epoch.ONE_RTT]
        assert space.ack_eliciting_in_flight == 0 and space.largest_acked_packet > 0
    # qh3 keeps recovery in Rust: quiescence (no retransmission timer fired) stands for it


# --- the whole picture: loss, key updates, forwarded and userspace streams --------------------

@pytest.mark.parametrize("peer", PEERS)
def test_forwarded_and_userspace_streams_survive_loss_and_key_updates(tmp_path: Path, peer: str) -> None:
    with fast_path(tmp_path, peer, seed=3, shuffle_records=True, record_lag=1,
                   shadow="after") as (pair, emu):
        relay: FastrelayQuicConnection = pair.server
        emu.loss_to_peer = emu.loss_to_relay = LOSS
        expected: dict[int, bytes] = {}
        sent_by_peer: dict[int, bytes] = {}

        def traffic(round_: int) -> None:
            for i in range(3):
                data = payload(10 * round_ + i, 12_000 + 3_000 * i)
                expected[emu.publish(data)] = data
            sid = relay.get_next_available_stream_id(is_unidirectional=True)
            data = payload(100 + round_, 20_000)
            relay.send_stream_data(sid, data, end_stream=True)
            expected[sid] = data
            up = pair.client.get_next_available_stream_id(is_unidirectional=True)
            sent_by_peer[up] = payload(200 + round_, 20_000)
            pair.client.send_stream_data(up, sent_by_peer[up], end_stream=True)
            settle(pair, emu)

        traffic(0)
        assert relay_phase(pair) == 0 and emu.peer_key_phases[-1] == 0

        # relay-initiated update, only once a packet of phase 0 was acknowledged
        assert relay.key_update_allowed
        relay.request_key_update()
        traffic(1)
        assert relay_phase(pair) == 1 and emu.relay_key_phases[-1] == 1
        assert emu.peer_key_phases[-1] == 1, "the peer must follow the relay's update"
        if peer == "aioquic":
            assert pair.client._cryptos[Epoch.ONE_RTT].key_phase == 1

        # peer-initiated update, once the peer's phase-1 data was acknowledged
        assert_peer_acked_everything(pair, peer)
        pair.client.request_key_update()
        traffic(2)
        assert emu.peer_key_phases[-1] == 0
        assert relay_phase(pair) == 0 and emu.relay_key_phases[-1] == 0
        if peer == "aioquic":
            assert pair.client._cryptos[Epoch.ONE_RTT].key_phase == 0

        # byte-exact, both ways
        for sid, data in expected.items():
            assert received(pair, sid) == data, f"stream {sid}"
        for sid, data in sent_by_peer.items():
            assert received_by_relay(pair, sid) == data, f"peer stream {sid}"
        assert not any(is_event(e, "ConnectionTerminated") for e in pair.client_events + pair.server_events)

        # every dropped forwarded packet: declared lost exactly once, resent on the same id
        assert emu.dropped_forwarded, "no forwarded packet was dropped"
        assert emu.dropped_userspace, "no userspace packet was dropped"
        assert emu.dropped_to_relay, "no peer packet was dropped"
        lost = Counter(e.packet.wire_pn for e in emu.events if isinstance(e, ForwardedPacketLost))
        assert all(count == 1 for count in lost.values())
        assert set(emu.dropped_forwarded) <= set(lost)
        for wire_pn in emu.dropped_forwarded:
            for frame in emu.forwarded[wire_pn].frames:
                resent = [f for f in emu.userspace_frames
                          if f.stream_id == frame.stream_id and f.wire_pn > wire_pn
                          and f.offset < frame.stop and f.offset + f.length > frame.offset]
                covered = set()
                for f in resent:
                    covered |= set(range(max(f.offset, frame.offset), min(f.offset + f.length, frame.stop)))
                assert covered == set(range(frame.offset, frame.stop)), f"wire pn {wire_pn} not resent"
        resent_frames = [f for f in emu.userspace_frames if f.stream_id in {
            fr.stream_id for pn in emu.dropped_forwarded for fr in emu.forwarded[pn].frames}]
        print(f"\n{peer}: forwarded {len(emu.forwarded)}, dropped {len(emu.dropped_forwarded)}, "
              f"declared lost {sum(lost.values())} ({len(set(lost) - set(emu.dropped_forwarded))} by PTO "
              f"without a drop), resent frames on those ids {len(resent_frames)}; userspace dropped "
              f"{emu.dropped_userspace}/{len(emu.relay_key_phases)}, peer dropped "
              f"{emu.dropped_to_relay}; relay phases {sorted(set(emu.relay_key_phases))}; "
              f"parked deliveries {relay.fastpath.deliveries_parked}; out-of-order inserts "
              f"{relay._loss.out_of_order_inserts}; "
              f"ACK before record {relay._loss.acked_before_registration}")
        # what the fast path had to park because the ACK overtook the data
        assert relay.fastpath.deliveries_parked == relay.fastpath.deliveries_replayed
        assert relay.fastpath.forwarded_registered == len(emu.forwarded)
        assert relay._loss.parked_packets == 0


# --- stream ids ---------------------------------------------------------------------------------

def test_counter_allocator_hands_out_each_id_once() -> None:
    counter = InMemoryCounter()
    uni = CounterStreamIdAllocator(counter, kind=3)
    assert isinstance(uni, StreamIdAllocator)
    assert uni.reserve(3) == [3, 7, 11]
    assert uni.reserve(1) == [15]
    assert counter.value == 4
    with pytest.raises(ValueError, match="at least one"):
        uni.reserve(0)
    with pytest.raises(ValueError, match="kind must be 0..3"):
        CounterStreamIdAllocator(counter, kind=4)


def test_streams_adopted_in_any_order(tmp_path: Path) -> None:
    with fast_path(tmp_path) as (pair, emu):
        relay: FastrelayQuicConnection = pair.server
        ids = relay.reserve_stream_ids(3)
        assert ids == [3, 7, 11]
        for sid in (11, 3, 7):  # stock aioquic refuses 3 and 7 after 11
            relay.send_stream_data(sid, payload(sid, 3000), end_stream=True)
        peeked = relay.get_next_available_stream_id(is_unidirectional=True)
        assert peeked == relay.get_next_available_stream_id(is_unidirectional=True) == 15
        forwarded = emu.publish(payload(99, 5000))  # the kernel takes the next id
        assert forwarded == 19
        relay.send_stream_data(peeked, b"after", end_stream=True)
        settle(pair, emu)
        for sid in ids:
            assert received(pair, sid) == payload(sid, 3000)
        assert received(pair, 15) == b"after"
        assert received(pair, 19) == payload(99, 5000)
        assert relay.fastpath.streams_adopted_out_of_order == 2
        assert relay.get_next_available_stream_id(is_unidirectional=True) == 23


def test_forwarded_stream_first_seen_in_a_record_is_adopted(tmp_path: Path) -> None:
    with fast_path(tmp_path) as (pair, emu):
        relay = pair.server
        first = emu.publish(payload(1, 4000))
        second = relay.get_next_available_stream_id(is_unidirectional=True)
        relay.send_stream_data(second, b"userspace", end_stream=True)  # opened before the record
        settle(pair, emu)
        assert (first, second) == (3, 7)
        assert received(pair, first) == payload(1, 4000)
        assert received(pair, second) == b"userspace"


# --- shadow writes and ACK/LOST before the data ------------------------------------------------

def test_ack_before_shadow_write_is_replayed(tmp_path: Path) -> None:
    with fast_path(tmp_path, shadow="after") as (pair, emu):
        relay = pair.server
        sid = emu.publish(payload(5, 8000))
        settle(pair, emu)
        assert received(pair, sid) == payload(5, 8000)
        assert relay.fastpath.deliveries_parked > 0
        assert relay.fastpath.deliveries_replayed == relay.fastpath.deliveries_parked
        # every byte and the FIN acknowledged through replayed deliveries
        assert sid not in relay._streams or relay._streams[sid].sender.is_finished


def test_lost_before_shadow_write_is_resent_once_the_data_is_there(tmp_path: Path) -> None:
    with fast_path(tmp_path, shadow="after", seed=11, loss_to_peer=0.3) as (pair, emu):
        relay = pair.server
        sid = emu.publish(payload(6, 20_000))
        settle(pair, emu)
        assert emu.dropped_forwarded
        assert received(pair, sid) == payload(6, 20_000)
        assert relay.fastpath.forwarded_lost >= len(emu.dropped_forwarded)


def test_shadow_write_checks_the_offset(tmp_path: Path) -> None:
    with fast_path(tmp_path) as (pair, _):
        relay = pair.server
        sid = relay.reserve_stream_ids(1)[0]
        relay.shadow_write(sid, b"abc", offset=0)
        with pytest.raises(ValueError, match="offset 5, stream 3 is at 3"):
            relay.shadow_write(sid, b"def", offset=5)
        relay.shadow_write(sid, b"", offset=3, end_stream=True)
        with pytest.raises(RuntimeError, match="after FIN"):
            relay.shadow_write(sid, b"x")


# --- credit and congestion ------------------------------------------------------------------------

def test_credit_snapshot_after_handshake_and_shadow_write(tmp_path: Path) -> None:
    with fast_path(tmp_path) as (pair, emu):
        relay = pair.server
        credit = relay.credit_snapshot()
        config = pair.client._configuration
        assert credit.max_data == config.max_data
        assert credit.initial_max_stream_data_uni == config.max_stream_data
        assert credit.max_streams_uni == pair.client._local_max_streams_uni.value
        assert credit.max_streams_bidi == pair.client._local_max_streams_bidi.value
        first = [e.credit for e in emu.events if isinstance(e, CreditChanged)]
        assert first == [credit]  # reported when the peer's transport parameters arrived
        used = credit.data_used
        sid = relay.reserve_stream_ids(1)[0]
        relay.shadow_write(sid, bytes(1234))
        after = relay.credit_snapshot()
        assert after.data_used == used + 1234
        assert after.data_available == credit.data_available - 1234
        stream = relay.stream_credit_snapshot(sid)
        assert stream is not None
        assert (stream.max_stream_data, stream.highest_offset) == (config.max_stream_data, 1234)
        assert relay.stream_credit_snapshot(999) is None


def test_credit_changes_are_reported(tmp_path: Path) -> None:
    with fast_path(tmp_path) as (pair, emu):
        relay = pair.server
        config = pair.client._configuration
        big = config.max_stream_data // 2 + 50_000  # past half: the peer raises its limits
        sid = relay.get_next_available_stream_id(is_unidirectional=True)
        relay.send_stream_data(sid, bytes(big), end_stream=True)
        settle(pair, emu)
        assert len(received(pair, sid)) == big
        credits = [e.credit for e in emu.events if isinstance(e, CreditChanged)]
        assert credits[-1].max_data > config.max_data
        stream_credits = [e.credit for e in emu.events if isinstance(e, StreamCreditChanged)]
        assert stream_credits and stream_credits[-1].stream_id == sid
        assert stream_credits[-1].max_stream_data > config.max_stream_data
        # aioquic 1.7.2 grants streams as they close, and batches MAX_STREAMS until the peer
        # has fewer left to open than the update would grant: close 70 of 128.
        for _ in range(69):
            relay.send_stream_data(relay.get_next_available_stream_id(is_unidirectional=True),
                                   b"s", end_stream=True)
        settle(pair, emu)
        credits = [e.credit for e in emu.events if isinstance(e, CreditChanged)]
        assert credits[-1].max_streams_uni == 128 + 70 == pair.client._local_max_streams_uni.value
        assert credits[-1] == dataclasses.replace(relay.credit_snapshot(), data_used=credits[-1].data_used)


def test_congestion_snapshots_follow_bytes_in_flight(tmp_path: Path) -> None:
    with fast_path(tmp_path) as (pair, emu):
        relay = pair.server
        emu.events.clear()
        relay.send_stream_data(relay.get_next_available_stream_id(is_unidirectional=True),
                               bytes(30_000), end_stream=True)
        datagrams = relay.datagrams_to_send(now=pair.now)  # built, not yet numbered
        parked = relay.congestion_snapshot()
        assert parked.parked_packets > 0 and parked.bytes_in_flight == 0
        for data, _ in datagrams:
            pair.injected_to_client.append(emu.egress(data))
        emu.drain()
        snapshots = [e.congestion for e in emu.events if isinstance(e, CongestionChanged)]
        assert max(s.bytes_in_flight for s in snapshots) > 0
        settle(pair, emu)
        final = relay.congestion_snapshot()
        assert final.bytes_in_flight == 0 and final.parked_packets == 0
        assert final.congestion_window == relay._loss.congestion_window
        assert final.available == final.congestion_window
        assert [e.congestion for e in emu.events if isinstance(e, CongestionChanged)][-1] == final


# --- key update rule (RFC 9001 §6.1) ----------------------------------------------------------

def test_second_key_update_waits_for_an_ack_in_the_new_phase(tmp_path: Path) -> None:
    with fast_path(tmp_path) as (pair, emu):
        relay = pair.server
        relay.send_stream_data(relay.get_next_available_stream_id(is_unidirectional=True), b"x" * 100)
        settle(pair, emu)
        assert relay.key_update_allowed
        relay.request_key_update()
        relay.send_stream_data(relay.get_next_available_stream_id(is_unidirectional=True), b"y" * 100)
        for data, _ in relay.datagrams_to_send(now=pair.now):  # phase-1 packets...
            pair.injected_to_client.append(emu.egress(data))
        emu.drain()  # ...are numbered, not yet acknowledged
        assert not relay.key_update_allowed
        with pytest.raises(KeyUpdateNotAllowed):
            relay.request_key_update()


# --- connection ids and addresses ------------------------------------------------------------------

def test_host_cids_reported_before_use_and_on_retirement(tmp_path: Path) -> None:
    made: list[bytes] = []

    def factory(sequence_number: int) -> bytes:
        made.append(bytes([0xC0 | sequence_number]) + bytes(7))
        return made[-1]

    keys = KernelEmulator()
    events: list[Any] = []
    with client_and_server(tmp_path, server_backend=keys, stock_client=True,
                           extra_server_kwargs={"host_cid_factory": factory,
                                                "listener": events.append}) as pair:
        pair.to_server, pair.to_client = keys.ingress, keys.egress
        pair.pump()
        relay = pair.server
        issued = [e for e in events if isinstance(e, HostConnectionIdIssued)]
        assert [e.sequence_number for e in issued] == list(range(8))
        assert [e.cid for e in issued] == made
        assert relay.host_cid == made[0]
        # the peer uses the factory's CIDs: its destination is seq 0, its spares the rest
        assert pair.client._peer_cid.cid == made[0]
        assert {c.cid for c in pair.client._peer_cid_available} == set(made[1:])
        # the peer moves to a new CID and retires seq 0: reported, and a replacement issued
        pair.client.change_connection_id()
        pair.pump()
        retired = [e for e in events if isinstance(e, HostConnectionIdRetired)]
        assert [(e.sequence_number, e.cid) for e in retired] == [(0, made[0])]
        assert [e.sequence_number for e in events if isinstance(e, HostConnectionIdIssued)][-1] == 8


def test_peer_cid_change_reaches_the_forwarding_path(tmp_path: Path) -> None:
    with fast_path(tmp_path) as (pair, emu):
        relay = pair.server
        changes = [e for e in emu.events if isinstance(e, PeerConnectionIdChanged)]
        assert changes and changes[-1].new == relay._peer_cid.cid and changes[0].old is None
        old = emu.peer_cid
        relay.change_connection_id()
        changes = [e for e in emu.events if isinstance(e, PeerConnectionIdChanged)]
        assert changes[-1].old == old and changes[-1].new != old
        assert emu.peer_cid == changes[-1].new
        sid = emu.publish(payload(3, 6000))  # forwarded with the new CID
        settle(pair, emu)
        assert received(pair, sid) == payload(3, 6000)


def test_peer_address_change_is_reported(tmp_path: Path) -> None:
    with fast_path(tmp_path) as (pair, emu):
        relay = pair.server
        first = [e for e in emu.events if isinstance(e, PeerAddressChanged)]
        assert [(e.old, e.new) for e in first] == [(None, ("1.2.3.4", 1234))]
        # the peer's NAT rebinds: its next datagrams come from a new port
        pair.client.send_stream_data(pair.client.get_next_available_stream_id(is_unidirectional=True),
                                     b"moved", end_stream=True)
        for data, _ in pair.client.datagrams_to_send(now=pair.now):
            emu.drain()
            relay.receive_datagram(emu.ingress(data), ("1.2.3.4", 4321), now=pair.now)
        pair.to_server = None  # keep the harness from delivering from the old address
        changes = [e for e in emu.events if isinstance(e, PeerAddressChanged)]
        assert changes[-1].new == ("1.2.3.4", 4321)
        assert relay.get_peer_address() == ("1.2.3.4", 4321)


# --- handing a live connection over to the kernel ---------------------------------------------

def test_hand_over_starts_above_every_id_and_number_userspace_used(tmp_path: Path) -> None:
    """A relay session may have been handed stream id 3 (the MoQ session writes it later)
    when the fast path takes the connection over: the shared counter starts above it, and
    the kernel's packet numbers continue aioquic's."""
    with client_and_server(tmp_path, stock_client=True) as pair:
        pair.pump()
        relay = pair.server
        assert relay.take_uni_stream_id() == 3  # handed to the session, not opened yet
        assert relay.next_local_uni_index == 1
        counter = InMemoryCounter(relay.next_local_uni_index)
        built = relay._packet_number
        assert relay.hand_numbering_to_kernel(CounterStreamIdAllocator(counter, kind=3)) == built
        assert relay._loss.kernel_numbers_packets
        assert relay.take_uni_stream_id() == 7
        assert counter.value == 2


def test_a_record_after_the_peer_closed_does_not_extend_the_drain(tmp_path: Path) -> None:
    # The kernel reports packets it forwarded before it heard of the close; registering them
    # must leave the drain (3 PTO) alone, not re-arm the idle timeout (the connection, and its
    # entries in the kernel's maps, would linger for the whole idle timeout).
    with fast_path(tmp_path) as (pair, emu):
        relay = pair.server
        sid = emu.publish(payload(9, 1000))
        pair.client.close(error_code=0, reason_phrase="done")
        for _ in range(50):
            if relay._state.name in ("DRAINING", "TERMINATED"):
                break
            pair.pump(rounds=1)
        assert relay._state.name == "DRAINING", relay._state
        drain_end = relay._close_at
        assert drain_end is not None and drain_end < pair.now + relay._idle_timeout() / 2
        # as when the peer's last ACK came after the relay's last ack-eliciting packet
        relay._ack_eliciting_sent_since_receipt = False
        relay.register_forwarded(ForwardedPacket(1_000, 1200, pair.now,
                                                 (ForwardedFrame(sid, 0, 1000, True),), 0))
        assert relay._close_at == drain_end
