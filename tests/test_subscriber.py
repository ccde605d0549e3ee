"""The subscriber's end-of-track rule, on events alone (no connection)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from relay.media import PayloadHeader, encode_object
from relay.moqt.constants import ObjectStatus
from relay.moqt.data import ObjectHeader, SubgroupHeader
from relay.moqt.session import ObjectReceived, SubgroupStreamClosed, SubgroupStreamOpened
from relay.subscriber import DONE_GRACE, Subscriber, SubscriberOptions

REQUEST = 0


def subscriber() -> Subscriber:
    sub = Subscriber(SubscriberOptions(url="moqt://h:1/x", namespace=(b"ns",), track=b"t"),
                     SimpleNamespace(session=None))  # type: ignore[arg-type]
    sub.request_id = REQUEST
    return sub


def stream(stream_id: int, group: int, subgroup: int, priority: int) -> SubgroupHeader:
    return SubgroupHeader.new(track_alias=1, group_id=group, subgroup_id=subgroup,
                              publisher_priority=priority, end_of_group=True)


def obj(sub: Subscriber, stream_id: int, group: int, obj_id: int, objects: int) -> None:
    payload = encode_object(PayloadHeader(group, obj_id, objects, 100, time.time_ns()))
    header = ObjectHeader(group, 1, obj_id, 128, len(payload))
    sub.on_event(ObjectReceived(REQUEST, 1, stream_id, header, payload, 0.0))


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
    assert sub.verifier.received() == 2


def test_end_of_track_gives_up_on_a_stream_that_never_ends() -> None:
    sub = subscriber()
    data = stream(2, 0, 1, 128)
    sub.on_event(SubgroupStreamOpened(2, REQUEST, data))
    sub.on_event(ObjectReceived(REQUEST, 1, 2, ObjectHeader(0, 1, 5, 128, 0, b"",
                                                            ObjectStatus.END_OF_TRACK), b"", 0.0))
    assert sub.finished() is None
    assert sub.end_of_track_at is not None
    sub.end_of_track_at -= DONE_GRACE + 0.1  # the grace period has passed
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
    assert sub.verifier.received() == 2
