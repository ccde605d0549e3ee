"""`fastrelay publish`: a synthetic MoQT draft-14 publisher.

It connects to a relay, sends PUBLISH_NAMESPACE, answers every SUBSCRIBE for its track with
SUBSCRIBE_OK (the track alias is chosen here, as draft-14 has the publisher side choose), and
writes groups of `--group-length` objects at `--rate` objects/s, each object a self-verifying
payload from relay.media.

Layout of a group (`--layout split`, the default): the group's first object (the "key frame")
on its own subgroup stream (subgroup 0, publisher priority 0, the highest), the rest on a
second stream (subgroup 1, priority 128, "contains end of group"). A relay that must skip data
for a congested subscriber can then drop subgroup 1 whole and still deliver what must arrive.
`--layout single` puts the whole group on one subgroup-0 stream, which is what moq-rs 0.5.1
accepts: its draft-14 receiver drops any stream whose subgroup id is not 0, or whose object ids
are not consecutive from 0 (moq-net `ietf/subscriber.rs`, `recv_group` / `run_group`).

Every object carries extension header 0x10, an even type (one varint): the send time in
microseconds since the Unix epoch. That is the Timestamp property moq-rs puts on the objects it
sends and reads from the ones it receives (its frame timestamp, in µs), so moq-rs and fastrelay
subscribers both measure one-way delay from it. The payload repeats the send time in ns.

End of track: an END_OF_TRACK status object on a final group's stream (`--layout split`; moq-rs
refuses that status, so `single` skips it), then PUBLISH_DONE (TRACK_ENDED) for every
subscription and PUBLISH_NAMESPACE_DONE.
"""

from __future__ import annotations

import asyncio
import enum
import signal
import time
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from crypto_backends import CryptoBackend, usable_backend
from relay.cli.output import JsonOption, emit_json, emit_table
from relay.errors import ConfigError, FastrelayError
from relay.media import HEADER_SIZE, PayloadHeader, PublishSummary, encode_object
from relay.moqt.constants import (
    FetchErrorCode,
    ObjectStatus,
    PublishDoneStatusCode,
    SubscribeErrorCode,
    SubscribeNamespaceErrorCode,
)
from relay.moqt.data import encode_extension_headers
from relay.moqt.quic import (
    MoqtConnectError,
    MoqtProtocol,
    TlsOptions,
    connect,
    describe_close,
    parse_url,
)
from relay.moqt.session import (
    Event,
    FetchRequested,
    NamespacePublished,
    PublishNamespaceAnswered,
    SessionClosed,
    SubgroupSender,
    SubscribeNamespaceRequested,
    SubscribeRequested,
    TrackNamespace,
    UnsubscribeReceived,
    split_namespace,
)

# Object extension header carrying the send time in µs (even type: one varint value).
TIMESTAMP_EXTENSION = 0x10
T = TypeVar("T")
KEY_PRIORITY = 0  # subgroup 0: the group's first object
DELTA_PRIORITY = 128  # subgroup 1: the rest


class Layout(str, enum.Enum):
    SPLIT = "split"
    SINGLE = "single"


def timestamp_extension(send_us: int) -> bytes:
    return encode_extension_headers(((TIMESTAMP_EXTENSION, send_us),))


@dataclass(frozen=True)
class PublisherOptions:
    url: str
    namespace: TrackNamespace
    track: bytes
    tls: TlsOptions = TlsOptions()
    rate: float = 30.0
    """Objects per second; 0 = as fast as possible."""
    object_size: int = 1000
    group_length: int = 30
    objects: int | None = None
    duration: float | None = None
    layout: Layout = Layout.SPLIT
    crypto: CryptoBackend | None = None
    """1-RTT protection (`--crypto`); None is standard QUIC."""
    wait_subscriber: float | None = None
    """Seconds to wait for a first SUBSCRIBE before the first object (None: start at once)."""
    start_delay: float = 0.0
    """Extra seconds after that SUBSCRIBE, so more subscribers can join the relay first."""
    start_on_signal: bool = False
    """Then wait for SIGUSR1 (bounded by wait_subscriber): whoever started the subscribers
    says when all of them are in."""
    linger: float = 2.0
    """At most this long after the last object for the data to be acknowledged."""
    connect_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.object_size < HEADER_SIZE:
            raise ValueError(f"--object-size must be at least {HEADER_SIZE} (the payload header)")
        if self.group_length < 1:
            raise ValueError("--group-length must be at least 1")
        if self.rate < 0:
            raise ValueError("--rate must not be negative")

    def objects_in_group(self, group: int) -> int:
        """The group's real length: the last group of an `--objects` run may be shorter, and
        its payloads must say so or a subscriber would count the rest as lost."""
        if self.objects is None:
            return self.group_length
        return max(1, min(self.group_length, self.objects - group * self.group_length))


@dataclass
class _Subscription:
    request_id: int
    track_alias: int
    group: int | None = None
    streams: list[SubgroupSender] = field(default_factory=list)


class Publisher:
    """Answers the relay's requests and fans each object out to every subscription."""

    def __init__(self, opts: PublisherOptions, protocol: MoqtProtocol) -> None:
        self.opts = opts
        self.protocol = protocol
        self.session = protocol.session
        self.subscriptions: dict[int, _Subscription] = {}
        self.subscribed = asyncio.Event()
        self.namespace_answer: asyncio.Future[PublishNamespaceAnswered] = \
            asyncio.get_running_loop().create_future()
        self.closed: SessionClosed | None = None
        self.subscribes_seen = 0
        self._next_alias = 1

    def on_event(self, event: Event) -> None:
        s = self.session
        if isinstance(event, SubscribeRequested):
            msg = event.message
            if msg.track_namespace != self.opts.namespace or msg.track_name != self.opts.track:
                s.reject_subscribe(event.request_id, SubscribeErrorCode.TRACK_DOES_NOT_EXIST,
                                   "no such track here")
            else:
                alias = self._next_alias
                self._next_alias += 1
                s.accept_subscribe(event.request_id, alias)
                self.subscriptions[event.request_id] = _Subscription(event.request_id, alias)
                self.subscribes_seen += 1
                self.subscribed.set()
        elif isinstance(event, UnsubscribeReceived):
            self.subscriptions.pop(event.request_id, None)
        elif isinstance(event, FetchRequested):
            # moq-rs follows SUBSCRIBE with a joining FETCH; we keep no cache to serve it.
            s.reject_fetch(event.request_id, FetchErrorCode.NOT_SUPPORTED, "no cache")
        elif isinstance(event, SubscribeNamespaceRequested):
            s.reject_subscribe_namespace(event.request_id, SubscribeNamespaceErrorCode.NOT_SUPPORTED,
                                         "a publisher has no namespaces to offer")
        elif isinstance(event, NamespacePublished):
            s.accept_publish_namespace(event.request_id)  # a relay telling us what exists
        elif isinstance(event, PublishNamespaceAnswered):
            if not self.namespace_answer.done():
                self.namespace_answer.set_result(event)
        elif isinstance(event, SessionClosed):
            self.closed = event
            self.subscribed.set()
            if not self.namespace_answer.done():
                self.namespace_answer.set_result(PublishNamespaceAnswered(-1, -1, "closed"))

    def send_object(self, group: int, obj: int, payload: bytes, send_us: int) -> None:
        ext = timestamp_extension(send_us)
        split = self.opts.layout == Layout.SPLIT
        last = obj == self.opts.objects_in_group(group) - 1
        for sub in list(self.subscriptions.values()):
            if obj == 0:
                for stream in sub.streams:
                    stream.finish()
                sub.group = group
                sub.streams = [self.session.open_subgroup(
                    sub.request_id, group, 0, KEY_PRIORITY if split else DELTA_PRIORITY,
                    end_of_group=last or not split)]
            elif sub.group != group:
                continue  # subscribed in the middle of a group: start with the next one
            elif split and obj == 1:
                sub.streams.append(self.session.open_subgroup(
                    sub.request_id, group, 1, DELTA_PRIORITY, end_of_group=True))
            sub.streams[-1].write(obj, payload, extensions=ext,
                                  end_stream=last or (split and obj == 0))
        self.protocol.flush()

    def end_track(self, next_group: int) -> None:
        for sub in list(self.subscriptions.values()):
            for stream in sub.streams:
                stream.finish()
            if self.opts.layout == Layout.SPLIT and self.session.publication_alias(
                    sub.request_id) is not None:
                stream = self.session.open_subgroup(sub.request_id, next_group, 0, KEY_PRIORITY,
                                                    end_of_group=True)
                stream.write(0, status=ObjectStatus.END_OF_TRACK, end_stream=True)
            try:
                self.session.publish_done(sub.request_id, PublishDoneStatusCode.TRACK_ENDED,
                                          "track ended")
            except KeyError:
                pass  # unsubscribed meanwhile
        self.subscriptions.clear()
        self.session.publish_namespace_done(self.opts.namespace)
        self.protocol.flush()


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _wait(*aws: object, timeout: float | None) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]  # type: ignore[arg-type]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _unacked(protocol: MoqtProtocol) -> bool:
    quic = protocol._quic
    return any(not s.sender.buffer_is_empty for s in quic._streams.values()) or \
        quic._loss.bytes_in_flight > 0


async def run_publisher(opts: PublisherOptions) -> PublishSummary:
    stop = _stop_event()
    go = asyncio.Event()
    if opts.start_on_signal:  # at once: the signal may come before we wait for it
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, go.set)
    errors: list[str] = []
    sent = sent_bytes = groups = 0
    max_late = 0.0
    t_first = t_last = 0.0
    reason = "complete"
    holder: list[Publisher] = []
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    connection: dict[str, int | None] = {}
    async with connect(opts.url, tls=opts.tls, timeout=opts.connect_timeout, crypto=opts.crypto,
                       on_event=lambda p, e: holder[0].on_event(e) if holder else None
                       ) as protocol:
        pub = Publisher(opts, protocol)
        holder.append(pub)
        timings["connect_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        connection["version"] = protocol.session.version
        protocol.session.publish_namespace(opts.namespace)
        protocol.flush()
        await _wait(pub.namespace_answer, stop.wait(), timeout=opts.connect_timeout)
        answer = pub.namespace_answer.result() if pub.namespace_answer.done() else None
        if answer is None:
            errors.append(f"no answer to PUBLISH_NAMESPACE within {opts.connect_timeout:g} s")
        elif answer.error_code is not None:
            errors.append(f"PUBLISH_NAMESPACE refused: code {answer.error_code} "
                          f"{answer.reason_phrase}")
        if not errors and opts.wait_subscriber is not None:
            t1 = time.perf_counter()
            await _wait(pub.subscribed.wait(), stop.wait(), timeout=opts.wait_subscriber)
            if not pub.subscribes_seen and not stop.is_set():
                errors.append(f"no subscriber within {opts.wait_subscriber:g} s")
            timings["demand_ms"] = round((time.perf_counter() - t1) * 1000, 1)
            if opts.start_delay > 0:
                await _wait(stop.wait(), timeout=opts.start_delay)
        if not errors and opts.start_on_signal:
            await _wait(go.wait(), stop.wait(), timeout=opts.wait_subscriber)
            if not go.is_set() and not stop.is_set():
                errors.append("no SIGUSR1 to start within --wait-subscriber")
        loop = asyncio.get_running_loop()
        interval = 1.0 / opts.rate if opts.rate > 0 else 0.0
        start = loop.time()
        deadline = start + opts.duration if opts.duration is not None else None
        t_first = time.perf_counter()
        index = 0
        group = 0
        while not errors:
            if stop.is_set():
                reason = "signal"
                break
            if pub.closed is not None:
                errors.append(describe_close(pub.closed))
                reason = "error"
                break
            if opts.objects is not None and index >= opts.objects:
                break
            if deadline is not None and loop.time() >= deadline:
                reason = "duration"
                break
            if interval:
                due = start + index * interval
                delay = due - loop.time()
                if delay > 0:
                    await _wait(stop.wait(), timeout=delay)
                    continue  # re-check stop and deadline before sending
                max_late = max(max_late, -delay)
            elif index % 32 == 0:
                await asyncio.sleep(0)
            group, obj = divmod(index, opts.group_length)
            send_ns = time.time_ns()
            payload = encode_object(PayloadHeader(group=group, object=obj,
                                                  objects_in_group=opts.objects_in_group(group),
                                                  size=opts.object_size, send_ns=send_ns))
            pub.send_object(group, obj, payload, send_ns // 1000)
            sent += 1
            sent_bytes += len(payload)
            if obj == opts.objects_in_group(group) - 1:
                groups += 1
            index += 1
        t_last = time.perf_counter()
        if pub.closed is None:
            pub.end_track(index // opts.group_length + (1 if index % opts.group_length else 0))
            # Stay until the relay has acknowledged everything (bounded by --linger).
            linger_end = loop.time() + opts.linger
            while _unacked(protocol) and loop.time() < linger_end and not stop.is_set():
                await asyncio.sleep(0.02)
        connection["subscriptions"] = pub.subscribes_seen
        connection["datagrams_dropped"] = protocol.datagrams_dropped
    duration = max(t_last - t_first, 1e-9)
    complete = opts.objects is None or sent == opts.objects
    return PublishSummary(
        event="summary", role="publish", ok=not errors and complete and reason != "error",
        objects=sent, bytes=sent_bytes, groups=groups, duration_s=round(duration, 6),
        rate=round(sent / duration, 1) if sent else 0.0,
        max_lateness_us=int(max_late * 1e6), reason=reason, timings_ms=timings,
        connection=connection, errors=errors)


def summary_rows(summary: PublishSummary) -> dict[str, object]:
    flat = asdict(summary)
    for key in ("timings_ms", "connection"):
        flat.update({f"{key}.{k}": v for k, v in flat.pop(key).items()})
    flat["errors"] = "; ".join(flat["errors"]) or "none"
    return flat


# -- CLI ---------------------------------------------------------------------------------------

UrlOption = Annotated[str, typer.Option("--url", help="moqt://host:port/path of the relay.")]
NamespaceOption = Annotated[str, typer.Option(
    "--namespace", help="Track namespace, fields separated by '/' (e.g. live/cam1).")]
TrackOption = Annotated[str, typer.Option("--track", help="Track name.")]
InsecureOption = Annotated[bool, typer.Option(
    "--insecure", help="Do not verify the relay's certificate (tests only).")]
FingerprintOption = Annotated[str | None, typer.Option(
    "--fingerprint", metavar="SHA256",
    help="Accept only a server certificate with this SHA-256 fingerprint (hex).")]
CaFileOption = Annotated[Path | None, typer.Option(
    "--cafile", help="Verify the relay's certificate against this CA file.")]
CryptoOption = Annotated[str | None, typer.Option(
    "--crypto", metavar="BACKEND",
    help="1-RTT protection: none (encryption negotiated off; the peer must agree), soft, nic. "
         "Default: standard QUIC.")]
ConnectTimeoutOption = Annotated[float, typer.Option(
    "--connect-timeout", min=0.1, help="Seconds to set up the MoQ session.")]


def tls_options(insecure: bool, fingerprint: str | None, cafile: Path | None) -> TlsOptions:
    if insecure and (fingerprint or cafile):
        raise ConfigError("--insecure cannot be combined with --fingerprint or --cafile")
    return TlsOptions(insecure=insecure, fingerprint=fingerprint,
                      cafile=str(cafile) if cafile else None)


def crypto_option(name: str | None) -> CryptoBackend | None:
    """The backend named by --crypto, refused with the probe's reason before anything starts."""
    return None if name is None else usable_backend(name)


def namespace_option(text: str) -> TrackNamespace:
    try:
        return split_namespace(text)
    except ValueError as exc:
        raise ConfigError(f"--namespace {text!r}: {exc}") from None


def run_endpoint(coro: Coroutine[Any, Any, T]) -> T:
    """Run one endpoint; connection failures become one-line FastrelayErrors."""
    try:
        return asyncio.run(coro)
    except (MoqtConnectError, OSError) as exc:
        raise FastrelayError(str(exc)) from None


def show_summary(rows: dict[str, object], summary: object, as_json: bool) -> None:
    if as_json:
        emit_json(asdict(summary))  # type: ignore[call-overload]
    else:
        emit_table(("Item", "Value"), rows.items(), as_json=False, title="Summary")


def publish_command(
    url: UrlOption,
    namespace: NamespaceOption,
    track: TrackOption,
    rate: Annotated[float, typer.Option("--rate", min=0, help="Objects per second; 0 = unpaced.")]
    = 30.0,
    object_size: Annotated[int, typer.Option("--object-size", min=HEADER_SIZE,
                                             help="Payload bytes per object.")] = 1000,
    group_length: Annotated[int, typer.Option("--group-length", min=1,
                                              help="Objects per group.")] = 30,
    objects: Annotated[int | None, typer.Option("--objects", min=1,
                                                help="Stop after this many objects.")] = None,
    duration: Annotated[float | None, typer.Option("--duration", min=0.0,
                                                   help="Stop after this many seconds.")] = None,
    layout: Annotated[Layout, typer.Option(
        "--layout", help="split: first object of a group on its own high-priority subgroup; "
                         "single: one subgroup per group (what moq-rs accepts).")] = Layout.SPLIT,
    wait_subscriber: Annotated[float | None, typer.Option(
        "--wait-subscriber", metavar="S", help="Wait up to S seconds for a subscriber first.")]
    = None,
    start_delay: Annotated[float, typer.Option(
        "--start-delay", min=0.0, metavar="S", help="Then wait S more seconds.")] = 0.0,
    start_on_signal: Annotated[bool, typer.Option(
        "--start-on-signal", help="Then wait for SIGUSR1 before the first object (bounded by "
                                  "--wait-subscriber), e.g. until all subscribers are in.")]
    = False,
    linger: Annotated[float, typer.Option(
        "--linger", min=0.0, metavar="S",
        help="At most S seconds after the last object for it to be acknowledged.")] = 2.0,
    insecure: InsecureOption = False,
    fingerprint: FingerprintOption = None,
    cafile: CaFileOption = None,
    crypto: CryptoOption = None,
    connect_timeout: ConnectTimeoutOption = 5.0,
    as_json: JsonOption = False,
) -> None:
    """Publish a synthetic, self-verifying track through a relay."""
    backend = crypto_option(crypto)
    try:
        parse_url(url)
        opts = PublisherOptions(
            url=url, namespace=namespace_option(namespace), track=track.encode(),
            tls=tls_options(insecure, fingerprint, cafile), rate=rate, object_size=object_size,
            group_length=group_length, objects=objects, duration=duration, layout=layout,
            wait_subscriber=wait_subscriber, start_delay=start_delay,
            start_on_signal=start_on_signal, linger=linger,
            connect_timeout=connect_timeout, crypto=backend)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    summary = run_endpoint(run_publisher(opts))
    show_summary(summary_rows(summary), summary, as_json)
    if not summary.ok:
        raise typer.Exit(1)
