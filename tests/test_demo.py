"""The README's main job: lab up, probe, publisher -> relay -> every subscriber, lab down."""

from __future__ import annotations

import json

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


def test_the_userspace_path_on_request_with_json(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(["demo", "--objects", "30", "--rate", "100", "--crypto", "standard",
                      "--no-fastpath", "--json"], capsys)
    data = json.loads(result.stdout)  # stdout is the JSON document alone, no table
    assert {v["backend"]: v["usable"] for v in data["probe_verdicts"]} == {
        "none": True, "soft": True, "nic": False}
    assert [s["host"] for s in data["subscribers"]] == ["sub1", "sub2", "sub3"]
    assert all(s["ok"] and s["objects"] == 30 and s["lost"] == 0 for s in data["subscribers"])
    assert data["complete"] is True and data["crypto"] is None and data["fastpath"] is False
    assert data["kernel_bytes_share"] is None and data["relay_fastpath"] == {"enabled": False}
    assert data["relay_counters"]["objects_in"] == 30
    assert data["lab"] not in {lab.name for lab in list_labs()}


def test_demo_command_prints_verdicts_and_results(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(["demo", "--objects", "30", "--rate", "100"], capsys)
    out = result.stdout
    assert "Probe verdicts" in out and "soft" in out
    for host in ("sub1", "sub2", "sub3"):
        assert host in out
    assert "30/30" in out and "eBPF fast path" in out
    assert "of the bytes to subscribers" in result.stderr  # the kernel's share, on stderr
