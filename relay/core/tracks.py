"""Track registry: namespaces and their publishers, tracks, and ONE upstream subscription per
track however many downstream subscribers it has.

- The first SUBSCRIBE for a track sends SUBSCRIBE upstream (to the publisher of the longest
  published namespace prefix, else to the configured upstream relay, else SUBSCRIBE_ERROR
  TRACK_DOES_NOT_EXIST). Later ones attach. Every waiting subscriber gets SUBSCRIBE_OK when
  the upstream answers (its own alias, see `aliases`), or the upstream's SUBSCRIBE_ERROR code.
- The last subscriber gone sends UNSUBSCRIBE upstream and forgets the track (and its cache).
- PUBLISH_DONE from upstream, or the publisher session gone, sends PUBLISH_DONE to every
  subscriber of its tracks (the upstream status; GOING_AWAY for a vanished session).
- An active namespace cannot be published by a different principal (UNAUTHORIZED); the same
  principal on another session adds a route, the newest one is used for new tracks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.moqt.constants import (
    FilterType,
    GroupOrder,
    PublishDoneStatusCode,
    PublishNamespaceErrorCode,
    SubscribeErrorCode,
)
from relay.moqt.messages import (
    Location,
    PublishDone,
    Subscribe,
    SubscribeError,
    SubscribeOk,
    TrackNamespace,
)

from .actions import Action, SendMessage, SessionId, SubscribeUpstream, UnsubscribeUpstream
from .aliases import AliasSpace
from .cache import CacheConfig, TrackCache, subscription_start

FullTrackName = tuple[TrackNamespace, bytes]
STREAM_COUNT_UNKNOWN = (1 << 62) - 1
UPSTREAM_SUBSCRIBER_PRIORITY = 128
"""The relay's own subscriber priority upstream: the middle of 0..255, no subscriber's."""


@dataclass(eq=False)
class DownstreamSubscription:
    session: SessionId
    request_id: int
    track: Track
    subscriber_priority: int
    group_order: GroupOrder
    filter_type: FilterType
    start_location: Location | None = None
    end_group: int | None = None
    active: bool = False
    alias: int | None = None
    fast_path: bool = False
    largest_at_start: Location | None = None
    """The boundary snapshot L (None: the track had no object)."""
    start: Location = Location(0, 0)
    """First Location delivered live."""
    streams_opened: int = 0
    joining_fetch_answered: bool = False

    @property
    def key(self) -> tuple[SessionId, int]:
        return (self.session, self.request_id)

    def resolved_group_order(self) -> GroupOrder:
        if self.group_order == GroupOrder.PUBLISHER:
            return self.track.group_order
        return self.group_order


@dataclass(eq=False)
class Track:
    namespace: TrackNamespace
    name: bytes
    publisher: SessionId | None
    upstream_id: int
    cache: TrackCache
    upstream_active: bool = False
    upstream_session: SessionId | None = None
    upstream_alias: int | None = None
    largest: Location | None = None
    group_order: GroupOrder = GroupOrder.ASCENDING
    subscribers: dict[tuple[SessionId, int], DownstreamSubscription] = field(default_factory=dict)

    @property
    def full_name(self) -> FullTrackName:
        return (self.namespace, self.name)

    def see(self, location: Location) -> None:
        if self.largest is None or location > self.largest:
            self.largest = location


@dataclass
class NamespaceOwner:
    principal: str
    sessions: list[SessionId] = field(default_factory=list)


class TrackRegistry:
    def __init__(self, *, upstream_relay: bool = False,
                 cache_config: CacheConfig | None = None) -> None:
        self.upstream_relay = upstream_relay
        self.cache_config = cache_config or CacheConfig()
        self.namespaces: dict[TrackNamespace, NamespaceOwner] = {}
        self.tracks: dict[FullTrackName, Track] = {}
        self.by_upstream: dict[int, Track] = {}
        self.by_alias: dict[tuple[SessionId, int], Track] = {}
        self.subscriptions: dict[tuple[SessionId, int], DownstreamSubscription] = {}
        self.alias_spaces: dict[SessionId, AliasSpace] = {}
        self._next_upstream_id = 0

    # -- namespaces ----------------------------------------------------------------------------

    def publish_namespace(self, session: SessionId, namespace: TrackNamespace,
                          principal: str) -> int | None:
        """Register a publisher; None = accepted, else a PUBLISH_NAMESPACE_ERROR code."""
        owner = self.namespaces.get(namespace)
        if owner is not None and owner.sessions and owner.principal != principal:
            return PublishNamespaceErrorCode.UNAUTHORIZED
        if owner is None or not owner.sessions:
            owner = self.namespaces[namespace] = NamespaceOwner(principal)
        if session in owner.sessions:
            owner.sessions.remove(session)
        owner.sessions.append(session)
        return None

    def publish_namespace_done(self, session: SessionId, namespace: TrackNamespace) -> None:
        owner = self.namespaces.get(namespace)
        if owner is not None and session in owner.sessions:
            owner.sessions.remove(session)
            if not owner.sessions:
                del self.namespaces[namespace]

    def route(self, namespace: TrackNamespace) -> SessionId | None:
        """The newest publisher of the longest published prefix of `namespace`."""
        for length in range(len(namespace), 0, -1):
            owner = self.namespaces.get(namespace[:length])
            if owner is not None and owner.sessions:
                return owner.sessions[-1]
        return None

    # -- subscriptions -------------------------------------------------------------------------

    def subscribe(self, session: SessionId, msg: Subscribe
                  ) -> tuple[DownstreamSubscription | None, list[Action]]:
        def refuse(code: int, reason: str) -> tuple[None, list[Action]]:
            return None, [SendMessage(session, SubscribeError(msg.request_id, code, reason))]

        if msg.filter_type == FilterType.ABSOLUTE_RANGE:
            assert msg.start_location is not None and msg.end_group is not None
            if msg.end_group < msg.start_location.group:
                return refuse(SubscribeErrorCode.INVALID_RANGE, "End group is before start")
        full_name = (msg.track_namespace, msg.track_name)
        track = self.tracks.get(full_name)
        actions: list[Action] = []
        if track is None:
            publisher = self.route(msg.track_namespace)
            if publisher is None and not self.upstream_relay:
                return refuse(SubscribeErrorCode.TRACK_DOES_NOT_EXIST, "No publisher for track")
            track = Track(msg.track_namespace, msg.track_name, publisher,
                          self._next_upstream_id, TrackCache(self.cache_config))
            self._next_upstream_id += 1
            self.tracks[full_name] = track
            self.by_upstream[track.upstream_id] = track
            # One upstream subscription serves every subscriber, each ordered downstream by
            # its own priority and group order: ask neutrally, not with the first one's.
            actions.append(SubscribeUpstream(track.upstream_id, publisher, msg.track_namespace,
                                             msg.track_name, UPSTREAM_SUBSCRIBER_PRIORITY,
                                             GroupOrder.PUBLISHER))
        elif any(s.session == session for s in track.subscribers.values()):
            return refuse(SubscribeErrorCode.INTERNAL_ERROR,
                          "Track already subscribed on this session")
        sub = DownstreamSubscription(session, msg.request_id, track, msg.subscriber_priority,
                                     msg.group_order, msg.filter_type, msg.start_location,
                                     msg.end_group)
        track.subscribers[sub.key] = sub
        self.subscriptions[sub.key] = sub
        if track.upstream_active:
            actions += self.activate(sub)
        return sub, actions

    def activate(self, sub: DownstreamSubscription) -> list[Action]:
        """Take the boundary snapshot, pick the alias, answer SUBSCRIBE_OK."""
        track = sub.track
        assert track.upstream_alias is not None
        space = self.alias_spaces.setdefault(sub.session, AliasSpace())
        assignment = space.assign(track.upstream_alias, sub.key)
        sub.alias, sub.fast_path = assignment.alias, assignment.fast_path
        sub.largest_at_start = track.largest
        sub.start = subscription_start(sub.filter_type, track.largest, sub.start_location)
        sub.active = True
        return [SendMessage(sub.session, SubscribeOk(
            sub.request_id, sub.alias, 0, sub.resolved_group_order(), track.largest))]

    def upstream_ok(self, upstream_id: int, publisher: SessionId, msg: SubscribeOk
                    ) -> tuple[Track | None, list[DownstreamSubscription], list[Action]]:
        track = self.by_upstream.get(upstream_id)
        if track is None or track.upstream_active:
            return track, [], []
        track.upstream_active = True
        track.upstream_session = publisher
        track.upstream_alias = msg.track_alias
        track.group_order = msg.group_order
        self.by_alias[(publisher, msg.track_alias)] = track
        if msg.largest_location is not None:
            track.see(msg.largest_location)
            # The upstream (LargestObject filter) sends only what follows its Largest.
            track.cache.raise_coverage(Location(msg.largest_location.group,
                                                msg.largest_location.object + 1))
        waiting = [s for s in track.subscribers.values() if not s.active]
        actions: list[Action] = []
        for sub in waiting:
            actions += self.activate(sub)
        return track, waiting, actions

    def upstream_error(self, upstream_id: int, msg: SubscribeError) -> list[Action]:
        track = self.by_upstream.get(upstream_id)
        if track is None:
            return []
        actions: list[Action] = [
            SendMessage(s.session, SubscribeError(s.request_id, msg.error_code, msg.reason_phrase))
            for s in track.subscribers.values()]
        for sub in list(track.subscribers.values()):
            self._forget_subscription(sub)
        self._forget_track(track)
        return actions

    def unsubscribe(self, session: SessionId, request_id: int
                    ) -> tuple[DownstreamSubscription | None, list[Action]]:
        sub = self.subscriptions.get((session, request_id))
        if sub is None:
            return None, []
        self._forget_subscription(sub)
        track = sub.track
        actions: list[Action] = []
        if not track.subscribers:
            actions.append(UnsubscribeUpstream(track.upstream_id, track.publisher))
            self._forget_track(track)
        return sub, actions

    def end_track(self, track: Track, status: int, reason: str
                  ) -> tuple[list[DownstreamSubscription], list[Action]]:
        """PUBLISH_DONE to every subscriber; the track is forgotten."""
        subs = list(track.subscribers.values())
        actions: list[Action] = [
            SendMessage(s.session, PublishDone(s.request_id, status, s.streams_opened, reason))
            for s in subs if s.active]
        actions += [SendMessage(s.session, SubscribeError(
            s.request_id, SubscribeErrorCode.TRACK_DOES_NOT_EXIST, reason))
            for s in subs if not s.active]
        for sub in subs:
            self._forget_subscription(sub)
        self._forget_track(track)
        return subs, actions

    def end_subscription(self, sub: DownstreamSubscription, status: int, reason: str
                         ) -> list[Action]:
        """PUBLISH_DONE to one subscriber (e.g. its range ended); upstream kept if shared."""
        actions: list[Action] = [SendMessage(sub.session, PublishDone(
            sub.request_id, status, sub.streams_opened, reason))]
        _, more = self.unsubscribe(sub.session, sub.request_id)
        return actions + more

    def session_closed(self, session: SessionId
                       ) -> tuple[list[DownstreamSubscription], list[Action]]:
        """Forget a session: its subscriptions, its namespaces, the tracks it published."""
        gone: list[DownstreamSubscription] = []
        actions: list[Action] = []
        for key in [k for k in self.subscriptions if k[0] == session]:
            sub, more = self.unsubscribe(*key)
            if sub is not None:
                gone.append(sub)
            actions += more
        self.alias_spaces.pop(session, None)
        for namespace in list(self.namespaces):
            self.publish_namespace_done(session, namespace)
        for track in [t for t in self.tracks.values()
                      if session in (t.publisher, t.upstream_session)]:
            subs, more = self.end_track(track, PublishDoneStatusCode.GOING_AWAY,
                                        "Publisher went away")
            gone += subs
            actions += more
        return gone, actions

    def _forget_subscription(self, sub: DownstreamSubscription) -> None:
        sub.track.subscribers.pop(sub.key, None)
        self.subscriptions.pop(sub.key, None)
        if sub.alias is not None and sub.session in self.alias_spaces:
            space = self.alias_spaces[sub.session]
            if space.owner(sub.alias) == sub.key:
                space.release(sub.alias)

    def _forget_track(self, track: Track) -> None:
        self.tracks.pop(track.full_name, None)
        self.by_upstream.pop(track.upstream_id, None)
        if track.upstream_session is not None and track.upstream_alias is not None:
            self.by_alias.pop((track.upstream_session, track.upstream_alias), None)
