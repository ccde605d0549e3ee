"""`fastrelay subscribe`: a verifying MoQT draft-14 subscriber.

It connects to a relay, SUBSCRIBEs to one or more tracks (filter LargestObject or
NextGroupStart) and checks every object with relay.media.TrackVerifier, one per track: placement,
order, gaps, duplicates and payload integrity. One-way delay comes from the object's timestamp
extension header (0x10, µs, see relay.publisher), falling back to the payload's own send time.

Skipped versus lost. A relay that skips a subgroup on purpose (e.g. for a congested subscriber)
says so with the draft's own means: it resets that subgroup's stream with error code
DELIVERY_TIMEOUT (0x2, `relay.moqt.session.SKIPPED_SUBGROUP_RESET_CODE`), after the stream's
header so the subscriber knows which group and subgroup it was. Objects of that group that
never arrive are then reported as `skipped`; a missing object without that signal, or a reset
with any other code, is a loss. Either way the exit status is 1 when an expected object did not
arrive intact.

A track is done on `--expect-objects` reached (a count per track) or on its end (END_OF_TRACK
object or PUBLISH_DONE, once the streams PUBLISH_DONE counts have ended); a done track is
unsubscribed (unless it ended) and its later events are ignored. The subscriber ends once every
track is done, on `--duration` (overall), on the session closing, or on SIGINT/SIGTERM.

Several tracks (`--track` repeated) share one QUIC connection and one MoQ session: one SUBSCRIBE
each, with its own request id and the alias the relay chose. With `--namespace`, every `--track`
is a track name in it; without, each `--track` is NAMESPACE/TRACK (the last '/' field is the
name), so tracks of different namespaces, e.g. from two publishers, share the connection (our
relay routes a namespace to its newest publisher only, so two publishers of one namespace cannot
each serve their own track). The JSON summary is today's per-track summary when one track was
given; with several, its top-level fields aggregate over the tracks (counters summed, ok = every
track ok, delay over every object, track_ended = every track ended, reason complete or
track_ended once every track is done, else duration/signal/error) and `tracks` maps each
track's label (its name, or NAMESPACE/TRACK when the namespaces differ) to that track's own
summary (`connection.track_alias` there; None at the top level).
"""

from __future__ import annotations

import asyncio
import enum
import signal
import time
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from aioquic import tls

from crypto_backends import CryptoBackend
from relay.cli.output import JsonOption, progress
from relay.errors import ConfigError
from relay.media import _HEADER as PAYLOAD_HEADER
from relay.media import DelayStats, SubscribeSummary, TrackVerifier
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
    join_namespace,
    split_namespace,
)
from relay.publisher import (
    TIMESTAMP_EXTENSION,
    CaFileOption,
    ConnectTimeoutOption,
    CryptoOption,
    FingerprintOption,
    InsecureOption,
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


FullTrackName = tuple[TrackNamespace, bytes]


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
    """Per track."""
    expect_groups: int | None = None
    """Per track."""
    connect_timeout: float = 5.0
    crypto: CryptoBackend | None = None
    delays_file: Path | None = None
    """Write each intact object's one-way delay here (ns, one a line, arrival order, every
    track), from the payload's own send time (the same clock for every relay, whatever it does
    to extensions)."""
    more_tracks: tuple[FullTrackName, ...] = ()
    """Further (namespace, name) tracks on the same session, after `namespace`/`track`."""
    key_update_after: int | None = None
    """Start one 1-RTT key update once this many objects arrived (after an ACK of a packet
    of the current phase, RFC 9001 §6.1); the summary's connection says what happened."""

    @property
    def tracks(self) -> tuple[FullTrackName, ...]:
        return ((self.namespace, self.track), *self.more_tracks)


def track_labels(tracks: tuple[FullTrackName, ...]) -> list[str]:
    """Summary keys: the track names when every track is in one namespace, else
    NAMESPACE/TRACK."""
    names = [name.decode("utf-8", errors="replace") for _, name in tracks]
    if len({namespace for namespace, _ in tracks}) == 1:
        return names
    return [f"{join_namespace(namespace)}/{name}" for (namespace, _), name in zip(tracks, names)]


def parse_tracks(namespace: str | None, tracks: list[str]) -> list[FullTrackName]:
    """The --track values: names in --namespace, or each one NAMESPACE/TRACK without it."""
    result: list[FullTrackName] = []
    for text in tracks:
        if namespace is not None:
            full = (namespace_option(namespace), text.encode())
        else:
            prefix, sep, name = text.strip("/").rpartition("/")
            if not sep or not name or not prefix.strip("/"):
                raise ConfigError(f"--track {text!r}: without --namespace, give each track as "
                                  "NAMESPACE/TRACK (e.g. live/cam1/video)")
            full = (split_namespace(prefix), name.encode())
        if full in result:
            raise ConfigError(f"--track {text!r} is given twice")
        result.append(full)
    return result


class TrackSubscription:
    """One track of the session: its SUBSCRIBE, its verifier and when it is over."""

    def __init__(self, namespace: TrackNamespace, name: bytes, label: str) -> None:
        self.namespace = namespace
        self.name = name
        self.label = label
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
        self.subscribed_at: float | None = None
        self.retry_at: float | None = None
        self.done: str | None = None
        """Why this track is over (complete, track_ended); its later events are ignored."""
        self.unsubscribed = False

    def on_event(self, event: Event, now_ns: int, delays_ns: array[int] | None) -> None:
        """An event of this track's current request id."""
        if isinstance(event, ObjectReceived):
            header = event.header
            if header.status == ObjectStatus.END_OF_TRACK:
                self.end_of_track_at = time.monotonic()
                self.end_of_track_group = header.group_id
            elif header.status == ObjectStatus.NORMAL:
                ts = timestamp_us(header.extensions)
                before = self.verifier.objects
                self.verifier.on_object(header.group_id, event.payload, now_ns,
                                        send_ns=None if ts is None else ts * 1000)
                if delays_ns is not None and self.verifier.objects > before:
                    # (group, object, delay): the bench pairs copies of one object by its id
                    delays_ns.extend((header.group_id, header.object_id,
                                      now_ns - PAYLOAD_HEADER.unpack_from(event.payload)[-1]))
        elif isinstance(event, SubgroupStreamOpened):
            if isinstance(event.header, SubgroupHeader):
                self.streams_opened += 1
                self.verifier.on_group(event.header.group_id)
        elif isinstance(event, SubgroupStreamClosed):
            if not isinstance(event.header, SubgroupHeader):
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
            self.track_alias = event.track_alias
            self.subscribed_at = time.perf_counter()
        elif isinstance(event, SubscribeRejected):
            self.rejections.append(f"code {event.error_code}: {event.reason_phrase}")
            self.request_id = None
            self.retry_at = time.monotonic() + RETRY_INTERVAL
        elif isinstance(event, PublishDoneReceived):
            self.done_streams = event.stream_count
            self.done_at = time.monotonic()

    def finished(self, expect_objects: int | None) -> str | None:
        """Why this track is over now, or None."""
        if expect_objects is not None and self.verifier.received() >= expect_objects:
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
        return None

    def summary(self, opts: SubscriberOptions, reason: str, closed: SessionClosed | None,
                t0: float) -> SubscribeSummary:
        """This track's summary; `reason` is the session's, for a track that was not done."""
        summary = self.verifier.summary(expect_objects=opts.expect_objects,
                                        expect_groups=opts.expect_groups,
                                        track_ended=self.track_ended,
                                        reason=self.done or reason)
        if closed is not None and reason == "error" and self.done is None:
            summary.errors.append(describe_close(closed))
            summary.ok = False
        if self.verifier.received() == 0 and self.rejections:
            summary.errors.append(f"SUBSCRIBE refused: {self.rejections[-1]}")
        if self.subscribed_at is not None:
            summary.timings_ms = {"subscribe_ms": round((self.subscribed_at - t0) * 1000, 1)}
        summary.connection = {"track_alias": self.track_alias}
        return summary


class Subscriber:
    """Dispatches session events to the tracks and decides when the subscriber is done."""

    def __init__(self, opts: SubscriberOptions, protocol: MoqtProtocol) -> None:
        self.opts = opts
        self.protocol = protocol
        self.session = protocol.session
        self.tracks = [TrackSubscription(namespace, name, label) for (namespace, name), label
                       in zip(opts.tracks, track_labels(opts.tracks))]
        self.closed: SessionClosed | None = None
        self.changed = asyncio.Event()
        self.delays_ns: array[int] | None = array("q") if opts.delays_file else None

    def subscribe(self, track: TrackSubscription) -> None:
        track.request_id = self.session.subscribe(
            track.namespace, track.name, subscriber_priority=self.opts.priority,
            filter_type=self.opts.filter_type)
        self.protocol.flush()

    def unsubscribe(self, track: TrackSubscription) -> None:
        """UNSUBSCRIBE a track still subscribed (once)."""
        if track.request_id is None or track.unsubscribed or self.closed is not None:
            return
        track.unsubscribed = True
        try:
            self.session.unsubscribe(track.request_id)
            self.protocol.flush()
        except KeyError:
            pass

    def track_of(self, request_id: int) -> TrackSubscription | None:
        for track in self.tracks:
            if track.request_id is not None and track.request_id == request_id:
                return track
        return None

    def on_event(self, event: Event) -> None:
        s = self.session
        if isinstance(event, (ObjectReceived, SubgroupStreamOpened, SubgroupStreamClosed,
                              SubscribeAccepted, SubscribeRejected, PublishDoneReceived)):
            track = self.track_of(event.request_id)
            if track is None or track.done is not None:
                return
            track.on_event(event, time.time_ns(), self.delays_ns)
        elif isinstance(event, NamespacePublished):
            s.accept_publish_namespace(event.request_id)
            for track in self.tracks:
                if event.namespace == track.namespace and track.request_id is None \
                        and track.done is None:
                    track.retry_at = time.monotonic()  # announced now: subscribe again at once
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
        """Why to stop now, or None: once every track is done (complete, or track_ended when
        every track ended), or the session closed."""
        for track in self.tracks:
            if track.done is None:
                track.done = track.finished(self.opts.expect_objects)
        reasons = {track.done for track in self.tracks}
        if None not in reasons:
            return reasons.pop() if len(reasons) == 1 else "complete"
        if self.closed is not None:
            return "error"
        return None

    def subscribed(self) -> bool:
        """Every track's SUBSCRIBE was answered with SUBSCRIBE_OK."""
        return all(track.subscribed_at is not None for track in self.tracks)


_SUMMED = ("objects", "bytes", "groups", "groups_complete", "groups_open", "lost", "gaps",
           "missing_groups", "out_of_order", "groups_out_of_order", "duplicates",
           "integrity_failures", "group_errors", "skipped", "skipped_subgroups",
           "timestamp_mismatches")


@dataclass
class MultiTrackSummary(SubscribeSummary):
    """Several tracks: the aggregate at the top level, each track's own summary in `tracks`."""

    tracks: dict[str, SubscribeSummary] = field(default_factory=dict)


def combine_summaries(parts: dict[str, SubscribeSummary], delays_us: list[int],
                      reason: str) -> MultiTrackSummary:
    """Aggregate per-track summaries: counters summed, ok only if every track is, the delay
    over `delays_us` (every track's samples), track_ended only if every track ended; errors
    are prefixed with their track's label."""
    summary = MultiTrackSummary(
        event="summary", role="subscribe", ok=all(p.ok for p in parts.values()),
        objects=0, bytes=0, groups=0, groups_complete=0, groups_open=0, lost=0, gaps=0,
        missing_groups=0, out_of_order=0, groups_out_of_order=0, duplicates=0,
        integrity_failures=0, group_errors=0, delay=DelayStats.from_samples(delays_us),
        track_ended=all(p.track_ended for p in parts.values()), reason=reason,
        errors=[f"{label}: {e}" for label, p in parts.items() for e in p.errors],
        tracks=parts)
    for name in _SUMMED:
        setattr(summary, name, sum(getattr(p, name) for p in parts.values()))
    return summary


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


class _KeyUpdate:
    """One subscriber-initiated 1-RTT key update (--key-update-after N objects)."""

    def __init__(self, protocol: Any, after: int | None) -> None:
        self.protocol, self.after = protocol, after
        self.requested_at_pn: int | None = None

    def poll(self, objects: int) -> None:
        if self.after is None or self.requested_at_pn is not None or objects < self.after:
            return
        quic = self.protocol._quic
        space = quic._spaces.get(tls.Epoch.ONE_RTT)
        if space is None or space.largest_acked_packet <= 0:
            return  # nothing of the current phase acknowledged yet
        self.requested_at_pn = quic._packet_number
        quic.request_key_update()
        quic.send_ping(0x6B75)  # a packet to carry the switch
        self.protocol.transmit()

    def report(self) -> dict[str, int | None]:
        if self.after is None:
            return {}
        pair = self.protocol._quic._cryptos.get(tls.Epoch.ONE_RTT)
        return {"key_update_requested_at_pn": self.requested_at_pn,
                "send_key_phase": None if pair is None else pair.send.key_phase,
                "recv_key_phase": None if pair is None else pair.recv.key_phase}


async def run_subscriber(opts: SubscriberOptions, *,
                         on_subscribed: Callable[[], None] | None = None) -> SubscribeSummary:
    """Subscribe and verify until done; `on_subscribed()` runs once every track's SUBSCRIBE_OK
    arrived. Several tracks give a MultiTrackSummary."""
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
        for track in sub.tracks:
            sub.subscribe(track)
        announced = False
        key_update = _KeyUpdate(protocol, opts.key_update_after)
        while True:
            key_update.poll(sum(t.verifier.received() for t in sub.tracks))
            if stop.is_set():
                reason = "signal"
                break
            why = sub.finished()
            if why is not None:
                reason = why
                break
            for track in sub.tracks:
                if track.done is not None and track.done != "track_ended":
                    sub.unsubscribe(track)  # complete: the others go on
            now = time.monotonic()
            if now >= deadline:
                break
            if not announced and sub.subscribed():
                announced = True
                timings["subscribe_ms"] = round(
                    (max(t.subscribed_at or t0 for t in sub.tracks) - t0) * 1000, 1)
                if on_subscribed is not None:
                    on_subscribed()
            wake = deadline - now
            for track in sub.tracks:
                if track.done is not None:
                    continue
                if track.request_id is None and track.retry_at is not None \
                        and now >= track.retry_at:
                    track.retry_at = None
                    sub.subscribe(track)
                if track.retry_at is not None:
                    wake = min(wake, max(0.0, track.retry_at - now))
                if track.done_at is not None or track.end_of_track_at is not None:
                    wake = min(wake, 0.1)
            sub.changed.clear()
            waiter = asyncio.ensure_future(sub.changed.wait())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait([waiter, stopper], timeout=wake,
                               return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
        for track in sub.tracks:
            if track.done != "track_ended":
                sub.unsubscribe(track)
        quic = protocol._quic
        connection["track_alias"] = sub.tracks[0].track_alias if len(sub.tracks) == 1 else None
        connection["rtt_us"] = int(quic._loss._rtt_smoothed * 1e6) if quic._loss else None
        connection.update(key_update.report())
    parts = {t.label: t.summary(opts, reason, sub.closed, t0) for t in sub.tracks}
    if len(sub.tracks) == 1:
        summary = parts[sub.tracks[0].label]
    else:
        summary = combine_summaries(
            parts, [d for t in sub.tracks for d in t.verifier.delays_us], reason)
    summary.timings_ms = timings
    summary.connection = connection
    if opts.delays_file is not None and sub.delays_ns is not None:
        d = sub.delays_ns
        opts.delays_file.write_text("".join(f"{d[i]} {d[i + 1]} {d[i + 2]}\n"
                                            for i in range(0, len(d), 3)))
    return summary


def summary_rows(summary: SubscribeSummary) -> dict[str, object]:
    flat = asdict(summary)
    tracks = flat.pop("tracks", {})
    for key in ("delay", "timings_ms", "connection"):
        flat.update({f"{key}.{k}": v for k, v in flat.pop(key).items()})
    flat["errors"] = "; ".join(flat["errors"]) or "none"
    for label, part in tracks.items():
        flat[f"tracks.{label}"] = (
            f"ok={part['ok']} objects={part['objects']} lost={part['lost']} "
            f"skipped={part['skipped']} alias={part['connection'].get('track_alias')} "
            f"reason={part['reason']}")
    return flat


class FilterChoice(str, enum.Enum):
    LARGEST = "largest"
    NEXT_GROUP = "next-group"


_FILTERS = {FilterChoice.LARGEST: FilterType.LARGEST_OBJECT,
            FilterChoice.NEXT_GROUP: FilterType.NEXT_GROUP_START}


def subscribe_command(
    url: UrlOption,
    tracks: Annotated[list[str], typer.Option(
        "--track", metavar="TRACK",
        help="Track name in --namespace, or NAMESPACE/TRACK without --namespace. Repeat for "
             "several tracks on one connection (one SUBSCRIBE and one verifier each).")],
    namespace: Annotated[str | None, typer.Option(
        "--namespace", help="Track namespace, fields separated by '/' (e.g. live/cam1), of "
                            "every --track.")] = None,
    filter_choice: Annotated[FilterChoice, typer.Option(
        "--filter", help="largest: from the largest object on; next-group: from the next "
                         "group start.")] = FilterChoice.LARGEST,
    priority: Annotated[int, typer.Option("--priority", min=0, max=255,
                                          help="Subscriber priority (0 highest).")] = 128,
    duration: Annotated[float, typer.Option(
        "--duration", min=0.1, help="Give up (and judge what arrived) after this many "
                                    "seconds.")] = 30.0,
    expect_objects: Annotated[int | None, typer.Option(
        "--expect-objects", min=1, help="A track is done (exit 0 once every track is) when "
                                        "this many of its objects arrived intact.")] = None,
    expect_groups: Annotated[int | None, typer.Option(
        "--expect-groups", min=1, help="Groups expected per track.")] = None,
    insecure: InsecureOption = False,
    fingerprint: FingerprintOption = None,
    cafile: CaFileOption = None,
    crypto: CryptoOption = None,
    connect_timeout: ConnectTimeoutOption = 5.0,
    delays_file: Annotated[Path | None, typer.Option(
        "--delays-file", metavar="PATH",
        help="Write every intact object's one-way delay to PATH, a line each: group id, "
             "object id, delay in ns.")] = None,
    key_update_after: Annotated[int | None, typer.Option(
        "--key-update-after", min=1, metavar="N",
        help="Start one 1-RTT key update once N objects arrived (test aid).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Subscribe to tracks and verify every object; exit 0 only if all arrived intact."""
    backend = crypto_option(crypto)
    try:
        parse_url(url)
        (first_ns, first_name), *more = parse_tracks(namespace, tracks)
        opts = SubscriberOptions(
            url=url, namespace=first_ns, track=first_name, more_tracks=tuple(more),
            tls=tls_options(insecure, fingerprint, cafile), filter_type=_FILTERS[filter_choice],
            priority=priority, duration=duration, expect_objects=expect_objects,
            expect_groups=expect_groups, connect_timeout=connect_timeout, crypto=backend,
            delays_file=delays_file, key_update_after=key_update_after)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    summary = run_endpoint(run_subscriber(
        opts, on_subscribed=lambda: progress("subscribed")))
    show_summary(summary_rows(summary), summary, as_json)
    if not summary.ok:
        raise typer.Exit(1)
