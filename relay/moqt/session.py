"""A sans-I/O MoQT draft-14 session: one per QUIC connection, client or server perspective.

No sockets, no clock: the transport adapter (`relay.moqt.quic`, later the relay's own loop)
feeds what QUIC delivered into `stream_data_received` / `stream_reset` / `datagram_received`
(each with `now`), drains `next_event()` for what happened and `transmits()` for what to put on
the wire, and asks `get_timer()` / `handle_timer(now)` for the one deadline the session keeps
(data buffered for a track alias whose SUBSCRIBE_OK has not arrived yet).

Both endpoint roles and the relay drive it with commands (`subscribe`, `accept_subscribe`,
`open_subgroup`, ...). The session enforces the draft's rules on what the *peer* sends; every
MoqtError raised while handling the peer's bytes closes this session with the error's code
(section 3.4), is counted in `stats`, and never escapes to the caller's event loop.

Deviations from the letter of -14, for interop with moq-rs 0.5.1 (notes/moqt.md section 11):
- Requests beyond the credit we granted are counted, not fatal, unless
  `SessionConfig.enforce_request_credit` (moq-rs sends requests without waiting for credit).
  We always grant a large MAX_REQUEST_ID and top it up as the peer uses it.
- Request IDs must have the peer's parity and never repeat or go back below an ID already
  skipped over, but may arrive ahead of the next expected one: moq-rs allocates IDs on
  concurrent tasks, so a later ID can overtake an earlier one on the control stream. IDs
  skipped that way stay usable.
- An empty SUBSCRIBE_NAMESPACE prefix is surfaced as a request like any other (the codec
  accepts it); the owner answers OK or ERROR, the session never closes on it.
- Data for an unknown track alias is held (bounded in bytes and time) until SUBSCRIBE_OK
  names the alias: moq-rs publishers send data right after SUBSCRIBE.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Union

from .constants import (
    MOQT_VERSION_DRAFT_14,
    SUPPORTED_VERSIONS,
    FetchErrorCode,
    FetchType,
    FilterType,
    GroupOrder,
    MessageType,
    ObjectStatus,
    PublishErrorCode,
    SessionErrorCode,
    SetupParameter,
    StreamResetCode,
    SubscribeErrorCode,
)
from .data import (
    DataStreamReader,
    FetchHeader,
    ObjectDatagram,
    ObjectHeader,
    ObjectPayload,
    SubgroupHeader,
    SubgroupObject,
    SubgroupStreamWriter,
    decode_object_datagram,
    encode_fetch_header,
    encode_object_datagram,
)
from .errors import MoqtError, ProtocolViolation, VersionNegotiationFailed
from .messages import (
    ClientSetup,
    ControlStreamReader,
    Fetch,
    FetchCancel,
    FetchError,
    FetchOk,
    Goaway,
    JoiningFetch,
    Location,
    MaxRequestId,
    Message,
    Parameters,
    Publish,
    PublishDone,
    PublishError,
    PublishNamespace,
    PublishNamespaceCancel,
    PublishNamespaceDone,
    PublishNamespaceError,
    PublishNamespaceOk,
    RequestsBlocked,
    ServerSetup,
    StandaloneFetch,
    Subscribe,
    SubscribeError,
    SubscribeNamespace,
    SubscribeNamespaceError,
    SubscribeNamespaceOk,
    SubscribeOk,
    SubscribeUpdate,
    TrackNamespace,
    TrackStatus,
    TrackStatusError,
    Unsubscribe,
    UnsubscribeNamespace,
    encode_message,
    get_parameter,
)

# A subgroup stream reset with this code means "the relay skipped (the rest of) this subgroup on
# purpose", e.g. for a congested subscriber; any other reset, or an object that never arrives,
# is a loss. DELIVERY_TIMEOUT is the draft's own reason for giving up on a stream's objects
# (section 10.4.3), so a stock subscriber reads it the same way.
SKIPPED_SUBGROUP_RESET_CODE = StreamResetCode.DELIVERY_TIMEOUT

# The request credit granted at setup and re-granted as the peer uses it. Large, because a
# relay must not throttle its publishers' and subscribers' requests.
DEFAULT_REQUEST_CREDIT = 1 << 20


def split_namespace(text: str) -> TrackNamespace:
    """'live/cam1' -> (b'live', b'cam1'): moq-rs maps a broadcast path onto the tuple this way."""
    fields = tuple(f.encode() for f in text.strip("/").split("/") if f)
    if not fields:
        raise ValueError("A track namespace needs at least one field")
    return fields


def join_namespace(namespace: TrackNamespace) -> str:
    return "/".join(f.decode("utf-8", errors="replace") for f in namespace)


def _client_initiated(stream_id: int) -> bool:
    return stream_id & 0x1 == 0


def _unidirectional(stream_id: int) -> bool:
    return stream_id & 0x2 == 2


# -- what the session asks the transport to do -------------------------------------------------


@dataclass(frozen=True)
class StreamWrite:
    stream_id: int
    data: bytes
    end_stream: bool = False


@dataclass(frozen=True)
class StreamReset:
    stream_id: int
    error_code: int
    after_delivery: bool = False
    """Reset only once the bytes written so far are acknowledged (what RESET_STREAM_AT's
    reliable size gives; aioquic lacks it, so the adapter waits for the ACKs instead)."""


@dataclass(frozen=True)
class StopSending:
    stream_id: int
    error_code: int


@dataclass(frozen=True)
class DatagramWrite:
    data: bytes


@dataclass(frozen=True)
class ConnectionClose:
    error_code: int
    reason_phrase: str


Transmit = Union[StreamWrite, StreamReset, StopSending, DatagramWrite, ConnectionClose]


# -- events ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionReady:
    version: int
    peer_parameters: Parameters
    path: str | None
    """The client's PATH (server side only)."""
    authority: str | None


@dataclass(frozen=True)
class SessionClosed:
    error_code: int
    reason_phrase: str
    by_peer: bool
    """False when this side closed (on a protocol error or by command)."""
    quic_error: bool = False
    """The QUIC connection failed (transport error code, RFC 9000 §20.1), not the MoQ session."""


@dataclass(frozen=True)
class GoawayReceived:
    new_session_uri: bytes


@dataclass(frozen=True)
class SubscribeRequested:
    request_id: int
    message: Subscribe


@dataclass(frozen=True)
class SubscribeAccepted:
    request_id: int
    track_alias: int
    message: SubscribeOk


@dataclass(frozen=True)
class SubscribeRejected:
    request_id: int
    error_code: int
    reason_phrase: str


@dataclass(frozen=True)
class UnsubscribeReceived:
    request_id: int


@dataclass(frozen=True)
class PublishDoneReceived:
    request_id: int
    status_code: int
    stream_count: int
    reason_phrase: str


@dataclass(frozen=True)
class NamespacePublished:
    """The peer sent PUBLISH_NAMESPACE; answer with accept/reject_publish_namespace."""

    request_id: int
    namespace: TrackNamespace
    parameters: Parameters


@dataclass(frozen=True)
class PublishNamespaceAnswered:
    """Our PUBLISH_NAMESPACE was answered: error_code None means OK."""

    request_id: int
    error_code: int | None
    reason_phrase: str = ""


@dataclass(frozen=True)
class NamespaceDone:
    """The peer sent PUBLISH_NAMESPACE_DONE."""

    namespace: TrackNamespace


@dataclass(frozen=True)
class NamespaceCancelled:
    """The peer sent PUBLISH_NAMESPACE_CANCEL for a namespace we published."""

    namespace: TrackNamespace
    error_code: int
    reason_phrase: str


@dataclass(frozen=True)
class SubscribeNamespaceRequested:
    """Answer with accept/reject_subscribe_namespace; the prefix may be empty (moq-rs)."""

    request_id: int
    prefix: TrackNamespace
    parameters: Parameters


@dataclass(frozen=True)
class SubscribeNamespaceAnswered:
    request_id: int
    error_code: int | None
    reason_phrase: str = ""


@dataclass(frozen=True)
class UnsubscribeNamespaceReceived:
    prefix: TrackNamespace


@dataclass(frozen=True)
class FetchRequested:
    """Answer with reject_fetch (or, once a cache exists, a fetch stream)."""

    request_id: int
    message: Fetch


@dataclass(frozen=True)
class FetchAnswered:
    request_id: int
    error_code: int | None
    reason_phrase: str = ""
    message: FetchOk | None = None


@dataclass(frozen=True)
class FetchCancelled:
    request_id: int


@dataclass(frozen=True)
class SubgroupStreamOpened:
    """A data stream's header is known and its request resolved (subgroup or fetch stream)."""

    stream_id: int
    request_id: int
    header: SubgroupHeader | FetchHeader


@dataclass(frozen=True)
class SubgroupStreamClosed:
    stream_id: int
    request_id: int
    header: SubgroupHeader | FetchHeader
    reset_code: int | None
    """None: FIN after a complete object. SKIPPED_SUBGROUP_RESET_CODE: skipped on purpose."""


@dataclass(frozen=True)
class ObjectReceived:
    """One whole object; `header.extensions` is the raw extension block, verbatim."""

    request_id: int
    track_alias: int | None
    """None for objects of a fetch stream."""
    stream_id: int | None
    """None for datagrams."""
    header: ObjectHeader
    payload: bytes
    received_at: float
    datagram: ObjectDatagram | None = None
    """The OBJECT_DATAGRAM as decoded (a relay forwards it with only the alias changed)."""


@dataclass(frozen=True)
class ObjectChunk:
    """With `deliver_chunks`: a piece of an object as it arrives (the first carries `start`)."""

    request_id: int
    track_alias: int | None
    stream_id: int
    header: ObjectHeader
    data: bytes
    start: bool
    end: bool
    received_at: float


Event = Union[
    SessionReady, SessionClosed, GoawayReceived, SubscribeRequested, SubscribeAccepted,
    SubscribeRejected, UnsubscribeReceived, PublishDoneReceived, NamespacePublished,
    PublishNamespaceAnswered, NamespaceDone, NamespaceCancelled, SubscribeNamespaceRequested,
    SubscribeNamespaceAnswered, UnsubscribeNamespaceReceived, FetchRequested, FetchAnswered,
    FetchCancelled, SubgroupStreamOpened, SubgroupStreamClosed, ObjectReceived, ObjectChunk,
]


# -- configuration and counters -----------------------------------------------------------------


@dataclass(frozen=True)
class SessionConfig:
    is_client: bool
    path: str = "/"
    """Client only: sent as PATH (raw QUIC)."""
    authority: str | None = None
    """Client only: sent as AUTHORITY."""
    versions: tuple[int, ...] = SUPPORTED_VERSIONS
    request_credit: int = DEFAULT_REQUEST_CREDIT
    implementation: str = "fastrelay"
    enforce_request_credit: bool = False
    deliver_chunks: bool = False
    """ObjectChunk events instead of whole ObjectReceived (a relay forwards without copying)."""
    max_unknown_alias_bytes: int = 1 << 20
    """Data held, over all streams and datagrams, for aliases not yet known."""
    unknown_alias_timeout: float = 1.0
    """Seconds data may wait for its SUBSCRIBE_OK (moq-rs waits 1 s too)."""
    setup_parameters: Parameters = ()
    """Client only: more CLIENT_SETUP parameters (e.g. AUTHORIZATION_TOKEN), after ours."""


@dataclass
class SessionStats:
    objects_received: int = 0
    object_bytes_received: int = 0
    datagrams_received: int = 0
    data_streams_received: int = 0
    unknown_alias_drops: int = 0
    requests_without_credit: int = 0
    requests_rejected_not_supported: int = 0
    protocol_errors: dict[int, int] = field(default_factory=dict)
    """Session errors we closed with, by draft error code."""


class SessionState(enum.Enum):
    SETUP = 0
    READY = 1
    CLOSED = 2


class _Kind(enum.Enum):
    SUBSCRIBE = "SUBSCRIBE"
    PUBLISH_NAMESPACE = "PUBLISH_NAMESPACE"
    SUBSCRIBE_NAMESPACE = "SUBSCRIBE_NAMESPACE"
    FETCH = "FETCH"


@dataclass
class _Subscription:
    """A track we subscribed to."""

    request_id: int
    namespace: TrackNamespace
    name: bytes
    track_alias: int | None = None
    done: bool = False


@dataclass
class _Publication:
    """A subscription the peer made to us: we publish on it."""

    request_id: int
    subscriber_priority: int
    track_alias: int | None = None
    streams_opened: int = 0
    senders: dict[int, SubgroupSender] = field(default_factory=dict)
    ended: bool = False


@dataclass
class _IncomingStream:
    reader: DataStreamReader
    header: SubgroupHeader | FetchHeader | None = None
    request_id: int | None = None
    track_alias: int | None = None
    held: list[tuple[list[object], bool, float]] = field(default_factory=list)
    """(reader events, fin, arrival) waiting for the track alias to be known."""
    held_reset: int | None = None
    """A RESET_STREAM that arrived while the alias was still unknown."""
    held_bytes: int = 0
    held_since: float | None = None
    current: ObjectHeader | None = None
    chunks: list[bytes] = field(default_factory=list)
    chunk_started: bool = False


class SubgroupSender:
    """Writes one subgroup stream of a publication; obtained from MoqtSession.open_subgroup."""

    def __init__(self, session: MoqtSession, publication: _Publication, stream_id: int,
                 header: SubgroupHeader) -> None:
        self._session = session
        self._publication = publication
        self.stream_id = stream_id
        self.header = header
        self._writer = SubgroupStreamWriter(header)
        self.closed = False

    def write(self, object_id: int, payload: bytes = b"", *, extensions: bytes = b"",
              status: int = ObjectStatus.NORMAL, end_stream: bool = False) -> bool:
        """Queue one object; False (nothing written) once the stream is closed."""
        if self.closed:
            return False
        data = self._writer.encode_object(
            SubgroupObject(object_id, payload, extensions, status))
        self._session._write_stream(self.stream_id, data, end_stream)
        if end_stream:
            self._close()
        return True

    def write_raw(self, data: bytes, end_stream: bool = False) -> bool:
        """Queue bytes already encoded as objects of this stream (a relay forwarding a
        publisher's stream verbatim after the header); False once the stream is closed."""
        if self.closed:
            return False
        self._session._write_stream(self.stream_id, data, end_stream)
        if end_stream:
            self._close()
        return True

    def finish(self) -> None:
        if not self.closed:
            self._session._write_stream(self.stream_id, b"", True)
            self._close()

    def reset(self, error_code: int = StreamResetCode.CANCELLED) -> None:
        if not self.closed:
            self._session._transmits.append(StreamReset(self.stream_id, error_code))
            self._close()

    def skip(self) -> None:
        """Give up on (the rest of) this subgroup on purpose: reset with
        SKIPPED_SUBGROUP_RESET_CODE once what was written (at least the header, which says
        which group and subgroup) has reached the subscriber."""
        if not self.closed:
            self._session._transmits.append(
                StreamReset(self.stream_id, SKIPPED_SUBGROUP_RESET_CODE, after_delivery=True))
            self._close()

    def _close(self) -> None:
        self.closed = True
        self._publication.senders.pop(self.stream_id, None)


class MoqtSession:
    """One MoQT session over one QUIC connection (sans-I/O)."""

    def __init__(self, config: SessionConfig, *,
                 uni_stream_ids: Callable[[], int] | None = None) -> None:
        """`uni_stream_ids` hands out the ids of streams we open (default: QUIC's own order);
        the fast path will inject its kernel-shared allocator here."""
        self.config = config
        self.is_client = config.is_client
        self.state = SessionState.SETUP
        self.version: int | None = None
        self.stats = SessionStats()
        self.stream_priorities: dict[int, tuple[int, int]] = {}
        """Our uni stream id -> (subscriber priority, publisher priority); lower goes first."""
        self.control_stream_id: int | None = 0 if self.is_client else None
        self.peer_path: str | None = None
        self.peer_authority: str | None = None
        self.goaway_received = False
        self._events: deque[Event] = deque()
        self._transmits: list[Transmit] = []
        self._control_reader = ControlStreamReader()
        self._next_uni = 2 if self.is_client else 3
        self._uni_stream_ids = uni_stream_ids or self._default_uni_stream_id
        # Request IDs: ours start at 0 (client) / 1 (server) and go up by 2 (section 9.1).
        self._next_request_id = 0 if self.is_client else 1
        self._peer_max_request_id = 0  # credit the peer granted us (MAX_REQUEST_ID)
        self._blocked: deque[Message] = deque()  # requests waiting for setup or credit
        self._blocked_reported: int | None = None
        self._peer_next_request_id = 1 if self.is_client else 0
        self._peer_skipped_ids: set[int] = set()
        self._local_max_request_id = config.request_credit  # credit we granted
        self._outgoing: dict[int, _Kind] = {}  # our requests awaiting an answer
        self._incoming: dict[int, _Kind] = {}  # the peer's requests we must still answer
        self._subscriptions: dict[int, _Subscription] = {}
        self._alias_to_request: dict[int, int] = {}
        self._publications: dict[int, _Publication] = {}
        self._fetches: set[int] = set()  # our fetches that may open fetch streams
        self._streams: dict[int, _IncomingStream] = {}
        self._held_datagrams: deque[tuple[float, ObjectDatagram]] = deque()
        self._held_bytes = 0

    # -- transport side ------------------------------------------------------------------------

    def connection_made(self, now: float) -> None:
        """The QUIC handshake completed: a client opens the control stream with CLIENT_SETUP."""
        if not self.is_client:
            return
        params: list[tuple[int, int | bytes]] = [
            (SetupParameter.PATH, self.config.path.encode()),
            (SetupParameter.MAX_REQUEST_ID, self._local_max_request_id),
            (SetupParameter.MOQT_IMPLEMENTATION, self.config.implementation.encode()),
        ]
        if self.config.authority:
            params.insert(1, (SetupParameter.AUTHORITY, self.config.authority.encode()))
        params += self.config.setup_parameters
        self._send_control(ClientSetup(tuple(self.config.versions), tuple(params)))

    def connection_lost(self, error_code: int, reason_phrase: str, now: float,
                        quic_error: bool = False) -> None:
        """QUIC is gone (peer close, idle timeout, transport error): report it once."""
        if self.state != SessionState.CLOSED:
            self.state = SessionState.CLOSED
            self._events.append(SessionClosed(error_code, reason_phrase, by_peer=not quic_error,
                                              quic_error=quic_error))

    def stream_data_received(self, stream_id: int, data: bytes, end_stream: bool,
                             now: float) -> None:
        if self.state == SessionState.CLOSED:
            return
        try:
            self._on_stream_data(stream_id, data, end_stream, now)
        except MoqtError as exc:
            self._fail(exc)
        except Exception as exc:  # a bug must cost this session, not the event loop
            self._fail(MoqtError(f"internal error: {type(exc).__name__}: {exc}",
                                 SessionErrorCode.INTERNAL_ERROR))

    def stream_reset(self, stream_id: int, error_code: int, now: float) -> None:
        if self.state == SessionState.CLOSED:
            return
        try:
            if stream_id == self.control_stream_id:
                raise ProtocolViolation("The control stream was reset")
            stream = self._streams.pop(stream_id, None)
            if stream is None:
                return
            if stream.request_id is None:  # still waiting for its alias: remember the reset
                self._streams[stream_id] = stream
                stream.held_reset = error_code
                return
            assert stream.header is not None
            self._events.append(SubgroupStreamClosed(stream_id, stream.request_id,
                                                     stream.header, error_code))
        except MoqtError as exc:
            self._fail(exc)

    def datagram_received(self, data: bytes, now: float) -> None:
        if self.state == SessionState.CLOSED:
            return
        try:
            if self.state != SessionState.READY:
                raise ProtocolViolation("Object datagram before the session was set up")
            datagram = decode_object_datagram(data)
            self.stats.datagrams_received += 1
            request_id = self._alias_to_request.get(datagram.track_alias)
            if request_id is None:
                self._hold_datagram(datagram, now)
            else:
                self._deliver_datagram(request_id, datagram, now)
        except MoqtError as exc:
            self._fail(exc)

    def get_timer(self) -> float | None:
        """When handle_timer must run next (held data expires), or None."""
        times = [s.held_since for s in self._streams.values() if s.held_since is not None]
        if self._held_datagrams:
            times.append(self._held_datagrams[0][0])
        return min(times) + self.config.unknown_alias_timeout if times else None

    def handle_timer(self, now: float) -> None:
        self._expire_held(now)

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def transmits(self) -> list[Transmit]:
        """What to send, in order; the caller owns the list."""
        out, self._transmits = self._transmits, []
        return out

    # -- commands ------------------------------------------------------------------------------

    def subscribe(self, namespace: TrackNamespace, track_name: bytes, *,
                  subscriber_priority: int = 128,
                  group_order: GroupOrder = GroupOrder.ASCENDING, forward: bool = True,
                  filter_type: FilterType = FilterType.LARGEST_OBJECT,
                  start_location: Location | None = None, end_group: int | None = None,
                  parameters: Parameters = ()) -> int:
        request_id = self._allocate_request_id()
        self._subscriptions[request_id] = _Subscription(request_id, namespace, track_name)
        self._outgoing[request_id] = _Kind.SUBSCRIBE
        self._send_request(Subscribe(request_id, namespace, track_name, subscriber_priority,
                                     group_order, forward, filter_type, start_location,
                                     end_group, parameters))
        return request_id

    def unsubscribe(self, request_id: int) -> None:
        subscription = self._subscriptions.pop(request_id, None)
        if subscription is None:
            raise KeyError(f"No subscription with request ID {request_id}")
        self._outgoing.pop(request_id, None)
        if subscription.track_alias is not None:
            self._alias_to_request.pop(subscription.track_alias, None)
        self._send_control(Unsubscribe(request_id))

    def accept_subscribe(self, request_id: int, track_alias: int, *, expires: int = 0,
                         group_order: GroupOrder = GroupOrder.ASCENDING,
                         largest_location: Location | None = None,
                         parameters: Parameters = ()) -> None:
        """SUBSCRIBE_OK with the alias we (the publisher side) chose for this track."""
        publication = self._answer(request_id, _Kind.SUBSCRIBE)
        if any(p.track_alias == track_alias for p in self._publications.values()):
            raise ValueError(f"Track alias {track_alias} is already in use")
        assert publication is not None
        publication.track_alias = track_alias
        self._send_control(SubscribeOk(request_id, track_alias, expires, group_order,
                                       largest_location, parameters))

    def reject_subscribe(self, request_id: int, error_code: int, reason_phrase: str = "") -> None:
        self._answer(request_id, _Kind.SUBSCRIBE)
        self._publications.pop(request_id, None)
        self._send_control(SubscribeError(request_id, error_code, reason_phrase))

    def publish_done(self, request_id: int, status_code: int, reason_phrase: str = "", *,
                     stream_count: int | None = None) -> None:
        """End a publication; Stream Count defaults to the subgroup streams opened for it."""
        publication = self._publications.pop(request_id, None)
        if publication is None:
            raise KeyError(f"No publication with request ID {request_id}")
        publication.ended = True
        count = publication.streams_opened if stream_count is None else stream_count
        self._send_control(PublishDone(request_id, status_code, count, reason_phrase))

    def publication_alias(self, request_id: int) -> int | None:
        publication = self._publications.get(request_id)
        return publication.track_alias if publication else None

    def open_subgroup(self, request_id: int, group_id: int, subgroup_id: int | None,
                      publisher_priority: int, *, extensions: bool = True,
                      end_of_group: bool = False, stream_id: int | None = None,
                      header: SubgroupHeader | None = None) -> SubgroupSender:
        """Open a subgroup stream on an accepted publication and write its header.

        A relay passes the forwarded `header` whole (its alias must be this publication's)
        and may pass a `stream_id` it reserved (e.g. from the fast path's allocator)."""
        publication = self._publications.get(request_id)
        if publication is None or publication.track_alias is None:
            raise KeyError(f"No accepted subscription with request ID {request_id}")
        if header is None:
            header = SubgroupHeader.new(publication.track_alias, group_id, publisher_priority,
                                        subgroup_id, extensions=extensions,
                                        end_of_group=end_of_group)
        elif header.track_alias != publication.track_alias:
            raise ValueError(f"Header alias {header.track_alias} is not this subscription's "
                             f"{publication.track_alias}")
        publisher_priority = header.publisher_priority
        if stream_id is None:
            stream_id = self._uni_stream_ids()
        self.stream_priorities[stream_id] = (publication.subscriber_priority, publisher_priority)
        sender = SubgroupSender(self, publication, stream_id, header)
        publication.senders[stream_id] = sender
        publication.streams_opened += 1
        self._write_stream(stream_id, sender._writer.encode_header(), False)
        return sender

    def send_datagram(self, request_id: int, group_id: int, object_id: int,
                      publisher_priority: int, payload: bytes, *, extensions: bytes = b"",
                      end_of_group: bool = False) -> bytes:
        """Queue one OBJECT_DATAGRAM; returns its bytes (the caller checks size limits)."""
        publication = self._publications.get(request_id)
        if publication is None or publication.track_alias is None:
            raise KeyError(f"No accepted subscription with request ID {request_id}")
        data = encode_object_datagram(ObjectDatagram.new(
            publication.track_alias, group_id, object_id, publisher_priority, payload,
            extensions=extensions, end_of_group=end_of_group))
        self._transmits.append(DatagramWrite(data))
        return data

    def forward_datagram(self, request_id: int, datagram: ObjectDatagram) -> bytes:
        """Queue a received OBJECT_DATAGRAM under this publication's alias, every other field
        (type, priority, extension headers, status, payload) as it came; returns its bytes."""
        publication = self._publications.get(request_id)
        if publication is None or publication.track_alias is None:
            raise KeyError(f"No accepted subscription with request ID {request_id}")
        data = encode_object_datagram(dataclasses.replace(
            datagram, track_alias=publication.track_alias))
        self._transmits.append(DatagramWrite(data))
        return data

    def publish_namespace(self, namespace: TrackNamespace,
                          parameters: Parameters = ()) -> int:
        request_id = self._allocate_request_id()
        self._outgoing[request_id] = _Kind.PUBLISH_NAMESPACE
        self._send_request(PublishNamespace(request_id, namespace, parameters))
        return request_id

    def publish_namespace_done(self, namespace: TrackNamespace) -> None:
        self._send_control(PublishNamespaceDone(namespace))

    def accept_publish_namespace(self, request_id: int) -> None:
        self._answer(request_id, _Kind.PUBLISH_NAMESPACE)
        self._send_control(PublishNamespaceOk(request_id))

    def reject_publish_namespace(self, request_id: int, error_code: int,
                                 reason_phrase: str = "") -> None:
        self._answer(request_id, _Kind.PUBLISH_NAMESPACE)
        self._send_control(PublishNamespaceError(request_id, error_code, reason_phrase))

    def cancel_publish_namespace(self, namespace: TrackNamespace, error_code: int,
                                 reason_phrase: str = "") -> None:
        self._send_control(PublishNamespaceCancel(namespace, error_code, reason_phrase))

    def subscribe_namespace(self, prefix: TrackNamespace, parameters: Parameters = ()) -> int:
        request_id = self._allocate_request_id()
        self._outgoing[request_id] = _Kind.SUBSCRIBE_NAMESPACE
        self._send_request(SubscribeNamespace(request_id, prefix, parameters))
        return request_id

    def accept_subscribe_namespace(self, request_id: int) -> None:
        self._answer(request_id, _Kind.SUBSCRIBE_NAMESPACE)
        self._send_control(SubscribeNamespaceOk(request_id))

    def reject_subscribe_namespace(self, request_id: int, error_code: int,
                                   reason_phrase: str = "") -> None:
        self._answer(request_id, _Kind.SUBSCRIBE_NAMESPACE)
        self._send_control(SubscribeNamespaceError(request_id, error_code, reason_phrase))

    def fetch(self, *, subscriber_priority: int = 128,
              group_order: GroupOrder = GroupOrder.ASCENDING,
              standalone: StandaloneFetch | None = None, joining_request_id: int | None = None,
              joining_start: int = 0, absolute: bool = False,
              parameters: Parameters = ()) -> int:
        """A standalone fetch, or a joining fetch (relative, or absolute) of a subscription."""
        request_id = self._allocate_request_id()
        if standalone is not None:
            msg = Fetch(request_id, subscriber_priority, group_order, FetchType.STANDALONE,
                        standalone=standalone, parameters=parameters)
        else:
            if joining_request_id is None:
                raise ValueError("A fetch is standalone or joins a subscription")
            kind = FetchType.ABSOLUTE_JOINING if absolute else FetchType.RELATIVE_JOINING
            msg = Fetch(request_id, subscriber_priority, group_order, kind,
                        joining=JoiningFetch(joining_request_id, joining_start),
                        parameters=parameters)
        self._outgoing[request_id] = _Kind.FETCH
        self._fetches.add(request_id)
        self._send_request(msg)
        return request_id

    def fetch_cancel(self, request_id: int) -> None:
        self._outgoing.pop(request_id, None)
        self._fetches.discard(request_id)
        self._send_control(FetchCancel(request_id))

    def accept_fetch(self, msg: FetchOk, objects: bytes = b"") -> int | None:
        """FETCH_OK, then (if `objects`, already encoded) a fetch stream ending in FIN.
        Returns the fetch stream's id."""
        self._answer(msg.request_id, _Kind.FETCH)
        self._send_control(msg)
        if not objects:
            return None
        stream_id = self._uni_stream_ids()
        self._write_stream(stream_id, encode_fetch_header(FetchHeader(msg.request_id)) + objects,
                           True)
        return stream_id

    def send(self, msg: Message) -> None:
        """Send a message built elsewhere (the relay core), with the same bookkeeping as the
        typed command for it; anything without bookkeeping goes out as it is."""
        if isinstance(msg, SubscribeOk):
            self.accept_subscribe(msg.request_id, msg.track_alias, expires=msg.expires,
                                  group_order=msg.group_order,
                                  largest_location=msg.largest_location,
                                  parameters=msg.parameters)
        elif isinstance(msg, SubscribeError):
            self.reject_subscribe(msg.request_id, msg.error_code, msg.reason_phrase)
        elif isinstance(msg, PublishDone):
            self.publish_done(msg.request_id, msg.status_code, msg.reason_phrase,
                              stream_count=msg.stream_count)
        elif isinstance(msg, FetchOk):
            self.accept_fetch(msg)
        elif isinstance(msg, FetchError):
            self.reject_fetch(msg.request_id, msg.error_code, msg.reason_phrase)
        elif isinstance(msg, PublishNamespaceOk):
            self.accept_publish_namespace(msg.request_id)
        elif isinstance(msg, PublishNamespaceError):
            self.reject_publish_namespace(msg.request_id, msg.error_code, msg.reason_phrase)
        elif isinstance(msg, SubscribeNamespaceOk):
            self.accept_subscribe_namespace(msg.request_id)
        elif isinstance(msg, SubscribeNamespaceError):
            self.reject_subscribe_namespace(msg.request_id, msg.error_code, msg.reason_phrase)
        elif isinstance(msg, (Subscribe, Fetch, PublishNamespace, SubscribeNamespace)):
            raise ValueError(f"Use the {type(msg).__name__} command: it allocates the "
                             "request ID")
        else:
            self._send_control(msg)

    def reject_fetch(self, request_id: int, error_code: int = FetchErrorCode.NOT_SUPPORTED,
                     reason_phrase: str = "") -> None:
        self._answer(request_id, _Kind.FETCH)
        self._send_control(FetchError(request_id, error_code, reason_phrase))

    def goaway(self, new_session_uri: bytes = b"") -> None:
        self._send_control(Goaway(new_session_uri))

    def close(self, error_code: int = SessionErrorCode.NO_ERROR, reason_phrase: str = "") -> None:
        if self.state == SessionState.CLOSED:
            return
        self.state = SessionState.CLOSED
        self._transmits.append(ConnectionClose(error_code, reason_phrase))
        self._events.append(SessionClosed(error_code, reason_phrase, by_peer=False))

    # -- internals: sending --------------------------------------------------------------------

    def set_uni_stream_ids(self, allocate: Callable[[], int]) -> None:
        """Number our uni streams with `allocate` from now on (the QUIC connection's, so a
        stream-id allocator shared with the fast path sees every id)."""
        self._uni_stream_ids = allocate

    def _default_uni_stream_id(self) -> int:
        stream_id = self._next_uni
        self._next_uni += 4
        return stream_id

    def _write_stream(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        if self.state != SessionState.CLOSED:
            self._transmits.append(StreamWrite(stream_id, data, end_stream))

    def _send_control(self, msg: Message) -> None:
        if self.state == SessionState.CLOSED:
            return
        assert self.control_stream_id is not None, "no control stream yet"
        self._write_stream(self.control_stream_id, encode_message(msg), False)

    def _allocate_request_id(self) -> int:
        if self.state == SessionState.CLOSED:
            raise RuntimeError("The session is closed")
        request_id = self._next_request_id
        self._next_request_id += 2
        return request_id

    def _send_request(self, msg: Message) -> None:
        # Requests wait for SETUP to finish and for the peer's credit (MAX_REQUEST_ID).
        self._blocked.append(msg)
        self._flush_requests()

    def _flush_requests(self) -> None:
        if self.state != SessionState.READY:
            return
        while self._blocked:
            request_id = self._blocked[0].request_id  # type: ignore[union-attr]
            if request_id >= self._peer_max_request_id:
                if self._blocked_reported != self._peer_max_request_id:
                    self._blocked_reported = self._peer_max_request_id
                    self._send_control(RequestsBlocked(self._peer_max_request_id))
                return
            self._send_control(self._blocked.popleft())

    def _answer(self, request_id: int, kind: _Kind) -> _Publication | None:
        if self._incoming.get(request_id) != kind:
            raise KeyError(f"No pending {kind.value} with request ID {request_id}")
        del self._incoming[request_id]
        return self._publications.get(request_id)

    # -- internals: receiving ------------------------------------------------------------------

    def _fail(self, exc: MoqtError) -> None:
        code = int(exc.error_code)
        self.stats.protocol_errors[code] = self.stats.protocol_errors.get(code, 0) + 1
        self.close(code, exc.reason_phrase[:1024])

    def _on_stream_data(self, stream_id: int, data: bytes, end_stream: bool, now: float) -> None:
        if stream_id == self.control_stream_id:
            if data:
                for msg in self._control_reader.feed(data):
                    self._on_message(msg, now)
                    if self.state == SessionState.CLOSED:
                        return
            if end_stream:
                raise ProtocolViolation("The control stream was closed")
            return
        if not _unidirectional(stream_id):
            if not self.is_client and self.control_stream_id is None and \
                    _client_initiated(stream_id):
                self.control_stream_id = stream_id
                self._on_stream_data(stream_id, data, end_stream, now)
                return
            raise ProtocolViolation(f"Unexpected bidirectional stream {stream_id}")
        if _client_initiated(stream_id) == self.is_client:
            raise ProtocolViolation(f"Data on our own unidirectional stream {stream_id}")
        if self.state != SessionState.READY:
            raise ProtocolViolation("Data stream before the session was set up")
        stream = self._streams.get(stream_id)
        if stream is None:
            stream = self._streams[stream_id] = _IncomingStream(DataStreamReader())
            self.stats.data_streams_received += 1
        events: list[object] = list(stream.reader.feed(data, end_stream))
        if stream.header is None and events:
            header = events[0]
            assert isinstance(header, (SubgroupHeader, FetchHeader))
            stream.header = header
            if isinstance(header, FetchHeader):
                if header.request_id not in self._fetches:
                    raise ProtocolViolation(
                        f"Fetch stream for unknown request ID {header.request_id}")
                stream.request_id = header.request_id
                self._events.append(SubgroupStreamOpened(stream_id, header.request_id, header))
            else:
                stream.track_alias = header.track_alias
                request_id = self._alias_to_request.get(header.track_alias)
                if request_id is not None:
                    stream.request_id = request_id
                    self._events.append(SubgroupStreamOpened(stream_id, request_id, header))
            events = events[1:]
        if stream.request_id is None:
            if stream.header is None and not events and not end_stream:
                return  # header incomplete: the reader holds the bytes
            self._hold_stream(stream_id, stream, events, end_stream, data, now)
            return
        self._deliver_stream_events(stream_id, stream, events, end_stream, now)

    def _deliver_stream_events(self, stream_id: int, stream: _IncomingStream,
                               events: list[object], end_stream: bool, now: float) -> None:
        assert stream.request_id is not None and stream.header is not None
        for event in events:
            if isinstance(event, ObjectHeader):
                self.stats.objects_received += 1
                self.stats.object_bytes_received += event.payload_length
                if event.payload_length == 0:
                    self._emit_object(stream_id, stream, event, b"", True, True, now)
                else:
                    stream.current, stream.chunks, stream.chunk_started = event, [], False
            elif isinstance(event, ObjectPayload):
                assert stream.current is not None
                if self.config.deliver_chunks:
                    self._emit_object(stream_id, stream, stream.current, event.data,
                                      not stream.chunk_started, event.end, now)
                    stream.chunk_started = True
                else:
                    stream.chunks.append(event.data)
                    if event.end:
                        self._emit_object(stream_id, stream, stream.current,
                                          b"".join(stream.chunks), True, True, now)
                if event.end:
                    stream.current, stream.chunks = None, []
        if end_stream:
            self._streams.pop(stream_id, None)
            self._events.append(SubgroupStreamClosed(stream_id, stream.request_id,
                                                     stream.header, None))

    def _emit_object(self, stream_id: int, stream: _IncomingStream, header: ObjectHeader,
                     data: bytes, start: bool, end: bool, now: float) -> None:
        assert stream.request_id is not None
        if self.config.deliver_chunks:
            self._events.append(ObjectChunk(stream.request_id, stream.track_alias, stream_id,
                                            header, data, start, end, now))
        else:
            self._events.append(ObjectReceived(stream.request_id, stream.track_alias,
                                               stream_id, header, data, now))

    def _hold_stream(self, stream_id: int, stream: _IncomingStream, events: list[object],
                     end_stream: bool, data: bytes, now: float) -> None:
        if stream.held_since is None:
            stream.held_since = now
        stream.held.append((events, end_stream, now))
        stream.held_bytes += len(data)
        self._held_bytes += len(data)
        if self._held_bytes > self.config.max_unknown_alias_bytes:
            self._drop_held_stream(stream_id, stream)

    def _drop_held_stream(self, stream_id: int, stream: _IncomingStream) -> None:
        self._streams.pop(stream_id, None)
        self._held_bytes -= stream.held_bytes
        self.stats.unknown_alias_drops += 1
        if not any(fin for _, fin, _ in stream.held) and stream.held_reset is None:
            self._transmits.append(StopSending(stream_id, StreamResetCode.CANCELLED))

    def _hold_datagram(self, datagram: ObjectDatagram, now: float) -> None:
        size = len(datagram.payload) + len(datagram.extensions)
        if self._held_bytes + size > self.config.max_unknown_alias_bytes:
            self.stats.unknown_alias_drops += 1
            return
        self._held_datagrams.append((now, datagram))
        self._held_bytes += size

    def _deliver_datagram(self, request_id: int, d: ObjectDatagram, now: float) -> None:
        header = ObjectHeader(d.group_id, 0, d.object_id, d.publisher_priority, len(d.payload),
                              d.extensions, d.status)
        self.stats.objects_received += 1
        self.stats.object_bytes_received += len(d.payload)
        self._events.append(ObjectReceived(request_id, d.track_alias, None, header, d.payload,
                                           now, d))

    def _release_alias(self, track_alias: int, request_id: int, now: float) -> None:
        """SUBSCRIBE_OK named an alias: deliver what was held for it, in arrival order."""
        for stream_id, stream in list(self._streams.items()):
            if stream.request_id is not None or stream.track_alias != track_alias:
                continue
            assert stream.header is not None
            stream.request_id = request_id
            self._held_bytes -= stream.held_bytes
            held, stream.held, stream.held_since, stream.held_bytes = stream.held, [], None, 0
            self._events.append(SubgroupStreamOpened(stream_id, request_id, stream.header))
            for events, fin, _ in held:
                self._deliver_stream_events(stream_id, stream, events, fin, now)
            if stream.held_reset is not None:
                self._streams.pop(stream_id, None)
                self._events.append(SubgroupStreamClosed(stream_id, request_id, stream.header,
                                                         stream.held_reset))
        keep: deque[tuple[float, ObjectDatagram]] = deque()
        for arrival, datagram in self._held_datagrams:
            if datagram.track_alias == track_alias:
                self._held_bytes -= len(datagram.payload) + len(datagram.extensions)
                self._deliver_datagram(request_id, datagram, now)
            else:
                keep.append((arrival, datagram))
        self._held_datagrams = keep

    def _expire_held(self, now: float) -> None:
        limit = now - self.config.unknown_alias_timeout
        for stream_id, stream in list(self._streams.items()):
            if stream.held_since is not None and stream.held_since <= limit:
                self._drop_held_stream(stream_id, stream)
        while self._held_datagrams and self._held_datagrams[0][0] <= limit:
            _, datagram = self._held_datagrams.popleft()
            self._held_bytes -= len(datagram.payload) + len(datagram.extensions)
            self.stats.unknown_alias_drops += 1

    # -- internals: control messages -----------------------------------------------------------

    def _on_message(self, msg: Message, now: float) -> None:
        if self.state == SessionState.SETUP:
            expected = ServerSetup if self.is_client else ClientSetup
            if not isinstance(msg, expected):
                raise ProtocolViolation(
                    f"{msg.message_type.name} before {expected.message_type.name}")
        handler = self._handlers.get(msg.message_type)
        if handler is None:
            # Responses to requests we never send (PUBLISH_OK, TRACK_STATUS_OK, ...).
            raise ProtocolViolation(f"Unexpected {msg.message_type.name}")
        handler(self, msg, now)

    def _on_client_setup(self, msg: ClientSetup, now: float) -> None:
        if self.is_client or self.state != SessionState.SETUP:
            raise ProtocolViolation("Unexpected CLIENT_SETUP")
        version = next((v for v in self.config.versions if v in msg.versions), None)
        if version is None:
            offered = ", ".join(f"{v:#x}" for v in msg.versions) or "none"
            raise VersionNegotiationFailed(f"No common MoQT version (offered {offered})")
        path = get_parameter(msg.parameters, SetupParameter.PATH)
        if isinstance(path, bytes):
            self.peer_path = path.decode("utf-8", errors="replace")
            if self.peer_path and not self.peer_path.startswith("/"):
                raise MoqtError(f"PATH {self.peer_path!r} does not start with '/'",
                                SessionErrorCode.MALFORMED_PATH)
        authority = get_parameter(msg.parameters, SetupParameter.AUTHORITY)
        if isinstance(authority, bytes):
            self.peer_authority = authority.decode("utf-8", errors="replace")
        self._set_peer_credit(msg.parameters)
        self.version = version
        self._send_control(ServerSetup(version, (
            (SetupParameter.MAX_REQUEST_ID, self._local_max_request_id),
            (SetupParameter.MOQT_IMPLEMENTATION, self.config.implementation.encode()),
        )))
        self._ready(msg.parameters)

    def _on_server_setup(self, msg: ServerSetup, now: float) -> None:
        if not self.is_client or self.state != SessionState.SETUP:
            raise ProtocolViolation("Unexpected SERVER_SETUP")
        if msg.selected_version not in self.config.versions:
            raise VersionNegotiationFailed(
                f"Server selected version {msg.selected_version:#x}, which was not offered")
        for kind in (SetupParameter.PATH, SetupParameter.AUTHORITY):
            if get_parameter(msg.parameters, kind) is not None:
                raise ProtocolViolation(f"SERVER_SETUP carries the client-only {kind.name}")
        self._set_peer_credit(msg.parameters)
        self.version = msg.selected_version
        self._ready(msg.parameters)

    def _set_peer_credit(self, parameters: Parameters) -> None:
        credit = get_parameter(parameters, SetupParameter.MAX_REQUEST_ID, 0)
        self._peer_max_request_id = credit if isinstance(credit, int) else 0

    def _ready(self, parameters: Parameters) -> None:
        self.state = SessionState.READY
        assert self.version is not None
        self._events.append(SessionReady(self.version, parameters, self.peer_path,
                                         self.peer_authority))
        self._flush_requests()

    def _on_goaway(self, msg: Goaway, now: float) -> None:
        if self.goaway_received:
            raise ProtocolViolation("Second GOAWAY")
        if not self.is_client and msg.new_session_uri:
            raise ProtocolViolation("A client's GOAWAY carries a new session URI")
        self.goaway_received = True
        self._events.append(GoawayReceived(msg.new_session_uri))

    def _on_max_request_id(self, msg: MaxRequestId, now: float) -> None:
        if msg.request_id <= self._peer_max_request_id:
            raise ProtocolViolation(
                f"MAX_REQUEST_ID {msg.request_id} does not exceed {self._peer_max_request_id}")
        self._peer_max_request_id = msg.request_id
        self._flush_requests()

    def _on_requests_blocked(self, msg: RequestsBlocked, now: float) -> None:
        self._grant_credit(force=True)

    def _check_peer_request(self, request_id: int, kind: _Kind | None) -> None:
        """Parity, no reuse, credit (section 9.1); then remember what must be answered."""
        peer_parity = 1 if self.is_client else 0
        if request_id % 2 != peer_parity:
            raise MoqtError(f"Request ID {request_id} has the wrong parity",
                            SessionErrorCode.INVALID_REQUEST_ID)
        if request_id >= self._peer_next_request_id:
            # Ahead of the next expected ID: remember the ones skipped (they may still come).
            if request_id - self._peer_next_request_id <= 2 * 1024:
                self._peer_skipped_ids.update(range(self._peer_next_request_id, request_id, 2))
            self._peer_next_request_id = request_id + 2
        elif request_id in self._peer_skipped_ids:
            self._peer_skipped_ids.discard(request_id)
        else:
            raise MoqtError(f"Request ID {request_id} was already used",
                            SessionErrorCode.INVALID_REQUEST_ID)
        if request_id >= self._local_max_request_id:
            if self.config.enforce_request_credit:
                raise MoqtError(f"Request ID {request_id} exceeds the maximum "
                                f"{self._local_max_request_id - 1}",
                                SessionErrorCode.TOO_MANY_REQUESTS)
            self.stats.requests_without_credit += 1
        if kind is not None:
            self._incoming[request_id] = kind
        self._grant_credit()

    def _grant_credit(self, force: bool = False) -> None:
        # Top the credit up once the peer has used half of the last grant.
        credit = self.config.request_credit
        remaining = self._local_max_request_id - self._peer_next_request_id
        if force or remaining < credit // 2:
            new_max = max(self._local_max_request_id, self._peer_next_request_id) + credit
            if new_max > self._local_max_request_id:
                self._local_max_request_id = new_max
                self._send_control(MaxRequestId(new_max))

    def _on_subscribe(self, msg: Subscribe, now: float) -> None:
        self._check_peer_request(msg.request_id, _Kind.SUBSCRIBE)
        self._publications[msg.request_id] = _Publication(msg.request_id,
                                                          msg.subscriber_priority)
        self._events.append(SubscribeRequested(msg.request_id, msg))

    def _our_request(self, request_id: int, kind: _Kind, what: str) -> None:
        if self._outgoing.get(request_id) != kind:
            raise ProtocolViolation(f"{what} for request ID {request_id}, which is not a "
                                    f"pending {kind.value}")
        del self._outgoing[request_id]

    def _on_subscribe_ok(self, msg: SubscribeOk, now: float) -> None:
        self._our_request(msg.request_id, _Kind.SUBSCRIBE, "SUBSCRIBE_OK")
        subscription = self._subscriptions[msg.request_id]
        if msg.track_alias in self._alias_to_request:
            raise MoqtError(f"Track alias {msg.track_alias} is already in use",
                            SessionErrorCode.DUPLICATE_TRACK_ALIAS)
        subscription.track_alias = msg.track_alias
        self._alias_to_request[msg.track_alias] = msg.request_id
        self._events.append(SubscribeAccepted(msg.request_id, msg.track_alias, msg))
        self._release_alias(msg.track_alias, msg.request_id, now)

    def _on_subscribe_error(self, msg: SubscribeError, now: float) -> None:
        self._our_request(msg.request_id, _Kind.SUBSCRIBE, "SUBSCRIBE_ERROR")
        self._subscriptions.pop(msg.request_id, None)
        self._events.append(SubscribeRejected(msg.request_id, msg.error_code,
                                              msg.reason_phrase))

    def _on_subscribe_update(self, msg: SubscribeUpdate, now: float) -> None:
        # Section 9.10: no response exists; we keep the subscription as it was.
        self._check_peer_request(msg.request_id, None)

    def _on_unsubscribe(self, msg: Unsubscribe, now: float) -> None:
        # It may cross our PUBLISH_DONE or SUBSCRIBE_ERROR: an unknown ID is not an error.
        publication = self._publications.pop(msg.request_id, None)
        self._incoming.pop(msg.request_id, None)
        if publication is None:
            return
        publication.ended = True
        for sender in list(publication.senders.values()):
            sender.reset(StreamResetCode.CANCELLED)
        self._events.append(UnsubscribeReceived(msg.request_id))

    def _on_publish_done(self, msg: PublishDone, now: float) -> None:
        subscription = self._subscriptions.get(msg.request_id)
        if subscription is None:
            return  # crossed our UNSUBSCRIBE
        self._outgoing.pop(msg.request_id, None)
        subscription.done = True
        self._events.append(PublishDoneReceived(msg.request_id, msg.status_code,
                                                msg.stream_count, msg.reason_phrase))

    def _on_publish(self, msg: Publish, now: float) -> None:
        # We route per namespace and resolve tracks with SUBSCRIBE, as moq-rs does.
        self._check_peer_request(msg.request_id, None)
        self.stats.requests_rejected_not_supported += 1
        self._send_control(PublishError(msg.request_id, PublishErrorCode.NOT_SUPPORTED,
                                        "PUBLISH is not supported; use PUBLISH_NAMESPACE"))

    def _on_track_status(self, msg: TrackStatus, now: float) -> None:
        self._check_peer_request(msg.request_id, None)
        self.stats.requests_rejected_not_supported += 1
        self._send_control(TrackStatusError(msg.request_id, SubscribeErrorCode.NOT_SUPPORTED,
                                             "TRACK_STATUS is not supported"))

    def _on_fetch(self, msg: Fetch, now: float) -> None:
        self._check_peer_request(msg.request_id, _Kind.FETCH)
        self._events.append(FetchRequested(msg.request_id, msg))

    def _on_fetch_ok(self, msg: FetchOk, now: float) -> None:
        self._our_request(msg.request_id, _Kind.FETCH, "FETCH_OK")
        self._events.append(FetchAnswered(msg.request_id, None, "", msg))

    def _on_fetch_error(self, msg: FetchError, now: float) -> None:
        self._our_request(msg.request_id, _Kind.FETCH, "FETCH_ERROR")
        self._fetches.discard(msg.request_id)
        self._events.append(FetchAnswered(msg.request_id, msg.error_code, msg.reason_phrase))

    def _on_fetch_cancel(self, msg: FetchCancel, now: float) -> None:
        if self._incoming.pop(msg.request_id, None) is not None:
            self._events.append(FetchCancelled(msg.request_id))

    def _on_publish_namespace(self, msg: PublishNamespace, now: float) -> None:
        self._check_peer_request(msg.request_id, _Kind.PUBLISH_NAMESPACE)
        self._events.append(NamespacePublished(msg.request_id, msg.track_namespace,
                                               msg.parameters))

    def _on_publish_namespace_ok(self, msg: PublishNamespaceOk, now: float) -> None:
        self._our_request(msg.request_id, _Kind.PUBLISH_NAMESPACE, "PUBLISH_NAMESPACE_OK")
        self._events.append(PublishNamespaceAnswered(msg.request_id, None))

    def _on_publish_namespace_error(self, msg: PublishNamespaceError, now: float) -> None:
        self._our_request(msg.request_id, _Kind.PUBLISH_NAMESPACE, "PUBLISH_NAMESPACE_ERROR")
        self._events.append(PublishNamespaceAnswered(msg.request_id, msg.error_code,
                                                     msg.reason_phrase))

    def _on_publish_namespace_done(self, msg: PublishNamespaceDone, now: float) -> None:
        self._events.append(NamespaceDone(msg.track_namespace))

    def _on_publish_namespace_cancel(self, msg: PublishNamespaceCancel, now: float) -> None:
        self._events.append(NamespaceCancelled(msg.track_namespace, msg.error_code,
                                               msg.reason_phrase))

    def _on_subscribe_namespace(self, msg: SubscribeNamespace, now: float) -> None:
        self._check_peer_request(msg.request_id, _Kind.SUBSCRIBE_NAMESPACE)
        self._events.append(SubscribeNamespaceRequested(msg.request_id,
                                                        msg.track_namespace_prefix,
                                                        msg.parameters))

    def _on_subscribe_namespace_ok(self, msg: SubscribeNamespaceOk, now: float) -> None:
        self._our_request(msg.request_id, _Kind.SUBSCRIBE_NAMESPACE, "SUBSCRIBE_NAMESPACE_OK")
        self._events.append(SubscribeNamespaceAnswered(msg.request_id, None))

    def _on_subscribe_namespace_error(self, msg: SubscribeNamespaceError, now: float) -> None:
        self._our_request(msg.request_id, _Kind.SUBSCRIBE_NAMESPACE,
                          "SUBSCRIBE_NAMESPACE_ERROR")
        self._events.append(SubscribeNamespaceAnswered(msg.request_id, msg.error_code,
                                                       msg.reason_phrase))

    def _on_unsubscribe_namespace(self, msg: UnsubscribeNamespace, now: float) -> None:
        self._events.append(UnsubscribeNamespaceReceived(msg.track_namespace_prefix))

    _handlers: dict[int, Callable[[MoqtSession, Message, float], None]] = {  # type: ignore
        MessageType.CLIENT_SETUP: _on_client_setup,
        MessageType.SERVER_SETUP: _on_server_setup,
        MessageType.GOAWAY: _on_goaway,
        MessageType.MAX_REQUEST_ID: _on_max_request_id,
        MessageType.REQUESTS_BLOCKED: _on_requests_blocked,
        MessageType.SUBSCRIBE: _on_subscribe,
        MessageType.SUBSCRIBE_OK: _on_subscribe_ok,
        MessageType.SUBSCRIBE_ERROR: _on_subscribe_error,
        MessageType.SUBSCRIBE_UPDATE: _on_subscribe_update,
        MessageType.UNSUBSCRIBE: _on_unsubscribe,
        MessageType.PUBLISH_DONE: _on_publish_done,
        MessageType.PUBLISH: _on_publish,
        MessageType.TRACK_STATUS: _on_track_status,
        MessageType.FETCH: _on_fetch,
        MessageType.FETCH_OK: _on_fetch_ok,
        MessageType.FETCH_ERROR: _on_fetch_error,
        MessageType.FETCH_CANCEL: _on_fetch_cancel,
        MessageType.PUBLISH_NAMESPACE: _on_publish_namespace,
        MessageType.PUBLISH_NAMESPACE_OK: _on_publish_namespace_ok,
        MessageType.PUBLISH_NAMESPACE_ERROR: _on_publish_namespace_error,
        MessageType.PUBLISH_NAMESPACE_DONE: _on_publish_namespace_done,
        MessageType.PUBLISH_NAMESPACE_CANCEL: _on_publish_namespace_cancel,
        MessageType.SUBSCRIBE_NAMESPACE: _on_subscribe_namespace,
        MessageType.SUBSCRIBE_NAMESPACE_OK: _on_subscribe_namespace_ok,
        MessageType.SUBSCRIBE_NAMESPACE_ERROR: _on_subscribe_namespace_error,
        MessageType.UNSUBSCRIBE_NAMESPACE: _on_unsubscribe_namespace,
    }


__all__ = [
    "MOQT_VERSION_DRAFT_14", "SKIPPED_SUBGROUP_RESET_CODE", "MoqtSession", "SessionConfig",
    "SessionState", "SessionStats", "SubgroupSender", "split_namespace", "join_namespace",
]
