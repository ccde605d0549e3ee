"""The fast path inside the relay: programs attached, connections handed over, records applied.

`RelayServer` owns one `FastPathRuntime` when `--fastpath` is on. The server stays the
userspace relay it always was; the runtime tells it which subscriber copies of which
upstream streams the kernel sends (`claim`), and keeps every offloaded connection coherent:

- `reconcile` mirrors the relay core's tracks and subscriptions into the maps: a publisher
  connection becomes an upstream (its CIDs in fr_cids, its forwarded track aliases in
  fr_tracks) and a subscriber connection hands packet numbering and stream ids to the kernel
  (fr_subs, fr_peers) the first time one of its subscriptions can be forwarded; each such
  subscription is an fr_sub_tracks entry starting at the subscriber's first live group.
- Ring records (drained every `tick` seconds in the event loop) become registrations
  (`register_forwarded`, `on_wire_number`), shadow writes of the upstream's bytes
  (`relay.fastpath.shadow`), and resends of punted ranges.
- Credit, congestion window, bytes in flight and the largest acknowledged packet go back
  into fr_subs on every tick (only what changed); the skip threshold when the core changes
  it; connection-id changes when the connection reports them.
- A connection that leaves takes all its entries with it; streams' entries go once the
  stream ended and lingered (a late publisher retransmission of offset 0 must not start a
  second copy).
"""

from __future__ import annotations

import asyncio
import cProfile
import enum
import ipaddress
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aioquic import tls
from aioquic.quic.connection import QuicConnection

from crypto_backends.base import AEAD_TAG_SIZE, Direction
from relay import bpfload
from relay.errors import FastrelayError
from relay.fastpath import layout as L
from relay.fastpath.controller import (
    FastPathController,
    KernelView,
    Punt,
    Subscriber,
    SubscriberPath,
    Upstream,
    congestion_writes,
)
from relay.fastpath.loader import FastPath
from relay.fastpath.reasons import Reason
from relay.fastpath.route import relay_interfaces, resolve
from relay.fastpath.shadow import ShadowStreams, ShadowWrite, UpstreamKey
from relay.quic.connection import FastrelayQuicConnection
from relay.quic.crypto import OneRttMode
from relay.quic.fastpath import (
    CongestionChanged,
    CreditChanged,
    FastPathEvent,
    ForwardedPacket,
    HostConnectionIdIssued,
    HostConnectionIdRetired,
    PeerAddressChanged,
    PeerConnectionIdChanged,
    StreamCreditChanged,
    WireNumber,
)

logger = logging.getLogger(__name__)

STREAM_LINGER = 3.0
"""Seconds an ended upstream stream keeps its entries (publisher retransmissions)."""
TICK = 0.002
IDLE_TICK = 0.25
"""Without records the tick backs off (doubling) to this, and snaps back at the next one.
What needs the tick sooner wakes it (`_wake`): records (the ring buffer's fd is watched in
the event loop), state to push (an ACK freed window), data to send, a hand-over to retry.
The idle tick is housekeeping (expiring streams, the full push) and a safety net."""
RETRY_TICK = 0.02
"""A hand-over that had to wait is tried again this soon."""
FULL_PUSH_INTERVAL = 1.0
"""Seconds between state pushes that look at every subscriber, not only those whose state
changed (records applied, congestion reported): a safety net, cheap at this pace."""
PROFILE_ENV = "FASTRELAY_PROFILE"
"""Opt-in: a path prefix; the relay process is profiled (cProfile) from `start` to `close`
and the profile written to <prefix>.<pid>.prof (for measuring the catch-up, never on by default)."""
KEY_UPDATE_PING = 0x6B75
"""PING uid of the packet that carries a relay-initiated key update."""
HASH_MAPS = ("fr_cids", "fr_peers", "fr_tracks", "fr_sub_tracks", "fr_up_streams", "fr_sub_streams")
"""The maps whose entries come and go with connections and streams (`stats` counts them)."""


FASTPATH_CRYPTO = ("none", "soft")
"""`--crypto` backends the fast path works with: plaintext 1-RTT (none), or 1-RTT the soft
shim protects around it (bpf/structs.h, skb verdict contract)."""


def rearm_timer(protocol: Any) -> None:
    """What aioquic's `QuicConnectionProtocol.transmit` does after sending, without building
    packets: packets registered from records moved the loss (PTO) and idle timers, and
    nothing needs sending. A timer that fires earlier than needed stays: aioquic's timer
    handler does what is due then and re-arms."""
    timer_at = protocol._quic.get_timer()
    if timer_at is None:
        return
    if protocol._timer is not None:
        if protocol._timer_at is not None and protocol._timer_at <= timer_at:
            return
        protocol._timer.cancel()
    protocol._timer = protocol._loop.call_at(timer_at, protocol._handle_timer)
    protocol._timer_at = timer_at


class FastPathMode(str, enum.Enum):
    AUTO = "auto"
    ON = "on"
    OFF = "off"


def unavailable_reason(crypto: str | None, listen_host: str = "0.0.0.0") -> str | None:
    """Why the fast path cannot run for a relay with this `--crypto` and listening address
    here (None: it can)."""
    try:
        if ipaddress.ip_address(listen_host).is_loopback:
            return f"listening on {listen_host} (loopback): there is no interface to attach to"
    except ValueError:
        pass  # a host name: decided by the interfaces found
    if crypto not in FASTPATH_CRYPTO:
        what = "standard QUIC" if crypto is None else f"--crypto {crypto}"
        return (f"{what} is protected in userspace; the fast path needs --crypto "
                + " or ".join(FASTPATH_CRYPTO))
    try:
        bpfload.require_root("the fast path")
        bpfload.import_bcc()
    except FastrelayError as exc:
        return str(exc)
    return None


@dataclass
class _Sub:
    session: int
    protocol: Any
    handle: Subscriber
    peer: tuple[str, int]
    #: userspace's own new stream bytes already counted in the kernel's data_used
    own_bytes_pushed: int = 0
    #: fr_subs' congestion fields as the kernel has them (what was stored, plus its own adds)
    view: KernelView = field(default_factory=KernelView)

    @property
    def quic(self) -> FastrelayQuicConnection:
        return self.protocol._quic


@dataclass
class _Up:
    session: int
    protocol: Any
    handle: Upstream
    cids: set[bytes] = field(default_factory=set)


#: Why a subscriber named by `--userspace-peer` is not offloaded (its key in stats "refused").
USERSPACE_PEER_REASON = "kept on the userspace path (--userspace-peer)"


def canonical_address(host: str) -> str:
    """One spelling per address: an IPv4-mapped IPv6 address (as a dual-stack socket reports
    IPv4 peers) becomes the IPv4 address; anything unparsable is returned as given."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def start_group(start_group_id: int, start_object_id: int) -> int:
    """The first group a subscriber gets whole from its first byte (a subscription starting
    mid-group gets the rest of that group from the relay)."""
    return start_group_id if start_object_id == 0 else start_group_id + 1


class FastPathRuntime:
    def __init__(self, fastpath: FastPath, *, port: int, interfaces: list[tuple[int, str]],
                 host_cid_len: int = 8, tick: float = TICK,
                 stream_linger: float = STREAM_LINGER) -> None:
        self.fp = fastpath
        self.port = port
        self.interfaces = interfaces
        self.tick = tick
        self._interval = tick
        self.stream_linger = stream_linger
        self.controller = FastPathController(fastpath, host_cid_len, fastpath.caps)
        self.shadow = ShadowStreams(alias_of=self._subscriber_alias)
        self._subs: dict[int, _Sub] = {}
        self._ups: dict[int, _Up] = {}
        self._by_sub_idx: dict[int, _Sub] = {}
        self._by_up_idx: dict[int, _Up] = {}
        self._refused: dict[int, str] = {}
        self._tracks: set[tuple[int, int]] = set()
        #: (subscriber session, publisher session, upstream alias) -> (start group, its alias)
        self._sub_tracks: dict[tuple[int, int, int], tuple[int, int]] = {}
        self._thresholds: dict[int, int] = {}
        #: protocols that must transmit at the end of the tick (data to send), and those
        #: whose timer only needs a look (packets registered: loss timer, idle timer)
        self._touched: dict[int, Any] = {}
        self._armed: dict[int, Any] = {}
        #: subscribers whose state may have changed since the last push (by session)
        self._dirty: dict[int, _Sub] = {}
        self._last_full_push = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._ring_fd: int | None = None
        self._watching = False
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Where `reconcile` gets the core's tracks again when a hand-over had to wait
        #: (the relay sets it): (tracks, protocol_of).
        self.source: Callable[[], tuple[Iterable[Any], Callable[[int], Any]]] | None = None
        self._retry_reconcile = False
        #: Called on every tick that drained records (the relay refreshes its subscribers'
        #: congestion, so the kernel decides each new stream with a current threshold).
        self.on_records: Callable[[], None] | None = None
        #: Subscriber addresses kept on the userspace path although the kernel could serve
        #: them (`--userspace-peer`): one relay then carries the same objects on both paths
        #: at once, which is how `fastrelay bench` pairs their delays object by object.
        self.userspace_peers: frozenset[str] = frozenset()
        self.counters: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        self.punts: Counter[str] = Counter()
        #: The crypto backend protecting offloaded connections around the fast path (soft).
        self._offload_crypto: Any = None
        #: Its connection numbers -> fast-path connection indexes (fr_conns).
        self._crypto_conns: dict[int, int] = {}
        #: Its connection numbers -> the first packet number known to be in the current send
        #: key phase (None: a phase began, its first number not known yet).
        self._phase_start: dict[int, int | None] = {}
        #: Relay-initiated key updates of offloaded connections every this many seconds.
        self.key_update_every: float | None = None
        #: Connections whose key update the relay is sending right now (the others' are peers').
        self._initiating: set[int] = set()
        self._key_timer: asyncio.TimerHandle | None = None
        self._profile: cProfile.Profile | None = None

    # --- lifecycle ----------------------------------------------------------------------

    @classmethod
    def open(cls, *, port: int, interface_names: list[str] | None = None,
             caps: L.Capacities | None = None) -> FastPathRuntime:
        """Load the programs and attach them to the relay's interfaces."""
        interfaces = relay_interfaces(interface_names)
        if not interfaces:
            raise FastrelayError("no interface to attach the fast path to (only loopback is up)")
        fastpath = FastPath(caps or L.Capacities())
        try:
            for ifindex, _ in interfaces:
                fastpath.attach(ifindex)
        except BaseException:
            fastpath.close()
            raise
        return cls(fastpath, port=port, interfaces=interfaces)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        if os.environ.get(PROFILE_ENV):
            self._profile = cProfile.Profile(time.process_time)  # CPU, not wall, time
            self._profile.enable()
        try:
            self._ring_fd = self.fp.map_fd("fr_events")
        except Exception as exc:  # pragma: no cover - then the ticks alone find records
            logger.warning("cannot watch the ring buffer: %s", exc)
        self._watch_ring(True)
        self._schedule(self.tick)
        self._schedule_key_updates()

    def close(self) -> None:
        if self._profile is not None:
            self._profile.disable()
            self._profile.dump_stats(f"{os.environ[PROFILE_ENV]}.{os.getpid()}.prof")
            self._profile = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._key_timer is not None:
            self._key_timer.cancel()
            self._key_timer = None
        self._watch_ring(False)
        for sub in list(self._subs.values()):
            self._drop_sub(sub)
        for up in list(self._ups.values()):
            self._drop_up(up)
        self.fp.close()

    # --- what the relay asks ------------------------------------------------------------

    def reconcile(self, tracks: Iterable[Any], protocol_of: Callable[[int], Any]) -> None:
        """Mirror the core's tracks (relay.core.tracks.Track) into the maps."""
        want_tracks: set[tuple[int, int]] = set()
        want_subs: dict[tuple[int, int, int], tuple[int, int]] = {}
        for track in tracks:
            pub, alias = track.upstream_session, track.upstream_alias
            if not track.upstream_active or pub is None or alias is None:
                continue
            for sub in track.subscribers.values():
                # The kernel rewrites an alias in place: the relay chose one of the same
                # width for this subscriber (`fast_path`), or the upstream's own.
                if sub.active and sub.alias is not None and (sub.alias == alias or sub.fast_path):
                    want_tracks.add((pub, alias))
                    want_subs[(sub.session, pub, alias)] = (
                        start_group(sub.start.group, sub.start.object), sub.alias)
        for key in [k for k in self._sub_tracks if k not in want_subs]:
            session, pub, alias = key
            del self._sub_tracks[key]
            sub, up = self._subs.get(session), self._ups.get(pub)
            if sub is not None and up is not None:
                self.controller.unsubscribe_track(sub.handle, up.handle, alias)
        for pub, alias in [t for t in self._tracks if t not in want_tracks]:
            self._tracks.discard((pub, alias))
            up = self._ups.get(pub)
            if up is not None:
                self.controller.unforward_track(up.handle, alias)
        for (pub, alias) in want_tracks - self._tracks:
            up = self._ups.get(pub) or self._offload_upstream(pub, protocol_of(pub))
            if up is not None:
                self.controller.forward_track(up.handle, alias)
                self._tracks.add((pub, alias))
        for key, (group, sub_alias) in want_subs.items():
            session, pub, alias = key
            if self._sub_tracks.get(key) == (group, sub_alias) or (pub, alias) not in self._tracks:
                continue
            sub = self._subs.get(session) or self._offload_subscriber(session, protocol_of(session))
            if sub is None:
                continue
            self.controller.subscribe_track(sub.handle, alias, sub_alias,
                                            upstream=self._ups[pub].handle, start_group=group)
            self._sub_tracks[key] = (group, sub_alias)

    def claim(self, session: int, upstream: UpstreamKey) -> int | None:
        """The subscriber stream id when the kernel forwards `upstream` to `session` (the
        relay then leaves that copy alone), else None: userspace sends it, the kernel pads it."""
        sub, up = self._subs.get(session), self._ups.get(upstream[0])
        if sub is None or up is None:
            return None
        stream_id = self.controller.claim_stream(sub.handle, up.handle, upstream[1])
        if stream_id is None:
            self.counters["streams_userspace"] += 1
            return None
        self.counters["streams_kernel"] += 1
        self._apply_writes(self.shadow.kernel_stream(session, upstream, stream_id, self._now()))
        return stream_id

    def reset(self, session: int, stream_id: int, error_code: int) -> None:
        """The upstream reset a stream the kernel forwards: the kernel pads RESET_STREAM
        (an upstream frame), so the subscriber's copy is reset from here."""
        sub = self._subs.get(session)
        if sub is None:
            return
        try:
            sub.quic.reset_stream(stream_id, error_code)
        except Exception as exc:  # already finished or reset
            logger.debug("reset of kernel stream %d: %s", stream_id, exc)
        self._touch(sub)

    def set_threshold(self, session: int, threshold: int) -> None:
        self._thresholds[session] = threshold
        sub = self._subs.get(session)
        if sub is not None:
            self.controller.set_priority_threshold(sub.handle, threshold)

    def session_gone(self, session: int) -> None:
        sub = self._subs.get(session)
        if sub is not None:
            self._drop_sub(sub)
        up = self._ups.get(session)
        if up is not None:
            self._drop_up(up)
        self._refused.pop(session, None)
        self._thresholds.pop(session, None)

    def upstream_ended(self, publisher: int, stream_id: int) -> None:
        self.shadow.ended((publisher, stream_id), self._now())

    def _subscriber_alias(self, session: int, publisher: int, upstream_alias: int) -> int | None:
        entry = self._sub_tracks.get((session, publisher, upstream_alias))
        return entry[1] if entry is not None else None

    # --- offloading connections ---------------------------------------------------------

    def _refuse(self, session: int, reason: str) -> None:
        if session not in self._refused:
            self._refused[session] = reason
            self.refusals[reason] += 1
            logger.info("session %d stays on the userspace path: %s", session, reason)

    def _offloadable(self, session: int, protocol: Any) -> FastrelayQuicConnection | None:
        if session in self._refused:
            return None
        if protocol is None:
            self.counters["offload_deferred_not_ready"] += 1
            self._retry_soon()
            return None
        quic = protocol._quic
        if not isinstance(quic, FastrelayQuicConnection):
            self._refuse(session, "not a fastrelay connection")
            return None
        mode = quic.one_rtt_mode
        if mode is OneRttMode.PASS_THROUGH and self._offload_crypto is not None:
            return quic
        if mode is not OneRttMode.NULL:
            # e.g. a peer that could not negotiate ChaCha20-Poly1305 with --crypto soft
            why = getattr(quic._cryptos.get(tls.Epoch.ONE_RTT), "refused", None)
            self.counters["offload_refused_userspace_crypto"] += 1
            self._refuse(session, "1-RTT protected in userspace" + (f" ({why})" if why else
                                                                    " (needs --crypto none or soft)"))
            return None
        return quic

    def _offload_upstream(self, session: int, protocol: Any) -> _Up | None:
        quic = self._offloadable(session, protocol)
        if quic is None:
            return None
        if session in self._subs:
            self._refuse(session, "a connection is either upstream or subscriber to the kernel")
            return None
        cids = {c.cid for c in quic._host_cids}
        protection, tag_len = self._protection(quic)
        try:
            handle = self.controller.add_upstream(cids, peer_cid_len=len(quic._peer_cid.cid),
                                                  protection=protection, tag_len=tag_len)
            self._link_crypto(quic, handle.conn_idx, protection)
        except FastrelayError as exc:
            self._refuse(session, str(exc))
            return None
        up = _Up(session, protocol, handle, cids)
        self._ups[session] = up
        self._by_up_idx[handle.up_idx] = up
        quic.listener = lambda event, up=up: self._upstream_event(up, event)
        # Streams already under way are never forwarded (the kernel needs their offset 0):
        # their bytes are not this tap's, it would see them from the middle.
        under_way = frozenset(sid for sid in quic._streams if sid & 2)
        protocol.stream_tap = lambda sid, data, fin, s=session: (
            None if sid in under_way else self._upstream_data(s, sid, data, fin))
        self.counters["upstreams_offloaded"] += 1
        return up

    def _offload_subscriber(self, session: int, protocol: Any) -> _Sub | None:
        quic = self._offloadable(session, protocol)
        if quic is None:
            return None
        if session in self._ups:
            self._refuse(session, "a connection is either upstream or subscriber to the kernel")
            return None
        transport = protocol._transport
        if transport is not None and transport.get_write_buffer_size():
            # packets still queued with aioquic's numbers: try again on the next tick
            self.counters["offload_deferred_queued"] += 1
            self._retry_soon()
            return None
        peer_addr = quic._network_paths[0].addr if quic._network_paths else None
        if peer_addr is None:
            self.counters["offload_deferred_no_path"] += 1
            self._retry_soon()
            return None
        peer = (str(peer_addr[0]), int(peer_addr[1]))
        if canonical_address(peer[0]) in self.userspace_peers:
            self._refuse(session, USERSPACE_PEER_REASON)
            return None
        try:
            route = resolve(peer[0])
        except FastrelayError as exc:
            self._refuse(session, str(exc))
            return None
        if route.ifindex not in {i for i, _ in self.interfaces}:
            self._refuse(session, f"reached through {route.ifname}, where the fast path is not attached")
            return None
        path = SubscriberPath(local=(route.local_address, self.port), peer=peer,
                              ifindex=route.ifindex, src_mac=route.src_mac, dst_mac=route.dst_mac,
                              dcid=quic._peer_cid.cid)
        credit = quic.credit_snapshot()
        congestion = quic.congestion_snapshot()
        protection, tag_len = self._protection(quic)
        try:
            handle = self.controller.add_subscriber(
                None, path, max_data=credit.max_data, max_streams_uni=credit.max_streams_uni,
                initial_max_stream_data=credit.initial_max_stream_data_uni,
                cwnd=congestion.congestion_window, first_uni_index=quic.next_local_uni_index,
                next_pn=quic._packet_number, data_used=credit.data_used,
                max_udp_payload=quic.udp_payload_limit,
                priority_threshold=max(0, min(255, self._thresholds.get(session, 255))),
                protection=protection, tag_len=tag_len)
            self._link_crypto(quic, handle.conn_idx, protection)
        except FastrelayError as exc:
            self._refuse(session, str(exc))
            return None
        # From here the kernel renumbers this connection's 1-RTT packets: hand over now,
        # before anything else is sent.
        quic.hand_numbering_to_kernel(self.controller.stream_id_allocator(handle))
        sub = _Sub(session, protocol, handle, peer,
                   own_bytes_pushed=credit.data_used - quic.fastpath.shadow_bytes,
                   view=KernelView(cwnd=congestion.congestion_window, bytes_in_flight=0,
                                   next_pn=quic._packet_number))
        self._subs[session] = sub
        self._by_sub_idx[handle.sub_idx] = sub
        quic.listener = lambda event, sub=sub: self._subscriber_event(sub, event)
        self.counters["subscribers_offloaded"] += 1
        return sub

    def _drop_sub(self, sub: _Sub) -> None:
        done = sub.quic.fastpath
        self.counters["registered_closed"] += done.forwarded_registered
        self.counters["forwarded_acked_closed"] += done.forwarded_acked
        self.counters["forwarded_lost_closed"] += done.forwarded_lost
        self._subs.pop(sub.session, None)
        self._by_sub_idx.pop(sub.handle.sub_idx, None)
        self._dirty.pop(sub.session, None)
        for key in [k for k in self._sub_tracks if k[0] == sub.session]:
            del self._sub_tracks[key]
        self.shadow.forget_session(sub.session)
        sub.quic.listener = None
        self._unlink_crypto(sub.quic)
        try:
            self.controller.remove_subscriber(sub.handle, sub.peer)
        except (FastrelayError, OSError) as exc:
            logger.warning("removing subscriber %d: %s", sub.session, exc)

    def _drop_up(self, up: _Up) -> None:
        self._ups.pop(up.session, None)
        self._by_up_idx.pop(up.handle.up_idx, None)
        for key in [k for k in self._sub_tracks if k[1] == up.session]:
            del self._sub_tracks[key]
        self._tracks = {t for t in self._tracks if t[0] != up.session}
        self.shadow.forget_publisher(up.session, self._now())
        up.protocol._quic.listener = None
        up.protocol.stream_tap = None
        self._unlink_crypto(up.protocol._quic)
        try:
            self.controller.remove_upstream(up.handle, up.cids)
        except (FastrelayError, OSError) as exc:
            logger.warning("removing upstream %d: %s", up.session, exc)

    # --- offloaded crypto (--crypto soft) ------------------------------------------------

    def use_crypto(self, backend: Any) -> None:
        """The relay's crypto backend. One that offloads 1-RTT (soft) protects the offloaded
        connections around the fast path: the runtime links its shim entries to the fast
        path's connection indexes and keeps fr_conn.key_phase in step with key updates."""
        if backend is None or not getattr(backend, "offloads_1rtt", False):
            return
        self._offload_crypto = backend
        backend.phase_listener = self._on_key_phase
        backend.keys_listener = self._on_keys_complete

    @staticmethod
    def _pair(quic: FastrelayQuicConnection) -> Any:
        return quic._cryptos.get(tls.Epoch.ONE_RTT)

    def _protection(self, quic: FastrelayQuicConnection) -> tuple[int, int]:
        """fr_conn.protection and tag_len for a connection about to be offloaded."""
        if quic.one_rtt_mode is not OneRttMode.PASS_THROUGH:
            return L.PROT_CLEAR, 0
        pair = self._pair(quic)
        keyed = self._offload_crypto.keyed_directions(pair._connection)
        if len(keyed) == 2:
            return L.PROT_OFFLOAD_KEYS, AEAD_TAG_SIZE
        return L.PROT_OFFLOAD_NOKEYS, AEAD_TAG_SIZE

    def _link_crypto(self, quic: FastrelayQuicConnection, conn_idx: int, protection: int) -> None:
        """Tell the shim the fast path's index of this connection (its ingress verdict
        names it, its egress checks it) and set the key phase clones carry."""
        if protection == L.PROT_CLEAR:
            return
        pair = self._pair(quic)
        connection = pair._connection
        self._crypto_conns[connection] = conn_idx
        if not self._offload_crypto.link_fastpath(connection, conn_idx):
            raise FastrelayError("the soft shim holds no keys for this connection")
        self._set_key_phase(conn_idx, pair.send.key_phase)
        self._phase_start[connection] = None

    def _unlink_crypto(self, quic: Any) -> None:
        if self._offload_crypto is None:
            return
        pair = self._pair(quic)
        connection = getattr(pair, "_connection", None)
        self._phase_start.pop(connection, None)
        if self._crypto_conns.pop(connection, None) is not None:
            self._offload_crypto.link_fastpath(connection, None)

    def _set_key_phase(self, conn_idx: int, key_phase: int) -> None:
        conn = self.fp.lookup("fr_conns", conn_idx, L.FrConn)
        if conn is None or conn.key_phase == key_phase:
            return
        conn.key_phase = key_phase
        self.fp.update("fr_conns", conn_idx, conn)
        self.counters["key_phase_changes"] += 1

    def _on_key_phase(self, connection: int, direction: Any, key_phase: int) -> None:
        """The backend is about to install a connection's keys of `key_phase` (a key update).
        For the send direction the fast path's clones switch to that phase first: the shim
        already holds the new phase's keys (as the previous phase's `next`)."""
        conn_idx = self._crypto_conns.get(connection)
        if conn_idx is None or direction is not Direction.SEND:
            return
        self._phase_start[connection] = None  # known after the packets of this send
        if connection not in self._initiating:
            self.counters["key_updates_by_peer"] += 1
        try:
            self._set_key_phase(conn_idx, key_phase)
        except (FastrelayError, OSError) as exc:
            self.counters["map_errors"] += 1
            logger.warning("key phase of fast-path connection %d: %s", conn_idx, exc)

    def _on_keys_complete(self, connection: int) -> None:
        """A connection taken over as OFFLOAD_NOKEYS (its egress drops every clone, never
        plaintext out) now has keys in the shim both ways: its clones may be protected."""
        conn_idx = self._crypto_conns.get(connection)
        if conn_idx is None:
            return
        try:
            conn = self.fp.lookup("fr_conns", conn_idx, L.FrConn)
            if conn is None or conn.protection != L.PROT_OFFLOAD_NOKEYS:
                return
            conn.protection = L.PROT_OFFLOAD_KEYS
            self.fp.update("fr_conns", conn_idx, conn)
            self.counters["keys_completed"] += 1
        except (FastrelayError, OSError) as exc:
            self.counters["map_errors"] += 1
            logger.warning("protection of fast-path connection %d: %s", conn_idx, exc)

    # --- relay-initiated key updates ----------------------------------------------------

    def _next_wire_pn(self, session: int) -> int:
        """The next 1-RTT packet number of an offloaded connection: the kernel's counter for
        a subscriber (it numbers every packet), aioquic's for an upstream."""
        sub = self._subs.get(session)
        if sub is not None:
            state = self.fp.lookup("fr_subs", sub.handle.sub_idx, L.FrSub)
            return int(state.next_pn)
        return int(self._ups[session].protocol._quic._packet_number)

    def request_key_update(self, session: int) -> bool:
        """Start a key update (RFC 9001 §6) on an offloaded connection protected by the shim,
        only once the peer acknowledged a packet sent in the current phase (§6.1): a packet
        numbered at or after the first number known to be in it. False when not allowed now.

        The kernel numbers a subscriber's packets, so the connection's own record-based rule
        does not apply here; the first number of a phase is read from the counters after the
        packet that switched phase left (later than the real first: never too early)."""
        entry = self._subs.get(session) or self._ups.get(session)
        if entry is None or self._offload_crypto is None:
            return False
        protocol = entry.protocol
        quic = protocol._quic
        pair = self._pair(quic)
        connection = getattr(pair, "_connection", None)  # None: not a pass-through pair
        if connection not in self._crypto_conns or pair._update_key_requested:
            return False
        start = self._phase_start.get(connection)
        if start is None:
            self._phase_start[connection] = self._next_wire_pn(session)
            return False
        if quic._spaces[tls.Epoch.ONE_RTT].largest_acked_packet < start:
            self.counters["key_updates_waiting_ack"] += 1
            return False
        QuicConnection.request_key_update(quic)  # the rule above replaces the record-based one
        quic.send_ping(KEY_UPDATE_PING)  # a packet to carry the switch now
        self._initiating.add(connection)
        try:
            protocol.transmit()
        finally:
            self._initiating.discard(connection)
        self._phase_start[connection] = self._next_wire_pn(session)
        self.counters["key_updates_upstream" if session in self._ups else
                      "key_updates_subscriber"] += 1
        return True

    def _schedule_key_updates(self) -> None:
        if self._loop is not None and self.key_update_every:
            self._key_timer = self._loop.call_later(self.key_update_every, self._key_update_tick)

    def _key_update_tick(self) -> None:
        self._key_timer = None
        for session in [*self._ups, *self._subs]:
            try:
                self.request_key_update(session)
            except Exception:  # pragma: no cover - never let the loop lose the timer
                logger.exception("key update of session %d failed", session)
        self._schedule_key_updates()

    # --- connection events --------------------------------------------------------------

    def _upstream_event(self, up: _Up, event: FastPathEvent) -> None:
        if isinstance(event, HostConnectionIdIssued):
            up.cids.add(event.cid)
            self.controller.add_host_cid(up.handle.conn_idx, event.cid)
        elif isinstance(event, HostConnectionIdRetired):
            up.cids.discard(event.cid)
            self.controller.retire_host_cid(event.cid)

    def _subscriber_event(self, sub: _Sub, event: FastPathEvent) -> None:
        try:
            if isinstance(event, (CreditChanged, PeerConnectionIdChanged)):
                self.controller.on_event(sub.handle, event)
            elif isinstance(event, StreamCreditChanged):
                key = self.shadow.upstream_of(sub.session, event.credit.stream_id)
                up = self._ups.get(key[0]) if key is not None else None
                if key is not None and up is not None:
                    self.controller.set_stream_credit(sub.handle, key[1],
                                                      event.credit.max_stream_data, up.handle)
            elif isinstance(event, PeerAddressChanged) and event.old is not None:
                # Migration: the kernel would send to the old address. Back to userspace.
                self.counters["subscribers_migrated"] += 1
                self._drop_sub(sub)
                self._refuse(sub.session, "peer address changed")
            elif isinstance(event, CongestionChanged):
                self._dirty[sub.session] = sub  # pushed on the next tick, once per tick
                self._wake()
        except (FastrelayError, OSError) as exc:
            self.counters["map_errors"] += 1
            logger.warning("fast path update for session %d failed: %s", sub.session, exc)

    def _upstream_data(self, publisher: int, stream_id: int, data: bytes, fin: bool) -> None:
        if not stream_id & 2:
            return  # bidirectional: the control stream, never forwarded
        started = time.perf_counter_ns()
        started_cpu = time.thread_time_ns()
        self._apply_writes(self.shadow.data((publisher, stream_id), data, fin, self._now()))
        self.counters["catchup_ns"] += time.perf_counter_ns() - started
        self.counters["catchup_cpu_ns"] += time.thread_time_ns() - started_cpu

    # --- records -----------------------------------------------------------------------

    def _on_tick(self) -> None:
        self._timer = None
        records = 0
        try:
            records = self.poll()
        except Exception:  # pragma: no cover - never let the loop lose the timer
            logger.exception("fast path tick failed")
        self._interval = self.tick if records else min(IDLE_TICK, self._interval * 2)
        self._watch_ring(True)
        self._schedule(self._interval)

    def _schedule(self, delay: float) -> None:
        """The next tick at most `delay` seconds from now."""
        if self._loop is None:
            return
        at = self._loop.time() + delay
        if self._timer is not None:
            if self._timer.when() <= at:
                return
            self._timer.cancel()
        self._timer = self._loop.call_at(at, self._on_tick)

    def _wake(self) -> None:
        """Something for the tick to do: within `tick`, not at the idle pace."""
        self._interval = self.tick
        self._schedule(self.tick)

    def _retry_soon(self) -> None:
        """A hand-over had to wait: `reconcile` again on a tick within RETRY_TICK."""
        self._retry_reconcile = True
        self._schedule(RETRY_TICK)

    def _watch_ring(self, on: bool) -> None:
        if self._loop is None or self._ring_fd is None or on == self._watching:
            return
        if on:
            self._loop.add_reader(self._ring_fd, self._on_ring)
        else:
            self._loop.remove_reader(self._ring_fd)
        self._watching = on

    def _on_ring(self) -> None:
        # Records wait. The fd stays readable until the tick drains them: stop watching it
        # till then (one wake-up per batch, no spinning; the tick gathers the whole batch).
        self._watch_ring(False)
        self._wake()

    def poll(self) -> int:
        """Drain and apply records, push changed state, expire streams, send what resulted."""
        started = time.perf_counter_ns()
        started_cpu = time.thread_time_ns()
        if self._retry_reconcile and self.source is not None:
            self._retry_reconcile = False
            self.reconcile(*self.source())
        records = self.fp.drain()
        t_drained = time.perf_counter_ns()
        for rec in records:
            try:
                self._apply_record(rec)
            except Exception as exc:
                self.counters["record_errors"] += 1
                logger.warning("record %d for subscriber %d: %s", rec.kind, rec.sub_idx, exc)
        self.counters["records"] += len(records)
        t_applied = time.perf_counter_ns()
        if records and self.on_records is not None:
            self.on_records()
        t_congestion = time.perf_counter_ns()
        now = self._now()
        full = now - self._last_full_push >= FULL_PUSH_INTERVAL
        if full:
            self._last_full_push = now
        dirty = list((self._subs if full else self._dirty).values())
        self._dirty.clear()
        for sub in dirty:
            self._push_state(sub)
        self._expire()
        t_pushed = time.perf_counter_ns()
        touched, self._touched = self._touched, {}
        armed, self._armed = self._armed, {}
        for protocol in touched.values():
            try:
                protocol.transmit()
            except Exception:  # pragma: no cover - a dead transport
                logger.exception("transmit failed")
        for key, protocol in armed.items():
            if key not in touched:
                rearm_timer(protocol)
        done = time.perf_counter_ns()
        # where a tick's time goes (stats: catchup_breakdown_us_per_forwarded_packet)
        self.counters["catchup_drain_ns"] += t_drained - started
        self.counters["catchup_records_ns"] += t_applied - t_drained
        self.counters["catchup_congestion_ns"] += t_congestion - t_applied
        self.counters["catchup_push_ns"] += t_pushed - t_congestion
        self.counters["catchup_transmit_ns"] += done - t_pushed
        self.counters["catchup_ns"] += done - started
        self.counters["catchup_cpu_ns"] += time.thread_time_ns() - started_cpu
        return len(records)

    def _apply_record(self, rec: Any) -> None:
        sub = self._by_sub_idx.get(rec.sub_idx)
        if sub is None:
            self.counters["records_unknown_subscriber"] += 1
            return
        quic = sub.quic
        # Its state is pushed at the end of the tick, once for all its records.
        self._dirty[sub.session] = sub
        if rec.kind == L.REC_SENT_USER:
            _, number = self.controller.translate(rec)
            assert isinstance(number, WireNumber)
            sub.view.numbered(rec.wire_pn)
            quic.on_wire_number(number, report=False)
            self._armed[id(sub.protocol)] = sub.protocol  # now in flight: loss timer
            return
        frames = self.controller.stream_frames(rec)
        _, what = self.controller.translate(rec, frames)
        if isinstance(what, Punt) and not what.clone:
            self._touch(sub)  # its data is lost: aioquic resends it
            self.punts[what.reason.name] += 1
            if quic._loss.discard_parked(rec.built_pn) is None:
                self.counters["punted_user_packets_unknown"] += 1
            return
        up = self._by_up_idx.get(rec.up_idx)
        if up is not None:
            for f in frames:
                key, sid = (up.session, int(f.up_sid)), int(f.sub_sid)
                if self.shadow.owner_stream(sub.session, key) != sid:  # first record of it
                    self._apply_writes(self.shadow.kernel_stream(sub.session, key, sid,
                                                                 self._now()))
        if isinstance(what, ForwardedPacket):
            sub.view.forwarded(rec.wire_pn, rec.size)
            quic.register_forwarded(what, report=False)
            self._armed[id(sub.protocol)] = sub.protocol
            self.counters["forwarded_packets"] += 1
            self.counters["forwarded_stream_bytes"] += sum(f.length for f in what.frames)
        else:
            self._touch(sub)
            self.punts[what.reason.name] += 1
            for f in what.frames:
                quic.resend_range(f.stream_id, f.offset, f.stop, f.fin)
                self.counters["punted_stream_bytes"] += f.length

    def _push_state(self, sub: _Sub) -> None:
        quic = sub.quic
        loss = quic._loss
        largest_acked = quic._largest_acked_1rtt()
        own = quic._remote_max_data_used - quic.fastpath.shadow_bytes
        # Only what changes the kernel's decisions (one syscall per field stored).
        writes = congestion_writes(sub.view, loss.congestion_window, loss.bytes_in_flight,
                                   largest_acked)
        try:
            for name, value in writes.items():
                self.fp.sub_store(sub.handle.sub_idx, name, value)
                self.counters["state_stores"] += 1
            if own > sub.own_bytes_pushed:
                # userspace's own new stream bytes use the same MAX_DATA credit
                self.fp.sub_add(sub.handle.sub_idx, "data_used", own - sub.own_bytes_pushed)
                sub.own_bytes_pushed = own
        except (FastrelayError, OSError) as exc:
            self.counters["map_errors"] += 1
            # not known what the kernel has now: store every field next time
            sub.view = KernelView(next_pn=sub.view.next_pn)
            self._dirty[sub.session] = sub
            logger.warning("pushing state of session %d: %s", sub.session, exc)

    def _expire(self) -> None:
        for (publisher, stream_id), _ in self.shadow.expire(self._now(), self.stream_linger):
            up = self._ups.get(publisher)
            if up is None:
                continue
            subs = [self._subs[s].handle.sub_idx for (s, p, _a) in self._sub_tracks
                    if p == publisher and s in self._subs]
            self.controller.forget_stream(up.handle, stream_id, set(subs))
            self.counters["streams_expired"] += 1

    def _apply_writes(self, writes: list[ShadowWrite]) -> None:
        for w in writes:
            sub = self._subs.get(w.session)
            if sub is None:
                continue
            stats = sub.quic.fastpath
            replayed = stats.deliveries_replayed
            try:
                sub.quic.shadow_write(w.stream_id, w.data, offset=w.offset, end_stream=w.fin)
            except (ValueError, RuntimeError) as exc:
                self.counters["shadow_errors"] += 1
                logger.warning("shadow write on stream %d of session %d: %s", w.stream_id,
                               w.session, exc)
            # Bytes written as sent need no transmit; a loss reported before them (parked,
            # now replayed) does: aioquic resends the range.
            if stats.deliveries_replayed != replayed:
                self._touch(sub)

    def _touch(self, sub: _Sub) -> None:
        self._touched[id(sub.protocol)] = sub.protocol
        self._dirty[sub.session] = sub
        self._wake()

    def _now(self) -> float:
        return self._loop.time() if self._loop is not None else 0.0

    # --- reporting ----------------------------------------------------------------------

    def forwards_track(self, subscriber: int, publisher: int, upstream_alias: int) -> bool:
        """Whether the kernel forwards the publisher's track (its alias upstream) to this
        subscriber: mirrored into fr_sub_tracks by `reconcile`."""
        return (subscriber, publisher, upstream_alias) in self._sub_tracks

    def stats(self) -> dict[str, Any]:
        kernel = {reason.name: {"packets": p, "bytes": b}
                  for reason, (p, b) in self.fp.counters().items()}
        sent = kernel.get(Reason.EG_SENT_CLONE.name, {}).get("bytes", 0)
        user = kernel.get(Reason.EG_RENUMBERED.name, {}).get("bytes", 0)
        live = [s.quic.fastpath for s in self._subs.values()]
        registered = self.counters["registered_closed"] + sum(f.forwarded_registered for f in live)
        forwarded = self.counters["forwarded_packets"]

        def per_forwarded(counter: str) -> float | None:
            """µs of a catch-up time counter per packet the kernel forwarded."""
            return round(self.counters[counter] / 1000 / forwarded, 2) if forwarded else None

        return {
            "enabled": True,
            "interfaces": [name for _, name in self.interfaces],
            "upstreams": len(self._ups),
            "subscribers": len(self._subs),
            "tracks": len(self._tracks),
            "subscriptions": len(self._sub_tracks),
            "refused": dict(self.refusals),
            "counters": dict(self.counters),
            "punts": dict(self.punts),
            "kernel_bytes_share": round(sent / (sent + user), 4) if sent + user else None,
            # userspace's catch-up (records, shadow writes, state pushes) per forwarded packet;
            # the ACK processing of forwarded packets inside aioquic is not in it
            "catchup_us_per_forwarded_packet": per_forwarded("catchup_ns"),
            # the same in CPU time of the relay's thread (not inflated by other processes)
            "catchup_cpu_us_per_forwarded_packet": per_forwarded("catchup_cpu_ns"),
            "catchup_breakdown_us_per_forwarded_packet": {
                part: per_forwarded(f"catchup_{part}_ns")
                for part in ("drain", "records", "congestion", "push", "transmit")}
            if forwarded else None,
            "shadow_bytes": self.shadow.bytes_written,
            "registered": registered,
            "forwarded_acked": self.counters["forwarded_acked_closed"]
            + sum(f.forwarded_acked for f in live),
            "forwarded_lost": self.counters["forwarded_lost_closed"]
            + sum(f.forwarded_lost for f in live),
            "map_entries": {name: len(self.fp.keys(name)) for name in HASH_MAPS},
            "kernel": kernel,
        }
