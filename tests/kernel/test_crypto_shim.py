"""bpf/crypto_shim.c through BPF_PROG_TEST_RUN: crafted frame in, asserted frame out.

Reference: RFC 9001 Appendix A.5 (exact bytes), and the `cryptography` package
(ChaCha20Poly1305 for the AEAD, the ChaCha20 cipher for header protection) for
randomised packets of every size from the smallest that can be sampled (RFC 9001
§5.4.2: 1 + DCID + 4 + 16 bytes) to the largest a 1500-byte MTU carries (1472 bytes over
IPv4, 1452 over IPv6), both directions. Every output's UDP checksum is recomputed here.
"""

from __future__ import annotations

import os
import random
import struct
from dataclasses import dataclass, replace

import pytest
from aioquic.quic.crypto import derive_key_iv_hp
from aioquic.tls import CipherSuite, cipher_suite_hash, hkdf_expand_label

from crypto_backends.base import Direction, KeyMaterial, KeyTrigger, PhaseKeys
from crypto_backends.soft_shim import hp_mask, protect  # noqa: F401  (used by other shim tests)
from relay.bpfload import prog_test_run
from tests.kernel.packets import IP4_A, IP4_B, IP6_A, IP6_B, PORT_A, PORT_B, Udp, ipv4_variant

pytestmark = pytest.mark.root

TC_ACT_UNSPEC = 0xFFFFFFFF  # -1 as the u32 retval
TC_ACT_SHOT = 2
SUITE = CipherSuite.CHACHA20_POLY1305_SHA256
TAG = 16

# https://www.rfc-editor.org/rfc/rfc9001#appendix-A.5
A5_SECRET = bytes.fromhex("9ac312a7f877468ebe69422748ad00a15443f18203a07d6060f688f30f21632b")
A5_KEY = bytes.fromhex("c6d98ff3441c3fe1b2182094f69caa2ed4b716b65488960a7a984979fb23e1c8")
A5_IV = bytes.fromhex("e0459b3474bdd0e44a41c144")
A5_HP = bytes.fromhex("25a282b9e82f06f21f488917a4fc8f1b73573685608597d0efcb076b0ab7a7a4")
A5_PN = 654360564
A5_HEADER = bytes.fromhex("4200bff4")
A5_PAYLOAD = bytes.fromhex("01")
A5_PROTECTED = bytes.fromhex("4cfe4189655e5cd55c41f69080575d7999c25a5bfb")

# The relay is A; the peer B. Ingress frames go B -> A, egress frames A -> B.
V4_EGRESS = Udp(IP4_A, IP4_B, PORT_A, PORT_B)
V6_EGRESS = Udp(IP6_A, IP6_B, PORT_A, PORT_B)
RELAY4, PEER4 = (IP4_A, PORT_A), (IP4_B, PORT_B)
RELAY6, PEER6 = (IP6_A, PORT_A), (IP6_B, PORT_B)
MTU = 1500


# --- reference (cryptography) ---------------------------------------------------------

def next_secret(secret: bytes) -> bytes:
    algorithm = cipher_suite_hash(SUITE)
    return hkdf_expand_label(algorithm, secret, b"quic ku", b"", algorithm.digest_size)


def material(secret: bytes, direction: Direction, key_phase: int = 0) -> KeyMaterial:
    """KeyMaterial as relay.quic.crypto exports it: hp from the first secret, current and next."""
    _, _, hp = derive_key_iv_hp(cipher_suite=SUITE, secret=secret, version=1)
    following = next_secret(secret)
    k0, iv0, _ = derive_key_iv_hp(cipher_suite=SUITE, secret=secret, version=1)
    k1, iv1, _ = derive_key_iv_hp(cipher_suite=SUITE, secret=following, version=1)
    return KeyMaterial(connection=1, direction=direction, trigger=KeyTrigger.INSTALL,
                       cipher_suite=SUITE, version=1, hp_key=hp,
                       current=PhaseKeys(key_phase, secret, k0, iv0),
                       next=PhaseKeys(key_phase ^ 1, following, k1, iv1))


def keys_for_phase(m: KeyMaterial, key_phase: int) -> PhaseKeys:
    return m.current if m.current.key_phase == key_phase else m.next


@dataclass(frozen=True)
class Plain:
    """One short-header packet in the clear: header (with truncated PN), payload, full PN."""

    header: bytes
    payload: bytes
    pn: int
    key_phase: int

    def layout(self) -> bytes:
        """What userspace hands the egress shim: header, payload, zeroed tag slot."""
        return self.header + self.payload + bytes(TAG)


def plain_packet(rng: random.Random, size: int, dcid_len: int, expected: int, *,
                 pn_len: int | None = None, key_phase: int | None = None) -> Plain:
    """A random packet of `size` bytes on the wire whose PN decodes against `expected`."""
    pn_len = pn_len or rng.randint(1, 4)
    key_phase = rng.randint(0, 1) if key_phase is None else key_phase
    half = 1 << (pn_len * 8 - 1)
    pn = max(0, expected + rng.randint(-(half - 1), half - 1))
    first = 0x40 | (key_phase << 2) | (pn_len - 1) | (rng.randint(0, 1) << 5)
    header = (bytes([first]) + rng.randbytes(dcid_len)
              + (pn & ((1 << (pn_len * 8)) - 1)).to_bytes(pn_len, "big"))
    payload_len = size - len(header) - TAG
    assert payload_len >= 0
    return Plain(header, rng.randbytes(payload_len), pn, key_phase)


# --- the shim ---------------------------------------------------------------------------

@pytest.fixture
def fresh(shim):
    for local, peer in ((RELAY4, PEER4), (RELAY6, PEER6)):
        for direction in Direction:
            shim.remove(local, peer, direction)
    shim.clear_stats()
    return shim


def run(prog, frame: bytes):
    result = prog_test_run(prog.fd, frame)
    return result.retval, result.data


def delta(shim, **expected: int) -> None:
    """Every verdict counter equals `expected` (missing names: 0); bytes and the key-phase
    counts are checked where they matter."""
    stats = shim.stats()
    assert {k: v for k, v in stats.items()
            if v and not k.endswith(("_bytes", "_key_phase_1"))} == expected


def egress_frame(udp: Udp, quic: bytes, prefix: bytes = b"") -> bytes:
    return udp.frame(prefix + quic)


# --- RFC 9001 Appendix A.5 --------------------------------------------------------------

def test_a5_keys_from_secret() -> None:
    m = material(A5_SECRET, Direction.SEND)
    assert (m.current.key, m.current.iv, m.hp_key) == (A5_KEY, A5_IV, A5_HP)


def test_a5_egress_exact(fresh) -> None:
    fresh.install(RELAY4, PEER4, material(A5_SECRET, Direction.SEND), dcid_len=0, next_pn=A5_PN)
    frame = V4_EGRESS.frame(A5_HEADER + A5_PAYLOAD + bytes(TAG))
    verdict, out = run(fresh.egress, frame)
    assert verdict == TC_ACT_UNSPEC
    assert V4_EGRESS.payload(out) == A5_PROTECTED
    assert out[:V4_EGRESS.payload_offset - 2] == frame[:V4_EGRESS.payload_offset - 2]
    assert V4_EGRESS.udp_checksum_ok(out)
    delta(fresh, egress_packets=1, egress_encrypted=1)
    assert fresh.entry(RELAY4, PEER4, Direction.SEND).next_pn == A5_PN + 1


def test_a5_ingress_exact(fresh) -> None:
    fresh.install(RELAY4, PEER4, material(A5_SECRET, Direction.RECV), dcid_len=0, next_pn=A5_PN)
    udp = V4_EGRESS.reversed()
    verdict, out = run(fresh.ingress, udp.frame(A5_PROTECTED))
    assert verdict == TC_ACT_UNSPEC
    assert udp.payload(out) == A5_HEADER + A5_PAYLOAD + fresh.token
    assert udp.udp_checksum_ok(out)
    delta(fresh, ingress_packets=1, ingress_decrypted=1)
    assert fresh.entry(RELAY4, PEER4, Direction.RECV).next_pn == A5_PN + 1


# --- every size, both directions ---------------------------------------------------------

def smallest(dcid_len: int) -> int:
    return 1 + dcid_len + 4 + 16


def largest(udp: Udp) -> int:
    return MTU - (udp.payload_offset - 14)


# (family, DCID length): every packet size from smallest(dcid) to largest(udp) inclusive.
SWEEPS = [(V4_EGRESS, 8), (V6_EGRESS, 0), (V4_EGRESS, 20)]


@pytest.mark.parametrize("udp,dcid_len", SWEEPS, ids=["ipv4-dcid8", "ipv6-dcid0", "ipv4-dcid20"])
def test_every_size_matches_cryptography(fresh, udp: Udp, dcid_len: int) -> None:
    rng = random.Random(f"{udp.src}-{dcid_len}")
    relay, peer = (RELAY6, PEER6) if udp.ipv6 else (RELAY4, PEER4)
    send = material(os.urandom(32), Direction.SEND, key_phase=rng.randint(0, 1))
    recv = material(os.urandom(32), Direction.RECV, key_phase=rng.randint(0, 1))
    sizes = range(smallest(dcid_len), largest(udp) + 1)
    for size in sizes:
        expected = rng.choice([0, 1, 255, 65536, rng.randint(0, 1 << 40), (1 << 62) - (1 << 33)])
        # egress: plaintext layout in, protected packet out
        p = plain_packet(rng, size, dcid_len, expected)
        fresh.install(relay, peer, send, dcid_len=dcid_len, next_pn=expected)
        want = protect(p.header, p.payload, p.pn, keys_for_phase(send, p.key_phase), send.hp_key,
                       1 + dcid_len)
        verdict, out = run(fresh.egress, udp.frame(p.layout()))
        assert verdict == TC_ACT_UNSPEC, size
        assert udp.payload(out) == want, size
        assert udp.udp_checksum_ok(out), size
        # ingress: protected packet in, plaintext layout with the token out
        q = plain_packet(rng, size, dcid_len, expected)
        fresh.install(relay, peer, recv, dcid_len=dcid_len, next_pn=expected)
        wire = protect(q.header, q.payload, q.pn, keys_for_phase(recv, q.key_phase), recv.hp_key,
                       1 + dcid_len)
        back = udp.reversed()
        verdict, out = run(fresh.ingress, back.frame(wire))
        assert verdict == TC_ACT_UNSPEC, size
        assert back.payload(out) == q.header + q.payload + fresh.token, size
        assert back.udp_checksum_ok(out), size
        assert fresh.entry(relay, peer, Direction.RECV).next_pn == max(expected, q.pn + 1), size
    n = len(sizes)
    delta(fresh, egress_packets=n, egress_encrypted=n, ingress_packets=n, ingress_decrypted=n)


@pytest.mark.parametrize("dcid_len", [0, 8])
def test_too_short_to_sample_is_dropped(fresh, dcid_len: int) -> None:
    fresh.install(RELAY4, PEER4, material(A5_SECRET, Direction.SEND), dcid_len=dcid_len)
    fresh.install(RELAY4, PEER4, material(A5_SECRET, Direction.RECV), dcid_len=dcid_len)
    rng = random.Random(dcid_len)
    sizes = range(1, smallest(dcid_len))
    for size in sizes:
        quic = bytes([0x40 | rng.randint(0, 0x3F)]) + rng.randbytes(size - 1)
        assert run(fresh.egress, V4_EGRESS.frame(quic))[0] == TC_ACT_SHOT, size
        assert run(fresh.ingress, V4_EGRESS.reversed().frame(quic))[0] == TC_ACT_SHOT, size
    n = len(sizes)
    delta(fresh, egress_packets=n, egress_drop_too_short=n, ingress_packets=n,
          ingress_drop_too_short=n)


def test_longer_than_mtu_payload(fresh) -> None:
    """Past the shim's buffer: egress drops (never plaintext), ingress hands up untouched."""
    fresh.install(RELAY4, PEER4, material(A5_SECRET, Direction.SEND), dcid_len=0)
    fresh.install(RELAY4, PEER4, material(A5_SECRET, Direction.RECV), dcid_len=0)
    quic = bytes([0x40]) + bytes(1) + os.urandom(1480)
    assert run(fresh.egress, V4_EGRESS.frame(quic))[0] == TC_ACT_SHOT
    frame = V4_EGRESS.reversed().frame(quic)
    assert run(fresh.ingress, frame) == (TC_ACT_UNSPEC, frame)
    delta(fresh, egress_packets=1, egress_drop_too_long=1, ingress_packets=1, ingress_too_long=1)


# --- fail closed ------------------------------------------------------------------------

def _wire(rng: random.Random, m: KeyMaterial, size: int, dcid_len: int, expected: int) -> tuple[Plain, bytes]:
    q = plain_packet(rng, size, dcid_len, expected)
    return q, protect(q.header, q.payload, q.pn, keys_for_phase(m, q.key_phase), m.hp_key, 1 + dcid_len)


@pytest.mark.parametrize("where", ["first-byte", "dcid", "packet-number", "payload", "tag"])
def test_flipped_bit_is_dropped_and_counted(fresh, where: str) -> None:
    rng = random.Random(where)
    recv = material(os.urandom(32), Direction.RECV)
    udp = V4_EGRESS.reversed()
    dcid_len, trials = 8, 40
    for _ in range(trials):
        fresh.install(RELAY4, PEER4, recv, dcid_len=dcid_len, next_pn=1000)
        q, wire = _wire(rng, recv, rng.randint(60, 1400), dcid_len, 1000)
        pn_len = len(q.header) - 1 - dcid_len
        offset = {"first-byte": 0,
                  "dcid": rng.randint(1, dcid_len),
                  "packet-number": 1 + dcid_len + rng.randrange(pn_len),
                  "payload": rng.randint(len(q.header), len(wire) - TAG - 1),
                  "tag": rng.randint(len(wire) - TAG, len(wire) - 1)}[where]
        bit = rng.randrange(5) if where == "first-byte" else rng.randrange(8)
        bad = bytearray(wire)
        bad[offset] ^= 1 << bit
        frame = udp.frame(bytes(bad))
        assert run(fresh.ingress, frame)[0] == TC_ACT_SHOT, (offset, bit)
        assert fresh.entry(RELAY4, PEER4, Direction.RECV).next_pn == 1000
    delta(fresh, ingress_packets=trials, ingress_drop_bad_tag=trials)


def test_zero_tag_forgery_is_dropped(fresh) -> None:
    """A plaintext-layout packet with a zero tag (what userspace itself emits) is no packet."""
    fresh.install(RELAY4, PEER4, material(A5_SECRET, Direction.RECV), dcid_len=0, next_pn=A5_PN)
    frame = V4_EGRESS.reversed().frame(A5_HEADER + A5_PAYLOAD + bytes(TAG))
    assert run(fresh.ingress, frame)[0] == TC_ACT_SHOT
    delta(fresh, ingress_packets=1, ingress_drop_bad_tag=1)


def test_egress_without_keys_is_dropped_ingress_handed_up(fresh) -> None:
    from crypto_backends.soft_shim import SHIM_STATE_NO_KEYS

    fresh.set_state(RELAY4, PEER4, Direction.SEND, SHIM_STATE_NO_KEYS, dcid_len=0)
    fresh.set_state(RELAY4, PEER4, Direction.RECV, SHIM_STATE_NO_KEYS, dcid_len=0)
    assert run(fresh.egress, V4_EGRESS.frame(A5_HEADER + A5_PAYLOAD + bytes(TAG)))[0] == TC_ACT_SHOT
    frame = V4_EGRESS.reversed().frame(A5_PROTECTED)
    assert run(fresh.ingress, frame) == (TC_ACT_UNSPEC, frame)
    delta(fresh, egress_packets=1, egress_drop_no_keys=1, ingress_packets=1, ingress_no_keys=1)


def test_unknown_and_pass_connections_untouched(fresh) -> None:
    from crypto_backends.soft_shim import SHIM_STATE_PASS

    out_frame = V4_EGRESS.frame(A5_HEADER + A5_PAYLOAD + bytes(TAG))
    in_frame = V4_EGRESS.reversed().frame(A5_PROTECTED)
    other = Udp(IP4_A, IP4_B, PORT_A, PORT_B + 1).frame(A5_HEADER + A5_PAYLOAD + bytes(TAG))
    fresh.install(RELAY4, PEER4, material(A5_SECRET, Direction.SEND), dcid_len=0)
    assert run(fresh.egress, other) == (TC_ACT_UNSPEC, other)
    fresh.remove(RELAY4, PEER4, Direction.SEND)
    assert run(fresh.egress, out_frame) == (TC_ACT_UNSPEC, out_frame)
    assert run(fresh.ingress, in_frame) == (TC_ACT_UNSPEC, in_frame)
    fresh.set_state(RELAY4, PEER4, Direction.SEND, SHIM_STATE_PASS)
    fresh.set_state(RELAY4, PEER4, Direction.RECV, SHIM_STATE_PASS)
    assert run(fresh.egress, out_frame) == (TC_ACT_UNSPEC, out_frame)
    assert run(fresh.ingress, in_frame) == (TC_ACT_UNSPEC, in_frame)
    delta(fresh, egress_packets=3, egress_passed=3, ingress_packets=2, ingress_passed=2)


def test_not_quic_short_header_untouched(fresh) -> None:
    fresh.install(RELAY4, PEER4, material(A5_SECRET, Direction.SEND), dcid_len=0)
    for payload in (b"", b"\x00" * 40, bytes([0xC0]) + os.urandom(50)):
        frame = V4_EGRESS.frame(payload)
        assert run(fresh.egress, frame) == (TC_ACT_UNSPEC, frame)
    delta(fresh, egress_packets=3, egress_passed=3)


# --- key phases, packet numbers, coalescing ----------------------------------------------

def test_key_phase_bit_selects_keys(fresh) -> None:
    rng = random.Random(7)
    recv = material(os.urandom(32), Direction.RECV, key_phase=1)  # current is phase 1
    send = material(os.urandom(32), Direction.SEND, key_phase=0)
    udp = V4_EGRESS
    for key_phase in (0, 1, 0, 1):
        fresh.install(RELAY4, PEER4, send, dcid_len=8, next_pn=50)
        p = plain_packet(rng, 300, 8, 50, key_phase=key_phase)
        _, out = run(fresh.egress, udp.frame(p.layout()))
        assert udp.payload(out) == protect(p.header, p.payload, p.pn, keys_for_phase(send, key_phase),
                                           send.hp_key, 9)
        fresh.install(RELAY4, PEER4, recv, dcid_len=8, next_pn=50)
        q = plain_packet(rng, 300, 8, 50, key_phase=key_phase)
        right = protect(q.header, q.payload, q.pn, keys_for_phase(recv, key_phase), recv.hp_key, 9)
        wrong = protect(q.header, q.payload, q.pn, keys_for_phase(recv, key_phase ^ 1), recv.hp_key, 9)
        verdict, out = run(fresh.ingress, udp.reversed().frame(right))
        assert verdict == TC_ACT_UNSPEC and udp.reversed().payload(out)[-TAG:] == fresh.token
        assert run(fresh.ingress, udp.reversed().frame(wrong))[0] == TC_ACT_SHOT
    delta(fresh, egress_packets=4, egress_encrypted=4, ingress_packets=8, ingress_decrypted=4,
          ingress_drop_bad_tag=4)
    stats = fresh.stats()  # two of each direction's four protected packets were in phase 1
    assert (stats["egress_key_phase_1"], stats["ingress_key_phase_1"]) == (2, 2)


def test_key_update_keeps_packet_numbers(fresh) -> None:
    """install() on a key update keeps the largest PN the shim saw."""
    fresh.install(RELAY4, PEER4, material(A5_SECRET, Direction.RECV), dcid_len=0, next_pn=A5_PN)
    run(fresh.ingress, V4_EGRESS.reversed().frame(A5_PROTECTED))
    fresh.install(RELAY4, PEER4, material(next_secret(A5_SECRET), Direction.RECV, key_phase=1),
                  dcid_len=0)
    assert fresh.entry(RELAY4, PEER4, Direction.RECV).next_pn == A5_PN + 1


def updated(m: KeyMaterial, trigger: KeyTrigger) -> KeyMaterial:
    """The receive material after a key update, as relay.quic.crypto exports it: the next
    phase is current, the one after it next, the replaced one previous (RFC 9001 §6.5)."""
    following = material(m.next.secret, m.direction, key_phase=m.next.key_phase)
    return replace(following, trigger=trigger, hp_key=m.hp_key, previous=m.current)


def _receive(shim, rng: random.Random, m: KeyMaterial, keys: PhaseKeys, pn: int, key_phase: int,
             *, tamper: bool = False) -> bool:
    """A peer's packet numbered `pn` with key-phase bit `key_phase`, sealed with `keys`,
    through shim_ingress: True when it came out verified (token in the tag slot)."""
    header = bytes([0x40 | (key_phase << 2) | 0x01]) + rng.randbytes(8) + (pn & 0xFFFF).to_bytes(2, "big")
    payload = rng.randbytes(120)
    wire = bytearray(protect(header, payload, pn, keys, m.hp_key, 9))
    if tamper:
        wire[len(header) + 7] ^= 0x10
    udp = V4_EGRESS.reversed()
    verdict, out = run(shim.ingress, udp.frame(bytes(wire)))
    if verdict == TC_ACT_SHOT:
        return False
    assert verdict == TC_ACT_UNSPEC and udp.payload(out) == header + payload + shim.token
    return True


def test_relay_key_update_keeps_the_previous_receive_phase(fresh) -> None:
    """The relay starts a key update: the shim's receive entry switches to the next phase at
    once, while the peer still sends (and has in flight) packets of the old one. RFC 9001
    §6.5: the old bit opens with the previous keys below the first number received in the
    new phase (or before any), with the next keys from there on."""
    rng = random.Random("previous")
    old = material(os.urandom(32), Direction.RECV, key_phase=0)
    fresh.install(RELAY4, PEER4, old, dcid_len=8, next_pn=100)
    assert all(_receive(fresh, rng, old, old.current, pn, 0) for pn in (100, 101, 102))
    new = updated(old, KeyTrigger.LOCAL_UPDATE)
    fresh.install(RELAY4, PEER4, new, dcid_len=8)
    # in flight before the peer followed: nothing of phase 1 received yet
    assert _receive(fresh, rng, new, old.current, 104, 0)
    assert not _receive(fresh, rng, new, old.current, 105, 0, tamper=True)  # still fails closed
    # the peer follows from 107 on; 106 arrives late, reordered
    assert _receive(fresh, rng, new, new.current, 107, 1)
    assert _receive(fresh, rng, new, old.current, 106, 0)
    # the old bit above the phase's first number is the peer's next update: the next keys,
    # never the previous ones
    assert not _receive(fresh, rng, new, old.current, 110, 0)
    assert _receive(fresh, rng, new, new.next, 111, 0)
    delta(fresh, ingress_packets=9, ingress_decrypted=7, ingress_previous_phase=2,
          ingress_drop_bad_tag=2)
    assert fresh.entry(RELAY4, PEER4, Direction.RECV).next_pn == 112


def test_peer_key_update_keeps_the_first_packet_number_of_its_phase(fresh) -> None:
    """The peer starts a key update: the shim verifies its first packet of the new phase
    with the next keys before userspace follows (a remote update), and that packet's number
    stays the new phase's first across the reinstall."""
    rng = random.Random("remote")
    old = material(os.urandom(32), Direction.RECV, key_phase=1)
    fresh.install(RELAY4, PEER4, old, dcid_len=8, next_pn=300)
    assert _receive(fresh, rng, old, old.current, 300, 1)
    assert _receive(fresh, rng, old, old.next, 302, 0)  # the peer's update
    fresh.install(RELAY4, PEER4, updated(old, KeyTrigger.REMOTE_UPDATE), dcid_len=8)
    assert _receive(fresh, rng, old, old.current, 301, 1)  # reordered: the previous keys
    assert not _receive(fresh, rng, old, old.current, 303, 1)  # above 302: not the old keys
    delta(fresh, ingress_packets=4, ingress_decrypted=3, ingress_previous_phase=1,
          ingress_drop_bad_tag=1)


@pytest.mark.parametrize("pn_len", [1, 2, 3, 4])
def test_packet_number_recovered_across_truncation_wrap(fresh, pn_len: int) -> None:
    """RFC 9000 A.3: largest 0x..ff (+1 expected), PN just past the truncation boundary."""
    rng = random.Random(pn_len)
    recv = material(os.urandom(32), Direction.RECV)
    win = 1 << (pn_len * 8)
    for expected, pn in ((win - 1, win + 3), (5 * win + 2, 5 * win - 3), (3, 0)):
        fresh.install(RELAY4, PEER4, recv, dcid_len=4, next_pn=expected)
        header = bytes([0x40 | (pn_len - 1)]) + rng.randbytes(4) + (pn % win).to_bytes(pn_len, "big")
        payload = rng.randbytes(40)
        wire = protect(header, payload, pn, recv.current, recv.hp_key, 5)
        verdict, out = run(fresh.ingress, V4_EGRESS.reversed().frame(wire))
        assert verdict == TC_ACT_UNSPEC, (expected, pn)
        assert V4_EGRESS.reversed().payload(out) == header + payload + fresh.token
        assert fresh.entry(RELAY4, PEER4, Direction.RECV).next_pn == max(expected, pn + 1)


@pytest.mark.parametrize("udp", [V4_EGRESS, V6_EGRESS], ids=["ipv4", "ipv6"])
def test_coalesced_after_long_header_odd_offset(fresh, udp: Udp) -> None:
    """The short-header packet after a Handshake packet of odd length; checksum still right."""
    relay, peer = (RELAY6, PEER6) if udp.ipv6 else (RELAY4, PEER4)
    rng = random.Random(3)
    send = material(os.urandom(32), Direction.SEND)
    recv = material(os.urandom(32), Direction.RECV)
    for body in (rng.randbytes(38), rng.randbytes(299)):   # odd, then even offset
        handshake = (bytes([0xE0]) + (1).to_bytes(4, "big") + bytes([8]) + rng.randbytes(8)
                     + bytes([8]) + rng.randbytes(8) + (0x4000 | len(body)).to_bytes(2, "big") + body)
        initial = (bytes([0xC0]) + (1).to_bytes(4, "big") + bytes([8]) + rng.randbytes(8)
                   + bytes([0]) + bytes([5]) + rng.randbytes(5) + bytes([len(body[:20])]) + body[:20])
        prefix = initial + handshake
        fresh.install(relay, peer, send, dcid_len=8, next_pn=9)
        p = plain_packet(rng, 500, 8, 9)
        verdict, out = run(fresh.egress, udp.frame(prefix + p.layout()))
        assert verdict == TC_ACT_UNSPEC
        assert udp.payload(out) == prefix + protect(p.header, p.payload, p.pn,
                                                    keys_for_phase(send, p.key_phase), send.hp_key, 9)
        assert udp.udp_checksum_ok(out)
        fresh.install(relay, peer, recv, dcid_len=8, next_pn=9)
        q, wire = _wire(rng, recv, 777, 8, 9)
        back = udp.reversed()
        verdict, out = run(fresh.ingress, back.frame(prefix + wire))
        assert verdict == TC_ACT_UNSPEC
        assert back.payload(out) == prefix + q.header + q.payload + fresh.token
        assert back.udp_checksum_ok(out)


V1, V2 = 0x00000001, 0x6B3343CF  # RFC 9000, RFC 9369


def long_packet(version: int, type_: int, body: bytes, *, token: bytes | None = None,
                length: int | None = None) -> bytes:
    """A long-header packet (RFC 9000 §17.2): 8-byte CIDs, a token field when `token` is
    given (Initial), Length = len(body) unless `length` says otherwise."""
    out = (bytes([0xC0 | (type_ << 4)]) + version.to_bytes(4, "big") + bytes([8]) + bytes(range(8))
           + bytes([8]) + bytes(range(8, 16)))
    if token is not None:
        out += bytes([len(token)]) + token
    return out + (0x4000 | (len(body) if length is None else length)).to_bytes(2, "big") + body


BODY = bytes(range(40))
COALESCED = {  # prefix before the short-header packet -> protected (True) or passed untouched
    "v1 Initial, token": (long_packet(V1, 0, BODY, token=b"tok"), True),
    "v1 0-RTT, Handshake": (long_packet(V1, 1, BODY) + long_packet(V1, 2, BODY[:7]), True),
    "v2 Initial, Handshake": (long_packet(V2, 1, BODY, token=b"") + long_packet(V2, 3, BODY), True),
    "three long headers": (long_packet(V1, 2, BODY) * 3, True),
    "four long headers: more than the shim walks": (long_packet(V1, 2, BODY) * 4, False),
    "v1 Retry": (long_packet(V1, 3, BODY), False),
    "v2 Retry": (long_packet(V2, 0, BODY), False),
    "version negotiation": (long_packet(0, 0, BODY), False),
    "unknown version": (long_packet(0x1A2A3A4A, 2, BODY), False),
    "Length past the datagram": (long_packet(V1, 2, BODY, length=5000), False),
    "padding, then a short header": (bytes(3), False),
}


@pytest.mark.parametrize("prefix,protected", list(COALESCED.values()), ids=list(COALESCED))
def test_walk_past_coalesced_long_headers(fresh, prefix: bytes, protected: bool) -> None:
    """Which datagrams the walk to the short-header packet (parse.h, fr_find_short) finds
    it in; the rest leave untouched (and are no 1-RTT packet the relay sends)."""
    rng = random.Random(5)
    send = material(os.urandom(32), Direction.SEND)
    fresh.install(RELAY4, PEER4, send, dcid_len=8, next_pn=9)
    p = plain_packet(rng, 200, 8, 9)
    frame = V4_EGRESS.frame(prefix + p.layout())
    verdict, out = run(fresh.egress, frame)
    assert verdict == TC_ACT_UNSPEC
    if protected:
        assert V4_EGRESS.payload(out) == prefix + protect(p.header, p.payload, p.pn,
                                                          keys_for_phase(send, p.key_phase), send.hp_key, 9)
        assert V4_EGRESS.udp_checksum_ok(out)
        delta(fresh, egress_packets=1, egress_encrypted=1)
    else:
        assert out == frame
        delta(fresh, egress_packets=1, egress_passed=1)


IP_OPTIONS = {"ihl6": bytes([1, 1, 1, 0]), "ihl15": bytes([1]) * 39 + bytes([0])}  # NOPs, EOL


@pytest.mark.parametrize("options", list(IP_OPTIONS.values()), ids=list(IP_OPTIONS))
def test_ipv4_options_protected_and_verified(fresh, options: bytes) -> None:
    """Decided on purpose (crypto_shim.c, shim_lookup): the shim parses past IPv4 options,
    which the fast path passes up, because what the shim cannot parse leaves unchanged: an
    offloaded connection's packet with options is protected and verified exactly like the
    same packet without, never sent in plaintext."""
    rng = random.Random(17)
    send = material(os.urandom(32), Direction.SEND)
    recv = material(os.urandom(32), Direction.RECV)
    p = plain_packet(rng, 400, 8, 60)
    q, wire = _wire(rng, recv, 500, 8, 60)
    out_frame, in_frame = V4_EGRESS.frame(p.layout()), V4_EGRESS.reversed().frame(wire)
    results = {}
    for opts in (b"", options):
        fresh.install(RELAY4, PEER4, send, dcid_len=8, next_pn=60)
        fresh.install(RELAY4, PEER4, recv, dcid_len=8, next_pn=60)
        results[opts] = (run(fresh.egress, ipv4_variant(out_frame, options=opts)),
                         run(fresh.ingress, ipv4_variant(in_frame, options=opts)))
    (verdict, sealed), (verdict_in, opened) = results[b""]
    assert (verdict, verdict_in) == (TC_ACT_UNSPEC, TC_ACT_UNSPEC)
    assert V4_EGRESS.payload(sealed) == protect(p.header, p.payload, p.pn,
                                                keys_for_phase(send, p.key_phase), send.hp_key, 9)
    assert V4_EGRESS.reversed().payload(opened) == q.header + q.payload + fresh.token
    assert results[options] == ((TC_ACT_UNSPEC, ipv4_variant(sealed, options=options)),
                                (TC_ACT_UNSPEC, ipv4_variant(opened, options=options)))
    delta(fresh, egress_packets=2, egress_encrypted=2, ingress_packets=2, ingress_decrypted=2)


def test_ipv4_options_without_keys_dropped_on_egress(fresh) -> None:
    """Fail closed with options too: an offloaded connection without keys drops the packet."""
    from crypto_backends.soft_shim import SHIM_STATE_NO_KEYS

    fresh.set_state(RELAY4, PEER4, Direction.SEND, SHIM_STATE_NO_KEYS, dcid_len=0)
    frame = ipv4_variant(V4_EGRESS.frame(A5_HEADER + A5_PAYLOAD + bytes(TAG)), options=IP_OPTIONS["ihl6"])
    assert run(fresh.egress, frame)[0] == TC_ACT_SHOT
    delta(fresh, egress_packets=1, egress_drop_no_keys=1)


def test_zero_udp_checksum_stays_zero(fresh) -> None:
    fresh.install(RELAY4, PEER4, material(A5_SECRET, Direction.SEND), dcid_len=0, next_pn=A5_PN)
    frame = V4_EGRESS.frame(A5_HEADER + A5_PAYLOAD + bytes(TAG), checksum=False)
    _, out = run(fresh.egress, frame)
    assert V4_EGRESS.payload(out) == A5_PROTECTED
    assert struct.unpack_from("!H", out, V4_EGRESS.l4_offset + 6)[0] == 0


# struct __sk_buff (uapi): gso_segs is the u32 at offset 164; BPF_PROG_TEST_RUN takes it in ctx_in.
SKB_CTX_SIZE = 192
SKB_GSO_SEGS = 164


def gso_ctx(segs: int) -> bytes:
    ctx = bytearray(SKB_CTX_SIZE)
    struct.pack_into("<I", ctx, SKB_GSO_SEGS, segs)
    return bytes(ctx)


def test_gso_super_packets_never_protected_as_one(fresh) -> None:
    """A GSO skb carries many QUIC packets behind one UDP header: egress drops it (never
    sends a wrongly protected or plaintext packet), ingress hands it up encrypted."""
    fresh.install(RELAY4, PEER4, material(A5_SECRET, Direction.SEND), dcid_len=0, next_pn=A5_PN)
    fresh.install(RELAY4, PEER4, material(A5_SECRET, Direction.RECV), dcid_len=0, next_pn=A5_PN)
    out = prog_test_run(fresh.egress.fd, V4_EGRESS.frame(A5_HEADER + A5_PAYLOAD + bytes(TAG)),
                        ctx=gso_ctx(4))
    assert out.retval == TC_ACT_SHOT
    frame = V4_EGRESS.reversed().frame(A5_PROTECTED)
    result = prog_test_run(fresh.ingress.fd, frame, ctx=gso_ctx(4))
    assert (result.retval, result.data) == (TC_ACT_UNSPEC, frame)
    # gso_segs 1 is an ordinary packet
    result = prog_test_run(fresh.ingress.fd, frame, ctx=gso_ctx(1))
    assert V4_EGRESS.reversed().payload(result.data) == A5_HEADER + A5_PAYLOAD + fresh.token
    delta(fresh, egress_packets=1, egress_drop_gso=1, ingress_packets=2, ingress_gso=1,
          ingress_decrypted=1)
