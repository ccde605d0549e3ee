"""relay.core.tracks: one upstream subscription per track, fan-in, errors, teardown."""

from __future__ import annotations

from relay.core.actions import SendMessage, SubscribeUpstream, UnsubscribeUpstream
from relay.core.tracks import TrackRegistry
from relay.moqt.constants import (
    FilterType,
    GroupOrder,
    PublishDoneStatusCode,
    PublishNamespaceErrorCode,
    SubscribeErrorCode,
)
from relay.moqt.messages import Location, PublishDone, Subscribe, SubscribeError, SubscribeOk

NS = (b"live", b"cam")
PUB = 1


def sub_msg(request_id: int, name: bytes = b"video", ft: FilterType = FilterType.LARGEST_OBJECT,
            **kw: object) -> Subscribe:
    return Subscribe(request_id, NS, name, 128, GroupOrder.ASCENDING, True, ft, **kw)  # type: ignore[arg-type]


def registry() -> TrackRegistry:
    reg = TrackRegistry()
    assert reg.publish_namespace(PUB, NS, "alice") is None
    return reg


def test_unknown_track_is_refused() -> None:
    reg = TrackRegistry()
    sub, actions = reg.subscribe(10, sub_msg(0))
    assert sub is None
    assert actions == [SendMessage(10, SubscribeError(
        0, SubscribeErrorCode.TRACK_DOES_NOT_EXIST, "No publisher for track"))]


def test_unknown_track_goes_to_upstream_relay() -> None:
    reg = TrackRegistry(upstream_relay=True)
    _, actions = reg.subscribe(10, sub_msg(0))
    # neutral, whatever the first subscriber asked (sub_msg: priority 128, ascending)
    assert actions == [SubscribeUpstream(0, None, NS, b"video", 128, GroupOrder.PUBLISHER)]
    _, actions = reg.subscribe(11, Subscribe(0, NS, b"audio", 255, GroupOrder.DESCENDING, True,
                                             FilterType.LARGEST_OBJECT))
    assert actions == [SubscribeUpstream(1, None, NS, b"audio", 128, GroupOrder.PUBLISHER)]


def test_routes_by_longest_prefix() -> None:
    reg = registry()
    reg.publish_namespace(2, (b"live",), "bob")
    assert reg.route((b"live", b"cam", b"hd")) == PUB
    assert reg.route((b"live", b"other")) == 2
    assert reg.route((b"vod",)) is None


def test_one_upstream_subscription_for_many_subscribers() -> None:
    reg = registry()
    _, a1 = reg.subscribe(10, sub_msg(0))
    _, a2 = reg.subscribe(11, sub_msg(4))
    assert [type(a) for a in a1] == [SubscribeUpstream] and a2 == []
    track, waiting, actions = reg.upstream_ok(0, PUB, SubscribeOk(
        1, 7, 0, GroupOrder.ASCENDING, Location(3, 2)))
    assert [s.session for s in waiting] == [10, 11]
    assert actions == [
        SendMessage(10, SubscribeOk(0, 7, 0, GroupOrder.ASCENDING, Location(3, 2))),
        SendMessage(11, SubscribeOk(4, 7, 0, GroupOrder.ASCENDING, Location(3, 2)))]
    assert track is not None and waiting[0].start == Location(3, 3)
    # A later subscriber is answered at once.
    _, a3 = reg.subscribe(12, sub_msg(2))
    assert a3 == [SendMessage(12, SubscribeOk(2, 7, 0, GroupOrder.ASCENDING, Location(3, 2)))]


def test_upstream_error_code_propagates() -> None:
    reg = registry()
    reg.subscribe(10, sub_msg(0))
    reg.subscribe(11, sub_msg(2))
    actions = reg.upstream_error(0, SubscribeError(1, SubscribeErrorCode.UNAUTHORIZED, "no"))
    assert actions == [SendMessage(10, SubscribeError(0, SubscribeErrorCode.UNAUTHORIZED, "no")),
                       SendMessage(11, SubscribeError(2, SubscribeErrorCode.UNAUTHORIZED, "no"))]
    assert reg.tracks == {} and reg.subscriptions == {}


def test_last_unsubscribe_unsubscribes_upstream() -> None:
    reg = registry()
    reg.subscribe(10, sub_msg(0))
    reg.subscribe(11, sub_msg(2))
    reg.upstream_ok(0, PUB, SubscribeOk(1, 7, 0, GroupOrder.ASCENDING))
    assert reg.unsubscribe(10, 0)[1] == []
    assert reg.unsubscribe(11, 2)[1] == [UnsubscribeUpstream(0, PUB)]
    assert reg.tracks == {} and reg.by_alias == {}


def test_publisher_gone_ends_its_tracks() -> None:
    reg = registry()
    reg.subscribe(10, sub_msg(0))
    reg.upstream_ok(0, PUB, SubscribeOk(1, 7, 0, GroupOrder.ASCENDING))
    reg.subscribe(11, sub_msg(2, name=b"audio"))  # still pending upstream
    _, actions = reg.session_closed(PUB)
    assert SendMessage(10, PublishDone(0, PublishDoneStatusCode.GOING_AWAY, 0,
                                       "Publisher went away")) in actions
    assert SendMessage(11, SubscribeError(2, SubscribeErrorCode.TRACK_DOES_NOT_EXIST,
                                          "Publisher went away")) in actions
    assert reg.tracks == {} and reg.namespaces == {}


def test_namespace_takeover_by_other_principal_refused() -> None:
    reg = registry()
    assert reg.publish_namespace(2, NS, "mallory") == PublishNamespaceErrorCode.UNAUTHORIZED
    assert reg.route(NS) == PUB
    assert reg.publish_namespace(3, NS, "alice") is None  # same principal: newest route
    assert reg.route(NS) == 3
    reg.publish_namespace_done(3, NS)
    assert reg.route(NS) == PUB
    reg.session_closed(PUB)
    assert reg.publish_namespace(2, NS, "mallory") is None  # no longer active


def test_invalid_range_and_duplicate() -> None:
    reg = registry()
    _, actions = reg.subscribe(10, sub_msg(0, ft=FilterType.ABSOLUTE_RANGE,
                                           start_location=Location(5, 0), end_group=4))
    assert actions[0].message.error_code == SubscribeErrorCode.INVALID_RANGE  # type: ignore[union-attr]
    reg.subscribe(10, sub_msg(2))
    _, actions = reg.subscribe(10, sub_msg(4))
    assert actions[0].message.error_code == SubscribeErrorCode.INTERNAL_ERROR  # type: ignore[union-attr]


def test_alias_collision_between_two_upstreams() -> None:
    reg = registry()
    reg.publish_namespace(2, (b"other",), "bob")
    reg.subscribe(10, sub_msg(0))
    reg.subscribe(10, Subscribe(2, (b"other",), b"x", 1, GroupOrder.ASCENDING, True,
                                FilterType.LARGEST_OBJECT))
    _, _, a = reg.upstream_ok(0, PUB, SubscribeOk(1, 7, 0, GroupOrder.ASCENDING))
    _, _, b = reg.upstream_ok(1, 2, SubscribeOk(1, 7, 0, GroupOrder.ASCENDING))
    assert a[0].message.track_alias == 7  # type: ignore[union-attr]
    assert b[0].message.track_alias == 0  # type: ignore[union-attr]
    assert reg.subscriptions[(10, 2)].fast_path
