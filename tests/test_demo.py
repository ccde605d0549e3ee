"""The README's main job: lab up, probe, publisher -> relay -> every subscriber, lab down."""

from __future__ import annotations

import pytest

from hw.lab import list_labs
from hw.topology import load_topology
from relay.demo import run_demo
from tests.conftest import run_cli

pytestmark = pytest.mark.root


def test_every_subscriber_gets_every_object_and_the_lab_is_gone() -> None:
    result = run_demo(load_topology("default"), objects=60, rate=100, object_size=500,
                      group_length=10)
    assert [s.host for s in result.subscribers] == ["sub1", "sub2", "sub3"]
    for sub in result.subscribers:
        summary = sub.summary
        assert (summary["objects"], summary["lost"], summary["integrity_failures"]) == (60, 0, 0), \
            sub.host
        assert sub.ok and summary["delay"]["p50_us"] > 0, summary
    assert result.complete
    assert result.relay_stats["counters"]["objects_in"] == 60
    assert result.fastpath and result.kernel_share is not None and result.kernel_share > 0.5, \
        result.relay_stats.get("fastpath")
    assert result.lab not in {lab.name for lab in list_labs()}


def test_the_userspace_path_on_request() -> None:
    result = run_demo(load_topology("default"), objects=30, rate=100, object_size=500,
                      group_length=10, crypto=None, fastpath=False)
    assert result.complete and result.kernel_share is None
    assert result.relay_stats["fastpath"] == {"enabled": False}


def test_demo_command_prints_verdicts_and_results(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(["demo", "--objects", "30", "--rate", "100"], capsys)
    out = result.stdout
    assert "Probe verdicts" in out and "soft" in out
    for host in ("sub1", "sub2", "sub3"):
        assert host in out
    assert "30/30" in out and "eBPF fast path" in out
    assert "of the bytes to subscribers" in result.stderr  # the kernel's share, on stderr
