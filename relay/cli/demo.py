"""`fastrelay demo`: the main job the README opens with."""

from __future__ import annotations

from typing import Annotated

import typer

from hw.topology import load_topology
from offload.probe import run_probe
from relay.bpfload import require_root
from relay.cli.output import emit_table, progress
from relay.demo import run_demo


def demo(
    topology: Annotated[str, typer.Option(help="Topology name in hw/topologies or a TOML path.")] = "default",
    packets: Annotated[int, typer.Option(min=1, max=1_000_000, help="Datagrams the publisher sends.")] = 500,
    size: Annotated[int, typer.Option(min=16, max=1400, help="Datagram size in bytes.")] = 1200,
    rate: Annotated[int, typer.Option(min=1, max=100_000, help="Datagrams per second.")] = 1000,
) -> None:
    """Bring a lab up, probe the machine, send traffic publisher -> relay -> subscribers, print the result.

    Exits 1 when any subscriber missed a datagram.
    """
    require_root("the demo")
    progress("probing this machine's eBPF and offload capabilities ...")
    report = run_probe()
    emit_table(("Crypto backend", "Usable", "Why not"),
               [(b.name, "yes" if b.usable else "no", "; ".join(b.reasons)) for b in report.backends],
               as_json=False, title="Probe verdicts")

    progress(f"bringing up lab '{topology}' and sending {packets} datagrams of {size} B at {rate}/s ...")
    result = run_demo(load_topology(topology), packets=packets, size=size, interval_s=1 / rate)

    def us(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    emit_table(
        ("Subscriber", "Address", "Received", "Lost", "Delay p50 (µs)", "Delay p99 (µs)"),
        [(s.host, s.address, s.received, s.lost(result.sent), us(s.delay_percentile_us(0.5)),
          us(s.delay_percentile_us(0.99))) for s in result.subscribers],
        as_json=False,
        title=(f"Lab {result.lab}: {result.publisher} -> {result.relay} (userspace UDP fan-out)"
               " -> subscribers"),
    )
    progress(f"lab {result.lab} is down again")
    if not result.complete:
        raise typer.Exit(1)
