"""The subscriber's end-of-track rule and its tracks, on events alone (no connection)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from types import SimpleNamespace

import pytest

from relay.errors import ConfigError
from relay.media import PayloadHeader, SubscribeSummary, TrackVerifier, encode_object
from relay.moqt.constants import ObjectStatus
from relay.moqt.data import ObjectHeader, SubgroupHeader
from relay.moqt.messages import SubscribeOk
from relay.moqt.session import (
    NamespacePublished,
    ObjectReceived,
    SessionClosed,
    SubgroupStreamClosed,
    SubgroupStreamOpened,
    SubscribeAccepted,
)
from relay.subscriber import (
    DONE_GRACE,
    Subscriber,
    SubscriberOptions,
    TrackSubscription,
    combine_summaries,
    parse_tracks,
    summary_rows,
    track_labels,
)

REQUEST = 0
NS = (b"ns",)


def subscriber(*more: bytes, expect_objects: int | None = None,
               session: object = None) -> Subscriber:
    """A subscriber of track `t` (request 0) and `more` tracks (requests 1, 2, ...)."""
    sub = Subscriber(SubscriberOptions(url="moqt://h:1/x", namespace=NS, track=b"t",
                                       more_tracks=tuple((NS, name) for name in more),
                                       expect_objects=expect_objects),
                     SimpleNamespace(session=session))  # type: ignore[arg-type]
    for request_id, track in enumerate(sub.tracks):
        track.request_id = request_id
    return sub


def stream(stream_id: int, group: int, subgroup: int, priority: int) -> SubgroupHeader:
    return SubgroupHeader.new(track_alias=1, group_id=group, subgroup_id=subgroup,
                              publisher_priority=priority, end_of_group=True)


def obj(sub: Subscriber, stream_id: int, group: int, obj_id: int, objects: int,
        request: int = REQUEST) -> None:
    payload = encode_object(PayloadHeader(group, obj_id, objects, 100, time.time_ns()))
    header = ObjectHeader(group, 1, obj_id, 128, len(payload))
    sub.on_event(ObjectReceived(request, 1, stream_id, header, payload, 0.0))


def whole_group(sub: Subscriber, request: int, stream_id: int, group: int, objects: int) -> None:
    header = stream(stream_id, group, 0, 128)
    sub.on_event(SubgroupStreamOpened(stream_id, request, header))
    for obj_id in range(objects):
        obj(sub, stream_id, group, obj_id, objects, request)
    sub.on_event(SubgroupStreamClosed(stream_id, request, header, None))


def end_of_track(sub: Subscriber, request: int, stream_id: int, group: int) -> None:
    header = stream(stream_id, group, 0, 0)
    sub.on_event(SubgroupStreamOpened(stream_id, request, header))
    sub.on_event(ObjectReceived(request, 1, stream_id, ObjectHeader(group, 0, 0, 0, 0, b"",
                                                                    ObjectStatus.END_OF_TRACK),
                                b"", 0.0))
    sub.on_event(SubgroupStreamClosed(stream_id, request, header, None))


def test_end_of_track_overtaking_queued_data_waits_for_the_open_streams() -> None:
    sub = subscriber()
    data, last = stream(2, 0, 1, 128), stream(6, 1, 0, 0)
    sub.on_event(SubgroupStreamOpened(2, REQUEST, data))
    obj(sub, 2, 0, 0, 2)
    # END_OF_TRACK, on a priority-0 stream, arrives while object 1 is still queued behind.
    sub.on_event(SubgroupStreamOpened(6, REQUEST, last))
    sub.on_event(ObjectReceived(REQUEST, 1, 6, ObjectHeader(1, 0, 0, 0, 0, b"",
                                                            ObjectStatus.END_OF_TRACK), b"", 0.0))
    sub.on_event(SubgroupStreamClosed(6, REQUEST, last, None))
    assert sub.finished() is None
    obj(sub, 2, 0, 1, 2)
    sub.on_event(SubgroupStreamClosed(2, REQUEST, data, None))
    assert sub.finished() == "track_ended"
    assert sub.tracks[0].verifier.received() == 2


def test_end_of_track_gives_up_on_a_stream_that_never_ends() -> None:
    sub = subscriber()
    data = stream(2, 0, 1, 128)
    sub.on_event(SubgroupStreamOpened(2, REQUEST, data))
    sub.on_event(ObjectReceived(REQUEST, 1, 2, ObjectHeader(0, 1, 5, 128, 0, b"",
                                                            ObjectStatus.END_OF_TRACK), b"", 0.0))
    assert sub.finished() is None
    track = sub.tracks[0]
    assert track.end_of_track_at is not None
    track.end_of_track_at -= DONE_GRACE + 0.1  # the grace period has passed
    assert sub.finished() == "track_ended"


def test_end_of_track_waits_for_a_group_whose_stream_has_not_opened_yet() -> None:
    """Group 1's stream is still queued at a congested relay when END_OF_TRACK (group 2)
    arrives: every opened stream ended, but the track is not over."""
    sub = subscriber()
    first, last = stream(2, 0, 0, 128), stream(6, 2, 0, 0)
    sub.on_event(SubgroupStreamOpened(2, REQUEST, first))
    obj(sub, 2, 0, 0, 1)
    sub.on_event(SubgroupStreamClosed(2, REQUEST, first, None))
    sub.on_event(SubgroupStreamOpened(6, REQUEST, last))
    sub.on_event(ObjectReceived(REQUEST, 1, 6, ObjectHeader(2, 0, 0, 0, 0, b"",
                                                            ObjectStatus.END_OF_TRACK), b"", 0.0))
    sub.on_event(SubgroupStreamClosed(6, REQUEST, last, None))
    assert sub.finished() is None
    late = stream(10, 1, 0, 128)
    sub.on_event(SubgroupStreamOpened(10, REQUEST, late))
    obj(sub, 10, 1, 0, 1)
    sub.on_event(SubgroupStreamClosed(10, REQUEST, late, None))
    assert sub.finished() == "track_ended"
    assert sub.tracks[0].verifier.received() == 2


# -- several tracks on one session -------------------------------------------------------------


def test_parse_tracks_names_in_one_namespace() -> None:
    assert parse_tracks("live/cam1", ["video", "audio"]) == [
        ((b"live", b"cam1"), b"video"), ((b"live", b"cam1"), b"audio")]
    # With --namespace a '/' belongs to the track name, as before several tracks existed.
    assert parse_tracks("live", ["a/b"]) == [((b"live",), b"a/b")]


def test_parse_tracks_namespace_slash_track_without_namespace() -> None:
    assert parse_tracks(None, ["live/cam1/video", "/live/cam2/audio/"]) == [
        ((b"live", b"cam1"), b"video"), ((b"live", b"cam2"), b"audio")]


@pytest.mark.parametrize("namespace, tracks, message", [
    (None, ["video"], r"^--track 'video': without --namespace, give each track as "
                      r"NAMESPACE/TRACK \(e\.g\. live/cam1/video\)$"),
    (None, ["/video"], r"^--track '/video': without --namespace"),
    (None, ["live/"], r"^--track 'live/': without --namespace"),
    ("live", ["video", "audio", "video"], r"^--track 'video' is given twice$"),
    (None, ["a/v", "a//v"], r"^--track 'a//v' is given twice$"),
    ("/", ["video"], r"^--namespace '/': A track namespace needs at least one field$"),
], ids=["bare-name", "empty-namespace", "empty-name", "twice", "twice-normalised",
        "bad-namespace"])
def test_parse_tracks_errors(namespace: str | None, tracks: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_tracks(namespace, tracks)


def test_track_labels() -> None:
    assert track_labels(((NS, b"video"), (NS, b"audio"))) == ["video", "audio"]
    assert track_labels((((b"a", b"b"), b"video"), ((b"c",), b"video"))) == [
        "a/b/video", "c/video"]


def test_events_go_to_their_track_by_request_id() -> None:
    sub = subscriber(b"u")
    first, second = sub.tracks
    whole_group(sub, 0, 2, 0, 3)
    whole_group(sub, 1, 6, 5, 2)
    whole_group(sub, 7, 10, 9, 4)  # an unknown request id: nobody's
    sub.on_event(SubscribeAccepted(1, 42, SubscribeOk(1, 42, 0, 1, None)))
    assert (first.verifier.received(), second.verifier.received()) == (3, 2)
    assert (first.streams_opened, second.streams_opened) == (1, 1)
    assert (first.track_alias, second.track_alias) == (None, 42)
    assert not sub.subscribed()  # "subscribed" only once every track was answered
    sub.on_event(SubscribeAccepted(0, 41, SubscribeOk(0, 41, 0, 1, None)))
    assert sub.subscribed()


def test_expect_objects_applies_per_track() -> None:
    sub = subscriber(b"u", expect_objects=4)
    first, second = sub.tracks
    whole_group(sub, 0, 2, 0, 4)
    assert sub.finished() is None  # `t` is complete, `u` has nothing yet
    assert (first.done, second.done) == ("complete", None)
    whole_group(sub, 0, 6, 1, 4)  # a complete track's later objects are not counted
    whole_group(sub, 1, 10, 0, 3)
    assert sub.finished() is None
    obj(sub, 14, 1, 0, 1, request=1)
    assert sub.finished() == "complete"
    assert (first.verifier.received(), second.verifier.received()) == (4, 4)


def test_track_end_applies_per_track() -> None:
    sub = subscriber(b"u")
    first, second = sub.tracks
    whole_group(sub, 0, 2, 0, 2)
    end_of_track(sub, 0, 6, 1)
    whole_group(sub, 1, 10, 0, 3)
    assert sub.finished() is None
    assert (first.done, first.track_ended, second.done) == ("track_ended", True, None)
    end_of_track(sub, 1, 14, 1)
    assert sub.finished() == "track_ended"


def test_reason_is_complete_when_tracks_end_differently() -> None:
    sub = subscriber(b"u", expect_objects=2)
    whole_group(sub, 0, 2, 0, 2)
    whole_group(sub, 1, 6, 0, 1)
    end_of_track(sub, 1, 10, 1)
    assert sub.finished() == "complete"
    assert [t.done for t in sub.tracks] == ["complete", "track_ended"]


def test_session_closed_before_every_track_is_done_is_an_error() -> None:
    sub = subscriber(b"u", expect_objects=2)
    whole_group(sub, 0, 2, 0, 2)
    assert sub.finished() is None
    closed = SessionClosed(0x10, "gone", True)
    sub.on_event(closed)
    assert sub.finished() == "error"
    opts = sub.opts
    done = sub.tracks[0].summary(opts, "error", closed, 0.0)
    cut = sub.tracks[1].summary(opts, "error", closed, 0.0)
    assert (done.ok, done.reason, done.errors) == (True, "complete", [])
    assert (cut.ok, cut.reason, cut.lost) == (False, "error", 2)
    assert len(cut.errors) == 1 and "gone" in cut.errors[0]


def test_namespace_announced_retries_only_its_tracks() -> None:
    accepted: list[int] = []
    session = SimpleNamespace(accept_publish_namespace=accepted.append)
    sub = Subscriber(SubscriberOptions(url="moqt://h:1/x", namespace=(b"a",), track=b"v",
                                       more_tracks=(((b"b",), b"v"),)),
                     SimpleNamespace(session=session))  # type: ignore[arg-type]
    first, second = sub.tracks
    sub.on_event(NamespacePublished(5, (b"b",), {}))  # type: ignore[arg-type]
    assert accepted == [5]
    assert (first.retry_at, second.retry_at is not None) == (None, True)


def _summary(track: TrackSubscription, alias: int) -> SubscribeSummary:
    track.track_alias = alias
    return track.summary(SubscriberOptions(url="moqt://h:1/x", namespace=NS, track=b"t",
                                           expect_objects=3), "complete", None, 0.0)


def test_combine_summaries_aggregates_and_keeps_each_track() -> None:
    video, audio = TrackSubscription(NS, b"video", "video"), TrackSubscription(NS, b"audio",
                                                                              "audio")
    now = time.time_ns()
    for obj_id in range(3):
        payload = encode_object(PayloadHeader(0, obj_id, 3, 100, now - 1000_000))
        video.verifier.on_object(0, payload, now)
    video.verifier.on_group_end(0)
    for obj_id in (0, 2):  # audio lost object 1
        payload = encode_object(PayloadHeader(4, obj_id, 3, 60, now - 3000_000))
        audio.verifier.on_object(4, payload, now)
    audio.verifier.on_group_end(4)
    parts = {"video": _summary(video, 1), "audio": _summary(audio, 2)}
    delays = video.verifier.delays_us + audio.verifier.delays_us
    total = combine_summaries(parts, delays, "complete")
    assert (total.ok, total.objects, total.bytes, total.lost, total.gaps, total.groups,
            total.groups_complete) == (False, 5, 420, 1, 1, 2, 1)
    assert (total.delay.count, total.delay.min_us, total.delay.max_us) == (5, 1000, 3000)
    assert total.reason == "complete" and total.track_ended is False
    assert total.errors == []
    out = json.loads(json.dumps(asdict(total)))
    assert list(out["tracks"]) == ["video", "audio"]
    assert (out["tracks"]["video"]["ok"], out["tracks"]["audio"]["lost"]) == (True, 1)
    assert out["tracks"]["audio"]["connection"] == {"track_alias": 2}
    rows = summary_rows(total)
    assert rows["tracks.audio"] == ("ok=False objects=2 lost=1 skipped=0 alias=2 "
                                    "reason=complete")
    assert "tracks" not in rows


def test_combine_summaries_prefixes_errors_with_the_track() -> None:
    bad = TrackVerifier()
    bad.on_object(0, b"junk", 0)
    parts = {"video": bad.summary(expect_objects=None, expect_groups=None, track_ended=False,
                                  reason="duration")}
    total = combine_summaries(parts, [], "duration")
    assert total.errors == ["video: group 0: Payload is truncated (4 bytes)"]
    assert total.integrity_failures == 1 and total.delay.count == 0


def test_one_track_summary_has_no_tracks_field() -> None:
    track = TrackSubscription(NS, b"t", "t")
    assert "tracks" not in asdict(_summary(track, 1))
