"""relay.core.cache: bounded group cache, coverage, and the FETCH / subscription boundary."""

from __future__ import annotations

import pytest

from relay.core.cache import (
    ORIGIN,
    AddResult,
    CacheConfig,
    CachedObject,
    FetchRangeError,
    TrackCache,
    joining_fetch_range,
    standalone_fetch_range,
    stream_blocks_fetch,
    subscription_start,
)
from relay.moqt.constants import MAX_VARINT, FetchErrorCode, FetchType, FilterType, GroupOrder
from relay.moqt.messages import Location as L


def obj(group: int, object_id: int, size: int = 10, subgroup: int = 0, prio: int = 128,
        ext: bytes = b"") -> CachedObject:
    return CachedObject(group, subgroup, object_id, prio, bytes(size), ext)


def locs(objects: list[CachedObject]) -> list[tuple[int, int]]:
    return [(o.group_id, o.object_id) for o in objects]


def test_store_and_serve_range_verbatim() -> None:
    cache = TrackCache()
    o = CachedObject(3, 1, 4, 7, b"pay", b"\x10\x05", 0)
    assert cache.add(o) is AddResult.STORED
    assert cache.get(L(3, 4)) == o
    assert cache.add(o) is AddResult.DUPLICATE
    assert (cache.stats.objects, cache.stats.bytes) == (1, 5)


def test_objects_order_ascending_and_descending() -> None:
    cache = TrackCache()
    for g, o in [(2, 1), (1, 0), (2, 0), (1, 2), (3, 0)]:
        cache.add(obj(g, o))
    assert locs(cache.objects(L(1, 1), L(2, 1))) == [(1, 2), (2, 0), (2, 1)]
    assert locs(cache.objects(ORIGIN, L(3, 0), GroupOrder.DESCENDING)) == \
        [(3, 0), (2, 0), (2, 1), (1, 0), (1, 2)]


def test_evicts_oldest_group_by_count() -> None:
    cache = TrackCache(CacheConfig(max_groups=2))
    for g in (1, 2, 3):
        cache.add(obj(g, 0))
    assert cache.group_ids == [2, 3]
    assert cache.coverage_start == L(2, 0)
    assert (cache.stats.groups_evicted, cache.stats.objects_evicted) == (1, 1)
    assert not cache.covers(L(1, 5)) and cache.covers(L(2, 0))


def test_evicts_oldest_whole_groups_by_bytes() -> None:
    cache = TrackCache(CacheConfig(max_groups=10, max_bytes=100))
    for o in range(4):
        cache.add(obj(1, o, 20))  # group 1: 80 bytes
    cache.add(obj(2, 0, 10))
    assert cache.add(obj(2, 1, 20)) is AddResult.STORED  # needs room: all of group 1 goes
    assert cache.group_ids == [2]
    assert cache.stats.bytes == 30 and cache.stats.objects_evicted == 4
    assert cache.coverage_start == L(2, 0)


def test_oversize_object_is_counted_and_group_truncated() -> None:
    cache = TrackCache(CacheConfig(max_bytes=100))
    cache.add(obj(1, 0, 10))
    cache.add(obj(2, 0, 10))
    assert cache.add(obj(2, 1, 101)) is AddResult.OVERSIZE
    assert cache.stats.oversize_objects == 1 and cache.stats.oversize_bytes == 101
    assert cache.stats.truncated_groups == 1
    assert cache.coverage_start == L(3, 0)  # group 2 can never be served whole
    assert cache.group_ids == []
    assert cache.add(obj(2, 2, 1)) is AddResult.NOT_COVERED
    assert cache.add(obj(3, 0, 1)) is AddResult.STORED


def test_exactly_budget_sized_object_is_kept() -> None:
    cache = TrackCache(CacheConfig(max_bytes=100))
    assert cache.add(obj(1, 0, 100)) is AddResult.STORED
    assert cache.add(obj(2, 0, 100)) is AddResult.STORED
    assert cache.group_ids == [2]


def test_group_outgrowing_budget_is_truncated() -> None:
    cache = TrackCache(CacheConfig(max_bytes=50))
    for o in range(5):
        assert cache.add(obj(1, o, 10)) is AddResult.STORED
    assert cache.add(obj(1, 5, 10)) is AddResult.GROUP_TRUNCATED
    assert cache.stats.truncated_objects == 6
    assert cache.coverage_start == L(2, 0)
    assert cache.stats.bytes == 0


def test_late_old_group_when_full_is_not_covered() -> None:
    cache = TrackCache(CacheConfig(max_groups=2))
    cache.add(obj(5, 0))
    cache.add(obj(6, 0))
    assert cache.add(obj(4, 0)) is AddResult.NOT_COVERED
    assert cache.coverage_start == L(5, 0)
    assert cache.group_ids == [5, 6]


def test_raise_coverage_drops_earlier_objects() -> None:
    cache = TrackCache()
    for g, o in [(1, 0), (2, 0), (2, 1), (2, 2)]:
        cache.add(obj(g, o))
    cache.raise_coverage(L(2, 2))
    assert locs(cache.objects(ORIGIN, L(9, 9))) == [(2, 2)]
    assert cache.stats.objects == 1
    cache.raise_coverage(L(1, 0))  # never moves back
    assert cache.coverage_start == L(2, 2)


# -- the boundary rule -------------------------------------------------------------------------

START_CASES = [
    ("largest object", FilterType.LARGEST_OBJECT, L(5, 3), None, L(5, 4)),
    ("largest object, empty track", FilterType.LARGEST_OBJECT, None, None, L(0, 0)),
    ("next group", FilterType.NEXT_GROUP_START, L(5, 3), None, L(6, 0)),
    ("next group, empty track", FilterType.NEXT_GROUP_START, None, None, L(0, 0)),
    ("absolute in the future", FilterType.ABSOLUTE_START, L(5, 3), L(9, 0), L(9, 0)),
    ("absolute in the past starts live", FilterType.ABSOLUTE_START, L(5, 3), L(1, 0), L(5, 4)),
    ("absolute range", FilterType.ABSOLUTE_RANGE, None, L(2, 2), L(2, 2)),
]


@pytest.mark.parametrize("name,ft,largest,start,expected", START_CASES,
                         ids=[c[0] for c in START_CASES])
def test_subscription_start(name: str, ft: FilterType, largest: L | None, start: L | None,
                            expected: L) -> None:
    assert subscription_start(ft, largest, start) == expected


def test_joining_fetch_range() -> None:
    rel, ab = FetchType.RELATIVE_JOINING, FetchType.ABSOLUTE_JOINING
    assert joining_fetch_range(rel, 0, L(5, 3)) == (L(5, 0), L(5, 3))
    assert joining_fetch_range(rel, 2, L(5, 3)) == (L(3, 0), L(5, 3))
    assert joining_fetch_range(rel, 99, L(5, 3)) == (L(0, 0), L(5, 3))
    assert joining_fetch_range(ab, 4, L(5, 3)) == (L(4, 0), L(5, 3))
    with pytest.raises(FetchRangeError, match="Joining start group 6 is after") as info:
        joining_fetch_range(ab, 6, L(5, 3))
    assert info.value.code == FetchErrorCode.INVALID_RANGE
    with pytest.raises(FetchRangeError) as info:
        joining_fetch_range(rel, 0, None)
    assert info.value.code == FetchErrorCode.NO_OBJECTS


def test_joining_fetch_and_subscription_partition_every_location() -> None:
    # For any snapshot L: fetch end == L, subscription start == L + 1 object: each Location
    # is on exactly one side.
    for largest in (L(0, 0), L(5, 0), L(5, 3), L(7, 1000)):
        start, end = joining_fetch_range(FetchType.RELATIVE_JOINING, 0, largest)
        live = subscription_start(FilterType.LARGEST_OBJECT, largest)
        for g in range(largest.group + 2):
            for o in range(largest.object + 3):
                loc = L(g, o)
                via_fetch = start <= loc <= end
                via_live = loc >= live
                assert not (via_fetch and via_live), loc
                if loc >= start:
                    assert via_fetch or via_live, loc


def test_standalone_fetch_range() -> None:
    assert standalone_fetch_range(L(1, 0), L(3, 0), L(9, 9)) == (L(1, 0), L(3, MAX_VARINT))
    assert standalone_fetch_range(L(1, 0), L(3, 5), L(9, 9)) == (L(1, 0), L(3, 4))
    assert standalone_fetch_range(L(1, 0), L(30, 0), L(9, 9)) == (L(1, 0), L(9, 9))
    with pytest.raises(FetchRangeError, match="Fetch end is before its start"):
        standalone_fetch_range(L(3, 2), L(3, 2), L(9, 9))
    with pytest.raises(FetchRangeError, match="Fetch start is after the largest object"):
        standalone_fetch_range(L(10, 0), L(11, 0), L(9, 9))
    with pytest.raises(FetchRangeError, match="The track has no objects yet"):
        standalone_fetch_range(L(0, 0), L(1, 0), None)


BLOCK_CASES = [
    ("same group, before L", L(5, 2), L(5, 3), True),
    ("same group, at L (incomplete)", L(5, 3), L(5, 3), True),
    ("same group, after L", L(5, 4), L(5, 3), False),
    ("older group still streaming", L(4, 100), L(5, 3), True),
    ("newer group", L(6, 0), L(5, 3), False),
]


@pytest.mark.parametrize("name,nxt,end,blocks", BLOCK_CASES, ids=[c[0] for c in BLOCK_CASES])
def test_stream_blocks_fetch(name: str, nxt: L, end: L, blocks: bool) -> None:
    assert stream_blocks_fetch(nxt, end) is blocks
