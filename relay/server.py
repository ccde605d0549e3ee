"""`RelayServer`: the userspace MoQ relay, gluing `RelayCore` (sans-I/O relay logic) to the
aioquic adapter (`relay.moqt.quic`) and its per-connection `MoqtSession`s.

- Every QUIC connection (accepted, or the one dialled to `--upstream`) gets a session id (int)
  for the core. Session events become core calls; the core's actions are dispatched to the
  sessions (`_dispatch`), then every touched protocol is flushed once.
- Events are delivered synchronously by the adapter, possibly while we are dispatching (a
  flush may deliver the next event of another session): a queue plus a busy flag keeps the
  core strictly non-reentrant.
- SUBSCRIBE_NAMESPACE is answered here (OK for any prefix, including the empty one moq-rs
  sends), and every published namespace under a subscribed prefix is pushed to that session
  as PUBLISH_NAMESPACE (and PUBLISH_NAMESPACE_DONE when it goes away): moq-rs discovers
  broadcasts only that way.
- `SubscribeUpstream(publisher=None)` goes to the `--upstream` relay, dialled at start and
  again on demand if it went away; requests wait for it (failures answer SUBSCRIBE_ERROR).
- With the fast path (`relay.fastpath.runtime`), the core is mirrored into the kernel's maps
  after every control event, and each subscriber copy of an upstream stream the core opens
  is first offered to the kernel (`claim`): if the kernel already forwards it, the core's
  writes for that copy are dropped here (the runtime shadow-writes the upstream's bytes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
from collections import deque
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aioquic.quic.packet import QuicErrorCode

from crypto_backends import CryptoBackend
from relay.core.actions import (
    Action,
    CloseSession,
    OpenSubgroupStream,
    ResetStream,
    SendDatagram,
    SendFetchObjects,
    SendMessage,
    SetPriorityThreshold,
    SkipSubgroup,
    SubscribeUpstream,
    UnsubscribeUpstream,
    WriteStream,
)
from relay.core.priority import CongestionState
from relay.core.relay import RelayConfig, RelayCore
from relay.moqt.constants import SessionErrorCode, SubscribeErrorCode
from relay.moqt.data import SubgroupHeader, encode_fetch_object
from relay.moqt.messages import (
    FetchOk,
    PublishDone,
    PublishNamespace,
    PublishNamespaceOk,
    SubscribeError,
    TrackNamespace,
)
from relay.moqt.quic import MoqtProtocol, MoqtServer, TlsOptions, connect, serve, server_address
from relay.moqt.session import (
    FetchCancelled,
    FetchRequested,
    NamespaceDone,
    NamespacePublished,
    ObjectChunk,
    ObjectReceived,
    PublishDoneReceived,
    SessionClosed,
    SessionConfig,
    SessionReady,
    SessionState,
    SubgroupSender,
    SubgroupStreamClosed,
    SubgroupStreamOpened,
    SubscribeAccepted,
    SubscribeNamespaceRequested,
    SubscribeRejected,
    SubscribeRequested,
    UnsubscribeNamespaceReceived,
    UnsubscribeReceived,
)

if TYPE_CHECKING:
    from relay.fastpath.runtime import FastPathRuntime

logger = logging.getLogger(__name__)

SOCKET_BUFFER = 4 << 20
DONE_WAIT = 2.0
"""Seconds a PUBLISH_DONE waits for the data streams it counts."""


def _has_prefix(namespace: TrackNamespace, prefix: TrackNamespace) -> bool:
    return tuple(namespace[:len(prefix)]) == tuple(prefix)


@dataclass
class _Conn:
    sid: int
    protocol: MoqtProtocol
    upstream: bool = False
    ready: bool = False


class RelayServer:
    def __init__(self, config: RelayConfig | None = None, *, upstream_url: str | None = None,
                 upstream_tls: TlsOptions = TlsOptions(insecure=True),
                 connect_timeout: float = 5.0, queue_budget: int = 0,
                 crypto: CryptoBackend | None = None,
                 fastpath: FastPathRuntime | None = None) -> None:
        self.upstream_url = upstream_url
        #: The kernel fast path (None: every packet goes through userspace).
        self.fastpath = fastpath
        self._kernel_streams: dict[tuple[int, int], int] = {}
        """(subscriber session, core stream handle) -> subscriber stream id the kernel sends."""
        self._fastpath_dirty = False
        #: 1-RTT protection of every connection, downstream and upstream (None: standard QUIC).
        self.crypto = crypto
        self.queue_budget = queue_budget
        """Bytes queued per subscriber connection at which the skip policy's load is 100 %;
        0 = congestion is not reported to the core (nothing is ever skipped)."""
        self.upstream_tls = upstream_tls
        self.connect_timeout = connect_timeout
        if config is None:
            config = RelayConfig(upstream_relay=upstream_url is not None)
        self.core = RelayCore(config)
        self.server: MoqtServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conns: dict[int, _Conn] = {}
        self._by_protocol: dict[int, _Conn] = {}  # id(protocol) -> conn
        self._next_sid = 1
        self._senders: dict[tuple[int, int], SubgroupSender] = {}
        self._upstream_req: dict[int, tuple[int, int]] = {}  # upstream_id -> (sid, request id)
        self._upstream_ids: dict[tuple[int, int], int] = {}  # (sid, request id) -> upstream_id
        self._pending_fetch_ok: dict[tuple[int, int], FetchOk] = {}
        self._skip_streams: dict[tuple[int, int], int] = {}
        # Upstream data streams per (sid, request id), so a PUBLISH_DONE that overtook its
        # data streams on the control stream waits for them (the core forgets the track).
        self._up_open: dict[tuple[int, int], set[int]] = {}
        self._up_closed: dict[tuple[int, int], int] = {}
        self._pending_done: dict[tuple[int, int], tuple[PublishDoneReceived, float]] = {}
        # SUBSCRIBE_NAMESPACE bookkeeping: sid -> prefixes; sid -> namespaces pushed to it.
        self._ns_subs: dict[int, list[TrackNamespace]] = {}
        self._ns_pushed: dict[int, set[TrackNamespace]] = {}
        self._upstream_ns: set[TrackNamespace] = set()
        """Namespaces the upstream relay announced to us (we SUBSCRIBE_NAMESPACE there)."""
        # The upstream relay connection.
        self._upstream: _Conn | None = None
        self._upstream_task: asyncio.Task[None] | None = None
        self._upstream_waiting: list[SubscribeUpstream] = []
        self._upstream_stop: asyncio.Event | None = None
        self.upstream_error: str | None = None
        # Event queue (non-reentrant core), dirty protocols, timer.
        self._queue: deque[tuple[MoqtProtocol, Any]] = deque()
        self._busy = False
        self._dirty: dict[int, MoqtProtocol] = {}
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._stopped = False
        self.sessions_total = 0
        #: Sessions this relay closed because of what the peer sent, by error code name.
        self.sessions_failed: dict[str, int] = {}
        #: Connections a stateless reset from the peer ended (RFC 9000 §10.3: it lost its state).
        self.stateless_resets = 0

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, host: str, port: int, cert: str | os.PathLike[str],
                    key: str | os.PathLike[str]) -> tuple[str, int]:
        self._loop = asyncio.get_running_loop()
        if self.crypto is not None:  # e.g. soft: load and attach the kernel shim
            self.crypto.start()
        self.server = await serve(host, port, cert, key, self._on_new_connection,
                                  session_config=SessionConfig(is_client=False,
                                                               deliver_chunks=True),
                                  on_event=self._on_event, crypto=self.crypto)
        sock = self.server._transport.get_extra_info("socket")
        if sock is not None:  # one socket carries every session: room for bursts
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
                except OSError:
                    pass
        if self.upstream_url is not None:
            self._ensure_upstream()
        if self.fastpath is not None:
            self.fastpath.source = lambda: (list(self.core.registry.tracks.values()),
                                            self._protocol_of)
            if self.queue_budget > 0:
                # The kernel decides at each new stream's offset 0: keep thresholds fresh
                # between upstream streams too, not only when userspace sees one open.
                self.fastpath.on_records = lambda: self._busy_call(
                    lambda: self._report_congestion(self._now()))
            self.fastpath.start(self._loop)
        return server_address(self.server)

    async def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for conn in list(self._conns.values()):
            if not conn.upstream:
                try:
                    conn.protocol.close_session()
                except Exception:  # pragma: no cover - best effort at exit
                    logger.exception("closing session %d", conn.sid)
        if self._upstream_stop is not None:
            self._upstream_stop.set()
        if self._upstream_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._upstream_task), 2.0)
            except (asyncio.TimeoutError, Exception):
                self._upstream_task.cancel()
        await asyncio.sleep(0.05)  # let the CONNECTION_CLOSE frames leave
        if self.server is not None:
            self.server.close()
        if self.crypto is not None:
            self.crypto.close()

    def stats(self) -> dict[str, Any]:
        """A JSON-ready snapshot: sessions, tracks, subscriptions and the core's counters."""
        registry = self.core.registry
        return {
            "sessions": len([c for c in self._conns.values() if not c.upstream]),
            "sessions_total": self.sessions_total,
            "sessions_failed": dict(self.sessions_failed),
            "stateless_resets": self.stateless_resets,
            "upstream": (None if self.upstream_url is None else
                         {"url": self.upstream_url, "connected": self._upstream is not None
                          and self._upstream.ready, "error": self.upstream_error}),
            "namespaces": sorted("/".join(p.decode(errors="replace") for p in ns)
                                 for ns in registry.namespaces),
            "tracks": len(registry.tracks),
            "subscriptions": len(registry.subscriptions),
            "open_streams": len(self._senders),
            # Forwarded OBJECT_DATAGRAMs too big for a subscriber's path (draft-14: dropped).
            "datagrams_dropped": sum(c.protocol.datagrams_dropped for c in self._conns.values()),
            "kernel_streams": len(self._kernel_streams),
            "fastpath": self.fastpath.stats() if self.fastpath is not None else {"enabled": False},
            "counters": self.core.counters.as_dict(),
            "crypto": None if self.crypto is None else self.crypto.stats(),
        }

    # -- connections -----------------------------------------------------------------------

    def _on_new_connection(self, protocol: MoqtProtocol) -> None:
        self._conn_for(protocol)

    def _conn_for(self, protocol: MoqtProtocol) -> _Conn:
        conn = self._by_protocol.get(id(protocol))
        if conn is None:
            conn = _Conn(self._next_sid, protocol, upstream=protocol.session.is_client)
            self._next_sid += 1
            self._conns[conn.sid] = conn
            self._by_protocol[id(protocol)] = conn
            if not conn.upstream:
                self.sessions_total += 1
        return conn

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    # -- events in -------------------------------------------------------------------------

    def _on_event(self, protocol: MoqtProtocol, event: Any) -> None:
        self._queue.append((protocol, event))
        if self._busy:
            return
        self._busy = True
        try:
            while self._queue:
                p, e = self._queue.popleft()
                try:
                    self._handle(p, e)
                except Exception:
                    logger.exception("relay failed handling %s", type(e).__name__)
            self._sync_fastpath()
        finally:
            self._busy = False
        self._schedule_flush()
        self._arm_timer()

    def _schedule_flush(self) -> None:
        """Flush the touched protocols once, after the datagram being processed: one
        transmit per subscriber per incoming datagram, not one per session event."""
        if self._dirty and not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._deferred_flush)

    def _deferred_flush(self) -> None:
        self._flush_scheduled = False
        self._flush()

    def _flush(self) -> None:
        while self._dirty:
            _, protocol = self._dirty.popitem()
            try:
                protocol.flush()
            except Exception:  # pragma: no cover - a dead transport
                logger.exception("flush failed")

    def _touch(self, conn: _Conn) -> None:
        self._dirty[id(conn.protocol)] = conn.protocol

    def _handle(self, protocol: MoqtProtocol, event: Any) -> None:
        conn = self._conn_for(protocol)
        sid, core, now = conn.sid, self.core, self._now()
        actions: list[Action] = []
        if not isinstance(event, (ObjectChunk, ObjectReceived, SubgroupStreamOpened,
                                  SubgroupStreamClosed)):
            self._fastpath_dirty = True  # tracks or subscriptions may have changed
        if isinstance(event, SessionReady):
            conn.ready = True
            if conn.upstream:
                self._upstream_ready(conn)
            else:
                actions = core.session_open(sid, event.peer_parameters, now)
        elif isinstance(event, SessionClosed):
            if not event.by_peer and event.error_code != SessionErrorCode.NO_ERROR:
                # We closed it on the peer's bytes (malformed message, violation): count it.
                # A QUIC transport close carries a transport code (RFC 9000 §20.1), not a
                # MoQ one: TRANSPORT_PARAMETER_ERROR (0x8) is not INVALID_PATH (0x8).
                codes = QuicErrorCode if event.quic_error else SessionErrorCode
                try:
                    name = ("QUIC " if event.quic_error else "") + codes(event.error_code).name
                except ValueError:
                    name = f"{'QUIC ' if event.quic_error else ''}code {event.error_code:#x}"
                self.sessions_failed[name] = self.sessions_failed.get(name, 0) + 1
            if getattr(protocol._quic, "stateless_reset_received", False):
                self.stateless_resets += 1
            actions = self._session_gone(conn, now)
        elif isinstance(event, ObjectChunk):
            if event.start:
                actions = core.object_header(sid, event.stream_id, event.header, now)
            if event.header.payload_length > 0:
                actions += core.object_payload(sid, event.stream_id, event.data, event.end, now)
        elif isinstance(event, ObjectReceived) and event.datagram is not None:
            actions = core.object_datagram(sid, event.datagram, now)
        elif isinstance(event, SubgroupStreamOpened):
            if isinstance(event.header, SubgroupHeader):
                self._up_open.setdefault((sid, event.request_id), set()).add(event.stream_id)
                if self.queue_budget > 0:
                    self._report_congestion(now)
                actions = core.subgroup_stream_opened(sid, event.stream_id, event.header, now)
        elif isinstance(event, SubgroupStreamClosed):
            if isinstance(event.header, SubgroupHeader):
                key = (sid, event.request_id)
                if self.fastpath is not None and event.reset_code is not None:
                    self.fastpath.upstream_ended(sid, event.stream_id)
                self._up_open.get(key, set()).discard(event.stream_id)
                self._up_closed[key] = self._up_closed.get(key, 0) + 1
                actions = core.subgroup_stream_ended(sid, event.stream_id, now,
                                                     reset_code=event.reset_code)
                if key in self._pending_done:
                    self._dispatch(actions)
                    actions = self._check_done(key, now)
        elif isinstance(event, SubscribeRequested):
            actions = core.subscribe(sid, event.message, now)
        elif isinstance(event, UnsubscribeReceived):
            actions = core.unsubscribe(sid, event.request_id, now)
        elif isinstance(event, FetchRequested):
            actions = core.fetch(sid, event.message, now)
        elif isinstance(event, FetchCancelled):
            actions = core.fetch_cancel(sid, event.request_id, now)
        elif isinstance(event, SubscribeAccepted):
            upstream_id = self._upstream_ids.get((sid, event.request_id))
            if upstream_id is not None:
                actions = core.upstream_subscribe_ok(upstream_id, sid, event.message, now)
        elif isinstance(event, SubscribeRejected):
            upstream_id = self._upstream_ids.pop((sid, event.request_id), None)
            if upstream_id is not None:
                self._upstream_req.pop(upstream_id, None)
                actions = core.upstream_subscribe_error(
                    upstream_id, SubscribeError(event.request_id, event.error_code,
                                                event.reason_phrase), now)
        elif isinstance(event, PublishDoneReceived):
            key = (sid, event.request_id)
            if key in self._upstream_ids:
                self._pending_done[key] = (event, now + DONE_WAIT)
                actions = self._check_done(key, now)
        elif isinstance(event, NamespacePublished) and conn.upstream:
            conn.protocol.session.accept_publish_namespace(event.request_id)
            self._touch(conn)
            self._upstream_ns.add(tuple(event.namespace))
            self._push_namespace(tuple(event.namespace), exclude=sid)
        elif isinstance(event, NamespaceDone) and conn.upstream:
            self._upstream_ns.discard(tuple(event.namespace))
            self._sync_namespaces()
        elif isinstance(event, NamespacePublished):
            actions = core.publish_namespace(
                sid, PublishNamespace(event.request_id, event.namespace, event.parameters), now)
            if any(isinstance(a, SendMessage) and isinstance(a.message, PublishNamespaceOk)
                   for a in actions):
                self._dispatch(actions)
                actions = []
                self._push_namespace(event.namespace, exclude=sid)
        elif isinstance(event, NamespaceDone):
            actions = core.publish_namespace_done(sid, event.namespace, now)
            self._sync_namespaces()
        elif isinstance(event, SubscribeNamespaceRequested):
            conn.protocol.session.accept_subscribe_namespace(event.request_id)
            self._touch(conn)
            self._ns_subs.setdefault(sid, []).append(tuple(event.prefix))
            for ns in list(core.registry.namespaces) + sorted(self._upstream_ns):
                if _has_prefix(ns, event.prefix) and sid not in self._publishers_of(ns):
                    self._announce(conn, ns)
        elif isinstance(event, UnsubscribeNamespaceReceived):
            prefixes = self._ns_subs.get(sid, [])
            if tuple(event.prefix) in prefixes:
                prefixes.remove(tuple(event.prefix))
        self._dispatch(actions)

    def _sync_fastpath(self) -> None:
        if self.fastpath is None or not self._fastpath_dirty:
            return
        self._fastpath_dirty = False
        try:
            self.fastpath.reconcile(list(self.core.registry.tracks.values()), self._protocol_of)
        except Exception:
            logger.exception("fast path reconcile failed")

    def _protocol_of(self, sid: int) -> MoqtProtocol | None:
        conn = self._conns.get(sid)
        return conn.protocol if conn is not None and conn.ready else None

    def _report_congestion(self, now: float) -> None:
        """Each subscriber connection's load, just before the core decides (once, at the
        start of a subgroup) whether to forward it."""
        for conn in list(self._conns.values()):
            if conn.upstream or not conn.ready:
                continue
            quic = conn.protocol._quic
            queued = sum(r.stop - r.start for stream in quic._streams.values()
                         for r in stream.sender._pending)
            state = CongestionState(quic._loss.bytes_in_flight, quic._loss.congestion_window,
                                    queued, self.queue_budget)
            self._dispatch(self.core.congestion(conn.sid, state, now))

    def _check_done(self, key: tuple[int, int], now: float) -> list[Action]:
        """Pass a held PUBLISH_DONE on once its data streams ended (or it waited long enough)."""
        event, deadline = self._pending_done[key]
        if now < deadline and (self._up_open.get(key) or
                               self._up_closed.get(key, 0) < event.stream_count):
            return []
        del self._pending_done[key]
        self._up_open.pop(key, None)
        self._up_closed.pop(key, None)
        upstream_id = self._upstream_ids.pop(key, None)
        if upstream_id is None:
            return []
        self._upstream_req.pop(upstream_id, None)
        return self.core.upstream_publish_done(
            upstream_id, PublishDone(event.request_id, event.status_code, event.stream_count,
                                     event.reason_phrase), now)

    def _session_gone(self, conn: _Conn, now: float) -> list[Action]:
        sid = conn.sid
        # A PUBLISH_DONE still waiting for its streams keeps its status (TRACK_ENDED, ...)
        # rather than the GOING_AWAY the core would send for the vanished session.
        for key in [k for k in self._pending_done if k[0] == sid]:
            event, _ = self._pending_done[key]
            self._pending_done[key] = (event, now)
            self._dispatch(self._check_done(key, now))
        self._conns.pop(sid, None)
        self._by_protocol.pop(id(conn.protocol), None)
        self._dirty.pop(id(conn.protocol), None)
        for key in [k for k in self._senders if k[0] == sid]:
            del self._senders[key]
        for key in [k for k in self._kernel_streams if k[0] == sid]:
            del self._kernel_streams[key]
        if self.fastpath is not None:
            self.fastpath.session_gone(sid)
        self._ns_subs.pop(sid, None)
        self._ns_pushed.pop(sid, None)
        for key in [k for k in self._pending_fetch_ok if k[0] == sid]:
            del self._pending_fetch_ok[key]
        for key in [k for k in self._skip_streams if k[0] == sid]:
            del self._skip_streams[key]
        for key in [k for k in self._upstream_ids if k[0] == sid]:
            self._upstream_req.pop(self._upstream_ids.pop(key), None)
        for table in (self._up_open, self._up_closed, self._pending_done):
            for key in [k for k in table if k[0] == sid]:
                del table[key]
        if conn.upstream and self._upstream is conn:
            self._upstream = None
            self._upstream_ns.clear()
        actions = self.core.session_closed(sid, now)
        self._sync_namespaces()
        return actions

    # -- namespaces ------------------------------------------------------------------------

    def _publishers_of(self, ns: TrackNamespace) -> list[int]:
        owner = self.core.registry.namespaces.get(ns)
        return list(owner.sessions) if owner is not None else []

    def _announce(self, conn: _Conn, ns: TrackNamespace) -> None:
        pushed = self._ns_pushed.setdefault(conn.sid, set())
        if ns in pushed or conn.protocol.session.state != SessionState.READY \
                or not self.core.may_discover(conn.sid, ns):
            return
        pushed.add(ns)
        conn.protocol.session.publish_namespace(ns)
        self._touch(conn)

    def _push_namespace(self, ns: TrackNamespace, exclude: int) -> None:
        for sid, prefixes in self._ns_subs.items():
            conn = self._conns.get(sid)
            if conn is None or sid == exclude:
                continue
            if any(_has_prefix(ns, p) for p in prefixes):
                self._announce(conn, ns)

    def _sync_namespaces(self) -> None:
        """PUBLISH_NAMESPACE_DONE for pushed namespaces nobody publishes any more."""
        active = set(self.core.registry.namespaces) | self._upstream_ns
        for sid, pushed in self._ns_pushed.items():
            conn = self._conns.get(sid)
            for ns in [n for n in pushed if n not in active]:
                pushed.discard(ns)
                if conn is not None and conn.protocol.session.state == SessionState.READY:
                    conn.protocol.session.publish_namespace_done(ns)
                    self._touch(conn)

    # -- actions out -----------------------------------------------------------------------

    def _dispatch(self, actions: list[Action]) -> None:
        for action in actions:
            try:
                self._apply(action)
            except Exception:
                logger.exception("relay action %s failed", type(action).__name__)

    def _apply(self, action: Action) -> None:
        if isinstance(action, SubscribeUpstream):
            self._subscribe_upstream(action)
            return
        if isinstance(action, UnsubscribeUpstream):
            where = self._upstream_req.pop(action.upstream_id, None)
            self._upstream_waiting = [a for a in self._upstream_waiting
                                      if a.upstream_id != action.upstream_id]
            if where is not None:
                self._upstream_ids.pop(where, None)
                conn = self._conns.get(where[0])
                if conn is not None and conn.protocol.session.state == SessionState.READY:
                    try:
                        conn.protocol.session.unsubscribe(where[1])
                    except KeyError:
                        pass
                    self._touch(conn)
            return
        if isinstance(action, SetPriorityThreshold):
            if self.fastpath is not None:
                self.fastpath.set_threshold(action.session, action.threshold)
            return
        if isinstance(action, SkipSubgroup):
            if self.fastpath is not None and action.upstream is not None and \
                    self.fastpath.claim(action.session, action.upstream) is not None:
                # The kernel saw the stream under the old threshold: it forwards it. The
                # core counted a skip and no stream: take the skip back, and count the
                # stream for PUBLISH_DONE like a skip-signal stream (a stream_count short
                # of what was sent lets the subscriber stop before the stream ends).
                self.core.counters.unskip(action.session, action.reason)
                key = (action.session, action.request_id)
                self._skip_streams[key] = self._skip_streams.get(key, 0) + 1
                return
            self._signal_skip(action)
            return
        conn = self._conns.get(action.session)
        if conn is None:
            return
        if self._kernel_sends(action):
            return  # the kernel sends this copy: nothing to flush for it (no transmit)
        session = conn.protocol.session
        self._touch(conn)
        if isinstance(action, SendMessage):
            msg = action.message
            if isinstance(msg, PublishDone):  # count the skip-signal streams too
                extra = self._skip_streams.pop((action.session, msg.request_id), 0)
                if extra:
                    msg = dataclasses.replace(msg, stream_count=msg.stream_count + extra)
            if isinstance(msg, FetchOk):
                # The core follows it with SendFetchObjects: FETCH_OK and the stream together.
                self._pending_fetch_ok[(action.session, msg.request_id)] = msg
                return
            session.send(msg)
        elif isinstance(action, OpenSubgroupStream):
            h = action.header
            sender = session.open_subgroup(action.request_id, h.group_id, h.subgroup_id,
                                           h.publisher_priority, header=h)
            self._senders[(action.session, action.stream)] = sender
        elif isinstance(action, WriteStream):
            sender = self._senders.get((action.session, action.stream))
            if sender is not None:
                sender.write_raw(action.data, action.fin)
                if action.fin:
                    del self._senders[(action.session, action.stream)]
        elif isinstance(action, ResetStream):
            kernel_stream = self._kernel_streams.pop((action.session, action.stream), None)
            if kernel_stream is not None and self.fastpath is not None:
                self.fastpath.reset(action.session, kernel_stream, action.error_code)
                return
            sender = self._senders.pop((action.session, action.stream), None)
            if sender is not None:
                sender.reset(action.error_code)
        elif isinstance(action, SendFetchObjects):
            ok = self._pending_fetch_ok.pop((action.session, action.request_id), None)
            if ok is None:
                return
            session.accept_fetch(ok, b"".join(encode_fetch_object(o) for o in action.objects))
        elif isinstance(action, SendDatagram):
            session.forward_datagram(action.request_id, action.datagram)
        elif isinstance(action, CloseSession):
            session.close(action.error_code, action.reason)

    def _kernel_sends(self, action: Action) -> bool:
        """Whether `action` is a subscriber copy the kernel sends (claimed now, or earlier):
        then userspace has nothing to write or transmit for it."""
        if isinstance(action, OpenSubgroupStream):
            if self.fastpath is None or not action.fast_path:
                return False
            stream_id = self.fastpath.claim(action.session, action.upstream)
            if stream_id is None:
                return False
            self._kernel_streams[(action.session, action.stream)] = stream_id
            return True
        if isinstance(action, WriteStream):
            key = (action.session, action.stream)
            if key not in self._kernel_streams:
                return False
            if action.fin:
                del self._kernel_streams[key]
            return True
        if isinstance(action, SendDatagram):
            # the kernel clones the DATAGRAM frames of a track it forwards to this subscriber
            return self.fastpath is not None and self.fastpath.forwards_track(
                action.session, action.publisher, action.datagram.track_alias)
        return False

    def _signal_skip(self, a: SkipSubgroup) -> None:
        """Tell the subscriber the subgroup was skipped on purpose: a stream with just its
        header, reset with DELIVERY_TIMEOUT once the header is acknowledged."""
        conn = self._conns.get(a.session)
        if conn is None:
            return
        session = conn.protocol.session
        alias = session.publication_alias(a.request_id)
        if alias is None:
            return
        subgroup_id = 0 if a.subgroup_id is None else a.subgroup_id
        header = SubgroupHeader.new(alias, a.group_id, a.publisher_priority, subgroup_id,
                                    explicit_subgroup_id=subgroup_id != 0)
        session.open_subgroup(a.request_id, a.group_id, subgroup_id, a.publisher_priority,
                              header=header).skip()
        key = (a.session, a.request_id)
        self._skip_streams[key] = self._skip_streams.get(key, 0) + 1
        self._touch(conn)

    def _subscribe_upstream(self, a: SubscribeUpstream) -> None:
        if a.publisher is None:
            up = self._upstream
            if up is None or not up.ready:
                self._upstream_waiting.append(a)
                self._ensure_upstream()
                return
            conn = up
        else:
            conn = self._conns.get(a.publisher)
            if conn is None:
                self._fail_upstream(a, "Publisher is gone")
                return
        rid = conn.protocol.session.subscribe(
            a.track_namespace, a.track_name, subscriber_priority=a.subscriber_priority,
            group_order=a.group_order, forward=a.forward, filter_type=a.filter_type)
        self._upstream_req[a.upstream_id] = (conn.sid, rid)
        self._upstream_ids[(conn.sid, rid)] = a.upstream_id
        self._touch(conn)

    def _fail_upstream(self, a: SubscribeUpstream, reason: str) -> None:
        actions = self.core.upstream_subscribe_error(
            a.upstream_id, SubscribeError(0, SubscribeErrorCode.TRACK_DOES_NOT_EXIST, reason),
            self._now())
        self._dispatch(actions)

    # -- the upstream relay ----------------------------------------------------------------

    def _ensure_upstream(self) -> None:
        if self.upstream_url is None or self._stopped:
            return
        if self._upstream_task is not None and not self._upstream_task.done():
            return
        assert self._loop is not None
        self._upstream_stop = asyncio.Event()
        self._upstream_task = self._loop.create_task(self._run_upstream(self._upstream_stop))

    async def _run_upstream(self, stop: asyncio.Event) -> None:
        assert self.upstream_url is not None
        try:
            async with AsyncExitStack() as stack:
                protocol = await stack.enter_async_context(connect(
                    self.upstream_url, tls=self.upstream_tls, timeout=self.connect_timeout,
                    session_config=_client_config(self.upstream_url),
                    on_event=self._on_event, crypto=self.crypto))
                self.upstream_error = None
                conn = self._conn_for(protocol)
                if not conn.ready:  # SessionReady arrived before connect() returned
                    conn.ready = True
                    self._busy_call(lambda: self._upstream_ready(conn))
                closed = asyncio.ensure_future(protocol.wait_closed())
                stopping = asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait({closed, stopping}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    closed.cancel()
                    stopping.cancel()
        except Exception as exc:
            self.upstream_error = str(exc) or type(exc).__name__
            logger.warning("upstream %s: %s", self.upstream_url, self.upstream_error)
        finally:
            waiting, self._upstream_waiting = self._upstream_waiting, []
            self._busy_call(lambda: [self._fail_upstream(a, "Upstream relay unavailable")
                                     for a in waiting])

    def _busy_call(self, fn: Callable[[], object]) -> None:
        """Run `fn` (which calls the core) unless an event is being handled right now."""
        if self._busy:
            assert self._loop is not None
            self._loop.call_soon(self._busy_call, fn)
            return
        self._busy = True
        try:
            fn()
            self._flush()
        finally:
            self._busy = False

    def _upstream_ready(self, conn: _Conn) -> None:
        self._upstream = conn
        # Learn what the upstream serves, to pass on to our SUBSCRIBE_NAMESPACE sessions.
        conn.protocol.session.subscribe_namespace(())
        self._touch(conn)
        waiting, self._upstream_waiting = self._upstream_waiting, []
        for a in waiting:
            self._subscribe_upstream(a)

    # -- timer -----------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        if self._loop is None or self._stopped:
            return
        deadlines = [d for _, d in self._pending_done.values()]
        core_deadline = self.core.next_deadline()
        if core_deadline is not None:
            deadlines.append(core_deadline)
        deadline = min(deadlines, default=None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._busy:
            self._arm_timer()
            return
        def poll() -> None:
            now = self._now()
            self._dispatch(self.core.poll(now))
            for key in [k for k, (_, d) in self._pending_done.items() if d <= now]:
                self._dispatch(self._check_done(key, now))

        self._busy_call(poll)
        self._arm_timer()


def _client_config(url: str) -> SessionConfig:
    from relay.moqt.quic import parse_url

    target = parse_url(url)
    return SessionConfig(is_client=True, path=target.path, authority=target.authority,
                         deliver_chunks=True)
