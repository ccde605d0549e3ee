"""Stateless resets (RFC 9000 §10.3) from a peer that lost its state end the connection.

In memory (tests/quic_harness.py) for each 1-RTT mode, then the relay over loopback with a real
MoQ client whose state is dropped: its reset ends the relay's session at once, nothing is
sent back, and look-alikes change nothing. The kernel shim's part is in
tests/kernel/test_crypto_shim_fastpath.py.

A client's first connection id has no token (a client sends no stateless_reset_token
transport parameter, RFC 9000 §18.2) and tokens of ids not in use must not be compared
(§10.3.1): the relay moves to the client's next id once the handshake is confirmed
(`reset_detectable_peer_cid`, on in MoqtServer); the in-memory pairs do it by hand
(`change_connection_id`).
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest
from aioquic.quic.connection import END_STATES, QuicConnectionState
from aioquic.quic.events import ConnectionTerminated

from crypto_backends import NoneBackend
from relay.quic.connection import STATELESS_RESET_REASON
from relay.quic.reset import matches_stateless_reset
from tests.quic_harness import CLIENT_ADDR, SERVER_ADDR, KernelEmulator, Pair, client_and_server
from tests.test_quic_crypto import handshake, send_both_ways

TOKEN = 16


def reset_datagram(rng: random.Random, token: bytes, size: int = 43, dcid: bytes = b"") -> bytes:
    """What a peer without state sends: short-header form, unpredictable bits, the token."""
    head = bytes([0x40 | rng.randrange(64)]) + dcid
    return head + rng.randbytes(size - len(head) - TOKEN) + token


def token_of(peer, cid: bytes) -> bytes:  # type: ignore[no-untyped-def]
    """The stateless reset token `peer` issued with its connection id `cid`."""
    return next(c.stateless_reset_token for c in peer._host_cids if c.cid == cid)


def use_tokened_cid(pair: Pair) -> bytes:
    """The relay (server) moves to a client connection id with a token; returns the token."""
    assert pair.server.stateless_reset_tokens() == []  # the client's first id has none
    pair.server.change_connection_id()
    pair.pump()
    token = token_of(pair.client, pair.server._peer_cid.cid)
    assert pair.server.stateless_reset_tokens() == [token]
    return token


def terminated(events: list) -> list[ConnectionTerminated]:
    return [e for e in events if isinstance(e, ConnectionTerminated)]


MODES = {
    "standard": {},
    "none": {"client_backend": NoneBackend(), "server_backend": NoneBackend()},
    "pass-through": {"server_backend": "emulated", "stock_client": True},
}


def _pair(tmp_path: Path, mode: str):  # type: ignore[no-untyped-def]
    kwargs = dict(MODES[mode])
    emulator = None
    if kwargs.get("server_backend") == "emulated":
        emulator = kwargs["server_backend"] = KernelEmulator()
    ctx = client_and_server(tmp_path, **kwargs)
    pair = ctx.__enter__()
    if emulator is not None:
        pair.to_server, pair.to_client = emulator.ingress, emulator.egress
    return ctx, pair


def test_token_compare() -> None:
    token = os.urandom(TOKEN)
    rng = random.Random(1)
    assert matches_stateless_reset(reset_datagram(rng, token, size=21), [b"", token])
    assert not matches_stateless_reset(reset_datagram(rng, token, size=20), [token])  # < 21 B
    assert not matches_stateless_reset(b"\xc0" + reset_datagram(rng, token)[1:], [token])  # long
    assert not matches_stateless_reset(reset_datagram(rng, token), [b"", bytes(TOKEN - 1)])


# Without 1-RTT protection ('none') a packet to the relay's id always "decrypts": there a
# reset is recognised only by its (random) id belonging to no connection.
@pytest.mark.parametrize(("mode", "dcid"), [(m, d) for m in sorted(MODES)
                                            for d in ("random", "relay's")
                                            if (m, d) != ("none", "relay's")])
def test_reset_ends_the_connection_silently(tmp_path: Path, mode: str, dcid: str) -> None:
    """Whether the reset's first bytes look like the relay's connection id (it then fails to
    decrypt) or not (no connection takes it): the relay's side ends, sending nothing."""
    ctx, pair = _pair(tmp_path, mode)
    try:
        handshake(pair)
        token = use_tokened_cid(pair)
        rng = random.Random(mode + dcid)
        cid = pair.server.host_cid if dcid != "random" else b""
        # A look-alike first: one bit off the token.
        near = bytes([token[0] ^ 0x80]) + token[1:]
        pair.server.receive_datagram(reset_datagram(rng, near, dcid=cid), CLIENT_ADDR, now=pair.now)
        assert pair.server._state is QuicConnectionState.CONNECTED
        assert not pair.server.stateless_reset_received
        send_both_ways(pair, b"still here")
        # The client lost its state; its reset reaches the relay's side.
        pair.server.receive_datagram(reset_datagram(rng, token, dcid=cid), CLIENT_ADDR, now=pair.now)
        assert pair.server.datagrams_to_send(now=pair.now) == []
        assert pair.server._state is QuicConnectionState.TERMINATED
        assert pair.server.stateless_reset_received
        pair._drain_events()
        (event,) = terminated(pair.server_events)
        assert event.reason_phrase == STATELESS_RESET_REASON
        assert pair.server.get_timer() is None  # no drain period to wait out, no idle timeout
        # Anything more the peer sends is dropped without an answer.
        pair.server.receive_datagram(reset_datagram(rng, token), CLIENT_ADDR, now=pair.now)
        assert pair.server.datagrams_to_send(now=pair.now) == []
        assert len(terminated(pair.server_events)) == 1
    finally:
        ctx.__exit__(None, None, None)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_packet_that_decrypts_is_never_a_reset(tmp_path: Path, mode: str) -> None:
    """Even when its last 16 bytes equal the token (here forced: the relay is told each real
    packet's tail as the peer's token just before it arrives)."""
    ctx, pair = _pair(tmp_path, mode)
    try:
        handshake(pair)
        use_tokened_cid(pair)
        inner = pair.to_server
        seen = 0

        def tail_as_token(data: bytes) -> bytes | None:
            nonlocal seen
            out = inner(data) if inner is not None else data
            if out is not None:
                pair.server._peer_cid.stateless_reset_token = out[-TOKEN:]
                seen += 1
            return out

        pair.to_server = tail_as_token
        send_both_ways(pair, b"real packets " * 50)
        assert seen > 0
        assert pair.server._state not in END_STATES
        assert not pair.server.stateless_reset_received
    finally:
        ctx.__exit__(None, None, None)


def test_relay_as_client_detects_the_servers_reset(tmp_path: Path) -> None:
    """Towards a server (an upstream relay) the token of its first id is known from its
    transport parameters; the reset reaches the client socket with an unknown id."""
    with client_and_server(tmp_path, stock_server=True) as pair:
        handshake(pair)
        token = token_of(pair.server, pair.client._peer_cid.cid)
        assert pair.client.stateless_reset_tokens() == [token]
        pair.client.receive_datagram(reset_datagram(random.Random(2), token), SERVER_ADDR,
                                     now=pair.now)
        assert pair.client.datagrams_to_send(now=pair.now) == []
        pair._drain_events()
        assert [e.reason_phrase for e in terminated(pair.client_events)] == [STATELESS_RESET_REASON]


# --- the relay over loopback ------------------------------------------------------------------

LOOPBACK = "127.0.0.1"


@pytest.mark.parametrize("crypto", ["standard", "none"])
def test_relay_session_ends_on_a_subscribers_reset(tmp_path: Path, crypto: str) -> None:
    from relay.moqt.quic import TlsOptions, connect, generate_certificate
    from relay.server import RelayServer

    cert, key, fingerprint = generate_certificate(["localhost", LOOPBACK])
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(key)
    backend = NoneBackend if crypto == "none" else lambda: None

    async def scenario() -> tuple[dict, int, int]:
        relay = RelayServer(crypto=backend())
        _, port = await relay.start(LOOPBACK, 0, tmp_path / "c.pem", tmp_path / "k.pem")
        assert relay.server is not None
        server = relay.server
        sends: list[tuple] = []  # (address, datagram) the relay sent, in order
        plain_sendto = server._transport.sendto

        def recorded(data: bytes, addr: tuple) -> None:  # type: ignore[type-arg]
            sends.append((addr, data))
            plain_sendto(data, addr)

        server._transport.sendto = recorded  # type: ignore[method-assign]
        try:
            async with connect(f"moqt://{LOOPBACK}:{port}/r", tls=TlsOptions(fingerprint=fingerprint),
                               crypto=backend()) as client:
                (theirs,) = server.protocols
                quic = theirs._quic
                await client.ping()
                # The relay moved off the client's first id on its own (module docstring).
                assert quic._peer_cid.sequence_number != 0
                token = token_of(client._quic, quic._peer_cid.cid)
                assert quic.stateless_reset_tokens() == [token]
                addr = quic.get_peer_address()
                rng = random.Random(crypto)
                relay_addr = (LOOPBACK, port)
                # A look-alike from the client's address: nothing happens.
                near = token[:-1] + bytes([token[-1] ^ 1])
                client._transport.sendto(reset_datagram(rng, near), relay_addr)
                await client.ping()  # answered after the look-alike was read
                assert relay.stats()["sessions"] == 1 and quic._state not in END_STATES
                # The client loses its state: deaf and mute from now on, only its reset leaves.
                client.datagram_received = lambda data, addr: None  # type: ignore[method-assign]
                client.transmit = lambda: None  # type: ignore[method-assign]
                reset = reset_datagram(rng, token)
                seen_at: list[int] = []
                plain_received = server.datagram_received

                def received(data: bytes, from_addr: tuple) -> None:  # type: ignore[type-arg]
                    if data == reset:
                        seen_at.append(len(sends))
                    plain_received(data, from_addr)

                server.datagram_received = received  # type: ignore[method-assign]
                client._transport.sendto(reset, relay_addr)
                for _ in range(200):  # bounded: 10 s, a third of the 30 s idle timeout
                    if relay.stats()["sessions"] == 0:
                        break
                    await asyncio.sleep(0.05)
                stats = relay.stats()
                after = [s for s in sends[seen_at[0]:] if s[0] == addr] if seen_at else sends
                client._closed.set()  # nothing to wait for on the way out
                return stats, len(seen_at), len(after)
        finally:
            await relay.stop()

    stats, seen, sent_after = asyncio.run(asyncio.wait_for(scenario(), 40))
    assert seen == 1, "the reset reached the relay once"
    assert stats["sessions"] == 0 and stats["stateless_resets"] == 1, stats
    assert stats["sessions_failed"] == {}, stats
    assert sent_after == 0, "nothing is sent to the peer once its reset arrived"


def test_server_moves_to_a_client_id_with_a_token_once(tmp_path: Path) -> None:
    with client_and_server(tmp_path, extra_server_kwargs={"reset_detectable_peer_cid": True}) as pair:
        first = pair.client._host_cids[0].cid
        handshake(pair)
        send_both_ways(pair, b"some traffic")
        assert pair.server._peer_cid.sequence_number == 1
        token = token_of(pair.client, pair.server._peer_cid.cid)
        assert pair.server.stateless_reset_tokens() == [token]
        assert first not in {c.cid for c in pair.client._host_cids}  # retired
        send_both_ways(pair, b"more traffic")
        assert pair.server._peer_cid.sequence_number == 1  # once, not on every datagram
