"""Track aliases per downstream MoQ connection (draft-14 section 9.8: the publisher side chooses).

The relay is the publisher towards each subscriber, so it picks the alias every subscriber
sees. Rule, in order:

1. the upstream's alias, when it is free in that subscriber's connection (no rewrite at all);
2. otherwise the lowest free alias of the SAME QUIC varint width (1, 2, 4 or 8 bytes), so the
   kernel fast path can rewrite it in place at stream offset 0 without moving any later byte;
3. otherwise the lowest free alias of any width, and the (subscriber, track) pair is marked
   userspace-only: the fast path must not forward it.

Widths are RFC 9000 section 16 minimal encodings (`aioquic.buffer.size_uint_var`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Hashable

from aioquic.buffer import size_uint_var

from relay.moqt.constants import MAX_VARINT

# RFC 9000 section 16: the value range of each varint width.
VARINT_RANGES: dict[int, tuple[int, int]] = {
    1: (0, (1 << 6) - 1),
    2: (1 << 6, (1 << 14) - 1),
    4: (1 << 14, (1 << 30) - 1),
    8: (1 << 30, MAX_VARINT),
}


def varint_width(value: int) -> int:
    """Bytes of the minimal QUIC varint encoding of `value`."""
    return size_uint_var(value)


class AliasKind(Enum):
    """How an alias was chosen (rule 1, 2 or 3 above)."""

    SAME = "same"  # the upstream's alias itself
    SAME_WIDTH = "same_width"  # another alias, rewritable in place
    USERSPACE_ONLY = "userspace_only"  # width differs: fast path must not forward


@dataclass(frozen=True)
class AliasAssignment:
    alias: int
    kind: AliasKind

    @property
    def fast_path(self) -> bool:
        """The kernel may forward this track to this subscriber (alias rewritable in place)."""
        return self.kind is not AliasKind.USERSPACE_ONLY


class AliasExhausted(Exception):
    """No alias is free at all (practically unreachable: 2^62 values)."""


class AliasSpace:
    """The aliases in use on one downstream connection, each owned by a key (a subscription)."""

    def __init__(self) -> None:
        self._owners: dict[int, Hashable] = {}

    def __contains__(self, alias: int) -> bool:
        return alias in self._owners

    def __len__(self) -> int:
        return len(self._owners)

    def owner(self, alias: int) -> Hashable | None:
        return self._owners.get(alias)

    def assign(self, upstream_alias: int, owner: Hashable) -> AliasAssignment:
        """Choose and reserve an alias for a subscription whose upstream alias is given."""
        if not 0 <= upstream_alias <= MAX_VARINT:
            raise ValueError(f"Track alias {upstream_alias} is not a QUIC varint")
        if upstream_alias not in self._owners:
            return self._take(upstream_alias, owner, AliasKind.SAME)
        low, high = VARINT_RANGES[varint_width(upstream_alias)]
        alias = self._lowest_free(low, high)
        if alias is not None:
            return self._take(alias, owner, AliasKind.SAME_WIDTH)
        alias = self._lowest_free(0, MAX_VARINT)
        if alias is None:
            raise AliasExhausted("Every track alias of this connection is in use")
        return self._take(alias, owner, AliasKind.USERSPACE_ONLY)

    def reserve(self, alias: int, owner: Hashable) -> None:
        """Mark an alias used (e.g. one chosen elsewhere); it must be free."""
        if alias in self._owners:
            raise ValueError(f"Track alias {alias} is already in use")
        self._owners[alias] = owner

    def release(self, alias: int) -> None:
        self._owners.pop(alias, None)

    def _take(self, alias: int, owner: Hashable, kind: AliasKind) -> AliasAssignment:
        self._owners[alias] = owner
        return AliasAssignment(alias, kind)

    def _lowest_free(self, low: int, high: int) -> int | None:
        # Used aliases inside [low, high] are few (one per subscription): walk them in order
        # and return the first hole.
        candidate = low
        for used in sorted(a for a in self._owners if low <= a <= high):
            if used != candidate:
                break
            candidate += 1
        return candidate if candidate <= high else None
