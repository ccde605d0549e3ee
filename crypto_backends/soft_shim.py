"""The `soft` backend's kernel shim from Python: load bpf/crypto_shim.c, write keys, read counters.

`SoftShim` compiles and loads the two TC programs (`shim_ingress`, `shim_egress`), holds the
per-boot verification token the shim writes into verified tag slots, and writes each
connection's per-direction key material (crypto_backends.base.KeyMaterial) into the
`shim_conns` map, keyed by the connection's local and peer address and UDP port (so peers
with zero-length connection ids are found too).

The ctypes structs below mirror bpf/shim_structs.h field by field;
tests/kernel/test_crypto_shim_structs.py checks that the two agree.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aioquic.tls import CipherSuite
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from crypto_backends.base import AEAD_TAG_SIZE, Direction, KeyMaterial, PhaseKeys
from relay import bpfload

SOURCE = "crypto_shim.c"
STRUCTS = "shim_structs.h"
INGRESS_FUNCTION = "shim_ingress"
EGRESS_FUNCTION = "shim_egress"
CONNS_MAP = "shim_conns"
CONFIG_MAP = "shim_config"
STATS_MAP = "shim_stats"

# --- shared with bpf/shim_structs.h ----------------------------------------------------

SHIM_MAX_CONNS = 8192
SHIM_MAX_CID_LEN = 20
SHIM_DIR_RECV = 0
SHIM_DIR_SEND = 1
SHIM_STATE_PASS = 0
SHIM_STATE_NO_KEYS = 1
SHIM_STATE_KEYS = 2
SHIM_CONN_FASTPATH = 0x1
SHIM_PHASE_PREVIOUS = 2
#: shim_conn.reset_token: the peer's stateless reset token (RFC 9000 §10.3), zero: none.
RESET_TOKEN_SIZE = 16

#: The only suite the shim implements (RFC 9001 §5.3 AEAD, §5.4.4 header protection).
SUPPORTED_SUITE = CipherSuite.CHACHA20_POLY1305_SHA256

_DIRECTIONS = {Direction.RECV: SHIM_DIR_RECV, Direction.SEND: SHIM_DIR_SEND}


class ShimConnKey(ctypes.Structure):
    _fields_ = [
        ("local_addr", ctypes.c_uint8 * 16),
        ("peer_addr", ctypes.c_uint8 * 16),
        ("local_port", ctypes.c_uint16),
        ("peer_port", ctypes.c_uint16),
        ("direction", ctypes.c_uint32),
    ]


class ShimPhaseKeys(ctypes.Structure):
    _fields_ = [
        ("key", ctypes.c_uint8 * 32),
        ("iv", ctypes.c_uint8 * 12),
        ("valid", ctypes.c_uint32),
    ]


class ShimConn(ctypes.Structure):
    _fields_ = [
        ("state", ctypes.c_uint32),
        ("dcid_len", ctypes.c_uint32),
        ("hp_key", ctypes.c_uint8 * 32),
        ("phase", ShimPhaseKeys * 3),
        ("next_pn", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("fr_conn_idx", ctypes.c_uint32),
        ("phase_first_pn", ctypes.c_uint64 * 2),
        ("current_phase", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("reset_token", ctypes.c_uint8 * RESET_TOKEN_SIZE),
    ]


class ShimConfig(ctypes.Structure):
    _fields_ = [("token", ctypes.c_uint8 * 16)]


class ShimStats(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "ingress_packets", "ingress_bytes", "ingress_passed", "ingress_decrypted",
        "ingress_no_keys", "ingress_too_long", "ingress_gso", "ingress_drop_too_short",
        "ingress_drop_bad_tag", "ingress_drop_no_phase", "ingress_drop_error",
        "egress_packets", "egress_bytes", "egress_passed", "egress_encrypted",
        "egress_drop_no_keys", "egress_drop_too_short", "egress_drop_too_long", "egress_drop_gso",
        "egress_drop_no_phase", "egress_drop_error", "egress_drop_wrong_conn",
        "ingress_key_phase_1", "egress_key_phase_1", "ingress_previous_phase",
        "ingress_stateless_reset",
    )]


Address = tuple[str, int]


def _addr16(host: str) -> bytes:
    ip = ipaddress.ip_address(host)
    if ip.version == 4:
        return ipaddress.IPv6Address(f"::ffff:{ip}").packed
    return ip.packed


def conn_key(local: Address, peer: Address, direction: Direction) -> bytes:
    """The shim_conns key of one direction of the connection between local and peer."""
    key = ShimConnKey()
    key.local_addr[:] = _addr16(local[0])
    key.peer_addr[:] = _addr16(peer[0])
    key.local_port = int.from_bytes(local[1].to_bytes(2, "big"), "little")  # network order
    key.peer_port = int.from_bytes(peer[1].to_bytes(2, "big"), "little")
    key.direction = _DIRECTIONS[direction]
    return bytes(key)


def conn_value(material: KeyMaterial, *, dcid_len: int, next_pn: int = 0,
               fastpath_conn: int | None = None, reset_token: bytes = b"") -> ShimConn:
    """The shim_conns value for KeyMaterial: keys of both phases, indexed by key-phase bit,
    and the receive direction's previous phase after a key update (SHIM_PHASE_PREVIOUS);
    `fastpath_conn`: the fast path's connection index (fr_conns) when it holds the connection;
    `reset_token`: the peer's stateless reset token (receive direction; empty: none).
    No packet number of any phase is known yet (phase_first_pn: see carry_first_pns)."""
    if material.cipher_suite != SUPPORTED_SUITE:
        raise ValueError(f"the soft shim protects only {SUPPORTED_SUITE.name}, "
                         f"not {CipherSuite(material.cipher_suite).name}")
    if not 0 <= dcid_len <= SHIM_MAX_CID_LEN:
        raise ValueError(f"connection id length {dcid_len} is not 0..{SHIM_MAX_CID_LEN}")
    value = ShimConn(state=SHIM_STATE_KEYS, dcid_len=dcid_len, next_pn=next_pn,
                     current_phase=material.current.key_phase & 1)
    _link(value, fastpath_conn)
    _set_token(value, reset_token)
    value.hp_key[:] = material.hp_key
    slots = [(material.current.key_phase & 1, material.current),
             (material.next.key_phase & 1, material.next)]
    if material.previous is not None:
        slots.append((SHIM_PHASE_PREVIOUS, material.previous))
    for index, keys in slots:
        slot = value.phase[index]
        slot.key[:] = keys.key
        slot.iv[:] = keys.iv
        slot.valid = 1
    return value


def carry_first_pns(old: ShimConn, new: ShimConn) -> None:
    """Keep the first packet number the shim recorded for a key-phase bit whose keys stay
    the same: after the peer's key update the new current phase was the old next one, and
    the packet that started it (verified by the shim before userspace saw it) is its first."""
    for bit in (0, 1):
        before, after = old.phase[bit], new.phase[bit]
        if (before.valid and after.valid and bytes(before.key) == bytes(after.key)
                and bytes(before.iv) == bytes(after.iv)):
            new.phase_first_pn[bit] = old.phase_first_pn[bit]


def _set_token(value: ShimConn, token: bytes) -> None:
    if token and len(token) != RESET_TOKEN_SIZE:
        raise ValueError(f"a stateless reset token has {RESET_TOKEN_SIZE} bytes, not {len(token)}")
    value.reset_token[:] = token or bytes(RESET_TOKEN_SIZE)


def _linked(value: ShimConn) -> int | None:
    """The fast path's connection index an entry carries (_link's inverse)."""
    return value.fr_conn_idx if value.flags & SHIM_CONN_FASTPATH else None


def _link(value: ShimConn, fastpath_conn: int | None) -> None:
    value.flags = SHIM_CONN_FASTPATH if fastpath_conn is not None else 0
    value.fr_conn_idx = fastpath_conn or 0


# --- reference protection (RFC 9001 §5.3-5.4 with `cryptography`) -----------------------
# What the shim does, in Python: the shim's tests and the bench's shim cost check the kernel
# against it.


def hp_mask(hp: bytes, sample: bytes) -> bytes:
    """ChaCha20 header-protection mask of a 16-byte sample (RFC 9001 §5.4.4)."""
    return Cipher(algorithms.ChaCha20(hp, sample), mode=None).encryptor().update(bytes(5))


def protect(header: bytes, payload: bytes, pn: int, keys: PhaseKeys, hp: bytes,
            pn_offset: int) -> bytes:
    """The wire form of a short-header packet: AEAD seal, then header protection."""
    nonce = bytes(a ^ b for a, b in zip(keys.iv, pn.to_bytes(12, "big")))
    packet = bytearray(header + ChaCha20Poly1305(keys.key).encrypt(nonce, payload, header))
    mask = hp_mask(hp, bytes(packet[pn_offset + 4:pn_offset + 20]))
    pn_len = (header[0] & 0x03) + 1
    packet[0] ^= mask[0] & 0x1F
    for i in range(pn_len):
        packet[pn_offset + i] ^= mask[1 + i]
    return bytes(packet)


@dataclass
class ShimEntry:
    state: int
    dcid_len: int
    next_pn: int
    #: the fast path's connection index when it holds the connection (SHIM_CONN_FASTPATH)
    fastpath_conn: int | None = None
    #: the peer's stateless reset token the shim passes up (zero: none)
    reset_token: bytes = bytes(RESET_TOKEN_SIZE)


class SoftShim:
    """The loaded shim: its two programs, its maps and the per-boot verification token."""

    def __init__(self, *, cflags: tuple[str, ...] = ()) -> None:
        bpfload.require_root("the soft crypto shim")
        # The C reads buffers through several integer types; never let clang reorder them.
        self._bpf: Any = bpfload.compile_program(SOURCE, cflags=("-fno-strict-aliasing", *cflags))
        self.ingress = bpfload.load_sched_cls(self._bpf, INGRESS_FUNCTION)
        self.egress = bpfload.load_sched_cls(self._bpf, EGRESS_FUNCTION)
        self._conns = self._bpf[CONNS_MAP.encode()]
        self._conns_fd: int = self._conns.map_fd
        self._config_fd: int = self._bpf[CONFIG_MAP.encode()].map_fd
        self._stats_fd: int = self._bpf[STATS_MAP.encode()].map_fd
        self._cpus = bpfload.possible_cpus()
        self.token = os.urandom(AEAD_TAG_SIZE)
        config = ShimConfig()
        config.token[:] = self.token
        bpfload.map_update(self._config_fd, (0).to_bytes(4, "little"), bytes(config))
        self.clear_stats()

    def close(self) -> None:
        """Unload the programs and maps (filters already attached keep their programs)."""
        self._bpf.cleanup()

    # --- keys ------------------------------------------------------------------------

    def install(self, local: Address, peer: Address, material: KeyMaterial, *, dcid_len: int,
                next_pn: int | None = None, reset_token: bytes | None = None) -> None:
        """Write (or update on a key update) one direction's keys; keeps the packet-number
        state the shim has (the largest unless next_pn is given, the first of each phase
        whose keys stay), the link to the fast path, and the stateless reset token
        unless reset_token is given."""
        key = conn_key(local, peer, material.direction)
        old = self._read(key)
        if next_pn is None:
            next_pn = old.next_pn if old is not None else 0
        if reset_token is None:
            reset_token = bytes(old.reset_token) if old is not None else b""
        linked = _linked(old) if old is not None else None
        value = conn_value(material, dcid_len=dcid_len, next_pn=next_pn, fastpath_conn=linked,
                           reset_token=reset_token)
        if old is not None and old.state == SHIM_STATE_KEYS:
            carry_first_pns(old, value)
        bpfload.map_update(self._conns_fd, key, bytes(value))

    def set_reset_token(self, local: Address, peer: Address, token: bytes) -> bool:
        """The peer's stateless reset token (zero: none) for the receive entry: a datagram
        that does not verify but ends in it is passed up, not dropped. False without entry."""
        return self._rewrite(conn_key(local, peer, Direction.RECV),
                             lambda value: _set_token(value, token))

    def link_fastpath(self, local: Address, peer: Address, direction: Direction,
                      fastpath_conn: int | None) -> bool:
        """Tell one direction's entry the fast path's connection index (None: the fast path
        no longer holds it). False when the shim has no entry for it."""
        return self._rewrite(conn_key(local, peer, direction),
                             lambda value: _link(value, fastpath_conn))

    def _read(self, key: bytes) -> ShimConn | None:
        raw = bpfload.map_lookup(self._conns_fd, key, ctypes.sizeof(ShimConn))
        return ShimConn.from_buffer_copy(raw) if raw is not None else None

    def _rewrite(self, key: bytes, change: Callable[[ShimConn], None]) -> bool:
        """Change one field group of an existing entry; False when there is none."""
        value = self._read(key)
        if value is None:
            return False
        change(value)
        bpfload.map_update(self._conns_fd, key, bytes(value))
        return True

    def set_state(self, local: Address, peer: Address, direction: Direction, state: int, *,
                  dcid_len: int = 0) -> None:
        """An entry without keys: SHIM_STATE_NO_KEYS (offloaded, keys pending) or SHIM_STATE_PASS."""
        if state == SHIM_STATE_KEYS:
            raise ValueError("install() writes entries with keys")
        value = ShimConn(state=state, dcid_len=dcid_len)
        bpfload.map_update(self._conns_fd, conn_key(local, peer, direction), bytes(value))

    def remove(self, local: Address, peer: Address, direction: Direction) -> None:
        raw = conn_key(local, peer, direction)
        try:
            del self._conns[self._conns.Key.from_buffer_copy(raw)]
        except KeyError:
            pass

    def entry(self, local: Address, peer: Address, direction: Direction) -> ShimEntry | None:
        value = self._read(conn_key(local, peer, direction))
        if value is None:
            return None
        return ShimEntry(state=value.state, dcid_len=value.dcid_len, next_pn=value.next_pn,
                         fastpath_conn=_linked(value), reset_token=bytes(value.reset_token))

    # --- counters --------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters summed over CPUs."""
        size = ctypes.sizeof(ShimStats)
        raw = bpfload.map_lookup(self._stats_fd, (0).to_bytes(4, "little"), size * self._cpus)
        totals = dict.fromkeys((name for name, _ in ShimStats._fields_), 0)
        if raw is None:
            return totals
        for cpu in range(self._cpus):
            one = ShimStats.from_buffer_copy(raw, cpu * size)
            for name in totals:
                totals[name] += getattr(one, name)
        return totals

    def clear_stats(self) -> None:
        bpfload.map_update(self._stats_fd, (0).to_bytes(4, "little"),
                           bytes(ctypes.sizeof(ShimStats) * self._cpus))
