"""`soft`: QUIC header protection and AEAD in a kernel-side eBPF shim below the fast path.

The shim does ChaCha20-Poly1305 in plain eBPF (bcc cannot call the kernel's crypto
kfuncs), so this backend negotiates TLS_CHACHA20_POLY1305_SHA256 with every peer: as TLS
server by its order of preference (ChaCha20 first; a client that offers only AES still gets
a connection, protected by aioquic in userspace, logged and counted), as TLS client by
offering ChaCha20 only.

In the relay, `start()` loads the shim (crypto_backends/soft_shim.py) and attaches it to the
interfaces of the relay's network namespace (clsact, direct action): shim ingress at
priority SHIM_INGRESS_PRIO (20, before the fast path's ingress at 30), shim egress at
SHIM_EGRESS_PRIO (20, after the fast path's egress at 10). Every connection's 1-RTT keys,
exported by aioquic (relay.quic.crypto), go into the shim's map keyed by the addresses and
ports the packets carry; on a key update of the receive direction the previous phase's keys
go along, for the peer's packets sent before it (RFC 9001 §6.5, see soft_shim.conn_value);
`close()` detaches and unloads everything.

In a process that never called `start()` (`fastrelay publish/subscribe --crypto soft`)
nothing is offloaded: endpoints have no fast path to feed plaintext, so they speak standard
QUIC with ChaCha20-Poly1305 offered only, protected by aioquic, the form a soft relay
offloads.
"""

from __future__ import annotations

import atexit
import errno
import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, TypeVar

from aioquic.tls import CipherSuite

from crypto_backends.base import (
    AEAD_TAG_SIZE,
    Address,
    CryptoBackend,
    Direction,
    KeyMaterial,
    KeyTrigger,
    OffloadRefused,
)
from relay.errors import ConfigError, FastrelayError

logger = logging.getLogger(__name__)
T = TypeVar("T")

TC_INGRESS = "ffff:fff2"
TC_EGRESS = "ffff:fff3"
#: Lower runs first: shim ingress before the fast path's (30), egress after the fast path's (10).
SHIM_INGRESS_PRIO = 20
SHIM_EGRESS_PRIO = 20
FILTER_HANDLE = ":1"
IFF_UP = 0x1
IFF_LOOPBACK = 0x8

#: The suite the shim protects.
OFFLOADED_SUITE = CipherSuite.CHACHA20_POLY1305_SHA256
#: As TLS server: ChaCha20 first, then what any TLS 1.3 client must (AES-128-GCM, RFC 8446
#: §9.1) or may offer; connections on those suites stay in userspace.
SERVER_SUITES = (OFFLOADED_SUITE, CipherSuite.AES_128_GCM_SHA256, CipherSuite.AES_256_GCM_SHA384)


def _netlink(fn: Callable[[], T]) -> T:
    """Run pyroute2 calls in a thread of their own: pyroute2 0.9 drives its netlink socket
    with an asyncio loop, which fails inside the relay's running loop."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="soft-shim-netlink") as pool:
        return pool.submit(fn).result()


def route_source(peer_host: str) -> str:
    """The local address the kernel picks for datagrams to `peer_host` (a route lookup: a
    connected UDP socket sends nothing)."""
    family = socket.AF_INET6 if ipaddress.ip_address(peer_host).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((peer_host, 9))
        return str(probe.getsockname()[0])


def local_for(local: Address, peer: Address) -> Address:
    """The connection's local address as its packets carry it: the socket's own, or, for a
    socket bound to the unspecified address, the route's source towards the peer."""
    host = local[0].split("%")[0]
    if ipaddress.ip_address(host).is_unspecified:
        host = route_source(peer[0].split("%")[0])
    return host, local[1]


class _Attachment:
    """The shim's filters on the interfaces of this network namespace."""

    def __init__(self) -> None:
        self.filters: list[tuple[int, str, int]] = []  # ifindex, parent, prio
        self.own_clsact: list[int] = []  # clsact qdiscs we added (removed again if empty)
        self.names: list[str] = []

    @staticmethod
    def resolve(names: Sequence[str] | None) -> list[tuple[str, int]]:
        """(name, ifindex) of the named interfaces, or of every up non-loopback interface."""
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            links = [(link.get_attr("IFLA_IFNAME"), link["index"], link["flags"])
                     for link in ipr.get_links()]
        if names:
            known = {name: index for name, index, _ in links}
            missing = [n for n in names if n not in known]
            if missing:
                raise ConfigError(
                    f"--crypto-interface {missing[0]}: no such interface in this network "
                    f"namespace (there are: {', '.join(sorted(known))})")
            return [(n, known[n]) for n in dict.fromkeys(names)]
        chosen = [(name, index) for name, index, flags in links
                  if flags & IFF_UP and not flags & IFF_LOOPBACK]
        if not chosen:
            raise ConfigError("--crypto soft: no interface is up in this network namespace "
                              "besides loopback; name one with --crypto-interface")
        return chosen

    def attach(self, interfaces: list[tuple[str, int]], ingress_fd: int, egress_fd: int,
               names: tuple[str, str]) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        with IPRoute() as ipr:
            for name, index in interfaces:
                try:
                    ipr.tc("add", "clsact", index=index)
                    self.own_clsact.append(index)
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:
                        raise FastrelayError(f"cannot add clsact on {name}: {exc.args[-1]}") from None
                for parent, prio, fd, fn in ((TC_INGRESS, SHIM_INGRESS_PRIO, ingress_fd, names[0]),
                                             (TC_EGRESS, SHIM_EGRESS_PRIO, egress_fd, names[1])):
                    try:
                        ipr.tc("add-filter", "bpf", index=index, handle=FILTER_HANDLE, fd=fd,
                               name=fn, parent=parent, classid=1, direct_action=True, prio=prio)
                    except NetlinkError as exc:
                        raise FastrelayError(f"cannot attach {fn} on {name}: {exc.args[-1]}") from None
                    self.filters.append((index, parent, prio))
                self.names.append(name)

    def detach(self) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        gone = (errno.ENOENT, errno.ENODEV, errno.EINVAL)
        with IPRoute() as ipr:
            while self.filters:
                index, parent, prio = self.filters.pop()
                try:
                    ipr.tc("del-filter", "bpf", index=index, handle=FILTER_HANDLE, parent=parent,
                           prio=prio)
                except NetlinkError as exc:
                    if exc.code not in gone:
                        raise
            while self.own_clsact:
                index = self.own_clsact.pop()
                try:
                    if any(ipr.get_filters(index=index, parent=p) for p in (TC_INGRESS, TC_EGRESS)):
                        continue  # someone else's filters still hang there
                    ipr.tc("del", "clsact", index=index)
                except NetlinkError as exc:
                    if exc.code not in gone:
                        raise


class SoftBackend(CryptoBackend):
    name: ClassVar[str] = "soft"
    offloads_1rtt: ClassVar[bool] = True
    tag_size: ClassVar[int] = AEAD_TAG_SIZE

    def __init__(self, *, interfaces: Sequence[str] | None = None) -> None:
        #: Interfaces to attach to (None: every up non-loopback one of this namespace).
        self.interfaces = list(interfaces) if interfaces else None
        self._shim: Any = None
        self._attachment: _Attachment | None = None
        self._attached_to: list[str] = []
        # connection -> (local, peer) as keyed in the shim; directions holding keys there
        self._where: dict[int, tuple[Address, Address]] = {}
        self._keyed: dict[int, set[Direction]] = {}
        # connection -> the fast path's index of it, while the fast path holds it
        self._linked: dict[int, int] = {}
        # connection -> the peer's stateless reset token for the receive entry
        self._reset_tokens: dict[int, bytes] = {}
        self.connections_offloaded = 0
        self.connections_not_offloaded = 0
        self.not_offloaded_reasons: dict[str, int] = {}
        self.key_updates = 0
        self._final_shim_stats: dict[str, int] | None = None
        #: Told (connection, direction, key phase) before a key update's keys go to the
        #: shim: the fast path switches the phase its clones carry (relay.fastpath.runtime).
        self.phase_listener: Callable[[int, Direction, int], None] | None = None
        #: Told (connection) when a connection the fast path holds gets its second
        #: direction's keys: the fast path may protect its clones from then on.
        self.keys_listener: Callable[[int], None] | None = None

    @property
    def cipher_suites(self) -> tuple[CipherSuite, ...]:
        return (OFFLOADED_SUITE,)

    def tls_cipher_suites(self, *, is_client: bool) -> tuple[CipherSuite, ...]:
        return self.cipher_suites if is_client else SERVER_SUITES

    @property
    def verification_token(self) -> bytes | None:
        return None if self._shim is None else self._shim.token

    @property
    def running(self) -> bool:
        return self._shim is not None

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Load the shim and attach it to this namespace's interfaces (wrong name: ConfigError)."""
        if self._shim is not None:
            return
        interfaces = _netlink(lambda: _Attachment.resolve(self.interfaces))
        from crypto_backends.soft_shim import SoftShim

        shim = SoftShim()
        attachment = _Attachment()
        try:
            names = (shim.ingress.name.decode(), shim.egress.name.decode())
            _netlink(lambda: attachment.attach(interfaces, shim.ingress.fd, shim.egress.fd, names))
        except BaseException:
            _netlink(attachment.detach)
            shim.close()
            raise
        self._shim, self._attachment = shim, attachment
        self._attached_to = list(attachment.names)
        self._final_shim_stats = None
        atexit.register(self.close)  # an exception on the way out still detaches
        logger.info("soft crypto shim attached to %s", ", ".join(attachment.names))

    def use_shim(self, shim: Any) -> None:
        """Key connections into `shim` (a loaded SoftShim, or anything with its install/remove/
        stats/close/token) without attaching anything: tests drive it themselves."""
        self._shim, self._attachment = shim, None
        self._final_shim_stats = None

    def close(self) -> None:
        """Detach the shim from every interface and unload it; its last counters stay in stats()."""
        shim, attachment = self._shim, self._attachment
        self._shim = self._attachment = None
        if shim is None:
            return
        if attachment is not None:
            atexit.unregister(self.close)
        try:
            self._final_shim_stats = shim.stats()
        finally:
            try:
                if attachment is not None:
                    _netlink(attachment.detach)
            finally:
                shim.close()
                self._keyed.clear()
                self._linked.clear()
                self._where.clear()
                self._reset_tokens.clear()

    # --- keys --------------------------------------------------------------------------

    def install(self, material: KeyMaterial) -> None:
        connection = material.connection
        where = self._where.get(connection)
        if where is None:
            if material.trigger is not KeyTrigger.INSTALL:
                raise OffloadRefused("the soft shim does not hold this connection")
            where = self._admit(material)
        dcid_len = material.path.dcid_len if material.path is not None else 0
        if material.trigger is not KeyTrigger.INSTALL and self.phase_listener is not None:
            self.phase_listener(connection, material.direction, material.current.key_phase)
        token = (self._reset_tokens.get(connection) if material.direction is Direction.RECV
                 else None)
        try:
            self._shim.install(where[0], where[1], material, dcid_len=dcid_len, reset_token=token)
        except (OSError, FastrelayError) as exc:  # e.g. the map is full
            # The pair falls back to userspace crypto and withdraws what the shim holds.
            if connection not in self._keyed:
                del self._where[connection]
            raise OffloadRefused(f"the shim refused the keys ({exc})") from None
        keyed = self._keyed.setdefault(connection, set())
        keyed.add(material.direction)
        if material.trigger is not KeyTrigger.INSTALL:
            self.key_updates += 1
            return
        conn_idx = self._linked.get(connection)
        if conn_idx is not None:
            # The fast path took the connection before this direction had keys (it marked
            # it OFFLOAD_NOKEYS): the new entry carries its index too, and once both
            # directions are keyed the fast path is told it may protect clones.
            self._shim.link_fastpath(where[0], where[1], material.direction, conn_idx)
            if len(keyed) == 2 and self.keys_listener is not None:
                self.keys_listener(connection)

    def _admit(self, material: KeyMaterial) -> tuple[Address, Address]:
        """A new connection: offload it (returns where the shim keys it), or say why not
        (OffloadRefused; counted, and logged on the relay)."""
        reason, where = None, None
        if self._shim is None:
            reason = "no soft shim in this process (endpoint: standard QUIC)"
        elif material.cipher_suite != OFFLOADED_SUITE:
            reason = f"peer negotiated {CipherSuite(material.cipher_suite).name}"
        elif material.path is None:
            reason = "connection addresses unknown"
        else:
            try:
                where = (local_for(material.path.local, material.path.peer), material.path.peer)
            except OSError as exc:
                reason = f"no route to the peer ({exc.strerror or exc})"
        if reason is not None or where is None:
            reason = reason or "no address"
            self.connections_not_offloaded += 1
            self.not_offloaded_reasons[reason] = self.not_offloaded_reasons.get(reason, 0) + 1
            if self._shim is not None:
                peer = material.path.peer if material.path is not None else "?"
                logger.warning("connection %d with %s: not offloaded (%s); userspace crypto",
                               material.connection, peer, reason)
            raise OffloadRefused(reason)
        self._where[material.connection] = where
        self.connections_offloaded += 1
        return where

    def teardown(self, connection: int, direction: Direction) -> None:
        where, keyed = self._where.get(connection), self._keyed.get(connection)
        if where is None or keyed is None or direction not in keyed:
            return
        keyed.discard(direction)
        if self._shim is not None:
            self._shim.remove(where[0], where[1], direction)
        if not keyed:
            del self._keyed[connection], self._where[connection]
            self._linked.pop(connection, None)
            self._reset_tokens.pop(connection, None)

    def set_reset_token(self, connection: int, token: bytes) -> bool:
        """Keep the token for the connection's receive entry, and write it there if the
        shim holds one (the shim passes a stateless reset up instead of dropping it)."""
        where = self._where.get(connection)
        if where is None or self._shim is None:
            return False
        self._reset_tokens[connection] = token
        if Direction.RECV in self._keyed.get(connection, ()):
            self._shim.set_reset_token(where[0], where[1], token)
        return True

    def keyed_directions(self, connection: int) -> frozenset[Direction]:
        """The directions of `connection` the shim holds keys for."""
        return frozenset(self._keyed.get(connection, ()))

    def link_fastpath(self, connection: int, conn_idx: int | None) -> bool:
        """Give both shim entries of `connection` the fast path's connection index (None:
        the fast path let it go). False when the shim does not hold the connection."""
        where = self._where.get(connection)
        if where is None or self._shim is None:
            return False
        linked = [self._shim.link_fastpath(where[0], where[1], d, conn_idx)
                  for d in self._keyed.get(connection, ())]
        if conn_idx is None:
            self._linked.pop(connection, None)
        else:
            self._linked[connection] = conn_idx
        return bool(linked) and all(linked)

    def entries(self) -> dict[int, tuple[Address, Address, list[str]]]:
        """Connections the shim holds keys for now: local and peer address, directions."""
        return {c: (*self._where[c], sorted(d.value for d in keyed))
                for c, keyed in self._keyed.items()}

    # --- counters ----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        shim = self._shim.stats() if self._shim is not None else self._final_shim_stats
        return {
            "backend": self.name,
            "interfaces": list(self._attached_to),
            "connections_offloaded": self.connections_offloaded,
            "connections_not_offloaded": self.connections_not_offloaded,
            "not_offloaded_reasons": dict(self.not_offloaded_reasons),
            "offloaded_now": len(self._keyed),
            "key_updates": self.key_updates,
            "shim": shim,
        }
