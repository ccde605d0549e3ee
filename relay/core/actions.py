"""What the relay core asks the glue to do. Every action is a frozen dataclass.

Sessions are opaque ints chosen by the glue. Upstream subscriptions are named by the core's
`upstream_id` (the glue maps it to a request id on the session it sends the SUBSCRIBE on).
Downstream data streams are named by the core's `stream` handle, unique per session (the glue
maps it to a QUIC stream id it reserves).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from relay.moqt.constants import FilterType, GroupOrder
from relay.moqt.data import (
    FetchHeader,
    FetchObject,
    ObjectDatagram,
    SubgroupHeader,
    encode_fetch_stream,
)
from relay.moqt.messages import Message, TrackNamespace

SessionId = int


@dataclass(frozen=True)
class SendMessage:
    """Write a control message (SubscribeOk, SubscribeError, PublishDone, FetchOk, FetchError,
    PublishNamespaceOk, PublishNamespaceError, ...) on the session's control stream."""

    session: SessionId
    message: Message


@dataclass(frozen=True)
class SubscribeUpstream:
    """Send SUBSCRIBE for this track: to `publisher`, or (None) to the configured upstream
    relay; the glue answers with `RelayCore.upstream_subscribe_ok/_error(upstream_id, ...)`."""

    upstream_id: int
    publisher: SessionId | None
    track_namespace: TrackNamespace
    track_name: bytes
    subscriber_priority: int
    group_order: GroupOrder
    filter_type: FilterType = FilterType.LARGEST_OBJECT
    forward: bool = True


@dataclass(frozen=True)
class UnsubscribeUpstream:
    upstream_id: int
    publisher: SessionId | None


@dataclass(frozen=True)
class OpenSubgroupStream:
    """Open a unidirectional stream to `session` and write `header` first.

    `fast_path`: this stream's bytes equal the upstream stream's from offset 0 with only the
    track alias rewritten in place (same width), so the kernel may forward it instead.
    """

    session: SessionId
    stream: int
    request_id: int
    header: SubgroupHeader
    fast_path: bool
    upstream: tuple[SessionId, int]
    """(publisher session, upstream stream id) it copies."""


@dataclass(frozen=True)
class WriteStream:
    session: SessionId
    stream: int
    data: bytes
    fin: bool = False


@dataclass(frozen=True)
class ResetStream:
    session: SessionId
    stream: int
    error_code: int


@dataclass(frozen=True)
class SendFetchObjects:
    """Open a fetch stream (FETCH_HEADER with `request_id`), write the objects, FIN."""

    session: SessionId
    request_id: int
    objects: tuple[FetchObject, ...]

    def encode(self) -> bytes:
        return encode_fetch_stream(FetchHeader(self.request_id), self.objects)


@dataclass(frozen=True)
class SendDatagram:
    """Send an upstream OBJECT_DATAGRAM to this subscription under its alias, every other
    field unchanged (too big for the subscriber's path: dropped and counted by the glue)."""

    session: SessionId
    request_id: int
    datagram: ObjectDatagram
    """As received from upstream: its alias is the upstream's."""
    publisher: SessionId
    """The session it came from (the fast path clones forwarded tracks' datagrams itself)."""


@dataclass(frozen=True)
class SkipSubgroup:
    """A whole subgroup was not forwarded to this subscription (counted; informational)."""

    session: SessionId
    request_id: int
    group_id: int
    subgroup_id: int | None
    publisher_priority: int
    threshold: int
    reason: str
    upstream: tuple[SessionId, int] | None = None
    """(publisher session, upstream stream id) skipped, when it is a stream."""


@dataclass(frozen=True)
class SetPriorityThreshold:
    """The subscriber's skip threshold changed: write it into the fast path's map."""

    session: SessionId
    threshold: int


@dataclass(frozen=True)
class CloseSession:
    session: SessionId
    error_code: int
    reason: str


Action = Union[SendMessage, SubscribeUpstream, UnsubscribeUpstream, OpenSubgroupStream,
               WriteStream, ResetStream, SendFetchObjects, SendDatagram, SkipSubgroup,
               SetPriorityThreshold, CloseSession]
