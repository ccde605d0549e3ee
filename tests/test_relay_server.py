"""RelayServer in one event loop with our own endpoints: access control from an --access file,
an upstream relay that is not there, and the stats snapshot."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relay.core.access import AccessConfig
from relay.core.actions import SkipSubgroup
from relay.core.priority import CongestionState, SkipReason
from relay.core.relay import RelayConfig
from relay.moqt.constants import SessionErrorCode
from relay.moqt.quic import TlsOptions, connect, generate_certificate
from relay.publisher import PublisherOptions, run_publisher
from relay.server import RelayServer
from relay.subscriber import SubscriberOptions, run_subscriber

LOOPBACK = "127.0.0.1"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    cert, key, fingerprint = generate_certificate(["localhost", LOOPBACK])
    folder = tmp_path_factory.mktemp("cert")
    (folder / "cert.pem").write_bytes(cert)
    (folder / "key.pem").write_bytes(key)
    return folder / "cert.pem", folder / "key.pem", fingerprint


ACCESS = """
[access]
anonymous_publish = ["open"]
anonymous_subscribe = ["open"]
"""


def test_access_file_refuses_publish_and_subscribe(certificate: tuple[Path, Path, str]) -> None:
    cert, key, fingerprint = certificate
    tls = TlsOptions(fingerprint=fingerprint)

    async def scenario():  # type: ignore[no-untyped-def]
        relay = RelayServer(RelayConfig(access=AccessConfig.from_toml(ACCESS)))
        _, port = await relay.start(LOOPBACK, 0, cert, key)
        url = f"moqt://{LOOPBACK}:{port}/r"
        try:
            refused = await run_publisher(PublisherOptions(
                url=url, namespace=(b"closed", b"cam"), track=b"v", tls=tls, objects=3,
                rate=0, object_size=100))
            sub_refused = await run_subscriber(SubscriberOptions(
                url=url, namespace=(b"closed", b"cam"), track=b"v", tls=tls, duration=1))
            # The open namespace still works, end to end.
            sub = asyncio.ensure_future(run_subscriber(SubscriberOptions(
                url=url, namespace=(b"open", b"cam"), track=b"v", tls=tls, duration=10,
                expect_objects=20)))
            allowed = await run_publisher(PublisherOptions(
                url=url, namespace=(b"open", b"cam"), track=b"v", tls=tls, objects=20,
                rate=200, object_size=200, group_length=5, wait_subscriber=5))
            return refused, sub_refused, allowed, await sub, relay.stats()
        finally:
            await relay.stop()

    refused, sub_refused, allowed, sub, stats = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert not refused.ok and any("PUBLISH_NAMESPACE refused" in e for e in refused.errors), \
        refused
    assert not sub_refused.ok and sub_refused.objects == 0
    assert any("code 1" in e for e in sub_refused.errors), sub_refused  # UNAUTHORIZED
    assert allowed.ok, allowed
    assert sub.ok and sub.objects == 20, sub
    refusals = stats["counters"]["refusals"]
    assert refusals["publish_namespace"] == 1 and refusals["subscribe"] >= 1, stats


def test_unreachable_upstream_refuses_subscribers(certificate: tuple[Path, Path, str]) -> None:
    cert, key, fingerprint = certificate

    async def scenario():  # type: ignore[no-untyped-def]
        # Nothing listens on port 9 of loopback: dialling the upstream times out.
        relay = RelayServer(upstream_url=f"moqt://{LOOPBACK}:9/up",
                            upstream_tls=TlsOptions(insecure=True), connect_timeout=0.5)
        _, port = await relay.start(LOOPBACK, 0, cert, key)
        try:
            summary = await run_subscriber(SubscriberOptions(
                url=f"moqt://{LOOPBACK}:{port}/r", namespace=(b"a",), track=b"t",
                tls=TlsOptions(fingerprint=fingerprint), duration=2))
            return summary, relay.stats()
        finally:
            await relay.stop()

    summary, stats = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert not summary.ok and summary.objects == 0
    assert any("Upstream relay unavailable" in e for e in summary.errors), summary
    upstream = stats["upstream"]
    assert upstream["connected"] is False and "no MoQ session" in upstream["error"], stats
    assert stats["tracks"] == 0 and stats["subscriptions"] == 0, stats


def test_skipped_subgroups_are_signalled(certificate: tuple[Path, Path, str]) -> None:
    """A congested subscriber (threshold forced to 0) gets only priority-0 subgroups; each
    skipped one arrives as a header-only stream reset with DELIVERY_TIMEOUT, so the subscriber
    counts its objects as skipped, not lost."""
    cert, key, fingerprint = certificate
    tls = TlsOptions(fingerprint=fingerprint)
    objects, group_length = 30, 5

    async def scenario():  # type: ignore[no-untyped-def]
        relay = RelayServer()
        _, port = await relay.start(LOOPBACK, 0, cert, key)
        url = f"moqt://{LOOPBACK}:{port}/r"
        try:
            sub = asyncio.ensure_future(run_subscriber(SubscriberOptions(
                url=url, namespace=(b"demo", b"cam"), track=b"v", tls=tls, duration=15)))
            for _ in range(100):  # bounded: the subscriber's session is up
                ready = [c for c in relay._conns.values() if c.ready]
                if ready:
                    break
                await asyncio.sleep(0.05)
            assert ready
            relay.core.congestion(ready[0].sid, CongestionState(queued_bytes=10, queue_budget=1))
            published = await run_publisher(PublisherOptions(
                url=url, namespace=(b"demo", b"cam"), track=b"v", tls=tls, objects=objects,
                rate=100, object_size=200, group_length=group_length, wait_subscriber=5))
            return published, await sub, relay.stats()
        finally:
            await relay.stop()

    published, sub, stats = asyncio.run(asyncio.wait_for(scenario(), 30))
    groups = objects // group_length
    assert published.ok, published
    assert sub.track_ended, sub
    assert (sub.objects, sub.skipped, sub.skipped_subgroups, sub.lost) == (
        groups, objects - groups, groups, 0), sub
    skipped = stats["counters"]["skipped"]
    assert sum(per["congestion"] for per in skipped.values()) == groups, stats


def test_malformed_message_closes_only_that_session(certificate: tuple[Path, Path, str]) -> None:
    """A client that sends a malformed control message is closed with PROTOCOL_VIOLATION; the
    publisher and the subscriber beside it never notice."""
    cert, key, fingerprint = certificate
    tls = TlsOptions(fingerprint=fingerprint)

    async def scenario():  # type: ignore[no-untyped-def]
        relay = RelayServer()
        _, port = await relay.start(LOOPBACK, 0, cert, key)
        url = f"moqt://{LOOPBACK}:{port}/r"
        try:
            sub = asyncio.ensure_future(run_subscriber(SubscriberOptions(
                url=url, namespace=(b"demo", b"cam"), track=b"v", tls=tls, duration=15,
                expect_objects=40)))
            publisher = asyncio.ensure_future(run_publisher(PublisherOptions(
                url=url, namespace=(b"demo", b"cam"), track=b"v", tls=tls, objects=40,
                rate=100, object_size=200, group_length=5, wait_subscriber=5)))
            async with connect(url, tls=tls) as bad:
                # MAX_REQUEST_ID whose 16-bit length says 3 bytes: a 1-byte varint and two bytes
                # of nothing, a length mismatch (draft-14 §9).
                bad._quic.send_stream_data(0, bytes([0x15, 0x00, 0x03, 0x05, 0xAA, 0xBB]))
                bad.transmit()
                for _ in range(100):  # bounded wait for the relay's CONNECTION_CLOSE
                    if bad.closed_event is not None:
                        break
                    await asyncio.sleep(0.05)
                closed = bad.closed_event
            return closed, await publisher, await sub, relay.stats()
        finally:
            await relay.stop()

    closed, published, sub, stats = asyncio.run(asyncio.wait_for(scenario(), 40))
    assert closed is not None and closed.by_peer, closed
    assert closed.error_code == SessionErrorCode.PROTOCOL_VIOLATION, closed
    assert published.ok, published
    assert sub.ok and sub.objects == 40 and sub.lost == 0, sub
    assert stats["sessions_failed"] == {"PROTOCOL_VIOLATION": 1}, stats


class _KernelForwardedIt:
    """A fast path whose kernel saw every stream's offset 0 under a higher threshold: it
    forwards them (the claim returns the subscriber's stream id)."""

    def claim(self, session: int, upstream: tuple[int, int]) -> int | None:
        return 7


def test_skip_the_kernel_overrode_is_taken_back_and_counted_as_a_stream() -> None:
    """The core skipped a subgroup, the kernel had already forwarded it: no skip in the
    counters, and PUBLISH_DONE's stream_count includes the stream the kernel sent."""
    relay = RelayServer(fastpath=_KernelForwardedIt())  # type: ignore[arg-type]
    relay.core.counters.skip(3, SkipReason.CONGESTION)  # as the core's decision does
    relay._dispatch([SkipSubgroup(3, 5, 2, 1, 128, 127, "congestion", (1, 14))])
    assert relay.core.counters.skipped == {}
    assert relay._skip_streams == {(3, 5): 1}
