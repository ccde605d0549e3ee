"""Mirror of bpf/reasons.h: every counter, pass/drop and punt reason of the fast path.

Never renumber; tests/test_fastpath_reasons.py parses the header and checks that the two
lists agree name for name and number for number.
"""

from __future__ import annotations

from enum import IntEnum


class Reason(IntEnum):
    # ingress
    IN_SEEN = 1
    IN_PASS_NOT_UDP = 2
    IN_PASS_MALFORMED = 3
    IN_PASS_LONG_HEADER = 4
    IN_PASS_UNKNOWN_CID = 5
    IN_PASS_GSO = 6
    IN_PASS_NOT_UPSTREAM = 7
    IN_PASS_NOT_FORWARDED = 8
    IN_PASS_FRAME_LIMIT = 9
    IN_PASS_BAD_FRAME = 10
    IN_CLONED = 11
    IN_CLONE = 12
    IN_CLONE_ERR = 13
    IN_FANOUT_LIMIT = 14
    IN_SUB_SKIPPED = 15
    IN_PASS_IP_OPTIONS = 16
    IN_PASS_FRAGMENT = 17
    IN_PASS_NOT_VERIFIED = 18
    IN_PASS_PROTECTED = 19
    IN_PASS_NO_PROG = 20
    # egress: pass, drop, sent
    EG_SEEN = 32
    EG_PASS_NOT_OURS = 33
    EG_PASS_LONG_HEADER = 34
    EG_RENUMBERED = 35
    EG_SENT_CLONE = 36
    EG_DROP_NO_KEYS = 37
    EG_PASS_PROTECTED = 38
    EG_DROP_BAD_CLONE = 39
    EG_RING_FULL = 40
    EG_DROP_EMPTY = 41
    EG_PASS_UPSTREAM = 42
    EG_PASS_MALFORMED = 43
    EG_DROP_NO_PROG = 44
    EG_RESIZED = 45
    # egress punts
    PUNT_NO_SUBSCRIBER = 64
    PUNT_NO_CREDIT = 65
    PUNT_NO_STREAM_CREDIT = 66
    PUNT_NO_MAX_STREAMS = 67
    PUNT_NO_CWND = 68
    PUNT_PN_GROW = 69
    PUNT_SID_GROW = 70
    PUNT_CID_LEN = 71
    PUNT_FAMILY = 72
    PUNT_MAP_FULL = 73
    PUNT_FRAME_LIMIT = 74
    PUNT_BAD_FRAME = 75
    PUNT_NO_KEYS = 76
    PUNT_PROTECTED = 77
    PUNT_STREAM_OVERLAP = 78
    PUNT_RECORD_FRAMES = 79
    PUNT_USER_PN_GROW = 80
    PUNT_GSO = 81
    PUNT_ALIAS_WIDTH = 82
    PUNT_RESIZE_PARTIAL = 83
    PUNT_RESIZE_FAILED = 84

    @property
    def is_punt(self) -> bool:
        return self >= 64


#: Entries of fr_stats (FR_REASON_MAX).
REASON_MAX = 128
