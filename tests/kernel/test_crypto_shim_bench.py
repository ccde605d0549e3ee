"""Per-packet cost of the soft shim (BPF_PROG_TEST_RUN durations), printed, never asserted.

Run with `-s` to see the table. Egress: one call with repeat=2000 (each repeat seals the
packet again, the same work). Ingress: BPF_PROG_TEST_RUN does not restore the packet
between repeats, so from the second repeat on the shim sees its own plaintext output and
drops it (tag check only, no decryption); the honest ingress number is the median of
2000 single runs on a fresh packet, shown beside the repeat=2000 figure.
"""

from __future__ import annotations

import os
import random
import statistics

import pytest

from crypto_backends.base import Direction
from relay.bpfload import prog_test_run
from tests.kernel.test_crypto_shim import (
    PEER4,
    RELAY4,
    TAG,
    TC_ACT_UNSPEC,
    V4_EGRESS,
    keys_for_phase,
    material,
    plain_packet,
    protect,
)

pytestmark = pytest.mark.root

REPEAT = 2000
SIZES = (64, 512, 1200, 1400)


@pytest.fixture(scope="module")
def shim():
    from crypto_backends.soft_shim import SoftShim

    loaded = SoftShim()
    yield loaded
    loaded.close()


def test_cost_per_packet(shim) -> None:
    rng = random.Random(1)
    send = material(os.urandom(32), Direction.SEND)
    recv = material(os.urandom(32), Direction.RECV)
    rows = []
    for size in SIZES:
        shim.install(RELAY4, PEER4, send, dcid_len=8, next_pn=1000)
        p = plain_packet(rng, size, 8, 1000, pn_len=2)
        out = prog_test_run(shim.egress.fd, V4_EGRESS.frame(p.layout()), repeat=REPEAT)
        assert out.retval == TC_ACT_UNSPEC
        egress_ns = out.duration_ns

        shim.install(RELAY4, PEER4, recv, dcid_len=8, next_pn=1000)
        q = plain_packet(rng, size, 8, 1000, pn_len=2)
        wire = protect(q.header, q.payload, q.pn, keys_for_phase(recv, q.key_phase), recv.hp_key, 9)
        frame = V4_EGRESS.reversed().frame(wire)
        singles = []
        for _ in range(REPEAT):
            result = prog_test_run(shim.ingress.fd, frame)
            assert result.retval == TC_ACT_UNSPEC
            assert result.data[-TAG:] == shim.token
            singles.append(result.duration_ns)
        repeated = prog_test_run(shim.ingress.fd, frame, repeat=REPEAT).duration_ns
        rows.append((size, egress_ns, statistics.median(singles), repeated))
    print("\nsoft shim, BPF_PROG_TEST_RUN, QUIC packet bytes -> ns per packet")
    print(f"{'size':>6} {'egress r=2000':>14} {'ingress median':>15} {'ingress r=2000*':>16}")
    for size, e, i, r in rows:
        print(f"{size:>6} {e:>14} {i:>15.0f} {r:>16}")
    print("* from the second repeat on: the tag check fails on the shim's own output (drop path)")
