"""Stateless reset detection (RFC 9000 §10.3), the part aioquic 1.7.2 leaves out.

aioquic stores the peer's stateless reset tokens (transport parameter, NEW_CONNECTION_ID) but
never compares an incoming datagram with them, so a peer that lost its state and answers
with stateless resets keeps its connection (and, with the fast path, the kernel's copies)
alive until the idle timeout. `relay.quic.connection` calls this after a datagram could not
be associated with a connection or none of its packets decrypted; `relay.moqt.quic` for a
datagram whose connection id belongs to no connection.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

#: RFC 9000 §10.3: the token is the datagram's last 16 bytes.
STATELESS_RESET_TOKEN_SIZE = 16
#: RFC 9000 §10.3.1: shorter datagrams are never treated as a stateless reset (5 bytes of
#: unpredictable bits, including the first byte, then the token).
MIN_STATELESS_RESET_SIZE = 21
_LONG_HEADER = 0x80


def may_be_stateless_reset(datagram: bytes) -> bool:
    """Long enough and in short-header form (a reset is sent as one; the fixed bit may be
    greased, RFC 9287, so it is not required)."""
    return len(datagram) >= MIN_STATELESS_RESET_SIZE and not datagram[0] & _LONG_HEADER


def matches_stateless_reset(datagram: bytes, tokens: Iterable[bytes]) -> bool:
    """Whether the datagram's last 16 bytes equal one of `tokens`, compared in constant time
    (RFC 9000 §10.3.1: without leaking information about the token). Tokens of another
    length (aioquic's b"" for a connection id without one) never match."""
    if not may_be_stateless_reset(datagram):
        return False
    tail = datagram[-STATELESS_RESET_TOKEN_SIZE:]
    found = False
    for token in tokens:
        if len(token) == STATELESS_RESET_TOKEN_SIZE:
            # No short-circuit: every token is compared whatever the previous ones gave.
            found = hmac.compare_digest(tail, token) | found
    return found
