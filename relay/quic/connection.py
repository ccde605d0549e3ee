"""`FastrelayQuicConnection`: aioquic's QuicConnection with a crypto backend plugged into 1-RTT
and the hooks the fast path needs.

Without a backend it is stock aioquic: standard QUIC. With `none` it offers
`disable_1rtt_encryption` and insists the peer does too; with an offloading backend its
1-RTT packets take the plaintext layout and its keys go to the backend.

Fast-path hooks (all in userspace, the kernel is reached through records and events):
- `on_wire_number(WireNumber)`: the kernel numbered a packet userspace built
  (`kernel_numbers_packets=True` parks 1-RTT packets until then);
- `register_forwarded(ForwardedPacket)`: the kernel sent a packet on our behalf;
- `shadow_write(stream_id, data, ...)`: bytes the kernel sent go into the stream's send
  buffer, so a loss retransmits them on the same stream id;
- `reserve_stream_ids(n)` / `open_send_stream(id)`: one allocator shared with the kernel,
  streams adopted in any order;
- `credit_snapshot()`, `stream_credit_snapshot(id)`, `congestion_snapshot()` and the
  `listener` callback (`relay.quic.fastpath` events) for credit, congestion, connection
  ids, peer address and lost forwarded packets.

MoQ stream priority. aioquic 1.7.2 serves streams round-robin from `QuicConnection._streams_queue`
(`connection.py:3745-3795`): every packet walks the list in order, and after each packet the
streams that sent move to the end. MoQ wants the subscriber priority, then the publisher
priority, to decide which stream's data goes first (draft-14 section 7). The hook: the subclass
turns `_streams_queue` into a property whose setter keeps the list stably sorted by
`(subscriber priority, publisher priority)`, lower first. aioquic reassigns the list after every
packet (the `finally` at `:3790`), so the order holds packet by packet, and the stable sort keeps
aioquic's round-robin among streams of equal priority. Streams without a priority (the control
stream, peer-initiated streams) sort first. Streams are appended unsorted on creation
(`:1730`, `:1771`); the next reassignment sorts them, and `_write_application` is entered with a
fresh sort too.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
from collections.abc import Callable
from typing import Any

import aioquic
from aioquic import tls
from aioquic.buffer import Buffer, BufferReadError
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import (
    END_STATES,
    NetworkAddress,
    QuicConnection,
    QuicConnectionError,
    QuicConnectionState,
    QuicReceiveContext,
    stream_is_client_initiated,
)
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicFrameType,
    QuicPacketType,
    pull_quic_transport_parameters,
)
from aioquic.quic.packet_builder import QuicDeliveryState, QuicSentPacket
from aioquic.quic.rangeset import RangeSet
from aioquic.quic.stream import QuicStream

from crypto_backends.base import ConnectionPath, CryptoBackend, Direction
from crypto_backends.none import DISABLE_1RTT_ENCRYPTION
from relay.quic.crypto import OneRttCryptoPair, OneRttMode
from relay.quic.fastpath import (
    CongestionChanged,
    CongestionSnapshot,
    CreditChanged,
    CreditSnapshot,
    FastPathEvent,
    FastPathListener,
    ForwardedPacket,
    ForwardedPacketLost,
    HostConnectionIdIssued,
    HostConnectionIdRetired,
    PeerAddressChanged,
    PeerConnectionIdChanged,
    StreamCreditChanged,
    StreamCreditSnapshot,
    StreamIdAllocator,
    WireNumber,
)
from relay.quic.recovery import FastPathRecovery
from relay.quic.reset import STATELESS_RESET_TOKEN_SIZE, matches_stateless_reset

# The hooks below use aioquic internals (notes/aioquic.md); they are checked against this version.
AIOQUIC_VERSION = "1.7.2"
if aioquic.__version__ != AIOQUIC_VERSION:  # pragma: no cover
    raise ImportError(f"relay.quic needs aioquic {AIOQUIC_VERSION}, found {aioquic.__version__}")

_connection_numbers = itertools.count(1)
logger = logging.getLogger(__name__)
#: The reason a connection ended by a stateless reset reports (ConnectionTerminated).
STATELESS_RESET_REASON = "stateless reset from the peer"


def encode_transport_parameter(param_id: int, value: bytes = b"") -> bytes:
    """One transport parameter, RFC 9000 §18: id (varint), length (varint), value."""
    buf = Buffer(capacity=16 + len(value))
    buf.push_uint_var(param_id)
    buf.push_uint_var(len(value))
    buf.push_bytes(value)
    return buf.data


def has_transport_parameter(data: bytes, param_id: int) -> bool:
    """Whether encoded transport parameters contain `param_id` (malformed input: False)."""
    buf = Buffer(data=data)
    try:
        while not buf.eof():
            current = buf.pull_uint_var()
            buf.pull_bytes(buf.pull_uint_var())
            if current == param_id:
                return True
    except BufferReadError:
        return False
    return False


class PeerRefusedNullCrypto(QuicConnectionError):
    """--crypto=none demands disable_1rtt_encryption and the peer did not send it."""


class KeyUpdateNotAllowed(RuntimeError):
    """RFC 9001 §6.1: no key update before an ACK of a packet sent in the current key phase."""


@dataclasses.dataclass
class FastPathStats:
    forwarded_registered: int = 0
    forwarded_acked: int = 0
    forwarded_lost: int = 0
    wire_numbers: int = 0
    shadow_bytes: int = 0
    deliveries_parked: int = 0
    deliveries_replayed: int = 0
    streams_adopted_out_of_order: int = 0


_Delivery = tuple[int, int, QuicDeliveryState, int, int, bool]  # stop, seq, state, start, stop, fin


PriorityKey = tuple[int, int]
_UNPRIORITISED: PriorityKey = (-1, -1)  # control stream and peer streams go first


class FastrelayQuicConnection(QuicConnection):
    def __init__(self, *, configuration: QuicConfiguration,
                 crypto_backend: CryptoBackend | None = None,
                 kernel_numbers_packets: bool = False,
                 stream_id_allocator: StreamIdAllocator | None = None,
                 listener: FastPathListener | None = None,
                 host_cid_factory: Callable[[int], bytes] | None = None,
                 reset_detectable_peer_cid: bool = False,
                 **kwargs: Any) -> None:
        # aioquic assigns _streams_queue inside __init__: the priority table must exist first.
        #: (subscriber priority, publisher priority) of a stream, lower first; None = first.
        self.stream_priority: Callable[[int], PriorityKey | None] = lambda stream_id: None
        self.crypto_backend = crypto_backend
        #: The number backends and the kernel maps know this connection by.
        self.connection_number = next(_connection_numbers)
        if crypto_backend is not None:
            # As TLS server this order decides; as client it is all we offer.
            configuration = dataclasses.replace(configuration, cipher_suites=list(
                crypto_backend.tls_cipher_suites(is_client=configuration.is_client)))
        #: The UDP socket's own address (set by the I/O adapter); offloading backends key
        #: the kernel's per-connection state by it.
        self.local_address: NetworkAddress | None = None
        self.listener = listener
        self.stream_id_allocator = stream_id_allocator
        self.fastpath = FastPathStats()
        self._host_cid_factory = host_cid_factory
        self._opened_local = {0: RangeSet(), 1: RangeSet(), 2: RangeSet(), 3: RangeSet()}
        self._peeked_stream_ids: dict[int, int] = {}
        #: The peer's max_udp_payload_size transport parameter (RFC 9000 §18.2 default).
        self.peer_max_udp_payload_size = 65527
        self._handed_out: dict[int, int] = {}  # kind -> highest id aioquic's own allocator gave
        self._parked_deliveries: dict[int, list[_Delivery]] = {}
        self._delivery_seq = itertools.count()
        # key phase bookkeeping for RFC 9001 §6.1, from the key-phase bits the kernel reports
        self._phase_bit: int | None = None
        self._phase_generation = 0
        self._phase_acked_generation = -1
        # last values reported through the listener
        self._last_congestion: CongestionSnapshot | None = None
        self._one_rtt_space: Any = None
        self._last_peer_cid: bytes | None = None
        self._last_peer_address: NetworkAddress | None = None
        # Stateless resets (RFC 9000 §10.3, relay.quic.reset): packets of the datagram being
        # received that decrypted; whether a reset ended this connection; the token last
        # handed to the crypto backend (None: none yet).
        self._rx_decrypted = 0
        self.stateless_reset_received = False
        self._exported_reset_token: bytes | None = None
        #: Server side: move once off the client's first connection id, which has no token
        #: (a client sends no stateless_reset_token, RFC 9000 §18.2), to the next one it
        #: issues, so that its stateless reset can be recognised (§10.3.1).
        self._switch_to_tokened_cid = reset_detectable_peer_cid
        super().__init__(configuration=configuration, **kwargs)
        # Nothing has captured the stock recovery yet; spaces are attached in _initialize.
        self._loss: FastPathRecovery = FastPathRecovery(
            kernel_numbers_packets=kernel_numbers_packets,
            congestion_control_algorithm=self._configuration.congestion_control_algorithm,
            initial_rtt=self._configuration.initial_rtt,
            max_datagram_size=self._max_datagram_size,
            peer_completed_address_validation=not self._is_client,
            quic_logger=self._quic_logger,
            send_probe=self._send_probe,
            logger=self._logger,
        )
        first = self._host_cids[0]
        if host_cid_factory is not None:
            # Transport parameters (initial_source_connection_id) are serialized later.
            first.cid = host_cid_factory(first.sequence_number)
            self.host_cid = first.cid
            self._local_initial_source_connection_id = first.cid
        self._emit(HostConnectionIdIssued(first.sequence_number, first.cid,
                                          first.stateless_reset_token))

    # --- MoQ stream priority (see the module docstring) ---------------------------------

    def _priority_key(self, stream: QuicStream) -> PriorityKey:
        key = self.stream_priority(stream.stream_id)
        return _UNPRIORITISED if key is None else key

    @property  # type: ignore[override]
    def _streams_queue(self) -> list[QuicStream]:
        return self._fr_streams_queue

    @_streams_queue.setter
    def _streams_queue(self, value: list[QuicStream]) -> None:
        self._fr_streams_queue = sorted(value, key=self._priority_key)

    def _write_application(self, *args: Any, **kwargs: Any) -> None:
        self._fr_streams_queue.sort(key=self._priority_key)
        super()._write_application(*args, **kwargs)

    @property
    def one_rtt_mode(self) -> OneRttMode:
        pair = self._cryptos.get(tls.Epoch.ONE_RTT) if hasattr(self, "_cryptos") else None
        return pair.mode if isinstance(pair, OneRttCryptoPair) else OneRttMode.STANDARD

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        self._one_rtt_space = self._spaces.get(tls.Epoch.ONE_RTT)
        if self.crypto_backend is not None:
            # No 1-RTT key exists yet and nothing else holds the stock pair: swap it, keeping
            # its qlog callbacks.
            stock = self._cryptos[tls.Epoch.ONE_RTT]
            self._cryptos[tls.Epoch.ONE_RTT] = OneRttCryptoPair(
                backend=self.crypto_backend,
                connection=self.connection_number,
                recv_setup_cb=stock.recv._setup_cb,
                recv_teardown_cb=stock.recv._teardown_cb,
                send_setup_cb=stock.send._setup_cb,
                send_teardown_cb=stock.send._teardown_cb,
                path_of=self._connection_path,
            )
        # Every pair aioquic decrypts with (it creates none after this): count successes,
        # so a stateless reset is looked for only in a datagram nothing of which decrypted.
        watched: set[int] = set()
        for pair in (*self._cryptos_initial.values(), *self._cryptos.values()):
            if id(pair) not in watched:
                watched.add(id(pair))
                self._watch_decrypt(pair)

    def _watch_decrypt(self, pair: CryptoPair) -> None:
        decrypt = pair.decrypt_packet

        def counted(packet: bytes, encrypted_offset: int,
                    expected_packet_number: int) -> tuple[bytes, bytes, int]:
            result = decrypt(packet, encrypted_offset, expected_packet_number)
            self._rx_decrypted += 1  # not reached when it raised (packet dropped)
            return result

        # An instance attribute: receive_datagram calls `crypto.decrypt_packet(...)`.
        pair.decrypt_packet = counted  # type: ignore[method-assign]

    def _connection_path(self, direction: Direction) -> ConnectionPath | None:
        """This connection's addresses for the crypto backend, None while unknown."""
        peer = self.get_peer_address()
        if self.local_address is None or peer is None:
            return None
        # Short headers carry our CID inbound and the peer's outbound (RFC 9000 §17.3).
        cid = self.host_cid if direction is Direction.RECV else self._peer_cid.cid
        return ConnectionPath(local=(self.local_address[0], self.local_address[1]),
                              peer=(peer[0], peer[1]), dcid_len=len(cid))

    def _wants_null_crypto(self) -> bool:
        return self.crypto_backend is not None and self.crypto_backend.name == "none"

    def _serialize_transport_parameters(self) -> bytes:
        data = super()._serialize_transport_parameters()
        if self._wants_null_crypto():
            data += encode_transport_parameter(DISABLE_1RTT_ENCRYPTION)
        return data

    def _fastrelay_parse_transport_parameters(self, data: bytes, from_session_ticket: bool) -> None:
        super()._parse_transport_parameters(data, from_session_ticket)
        if not self._wants_null_crypto() or from_session_ticket:
            return
        if not has_transport_parameter(data, DISABLE_1RTT_ENCRYPTION):
            raise PeerRefusedNullCrypto(
                error_code=QuicErrorCode.TRANSPORT_PARAMETER_ERROR,
                frame_type=QuicFrameType.CRYPTO,
                reason_phrase="--crypto=none requires the peer to send disable_1rtt_encryption "
                              "(0xBAAD, draft-banks-quic-disable-encryption); it did not",
            )
        pair = self._cryptos[tls.Epoch.ONE_RTT]
        assert isinstance(pair, OneRttCryptoPair)
        pair.enable_null()

    # === fast-path hooks ================================================================

    def _emit(self, event: FastPathEvent) -> None:
        if self.listener is not None:
            self.listener(event)

    # --- calls in: report what changed afterwards (no aioquic event exists for these) ---

    def receive_datagram(self, data: bytes, addr: NetworkAddress, now: float) -> None:
        self._rx_decrypted = 0
        super().receive_datagram(data, addr, now)
        if not self._rx_decrypted:
            # RFC 9000 §10.3.1: its first packet could not be associated with this
            # connection (our client socket) or decrypted. Never after a packet decrypted:
            # a real packet must not be taken for a reset.
            self.check_stateless_reset(data, now)
        self._after_call()

    # --- stateless reset (RFC 9000 §10.3, relay.quic.reset) ---------------------------------

    def stateless_reset_tokens(self) -> list[bytes]:
        """The peer's stateless reset tokens this endpoint may compare with: those of the
        peer connection ids it uses (the current one and those of probed paths). Not those
        of ids it has not used or has retired (RFC 9000 §10.3.1); a server's token for the
        peer's first connection id does not exist (a client sends none, §18.2)."""
        cids = [self._peer_cid, *(p.peer_cid for p in self._network_paths if p.peer_cid)]
        return [c.stateless_reset_token for c in cids
                if len(c.stateless_reset_token) == STATELESS_RESET_TOKEN_SIZE]

    def check_stateless_reset(self, data: bytes, now: float) -> bool:
        """Call only for a datagram nothing of which could be processed. When its last 16
        bytes are one of the peer's tokens, the connection drains without sending anything
        and ends at once (the peer has no state to wait for): a ConnectionTerminated event,
        keys discarded, so the owner's normal teardown runs. Returns whether it was one."""
        if self._state in END_STATES or not matches_stateless_reset(
                data, self.stateless_reset_tokens()):
            return False
        self.stateless_reset_received = True
        logger.warning("connection %d with %s: stateless reset received, connection ends",
                       self.connection_number, self.get_peer_address())
        self._close_event = events.ConnectionTerminated(
            error_code=QuicErrorCode.NO_ERROR,
            frame_type=QuicFrameType.PADDING,  # as aioquic's own silent ends (idle timeout)
            reason_phrase=STATELESS_RESET_REASON,
        )
        self._set_state(QuicConnectionState.DRAINING)  # nothing is sent from here on
        self._close_end()
        return True

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, NetworkAddress]]:
        datagrams = super().datagrams_to_send(now)
        self._after_call()
        return datagrams

    def handle_timer(self, now: float) -> None:
        super().handle_timer(now)
        self._after_call()

    def change_connection_id(self) -> None:
        super().change_connection_id()
        self._after_call()

    def _after_call(self) -> None:
        # Runs after every datagram: compare the raw values, build the snapshot on change.
        if self._switch_to_tokened_cid and self._handshake_confirmed:
            self._use_tokened_peer_cid()
        loss = self._loss
        last = self._last_congestion
        if last is None or (loss.congestion_window, loss.bytes_in_flight, loss.parked_packets,
                            self._largest_acked_1rtt()) != (
                last.congestion_window, last.bytes_in_flight, last.parked_packets,
                last.largest_acked):
            congestion = self.congestion_snapshot()
            self._last_congestion = congestion
            self._emit(CongestionChanged(congestion))
        peer = self._peer_cid
        if peer.sequence_number is not None and peer.cid != self._last_peer_cid:
            self._emit(PeerConnectionIdChanged(self._last_peer_cid, peer.cid, peer.sequence_number))
            self._last_peer_cid = peer.cid
        address = self.get_peer_address()
        if address is not None and address != self._last_peer_address:
            self._emit(PeerAddressChanged(self._last_peer_address, address))
            self._last_peer_address = address
        if self.crypto_backend is not None and self._state not in END_STATES:
            self._export_reset_token()

    def _use_tokened_peer_cid(self) -> None:
        """Once the client issued a further connection id of the same length (the kernel
        parses headers by that length), use it and retire the first (aioquic's
        change_connection_id): the peer CID change reaches the fast path as an event."""
        if self._state is not QuicConnectionState.CONNECTED or self._peer_cid.stateless_reset_token:
            self._switch_to_tokened_cid = False
            return
        available = self._peer_cid_available
        if not available:
            return  # NEW_CONNECTION_ID not received yet
        self._switch_to_tokened_cid = False
        if len(available[0].cid) == len(self._peer_cid.cid) and available[0].stateless_reset_token:
            super().change_connection_id()

    def _export_reset_token(self) -> None:
        """The kernel shim passes a datagram ending in this token up instead of dropping it
        as a bad tag: the token of the peer connection id in use (zero: none)."""
        token = self._peer_cid.stateless_reset_token
        if len(token) != STATELESS_RESET_TOKEN_SIZE:
            token = bytes(STATELESS_RESET_TOKEN_SIZE)
        if token == self._exported_reset_token or self.one_rtt_mode is not OneRttMode.PASS_THROUGH:
            return
        assert self.crypto_backend is not None
        if self.crypto_backend.set_reset_token(self.connection_number, token):
            self._exported_reset_token = token

    # --- snapshots ---------------------------------------------------------------------

    def credit_snapshot(self) -> CreditSnapshot:
        return CreditSnapshot(
            max_data=self._remote_max_data,
            data_used=self._remote_max_data_used,
            max_streams_uni=self._remote_max_streams_uni,
            max_streams_bidi=self._remote_max_streams_bidi,
            initial_max_stream_data_uni=self._remote_max_stream_data_uni,
            initial_max_stream_data_bidi=self._remote_max_stream_data_bidi_remote,
        )

    def stream_credit_snapshot(self, stream_id: int) -> StreamCreditSnapshot | None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return None
        return StreamCreditSnapshot(stream_id, stream.max_stream_data_remote,
                                    stream.sender.highest_offset)

    def congestion_snapshot(self) -> CongestionSnapshot:
        return CongestionSnapshot(self._loss.congestion_window, self._loss.bytes_in_flight,
                                  self._loss.parked_packets, self._largest_acked_1rtt())

    def _largest_acked_1rtt(self) -> int:
        # the space is kept from _initialize: a dict lookup by enum key hashes in Python
        space = self._one_rtt_space
        return space.largest_acked_packet if space is not None else 0

    # --- credit frames (bound through self in aioquic's frame table) ----------------------

    def _parse_transport_parameters(self, data: bytes, from_session_ticket: bool = False) -> None:
        self._fastrelay_parse_transport_parameters(data, from_session_ticket)
        if not from_session_ticket:
            # aioquic checks max_udp_payload_size but keeps no copy; the kernel needs it to
            # know how far a forwarded packet may grow.
            params = pull_quic_transport_parameters(Buffer(data=data))
            if params.max_udp_payload_size is not None:
                self.peer_max_udp_payload_size = params.max_udp_payload_size
            self._emit(CreditChanged(self.credit_snapshot()))

    @property
    def udp_payload_limit(self) -> int:
        """The largest UDP payload this connection may send: the peer's max_udp_payload_size
        and the datagram size aioquic validated for the path."""
        return min(self.peer_max_udp_payload_size, self._max_datagram_size)

    def _handle_max_data_frame(self, context: QuicReceiveContext, frame_type: int, buf: Buffer) -> None:
        before = self._remote_max_data
        super()._handle_max_data_frame(context, frame_type, buf)
        if self._remote_max_data != before:
            self._emit(CreditChanged(self.credit_snapshot()))

    def _handle_max_streams_uni_frame(self, context: QuicReceiveContext, frame_type: int,
                                      buf: Buffer) -> None:
        before = self._remote_max_streams_uni
        super()._handle_max_streams_uni_frame(context, frame_type, buf)
        if self._remote_max_streams_uni != before:
            self._emit(CreditChanged(self.credit_snapshot()))

    def _handle_max_streams_bidi_frame(self, context: QuicReceiveContext, frame_type: int,
                                       buf: Buffer) -> None:
        before = self._remote_max_streams_bidi
        super()._handle_max_streams_bidi_frame(context, frame_type, buf)
        if self._remote_max_streams_bidi != before:
            self._emit(CreditChanged(self.credit_snapshot()))

    def _handle_max_stream_data_frame(self, context: QuicReceiveContext, frame_type: int,
                                      buf: Buffer) -> None:
        start = buf.tell()
        stream_id = buf.pull_uint_var()
        buf.seek(start)
        stream = self._streams.get(stream_id)
        before = stream.max_stream_data_remote if stream is not None else None
        super()._handle_max_stream_data_frame(context, frame_type, buf)
        credit = self.stream_credit_snapshot(stream_id)
        if credit is not None and credit.max_stream_data != before:
            self._emit(StreamCreditChanged(credit))

    # --- connection ids ------------------------------------------------------------------

    def _replenish_connection_ids(self) -> None:
        known = {c.sequence_number for c in self._host_cids}
        super()._replenish_connection_ids()
        for cid in self._host_cids:
            if cid.sequence_number in known:
                continue
            if self._host_cid_factory is not None:
                cid.cid = self._host_cid_factory(cid.sequence_number)
            # Before any NEW_CONNECTION_ID carries it: the demux map must know it first.
            self._emit(HostConnectionIdIssued(cid.sequence_number, cid.cid, cid.stateless_reset_token))

    def _handle_retire_connection_id_frame(self, context: QuicReceiveContext, frame_type: int,
                                           buf: Buffer) -> None:
        before = {c.sequence_number: c.cid for c in self._host_cids}
        super()._handle_retire_connection_id_frame(context, frame_type, buf)
        after = {c.sequence_number for c in self._host_cids}
        for sequence_number, cid in before.items():
            if sequence_number not in after:
                self._emit(HostConnectionIdRetired(sequence_number, cid))

    # --- stream ids ------------------------------------------------------------------------

    def reserve_stream_ids(self, count: int) -> list[int]:
        """Ids from the subscriber's counter (shared with the kernel); open them in any order."""
        if self.stream_id_allocator is None:
            raise RuntimeError("This connection has no stream id allocator")
        return self.stream_id_allocator.reserve(count)

    def open_send_stream(self, stream_id: int) -> QuicStream:
        """Create (or return) the locally-initiated stream `stream_id`, whatever ids exist already."""
        return self._get_or_create_stream_for_send(stream_id)

    def get_next_available_stream_id(self, is_unidirectional: bool = False) -> int:
        allocator = self.stream_id_allocator
        kind = (2 if is_unidirectional else 0) | (0 if self._is_client else 1)
        if allocator is None or allocator.kind != kind:
            return super().get_next_available_stream_id(is_unidirectional)
        # aioquic's contract: the same id until a stream is opened with it.
        peeked = self._peeked_stream_ids.get(kind)
        if peeked is None or self._is_opened_local(peeked):
            peeked = self._peeked_stream_ids[kind] = allocator.reserve(1)[0]
        return peeked

    def take_uni_stream_id(self) -> int:
        """A local uni stream id for a stream written later (the MoQ session numbers its
        streams ahead of writing them): from the shared allocator after the hand-over to the
        kernel, before it the next id nobody has used or been handed."""
        kind = 2 | (0 if self._is_client else 1)
        if self.stream_id_allocator is not None and self.stream_id_allocator.kind == kind:
            return self.stream_id_allocator.reserve(1)[0]
        stream_id = max(self._local_next_stream_id_uni, self._handed_out.get(kind, -4) + 4)
        self._handed_out[kind] = stream_id
        return stream_id

    def _is_opened_local(self, stream_id: int) -> bool:
        return stream_id // 4 in self._opened_local[stream_id % 4]

    def _stream_is_discarded(self, stream_id: int) -> bool:
        if stream_is_client_initiated(stream_id) != self._is_client:
            return super()._stream_is_discarded(stream_id)
        # aioquic assumes ids are used in increasing order; ours come from a shared counter.
        return self._is_opened_local(stream_id) and stream_id not in self._streams

    def _get_or_create_stream_for_send(self, stream_id: int) -> QuicStream:
        if stream_id in self._streams:
            return self._streams[stream_id]
        next_uni, next_bidi = self._local_next_stream_id_uni, self._local_next_stream_id_bidi
        stream = super()._get_or_create_stream_for_send(stream_id)
        if stream_id < (next_uni if stream_id & 2 else next_bidi):
            self.fastpath.streams_adopted_out_of_order += 1
        self._local_next_stream_id_uni = max(next_uni, self._local_next_stream_id_uni)
        self._local_next_stream_id_bidi = max(next_bidi, self._local_next_stream_id_bidi)
        self._opened_local[stream_id % 4].add(stream_id // 4)
        if stream.is_blocked:
            # _unblock_streams pops from the front while ids are below the limit.
            blocked = self._streams_blocked_uni if stream_id & 2 else self._streams_blocked_bidi
            blocked.sort(key=lambda s: s.stream_id)
        return stream

    # --- key phase ---------------------------------------------------------------------------

    @property
    def key_update_allowed(self) -> bool:
        """Whether a packet sent in the current key phase has been acknowledged (RFC 9001 §6.1).

        Known from the key-phase bits in the kernel's records; False until one is ACKed.
        """
        return self._phase_bit is not None and self._phase_acked_generation == self._phase_generation

    def request_key_update(self) -> None:
        if self._loss.kernel_numbers_packets and not self.key_update_allowed:
            raise KeyUpdateNotAllowed("No packet of the current key phase has been acknowledged yet")
        super().request_key_update()

    def _tag_phase(self, packet: QuicSentPacket, key_phase: int | None) -> None:
        if key_phase is None:
            return
        if key_phase != self._phase_bit:
            if self._phase_bit is not None:
                self._phase_generation += 1
            self._phase_bit = key_phase
        packet.delivery_handlers.append((self._on_phase_delivery, (self._phase_generation,)))

    def _on_phase_delivery(self, delivery: QuicDeliveryState, generation: int) -> None:
        if delivery == QuicDeliveryState.ACKED and generation == self._phase_generation:
            self._phase_acked_generation = generation

    # --- registration: packets the kernel numbered or sent ------------------------------------

    def hand_numbering_to_kernel(self, allocator: StreamIdAllocator) -> int:
        """The fast path takes this live connection over: from now on the kernel numbers its
        1-RTT packets and both paths take stream ids from `allocator`. Returns the first wire
        packet number the kernel must give (aioquic's next one), so numbers never repeat.
        Call it with nothing of this connection waiting in the socket."""
        self.stream_id_allocator = allocator
        self._peeked_stream_ids.clear()
        self._loss.hand_numbering_to_kernel(self._packet_number)
        return self._packet_number

    @property
    def next_local_uni_index(self) -> int:
        """Index (id // 4) of the first local uni stream id nobody has used or been handed yet."""
        kind = 2 | (0 if self._is_client else 1)
        return max(self._local_next_stream_id_uni, self._handed_out.get(kind, -4) + 4) // 4

    def on_wire_number(self, number: WireNumber, *, report: bool = True) -> None:
        """The kernel gave wire number `number.wire_pn` to the packet aioquic numbered `built_pn`.

        report=False: the caller applies a batch of records and calls `report_changes()`
        (or reads the state itself) once after it, instead of once per record."""
        self.fastpath.wire_numbers += 1
        if number.key_phase is not None:
            packet = self._loss.parked_packet(number.built_pn)
            if packet is not None:
                self._tag_phase(packet, number.key_phase)
        self._loss.on_wire_number(number)
        if report:
            self._after_call()

    def report_changes(self) -> None:
        """Emit the events for what changed since the last report (congestion, peer CID,
        peer address): after a batch of `report=False` calls."""
        self._after_call()

    def register_forwarded(self, record: ForwardedPacket, *, report: bool = True) -> bool:
        """The kernel sent `record` on this connection's behalf: track it like our own packet.
        Returns False when the peer had acknowledged it already (never counted in flight).
        report=False: as for `on_wire_number`."""
        self._loss.track_external()
        for frame in record.frames:
            if frame.stream_id not in self._streams and not self._stream_is_discarded(frame.stream_id):
                self.open_send_stream(frame.stream_id)
        packet = QuicSentPacket(
            epoch=tls.Epoch.ONE_RTT,
            in_flight=True,
            is_ack_eliciting=record.ack_eliciting,
            is_crypto_packet=False,
            packet_number=record.wire_pn,
            packet_type=QuicPacketType.ONE_RTT,
            sent_time=record.sent_time,
            sent_bytes=record.size,
        )
        packet.delivery_handlers.append((self._on_forwarded_delivery, (record,)))
        self._tag_phase(packet, record.key_phase)
        self.fastpath.forwarded_registered += 1
        inserted = self._loss.insert(packet=packet, space=self._spaces[tls.Epoch.ONE_RTT])
        if inserted and record.ack_eliciting and not self._ack_eliciting_sent_since_receipt \
                and self._state not in END_STATES:
            # As _flush_builder does for our own packets (RFC 9000 §10.1). Never once closing
            # or draining: _close_at is then the end of the drain (3 PTO), and the kernel may
            # still report packets it forwarded before it heard of the close.
            self._close_at = record.sent_time + self._idle_timeout()
            self._ack_eliciting_sent_since_receipt = True
        if report:
            self._after_call()
        return inserted

    def _on_forwarded_delivery(self, delivery: QuicDeliveryState, record: ForwardedPacket) -> None:
        if delivery == QuicDeliveryState.ACKED:
            self.fastpath.forwarded_acked += 1
        else:
            self.fastpath.forwarded_lost += 1
            self._emit(ForwardedPacketLost(record))
        for frame in record.frames:
            self._stream_delivery(frame.stream_id, delivery, frame.offset, frame.stop, frame.fin)

    def _stream_delivery(self, stream_id: int, delivery: QuicDeliveryState, start: int, stop: int,
                         fin: bool) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return  # finished and discarded: nothing left to acknowledge or resend
        sender = stream.sender
        if stop > sender._buffer_stop or (fin and sender._buffer_fin is None):
            # The record overtook the publisher-side data: replay once it is shadow-written,
            # else an ACK would trim bytes the send buffer does not hold yet.
            heapq.heappush(self._parked_deliveries.setdefault(stream_id, []),
                           (stop, next(self._delivery_seq), delivery, start, stop, fin))
            self.fastpath.deliveries_parked += 1
            return
        sender.on_data_delivery(delivery, start, stop, fin)

    def resend_range(self, stream_id: int, start: int, stop: int, fin: bool = False) -> None:
        """The kernel handed this range out but did not send it (punted): aioquic sends it,
        once it is shadow-written if the punt record came first."""
        if stream_id not in self._streams and not self._stream_is_discarded(stream_id):
            self.open_send_stream(stream_id)
        self._stream_delivery(stream_id, QuicDeliveryState.LOST, start, stop, fin)

    def shadow_write(self, stream_id: int, data: bytes, *, offset: int | None = None,
                     end_stream: bool = False) -> None:
        """Bytes the kernel sent (or is sending) on `stream_id`: buffered as sent, resent only if lost."""
        stream = self._streams.get(stream_id)
        if stream is None:
            stream = self.open_send_stream(stream_id)
        sender = stream.sender
        if offset is not None and offset != sender._buffer_stop:
            raise ValueError(f"Shadow write at offset {offset}, "
                             f"stream {stream_id} is at {sender._buffer_stop}")
        if sender._buffer_fin is not None:
            raise RuntimeError("Cannot send data after FIN")
        if data:
            sender._buffer += data
            sender._buffer_stop += len(data)
            if sender._buffer_stop > sender.highest_offset:
                self._remote_max_data_used += sender._buffer_stop - sender.highest_offset
                sender.highest_offset = sender._buffer_stop
            self.fastpath.shadow_bytes += len(data)
        if end_stream:
            sender._buffer_fin = sender._buffer_stop
            sender._pending_eof = False
        self._replay_deliveries(stream_id, sender)

    def _replay_deliveries(self, stream_id: int, sender: Any) -> None:
        heap = self._parked_deliveries.get(stream_id)
        if not heap:
            return
        waiting: list[_Delivery] = []
        while heap and heap[0][0] <= sender._buffer_stop:
            item = heapq.heappop(heap)
            _, _, delivery, start, stop, fin = item
            if fin and sender._buffer_fin is None:
                waiting.append(item)
                continue
            self.fastpath.deliveries_replayed += 1
            sender.on_data_delivery(delivery, start, stop, fin)
        for item in waiting:
            heapq.heappush(heap, item)
        if not heap:
            del self._parked_deliveries[stream_id]
