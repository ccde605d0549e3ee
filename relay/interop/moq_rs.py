"""Drive the PyPI package `moq-rs` (import `moq`) as relay, synthetic publisher and verifier.

Run as its own process, one role each:

    python -m relay.interop.moq_rs server --bind 127.0.0.1:4443 [--cert C --key K] [--cache-bytes N]
    python -m relay.interop.moq_rs publish   --url moqt://127.0.0.1:4443/x --broadcast B --track T \
                                             --objects 100 --groups 10 --size 1000 --rate 200 \
                                             (--tls-fingerprint HEX | --insecure) \
                                             [--wait-demand S [--start-delay S] [--start-on-signal]]
    python -m relay.interop.moq_rs subscribe --url ... --broadcast B --track T --expect-objects 100

stdout carries JSON lines only (one object each, snake_case keys, integer counters): the server
starts with `{"event": "listening", ...}`; publish and subscribe end with `{"event": "summary",
...}`. Rust logs go to stderr (redirect it to a file: a full pipe would block the process).

Facts about moq-rs 0.5.1 / moq-ffi 0.4.18 that shape this driver (checked on loopback):
- Protocol choice: the server picks the ALPN. A moq-rs client offers moq-lite (`moql`,
  `moq-lite-03..07-wip`), IETF `moq-00` (draft-14) and `moqt-15..22`; a moq-rs server accepts all
  of them and prefers its own order, so moq-rs <-> moq-rs always runs **moq-lite-06**. Nothing
  in the API (or in the MOQ_SERVER_VERSION / MOQ_CLIENT_VERSION variables, which only its CLI
  reads) restricts it. draft-14 therefore happens only against a server that offers `moq-00`
  alone, e.g. a fastrelay relay: our publish/subscribe roles then speak draft-14 with no flag.
  At log level info the client logs `connected version=...` (see `negotiated_versions`).
- Delivery: a subscription's `max_age_us` defaults to 0 ("latest group only"), which silently
  skips every group superseded before it was read. A verifier must raise it (`--max-age-ms`).
  Likewise `TrackConsumer.next_group()` skips forward; we read groups with `recv_group()` in
  arrival order, each group in its own task, so a slow group never hides a later one.
- The SUBSCRIBE is sent lazily, on the consumer's first poll, so demand appears only then.
  The "subscribed" event of the subscribe role therefore precedes the relay's SUBSCRIBE_OK;
  a test that must know every subscriber is in asks the relay (its stats' subscriptions),
  then starts a `--start-on-signal` publisher with SIGUSR1. A `--start-delay` timer armed by
  the first demand races the other subscribers' process start-up instead.
- Logging is silent until `moq.log_level()` is called (once per process); `RUST_LOG` then
  overrides the level, `NO_COLOR=1` drops ANSI colours. When logging, each socket warns that
  `net.core.rmem_max`/`wmem_max` (4 MiB here) is below the 8 MiB it asks for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

# The payload format, plan helpers, verifier and summaries live in relay.media, shared with
# fastrelay's own publisher and subscriber, so each side verifies the other's objects.
from relay.media import (
    HEADER_SIZE,
    PayloadHeader,
    PublishSummary,
    TrackVerifier,
    encode_object,
    group_sizes,
    iter_plan,
)

if TYPE_CHECKING:  # `moq` is optional: the pure parts below must import without it.
    import moq



# --- Publishing plan ---------------------------------------------------------------------------


# moq-net refuses a write past these ("group too large", protocol code 50), measured on 0.5.1.
MAX_OBJECTS_PER_GROUP = 8192
MAX_GROUP_BYTES = 32 * 1024 * 1024


def check_plan(objects: int, groups: int, size: int) -> None:
    """Reject a plan moq would refuse halfway through, before any connection is made."""
    if size < HEADER_SIZE:
        raise ValueError(f"--size must be at least {HEADER_SIZE} (the payload header)")
    largest = group_sizes(objects, groups)[0]
    if largest > MAX_OBJECTS_PER_GROUP:
        raise ValueError(f"{largest} objects in a group exceed moq's {MAX_OBJECTS_PER_GROUP}; "
                         "use more --groups")
    if largest * size > MAX_GROUP_BYTES:
        raise ValueError(f"a group of {largest * size} bytes exceeds moq's {MAX_GROUP_BYTES}; "
                         "use more --groups")


_VERSION_LOG = re.compile(r"connected\s+version=(\S+)")


def negotiated_versions(log_text: str) -> list[str]:
    """Protocol versions moq-rs logged at level info ("connected version=moq-transport-14")."""
    return _VERSION_LOG.findall(re.sub(r"\x1b\[[0-9;]*m", "", log_text))


# --- moq glue ----------------------------------------------------------------------------------


class InteropError(Exception):
    """A driver failure reported as `error: <message>` with exit status 1."""


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _import_moq(log_level: str | None) -> tuple[Any, float]:
    """Import moq (timed) and start its Rust logging when asked."""
    t0 = time.perf_counter()
    try:
        import moq
    except ImportError as exc:
        raise InteropError("the 'moq' module is missing: pip install moq-rs==0.5.1") from exc
    if log_level:
        moq.log_level(log_level)
    return moq, (time.perf_counter() - t0) * 1000.0


def _stop_event() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, so every role ends cleanly and still reports."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    return event


async def _wait_any(*aws: Any, timeout: float | None) -> int | None:
    """Wait until the first awaitable finishes or `timeout` passes; cancel the others.

    Returns the index of an awaitable that finished, or None on timeout."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        return next((i for i, t in enumerate(tasks) if t in done), None)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _connection_stats(session: moq.Session | None) -> dict[str, int | None]:
    if session is None:
        return {}
    try:
        stats = session.stats()
    except Exception:  # a closed session has no stats; the summary must still print
        return {}
    keys = ("rtt_us", "bytes_sent", "bytes_received", "bytes_lost", "packets_sent",
            "packets_received", "packets_lost")
    return {k: getattr(stats, k) for k in keys}


@dataclass
class ClientOptions:
    url: str
    tls_fingerprints: list[str]
    insecure: bool
    tls_roots: list[str]
    connect_timeout: float
    max_streams: int | None


class _Connection:
    """A one-shot moq.Client: no reconnect (a drop must show), no WebSocket fallback race."""

    def __init__(self, moq_mod: Any, opts: ClientOptions) -> None:
        self._client = moq_mod.Client(
            opts.url, tls_verify=not opts.insecure, tls_fingerprints=opts.tls_fingerprints or None,
            tls_roots=opts.tls_roots or None, max_streams=opts.max_streams, reconnect=False,
            websocket_enabled=False)
        self._timeout = opts.connect_timeout
        self._url = opts.url

    async def __aenter__(self) -> Any:
        try:
            await asyncio.wait_for(self._client.__aenter__(), self._timeout)
        except asyncio.TimeoutError as exc:
            await self._client.__aexit__(None, None, None)
            raise InteropError(f"no MoQ session with {self._url} within {self._timeout:g} s; "
                               "is the server up and the TLS pin right?") from exc
        except BaseException:
            await self._client.__aexit__(None, None, None)
            raise
        return self._client

    async def __aexit__(self, *exc: object) -> None:
        await self._client.__aexit__(None, None, None)


@dataclass
class ServerOptions:
    bind: str
    certs: list[str]
    keys: list[str]
    hostnames: list[str]
    cache_bytes: int | None
    duration: float | None
    log_level: str | None


async def run_server(opts: ServerOptions) -> int:
    moq_mod, import_ms = _import_moq(opts.log_level)
    stop = _stop_event()
    origin = moq_mod.OriginProducer(cache_capacity_bytes=opts.cache_bytes)
    # One origin for both directions makes the server a relay: what one session announces is
    # offered to every other session, fanned out and cached by moq-net.
    server = moq_mod.Server(opts.bind, tls_cert=opts.certs, tls_key=opts.keys,
                            tls_generate=[] if opts.certs else opts.hostnames,
                            publish=origin, subscribe=origin)
    await server.__aenter__()
    sessions: set[asyncio.Task[None]] = set()
    accepted = 0
    try:
        _emit({"event": "listening", "bind": server.local_addr,
               "fingerprints": server.cert_fingerprints(), "import_ms": round(import_ms, 1)})

        async def hold(request: Any) -> None:
            nonlocal accepted
            try:
                session = await request.accept()
            except Exception as exc:
                print(f"warning: session rejected during handshake: {exc}", file=sys.stderr)
                return
            accepted += 1
            _emit({"event": "session", "path": request.path,
                   "transport": request.transport.name.lower(), "sessions": accepted})
            try:
                await session.closed()  # holding the session keeps the connection alive
            except Exception:
                pass  # a peer's close surfaces as an error; nothing to report per session

        async def accept_loop() -> None:
            async for request in server:
                task = asyncio.create_task(hold(request))
                sessions.add(task)
                task.add_done_callback(sessions.discard)

        await _wait_any(accept_loop(), stop.wait(), timeout=opts.duration)
    finally:
        for task in list(sessions):
            task.cancel()
        await asyncio.gather(*sessions, return_exceptions=True)
        await server.__aexit__(None, None, None)
        _emit({"event": "stopped", "sessions": accepted})
    return 0


@dataclass
class PublishOptions:
    client: ClientOptions
    broadcast: str
    track: str
    objects: int
    groups: int
    size: int
    rate: float
    first_group: int
    priority: int
    max_age_ms: int | None
    wait_demand: float | None
    start_delay: float
    linger: float
    log_level: str | None
    start_on_signal: bool = False


async def run_publish(opts: PublishOptions) -> int:
    moq_mod, import_ms = _import_moq(opts.log_level)
    stop = _stop_event()
    go = asyncio.Event()
    if opts.start_on_signal:  # at once: the signal may come before we wait for it
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, go.set)
    plan = list(iter_plan(opts.objects, opts.groups, opts.first_group))  # validates first
    errors: list[str] = []
    sent = sent_bytes = 0
    groups_done = 0
    max_late_ns = 0
    t_first = t_last = 0.0
    reason = "complete"
    t0 = time.perf_counter()
    async with _Connection(moq_mod, opts.client) as client:
        connect_ms = (time.perf_counter() - t0) * 1000.0
        broadcast = client.create_broadcast(opts.broadcast)
        max_age_us = opts.max_age_ms * 1000 if opts.max_age_ms is not None else None
        track = broadcast.publish_track(
            opts.track, moq_mod.TrackInfo(priority=opts.priority, max_age_us=max_age_us))
        broadcast.announce()
        demand_ms = None
        if opts.wait_demand:
            t1 = time.perf_counter()
            first = await _wait_any(track.demand().used(), stop.wait(), timeout=opts.wait_demand)
            if first != 0:
                errors.append(f"no subscriber within {opts.wait_demand:g} s")
            demand_ms = (time.perf_counter() - t1) * 1000.0
        if opts.start_delay > 0:
            await _wait_any(stop.wait(), timeout=opts.start_delay)
        if opts.start_on_signal and not errors:
            # A timer armed by the first demand races the other subscribers' start-up (a
            # Python subscriber took 3-18 s to reach the relay on a loaded 2-core machine):
            # whoever started them says when all of them are in.
            await _wait_any(go.wait(), stop.wait(), timeout=opts.wait_demand)
            if not go.is_set() and not stop.is_set():
                errors.append("no SIGUSR1 to start within --wait-demand")

        interval_ns = int(1e9 / opts.rate) if opts.rate > 0 else 0
        last_ts_us = 0
        group = None
        start_ns = time.perf_counter_ns()
        t_first = time.perf_counter()
        for index, (gid, oid, count) in enumerate(plan):
            if stop.is_set():
                reason = "signal"
                break
            if interval_ns:
                due_ns = start_ns + index * interval_ns
                wait_ns = due_ns - time.perf_counter_ns()
                if wait_ns > 0:
                    await asyncio.sleep(wait_ns / 1e9)
                max_late_ns = max(max_late_ns, time.perf_counter_ns() - due_ns)
            elif index % 64 == 0:
                await asyncio.sleep(0)  # unpaced: still let signals and moq callbacks run
            if oid == 0:
                group = track.create_group(gid)
            assert group is not None
            send_ns = time.time_ns()
            payload = encode_object(PayloadHeader(group=gid, object=oid, objects_in_group=count,
                                                  size=opts.size, send_ns=send_ns))
            # moq wants media timestamps that never go backwards; the payload has the exact one.
            last_ts_us = max(last_ts_us, send_ns // 1000)
            group.write_frame(payload, last_ts_us)
            sent += 1
            sent_bytes += len(payload)
            if oid == count - 1:
                group.finish()
                group = None
                groups_done += 1
        t_last = time.perf_counter()
        if group is not None:  # stopped mid-group: close what was written
            group.finish()
        track.finish()
        # Give the last groups time to leave before the session closes under them.
        await _wait_any(stop.wait(), timeout=opts.linger)
        connection = _connection_stats(client.session)
        broadcast.close()
    duration = max(t_last - t_first, 1e-9)
    timings = {"import_ms": round(import_ms, 1), "connect_ms": round(connect_ms, 1)}
    if demand_ms is not None:
        timings["demand_ms"] = round(demand_ms, 1)
    summary = PublishSummary(
        event="summary", role="publish", ok=not errors and sent == len(plan), objects=sent,
        bytes=sent_bytes, groups=groups_done, duration_s=round(duration, 6),
        rate=round(sent / duration, 1) if sent else 0.0, max_lateness_us=max_late_ns // 1000,
        reason=reason, timings_ms=timings, connection=connection, errors=errors)
    _emit(asdict(summary))
    return 0 if summary.ok else 1


@dataclass
class SubscribeOptions:
    client: ClientOptions
    broadcast: str
    track: str
    expect_objects: int | None
    expect_groups: int | None
    duration: float
    priority: int
    max_age_ms: int
    from_group: int | None
    log_level: str | None


async def run_subscribe(opts: SubscribeOptions) -> int:
    moq_mod, import_ms = _import_moq(opts.log_level)
    stop = _stop_event()
    deadline = time.monotonic() + opts.duration
    verifier = TrackVerifier()
    complete = asyncio.Event()
    track_ended = False
    reason = "duration"
    connection: dict[str, int | None] = {}
    timings: dict[str, float] = {"import_ms": round(import_ms, 1)}

    def remaining() -> float:
        return max(0.0, deadline - time.monotonic())

    def check_complete() -> None:
        if opts.expect_objects is not None and verifier.received() >= opts.expect_objects:
            complete.set()

    async def read_group(group: Any) -> None:
        seq = group.sequence
        try:
            while (frame := await group.read_frame()) is not None:
                verifier.on_object(seq, frame.payload, time.time_ns())
                check_complete()
            verifier.on_group_end(seq)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a reset group stream: count it, keep the others going
            verifier.on_group_error(seq, _describe(exc))

    t0 = time.perf_counter()
    async with _Connection(moq_mod, opts.client) as client:
        timings["connect_ms"] = round((time.perf_counter() - t0) * 1000.0, 1)
        readers: set[asyncio.Task[None]] = set()
        try:
            t1 = time.perf_counter()
            announced = client.announced_broadcast(opts.broadcast)
            try:
                broadcast = await asyncio.wait_for(announced.available(), remaining())
            except asyncio.TimeoutError:
                announced.cancel()
                raise InteropError(f"broadcast {opts.broadcast!r} was not announced within "
                                   f"{opts.duration:g} s") from None
            timings["announce_ms"] = round((time.perf_counter() - t1) * 1000.0, 1)
            subscription = moq_mod.Subscription(priority=opts.priority,
                                                max_age_us=opts.max_age_ms * 1000,
                                                group_start=opts.from_group)
            consumer = await asyncio.wait_for(
                broadcast.subscribe_track(opts.track, subscription), remaining())

            async def receive() -> None:
                nonlocal track_ended
                while (group := await consumer.recv_group()) is not None:
                    verifier.on_group(group.sequence)
                    task = asyncio.create_task(read_group(group))
                    readers.add(task)
                    task.add_done_callback(readers.discard)
                track_ended = True
                # The track is over: let groups still being read drain.
                if readers:
                    await asyncio.wait(list(readers))

            _emit({"event": "subscribed", "broadcast": opts.broadcast, "track": opts.track})
            receiver = asyncio.create_task(receive())
            await _wait_any(receiver, complete.wait(), stop.wait(), timeout=remaining())
            if complete.is_set():
                reason = "complete"
            elif stop.is_set():
                reason = "signal"
            elif receiver.done() and not receiver.cancelled():
                if (exc := receiver.exception()) is not None:
                    reason = "error"
                    verifier.on_group_error(-1, f"track: {_describe(exc)}")
                else:
                    reason = "track_ended"
            connection = _connection_stats(client.session)
            consumer.cancel()
        finally:
            for task in list(readers):
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
    summary = verifier.summary(expect_objects=opts.expect_objects,
                               expect_groups=opts.expect_groups, track_ended=track_ended,
                               reason=reason)
    summary.timings_ms = timings
    summary.connection = connection
    _emit(asdict(summary))
    return 0 if summary.ok else 1


# --- CLI ---------------------------------------------------------------------------------------


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="moqt://host:port/path (raw QUIC)")
    p.add_argument("--broadcast", required=True, help="broadcast path (draft-14: namespace)")
    p.add_argument("--track", required=True, help="track name")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--tls-fingerprint", action="append", default=[], metavar="HEX",
                     help="pin the server certificate by SHA-256 (repeatable)")
    tls.add_argument("--insecure", action="store_true", help="skip TLS verification")
    p.add_argument("--tls-root", action="append", default=[], metavar="PEM",
                   help="trust this CA file instead of the system roots")
    p.add_argument("--connect-timeout", type=_positive_float, default=5.0, metavar="S")
    p.add_argument("--max-streams", type=int, default=None,
                   help="concurrent QUIC streams the peer may open (moq default 1024)")
    p.add_argument("--priority", type=int, default=None, help="track/subscriber priority 0-255")
    p.add_argument("--log-level", default="info",
                   help="Rust log level (error|warn|info|debug|trace|off); RUST_LOG overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m relay.interop.moq_rs",
                                     description="Drive moq-rs as relay, publisher, subscriber.")
    sub = parser.add_subparsers(dest="role", required=True)

    srv = sub.add_parser("server", help="moq-rs server as a fan-out, caching relay")
    srv.add_argument("--bind", required=True, metavar="HOST:PORT")
    srv.add_argument("--cert", action="append", default=[], metavar="PEM")
    srv.add_argument("--key", action="append", default=[], metavar="PEM")
    srv.add_argument("--hostname", action="append", default=[],
                     help="names for the generated self-signed certificate (default localhost)")
    srv.add_argument("--cache-bytes", type=int, default=None)
    srv.add_argument("--duration", type=_positive_float, default=None, metavar="S")
    srv.add_argument("--log-level", default="info")

    pub = sub.add_parser("publish", help="publish a synthetic, self-verifying track")
    _add_client_args(pub)
    pub.add_argument("--objects", type=int, required=True, help="total objects")
    pub.add_argument("--groups", type=int, default=1, help="groups the objects are split over")
    pub.add_argument("--size", type=int, default=1000, help=f"bytes per object (>= {HEADER_SIZE})")
    pub.add_argument("--rate", type=float, default=100.0, help="objects per second; 0 = unpaced")
    pub.add_argument("--first-group", type=int, default=0)
    pub.add_argument("--max-age-ms", type=int, default=None,
                     help="how long the publisher keeps groups for late subscribers")
    pub.add_argument("--wait-demand", type=_positive_float, default=None, metavar="S",
                     help="wait up to S seconds for a subscriber before the first object")
    pub.add_argument("--start-delay", type=float, default=0.0, metavar="S")
    pub.add_argument("--start-on-signal", action="store_true",
                     help="then wait for SIGUSR1 (bounded by --wait-demand) before the first "
                          "object: whoever started the subscribers says when they are all in")
    pub.add_argument("--linger", type=float, default=1.0, metavar="S",
                     help="keep the session after the last object so it can be delivered")

    rcv = sub.add_parser("subscribe", help="subscribe and verify every object")
    _add_client_args(rcv)
    rcv.add_argument("--expect-objects", type=int, default=None)
    rcv.add_argument("--expect-groups", type=int, default=None)
    rcv.add_argument("--duration", type=_positive_float, default=30.0, metavar="S",
                     help="give up (and judge what arrived) after S seconds")
    rcv.add_argument("--max-age-ms", type=int, default=60_000,
                     help="deliver groups up to this old (moq default 0 skips to the newest)")
    rcv.add_argument("--from-group", type=int, default=None, help="first group wanted")
    return parser


def _client_options(args: argparse.Namespace) -> ClientOptions:
    return ClientOptions(url=args.url, tls_fingerprints=args.tls_fingerprint,
                         insecure=args.insecure, tls_roots=args.tls_root,
                         connect_timeout=args.connect_timeout, max_streams=args.max_streams)


def _level(text: str) -> str | None:
    return None if text in ("", "off", "none") else text


def _runner(args: argparse.Namespace) -> Callable[[], Any]:
    if args.role == "server":
        if len(args.cert) != len(args.key):
            raise InteropError("give one --key per --cert (or neither, to generate a certificate)")
        return lambda: run_server(ServerOptions(
            bind=args.bind, certs=args.cert, keys=args.key,
            hostnames=args.hostname or ["localhost"], cache_bytes=args.cache_bytes,
            duration=args.duration, log_level=_level(args.log_level)))
    if args.role == "publish":
        check_plan(args.objects, args.groups, args.size)  # fail before connecting
        if args.start_on_signal and not args.wait_demand:
            raise InteropError("--start-on-signal needs --wait-demand (it bounds the wait)")
        return lambda: run_publish(PublishOptions(
            client=_client_options(args), broadcast=args.broadcast, track=args.track,
            objects=args.objects, groups=args.groups, size=args.size, rate=args.rate,
            first_group=args.first_group,
            priority=127 if args.priority is None else args.priority,
            max_age_ms=args.max_age_ms, wait_demand=args.wait_demand,
            start_delay=args.start_delay, linger=args.linger, log_level=_level(args.log_level),
            start_on_signal=args.start_on_signal))
    return lambda: run_subscribe(SubscribeOptions(
        client=_client_options(args), broadcast=args.broadcast, track=args.track,
        expect_objects=args.expect_objects, expect_groups=args.expect_groups,
        duration=args.duration, priority=0 if args.priority is None else args.priority,
        max_age_ms=args.max_age_ms, from_group=args.from_group,
        log_level=_level(args.log_level)))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # usage errors exit 2
    try:
        return asyncio.run(_runner(args)())
    except (InteropError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # moq.Error and friends: one line, not a traceback
        print(f"error: {_describe(exc)}", file=sys.stderr)
        return 1


def _describe(exc: BaseException) -> str:
    """moq.Error.Protocol prints as 'details=MoqProtocolError()': spell out what it carries."""
    details = getattr(exc, "details", None)
    if details is not None and hasattr(details, "message"):
        return (f"{type(exc).__name__}: {details.message} (code {details.code}, "
                f"{details.kind.name.lower()}, {details.scope.name.lower()} scope)")
    return f"{type(exc).__name__}: {exc}"


if __name__ == "__main__":
    sys.exit(main())
