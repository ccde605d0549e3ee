"""The first subscriber of a moq-rs-published track, on loopback, with no warm-up subscriber.

A moq-rs publisher (draft-14 against `fastrelay relay`) announces and waits; a fastrelay
subscriber is the track's first subscriber (its SUBSCRIBE makes the relay subscribe upstream
to moq-rs), a moq-rs subscriber joins the same upstream subscription. The publisher starts on
SIGUSR1 once the relay holds both subscriptions (`--start-on-signal`), not on a timer armed by
the first demand: such a timer raced the subscribers' process start-up, which took 3-18 s on
the loaded 2-core machine, and a subscriber arriving after the first object (or after the
track ended) looked like a relay that served its first subscriber late. Both must get every
object, in order, intact.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_relay_e2e import (
    FASTRELAY,
    MOQ_RS,
    NAMESPACE,
    TRACK,
    Children,
    _check,
)

pytest.importorskip("moq")

OBJECTS, GROUPS, SIZE = 150, 10, 800


@pytest.fixture
def kids(tmp_path: Path) -> Iterator[Children]:
    kids = Children(tmp_path)
    try:
        yield kids
    finally:
        kids.stop_all()


def relay_stats(children: Children, name: str) -> dict[str, Any]:
    """The running relay's stats over its control socket (`fastrelay stats`)."""
    result = subprocess.run([*FASTRELAY, "stats", "--pid", str(children.procs[name].pid),
                             "--json"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    stats: dict[str, Any] = json.loads(result.stdout)["stats"]
    return stats


def wait_stats(children: Children, name: str, what: str, ok: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ok(stats := relay_stats(children, name)):
        for child, proc in children.procs.items():
            assert proc.poll() is None, f"{child} exited: {children.summary(child)}"
        assert time.monotonic() < deadline, f"{what} within {timeout:g} s: {stats}"
        time.sleep(0.2)


def test_first_subscriber_of_a_moq_rs_track_gets_every_object(kids: Children) -> None:
    children = kids
    url, fp = children.relay("relay")
    pub = children.spawn("pub", [
        *MOQ_RS, "publish", "--url", url, "--broadcast", NAMESPACE, "--track", TRACK,
        "--objects", str(OBJECTS), "--groups", str(GROUPS), "--size", str(SIZE),
        "--rate", "300", "--tls-fingerprint", fp, "--wait-demand", "40",
        "--start-on-signal", "--log-level", "warn"])
    wait_stats(children, "relay", "the publisher announced",
               lambda s: s["namespaces"] == [NAMESPACE], 30)
    # The track's first subscriber: the relay has no upstream subscription yet.
    assert relay_stats(children, "relay")["tracks"] == 0
    children.spawn("sub", [*FASTRELAY, "subscribe", "--url", url, "--namespace", NAMESPACE,
                           "--track", TRACK, "--fingerprint", fp, "--expect-objects",
                           str(OBJECTS), "--duration", "45", "--json"])
    children.wait_text("sub", "subscribed", timeout=30, stderr=True)  # its SUBSCRIBE_OK
    children.spawn("rs_sub", [*MOQ_RS, "subscribe", "--url", url, "--broadcast", NAMESPACE,
                              "--track", TRACK, "--tls-fingerprint", fp, "--expect-objects",
                              str(OBJECTS), "--duration", "45", "--log-level", "warn"])
    # One upstream subscription, two downstream ones: then the publisher may start.
    wait_stats(children, "relay", "both subscriptions",
               lambda s: (s["tracks"], s["subscriptions"]) == (1, 2), 30)
    assert relay_stats(children, "relay")["counters"]["objects_in"] == 0
    pub.send_signal(signal.SIGUSR1)
    children.wait(["pub", "sub", "rs_sub"], timeout=40)
    published = children.summary("pub")
    assert pub.returncode == 0, published
    assert (published["objects"], published["groups"]) == (OBJECTS, GROUPS), published
    for name in ("sub", "rs_sub"):
        assert children.procs[name].returncode == 0, children.summary(name)
        _check(children.summary(name), OBJECTS, SIZE, GROUPS, name)
