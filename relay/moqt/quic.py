"""aioquic adapter for MoqtSession: raw QUIC, ALPN `moq-00` only, DATAGRAM on.

- Connections are `relay.quic.connection.FastrelayQuicConnection` (MoQ stream priority,
  crypto backends, fast-path hooks).
- `MoqtProtocol`: a QuicConnectionProtocol that feeds stream data, resets and datagrams into
  its MoqtSession and writes the session's transmits back; session events go to a callback
  (the relay) or to `protocol.events` (the endpoints).
- `connect(url, ...)` (client) and `serve(host, port, cert, key, session_handler)` (server).
- `generate_certificate` / `certificate_fingerprint`: self-signed certificates for tests and
  demos, pinned by SHA-256 (`TlsOptions.fingerprint`), or verified by a CA file, or not at all
  (`insecure`, tests only).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import IntEnum
from functools import partial
from typing import cast
from urllib.parse import urlsplit

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.buffer import Buffer
from aioquic.quic import events as quic_events
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicPacketType,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from crypto_backends.base import CryptoBackend
from relay.quic.connection import FastrelayQuicConnection
from relay.quic.reset import may_be_stateless_reset

from .constants import ALPN, SessionErrorCode
from .session import (
    ConnectionClose,
    DatagramWrite,
    Event,
    MoqtSession,
    SessionClosed,
    SessionConfig,
    SessionReady,
    StopSending,
    StreamReset,
    StreamWrite,
)

logger = logging.getLogger(__name__)

DEFAULT_PORT = 443
# Large enough for any object datagram that fits a 1500-byte path; the peer's own limit is
# checked before each send (aioquic does not, notes/aioquic.md section 11).
MAX_DATAGRAM_FRAME_SIZE = 65535
IDLE_TIMEOUT = 30.0
# Per-datagram overhead to subtract from the path MTU: short header (1 + 20 CID + 4 PN),
# DATAGRAM frame type + length (1 + 2), AEAD tag 16.
_DATAGRAM_OVERHEAD = 1 + 20 + 4 + 3 + 16

class MoqtConnectError(Exception):
    """Connecting or setting up the MoQ session failed; the message says why."""


class MoqtProtocol(QuicConnectionProtocol):
    """Glues one QUIC connection to one MoqtSession."""

    def __init__(self, quic: QuicConnection, session: MoqtSession, *,
                 on_event: Callable[[MoqtProtocol, Event], None] | None = None,
                 fingerprint: str | None = None) -> None:
        super().__init__(quic)
        self.session = session
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.ready: asyncio.Future[SessionReady] = self._loop.create_future()
        # A setup failure nobody awaits any more (connect timed out) must not warn at exit.
        self.ready.add_done_callback(lambda f: None if f.cancelled() else f.exception())
        self.closed_event: SessionClosed | None = None
        self.datagrams_dropped = 0
        self._on_event = on_event
        self._fingerprint = fingerprint
        self._session_timer: asyncio.TimerHandle | None = None
        self._parked_resets: dict[int, int] = {}  # stream id -> code, once data is acked
        #: Sees every stream's bytes in order before the session does (the fast path keeps
        #: forwarded upstream streams this way): (stream id, data, end of stream).
        self.stream_tap: Callable[[int, bytes, bool], None] | None = None
        if isinstance(quic, FastrelayQuicConnection):
            quic.stream_priority = session.stream_priorities.get
            session.set_uni_stream_ids(quic.take_uni_stream_id)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if isinstance(self._quic, FastrelayQuicConnection):  # offloading crypto keys by it
            self._quic.local_address = transport.get_extra_info("sockname")

    # -- QUIC -> session -----------------------------------------------------------------------

    def quic_event_received(self, event: quic_events.QuicEvent) -> None:
        now = self._loop.time()
        session = self.session
        if isinstance(event, quic_events.StreamDataReceived):
            if self.stream_tap is not None:
                self.stream_tap(event.stream_id, event.data, event.end_stream)
            session.stream_data_received(event.stream_id, event.data, event.end_stream, now)
        elif isinstance(event, quic_events.DatagramFrameReceived):
            session.datagram_received(event.data, now)
        elif isinstance(event, quic_events.StreamReset):
            session.stream_reset(event.stream_id, event.error_code, now)
        elif isinstance(event, quic_events.HandshakeCompleted):
            if not self._pin_ok():
                return
            session.connection_made(now)
        elif isinstance(event, quic_events.ConnectionTerminated):
            # A frame type is set only by QUIC's own CONNECTION_CLOSE (0x1c): its code is a
            # transport error, not a MoQ session code.
            session.connection_lost(event.error_code, event.reason_phrase, now,
                                    quic_error=event.frame_type is not None)
        self._drain()

    def stateless_reset_check(self, data: bytes) -> bool:
        """`data` reached no connection: if it is a stateless reset for this one, the
        connection ends without sending anything (FastrelayQuicConnection)."""
        quic = self._quic
        if not isinstance(quic, FastrelayQuicConnection):
            return False
        if not quic.check_stateless_reset(data, self._loop.time()):
            return False
        self._process_events()  # ConnectionTerminated: the session and the owner clean up
        self.transmit()  # sends nothing once terminated; cancels the timer
        return True

    def _pin_ok(self) -> bool:
        if self._fingerprint is None:
            return True
        certificate = self._quic.tls._peer_certificate
        actual = certificate.fingerprint(hashes.SHA256()).hex() if certificate else ""
        if actual == normalise_fingerprint(self._fingerprint):
            return True
        reason = f"certificate fingerprint mismatch (server has {actual or 'none'})"
        self.session.close(SessionErrorCode.UNAUTHORIZED, reason)
        return False

    # -- session -> QUIC and the owner ---------------------------------------------------------

    def flush(self) -> None:
        """Send what the session queued (call after issuing commands)."""
        self._drain()

    def _drain(self) -> None:
        # The owner's callback may issue commands (accept_subscribe, ...) that queue more
        # transmits: loop until the session has nothing left, then send once.
        while True:
            transmits = self.session.transmits()
            for t in transmits:
                self._apply(t)
            event = self.session.next_event()
            if event is None and not transmits:
                break
            if event is not None:
                self._deliver(event)
        self.transmit()
        self._arm_session_timer()

    def _apply(self, t: object) -> None:
        quic = self._quic
        if isinstance(t, StreamWrite):
            quic.send_stream_data(t.stream_id, t.data, t.end_stream)
        elif isinstance(t, DatagramWrite):
            limit = quic._remote_max_datagram_frame_size
            if limit is None or len(t.data) > min(limit, self.max_datagram_payload()):
                self.datagrams_dropped += 1  # too big for the path: dropped, as the draft says
            else:
                quic.send_datagram_frame(t.data)
        elif isinstance(t, StreamReset):
            if t.after_delivery and not self._delivered(t.stream_id):
                self._parked_resets[t.stream_id] = t.error_code
            else:
                quic.reset_stream(t.stream_id, t.error_code)
        elif isinstance(t, StopSending):
            quic.stop_stream(t.stream_id, t.error_code)
        elif isinstance(t, ConnectionClose):
            quic.close(error_code=t.error_code, reason_phrase=t.reason_phrase)

    def _deliver(self, event: Event) -> None:
        if isinstance(event, SessionReady) and not self.ready.done():
            self.ready.set_result(event)
        elif isinstance(event, SessionClosed):
            self.closed_event = event
            if not self.ready.done():
                self.ready.set_exception(MoqtConnectError(
                    f"MoQ session closed during setup: {describe_close(event)}"))
        if self._on_event is not None:
            try:
                self._on_event(self, event)
            except Exception as exc:  # the owner's bug costs this session, not the loop
                logger.exception("session event handler failed on %s", type(event).__name__)
                self.session.close(SessionErrorCode.INTERNAL_ERROR,
                                   f"internal error: {type(exc).__name__}")
        else:
            self.events.put_nowait(event)

    def _delivered(self, stream_id: int) -> bool:
        stream = self._quic._streams.get(stream_id)
        return stream is None or stream.sender._buffer_start >= stream.sender._buffer_stop

    def transmit(self) -> None:
        # Parked resets (StreamReset.after_delivery) go out once their data is acknowledged;
        # aioquic calls transmit() after every received datagram, so ACKs are seen here.
        for stream_id, code in list(self._parked_resets.items()):
            if self._delivered(stream_id):
                del self._parked_resets[stream_id]
                self._quic.reset_stream(stream_id, code)
        super().transmit()

    def max_datagram_payload(self) -> int:
        return self._quic._max_datagram_size - _DATAGRAM_OVERHEAD

    def _arm_session_timer(self) -> None:
        at = self.session.get_timer()
        if self._session_timer is not None:
            self._session_timer.cancel()
            self._session_timer = None
        if at is not None:
            self._session_timer = self._loop.call_at(at, self._on_session_timer)

    def _on_session_timer(self) -> None:
        self._session_timer = None
        self.session.handle_timer(self._loop.time())
        self._drain()

    async def next_event(self, timeout: float | None = None) -> Event | None:
        """The next session event, or None after `timeout` seconds."""
        try:
            return await asyncio.wait_for(self.events.get(), timeout)
        except asyncio.TimeoutError:
            return None

    def close_session(self, error_code: int = SessionErrorCode.NO_ERROR,
                      reason_phrase: str = "") -> None:
        self.session.close(error_code, reason_phrase)
        self._drain()


def describe_close(event: SessionClosed) -> str:
    codes: type[IntEnum] = QuicErrorCode if event.quic_error else SessionErrorCode
    try:
        name = codes(event.error_code).name
    except ValueError:
        name = f"code {event.error_code:#x}"
    who = "the QUIC connection" if event.quic_error else ("peer" if event.by_peer else "we")
    return f"{who} closed with {name}" + (f": {event.reason_phrase}" if event.reason_phrase
                                          else "")


# -- TLS and certificates --------------------------------------------------------------------


@dataclass(frozen=True)
class TlsOptions:
    """How a client checks the server: a CA file, a SHA-256 pin, or nothing (tests only)."""

    insecure: bool = False
    fingerprint: str | None = None
    cafile: str | None = None


def normalise_fingerprint(text: str) -> str:
    return text.replace(":", "").strip().lower()


def certificate_fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the certificate's DER encoding, lower-case hex (what pins compare)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.fingerprint(hashes.SHA256()).hex()


def generate_certificate(hostnames: list[str], *, days: int = 14) -> tuple[bytes, bytes, str]:
    """A self-signed ECDSA P-256 certificate: (cert PEM, key PEM, SHA-256 fingerprint hex).

    Short-lived (14 days by default), as browsers' serverCertificateHashes demand; ECDSA keeps
    the handshake small."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
    alt_names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert_pem, key_pem, cert.fingerprint(hashes.SHA256()).hex()


def _configuration(is_client: bool) -> QuicConfiguration:
    return QuicConfiguration(is_client=is_client, alpn_protocols=[ALPN],
                             max_datagram_frame_size=MAX_DATAGRAM_FRAME_SIZE,
                             idle_timeout=IDLE_TIMEOUT)


# -- client ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoqtUrl:
    host: str
    port: int
    path: str

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_url(url: str) -> MoqtUrl:
    """moqt://host[:port]/path (raw QUIC; draft-14 has no default port, 443 is used)."""
    parts = urlsplit(url)
    if parts.scheme != "moqt" or not parts.hostname:
        raise ValueError(f"{url!r} is not a moqt://host:port/path URL")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return MoqtUrl(parts.hostname, parts.port or DEFAULT_PORT, path)


@asynccontextmanager
async def connect(url: str, *, tls: TlsOptions = TlsOptions(), timeout: float = 5.0,
                  session_config: SessionConfig | None = None,
                  on_event: Callable[[MoqtProtocol, Event], None] | None = None,
                  crypto: CryptoBackend | None = None,
                  ) -> AsyncIterator[MoqtProtocol]:
    """A MoQ session to `url`, set up (SERVER_SETUP received) within `timeout` seconds.

    `crypto` selects how 1-RTT packets are protected (None: standard QUIC)."""
    target = parse_url(url)
    loop = asyncio.get_running_loop()
    config = _configuration(is_client=True)
    config.server_name = target.host
    if tls.insecure or tls.fingerprint:
        config.verify_mode = ssl.CERT_NONE  # the pin is checked after the handshake
    if tls.cafile:
        config.load_verify_locations(cafile=tls.cafile)
    infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_DGRAM)
    family, _, _, _, addr = infos[0]
    session = MoqtSession(session_config or SessionConfig(
        is_client=True, path=target.path, authority=target.authority))
    quic = FastrelayQuicConnection(configuration=config, crypto_backend=crypto)
    local = ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: MoqtProtocol(quic, session, on_event=on_event, fingerprint=tls.fingerprint),
        local_addr=local)
    never_fragment(transport.get_extra_info("socket"))
    protocol = cast(MoqtProtocol, protocol)
    try:
        protocol.connect(addr)  # the full tuple: aioquic compares it with recvfrom()'s
        try:
            await asyncio.wait_for(asyncio.shield(protocol.ready), timeout)
        except asyncio.TimeoutError:
            raise MoqtConnectError(f"no MoQ session with {url} within {timeout:g} s; is the "
                                   "server up?") from None
        yield protocol
    finally:
        protocol.close_session()
        try:
            await asyncio.wait_for(protocol.wait_closed(), 1.0)
        except asyncio.TimeoutError:
            pass
        transport.close()


# -- server ------------------------------------------------------------------------------------

SessionHandler = Callable[[MoqtProtocol], None]


class MoqtServer(QuicServer):
    """aioquic's QuicServer, creating FastrelayQuicConnections and MoqtProtocols.

    aioquic builds `QuicConnection` by name inside `QuicServer.datagram_received`
    (`asyncio/server.py:187`), so connection creation is redone here (without Retry); demux by
    connection id and the CID bookkeeping callbacks are the parent's."""

    def __init__(self, *, configuration: QuicConfiguration, session_handler: SessionHandler,
                 session_config: SessionConfig,
                 on_event: Callable[[MoqtProtocol, Event], None] | None,
                 crypto: CryptoBackend | None = None) -> None:
        super().__init__(configuration=configuration)
        self._crypto = crypto
        self._session_handler = session_handler
        self._session_config = session_config
        self._on_event = on_event
        self.protocols: list[MoqtProtocol] = []

    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        data = cast(bytes, data)
        try:
            header = pull_quic_header(Buffer(data=data),
                                      host_cid_length=self._configuration.connection_id_length)
        except ValueError:
            self._stateless_reset_check(data, addr)
            return
        if (header.packet_type != QuicPacketType.VERSION_NEGOTIATION
                and header.version is not None
                and header.version not in self._configuration.supported_versions):
            self._transport.sendto(encode_quic_version_negotiation(
                source_cid=header.destination_cid, destination_cid=header.source_cid,
                supported_versions=self._configuration.supported_versions), addr)
            return
        protocol = self._protocols.get(header.destination_cid)
        if protocol is None and len(data) >= SMALLEST_MAX_DATAGRAM_SIZE and \
                header.packet_type == QuicPacketType.INITIAL:
            connection = FastrelayQuicConnection(
                configuration=self._configuration, crypto_backend=self._crypto,
                original_destination_connection_id=header.destination_cid,
                reset_detectable_peer_cid=True)
            protocol = MoqtProtocol(connection, MoqtSession(self._session_config),
                                    on_event=self._on_event)
            protocol.connection_made(self._transport)
            protocol._connection_id_issued_handler = partial(self._connection_id_issued,
                                                             protocol=protocol)
            protocol._connection_id_retired_handler = partial(self._connection_id_retired,
                                                              protocol=protocol)
            protocol._connection_terminated_handler = partial(self._connection_terminated,
                                                              protocol=protocol)
            self._protocols[header.destination_cid] = protocol
            self._protocols[connection.host_cid] = protocol
            self.protocols.append(protocol)
            self._session_handler(protocol)
        if protocol is not None:
            protocol.datagram_received(data, addr)
        else:
            self._stateless_reset_check(data, addr)

    def _stateless_reset_check(self, data: bytes, addr: NetworkAddress) -> None:
        """RFC 9000 §10.3.1: a datagram that belongs to no connection (its connection id is
        random) may be a stateless reset from a peer that lost its state: compared with the
        tokens of the connections to that address (relay.quic.reset)."""
        if not may_be_stateless_reset(data):
            return
        for protocol in list(self.protocols):
            if protocol._quic.get_peer_address() == addr:
                protocol.stateless_reset_check(data)

    def _connection_terminated(self, protocol: QuicConnectionProtocol) -> None:
        super()._connection_terminated(protocol)
        if protocol in self.protocols:
            self.protocols.remove(protocol)


# RFC 9000 §14: QUIC's UDP datagrams are never fragmented at the IP layer; in IPv4 the DF bit
# is set. Linux's IP_PMTUDISC_PROBE sets DF and does not let ICMP-learned path MTUs shrink
# what may be sent (QUIC sizes its own datagrams): one over the interface MTU fails with
# EMSGSIZE instead of leaving in fragments. That also keeps every 1-RTT packet whole for
# the crypto shim, which neither parses nor could protect a fragment.
IP_MTU_DISCOVER, IPV6_MTU_DISCOVER, PMTUDISC_PROBE = 10, 23, 3  # linux/in.h, linux/in6.h


def never_fragment(sock: socket.socket | None) -> None:
    """Set DF on a QUIC socket's datagrams (both families on a dual-stack IPv6 socket)."""
    if sock is None:
        return
    options = [(socket.IPPROTO_IP, IP_MTU_DISCOVER)]
    if sock.family == socket.AF_INET6:
        options.insert(0, (socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER))
    for level, option in options:
        try:
            sock.setsockopt(level, option, PMTUDISC_PROBE)
        except OSError:  # an IPv6-only socket has no IPv4 datagrams to mark
            pass


async def serve(host: str, port: int, cert: str | os.PathLike[str],
                key: str | os.PathLike[str], session_handler: SessionHandler, *,
                session_config: SessionConfig | None = None,
                on_event: Callable[[MoqtProtocol, Event], None] | None = None,
                crypto: CryptoBackend | None = None) -> MoqtServer:
    """Listen for MoQ sessions; `session_handler(protocol)` runs for each new connection.

    Events reach `on_event(protocol, event)` if given, else each `protocol.events` queue.
    Close with `server.close()`."""
    config = _configuration(is_client=False)
    config.load_cert_chain(cert, key)
    loop = asyncio.get_running_loop()
    _, server = await loop.create_datagram_endpoint(
        lambda: MoqtServer(configuration=config, session_handler=session_handler,
                           session_config=session_config or SessionConfig(is_client=False),
                           on_event=on_event, crypto=crypto),
        local_addr=(host, port))
    never_fragment(server._transport.get_extra_info("socket"))
    return cast(MoqtServer, server)


def server_address(server: MoqtServer) -> tuple[str, int]:
    sockname = server._transport.get_extra_info("sockname")
    return sockname[0], sockname[1]
