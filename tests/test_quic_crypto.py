"""1-RTT protection by backend, on in-memory aioquic connections (no sockets)."""

from __future__ import annotations

from pathlib import Path

import pytest
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, StreamDataReceived
from aioquic.quic.packet import QuicErrorCode
from aioquic.tls import CipherSuite, Epoch

from crypto_backends import NoneBackend
from crypto_backends.base import Direction, KeyTrigger
from crypto_backends.none import DISABLE_1RTT_ENCRYPTION
from relay.quic.connection import encode_transport_parameter, has_transport_parameter
from relay.quic.crypto import OneRttMode
from tests.quic_harness import KernelEmulator, Pair, client_and_server, short_header_offset

MARKER = b"fastrelay-object-payload-marker"


def is_event(event: object, kind: type) -> bool:
    # qh3's events are its own classes with aioquic's names and fields
    return type(event).__name__ == kind.__name__


def received(events: list, stream_id: int) -> bytes:
    return b"".join(e.data for e in events if is_event(e, StreamDataReceived) and e.stream_id == stream_id)


def handshake(pair: Pair) -> None:
    pair.pump()
    assert any(is_event(e, HandshakeCompleted) for e in pair.client_events)
    assert any(is_event(e, HandshakeCompleted) for e in pair.server_events)


def send_both_ways(pair: Pair, payload: bytes) -> None:
    stream = pair.client.get_next_available_stream_id(is_unidirectional=True)
    pair.client.send_stream_data(stream, payload, end_stream=True)
    back = pair.server.get_next_available_stream_id(is_unidirectional=True)
    pair.server.send_stream_data(back, payload, end_stream=True)
    pair.pump()
    assert received(pair.server_events, stream) == payload
    assert received(pair.client_events, back) == payload


def one_rtt(conn: QuicConnection) -> CryptoPair:
    return conn._cryptos[Epoch.ONE_RTT]


def one_rtt_packets(wire: list[bytes]) -> list[bytes]:
    return [d[o:] for d in wire if (o := short_header_offset(d)) is not None]


# --- transport parameter helpers ---------------------------------------------------------

def test_transport_parameter_round_trip() -> None:
    encoded = encode_transport_parameter(DISABLE_1RTT_ENCRYPTION)
    assert encoded == bytes.fromhex("8000baad00")  # 4-byte varint id, zero length
    other = encode_transport_parameter(0x04, b"\x44\x00")
    assert has_transport_parameter(other + encoded, DISABLE_1RTT_ENCRYPTION)
    assert not has_transport_parameter(other, DISABLE_1RTT_ENCRYPTION)
    assert not has_transport_parameter(b"\x80\x00", DISABLE_1RTT_ENCRYPTION)  # truncated


# --- none -------------------------------------------------------------------------------

def test_none_on_both_sides_sends_1rtt_in_clear(tmp_path: Path) -> None:
    with client_and_server(tmp_path, client_backend=NoneBackend(), server_backend=NoneBackend()) as pair:
        handshake(pair)
        assert pair.client.one_rtt_mode is OneRttMode.NULL
        assert pair.server.one_rtt_mode is OneRttMode.NULL
        send_both_ways(pair, MARKER * 40)
        for wire in (pair.wire_to_server, pair.wire_to_client):
            clear = [p for p in one_rtt_packets(wire) if MARKER in p]
            assert clear, "the object payload must be visible on the wire"
        # draft-banks: no tag either; a lone ACK-only 1-RTT packet is header + frames only
        assert all(not p.endswith(bytes(16)) or MARKER in p for p in one_rtt_packets(pair.wire_to_server))


def test_none_survives_key_updates_from_both_sides(tmp_path: Path) -> None:
    with client_and_server(tmp_path, client_backend=NoneBackend(), server_backend=NoneBackend()) as pair:
        handshake(pair)
        send_both_ways(pair, b"before")
        pair.client.request_key_update()
        send_both_ways(pair, b"after client update")
        assert one_rtt(pair.client).key_phase == one_rtt(pair.server).key_phase == 1
        pair.server.request_key_update()
        send_both_ways(pair, b"after server update")
        assert one_rtt(pair.client).key_phase == one_rtt(pair.server).key_phase == 0
        assert not any(isinstance(e, ConnectionTerminated) for e in pair.client_events + pair.server_events)


def test_standard_quic_without_backend_hides_the_payload(tmp_path: Path) -> None:
    with client_and_server(tmp_path) as pair:
        handshake(pair)
        assert pair.client.one_rtt_mode is OneRttMode.STANDARD
        send_both_ways(pair, MARKER * 40)
        assert not any(MARKER in d for d in pair.wire_to_server + pair.wire_to_client)


@pytest.mark.parametrize("side", ["client", "server"])
def test_none_against_a_peer_without_the_parameter_is_a_clear_error(tmp_path: Path, side: str) -> None:
    kwargs = ({"client_backend": NoneBackend(), "stock_server": True} if side == "client"
              else {"server_backend": NoneBackend(), "stock_client": True})
    with client_and_server(tmp_path, **kwargs) as pair:
        pair.pump()
        ours = pair.client_events if side == "client" else pair.server_events
        theirs = pair.server_events if side == "client" else pair.client_events
        for events in (ours, theirs):
            closed = [e for e in events if isinstance(e, ConnectionTerminated)]
            assert closed, f"{side}: connection must fail"
            assert closed[0].error_code == QuicErrorCode.TRANSPORT_PARAMETER_ERROR
            assert "disable_1rtt_encryption" in closed[0].reason_phrase
        assert not any(isinstance(e, StreamDataReceived) for e in ours + theirs)


# --- pass-through with an emulated kernel -------------------------------------------------

PEERS = ["aioquic", "qh3"]


def emulated_relay(tmp_path: Path, emulator: KernelEmulator, peer: str = "aioquic"):  # type: ignore[no-untyped-def]
    """Relay = server in pass-through mode behind the emulated kernel; client = unmodified peer."""
    ctx = client_and_server(tmp_path, server_backend=emulator, stock_client=peer == "aioquic",
                            qh3_client=peer == "qh3")
    pair = ctx.__enter__()
    pair.to_server = emulator.ingress
    pair.to_client = emulator.egress
    return ctx, pair


@pytest.mark.parametrize("peer", PEERS)
def test_pass_through_exports_keys_and_the_stock_peer_gets_exact_bytes(tmp_path: Path, peer: str) -> None:
    emulator = KernelEmulator()
    ctx, pair = emulated_relay(tmp_path, emulator, peer)
    try:
        handshake(pair)
        assert pair.server.one_rtt_mode is OneRttMode.PASS_THROUGH
        first = [(m.direction, m.trigger) for m in emulator.installs][:2]
        assert first == [(Direction.SEND, KeyTrigger.INSTALL), (Direction.RECV, KeyTrigger.INSTALL)]
        assert all(m.cipher_suite == CipherSuite.CHACHA20_POLY1305_SHA256 for m in emulator.installs)
        payload = bytes(range(256)) * 30
        send_both_ways(pair, payload)
        assert one_rtt(pair.server).plaintext_accepted > 0
        assert not any(MARKER in d for d in pair.wire_to_client)
        # Keys were exported before the first packet that needed them: the 'kernel' fails
        # closed without keys (drops, counts), and it never had to, either way; and every
        # 1-RTT packet of the peer was decrypted by it, none handed up still encrypted.
        assert emulator.sent_phases and emulator.received_phases
        assert (emulator.rejected, emulator.passed_up_encrypted) == (0, 0)
    finally:
        ctx.__exit__(None, None, None)


def all_acked(conn: QuicConnection) -> bool:
    """Every ack-eliciting 1-RTT packet this (aioquic) endpoint sent is acknowledged."""
    space = conn._spaces[Epoch.ONE_RTT]
    return space.ack_eliciting_in_flight == 0 and space.largest_acked_packet >= 0


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("who", ["relay", "peer"])
def test_pass_through_key_update(tmp_path: Path, who: str, peer: str) -> None:
    emulator = KernelEmulator()
    ctx, pair = emulated_relay(tmp_path, emulator, peer)
    try:
        handshake(pair)
        send_both_ways(pair, b"phase zero")
        assert set(emulator.sent_phases) == set(emulator.received_phases) == {0}
        # RFC 9001 §6.1: the initiator updates only after an ACK of a packet it sent in the
        # current phase. send_both_ways ran until quiet without loss, so all phase-0 data of
        # both sides is acknowledged; for aioquic endpoints that is checked, for qh3 (state
        # in Rust) the quiet exchange stands for it.
        initiator = pair.server if who == "relay" else pair.client
        if who == "relay" or peer == "aioquic":
            assert all_acked(initiator)
        sent_before, received_before = len(emulator.sent_phases), len(emulator.received_phases)
        initiator.request_key_update()
        send_both_ways(pair, b"phase one" * 100)
        assert one_rtt(pair.server).key_phase == 1
        if peer == "aioquic":
            assert one_rtt(pair.client).key_phase == 1
        # The phase changed on both sides, as seen on the wire (this is how qh3's is known):
        # in each direction the phase goes 0 -> 1 once and stays (the responder may send a
        # few phase-0 packets before it sees the first phase-1 one; nothing is reordered here).
        for phases in (emulator.sent_phases[sent_before:], emulator.received_phases[received_before:]):
            assert phases and phases[-1] == 1 and phases == sorted(phases), phases
        initiator_phases = emulator.sent_phases if who == "relay" else emulator.received_phases
        assert initiator_phases[sent_before if who == "relay" else received_before] == 1
        trigger = KeyTrigger.LOCAL_UPDATE if who == "relay" else KeyTrigger.REMOTE_UPDATE
        updates = [m for m in emulator.installs if m.trigger is trigger]
        assert {m.direction for m in updates} == {Direction.SEND, Direction.RECV}
        assert all(m.current.key_phase == 1 and m.next.key_phase == 0 for m in updates)
        # RFC 9001 §6.5: the receive update carries the phase it replaced, for packets the
        # peer sent before it; sending needs no old keys
        recv = [m for m in emulator.installs if m.direction is Direction.RECV]
        assert [m.previous for m in recv] == [None, recv[0].current]
        assert all(m.previous is None for m in emulator.installs if m.direction is Direction.SEND)
        assert (emulator.rejected, emulator.passed_up_encrypted) == (0, 0)
    finally:
        ctx.__exit__(None, None, None)


@pytest.mark.parametrize("closer", ["relay", "peer"])
def test_pass_through_keys_torn_down_when_the_connection_ends(tmp_path: Path, closer: str) -> None:
    emulator = KernelEmulator()
    ctx, pair = emulated_relay(tmp_path, emulator)
    try:
        handshake(pair)
        send_both_ways(pair, b"data")
        assert emulator.teardowns == []
        (pair.server if closer == "relay" else pair.client).close()
        pair.pump(200)
        for _ in range(20):  # the draining period's timer (bounded)
            timer = pair.server.get_timer()
            if timer is None:
                break
            pair.now = max(pair.now, timer)
            pair.server.handle_timer(now=pair.now)
        assert sorted(d.value for d in emulator.teardowns) == ["recv", "send"]
        assert emulator.keys == {}  # the 'kernel' holds no key of a finished connection
    finally:
        ctx.__exit__(None, None, None)


def test_forged_plaintext_packet_cannot_inject_frames(tmp_path: Path) -> None:
    emulator = KernelEmulator()
    ctx, pair = emulated_relay(tmp_path, emulator)
    try:
        handshake(pair)
        send_both_ways(pair, b"warm up")
        # A forger who knows the relay's CID sends a plaintext-layout STREAM frame with a
        # zero tag slot (or a wrong token): it must not be accepted.
        accepted_before = one_rtt(pair.server).plaintext_accepted
        dcid = pair.server.host_cid
        stream_frame = bytes([0x0B, 0x06]) + bytes([len(MARKER)]) + MARKER  # STREAM, id 6, len, fin
        for tag in (bytes(16), b"\x01" * 16):
            forged = bytes([0x40 | 0x01]) + dcid + (0x7FFF).to_bytes(2, "big") + stream_frame + tag
            pair.server.receive_datagram(forged, ("1.2.3.4", 1234), now=pair.now)
        pair.pump()
        assert one_rtt(pair.server).plaintext_accepted == accepted_before
        assert received(pair.server_events, 6) == b""
        assert one_rtt(pair.server).token_mismatches >= 2
    finally:
        ctx.__exit__(None, None, None)


def test_packet_that_arrives_before_the_kernel_has_keys_still_decrypts(tmp_path: Path) -> None:
    emulator = KernelEmulator()
    ctx, pair = emulated_relay(tmp_path, emulator)
    try:
        handshake(pair)
        # The 'kernel' hands every peer packet up as it came (no receive keys, as before the
        # first export): aioquic's real AEAD must take them, with the same keys.
        pair.to_server = None
        accepted_before = one_rtt(pair.server).plaintext_accepted
        send_both_ways(pair, b"encrypted all the way up")
        assert one_rtt(pair.server).plaintext_accepted == accepted_before
    finally:
        ctx.__exit__(None, None, None)


def test_egress_without_keys_fails_closed(tmp_path: Path) -> None:
    emulator = KernelEmulator()
    datagram = bytes([0x41]) + bytes(8) + b"\x00\x01" + MARKER + bytes(16)
    assert emulator.egress(datagram) is None
    assert emulator.rejected == 1


@pytest.mark.parametrize("mode", ["none", "pass-through"])
def test_initial_and_handshake_are_untouched(tmp_path: Path, mode: str) -> None:
    """Only 1-RTT protection is the backend's: Initial and Handshake keep aioquic's own
    CryptoPair and real protection, so the certificate never crosses the wire in clear."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from relay.quic.crypto import OneRttCryptoPair

    if mode == "none":
        ctx = client_and_server(tmp_path, client_backend=NoneBackend(), server_backend=NoneBackend())
        pair = ctx.__enter__()
    else:
        ctx, pair = emulated_relay(tmp_path, KernelEmulator())
    try:
        handshake(pair)
        send_both_ways(pair, MARKER)
        for conn in (pair.client, pair.server):
            if isinstance(conn, QuicConnection) and hasattr(conn, "one_rtt_mode"):
                assert type(conn._cryptos[Epoch.INITIAL]) is CryptoPair
                assert type(conn._cryptos[Epoch.HANDSHAKE]) is CryptoPair
        assert isinstance(pair.server._cryptos[Epoch.ONE_RTT], OneRttCryptoPair)
        der = x509.load_pem_x509_certificate((tmp_path / "cert.pem").read_bytes()).public_bytes(Encoding.DER)
        long_header = [d for d in pair.wire_to_client if d[0] & 0x80]
        assert long_header, "the server's Initial/Handshake datagrams"
        # a 32-byte piece of the certificate body (past the common DER prefix)
        piece = der[len(der) // 2:len(der) // 2 + 32]
        assert not any(piece in d for d in pair.wire_to_client + pair.wire_to_server)
        if mode == "none":  # while the 1-RTT payload is in clear
            assert any(MARKER in d for d in pair.wire_to_client)
    finally:
        ctx.__exit__(None, None, None)
