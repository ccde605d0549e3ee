"""RelayServer in one event loop with our own endpoints: access control from an --access file,
an upstream relay that is not there, and the stats snapshot."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Callable

import pytest

from relay.core.access import AccessConfig
from relay.core.actions import SkipSubgroup
from relay.core.cache import CacheConfig
from relay.core.priority import CongestionState, SkipReason
from relay.core.relay import RelayConfig
from relay.moqt.constants import (
    FetchErrorCode,
    MessageParameter,
    PublishDoneStatusCode,
    PublishNamespaceErrorCode,
    SessionErrorCode,
    SetupParameter,
    SubscribeErrorCode,
)
from relay.moqt.data import encode_extension_headers, encode_object_datagram
from relay.moqt.messages import Location, StandaloneFetch
from relay.moqt.quic import (
    MoqtConnectError,
    MoqtProtocol,
    TlsOptions,
    connect,
    generate_certificate,
)
from relay.moqt.session import (
    FetchAnswered,
    MoqtSession,
    NamespaceDone,
    NamespacePublished,
    ObjectReceived,
    PublishDoneReceived,
    PublishNamespaceAnswered,
    SessionClosed,
    SessionConfig,
    SubscribeAccepted,
    SubscribeNamespaceAnswered,
    SubscribeRejected,
    SubscribeRequested,
    UnsubscribeReceived,
)
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


# -- the relay's lifecycle over real QUIC, every endpoint a session of ours -------------------

NS = (b"demo", b"life")
GROUP = 5  # objects per group
# An unknown odd extension (length-prefixed bytes) beside the timestamp: relayed verbatim.
EXTENSIONS = encode_extension_headers(((0x10, 123456), (0x3F, b"opaque\x00\xff")))


class _Peer:
    """One MoQ client session of the test and every event it has had, in order."""

    def __init__(self) -> None:
        self.events: list[object] = []
        self.protocol: MoqtProtocol | None = None

    def on_event(self, protocol: MoqtProtocol, event: object) -> None:
        self.events.append(event)

    @property
    def session(self) -> MoqtSession:
        assert self.protocol is not None
        return self.protocol.session

    def of(self, kind: type, **fields: object) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)
                and all(getattr(e, k) == v for k, v in fields.items())]

    def objects(self, request_id: int) -> list[tuple[int, int, bytes, bytes]]:
        return [(e.header.group_id, e.header.object_id, e.payload, e.header.extensions)
                for e in self.of(ObjectReceived, request_id=request_id)]

    def flush(self) -> None:
        assert self.protocol is not None
        self.protocol.flush()


async def _until(what: str, condition: Callable[[], bool], timeout: float = 15.0) -> None:
    """Bounded wait for `condition` (a failure names what never happened)."""
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.asynccontextmanager
async def _relay_and_peers(certificate: tuple[Path, Path, str], peers: tuple[_Peer, ...],
                           config: RelayConfig | None = None
                           ) -> AsyncIterator[tuple[RelayServer, str]]:
    """A relay on loopback with every peer connected to it (the relay and its URL, for peers
    that connect later); all closed after."""
    cert, key, fingerprint = certificate
    relay = RelayServer(config)
    _, port = await relay.start(LOOPBACK, 0, cert, key)
    url = f"moqt://{LOOPBACK}:{port}/r"
    try:
        async with contextlib.AsyncExitStack() as stack:
            for peer in peers:
                peer.protocol = await stack.enter_async_context(
                    connect(url, tls=TlsOptions(fingerprint=fingerprint), on_event=peer.on_event))
            yield relay, url
    finally:
        await relay.stop()


def _payload(group: int, obj: int) -> bytes:
    return f"g{group}o{obj}".encode() * 10


def _expected(groups: range, first: int = 0, last: int = GROUP - 1) -> list[tuple[int, int,
                                                                                  bytes, bytes]]:
    return [(g, o, _payload(g, o), EXTENSIONS) for g in groups
            for o in range(first if g == groups[0] else 0, (last if g == groups[-1] else
                                                            GROUP - 1) + 1)]


def test_late_joiner_fetch_cache_and_lifecycle_over_quic(
        certificate: tuple[Path, Path, str]) -> None:
    """One publisher and three subscribers, all real aioquic sessions of ours, through a
    RelayServer whose cache keeps 2 groups:
    - one upstream SUBSCRIBE per track however many subscribers ask for it;
    - a late joiner with the Largest Object filter gets the rest of the current group through
      its joining FETCH (the fetch stream) and the later groups complete on its subscription,
      extension headers byte for byte as the publisher wrote them;
    - a standalone FETCH is served from the cache, one for groups the cache evicted is refused;
    - a subscriber that leaves does not disturb the other; the last one leaving a track sends
      UNSUBSCRIBE upstream; the publisher going away sends PUBLISH_DONE downstream."""
    pub, early, late, other = _Peer(), _Peer(), _Peer(), _Peer()

    async def scenario() -> dict[str, Any]:
        async with _relay_and_peers(certificate, (pub, early, late, other),
                                    RelayConfig(cache=CacheConfig(max_groups=2))) as (relay, _):
            pub.session.publish_namespace(NS)
            pub.flush()
            await _until("PUBLISH_NAMESPACE_OK", lambda: any(
                e.error_code is None for e in pub.of(PublishNamespaceAnswered)))

            # Two subscribers of track v, two of track w: one upstream SUBSCRIBE each.
            early_v = early.session.subscribe(NS, b"v")
            early_w = early.session.subscribe(NS, b"w")
            late_w = late.session.subscribe(NS, b"w")
            for peer in (early, late):
                peer.flush()
            await _until("the relay's SUBSCRIBEs", lambda: len(
                pub.of(SubscribeRequested)) == 2)
            up = {e.message.track_name: e.request_id for e in pub.of(SubscribeRequested)}
            pub.session.accept_subscribe(up[b"v"], 9)
            pub.session.accept_subscribe(up[b"w"], 10)
            pub.flush()
            await _until("SUBSCRIBE_OKs", lambda: len(early.of(SubscribeAccepted)) == 2
                         and len(late.of(SubscribeAccepted)) == 1)

            def write_group(group: int, objects: range, *, end: bool) -> None:
                sender = senders.get(group) or pub.session.open_subgroup(
                    up[b"v"], group, 0, 128, end_of_group=True)
                senders[group] = sender
                for o in objects:
                    sender.write(o, _payload(group, o), extensions=EXTENSIONS,
                                 end_stream=end and o == objects[-1])
                pub.flush()

            senders: dict[int, Any] = {}
            for group in range(3):
                write_group(group, range(GROUP), end=True)
            write_group(3, range(3), end=False)  # group 3 is under way: 0..2 sent
            await _until("group 3 half way at the early subscriber",
                         lambda: (3, 2) in [o[:2] for o in early.objects(early_v)])

            # The late joiner: Largest Object filter, then a joining FETCH (start 0 =
            # the current group), as moq-rs does after every SUBSCRIBE.
            late_v = late.session.subscribe(NS, b"v")
            late.flush()
            await _until("the late SUBSCRIBE_OK", lambda: bool(
                late.of(SubscribeAccepted, request_id=late_v)))
            joining = late.session.fetch(joining_request_id=late_v, joining_start=0)
            late.flush()
            await _until("the joining FETCH_OK", lambda: bool(
                late.of(FetchAnswered, request_id=joining)))
            write_group(3, range(3, GROUP), end=True)
            write_group(4, range(GROUP), end=True)
            await _until("group 4 at the late joiner",
                         lambda: len(late.objects(late_v)) == 2 + GROUP)
            await _until("the whole joining FETCH", lambda: len(late.objects(joining)) == 3)

            # Standalone FETCHes: groups 3..4 are cached, group 0 was evicted (2 groups).
            cached = other.session.fetch(standalone=StandaloneFetch(
                NS, b"v", Location(3, 0), Location(5, 0)))
            evicted = other.session.fetch(standalone=StandaloneFetch(
                NS, b"v", Location(0, 0), Location(1, 0)))
            other.flush()
            await _until("both FETCH answers", lambda: bool(
                other.of(FetchAnswered, request_id=cached)) and bool(
                other.of(FetchAnswered, request_id=evicted)))
            await _until("the cached groups", lambda: len(other.objects(cached)) == 2 * GROUP)

            # The late joiner leaves v: the early subscriber keeps getting everything.
            late.session.unsubscribe(late_v)
            late.flush()
            await _until("the relay saw the UNSUBSCRIBE",
                         lambda: relay.stats()["subscriptions"] == 3)
            write_group(5, range(GROUP), end=True)
            await _until("group 5 at the early subscriber",
                         lambda: len(early.objects(early_v)) == 6 * GROUP)
            # Track w: the first of its two subscribers leaving changes nothing upstream,
            # the last one unsubscribes there.
            early.session.unsubscribe(early_w)
            early.flush()
            await _until("the relay saw the first w UNSUBSCRIBE",
                         lambda: relay.stats()["subscriptions"] == 2)
            unsubscribed_after_first = list(pub.of(UnsubscribeReceived))
            late.session.unsubscribe(late_w)
            late.flush()
            await _until("UNSUBSCRIBE upstream", lambda: bool(pub.of(UnsubscribeReceived)))
            # The publisher goes away: the early subscriber gets PUBLISH_DONE for v.
            pub.protocol.close_session()  # type: ignore[union-attr]
            await _until("PUBLISH_DONE", lambda: bool(
                early.of(PublishDoneReceived, request_id=early_v)))
            return {"late_v": late_v, "joining": joining, "early_v": early_v,
                    "cached": cached, "evicted": evicted, "up": up,
                    "unsubscribed_after_first": unsubscribed_after_first,
                    "stats": relay.stats()}

    r = asyncio.run(asyncio.wait_for(scenario(), 90))
    # One upstream SUBSCRIBE per track, two subscribers each.
    assert sorted(e.message.track_name for e in pub.of(SubscribeRequested)) == [b"v", b"w"]
    # The late joiner's SUBSCRIBE_OK names (3, 2) as the largest object; its joining FETCH
    # carries exactly 0..2 of group 3 and its subscription the rest: no gap, no overlap.
    (accepted,) = late.of(SubscribeAccepted, request_id=r["late_v"])
    assert accepted.message.largest_location == Location(3, 2)
    (fetch_ok,) = late.of(FetchAnswered, request_id=r["joining"])
    assert fetch_ok.error_code is None and fetch_ok.message.end_location == Location(3, 2)
    assert late.objects(r["joining"]) == _expected(range(3, 4), last=2)
    assert late.objects(r["late_v"]) == _expected(range(3, 5), first=3)
    # The early subscriber: every object of groups 0..5 in order, extensions verbatim.
    assert early.objects(r["early_v"]) == _expected(range(6))
    # Standalone FETCH from the 2-group cache.
    (ok,) = other.of(FetchAnswered, request_id=r["cached"])
    assert ok.error_code is None, ok
    assert other.objects(r["cached"]) == _expected(range(3, 5))
    (refused,) = other.of(FetchAnswered, request_id=r["evicted"])
    assert refused.error_code == FetchErrorCode.UNKNOWN_STATUS_IN_RANGE, refused
    # UNSUBSCRIBE upstream only once the last subscriber of w left, and only for w.
    assert r["unsubscribed_after_first"] == []
    assert [e.request_id for e in pub.of(UnsubscribeReceived)] == [r["up"][b"w"]]
    # The publisher's departure: PUBLISH_DONE with GOING_AWAY to the subscriber still there.
    (done,) = early.of(PublishDoneReceived, request_id=r["early_v"])
    assert done.status_code == PublishDoneStatusCode.GOING_AWAY, done
    counters = r["stats"]["counters"]
    assert counters["fetches_served"] == 2 and counters["cache_misses"] == 1, counters


TOKENS = """
[access]
anonymous_publish = []
anonymous_subscribe = []

[[access.principal]]
name = "alice"
token = "alice-secret"
publish = ["live/alice"]
subscribe = ["live"]

[[access.principal]]
name = "bob"
token = "bob-secret"
publish = ["live"]
subscribe = ["live/bob"]
"""


def _token(value: bytes) -> bytes:
    """AUTHORIZATION TOKEN, draft-14 section 8.2.1.1: USE_VALUE (0x3), token type 0, value."""
    return b"\x03\x00" + value


def _as(token: bytes) -> SessionConfig:
    return SessionConfig(is_client=True, path="/r", setup_parameters=(
        (SetupParameter.AUTHORIZATION_TOKEN, _token(token)),))


def test_authorization_tokens_and_allow_lists_over_quic(
        certificate: tuple[Path, Path, str]) -> None:
    """Tokens in CLIENT_SETUP and in requests pick the principal; each principal's allow-lists
    decide; refusals carry draft-14's codes; nobody takes over a namespace another principal
    publishes, even one whose allow-list covers it; an unknown token closes the session."""
    cert, key, fingerprint = certificate
    tls = TlsOptions(fingerprint=fingerprint)
    alice, bob, anon = _Peer(), _Peer(), _Peer()
    mine = (b"live", b"alice")

    def answer(peer: _Peer, request_id: int) -> Any:
        return next(iter(peer.of(PublishNamespaceAnswered, request_id=request_id)), None)

    async def scenario() -> dict[str, Any]:
        relay = RelayServer(RelayConfig(access=AccessConfig.from_toml(TOKENS)))
        _, port = await relay.start(LOOPBACK, 0, cert, key)
        url = f"moqt://{LOOPBACK}:{port}/r"
        try:
            async with contextlib.AsyncExitStack() as stack:
                for peer, config in ((alice, _as(b"alice-secret")), (bob, _as(b"bob-secret")),
                                     (anon, None)):
                    peer.protocol = await stack.enter_async_context(
                        connect(url, tls=tls, on_event=peer.on_event, session_config=config))
                r: dict[str, Any] = {}
                for peer in (alice, bob, anon):  # discovery, as moq-rs asks for it
                    peer.session.subscribe_namespace(())
                    peer.flush()
                await _until("SUBSCRIBE_NAMESPACE_OKs", lambda: all(
                    p.of(SubscribeNamespaceAnswered) for p in (alice, bob, anon)))
                r["alice_ns"] = alice.session.publish_namespace(mine)
                alice.flush()
                await _until("alice's answer", lambda: answer(alice, r["alice_ns"]) is not None)
                # bob may publish anywhere under live/, but live/alice is alice's.
                r["bob_takeover"] = bob.session.publish_namespace(mine)
                r["bob_ns"] = bob.session.publish_namespace((b"live", b"bob"))
                r["anon_ns"] = anon.session.publish_namespace((b"live", b"anon"))
                # Subscribing: anonymous is refused, alice's token on the request itself lets
                # the same session in; bob may only read live/bob; a garbled token is refused.
                r["anon_sub"] = anon.session.subscribe(mine, b"v")
                r["anon_as_alice"] = anon.session.subscribe(mine, b"w", parameters=(
                    (MessageParameter.AUTHORIZATION_TOKEN, _token(b"alice-secret")),))
                r["bob_sub"] = bob.session.subscribe(mine, b"v")
                r["garbled"] = anon.session.subscribe(mine, b"x", parameters=(
                    (MessageParameter.AUTHORIZATION_TOKEN, b"\x07"),))
                for peer in (bob, anon):
                    peer.flush()
                await _until("bob's answers", lambda: answer(bob, r["bob_takeover"]) is not None
                             and answer(bob, r["bob_ns"]) is not None)
                await _until("anonymous's answers", lambda: answer(anon, r["anon_ns"]) is not None
                             and len(anon.of(SubscribeRejected)) == 2)
                await _until("bob's refusal", lambda: bool(bob.of(SubscribeRejected)))
                # alice's track w is asked upstream for the session holding her token.
                await _until("the relay's SUBSCRIBE for w", lambda: bool(
                    alice.of(SubscribeRequested)))
                (req,) = alice.of(SubscribeRequested)
                alice.session.accept_subscribe(req.request_id, 1)
                alice.flush()
                await _until("SUBSCRIBE_OK for w", lambda: bool(anon.of(
                    SubscribeAccepted, request_id=r["anon_as_alice"])))
                # Namespace names go only to those who may read them: alice learns live/bob.
                await _until("live/bob pushed to alice", lambda: bool(alice.of(
                    NamespacePublished)))
                # One more request each: anything pushed to bob or anonymous is in by its answer.
                last = {p: p.session.subscribe((b"none",), b"t") for p in (bob, anon)}
                for peer in (bob, anon):
                    peer.flush()
                await _until("the last answers", lambda: all(
                    p.of(SubscribeRejected, request_id=rid) for p, rid in last.items()))
                r["last"] = last
            # An unknown token in CLIENT_SETUP: the relay closes that session.
            stranger = _Peer()
            try:
                async with connect(url, tls=tls, on_event=stranger.on_event,
                                   session_config=_as(b"who-am-i")) as protocol:
                    await _until("the relay closing the stranger",
                                 lambda: protocol.closed_event is not None)
            except MoqtConnectError:
                pass  # closed before SERVER_SETUP reached us: the event says how
            r["stranger"] = stranger.of(SessionClosed)
            r["stats"] = relay.stats()
            return r
        finally:
            await relay.stop()

    r = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert answer(alice, r["alice_ns"]).error_code is None
    assert answer(bob, r["bob_ns"]).error_code is None
    takeover = answer(bob, r["bob_takeover"])
    assert takeover.error_code == PublishNamespaceErrorCode.UNAUTHORIZED, takeover
    assert answer(anon, r["anon_ns"]).error_code == PublishNamespaceErrorCode.UNAUTHORIZED
    refused = {e.request_id: e.error_code for e in anon.of(SubscribeRejected)}
    assert refused == {r["anon_sub"]: SubscribeErrorCode.UNAUTHORIZED,
                       r["garbled"]: SubscribeErrorCode.MALFORMED_AUTH_TOKEN,
                       r["last"][anon]: SubscribeErrorCode.UNAUTHORIZED}, refused
    assert [e.error_code for e in bob.of(SubscribeRejected)] == [SubscribeErrorCode.UNAUTHORIZED] * 2
    # Discovery follows the subscribe allow-lists: alice (live) sees live/bob; bob (live/bob
    # only, and it is his own) and anonymous (nothing) are told no namespace at all.
    assert [e.namespace for e in alice.of(NamespacePublished)] == [(b"live", b"bob")]
    assert bob.of(NamespacePublished) == [] and anon.of(NamespacePublished) == []
    (closed,) = r["stranger"]
    assert closed.by_peer and closed.error_code == SessionErrorCode.UNAUTHORIZED, closed
    refusals = r["stats"]["counters"]["refusals"]
    assert refusals == {"publish_namespace": 2, "subscribe": 5, "setup": 1}, refusals


def test_namespaces_are_pushed_to_namespace_subscribers(
        certificate: tuple[Path, Path, str]) -> None:
    """moq-rs finds broadcasts only through PUBLISH_NAMESPACE pushed to it after its
    SUBSCRIBE_NAMESPACE (empty prefix, a -14 violation the relay answers with OK): namespaces
    published before and after, none to the publisher itself, and PUBLISH_NAMESPACE_DONE when
    the publisher goes."""
    cert, key, fingerprint = certificate
    tls = TlsOptions(fingerprint=fingerprint)
    pub, early, late, narrow = _Peer(), _Peer(), _Peer(), _Peer()

    async def scenario() -> None:
        async with _relay_and_peers(certificate, (early, pub)) as (_, url):
            for peer in (early, pub):
                peer.session.subscribe_namespace(())  # moq-rs: every session does this
                peer.flush()
            await _until("SUBSCRIBE_NAMESPACE_OKs", lambda: all(
                [e.error_code for e in p.of(SubscribeNamespaceAnswered)] == [None]
                for p in (early, pub)))
            pub.session.publish_namespace((b"demo", b"a"))
            pub.flush()
            await _until("the push to the early one", lambda: bool(
                early.of(NamespacePublished)))
            # Subscribers arriving after the namespace: pushed at once, if in their prefix.
            async with connect(url, tls=tls, on_event=late.on_event) as late.protocol, \
                    connect(url, tls=tls, on_event=narrow.on_event) as narrow.protocol:
                late.session.subscribe_namespace(())
                narrow.session.subscribe_namespace((b"other",))
                late.flush()
                narrow.flush()
                await _until("the push to the late one", lambda: bool(
                    late.of(NamespacePublished)))
                await _until("narrow's SUBSCRIBE_NAMESPACE_OK", lambda: bool(
                    narrow.of(SubscribeNamespaceAnswered)))
                pub.protocol.close_session()  # type: ignore[union-attr]
                await _until("PUBLISH_NAMESPACE_DONE", lambda: bool(
                    early.of(NamespaceDone)) and bool(late.of(NamespaceDone)))

    asyncio.run(asyncio.wait_for(scenario(), 60))
    for peer in (early, late):
        assert [e.namespace for e in peer.of(NamespacePublished)] == [(b"demo", b"a")]
        assert [e.namespace for e in peer.of(NamespaceDone)] == [(b"demo", b"a")]
    assert pub.of(NamespacePublished) == []  # not to its own publisher
    assert narrow.of(NamespacePublished) == []  # outside its prefix


def test_relay_command_cache_and_access_options_reach_the_core(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    """`fastrelay relay --cache-groups/--cache-bytes/--access` configure the relay it runs (the
    real RelayServer, only recorded on its way in); bad values are one-line errors."""
    import relay.cli.relay_cmd as relay_cmd
    from tests.conftest import run_cli

    made: list[RelayServer] = []

    class Recorded(RelayServer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(relay_cmd, "RelayServer", Recorded)
    (tmp_path / "access.toml").write_text(TOKENS)
    run_cli(["relay", "--listen", f"{LOOPBACK}:0", "--cache-groups", "3", "--cache-bytes",
             "5000", "--access", str(tmp_path / "access.toml"), "--duration", "0.1"], capsys)
    (server,) = made
    assert server.core.config.cache == CacheConfig(max_groups=3, max_bytes=5000)
    assert server.core.config.access == AccessConfig.from_toml(TOKENS)
    run_cli(["relay", "--listen", f"{LOOPBACK}:0", "--cache-groups", "0"], capsys, exit_code=2,
            stderr="--cache-groups")
    run_cli(["relay", "--listen", f"{LOOPBACK}:0", "--access", str(tmp_path / "none.toml")],
            capsys, exit_code=1, stderr=r"^error: --access .*none\.toml: No such file")
    assert len(made) == 1


def test_object_datagrams_through_the_relay(certificate: tuple[Path, Path, str]) -> None:
    """A publisher's OBJECT_DATAGRAMs reach every subscriber with only the alias changed (type,
    priority, extension headers, payload as sent) and are cached for FETCH."""
    pub, sub1, sub2, fetcher = _Peer(), _Peer(), _Peer(), _Peer()
    count = 12

    async def scenario() -> dict[str, Any]:
        async with _relay_and_peers(certificate, (pub, sub1, sub2, fetcher)) as (relay, _):
            pub.session.publish_namespace(NS)
            pub.flush()
            await _until("PUBLISH_NAMESPACE_OK", lambda: bool(pub.of(PublishNamespaceAnswered)))
            r = {"sub1": sub1.session.subscribe(NS, b"d"),
                 "sub2": sub2.session.subscribe(NS, b"d")}
            sub1.flush()
            sub2.flush()
            await _until("the relay's SUBSCRIBE", lambda: bool(pub.of(SubscribeRequested)))
            (req,) = pub.of(SubscribeRequested)
            pub.session.accept_subscribe(req.request_id, 17)
            pub.flush()
            await _until("SUBSCRIBE_OKs", lambda: bool(sub1.of(SubscribeAccepted))
                         and bool(sub2.of(SubscribeAccepted)))
            sent = []
            for i in range(count):
                group, obj = divmod(i, 4)
                sent.append(pub.session.send_datagram(
                    req.request_id, group, obj, 0 if obj == 0 else 64, _payload(group, obj),
                    extensions=EXTENSIONS, end_of_group=obj == 3))
                pub.flush()
                await asyncio.sleep(0.005)  # no burst beyond the first congestion window
            await _until("every datagram at both", lambda: all(
                len(p.of(ObjectReceived, stream_id=None)) == count for p in (sub1, sub2)))
            r["fetch"] = fetcher.session.fetch(standalone=StandaloneFetch(
                NS, b"d", Location(0, 0), Location(3, 0)))
            fetcher.flush()
            await _until("the FETCH", lambda: len(fetcher.objects(r["fetch"])) == count)
            r["sent"] = sent
            r["stats"] = relay.stats()
            return r

    r = asyncio.run(asyncio.wait_for(scenario(), 60))
    for peer in (sub1, sub2):
        (ok,) = peer.of(SubscribeAccepted)
        received = [e.datagram for e in peer.of(ObjectReceived, stream_id=None)]
        assert all(e.track_alias == ok.track_alias for e in peer.of(ObjectReceived))
        # Byte for byte what the publisher sent, but for the alias.
        assert [encode_object_datagram(dataclasses.replace(d, track_alias=17)) for d in received] \
            == r["sent"]
    assert [(g, o, p) for g, o, p, _ in fetcher.objects(r["fetch"])] == [
        (i // 4, i % 4, _payload(i // 4, i % 4)) for i in range(count)]
    counters = r["stats"]["counters"]
    assert (counters["datagrams_in"], counters["objects_out"]) == (count, 3 * count), counters
    assert r["stats"]["datagrams_dropped"] == 0


def test_publish_duration_ends_the_track_and_the_subscriber_gets_every_object(
        certificate: tuple[Path, Path, str]) -> None:
    """`fastrelay publish --duration` (no --objects): it stops on time with END_OF_TRACK, and
    the subscriber, told nothing about the count, verifies everything that was sent."""
    cert, key, fingerprint = certificate
    tls = TlsOptions(fingerprint=fingerprint)

    async def scenario():  # type: ignore[no-untyped-def]
        relay = RelayServer()
        _, port = await relay.start(LOOPBACK, 0, cert, key)
        url = f"moqt://{LOOPBACK}:{port}/r"
        try:
            sub = asyncio.ensure_future(run_subscriber(SubscriberOptions(
                url=url, namespace=(b"demo", b"dur"), track=b"v", tls=tls, duration=30)))
            published = await run_publisher(PublisherOptions(
                url=url, namespace=(b"demo", b"dur"), track=b"v", tls=tls, duration=1.0,
                rate=50, object_size=300, group_length=10, wait_subscriber=10))
            return published, await sub
        finally:
            await relay.stop()

    published, sub = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert published.ok and published.reason == "duration" and published.objects > 0, published
    assert sub.ok and sub.track_ended and sub.reason == "track_ended", sub
    assert (sub.objects, sub.bytes, sub.lost, sub.gaps) == (
        published.objects, published.bytes, 0, 0), sub


class _KernelClonesDatagrams:
    """A fast path that forwards the publisher's (1) track, alias 5, to subscriber 2 only."""

    def forwards_track(self, subscriber: int, publisher: int, upstream_alias: int) -> bool:
        return (subscriber, publisher, upstream_alias) == (2, 1, 5)


def test_datagrams_the_kernel_clones_are_not_sent_twice() -> None:
    """With the fast path, the kernel clones a forwarded track's DATAGRAM frames to the
    subscribers it mirrors: userspace sends the datagram only to the others."""
    from relay.core.actions import SendDatagram
    from relay.moqt.constants import MOQT_VERSION_DRAFT_14, FilterType, GroupOrder
    from relay.moqt.data import ObjectDatagram
    from relay.moqt.messages import ClientSetup, PublishNamespace, Subscribe, SubscribeOk, encode_message
    from relay.moqt.session import DatagramWrite
    from relay.server import _Conn

    relay = RelayServer(fastpath=_KernelClonesDatagrams())  # type: ignore[arg-type]
    core = relay.core
    core.session_open(1)
    core.publish_namespace(1, PublishNamespace(0, NS))
    downstream = {}
    for sid in (2, 3):
        session = MoqtSession(SessionConfig(is_client=False))
        session.stream_data_received(0, encode_message(ClientSetup((MOQT_VERSION_DRAFT_14,))),
                                     False, 0.0)
        subscribe = Subscribe(0, NS, b"d", 128, GroupOrder.ASCENDING, True,
                              FilterType.LARGEST_OBJECT)
        session.stream_data_received(0, encode_message(subscribe), False, 0.0)
        session.accept_subscribe(0, 5)
        session.transmits()
        downstream[sid] = session
        relay._conns[sid] = _Conn(sid, type("P", (), {"session": session})())  # type: ignore[arg-type]
        core.session_open(sid)
        core.subscribe(sid, subscribe)
    core.upstream_subscribe_ok(0, 1, SubscribeOk(1, 5, 0, GroupOrder.ASCENDING))
    actions = core.object_datagram(1, ObjectDatagram.new(5, 0, 0, 0, b"x"))
    assert sorted(a.session for a in actions if isinstance(a, SendDatagram)) == [2, 3]
    relay._dispatch(actions)
    sent = {sid: [t for t in s.transmits() if isinstance(t, DatagramWrite)]
            for sid, s in downstream.items()}
    assert (len(sent[2]), len(sent[3])) == (0, 1), sent
