"""relay.core.aliases: the per-connection alias rule and its varint width edges."""

from __future__ import annotations

import pytest

from relay.core.aliases import (
    VARINT_RANGES,
    AliasKind,
    AliasSpace,
    varint_width,
)
from relay.moqt.constants import MAX_VARINT
from relay.moqt.data import SubgroupHeader, encode_subgroup_header, rewrite_track_alias

EDGES = [
    (0, 1), (63, 1), (64, 2), (16383, 2), (16384, 4), ((1 << 30) - 1, 4), (1 << 30, 8),
    (MAX_VARINT, 8),
]


@pytest.mark.parametrize("value,width", EDGES, ids=[str(v) for v, _ in EDGES])
def test_varint_width_edges(value: int, width: int) -> None:
    assert varint_width(value) == width
    low, high = VARINT_RANGES[width]
    assert low <= value <= high


def test_assign_free_upstream_alias_is_kept() -> None:
    space = AliasSpace()
    a = space.assign(7, "t1")
    assert (a.alias, a.kind, a.fast_path) == (7, AliasKind.SAME, True)
    assert space.owner(7) == "t1"


@pytest.mark.parametrize("upstream", [v for v, _ in EDGES], ids=[str(v) for v, _ in EDGES])
def test_assign_collision_gives_same_width(upstream: int) -> None:
    space = AliasSpace()
    space.reserve(upstream, "other")
    a = space.assign(upstream, "t")
    assert a.kind is AliasKind.SAME_WIDTH
    assert varint_width(a.alias) == varint_width(upstream)
    assert a.alias == VARINT_RANGES[varint_width(upstream)][0] or \
        (upstream == VARINT_RANGES[varint_width(upstream)][0] and
         a.alias == upstream + 1)


def test_assign_collision_at_63_never_picks_64() -> None:
    space = AliasSpace()
    for alias in range(0, 63):
        space.reserve(alias, alias)
    space.reserve(63, "x")
    a = space.assign(63, "t")  # every 1-byte alias is taken
    assert a.kind is AliasKind.USERSPACE_ONLY
    assert a.alias == 64 and not a.fast_path


def test_assign_collision_at_64_stays_two_bytes() -> None:
    space = AliasSpace()
    space.reserve(64, "x")
    a = space.assign(64, "t")
    assert (a.alias, a.kind) == (65, AliasKind.SAME_WIDTH)


def test_assign_two_byte_width_full_falls_back() -> None:
    space = AliasSpace()
    for alias in range(64, 16384):
        space.reserve(alias, alias)
    a = space.assign(16383, "t")
    assert (a.alias, a.kind) == (0, AliasKind.USERSPACE_ONLY)
    b = space.assign(16384, "u")  # 4-byte width is free
    assert (b.alias, b.kind) == (16384, AliasKind.SAME)


def test_assign_four_byte_edges() -> None:
    space = AliasSpace()
    space.reserve((1 << 30) - 1, "x")
    a = space.assign((1 << 30) - 1, "t")
    assert (a.alias, a.kind) == (16384, AliasKind.SAME_WIDTH)
    space.reserve(1 << 30, "y")
    b = space.assign(1 << 30, "u")
    assert (b.alias, b.kind) == ((1 << 30) + 1, AliasKind.SAME_WIDTH)


def test_assign_hole_in_the_middle_is_found() -> None:
    space = AliasSpace()
    for alias in (64, 65, 67):
        space.reserve(alias, alias)
    assert space.assign(65, "t").alias == 66


def test_release_frees_the_alias() -> None:
    space = AliasSpace()
    space.assign(5, "a")
    assert space.assign(5, "b").alias == 0
    space.release(5)
    assert space.assign(5, "c").kind is AliasKind.SAME
    assert len(space) == 2


def test_assign_rejects_non_varint() -> None:
    with pytest.raises(ValueError, match="is not a QUIC varint"):
        AliasSpace().assign(MAX_VARINT + 1, "t")


def test_reserve_rejects_used_alias() -> None:
    space = AliasSpace()
    space.reserve(1, "a")
    with pytest.raises(ValueError, match="Track alias 1 is already in use"):
        space.reserve(1, "b")


@pytest.mark.parametrize("upstream", [v for v, _ in EDGES], ids=[str(v) for v, _ in EDGES])
def test_same_width_alias_rewrites_in_place(upstream: int) -> None:
    # The whole point of rule 2: the codec's in-place rewrite accepts the chosen alias.
    space = AliasSpace()
    space.reserve(upstream, "other")
    a = space.assign(upstream, "t")
    data = encode_subgroup_header(SubgroupHeader.new(upstream, 9, 128)) + b"payload"
    rewritten = rewrite_track_alias(data, a.alias)
    assert len(rewritten) == len(data)
    assert rewritten == encode_subgroup_header(SubgroupHeader.new(a.alias, 9, 128)) + b"payload"
