"""Synthetic media shared by every fastrelay endpoint and the moq-rs driver.

One payload format for all of them, so a moq-rs subscriber verifies fastrelay's objects and a
fastrelay subscriber verifies moq-rs's: each object carries its identity, its size, its send
time and a filler derived from its identity. Also the publishing plan helpers, the per-track
verifier (order, gaps, integrity, delay) and the JSON summaries both roles print.

Pure code: no transport, no clock reads except where a caller passes times in.
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

# --- Self-verifying object payload -------------------------------------------------------------
#
# Every object carries its own identity and send time, then filler derived from that identity,
# so a receiver checks integrity, placement and one-way delay with no shared state. Layout
# (network byte order):
#   magic "FRY1" | group u64 | object u64 | objects_in_group u32 | size u32 | send_ns u64 |
#   crc32 of the preceding 36 bytes u32 | filler (size - 40 bytes)
# send_ns is CLOCK_REALTIME (time.time_ns()): publisher and subscriber must share one clock
# (same host, or network namespaces of one host).

PAYLOAD_MAGIC = b"FRY1"
_HEADER = struct.Struct(">4sQQIIQ")
_CRC = struct.Struct(">I")
HEADER_SIZE = _HEADER.size + _CRC.size  # 40
_FILLER_BLOCK = 64  # blake2b digest size used as the repeating filler unit


class PayloadError(ValueError):
    """A received payload is not an intact synthetic object."""


@dataclass(frozen=True)
class PayloadHeader:
    group: int
    """Group id the publisher put the object in."""
    object: int
    """Object id within the group, from 0."""
    objects_in_group: int
    """How many objects the group holds, so a receiver sees tail loss."""
    size: int
    """Total payload length, header included."""
    send_ns: int
    """time.time_ns() right before the publisher handed the object to the transport."""


def filler(group: int, obj: int, length: int) -> bytes:
    """Deterministic bytes for (group, object): a misplaced or corrupted object cannot match."""
    if length <= 0:
        return b""
    block = hashlib.blake2b(struct.pack(">QQ", group, obj), digest_size=_FILLER_BLOCK).digest()
    return (block * (length // _FILLER_BLOCK + 1))[:length]


def encode_object(header: PayloadHeader) -> bytes:
    if header.size < HEADER_SIZE:
        raise ValueError(f"Object size {header.size} is below the {HEADER_SIZE}-byte header")
    head = _HEADER.pack(PAYLOAD_MAGIC, header.group, header.object, header.objects_in_group,
                        header.size, header.send_ns)
    return (head + _CRC.pack(zlib.crc32(head))
            + filler(header.group, header.object, header.size - HEADER_SIZE))


def decode_object(payload: bytes) -> PayloadHeader:
    """Parse and verify a payload; raise PayloadError saying what is wrong."""
    if len(payload) < HEADER_SIZE:
        raise PayloadError(f"Payload is truncated ({len(payload)} bytes)")
    head = payload[:_HEADER.size]
    magic, group, obj, count, size, send_ns = _HEADER.unpack(head)
    if magic != PAYLOAD_MAGIC:
        raise PayloadError("Payload magic mismatch")
    (crc,) = _CRC.unpack_from(payload, _HEADER.size)
    if crc != zlib.crc32(head):
        raise PayloadError("Payload header checksum mismatch")
    if size != len(payload):
        raise PayloadError(f"Payload length {len(payload)} != declared size {size}")
    if payload[HEADER_SIZE:] != filler(group, obj, size - HEADER_SIZE):
        raise PayloadError("Payload filler mismatch")
    return PayloadHeader(group=group, object=obj, objects_in_group=count, size=size,
                         send_ns=send_ns)


# --- Publishing plan ---------------------------------------------------------------------------


def group_sizes(objects: int, groups: int) -> list[int]:
    """Split `objects` over `groups` as evenly as possible; earlier groups take the remainder."""
    if objects < 1 or groups < 1:
        raise ValueError("objects and groups must be at least 1")
    if groups > objects:
        raise ValueError(f"{groups} groups cannot hold only {objects} objects")
    base, extra = divmod(objects, groups)
    return [base + (1 if g < extra else 0) for g in range(groups)]


def iter_plan(objects: int, groups: int, first_group: int = 0) -> Iterator[tuple[int, int, int]]:
    """Yield (group id, object id, objects in that group) in publishing order."""
    for index, count in enumerate(group_sizes(objects, groups)):
        for obj in range(count):
            yield first_group + index, obj, count


# --- Statistics --------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[int], pct: float) -> int | None:
    """Nearest-rank percentile of an ascending sequence (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(pct / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class DelayStats:
    """One-way delay summary in microseconds (send_ns in the payload -> Python receive time)."""

    count: int
    min_us: int | None
    p50_us: int | None
    p90_us: int | None
    p99_us: int | None
    max_us: int | None
    mean_us: int | None

    @classmethod
    def from_samples(cls, samples_us: Sequence[int]) -> DelayStats:
        ordered = sorted(samples_us)
        mean = round(sum(ordered) / len(ordered)) if ordered else None
        return cls(count=len(ordered), min_us=ordered[0] if ordered else None,
                   p50_us=percentile(ordered, 50), p90_us=percentile(ordered, 90),
                   p99_us=percentile(ordered, 99), max_us=ordered[-1] if ordered else None,
                   mean_us=mean)


@dataclass
class _GroupState:
    seen: set[int] = field(default_factory=set)
    next_object: int = 0
    objects_in_group: int | None = None
    ended: bool = False
    gaps: int = 0
    skipped: bool = False
    """A subgroup of this group was skipped on purpose (an explicit signal from the relay)."""


@dataclass
class SubscribeSummary:
    event: str
    role: str
    ok: bool
    objects: int
    """Intact, unique objects received."""
    bytes: int
    """Payload bytes of every delivered object, intact or not."""
    groups: int
    groups_complete: int
    groups_open: int
    """Groups whose stream had not ended when the subscriber stopped."""
    lost: int
    """Objects expected but never received intact."""
    gaps: int
    """Times an object id skipped ahead within a group."""
    missing_groups: int
    out_of_order: int
    """Objects that arrived after a later object of the same group."""
    groups_out_of_order: int
    """Groups that arrived after a higher group (allowed by MoQ: informational)."""
    duplicates: int
    integrity_failures: int
    group_errors: int
    delay: DelayStats
    track_ended: bool
    reason: str
    """Why the subscriber stopped: complete, track_ended, duration, signal, error."""
    timings_ms: dict[str, float] = field(default_factory=dict)
    connection: dict[str, int | None] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    skipped: int = 0
    """Objects missing from groups the relay said it skipped (not counted as lost)."""
    skipped_subgroups: int = 0
    timestamp_mismatches: int = 0
    """Objects whose timestamp extension disagreed with the payload's send time."""


class TrackVerifier:
    """Checks every delivered object of one track; knows nothing about moq (unit-testable)."""

    def __init__(self) -> None:
        self._groups: dict[int, _GroupState] = {}
        self._max_group: int | None = None
        self.delays_us: list[int] = []
        self.objects = 0
        self.bytes = 0
        self.out_of_order = 0
        self.groups_out_of_order = 0
        self.duplicates = 0
        self.integrity_failures = 0
        self.group_errors = 0
        self.skipped_subgroups = 0
        self.timestamp_mismatches = 0
        self.errors: list[str] = []

    def on_group(self, group: int) -> None:
        """A group stream arrived (in arrival order)."""
        if self._max_group is not None and group < self._max_group:
            self.groups_out_of_order += 1
        self._max_group = group if self._max_group is None else max(self._max_group, group)
        self._groups.setdefault(group, _GroupState())

    def on_object(self, group: int, payload: bytes, recv_ns: int,
                  send_ns: int | None = None) -> None:
        """`send_ns` (e.g. from a timestamp extension header) is used for the delay when it
        agrees with the payload's own send time within a second; otherwise the payload's is,
        and the disagreement is counted (moq-rs 0.5.1 rewrites extension 0x10 when relaying)."""
        self.bytes += len(payload)
        try:
            header = decode_object(payload)
        except PayloadError as exc:
            self._fail(f"group {group}: {exc}")
            return
        if header.group != group:
            self._fail(f"group {group}: carries an object of group {header.group}")
            return
        state = self._groups.setdefault(group, _GroupState())
        state.objects_in_group = header.objects_in_group
        if header.object in state.seen:
            self.duplicates += 1
            return
        if header.object < state.next_object:
            self.out_of_order += 1
        elif header.object > state.next_object:
            state.gaps += 1
        state.next_object = max(state.next_object, header.object + 1)
        state.seen.add(header.object)
        self.objects += 1
        sent = header.send_ns
        if send_ns is not None:
            if abs(send_ns - header.send_ns) <= 1_000_000_000:
                sent = send_ns
            else:
                self.timestamp_mismatches += 1
        self.delays_us.append((recv_ns - sent) // 1000)

    @property
    def gaps(self) -> int:
        """Jumps ahead within groups, except in groups with a skipped subgroup."""
        return sum(s.gaps for s in self._groups.values() if not s.skipped)

    def on_subgroup_skipped(self, group: int, subgroup: int) -> None:
        """The relay said it skipped (the rest of) this subgroup: what is missing from the
        group is reported as skipped, not lost."""
        self.skipped_subgroups += 1
        self._groups.setdefault(group, _GroupState()).skipped = True

    def on_group_end(self, group: int) -> None:
        self._groups.setdefault(group, _GroupState()).ended = True

    def on_group_error(self, group: int, message: str) -> None:
        self.group_errors += 1
        self._note(f"group {group}: {message}")

    def received(self) -> int:
        return self.objects

    def complete_before(self, end_group: int) -> bool:
        """Every group from the first one seen up to `end_group` (excluded) is whole, or was
        skipped on purpose."""
        if not self._groups:
            return True
        for group in range(min(self._groups), end_group):
            state = self._groups.get(group)
            if state is None:
                return False
            whole = state.objects_in_group is not None and len(state.seen) == state.objects_in_group
            if not (whole or state.skipped):
                return False
        return True

    def summary(self, *, expect_objects: int | None, expect_groups: int | None,
                track_ended: bool, reason: str) -> SubscribeSummary:
        complete = sum(1 for s in self._groups.values()
                       if s.objects_in_group is not None and len(s.seen) == s.objects_in_group)
        # A group still open when the subscriber stopped (duration, signal) is not lossy yet;
        # one whose stream ended short, or any group once the track ended, is.
        owed = {g: max(0, s.objects_in_group - len(s.seen)) for g, s in self._groups.items()
                if s.objects_in_group is not None and (s.ended or s.skipped or track_ended)}
        skipped = sum(n for g, n in owed.items() if self._groups[g].skipped)
        tail_lost = sum(n for g, n in owed.items() if not self._groups[g].skipped)
        groups_open = sum(1 for s in self._groups.values() if not s.ended)
        missing_groups = 0
        if self._groups:
            # Holes between the lowest and highest group seen, plus any still owed.
            ids = self._groups.keys()
            missing_groups = max(ids) - min(ids) + 1 - len(self._groups)
        if expect_groups is not None:
            missing_groups = max(missing_groups, expect_groups - len(self._groups))
        lost = tail_lost
        if expect_objects is not None:
            lost = max(lost, expect_objects - self.objects - skipped)
        ok = (self.objects > 0 and lost == 0 and missing_groups == 0 and self.gaps == 0
              and self.out_of_order == 0 and self.duplicates == 0
              and self.integrity_failures == 0 and self.group_errors == 0 and skipped == 0
              and (expect_objects is None or self.objects == expect_objects))
        return SubscribeSummary(
            event="summary", role="subscribe", ok=ok, objects=self.objects, bytes=self.bytes,
            groups=len(self._groups), groups_complete=complete, groups_open=groups_open,
            lost=lost, gaps=self.gaps,
            missing_groups=missing_groups, out_of_order=self.out_of_order,
            groups_out_of_order=self.groups_out_of_order, duplicates=self.duplicates,
            integrity_failures=self.integrity_failures, group_errors=self.group_errors,
            delay=DelayStats.from_samples(self.delays_us), track_ended=track_ended,
            reason=reason, errors=list(self.errors), skipped=skipped,
            skipped_subgroups=self.skipped_subgroups,
            timestamp_mismatches=self.timestamp_mismatches)

    def _fail(self, message: str) -> None:
        self.integrity_failures += 1
        self._note(message)

    def _note(self, message: str) -> None:
        if len(self.errors) < 20:  # keep the summary line bounded
            self.errors.append(message)


@dataclass
class PublishSummary:
    event: str
    role: str
    ok: bool
    objects: int
    bytes: int
    groups: int
    duration_s: float
    """From the first object to the last one written."""
    rate: float
    """Achieved objects per second."""
    max_lateness_us: int
    """Worst delay of a write behind its paced schedule (the publisher's own lag)."""
    reason: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    connection: dict[str, int | None] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
