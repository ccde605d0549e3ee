"""MoQT draft-14 code points and limits: every on-wire value is an IntEnum here.

Source: draft-ietf-moq-transport-14 (2 Sep 2025); section numbers below refer to it.
https://www.ietf.org/archive/id/draft-ietf-moq-transport-14.html
"""

from __future__ import annotations

from enum import IntEnum

# Section 3.1.2: the ALPN for MoQT over raw QUIC in draft-14 (from -15 on it names the version).
ALPN = "moq-00"

# Section 9.3.1: drafts are 0xff000000 + N; the RFC will be 0x00000001.
MOQT_VERSION_DRAFT_14 = 0xFF00000E
SUPPORTED_VERSIONS = (MOQT_VERSION_DRAFT_14,)

# Limits (section numbers in the comments).
MAX_MESSAGE_LENGTH = 0xFFFF  # 9: Message Length is 16 bits
MAX_NAMESPACE_FIELDS = 32  # 2.4.1: a Track Namespace has 1..32 fields
MAX_FULL_TRACK_NAME_LENGTH = 4096  # 2.4.1: namespace field bytes + track name bytes
MAX_KVP_VALUE_LENGTH = 0xFFFF  # 1.4.2: odd-type Key-Value-Pair value length
MAX_REASON_PHRASE_LENGTH = 1024  # 1.4.3
MAX_GOAWAY_URI_LENGTH = 8192  # 9.4
MAX_VARINT = (1 << 62) - 1  # RFC 9000 section 16


# Section 9, table 1: control message types. 0x01, 0x40 and 0x41 are reserved (older SETUPs)
# and are therefore unknown types here.
class MessageType(IntEnum):
    SUBSCRIBE_UPDATE = 0x02
    SUBSCRIBE = 0x03
    SUBSCRIBE_OK = 0x04
    SUBSCRIBE_ERROR = 0x05
    PUBLISH_NAMESPACE = 0x06
    PUBLISH_NAMESPACE_OK = 0x07
    PUBLISH_NAMESPACE_ERROR = 0x08
    PUBLISH_NAMESPACE_DONE = 0x09
    UNSUBSCRIBE = 0x0A
    PUBLISH_DONE = 0x0B
    PUBLISH_NAMESPACE_CANCEL = 0x0C
    TRACK_STATUS = 0x0D
    TRACK_STATUS_OK = 0x0E
    TRACK_STATUS_ERROR = 0x0F
    GOAWAY = 0x10
    SUBSCRIBE_NAMESPACE = 0x11
    SUBSCRIBE_NAMESPACE_OK = 0x12
    SUBSCRIBE_NAMESPACE_ERROR = 0x13
    UNSUBSCRIBE_NAMESPACE = 0x14
    MAX_REQUEST_ID = 0x15
    FETCH = 0x16
    FETCH_CANCEL = 0x17
    FETCH_OK = 0x18
    FETCH_ERROR = 0x19
    REQUESTS_BLOCKED = 0x1A
    PUBLISH = 0x1D
    PUBLISH_OK = 0x1E
    PUBLISH_ERROR = 0x1F
    CLIENT_SETUP = 0x20
    SERVER_SETUP = 0x21


# Section 9.3.2: Setup parameters (a namespace constant across versions).
# MOQT_IMPLEMENTATION: the -14 text says 0x05, which clashes with AUTHORITY; -15 fixed it to
# 0x07 and implementations (moq-rs included) send 0x07.
class SetupParameter(IntEnum):
    PATH = 0x01
    MAX_REQUEST_ID = 0x02
    AUTHORIZATION_TOKEN = 0x03
    MAX_AUTH_TOKEN_CACHE_SIZE = 0x04
    AUTHORITY = 0x05
    MOQT_IMPLEMENTATION = 0x07


# Section 9.2.1: version-specific (non-setup) message parameters.
class MessageParameter(IntEnum):
    DELIVERY_TIMEOUT = 0x02
    AUTHORIZATION_TOKEN = 0x03
    MAX_CACHE_DURATION = 0x04


# Section 3.4: session termination codes (QUIC CONNECTION_CLOSE application error codes).
class SessionErrorCode(IntEnum):
    NO_ERROR = 0x0
    INTERNAL_ERROR = 0x1
    UNAUTHORIZED = 0x2
    PROTOCOL_VIOLATION = 0x3
    INVALID_REQUEST_ID = 0x4
    DUPLICATE_TRACK_ALIAS = 0x5
    KEY_VALUE_FORMATTING_ERROR = 0x6
    TOO_MANY_REQUESTS = 0x7
    INVALID_PATH = 0x8
    MALFORMED_PATH = 0x9
    GOAWAY_TIMEOUT = 0x10
    CONTROL_MESSAGE_TIMEOUT = 0x11
    DATA_STREAM_TIMEOUT = 0x12
    AUTH_TOKEN_CACHE_OVERFLOW = 0x13
    DUPLICATE_AUTH_TOKEN_ALIAS = 0x14
    VERSION_NEGOTIATION_FAILED = 0x15
    MALFORMED_AUTH_TOKEN = 0x16
    UNKNOWN_AUTH_TOKEN_ALIAS = 0x17
    EXPIRED_AUTH_TOKEN = 0x18
    INVALID_AUTHORITY = 0x19
    MALFORMED_AUTHORITY = 0x1A


# Section 9.9: SUBSCRIBE_ERROR codes; TRACK_STATUS_ERROR uses the same (9.22).
class SubscribeErrorCode(IntEnum):
    INTERNAL_ERROR = 0x0
    UNAUTHORIZED = 0x1
    TIMEOUT = 0x2
    NOT_SUPPORTED = 0x3
    TRACK_DOES_NOT_EXIST = 0x4
    INVALID_RANGE = 0x5
    MALFORMED_AUTH_TOKEN = 0x10
    EXPIRED_AUTH_TOKEN = 0x12


TrackStatusErrorCode = SubscribeErrorCode


# Section 9.12: PUBLISH_DONE status codes.
class PublishDoneStatusCode(IntEnum):
    INTERNAL_ERROR = 0x0
    UNAUTHORIZED = 0x1
    TRACK_ENDED = 0x2
    SUBSCRIPTION_ENDED = 0x3
    GOING_AWAY = 0x4
    EXPIRED = 0x5
    TOO_FAR_BEHIND = 0x6
    MALFORMED_TRACK = 0x7


# Section 9.15: PUBLISH_ERROR codes.
class PublishErrorCode(IntEnum):
    INTERNAL_ERROR = 0x0
    UNAUTHORIZED = 0x1
    TIMEOUT = 0x2
    NOT_SUPPORTED = 0x3
    UNINTERESTED = 0x4


# Section 9.18: FETCH_ERROR codes.
class FetchErrorCode(IntEnum):
    INTERNAL_ERROR = 0x0
    UNAUTHORIZED = 0x1
    TIMEOUT = 0x2
    NOT_SUPPORTED = 0x3
    TRACK_DOES_NOT_EXIST = 0x4
    INVALID_RANGE = 0x5
    NO_OBJECTS = 0x6
    INVALID_JOINING_REQUEST_ID = 0x7
    UNKNOWN_STATUS_IN_RANGE = 0x8
    MALFORMED_TRACK = 0x9
    MALFORMED_AUTH_TOKEN = 0x10
    EXPIRED_AUTH_TOKEN = 0x12


# Section 9.25: PUBLISH_NAMESPACE_ERROR codes; PUBLISH_NAMESPACE_CANCEL uses the same (9.27).
class PublishNamespaceErrorCode(IntEnum):
    INTERNAL_ERROR = 0x0
    UNAUTHORIZED = 0x1
    TIMEOUT = 0x2
    NOT_SUPPORTED = 0x3
    UNINTERESTED = 0x4
    MALFORMED_AUTH_TOKEN = 0x10
    EXPIRED_AUTH_TOKEN = 0x12


# Section 9.30: SUBSCRIBE_NAMESPACE_ERROR codes.
class SubscribeNamespaceErrorCode(IntEnum):
    INTERNAL_ERROR = 0x0
    UNAUTHORIZED = 0x1
    TIMEOUT = 0x2
    NOT_SUPPORTED = 0x3
    NAMESPACE_PREFIX_UNKNOWN = 0x4
    NAMESPACE_PREFIX_OVERLAP = 0x5
    MALFORMED_AUTH_TOKEN = 0x10
    EXPIRED_AUTH_TOKEN = 0x12


# Section 10.4.3: RESET_STREAM / RESET_STREAM_AT codes on data streams.
class StreamResetCode(IntEnum):
    INTERNAL_ERROR = 0x0
    CANCELLED = 0x1
    DELIVERY_TIMEOUT = 0x2
    SESSION_CLOSED = 0x3


# Section 9.7: subscription filter types.
class FilterType(IntEnum):
    NEXT_GROUP_START = 0x1
    LARGEST_OBJECT = 0x2
    ABSOLUTE_START = 0x3
    ABSOLUTE_RANGE = 0x4


# Section 9.7 / 7: group order; 0 ("publisher's order") is only valid in requests.
class GroupOrder(IntEnum):
    PUBLISHER = 0x0
    ASCENDING = 0x1
    DESCENDING = 0x2


# Section 9.16, table 3.
class FetchType(IntEnum):
    STANDALONE = 0x1
    RELATIVE_JOINING = 0x2
    ABSOLUTE_JOINING = 0x3


# Section 10.2.1.1: object status (0x2 is unassigned in -14).
class ObjectStatus(IntEnum):
    NORMAL = 0x0
    DOES_NOT_EXIST = 0x1
    END_OF_GROUP = 0x3
    END_OF_TRACK = 0x4


# Section 11: object extension headers defined by the draft. Unknown ones are forwarded verbatim.
class ExtensionHeaderType(IntEnum):
    IMMUTABLE_EXTENSIONS = 0x0B
    PRIOR_GROUP_ID_GAP = 0x3C
    PRIOR_OBJECT_ID_GAP = 0x3E


# Section 10, table 4: unidirectional stream types.
class StreamType(IntEnum):
    FETCH_HEADER = 0x05
    # SUBGROUP_HEADER is the range 0x10..0x1D (section 10.4.2, table 7): see the bits below.


SUBGROUP_HEADER_TYPE_MIN = 0x10
SUBGROUP_HEADER_TYPE_MAX = 0x1D
# Bits of a SUBGROUP_HEADER type (table 7).
SUBGROUP_EXTENSIONS_BIT = 0x01  # every object carries Extension Headers Length
SUBGROUP_ID_FIRST_OBJECT_BIT = 0x02  # no field; Subgroup ID = first Object ID
SUBGROUP_ID_PRESENT_BIT = 0x04  # explicit Subgroup ID field
SUBGROUP_END_OF_GROUP_BIT = 0x08  # the last object before FIN is the last of the group
SUBGROUP_HEADER_TYPES = frozenset(
    t for t in range(SUBGROUP_HEADER_TYPE_MIN, SUBGROUP_HEADER_TYPE_MAX + 1)
    if t & (SUBGROUP_ID_FIRST_OBJECT_BIT | SUBGROUP_ID_PRESENT_BIT)
    != (SUBGROUP_ID_FIRST_OBJECT_BIT | SUBGROUP_ID_PRESENT_BIT)
)

# Section 10.3.1, table 6: OBJECT_DATAGRAM types 0x00..0x07 (payload) and 0x20..0x21 (status).
DATAGRAM_EXTENSIONS_BIT = 0x01
DATAGRAM_END_OF_GROUP_BIT = 0x02
DATAGRAM_NO_OBJECT_ID_BIT = 0x04  # Object ID field omitted, Object ID is 0
DATAGRAM_STATUS_BIT = 0x20  # Object Status instead of payload
DATAGRAM_TYPES = frozenset((*range(0x00, 0x08), 0x20, 0x21))
