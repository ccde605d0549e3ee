"""Send ordering and the subgroup skip policy, shared by the userspace path and the fast path.

(a) Ordering, draft-14 section 7 (https://www.ietf.org/archive/id/draft-ietf-moq-transport-14.html#section-7):
lower value = higher priority. Among pending sends on one subscriber connection: subscriber
priority first, then publisher priority, then group (ascending or descending per the
subscription's group order), then subgroup id, then object id (ascending), then arrival.

(b) Skip policy. Decided ONCE, at the START of a subgroup (offset 0 of the subscriber's
stream), never in the middle of one:

    forward  <=>  publisher_priority <= threshold[subscriber]

`threshold` is one number 0..255 per subscriber. 255 forwards everything; as the subscriber's
congestion load rises it falls step by step (`SkipPolicy.steps`), so only the more important
subgroups (lower publisher priority values) still go out. Priority 0 is never skipped.
Userspace computes the threshold from the congestion numbers and the controller writes the same
number into the kernel map, so the kernel applies the identical comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Hashable, Iterable

from relay.moqt.constants import GroupOrder

PRIORITY_MAX = 255
THRESHOLD_FORWARD_ALL = PRIORITY_MAX


# -- (a) ordering ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PendingSend:
    """Something waiting to be written to one subscriber connection."""

    subscriber_priority: int
    publisher_priority: int
    group_id: int
    group_order: GroupOrder
    """The subscription's resolved order: ASCENDING or DESCENDING (PUBLISHER counts as ascending)."""
    subgroup_id: int = 0
    object_id: int = 0
    sequence: int = 0
    """Arrival order, the final tie-break."""
    key: Hashable = None
    """Caller's handle (stream, fetch, ...)."""


def send_order_key(send: PendingSend) -> tuple[int, int, int, int, int, int]:
    group = -send.group_id if send.group_order == GroupOrder.DESCENDING else send.group_id
    return (send.subscriber_priority, send.publisher_priority, group, send.subgroup_id,
            send.object_id, send.sequence)


def order_sends(pending: Iterable[PendingSend]) -> list[PendingSend]:
    """`pending` in the order they should go out (first = highest priority)."""
    return sorted(pending, key=send_order_key)


# -- (b) skip policy ---------------------------------------------------------------------------


class SkipReason(Enum):
    """Why a whole subgroup was not forwarded to a subscriber; values are counter keys."""

    CONGESTION = "congestion"  # publisher priority above the subscriber's threshold


@dataclass(frozen=True)
class CongestionState:
    """A subscriber connection's congestion numbers, as the session reports them."""

    bytes_in_flight: int = 0
    congestion_window: int = 0
    """0 = unknown (the term is ignored)."""
    queued_bytes: int = 0
    """Bytes accepted for this connection but not yet sent."""
    queue_budget: int = 0
    """0 = no budget (the term is ignored)."""

    def load_permille(self) -> int:
        """The larger of in-flight/cwnd and queued/budget, in thousandths (integer, exact)."""
        load = 0
        if self.congestion_window > 0:
            load = self.bytes_in_flight * 1000 // self.congestion_window
        if self.queue_budget > 0:
            load = max(load, self.queued_bytes * 1000 // self.queue_budget)
        return load


# Default steps (load in permille -> threshold). Below 110 % nothing is skipped: a connection
# that is merely cwnd-limited sits at ~100 % in-flight/cwnd and must not lose anything.
DEFAULT_STEPS: tuple[tuple[int, int], ...] = (
    (0, 255),
    (1100, 127),
    (2000, 63),
    (4000, 0),
)


@dataclass(frozen=True)
class SkipPolicy:
    steps: tuple[tuple[int, int], ...] = DEFAULT_STEPS
    """(minimum load permille, threshold) pairs: the last step whose minimum is <= the load
    applies. Minimums strictly increase from 0; thresholds never increase."""

    def __post_init__(self) -> None:
        if not self.steps or self.steps[0][0] != 0:
            raise ValueError("Skip policy steps must start at load 0")
        for (low_a, thr_a), (low_b, thr_b) in zip(self.steps, self.steps[1:]):
            if low_b <= low_a:
                raise ValueError("Skip policy step loads must strictly increase")
            if thr_b > thr_a:
                raise ValueError("Skip policy thresholds must not rise with load")
        for _, threshold in self.steps:
            if not 0 <= threshold <= PRIORITY_MAX:
                raise ValueError(f"Threshold {threshold} is not 0..255")

    def threshold(self, state: CongestionState) -> int:
        """The subscriber's priority threshold for this congestion state."""
        load = state.load_permille()
        result = self.steps[0][1]
        for low, threshold in self.steps:
            if load >= low:
                result = threshold
        return result


def should_forward(publisher_priority: int, threshold: int) -> bool:
    """The one rule both paths apply at the start of a subgroup."""
    return publisher_priority <= threshold
