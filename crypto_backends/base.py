"""The crypto backend interface: who protects 1-RTT packets, and what it needs to know.

A backend decides how a connection's 1-RTT packets are protected on the wire. Userspace
and the fast path always exchange 1-RTT packets in one plaintext layout (no header
protection, payload in clear, then `tag_size` bytes of tag slot), so the fast path is the
same for every backend. An offloading backend receives, per connection and direction,
the key material of the current and the next key phase (and, receiving, the previous one
after an update) when keys are installed, on every key update (local or remote) and on
teardown.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from aioquic.tls import CipherSuite

#: RFC 9001 §5.3: every QUIC v1 AEAD appends a 16-byte tag.
AEAD_TAG_SIZE = 16


class Direction(enum.Enum):
    SEND = "send"
    RECV = "recv"


Address = tuple[str, int]


@dataclass(frozen=True)
class ConnectionPath:
    """Where one direction of a connection's 1-RTT packets travel, as seen from this host."""

    #: The UDP socket's own address; an unspecified host (0.0.0.0, ::) means "whatever the
    #: route to the peer uses", for the backend to resolve.
    local: Address
    peer: Address
    #: Length of the destination connection id in this direction's short headers.
    dcid_len: int


class OffloadRefused(Exception):
    """The backend will not protect this connection (suite it cannot do, no path, shim not
    running): the connection keeps aioquic's standard 1-RTT crypto. The message says why."""


class KeyTrigger(enum.Enum):
    """Why key material is being handed to the backend (aioquic's setup-callback triggers)."""

    INSTALL = "tls"
    LOCAL_UPDATE = "local_update"
    REMOTE_UPDATE = "remote_update"


@dataclass(frozen=True)
class PhaseKeys:
    """Packet-protection keys of one key phase (RFC 9001 §5.1, §6)."""

    key_phase: int
    secret: bytes
    key: bytes
    iv: bytes


@dataclass(frozen=True)
class KeyMaterial:
    """What a backend needs to protect or unprotect one direction of one connection."""

    connection: int
    direction: Direction
    trigger: KeyTrigger
    cipher_suite: CipherSuite
    version: int
    #: The header-protection key never changes with key updates (RFC 9001 §6).
    hp_key: bytes
    current: PhaseKeys
    next: PhaseKeys
    #: The connection's addresses, when the endpoint knows them.
    path: ConnectionPath | None = None
    #: Receive direction after a key update: the phase before `current`, for packets the
    #: peer sent before it (RFC 9001 §6.5); None otherwise. A backend keeps it until the
    #: next update replaces it or the connection ends (retention rule: one previous phase,
    #: no ~3 PTO timer; see relay.quic.crypto).
    previous: PhaseKeys | None = None


class CryptoBackend(ABC):
    """One way of protecting 1-RTT packets; selected by `--crypto`."""

    name: ClassVar[str]
    #: True when 1-RTT protection happens below userspace (kernel shim or NIC): aioquic
    #: then emits the plaintext layout and exports keys.
    offloads_1rtt: ClassVar[bool]
    #: Bytes after the payload in the plaintext layout the fast path sees.
    tag_size: ClassVar[int]

    @property
    @abstractmethod
    def cipher_suites(self) -> tuple[CipherSuite, ...]:
        """The suites this backend can protect, in the relay's order of preference."""

    def tls_cipher_suites(self, *, is_client: bool) -> tuple[CipherSuite, ...]:
        """What the TLS handshake offers (client) or accepts in order of preference (server).

        By default only the suites this backend protects."""
        return self.cipher_suites

    def check(self) -> None:
        """Raise MissingCapabilityError, with the probe's reason, when this backend cannot run here."""
        from offload.probe import require_backend

        require_backend(self.name)

    @property
    def verification_token(self) -> bytes | None:
        """The per-boot secret the shim or driver writes into the tag slot of a verified packet."""
        return None

    def start(self) -> None:
        """Set up what the backend needs in this process before the first connection (the
        relay calls it); a backend that needs nothing does nothing."""

    def close(self) -> None:
        """Undo start(): nothing of the backend stays behind in the kernel."""

    def stats(self) -> dict[str, Any]:
        """Counters for the relay's stats() `crypto` section."""
        return {"backend": self.name}

    def install(self, material: KeyMaterial) -> None:
        """Keys for one direction were installed or updated; called before the first packet needing them.

        Raise OffloadRefused (at the first install of a connection) to leave the connection
        to aioquic's standard crypto."""

    def teardown(self, connection: int, direction: Direction) -> None:
        """The connection's keys for that direction are gone; the kernel must stop using them."""

    def set_reset_token(self, connection: int, token: bytes) -> bool:
        """The peer's stateless reset token for the connection id in use (RFC 9000 §10.3;
        16 zero bytes: none): a kernel that drops undecryptable packets passes a datagram
        ending in it up instead. False: the backend does not hold the connection yet (ask
        again later); a backend that drops nothing has nothing to do."""
        return True
