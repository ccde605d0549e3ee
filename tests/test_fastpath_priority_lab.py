"""Priorities under congestion, end to end in the lab, with the eBPF fast path: one
subscriber's downlink is rate limited (a TBF, `at.slow.rate`) well below the track's bit
rate. The publisher's default split layout puts each group's first object on subgroup 0
(priority 0) and the rest on subgroup 1 (priority 128). The relay, started with
`--queue-budget`, must skip that subscriber's low-priority subgroups whole (signalled, so
the subscriber reports them as skipped, not lost) while its high-priority subgroups arrive;
the other subscribers get everything, from the kernel; no stream that starts at the slow
subscriber stalls (it ends on the end of the track, not on its --duration).

Scenario helpers (Scenario, run, start_when_subscribed...) are tests/lab_scenario.py's.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from relay.bench.paths import PATHS
from relay.publisher import DELTA_PRIORITY, KEY_PRIORITY
from tests import lab_scenario as fl

pytestmark = pytest.mark.root

GROUP = 10  # objects per group: 0 on subgroup 0 (priority 0), 1..9 on subgroup 1 (128)
OBJECTS = 300  # 30 groups of 1000-byte objects
RATE = 50  # objects/s: 400 kbit/s of payload for 6 s
SLOW_RATE = "150kbit"  # the slow subscriber's downlink: well under half the track
QUEUE_BUDGET = 12000  # bytes queued per subscriber that count as full load
FAST = 2


def topology(tmp_path: Path) -> Path:
    """pub, relay, sub1..sub3 on plain links, `slow` behind a TBF on the relay's side."""
    text = f"""
name = "prio"
[[host]]
name = "pub"
role = "publisher"
[[host]]
name = "relay"
role = "relay"
[[host]]
name = "sub"
role = "subscriber"
count = {FAST}
[[host]]
name = "slow"
role = "subscriber"
[[link]]
hosts = ["relay", "pub"]
[[link]]
hosts = ["relay", "sub"]
[[link]]
hosts = ["relay", "slow"]
at.slow.rate = "{SLOW_RATE}"
"""
    path = tmp_path / "prio.toml"
    path.write_text(text)
    return path


def test_congested_subscriber_skips_low_priority_subgroups_whole(tmp_path: Path) -> None:
    base = PATHS["fastpath-none"]
    path = dataclasses.replace(
        base, relay_argv=[*base.relay_argv, "--queue-budget", str(QUEUE_BUDGET)])
    shaped: dict[str, Any] = {}

    def body(s: fl.Scenario) -> None:
        pub = s.publish(s.lab.publishers[0], OBJECTS, "--rate", str(RATE), "--group-length",
                        str(GROUP), "--wait-subscriber", "60", "--start-on-signal",
                        "--linger", "10")
        subs = [s.subscribe(h, "--expect-objects", str(OBJECTS), "--duration", "60")
                for h in s.lab.subscribers]
        fl.start_when_subscribed(pub, subs)
        fl.wait_all(subs + [pub], 75)
        shaped.update(s.lab.rate_limit(s.lab.relay, "slow") or {})

    scenario, stats = fl.run(tmp_path, topology(tmp_path), body, path)
    summaries = {p.name.split("-")[0]: p.summary() for p in scenario.parties
                 if "-pub-" not in p.name}
    report = json.dumps({"summaries": summaries, "relay": stats, "tbf": shaped}, indent=1)
    assert shaped.get("rate") == 150_000 and shaped.get("packets", 0) > 0, shaped

    groups = OBJECTS // GROUP
    for host in (f"sub{i}" for i in range(1, FAST + 1)):
        fl.assert_intact(summaries[host], OBJECTS)
        assert summaries[host]["skipped_subgroups"] == 0, summaries[host]

    slow = summaries["slow"]
    # low-priority subgroups skipped whole, reported as skipped (not lost), and only those
    assert slow["skipped_subgroups"] > 0 and slow["skipped"] > 0, slow
    assert slow["lost"] == 0 and slow["missing_groups"] == 0, slow
    assert slow["duplicates"] == 0 and slow["integrity_failures"] == 0, slow
    assert slow["group_errors"] == 0, slow
    # On a congested link a group's two streams may arrive in either order (allowed): the
    # verifier counts object 1 before object 0 as a gap, then object 0 as out of order.
    assert slow["gaps"] == slow["out_of_order"], slow
    # every skipped subgroup is objects 1..GROUP-1 of its group, and nothing else is
    # missing: every high-priority subgroup (object 0 of each group) arrived
    assert slow["skipped"] == slow["skipped_subgroups"] * (GROUP - 1), slow
    assert slow["objects"] + slow["skipped"] == OBJECTS, slow
    assert slow["groups"] >= groups and slow["objects"] >= groups, slow
    # no stream stalled: it ended on the track's end; the only groups not ended are the
    # skipped ones (their end-of-group subgroup was skipped)
    assert slow["reason"] == "track_ended" and slow["track_ended"], slow
    assert slow["groups_open"] == slow["skipped_subgroups"], slow

    # the relay counted the skips for that subscriber's session, as congestion
    skipped = stats["counters"]["skipped"]
    assert sum(r.get("congestion", 0) for r in skipped.values()) == slow["skipped_subgroups"], \
        report
    assert len(skipped) == 1, report
    # the kernel carried the traffic for the others: every fast subscriber was offloaded
    fp = stats["fastpath"]
    assert fp["counters"]["subscribers_offloaded"] == FAST + 1, report
    assert fp["counters"]["streams_kernel"] >= FAST * 2 * groups, report
    assert fp["kernel_bytes_share"] >= 0.5, report
    assert KEY_PRIORITY < DELTA_PRIORITY  # the layout the assertions rely on
