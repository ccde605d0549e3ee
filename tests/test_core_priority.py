"""relay.core.priority: draft-14 section 7 send order and the subgroup skip policy."""

from __future__ import annotations

import pytest

from relay.core.priority import (
    CongestionState,
    PendingSend,
    SkipPolicy,
    order_sends,
    should_forward,
)
from relay.moqt.constants import GroupOrder

ASC, DESC = GroupOrder.ASCENDING, GroupOrder.DESCENDING


def _keys(sends: list[PendingSend]) -> list[object]:
    return [s.key for s in order_sends(sends)]


ORDER_CASES = [
    ("subscriber priority wins over publisher priority",
     [PendingSend(10, 0, 1, ASC, key="a"), PendingSend(5, 200, 1, ASC, key="b")], ["b", "a"]),
    ("publisher priority breaks a subscriber tie",
     [PendingSend(5, 200, 1, ASC, key="a"), PendingSend(5, 3, 9, ASC, key="b")], ["b", "a"]),
    ("ascending group order",
     [PendingSend(5, 1, 8, ASC, key="g8"), PendingSend(5, 1, 7, ASC, key="g7")], ["g7", "g8"]),
    ("descending group order",
     [PendingSend(5, 1, 7, DESC, key="g7"), PendingSend(5, 1, 8, DESC, key="g8")], ["g8", "g7"]),
    ("publisher's order counts as ascending",
     [PendingSend(5, 1, 8, GroupOrder.PUBLISHER, key="g8"),
      PendingSend(5, 1, 7, GroupOrder.PUBLISHER, key="g7")], ["g7", "g8"]),
    ("subgroup then object inside a group",
     [PendingSend(5, 1, 7, ASC, 1, 0, key="s1o0"), PendingSend(5, 1, 7, ASC, 0, 4, key="s0o4"),
      PendingSend(5, 1, 7, ASC, 0, 2, key="s0o2")], ["s0o2", "s0o4", "s1o0"]),
    ("arrival breaks a full tie",
     [PendingSend(5, 1, 7, ASC, sequence=2, key="late"),
      PendingSend(5, 1, 7, ASC, sequence=1, key="early")], ["early", "late"]),
    ("0 is the highest priority, 255 the lowest",
     [PendingSend(255, 0, 0, ASC, key="low"), PendingSend(0, 255, 0, ASC, key="high")],
     ["high", "low"]),
]


@pytest.mark.parametrize("name,sends,expected", ORDER_CASES, ids=[c[0] for c in ORDER_CASES])
def test_order_sends(name: str, sends: list[PendingSend], expected: list[str]) -> None:
    assert _keys(sends) == expected


LOAD_CASES = [
    ("idle", CongestionState(), 0),
    ("cwnd unknown ignored", CongestionState(bytes_in_flight=10_000), 0),
    ("half window", CongestionState(5_000, 10_000), 500),
    ("full window", CongestionState(10_000, 10_000), 1000),
    ("queue dominates", CongestionState(5_000, 10_000, 30_000, 10_000), 3000),
    ("window dominates", CongestionState(12_000, 10_000, 1_000, 10_000), 1200),
]


@pytest.mark.parametrize("name,state,permille", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_load_permille(name: str, state: CongestionState, permille: int) -> None:
    assert state.load_permille() == permille


THRESHOLD_CASES = [
    ("idle forwards all", CongestionState(), 255),
    ("cwnd-limited forwards all", CongestionState(10_000, 10_000), 255),
    ("109.9 % still all", CongestionState(10_999, 10_000), 255),
    ("110 % drops to 127", CongestionState(11_000, 10_000), 127),
    ("queue at 2x budget", CongestionState(0, 0, 20_000, 10_000), 63),
    ("queue at 3.999x", CongestionState(0, 0, 39_999, 10_000), 63),
    ("queue at 4x", CongestionState(0, 0, 40_000, 10_000), 0),
    ("queue at 100x", CongestionState(0, 0, 1_000_000, 10_000), 0),
]


@pytest.mark.parametrize("name,state,threshold", THRESHOLD_CASES,
                         ids=[c[0] for c in THRESHOLD_CASES])
def test_default_policy_threshold(name: str, state: CongestionState, threshold: int) -> None:
    assert SkipPolicy().threshold(state) == threshold


FORWARD_CASES = [
    (0, 0, True), (1, 0, False), (127, 127, True), (128, 127, False), (255, 255, True),
    (254, 255, True), (64, 63, False), (63, 63, True),
]


@pytest.mark.parametrize("priority,threshold,forward", FORWARD_CASES,
                         ids=[f"p{p}-t{t}" for p, t, _ in FORWARD_CASES])
def test_should_forward(priority: int, threshold: int, forward: bool) -> None:
    assert should_forward(priority, threshold) is forward


def test_custom_policy_steps() -> None:
    policy = SkipPolicy(((0, 200), (500, 100)))
    assert policy.threshold(CongestionState(499, 1000)) == 200
    assert policy.threshold(CongestionState(500, 1000)) == 100


@pytest.mark.parametrize("steps,message", [
    ((), "Skip policy steps must start at load 0"),
    (((10, 255),), "Skip policy steps must start at load 0"),
    (((0, 255), (0, 127)), "Skip policy step loads must strictly increase"),
    (((0, 100), (10, 200)), "Skip policy thresholds must not rise with load"),
    (((0, 256),), "Threshold 256 is not 0..255"),
])
def test_policy_rejects_bad_steps(steps: tuple[tuple[int, int], ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SkipPolicy(steps)
