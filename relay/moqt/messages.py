"""MoQT draft-14 control messages (section 9): wire format only, no state.

Every control message is a frozen dataclass with a `pull_<msg>(buf)` / `push_<msg>(buf, msg)`
pair working on the message payload. `encode_message` adds the framing
(`Type (i) | Length (16) | Payload`), `decode_message` removes it, and `ControlStreamReader` cuts
a control stream into messages as bytes arrive.

Parameters (section 9.2) are kept as an ordered tuple of `(type, value)` pairs, unknown ones
included, so a decoded message re-encodes to the same bytes: even types carry an `int`, odd
types `bytes` (the Key-Value-Pair rule of section 1.4.2).

Deviation from the letter of -14, for interop: a SUBSCRIBE_NAMESPACE / UNSUBSCRIBE_NAMESPACE
prefix may have 0 fields (moq-rs sends an empty prefix on every session; closing the session
breaks its discovery, answering SUBSCRIBE_NAMESPACE_ERROR keeps it alive). Every Track
Namespace proper must have 1..32 fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Union

from aioquic.buffer import Buffer, BufferReadError, BufferWriteError

from .constants import (
    MAX_FULL_TRACK_NAME_LENGTH,
    MAX_GOAWAY_URI_LENGTH,
    MAX_KVP_VALUE_LENGTH,
    MAX_MESSAGE_LENGTH,
    MAX_NAMESPACE_FIELDS,
    MAX_REASON_PHRASE_LENGTH,
    FetchType,
    FilterType,
    GroupOrder,
    MessageParameter,
    MessageType,
    SetupParameter,
)
from .errors import ProtocolViolation

ParameterValue = Union[int, bytes]
Parameters = tuple[tuple[int, ParameterValue], ...]
TrackNamespace = tuple[bytes, ...]


# https://www.ietf.org/archive/id/draft-ietf-moq-transport-14.html#section-1.4.1
@dataclass(frozen=True, order=True)
class Location:
    """A position in a track; ordered by group, then object."""

    group: int
    object: int


# -- structures of section 1.4 ---------------------------------------------------------------


def pull_location(buf: Buffer) -> Location:
    return Location(buf.pull_uint_var(), buf.pull_uint_var())


def push_location(buf: Buffer, location: Location) -> None:
    buf.push_uint_var(location.group)
    buf.push_uint_var(location.object)


def pull_bytes_with_length(buf: Buffer) -> bytes:
    """A `(b)` field: varint length, then that many bytes."""
    return buf.pull_bytes(buf.pull_uint_var())


def push_bytes_with_length(buf: Buffer, data: bytes) -> None:
    buf.push_uint_var(len(data))
    buf.push_bytes(data)


def pull_key_value_pair(buf: Buffer) -> tuple[int, ParameterValue]:
    """One Key-Value-Pair (section 1.4.2): even type → varint, odd type → length + bytes."""
    kind = buf.pull_uint_var()
    if kind % 2 == 0:
        return kind, buf.pull_uint_var()
    length = buf.pull_uint_var()
    if length > MAX_KVP_VALUE_LENGTH:
        raise ProtocolViolation(
            f"Key-Value-Pair type {kind:#x} length {length} exceeds {MAX_KVP_VALUE_LENGTH}"
        )
    return kind, buf.pull_bytes(length)


def push_key_value_pair(buf: Buffer, kind: int, value: ParameterValue) -> None:
    buf.push_uint_var(kind)
    if kind % 2 == 0:
        if not isinstance(value, int):
            raise ValueError(f"Key-Value-Pair type {kind:#x} is even and needs an int value")
        buf.push_uint_var(value)
    else:
        if not isinstance(value, (bytes, bytearray)):
            raise ValueError(f"Key-Value-Pair type {kind:#x} is odd and needs a bytes value")
        if len(value) > MAX_KVP_VALUE_LENGTH:
            raise ValueError(
                f"Key-Value-Pair type {kind:#x} length {len(value)} exceeds {MAX_KVP_VALUE_LENGTH}"
            )
        push_bytes_with_length(buf, bytes(value))


def pull_parameters(buf: Buffer) -> Parameters:
    """`Number of Parameters (i)` then that many Key-Value-Pairs, in wire order."""
    count = buf.pull_uint_var()
    return tuple(pull_key_value_pair(buf) for _ in range(count))


def push_parameters(buf: Buffer, parameters: Parameters) -> None:
    buf.push_uint_var(len(parameters))
    for kind, value in parameters:
        push_key_value_pair(buf, kind, value)


def get_parameter(parameters: Parameters, kind: int,
                  default: ParameterValue | None = None) -> ParameterValue | None:
    """The value of the first parameter of type `kind`, or `default`."""
    for k, value in parameters:
        if k == kind:
            return value
    return default


def _check_duplicates(parameters: Parameters, single: frozenset[int], what: str) -> None:
    # Section 9.2: known parameters that may not repeat are a PROTOCOL_VIOLATION when they do;
    # unknown ones may repeat.
    seen: set[int] = set()
    for kind, _ in parameters:
        if kind in single:
            if kind in seen:
                raise ProtocolViolation(f"Duplicate {what} parameter {kind:#x}")
            seen.add(kind)


def pull_track_namespace(buf: Buffer, *, allow_empty: bool = False,
                         what: str = "Track namespace") -> TrackNamespace:
    """A `(tuple)` Track Namespace: 1..32 fields (section 2.4.1); 0 only if `allow_empty`."""
    count = buf.pull_uint_var()
    if count > MAX_NAMESPACE_FIELDS or (count == 0 and not allow_empty):
        raise ProtocolViolation(
            f"{what} has {count} fields (must be 1 to {MAX_NAMESPACE_FIELDS})")
    namespace = tuple(pull_bytes_with_length(buf) for _ in range(count))
    size = sum(len(field) for field in namespace)
    if size > MAX_FULL_TRACK_NAME_LENGTH:
        raise ProtocolViolation(
            f"{what} is {size} bytes (maximum {MAX_FULL_TRACK_NAME_LENGTH})")
    return namespace


def push_track_namespace(buf: Buffer, namespace: TrackNamespace) -> None:
    if len(namespace) > MAX_NAMESPACE_FIELDS:
        raise ValueError(f"Track namespace has {len(namespace)} fields (at most 32)")
    buf.push_uint_var(len(namespace))
    for field in namespace:
        push_bytes_with_length(buf, field)


def pull_full_track_name(buf: Buffer) -> tuple[TrackNamespace, bytes]:
    """Track Namespace (tuple), Track Name Length (i), Track Name; at most 4096 bytes in all."""
    namespace = pull_track_namespace(buf)
    name = pull_bytes_with_length(buf)
    size = sum(len(field) for field in namespace) + len(name)
    if size > MAX_FULL_TRACK_NAME_LENGTH:
        raise ProtocolViolation(
            f"Full track name is {size} bytes (maximum {MAX_FULL_TRACK_NAME_LENGTH})")
    return namespace, name


def push_full_track_name(buf: Buffer, namespace: TrackNamespace, name: bytes) -> None:
    push_track_namespace(buf, namespace)
    push_bytes_with_length(buf, name)


def pull_reason_phrase(buf: Buffer) -> str:
    """Reason Phrase (section 1.4.3): at most 1024 bytes of UTF-8 (invalid bytes replaced)."""
    length = buf.pull_uint_var()
    if length > MAX_REASON_PHRASE_LENGTH:
        raise ProtocolViolation(
            f"Reason phrase is {length} bytes (maximum {MAX_REASON_PHRASE_LENGTH})")
    return buf.pull_bytes(length).decode("utf-8", errors="replace")


def push_reason_phrase(buf: Buffer, reason: str) -> None:
    data = reason.encode("utf-8")
    if len(data) > MAX_REASON_PHRASE_LENGTH:
        raise ValueError(f"Reason phrase is {len(data)} bytes (maximum 1024)")
    push_bytes_with_length(buf, data)


def _pull_flag(buf: Buffer, what: str) -> bool:
    value = buf.pull_uint8()
    if value > 1:
        raise ProtocolViolation(f"Invalid {what} value {value}")
    return value == 1


def _pull_request_group_order(buf: Buffer) -> GroupOrder:
    # Requests (SUBSCRIBE, FETCH, TRACK_STATUS) may say 0 = "the publisher's order".
    value = buf.pull_uint8()
    if value > GroupOrder.DESCENDING:
        raise ProtocolViolation(f"Invalid group order {value}")
    return GroupOrder(value)


def _pull_response_group_order(buf: Buffer) -> GroupOrder:
    # Responses and PUBLISH must say 1 (ascending) or 2 (descending).
    value = buf.pull_uint8()
    if value not in (GroupOrder.ASCENDING, GroupOrder.DESCENDING):
        raise ProtocolViolation(f"Invalid group order {value}")
    return GroupOrder(value)


def _pull_filter(buf: Buffer) -> tuple[FilterType, Location | None, int | None]:
    value = buf.pull_uint_var()
    try:
        filter_type = FilterType(value)
    except ValueError:
        raise ProtocolViolation(f"Invalid filter type {value:#x}") from None
    start = end = None
    if filter_type in (FilterType.ABSOLUTE_START, FilterType.ABSOLUTE_RANGE):
        start = pull_location(buf)
    if filter_type == FilterType.ABSOLUTE_RANGE:
        end = buf.pull_uint_var()
    return filter_type, start, end


def _push_filter(buf: Buffer, filter_type: FilterType, start: Location | None,
                 end: int | None) -> None:
    buf.push_uint_var(filter_type)
    if start is not None:
        push_location(buf, start)
    if end is not None:
        buf.push_uint_var(end)


def _check_filter(filter_type: int, start: Location | None, end: int | None) -> None:
    needs_start = filter_type in (FilterType.ABSOLUTE_START, FilterType.ABSOLUTE_RANGE)
    needs_end = filter_type == FilterType.ABSOLUTE_RANGE
    if needs_start != (start is not None) or needs_end != (end is not None):
        raise ValueError(f"Filter type {filter_type:#x} with start={start} end_group={end}")


# -- messages --------------------------------------------------------------------------------

# Section 9.3.2: setup parameters that may appear at most once.
_SINGLE_SETUP_PARAMETERS = frozenset({
    SetupParameter.PATH, SetupParameter.MAX_REQUEST_ID, SetupParameter.MAX_AUTH_TOKEN_CACHE_SIZE,
    SetupParameter.AUTHORITY, SetupParameter.MOQT_IMPLEMENTATION,
})
# Section 9.2.1: single-instance message parameters, only in the messages that define them
# (elsewhere they are ignored, so they count as unknown and may repeat).
_DELIVERY_TIMEOUT_MESSAGES = frozenset({
    MessageType.TRACK_STATUS, MessageType.TRACK_STATUS_OK, MessageType.PUBLISH,
    MessageType.PUBLISH_OK, MessageType.SUBSCRIBE, MessageType.SUBSCRIBE_OK,
    MessageType.SUBSCRIBE_UPDATE,
})
_MAX_CACHE_DURATION_MESSAGES = frozenset({
    MessageType.PUBLISH, MessageType.SUBSCRIBE_OK, MessageType.FETCH_OK,
    MessageType.TRACK_STATUS_OK,
})


def _pull_message_parameters(buf: Buffer, message_type: MessageType) -> Parameters:
    parameters = pull_parameters(buf)
    single = set()
    if message_type in _DELIVERY_TIMEOUT_MESSAGES:
        single.add(MessageParameter.DELIVERY_TIMEOUT)
    if message_type in _MAX_CACHE_DURATION_MESSAGES:
        single.add(MessageParameter.MAX_CACHE_DURATION)
    if single:
        _check_duplicates(parameters, frozenset(single), message_type.name)
    return parameters


# Section 9.3
@dataclass(frozen=True)
class ClientSetup:
    message_type: ClassVar[MessageType] = MessageType.CLIENT_SETUP
    versions: tuple[int, ...]
    parameters: Parameters = ()


def pull_client_setup(buf: Buffer) -> ClientSetup:
    count = buf.pull_uint_var()
    versions = tuple(buf.pull_uint_var() for _ in range(count))
    parameters = pull_parameters(buf)
    _check_duplicates(parameters, _SINGLE_SETUP_PARAMETERS, "setup")
    return ClientSetup(versions, parameters)


def push_client_setup(buf: Buffer, msg: ClientSetup) -> None:
    buf.push_uint_var(len(msg.versions))
    for version in msg.versions:
        buf.push_uint_var(version)
    push_parameters(buf, msg.parameters)


@dataclass(frozen=True)
class ServerSetup:
    message_type: ClassVar[MessageType] = MessageType.SERVER_SETUP
    selected_version: int
    parameters: Parameters = ()


def pull_server_setup(buf: Buffer) -> ServerSetup:
    version = buf.pull_uint_var()
    parameters = pull_parameters(buf)
    _check_duplicates(parameters, _SINGLE_SETUP_PARAMETERS, "setup")
    return ServerSetup(version, parameters)


def push_server_setup(buf: Buffer, msg: ServerSetup) -> None:
    buf.push_uint_var(msg.selected_version)
    push_parameters(buf, msg.parameters)


# Section 9.4
@dataclass(frozen=True)
class Goaway:
    message_type: ClassVar[MessageType] = MessageType.GOAWAY
    new_session_uri: bytes = b""
    """Empty: reconnect to the current URI. A server receiving a non-empty one closes."""


def pull_goaway(buf: Buffer) -> Goaway:
    length = buf.pull_uint_var()
    if length > MAX_GOAWAY_URI_LENGTH:
        raise ProtocolViolation(
            f"GOAWAY new session URI is {length} bytes (maximum {MAX_GOAWAY_URI_LENGTH})")
    return Goaway(buf.pull_bytes(length))


def push_goaway(buf: Buffer, msg: Goaway) -> None:
    push_bytes_with_length(buf, msg.new_session_uri)


# Section 9.5
@dataclass(frozen=True)
class MaxRequestId:
    message_type: ClassVar[MessageType] = MessageType.MAX_REQUEST_ID
    request_id: int
    """The new maximum Request ID plus 1."""


def pull_max_request_id(buf: Buffer) -> MaxRequestId:
    return MaxRequestId(buf.pull_uint_var())


def push_max_request_id(buf: Buffer, msg: MaxRequestId) -> None:
    buf.push_uint_var(msg.request_id)


# Section 9.6
@dataclass(frozen=True)
class RequestsBlocked:
    message_type: ClassVar[MessageType] = MessageType.REQUESTS_BLOCKED
    maximum_request_id: int


def pull_requests_blocked(buf: Buffer) -> RequestsBlocked:
    return RequestsBlocked(buf.pull_uint_var())


def push_requests_blocked(buf: Buffer, msg: RequestsBlocked) -> None:
    buf.push_uint_var(msg.maximum_request_id)


# Section 9.7; TRACK_STATUS (9.20) has the same format.
@dataclass(frozen=True)
class Subscribe:
    message_type: ClassVar[MessageType] = MessageType.SUBSCRIBE
    request_id: int
    track_namespace: TrackNamespace
    track_name: bytes
    subscriber_priority: int
    group_order: GroupOrder
    forward: bool
    filter_type: FilterType
    start_location: Location | None = None
    """Only with ABSOLUTE_START and ABSOLUTE_RANGE."""
    end_group: int | None = None
    """Only with ABSOLUTE_RANGE."""
    parameters: Parameters = ()

    def __post_init__(self) -> None:
        _check_filter(self.filter_type, self.start_location, self.end_group)


def _pull_subscribe_fields(buf: Buffer, cls: type[Subscribe]) -> Subscribe:
    request_id = buf.pull_uint_var()
    namespace, name = pull_full_track_name(buf)
    priority = buf.pull_uint8()
    group_order = _pull_request_group_order(buf)
    forward = _pull_flag(buf, "forward")
    filter_type, start, end = _pull_filter(buf)
    parameters = _pull_message_parameters(buf, cls.message_type)
    return cls(request_id, namespace, name, priority, group_order, forward, filter_type, start,
               end, parameters)


def pull_subscribe(buf: Buffer) -> Subscribe:
    return _pull_subscribe_fields(buf, Subscribe)


def push_subscribe(buf: Buffer, msg: Subscribe) -> None:
    buf.push_uint_var(msg.request_id)
    push_full_track_name(buf, msg.track_namespace, msg.track_name)
    buf.push_uint8(msg.subscriber_priority)
    buf.push_uint8(msg.group_order)
    buf.push_uint8(int(msg.forward))
    _push_filter(buf, msg.filter_type, msg.start_location, msg.end_group)
    push_parameters(buf, msg.parameters)


# Section 9.8; TRACK_STATUS_OK (9.21) has the same format.
@dataclass(frozen=True)
class SubscribeOk:
    message_type: ClassVar[MessageType] = MessageType.SUBSCRIBE_OK
    request_id: int
    track_alias: int
    expires: int
    """Milliseconds; 0 = does not expire."""
    group_order: GroupOrder
    largest_location: Location | None = None
    """None encodes Content Exists = 0."""
    parameters: Parameters = ()


def _pull_subscribe_ok_fields(buf: Buffer, cls: type[SubscribeOk]) -> SubscribeOk:
    request_id = buf.pull_uint_var()
    track_alias = buf.pull_uint_var()
    expires = buf.pull_uint_var()
    group_order = _pull_response_group_order(buf)
    largest = pull_location(buf) if _pull_flag(buf, "content exists") else None
    parameters = _pull_message_parameters(buf, cls.message_type)
    return cls(request_id, track_alias, expires, group_order, largest, parameters)


def pull_subscribe_ok(buf: Buffer) -> SubscribeOk:
    return _pull_subscribe_ok_fields(buf, SubscribeOk)


def push_subscribe_ok(buf: Buffer, msg: SubscribeOk) -> None:
    buf.push_uint_var(msg.request_id)
    buf.push_uint_var(msg.track_alias)
    buf.push_uint_var(msg.expires)
    buf.push_uint8(msg.group_order)
    buf.push_uint8(0 if msg.largest_location is None else 1)
    if msg.largest_location is not None:
        push_location(buf, msg.largest_location)
    push_parameters(buf, msg.parameters)


# Section 9.9 (and the other `Request ID, Error Code, Reason` replies).
@dataclass(frozen=True)
class SubscribeError:
    message_type: ClassVar[MessageType] = MessageType.SUBSCRIBE_ERROR
    request_id: int
    error_code: int
    reason_phrase: str = ""


def _pull_request_error(buf: Buffer, cls):  # type: ignore[no-untyped-def]
    return cls(buf.pull_uint_var(), buf.pull_uint_var(), pull_reason_phrase(buf))


def _push_request_error(buf: Buffer, msg) -> None:  # type: ignore[no-untyped-def]
    buf.push_uint_var(msg.request_id)
    buf.push_uint_var(msg.error_code)
    push_reason_phrase(buf, msg.reason_phrase)


def pull_subscribe_error(buf: Buffer) -> SubscribeError:
    return _pull_request_error(buf, SubscribeError)


def push_subscribe_error(buf: Buffer, msg: SubscribeError) -> None:
    _push_request_error(buf, msg)


# Section 9.10
@dataclass(frozen=True)
class SubscribeUpdate:
    message_type: ClassVar[MessageType] = MessageType.SUBSCRIBE_UPDATE
    request_id: int
    subscription_request_id: int
    start_location: Location
    end_group: int
    """End Group plus 1; 0 = open-ended."""
    subscriber_priority: int
    forward: bool
    parameters: Parameters = ()


def pull_subscribe_update(buf: Buffer) -> SubscribeUpdate:
    request_id = buf.pull_uint_var()
    subscription_request_id = buf.pull_uint_var()
    start = pull_location(buf)
    end_group = buf.pull_uint_var()
    priority = buf.pull_uint8()
    forward = _pull_flag(buf, "forward")
    parameters = _pull_message_parameters(buf, MessageType.SUBSCRIBE_UPDATE)
    return SubscribeUpdate(request_id, subscription_request_id, start, end_group, priority,
                           forward, parameters)


def push_subscribe_update(buf: Buffer, msg: SubscribeUpdate) -> None:
    buf.push_uint_var(msg.request_id)
    buf.push_uint_var(msg.subscription_request_id)
    push_location(buf, msg.start_location)
    buf.push_uint_var(msg.end_group)
    buf.push_uint8(msg.subscriber_priority)
    buf.push_uint8(int(msg.forward))
    push_parameters(buf, msg.parameters)


# Section 9.11
@dataclass(frozen=True)
class Unsubscribe:
    message_type: ClassVar[MessageType] = MessageType.UNSUBSCRIBE
    request_id: int


def pull_unsubscribe(buf: Buffer) -> Unsubscribe:
    return Unsubscribe(buf.pull_uint_var())


def push_unsubscribe(buf: Buffer, msg: Unsubscribe) -> None:
    buf.push_uint_var(msg.request_id)


# Section 9.12
@dataclass(frozen=True)
class PublishDone:
    message_type: ClassVar[MessageType] = MessageType.PUBLISH_DONE
    request_id: int
    status_code: int
    stream_count: int
    """Data streams opened for the subscription; 2^62-1 if unknown, 0 for datagram tracks."""
    reason_phrase: str = ""


def pull_publish_done(buf: Buffer) -> PublishDone:
    return PublishDone(buf.pull_uint_var(), buf.pull_uint_var(), buf.pull_uint_var(),
                       pull_reason_phrase(buf))


def push_publish_done(buf: Buffer, msg: PublishDone) -> None:
    buf.push_uint_var(msg.request_id)
    buf.push_uint_var(msg.status_code)
    buf.push_uint_var(msg.stream_count)
    push_reason_phrase(buf, msg.reason_phrase)


# Section 9.13. The -14 figure says `Length (i)` for PUBLISH/_OK/_ERROR; section 9's framing
# (and moq-rs) use 16 bits for every message, and so do we.
@dataclass(frozen=True)
class Publish:
    message_type: ClassVar[MessageType] = MessageType.PUBLISH
    request_id: int
    track_namespace: TrackNamespace
    track_name: bytes
    track_alias: int
    group_order: GroupOrder
    largest_location: Location | None
    """None encodes Content Exists = 0."""
    forward: bool
    parameters: Parameters = ()


def pull_publish(buf: Buffer) -> Publish:
    request_id = buf.pull_uint_var()
    namespace, name = pull_full_track_name(buf)
    track_alias = buf.pull_uint_var()
    group_order = _pull_response_group_order(buf)
    largest = pull_location(buf) if _pull_flag(buf, "content exists") else None
    forward = _pull_flag(buf, "forward")
    parameters = _pull_message_parameters(buf, MessageType.PUBLISH)
    return Publish(request_id, namespace, name, track_alias, group_order, largest, forward,
                   parameters)


def push_publish(buf: Buffer, msg: Publish) -> None:
    buf.push_uint_var(msg.request_id)
    push_full_track_name(buf, msg.track_namespace, msg.track_name)
    buf.push_uint_var(msg.track_alias)
    buf.push_uint8(msg.group_order)
    buf.push_uint8(0 if msg.largest_location is None else 1)
    if msg.largest_location is not None:
        push_location(buf, msg.largest_location)
    buf.push_uint8(int(msg.forward))
    push_parameters(buf, msg.parameters)


# Section 9.14
@dataclass(frozen=True)
class PublishOk:
    message_type: ClassVar[MessageType] = MessageType.PUBLISH_OK
    request_id: int
    forward: bool
    subscriber_priority: int
    group_order: GroupOrder
    filter_type: FilterType
    start_location: Location | None = None
    end_group: int | None = None
    parameters: Parameters = ()

    def __post_init__(self) -> None:
        _check_filter(self.filter_type, self.start_location, self.end_group)


def pull_publish_ok(buf: Buffer) -> PublishOk:
    request_id = buf.pull_uint_var()
    forward = _pull_flag(buf, "forward")
    priority = buf.pull_uint8()
    group_order = _pull_response_group_order(buf)
    filter_type, start, end = _pull_filter(buf)
    parameters = _pull_message_parameters(buf, MessageType.PUBLISH_OK)
    return PublishOk(request_id, forward, priority, group_order, filter_type, start, end,
                     parameters)


def push_publish_ok(buf: Buffer, msg: PublishOk) -> None:
    buf.push_uint_var(msg.request_id)
    buf.push_uint8(int(msg.forward))
    buf.push_uint8(msg.subscriber_priority)
    buf.push_uint8(msg.group_order)
    _push_filter(buf, msg.filter_type, msg.start_location, msg.end_group)
    push_parameters(buf, msg.parameters)


# Section 9.15
@dataclass(frozen=True)
class PublishError:
    message_type: ClassVar[MessageType] = MessageType.PUBLISH_ERROR
    request_id: int
    error_code: int
    reason_phrase: str = ""


def pull_publish_error(buf: Buffer) -> PublishError:
    return _pull_request_error(buf, PublishError)


def push_publish_error(buf: Buffer, msg: PublishError) -> None:
    _push_request_error(buf, msg)


# Section 9.16
@dataclass(frozen=True)
class StandaloneFetch:
    track_namespace: TrackNamespace
    track_name: bytes
    start_location: Location
    end_location: Location
    """End plus 1; End.Object = 0 requests the whole End.Group (section 9.16.1)."""


@dataclass(frozen=True)
class JoiningFetch:
    joining_request_id: int
    joining_start: int
    """Groups before the subscription's largest (relative) or the start group (absolute)."""


@dataclass(frozen=True)
class Fetch:
    message_type: ClassVar[MessageType] = MessageType.FETCH
    request_id: int
    subscriber_priority: int
    group_order: GroupOrder
    fetch_type: FetchType
    standalone: StandaloneFetch | None = None
    """Only with STANDALONE."""
    joining: JoiningFetch | None = None
    """Only with RELATIVE_JOINING and ABSOLUTE_JOINING."""
    parameters: Parameters = ()

    def __post_init__(self) -> None:
        is_standalone = self.fetch_type == FetchType.STANDALONE
        if is_standalone != (self.standalone is not None) or \
                is_standalone == (self.joining is not None):
            raise ValueError(f"Fetch type {self.fetch_type:#x} with standalone={self.standalone}"
                             f" joining={self.joining}")


def pull_fetch(buf: Buffer) -> Fetch:
    request_id = buf.pull_uint_var()
    priority = buf.pull_uint8()
    group_order = _pull_request_group_order(buf)
    value = buf.pull_uint_var()
    try:
        fetch_type = FetchType(value)
    except ValueError:
        raise ProtocolViolation(f"Invalid fetch type {value:#x}") from None
    standalone = joining = None
    if fetch_type == FetchType.STANDALONE:
        namespace, name = pull_full_track_name(buf)
        standalone = StandaloneFetch(namespace, name, pull_location(buf), pull_location(buf))
    else:
        joining = JoiningFetch(buf.pull_uint_var(), buf.pull_uint_var())
    parameters = _pull_message_parameters(buf, MessageType.FETCH)
    return Fetch(request_id, priority, group_order, fetch_type, standalone, joining, parameters)


def push_fetch(buf: Buffer, msg: Fetch) -> None:
    buf.push_uint_var(msg.request_id)
    buf.push_uint8(msg.subscriber_priority)
    buf.push_uint8(msg.group_order)
    buf.push_uint_var(msg.fetch_type)
    if msg.standalone is not None:
        push_full_track_name(buf, msg.standalone.track_namespace, msg.standalone.track_name)
        push_location(buf, msg.standalone.start_location)
        push_location(buf, msg.standalone.end_location)
    if msg.joining is not None:
        buf.push_uint_var(msg.joining.joining_request_id)
        buf.push_uint_var(msg.joining.joining_start)
    push_parameters(buf, msg.parameters)


# Section 9.17
@dataclass(frozen=True)
class FetchOk:
    message_type: ClassVar[MessageType] = MessageType.FETCH_OK
    request_id: int
    group_order: GroupOrder
    end_of_track: bool
    end_location: Location
    parameters: Parameters = ()


def pull_fetch_ok(buf: Buffer) -> FetchOk:
    request_id = buf.pull_uint_var()
    group_order = _pull_response_group_order(buf)
    end_of_track = _pull_flag(buf, "end of track")
    end = pull_location(buf)
    parameters = _pull_message_parameters(buf, MessageType.FETCH_OK)
    return FetchOk(request_id, group_order, end_of_track, end, parameters)


def push_fetch_ok(buf: Buffer, msg: FetchOk) -> None:
    buf.push_uint_var(msg.request_id)
    buf.push_uint8(msg.group_order)
    buf.push_uint8(int(msg.end_of_track))
    push_location(buf, msg.end_location)
    push_parameters(buf, msg.parameters)


# Section 9.18
@dataclass(frozen=True)
class FetchError:
    message_type: ClassVar[MessageType] = MessageType.FETCH_ERROR
    request_id: int
    error_code: int
    reason_phrase: str = ""


def pull_fetch_error(buf: Buffer) -> FetchError:
    return _pull_request_error(buf, FetchError)


def push_fetch_error(buf: Buffer, msg: FetchError) -> None:
    _push_request_error(buf, msg)


# Section 9.19
@dataclass(frozen=True)
class FetchCancel:
    message_type: ClassVar[MessageType] = MessageType.FETCH_CANCEL
    request_id: int


def pull_fetch_cancel(buf: Buffer) -> FetchCancel:
    return FetchCancel(buf.pull_uint_var())


def push_fetch_cancel(buf: Buffer, msg: FetchCancel) -> None:
    buf.push_uint_var(msg.request_id)


# Sections 9.20-9.22: same formats as SUBSCRIBE / SUBSCRIBE_OK / SUBSCRIBE_ERROR.
@dataclass(frozen=True)
class TrackStatus(Subscribe):
    message_type: ClassVar[MessageType] = MessageType.TRACK_STATUS


def pull_track_status(buf: Buffer) -> TrackStatus:
    return _pull_subscribe_fields(buf, TrackStatus)  # type: ignore[return-value]


push_track_status = push_subscribe


@dataclass(frozen=True)
class TrackStatusOk(SubscribeOk):
    message_type: ClassVar[MessageType] = MessageType.TRACK_STATUS_OK
    """Track Alias is 0 (section 9.21)."""


def pull_track_status_ok(buf: Buffer) -> TrackStatusOk:
    return _pull_subscribe_ok_fields(buf, TrackStatusOk)  # type: ignore[return-value]


push_track_status_ok = push_subscribe_ok


@dataclass(frozen=True)
class TrackStatusError(SubscribeError):
    message_type: ClassVar[MessageType] = MessageType.TRACK_STATUS_ERROR


def pull_track_status_error(buf: Buffer) -> TrackStatusError:
    return _pull_request_error(buf, TrackStatusError)


push_track_status_error = push_subscribe_error


# Section 9.23
@dataclass(frozen=True)
class PublishNamespace:
    message_type: ClassVar[MessageType] = MessageType.PUBLISH_NAMESPACE
    request_id: int
    track_namespace: TrackNamespace
    parameters: Parameters = ()


def pull_publish_namespace(buf: Buffer) -> PublishNamespace:
    request_id = buf.pull_uint_var()
    namespace = pull_track_namespace(buf)
    parameters = _pull_message_parameters(buf, MessageType.PUBLISH_NAMESPACE)
    return PublishNamespace(request_id, namespace, parameters)


def push_publish_namespace(buf: Buffer, msg: PublishNamespace) -> None:
    buf.push_uint_var(msg.request_id)
    push_track_namespace(buf, msg.track_namespace)
    push_parameters(buf, msg.parameters)


# Section 9.24
@dataclass(frozen=True)
class PublishNamespaceOk:
    message_type: ClassVar[MessageType] = MessageType.PUBLISH_NAMESPACE_OK
    request_id: int


def pull_publish_namespace_ok(buf: Buffer) -> PublishNamespaceOk:
    return PublishNamespaceOk(buf.pull_uint_var())


def push_publish_namespace_ok(buf: Buffer, msg: PublishNamespaceOk) -> None:
    buf.push_uint_var(msg.request_id)


# Section 9.25
@dataclass(frozen=True)
class PublishNamespaceError:
    message_type: ClassVar[MessageType] = MessageType.PUBLISH_NAMESPACE_ERROR
    request_id: int
    error_code: int
    reason_phrase: str = ""


def pull_publish_namespace_error(buf: Buffer) -> PublishNamespaceError:
    return _pull_request_error(buf, PublishNamespaceError)


def push_publish_namespace_error(buf: Buffer, msg: PublishNamespaceError) -> None:
    _push_request_error(buf, msg)


# Section 9.26
@dataclass(frozen=True)
class PublishNamespaceDone:
    message_type: ClassVar[MessageType] = MessageType.PUBLISH_NAMESPACE_DONE
    track_namespace: TrackNamespace


def pull_publish_namespace_done(buf: Buffer) -> PublishNamespaceDone:
    return PublishNamespaceDone(pull_track_namespace(buf))


def push_publish_namespace_done(buf: Buffer, msg: PublishNamespaceDone) -> None:
    push_track_namespace(buf, msg.track_namespace)


# Section 9.27
@dataclass(frozen=True)
class PublishNamespaceCancel:
    message_type: ClassVar[MessageType] = MessageType.PUBLISH_NAMESPACE_CANCEL
    track_namespace: TrackNamespace
    error_code: int
    reason_phrase: str = ""


def pull_publish_namespace_cancel(buf: Buffer) -> PublishNamespaceCancel:
    return PublishNamespaceCancel(pull_track_namespace(buf), buf.pull_uint_var(),
                                  pull_reason_phrase(buf))


def push_publish_namespace_cancel(buf: Buffer, msg: PublishNamespaceCancel) -> None:
    push_track_namespace(buf, msg.track_namespace)
    buf.push_uint_var(msg.error_code)
    push_reason_phrase(buf, msg.reason_phrase)


# Section 9.28
@dataclass(frozen=True)
class SubscribeNamespace:
    message_type: ClassVar[MessageType] = MessageType.SUBSCRIBE_NAMESPACE
    request_id: int
    track_namespace_prefix: TrackNamespace
    """May be empty on decode (moq-rs interop); the session decides how to answer."""
    parameters: Parameters = ()


def pull_subscribe_namespace(buf: Buffer) -> SubscribeNamespace:
    request_id = buf.pull_uint_var()
    prefix = pull_track_namespace(buf, allow_empty=True, what="Track namespace prefix")
    parameters = _pull_message_parameters(buf, MessageType.SUBSCRIBE_NAMESPACE)
    return SubscribeNamespace(request_id, prefix, parameters)


def push_subscribe_namespace(buf: Buffer, msg: SubscribeNamespace) -> None:
    buf.push_uint_var(msg.request_id)
    push_track_namespace(buf, msg.track_namespace_prefix)
    push_parameters(buf, msg.parameters)


# Section 9.29
@dataclass(frozen=True)
class SubscribeNamespaceOk:
    message_type: ClassVar[MessageType] = MessageType.SUBSCRIBE_NAMESPACE_OK
    request_id: int


def pull_subscribe_namespace_ok(buf: Buffer) -> SubscribeNamespaceOk:
    return SubscribeNamespaceOk(buf.pull_uint_var())


def push_subscribe_namespace_ok(buf: Buffer, msg: SubscribeNamespaceOk) -> None:
    buf.push_uint_var(msg.request_id)


# Section 9.30
@dataclass(frozen=True)
class SubscribeNamespaceError:
    message_type: ClassVar[MessageType] = MessageType.SUBSCRIBE_NAMESPACE_ERROR
    request_id: int
    error_code: int
    reason_phrase: str = ""


def pull_subscribe_namespace_error(buf: Buffer) -> SubscribeNamespaceError:
    return _pull_request_error(buf, SubscribeNamespaceError)


def push_subscribe_namespace_error(buf: Buffer, msg: SubscribeNamespaceError) -> None:
    _push_request_error(buf, msg)


# Section 9.31
@dataclass(frozen=True)
class UnsubscribeNamespace:
    message_type: ClassVar[MessageType] = MessageType.UNSUBSCRIBE_NAMESPACE
    track_namespace_prefix: TrackNamespace


def pull_unsubscribe_namespace(buf: Buffer) -> UnsubscribeNamespace:
    return UnsubscribeNamespace(
        pull_track_namespace(buf, allow_empty=True, what="Track namespace prefix"))


def push_unsubscribe_namespace(buf: Buffer, msg: UnsubscribeNamespace) -> None:
    push_track_namespace(buf, msg.track_namespace_prefix)


Message = Union[
    ClientSetup, ServerSetup, Goaway, MaxRequestId, RequestsBlocked, Subscribe, SubscribeOk,
    SubscribeError, SubscribeUpdate, Unsubscribe, PublishDone, Publish, PublishOk, PublishError,
    Fetch, FetchOk, FetchError, FetchCancel, TrackStatus, TrackStatusOk, TrackStatusError,
    PublishNamespace, PublishNamespaceOk, PublishNamespaceError, PublishNamespaceDone,
    PublishNamespaceCancel, SubscribeNamespace, SubscribeNamespaceOk, SubscribeNamespaceError,
    UnsubscribeNamespace,
]

# Message type → (pull, push). One table drives encode_message, decode_message and the reader.
MESSAGE_CODECS: dict[int, tuple[Callable[[Buffer], Message], Callable[[Buffer, Message], None]]]
MESSAGE_CODECS = {  # type: ignore[assignment]
    MessageType.CLIENT_SETUP: (pull_client_setup, push_client_setup),
    MessageType.SERVER_SETUP: (pull_server_setup, push_server_setup),
    MessageType.GOAWAY: (pull_goaway, push_goaway),
    MessageType.MAX_REQUEST_ID: (pull_max_request_id, push_max_request_id),
    MessageType.REQUESTS_BLOCKED: (pull_requests_blocked, push_requests_blocked),
    MessageType.SUBSCRIBE: (pull_subscribe, push_subscribe),
    MessageType.SUBSCRIBE_OK: (pull_subscribe_ok, push_subscribe_ok),
    MessageType.SUBSCRIBE_ERROR: (pull_subscribe_error, push_subscribe_error),
    MessageType.SUBSCRIBE_UPDATE: (pull_subscribe_update, push_subscribe_update),
    MessageType.UNSUBSCRIBE: (pull_unsubscribe, push_unsubscribe),
    MessageType.PUBLISH_DONE: (pull_publish_done, push_publish_done),
    MessageType.PUBLISH: (pull_publish, push_publish),
    MessageType.PUBLISH_OK: (pull_publish_ok, push_publish_ok),
    MessageType.PUBLISH_ERROR: (pull_publish_error, push_publish_error),
    MessageType.FETCH: (pull_fetch, push_fetch),
    MessageType.FETCH_OK: (pull_fetch_ok, push_fetch_ok),
    MessageType.FETCH_ERROR: (pull_fetch_error, push_fetch_error),
    MessageType.FETCH_CANCEL: (pull_fetch_cancel, push_fetch_cancel),
    MessageType.TRACK_STATUS: (pull_track_status, push_track_status),
    MessageType.TRACK_STATUS_OK: (pull_track_status_ok, push_track_status_ok),
    MessageType.TRACK_STATUS_ERROR: (pull_track_status_error, push_track_status_error),
    MessageType.PUBLISH_NAMESPACE: (pull_publish_namespace, push_publish_namespace),
    MessageType.PUBLISH_NAMESPACE_OK: (pull_publish_namespace_ok, push_publish_namespace_ok),
    MessageType.PUBLISH_NAMESPACE_ERROR: (pull_publish_namespace_error,
                                          push_publish_namespace_error),
    MessageType.PUBLISH_NAMESPACE_DONE: (pull_publish_namespace_done,
                                         push_publish_namespace_done),
    MessageType.PUBLISH_NAMESPACE_CANCEL: (pull_publish_namespace_cancel,
                                           push_publish_namespace_cancel),
    MessageType.SUBSCRIBE_NAMESPACE: (pull_subscribe_namespace, push_subscribe_namespace),
    MessageType.SUBSCRIBE_NAMESPACE_OK: (pull_subscribe_namespace_ok,
                                         push_subscribe_namespace_ok),
    MessageType.SUBSCRIBE_NAMESPACE_ERROR: (pull_subscribe_namespace_error,
                                            push_subscribe_namespace_error),
    MessageType.UNSUBSCRIBE_NAMESPACE: (pull_unsubscribe_namespace, push_unsubscribe_namespace),
}


# -- framing (section 9) ---------------------------------------------------------------------


def encode_message(msg: Message) -> bytes:
    """`Type (i) | Length (16) | Payload` for one control message."""
    message_type = msg.message_type
    _, push = MESSAGE_CODECS[message_type]
    payload = Buffer(capacity=MAX_MESSAGE_LENGTH)
    try:
        push(payload, msg)
    except BufferWriteError:
        raise ValueError(
            f"{message_type.name} payload exceeds {MAX_MESSAGE_LENGTH} bytes") from None
    length = payload.tell()
    out = Buffer(capacity=8 + 2 + length)
    out.push_uint_var(message_type)
    out.push_uint16(length)
    out.push_bytes(payload.data)
    return out.data


def decode_payload(message_type: int, payload: bytes) -> Message:
    """Decode one message payload whose type and length were already read."""
    codec = MESSAGE_CODECS.get(message_type)
    if codec is None:
        raise ProtocolViolation(f"Unknown control message type {message_type:#x}")
    name = MessageType(message_type).name
    buf = Buffer(data=payload)
    try:
        msg = codec[0](buf)
    except BufferReadError:
        raise ProtocolViolation(
            f"Length mismatch: {name} fields run past the declared length {len(payload)}"
        ) from None
    if not buf.eof():
        raise ProtocolViolation(
            f"Length mismatch: {name} fields end at byte {buf.tell()} of the declared length "
            f"{len(payload)}")
    return msg


def pull_message(buf: Buffer) -> Message:
    """Read one framed control message at the buffer's position and advance past it.

    On truncated input the position is restored and ProtocolViolation raised, so a caller that
    expects more bytes can retry later (ControlStreamReader does this for you).
    """
    start = buf.tell()
    try:
        message_type = buf.pull_uint_var()
        if message_type not in MESSAGE_CODECS:
            raise ProtocolViolation(f"Unknown control message type {message_type:#x}")
        payload = buf.pull_bytes(buf.pull_uint16())
    except BufferReadError:
        buf.seek(start)
        raise ProtocolViolation("Control message is truncated") from None
    return decode_payload(message_type, payload)


def decode_message(data: bytes | Buffer) -> Message:
    """Decode one framed control message.

    Bytes must hold exactly one message; a Buffer is read from its position and advanced.
    """
    if isinstance(data, Buffer):
        return pull_message(data)
    buf = Buffer(data=data)
    msg = pull_message(buf)
    if not buf.eof():
        raise ProtocolViolation(
            f"Control message is followed by {len(data) - buf.tell()} unexpected bytes")
    return msg


class ControlStreamReader:
    """Cuts the control stream into messages as bytes arrive.

    Feed each received chunk; get back the messages it completed. At most one incomplete
    message is buffered (under 64 KiB: the 16-bit length bounds it). An unknown message type is
    reported as soon as its type varint is complete.
    """

    def __init__(self) -> None:
        self._pending = b""

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete message held back."""
        return len(self._pending)

    def feed(self, data: bytes) -> list[Message]:
        if self._pending:
            data = self._pending + data
        messages: list[Message] = []
        if not data:
            return messages
        buf = Buffer(data=data)
        pos = 0
        size = len(data)
        while pos < size:
            buf.seek(pos)
            try:
                message_type = buf.pull_uint_var()
            except BufferReadError:
                break
            if message_type not in MESSAGE_CODECS:
                raise ProtocolViolation(f"Unknown control message type {message_type:#x}")
            try:
                length = buf.pull_uint16()
            except BufferReadError:
                break
            start = buf.tell()
            end = start + length
            if end > size:
                break
            messages.append(decode_payload(message_type, data[start:end]))
            pos = end
        self._pending = data[pos:]
        return messages
