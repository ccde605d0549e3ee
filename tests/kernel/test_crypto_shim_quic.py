"""The real shim between a pass-through relay connection and unmodified QUIC peers, in memory.

Like tests/test_quic_crypto.py's KernelEmulator, but every datagram goes through
bpf/crypto_shim.c with BPF_PROG_TEST_RUN (wrapped in Ethernet/IPv4/UDP): the relay side is
FastrelayQuicConnection exporting keys to a backend that writes them into the shim's map;
the peer is stock aioquic or qh3 with their own ChaCha20-Poly1305, so every byte the shim
protects is checked by an independent implementation, and every byte it unprotects is
accepted by the relay only through the verification token.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
from aioquic.quic.events import HandshakeCompleted, StreamDataReceived
from aioquic.tls import CipherSuite

from crypto_backends.base import AEAD_TAG_SIZE, CryptoBackend, Direction, KeyMaterial
from relay.bpfload import prog_test_run
from relay.quic.crypto import OneRttMode
from tests.kernel.packets import Udp
from tests.quic_harness import CID_LENGTH, CLIENT_ADDR, SERVER_ADDR, client_and_server

pytestmark = pytest.mark.root

TC_ACT_SHOT = 2
MARKER = b"fastrelay-object-payload-marker"
TO_SERVER = Udp(CLIENT_ADDR[0], SERVER_ADDR[0], CLIENT_ADDR[1], SERVER_ADDR[1])
TO_CLIENT = TO_SERVER.reversed()


class ShimBackend(CryptoBackend):
    """An offloading backend whose kernel is the loaded soft shim (one connection: the pair's)."""

    name: ClassVar[str] = "soft-shim-test"
    offloads_1rtt: ClassVar[bool] = True
    tag_size: ClassVar[int] = AEAD_TAG_SIZE

    def __init__(self, shim) -> None:  # type: ignore[no-untyped-def]
        self.shim = shim
        self.installs: list[KeyMaterial] = []

    @property
    def cipher_suites(self) -> tuple[CipherSuite, ...]:
        return (CipherSuite.CHACHA20_POLY1305_SHA256,)

    @property
    def verification_token(self) -> bytes:
        return self.shim.token

    def check(self) -> None:
        return None

    def install(self, material: KeyMaterial) -> None:
        self.installs.append(material)
        # both sides use CID_LENGTH-byte connection ids in this harness
        self.shim.install(SERVER_ADDR, CLIENT_ADDR, material, dcid_len=CID_LENGTH)

    def teardown(self, connection: int, direction: Direction) -> None:
        self.shim.remove(SERVER_ADDR, CLIENT_ADDR, direction)

    def ingress(self, datagram: bytes) -> bytes | None:
        result = prog_test_run(self.shim.ingress.fd, TO_SERVER.frame(datagram))
        return None if result.retval == TC_ACT_SHOT else TO_SERVER.payload(result.data)

    def egress(self, datagram: bytes) -> bytes | None:
        result = prog_test_run(self.shim.egress.fd, TO_CLIENT.frame(datagram))
        if result.retval == TC_ACT_SHOT:
            return None
        assert TO_CLIENT.udp_checksum_ok(result.data)
        return TO_CLIENT.payload(result.data)


@pytest.fixture
def backend(shim) -> ShimBackend:
    for direction in Direction:
        shim.remove(SERVER_ADDR, CLIENT_ADDR, direction)
    shim.clear_stats()
    return ShimBackend(shim)


def is_event(event: object, kind: type) -> bool:
    return type(event).__name__ == kind.__name__


def received(events: list, stream_id: int) -> bytes:
    return b"".join(e.data for e in events if is_event(e, StreamDataReceived) and e.stream_id == stream_id)


def exchange(pair, payload: bytes) -> None:  # type: ignore[no-untyped-def]
    stream = pair.client.get_next_available_stream_id(is_unidirectional=True)
    pair.client.send_stream_data(stream, payload, end_stream=True)
    back = pair.server.get_next_available_stream_id(is_unidirectional=True)
    pair.server.send_stream_data(back, payload, end_stream=True)
    pair.pump()
    assert received(pair.server_events, stream) == payload
    assert received(pair.client_events, back) == payload


@pytest.mark.parametrize("peer", ["aioquic", "qh3"])
@pytest.mark.parametrize("update", [None, "relay", "peer"])
def test_stock_peer_through_the_shim(tmp_path: Path, backend: ShimBackend, peer: str,
                                     update: str | None) -> None:
    with client_and_server(tmp_path, server_backend=backend, stock_client=peer == "aioquic",
                           qh3_client=peer == "qh3") as pair:
        pair.to_server = backend.ingress
        pair.to_client = backend.egress
        pair.pump()
        assert any(is_event(e, HandshakeCompleted) for e in pair.server_events)
        assert pair.server.one_rtt_mode is OneRttMode.PASS_THROUGH
        exchange(pair, MARKER + bytes(range(256)) * 20)
        if update is not None:
            (pair.server if update == "relay" else pair.client).request_key_update()
            exchange(pair, MARKER * 50)
            exchange(pair, b"after the update" * 40)
            assert any(m.current.key_phase == 1 for m in backend.installs)
        stats = backend.shim.stats()
        assert stats["egress_encrypted"] > 0 and stats["ingress_decrypted"] > 0
        drops = {k: v for k, v in stats.items() if "drop" in k and v}
        assert drops == {}
        assert not any(MARKER in d for d in pair.wire_to_client)
        # what reached the relay's socket after the shim: plaintext layout with the token
        assert any(MARKER in d and d.endswith(backend.shim.token) for d in pair.wire_to_server)


def test_peer_packets_in_flight_over_a_relay_key_update(tmp_path: Path, backend: ShimBackend) -> None:
    """The relay starts a key update while the peer's packets of the old phase are in flight:
    they reach the shim after the relay's receive keys moved on and verify with the previous
    phase's keys the update exported (RFC 9001 §6.5), instead of failing their tag."""
    from aioquic.tls import Epoch

    with client_and_server(tmp_path, server_backend=backend, stock_client=True) as pair:
        pair.to_server = backend.ingress
        pair.to_client = backend.egress
        pair.pump()
        exchange(pair, b"phase zero" * 100)
        stream = pair.client.get_next_available_stream_id(is_unidirectional=True)
        pair.client.send_stream_data(stream, MARKER * 40, end_stream=True)
        in_flight = [data for data, _ in pair.client.datagrams_to_send(now=pair.now)]
        assert in_flight
        pair.server.request_key_update()
        pair.server.send_ping(1)
        pair.pump(rounds=2)  # the peer follows and answers in the new phase; no time passes
        assert pair.server._cryptos[Epoch.ONE_RTT].recv.key_phase == 1
        for data in in_flight:  # now the old phase's packets arrive
            verified = backend.ingress(data)
            assert verified is not None and verified.endswith(backend.shim.token)
            pair.server.receive_datagram(verified, CLIENT_ADDR, now=pair.now)
        pair.pump()
        assert received(pair.server_events, stream) == MARKER * 40
        assert pair.server._cryptos[Epoch.ONE_RTT].old_phase_accepted == len(in_flight)
        stats = backend.shim.stats()
        assert stats["ingress_previous_phase"] == len(in_flight)
        assert {k: v for k, v in stats.items() if "drop" in k and v} == {}


def test_peers_stateless_reset_through_the_shim_ends_the_connection(tmp_path: Path,
                                                                    backend: ShimBackend) -> None:
    """The soft backend (crypto_backends/soft.py) puts the token of the client's connection
    id in use into the shim's receive entry; the client's reset then passes the shim
    unchanged (a look-alike is dropped), and the relay's connection ends without a word and
    takes its shim entries with it."""
    import random

    from aioquic.quic.events import ConnectionTerminated

    from crypto_backends.soft import SoftBackend
    from relay.quic.connection import STATELESS_RESET_REASON
    from tests.test_quic_reset import reset_datagram, token_of

    shim, wire = backend.shim, backend  # wire: datagrams through the programs
    soft = SoftBackend()
    soft.use_shim(shim)
    with client_and_server(tmp_path, server_backend=soft, stock_client=True,
                           extra_server_kwargs={"reset_detectable_peer_cid": True}) as pair:
        pair.server.local_address = SERVER_ADDR
        pair.to_server, pair.to_client = wire.ingress, wire.egress
        pair.pump()
        exchange(pair, MARKER * 20)
        token = token_of(pair.client, pair.server._peer_cid.cid)
        assert shim.entry(SERVER_ADDR, CLIENT_ADDR, Direction.RECV).reset_token == token
        rng = random.Random(5)
        near = token[:8] + bytes([token[8] ^ 4]) + token[9:]
        assert wire.ingress(reset_datagram(rng, near, dcid=pair.server.host_cid)) is None
        reset = reset_datagram(rng, token, dcid=pair.server.host_cid)
        assert wire.ingress(reset) == reset
        pair.server.receive_datagram(reset, CLIENT_ADDR, now=pair.now)
        assert pair.server.datagrams_to_send(now=pair.now) == []
        pair._drain_events()
        assert [e.reason_phrase for e in pair.server_events
                if isinstance(e, ConnectionTerminated)] == [STATELESS_RESET_REASON]
        stats = shim.stats()
        assert (stats["ingress_stateless_reset"], stats["ingress_drop_bad_tag"]) == (1, 1), stats
        assert all(shim.entry(SERVER_ADDR, CLIENT_ADDR, d) is None for d in Direction)
        assert soft.entries() == {}
