"""The README's main job: lab up, probe, datagrams publisher -> relay -> every subscriber, lab down."""

from __future__ import annotations

import pytest

from hw.lab import list_labs
from hw.topology import load_topology
from relay.demo import run_demo
from tests.conftest import run_cli

pytestmark = pytest.mark.root


def test_every_subscriber_gets_every_datagram_and_the_lab_is_gone() -> None:
    result = run_demo(load_topology("default"), packets=100, size=1200, interval_s=0.0005)
    assert result.forwarded == 100
    assert [s.host for s in result.subscribers] == ["sub1", "sub2", "sub3"]
    for sub in result.subscribers:
        assert (sub.received, sub.duplicates, sub.lost(result.sent)) == (100, 0, 0), sub.host
        assert len(sub.delays_ns) == 100 and min(sub.delays_ns) > 0
    assert result.complete
    assert result.lab not in {lab.name for lab in list_labs()}


def test_demo_command_prints_verdicts_and_results(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_cli(["demo", "--packets", "50", "--rate", "2000"], capsys).stdout
    assert "Probe verdicts" in out and "soft" in out
    for host in ("sub1", "sub2", "sub3"):
        assert host in out
