"""Recent groups of one track, and the rule that splits a late joiner between FETCH and SUBSCRIBE.

Cache: whole groups, bounded by a number of groups AND by bytes (payload + extension bytes).
Room is made by evicting the oldest whole group first. Objects are kept with subgroup id,
publisher priority, extension headers verbatim, payload and status.

Coverage: `coverage_start` is the first Location from which the cache holds EVERY object the
relay received. It starts where the upstream subscription started and only moves forward: to
{g + 1, 0} when group g is evicted, or when group g cannot be kept whole (an object larger
than the byte budget, or a group that alone outgrows it). Such objects are never silently
lost: they are counted (`CacheStats.oversize_objects`, `truncated_groups`) and the add
returns why. A FETCH that starts before coverage is refused (UNKNOWN_STATUS_IN_RANGE) rather
than answered with gaps that would claim "object does not exist".

THE BOUNDARY RULE (draft-14 sections 5.1.2, 9.7, 9.16.2; one snapshot L per subscription):

    L = the track's Largest Location (largest object header the relay has seen, or the
        upstream's Largest from SUBSCRIBE_OK if larger), taken in the same step that answers
        SUBSCRIBE_OK with Largest Location = L.
    Subscription (live)  carries exactly the objects with Location >  L  (LargestObject filter:
                         start = {L.group, L.object + 1}; no content: {0, 0}).
    Joining FETCH        carries exactly the objects with Location <= L, from
                         {L.group - joining_start, 0} (relative) or {joining_start, 0}
                         (absolute) to L inclusive.

Because the relay may take L while objects <= L are still arriving (another subgroup of the
same group, an older group still streaming, L's own payload incomplete), a FETCH is answered
only once no open upstream subgroup stream of the track can still deliver an object inside the
fetch range: a stream's `next location` is the object it is in the middle of, else its last
object id + 1 (object ids rise within a subgroup), else {group, 0}; the fetch waits while
some open stream has next location <= fetch end (`stream_blocks_fetch`), up to a deadline.
Objects <= L that appear on a stream opened after the FETCH was answered can go nowhere: they
are counted (`boundary_late_objects`), never forwarded live.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from relay.moqt.constants import MAX_VARINT, FetchErrorCode, FetchType, FilterType, GroupOrder
from relay.moqt.messages import Location

ORIGIN = Location(0, 0)


@dataclass(frozen=True)
class CachedObject:
    group_id: int
    subgroup_id: int
    object_id: int
    publisher_priority: int
    payload: bytes = b""
    extensions: bytes = b""
    status: int = 0

    @property
    def location(self) -> Location:
        return Location(self.group_id, self.object_id)

    @property
    def size(self) -> int:
        return len(self.payload) + len(self.extensions)


@dataclass(frozen=True)
class CacheConfig:
    max_groups: int = 8
    max_bytes: int = 16 << 20

    def __post_init__(self) -> None:
        if self.max_groups < 1 or self.max_bytes < 1:
            raise ValueError("Cache needs room for at least one group and one byte")


class AddResult(Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # same Location already cached: kept the first copy
    OVERSIZE = "oversize"  # object alone exceeds max_bytes: not cached, group truncated
    GROUP_TRUNCATED = "group_truncated"  # group alone outgrew max_bytes: group dropped
    NOT_COVERED = "not_covered"  # before coverage_start (evicted or truncated group)


@dataclass
class CacheStats:
    objects: int = 0
    bytes: int = 0
    groups_evicted: int = 0
    objects_evicted: int = 0
    oversize_objects: int = 0
    oversize_bytes: int = 0
    truncated_groups: int = 0
    truncated_objects: int = 0
    not_covered_objects: int = 0


@dataclass
class TrackCache:
    config: CacheConfig = field(default_factory=CacheConfig)
    coverage_start: Location = ORIGIN
    stats: CacheStats = field(default_factory=CacheStats)
    _groups: dict[int, dict[int, CachedObject]] = field(default_factory=dict)
    _group_bytes: dict[int, int] = field(default_factory=dict)

    @property
    def group_ids(self) -> list[int]:
        return sorted(self._groups)

    def raise_coverage(self, location: Location) -> None:
        """Nothing before `location` is known (e.g. where the upstream subscription starts)."""
        if location > self.coverage_start:
            self.coverage_start = location
            for group_id in [g for g in self._groups if g < location.group]:
                self._drop_group(group_id)
            objects = self._groups.get(location.group, {})
            for object_id in [o for o in objects if o < location.object]:
                obj = objects.pop(object_id)
                self._account(location.group, -obj.size, -1)

    def add(self, obj: CachedObject) -> AddResult:
        if obj.location < self.coverage_start:
            self.stats.not_covered_objects += 1
            return AddResult.NOT_COVERED
        group = self._groups.get(obj.group_id)
        if group is not None and obj.object_id in group:
            return AddResult.DUPLICATE
        if obj.size > self.config.max_bytes:
            self.stats.oversize_objects += 1
            self.stats.oversize_bytes += obj.size
            self._truncate(obj.group_id)
            return AddResult.OVERSIZE
        if group is None:
            while len(self._groups) >= self.config.max_groups:
                oldest = min(self._groups)
                if oldest > obj.group_id:  # an old group arriving late: it would go first
                    self._raise_past(obj.group_id)
                    self.stats.not_covered_objects += 1
                    return AddResult.NOT_COVERED
                self._evict(oldest)
        while self.stats.bytes + obj.size > self.config.max_bytes:
            older = [g for g in self._groups if g < obj.group_id]
            if older:
                self._evict(min(older))
                continue
            # Only this group and newer ones are left: this group cannot be kept whole.
            self._truncate(obj.group_id, count_object=True)
            return AddResult.GROUP_TRUNCATED
        self._groups.setdefault(obj.group_id, {})[obj.object_id] = obj
        self._account(obj.group_id, obj.size, 1)
        return AddResult.STORED

    def get(self, location: Location) -> CachedObject | None:
        return self._groups.get(location.group, {}).get(location.object)

    def covers(self, start: Location) -> bool:
        return start >= self.coverage_start

    def objects(self, start: Location, end: Location,
                group_order: GroupOrder = GroupOrder.ASCENDING) -> list[CachedObject]:
        """Cached objects with start <= Location <= end: groups in `group_order`, objects
        ascending inside a group (draft-14 section 9.16)."""
        groups = [g for g in self._groups if start.group <= g <= end.group]
        groups.sort(reverse=group_order == GroupOrder.DESCENDING)
        result = []
        for group_id in groups:
            for object_id in sorted(self._groups[group_id]):
                obj = self._groups[group_id][object_id]
                if start <= obj.location <= end:
                    result.append(obj)
        return result

    # -- internals ---------------------------------------------------------------------------

    def _account(self, group_id: int, size: int, count: int) -> None:
        self._group_bytes[group_id] = self._group_bytes.get(group_id, 0) + size
        self.stats.bytes += size
        self.stats.objects += count

    def _drop_group(self, group_id: int) -> int:
        objects = self._groups.pop(group_id, {})
        self.stats.bytes -= self._group_bytes.pop(group_id, 0)
        self.stats.objects -= len(objects)
        return len(objects)

    def _raise_past(self, group_id: int) -> None:
        after = Location(group_id + 1, 0)
        if after > self.coverage_start:
            self.coverage_start = after

    def _evict(self, group_id: int) -> None:
        self.stats.objects_evicted += self._drop_group(group_id)
        self.stats.groups_evicted += 1
        self._raise_past(group_id)

    def _truncate(self, group_id: int, count_object: bool = False) -> None:
        dropped = self._drop_group(group_id)
        self.stats.truncated_groups += 1
        self.stats.truncated_objects += dropped + (1 if count_object else 0)
        for older in [g for g in self._groups if g < group_id]:
            self._evict(older)
        self._raise_past(group_id)


# -- the boundary rule -------------------------------------------------------------------------


def next_location(location: Location) -> Location:
    return Location(location.group, location.object + 1)


def subscription_start(filter_type: FilterType, largest: Location | None,
                       start_location: Location | None = None) -> Location:
    """The first Location a new subscription delivers live, given the snapshot `largest`."""
    if filter_type == FilterType.LARGEST_OBJECT:
        return ORIGIN if largest is None else next_location(largest)
    if filter_type == FilterType.NEXT_GROUP_START:
        return ORIGIN if largest is None else Location(largest.group + 1, 0)
    assert start_location is not None
    # Absolute filters: the past part is not replayed live (that is FETCH's job).
    live = ORIGIN if largest is None else next_location(largest)
    return max(start_location, live)


class FetchRangeError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def joining_fetch_range(fetch_type: FetchType, joining_start: int,
                        largest: Location | None) -> tuple[Location, Location]:
    """(start, end inclusive) of a joining FETCH against a subscription's snapshot L."""
    if largest is None:
        raise FetchRangeError(FetchErrorCode.NO_OBJECTS,
                              "The subscription started before any object")
    if fetch_type == FetchType.RELATIVE_JOINING:
        start = Location(max(0, largest.group - joining_start), 0)
    else:
        start = Location(joining_start, 0)
    if start.group > largest.group:
        raise FetchRangeError(FetchErrorCode.INVALID_RANGE,
                              f"Joining start group {start.group} is after the largest "
                              f"group {largest.group}")
    return start, largest


def standalone_fetch_range(start: Location, end_plus_one: Location,
                           largest: Location | None) -> tuple[Location, Location]:
    """(start, end inclusive) of a standalone FETCH (End.Object 0 = the whole End.Group)."""
    if end_plus_one.object == 0:
        end = Location(end_plus_one.group, MAX_VARINT)
    else:
        end = Location(end_plus_one.group, end_plus_one.object - 1)
    if end < start:
        raise FetchRangeError(FetchErrorCode.INVALID_RANGE, "Fetch end is before its start")
    if largest is None:
        raise FetchRangeError(FetchErrorCode.NO_OBJECTS, "The track has no objects yet")
    if start > largest:
        raise FetchRangeError(FetchErrorCode.INVALID_RANGE,
                              "Fetch start is after the largest object")
    return start, min(end, largest)


def stream_blocks_fetch(stream_next: Location, fetch_end: Location) -> bool:
    """An open upstream subgroup stream whose next possible object is `stream_next` can still
    deliver something inside a fetch ending (inclusive) at `fetch_end`."""
    return stream_next <= fetch_end
