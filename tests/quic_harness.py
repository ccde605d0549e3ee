"""In-memory QUIC test harness: two connections, datagrams pumped between them, no sockets.

`KernelEmulator` plays the part the kernel shim (or NIC) will play for an offloading
backend: it protects the plaintext-layout 1-RTT packets the relay emits with the keys the
relay exported, and unprotects the peer's packets, writing the verification token into
the tag slot. It is written from RFC 9001 (§5.3 AEAD, §5.4 header protection, §6 key
update) on aioquic's primitive AEAD/HeaderProtection objects, never on its CryptoContext.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from aioquic._crypto import AEAD, CryptoError, HeaderProtection
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CIPHER_SUITES
from aioquic.quic.events import QuicEvent
from aioquic.quic.packet import decode_packet_number
from aioquic.tls import CipherSuite

from crypto_backends.base import AEAD_TAG_SIZE, CryptoBackend, Direction, KeyMaterial
from relay.quic.connection import FastrelayQuicConnection

CLIENT_ADDR = ("1.2.3.4", 1234)
SERVER_ADDR = ("2.3.4.5", 4433)
CID_LENGTH = 8  # aioquic's default host CID length, on both sides here
ALPN = ["test"]

Transform = Callable[[bytes], bytes | None]


def certificate_files(tmp: Path) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for the server side."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@dataclass
class Pair:
    client: Any  # aioquic's or qh3's QuicConnection: the same sans-I/O surface

    server: QuicConnection
    now: float = 0.0
    client_events: list[QuicEvent] = field(default_factory=list)
    server_events: list[QuicEvent] = field(default_factory=list)
    to_server: Transform | None = None
    to_client: Transform | None = None
    wire_to_server: list[bytes] = field(default_factory=list)
    wire_to_client: list[bytes] = field(default_factory=list)

    def pump(self, rounds: int = 50) -> None:
        """Exchange datagrams until neither side has anything to send (bounded)."""
        for _ in range(rounds):
            moved = self._move(self.client, self.server, self.to_server, self.wire_to_server,
                               CLIENT_ADDR)
            moved += self._move(self.server, self.client, self.to_client, self.wire_to_client,
                                SERVER_ADDR)
            self._drain_events()
            if not moved:
                timer = min((t for t in (self.client.get_timer(), self.server.get_timer())
                             if t is not None), default=None)
                if timer is None or timer - self.now > 1.0:
                    return
                self.now = max(self.now, timer)
                for conn in (self.client, self.server):
                    t = conn.get_timer()
                    if t is not None and t <= self.now:
                        conn.handle_timer(now=self.now)

    def _move(self, sender: QuicConnection, receiver: QuicConnection, transform: Transform | None,
              wire: list[bytes], addr: tuple[str, int]) -> int:
        count = 0
        for data, _ in sender.datagrams_to_send(now=self.now):
            count += 1
            if transform is not None:
                transformed = transform(data)
                if transformed is None:
                    continue
                data = transformed
            wire.append(data)
            receiver.receive_datagram(data, addr, now=self.now)
        return count

    def _drain_events(self) -> None:
        for conn, sink in ((self.client, self.client_events), (self.server, self.server_events)):
            while (event := conn.next_event()) is not None:
                sink.append(event)


@contextmanager
def client_and_server(
    tmp: Path,
    *,
    client_backend: CryptoBackend | None = None,
    server_backend: CryptoBackend | None = None,
    stock_client: bool = False,
    stock_server: bool = False,
    qh3_client: bool = False,
    client_suites: list[CipherSuite] | None = None,
) -> Iterator[Pair]:
    """A client/server pair; `stock_*` uses unmodified aioquic on that side, `qh3_client`
    an unmodified qh3 (Rust core, an implementation nobody here wrote) as the client."""
    cert, key = certificate_files(tmp)
    client_config = QuicConfiguration(is_client=True, alpn_protocols=ALPN, verify_mode=0)
    if client_suites is not None:
        client_config.cipher_suites = client_suites
    server_config = QuicConfiguration(is_client=False, alpn_protocols=ALPN)
    server_config.load_cert_chain(cert, key)
    client: Any
    if qh3_client:
        import ssl

        from qh3.quic.configuration import QuicConfiguration as Qh3Configuration
        from qh3.quic.connection import QuicConnection as Qh3Connection

        client = Qh3Connection(configuration=Qh3Configuration(
            is_client=True, alpn_protocols=ALPN, verify_mode=ssl.CERT_NONE, cipher_suites=client_suites))
    elif stock_client:
        client = QuicConnection(configuration=client_config)
    else:
        client = FastrelayQuicConnection(configuration=client_config, crypto_backend=client_backend)
    server_kwargs = {"configuration": server_config,
                     "original_destination_connection_id": client.original_destination_connection_id}
    server = (QuicConnection(**server_kwargs) if stock_server
              else FastrelayQuicConnection(crypto_backend=server_backend, **server_kwargs))
    pair = Pair(client=client, server=server)
    client.connect(SERVER_ADDR, now=pair.now)
    yield pair


# --- the kernel's part, emulated -------------------------------------------------------

def short_header_offset(datagram: bytes) -> int | None:
    """Offset of the 1-RTT (short header) packet in a datagram, which is always last in it."""
    from aioquic.buffer import Buffer
    from aioquic.quic.packet import pull_quic_header

    buf = Buffer(data=datagram)
    while not buf.eof():
        start = buf.tell()
        if not datagram[start] & 0x40:
            return None  # zero padding after the last packet
        if not datagram[start] & 0x80:
            return start
        header = pull_quic_header(buf, host_cid_length=CID_LENGTH)
        buf.seek(start + header.packet_length)
    return None


@dataclass
class _DirectionState:
    material: KeyMaterial
    largest_pn: int = -1


class KernelEmulator(CryptoBackend):
    """An offloading backend whose 'kernel' is this object, for in-memory tests."""

    name: ClassVar[str] = "emulated"
    offloads_1rtt: ClassVar[bool] = True
    tag_size: ClassVar[int] = AEAD_TAG_SIZE

    def __init__(self, suites: tuple[CipherSuite, ...] = (CipherSuite.CHACHA20_POLY1305_SHA256,)):
        self._suites = suites
        self._token = os.urandom(AEAD_TAG_SIZE)
        self.keys: dict[Direction, _DirectionState] = {}
        self.installs: list[KeyMaterial] = []
        self.teardowns: list[Direction] = []
        self.rejected = 0
        self.passed_up_encrypted = 0

    @property
    def cipher_suites(self) -> tuple[CipherSuite, ...]:
        return self._suites

    @property
    def verification_token(self) -> bytes:
        return self._token

    def check(self) -> None:
        return None

    def install(self, material: KeyMaterial) -> None:
        self.installs.append(material)
        state = self.keys.get(material.direction)
        largest = state.largest_pn if state is not None else -1
        self.keys[material.direction] = _DirectionState(material, largest)

    def teardown(self, connection: int, direction: Direction) -> None:
        self.teardowns.append(direction)
        self.keys.pop(direction, None)

    def _phase(self, state: _DirectionState, key_phase: int) -> tuple[AEAD, HeaderProtection]:
        m = state.material
        keys = m.current if m.current.key_phase == key_phase else m.next
        hp_name, aead_name = CIPHER_SUITES[m.cipher_suite]
        return AEAD(aead_name, keys.key, keys.iv), HeaderProtection(hp_name, m.hp_key)

    def egress(self, datagram: bytes) -> bytes | None:
        """Protect the relay's plaintext-layout 1-RTT packet; fail closed without keys."""
        offset = short_header_offset(datagram)
        if offset is None:
            return datagram
        state = self.keys.get(Direction.SEND)
        if state is None:
            self.rejected += 1
            return None  # never send a 1-RTT packet in plaintext
        packet = datagram[offset:]
        first = packet[0]
        pn_offset = 1 + CID_LENGTH
        pn_len = (first & 0x03) + 1
        header = packet[:pn_offset + pn_len]
        pn = decode_packet_number(int.from_bytes(header[pn_offset:], "big"), pn_len * 8,
                                  state.largest_pn + 1)
        state.largest_pn = max(state.largest_pn, pn)
        aead, hp = self._phase(state, (first & 0x04) >> 2)
        payload = packet[len(header):-AEAD_TAG_SIZE]
        protected = aead.encrypt(payload, header, pn)
        return datagram[:offset] + hp.apply(header, protected)

    def ingress(self, datagram: bytes) -> bytes | None:
        """Unprotect the peer's 1-RTT packet and mark it verified with the token."""
        offset = short_header_offset(datagram)
        if offset is None:
            return datagram
        state = self.keys.get(Direction.RECV)
        if state is None:
            self.passed_up_encrypted += 1
            return datagram  # no keys yet: userspace decrypts it itself
        packet = datagram[offset:]
        pn_offset = 1 + CID_LENGTH
        aead_unused, hp = self._phase(state, 0)
        try:
            plain_header, truncated = hp.remove(packet, pn_offset)
        except CryptoError:
            self.rejected += 1
            return None
        pn_len = (plain_header[0] & 0x03) + 1
        pn = decode_packet_number(truncated, pn_len * 8, state.largest_pn + 1)
        aead, _ = self._phase(state, (plain_header[0] & 0x04) >> 2)
        try:
            payload = aead.decrypt(packet[len(plain_header):], plain_header, pn)
        except CryptoError:
            self.rejected += 1
            return None  # fail closed: never handed up as if decrypted
        state.largest_pn = max(state.largest_pn, pn)
        return datagram[:offset] + plain_header + payload + self._token
