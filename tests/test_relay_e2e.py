"""`fastrelay relay` end to end on loopback, every endpoint its own process.

Each test starts a relay (`python -m relay relay --listen 127.0.0.1:0`), reads its
`fingerprint sha256:...` and `listening host:port` lines, runs publishers and subscribers
(ours: `fastrelay publish/subscribe`; moq-rs's: `python -m relay.interop.moq_rs`), and checks
every subscriber's verifying summary. Every wait is bounded, every child is ended by PID in
`finally`, and child output goes to files in tmp_path.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.children import child_env, stop_child

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
NAMESPACE = "demo/cam"
TRACK = "video"
FASTRELAY = [sys.executable, "-m", "relay"]
MOQ_RS = [sys.executable, "-m", "relay.interop.moq_rs"]
# Publishers start this long after their first subscriber, so that the other subscribers
# (Python processes, slow to start on a loaded machine) are subscribed before the first object.
START_DELAY = 2.5


class Children:
    """Child processes of one test, their output in files, all ended by PID."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.folder / f"{name}.out", "w") as out, \
                open(self.folder / f"{name}.err", "w") as err:
            proc = subprocess.Popen(argv, cwd=REPO, env=child_env(), stdout=out, stderr=err)
        self.procs[name] = proc
        return proc

    def relay(self, name: str, *extra: str) -> tuple[str, str]:
        """Start a relay; (moqt URL, certificate fingerprint)."""
        proc = self.spawn(name, [*FASTRELAY, "relay", "--listen", f"{LOOPBACK}:0",
                                 "--duration", "120", *extra])
        lines = self.lines(name, proc, 2, timeout=15)
        assert lines[0].startswith("fingerprint sha256:"), lines
        assert lines[1].startswith("listening "), lines
        return f"moqt://{lines[1].split()[1]}/relay", lines[0].split(":", 1)[1]

    def lines(self, name: str, proc: subprocess.Popen[bytes], count: int,
              timeout: float) -> list[str]:
        path = self.folder / f"{name}.out"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = path.read_text().splitlines(keepends=True)
            if len(lines) >= count and lines[count - 1].endswith("\n"):
                return [line.rstrip("\n") for line in lines[:count]]
            assert proc.poll() is None, (f"{name} exited with {proc.returncode}: "
                                         f"{(self.folder / f'{name}.err').read_text()}")
            time.sleep(0.05)
        raise AssertionError(f"{name}: fewer than {count} lines within {timeout} s")

    def wait_text(self, name: str, text: str, timeout: float, stderr: bool = False) -> None:
        path = self.folder / f"{name}.{'err' if stderr else 'out'}"
        deadline = time.monotonic() + timeout
        while text not in path.read_text():
            assert self.procs[name].poll() is None, f"{name} exited"
            assert time.monotonic() < deadline, f"no {text!r} from {name} within {timeout} s"
            time.sleep(0.05)

    def ready(self, *names: str, timeout: float = 30) -> None:
        """Until each child caught SIGTERM (its /proc SigCgt mask): Python has started and the
        endpoint's event loop is running, so it connects within moments. A loaded machine can
        take seconds to start a Python process; a publisher started before that would have
        sent part of the track before the subscriber asked for it."""
        deadline = time.monotonic() + timeout
        for name in names:
            proc = self.procs[name]
            while True:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                caught = int(next(line for line in status.splitlines()
                                  if line.startswith("SigCgt:")).split()[1], 16)
                if caught >> (signal.SIGTERM - 1) & 1:
                    break
                assert proc.poll() is None, f"{name} exited with {proc.returncode}"
                assert time.monotonic() < deadline, f"{name} not running within {timeout} s"
                time.sleep(0.05)

    def wait(self, names: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for name in names:
            self.procs[name].wait(timeout=max(0.1, deadline - time.monotonic()))

    def summary(self, name: str) -> dict[str, object]:
        text = (self.folder / f"{name}.out").read_text().strip()
        assert text, f"{name}.out is empty; stderr: {(self.folder / f'{name}.err').read_text()}"
        if text.startswith("{\n"):  # fastrelay --json: one indented object
            return json.loads(text)
        return json.loads(text.splitlines()[-1])  # moq-rs driver: JSON lines, summary last

    def relay_stats(self, name: str, timeout: float = 10) -> dict[str, object]:
        """SIGTERM the relay; it must exit 0 and print its `stats {...}` line."""
        proc = self.procs[name]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=timeout)
        assert proc.returncode == 0, (self.folder / f"{name}.err").read_text()
        last = (self.folder / f"{name}.out").read_text().splitlines()[-1]
        assert last.startswith("stats "), last
        return json.loads(last[len("stats "):])

    def stop_all(self) -> None:
        for proc in self.procs.values():
            stop_child(proc)


@pytest.fixture
def children(tmp_path: Path):  # type: ignore[no-untyped-def]
    kids = Children(tmp_path)
    try:
        yield kids
    finally:
        kids.stop_all()


def _check(summary: dict[str, object], objects: int, size: int, groups: int | None = None,
           name: str = "") -> dict[str, int]:
    assert summary["ok"] is True, (name, summary)
    assert (summary["objects"], summary["bytes"]) == (objects, objects * size), (name, summary)
    assert (summary["lost"], summary["gaps"], summary["out_of_order"], summary["duplicates"],
            summary["integrity_failures"], summary["group_errors"]) == (0, 0, 0, 0, 0, 0), \
        (name, summary)
    if groups is not None:
        assert summary["groups_complete"] == groups, (name, summary)
    delay = summary["delay"]
    assert isinstance(delay, dict)
    # Sanity of the units and clocks only (no timed assertion: on a loaded 2-core machine the
    # p99 has passed 2 s); the benchmark issue measures this path's delay.
    assert 0 < delay["p50_us"] <= delay["p99_us"] < 60_000_000, (name, delay)
    print(f"{name}: {summary['objects']} objects, delay p50 {delay['p50_us']} us, "
          f"p99 {delay['p99_us']} us")
    return delay


def _publish(children: Children, name: str, url: str, fingerprint: str, *, objects: int,
             group_length: int, size: int, rate: float, layout: str = "split",
             start_delay: float = START_DELAY, wait_subscriber: float = 15) -> None:
    children.spawn(name, [*FASTRELAY, "publish", "--url", url, "--namespace", NAMESPACE,
                          "--track", TRACK, "--fingerprint", fingerprint, "--objects",
                          str(objects), "--group-length", str(group_length), "--object-size",
                          str(size), "--rate", str(rate), "--layout", layout,
                          "--wait-subscriber", str(wait_subscriber), "--start-delay",
                          str(start_delay), "--json"])


def _expect(objects: int | None) -> list[str]:
    return [] if objects is None else ["--expect-objects", str(objects)]


def _subscribe(children: Children, name: str, url: str, fingerprint: str, *,
               objects: int | None, duration: float = 20, extra: tuple[str, ...] = ()) -> None:
    children.spawn(name, [*FASTRELAY, "subscribe", "--url", url, "--namespace", NAMESPACE,
                          "--track", TRACK, "--fingerprint", fingerprint, *_expect(objects),
                          "--duration", str(duration), "--json", *extra])


def _rs_subscribe(children: Children, name: str, url: str, fingerprint: str, *,
                  objects: int | None, duration: float = 20) -> None:
    children.spawn(name, [*MOQ_RS, "subscribe", "--url", url, "--broadcast", NAMESPACE,
                          "--track", TRACK, "--tls-fingerprint", fingerprint, *_expect(objects),
                          "--duration", str(duration), "--log-level", "warn"])


# -- (1) fastrelay publish -> relay -> three fastrelay subscribers -------------------------------


def test_fastrelay_publisher_to_three_subscribers(children: Children) -> None:
    objects, group_length, size = 150, 15, 800
    url, fp = children.relay("relay")
    for i in (1, 2, 3):
        _subscribe(children, f"sub{i}", url, fp, objects=objects)
    children.ready("sub1", "sub2", "sub3")
    time.sleep(0.5)  # the subscribers retry SUBSCRIBE until the track exists anyway
    # --layout single: with `split` the END_OF_TRACK object rides a priority-0 stream that
    # overtakes queued priority-128 data, and `fastrelay subscribe` stops at END_OF_TRACK at
    # once, so on an overloaded machine it can quit before the last objects arrive. The split
    # layout has its own, gentler test below.
    _publish(children, "pub", url, fp, objects=objects, group_length=group_length, size=size,
             rate=300, layout="single")
    children.wait(["pub", "sub1", "sub2", "sub3"], timeout=40)
    assert children.procs["pub"].returncode == 0, children.summary("pub")
    for i in (1, 2, 3):
        assert children.procs[f"sub{i}"].returncode == 0, children.summary(f"sub{i}")
        _check(children.summary(f"sub{i}"), objects, size, objects // group_length, f"sub{i}")
    stats = children.relay_stats("relay")
    counters = stats["counters"]
    assert isinstance(counters, dict)
    assert counters["objects_in"] >= objects
    assert counters["objects_out"] >= 3 * objects
    assert stats["sessions_total"] == 4


# -- (2) moq-rs publisher -> relay -> moq-rs subscriber and a fastrelay subscriber ---------------


def test_moq_rs_publisher_to_moq_rs_and_fastrelay_subscribers(children: Children) -> None:
    pytest.importorskip("moq")
    objects, groups, size = 150, 10, 800
    url, fp = children.relay("relay")
    _subscribe(children, "sub", url, fp, objects=objects)
    _rs_subscribe(children, "rs_sub", url, fp, objects=objects)
    children.ready("sub", "rs_sub")
    time.sleep(0.5)
    children.spawn("pub", [*MOQ_RS, "publish", "--url", url, "--broadcast", NAMESPACE,
                           "--track", TRACK, "--objects", str(objects), "--groups", str(groups),
                           "--size", str(size), "--rate", "300", "--tls-fingerprint", fp,
                           "--wait-demand", "15", "--start-delay", str(START_DELAY),
                           "--log-level", "warn"])
    children.wait(["pub", "sub", "rs_sub"], timeout=40)
    published = children.summary("pub")
    assert children.procs["pub"].returncode == 0, published
    assert published["objects"] == objects
    for name in ("sub", "rs_sub"):
        assert children.procs[name].returncode == 0, children.summary(name)
        _check(children.summary(name), objects, size, groups, name)
    stats = children.relay_stats("relay")
    assert stats["sessions_total"] == 3


# -- (3) fastrelay publisher -> relay -> moq-rs subscriber ---------------------------------------


def test_fastrelay_publisher_to_moq_rs_subscriber(children: Children) -> None:
    pytest.importorskip("moq")
    objects, group_length, size = 150, 15, 800
    url, fp = children.relay("relay")
    _rs_subscribe(children, "rs_sub", url, fp, objects=objects)
    children.ready("rs_sub")
    time.sleep(0.5)
    # moq-rs accepts one subgroup per group: --layout single.
    _publish(children, "pub", url, fp, objects=objects, group_length=group_length, size=size,
             rate=300, layout="single")
    children.wait(["pub", "rs_sub"], timeout=40)
    assert children.procs["pub"].returncode == 0, children.summary("pub")
    assert children.procs["rs_sub"].returncode == 0, children.summary("rs_sub")
    _check(children.summary("rs_sub"), objects, size, objects // group_length, "rs_sub")
    children.relay_stats("relay")


# -- (4) late joiners get complete groups; the first subscriber leaving disturbs nobody -----------


def test_late_joiners_and_a_leaving_subscriber(children: Children) -> None:
    pytest.importorskip("moq")
    objects, group_length, size = 300, 20, 800
    url, fp = children.relay("relay")
    _subscribe(children, "early_leaver", url, fp, objects=objects)
    _subscribe(children, "stayer", url, fp, objects=objects)
    children.ready("early_leaver", "stayer")
    time.sleep(0.5)
    # 30 objects/s: 15 groups over 10 s (late joiners must have time to start even on a
    # loaded machine), one subgroup per group (what moq-rs accepts).
    _publish(children, "pub", url, fp, objects=objects, group_length=group_length, size=size,
             rate=30, layout="single")
    leaver = children.procs["early_leaver"]
    children.wait_text("early_leaver", "subscribed", timeout=20, stderr=True)
    # SUBSCRIBE_OK came START_DELAY before the first object: leave about 1 s into the track.
    time.sleep(START_DELAY + 1.0)
    assert leaver.poll() is None
    leaver.send_signal(signal.SIGTERM)
    leaver.wait(timeout=10)
    time.sleep(0.5)
    # Late joiners, mid-group: moq-rs with its joining FETCH (the current group from the
    # relay's cache), ours from the next group on.
    _rs_subscribe(children, "late_rs", url, fp, objects=None, duration=20)
    _subscribe(children, "late_next_group", url, fp, objects=None, duration=20,
               extra=("--filter", "next-group"))
    children.ready("late_rs", "late_next_group")
    children.wait(["pub", "stayer", "late_rs", "late_next_group"], timeout=60)
    assert children.procs["pub"].returncode == 0, children.summary("pub")
    assert children.procs["stayer"].returncode == 0, children.summary("stayer")
    _check(children.summary("stayer"), objects, size, objects // group_length, "stayer")
    left = children.summary("early_leaver")
    assert left["reason"] == "signal" and 0 < left["objects"] < objects, left  # type: ignore
    assert (left["gaps"], left["out_of_order"], left["integrity_failures"]) == (0, 0, 0), left
    for name in ("late_rs", "late_next_group"):
        late = children.summary(name)
        groups = late["groups_complete"]
        assert isinstance(groups, int) and 2 <= groups < objects // group_length, (name, late)
        assert late["groups"] == groups, (name, late)  # every group it saw is complete
        _check(late, groups * group_length, size, groups, name)
    counters = children.relay_stats("relay")["counters"]
    assert isinstance(counters, dict)
    assert counters["fetches_served"] >= 1 and counters["cache_hits"] >= 1, counters


# -- (5) relay chaining: publisher -> relay A -> relay B (--upstream A) -> subscribers -----------


def test_relay_chain(children: Children) -> None:
    objects, group_length, size = 150, 15, 800
    url_a, fp_a = children.relay("relay_a")
    url_b, fp_b = children.relay("relay_b", "--upstream", url_a, "--upstream-fingerprint", fp_a)
    _publish(children, "pub", url_a, fp_a, objects=objects, group_length=group_length,
             size=size, rate=300, wait_subscriber=20, layout="single")
    time.sleep(0.5)
    for i in (1, 2):
        _subscribe(children, f"sub{i}", url_b, fp_b, objects=objects)
    children.wait(["pub", "sub1", "sub2"], timeout=40)
    assert children.procs["pub"].returncode == 0, children.summary("pub")
    for i in (1, 2):
        assert children.procs[f"sub{i}"].returncode == 0, children.summary(f"sub{i}")
        _check(children.summary(f"sub{i}"), objects, size, objects // group_length, f"sub{i}")
    stats_b = children.relay_stats("relay_b")
    stats_a = children.relay_stats("relay_a")
    # One upstream subscription from B however many subscribers B has.
    assert stats_a["sessions_total"] == 2, stats_a  # the publisher and relay B
    assert stats_b["upstream"]["error"] is None, stats_b  # type: ignore[index]
    counters_b = stats_b["counters"]
    assert isinstance(counters_b, dict)
    # Every payload byte crossed A -> B once and left B twice.
    assert counters_b["bytes_in"] == objects * size, counters_b
    assert counters_b["bytes_out"] == 2 * objects * size, counters_b


# -- split layout: two subgroups per group, priorities 0 and 128, END_OF_TRACK ------------------


def test_split_layout_through_relay(children: Children) -> None:
    """Unhurried (100 objects/s), so no backlog lets the priority-0 END_OF_TRACK stream
    overtake data the subscriber still expects (see test 1)."""
    objects, group_length, size = 90, 15, 500
    url, fp = children.relay("relay")
    _subscribe(children, "sub", url, fp, objects=None)
    children.ready("sub")
    _publish(children, "pub", url, fp, objects=objects, group_length=group_length, size=size,
             rate=100, layout="split")
    children.wait(["pub", "sub"], timeout=40)
    assert children.procs["pub"].returncode == 0, children.summary("pub")
    summary = children.summary("sub")
    assert children.procs["sub"].returncode == 0, summary
    _check(summary, objects, size, objects // group_length, "sub")
    assert summary["track_ended"] is True and summary["skipped"] == 0, summary
    counters = children.relay_stats("relay")["counters"]
    assert isinstance(counters, dict)
    # Two subgroup streams per group plus the END_OF_TRACK group's, all header-preserving.
    assert counters["streams_opened"] == 2 * (objects // group_length) + 1, counters
    assert counters["fast_path_streams"] == counters["streams_opened"], counters


def test_relay_chain_moq_rs_both_ends(children: Children) -> None:
    """moq-rs finds the broadcast on B only through PUBLISH_NAMESPACE, which B learnt from A."""
    pytest.importorskip("moq")
    objects, groups, size = 150, 10, 800
    url_a, fp_a = children.relay("relay_a")
    url_b, fp_b = children.relay("relay_b", "--upstream", url_a, "--upstream-fingerprint", fp_a)
    _rs_subscribe(children, "rs_sub", url_b, fp_b, objects=objects)
    children.ready("rs_sub")
    time.sleep(0.5)
    children.spawn("pub", [*MOQ_RS, "publish", "--url", url_a, "--broadcast", NAMESPACE,
                           "--track", TRACK, "--objects", str(objects), "--groups", str(groups),
                           "--size", str(size), "--rate", "300", "--tls-fingerprint", fp_a,
                           "--wait-demand", "15", "--start-delay", "1", "--log-level", "warn"])
    children.wait(["pub", "rs_sub"], timeout=40)
    assert children.procs["pub"].returncode == 0, children.summary("pub")
    assert children.procs["rs_sub"].returncode == 0, children.summary("rs_sub")
    _check(children.summary("rs_sub"), objects, size, groups, "rs_sub")
    children.relay_stats("relay_b")
    children.relay_stats("relay_a")
