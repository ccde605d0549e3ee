"""MoQT draft-14 (raw QUIC, ALPN `moq-00`) wire codec: control messages and the data plane.

- `constants`: ALPN, version, every code point as an IntEnum, limits.
- `errors`: exceptions carrying the session termination code to close with.
- `messages`: control messages (section 9) and the control stream reader.
- `data`: subgroup / fetch streams and object datagrams (section 10), incremental readers,
  header layout helpers for the kernel fast path.
"""

from .constants import ALPN, MOQT_VERSION_DRAFT_14, SUPPORTED_VERSIONS
from .errors import KeyValueFormattingError, MoqtError, ProtocolViolation, VersionNegotiationFailed

__all__ = [
    "ALPN",
    "MOQT_VERSION_DRAFT_14",
    "SUPPORTED_VERSIONS",
    "KeyValueFormattingError",
    "MoqtError",
    "ProtocolViolation",
    "VersionNegotiationFailed",
]
