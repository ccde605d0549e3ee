"""MoQT draft-14 data plane (section 10): subgroup and fetch streams, object datagrams.

Wire format only, no state beyond what one stream's parser needs.

- Writers are pure functions (`encode_subgroup_header`, `encode_subgroup_object`,
  `encode_fetch_object`, `encode_object_datagram`, ...) plus `SubgroupStreamWriter`, which only
  remembers the previous Object ID for the delta encoding.
- Readers (`DataStreamReader` and its `SubgroupStreamReader` / `FetchStreamReader` variants)
  take chunks as they arrive and return events: the stream header once, then per object an
  `ObjectHeader` followed by `ObjectPayload` chunks. Payloads are never buffered: each chunk
  is a slice of the bytes just fed, so a huge object streams through in bounded memory. Only an
  incomplete object header is held back (bounded by `max_extensions_length` plus a few
  varints). `assemble_objects` joins the chunks for callers that want whole objects.
- Extension headers stay raw bytes everywhere, so a relay forwards them verbatim;
  `parse_extension_headers` turns them into Key-Value-Pairs when someone needs to look.

In draft-14 subgroup objects carry an Object ID *delta* (section 10.4.2): the first object's
ID is the delta itself, each later one is previous + delta + 1. Fetch objects carry absolute
Group, Subgroup and Object IDs (section 10.4.4); datagrams carry an absolute Object ID or
none (then it is 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Iterable, Union

from aioquic.buffer import Buffer, BufferReadError, size_uint_var

from .constants import (
    DATAGRAM_END_OF_GROUP_BIT,
    DATAGRAM_EXTENSIONS_BIT,
    DATAGRAM_NO_OBJECT_ID_BIT,
    DATAGRAM_STATUS_BIT,
    DATAGRAM_TYPES,
    MAX_VARINT,
    SUBGROUP_END_OF_GROUP_BIT,
    SUBGROUP_EXTENSIONS_BIT,
    SUBGROUP_HEADER_TYPE_MIN,
    SUBGROUP_HEADER_TYPES,
    SUBGROUP_ID_FIRST_OBJECT_BIT,
    SUBGROUP_ID_PRESENT_BIT,
    ObjectStatus,
    StreamType,
)
from .errors import KeyValueFormattingError, ProtocolViolation
from .messages import Parameters, pull_key_value_pair, push_key_value_pair

# Implementation limit on one object's extension header block (the draft sets none); a larger
# block is refused with PROTOCOL_VIOLATION rather than buffered.
DEFAULT_MAX_EXTENSIONS_LENGTH = 1 << 20

_OBJECT_STATUSES = frozenset(int(s) for s in ObjectStatus)


# -- extension headers (sections 10.2.1.2 and 11) --------------------------------------------


def parse_extension_headers(raw: bytes) -> Parameters:
    """The Key-Value-Pairs of an extension header block, in wire order."""
    buf = Buffer(data=raw)
    pairs = []
    try:
        while not buf.eof():
            pairs.append(pull_key_value_pair(buf))
    except BufferReadError:
        raise KeyValueFormattingError("Extension headers are truncated") from None
    return tuple(pairs)


def encode_extension_headers(pairs: Parameters) -> bytes:
    """An extension header block (without its length) from Key-Value-Pairs."""
    buf = Buffer(capacity=sum(24 + (len(v) if isinstance(v, bytes) else 0) for _, v in pairs))
    for kind, value in pairs:
        push_key_value_pair(buf, kind, value)
    return buf.data


def _check_status(status: int) -> None:
    if status not in _OBJECT_STATUSES:
        raise ProtocolViolation(f"Invalid object status {status:#x}")


def _check_no_extensions_if_missing(status: int, extensions: bytes) -> None:
    # Section 10.2.1.2: an Object Does Not Exist object carries no extension headers.
    if status == ObjectStatus.DOES_NOT_EXIST and extensions:
        raise ProtocolViolation("Object with status DOES_NOT_EXIST carries extension headers")


def _check_object_fields(payload: bytes, status: int, extensions: bytes) -> None:
    # Refuse what the decoders (ours and the peer's) would close the session for.
    if status not in _OBJECT_STATUSES:
        raise ValueError(f"Invalid object status {status:#x}")
    if status != ObjectStatus.NORMAL and payload:
        raise ValueError(f"Object with status {status:#x} must have an empty payload")
    if status == ObjectStatus.DOES_NOT_EXIST and extensions:
        raise ValueError("Object with status DOES_NOT_EXIST carries extension headers")


# -- subgroup streams (section 10.4.2) -------------------------------------------------------


class SubgroupIdMode(Enum):
    """How a SUBGROUP_HEADER type conveys the Subgroup ID (table 7)."""

    ZERO = 0  # no field, Subgroup ID is 0
    FIRST_OBJECT = SUBGROUP_ID_FIRST_OBJECT_BIT  # no field, Subgroup ID is the first Object ID
    PRESENT = SUBGROUP_ID_PRESENT_BIT  # explicit Subgroup ID field


def subgroup_header_type(mode: SubgroupIdMode, *, extensions: bool = False,
                         end_of_group: bool = False) -> int:
    """The SUBGROUP_HEADER type (0x10..0x1D) for a combination of table 7's columns."""
    return (SUBGROUP_HEADER_TYPE_MIN | mode.value
            | (SUBGROUP_EXTENSIONS_BIT if extensions else 0)
            | (SUBGROUP_END_OF_GROUP_BIT if end_of_group else 0))


@dataclass(frozen=True)
class SubgroupHeader:
    stream_type: int
    """0x10..0x1D (not 0x16, 0x17); its bits say which fields follow (table 7)."""
    track_alias: int
    group_id: int
    subgroup_id: int | None
    """0 for ZERO types, the field for PRESENT types, None for FIRST_OBJECT types (the stream's
    first Object ID, which SubgroupStreamReader.subgroup_id reports once known)."""
    publisher_priority: int

    def __post_init__(self) -> None:
        if self.stream_type not in SUBGROUP_HEADER_TYPES:
            raise ValueError(f"{self.stream_type:#x} is not a SUBGROUP_HEADER type")
        mode = self.subgroup_id_mode
        if (mode == SubgroupIdMode.ZERO and self.subgroup_id != 0) or \
                (mode == SubgroupIdMode.FIRST_OBJECT and self.subgroup_id is not None) or \
                (mode == SubgroupIdMode.PRESENT and self.subgroup_id is None):
            raise ValueError(f"Subgroup ID {self.subgroup_id} does not fit stream type "
                             f"{self.stream_type:#x}")
        if not 0 <= self.publisher_priority <= 255:
            raise ValueError(f"Publisher priority {self.publisher_priority} is not 0..255")

    @classmethod
    def new(cls, track_alias: int, group_id: int, publisher_priority: int,
            subgroup_id: int | None = 0, *, extensions: bool = False, end_of_group: bool = False,
            explicit_subgroup_id: bool = False) -> SubgroupHeader:
        """The most compact header for these values: subgroup_id None = "first Object ID"."""
        if subgroup_id is None:
            mode = SubgroupIdMode.FIRST_OBJECT
        elif subgroup_id == 0 and not explicit_subgroup_id:
            mode = SubgroupIdMode.ZERO
        else:
            mode = SubgroupIdMode.PRESENT
        stream_type = subgroup_header_type(mode, extensions=extensions, end_of_group=end_of_group)
        return cls(stream_type, track_alias, group_id, subgroup_id, publisher_priority)

    @property
    def subgroup_id_mode(self) -> SubgroupIdMode:
        return SubgroupIdMode(self.stream_type
                              & (SUBGROUP_ID_FIRST_OBJECT_BIT | SUBGROUP_ID_PRESENT_BIT))

    @property
    def has_extensions(self) -> bool:
        """Every object on the stream carries Extension Headers Length."""
        return bool(self.stream_type & SUBGROUP_EXTENSIONS_BIT)

    @property
    def end_of_group(self) -> bool:
        """The last object before FIN is the last object of the group."""
        return bool(self.stream_type & SUBGROUP_END_OF_GROUP_BIT)


def _pull_subgroup_header_after_type(buf: Buffer, stream_type: int) -> SubgroupHeader:
    track_alias = buf.pull_uint_var()
    group_id = buf.pull_uint_var()
    mode = stream_type & (SUBGROUP_ID_FIRST_OBJECT_BIT | SUBGROUP_ID_PRESENT_BIT)
    if mode == SUBGROUP_ID_PRESENT_BIT:
        subgroup_id: int | None = buf.pull_uint_var()
    elif mode == SUBGROUP_ID_FIRST_OBJECT_BIT:
        subgroup_id = None
    else:
        subgroup_id = 0
    return SubgroupHeader(stream_type, track_alias, group_id, subgroup_id, buf.pull_uint8())


def pull_subgroup_header(buf: Buffer) -> SubgroupHeader:
    stream_type = buf.pull_uint_var()
    if stream_type not in SUBGROUP_HEADER_TYPES:
        raise ProtocolViolation(f"Unknown data stream type {stream_type:#x}")
    return _pull_subgroup_header_after_type(buf, stream_type)


def push_subgroup_header(buf: Buffer, header: SubgroupHeader) -> None:
    buf.push_uint_var(header.stream_type)
    buf.push_uint_var(header.track_alias)
    buf.push_uint_var(header.group_id)
    if header.subgroup_id_mode == SubgroupIdMode.PRESENT:
        assert header.subgroup_id is not None
        buf.push_uint_var(header.subgroup_id)
    buf.push_uint8(header.publisher_priority)


def encode_subgroup_header(header: SubgroupHeader) -> bytes:
    buf = Buffer(capacity=8 * 4 + 1)
    push_subgroup_header(buf, header)
    return buf.data


@dataclass(frozen=True)
class SubgroupObject:
    """One object to write on a subgroup stream (identity comes from the stream header)."""

    object_id: int
    payload: bytes = b""
    extensions: bytes = b""
    """Raw extension header block, forwarded verbatim."""
    status: int = ObjectStatus.NORMAL
    """Sent only when the payload is empty; non-NORMAL requires an empty payload."""

    def __post_init__(self) -> None:
        _check_object_fields(self.payload, self.status, self.extensions)


def encode_subgroup_object(obj: SubgroupObject, *, previous_object_id: int | None,
                           has_extensions: bool) -> bytes:
    """The object's fields as they follow the header (or the previous object) on the stream.

    `previous_object_id` is None for the stream's first object; `has_extensions` is the
    header's extensions bit.
    """
    if previous_object_id is None:
        delta = obj.object_id
    else:
        delta = obj.object_id - previous_object_id - 1
        if delta < 0:
            raise ValueError(f"Object ID {obj.object_id} does not follow {previous_object_id}")
    if obj.extensions and not has_extensions:
        raise ValueError("Object has extension headers but the stream type carries none")
    buf = Buffer(capacity=8 * 4 + len(obj.extensions) + len(obj.payload))
    buf.push_uint_var(delta)
    if has_extensions:
        buf.push_uint_var(len(obj.extensions))
        buf.push_bytes(obj.extensions)
    buf.push_uint_var(len(obj.payload))
    if obj.payload:
        buf.push_bytes(obj.payload)
    else:
        buf.push_uint_var(obj.status)
    return buf.data


class SubgroupStreamWriter:
    """Encodes one subgroup stream: the header, then objects with their Object ID deltas."""

    def __init__(self, header: SubgroupHeader) -> None:
        self.header = header
        self.previous_object_id: int | None = None

    def encode_header(self) -> bytes:
        return encode_subgroup_header(self.header)

    def encode_object(self, obj: SubgroupObject) -> bytes:
        data = encode_subgroup_object(obj, previous_object_id=self.previous_object_id,
                                      has_extensions=self.header.has_extensions)
        self.previous_object_id = obj.object_id
        return data


def encode_subgroup_stream(header: SubgroupHeader, objects: Iterable[SubgroupObject]) -> bytes:
    """A whole subgroup stream's bytes (up to the FIN)."""
    writer = SubgroupStreamWriter(header)
    return writer.encode_header() + b"".join(writer.encode_object(o) for o in objects)


# -- fetch streams (section 10.4.4) ----------------------------------------------------------


@dataclass(frozen=True)
class FetchHeader:
    request_id: int


def encode_fetch_header(header: FetchHeader) -> bytes:
    buf = Buffer(capacity=16)
    buf.push_uint_var(StreamType.FETCH_HEADER)
    buf.push_uint_var(header.request_id)
    return buf.data


@dataclass(frozen=True)
class FetchObject:
    group_id: int
    subgroup_id: int
    """For datagram-preference objects this is the Object ID (section 10.4.4)."""
    object_id: int
    publisher_priority: int
    payload: bytes = b""
    extensions: bytes = b""
    status: int = ObjectStatus.NORMAL

    def __post_init__(self) -> None:
        _check_object_fields(self.payload, self.status, self.extensions)


def encode_fetch_object(obj: FetchObject) -> bytes:
    buf = Buffer(capacity=8 * 6 + 1 + len(obj.extensions) + len(obj.payload))
    buf.push_uint_var(obj.group_id)
    buf.push_uint_var(obj.subgroup_id)
    buf.push_uint_var(obj.object_id)
    buf.push_uint8(obj.publisher_priority)
    buf.push_uint_var(len(obj.extensions))
    buf.push_bytes(obj.extensions)
    buf.push_uint_var(len(obj.payload))
    if obj.payload:
        buf.push_bytes(obj.payload)
    else:
        buf.push_uint_var(obj.status)
    return buf.data


def encode_fetch_stream(header: FetchHeader, objects: Iterable[FetchObject]) -> bytes:
    return encode_fetch_header(header) + b"".join(encode_fetch_object(o) for o in objects)


# -- incremental readers ---------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectHeader:
    """An object's metadata, complete; its payload follows as ObjectPayload chunks.

    On subgroup streams group, subgroup and priority come from the stream header.
    """

    group_id: int
    subgroup_id: int
    object_id: int
    publisher_priority: int
    payload_length: int
    """0 means no ObjectPayload event follows."""
    extensions: bytes = b""
    status: int = ObjectStatus.NORMAL


@dataclass(frozen=True)
class ObjectPayload:
    """A chunk of the current object's payload; `end` marks its last chunk."""

    data: bytes
    end: bool


DataStreamEvent = Union[SubgroupHeader, FetchHeader, ObjectHeader, ObjectPayload]


def assemble_objects(events: Iterable[DataStreamEvent]) -> list[tuple[ObjectHeader, bytes]]:
    """Whole objects from a reader's events (headers dropped, complete objects only)."""
    objects: list[tuple[ObjectHeader, bytes]] = []
    current: ObjectHeader | None = None
    chunks: list[bytes] = []
    for event in events:
        if isinstance(event, ObjectHeader):
            if event.payload_length == 0:
                objects.append((event, b""))
            else:
                current, chunks = event, []
        elif isinstance(event, ObjectPayload):
            chunks.append(event.data)
            if event.end:
                assert current is not None
                objects.append((current, b"".join(chunks)))
                current = None
    return objects


class DataStreamReader:
    """Parses one unidirectional data stream (SUBGROUP_HEADER or FETCH_HEADER) incrementally.

    `feed(data, fin)` returns the events the bytes completed. A stream whose FIN arrives before
    its header is complete or in the middle of an object is a PROTOCOL_VIOLATION (10.4).
    """

    _accepts_subgroup = True
    _accepts_fetch = True

    def __init__(self, *, max_extensions_length: int = DEFAULT_MAX_EXTENSIONS_LENGTH) -> None:
        self.max_extensions_length = max_extensions_length
        self.header: SubgroupHeader | FetchHeader | None = None
        self.finished = False
        self.subgroup_id: int | None = None
        """The subgroup's ID once known (after the first object for FIRST_OBJECT types)."""
        self._pending = b""
        self._payload_remaining = 0
        self._previous_object_id: int | None = None

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete header held back."""
        return len(self._pending)

    def feed(self, data: bytes, fin: bool = False) -> list[DataStreamEvent]:
        if self.finished:
            raise ValueError("Data stream already ended")
        if self._pending:
            data = self._pending + data
        events: list[DataStreamEvent] = []
        size = len(data)
        pos = 0
        buf: Buffer | None = None
        while pos < size:
            if self._payload_remaining:
                n = min(self._payload_remaining, size - pos)
                self._payload_remaining -= n
                events.append(ObjectPayload(data[pos:pos + n], self._payload_remaining == 0))
                pos += n
                continue
            if buf is None:
                buf = Buffer(data=data)
            buf.seek(pos)
            try:
                if self.header is None:
                    event: DataStreamEvent = self._pull_stream_header(buf)
                elif isinstance(self.header, SubgroupHeader):
                    event = self._pull_subgroup_object(buf, self.header)
                else:
                    event = self._pull_fetch_object(buf)
            except BufferReadError:
                break
            pos = buf.tell()
            events.append(event)
        self._pending = data[pos:]
        if fin:
            self.finished = True
            if self.header is None:
                raise ProtocolViolation("Data stream ended before its header was complete")
            if self._pending or self._payload_remaining:
                raise ProtocolViolation("Data stream ended in the middle of an object")
        return events

    def _pull_stream_header(self, buf: Buffer) -> SubgroupHeader | FetchHeader:
        stream_type = buf.pull_uint_var()
        header: SubgroupHeader | FetchHeader
        if stream_type in SUBGROUP_HEADER_TYPES and self._accepts_subgroup:
            header = _pull_subgroup_header_after_type(buf, stream_type)
            self.subgroup_id = header.subgroup_id
        elif stream_type == StreamType.FETCH_HEADER and self._accepts_fetch:
            header = FetchHeader(buf.pull_uint_var())
        elif stream_type in SUBGROUP_HEADER_TYPES or stream_type == StreamType.FETCH_HEADER:
            raise ProtocolViolation(
                f"Data stream type {stream_type:#x} is not expected by {type(self).__name__}")
        else:
            raise ProtocolViolation(f"Unknown data stream type {stream_type:#x}")
        self.header = header
        return header

    def _pull_extensions(self, buf: Buffer) -> bytes:
        length = buf.pull_uint_var()
        if length > self.max_extensions_length:
            raise ProtocolViolation(f"Extension headers length {length} exceeds the limit "
                                    f"{self.max_extensions_length}")
        return buf.pull_bytes(length)

    def _pull_payload_length_and_status(self, buf: Buffer) -> tuple[int, int]:
        length = buf.pull_uint_var()
        status = ObjectStatus.NORMAL
        if length == 0:
            status = buf.pull_uint_var()
            _check_status(status)
        return length, status

    def _pull_subgroup_object(self, buf: Buffer, header: SubgroupHeader) -> ObjectHeader:
        # Nothing is stored until the whole object header has been read (a short read retries).
        delta = buf.pull_uint_var()
        extensions = self._pull_extensions(buf) if header.has_extensions else b""
        length, status = self._pull_payload_length_and_status(buf)
        previous = self._previous_object_id
        object_id = delta if previous is None else previous + delta + 1
        if object_id > MAX_VARINT:
            raise ProtocolViolation(f"Object ID {object_id} exceeds 2^62-1")
        _check_no_extensions_if_missing(status, extensions)
        if previous is None and self.subgroup_id is None:
            self.subgroup_id = object_id
        self._previous_object_id = object_id
        self._payload_remaining = length
        assert self.subgroup_id is not None
        return ObjectHeader(header.group_id, self.subgroup_id, object_id,
                            header.publisher_priority, length, extensions, status)

    def _pull_fetch_object(self, buf: Buffer) -> ObjectHeader:
        group_id = buf.pull_uint_var()
        subgroup_id = buf.pull_uint_var()
        object_id = buf.pull_uint_var()
        priority = buf.pull_uint8()
        extensions = self._pull_extensions(buf)
        length, status = self._pull_payload_length_and_status(buf)
        _check_no_extensions_if_missing(status, extensions)
        self._payload_remaining = length
        return ObjectHeader(group_id, subgroup_id, object_id, priority, length, extensions,
                            status)


class SubgroupStreamReader(DataStreamReader):
    """A DataStreamReader that accepts only SUBGROUP_HEADER streams."""

    _accepts_fetch = False


class FetchStreamReader(DataStreamReader):
    """A DataStreamReader that accepts only FETCH_HEADER streams."""

    _accepts_subgroup = False


# -- object datagrams (section 10.3.1) -------------------------------------------------------


@dataclass(frozen=True)
class ObjectDatagram:
    datagram_type: int
    """0x00..0x07 (payload) or 0x20..0x21 (status); its bits say which fields are present."""
    track_alias: int
    group_id: int
    object_id: int
    publisher_priority: int
    extensions: bytes = b""
    """Raw extension header block; non-empty exactly when the type's extensions bit is set."""
    status: int = ObjectStatus.NORMAL
    """Carried only by status types (0x20/0x21); payload types are NORMAL."""
    payload: bytes = b""

    def __post_init__(self) -> None:
        t = self.datagram_type
        if t not in DATAGRAM_TYPES:
            raise ValueError(f"{t:#x} is not an OBJECT_DATAGRAM type")
        if bool(t & DATAGRAM_EXTENSIONS_BIT) != bool(self.extensions):
            raise ValueError(f"Datagram type {t:#x} with extensions={self.extensions!r}")
        if not t & DATAGRAM_STATUS_BIT and t & DATAGRAM_NO_OBJECT_ID_BIT and self.object_id:
            raise ValueError(f"Datagram type {t:#x} implies Object ID 0")
        if t & DATAGRAM_STATUS_BIT and self.payload:
            raise ValueError(f"Status datagram type {t:#x} carries no payload")
        if not t & DATAGRAM_STATUS_BIT and self.status != ObjectStatus.NORMAL:
            raise ValueError(f"Payload datagram type {t:#x} carries no status")
        _check_object_fields(self.payload, self.status, self.extensions)

    @classmethod
    def new(cls, track_alias: int, group_id: int, object_id: int, publisher_priority: int,
            payload: bytes = b"", *, extensions: bytes = b"", status: int | None = None,
            end_of_group: bool = False) -> ObjectDatagram:
        """The most compact datagram for these values; a status makes it a status datagram."""
        if status is not None:
            if end_of_group:
                raise ValueError("Status datagrams have no end-of-group flag")
            t = DATAGRAM_STATUS_BIT
        else:
            t = ((DATAGRAM_END_OF_GROUP_BIT if end_of_group else 0)
                 | (DATAGRAM_NO_OBJECT_ID_BIT if object_id == 0 else 0))
        t |= DATAGRAM_EXTENSIONS_BIT if extensions else 0
        return cls(t, track_alias, group_id, object_id, publisher_priority, extensions,
                   ObjectStatus.NORMAL if status is None else status, payload)

    @property
    def is_status(self) -> bool:
        return bool(self.datagram_type & DATAGRAM_STATUS_BIT)

    @property
    def end_of_group(self) -> bool:
        return not self.is_status and bool(self.datagram_type & DATAGRAM_END_OF_GROUP_BIT)

    @property
    def has_extensions(self) -> bool:
        return bool(self.datagram_type & DATAGRAM_EXTENSIONS_BIT)


def _has_object_id(datagram_type: int) -> bool:
    return bool(datagram_type & DATAGRAM_STATUS_BIT) or \
        not datagram_type & DATAGRAM_NO_OBJECT_ID_BIT


def decode_object_datagram(data: bytes) -> ObjectDatagram:
    """One QUIC DATAGRAM's OBJECT_DATAGRAM; the payload runs to the end of the datagram."""
    buf = Buffer(data=data)
    try:
        t = buf.pull_uint_var()
        if t not in DATAGRAM_TYPES:
            raise ProtocolViolation(f"Unknown datagram type {t:#x}")
        track_alias = buf.pull_uint_var()
        group_id = buf.pull_uint_var()
        object_id = buf.pull_uint_var() if _has_object_id(t) else 0
        priority = buf.pull_uint8()
        extensions = b""
        if t & DATAGRAM_EXTENSIONS_BIT:
            length = buf.pull_uint_var()
            if length == 0:
                raise ProtocolViolation(
                    "Object datagram has Extensions Present with Extension Headers Length 0")
            extensions = buf.pull_bytes(length)
        status = ObjectStatus.NORMAL
        if t & DATAGRAM_STATUS_BIT:
            status = buf.pull_uint_var()
    except BufferReadError:
        raise ProtocolViolation("Object datagram is truncated") from None
    if t & DATAGRAM_STATUS_BIT:
        _check_status(status)
        _check_no_extensions_if_missing(status, extensions)
        if not buf.eof():
            raise ProtocolViolation(
                f"Object status datagram has {len(data) - buf.tell()} bytes after its status")
        payload = b""
    else:
        payload = data[buf.tell():]
    return ObjectDatagram(t, track_alias, group_id, object_id, priority, extensions, status,
                          payload)


def encode_object_datagram(datagram: ObjectDatagram) -> bytes:
    t = datagram.datagram_type
    buf = Buffer(capacity=8 * 5 + 1 + len(datagram.extensions) + len(datagram.payload))
    buf.push_uint_var(t)
    buf.push_uint_var(datagram.track_alias)
    buf.push_uint_var(datagram.group_id)
    if _has_object_id(t):
        buf.push_uint_var(datagram.object_id)
    buf.push_uint8(datagram.publisher_priority)
    if datagram.extensions:
        buf.push_uint_var(len(datagram.extensions))
        buf.push_bytes(datagram.extensions)
    if t & DATAGRAM_STATUS_BIT:
        buf.push_uint_var(datagram.status)
    else:
        buf.push_bytes(datagram.payload)
    return buf.data


# -- byte layout for the kernel fast path ----------------------------------------------------


@dataclass(frozen=True)
class HeaderLayout:
    """Where the fields of a subgroup stream header or object datagram header sit.

    Offsets are from the first byte of the stream (or datagram); widths are varint sizes in
    bytes. The fast path rewrites the track alias in place with another alias of the same
    width (`rewrite_track_alias`), and reads the publisher priority byte.
    """

    type: int
    track_alias_offset: int
    track_alias_width: int
    group_id_offset: int
    group_id_width: int
    publisher_priority_offset: int
    length: int
    """Header bytes up to and including the publisher priority."""
    subgroup_id_offset: int | None = None
    """Subgroup streams with an explicit Subgroup ID only."""
    object_id_offset: int | None = None
    """Datagrams with an Object ID field only."""


def _varint_span(buf: Buffer) -> tuple[int, int]:
    start = buf.tell()
    buf.pull_uint_var()
    return start, buf.tell() - start


def subgroup_header_layout(data: bytes) -> HeaderLayout | None:
    """The layout of the SUBGROUP_HEADER at the start of `data`; None if it is incomplete."""
    buf = Buffer(data=data)
    try:
        stream_type = buf.pull_uint_var()
        if stream_type not in SUBGROUP_HEADER_TYPES:
            raise ProtocolViolation(f"Unknown data stream type {stream_type:#x}")
        alias_offset, alias_width = _varint_span(buf)
        group_offset, group_width = _varint_span(buf)
        subgroup_offset = None
        if stream_type & SUBGROUP_ID_PRESENT_BIT:
            subgroup_offset, _ = _varint_span(buf)
        priority_offset = buf.tell()
        buf.pull_uint8()
    except BufferReadError:
        return None
    return HeaderLayout(stream_type, alias_offset, alias_width, group_offset, group_width,
                        priority_offset, buf.tell(), subgroup_id_offset=subgroup_offset)


def datagram_header_layout(data: bytes) -> HeaderLayout | None:
    """The layout of the OBJECT_DATAGRAM header at the start of `data`; None if incomplete."""
    buf = Buffer(data=data)
    try:
        t = buf.pull_uint_var()
        if t not in DATAGRAM_TYPES:
            raise ProtocolViolation(f"Unknown datagram type {t:#x}")
        alias_offset, alias_width = _varint_span(buf)
        group_offset, group_width = _varint_span(buf)
        object_offset = None
        if _has_object_id(t):
            object_offset, _ = _varint_span(buf)
        priority_offset = buf.tell()
        buf.pull_uint8()
    except BufferReadError:
        return None
    return HeaderLayout(t, alias_offset, alias_width, group_offset, group_width,
                        priority_offset, buf.tell(), object_id_offset=object_offset)


def rewrite_track_alias(data: bytes, track_alias: int, *, datagram: bool = False) -> bytes:
    """A copy of a subgroup stream prefix (or datagram) with the track alias replaced in place.

    The new alias must have the same varint width as the old one, so no later offset moves.
    """
    layout = datagram_header_layout(data) if datagram else subgroup_header_layout(data)
    if layout is None:
        raise ValueError("Header is incomplete")
    if size_uint_var(track_alias) != layout.track_alias_width:
        raise ValueError(f"Track alias {track_alias} needs {size_uint_var(track_alias)} bytes, "
                         f"the header has {layout.track_alias_width}")
    buf = Buffer(capacity=layout.track_alias_width)
    buf.push_uint_var(track_alias)
    start = layout.track_alias_offset
    return data[:start] + buf.data + data[start + layout.track_alias_width:]
