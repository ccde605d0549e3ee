"""MoQT draft-14 control messages: round trips, draft-layout vectors, malformed input, reader."""

from __future__ import annotations

import dataclasses
import random

import pytest
from aioquic.buffer import Buffer

from relay.moqt import messages as m
from relay.moqt.constants import (
    ALPN,
    MOQT_VERSION_DRAFT_14,
    FetchErrorCode,
    FetchType,
    FilterType,
    GroupOrder,
    MessageParameter,
    MessageType,
    PublishDoneStatusCode,
    SessionErrorCode,
    SetupParameter,
    SubscribeErrorCode,
    SubscribeNamespaceErrorCode,
)
from relay.moqt.errors import ProtocolViolation
from relay.moqt.messages import Location

NS = (b"moq", b"x")
UNKNOWN_PARAMS = ((0x40B5C, 1), (0x21, b"\x00\xff"), (0x21, b"again"))

# One or more instances of every control message, covering optional-field variants.
SAMPLES: list[m.Message] = [
    m.ClientSetup((MOQT_VERSION_DRAFT_14, 0xFF00000D), (
        (SetupParameter.PATH, b"/x"), (SetupParameter.MAX_REQUEST_ID, 2**32 - 1),
        (SetupParameter.MOQT_IMPLEMENTATION, b"moq-lite-rs"),
        (SetupParameter.AUTHORITY, b"127.0.0.1:14433"), *UNKNOWN_PARAMS)),
    m.ClientSetup(()),
    m.ServerSetup(MOQT_VERSION_DRAFT_14, ((SetupParameter.MAX_REQUEST_ID, 1000),)),
    m.Goaway(),
    m.Goaway(b"moqt://relay.example:4433/next"),
    m.MaxRequestId(2**62 - 1),
    m.RequestsBlocked(64),
    m.Subscribe(0, NS, b"video", 255, GroupOrder.DESCENDING, True, FilterType.LARGEST_OBJECT),
    m.Subscribe(2, NS, b"", 0, GroupOrder.PUBLISHER, False, FilterType.NEXT_GROUP_START,
                parameters=((MessageParameter.DELIVERY_TIMEOUT, 500),
                            (MessageParameter.AUTHORIZATION_TOKEN, b"\x03\x00tok"),
                            (MessageParameter.AUTHORIZATION_TOKEN, b"\x03\x00tok2"))),
    m.Subscribe(4, NS, b"a", 1, GroupOrder.ASCENDING, True, FilterType.ABSOLUTE_START,
                Location(7, 3)),
    m.Subscribe(6, (b"a",) * 32, b"b", 2, GroupOrder.ASCENDING, True, FilterType.ABSOLUTE_RANGE,
                Location(7, 0), 9, UNKNOWN_PARAMS),
    m.SubscribeOk(0, 1, 0, GroupOrder.DESCENDING),
    m.SubscribeOk(0, 2**40, 30000, GroupOrder.ASCENDING, Location(5, 3),
                  ((MessageParameter.MAX_CACHE_DURATION, 1000), *UNKNOWN_PARAMS)),
    m.SubscribeError(0, SubscribeErrorCode.TRACK_DOES_NOT_EXIST, "no such track"),
    m.SubscribeError(2, 0x999, ""),
    m.SubscribeUpdate(8, 0, Location(10, 0), 0, 3, False,
                      ((MessageParameter.DELIVERY_TIMEOUT, 20),)),
    m.Unsubscribe(0),
    m.PublishDone(0, PublishDoneStatusCode.TRACK_ENDED, 2**62 - 1, "track ended"),
    m.Publish(1, NS, b"audio", 3, GroupOrder.ASCENDING, None, True),
    m.Publish(3, NS, b"audio", 3, GroupOrder.DESCENDING, Location(1, 2), False, UNKNOWN_PARAMS),
    m.PublishOk(1, True, 128, GroupOrder.ASCENDING, FilterType.ABSOLUTE_RANGE, Location(0, 0), 4),
    m.PublishOk(3, False, 0, GroupOrder.DESCENDING, FilterType.LARGEST_OBJECT),
    m.PublishError(1, 0x3, "publish not supported"),
    m.Fetch(10, 128, GroupOrder.ASCENDING, FetchType.STANDALONE,
            standalone=m.StandaloneFetch(NS, b"video", Location(0, 0), Location(3, 0))),
    m.Fetch(12, 128, GroupOrder.PUBLISHER, FetchType.RELATIVE_JOINING,
            joining=m.JoiningFetch(0, 0)),
    m.Fetch(14, 1, GroupOrder.DESCENDING, FetchType.ABSOLUTE_JOINING,
            joining=m.JoiningFetch(4, 17), parameters=UNKNOWN_PARAMS),
    m.FetchOk(10, GroupOrder.ASCENDING, True, Location(2, 9),
              ((MessageParameter.MAX_CACHE_DURATION, 5),)),
    m.FetchError(12, FetchErrorCode.NOT_SUPPORTED, "fetch not supported"),
    m.FetchCancel(10),
    m.TrackStatus(16, NS, b"video", 0, GroupOrder.PUBLISHER, True, FilterType.LARGEST_OBJECT),
    m.TrackStatusOk(16, 0, 0, GroupOrder.ASCENDING, Location(4, 4)),
    m.TrackStatusError(16, SubscribeErrorCode.NOT_SUPPORTED, "nope"),
    m.PublishNamespace(1, NS, ((MessageParameter.AUTHORIZATION_TOKEN, b"t"),)),
    m.PublishNamespaceOk(1),
    m.PublishNamespaceError(1, 0x4, "uninteresting"),
    m.PublishNamespaceDone(NS),
    m.PublishNamespaceCancel(NS, 0x0, "gone"),
    m.SubscribeNamespace(0, NS),
    m.SubscribeNamespace(2, (), UNKNOWN_PARAMS),
    m.SubscribeNamespaceOk(0),
    m.SubscribeNamespaceError(2, SubscribeNamespaceErrorCode.NAMESPACE_PREFIX_OVERLAP, "overlap"),
    m.UnsubscribeNamespace(NS),
    m.UnsubscribeNamespace(()),
]

_PUSH = {t: push for t, (_, push) in m.MESSAGE_CODECS.items()}
_PULL = {t: pull for t, (pull, _) in m.MESSAGE_CODECS.items()}


def _frame(message_type: int, payload: bytes) -> bytes:
    buf = Buffer(capacity=16 + len(payload))
    buf.push_uint_var(message_type)
    buf.push_uint16(len(payload))
    buf.push_bytes(payload)
    return buf.data


def _violation(data: bytes, message: str, code: int = SessionErrorCode.PROTOCOL_VIOLATION):
    with pytest.raises(ProtocolViolation) as info:
        m.decode_message(data)
    assert str(info.value) == message
    assert info.value.error_code == code
    return info.value


# -- round trips -----------------------------------------------------------------------------


def test_every_message_type_has_a_sample() -> None:
    assert {msg.message_type for msg in SAMPLES} == set(MessageType)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda x: type(x).__name__)
def test_roundtrip(msg: m.Message) -> None:
    data = m.encode_message(msg)
    decoded = m.decode_message(data)
    assert decoded == msg
    assert type(decoded) is type(msg)
    assert m.encode_message(decoded) == data


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda x: type(x).__name__)
def test_pull_push_payload(msg: m.Message) -> None:
    data = m.encode_message(msg)
    buf = Buffer(data=data)
    assert buf.pull_uint_var() == msg.message_type
    payload = buf.pull_bytes(buf.pull_uint16())
    assert _PULL[msg.message_type](Buffer(data=payload)) == msg
    out = Buffer(capacity=len(payload))
    _PUSH[msg.message_type](out, msg)
    assert out.data == payload


def test_decode_message_from_buffer_advances() -> None:
    data = b"".join(m.encode_message(x) for x in SAMPLES[:3])
    buf = Buffer(data=data)
    assert [m.decode_message(buf) for _ in range(3)] == SAMPLES[:3]
    assert buf.eof()


def test_unknown_parameters_preserved_in_order() -> None:
    decoded = m.decode_message(m.encode_message(SAMPLES[0]))
    assert isinstance(decoded, m.ClientSetup)
    assert decoded.parameters[-3:] == UNKNOWN_PARAMS
    assert m.get_parameter(decoded.parameters, SetupParameter.MAX_REQUEST_ID) == 2**32 - 1
    assert m.get_parameter(decoded.parameters, 0x99) is None


def test_constants() -> None:
    assert ALPN == "moq-00"
    assert MOQT_VERSION_DRAFT_14 == 0xFF000000 + 14
    assert SetupParameter.MOQT_IMPLEMENTATION == 0x07


# -- vectors built by hand from the draft's field layouts ------------------------------------

# draft-14 section 9.3: CLIENT_SETUP {Type 0x20, Length (16), 1 version: 0xff00000e as an
# 8-byte varint, 3 params: PATH (0x01, odd: length + bytes) "/x", MAX_REQUEST_ID (0x02, even:
# varint) 100, MOQT_IMPLEMENTATION (0x07) "fr"}.
CLIENT_SETUP_HEX = "20" "0015" "01" "c0000000ff00000e" "03" "01022f78" "024064" "07026672"
# Section 9.7: SUBSCRIBE {req 0, namespace ("moq", "x"), name "video", subscriber priority 255,
# group order 2, forward 1, filter LargestObject (0x2), 0 params}: what moq-rs sends.
SUBSCRIBE_HEX = "03" "0013" "00" "02036d6f710178" "05766964656f" "ff" "02" "01" "02" "00"
# Section 9.8: SUBSCRIBE_OK {req 0, alias 1, expires 0, group order 2, content exists 1,
# largest {5, 3}, 1 param: DELIVERY_TIMEOUT (0x02) = 1000 (2-byte varint 0x43e8)}.
SUBSCRIBE_OK_HEX = "04" "000b" "00" "01" "00" "02" "01" "0503" "01" "0243e8"
# Section 9.30: SUBSCRIBE_NAMESPACE_ERROR {req 2, NOT_SUPPORTED (0x3), reason "no"}.
SUBSCRIBE_NAMESPACE_ERROR_HEX = "13" "0005" "02" "03" "026e6f"
# Section 9.16: FETCH {req 2, priority 0x80, group order 0, Relative Joining (0x2), joining
# request 0, joining start 0, 0 params}: the joining fetch moq-rs sends after SUBSCRIBE.
FETCH_HEX = "16" "0007" "02" "80" "00" "02" "00" "00" "00"
# Section 9.10: SUBSCRIBE_UPDATE {req 4, subscription 0, start {1, 0}, end group 0, prio 7,
# forward 0, 0 params}.
SUBSCRIBE_UPDATE_HEX = "02" "0008" "04" "00" "0100" "00" "07" "00" "00"

VECTORS = [
    (CLIENT_SETUP_HEX, m.ClientSetup((MOQT_VERSION_DRAFT_14,), (
        (SetupParameter.PATH, b"/x"), (SetupParameter.MAX_REQUEST_ID, 100),
        (SetupParameter.MOQT_IMPLEMENTATION, b"fr")))),
    (SUBSCRIBE_HEX, m.Subscribe(0, NS, b"video", 255, GroupOrder.DESCENDING, True,
                                FilterType.LARGEST_OBJECT)),
    (SUBSCRIBE_OK_HEX, m.SubscribeOk(0, 1, 0, GroupOrder.DESCENDING, Location(5, 3),
                                     ((MessageParameter.DELIVERY_TIMEOUT, 1000),))),
    (SUBSCRIBE_NAMESPACE_ERROR_HEX, m.SubscribeNamespaceError(
        2, SubscribeNamespaceErrorCode.NOT_SUPPORTED, "no")),
    (FETCH_HEX, m.Fetch(2, 0x80, GroupOrder.PUBLISHER, FetchType.RELATIVE_JOINING,
                        joining=m.JoiningFetch(0, 0))),
    (SUBSCRIBE_UPDATE_HEX, m.SubscribeUpdate(4, 0, Location(1, 0), 0, 7, False)),
]


@pytest.mark.parametrize("hexdata,msg", VECTORS, ids=lambda x: getattr(x, "__name__", None))
def test_vector(hexdata: str, msg: m.Message) -> None:
    data = bytes.fromhex(hexdata)
    assert m.decode_message(data) == msg
    assert m.encode_message(msg) == data


def test_location_order() -> None:
    assert Location(1, 9) < Location(2, 0) < Location(2, 1)
    assert max(Location(3, 0), Location(2, 7)) == Location(3, 0)


# -- malformed input -------------------------------------------------------------------------


def test_unknown_message_type() -> None:
    _violation(bytes.fromhex("01 0000"), "Unknown control message type 0x1")
    _violation(bytes.fromhex("4040 0000"), "Unknown control message type 0x40")  # old SETUP
    _violation(bytes.fromhex("22 0000"), "Unknown control message type 0x22")


def test_truncated() -> None:
    for data in (b"", b"\x40", b"\x15", b"\x15\x00", b"\x15\x00\x01"):
        _violation(data, "Control message is truncated")


def test_truncated_buffer_position_restored() -> None:
    buf = Buffer(data=bytes.fromhex("1500 02"))
    with pytest.raises(ProtocolViolation):
        m.decode_message(buf)
    assert buf.tell() == 0


def test_length_mismatch_long() -> None:
    # SUBSCRIBE_NAMESPACE_OK declares 2 bytes but its one field (request id 1) takes 1.
    _violation(bytes.fromhex("12 0002 01 00"),
               "Length mismatch: SUBSCRIBE_NAMESPACE_OK fields end at byte 1 of the declared "
               "length 2")


def test_length_mismatch_short() -> None:
    # MAX_REQUEST_ID declares 1 byte but holds a 2-byte varint.
    _violation(bytes.fromhex("15 0001 4064"),
               "Length mismatch: MAX_REQUEST_ID fields run past the declared length 1")
    _violation(bytes.fromhex("15 0000"),
               "Length mismatch: MAX_REQUEST_ID fields run past the declared length 0")


def test_trailing_bytes_after_message() -> None:
    _violation(bytes.fromhex("15 0001 05 ff"), "Control message is followed by 1 unexpected bytes")


def test_namespace_empty() -> None:
    # PUBLISH_NAMESPACE {req 1, namespace with 0 fields, 0 params}
    _violation(_frame(0x06, bytes.fromhex("01 00 00")),
               "Track namespace has 0 fields (must be 1 to 32)")
    # SUBSCRIBE with an empty namespace
    _violation(_frame(0x03, bytes.fromhex("00 00 00 80 00 01 02 00")),
               "Track namespace has 0 fields (must be 1 to 32)")


def test_namespace_too_many_fields() -> None:
    payload = bytes([1, 33]) + b"\x01a" * 33 + b"\x00"
    _violation(_frame(0x06, payload), "Track namespace has 33 fields (must be 1 to 32)")
    payload = bytes([1, 33]) + b"\x01a" * 33 + b"\x00"
    _violation(_frame(0x11, payload), "Track namespace prefix has 33 fields (must be 1 to 32)")


def test_empty_prefix_accepted_for_namespace_subscriptions() -> None:
    # moq-rs sends SUBSCRIBE_NAMESPACE with an empty prefix on every session (see messages.py).
    assert m.decode_message(bytes.fromhex("11 0003 00 00 00")) == m.SubscribeNamespace(0, ())
    assert m.decode_message(bytes.fromhex("14 0001 00")) == m.UnsubscribeNamespace(())


def test_full_track_name_too_long() -> None:
    buf = Buffer(capacity=5000)
    buf.push_uint_var(0)  # request id
    m.push_full_track_name(buf, (b"n" * 4000,), b"t" * 97)
    buf.push_bytes(bytes.fromhex("80 00 01 02 00"))
    _violation(_frame(0x03, buf.data), "Full track name is 4097 bytes (maximum 4096)")


def test_full_track_name_at_limit() -> None:
    msg = m.Subscribe(0, (b"n" * 2000, b"m" * 2000), b"t" * 96, 0, GroupOrder.ASCENDING, True,
                      FilterType.LARGEST_OBJECT)
    assert m.decode_message(m.encode_message(msg)) == msg


def test_namespace_alone_too_long() -> None:
    buf = Buffer(capacity=5000)
    buf.push_uint_var(1)
    m.push_track_namespace(buf, (b"n" * 4000, b"m" * 97))
    buf.push_uint_var(0)
    _violation(_frame(0x06, buf.data), "Track namespace is 4097 bytes (maximum 4096)")


def test_key_value_pair_too_long() -> None:
    # CLIENT_SETUP {0 versions, 1 param: type 0x21 (odd) with Length 65536}
    _violation(_frame(0x20, bytes.fromhex("00 01 21 80010000")),
               "Key-Value-Pair type 0x21 length 65536 exceeds 65535")


def test_key_value_pair_truncated() -> None:
    _violation(_frame(0x20, bytes.fromhex("00 01 21 05 6162")),
               "Length mismatch: CLIENT_SETUP fields run past the declared length 6")


def test_reason_phrase_too_long() -> None:
    _violation(_frame(0x05, bytes.fromhex("00 00 4401") + b"r" * 1025),
               "Reason phrase is 1025 bytes (maximum 1024)")


def test_reason_phrase_invalid_utf8_replaced() -> None:
    msg = m.decode_message(_frame(0x05, bytes.fromhex("00 00 02 c328")))
    assert msg == m.SubscribeError(0, 0, "\ufffd(")


def test_goaway_uri_too_long() -> None:
    _violation(_frame(0x10, bytes.fromhex("6001") + b"u" * 8193),
               "GOAWAY new session URI is 8193 bytes (maximum 8192)")


@pytest.mark.parametrize("payload_hex,message", [
    # SUBSCRIBE group order 3, forward 2, filter type 5
    ("00 0101610161 80 03 01 02 00", "Invalid group order 3"),
    ("00 0101610161 80 00 02 02 00", "Invalid forward value 2"),
    ("00 0101610161 80 00 01 05 00", "Invalid filter type 0x5"),
    ("00 0101610161 80 00 01 00 00", "Invalid filter type 0x0"),
], ids=["group_order", "forward", "filter", "filter0"])
def test_subscribe_invalid_fields(payload_hex: str, message: str) -> None:
    _violation(_frame(0x03, bytes.fromhex(payload_hex)), message)


def test_subscribe_ok_invalid_fields() -> None:
    # Group order 0 is only valid in requests.
    _violation(_frame(0x04, bytes.fromhex("00 01 00 00 00 00")), "Invalid group order 0")
    _violation(_frame(0x04, bytes.fromhex("00 01 00 01 02 00")), "Invalid content exists value 2")


def test_fetch_invalid_fields() -> None:
    _violation(_frame(0x16, bytes.fromhex("02 80 00 04 00 00 00")), "Invalid fetch type 0x4")
    _violation(_frame(0x18, bytes.fromhex("02 01 03 0000 00")), "Invalid end of track value 3")


def test_duplicate_setup_parameter() -> None:
    # SERVER_SETUP with MAX_REQUEST_ID twice
    _violation(_frame(0x21, bytes.fromhex("c0000000ff00000e 02 0201 0202")),
               "Duplicate setup parameter 0x2")


def test_duplicate_message_parameter() -> None:
    msg = m.Subscribe(0, NS, b"v", 0, GroupOrder.ASCENDING, True, FilterType.LARGEST_OBJECT,
                      parameters=((MessageParameter.DELIVERY_TIMEOUT, 1),
                                  (MessageParameter.DELIVERY_TIMEOUT, 2)))
    _violation(m.encode_message(msg), "Duplicate SUBSCRIBE parameter 0x2")
    # MAX_CACHE_DURATION is not defined for SUBSCRIBE: ignored there, so it may repeat.
    msg = dataclasses.replace(msg, parameters=((MessageParameter.MAX_CACHE_DURATION, 1),
                                               (MessageParameter.MAX_CACHE_DURATION, 2)))
    assert m.decode_message(m.encode_message(msg)) == msg


def test_encode_errors() -> None:
    with pytest.raises(ValueError, match="exceeds 65535"):
        m.encode_message(m.ClientSetup((), ((0x21, b"x" * 60000), (0x23, b"y" * 6000))))
    with pytest.raises(ValueError, match="is even and needs an int"):
        m.encode_message(m.ClientSetup((), ((0x02, b"x"),)))
    with pytest.raises(ValueError, match="is odd and needs a bytes"):
        m.encode_message(m.ClientSetup((), ((0x01, 5),)))
    with pytest.raises(ValueError, match="Filter type"):
        m.Subscribe(0, NS, b"v", 0, GroupOrder.ASCENDING, True, FilterType.ABSOLUTE_START)
    with pytest.raises(ValueError, match="Fetch type"):
        m.Fetch(0, 0, GroupOrder.ASCENDING, FetchType.STANDALONE, joining=m.JoiningFetch(0, 0))


def test_error_codes_carry_session_code() -> None:
    err = ProtocolViolation("x")
    assert err.error_code == SessionErrorCode.PROTOCOL_VIOLATION == 0x3
    assert err.reason_phrase == "x"


# -- the incremental control stream reader ---------------------------------------------------

STREAM = b"".join(m.encode_message(x) for x in SAMPLES)


def _read_in_chunks(data: bytes, sizes: list[int]) -> list[m.Message]:
    reader = m.ControlStreamReader()
    out: list[m.Message] = []
    pos = 0
    for size in sizes:
        out.extend(reader.feed(data[pos:pos + size]))
        pos += size
    out.extend(reader.feed(data[pos:]))
    assert reader.buffered == 0
    return out


def test_reader_whole() -> None:
    assert _read_in_chunks(STREAM, []) == SAMPLES


def test_reader_byte_by_byte() -> None:
    assert _read_in_chunks(STREAM, [1] * len(STREAM)) == SAMPLES


@pytest.mark.parametrize("seed", range(20))
def test_reader_random_chunks(seed: int) -> None:
    rng = random.Random(seed)
    sizes = []
    total = 0
    while total < len(STREAM):
        sizes.append(rng.randint(0, 40))
        total += sizes[-1]
    assert _read_in_chunks(STREAM, sizes) == SAMPLES


def test_reader_holds_incomplete_message() -> None:
    reader = m.ControlStreamReader()
    data = m.encode_message(SAMPLES[0])
    assert reader.feed(data[:-1]) == []
    assert reader.buffered == len(data) - 1
    assert reader.feed(data[-1:]) == [SAMPLES[0]]
    assert reader.feed(b"") == []


def test_reader_unknown_type_as_soon_as_known() -> None:
    reader = m.ControlStreamReader()
    assert reader.feed(m.encode_message(SAMPLES[0])) == [SAMPLES[0]]
    with pytest.raises(ProtocolViolation, match=r"^Unknown control message type 0x40$"):
        reader.feed(b"\x40\x40")


def test_reader_length_mismatch() -> None:
    reader = m.ControlStreamReader()
    with pytest.raises(ProtocolViolation) as info:
        reader.feed(bytes.fromhex("12 0002 01 00"))
    assert info.value.error_code == SessionErrorCode.PROTOCOL_VIOLATION
