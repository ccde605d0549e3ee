"""`RelayCore`: events in (method calls), actions out (`relay.core.actions`). Pure, sans-I/O.

Ties together the track registry, per-connection aliases, the group cache and FETCH boundary
rule, the skip policy and access control, and keeps `RelayCounters`.

Data path (userspace): each upstream subgroup stream is reported as opened / object header /
payload chunk / ended. For every active subscription of the track the core decides ONCE at the
start of that subscriber's subgroup stream: not in its range (nothing), skipped (whole
subgroup, counted, `SkipSubgroup`), or forwarded (`OpenSubgroupStream` then `WriteStream`s).
A stream opened at the upstream's offset 0 for a subscriber whose range covers the whole group
keeps the upstream's header with the subscriber's alias (`fast_path` = alias of the same
width); a subscriber that joins mid-stream gets its own stream from its first in-range object,
with an explicit Subgroup ID, userspace only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aioquic.buffer import Buffer

from relay.moqt.constants import (
    SUBGROUP_ID_FIRST_OBJECT_BIT,
    SUBGROUP_ID_PRESENT_BIT,
    FetchErrorCode,
    FetchType,
    FilterType,
    GroupOrder,
    MessageParameter,
    ObjectStatus,
    PublishDoneStatusCode,
    PublishNamespaceErrorCode,
    SetupParameter,
    StreamResetCode,
    SubscribeErrorCode,
)
from relay.moqt.data import (
    FetchObject,
    ObjectDatagram,
    ObjectHeader,
    SubgroupHeader,
    SubgroupIdMode,
)
from relay.moqt.messages import (
    Fetch,
    FetchError,
    FetchOk,
    Location,
    Parameters,
    PublishDone,
    PublishNamespace,
    PublishNamespaceError,
    PublishNamespaceOk,
    Subscribe,
    SubscribeError,
    SubscribeOk,
    TrackNamespace,
)

from .access import AccessConfig, AccessControl, SessionAuth, TokenError
from .actions import (
    Action,
    CloseSession,
    OpenSubgroupStream,
    ResetStream,
    SendDatagram,
    SendFetchObjects,
    SendMessage,
    SessionId,
    SetPriorityThreshold,
    SkipSubgroup,
    WriteStream,
)
from .cache import (
    AddResult,
    CacheConfig,
    CachedObject,
    FetchRangeError,
    joining_fetch_range,
    standalone_fetch_range,
    stream_blocks_fetch,
)
from .priority import (
    THRESHOLD_FORWARD_ALL,
    CongestionState,
    SkipPolicy,
    SkipReason,
    should_forward,
)
from .tracks import DownstreamSubscription, Track, TrackRegistry


@dataclass(frozen=True)
class RelayConfig:
    cache: CacheConfig = field(default_factory=CacheConfig)
    access: AccessConfig = field(default_factory=AccessConfig.open)
    skip_policy: SkipPolicy = field(default_factory=SkipPolicy)
    upstream_relay: bool = False
    """Unknown tracks are subscribed upstream (SubscribeUpstream with publisher None)."""
    fetch_wait: float = 0.5
    """Seconds a FETCH may wait for open upstream streams to pass its end (boundary rule)."""
    max_buffered_bytes: int = 1 << 20
    """Per publisher session: data for an alias not yet known (races SUBSCRIBE_OK)."""


@dataclass
class RelayCounters:
    objects_in: int = 0
    bytes_in: int = 0
    objects_out: int = 0
    bytes_out: int = 0
    streams_opened: int = 0
    fast_path_streams: int = 0
    skipped: dict[SessionId, dict[str, int]] = field(default_factory=dict)
    cache_hits: int = 0
    cache_misses: int = 0
    cache_oversize_objects: int = 0
    cache_truncated_groups: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    fetches_served: int = 0
    fetch_wait_timeouts: int = 0
    boundary_late_objects: int = 0
    buffered_unknown_alias_bytes: int = 0
    dropped_unknown_alias_bytes: int = 0
    datagrams_in: int = 0

    def skip(self, session: SessionId, reason: SkipReason) -> None:
        per = self.skipped.setdefault(session, {})
        per[reason.value] = per.get(reason.value, 0) + 1

    def unskip(self, session: SessionId, reason: str) -> None:
        """A counted skip did not happen after all (the fast path had already forwarded
        the subgroup's first bytes under the previous threshold)."""
        per = self.skipped.get(session, {})
        if per.get(reason, 0) > 0:
            per[reason] -= 1
            if not per[reason]:
                del per[reason]
            if not per:
                del self.skipped[session]

    def refuse(self, what: str) -> None:
        self.refusals[what] = self.refusals.get(what, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (string keys) for `fastrelay stats --json`."""
        result = dict(self.__dict__)
        result["skipped"] = {str(s): dict(r) for s, r in self.skipped.items()}
        result["refusals"] = dict(self.refusals)
        return result


# -- per upstream stream state -----------------------------------------------------------------

UNDECIDED, FORWARD, SKIP, OUT_OF_RANGE = "undecided", "forward", "skip", "out_of_range"


@dataclass
class _Down:
    state: str = UNDECIDED
    stream: int | None = None
    previous_object_id: int | None = None
    has_extensions: bool = False
    in_object: bool = False


@dataclass
class _Up:
    publisher: SessionId
    stream_id: int
    header: SubgroupHeader
    track: Track | None
    buffered: list[tuple[str, Any]] = field(default_factory=list)
    buffered_bytes: int = 0
    subgroup_id: int | None = None
    objects_seen: int = 0
    current: ObjectHeader | None = None
    chunks: list[bytes] = field(default_factory=list)
    received: int = 0
    downs: dict[tuple[SessionId, int], _Down] = field(default_factory=dict)

    def next_location(self) -> Location:
        """The smallest Location this stream can still deliver (see cache.py)."""
        if self.current is None:
            return Location(self.header.group_id, 0)
        if self.received < self.current.payload_length:
            return Location(self.header.group_id, self.current.object_id)
        return Location(self.header.group_id, self.current.object_id + 1)


@dataclass
class _PendingFetch:
    session: SessionId
    request_id: int
    track: Track
    start: Location
    end: Location
    group_order: GroupOrder
    deadline: float
    joining: DownstreamSubscription | None = None


def _tokens(parameters: Parameters, kind: int) -> list[bytes]:
    return [v for k, v in parameters if k == kind and isinstance(v, bytes)]


def _object_prefix(header: ObjectHeader, previous: int | None, has_extensions: bool) -> bytes:
    """An object's fields before its payload on a subgroup stream (draft-14 10.4.2)."""
    delta = header.object_id if previous is None else header.object_id - previous - 1
    buf = Buffer(capacity=40 + len(header.extensions))
    buf.push_uint_var(delta)
    if has_extensions:
        buf.push_uint_var(len(header.extensions))
        buf.push_bytes(header.extensions)
    buf.push_uint_var(header.payload_length)
    if header.payload_length == 0:
        buf.push_uint_var(header.status)
    return buf.data


class RelayCore:
    def __init__(self, config: RelayConfig | None = None) -> None:
        self.config = config or RelayConfig()
        self.registry = TrackRegistry(upstream_relay=self.config.upstream_relay,
                                      cache_config=self.config.cache)
        self.access = AccessControl(self.config.access)
        self.counters = RelayCounters()
        self._auth: dict[SessionId, SessionAuth] = {}
        self._thresholds: dict[SessionId, int] = {}
        self._streams: dict[tuple[SessionId, int], _Up] = {}
        self._buffered: dict[SessionId, int] = {}
        self._fetches: list[_PendingFetch] = []
        self._waiting_fetches: dict[tuple[SessionId, int], list[tuple[Fetch, float]]] = {}
        self._next_stream: dict[SessionId, int] = {}

    # -- sessions --------------------------------------------------------------------------

    def session_open(self, session: SessionId, setup_parameters: Parameters = (),
                     now: float = 0.0) -> list[Action]:
        try:
            self._auth[session] = self.access.setup(
                _tokens(setup_parameters, SetupParameter.AUTHORIZATION_TOKEN))
        except TokenError as exc:
            self.counters.refuse("setup")
            return [CloseSession(session, exc.session_code, str(exc))]
        self._thresholds[session] = THRESHOLD_FORWARD_ALL
        return []

    def session_closed(self, session: SessionId, now: float = 0.0) -> list[Action]:
        self._auth.pop(session, None)
        self._thresholds.pop(session, None)
        self._next_stream.pop(session, None)
        self._buffered.pop(session, None)
        self._fetches = [f for f in self._fetches if f.session != session]
        gone, actions = self.registry.session_closed(session)
        for sub in gone:
            actions += self._detach(sub, reset=sub.session != session)
        for key in [k for k in self._streams if k[0] == session]:
            del self._streams[key]
        actions = [a for a in actions if getattr(a, "session", None) != session]
        return actions + self._check_fetches(now)

    def may_discover(self, session: SessionId, namespace: TrackNamespace) -> bool:
        """Whether PUBLISH_NAMESPACE for `namespace` may be pushed to `session`: the principal
        of its CLIENT_SETUP token may subscribe there (namespace names are not handed to
        those who may not read them)."""
        auth = self._auth.get(session) or SessionAuth()
        return self.access.may_subscribe(auth.principal, namespace)

    def _principal(self, session: SessionId, parameters: Parameters) -> str:
        auth = self._auth.setdefault(session, SessionAuth())
        return self.access.request_principal(
            auth, _tokens(parameters, MessageParameter.AUTHORIZATION_TOKEN))

    # -- publishers ------------------------------------------------------------------------

    def publish_namespace(self, session: SessionId, msg: PublishNamespace,
                          now: float = 0.0) -> list[Action]:
        def refuse(code: int, reason: str) -> list[Action]:
            self.counters.refuse("publish_namespace")
            return [SendMessage(session, PublishNamespaceError(msg.request_id, code, reason))]

        try:
            principal = self._principal(session, msg.parameters)
        except TokenError as exc:
            if exc.request_code is None:
                return [CloseSession(session, exc.session_code, str(exc))]
            return refuse(exc.request_code, str(exc))
        if not self.access.may_publish(principal, msg.track_namespace):
            return refuse(PublishNamespaceErrorCode.UNAUTHORIZED, "Not allowed to publish here")
        code = self.registry.publish_namespace(session, msg.track_namespace, principal)
        if code is not None:
            return refuse(code, "Namespace is published by another principal")
        return [SendMessage(session, PublishNamespaceOk(msg.request_id))]

    def publish_namespace_done(self, session: SessionId, namespace: TrackNamespace,
                               now: float = 0.0) -> list[Action]:
        self.registry.publish_namespace_done(session, namespace)
        return []

    def upstream_subscribe_ok(self, upstream_id: int, publisher: SessionId, msg: SubscribeOk,
                              now: float = 0.0) -> list[Action]:
        track, activated, actions = self.registry.upstream_ok(upstream_id, publisher, msg)
        for sub in activated:
            actions += self._release_waiting_fetches(sub, now)
        if track is not None:
            for up in [u for u in self._streams.values()
                       if u.track is None and u.publisher == publisher
                       and u.header.track_alias == msg.track_alias]:
                actions += self._replay(up, track, now)
        return actions

    def upstream_subscribe_error(self, upstream_id: int, msg: SubscribeError,
                                 now: float = 0.0) -> list[Action]:
        return self.registry.upstream_error(upstream_id, msg)

    def upstream_publish_done(self, upstream_id: int, msg: PublishDone,
                              now: float = 0.0) -> list[Action]:
        track = self.registry.by_upstream.get(upstream_id)
        if track is None:
            return []
        subs, actions = self.registry.end_track(track, msg.status_code, msg.reason_phrase)
        for sub in subs:
            self._detach(sub, reset=False)
        return actions

    # -- subscribers -----------------------------------------------------------------------

    def subscribe(self, session: SessionId, msg: Subscribe, now: float = 0.0) -> list[Action]:
        try:
            principal = self._principal(session, msg.parameters)
        except TokenError as exc:
            if exc.request_code is None:
                return [CloseSession(session, exc.session_code, str(exc))]
            self.counters.refuse("subscribe")
            return [SendMessage(session, SubscribeError(msg.request_id, exc.request_code,
                                                        str(exc)))]
        if not self.access.may_subscribe(principal, msg.track_namespace):
            self.counters.refuse("subscribe")
            return [SendMessage(session, SubscribeError(
                msg.request_id, SubscribeErrorCode.UNAUTHORIZED, "Not allowed to subscribe"))]
        sub, actions = self.registry.subscribe(session, msg)
        if sub is None:
            self.counters.refuse("subscribe")
        return actions

    def unsubscribe(self, session: SessionId, request_id: int, now: float = 0.0) -> list[Action]:
        sub, actions = self.registry.unsubscribe(session, request_id)
        if sub is not None:
            actions = self._detach(sub, reset=True) + actions
        return actions

    def congestion(self, session: SessionId, state: CongestionState,
                   now: float = 0.0) -> list[Action]:
        threshold = self.config.skip_policy.threshold(state)
        if self._thresholds.get(session, THRESHOLD_FORWARD_ALL) == threshold:
            return []
        self._thresholds[session] = threshold
        return [SetPriorityThreshold(session, threshold)]

    def _detach(self, sub: DownstreamSubscription, *, reset: bool) -> list[Action]:
        actions: list[Action] = []
        for up in self._streams.values():
            down = up.downs.pop(sub.key, None)
            if down is not None and down.state == FORWARD and reset:
                assert down.stream is not None
                actions.append(ResetStream(sub.session, down.stream, StreamResetCode.CANCELLED))
        self._fetches = [f for f in self._fetches if f.joining is not sub]
        return actions

    # -- FETCH -----------------------------------------------------------------------------

    def fetch(self, session: SessionId, msg: Fetch, now: float = 0.0) -> list[Action]:
        def refuse(code: int, reason: str) -> list[Action]:
            self.counters.refuse("fetch")
            return [SendMessage(session, FetchError(msg.request_id, code, reason))]

        if msg.fetch_type == FetchType.STANDALONE:
            assert msg.standalone is not None
            sa = msg.standalone
            try:
                principal = self._principal(session, msg.parameters)
            except TokenError as exc:
                return refuse(exc.request_code or FetchErrorCode.UNAUTHORIZED, str(exc))
            if not self.access.may_subscribe(principal, sa.track_namespace):
                return refuse(FetchErrorCode.UNAUTHORIZED, "Not allowed to fetch")
            track = self.registry.tracks.get((sa.track_namespace, sa.track_name))
            if track is None:
                return refuse(FetchErrorCode.TRACK_DOES_NOT_EXIST, "Track is not cached here")
            try:
                start, end = standalone_fetch_range(sa.start_location, sa.end_location,
                                                    track.largest)
            except FetchRangeError as exc:
                return refuse(exc.code, str(exc))
            order = track.group_order if msg.group_order == GroupOrder.PUBLISHER \
                else msg.group_order
            self._fetches.append(_PendingFetch(session, msg.request_id, track, start, end,
                                               order, now + self.config.fetch_wait))
            return self._check_fetches(now)
        assert msg.joining is not None
        sub = self.registry.subscriptions.get((session, msg.joining.joining_request_id))
        if sub is None or sub.filter_type != FilterType.LARGEST_OBJECT:
            return refuse(FetchErrorCode.INVALID_JOINING_REQUEST_ID,
                          "No Largest Object subscription with that request id")
        if not sub.active:
            self._waiting_fetches.setdefault(sub.key, []).append((msg, now))
            return []
        return self._joining_fetch(sub, msg, now)

    def fetch_cancel(self, session: SessionId, request_id: int, now: float = 0.0) -> list[Action]:
        self._fetches = [f for f in self._fetches
                         if (f.session, f.request_id) != (session, request_id)]
        return []

    def _release_waiting_fetches(self, sub: DownstreamSubscription, now: float) -> list[Action]:
        actions: list[Action] = []
        for msg, _ in self._waiting_fetches.pop(sub.key, []):
            actions += self._joining_fetch(sub, msg, now)
        return actions

    def _joining_fetch(self, sub: DownstreamSubscription, msg: Fetch, now: float
                       ) -> list[Action]:
        assert msg.joining is not None
        try:
            start, end = joining_fetch_range(msg.fetch_type, msg.joining.joining_start,
                                             sub.largest_at_start)
        except FetchRangeError as exc:
            self.counters.refuse("fetch")
            return [SendMessage(sub.session, FetchError(msg.request_id, exc.code, str(exc)))]
        order = sub.resolved_group_order() if msg.group_order == GroupOrder.PUBLISHER \
            else msg.group_order
        self._fetches.append(_PendingFetch(sub.session, msg.request_id, sub.track, start, end,
                                           order, now + self.config.fetch_wait, sub))
        return self._check_fetches(now)

    def poll(self, now: float) -> list[Action]:
        """Timers: answer FETCHes whose boundary wait expired."""
        return self._check_fetches(now)

    def next_deadline(self) -> float | None:
        return min((f.deadline for f in self._fetches), default=None)

    def _check_fetches(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for pending in list(self._fetches):
            blocked = any(
                up.track is pending.track and stream_blocks_fetch(up.next_location(), pending.end)
                for up in self._streams.values())
            if blocked and now < pending.deadline:
                continue
            if blocked:
                self.counters.fetch_wait_timeouts += 1
            self._fetches.remove(pending)
            actions += self._serve_fetch(pending)
        return actions

    def _serve_fetch(self, f: _PendingFetch) -> list[Action]:
        def refuse(code: int, reason: str) -> list[Action]:
            self.counters.refuse("fetch")
            return [SendMessage(f.session, FetchError(f.request_id, code, reason))]

        if f.joining is not None:
            f.joining.joining_fetch_answered = True
        cache = f.track.cache
        if not cache.covers(f.start):
            self.counters.cache_misses += 1
            return refuse(FetchErrorCode.UNKNOWN_STATUS_IN_RANGE,
                          "Range starts before what this relay holds")
        objects = cache.objects(f.start, f.end, f.group_order)
        if not objects:
            self.counters.cache_misses += 1
            return refuse(FetchErrorCode.NO_OBJECTS, "No objects in range")
        self.counters.cache_hits += 1
        self.counters.fetches_served += 1
        end_of_track = any(o.status == ObjectStatus.END_OF_TRACK for o in objects)
        end = max(o.location for o in objects)
        fetch_objects = tuple(FetchObject(o.group_id, o.subgroup_id, o.object_id,
                                          o.publisher_priority, o.payload, o.extensions,
                                          o.status) for o in objects)
        for o in objects:
            self.counters.objects_out += 1
            self.counters.bytes_out += len(o.payload)
        return [SendMessage(f.session, FetchOk(f.request_id, f.group_order, end_of_track, end)),
                SendFetchObjects(f.session, f.request_id, fetch_objects)]

    # -- upstream data ---------------------------------------------------------------------

    def subgroup_stream_opened(self, publisher: SessionId, stream_id: int,
                               header: SubgroupHeader, now: float = 0.0) -> list[Action]:
        track = self.registry.by_alias.get((publisher, header.track_alias))
        up = _Up(publisher, stream_id, header, track, subgroup_id=header.subgroup_id)
        self._streams[(publisher, stream_id)] = up
        if track is None:
            return []
        return self._on_open(up, now)

    def object_header(self, publisher: SessionId, stream_id: int, header: ObjectHeader,
                      now: float = 0.0) -> list[Action]:
        up = self._streams.get((publisher, stream_id))
        if up is None:
            return []
        if up.track is None:
            return self._buffer(up, ("header", header), 0)
        return self._on_object(up, header, now)

    def object_payload(self, publisher: SessionId, stream_id: int, data: bytes, end: bool,
                       now: float = 0.0) -> list[Action]:
        up = self._streams.get((publisher, stream_id))
        if up is None:
            return []
        if up.track is None:
            return self._buffer(up, ("payload", (data, end)), len(data))
        return self._on_payload(up, data, end, now)

    def subgroup_stream_ended(self, publisher: SessionId, stream_id: int, now: float = 0.0,
                              reset_code: int | None = None) -> list[Action]:
        up = self._streams.pop((publisher, stream_id), None)
        if up is None:
            return []
        if up.track is None:
            self._buffered[publisher] = self._buffered.get(publisher, 0) - up.buffered_bytes
            self.counters.dropped_unknown_alias_bytes += up.buffered_bytes
            return []
        actions: list[Action] = []
        for (session, _), down in up.downs.items():
            if down.state != FORWARD:
                continue
            assert down.stream is not None
            if reset_code is None:
                actions.append(WriteStream(session, down.stream, b"", fin=True))
            else:
                actions.append(ResetStream(session, down.stream, reset_code))
        return actions + self._check_fetches(now)

    def object_datagram(self, publisher: SessionId, datagram: ObjectDatagram,
                        now: float = 0.0) -> list[Action]:
        """An OBJECT_DATAGRAM from a publisher (its session held it until SUBSCRIBE_OK named
        the alias). Each subscriber in range gets it under its own alias unless its skip
        threshold is below the datagram's priority (counted like a skipped subgroup); it is
        cached for FETCH with Subgroup ID = Object ID (draft-14: datagrams have none)."""
        track = self.registry.by_alias.get((publisher, datagram.track_alias))
        if track is None:
            self.counters.dropped_unknown_alias_bytes += len(datagram.payload)
            return []
        location = Location(datagram.group_id, datagram.object_id)
        track.see(location)
        self.counters.objects_in += 1
        self.counters.bytes_in += len(datagram.payload)
        self.counters.datagrams_in += 1
        actions: list[Action] = []
        for sub in [s for s in track.subscribers.values() if s.active]:
            if sub.end_group is not None and datagram.group_id > sub.end_group:
                actions += self._end_range(sub)
                continue
            if location < sub.start:
                continue
            threshold = self._thresholds.get(sub.session, THRESHOLD_FORWARD_ALL)
            if not should_forward(datagram.publisher_priority, threshold):
                self.counters.skip(sub.session, SkipReason.CONGESTION)
                continue
            actions.append(SendDatagram(sub.session, sub.request_id, datagram, publisher))
            self.counters.objects_out += 1
            self.counters.bytes_out += len(datagram.payload)
        result = track.cache.add(CachedObject(
            datagram.group_id, datagram.object_id, datagram.object_id,
            datagram.publisher_priority, datagram.payload, datagram.extensions,
            datagram.status))
        if result is AddResult.OVERSIZE:
            self.counters.cache_oversize_objects += 1
        if result in (AddResult.OVERSIZE, AddResult.GROUP_TRUNCATED):
            self.counters.cache_truncated_groups += 1
        return actions + self._check_fetches(now)

    def _buffer(self, up: _Up, event: tuple[str, Any], size: int) -> list[Action]:
        used = self._buffered.get(up.publisher, 0)
        if used + size > self.config.max_buffered_bytes:
            self.counters.dropped_unknown_alias_bytes += size
            return []
        self._buffered[up.publisher] = used + size
        up.buffered.append(event)
        up.buffered_bytes += size
        self.counters.buffered_unknown_alias_bytes += size
        return []

    def _replay(self, up: _Up, track: Track, now: float) -> list[Action]:
        up.track = track
        self._buffered[up.publisher] = self._buffered.get(up.publisher, 0) - up.buffered_bytes
        events, up.buffered, up.buffered_bytes = up.buffered, [], 0
        actions = self._on_open(up, now)
        for kind, value in events:
            if kind == "header":
                actions += self._on_object(up, value, now)
            else:
                actions += self._on_payload(up, value[0], value[1], now)
        return actions

    def _on_open(self, up: _Up, now: float) -> list[Action]:
        assert up.track is not None
        actions: list[Action] = []
        group = up.header.group_id
        for sub in [s for s in up.track.subscribers.values() if s.active]:
            if sub.end_group is not None and group > sub.end_group:
                up.downs[sub.key] = _Down(OUT_OF_RANGE)
                actions += self._end_range(sub)
            elif Location(group, 0) >= sub.start:
                actions += self._decide(up, sub, offset_zero=True)
            elif group < sub.start.group:
                up.downs[sub.key] = _Down(OUT_OF_RANGE)
        return actions

    def _end_range(self, sub: DownstreamSubscription) -> list[Action]:
        self._detach(sub, reset=False)
        return self.registry.end_subscription(sub, PublishDoneStatusCode.SUBSCRIPTION_ENDED,
                                              "Subscription range ended")

    def _decide(self, up: _Up, sub: DownstreamSubscription, *, offset_zero: bool
                ) -> list[Action]:
        """The one decision per (subgroup, subscriber), at the start of its stream."""
        threshold = self._thresholds.get(sub.session, THRESHOLD_FORWARD_ALL)
        prio = up.header.publisher_priority
        if not should_forward(prio, threshold):
            up.downs[sub.key] = _Down(SKIP)
            self.counters.skip(sub.session, SkipReason.CONGESTION)
            return [SkipSubgroup(sub.session, sub.request_id, up.header.group_id, up.subgroup_id,
                                 prio, threshold, SkipReason.CONGESTION.value,
                                 (up.publisher, up.stream_id))]
        assert sub.alias is not None
        h = up.header
        if offset_zero:
            header = SubgroupHeader(h.stream_type, sub.alias, h.group_id, h.subgroup_id,
                                    h.publisher_priority)
        else:
            stream_type = h.stream_type
            subgroup_id = up.subgroup_id
            if h.subgroup_id_mode == SubgroupIdMode.FIRST_OBJECT:
                stream_type = (stream_type & ~SUBGROUP_ID_FIRST_OBJECT_BIT) | \
                    SUBGROUP_ID_PRESENT_BIT
            header = SubgroupHeader(stream_type, sub.alias, h.group_id, subgroup_id,
                                    h.publisher_priority)
        stream = self._next_stream.get(sub.session, 0)
        self._next_stream[sub.session] = stream + 1
        down = _Down(FORWARD, stream, has_extensions=header.has_extensions)
        up.downs[sub.key] = down
        sub.streams_opened += 1
        fast = offset_zero and sub.fast_path
        self.counters.streams_opened += 1
        self.counters.fast_path_streams += int(fast)
        return [OpenSubgroupStream(sub.session, stream, sub.request_id, header, fast,
                                   (up.publisher, up.stream_id))]

    def _on_object(self, up: _Up, header: ObjectHeader, now: float) -> list[Action]:
        track = up.track
        assert track is not None
        if up.subgroup_id is None:
            up.subgroup_id = header.subgroup_id
        first = up.objects_seen == 0
        up.objects_seen += 1
        up.current, up.chunks, up.received = header, [], 0
        location = Location(header.group_id, header.object_id)
        track.see(location)
        self.counters.objects_in += 1
        actions: list[Action] = []
        for sub in [s for s in track.subscribers.values() if s.active]:
            down = up.downs.get(sub.key)
            if down is None or down.state == UNDECIDED:
                if location < sub.start:
                    if sub.joining_fetch_answered and sub.largest_at_start is not None \
                            and location <= sub.largest_at_start:
                        self.counters.boundary_late_objects += 1
                    up.downs.setdefault(sub.key, _Down())
                    continue
                actions += self._decide(up, sub, offset_zero=first)
                down = up.downs[sub.key]
            if down.state != FORWARD:
                continue
            assert down.stream is not None
            prefix = _object_prefix(header, down.previous_object_id, down.has_extensions)
            down.previous_object_id = header.object_id
            down.in_object = header.payload_length > 0
            actions.append(WriteStream(sub.session, down.stream, prefix))
            self.counters.objects_out += 1
        if header.payload_length == 0:
            actions += self._complete(up, now)
        return actions

    def _on_payload(self, up: _Up, data: bytes, end: bool, now: float) -> list[Action]:
        up.chunks.append(data)
        up.received += len(data)
        self.counters.bytes_in += len(data)
        actions: list[Action] = []
        for (session, _), down in up.downs.items():
            if down.state == FORWARD and down.in_object:
                assert down.stream is not None
                actions.append(WriteStream(session, down.stream, data))
                self.counters.bytes_out += len(data)
                if end:
                    down.in_object = False
        if end:
            actions += self._complete(up, now)
        return actions

    def _complete(self, up: _Up, now: float) -> list[Action]:
        header = up.current
        assert header is not None and up.track is not None
        result = up.track.cache.add(CachedObject(
            header.group_id, header.subgroup_id, header.object_id, header.publisher_priority,
            b"".join(up.chunks), header.extensions, header.status))
        up.chunks = []
        if result is AddResult.OVERSIZE:
            self.counters.cache_oversize_objects += 1
        if result in (AddResult.OVERSIZE, AddResult.GROUP_TRUNCATED):
            self.counters.cache_truncated_groups += 1
        return self._check_fetches(now)
