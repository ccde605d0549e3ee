"""In-memory QUIC test harness: two connections, datagrams pumped between them, no sockets.

`KernelEmulator` plays the part the kernel shim (or NIC) will play for an offloading
backend: it protects the plaintext-layout 1-RTT packets the relay emits with the keys the
relay exported, and unprotects the peer's packets, writing the verification token into
the tag slot. It is written from RFC 9001 (§5.3 AEAD, §5.4 header protection, §6 key
update) on aioquic's primitive AEAD/HeaderProtection objects, never on its CryptoContext.
"""

from __future__ import annotations

import os
from collections import deque
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
    #: Called once per round; returns how many datagrams it injected (the emulated kernel).
    tick: Callable[[], int] | None = None
    #: Called before the server takes any input (the relay drains its ring buffer there).
    before_server_input: Callable[[], None] | None = None
    #: Wire datagrams (already transformed) waiting to reach the client.
    injected_to_client: list[bytes] = field(default_factory=list)
    rounds_run: int = 0

    def pump(self, rounds: int = 50, max_time: float | None = None) -> None:
        """Exchange datagrams until neither side has anything to send (bounded in rounds and,
        with `max_time`, in simulated time)."""
        for _ in range(rounds):
            self.rounds_run += 1
            moved = self.tick() if self.tick is not None else 0
            moved += self._deliver_injected()  # the kernel's packets leave in wire-PN order
            moved += self._move(self.client, self.server, self.to_server, self.wire_to_server,
                                CLIENT_ADDR)
            moved += self._move(self.server, self.client, self.to_client, self.wire_to_client,
                                SERVER_ADDR)
            moved += self._deliver_injected()
            self._drain_events()
            if not moved:
                timer = min((t for t in (self.client.get_timer(), self.server.get_timer())
                             if t is not None), default=None)
                if timer is None or timer - self.now > 1.0:
                    return
                if max_time is not None and timer > max_time:
                    return
                # aioquic arms its loss timer at sent_time + delay but compares
                # sent_time <= now - delay: at now == timer, float rounding can leave it
                # armed at `now` forever. A real clock moves on; so does this one.
                self.now = timer if timer > self.now else self.now + 1e-6
                for conn in (self.client, self.server):
                    t = conn.get_timer()
                    if t is not None and t <= self.now:
                        if conn is self.server and self.before_server_input is not None:
                            self.before_server_input()
                        conn.handle_timer(now=self.now)

    def _deliver_injected(self) -> int:
        count = len(self.injected_to_client)
        for data in self.injected_to_client:
            self.wire_to_client.append(data)
            self.client.receive_datagram(data, SERVER_ADDR, now=self.now)
        self.injected_to_client.clear()
        return count

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
            if receiver is self.server and self.before_server_input is not None:
                self.before_server_input()
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
    extra_server_kwargs: dict[str, Any] | None = None,
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
              else FastrelayQuicConnection(crypto_backend=server_backend, **server_kwargs,
                                           **(extra_server_kwargs or {})))
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
        #: key-phase bit of every 1-RTT packet protected (relay -> peer) and unprotected
        #: (peer -> relay): the phase each side really used on the wire, for peers (qh3)
        #: whose key phase is not readable from Python
        self.sent_phases: list[int] = []
        self.received_phases: list[int] = []

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
        self.sent_phases.append((first & 0x04) >> 2)
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
        self.received_phases.append((plain_header[0] & 0x04) >> 2)
        return datagram[:offset] + plain_header + payload + self._token


# --- the fast path's part, emulated -----------------------------------------------------

def _varint(buf: Any) -> int:
    return buf.pull_uint_var()


@dataclass(frozen=True)
class StreamFrameSeen:
    """A STREAM frame found in a 1-RTT packet's plaintext."""

    wire_pn: int
    stream_id: int
    offset: int
    length: int
    fin: bool


def stream_frames(payload: bytes) -> list[tuple[int, int, int, bool]]:
    """(stream id, offset, length, fin) of every STREAM frame in a 1-RTT payload (RFC 9000 §19)."""
    from aioquic.buffer import Buffer
    from aioquic.quic.packet import pull_ack_frame

    buf = Buffer(data=payload)
    found = []
    while not buf.eof():
        frame_type = _varint(buf)
        if frame_type in (0x00, 0x01, 0x1E):  # PADDING, PING, HANDSHAKE_DONE
            continue
        if frame_type in (0x02, 0x03):  # ACK
            pull_ack_frame(buf)
            if frame_type == 0x03:
                for _ in range(3):
                    _varint(buf)
        elif frame_type == 0x04:  # RESET_STREAM
            for _ in range(3):
                _varint(buf)
        elif frame_type in (0x05, 0x11, 0x15):  # STOP_SENDING, MAX_STREAM_DATA, STREAM_DATA_BLOCKED
            _varint(buf)
            _varint(buf)
        elif frame_type == 0x06:  # CRYPTO
            _varint(buf)
            buf.pull_bytes(_varint(buf))
        elif frame_type == 0x07:  # NEW_TOKEN
            buf.pull_bytes(_varint(buf))
        elif 0x08 <= frame_type <= 0x0F:  # STREAM
            stream_id = _varint(buf)
            offset = _varint(buf) if frame_type & 0x04 else 0
            length = _varint(buf) if frame_type & 0x02 else len(payload) - buf.tell()
            buf.pull_bytes(length)
            found.append((stream_id, offset, length, bool(frame_type & 0x01)))
        elif frame_type in (0x10, 0x12, 0x13, 0x14, 0x16, 0x17, 0x19):
            _varint(buf)
        elif frame_type == 0x18:  # NEW_CONNECTION_ID
            _varint(buf)
            _varint(buf)
            buf.pull_bytes(buf.pull_uint8())
            buf.pull_bytes(16)
        elif frame_type in (0x1A, 0x1B):  # PATH_CHALLENGE / PATH_RESPONSE
            buf.pull_bytes(8)
        elif frame_type in (0x1C, 0x1D):  # CONNECTION_CLOSE
            _varint(buf)
            if frame_type == 0x1C:
                _varint(buf)
            buf.pull_bytes(_varint(buf))
        elif frame_type == 0x30:  # DATAGRAM without length
            buf.seek(len(payload))
        elif frame_type == 0x31:
            buf.pull_bytes(_varint(buf))
        else:
            raise ValueError(f"Unknown frame type 0x{frame_type:x}")
    return found


def encode_stream_frame(stream_id: int, offset: int, data: bytes, fin: bool) -> bytes:
    from aioquic.buffer import Buffer

    buf = Buffer(capacity=32 + len(data))
    buf.push_uint_var(0x08 | 0x04 | 0x02 | (0x01 if fin else 0))
    buf.push_uint_var(stream_id)
    buf.push_uint_var(offset)
    buf.push_uint_var(len(data))
    buf.push_bytes(data)
    return buf.data


@dataclass
class _PublisherStream:
    stream_id: int  # in the subscriber's space
    data: bytes
    offset: int = 0


class FastPathEmulator:
    """The TC egress/ingress programs of one subscriber connection, in-process.

    - Owns the relay→peer 1-RTT packet-number space: renumbers every packet the relay
      built and reports {built PN, wire PN, size, time, key phase} (`WireNumber`).
    - Injects forwarded packets built from fake publisher streams (STREAM frames on the
      subscriber's stream id from offset 0, id taken from the shared allocator), reports
      them (`ForwardedPacket`) and lets the relay shadow-write the bytes.
    - Protects/unprotects 1-RTT packets with the exported keys (`KernelEmulator`), across
      key updates.
    - Drops a fraction of packets in each direction, after numbering (wire loss), from a
      seeded RNG.
    - Records go to the relay in batches, before it takes input (the ring-buffer drain);
      `shuffle_records` delivers each batch out of order, `record_lag=n` holds the newest n
      batches back (ACKs can name packets not registered yet); `shadow="after"` applies the
      publisher-side data one drain after its records (ACK/LOST before the data).
    """

    def __init__(self, pair: Pair, keys: KernelEmulator, allocator: Any, *, seed: int = 1,
                 loss_to_peer: float = 0.0, loss_to_relay: float = 0.0, chunk: int = 1000,
                 packets_per_round: int = 4, shuffle_records: bool = False,
                 record_lag: int = 0, shadow: str = "before") -> None:
        import random

        self.pair = pair
        self.relay: FastrelayQuicConnection = pair.server
        self.keys = keys
        self.allocator = allocator
        self.rng = random.Random(seed)
        self.loss_to_peer = loss_to_peer
        self.loss_to_relay = loss_to_relay
        self.chunk = chunk
        self.packets_per_round = packets_per_round
        self.shuffle_records = shuffle_records
        self.record_lag = record_lag
        self.shadow = shadow
        self.next_wire_pn = 0
        self.peer_cid: bytes | None = None
        self.events: list[Any] = []
        self._records: list[Callable[[], None]] = []
        self._shadow_later: list[Callable[[], None]] = []
        self._record_batches: deque[list[Callable[[], None]]] = deque()
        self._shadow_batches: deque[list[Callable[[], None]]] = deque()
        self._streams: list[_PublisherStream] = []
        # what happened, for assertions
        self.forwarded: dict[int, Any] = {}  # wire pn -> ForwardedPacket
        self.dropped_forwarded: list[int] = []
        self.dropped_userspace = 0
        self.dropped_to_relay = 0
        self.userspace_frames: list[StreamFrameSeen] = []
        self.peer_key_phases: list[int] = []
        self.relay_key_phases: list[int] = []
        self.relay.listener = self._on_event
        self.relay._after_call()  # report what is known already (peer CID)
        pair.to_client = self.egress
        pair.to_server = self.ingress
        pair.tick = self.tick
        pair.before_server_input = self.drain

    # --- events from the relay (what the controller would write into maps) -------------

    def _on_event(self, event: Any) -> None:
        from relay.quic.fastpath import PeerConnectionIdChanged

        self.events.append(event)
        if isinstance(event, PeerConnectionIdChanged):
            self.peer_cid = event.new

    # --- the ring buffer ----------------------------------------------------------------

    def drain(self) -> None:
        """The relay drains the ring buffer; with `record_lag` the newest batches stay behind."""
        self._record_batches.append(self._records)
        self._records = []
        self._shadow_batches.append(self._shadow_later)
        self._shadow_later = []
        shadow_lag = self.record_lag + (1 if self.shadow == "after" else 0)
        self._apply(shadow_lag, self.record_lag)

    def flush(self) -> None:
        """Everything reported so far reaches the relay."""
        self.drain()
        self._apply(0, 0)

    @property
    def pending(self) -> bool:
        return any(self._record_batches) or any(self._shadow_batches)

    def _apply(self, shadow_lag: int, record_lag: int) -> None:
        # The relay reads each publisher stream in order: shadow writes are never reordered.
        while len(self._shadow_batches) > shadow_lag:
            for write in self._shadow_batches.popleft():
                write()
        while len(self._record_batches) > record_lag:
            records = self._record_batches.popleft()
            if self.shuffle_records:
                self.rng.shuffle(records)
            for record in records:
                record()

    # --- egress: relay → peer ------------------------------------------------------------

    def _send_phase(self) -> int:
        return self.keys.keys[Direction.SEND].material.current.key_phase

    def egress(self, datagram: bytes) -> bytes | None:
        from relay.quic.fastpath import WireNumber

        offset = short_header_offset(datagram)
        if offset is None:
            return datagram
        packet = datagram[offset:]
        pn_offset = 1 + CID_LENGTH
        built_pn = int.from_bytes(packet[pn_offset:pn_offset + 2], "big")
        wire_pn = self._number()
        key_phase = (packet[0] & 0x04) >> 2
        self.relay_key_phases.append(key_phase)
        packet = packet[:pn_offset] + (wire_pn & 0xFFFF).to_bytes(2, "big") + packet[pn_offset + 2:]
        for sid, off, length, fin in stream_frames(packet[pn_offset + 2:-AEAD_TAG_SIZE]):
            self.userspace_frames.append(StreamFrameSeen(wire_pn, sid, off, length, fin))
        now = self.pair.now
        self._records.append(lambda: self.relay.on_wire_number(
            WireNumber(built_pn, wire_pn, len(packet), now, key_phase)))
        protected = self.keys.egress(datagram[:offset] + packet)
        if protected is not None and self.rng.random() < self.loss_to_peer:
            self.dropped_userspace += 1
            return None
        return protected

    def _number(self) -> int:
        pn = self.next_wire_pn
        self.next_wire_pn += 1
        return pn

    # --- ingress: peer → relay ------------------------------------------------------------

    def ingress(self, datagram: bytes) -> bytes | None:
        if short_header_offset(datagram) is not None and self.rng.random() < self.loss_to_relay:
            self.dropped_to_relay += 1
            return None
        plain = self.keys.ingress(datagram)
        if plain is not None and (offset := short_header_offset(plain)) is not None:
            self.peer_key_phases.append((plain[offset] & 0x04) >> 2)
        return plain

    # --- forwarding -----------------------------------------------------------------------

    def publish(self, data: bytes) -> int:
        """A whole publisher stream to forward; returns its id on the subscriber's connection."""
        stream_id = self.allocator.reserve(1)[0]
        self._streams.append(_PublisherStream(stream_id, data))
        return stream_id

    @property
    def forwarding(self) -> bool:
        return bool(self._streams)

    def tick(self) -> int:
        sent = 0
        while self._streams and sent < self.packets_per_round:
            if self.relay.congestion_snapshot().available < self.chunk + 64:
                break  # the kernel respects the exported congestion allowance
            stream = self._streams[0]
            piece = stream.data[stream.offset:stream.offset + self.chunk]
            fin = stream.offset + len(piece) == len(stream.data)
            self._forward(stream, piece, fin)
            stream.offset += len(piece)
            if fin:
                self._streams.pop(0)
            sent += 1
        return sent

    def _forward(self, stream: _PublisherStream, piece: bytes, fin: bool) -> None:
        from relay.quic.fastpath import ForwardedFrame, ForwardedPacket

        assert self.peer_cid is not None, "no peer CID reported yet"
        wire_pn = self._number()
        key_phase = self._send_phase()
        header = (bytes([0x40 | (key_phase << 2) | 0x01]) + self.peer_cid
                  + (wire_pn & 0xFFFF).to_bytes(2, "big"))
        packet = header + encode_stream_frame(stream.stream_id, stream.offset, piece, fin) \
            + bytes(AEAD_TAG_SIZE)
        record = ForwardedPacket(wire_pn, len(packet), self.pair.now,
                                 (ForwardedFrame(stream.stream_id, stream.offset, len(piece), fin),),
                                 key_phase)
        self.forwarded[wire_pn] = record
        offset = stream.offset

        def shadow() -> None:
            self.relay.shadow_write(stream.stream_id, piece, offset=offset, end_stream=fin)

        self._shadow_later.append(shadow)
        self._records.append(lambda: self.relay.register_forwarded(record))
        protected = self.keys.egress(packet)
        assert protected is not None
        if self.rng.random() < self.loss_to_peer:
            self.dropped_forwarded.append(wire_pn)
            return
        self.pair.injected_to_client.append(protected)
