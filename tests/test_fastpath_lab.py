"""The eBPF fast path end to end, with `--crypto none`: a real relay (`fastrelay relay
--fastpath on`) in the lab's relay namespace, fastrelay publishers and verifying subscribers
in theirs, programs really attached to the relay's veths. Every subscriber must get every
object intact, and the relay's own counters must show the kernel carrying the traffic.

Lab topologies are written per test (subscriber count, loss); every lab and process is
removed in `finally` (the Lab context manager, RelayHandle.stop, stop_child by PID).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.lab_scenario import (
    Scenario,
    assert_intact,
    run,
    start_when_subscribed,
    wait_all,
    wait_subscribed,
)

pytestmark = pytest.mark.root

GROUP = 30
OBJECT_SIZE = 1000  # fastrelay publish's default


def topology(tmp_path: Path, subscribers: int, *, publishers: int = 1, sub_loss: float = 0.0) -> Path:
    """One relay, `publishers` publishers, `subscribers` subscribers; `sub_loss`: drop
    probability of what the relay sends to each subscriber (at the subscriber's end)."""
    loss = f"at.sub.loss = {sub_loss}\n" if sub_loss else ""
    text = f"""
name = "fp"
[[host]]
name = "pub"
role = "publisher"
count = {publishers}
[[host]]
name = "relay"
role = "relay"
[[host]]
name = "sub"
role = "subscriber"
count = {subscribers}
[[link]]
hosts = ["relay", "pub"]
[[link]]
hosts = ["relay", "sub"]
{loss}"""
    path = tmp_path / f"fp-{publishers}x{subscribers}.toml"
    path.write_text(text)
    return path


# Each verifying subscriber is a Python process: 16 of them at 100 objects/s would be the
# machine's limit on two cores, not the relay's, so the wider fan-out runs slower.
@pytest.mark.parametrize(("subscribers", "rate"), [(1, 100), (4, 100), (16, 30)])
def test_every_subscriber_gets_every_object_from_the_kernel(tmp_path: Path, subscribers: int,
                                                            rate: int) -> None:
    objects = 150 if subscribers < 16 else 90

    def body(s: Scenario) -> None:
        pub = s.publish(s.lab.publishers[0], objects, "--rate", str(rate), "--wait-subscriber",
                        "60", "--start-on-signal")
        subs = [s.subscribe(h, "--expect-objects", str(objects), "--duration", "90")
                for h in s.lab.subscribers]
        start_when_subscribed(pub, subs)
        wait_all(subs + [pub], 90)

    scenario, stats = run(tmp_path, topology(tmp_path, subscribers), body)
    for party in scenario.parties:
        if "-pub-" not in party.name:
            assert_intact(party.summary(), objects)
    fp = stats["fastpath"]
    assert fp["counters"]["subscribers_offloaded"] == subscribers, fp
    assert fp["counters"]["streams_kernel"] >= subscribers * (objects // GROUP), fp
    # the kernel really carried the traffic: at least 90% of what reached subscribers
    assert fp["kernel_bytes_share"] >= 0.9, fp
    assert fp["registered"] == fp["counters"]["forwarded_packets"] > 0, fp
    assert fp["shadow_bytes"] == fp["counters"]["forwarded_stream_bytes"] + \
        fp["counters"].get("punted_stream_bytes", 0), fp
    # userspace still saw every object (the original goes up), once
    assert stats["counters"]["bytes_in"] == objects * OBJECT_SIZE, stats["counters"]


def test_loss_on_every_subscriber_link_is_repaired(tmp_path: Path) -> None:
    """5% of what the relay sends each subscriber is dropped at the subscriber's end; the
    relay declares forwarded packets lost and resends their ranges from the shadow copy."""
    objects = 150
    dropped: dict[str, int] = {}

    def body(s: Scenario) -> None:
        # one stream per group: with loss, objects of two subgroup streams of one group
        # could arrive in either order (allowed, but the verifier would call it a gap)
        pub = s.publish(s.lab.publishers[0], objects, "--rate", "100", "--wait-subscriber", "60",
                        "--layout", "single", "--start-on-signal")
        subs = [s.subscribe(h, "--expect-objects", str(objects), "--duration", "90")
                for h in s.lab.subscribers]
        start_when_subscribed(pub, subs)
        wait_all(subs + [pub], 120)
        for h in s.lab.subscribers:
            dropped[h] = s.lab.loss_counters(s.lab.relay, h)["dropped_packets"]

    scenario, stats = run(tmp_path, topology(tmp_path, 4, sub_loss=0.05), body)
    for party in scenario.parties:
        if "-pub-" not in party.name:
            assert_intact(party.summary(), objects)
    fp = stats["fastpath"]
    assert sum(dropped.values()) > 0, dropped
    assert fp["forwarded_lost"] > 0, fp
    # Every forwarded packet the relay declared lost was really dropped by the loss program
    # (the rest of the drops are userspace's own packets: handshakes, ACKs, resends).
    assert fp["forwarded_lost"] <= sum(dropped.values()), (fp, dropped)
    # every registered packet was settled once, as acknowledged or lost (the last few may
    # still be in flight when the subscriber, having everything, closes)
    assert fp["forwarded_acked"] + fp["forwarded_lost"] <= fp["registered"], fp


def test_late_joiner_gets_whole_groups_and_a_leaver_disturbs_nobody(tmp_path: Path) -> None:
    objects = 480  # 16 groups of 30 at 60 objects/s: 8 s

    def body(s: Scenario) -> None:
        first, leaver, late = s.lab.subscribers
        pub = s.publish(s.lab.publishers[0], objects, "--rate", "60", "--wait-subscriber", "60",
                        "--layout", "single", "--start-on-signal")
        steady = s.subscribe(first, "--expect-objects", str(objects), "--duration", "60")
        gone = s.subscribe(leaver, "--duration", "2.5")
        start_when_subscribed(pub, [steady, gone])
        time.sleep(1.0)  # about two groups: join mid-stream
        assert pub.proc.poll() is None, "the publisher finished before the late joiner came"
        joiner = s.subscribe(late, "--filter", "next-group", "--duration", "60")
        wait_all([steady, gone, pub, joiner], 90)
        # everyone left: nothing of theirs stays in the kernel's maps (the relay lets a
        # closed connection drain for three PTOs before it forgets it)
        deadline = time.monotonic() + 20
        state = s.relay_stats()["fastpath"]
        while state["subscribers"] and time.monotonic() < deadline:
            time.sleep(0.2)
            state = s.relay_stats()["fastpath"]
        assert state["subscribers"] == 0, state
        assert all(state["map_entries"][m] == 0 for m in ("fr_peers", "fr_sub_tracks",
                                                          "fr_sub_streams")), state

    scenario, stats = run(tmp_path, topology(tmp_path, 3), body)
    by_name = {p.name.split("-")[0]: p.summary() for p in scenario.parties if "-pub-" not in p.name}
    first, leaver, late = (by_name[h] for h in ("sub1", "sub2", "sub3"))
    assert_intact(first, objects)
    assert leaver["reason"] == "duration" and leaver["lost"] == 0 and leaver["gaps"] == 0, leaver
    assert_intact(late)
    assert late["groups_complete"] >= 1 and late["groups_open"] == 0, late
    assert late["objects"] == late["groups_complete"] * GROUP, late
    assert stats["fastpath"]["counters"]["subscribers_offloaded"] == 3, stats["fastpath"]


def test_two_publishers_several_tracks_on_one_subscriber_connection(tmp_path: Path) -> None:
    """Each subscriber takes a track of each of two publishers on one connection: the two
    publishers chose the same alias (the relay gives the second track another one of the
    same width, which the kernel writes in place), and the subscriber's stream ids run ahead
    of each publisher's (they pass 64, a second varint byte, while the publishers' do not:
    the kernel grows the packets in place)."""
    objects = 150
    tracks = ("lab/cam1/video", "lab/cam2/audio")

    def body(s: Scenario) -> None:
        pubs = [s.publish(host, objects, "--rate", "60", "--wait-subscriber", "60",
                          "--start-on-signal", namespace=track.rsplit("/", 1)[0],
                          track=track.rsplit("/", 1)[1])
                for host, track in zip(s.lab.publishers, tracks)]
        subs = [s._spawn(f"{host}-both", host, [
            "subscribe", "--url", s.url(host), *[a for t in tracks for a in ("--track", t)],
            *s.relay.client_args, "--expect-objects", str(objects), "--duration", "90", "--json"])
            for host in s.lab.subscribers]
        wait_subscribed(subs)
        for pub in pubs:
            pub.proc.send_signal(signal.SIGUSR1)
        wait_all(subs + pubs, 120)

    scenario, stats = run(tmp_path, topology(tmp_path, 2, publishers=2), body)
    for party in scenario.parties:
        if "-both" in party.name:
            summary = party.summary()
            assert_intact(summary, 2 * objects)
            aliases = {t["connection"]["track_alias"] for t in summary["tracks"].values()}
            assert len(aliases) == 2, summary["tracks"]
    fp = stats["fastpath"]
    assert fp["counters"]["upstreams_offloaded"] == 2, fp
    assert fp["counters"]["subscribers_offloaded"] == len(scenario.lab.subscribers), fp
    assert fp["counters"]["streams_kernel"] >= 2 * 2 * (objects // GROUP) * 2, fp
    assert fp["kernel_bytes_share"] >= 0.9, fp
    kernel = fp["kernel"]
    assert kernel.get("EG_RESIZED", {}).get("packets", 0) > 0, kernel  # ids grew in place
    assert "PUNT_SID_GROW" not in fp["punts"] and "PUNT_ALIAS_WIDTH" not in fp["punts"], fp
