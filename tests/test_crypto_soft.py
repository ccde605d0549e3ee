"""The `soft` backend's userspace side in memory: suite negotiation, which connections go to
the shim and under which key, the fallback to aioquic's crypto, counters, CLI errors.

The shim here is `EmulatedShim`: the keyed-by-address interface of crypto_backends/soft_shim.py
over tests/quic_harness.py's KernelEmulator, so the relay side's plaintext layout is really
protected for the stock aioquic peer (tests/kernel/test_crypto_shim_quic.py does the same with
the real eBPF shim; tests/test_crypto_soft_lab.py runs the relay with it in the lab).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from aioquic.quic.events import HandshakeCompleted, StreamDataReceived
from aioquic.tls import CipherSuite, Epoch

from crypto_backends import get_backend
from crypto_backends.base import (
    Address,
    ConnectionPath,
    Direction,
    KeyMaterial,
    KeyTrigger,
    OffloadRefused,
    PhaseKeys,
)
from crypto_backends.soft import OFFLOADED_SUITE, SoftBackend, local_for, route_source
from relay.quic.crypto import OneRttMode
from tests.conftest import run_cli
from tests.quic_harness import (
    CID_LENGTH,
    CLIENT_ADDR,
    SERVER_ADDR,
    KernelEmulator,
    client_and_server,
)

PAYLOAD = b"fastrelay soft backend " * 50


class EmulatedShim:
    """SoftShim's interface (install/remove by address, token, stats, close) in memory."""

    def __init__(self) -> None:
        self.kernel = KernelEmulator()
        self.token = self.kernel.verification_token
        self.entries: dict[tuple[Address, Address, Direction], int] = {}
        self.links: dict[tuple[Address, Address, Direction], int | None] = {}
        #: the stateless reset token of each connection's receive entry
        self.reset_tokens: dict[tuple[Address, Address], bytes] = {}
        self.closed = False

    def install(self, local: Address, peer: Address, material: KeyMaterial, *,
                dcid_len: int, reset_token: bytes | None = None) -> None:
        self.entries[(local, peer, material.direction)] = dcid_len
        if reset_token is not None:
            self.reset_tokens[(local, peer)] = reset_token
        self.kernel.install(material)

    def link_fastpath(self, local: Address, peer: Address, direction: Direction,
                      conn_idx: int | None) -> bool:
        if (local, peer, direction) not in self.entries:
            return False
        self.links[(local, peer, direction)] = conn_idx
        return True

    def set_reset_token(self, local: Address, peer: Address, token: bytes) -> bool:
        self.reset_tokens[(local, peer)] = token
        return True

    def remove(self, local: Address, peer: Address, direction: Direction) -> None:
        del self.entries[(local, peer, direction)]
        self.kernel.teardown(0, direction)

    def stats(self) -> dict[str, int]:
        return {"egress_encrypted": 0}

    def close(self) -> None:
        self.closed = True


def relay_backend() -> tuple[SoftBackend, EmulatedShim]:
    backend, shim = SoftBackend(), EmulatedShim()
    backend.use_shim(shim)
    return backend, shim


def exchange(pair, rounds: int = 100) -> bytes:  # type: ignore[no-untyped-def]
    """Handshake, then the client sends PAYLOAD on a stream the relay side echoes back."""
    pair.pump(rounds)
    assert any(isinstance(e, HandshakeCompleted) for e in pair.client_events)
    stream = pair.client.get_next_available_stream_id()
    pair.client.send_stream_data(stream, PAYLOAD, end_stream=True)
    pair.pump(rounds)
    got = b"".join(e.data for e in pair.server_events
                   if isinstance(e, StreamDataReceived) and e.stream_id == stream)
    pair.server.send_stream_data(stream, got, end_stream=True)
    pair.pump(rounds)
    return b"".join(e.data for e in pair.client_events
                    if isinstance(e, StreamDataReceived) and e.stream_id == stream)


def test_suites_offered_and_preferred() -> None:
    backend = SoftBackend()
    assert backend.tls_cipher_suites(is_client=True) == (OFFLOADED_SUITE,)
    server = backend.tls_cipher_suites(is_client=False)
    assert server[0] == OFFLOADED_SUITE and CipherSuite.AES_128_GCM_SHA256 in server


@pytest.mark.root
def test_check_passes_where_the_probe_does() -> None:
    get_backend("soft").check()  # no longer refuses: the shim is wired


def test_stock_client_is_offloaded_and_keyed_by_its_addresses(tmp_path: Path) -> None:
    backend, shim = relay_backend()
    with client_and_server(tmp_path, server_backend=backend, stock_client=True) as pair:
        pair.server.local_address = SERVER_ADDR
        pair.to_server, pair.to_client = shim.kernel.ingress, shim.kernel.egress
        assert exchange(pair) == PAYLOAD
        assert pair.server.one_rtt_mode is OneRttMode.PASS_THROUGH
        pair_crypto = pair.server._cryptos[Epoch.ONE_RTT]
        assert pair_crypto.plaintext_accepted > 0  # verified by the 'shim', token in the slot
        assert set(shim.entries) == {(SERVER_ADDR, CLIENT_ADDR, Direction.SEND),
                                     (SERVER_ADDR, CLIENT_ADDR, Direction.RECV)}
        assert set(shim.entries.values()) == {CID_LENGTH}
        assert backend.entries() == {pair.server.connection_number:
                                     (SERVER_ADDR, CLIENT_ADDR, ["recv", "send"])}
        pair.server.close()
        pair.pump(200, max_time=pair.now + 10)
    assert shim.entries == {}  # teardown removed both directions
    stats = backend.stats()
    assert (stats["connections_offloaded"], stats["connections_not_offloaded"],
            stats["offloaded_now"]) == (1, 0, 0)


def test_key_updates_reach_the_shim(tmp_path: Path) -> None:
    backend, shim = relay_backend()
    with client_and_server(tmp_path, server_backend=backend, stock_client=True) as pair:
        pair.server.local_address = SERVER_ADDR
        pair.to_server, pair.to_client = shim.kernel.ingress, shim.kernel.egress
        assert exchange(pair) == PAYLOAD
        pair.client.request_key_update()  # peer-initiated: a remote update at the relay
        stream = pair.client.get_next_available_stream_id()
        pair.client.send_stream_data(stream, PAYLOAD, end_stream=True)
        pair.pump(100)
        assert pair.server._cryptos[Epoch.ONE_RTT].recv.key_phase == 1
    assert backend.key_updates == 2  # both directions rotate (RFC 9001 §6)
    assert [m.current.key_phase for m in shim.kernel.installs[-2:]] == [1, 1]


def test_the_peers_reset_token_in_use_reaches_the_receive_entry(tmp_path: Path) -> None:
    """The shim passes a datagram ending in it up (RFC 9000 §10.3); zero while the relay
    uses the client's first connection id, which has no token; kept over key updates."""
    backend, shim = relay_backend()
    with client_and_server(tmp_path, server_backend=backend, stock_client=True) as pair:
        pair.server.local_address = SERVER_ADDR
        pair.to_server, pair.to_client = shim.kernel.ingress, shim.kernel.egress
        assert exchange(pair) == PAYLOAD
        assert shim.reset_tokens == {(SERVER_ADDR, CLIENT_ADDR): bytes(16)}
        pair.server.change_connection_id()
        pair.pump(100)
        token = next(c.stateless_reset_token for c in pair.client._host_cids
                     if c.cid == pair.server._peer_cid.cid)
        assert shim.reset_tokens == {(SERVER_ADDR, CLIENT_ADDR): token}
        pair.client.request_key_update()
        stream = pair.client.get_next_available_stream_id()
        pair.client.send_stream_data(stream, PAYLOAD, end_stream=True)
        pair.pump(100)
        assert backend.key_updates == 2
        assert shim.reset_tokens == {(SERVER_ADDR, CLIENT_ADDR): token}


def test_aes_only_client_is_served_in_userspace_and_counted(tmp_path: Path) -> None:
    backend, shim = relay_backend()
    with client_and_server(tmp_path, server_backend=backend, stock_client=True,
                           client_suites=[CipherSuite.AES_128_GCM_SHA256]) as pair:
        pair.server.local_address = SERVER_ADDR
        # No transforms: the real shim passes packets of connections it has no entry for.
        assert exchange(pair) == PAYLOAD
        assert pair.server.one_rtt_mode is OneRttMode.STANDARD
        assert pair.server._cryptos[Epoch.ONE_RTT].refused == "peer negotiated AES_128_GCM_SHA256"
    assert shim.entries == {} and shim.kernel.installs == []
    stats = backend.stats()
    assert stats["connections_not_offloaded"] == 1
    assert stats["not_offloaded_reasons"] == {"peer negotiated AES_128_GCM_SHA256": 1}


def test_relay_as_client_offloads_towards_a_stock_server(tmp_path: Path) -> None:
    """The relay's upstream connection: ChaCha20 is all it offers, the shim protects it."""
    try:
        source = route_source(SERVER_ADDR[0])
    except OSError:  # pragma: no cover - a host without a route there
        pytest.skip(f"no route to {SERVER_ADDR[0]} here")
    backend, shim = relay_backend()
    with client_and_server(tmp_path, client_backend=backend, stock_server=True) as pair:
        pair.client.local_address = ("0.0.0.0", 50000)  # an unbound socket: route lookup
        pair.to_client, pair.to_server = shim.kernel.ingress, shim.kernel.egress
        assert exchange(pair) == PAYLOAD
        assert pair.client.one_rtt_mode is OneRttMode.PASS_THROUGH
        assert pair.client._cryptos[Epoch.ONE_RTT].plaintext_accepted > 0
        [(local, peer)] = {(k[0], k[1]) for k in shim.entries}
    assert (local, peer) == ((source, 50000), SERVER_ADDR)  # the route's source address


def test_endpoint_without_shim_speaks_standard_chacha(tmp_path: Path) -> None:
    """`fastrelay subscribe --crypto soft`: nothing to offload, ChaCha20 offered only."""
    backend = SoftBackend()
    with client_and_server(tmp_path, client_backend=backend, stock_server=True) as pair:
        assert exchange(pair) == PAYLOAD
        assert pair.client.one_rtt_mode is OneRttMode.STANDARD
        assert pair.client.tls.key_schedule.cipher_suite == OFFLOADED_SUITE
    assert backend.stats()["not_offloaded_reasons"] == {
        "no soft shim in this process (endpoint: standard QUIC)": 1}


def test_unknown_addresses_are_not_offloaded(tmp_path: Path) -> None:
    backend, shim = relay_backend()
    with client_and_server(tmp_path, server_backend=backend, stock_client=True) as pair:
        # local_address never set: the shim could not find the packets
        assert exchange(pair) == PAYLOAD
        assert pair.server.one_rtt_mode is OneRttMode.STANDARD
    assert backend.stats()["not_offloaded_reasons"] == {"connection addresses unknown": 1}


def test_peer_migration_falls_back_to_userspace_crypto(tmp_path: Path) -> None:
    """The shim is keyed by the old address: packets to the new one must not leave in the
    plaintext layout, so userspace protects the connection from then on."""
    new_addr = ("1.2.3.99", 4321)
    backend, shim = relay_backend()
    with client_and_server(tmp_path, server_backend=backend, stock_client=True) as pair:
        pair.server.local_address = SERVER_ADDR
        pair.to_server, pair.to_client = shim.kernel.ingress, shim.kernel.egress
        assert exchange(pair) == PAYLOAD
        # From here the 'kernel' holds no keys for new_addr: datagrams pass it untouched.
        stream = pair.client.get_next_available_stream_id()
        pair.client.send_stream_data(stream, PAYLOAD, end_stream=True)
        down = pair.server.get_next_available_stream_id(is_unidirectional=True)
        pair.server.send_stream_data(down, PAYLOAD, end_stream=True)  # leaves after the move
        sent_to: set[tuple[str, int]] = set()
        for _ in range(50):
            moved = 0
            for data, _ in pair.client.datagrams_to_send(now=pair.now):
                pair.server.receive_datagram(data, new_addr, now=pair.now)
                moved += 1
            for data, addr in pair.server.datagrams_to_send(now=pair.now):
                sent_to.add(addr)
                assert PAYLOAD[:16] not in data  # never the plaintext layout
                pair.client.receive_datagram(data, SERVER_ADDR, now=pair.now)
                moved += 1
            if not moved:
                break
        pair._drain_events()
        echoed = b"".join(e.data for e in pair.server_events
                          if isinstance(e, StreamDataReceived) and e.stream_id == stream)
        assert echoed == PAYLOAD
        assert b"".join(e.data for e in pair.client_events
                        if isinstance(e, StreamDataReceived) and e.stream_id == down) == PAYLOAD
        assert sent_to == {new_addr}
        assert pair.server.one_rtt_mode is OneRttMode.STANDARD
        assert "peer address changed" in (pair.server._cryptos[Epoch.ONE_RTT].refused or "")
    assert shim.entries == {}  # both directions withdrawn from the shim


def test_peer_cid_length_change_falls_back_to_userspace_crypto(tmp_path: Path) -> None:
    """The shim parses short headers with the CID length it was given: a peer CID of another
    length (a NEW_CONNECTION_ID may carry one) hands the connection back to userspace."""
    backend, shim = relay_backend()
    with client_and_server(tmp_path, server_backend=backend, stock_client=True) as pair:
        pair.server.local_address = SERVER_ADDR
        pair.to_server, pair.to_client = shim.kernel.ingress, shim.kernel.egress
        assert exchange(pair) == PAYLOAD
        pair.server._peer_cid.cid = bytes(4)  # as if the server had switched to such a CID
        pair.server.send_ping(1)
        pair.server.datagrams_to_send(now=pair.now)
        assert pair.server.one_rtt_mode is OneRttMode.STANDARD
        assert pair.server._cryptos[Epoch.ONE_RTT].refused == \
            "peer connection id length changed from 8 to 4"
    assert shim.entries == {}


class RefusesReceive(KernelEmulator):
    def install(self, material: KeyMaterial) -> None:
        if material.direction is Direction.RECV:
            raise OffloadRefused("no receive keys here")
        super().install(material)


def test_refusal_after_one_direction_withdraws_it(tmp_path: Path) -> None:
    backend = RefusesReceive()
    with client_and_server(tmp_path, server_backend=backend, stock_client=True) as pair:
        pair.to_client = backend.egress  # until the refusal the send keys are 'in the kernel'
        pair.pump(100)
        pair.to_client = None
        assert exchange(pair) == PAYLOAD
        assert pair.server.one_rtt_mode is OneRttMode.STANDARD
    assert [m.direction for m in backend.installs] == [Direction.SEND]
    assert backend.teardowns[0] is Direction.SEND and backend.keys == {}


def test_local_for_resolves_the_unspecified_address() -> None:
    assert local_for(("0.0.0.0", 4443), ("127.0.0.1", 5000)) == ("127.0.0.1", 4443)
    assert local_for(("10.0.0.1", 4443), ("127.0.0.1", 5000)) == ("10.0.0.1", 4443)


def test_close_keeps_the_last_counters() -> None:
    backend, shim = relay_backend()
    backend.close()
    assert shim.closed and backend.stats()["shim"] == {"egress_encrypted": 0}


def test_crypto_interface_needs_soft(capsys) -> None:  # type: ignore[no-untyped-def]
    run_cli(["relay", "--listen", "127.0.0.1:0", "--crypto", "none", "--crypto-interface", "lo"],
            capsys, exit_code=1, stderr=r"^error: --crypto-interface goes with --crypto soft\n$")


@pytest.mark.root
def test_wrong_interface_is_a_one_line_error(capsys) -> None:  # type: ignore[no-untyped-def]
    run_cli(["--crypto", "soft", "--crypto-interface", "nope0", "--listen", "127.0.0.1:0",
             "--duration", "1"], capsys, exit_code=1,
            stderr=r"^error: --crypto-interface nope0: no such interface in this network "
                   r"namespace \(there are: .*\)\n$")


def _material(direction: Direction, trigger: KeyTrigger = KeyTrigger.INSTALL) -> KeyMaterial:
    from aioquic.quic.crypto import derive_key_iv_hp

    secret = bytes(range(32)) if direction is Direction.SEND else bytes(range(32, 64))
    key, iv, hp = derive_key_iv_hp(cipher_suite=OFFLOADED_SUITE, secret=secret, version=1)
    return KeyMaterial(connection=1, direction=direction, trigger=trigger,
                       cipher_suite=OFFLOADED_SUITE, version=1, hp_key=hp,
                       current=PhaseKeys(0, secret, key, iv), next=PhaseKeys(1, secret, key, iv),
                       path=ConnectionPath(SERVER_ADDR, CLIENT_ADDR, CID_LENGTH))


def test_fast_path_taking_a_half_keyed_connection_hears_when_it_is_whole() -> None:
    # The fast path may take a connection while only one direction is keyed (it marks it
    # OFFLOAD_NOKEYS and drops its clones): the second direction's entry must carry the
    # fast path's index too, and the fast path must hear that it may now protect clones.
    backend, shim = relay_backend()
    told: list[int] = []
    backend.keys_listener = told.append
    send, recv = (SERVER_ADDR, CLIENT_ADDR, Direction.SEND), (SERVER_ADDR, CLIENT_ADDR, Direction.RECV)
    backend.install(_material(Direction.SEND))
    assert backend.link_fastpath(1, 7)
    assert shim.links == {send: 7} and told == []
    backend.install(_material(Direction.RECV))
    assert shim.links == {send: 7, recv: 7} and told == [1]
    backend.install(_material(Direction.RECV, KeyTrigger.REMOTE_UPDATE))  # an update: not news
    assert told == [1]
    backend.link_fastpath(1, None)
    backend.teardown(1, Direction.RECV)
    backend.install(_material(Direction.RECV))  # keyed again, but the fast path let it go
    assert shim.links == {send: None, recv: None} and told == [1]
