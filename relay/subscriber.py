"""`fastrelay subscribe`: a verifying MoQT draft-14 subscriber.

It connects to a relay, SUBSCRIBEs to one track (filter LargestObject or NextGroupStart) and
checks every object with relay.media.TrackVerifier: placement, order, gaps, duplicates and
payload integrity. One-way delay comes from the object's timestamp extension header (0x10, µs,
see relay.publisher), falling back to the payload's own send time.

Skipped versus lost. A relay that skips a subgroup on purpose (e.g. for a congested subscriber)
says so with the draft's own means: it resets that subgroup's stream with error code
DELIVERY_TIMEOUT (0x2, `relay.moqt.session.SKIPPED_SUBGROUP_RESET_CODE`), after the stream's
header so the subscriber knows which group and subgroup it was. Objects of that group that
never arrive are then reported as `skipped`; a missing object without that signal, or a reset
with any other code, is a loss. Either way the exit status is 1 when an expected object did not
arrive intact.

The subscriber ends on `--expect-objects` reached, on the end of the track (END_OF_TRACK
object or PUBLISH_DONE, once the streams PUBLISH_DONE counts have ended), on `--duration`, or
on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import enum
import signal
import time
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import typer

from crypto_backends import CryptoBackend
from relay.cli.output import JsonOption, progress
from relay.errors import ConfigError
from relay.media import _HEADER as PAYLOAD_HEADER
from relay.media import SubscribeSummary, TrackVerifier
from relay.moqt.constants import (
    FetchErrorCode,
    FilterType,
    ObjectStatus,
    SubscribeNamespaceErrorCode,
)
from relay.moqt.data import parse_extension_headers
from relay.moqt.errors import MoqtError
from relay.moqt.quic import MoqtProtocol, TlsOptions, connect, describe_close, parse_url
from relay.moqt.session import (
    SKIPPED_SUBGROUP_RESET_CODE,
    Event,
    FetchRequested,
    NamespacePublished,
    ObjectReceived,
    PublishDoneReceived,
    SessionClosed,
    SubgroupHeader,
    SubgroupStreamClosed,
    SubgroupStreamOpened,
    SubscribeAccepted,
    SubscribeNamespaceRequested,
    SubscribeRejected,
    TrackNamespace,
)
from relay.publisher import (
    TIMESTAMP_EXTENSION,
    CaFileOption,
    ConnectTimeoutOption,
    CryptoOption,
    FingerprintOption,
    InsecureOption,
    NamespaceOption,
    TrackOption,
    UrlOption,
    crypto_option,
    namespace_option,
    run_endpoint,
    show_summary,
    tls_options,
)

# A SUBSCRIBE refused because the relay does not know the track yet is retried this often
# (the publisher may not have announced it yet), until the --duration deadline.
RETRY_INTERVAL = 0.2
# After PUBLISH_DONE, wait at most this long for the streams it counts.
DONE_GRACE = 2.0


def timestamp_us(extensions: bytes) -> int | None:
    """The µs send time in extension 0x10, if present (and the block parses)."""
    if not extensions:
        return None
    try:
        for kind, value in parse_extension_headers(extensions):
            if kind == TIMESTAMP_EXTENSION and isinstance(value, int):
                return value
    except MoqtError:
        return None
    return None


@dataclass(frozen=True)
class SubscriberOptions:
    url: str
    namespace: TrackNamespace
    track: bytes
    tls: TlsOptions = TlsOptions()
    filter_type: FilterType = FilterType.LARGEST_OBJECT
    priority: int = 128
    duration: float = 30.0
    expect_objects: int | None = None
    expect_groups: int | None = None
    connect_timeout: float = 5.0
    crypto: CryptoBackend | None = None
    delays_file: Path | None = None
    """Write each intact object's one-way delay here (ns, one a line, arrival order), from the
    payload's own send time (the same clock for every relay, whatever it does to extensions)."""


class Subscriber:
    """Turns session events into TrackVerifier calls and decides when the track is over."""

    def __init__(self, opts: SubscriberOptions, protocol: MoqtProtocol) -> None:
        self.opts = opts
        self.protocol = protocol
        self.session = protocol.session
        self.verifier = TrackVerifier()
        self.request_id: int | None = None
        self.track_alias: int | None = None
        self.rejections: list[str] = []
        self.track_ended = False
        #: When the END_OF_TRACK object arrived: the end is known, but it travels on its own
        #: stream and may overtake data still queued on lower-priority streams.
        self.end_of_track_at: float | None = None
        self.end_of_track_group = 0
        self.done_streams: int | None = None
        self.done_at: float | None = None
        self.streams_opened = 0
        self.streams_closed = 0
        self.closed: SessionClosed | None = None
        self.changed = asyncio.Event()
        self.subscribed_at: float | None = None
        self.retry_at: float | None = None
        self.delays_ns: array[int] | None = array("q") if opts.delays_file else None

    def subscribe(self) -> None:
        self.request_id = self.session.subscribe(
            self.opts.namespace, self.opts.track, subscriber_priority=self.opts.priority,
            filter_type=self.opts.filter_type)
        self.protocol.flush()

    def on_event(self, event: Event) -> None:
        s = self.session
        now_ns = time.time_ns()
        if isinstance(event, ObjectReceived):
            if event.request_id != self.request_id:
                return
            header = event.header
            if header.status == ObjectStatus.END_OF_TRACK:
                self.end_of_track_at = time.monotonic()
                self.end_of_track_group = header.group_id
            elif header.status == ObjectStatus.NORMAL:
                ts = timestamp_us(header.extensions)
                before = self.verifier.objects
                self.verifier.on_object(header.group_id, event.payload, now_ns,
                                        send_ns=None if ts is None else ts * 1000)
                if self.delays_ns is not None and self.verifier.objects > before:
                    self.delays_ns.append(now_ns - PAYLOAD_HEADER.unpack_from(event.payload)[-1])
        elif isinstance(event, SubgroupStreamOpened):
            if event.request_id == self.request_id and isinstance(event.header, SubgroupHeader):
                self.streams_opened += 1
                self.verifier.on_group(event.header.group_id)
        elif isinstance(event, SubgroupStreamClosed):
            if event.request_id != self.request_id or \
                    not isinstance(event.header, SubgroupHeader):
                return
            self.streams_closed += 1
            group = event.header.group_id
            if event.reset_code is None:
                if event.header.end_of_group:
                    self.verifier.on_group_end(group)
            elif event.reset_code == SKIPPED_SUBGROUP_RESET_CODE:
                self.verifier.on_subgroup_skipped(group, event.header.subgroup_id or 0)
            else:
                self.verifier.on_group_error(group, f"subgroup {event.header.subgroup_id} "
                                                    f"reset with code {event.reset_code}")
        elif isinstance(event, SubscribeAccepted):
            if event.request_id == self.request_id:
                self.track_alias = event.track_alias
                self.subscribed_at = time.perf_counter()
        elif isinstance(event, SubscribeRejected):
            if event.request_id == self.request_id:
                self.rejections.append(f"code {event.error_code}: {event.reason_phrase}")
                self.request_id = None
                self.retry_at = time.monotonic() + RETRY_INTERVAL
        elif isinstance(event, PublishDoneReceived):
            if event.request_id == self.request_id:
                self.done_streams = event.stream_count
                self.done_at = time.monotonic()
        elif isinstance(event, NamespacePublished):
            s.accept_publish_namespace(event.request_id)
            if event.namespace == self.opts.namespace and self.request_id is None:
                self.retry_at = time.monotonic()  # announced now: subscribe again at once
        elif isinstance(event, SubscribeNamespaceRequested):
            s.reject_subscribe_namespace(event.request_id,
                                         SubscribeNamespaceErrorCode.NOT_SUPPORTED,
                                         "a subscriber has no namespaces to offer")
        elif isinstance(event, FetchRequested):
            s.reject_fetch(event.request_id, FetchErrorCode.NOT_SUPPORTED, "not a publisher")
        elif isinstance(event, SessionClosed):
            self.closed = event
        self.changed.set()

    def finished(self) -> str | None:
        """Why to stop now, or None."""
        if self.opts.expect_objects is not None and \
                self.verifier.received() >= self.opts.expect_objects:
            return "complete"
        if self.track_ended:
            return "track_ended"
        # END_OF_TRACK travels on its own stream: done once every stream that opened ended
        # and every group before it is whole (a stream whose first packet still waits in a
        # congested sender has not even opened here), else after the grace period.
        if self.end_of_track_at is not None and self.done_streams is None and (
                (self.streams_closed >= self.streams_opened
                 and self.verifier.complete_before(self.end_of_track_group))
                or time.monotonic() - self.end_of_track_at > DONE_GRACE):
            self.track_ended = True
            return "track_ended"
        if self.done_streams is not None:
            assert self.done_at is not None
            if self.streams_closed >= self.done_streams or \
                    time.monotonic() - self.done_at > DONE_GRACE:
                self.track_ended = True
                return "track_ended"
        if self.closed is not None:
            return "error"
        return None


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def run_subscriber(opts: SubscriberOptions, *,
                         on_subscribed: Callable[[], None] | None = None) -> SubscribeSummary:
    """Subscribe and verify until done; `on_subscribed()` runs once SUBSCRIBE_OK arrived."""
    stop = _stop_event()
    deadline = time.monotonic() + opts.duration
    holder: list[Subscriber] = []
    timings: dict[str, float] = {}
    connection: dict[str, int | None] = {}
    t0 = time.perf_counter()
    reason = "duration"
    async with connect(opts.url, tls=opts.tls, timeout=opts.connect_timeout, crypto=opts.crypto,
                       on_event=lambda p, e: holder[0].on_event(e) if holder else None
                       ) as protocol:
        sub = Subscriber(opts, protocol)
        holder.append(sub)
        timings["connect_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        connection["version"] = protocol.session.version
        sub.subscribe()
        announced = False
        while True:
            if stop.is_set():
                reason = "signal"
                break
            why = sub.finished()
            if why is not None:
                reason = why
                break
            now = time.monotonic()
            if now >= deadline:
                break
            if sub.subscribed_at is not None and not announced:
                announced = True
                timings["subscribe_ms"] = round((sub.subscribed_at - t0) * 1000, 1)
                if on_subscribed is not None:
                    on_subscribed()
            if sub.request_id is None and sub.retry_at is not None and now >= sub.retry_at:
                sub.retry_at = None
                sub.subscribe()
            sub.changed.clear()
            wake = deadline - now
            if sub.retry_at is not None:
                wake = min(wake, max(0.0, sub.retry_at - now))
            if sub.done_at is not None:
                wake = min(wake, 0.1)
            waiter = asyncio.ensure_future(sub.changed.wait())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait([waiter, stopper], timeout=wake,
                               return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
        if sub.request_id is not None and sub.closed is None and reason != "track_ended":
            try:
                protocol.session.unsubscribe(sub.request_id)
                protocol.flush()
            except KeyError:
                pass
        quic = protocol._quic
        connection["track_alias"] = sub.track_alias
        connection["rtt_us"] = int(quic._loss._rtt_smoothed * 1e6) if quic._loss else None
    summary = sub.verifier.summary(expect_objects=opts.expect_objects,
                                   expect_groups=opts.expect_groups,
                                   track_ended=sub.track_ended, reason=reason)
    if sub.closed is not None and reason == "error":
        summary.errors.append(describe_close(sub.closed))
        summary.ok = False
    if sub.verifier.received() == 0 and sub.rejections:
        summary.errors.append(f"SUBSCRIBE refused: {sub.rejections[-1]}")
    summary.timings_ms = timings
    summary.connection = connection
    if opts.delays_file is not None and sub.delays_ns is not None:
        opts.delays_file.write_text("".join(f"{d}\n" for d in sub.delays_ns))
    return summary


def summary_rows(summary: SubscribeSummary) -> dict[str, object]:
    flat = asdict(summary)
    for key in ("delay", "timings_ms", "connection"):
        flat.update({f"{key}.{k}": v for k, v in flat.pop(key).items()})
    flat["errors"] = "; ".join(flat["errors"]) or "none"
    return flat


class FilterChoice(str, enum.Enum):
    LARGEST = "largest"
    NEXT_GROUP = "next-group"


_FILTERS = {FilterChoice.LARGEST: FilterType.LARGEST_OBJECT,
            FilterChoice.NEXT_GROUP: FilterType.NEXT_GROUP_START}


def subscribe_command(
    url: UrlOption,
    namespace: NamespaceOption,
    track: TrackOption,
    filter_choice: Annotated[FilterChoice, typer.Option(
        "--filter", help="largest: from the largest object on; next-group: from the next "
                         "group start.")] = FilterChoice.LARGEST,
    priority: Annotated[int, typer.Option("--priority", min=0, max=255,
                                          help="Subscriber priority (0 highest).")] = 128,
    duration: Annotated[float, typer.Option(
        "--duration", min=0.1, help="Give up (and judge what arrived) after this many "
                                    "seconds.")] = 30.0,
    expect_objects: Annotated[int | None, typer.Option(
        "--expect-objects", min=1, help="Done (exit 0) once this many arrived intact.")] = None,
    expect_groups: Annotated[int | None, typer.Option("--expect-groups", min=1)] = None,
    insecure: InsecureOption = False,
    fingerprint: FingerprintOption = None,
    cafile: CaFileOption = None,
    crypto: CryptoOption = None,
    connect_timeout: ConnectTimeoutOption = 5.0,
    delays_file: Annotated[Path | None, typer.Option(
        "--delays-file", metavar="PATH",
        help="Write every intact object's one-way delay (ns, one a line) to PATH.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Subscribe to a track and verify every object; exit 0 only if all arrived intact."""
    backend = crypto_option(crypto)
    try:
        parse_url(url)
        opts = SubscriberOptions(
            url=url, namespace=namespace_option(namespace), track=track.encode(),
            tls=tls_options(insecure, fingerprint, cafile), filter_type=_FILTERS[filter_choice],
            priority=priority, duration=duration, expect_objects=expect_objects,
            expect_groups=expect_groups, connect_timeout=connect_timeout, crypto=backend,
            delays_file=delays_file)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    summary = run_endpoint(run_subscriber(
        opts, on_subscribed=lambda: progress("subscribed")))
    show_summary(summary_rows(summary), summary, as_json)
    if not summary.ok:
        raise typer.Exit(1)
