"""Shadow streams: the bytes the kernel forwarded, put into each subscriber stream's send buffer.

The kernel forwards a publisher's subgroup stream to a subscriber byte for byte (stream offsets
never shift; only the stream id changes), so the subscriber's aioquic stream must hold exactly
the upstream stream's bytes for loss recovery to resend them. Those bytes and the stream id
reach userspace independently: the original packet through the upstream connection (in stream
order), and the kernel's ring records (which subscriber stream id each copy got). Either may
come first. `ShadowStreams` writes each byte once, in order, as soon as both are known, and
keeps an upstream stream's bytes until it ended and lingered (a record may still name it).

A subscriber may know the track by another alias than the publisher (same varint width):
the kernel rewrites it in the subgroup header at offset 0, so the shadow copy does too
(`alias_of`), else a retransmission by aioquic would carry the publisher's alias.

Pure bookkeeping: the relay applies the `ShadowWrite`s to the connections.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from aioquic.buffer import Buffer

from relay.moqt.data import rewrite_track_alias, subgroup_header_layout

SessionId = int
UpstreamKey = tuple[SessionId, int]
"""(publisher session, upstream stream id)."""


@dataclass(frozen=True)
class ShadowWrite:
    session: SessionId
    stream_id: int
    offset: int
    data: bytes
    fin: bool


@dataclass
class _Copy:
    stream_id: int
    written: int = 0
    fin_written: bool = False


@dataclass
class _Upstream:
    data: bytearray = field(default_factory=bytearray)
    fin: bool = False
    ended_at: float | None = None
    copies: dict[SessionId, _Copy] = field(default_factory=dict)


AliasOf = Callable[[SessionId, SessionId, int], "int | None"]
"""(subscriber session, publisher session, upstream alias) -> the subscriber's alias."""


class ShadowStreams:
    def __init__(self, alias_of: AliasOf | None = None) -> None:
        self._streams: dict[UpstreamKey, _Upstream] = {}
        self._alias_of = alias_of
        self.bytes_written = 0

    def __len__(self) -> int:
        return len(self._streams)

    def data(self, key: UpstreamKey, data: bytes, fin: bool, now: float) -> list[ShadowWrite]:
        """In-order bytes of an upstream stream (as aioquic delivers them)."""
        up = self._streams.setdefault(key, _Upstream())
        up.data += data
        if fin:
            up.fin = True
            up.ended_at = now
        return [w for session, copy in up.copies.items()
                for w in self._catch_up(key, up, session, copy)]

    def ended(self, key: UpstreamKey, now: float) -> None:
        """The upstream stream was reset (or its publisher left): no more bytes will come."""
        up = self._streams.get(key)
        if up is not None and up.ended_at is None:
            up.ended_at = now

    def kernel_stream(self, session: SessionId, key: UpstreamKey, stream_id: int,
                      now: float) -> list[ShadowWrite]:
        """The kernel forwards `key` to `session` as `stream_id` (idempotent)."""
        up = self._streams.get(key)
        if up is None:
            up = self._streams[key] = _Upstream()
        copy = up.copies.get(session)
        if copy is None:
            copy = up.copies[session] = _Copy(stream_id)
        elif copy.stream_id != stream_id:
            raise ValueError(f"upstream stream {key} reached session {session} as "
                             f"{copy.stream_id} and {stream_id}")
        return self._catch_up(key, up, session, copy)

    def owner_stream(self, session: SessionId, key: UpstreamKey) -> int | None:
        """The subscriber stream id the kernel gave `key` for `session`, if it forwards it."""
        up = self._streams.get(key)
        copy = up.copies.get(session) if up is not None else None
        return copy.stream_id if copy is not None else None

    def upstream_of(self, session: SessionId, stream_id: int) -> UpstreamKey | None:
        for key, up in self._streams.items():
            copy = up.copies.get(session)
            if copy is not None and copy.stream_id == stream_id:
                return key
        return None

    def forget_session(self, session: SessionId) -> list[UpstreamKey]:
        """A subscriber left: its copies go; returns the upstream streams it had."""
        keys = []
        for key, up in self._streams.items():
            if up.copies.pop(session, None) is not None:
                keys.append(key)
        return keys

    def forget_publisher(self, publisher: SessionId, now: float) -> None:
        for key, up in self._streams.items():
            if key[0] == publisher and up.ended_at is None:
                up.ended_at = now

    def expire(self, now: float, linger: float) -> list[tuple[UpstreamKey, list[SessionId]]]:
        """Streams that ended at least `linger` seconds ago: forgotten, returned with the
        sessions that had a kernel copy (so their kernel entries can go too)."""
        done = [k for k, up in self._streams.items()
                if up.ended_at is not None and now - up.ended_at >= linger]
        return [(k, list(self._streams.pop(k).copies)) for k in done]

    def _catch_up(self, key: UpstreamKey, up: _Upstream, session: SessionId,
                  copy: _Copy) -> list[ShadowWrite]:
        start = copy.written
        end = len(up.data)
        fin = up.fin and not copy.fin_written
        if end == start and not fin:
            return []
        data = bytes(up.data[start:end])
        if start == 0 and self._alias_of is not None:
            layout = subgroup_header_layout(data)
            if layout is None:
                if not up.fin:
                    return []  # the header is not whole yet: its alias may need rewriting
            else:
                at, width = layout.track_alias_offset, layout.track_alias_width
                upstream_alias = Buffer(data=data[at:at + width]).pull_uint_var()
                alias = self._alias_of(session, key[0], upstream_alias)
                if alias is not None and alias != upstream_alias:
                    data = rewrite_track_alias(data, alias)
        copy.written = end
        copy.fin_written = copy.fin_written or up.fin
        self.bytes_written += end - start
        return [ShadowWrite(session, copy.stream_id, start, data, fin)]
