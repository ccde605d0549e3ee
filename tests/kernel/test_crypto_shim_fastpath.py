"""The crypto shim and the fast path chained as on the hooks (bpf/structs.h, "skb verdict
contract"), through BPF_PROG_TEST_RUN: one program's output frame and skb->cb go into the
next, as the kernel runs filters of one hook in priority order.

- ingress: shim (verify, token, FR_CB_VERIFIED with the fast path's connection index) ->
  fast path (forwards an offloaded connection's packet only with that verdict);
- egress: fast path (clone rewrite or userspace renumbering, FR_CB_PROTECT with the exact
  packet number) -> shim (protects with the subscriber's keys): the `cryptography` package
  decrypts the result with the subscriber's keys at the number the fast path gave.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from crypto_backends.base import Direction
from crypto_backends.soft import SHIM_EGRESS_PRIO, SHIM_INGRESS_PRIO
from relay import bpfload
from relay.fastpath import layout as L
from relay.fastpath.loader import FASTPATH_EGRESS_PRIO, FASTPATH_INGRESS_PRIO, FastPath
from relay.fastpath.reasons import Reason as R
from tests.kernel import packets as P
from tests.kernel import test_fastpath_egress as EG
from tests.kernel import test_fastpath_ingress as IN
from tests.kernel.test_crypto_shim import TAG, hp_mask, keys_for_phase, material, protect

pytestmark = pytest.mark.root

TC_ACT_UNSPEC = 0xFFFFFFFF
TC_ACT_SHOT = 2
RELAY = (P.IP4_A, 4433)
PUBLISHER = (P.IP4_B, 50000)                 # IN.PUB: publisher -> relay
SUBSCRIBER = (EG.SUB4, EG.SUB_PORT)          # EG.TO_SUB4: relay -> subscriber
UP_CONN, SUB_CONN = 0, 1                     # fr_conns indexes in both worlds


@pytest.fixture(scope="module")
def fp() -> Iterator[FastPath]:
    fastpath = FastPath()
    yield fastpath
    fastpath.close()


@pytest.fixture
def fresh(shim):
    for local, peer in ((RELAY, PUBLISHER), (RELAY, SUBSCRIBER)):
        for direction in Direction:
            shim.remove(local, peer, direction)
    shim.clear_stats()
    return shim


def cb_of(ctx: bytes) -> list[int]:
    return [P.skb_ctx_field(ctx, "cb", i) for i in range(5)]


def shim_counts(shim) -> dict[str, int]:
    return {k: v for k, v in shim.stats().items() if v and not k.endswith("_bytes")}


def unprotect(wire: bytes, m, dcid_len: int) -> tuple[int, int, int, bytes]:
    """(key phase bit, PN length, truncated PN, header) of a protected short header."""
    pn_off = 1 + dcid_len
    mask = hp_mask(m.hp_key, wire[pn_off + 4:pn_off + 20])
    first = wire[0] ^ (mask[0] & 0x1F)
    pn_len = (first & 0x03) + 1
    pn_bytes = bytes(b ^ k for b, k in zip(wire[pn_off:pn_off + pn_len], mask[1:]))
    header = bytes([first]) + wire[1:pn_off] + pn_bytes
    return (first >> 2) & 1, pn_len, int.from_bytes(pn_bytes, "big"), header


def open_packet(wire: bytes, m, dcid_len: int, pn: int) -> tuple[int, bytes, bytes]:
    """Decrypt with `cryptography` at full packet number `pn`: (key phase, header, payload)."""
    phase, pn_len, truncated, header = unprotect(wire, m, dcid_len)
    assert truncated == pn & ((1 << (8 * pn_len)) - 1)
    keys = keys_for_phase(m, phase)
    nonce = bytes(a ^ b for a, b in zip(keys.iv, pn.to_bytes(12, "big")))
    payload = ChaCha20Poly1305(keys.key).decrypt(nonce, wire[len(header):], header)
    return phase, header, payload


# --- filter order -----------------------------------------------------------------------

def test_filter_order_shim_around_the_fast_path() -> None:
    """Lower priority runs first: shim ingress before the fast path's, its egress after."""
    assert SHIM_INGRESS_PRIO < FASTPATH_INGRESS_PRIO
    assert FASTPATH_EGRESS_PRIO < SHIM_EGRESS_PRIO


# --- ingress: shim -> fast path -----------------------------------------------------------

def _published(rng: random.Random, m) -> tuple[bytes, bytes]:
    """(plaintext QUIC with the tag slot, the protected frame) of a publisher's stream start."""
    payload = IN.stream0(b"object-" + rng.randbytes(8).hex().encode())
    header = P.quic_short(IN.UP_CID, 7, b"")       # first byte, DCID, 2-byte PN
    wire = protect(header, payload, 7, keys_for_phase(m, 0), m.hp_key, 1 + len(IN.UP_CID))
    return header + payload, IN.PUB.frame(wire)


def test_ingress_verified_packet_carries_the_verdict_to_the_fast_path(fresh, fp) -> None:
    rng = random.Random(1)
    recv = material(os.urandom(32), Direction.RECV)
    fresh.install(RELAY, PUBLISHER, recv, dcid_len=len(IN.UP_CID), next_pn=7)
    assert fresh.link_fastpath(RELAY, PUBLISHER, Direction.RECV, UP_CONN)
    assert fresh.entry(RELAY, PUBLISHER, Direction.RECV).fastpath_conn == UP_CONN
    IN.World(protection=L.PROT_OFFLOAD_KEYS, tag_len=TAG).install(fp)
    plain, frame = _published(rng, recv)
    # A stale verdict naming another connection comes in: the shim's own replaces it.
    res = bpfload.prog_test_run(fresh.ingress.fd, frame,
                                ctx=P.skb_ctx(cb=(L.CB_MAGIC | L.CB_VERIFIED, 3)))
    assert res.retval == TC_ACT_UNSPEC
    assert IN.PUB.payload(res.data) == plain + fresh.token
    assert cb_of(res.ctx)[:2] == [L.CB_MAGIC | L.CB_VERIFIED, UP_CONN]
    assert shim_counts(fresh) == {"ingress_packets": 1, "ingress_decrypted": 1}
    out = bpfload.prog_test_run(fp.ingress.fd, res.data, ctx=res.ctx)
    assert out.retval == TC_ACT_UNSPEC
    assert {r: n for r, (n, _) in fp.counters().items()} == {R.IN_SEEN: 1, R.IN_CLONED: 1, R.IN_CLONE: 3}


@pytest.mark.parametrize("where", ["tag", "payload"])
def test_ingress_bad_tag_gets_no_verdict_and_is_dropped(fresh, fp, where: str) -> None:
    rng = random.Random(where)
    recv = material(os.urandom(32), Direction.RECV)
    fresh.install(RELAY, PUBLISHER, recv, dcid_len=len(IN.UP_CID), next_pn=7)
    fresh.link_fastpath(RELAY, PUBLISHER, Direction.RECV, UP_CONN)
    IN.World(protection=L.PROT_OFFLOAD_KEYS, tag_len=TAG).install(fp)
    _, frame = _published(rng, recv)
    bad = bytearray(frame)
    bad[-1 if where == "tag" else -TAG - 3] ^= 0x10
    stale = P.skb_ctx(cb=(L.CB_MAGIC | L.CB_VERIFIED, UP_CONN))
    res = bpfload.prog_test_run(fresh.ingress.fd, bytes(bad), ctx=stale)
    assert res.retval == TC_ACT_SHOT
    assert cb_of(res.ctx)[0] == 0
    assert shim_counts(fresh) == {"ingress_packets": 1, "ingress_drop_bad_tag": 1}
    # Were it handed on anyway, the fast path would not forward it.
    out = bpfload.prog_test_run(fp.ingress.fd, bytes(bad), ctx=res.ctx)
    assert out.retval == TC_ACT_UNSPEC
    assert {r: n for r, (n, _) in fp.counters().items()} == {R.IN_SEEN: 1, R.IN_PASS_NOT_VERIFIED: 1}


def test_ingress_without_fast_path_link_writes_no_verdict(fresh, fp) -> None:
    """Decrypted for userspace (token), but the fast path does not hold it: no verdict."""
    recv = material(os.urandom(32), Direction.RECV)
    fresh.install(RELAY, PUBLISHER, recv, dcid_len=len(IN.UP_CID), next_pn=7)
    IN.World(protection=L.PROT_OFFLOAD_KEYS, tag_len=TAG).install(fp)
    plain, frame = _published(random.Random(2), recv)
    res = bpfload.prog_test_run(fresh.ingress.fd, frame, ctx=P.skb_ctx())
    assert res.retval == TC_ACT_UNSPEC and IN.PUB.payload(res.data) == plain + fresh.token
    assert cb_of(res.ctx)[0] == 0
    bpfload.prog_test_run(fp.ingress.fd, res.data, ctx=res.ctx)
    assert {r: n for r, (n, _) in fp.counters().items()} == {R.IN_SEEN: 1, R.IN_PASS_NOT_VERIFIED: 1}


# --- egress: fast path -> shim -----------------------------------------------------------

def _subscriber(fp: FastPath, *, next_pn: int, largest_acked: int, key_phase: int) -> None:
    EG.Sub(protection=L.PROT_OFFLOAD_KEYS, key_phase=key_phase, next_pn=next_pn,
           largest_acked=largest_acked).install(fp)
    # the upstream verified by the ingress shim (token in its tag slot), the subscriber offloaded
    fp.update("fr_conns", UP_CONN, L.FrConn(role=L.ROLE_UPSTREAM, role_idx=0,
                                            protection=L.PROT_OFFLOAD_KEYS, tag_len=TAG))
    fp.update("fr_conns", SUB_CONN, L.FrConn(role=L.ROLE_SUBSCRIBER, role_idx=0,
                                             protection=L.PROT_OFFLOAD_KEYS, tag_len=TAG,
                                             key_phase=key_phase, peer_cid_len=len(EG.SUB_DCID)))


@pytest.mark.parametrize("key_phase", [0, 1])
def test_clone_chained_decrypts_with_subscriber_keys_at_its_number(fresh, fp, key_phase: int) -> None:
    # The subscriber's counter is far from what the shim last saw: only the exact number the
    # fast path passes on gives the right nonce (2-byte truncation of 0x12345 decodes to 0x2345).
    pn = 0x12345
    send = material(os.urandom(32), Direction.SEND, key_phase=key_phase)
    fresh.install(RELAY, SUBSCRIBER, send, dcid_len=len(EG.SUB_DCID), next_pn=0)
    fresh.link_fastpath(RELAY, SUBSCRIBER, Direction.SEND, SUB_CONN)
    _subscriber(fp, next_pn=pn, largest_acked=pn - 0x40, key_phase=key_phase)
    token = os.urandom(TAG)
    clone = EG.PUB4.frame(P.quic_short(EG.UP_CID, 7, EG.P.stream_frame(EG.UP_SID, EG.head(), offset=0)
                                       + token))
    res = EG.clone_run(fp, clone, cb=(L.CB_MAGIC | L.CB_VERIFIED, UP_CONN))
    assert res.retval == TC_ACT_UNSPEC
    assert cb_of(res.ctx) == [L.CB_MAGIC | L.CB_PROTECT | L.CB_CLONE | L.CB_HAVE_PN, SUB_CONN,
                              EG.TO_SUB4.payload_offset | (len(EG.SUB_DCID) << 16) | (2 << 24),
                              pn & 0xFFFFFFFF, pn >> 32]
    plain = EG.TO_SUB4.payload(res.data)
    assert plain[-TAG:] == token                  # the fast path leaves the slot alone
    out = bpfload.prog_test_run(fresh.egress.fd, res.data, ctx=res.ctx)
    assert out.retval == TC_ACT_UNSPEC
    assert EG.TO_SUB4.udp_checksum_ok(out.data)
    assert out.data[:EG.TO_SUB4.l4_offset] == res.data[:EG.TO_SUB4.l4_offset]
    wire = EG.TO_SUB4.payload(out.data)
    assert token not in wire and EG.head() not in wire
    phase, header, payload = open_packet(wire, send, len(EG.SUB_DCID), pn)
    assert phase == key_phase
    assert header == plain[:len(header)]
    assert payload == P.stream_frame(3, EG.head(), offset=0)
    assert shim_counts(fresh) == {"egress_packets": 1, "egress_encrypted": 1,
                                  **({"egress_key_phase_1": 1} if key_phase else {})}
    assert fresh.entry(RELAY, SUBSCRIBER, Direction.SEND).next_pn == pn + 1


def test_userspace_packet_renumbered_then_protected(fresh, fp) -> None:
    pn = 0x20000 + 3
    send = material(os.urandom(32), Direction.SEND)
    fresh.install(RELAY, SUBSCRIBER, send, dcid_len=len(EG.SUB_DCID), next_pn=5)
    fresh.link_fastpath(RELAY, SUBSCRIBER, Direction.SEND, SUB_CONN)
    _subscriber(fp, next_pn=pn, largest_acked=pn - 10, key_phase=0)
    body = P.ping() + P.max_data(123456) + P.padding(30)
    frame = EG.TO_SUB4.frame(P.quic_short(EG.SUB_DCID, 5, body) + bytes(TAG))  # aioquic built PN 5
    res = bpfload.prog_test_run(fp.egress.fd, frame, ctx=P.skb_ctx())
    assert res.retval == TC_ACT_UNSPEC
    assert cb_of(res.ctx)[0] == L.CB_MAGIC | L.CB_PROTECT | L.CB_HAVE_PN
    out = bpfload.prog_test_run(fresh.egress.fd, res.data, ctx=res.ctx)
    assert out.retval == TC_ACT_UNSPEC and EG.TO_SUB4.udp_checksum_ok(out.data)
    _, _, payload = open_packet(EG.TO_SUB4.payload(out.data), send, len(EG.SUB_DCID), pn)
    assert payload == body


def test_marked_packet_without_keys_or_for_another_connection_is_dropped(fresh, fp) -> None:
    """Fail closed: a packet the fast path marked for protection never leaves in plaintext."""
    _subscriber(fp, next_pn=100, largest_acked=L.PN_NONE, key_phase=0)
    clone = EG.PUB4.frame(P.quic_short(EG.UP_CID, 7, P.stream_frame(EG.UP_SID, EG.head(), offset=0)
                                       + bytes(TAG)))
    res = EG.clone_run(fp, clone)
    assert res.retval == TC_ACT_UNSPEC
    # no shim entry at all
    assert bpfload.prog_test_run(fresh.egress.fd, res.data, ctx=res.ctx).retval == TC_ACT_SHOT
    # keys, but not linked to the fast path, then linked to another connection
    send = material(os.urandom(32), Direction.SEND)
    fresh.install(RELAY, SUBSCRIBER, send, dcid_len=len(EG.SUB_DCID))
    assert bpfload.prog_test_run(fresh.egress.fd, res.data, ctx=res.ctx).retval == TC_ACT_SHOT
    fresh.link_fastpath(RELAY, SUBSCRIBER, Direction.SEND, SUB_CONN + 5)
    assert bpfload.prog_test_run(fresh.egress.fd, res.data, ctx=res.ctx).retval == TC_ACT_SHOT
    # a wrong exact number (its truncation is not the header's) is an error, not a guess
    fresh.link_fastpath(RELAY, SUBSCRIBER, Direction.SEND, SUB_CONN)
    cb = cb_of(res.ctx)
    wrong = P.skb_ctx(cb=(cb[0], cb[1], cb[2], cb[3] + 1, cb[4]))
    assert bpfload.prog_test_run(fresh.egress.fd, res.data, ctx=wrong).retval == TC_ACT_SHOT
    assert shim_counts(fresh) == {"egress_packets": 4, "egress_drop_no_keys": 1,
                                  "egress_drop_wrong_conn": 2, "egress_drop_error": 1}


def test_key_update_survives_the_link(fresh) -> None:
    """install() on a key update keeps the fast-path link (and the packet numbers)."""
    send = material(os.urandom(32), Direction.SEND)
    fresh.install(RELAY, SUBSCRIBER, send, dcid_len=8, next_pn=40)
    fresh.link_fastpath(RELAY, SUBSCRIBER, Direction.SEND, SUB_CONN)
    fresh.install(RELAY, SUBSCRIBER, material(os.urandom(32), Direction.SEND, key_phase=1), dcid_len=8)
    entry = fresh.entry(RELAY, SUBSCRIBER, Direction.SEND)
    assert (entry.fastpath_conn, entry.next_pn) == (SUB_CONN, 40)
    fresh.link_fastpath(RELAY, SUBSCRIBER, Direction.SEND, None)
    assert fresh.entry(RELAY, SUBSCRIBER, Direction.SEND).fastpath_conn is None
    assert not fresh.link_fastpath(RELAY, PUBLISHER, Direction.SEND, 1)


def test_a_half_keyed_connection_gets_protected_clones_once_keyed_both_ways(fresh, fp) -> None:
    # The fast path can take a connection while the shim holds one direction's keys: it is
    # OFFLOAD_NOKEYS (egress drops its clones, never plaintext out). When the other
    # direction's keys arrive, that shim entry carries the fast path's index too and the
    # connection becomes OFFLOAD_KEYS, through the backend and the runtime as the relay
    # wires them (runtime.use_crypto).
    from dataclasses import replace

    from crypto_backends.base import ConnectionPath
    from crypto_backends.soft import SoftBackend
    from relay.fastpath.runtime import FastPathRuntime

    backend = SoftBackend()
    backend.use_shim(fresh)
    runtime = FastPathRuntime(fp, port=RELAY[1], interfaces=[])
    runtime.use_crypto(backend)
    path = ConnectionPath(RELAY, SUBSCRIBER, 8)
    send = replace(material(os.urandom(32), Direction.SEND), path=path)
    recv = replace(material(os.urandom(32), Direction.RECV), path=path)
    fp.update("fr_conns", SUB_CONN, L.FrConn(protection=L.PROT_OFFLOAD_NOKEYS, tag_len=TAG))

    backend.install(send)
    runtime._crypto_conns[send.connection] = SUB_CONN  # what _link_crypto records at hand-over
    assert backend.link_fastpath(send.connection, SUB_CONN)
    assert fresh.entry(RELAY, SUBSCRIBER, Direction.RECV) is None
    backend.install(recv)

    assert fresh.entry(RELAY, SUBSCRIBER, Direction.RECV).fastpath_conn == SUB_CONN
    assert fresh.entry(RELAY, SUBSCRIBER, Direction.SEND).fastpath_conn == SUB_CONN
    assert fp.lookup("fr_conns", SUB_CONN, L.FrConn).protection == L.PROT_OFFLOAD_KEYS
    assert runtime.counters["keys_completed"] == 1
    backend.link_fastpath(send.connection, None)
    fp.update("fr_conns", SUB_CONN, L.FrConn())


# --- stateless reset (RFC 9000 §10.3): the peer lost its state ------------------------------

def _reset(rng: random.Random, size: int, token: bytes) -> bytes:
    """A stateless reset as a peer sends it: short-header form, unpredictable bits (here
    starting like a packet to the relay's connection id, the fast path's worst case), then
    the token."""
    body = (bytes([0x40 | rng.randrange(64)]) + IN.UP_CID)[:size - TAG]
    return body + rng.randbytes(size - TAG - len(body)) + token


# 21: smallest reset; 28: too short for a header-protection sample with an 8-byte CID; a tag
# that does not verify from 29 on.
@pytest.mark.parametrize("size", [21, 28, 29, 64, 1200])
def test_stateless_reset_goes_up_unchanged_unmarked_and_counted(fresh, fp, size: int) -> None:
    rng = random.Random(size)
    token = rng.randbytes(TAG)
    recv = material(os.urandom(32), Direction.RECV)
    fresh.install(RELAY, PUBLISHER, recv, dcid_len=len(IN.UP_CID), next_pn=7, reset_token=token)
    fresh.link_fastpath(RELAY, PUBLISHER, Direction.RECV, UP_CONN)
    IN.World(protection=L.PROT_OFFLOAD_KEYS, tag_len=TAG).install(fp)
    frame = IN.PUB.frame(_reset(rng, size, token))
    stale = P.skb_ctx(cb=(L.CB_MAGIC | L.CB_VERIFIED, UP_CONN))
    res = bpfload.prog_test_run(fresh.ingress.fd, frame, ctx=stale)
    assert (res.retval, res.data) == (TC_ACT_UNSPEC, frame)
    assert cb_of(res.ctx)[0] == 0  # never a verdict the fast path would forward on
    assert shim_counts(fresh) == {"ingress_packets": 1, "ingress_stateless_reset": 1}
    assert fresh.entry(RELAY, PUBLISHER, Direction.RECV).next_pn == 7
    out = bpfload.prog_test_run(fp.ingress.fd, res.data, ctx=res.ctx)
    assert out.retval == TC_ACT_UNSPEC
    counts = {r: n for r, (n, _) in fp.counters().items()}
    assert R.IN_CLONED not in counts and R.IN_CLONE not in counts, counts


def test_without_the_token_a_bad_tag_is_still_dropped(fresh) -> None:
    """Look-alikes: one bit off the token, a random tail, and a zero tail while no token is
    installed (zero means none) are dropped as bad tags; a key update keeps the token."""
    rng = random.Random(3)
    token = rng.randbytes(TAG)
    recv = material(os.urandom(32), Direction.RECV)
    fresh.install(RELAY, PUBLISHER, recv, dcid_len=len(IN.UP_CID), next_pn=7, reset_token=token)
    fresh.install(RELAY, PUBLISHER, recv, dcid_len=len(IN.UP_CID))  # e.g. a key update
    assert fresh.entry(RELAY, PUBLISHER, Direction.RECV).reset_token == token
    near = bytes([token[0] ^ 1]) + token[1:]
    for tail in (near, rng.randbytes(TAG)):
        res = bpfload.prog_test_run(fresh.ingress.fd, IN.PUB.frame(_reset(rng, 64, tail)))
        assert res.retval == TC_ACT_SHOT
    assert fresh.set_reset_token(RELAY, PUBLISHER, bytes(TAG))
    res = bpfload.prog_test_run(fresh.ingress.fd, IN.PUB.frame(_reset(rng, 64, bytes(TAG))))
    assert res.retval == TC_ACT_SHOT
    assert shim_counts(fresh) == {"ingress_packets": 3, "ingress_drop_bad_tag": 3}
