"""Per-packet cost of the soft shim (BPF_PROG_TEST_RUN durations), printed, never asserted.

Run with `-s` to see the table. The figures come from relay.bench.measure.shim_cost, the same
code `fastrelay bench` reports in its shim_cost section: single BPF_PROG_TEST_RUN calls (each
copies the frame in afresh; `repeat` would hand the ingress program its own decrypted output
from the second repeat on, a tag failure rather than the cost of opening), min and median per
QUIC packet size, seal (egress) and open (ingress). What is asserted is only that every
packet was protected or opened (shim_cost checks the shim's counters and verdicts).
"""

from __future__ import annotations

import pytest

from relay.bench import measure

pytestmark = pytest.mark.root

RUNS = 500


def test_cost_per_packet() -> None:
    costs = measure.shim_cost(runs=RUNS)
    assert {(c.size, c.direction) for c in costs} == \
        {(n, d) for n in measure.SHIM_SIZES for d in ("seal", "open")}
    by = {(c.size, c.direction): c for c in costs}
    print(f"\nsoft shim, BPF_PROG_TEST_RUN, {RUNS} single runs: QUIC packet bytes -> ns per packet")
    print(f"{'size':>6} {'seal min':>9} {'seal median':>12} {'open min':>9} {'open median':>12}")
    for size in measure.SHIM_SIZES:
        seal, opened = by[(size, "seal")], by[(size, "open")]
        print(f"{size:>6} {seal.min_ns:>9} {seal.median_ns:>12} {opened.min_ns:>9} "
              f"{opened.median_ns:>12}")
