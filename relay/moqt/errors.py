"""MoQT protocol errors: each carries the draft-14 session termination code it closes with.

Decoders raise these with exact messages; the session catches them in one place and closes the
connection with `error_code` and the message as reason phrase (section 3.4).
"""

from __future__ import annotations

from .constants import SessionErrorCode


class MoqtError(Exception):
    """A condition that terminates the MoQ session with `error_code`."""

    error_code: int = SessionErrorCode.INTERNAL_ERROR

    def __init__(self, reason_phrase: str, error_code: int | None = None) -> None:
        super().__init__(reason_phrase)
        self.reason_phrase = reason_phrase
        if error_code is not None:
            self.error_code = error_code


class ProtocolViolation(MoqtError):
    """The peer did something the draft forbids (PROTOCOL_VIOLATION, 0x3)."""

    error_code = SessionErrorCode.PROTOCOL_VIOLATION


class KeyValueFormattingError(MoqtError):
    """A Key-Value-Pair block cannot be parsed (KEY_VALUE_FORMATTING_ERROR, 0x6)."""

    error_code = SessionErrorCode.KEY_VALUE_FORMATTING_ERROR


class VersionNegotiationFailed(MoqtError):
    """No common MoQT version (VERSION_NEGOTIATION_FAILED, 0x15)."""

    error_code = SessionErrorCode.VERSION_NEGOTIATION_FAILED
