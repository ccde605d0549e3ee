"""relay.core.relay: RelayCore driven by scripted event sequences; subscriber streams are
rebuilt from the actions and decoded with the codec's reader."""

from __future__ import annotations

from relay.core.access import AccessConfig
from relay.core.actions import (
    OpenSubgroupStream,
    ResetStream,
    SendDatagram,
    SendFetchObjects,
    SendMessage,
    SetPriorityThreshold,
    SkipSubgroup,
    SubscribeUpstream,
    UnsubscribeUpstream,
    WriteStream,
)
from relay.core.aliases import AliasSpace
from relay.core.priority import CongestionState, SkipReason
from relay.core.relay import RelayConfig, RelayCore, RelayCounters
from relay.moqt.constants import (
    FetchErrorCode,
    FetchType,
    FilterType,
    GroupOrder,
    PublishDoneStatusCode,
    PublishNamespaceErrorCode,
    SubscribeErrorCode,
)
from relay.moqt.data import (
    FetchStreamReader,
    ObjectDatagram,
    ObjectHeader,
    SubgroupHeader,
    SubgroupStreamReader,
    assemble_objects,
    encode_subgroup_header,
)
from relay.moqt.messages import (
    Fetch,
    FetchError,
    FetchOk,
    JoiningFetch,
    Location,
    PublishDone,
    PublishNamespace,
    PublishNamespaceError,
    StandaloneFetch,
    Subscribe,
    SubscribeOk,
)

NS = (b"live", b"cam")
PUB, S1, S2, S3 = 1, 11, 12, 13
UP_ALIAS = 5


class Sim:
    """A RelayCore plus a publisher and the bytes each subscriber receives."""

    def __init__(self, config: RelayConfig | None = None) -> None:
        self.core = RelayCore(config)
        self.actions: list[object] = []
        self.streams: dict[tuple[int, int], bytearray] = {}
        self.fins: set[tuple[int, int]] = set()
        self.resets: set[tuple[int, int]] = set()
        self.opens: list[OpenSubgroupStream] = []
        self.up_stream = 100
        self.core.session_open(PUB)
        self.do(self.core.publish_namespace(PUB, PublishNamespace(0, NS)))

    def do(self, actions: list[object]) -> list[object]:
        self.actions += actions
        for a in actions:
            if isinstance(a, OpenSubgroupStream):
                self.opens.append(a)
                self.streams[(a.session, a.stream)] = bytearray(encode_subgroup_header(a.header))
            elif isinstance(a, WriteStream):
                assert (a.session, a.stream) not in self.fins
                self.streams[(a.session, a.stream)] += a.data
                if a.fin:
                    self.fins.add((a.session, a.stream))
            elif isinstance(a, ResetStream):
                self.resets.add((a.session, a.stream))
        return actions

    def subscribe(self, session: int, request_id: int = 0,
                  ft: FilterType = FilterType.LARGEST_OBJECT, **kw: object) -> list[object]:
        self.core.session_open(session)
        return self.do(self.core.subscribe(session, Subscribe(
            request_id, NS, b"video", 128, GroupOrder.ASCENDING, True, ft, **kw)))  # type: ignore[arg-type]

    def upstream_ok(self, largest: Location | None = None, alias: int = UP_ALIAS) -> list[object]:
        return self.do(self.core.upstream_subscribe_ok(0, PUB, SubscribeOk(
            1, alias, 0, GroupOrder.ASCENDING, largest)))

    def open(self, group: int, subgroup: int = 0, prio: int = 128) -> int:
        self.up_stream += 4
        header = SubgroupHeader.new(UP_ALIAS, group, prio, subgroup, extensions=True,
                                    explicit_subgroup_id=True)
        self.do(self.core.subgroup_stream_opened(PUB, self.up_stream, header))
        return self.up_stream

    def obj(self, stream: int, group: int, object_id: int, payload: bytes | None = None,
            subgroup: int = 0, prio: int = 128, split: bool = False) -> None:
        payload = payload if payload is not None else f"g{group}o{object_id}".encode()
        self.do(self.core.object_header(PUB, stream, ObjectHeader(
            group, subgroup, object_id, prio, len(payload), b"\x10\x01")))
        if split:
            self.do(self.core.object_payload(PUB, stream, payload[:1], False))
            self.do(self.core.object_payload(PUB, stream, payload[1:], True))
        else:
            self.do(self.core.object_payload(PUB, stream, payload, True))

    def end(self, stream: int) -> None:
        self.do(self.core.subgroup_stream_ended(PUB, stream))

    def received(self, session: int) -> list[tuple[int, int]]:
        """(group, object) of every object the subscriber got on subgroup streams."""
        got = []
        for (s, _), data in self.streams.items():
            if s != session:
                continue
            events = SubgroupStreamReader().feed(bytes(data))
            got += [(h.group_id, h.object_id) for h, p in assemble_objects(events)
                    if p == f"g{h.group_id}o{h.object_id}".encode()]
        return sorted(got)

    def fetched(self, session: int) -> list[tuple[int, int]]:
        got = []
        for a in self.actions:
            if isinstance(a, SendFetchObjects) and a.session == session:
                events = FetchStreamReader().feed(a.encode(), fin=True)
                got += [(h.group_id, h.object_id) for h, _ in assemble_objects(events)]
        return got

    def messages(self, session: int, kind: type) -> list[object]:
        return [a.message for a in self.actions
                if isinstance(a, SendMessage) and a.session == session
                and isinstance(a.message, kind)]


def joining_fetch(request_id: int, sub_request: int, start: int = 0) -> Fetch:
    return Fetch(request_id, 128, GroupOrder.ASCENDING, FetchType.RELATIVE_JOINING,
                 joining=JoiningFetch(sub_request, start))


def test_one_publisher_three_subscribers() -> None:
    sim = Sim()
    ups = [a for s in (S1, S2, S3) for a in sim.subscribe(s)
           if isinstance(a, SubscribeUpstream)]
    assert len(ups) == 1
    sim.upstream_ok()
    for s in (S1, S2, S3):
        assert sim.messages(s, SubscribeOk) == [SubscribeOk(0, UP_ALIAS, 0,
                                                            GroupOrder.ASCENDING, None)]
    for g in range(3):
        st = sim.open(g)
        for o in range(4):
            sim.obj(st, g, o, split=o == 2)
        sim.end(st)
    expected = [(g, o) for g in range(3) for o in range(4)]
    for s in (S1, S2, S3):
        assert sim.received(s) == expected
    assert all(o.fast_path for o in sim.opens)
    assert len(sim.fins) == 9
    c = sim.core.counters
    assert (c.objects_in, c.objects_out, c.streams_opened, c.fast_path_streams) == (12, 36, 9, 9)


def test_forwarded_stream_is_upstream_bytes_with_alias_rewritten() -> None:
    sim = Sim()
    sim.subscribe(S1)
    sim.upstream_ok()
    st = sim.open(0)
    sim.obj(st, 0, 0)
    sim.obj(st, 0, 1)
    data = bytes(sim.streams[(S1, 0)])
    header = SubgroupHeader.new(UP_ALIAS, 0, 128, 0, extensions=True, explicit_subgroup_id=True)
    assert data.startswith(encode_subgroup_header(header))


def test_data_before_subscribe_ok_is_buffered_not_lost() -> None:
    sim = Sim()
    sim.subscribe(S1)
    st = sim.open(0)
    sim.obj(st, 0, 0)
    assert sim.received(S1) == []
    sim.upstream_ok()
    sim.obj(st, 0, 1)
    sim.end(st)
    assert sim.received(S1) == [(0, 0), (0, 1)]


def test_late_joiner_mid_group_boundary() -> None:
    sim = Sim()
    sim.subscribe(S1)
    sim.upstream_ok()  # empty track: everything is covered
    # Group 0 on two subgroups, interleaved; group 1 has begun.
    a, b = sim.open(0, 0), sim.open(0, 1)
    sim.obj(a, 0, 0)
    sim.obj(b, 0, 1, subgroup=1)
    sim.obj(a, 0, 2)
    # S2 joins now: L = (0, 2). Object (0, 3) on subgroup 1 is still to come.
    sim.subscribe(S2, request_id=6)
    assert sim.messages(S2, SubscribeOk)[0].largest_location == Location(0, 2)  # type: ignore[attr-defined]
    sim.do(sim.core.fetch(S2, joining_fetch(8, 6)))
    assert sim.fetched(S2) == []  # subgroup 1 (next (0,2)) may still deliver <= L: wait
    sim.obj(b, 0, 3, subgroup=1)  # > L: live, on a fresh userspace stream
    assert sim.fetched(S2) == [(0, 0), (0, 1), (0, 2)]
    sim.obj(a, 0, 4)
    sim.end(a)
    sim.end(b)
    c = sim.open(1)
    sim.obj(c, 1, 0)
    sim.end(c)
    assert sim.received(S2) == [(0, 3), (0, 4), (1, 0)]
    assert sorted(sim.fetched(S2) + sim.received(S2)) == sim.received(S1)
    s2_opens = [o for o in sim.opens if o.session == S2]
    assert [o.fast_path for o in s2_opens] == [False, False, True]
    assert sim.messages(S2, FetchOk)[0].end_location == Location(0, 2)  # type: ignore[attr-defined]


def test_late_joiner_while_object_at_l_is_incomplete() -> None:
    sim = Sim()
    sim.subscribe(S1)
    sim.upstream_ok()
    a = sim.open(0)
    sim.obj(a, 0, 0)
    sim.do(sim.core.object_header(PUB, a, ObjectHeader(0, 0, 1, 128, 4, b"\x10\x01")))
    sim.do(sim.core.object_payload(PUB, a, b"g0", False))
    sim.subscribe(S2, request_id=2)  # L = (0, 1), its payload half-received
    sim.do(sim.core.fetch(S2, joining_fetch(4, 2)))
    assert sim.fetched(S2) == []
    sim.do(sim.core.object_payload(PUB, a, b"o1", True))
    assert sim.fetched(S2) == [(0, 0), (0, 1)]
    sim.obj(a, 0, 2)
    assert sim.received(S2) == [(0, 2)]


def test_fetch_waits_then_times_out_and_counts_late_objects() -> None:
    sim = Sim(RelayConfig(fetch_wait=1.0))
    sim.subscribe(S1)
    sim.upstream_ok()
    a, b = sim.open(0, 0), sim.open(0, 1)
    sim.obj(a, 0, 0)
    sim.obj(a, 0, 2)
    sim.subscribe(S2, request_id=2)  # L = (0, 2); subgroup 1 is silent
    sim.do(sim.core.fetch(S2, joining_fetch(4, 2), now=10.0))
    assert sim.core.next_deadline() == 11.0
    assert sim.do(sim.core.poll(10.5)) == []
    sim.do(sim.core.poll(11.0))
    assert sim.fetched(S2) == [(0, 0), (0, 2)]
    assert sim.core.counters.fetch_wait_timeouts == 1
    sim.obj(b, 0, 1, subgroup=1)  # <= L after the fetch was answered: counted, not forwarded
    assert sim.core.counters.boundary_late_objects == 1
    assert sim.received(S2) == []
    assert sim.received(S1) == [(0, 0), (0, 1), (0, 2)]


def test_fetch_cancel_drops_a_waiting_fetch() -> None:
    sim = Sim(RelayConfig(fetch_wait=1.0))
    sim.subscribe(S1)
    sim.upstream_ok()
    a, b = sim.open(0, 0), sim.open(0, 1)
    sim.obj(a, 0, 0)
    sim.obj(b, 0, 1, subgroup=1)
    sim.subscribe(S2, request_id=2)  # L = (0, 1); both streams may still deliver <= L
    sim.do(sim.core.fetch(S2, joining_fetch(4, 2), now=10.0))
    assert sim.core.next_deadline() == 11.0
    assert sim.do(sim.core.fetch_cancel(S2, 4, now=10.5)) == []
    assert sim.core.next_deadline() is None
    assert sim.do(sim.core.poll(12.0)) == []
    assert sim.fetched(S2) == [] and sim.messages(S2, FetchOk) == []
    assert sim.messages(S2, FetchError) == []


def test_first_subscriber_joining_fetch_before_relay_had_data() -> None:
    sim = Sim()
    sim.subscribe(S1)
    sim.do(sim.core.fetch(S1, joining_fetch(2, 0)))  # held until SUBSCRIBE_OK
    assert sim.messages(S1, FetchError) == []
    sim.upstream_ok(Location(7, 3))
    assert sim.messages(S1, FetchError) == [FetchError(
        2, FetchErrorCode.UNKNOWN_STATUS_IN_RANGE, "Range starts before what this relay holds")]
    assert sim.core.counters.cache_misses == 1


def test_standalone_fetch_from_cache() -> None:
    from relay.moqt.messages import StandaloneFetch
    sim = Sim()
    sim.subscribe(S1)
    sim.upstream_ok()
    for g in range(3):
        st = sim.open(g)
        sim.obj(st, g, 0)
        sim.obj(st, g, 1)
        sim.end(st)
    sim.core.session_open(S2)
    sim.do(sim.core.fetch(S2, Fetch(0, 1, GroupOrder.DESCENDING, FetchType.STANDALONE,
                                    StandaloneFetch(NS, b"video", Location(1, 1),
                                                    Location(3, 0)))))
    assert sim.fetched(S2) == [(2, 0), (2, 1), (1, 1)]
    sim.do(sim.core.fetch(S2, Fetch(2, 1, GroupOrder.ASCENDING, FetchType.STANDALONE,
                                    StandaloneFetch(NS, b"nope", Location(0, 0),
                                                    Location(1, 0)))))
    assert sim.messages(S2, FetchError)[0].error_code == FetchErrorCode.TRACK_DOES_NOT_EXIST  # type: ignore[attr-defined]
    assert sim.core.counters.cache_hits == 1


def test_subscriber_leaving_does_not_disturb_others() -> None:
    sim = Sim()
    sim.subscribe(S1)
    sim.subscribe(S2, request_id=2)
    sim.upstream_ok()
    st = sim.open(0)
    sim.obj(st, 0, 0)
    actions = sim.do(sim.core.unsubscribe(S1, 0))
    assert actions == [ResetStream(S1, 0, 1)]
    sim.obj(st, 0, 1)
    sim.end(st)
    assert sim.received(S2) == [(0, 0), (0, 1)]
    assert sim.received(S1) == [(0, 0)]
    assert not any(isinstance(a, UnsubscribeUpstream) for a in sim.actions)


def test_upstream_unsubscribe_when_last_leaves() -> None:
    sim = Sim()
    sim.subscribe(S1)
    sim.subscribe(S2, request_id=2)
    sim.upstream_ok()
    assert sim.do(sim.core.unsubscribe(S1, 0)) == []
    assert sim.do(sim.core.session_closed(S2)) == [UnsubscribeUpstream(0, PUB)]


def test_publisher_gone_sends_publish_done() -> None:
    sim = Sim()
    sim.subscribe(S1)
    sim.subscribe(S2, request_id=2)
    sim.upstream_ok()
    st = sim.open(0)
    sim.obj(st, 0, 0)
    actions = sim.do(sim.core.session_closed(PUB))
    assert SendMessage(S1, PublishDone(0, PublishDoneStatusCode.GOING_AWAY, 1,
                                       "Publisher went away")) in actions
    assert ResetStream(S2, 0, 1) in actions
    assert sim.core.registry.tracks == {}


def test_upstream_publish_done_is_relayed() -> None:
    sim = Sim()
    sim.subscribe(S1)
    sim.upstream_ok()
    actions = sim.do(sim.core.upstream_publish_done(0, PublishDone(1, 2, 3, "bye")))
    assert actions == [SendMessage(S1, PublishDone(0, PublishDoneStatusCode.TRACK_ENDED, 0,
                                                   "bye"))]


def test_alias_collision_on_subscriber_connection() -> None:
    sim = Sim()
    sim.core.session_open(2)
    sim.do(sim.core.publish_namespace(2, PublishNamespace(0, (b"other",))))
    sim.subscribe(S1)
    sim.do(sim.core.subscribe(S1, Subscribe(2, (b"other",), b"x", 1, GroupOrder.ASCENDING,
                                            True, FilterType.LARGEST_OBJECT)))
    sim.upstream_ok()
    sim.do(sim.core.upstream_subscribe_ok(1, 2, SubscribeOk(1, UP_ALIAS, 0,
                                                            GroupOrder.ASCENDING)))
    aliases = [m.track_alias for m in sim.messages(S1, SubscribeOk)]  # type: ignore[attr-defined]
    assert aliases == [UP_ALIAS, 0]
    header = SubgroupHeader.new(UP_ALIAS, 0, 1)
    sim.do(sim.core.subgroup_stream_opened(2, 77, header))
    assert sim.opens[-1].header.track_alias == 0 and sim.opens[-1].fast_path


def test_alias_width_taken_falls_back_to_userspace_for_that_subscriber() -> None:
    """Rule 3 of the alias policy: when every alias of the upstream's varint width is taken on
    a subscriber's connection, it gets one of another width and that track stays on the
    userspace path for that subscriber only; the data still arrives, under its own alias."""
    sim = Sim()
    space = sim.core.registry.alias_spaces.setdefault(S2, AliasSpace())
    for alias in range(64):  # every 1-byte alias on S2's connection is in use
        space.reserve(alias, ("other track", alias))
    sim.subscribe(S1)
    sim.subscribe(S2, request_id=2)
    sim.upstream_ok()  # upstream alias 5: free on S1, width full on S2
    assert [m.track_alias for m in sim.messages(S1, SubscribeOk)] == [UP_ALIAS]  # type: ignore[attr-defined]
    assert [m.track_alias for m in sim.messages(S2, SubscribeOk)] == [64]  # type: ignore[attr-defined]
    st = sim.open(0)
    sim.obj(st, 0, 0)
    sim.obj(st, 0, 1)
    sim.end(st)
    by_session = {o.session: o for o in sim.opens}
    assert (by_session[S1].fast_path, by_session[S1].header.track_alias) == (True, UP_ALIAS)
    assert (by_session[S2].fast_path, by_session[S2].header.track_alias) == (False, 64)
    assert sim.received(S1) == sim.received(S2) == [(0, 0), (0, 1)]


def test_datagrams_forwarded_per_subscriber_skipped_and_cached() -> None:
    """OBJECT_DATAGRAMs go to every subscriber in range unchanged (the glue puts each
    subscriber's alias on them), a congested subscriber skips the low-priority ones (counted),
    a late joiner gets only what follows its start, and the cache serves them to FETCH."""
    sim = Sim()
    sim.subscribe(S1)
    sim.subscribe(S2, request_id=2)
    sim.upstream_ok()
    sim.do(sim.core.congestion(S2, CongestionState(0, 0, 30_000, 10_000)))  # threshold 63
    ext = bytes.fromhex("1005")
    sent = [ObjectDatagram.new(UP_ALIAS, 0, o, 0 if o == 0 else 128, f"g0o{o}".encode(),
                               extensions=ext) for o in range(3)]
    for d in sent:
        sim.do(sim.core.object_datagram(PUB, d))
    got = {s: [a.datagram for a in sim.actions if isinstance(a, SendDatagram) and a.session == s]
           for s in (S1, S2)}
    assert {a.publisher for a in sim.actions if isinstance(a, SendDatagram)} == {PUB}
    assert got == {S1: sent, S2: sent[:1]}
    assert all(a.request_id == {S1: 0, S2: 2}[a.session]
               for a in sim.actions if isinstance(a, SendDatagram))
    assert sim.core.counters.skipped == {S2: {"congestion": 2}}
    # A late joiner (L = (0, 2)) gets the next datagram, not the earlier ones.
    sim.subscribe(S3, request_id=4)
    late = ObjectDatagram.new(UP_ALIAS, 0, 3, 128, b"g0o3", extensions=ext)
    actions = sim.do(sim.core.object_datagram(PUB, late))
    assert [(a.session, a.datagram) for a in actions if isinstance(a, SendDatagram)] == [
        (S1, late), (S3, late)]
    # Cached with Subgroup ID = Object ID, extension headers kept, for a standalone FETCH.
    sim.do(sim.core.fetch(S3, Fetch(6, 1, GroupOrder.ASCENDING, FetchType.STANDALONE,
                                    standalone=StandaloneFetch(NS, b"video", Location(0, 0),
                                                               Location(1, 0)))))
    (objects,) = [a.objects for a in sim.actions if isinstance(a, SendFetchObjects)]
    assert [(o.group_id, o.subgroup_id, o.object_id, o.payload, o.extensions)
            for o in objects] == [(0, o, o, f"g0o{o}".encode(), ext) for o in range(4)]
    # Unknown alias: dropped and counted.
    assert sim.core.object_datagram(PUB, ObjectDatagram.new(99, 0, 0, 0, b"xyz")) == []
    assert sim.core.counters.dropped_unknown_alias_bytes == 3
    c = sim.core.counters
    assert (c.datagrams_in, c.objects_in, c.objects_out) == (4, 4, 6 + 4)


def test_congested_subscriber_skips_low_priority_subgroups() -> None:
    sim = Sim()
    sim.subscribe(S1)
    sim.subscribe(S2, request_id=2)
    sim.upstream_ok()
    assert sim.do(sim.core.congestion(S2, CongestionState(0, 0, 30_000, 10_000))) == \
        [SetPriorityThreshold(S2, 63)]
    key = sim.open(0, 0, prio=10)
    delta = sim.open(0, 1, prio=200)
    sim.obj(key, 0, 0, prio=10)
    sim.obj(delta, 0, 1, subgroup=1, prio=200)
    # Congestion clears mid-stream: the skipped subgroup stays skipped (never mid-stream).
    sim.do(sim.core.congestion(S2, CongestionState()))
    sim.obj(delta, 0, 2, subgroup=1, prio=200)
    sim.end(key)
    sim.end(delta)
    nxt = sim.open(1, 1, prio=200)
    sim.obj(nxt, 1, 0, subgroup=1, prio=200)
    assert sim.received(S1) == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert sim.received(S2) == [(0, 0), (1, 0)]
    skips = [a for a in sim.actions if isinstance(a, SkipSubgroup)]
    assert skips == [SkipSubgroup(S2, 2, 0, 1, 200, 63, "congestion", (PUB, delta))]
    assert sim.core.counters.skipped == {S2: {"congestion": 1}}


def test_unskip_takes_back_a_skip_the_fast_path_forwarded_after_all() -> None:
    counters = RelayCounters()
    counters.skip(S1, SkipReason.CONGESTION)
    counters.skip(S2, SkipReason.CONGESTION)
    counters.skip(S2, SkipReason.CONGESTION)
    counters.unskip(S2, "congestion")
    counters.unskip(S1, "congestion")
    counters.unskip(S1, "congestion")  # nothing left to take back: no negative count
    assert counters.skipped == {S2: {"congestion": 1}}
    assert counters.as_dict()["skipped"] == {str(S2): {"congestion": 1}}


def test_absolute_range_ends_with_publish_done() -> None:
    sim = Sim()
    sim.subscribe(S1)
    sim.subscribe(S2, request_id=2, ft=FilterType.ABSOLUTE_RANGE, start_location=Location(0, 0),
                  end_group=0)
    sim.upstream_ok()
    for g in range(2):
        st = sim.open(g)
        sim.obj(st, g, 0)
        sim.end(st)
    assert sim.received(S2) == [(0, 0)]
    assert sim.messages(S2, PublishDone) == [PublishDone(
        2, PublishDoneStatusCode.SUBSCRIPTION_ENDED, 1, "Subscription range ended")]
    assert sim.received(S1) == [(0, 0), (1, 0)]


def test_access_refusals() -> None:
    config = RelayConfig(access=AccessConfig.from_toml("""
[access]
anonymous_publish = []
anonymous_subscribe = []
[[access.principal]]
name = "alice"
token = "a"
publish = ["live"]
subscribe = ["live"]
[[access.principal]]
name = "mallory"
token = "m"
publish = ["*"]
"""))
    core = RelayCore(config)
    token_a = ((3, b"\x03\x00a"),)
    assert core.session_open(1, token_a) == []
    assert core.publish_namespace(1, PublishNamespace(0, NS))[0].message.request_id == 0  # type: ignore[union-attr]
    core.session_open(2, ((3, b"\x03\x00m"),))
    assert core.publish_namespace(2, PublishNamespace(0, NS)) == [SendMessage(
        2, PublishNamespaceError(0, PublishNamespaceErrorCode.UNAUTHORIZED,
                                 "Namespace is published by another principal"))]
    core.session_open(3)
    refused = core.subscribe(3, Subscribe(0, NS, b"v", 1, GroupOrder.ASCENDING, True,
                                          FilterType.LARGEST_OBJECT))
    assert refused[0].message.error_code == SubscribeErrorCode.UNAUTHORIZED  # type: ignore[union-attr]
    bad = core.subscribe(3, Subscribe(2, NS, b"v", 1, GroupOrder.ASCENDING, True,
                                      FilterType.LARGEST_OBJECT, parameters=((3, b"\x07"),)))
    assert bad[0].message.error_code == SubscribeErrorCode.MALFORMED_AUTH_TOKEN  # type: ignore[union-attr]
    closed = core.session_open(4, ((3, b"\x03\x00zzz"),))
    assert closed[0].error_code == 0x2  # type: ignore[union-attr]
    assert core.counters.refusals == {"publish_namespace": 1, "subscribe": 2, "setup": 1}


def test_may_discover_follows_the_setup_principal() -> None:
    core = RelayCore(RelayConfig(access=AccessConfig.from_toml("""
[access]
anonymous_subscribe = ["public"]
[[access.principal]]
name = "alice"
token = "a"
subscribe = ["live"]
""")))
    core.session_open(1, ((3, b"\x03\x00a"),))
    core.session_open(2)
    assert core.may_discover(1, (b"live", b"x")) and not core.may_discover(1, (b"public",))
    assert core.may_discover(2, (b"public", b"x")) and not core.may_discover(2, (b"live", b"x"))
    assert RelayCore().may_discover(9, (b"anything",))  # open relay, unknown session


def test_counters_as_dict_is_json_ready() -> None:
    import json
    sim = Sim()
    sim.subscribe(S1)
    sim.upstream_ok()
    sim.do(sim.core.congestion(S1, CongestionState(0, 0, 50_000, 10_000)))
    st = sim.open(0, prio=1)
    sim.obj(st, 0, 0, prio=1)
    data = json.loads(json.dumps(sim.core.counters.as_dict()))
    assert data["skipped"] == {str(S1): {"congestion": 1}}
    assert data["objects_in"] == 1
