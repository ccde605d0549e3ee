"""MoQT draft-14 data plane: subgroup/fetch streams, datagrams, readers, fast-path layout."""

from __future__ import annotations

import random

import pytest

from relay.moqt import data as d
from relay.moqt.constants import (
    SUBGROUP_HEADER_TYPES,
    ExtensionHeaderType,
    ObjectStatus,
    SessionErrorCode,
)
from relay.moqt.errors import KeyValueFormattingError, ProtocolViolation

# draft-14 section 10.5, first example: SUBGROUP_HEADER {Type 0x14, Track Alias 2, Group 0,
# Subgroup 0, Publisher Priority 0}, objects 0 "abcd" and 1 "efgh" (Object ID deltas 0, 0).
EXAMPLE_1_HEX = "14 02 00 00 00" "00 04 61626364" "00 04 65666768"
# Section 10.5, second example: type 0x15 (extensions), first object carries two extension
# headers: {Type 4 (even), Value 2186796243 (8-byte varint)} and {Type 77 (odd, 2-byte varint
# 0x404d), Length 21, Value}: 9 + 24 = 33 bytes, as the draft's Extension Headers Length says.
# (The draft shows a 14-character value next to Length 21; we use a 21-byte one so the lengths
# agree.) The second object has Extension Headers Length 0.
TRACE = b"traceID:1234567890123"
EXAMPLE_2_EXTENSIONS_HEX = "04 c00000008257dcd3" "404d 15" + TRACE.hex()
EXAMPLE_2_HEX = ("15 02 00 00 00" "00 21" + EXAMPLE_2_EXTENSIONS_HEX + "04 61626364"
                 "00 00 04 65666768")


def _fin(data: bytes, reader: d.DataStreamReader | None = None) -> list[d.DataStreamEvent]:
    return (reader or d.DataStreamReader()).feed(data, fin=True)


def _violation(data: bytes, message: str, reader: d.DataStreamReader | None = None) -> None:
    with pytest.raises(ProtocolViolation) as info:
        _fin(data, reader)
    assert str(info.value) == message
    assert info.value.error_code == SessionErrorCode.PROTOCOL_VIOLATION


def test_draft_example_1() -> None:
    data = bytes.fromhex(EXAMPLE_1_HEX)
    header = d.SubgroupHeader.new(2, 0, 0, 0, explicit_subgroup_id=True)
    objects = [d.SubgroupObject(0, b"abcd"), d.SubgroupObject(1, b"efgh")]
    assert d.encode_subgroup_stream(header, objects) == data
    events = _fin(data)
    assert events[0] == header
    assert d.assemble_objects(events) == [
        (d.ObjectHeader(0, 0, 0, 0, 4), b"abcd"), (d.ObjectHeader(0, 0, 1, 0, 4), b"efgh")]


def test_draft_example_2_extensions() -> None:
    data = bytes.fromhex(EXAMPLE_2_HEX)
    extensions = bytes.fromhex(EXAMPLE_2_EXTENSIONS_HEX)
    assert len(extensions) == 33
    header = d.SubgroupHeader.new(2, 0, 0, 0, extensions=True, explicit_subgroup_id=True)
    assert header.stream_type == 0x15
    objects = [d.SubgroupObject(0, b"abcd", extensions), d.SubgroupObject(1, b"efgh")]
    assert d.encode_subgroup_stream(header, objects) == data
    got = d.assemble_objects(_fin(data))
    assert got[0][0].extensions == extensions  # verbatim
    assert d.parse_extension_headers(got[0][0].extensions) == ((4, 2186796243), (77, TRACE))
    assert got[1] == (d.ObjectHeader(0, 0, 1, 0, 4), b"efgh")


def test_extension_headers_encode_parse() -> None:
    pairs = ((0x10, 1_700_000_000_000_000), (ExtensionHeaderType.IMMUTABLE_EXTENSIONS,
                                             bytes.fromhex("3c02")), (0x3F, b""))
    raw = d.encode_extension_headers(pairs)
    assert d.parse_extension_headers(raw) == pairs
    assert d.parse_extension_headers(b"") == ()


def test_extension_headers_malformed() -> None:
    with pytest.raises(KeyValueFormattingError) as info:
        d.parse_extension_headers(bytes.fromhex("05 03 6162"))
    assert str(info.value) == "Extension headers are truncated"
    assert info.value.error_code == SessionErrorCode.KEY_VALUE_FORMATTING_ERROR == 0x6
    with pytest.raises(ProtocolViolation, match="^Key-Value-Pair type 0x5 length 65536 exceeds"):
        d.parse_extension_headers(bytes.fromhex("05 80010000"))


def test_subgroup_header_types_table_7() -> None:
    assert sorted(SUBGROUP_HEADER_TYPES) == [0x10, 0x11, 0x12, 0x13, 0x14, 0x15,
                                             0x18, 0x19, 0x1A, 0x1B, 0x1C, 0x1D]
    table = {  # type: (subgroup id mode, extensions, end of group)
        0x10: (d.SubgroupIdMode.ZERO, False, False), 0x11: (d.SubgroupIdMode.ZERO, True, False),
        0x12: (d.SubgroupIdMode.FIRST_OBJECT, False, False),
        0x13: (d.SubgroupIdMode.FIRST_OBJECT, True, False),
        0x14: (d.SubgroupIdMode.PRESENT, False, False),
        0x15: (d.SubgroupIdMode.PRESENT, True, False),
        0x18: (d.SubgroupIdMode.ZERO, False, True), 0x19: (d.SubgroupIdMode.ZERO, True, True),
        0x1A: (d.SubgroupIdMode.FIRST_OBJECT, False, True),
        0x1B: (d.SubgroupIdMode.FIRST_OBJECT, True, True),
        0x1C: (d.SubgroupIdMode.PRESENT, False, True),
        0x1D: (d.SubgroupIdMode.PRESENT, True, True),
    }
    for stream_type, (mode, ext, eog) in table.items():
        assert d.subgroup_header_type(mode, extensions=ext, end_of_group=eog) == stream_type
        subgroup_id = {d.SubgroupIdMode.ZERO: 0, d.SubgroupIdMode.FIRST_OBJECT: None,
                       d.SubgroupIdMode.PRESENT: 7}[mode]
        header = d.SubgroupHeader(stream_type, 1, 2, subgroup_id, 3)
        assert (header.subgroup_id_mode, header.has_extensions, header.end_of_group) == \
            (mode, ext, eog)


def _objects(extensions: bool) -> list[d.SubgroupObject]:
    ext = d.encode_extension_headers(((0x10, 123456),)) if extensions else b""
    return [
        d.SubgroupObject(3, b"first", ext),
        d.SubgroupObject(4, b""),  # zero-length normal object: explicit status 0
        d.SubgroupObject(9, b"x" * 3000),  # delta 4: a gap
        d.SubgroupObject(10, b"", status=ObjectStatus.END_OF_GROUP),
    ]


@pytest.mark.parametrize("stream_type", sorted(SUBGROUP_HEADER_TYPES), ids=hex)
def test_subgroup_stream_roundtrip_every_type(stream_type: int) -> None:
    mode = d.SubgroupIdMode(stream_type & 0x06)
    subgroup_id = {d.SubgroupIdMode.ZERO: 0, d.SubgroupIdMode.FIRST_OBJECT: None,
                   d.SubgroupIdMode.PRESENT: 5}[mode]
    header = d.SubgroupHeader(stream_type, 300, 2**33, subgroup_id, 128)
    objects = _objects(header.has_extensions)
    data = d.encode_subgroup_stream(header, objects)
    reader = d.SubgroupStreamReader()
    events = _fin(data, reader)
    assert events[0] == header
    assert d.encode_subgroup_header(events[0]) == data[:len(d.encode_subgroup_header(header))]
    expected_subgroup = 3 if subgroup_id is None else subgroup_id  # first Object ID is 3
    assert reader.subgroup_id == expected_subgroup
    assert d.assemble_objects(events) == [
        (d.ObjectHeader(2**33, expected_subgroup, o.object_id, 128, len(o.payload), o.extensions,
                        o.status), o.payload) for o in objects]
    # Re-encoding what was read gives the same bytes.
    again = d.encode_subgroup_stream(events[0], [
        d.SubgroupObject(h.object_id, p, h.extensions, h.status)
        for h, p in d.assemble_objects(events)])
    assert again == data


def _feed_chunks(reader: d.DataStreamReader, data: bytes,
                 sizes: list[int]) -> list[d.DataStreamEvent]:
    events: list[d.DataStreamEvent] = []
    pos = 0
    for size in sizes:
        events.extend(reader.feed(data[pos:pos + size]))
        pos += size
    events.extend(reader.feed(data[pos:], fin=True))
    return events


def _random_sizes(rng: random.Random, total: int, largest: int) -> list[int]:
    sizes = []
    while sum(sizes) < total:
        sizes.append(rng.randint(0, largest))
    return sizes


SUBGROUP_STREAM = d.encode_subgroup_stream(
    d.SubgroupHeader.new(5, 7, 1, None, extensions=True, end_of_group=True), _objects(True))


def test_subgroup_reader_byte_by_byte() -> None:
    expected = _fin(SUBGROUP_STREAM)
    events = _feed_chunks(d.DataStreamReader(), SUBGROUP_STREAM, [1] * len(SUBGROUP_STREAM))
    assert d.assemble_objects(events) == d.assemble_objects(expected)
    assert [e for e in events if not isinstance(e, d.ObjectPayload)] == \
        [e for e in expected if not isinstance(e, d.ObjectPayload)]


@pytest.mark.parametrize("seed", range(20))
def test_subgroup_reader_random_chunks(seed: int) -> None:
    rng = random.Random(seed)
    expected = d.assemble_objects(_fin(SUBGROUP_STREAM))
    sizes = _random_sizes(rng, len(SUBGROUP_STREAM), 700)
    events = _feed_chunks(d.DataStreamReader(), SUBGROUP_STREAM, sizes)
    assert d.assemble_objects(events) == expected
    # Payload is streamed, never buffered: the reader only ever holds back header bytes.
    assert all(len(e.data) <= max(sizes) for e in events if isinstance(e, d.ObjectPayload))


def test_subgroup_reader_streams_large_payload_in_chunks() -> None:
    header = d.SubgroupHeader.new(1, 0, 0)
    payload = bytes(range(256)) * 4096  # 1 MiB
    data = d.encode_subgroup_stream(header, [d.SubgroupObject(0, payload)])
    reader = d.DataStreamReader()
    events = reader.feed(data[:10])
    assert events[1] == d.ObjectHeader(0, 0, 0, 0, len(payload))
    assert reader.buffered == 0
    chunks = [e for e in events if isinstance(e, d.ObjectPayload)]
    for pos in range(10, len(data), 65536):
        chunks += reader.feed(data[pos:pos + 65536])
        assert reader.buffered == 0
    reader.feed(b"", fin=True)
    assert b"".join(c.data for c in chunks) == payload
    assert [c.end for c in chunks] == [False] * (len(chunks) - 1) + [True]


def test_end_of_track_stream_like_moq_rs() -> None:
    # moq-rs ends a track with a type 0x18 group stream holding one zero-length END_OF_TRACK.
    data = bytes.fromhex("18 01 05 80" "00 00 04")
    events = _fin(data)
    assert events == [d.SubgroupHeader(0x18, 1, 5, 0, 128),
                      d.ObjectHeader(5, 0, 0, 128, 0, b"", ObjectStatus.END_OF_TRACK)]


def test_fetch_stream_roundtrip_and_chunks() -> None:
    header = d.FetchHeader(12)
    objects = [
        d.FetchObject(0, 0, 0, 128, b"key", d.encode_extension_headers(((0x10, 5),))),
        d.FetchObject(0, 0, 1, 128, b"delta"),
        d.FetchObject(1, 2, 7, 3, b"", status=ObjectStatus.END_OF_GROUP),
        d.FetchObject(2, 0, 0, 0, b"z" * 5000),
    ]
    data = d.encode_fetch_stream(header, objects)
    assert data[:2] == bytes.fromhex("05 0c")  # FETCH_HEADER {0x05, Request ID 12}
    events = _fin(data, d.FetchStreamReader())
    assert events[0] == header
    expected = [(d.ObjectHeader(o.group_id, o.subgroup_id, o.object_id, o.publisher_priority,
                                len(o.payload), o.extensions, o.status), o.payload)
                for o in objects]
    assert d.assemble_objects(events) == expected
    rng = random.Random(7)
    for _ in range(10):
        events = _feed_chunks(d.DataStreamReader(), data, _random_sizes(rng, len(data), 300))
        assert d.assemble_objects(events) == expected


# Section 10.4.4, hand-built: FETCH_HEADER {0x05, req 2}, object {group 1, subgroup 0,
# object 4, priority 0x80, ext length 0, payload length 2, "hi"}.
FETCH_HEX = "05 02" "01 00 04 80 00 02 6869"


def test_fetch_vector() -> None:
    data = bytes.fromhex(FETCH_HEX)
    assert d.encode_fetch_stream(d.FetchHeader(2), [d.FetchObject(1, 0, 4, 0x80, b"hi")]) == data
    assert d.assemble_objects(_fin(data)) == [(d.ObjectHeader(1, 0, 4, 0x80, 2), b"hi")]


# -- malformed streams -----------------------------------------------------------------------


def test_unknown_stream_types() -> None:
    for stream_type in ("16", "17", "1e", "1f", "00", "04", "06", "20"):
        _violation(bytes.fromhex(stream_type + "01 01 00"),
                   f"Unknown data stream type {int(stream_type, 16):#x}")


def test_reader_kind_restriction() -> None:
    _violation(bytes.fromhex("05 01"),
               "Data stream type 0x5 is not expected by SubgroupStreamReader",
               d.SubgroupStreamReader())
    _violation(bytes.fromhex("10 01 01 00"),
               "Data stream type 0x10 is not expected by FetchStreamReader",
               d.FetchStreamReader())


def test_fin_in_the_middle_of_an_object() -> None:
    data = bytes.fromhex(EXAMPLE_1_HEX)
    for cut in range(6, len(data)):
        if cut == 11:  # object boundary
            continue
        _violation(data[:cut], "Data stream ended in the middle of an object")


def test_fin_before_header() -> None:
    for cut in range(0, 5):
        _violation(bytes.fromhex(EXAMPLE_1_HEX)[:cut],
                   "Data stream ended before its header was complete")


def test_header_only_stream_is_fine() -> None:
    assert _fin(bytes.fromhex("14 02 00 00 00")) == [d.SubgroupHeader(0x14, 2, 0, 0, 0)]


def test_invalid_object_status() -> None:
    _violation(bytes.fromhex("10 01 00 80" "00 00 02"), "Invalid object status 0x2")
    _violation(bytes.fromhex("05 01" "00 00 00 80 00 00 05"), "Invalid object status 0x5")


def test_does_not_exist_with_extensions() -> None:
    _violation(bytes.fromhex("11 01 00 80" "00 02 1001 00 01"),
               "Object with status DOES_NOT_EXIST carries extension headers")


def test_extensions_over_limit() -> None:
    _violation(bytes.fromhex("11 01 00 80" "00 4100"),
               "Extension headers length 256 exceeds the limit 255",
               d.DataStreamReader(max_extensions_length=255))


def test_object_id_overflow() -> None:
    _violation(bytes.fromhex("10 01 00 80" "ffffffffffffffff 01 61" "00 01 62"),
               f"Object ID {2**62} exceeds 2^62-1")


def test_feed_after_fin() -> None:
    reader = d.DataStreamReader()
    reader.feed(bytes.fromhex("14 02 00 00 00"), fin=True)
    with pytest.raises(ValueError):
        reader.feed(b"")


def test_writer_errors() -> None:
    with pytest.raises(ValueError, match="must have an empty payload"):
        d.SubgroupObject(0, b"x", status=ObjectStatus.END_OF_GROUP)
    writer = d.SubgroupStreamWriter(d.SubgroupHeader.new(1, 0, 0))
    with pytest.raises(ValueError, match="carries none"):
        writer.encode_object(d.SubgroupObject(0, b"x", b"\x10\x01"))
    writer.encode_object(d.SubgroupObject(5, b"x"))
    with pytest.raises(ValueError, match="does not follow"):
        writer.encode_object(d.SubgroupObject(5, b"y"))
    with pytest.raises(ValueError, match="does not fit"):
        d.SubgroupHeader(0x10, 1, 0, 3, 0)
    with pytest.raises(ValueError, match="not a SUBGROUP_HEADER type"):
        d.SubgroupHeader(0x16, 1, 0, 0, 0)


# -- object datagrams (section 10.3.1) -------------------------------------------------------

EXT = bytes.fromhex("1005")  # one extension: type 0x10 (even) = 5

DATAGRAMS = [
    d.ObjectDatagram(0x00, 1, 2, 3, 128, payload=b"p"),
    d.ObjectDatagram(0x01, 1, 2, 3, 128, EXT, payload=b"p"),
    d.ObjectDatagram(0x02, 1, 2, 3, 128, payload=b"last"),
    d.ObjectDatagram(0x03, 1, 2, 3, 128, EXT, payload=b""),
    d.ObjectDatagram(0x04, 1, 2, 0, 0, payload=b"first"),
    d.ObjectDatagram(0x05, 2**20, 2, 0, 0, EXT, payload=b"first"),
    d.ObjectDatagram(0x06, 1, 2, 0, 255, payload=b"only"),
    d.ObjectDatagram(0x07, 1, 2, 0, 255, EXT, payload=b"only"),
    d.ObjectDatagram(0x20, 1, 2, 9, 1, status=ObjectStatus.END_OF_GROUP),
    d.ObjectDatagram(0x21, 1, 2, 9, 1, EXT, status=ObjectStatus.END_OF_TRACK),
    d.ObjectDatagram(0x00, 1, 2, 0, 0, payload=b"explicit object id 0"),
]


@pytest.mark.parametrize("datagram", DATAGRAMS, ids=lambda x: hex(x.datagram_type))
def test_datagram_roundtrip(datagram: d.ObjectDatagram) -> None:
    data = d.encode_object_datagram(datagram)
    assert d.decode_object_datagram(data) == datagram
    assert d.encode_object_datagram(d.decode_object_datagram(data)) == data


# Section 10.3.1, hand-built: type 0x01 {alias 5, group 1, object 0, priority 0x80,
# ext length 2, ext {0x10: 5}, payload "hi"} and type 0x20 {alias 5, group 1, object 3,
# priority 0x80, status END_OF_GROUP}.
DATAGRAM_HEX = "01 05 01 00 80 02 1005 6869"
STATUS_DATAGRAM_HEX = "20 05 01 03 80 03"


def test_datagram_vectors() -> None:
    assert d.decode_object_datagram(bytes.fromhex(DATAGRAM_HEX)) == \
        d.ObjectDatagram(0x01, 5, 1, 0, 0x80, EXT, payload=b"hi")
    assert d.decode_object_datagram(bytes.fromhex(STATUS_DATAGRAM_HEX)) == \
        d.ObjectDatagram(0x20, 5, 1, 3, 0x80, status=ObjectStatus.END_OF_GROUP)


def test_datagram_new_picks_compact_type() -> None:
    assert d.ObjectDatagram.new(1, 2, 0, 0, b"x").datagram_type == 0x04
    assert d.ObjectDatagram.new(1, 2, 1, 0, b"x", end_of_group=True).datagram_type == 0x02
    assert d.ObjectDatagram.new(1, 2, 0, 0, b"x", extensions=EXT,
                                end_of_group=True).datagram_type == 0x07
    assert d.ObjectDatagram.new(1, 2, 0, 0, status=ObjectStatus.DOES_NOT_EXIST).datagram_type \
        == 0x20


@pytest.mark.parametrize("hexdata,message", [
    ("08 01 02 80", "Unknown datagram type 0x8"),
    ("22 01 02 03 80 00", "Unknown datagram type 0x22"),
    ("01 01 02 03 80 00 6869",
     "Object datagram has Extensions Present with Extension Headers Length 0"),
    ("00 01 02 03", "Object datagram is truncated"),
    ("", "Object datagram is truncated"),
    ("20 01 02 03 80", "Object datagram is truncated"),
    ("20 01 02 03 80 02", "Invalid object status 0x2"),
    ("20 01 02 03 80 03 ff", "Object status datagram has 1 bytes after its status"),
    ("21 01 02 03 80 02 1005 01", "Object with status DOES_NOT_EXIST carries extension headers"),
])
def test_datagram_malformed(hexdata: str, message: str) -> None:
    with pytest.raises(ProtocolViolation) as info:
        d.decode_object_datagram(bytes.fromhex(hexdata))
    assert str(info.value) == message
    assert info.value.error_code == SessionErrorCode.PROTOCOL_VIOLATION


# -- layout helpers for the kernel fast path -------------------------------------------------


def test_subgroup_header_layout() -> None:
    header = d.SubgroupHeader.new(300, 2**31, 7, 9)  # alias 2-byte varint, group 8-byte
    data = d.encode_subgroup_stream(header, [d.SubgroupObject(0, b"x")])
    layout = d.subgroup_header_layout(data)
    assert layout == d.HeaderLayout(0x14, 1, 2, 3, 8, 12, 13, subgroup_id_offset=11)
    assert data[layout.publisher_priority_offset] == 7
    assert d.subgroup_header_layout(data[:12]) is None  # priority byte missing
    layout0 = d.subgroup_header_layout(bytes.fromhex("19 05 01 80"))
    assert layout0 == d.HeaderLayout(0x19, 1, 1, 2, 1, 3, 4)


def test_rewrite_track_alias_same_width() -> None:
    header = d.SubgroupHeader.new(300, 4, 7, None, extensions=True)
    data = d.encode_subgroup_stream(header, [d.SubgroupObject(2, b"payload", EXT)])
    rewritten = d.rewrite_track_alias(data, 16000)
    assert len(rewritten) == len(data)
    events = _fin(rewritten)
    assert events[0] == d.SubgroupHeader(header.stream_type, 16000, 4, None, 7)
    assert d.assemble_objects(events) == d.assemble_objects(_fin(data))
    with pytest.raises(ValueError, match="needs 1 bytes, the header has 2"):
        d.rewrite_track_alias(data, 5)
    with pytest.raises(ValueError, match="needs 4 bytes"):
        d.rewrite_track_alias(data, 2**20)


def test_datagram_layout_and_rewrite() -> None:
    data = d.encode_object_datagram(d.ObjectDatagram(0x01, 7, 1, 2, 0x80, EXT, payload=b"hi"))
    assert d.datagram_header_layout(data) == d.HeaderLayout(0x01, 1, 1, 2, 1, 4, 5,
                                                            object_id_offset=3)
    no_id = d.encode_object_datagram(d.ObjectDatagram.new(7, 1, 0, 0x80, b"hi"))
    assert d.datagram_header_layout(no_id) == d.HeaderLayout(0x04, 1, 1, 2, 1, 3, 4)
    out = d.rewrite_track_alias(data, 9, datagram=True)
    assert d.decode_object_datagram(out) == d.ObjectDatagram(0x01, 9, 1, 2, 0x80, EXT,
                                                             payload=b"hi")
