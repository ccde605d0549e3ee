"""relay.interop.moq_rs: payload codec, verifier and stats in memory; then a loopback run of
moq-rs server + one publisher + two subscribers, each its own process."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("moq")

from relay.interop.moq_rs import (  # noqa: E402
    MAX_OBJECTS_PER_GROUP,
    check_plan,
    negotiated_versions,
)
from relay.media import (  # noqa: E402
    HEADER_SIZE,
    DelayStats,
    PayloadError,
    TrackVerifier,
    decode_object,
    encode_object,
    filler,
    group_sizes,
    iter_plan,
    percentile,
)
from relay.media import PayloadHeader as ObjectHeader  # noqa: E402
from tests.children import child_env, stop_child  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
BROADCAST = "interop/demo"
TRACK = "video"
OBJECTS = 240
GROUPS = 12
SIZE = 1200
RATE = 400  # objects/s: 0.6 s of media


def obj(group: int, index: int, count: int = 3, size: int = 100, send_ns: int = 1_000_000) -> bytes:
    return encode_object(ObjectHeader(group=group, object=index, objects_in_group=count,
                                      size=size, send_ns=send_ns))


class TestPayload:
    def test_encode_decode_roundtrip(self) -> None:
        header = ObjectHeader(group=7, object=3, objects_in_group=10, size=1200, send_ns=123456789)
        data = encode_object(header)
        assert len(data) == 1200
        assert decode_object(data) == header

    def test_encode_header_only(self) -> None:
        header = ObjectHeader(group=0, object=0, objects_in_group=1, size=HEADER_SIZE, send_ns=1)
        assert decode_object(encode_object(header)) == header

    def test_encode_too_small(self) -> None:
        with pytest.raises(ValueError, match="Object size 39 is below the 40-byte header"):
            encode_object(ObjectHeader(group=0, object=0, objects_in_group=1, size=39, send_ns=0))

    def test_decode_truncated(self) -> None:
        with pytest.raises(PayloadError, match=r"^Payload is truncated \(39 bytes\)$"):
            decode_object(obj(1, 1)[:39])

    def test_decode_cut_filler(self) -> None:
        with pytest.raises(PayloadError, match=r"^Payload length 99 != declared size 100$"):
            decode_object(obj(1, 1)[:99])

    def test_decode_bad_magic(self) -> None:
        with pytest.raises(PayloadError, match="^Payload magic mismatch$"):
            decode_object(b"XXXX" + obj(1, 1)[4:])

    def test_decode_header_corrupted(self) -> None:
        data = bytearray(obj(1, 1))
        data[12] ^= 0x01  # inside the group id
        with pytest.raises(PayloadError, match="^Payload header checksum mismatch$"):
            decode_object(bytes(data))

    def test_decode_filler_corrupted(self) -> None:
        data = bytearray(obj(1, 1))
        data[-1] ^= 0xFF
        with pytest.raises(PayloadError, match="^Payload filler mismatch$"):
            decode_object(bytes(data))

    def test_filler_depends_on_ids(self) -> None:
        assert filler(1, 2, 300) == filler(1, 2, 300)
        assert filler(1, 2, 300) != filler(2, 1, 300)
        assert len(filler(0, 0, 1000)) == 1000
        assert filler(0, 0, 0) == b""


class TestPlan:
    def test_group_sizes_even(self) -> None:
        assert group_sizes(12, 4) == [3, 3, 3, 3]

    def test_group_sizes_remainder_first(self) -> None:
        assert group_sizes(10, 3) == [4, 3, 3]

    def test_group_sizes_invalid(self) -> None:
        with pytest.raises(ValueError, match="3 groups cannot hold only 2 objects"):
            group_sizes(2, 3)
        with pytest.raises(ValueError, match="objects and groups must be at least 1"):
            group_sizes(0, 1)

    def test_check_plan_limits(self) -> None:
        check_plan(MAX_OBJECTS_PER_GROUP, 1, HEADER_SIZE)
        with pytest.raises(ValueError, match="8193 objects in a group exceed moq's 8192"):
            check_plan(MAX_OBJECTS_PER_GROUP + 1, 1, HEADER_SIZE)
        with pytest.raises(ValueError, match="a group of 33600000 bytes exceeds moq's 33554432"):
            check_plan(336, 1, 100_000)
        with pytest.raises(ValueError, match="--size must be at least 40"):
            check_plan(1, 1, 39)

    def test_iter_plan(self) -> None:
        assert list(iter_plan(5, 2, first_group=10)) == [
            (10, 0, 3), (10, 1, 3), (10, 2, 3), (11, 0, 2), (11, 1, 2)]


class TestStats:
    def test_percentile_nearest_rank(self) -> None:
        values = list(range(1, 101))
        assert percentile(values, 50) == 50
        assert percentile(values, 99) == 99
        assert percentile(values, 100) == 100
        assert percentile([5], 99) == 5
        assert percentile([], 50) is None

    def test_delay_stats(self) -> None:
        stats = DelayStats.from_samples([30, 10, 20])
        assert (stats.count, stats.min_us, stats.p50_us, stats.max_us, stats.mean_us) == (
            3, 10, 20, 30, 20)
        assert DelayStats.from_samples([]).p99_us is None

    def test_negotiated_versions(self) -> None:
        log = ("2026 \x1b[32m INFO\x1b[0m moq_tokio::client: connected "
               "\x1b[3mversion\x1b[0m\x1b[2m=\x1b[0mmoq-transport-14\n"
               "2026  INFO moq_tokio::client: connected version=moq-lite-06\n")
        assert negotiated_versions(log) == ["moq-transport-14", "moq-lite-06"]


def feed(verifier: TrackVerifier, group: int, payloads: list[bytes], *, end: bool = True) -> None:
    verifier.on_group(group)
    for payload in payloads:
        verifier.on_object(group, payload, recv_ns=1_500_000)
    if end:
        verifier.on_group_end(group)


class TestTrackVerifier:
    def test_complete_in_order(self) -> None:
        v = TrackVerifier()
        for g in range(2):
            feed(v, g, [obj(g, i) for i in range(3)])
        s = v.summary(expect_objects=6, expect_groups=2, track_ended=True, reason="track_ended")
        assert s.ok
        assert (s.objects, s.groups, s.groups_complete, s.lost, s.bytes) == (6, 2, 2, 0, 600)
        assert s.delay.p50_us == 500  # 1.5 ms received - 1.0 ms sent

    def test_gap_within_group(self) -> None:
        v = TrackVerifier()
        feed(v, 0, [obj(0, 0), obj(0, 2)])
        s = v.summary(expect_objects=None, expect_groups=None, track_ended=True, reason="x")
        assert not s.ok
        assert (s.gaps, s.lost, s.groups_complete) == (1, 1, 0)

    def test_out_of_order_and_duplicate(self) -> None:
        v = TrackVerifier()
        feed(v, 0, [obj(0, 1), obj(0, 0), obj(0, 2), obj(0, 2)])
        s = v.summary(expect_objects=3, expect_groups=1, track_ended=True, reason="x")
        assert not s.ok
        assert (s.objects, s.out_of_order, s.duplicates, s.gaps, s.lost) == (3, 1, 1, 1, 0)

    def test_tail_loss(self) -> None:
        v = TrackVerifier()
        feed(v, 0, [obj(0, 0), obj(0, 1)])
        s = v.summary(expect_objects=None, expect_groups=None, track_ended=True, reason="x")
        assert (s.ok, s.lost, s.gaps) == (False, 1, 0)

    def test_open_group_at_stop_is_not_lost(self) -> None:
        v = TrackVerifier()
        feed(v, 0, [obj(0, 0), obj(0, 1)], end=False)
        s = v.summary(expect_objects=None, expect_groups=None, track_ended=False, reason="signal")
        assert (s.ok, s.lost, s.groups_open) == (True, 0, 1)
        s = v.summary(expect_objects=None, expect_groups=None, track_ended=True, reason="x")
        assert (s.ok, s.lost) == (False, 1)

    def test_missing_group(self) -> None:
        v = TrackVerifier()
        feed(v, 0, [obj(0, i) for i in range(3)])
        feed(v, 2, [obj(2, i) for i in range(3)])
        s = v.summary(expect_objects=None, expect_groups=None, track_ended=True, reason="x")
        assert (s.ok, s.missing_groups) == (False, 1)

    def test_groups_out_of_order_is_informational(self) -> None:
        v = TrackVerifier()
        feed(v, 1, [obj(1, i) for i in range(3)])
        feed(v, 0, [obj(0, i) for i in range(3)])
        s = v.summary(expect_objects=6, expect_groups=2, track_ended=True, reason="x")
        assert (s.ok, s.groups_out_of_order) == (True, 1)

    def test_integrity_failures(self) -> None:
        v = TrackVerifier()
        corrupted = bytearray(obj(0, 0))
        corrupted[-1] ^= 1
        feed(v, 0, [bytes(corrupted), obj(1, 1)])  # bad filler, then an object of group 1
        s = v.summary(expect_objects=None, expect_groups=None, track_ended=True, reason="x")
        assert (s.ok, s.integrity_failures, s.objects) == (False, 2, 0)
        assert s.errors == ["group 0: Payload filler mismatch",
                            "group 0: carries an object of group 1"]

    def test_fewer_than_expected(self) -> None:
        v = TrackVerifier()
        feed(v, 0, [obj(0, i) for i in range(3)])
        s = v.summary(expect_objects=9, expect_groups=3, track_ended=False, reason="duration")
        assert (s.ok, s.lost, s.missing_groups) == (False, 6, 2)

    def test_group_error(self) -> None:
        v = TrackVerifier()
        feed(v, 0, [obj(0, i) for i in range(3)])
        v.on_group_error(1, "reset")
        s = v.summary(expect_objects=3, expect_groups=None, track_ended=True, reason="x")
        assert (s.ok, s.group_errors, s.errors) == (False, 1, ["group 1: reset"])


# --- loopback: every role is its own process ---------------------------------------------------


def driver(*args: str) -> list[str]:
    return [sys.executable, "-m", "relay.interop.moq_rs", *args]


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """First stdout line of `proc`, or fail after `timeout` seconds (readline alone can hang)."""
    stream = proc.stdout
    assert stream is not None
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert box and box[0], f"no line from {proc.args!r} within {timeout} s"
    return box[0]


@pytest.fixture
def moq_server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, object]]]:
    with open(tmp_path / "server.err", "w") as err:  # the child keeps its own copy of the fd
        proc = subprocess.Popen(
            driver("server", "--bind", f"{LOOPBACK}:0", "--duration", "60"),
            cwd=REPO, env=child_env(), text=True, stdout=subprocess.PIPE, stderr=err)
    try:
        listening = json.loads(read_line(proc, timeout=10))
        assert listening["event"] == "listening"
        yield proc, listening
    finally:
        stop_child(proc)


def last_json(path: Path) -> dict[str, object]:
    lines = path.read_text().strip().splitlines()
    assert lines, f"{path.name} printed nothing"
    return json.loads(lines[-1])


def test_loopback_relay_two_subscribers(moq_server: tuple[subprocess.Popen[str],
                                                          dict[str, object]],
                                        tmp_path: Path) -> None:
    server, listening = moq_server
    fingerprints = listening["fingerprints"]
    assert isinstance(fingerprints, list) and len(fingerprints[0]) == 64
    url = f"moqt://{listening['bind']}/interop"
    common = ["--url", url, "--broadcast", BROADCAST, "--track", TRACK,
              "--tls-fingerprint", fingerprints[0]]
    children: list[subprocess.Popen[str]] = []

    def spawn(name: str, *args: str) -> subprocess.Popen[str]:
        with open(tmp_path / f"{name}.out", "w") as out, \
                open(tmp_path / f"{name}.err", "w") as err:
            proc = subprocess.Popen(driver(*args), cwd=REPO, env=child_env(), text=True,
                                    stdout=out, stderr=err)
        children.append(proc)
        return proc

    try:
        subs = [spawn(f"sub{i}", "subscribe", *common, "--expect-objects", str(OBJECTS),
                      "--expect-groups", str(GROUPS), "--duration", "15") for i in (1, 2)]
        pub = spawn("pub", "publish", *common, "--objects", str(OBJECTS), "--groups",
                    str(GROUPS), "--size", str(SIZE), "--rate", str(RATE),
                    "--wait-demand", "10", "--start-delay", "0.3", "--linger", "0.5")
        deadline = time.monotonic() + 18
        for proc in [pub, *subs]:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        for proc in children:
            stop_child(proc)

    published = last_json(tmp_path / "pub.out")
    assert pub.returncode == 0, published
    assert (published["objects"], published["groups"]) == (OBJECTS, GROUPS)
    for i, proc in enumerate(subs, start=1):
        summary = last_json(tmp_path / f"sub{i}.out")
        assert proc.returncode == 0, summary
        assert summary["ok"] is True
        assert (summary["objects"], summary["groups"], summary["groups_complete"]) == (
            OBJECTS, GROUPS, GROUPS)
        assert (summary["lost"], summary["gaps"], summary["out_of_order"],
                summary["duplicates"], summary["integrity_failures"]) == (0, 0, 0, 0, 0)
        assert summary["bytes"] == OBJECTS * SIZE
        delay = summary["delay"]
        assert isinstance(delay, dict)
        # One shared clock on loopback: delays are positive and far below a second.
        assert 0 < delay["min_us"] <= delay["p50_us"] <= delay["p99_us"] <= delay["max_us"]
        assert delay["p50_us"] < 200_000, delay
        # moq-rs peers pick moq-lite between themselves; draft-14 needs a moq-00-only server.
        versions = negotiated_versions((tmp_path / f"sub{i}.err").read_text())
        assert versions and all(v.startswith("moq-lite") for v in versions), versions

    stop_child(server)
    assert server.stdout is not None
    events = [json.loads(line) for line in server.stdout.read().splitlines() if line]
    assert [e["event"] for e in events][-1] == "stopped"
    assert sum(1 for e in events if e["event"] == "session") == 3


def test_wrong_fingerprint_fails_fast(moq_server: tuple[subprocess.Popen[str],
                                                        dict[str, object]]) -> None:
    _, listening = moq_server
    result = subprocess.run(
        driver("subscribe", "--url", f"moqt://{listening['bind']}/x", "--broadcast", "b",
               "--track", "t", "--tls-fingerprint", "00" * 32, "--duration", "5",
               "--log-level", "off"),
        cwd=REPO, env=child_env(), text=True, capture_output=True, timeout=15)
    assert result.returncode == 1
    assert "fingerprint mismatch" in result.stderr
    assert result.stdout == ""


def test_publish_rejects_small_size_before_connecting() -> None:
    result = subprocess.run(
        driver("publish", "--url", f"moqt://{LOOPBACK}:9/x", "--broadcast", "b", "--track", "t",
               "--objects", "1", "--size", "10", "--insecure"),
        cwd=REPO, env=child_env(), text=True, capture_output=True, timeout=15)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --size must be at least 40 (the payload header)"


def test_usage_error_exits_2() -> None:
    result = subprocess.run(driver("publish", "--url", "moqt://x"), cwd=REPO, env=child_env(),
                            text=True, capture_output=True, timeout=15)
    assert result.returncode == 2
    assert "required" in result.stderr


def test_start_on_signal_needs_a_bound() -> None:
    """--start-on-signal waits at most --wait-demand: without it the wait would be unbounded."""
    result = subprocess.run(
        driver("publish", "--url", f"moqt://{LOOPBACK}:9/x", "--broadcast", "b", "--track", "t",
               "--objects", "1", "--insecure", "--start-on-signal"),
        cwd=REPO, env=child_env(), text=True, capture_output=True, timeout=15)
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: --start-on-signal needs --wait-demand "
                                     "(it bounds the wait)")
