"""MoQT draft-14 codec, property-based (hypothesis): malformed input closes, valid input round-trips.

1. Robustness: random bytes, structured garbage (known type codes followed by random varints,
   huge declared lengths) and valid encodings with one byte mutated / cut / added go through
   every decoder entry point (decode_message, ControlStreamReader, DataStreamReader with and
   without FIN, decode_object_datagram, parse_extension_headers, the header layout helpers,
   rewrite_track_alias). Each either decodes or raises a MoqtError that closes the session with
   PROTOCOL_VIOLATION or KEY_VALUE_FORMATTING_ERROR and a reason phrase that fits section 1.4.3.
   Anything else (IndexError, struct.error, UnicodeDecodeError, OverflowError, a bare
   ValueError/BufferReadError, ...) fails the test. A tracemalloc check makes sure no declared
   length is preallocated.
2. Round trips over strategies that cover every control message type, every SUBGROUP_HEADER and
   OBJECT_DATAGRAM type, objects with and without extensions and statuses, and fetch streams;
   the incremental readers give the same result in any chunking as in one piece.
3. rewrite_track_alias changes exactly the alias bytes and refuses a different-width alias.

Determinism: every test uses `derandomize=True` and no example database, so CI runs the same
examples each time; `max_examples` keeps the module at about 10 s on a 2-vCPU VM.
"""

from __future__ import annotations

import dataclasses
import tracemalloc
from typing import Any, Callable

import pytest
from aioquic.buffer import Buffer, encode_uint_var
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from relay.moqt import data as d
from relay.moqt import messages as m
from relay.moqt.constants import (
    DATAGRAM_TYPES,
    MAX_FULL_TRACK_NAME_LENGTH,
    MAX_GOAWAY_URI_LENGTH,
    MAX_KVP_VALUE_LENGTH,
    MAX_NAMESPACE_FIELDS,
    MAX_REASON_PHRASE_LENGTH,
    MAX_VARINT,
    SUBGROUP_HEADER_TYPES,
    FetchType,
    FilterType,
    GroupOrder,
    MessageParameter,
    MessageType,
    ObjectStatus,
    SessionErrorCode,
    SetupParameter,
    StreamType,
)
from relay.moqt.errors import MoqtError, ProtocolViolation
from relay.moqt.messages import Location

BASE = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])
FUZZ = settings(BASE, max_examples=200)
ROUNDTRIP = settings(BASE, max_examples=80)
PER_TYPE = settings(BASE, max_examples=15)

# Codes a malformed peer input may close the session with (section 3.4).
MALFORMED_INPUT_CODES = frozenset({SessionErrorCode.PROTOCOL_VIOLATION,
                                   SessionErrorCode.KEY_VALUE_FORMATTING_ERROR})
# Decoding a few KiB of garbage must stay far below this (nothing is preallocated).
ALLOCATION_BUDGET = 256 * 1024


# -- outcome checks --------------------------------------------------------------------------


def _check_close(exc: MoqtError) -> None:
    """A decoder's MoqtError is a well-formed session close for malformed input."""
    assert exc.error_code in MALFORMED_INPUT_CODES, (type(exc), exc.error_code, str(exc))
    assert exc.reason_phrase and str(exc) == exc.reason_phrase
    assert len(exc.reason_phrase.encode("utf-8")) <= MAX_REASON_PHRASE_LENGTH


def _outcome(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn's result, or the MoqtError it raised (checked). Any other exception propagates."""
    try:
        return fn(*args, **kwargs)
    except MoqtError as exc:
        _check_close(exc)
        return exc


def _error_key(exc: BaseException | None) -> tuple[type, str, int] | None:
    if exc is None:
        return None
    assert isinstance(exc, MoqtError)
    return type(exc), str(exc), exc.error_code


def _frame(message_type: int, payload: bytes) -> bytes:
    """`Type (i) | Length (16) | Payload` around any payload."""
    return encode_uint_var(message_type) + len(payload).to_bytes(2, "big") + payload


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given points (taken modulo len + 1; empty chunks included)."""
    points = sorted(c % (len(data) + 1) for c in cuts)
    chunks, previous = [], 0
    for point in points:
        chunks.append(data[previous:point])
        previous = point
    chunks.append(data[previous:])
    return chunks


CUTS = st.lists(st.integers(0, 1 << 16), max_size=12)

# -- field strategies ------------------------------------------------------------------------

# Every varint width (1, 2, 4, 8 bytes) and its edges.
VARINT = st.one_of(
    st.integers(0, 63), st.integers(64, 16383), st.integers(16384, (1 << 30) - 1),
    st.integers(1 << 30, MAX_VARINT),
    st.sampled_from([0, 63, 64, 16383, 16384, (1 << 30) - 1, 1 << 30, MAX_VARINT]))
UINT8 = st.integers(0, 255)
LOCATIONS = st.builds(Location, VARINT, VARINT)
# Reason phrases: ASCII, non-ASCII UTF-8, and exactly the 1024-byte limit.
REASONS = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(min_codepoint=0x80, exclude_categories=["Cs"]), max_size=256),
    st.just("\u20ac" * 341 + "x"))

_SINGLE_PARAMETERS = frozenset({SetupParameter.PATH, SetupParameter.MAX_REQUEST_ID,
                                SetupParameter.MAX_AUTH_TOKEN_CACHE_SIZE,
                                SetupParameter.AUTHORITY, SetupParameter.MOQT_IMPLEMENTATION,
                                MessageParameter.DELIVERY_TIMEOUT,
                                MessageParameter.MAX_CACHE_DURATION})
# Known types, unknown even and odd ones (moq-rs' 0x40b5a/0x40b5c among them), any varint.
KVP_TYPES = st.one_of(st.sampled_from([0x01, 0x02, 0x03, 0x04, 0x05, 0x07, 0x0B, 0x10, 0x21,
                                       0x3C, 0x3E, 0x3F, 0x40B5A, 0x40B5C]), VARINT)


@st.composite
def kvps(draw: st.DrawFn, max_value_size: int = 48) -> tuple[int, m.ParameterValue]:
    kind = draw(KVP_TYPES)
    if kind % 2 == 0:
        return kind, draw(VARINT)
    return kind, draw(st.binary(max_size=max_value_size))


def _first_of_single(pairs: list[tuple[int, m.ParameterValue]]) -> m.Parameters:
    # Known single-instance parameters may not repeat (9.2, 9.3.2); unknown ones may.
    seen: set[int] = set()
    kept = []
    for kind, value in pairs:
        if kind in _SINGLE_PARAMETERS:
            if kind in seen:
                continue
            seen.add(kind)
        kept.append((kind, value))
    return tuple(kept)


PARAMETERS = st.lists(kvps(), max_size=6).map(_first_of_single)


@st.composite
def namespaces(draw: st.DrawFn, *, min_fields: int = 1,
               budget: int = MAX_FULL_TRACK_NAME_LENGTH) -> m.TrackNamespace:
    """min_fields..32 fields within `budget` bytes; sometimes exactly at the budget."""
    count = draw(st.integers(min_fields, MAX_NAMESPACE_FIELDS))
    fields = []
    for _ in range(count):
        field = draw(st.binary(max_size=min(budget, 64)))
        budget -= len(field)
        fields.append(field)
    if fields and draw(st.booleans()):
        fields[-1] += b"\xff" * budget
    return tuple(fields)


@st.composite
def full_track_names(draw: st.DrawFn) -> tuple[m.TrackNamespace, bytes]:
    name = draw(st.binary(max_size=64))
    return draw(namespaces(budget=MAX_FULL_TRACK_NAME_LENGTH - len(name))), name


@st.composite
def filters(draw: st.DrawFn) -> dict[str, Any]:
    filter_type = draw(st.sampled_from(list(FilterType)))
    start = end = None
    if filter_type in (FilterType.ABSOLUTE_START, FilterType.ABSOLUTE_RANGE):
        start = draw(LOCATIONS)
    if filter_type == FilterType.ABSOLUTE_RANGE:
        end = draw(VARINT)
    return {"filter_type": filter_type, "start_location": start, "end_group": end}


REQUEST_ORDERS = st.sampled_from(list(GroupOrder))
RESPONSE_ORDERS = st.sampled_from([GroupOrder.ASCENDING, GroupOrder.DESCENDING])


@st.composite
def subscribes(draw: st.DrawFn, cls: type[m.Subscribe]) -> m.Subscribe:
    namespace, name = draw(full_track_names())
    return cls(draw(VARINT), namespace, name, draw(UINT8), draw(REQUEST_ORDERS),
               draw(st.booleans()), parameters=draw(PARAMETERS), **draw(filters()))


@st.composite
def subscribe_oks(draw: st.DrawFn, cls: type[m.SubscribeOk]) -> m.SubscribeOk:
    return cls(draw(VARINT), draw(VARINT), draw(VARINT), draw(RESPONSE_ORDERS),
               draw(st.none() | LOCATIONS), draw(PARAMETERS))


def request_errors(cls: type) -> st.SearchStrategy[Any]:
    return st.builds(cls, VARINT, VARINT, REASONS)


@st.composite
def publishes(draw: st.DrawFn) -> m.Publish:
    namespace, name = draw(full_track_names())
    return m.Publish(draw(VARINT), namespace, name, draw(VARINT), draw(RESPONSE_ORDERS),
                     draw(st.none() | LOCATIONS), draw(st.booleans()), draw(PARAMETERS))


@st.composite
def publish_oks(draw: st.DrawFn) -> m.PublishOk:
    return m.PublishOk(draw(VARINT), draw(st.booleans()), draw(UINT8), draw(RESPONSE_ORDERS),
                       parameters=draw(PARAMETERS), **draw(filters()))


@st.composite
def fetches(draw: st.DrawFn) -> m.Fetch:
    fetch_type = draw(st.sampled_from(list(FetchType)))
    standalone = joining = None
    if fetch_type == FetchType.STANDALONE:
        namespace, name = draw(full_track_names())
        standalone = m.StandaloneFetch(namespace, name, draw(LOCATIONS), draw(LOCATIONS))
    else:
        joining = m.JoiningFetch(draw(VARINT), draw(VARINT))
    return m.Fetch(draw(VARINT), draw(UINT8), draw(REQUEST_ORDERS), fetch_type, standalone,
                   joining, draw(PARAMETERS))


MESSAGE_STRATEGIES: dict[MessageType, st.SearchStrategy[m.Message]] = {
    MessageType.CLIENT_SETUP: st.builds(
        m.ClientSetup, st.lists(VARINT, max_size=6).map(tuple), PARAMETERS),
    MessageType.SERVER_SETUP: st.builds(m.ServerSetup, VARINT, PARAMETERS),
    MessageType.GOAWAY: st.builds(
        m.Goaway, st.binary(max_size=128) | st.just(b"u" * MAX_GOAWAY_URI_LENGTH)),
    MessageType.MAX_REQUEST_ID: st.builds(m.MaxRequestId, VARINT),
    MessageType.REQUESTS_BLOCKED: st.builds(m.RequestsBlocked, VARINT),
    MessageType.SUBSCRIBE: subscribes(m.Subscribe),
    MessageType.SUBSCRIBE_OK: subscribe_oks(m.SubscribeOk),
    MessageType.SUBSCRIBE_ERROR: request_errors(m.SubscribeError),
    MessageType.SUBSCRIBE_UPDATE: st.builds(
        m.SubscribeUpdate, VARINT, VARINT, LOCATIONS, VARINT, UINT8, st.booleans(), PARAMETERS),
    MessageType.UNSUBSCRIBE: st.builds(m.Unsubscribe, VARINT),
    MessageType.PUBLISH_DONE: st.builds(m.PublishDone, VARINT, VARINT, VARINT, REASONS),
    MessageType.PUBLISH: publishes(),
    MessageType.PUBLISH_OK: publish_oks(),
    MessageType.PUBLISH_ERROR: request_errors(m.PublishError),
    MessageType.FETCH: fetches(),
    MessageType.FETCH_OK: st.builds(
        m.FetchOk, VARINT, RESPONSE_ORDERS, st.booleans(), LOCATIONS, PARAMETERS),
    MessageType.FETCH_ERROR: request_errors(m.FetchError),
    MessageType.FETCH_CANCEL: st.builds(m.FetchCancel, VARINT),
    MessageType.TRACK_STATUS: subscribes(m.TrackStatus),
    MessageType.TRACK_STATUS_OK: subscribe_oks(m.TrackStatusOk),
    MessageType.TRACK_STATUS_ERROR: request_errors(m.TrackStatusError),
    MessageType.PUBLISH_NAMESPACE: st.builds(
        m.PublishNamespace, VARINT, namespaces(), PARAMETERS),
    MessageType.PUBLISH_NAMESPACE_OK: st.builds(m.PublishNamespaceOk, VARINT),
    MessageType.PUBLISH_NAMESPACE_ERROR: request_errors(m.PublishNamespaceError),
    MessageType.PUBLISH_NAMESPACE_DONE: st.builds(m.PublishNamespaceDone, namespaces()),
    MessageType.PUBLISH_NAMESPACE_CANCEL: st.builds(
        m.PublishNamespaceCancel, namespaces(), VARINT, REASONS),
    # Prefixes may be empty on these two (module docstring: moq-rs interop).
    MessageType.SUBSCRIBE_NAMESPACE: st.builds(
        m.SubscribeNamespace, VARINT, namespaces(min_fields=0), PARAMETERS),
    MessageType.SUBSCRIBE_NAMESPACE_OK: st.builds(m.SubscribeNamespaceOk, VARINT),
    MessageType.SUBSCRIBE_NAMESPACE_ERROR: request_errors(m.SubscribeNamespaceError),
    MessageType.UNSUBSCRIBE_NAMESPACE: st.builds(
        m.UnsubscribeNamespace, namespaces(min_fields=0)),
}
MESSAGES = st.one_of(*MESSAGE_STRATEGIES.values())


# Data plane.
@st.composite
def extension_blocks(draw: st.DrawFn, *, non_empty: bool = False) -> bytes:
    """A raw extension header block: well-formed KVPs, or opaque bytes (forwarded verbatim)."""
    if draw(st.booleans()):
        pairs = draw(st.lists(kvps(), min_size=1 if non_empty else 0, max_size=4))
        return d.encode_extension_headers(tuple(pairs))
    return draw(st.binary(min_size=1 if non_empty else 0, max_size=48))


PAYLOADS = st.binary(max_size=96)
STATUSES = st.sampled_from(list(ObjectStatus))
ANY_STATUS = STATUSES | st.integers(0, 8)


@st.composite
def payload_and_status(draw: st.DrawFn, extensions: bytes) -> tuple[bytes, int]:
    payload = draw(PAYLOADS)
    if payload:
        return payload, ObjectStatus.NORMAL
    statuses = list(ObjectStatus)
    if extensions:  # section 10.2.1.2: a missing object carries no extension headers
        statuses.remove(ObjectStatus.DOES_NOT_EXIST)
    return payload, draw(st.sampled_from(statuses))


@st.composite
def subgroup_headers(draw: st.DrawFn) -> d.SubgroupHeader:
    stream_type = draw(st.sampled_from(sorted(SUBGROUP_HEADER_TYPES)))
    mode = d.SubgroupIdMode(stream_type & (d.SubgroupIdMode.FIRST_OBJECT.value
                                           | d.SubgroupIdMode.PRESENT.value))
    subgroup_id = {d.SubgroupIdMode.ZERO: 0, d.SubgroupIdMode.FIRST_OBJECT: None}.get(mode)
    if mode == d.SubgroupIdMode.PRESENT:
        subgroup_id = draw(VARINT)
    return d.SubgroupHeader(stream_type, draw(VARINT), draw(VARINT), subgroup_id, draw(UINT8))


@st.composite
def subgroup_streams(draw: st.DrawFn) -> tuple[d.SubgroupHeader, list[d.SubgroupObject]]:
    header = draw(subgroup_headers())
    object_ids = sorted(draw(st.lists(VARINT, unique=True, max_size=5)))
    objects = []
    for object_id in object_ids:
        extensions = draw(extension_blocks()) if header.has_extensions else b""
        payload, status = draw(payload_and_status(extensions))
        objects.append(d.SubgroupObject(object_id, payload, extensions, status))
    return header, objects


@st.composite
def fetch_objects(draw: st.DrawFn) -> d.FetchObject:
    extensions = draw(extension_blocks())
    payload, status = draw(payload_and_status(extensions))
    return d.FetchObject(draw(VARINT), draw(VARINT), draw(VARINT), draw(UINT8), payload,
                         extensions, status)


FETCH_STREAMS = st.tuples(st.builds(d.FetchHeader, VARINT), st.lists(fetch_objects(), max_size=5))


@st.composite
def datagrams(draw: st.DrawFn) -> d.ObjectDatagram:
    t = draw(st.sampled_from(sorted(DATAGRAM_TYPES)))
    is_status = bool(t & 0x20)
    object_id = 0 if not is_status and t & 0x04 else draw(VARINT)
    extensions = draw(extension_blocks(non_empty=True)) if t & 0x01 else b""
    status, payload = ObjectStatus.NORMAL, b""
    if is_status:
        statuses = [s for s in ObjectStatus
                    if not (extensions and s == ObjectStatus.DOES_NOT_EXIST)]
        status = draw(st.sampled_from(statuses))
    else:
        payload = draw(PAYLOADS)
    return d.ObjectDatagram(t, draw(VARINT), draw(VARINT), object_id, draw(UINT8), extensions,
                            status, payload)


def _encode_subgroup(stream: tuple[d.SubgroupHeader, list[d.SubgroupObject]]) -> bytes:
    return d.encode_subgroup_stream(*stream)


def _encode_fetch(stream: tuple[d.FetchHeader, list[d.FetchObject]]) -> bytes:
    return d.encode_fetch_stream(*stream)


# -- garbage ---------------------------------------------------------------------------------

# Pieces that look like fields: varints of every width (huge lengths among them), single
# bytes, short runs of random bytes.
_PIECES = st.one_of(VARINT.map(encode_uint_var), st.binary(min_size=1, max_size=1),
                    st.binary(max_size=12))
GARBAGE = st.lists(_PIECES, max_size=16).map(b"".join)
RANDOM_BYTES = st.binary(max_size=200)


@st.composite
def control_frames(draw: st.DrawFn) -> bytes:
    """A known (or any) message type, a plausible or exact 16-bit length, a random payload."""
    message_type = draw(st.sampled_from(sorted(MessageType)) | VARINT)
    payload = draw(GARBAGE)
    length = draw(st.sampled_from([len(payload), len(payload) - 1, len(payload) + 1])
                  | st.integers(0, 0xFFFF))
    length = min(max(length, 0), 0xFFFF)
    return encode_uint_var(message_type) + length.to_bytes(2, "big") + payload


DATA_STREAM_TYPES = st.sampled_from([StreamType.FETCH_HEADER, *sorted(SUBGROUP_HEADER_TYPES)])
DATA_STREAMS_GARBAGE = st.tuples(DATA_STREAM_TYPES | VARINT, GARBAGE).map(
    lambda p: encode_uint_var(p[0]) + p[1])
DATAGRAMS_GARBAGE = st.tuples(st.sampled_from(sorted(DATAGRAM_TYPES)) | VARINT, GARBAGE).map(
    lambda p: encode_uint_var(p[0]) + p[1])


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[bytes]) -> bytes:
    """A valid encoding with one byte changed, removed or added, or cut short, or extended."""
    data = draw(valid)
    op = draw(st.sampled_from(["set", "flip", "delete", "insert", "truncate", "extend"]))
    if op == "extend" or not data:
        return data + draw(st.binary(min_size=1, max_size=16))
    i = draw(st.integers(0, len(data) - 1))
    if op == "set":
        return data[:i] + bytes([draw(UINT8)]) + data[i + 1:]
    if op == "flip":
        return data[:i] + bytes([data[i] ^ (1 << draw(st.integers(0, 7)))]) + data[i + 1:]
    if op == "delete":
        return data[:i] + data[i + 1:]
    if op == "insert":
        return data[:i] + bytes([draw(UINT8)]) + data[i:]
    return data[:i]


CONTROL_INPUTS = st.one_of(
    RANDOM_BYTES, control_frames(),
    st.lists(control_frames(), min_size=1, max_size=4).map(b"".join),
    mutated(MESSAGES.map(m.encode_message)),
    st.lists(MESSAGES, min_size=1, max_size=3).map(
        lambda msgs: b"".join(map(m.encode_message, msgs))).flatmap(lambda b: mutated(st.just(b))))
DATA_STREAM_INPUTS = st.one_of(
    RANDOM_BYTES, DATA_STREAMS_GARBAGE, mutated(subgroup_streams().map(_encode_subgroup)),
    mutated(FETCH_STREAMS.map(_encode_fetch)))
DATAGRAM_INPUTS = st.one_of(RANDOM_BYTES, DATAGRAMS_GARBAGE,
                            mutated(datagrams().map(d.encode_object_datagram)))
EXTENSION_INPUTS = st.one_of(RANDOM_BYTES, GARBAGE,
                             mutated(st.lists(kvps(), max_size=4).map(
                                 lambda p: d.encode_extension_headers(tuple(p)))))


# -- 1. robustness: control messages ---------------------------------------------------------


def _pull_all(data: bytes) -> tuple[list[m.Message], MoqtError | None, int]:
    """Reference for the reader: pull_message until the end; (messages, error, bytes held)."""
    buf = Buffer(data=data)
    messages: list[m.Message] = []
    while not buf.eof():
        start = buf.tell()
        try:
            messages.append(m.pull_message(buf))
        except MoqtError as exc:
            if str(exc) == "Control message is truncated":
                assert buf.tell() == start
                return messages, None, len(data) - start
            return messages, exc, 0
    return messages, None, 0


def _read_control(chunks: list[bytes]) -> tuple[list[m.Message], MoqtError | None, int]:
    reader = m.ControlStreamReader()
    messages: list[m.Message] = []
    try:
        for chunk in chunks:
            messages.extend(reader.feed(chunk))
    except MoqtError as exc:
        _check_close(exc)
        return messages, exc, 0
    return messages, None, reader.buffered


@FUZZ
@given(CONTROL_INPUTS)
@example(b"")
@example(bytes.fromhex("20 ffff"))  # CLIENT_SETUP declaring 65535 bytes, none present
@example(bytes.fromhex("20 0009 ffffffffffffffff 00"))  # 2^62-1 versions
@example(bytes.fromhex("10 0009 ffffffffffffffff"))  # GOAWAY URI of 2^62-1 bytes
@example(bytes.fromhex("05 000b 00 00 ffffffffffffffff ff"))  # reason of 2^62-1 bytes
@example(bytes.fromhex("03 0002 00 ff"))  # SUBSCRIBE: namespace count runs past the payload
@example(bytes.fromhex("05 0005 00 00 02 c3 28"))  # invalid UTF-8 in the reason phrase
@example(_frame(MessageType.PUBLISH_NAMESPACE,  # namespace of 4098 bytes
                b"\x00\x02" + 2 * (encode_uint_var(2049) + bytes(2049)) + b"\x00"))
@example(_frame(MessageType.SUBSCRIBE,  # namespace 4000 + track name 97 bytes
                b"\x00\x01" + encode_uint_var(4000) + bytes(4000) + encode_uint_var(97)
                + bytes(97) + bytes.fromhex("80 01 01 02 00")))
def test_decode_message_random_bytes(data: bytes) -> None:
    result = _outcome(m.decode_message, data)
    if not isinstance(result, MoqtError):
        assert m.encode_message(m.decode_message(m.encode_message(result))) == \
            m.encode_message(result)
    # From a Buffer: advances past one message, or stays put when it is incomplete.
    buf = Buffer(data=data)
    result = _outcome(m.decode_message, buf)
    if not isinstance(result, MoqtError):
        frame = Buffer(data=data)
        frame.pull_uint_var()
        assert buf.tell() == frame.pull_uint16() + frame.tell()
    elif str(result) == "Control message is truncated":
        assert buf.tell() == 0


def _check_control_stream(data: bytes, cuts: list[int]) -> None:
    """The reader, whole and in chunks, agrees with pull_message one message at a time."""
    expected, expected_error, expected_held = _pull_all(data)
    for chunks in (_split(data, cuts), [data]):
        messages, error, held = _read_control(chunks)
        assert _error_key(error) == _error_key(expected_error)
        if error is None:
            assert messages == expected
            assert held == expected_held
        else:  # messages of the chunk that failed are dropped with the session
            assert messages == expected[:len(messages)]


@FUZZ
@given(CONTROL_INPUTS, CUTS)
def test_control_stream_reader_random_chunking(data: bytes, cuts: list[int]) -> None:
    _check_control_stream(data, cuts)


def test_control_stream_reader_byte_by_byte_unknown_type() -> None:
    data = bytes.fromhex("15 0001 07" "4040 0000")  # MAX_REQUEST_ID 7, then type 0x40
    expected = ([m.MaxRequestId(7)], "Unknown control message type 0x40")
    messages, error, _ = _read_control([data[i:i + 1] for i in range(len(data))])
    assert (messages, str(error)) == expected
    reference, reference_error, _ = _pull_all(data)
    assert (reference, str(reference_error)) == expected


# -- 1. robustness: data streams, datagrams, extensions, layouts ------------------------------


def _read_data(chunks: list[bytes], fin: bool,
               reader_cls: type[d.DataStreamReader] = d.DataStreamReader,
               ) -> tuple[list[d.DataStreamEvent], MoqtError | None, int]:
    reader = reader_cls()
    events: list[d.DataStreamEvent] = []
    try:
        for i, chunk in enumerate(chunks):
            events.extend(reader.feed(chunk, fin=fin and i == len(chunks) - 1))
    except MoqtError as exc:
        _check_close(exc)
        return events, exc, 0
    for event in events:
        if isinstance(event, d.ObjectPayload):
            assert event.data  # never an empty chunk
    return events, None, reader.buffered


def _shape(events: list[d.DataStreamEvent]) -> tuple[list[Any], list[Any], Any]:
    """Chunking-independent view: stream header, complete objects, the object still arriving."""
    headers = [e for e in events if isinstance(e, (d.SubgroupHeader, d.FetchHeader))]
    objects = d.assemble_objects(events)
    partial: tuple[d.ObjectHeader, bytes] | None = None
    for event in events:
        if isinstance(event, d.ObjectHeader):
            partial = (event, b"") if event.payload_length else None
        elif isinstance(event, d.ObjectPayload):
            assert partial is not None
            partial = None if event.end else (partial[0], partial[1] + event.data)
    return headers, objects, partial


@FUZZ
@given(DATA_STREAM_INPUTS, CUTS, st.booleans())
@example(bytes.fromhex("15 00 00 80 00 ffffffffffffffff"), [], True)  # huge extensions length
@example(bytes.fromhex("15 00 00 80 00 00 ffffffffffffffff"), [], False)  # huge payload length
@example(bytes.fromhex("10 00 00 80 ffffffffffffffff 00 01 00 00 00"), [], True)  # ID 2^62
@example(bytes.fromhex("05 00 00 00 00 80 00 00 02"), [], True)  # status 0x2 is unassigned
def test_data_stream_reader_random_chunking(data: bytes, cuts: list[int], fin: bool) -> None:
    _check_data_stream(data, cuts, fin)


def _check_data_stream(data: bytes, cuts: list[int], fin: bool) -> None:
    """Whole and chunked, the reader fails the same way or yields the same objects."""
    whole, whole_error, whole_held = _read_data([data], fin)
    chunked, chunked_error, chunked_held = _read_data(_split(data, cuts), fin)
    assert _error_key(chunked_error) == _error_key(whole_error)
    if whole_error is None:
        assert _shape(chunked) == _shape(whole)
        assert chunked_held == whole_held
        if fin:
            assert whole_held == 0


@FUZZ
@given(DATAGRAM_INPUTS)
@example(bytes.fromhex("01 00 00 00 80 ffffffffffffffff"))  # extensions of 2^62-1 bytes
@example(bytes.fromhex("01 00 00 00 80 00"))  # Extensions Present with length 0
@example(bytes.fromhex("21 00 00 00 80 01 05 01"))  # DOES_NOT_EXIST with extensions
@example(bytes.fromhex("20 00 00 00 80 00 ff"))  # a byte after the status
def test_decode_object_datagram_random_bytes(data: bytes) -> None:
    result = _outcome(d.decode_object_datagram, data)
    if not isinstance(result, MoqtError):
        assert d.decode_object_datagram(d.encode_object_datagram(result)) == result


@FUZZ
@given(EXTENSION_INPUTS)
@example(bytes.fromhex("01 ffffffffffffffff"))
@example(bytes.fromhex("01 8001 0000") + bytes(4))  # odd value of 65536 bytes, 4 present
@example(bytes.fromhex("02"))  # even type, value missing
def test_parse_extension_headers_random_bytes(data: bytes) -> None:
    result = _outcome(d.parse_extension_headers, data)
    if not isinstance(result, MoqtError):
        for kind, value in result:
            assert isinstance(value, int if kind % 2 == 0 else bytes)
        assert d.parse_extension_headers(d.encode_extension_headers(result)) == result


def _varint_at(data: bytes, offset: int) -> tuple[int, int]:
    buf = Buffer(data=data)
    buf.seek(offset)
    value = buf.pull_uint_var()
    return value, buf.tell() - offset


@FUZZ
@given(st.one_of(DATA_STREAM_INPUTS, RANDOM_BYTES))
def test_subgroup_header_layout_random_bytes(data: bytes) -> None:
    # The reader parses the same header bytes: it finds a header iff the layout does.
    layout = _outcome(d.subgroup_header_layout, data)
    reader = d.SubgroupStreamReader()
    if isinstance(layout, MoqtError):
        with pytest.raises(ProtocolViolation):
            reader.feed(data)
        return
    if layout is None:
        assert reader.feed(data) == [] and reader.buffered == len(data)
        return
    [header] = reader.feed(data[:layout.length])
    assert reader.buffered == 0
    assert isinstance(header, d.SubgroupHeader)
    assert layout.type == header.stream_type
    assert _varint_at(data, layout.track_alias_offset) == (header.track_alias,
                                                          layout.track_alias_width)
    assert _varint_at(data, layout.group_id_offset) == (header.group_id, layout.group_id_width)
    if layout.subgroup_id_offset is not None:
        assert _varint_at(data, layout.subgroup_id_offset)[0] == header.subgroup_id
    assert data[layout.publisher_priority_offset] == header.publisher_priority
    assert layout.length == layout.publisher_priority_offset + 1 <= len(data)


@FUZZ
@given(st.one_of(DATAGRAM_INPUTS, RANDOM_BYTES))
def test_datagram_header_layout_random_bytes(data: bytes) -> None:
    layout = _outcome(d.datagram_header_layout, data)
    if layout is None or isinstance(layout, MoqtError):
        return
    assert layout.length == layout.publisher_priority_offset + 1 <= len(data)
    datagram = _outcome(d.decode_object_datagram, data)
    if isinstance(datagram, MoqtError):  # a later field is malformed
        return
    assert layout.type == datagram.datagram_type
    assert _varint_at(data, layout.track_alias_offset) == (datagram.track_alias,
                                                          layout.track_alias_width)
    assert _varint_at(data, layout.group_id_offset) == (datagram.group_id,
                                                        layout.group_id_width)
    if layout.object_id_offset is not None:
        assert _varint_at(data, layout.object_id_offset)[0] == datagram.object_id
    assert data[layout.publisher_priority_offset] == datagram.publisher_priority


@FUZZ
@given(st.one_of(DATA_STREAM_INPUTS, DATAGRAM_INPUTS), VARINT, st.booleans())
def test_rewrite_track_alias_random_bytes(data: bytes, alias: int, datagram: bool) -> None:
    # Documented caller errors: ValueError for an incomplete header or a wrong-width alias.
    try:
        result = _outcome(d.rewrite_track_alias, data, alias, datagram=datagram)
    except ValueError as exc:
        assert type(exc) is ValueError
        assert str(exc) == "Header is incomplete" or str(exc).startswith(f"Track alias {alias} ")
        return
    if not isinstance(result, MoqtError):
        layout = (d.datagram_header_layout if datagram else d.subgroup_header_layout)(data)
        start, end = layout.track_alias_offset, layout.track_alias_offset + layout.track_alias_width
        assert len(result) == len(data)
        assert result[:start] == data[:start] and result[end:] == data[end:]


_DECODERS: list[tuple[str, Callable[[bytes], Any]]] = [
    ("decode_message", m.decode_message),
    ("ControlStreamReader", lambda b: m.ControlStreamReader().feed(b)),
    ("DataStreamReader", lambda b: d.DataStreamReader().feed(b)),
    ("DataStreamReader+fin", lambda b: d.DataStreamReader().feed(b, fin=True)),
    ("decode_object_datagram", d.decode_object_datagram),
    ("parse_extension_headers", d.parse_extension_headers),
    ("subgroup_header_layout", d.subgroup_header_layout),
    ("datagram_header_layout", d.datagram_header_layout),
]


# One huge declared length per length-prefixed field: namespace field, track name, GOAWAY URI,
# reason phrase, odd Key-Value-Pair value, object extensions and payload, datagram extensions.
@settings(BASE, max_examples=100)
@given(st.one_of(CONTROL_INPUTS, DATA_STREAM_INPUTS, DATAGRAM_INPUTS, EXTENSION_INPUTS))
@example(bytes.fromhex("20 ffff") + bytes(100))
@example(bytes.fromhex("06 0066 00 01 bfffffff") + bytes(98))
@example(bytes.fromhex("03 0067 00 01 00 bfffffff") + bytes(98))
@example(bytes.fromhex("10 0064 bfffffff") + bytes(100))
@example(bytes.fromhex("05 0066 00 00 bfffffff") + bytes(100))
@example(bytes.fromhex("21 0067 00 01 01 bfffffff") + bytes(99))
@example(bytes.fromhex("15 00 00 80 00 bfffffff") + bytes(100))  # 1 GiB extensions declared
@example(bytes.fromhex("15 00 00 80 00 800fffff") + bytes(100))  # just under the 1 MiB limit
@example(bytes.fromhex("14 00 00 00 80 00 ffffffffffffffff") + bytes(100))  # 2^62-1 payload
@example(bytes.fromhex("01 00 00 00 80 ffffffffffffffff") + bytes(100))
@example(bytes.fromhex("01 ffffffffffffffff") + bytes(100))
def test_decoders_do_not_preallocate(data: bytes) -> None:
    for name, decode in _DECODERS:
        tracemalloc.start()
        try:
            _outcome(decode, data)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < ALLOCATION_BUDGET, (name, peak)


# -- 2. round trips: control messages ---------------------------------------------------------


def test_message_strategies_cover_every_type() -> None:
    assert set(MESSAGE_STRATEGIES) == set(MessageType) == set(m.MESSAGE_CODECS)


@pytest.mark.parametrize("message_type", sorted(MessageType), ids=lambda t: t.name)
@PER_TYPE
@given(data=st.data())
def test_encode_message_roundtrip(message_type: MessageType, data: st.DataObject) -> None:
    msg = data.draw(MESSAGE_STRATEGIES[message_type])
    assert msg.message_type == message_type
    encoded = m.encode_message(msg)
    decoded = m.decode_message(encoded)
    assert decoded == msg
    assert type(decoded) is type(msg)
    assert m.encode_message(msg) == encoded  # stable
    assert m.encode_message(decoded) == encoded
    cuts = data.draw(CUTS)
    assert _read_control(_split(encoded, cuts)) == ([msg], None, 0)
    # The same bytes with one mutation: closes or decodes, the same in any chunking.
    for bad in data.draw(st.lists(mutated(st.just(encoded)), min_size=3, max_size=3)):
        _outcome(m.decode_message, bad)
        _check_control_stream(bad, cuts)


@ROUNDTRIP
@given(st.lists(MESSAGES, min_size=1, max_size=5), CUTS)
def test_control_stream_reader_roundtrip(messages: list[m.Message], cuts: list[int]) -> None:
    stream = b"".join(m.encode_message(msg) for msg in messages)
    assert _read_control(_split(stream, cuts)) == (messages, None, 0)
    assert _read_control([stream[:-1]]) == (messages[:-1], None,
                                            len(m.encode_message(messages[-1])) - 1)


# -- 2. round trips: data plane ---------------------------------------------------------------


@ROUNDTRIP
@given(st.lists(kvps(), max_size=6).map(tuple))
@example(((0x21, b"x" * MAX_KVP_VALUE_LENGTH), (0x10, MAX_VARINT), (0x3F, b"")))
def test_extension_headers_roundtrip(pairs: m.Parameters) -> None:
    raw = d.encode_extension_headers(pairs)
    assert d.parse_extension_headers(raw) == pairs
    assert d.encode_extension_headers(d.parse_extension_headers(raw)) == raw


def _expected_subgroup_objects(header: d.SubgroupHeader, objects: list[d.SubgroupObject],
                               ) -> list[tuple[d.ObjectHeader, bytes]]:
    subgroup_id = header.subgroup_id
    if subgroup_id is None and objects:
        subgroup_id = objects[0].object_id
    return [(d.ObjectHeader(header.group_id, subgroup_id, o.object_id, header.publisher_priority,
                            len(o.payload), o.extensions, o.status), o.payload)
            for o in objects]


def test_subgroup_strategy_covers_every_type() -> None:
    assert len(SUBGROUP_HEADER_TYPES) == 12  # 0x10..0x1D without 0x16, 0x17, 0x1E, 0x1F


@ROUNDTRIP
@given(subgroup_streams(), CUTS, st.data())
def test_subgroup_stream_roundtrip(stream: tuple[d.SubgroupHeader, list[d.SubgroupObject]],
                                   cuts: list[int], draw: st.DataObject) -> None:
    header, objects = stream
    data = d.encode_subgroup_stream(header, objects)
    assert d.encode_subgroup_stream(header, objects) == data  # stable
    assert data.startswith(d.encode_subgroup_header(header))
    expected = _expected_subgroup_objects(header, objects)
    for reader_cls in (d.DataStreamReader, d.SubgroupStreamReader):
        for chunks in ([data], _split(data, cuts)):
            events, error, held = _read_data(chunks, True, reader_cls)
            assert error is None and held == 0
            assert events[0] == header
            assert d.assemble_objects(events) == expected
    with pytest.raises(ProtocolViolation, match="is not expected by FetchStreamReader"):
        d.FetchStreamReader().feed(data)
    _check_data_stream(draw.draw(mutated(st.just(data))), cuts, draw.draw(st.booleans()))


@ROUNDTRIP
@given(FETCH_STREAMS, CUTS, st.data())
def test_fetch_stream_roundtrip(stream: tuple[d.FetchHeader, list[d.FetchObject]],
                                cuts: list[int], draw: st.DataObject) -> None:
    header, objects = stream
    data = d.encode_fetch_stream(header, objects)
    assert d.encode_fetch_stream(header, objects) == data
    expected = [(d.ObjectHeader(o.group_id, o.subgroup_id, o.object_id, o.publisher_priority,
                                len(o.payload), o.extensions, o.status), o.payload)
                for o in objects]
    for reader_cls in (d.DataStreamReader, d.FetchStreamReader):
        for chunks in ([data], _split(data, cuts)):
            events, error, held = _read_data(chunks, True, reader_cls)
            assert error is None and held == 0
            assert events[0] == header
            assert d.assemble_objects(events) == expected
    with pytest.raises(ProtocolViolation, match="is not expected by SubgroupStreamReader"):
        d.SubgroupStreamReader().feed(data)
    _check_data_stream(draw.draw(mutated(st.just(data))), cuts, draw.draw(st.booleans()))


@ROUNDTRIP
@given(datagrams())
def test_object_datagram_roundtrip(datagram: d.ObjectDatagram) -> None:
    data = d.encode_object_datagram(datagram)
    assert d.decode_object_datagram(data) == datagram
    assert d.encode_object_datagram(datagram) == data
    assert d.encode_object_datagram(d.decode_object_datagram(data)) == data


def test_datagram_strategy_covers_every_type() -> None:
    assert sorted(DATAGRAM_TYPES) == [0, 1, 2, 3, 4, 5, 6, 7, 0x20, 0x21]


# Regressions: the constructors used to accept objects the decoders reject, so a publisher
# could send an object that makes every subscriber close the session (PROTOCOL_VIOLATION):
# status DOES_NOT_EXIST with extension headers (10.2.1.2) and unassigned status values.
@ROUNDTRIP
@given(VARINT, st.booleans(), st.booleans(), ANY_STATUS, PAYLOADS, extension_blocks())
@example(0, True, False, ObjectStatus.DOES_NOT_EXIST, b"", b"\x00")
@example(0, False, False, 0x2, b"", b"")
def test_subgroup_object_encoder_agrees_with_decoder(
        object_id: int, has_extensions: bool, end_of_group: bool, status: int, payload: bytes,
        extensions: bytes) -> None:
    # Any object the constructor and encoder accept, the decoder accepts and returns unchanged.
    header = d.SubgroupHeader.new(1, 2, 3, 0, extensions=has_extensions,
                                  end_of_group=end_of_group)
    try:
        obj = d.SubgroupObject(object_id, payload if status == ObjectStatus.NORMAL else b"",
                               extensions, status)
        data = d.encode_subgroup_stream(header, [obj])
    except ValueError:
        return
    events, error, _ = _read_data([data], True)
    assert error is None
    assert d.assemble_objects(events) == _expected_subgroup_objects(header, [obj])


@ROUNDTRIP
@given(VARINT, ANY_STATUS, PAYLOADS, extension_blocks())
@example(0, 0x2, b"", b"")
@example(0, ObjectStatus.DOES_NOT_EXIST, b"", b"\x00")
def test_fetch_object_encoder_agrees_with_decoder(object_id: int, status: int, payload: bytes,
                                                  extensions: bytes) -> None:
    try:
        obj = d.FetchObject(1, 2, object_id, 3,
                            payload if status == ObjectStatus.NORMAL else b"", extensions, status)
        data = d.encode_fetch_stream(d.FetchHeader(0), [obj])
    except ValueError:
        return
    events, error, _ = _read_data([data], True)
    assert error is None
    assert d.assemble_objects(events) == [(d.ObjectHeader(
        1, 2, object_id, 3, len(obj.payload), extensions, status), obj.payload)]


@ROUNDTRIP
@given(st.sampled_from(sorted(DATAGRAM_TYPES)), VARINT, ANY_STATUS, PAYLOADS,
       extension_blocks(non_empty=True))
@example(0x21, 0, ObjectStatus.DOES_NOT_EXIST, b"", b"\x00")
@example(0x20, 0, 0x2, b"", b"")
def test_object_datagram_encoder_agrees_with_decoder(t: int, object_id: int, status: int,
                                                     payload: bytes, extensions: bytes) -> None:
    is_status = bool(t & 0x20)
    try:
        datagram = d.ObjectDatagram(t, 1, 2, object_id, 3, extensions if t & 0x01 else b"",
                                    status if is_status else ObjectStatus.NORMAL,
                                    b"" if is_status else payload)
        data = d.encode_object_datagram(datagram)
    except ValueError:
        return
    assert _outcome(d.decode_object_datagram, data) == datagram


@pytest.mark.parametrize("make", [
    lambda status, ext: d.SubgroupObject(0, b"", ext, status),
    lambda status, ext: d.FetchObject(0, 0, 0, 0, b"", ext, status),
    lambda status, ext: d.ObjectDatagram(0x21 if ext else 0x20, 0, 0, 0, 0, ext, status),
], ids=["SubgroupObject", "FetchObject", "ObjectDatagram"])
def test_objects_refuse_what_decoders_reject(make: Callable[[int, bytes], Any]) -> None:
    with pytest.raises(ValueError, match="^Invalid object status 0x2$"):
        make(0x2, b"")
    with pytest.raises(ValueError,
                       match="^Object with status DOES_NOT_EXIST carries extension headers$"):
        make(ObjectStatus.DOES_NOT_EXIST, b"\x00")
    make(ObjectStatus.DOES_NOT_EXIST, b"")
    make(ObjectStatus.END_OF_TRACK, b"\x00")


# -- 3. rewrite_track_alias -------------------------------------------------------------------

_WIDTH_RANGES = {1: (0, 63), 2: (64, 16383), 4: (16384, (1 << 30) - 1), 8: (1 << 30, MAX_VARINT)}


@st.composite
def aliases_of_width(draw: st.DrawFn, width: int) -> int:
    return draw(st.integers(*_WIDTH_RANGES[width]))


@ROUNDTRIP
@given(st.one_of(subgroup_streams().map(lambda s: (_encode_subgroup(s), False)),
                 datagrams().map(lambda g: (d.encode_object_datagram(g), True))),
       st.data())
def test_rewrite_track_alias_keeps_other_bytes(case: tuple[bytes, bool],
                                               data: st.DataObject) -> None:
    encoded, is_datagram = case
    layout_of = d.datagram_header_layout if is_datagram else d.subgroup_header_layout
    layout = layout_of(encoded)
    assert layout is not None
    width = layout.track_alias_width
    start, end = layout.track_alias_offset, layout.track_alias_offset + width
    alias = data.draw(aliases_of_width(width), label="alias")
    out = d.rewrite_track_alias(encoded, alias, datagram=is_datagram)
    assert len(out) == len(encoded)
    assert out[:start] == encoded[:start] and out[end:] == encoded[end:]
    assert _varint_at(out, start) == (alias, width)
    assert layout_of(out) == layout
    if is_datagram:
        assert d.decode_object_datagram(out) == dataclasses.replace(
            d.decode_object_datagram(encoded), track_alias=alias)
    else:
        events = d.DataStreamReader().feed(out, fin=True)
        original = d.DataStreamReader().feed(encoded, fin=True)
        assert events[0] == dataclasses.replace(original[0], track_alias=alias)
        assert events[1:] == original[1:]
    # Just the header prefix works too (the fast path sees the first packet).
    assert d.rewrite_track_alias(encoded[:layout.length], alias, datagram=is_datagram) == \
        out[:layout.length]

    other = data.draw(st.sampled_from([w for w in _WIDTH_RANGES if w != width]), label="width")
    wrong = data.draw(aliases_of_width(other), label="wrong alias")
    with pytest.raises(ValueError) as info:
        d.rewrite_track_alias(encoded, wrong, datagram=is_datagram)
    assert str(info.value) == (f"Track alias {wrong} needs {other} bytes, the header has "
                               f"{width}")
    for cut in range(layout.length):
        with pytest.raises(ValueError, match="^Header is incomplete$"):
            d.rewrite_track_alias(encoded[:cut], alias, datagram=is_datagram)


# -- 4. robustness of a whole session: any peer bytes close it with a draft code, never raise ---

SESSION_INPUTS = st.one_of(
    st.binary(max_size=200),
    # A subgroup stream for the accepted alias (5), then anything.
    st.binary(max_size=200).map(lambda b: bytes.fromhex("11 05 00 80") + b),
    # A valid control message, then anything.
    st.sampled_from([m.encode_message(m.MaxRequestId(1000)),
                     m.encode_message(m.SubscribeNamespace(1, ())),
                     m.encode_message(m.Unsubscribe(0))]).flatmap(
        lambda head: st.binary(max_size=120).map(lambda b: head + b)),
)


def _subscribed_client() -> Any:
    """A client session set up with a subscription the server accepted with alias 5."""
    from relay.moqt.session import MoqtSession, SessionConfig, StreamWrite

    client = MoqtSession(SessionConfig(is_client=True))
    client.connection_made(0.0)
    client.transmits()
    client.stream_data_received(0, m.encode_message(m.ServerSetup(
        0xFF00000E, ((SetupParameter.MAX_REQUEST_ID, 100),))), False, 0.0)
    rid = client.subscribe((b"ns",), b"t")
    client.stream_data_received(0, m.encode_message(m.SubscribeOk(
        rid, 5, 0, GroupOrder.ASCENDING)), False, 0.0)
    assert not [t for t in client.transmits() if not isinstance(t, StreamWrite)]
    while client.next_event() is not None:
        pass
    return client


@FUZZ
@given(SESSION_INPUTS, st.sampled_from(["control", "uni", "datagram"]), st.booleans())
def test_session_random_peer_bytes_close_with_a_draft_code(data: bytes, where: str,
                                                           fin: bool) -> None:
    """Whatever the peer sends on the control stream, a data stream or as a datagram, the
    session never raises; if it closes, it is with one of the draft's session codes and not
    INTERNAL_ERROR (which the session uses when a handler raised: a bug)."""
    from relay.moqt.session import ConnectionClose, SessionState

    client = _subscribed_client()
    if where == "control":
        client.stream_data_received(0, data, fin, 1.0)
    elif where == "uni":
        client.stream_data_received(3, data, fin, 1.0)  # server-initiated uni stream 0
    else:
        client.datagram_received(data, 1.0)
    client.handle_timer(5.0)  # held data for unknown aliases expires here
    closes = [t for t in client.transmits() if isinstance(t, ConnectionClose)]
    if client.state == SessionState.CLOSED:
        (close,) = closes
        assert close.error_code in set(SessionErrorCode) - {SessionErrorCode.INTERNAL_ERROR}, \
            close
        assert client.stats.protocol_errors == {close.error_code: 1}
    else:
        assert closes == [] and client.stats.protocol_errors == {}
