"""1-RTT packet protection handed to a crypto backend (aioquic 1.7.2 `quic/crypto.py`, subclassed).

Two modes replace aioquic's 1-RTT `CryptoPair`; Initial and Handshake pairs are never touched:
- null (`none` backend, once both peers sent `disable_1rtt_encryption`): no header
  protection, no payload protection, no tag;
- pass-through (offloading backends): emit the plaintext layout (no header protection,
  payload in clear, a 16-byte tag slot the shim or NIC fills), export every key change to
  the backend, and accept a packet in plaintext layout only when its tag slot holds the
  backend's verification token. Any other packet goes through aioquic's real AEAD, so a
  forged plaintext packet cannot inject frames and a packet that reached userspace before
  the kernel had keys still decrypts.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Callable

from aioquic._crypto import CryptoError
from aioquic.quic.crypto import (
    CryptoContext,
    CryptoPair,
    KeyUnavailableError,
    NoCallback,
    derive_key_iv_hp,
)
from aioquic.quic.packet import QuicProtocolVersion, decode_packet_number
from aioquic.tls import cipher_suite_hash, hkdf_expand_label

from crypto_backends.base import (
    AEAD_TAG_SIZE,
    ConnectionPath,
    CryptoBackend,
    Direction,
    KeyMaterial,
    KeyTrigger,
    OffloadRefused,
    PhaseKeys,
)

Callback = Callable[[str], None]
PathOf = Callable[[Direction], "ConnectionPath | None"]


class OneRttMode(enum.Enum):
    STANDARD = "standard"
    NULL = "null"
    PASS_THROUGH = "pass-through"


def next_phase_secret(context: CryptoContext) -> bytes:
    """RFC 9001 §6.1: the next key phase's secret, `HKDF-Expand-Label(secret, "quic ku")`."""
    assert context.cipher_suite is not None and context.secret is not None
    algorithm = cipher_suite_hash(context.cipher_suite)
    label = b"quicv2 ku" if context.version == QuicProtocolVersion.VERSION_2 else b"quic ku"
    return hkdf_expand_label(algorithm, context.secret, label, b"", algorithm.digest_size)


def phase_keys(context: CryptoContext, secret: bytes, key_phase: int) -> PhaseKeys:
    assert context.cipher_suite is not None and context.version is not None
    key, iv, _ = derive_key_iv_hp(cipher_suite=context.cipher_suite, secret=secret,
                                  version=context.version)
    return PhaseKeys(key_phase=key_phase, secret=secret, key=key, iv=iv)


class OneRttCryptoPair(CryptoPair):
    """aioquic's 1-RTT crypto pair with protection delegated according to the backend."""

    def __init__(
        self,
        *,
        backend: CryptoBackend,
        connection: int,
        recv_setup_cb: Callback = NoCallback,
        recv_teardown_cb: Callback = NoCallback,
        send_setup_cb: Callback = NoCallback,
        send_teardown_cb: Callback = NoCallback,
        path_of: PathOf = lambda direction: None,
    ) -> None:
        self._backend = backend
        self._connection = connection
        self._path_of = path_of
        self._hp_keys: dict[Direction, bytes] = {}
        #: The receive keys last exported as current: the previous phase's after an update.
        self._recv_current: PhaseKeys | None = None
        #: Directions whose keys the backend holds (teardown tells it about these only).
        self._exported: set[Direction] = set()
        #: Why the backend left this connection to standard crypto (None: it did not).
        self.refused: str | None = None
        #: The peer address the backend keyed this connection by, and the length of the
        #: peer's connection id it parses outgoing short headers with.
        self._exported_peer: tuple[tuple[str, int], int] | None = None
        super().__init__(
            recv_setup_cb=self._chain_setup(Direction.RECV, recv_setup_cb),
            recv_teardown_cb=self._chain_teardown(Direction.RECV, recv_teardown_cb),
            send_setup_cb=self._chain_setup(Direction.SEND, send_setup_cb),
            send_teardown_cb=self._chain_teardown(Direction.SEND, send_teardown_cb),
        )
        if backend.offloads_1rtt:
            self.mode = OneRttMode.PASS_THROUGH
        else:
            # Null protection starts only once the peer agreed (see enable_null).
            self.mode = OneRttMode.STANDARD
        self.plaintext_accepted = 0
        #: The first packet number received in the current receive key phase (None: none yet).
        self._recv_phase_first_pn: int | None = None
        #: Packets the backend verified with the previous phase's keys and userspace read
        #: after the phase changed (a socket's queue outlives a key update).
        self.old_phase_accepted = 0
        self.token_mismatches = 0

    # --- negotiation ----------------------------------------------------------------

    def enable_null(self) -> None:
        """Both peers sent disable_1rtt_encryption: from now on 1-RTT packets carry no protection."""
        self.mode = OneRttMode.NULL
        self.aead_tag_size = 0

    # --- key export -----------------------------------------------------------------

    def _chain_setup(self, direction: Direction, qlog_cb: Callback) -> Callback:
        def setup(trigger: str) -> None:
            qlog_cb(trigger)
            if self.mode is not OneRttMode.PASS_THROUGH:
                return
            # Runs inside CryptoContext.setup / the key rotation, before the first packet
            # that needs these keys is protected or unprotected.
            material = self._key_material(direction, KeyTrigger(trigger))
            try:
                self._backend.install(material)
            except OffloadRefused as refused:
                self._refuse(str(refused))
                return
            self._exported.add(direction)
            if material.path is not None and direction is Direction.SEND:
                self._exported_peer = (material.path.peer, material.path.dcid_len)

        return setup

    def _chain_teardown(self, direction: Direction, qlog_cb: Callback) -> Callback:
        def teardown(trigger: str) -> None:
            qlog_cb(trigger)
            self._hp_keys.pop(direction, None)
            if direction in self._exported:
                self._exported.discard(direction)
                self._backend.teardown(self._connection, direction)

        return teardown

    def _refuse(self, reason: str) -> None:
        """The backend will not protect this connection: aioquic's own AEAD from now on.

        Only before any 1-RTT packet used the plaintext layout (the first install of each
        direction); keys already handed over for the other direction are withdrawn."""
        self.refused = reason
        self.mode = OneRttMode.STANDARD
        for direction in sorted(self._exported, key=lambda d: d.value):
            self._backend.teardown(self._connection, direction)
        self._exported.clear()

    def _key_material(self, direction: Direction, trigger: KeyTrigger) -> KeyMaterial:
        context = self.recv if direction is Direction.RECV else self.send
        assert context.cipher_suite is not None and context.secret is not None
        assert context.version is not None
        if trigger is KeyTrigger.INSTALL:
            # Header protection keys never rotate (RFC 9001 §6): keep the first ones.
            _, _, self._hp_keys[direction] = derive_key_iv_hp(
                cipher_suite=context.cipher_suite, secret=context.secret, version=context.version)
        current = phase_keys(context, context.secret, context.key_phase)
        following = phase_keys(context, next_phase_secret(context), context.key_phase ^ 1)
        previous = None
        if direction is Direction.RECV:
            # The secret chain runs one way (RFC 9001 §6.1): the previous phase's keys are
            # the ones exported last. Retention rule: the backend keeps them until the next
            # update replaces them (or the connection ends), not RFC 9001 §6.5's ~3 PTO: no
            # timer is needed, and old keys only ever open packets numbered below the
            # current phase's first, so keeping them longer admits nothing newer.
            if trigger is not KeyTrigger.INSTALL and self._recv_current is not None \
                    and self._recv_current.key_phase != current.key_phase:
                previous = self._recv_current
            self._recv_current = current
        return KeyMaterial(
            connection=self._connection,
            direction=direction,
            trigger=trigger,
            cipher_suite=context.cipher_suite,
            version=context.version,
            hp_key=self._hp_keys[direction],
            current=current,
            next=following,
            path=self._path_of(direction),
            previous=previous,
        )

    # --- packet protection ----------------------------------------------------------

    def encrypt_packet(self, plain_header: bytes, plain_payload: bytes, packet_number: int) -> bytes:
        if self.mode is OneRttMode.PASS_THROUGH and self._exported_peer is not None:
            self._check_peer()
        if self.mode is OneRttMode.STANDARD:
            return super().encrypt_packet(plain_header, plain_payload, packet_number)
        if self._update_key_requested:
            self._update_key("local_update")
            self._recv_phase_first_pn = None
        if not self.send.is_valid():
            raise KeyUnavailableError("Encryption key is not available")
        if self.mode is OneRttMode.NULL:
            return plain_header + plain_payload
        # The shim or NIC protects the header and writes the real tag into this slot.
        return plain_header + plain_payload + bytes(AEAD_TAG_SIZE)

    def _check_peer(self) -> None:
        """aioquic sends to its first network path; when that is not the address the kernel
        keyed (the peer migrated, RFC 9000 §9), the plaintext layout would leave unprotected,
        and with a peer connection id of another length the kernel would misread the header:
        userspace protects this connection from now on (fail closed)."""
        path = self._path_of(Direction.SEND)
        now = None if path is None else (path.peer, path.dcid_len)
        if now != self._exported_peer:
            assert self._exported_peer is not None
            if now is None or now[0] != self._exported_peer[0]:
                self._refuse(f"peer address changed from {self._exported_peer[0]} "
                             f"to {None if now is None else now[0]}")
            else:
                self._refuse(f"peer connection id length changed from "
                             f"{self._exported_peer[1]} to {now[1]}")

    def decrypt_packet(
        self, packet: bytes, encrypted_offset: int, expected_packet_number: int
    ) -> tuple[bytes, bytes, int]:
        if self.mode is OneRttMode.NULL:
            return self._accept_plaintext(packet, encrypted_offset, expected_packet_number, 0)
        if self.mode is OneRttMode.PASS_THROUGH and self._carries_token(packet):
            return self._accept_plaintext(packet, encrypted_offset, expected_packet_number,
                                          AEAD_TAG_SIZE)
        return super().decrypt_packet(packet, encrypted_offset, expected_packet_number)

    def _carries_token(self, packet: bytes) -> bool:
        token = self._backend.verification_token
        if token is None or len(packet) < AEAD_TAG_SIZE:
            return False
        if hmac.compare_digest(packet[-AEAD_TAG_SIZE:], token):
            return True
        self.token_mismatches += 1
        return False

    def _accept_plaintext(self, packet: bytes, encrypted_offset: int, expected_packet_number: int,
                          tag_size: int) -> tuple[bytes, bytes, int]:
        if not self.recv.is_valid():
            raise KeyUnavailableError("Decryption key is not available")
        first_byte = packet[0]
        pn_length = (first_byte & 0x03) + 1
        header_length = encrypted_offset + pn_length
        if len(packet) < header_length + tag_size:
            raise CryptoError("Packet is shorter than its header and tag")
        truncated = int.from_bytes(packet[encrypted_offset:header_length], "big")
        packet_number = decode_packet_number(truncated, pn_length * 8, expected_packet_number)
        payload = packet[header_length:len(packet) - tag_size]
        # A short header's key-phase bit is in the clear here. The backend verified the packet
        # with the keys of its bit, possibly before a key update the packet waited out in the
        # socket, or with the previous phase's by the same rule as here: the other bit is the
        # previous phase when nothing of the current one has arrived yet or its number is
        # lower than the current phase's first (RFC 9001 §6.5), and only otherwise the peer's
        # update.
        if (first_byte & 0x04) >> 2 != self.recv.key_phase:
            first = self._recv_phase_first_pn
            if first is None or packet_number < first:
                self.old_phase_accepted += 1
            else:
                self._update_key("remote_update")
                self._recv_phase_first_pn = packet_number
        elif self._recv_phase_first_pn is None or packet_number < self._recv_phase_first_pn:
            self._recv_phase_first_pn = packet_number
        self.plaintext_accepted += 1
        return packet[:header_length], payload, packet_number
