"""`fastrelay demo`: the main job the README opens with."""

from __future__ import annotations

from typing import Annotated

import typer

from hw.topology import load_topology
from offload.probe import run_probe
from relay.bpfload import require_root
from relay.cli.output import JsonOption, emit_json, emit_table, progress
from relay.demo import run_demo
from relay.errors import ConfigError


def demo(
    topology: Annotated[str, typer.Option(help="Topology name in hw/topologies or a TOML path.")] = "default",
    objects: Annotated[int, typer.Option(min=1, max=100_000, help="Objects the publisher sends.")] = 300,
    rate: Annotated[float, typer.Option(min=1, max=10_000, help="Objects per second.")] = 100.0,
    object_size: Annotated[int, typer.Option(min=64, max=100_000, help="Bytes per object.")] = 1000,
    crypto: Annotated[str, typer.Option(
        "--crypto", metavar="BACKEND",
        help="Run every party with --crypto BACKEND (none, soft; standard: plain QUIC, "
             "userspace only).")] = "none",
    fastpath: Annotated[bool, typer.Option(
        "--fastpath/--no-fastpath", help="Relay with the eBPF fast path, or its userspace "
                                         "path.")] = True,
    as_json: JsonOption = False,
) -> None:
    """Lab up, probe, a publisher -> the relay -> every subscriber (each verifying every object), lab down.

    Exits 1 when any subscriber missed an object.
    """
    require_root("the demo")
    progress("probing this machine's eBPF and offload capabilities ...")
    report = run_probe()
    if not as_json:
        emit_table(("Crypto backend", "Usable", "Why not"),
                   [(b.name, "yes" if b.usable else "no", "; ".join(b.reasons)) for b in report.backends],
                   as_json=False, title="Probe verdicts")
    progress(f"lab '{topology}': relay, subscribers and a publisher of {objects} objects "
             f"({object_size} B at {rate:g}/s), each in its own network namespace ...")
    backend = None if crypto == "standard" else crypto
    if backend not in (None, "none", "soft"):
        raise ConfigError(f"--crypto {crypto}: the demo runs none, soft or standard")
    if fastpath and backend not in ("none", "soft"):
        raise ConfigError("the fast path runs with --crypto none or soft; "
                          "add --no-fastpath for the userspace path")
    result = run_demo(load_topology(topology), objects=objects, rate=rate,
                      object_size=object_size, crypto=backend, fastpath=fastpath)

    def us(value: object) -> str:
        return "-" if value is None else f"{value:,}"

    if as_json:  # the same facts as the tables, for scripts
        emit_json({
            "probe_verdicts": [{"backend": b.name, "usable": b.usable, "reasons": b.reasons}
                               for b in report.backends],
            "lab": result.lab, "publisher": result.publisher, "relay": result.relay,
            "crypto": result.crypto, "fastpath": result.fastpath, "objects": result.objects,
            "complete": result.complete, "kernel_bytes_share": result.kernel_share,
            "subscribers": [{"host": s.host, "address": s.address, "ok": s.ok, **s.summary}
                            for s in result.subscribers],
            "relay_counters": result.relay_stats.get("counters", {}),
            "relay_fastpath": result.relay_stats.get("fastpath"),
        })
    else:
        emit_table(
            ("Subscriber", "Address", "Objects", "Lost", "Skipped", "Intact", "Delay p50 (µs)",
             "Delay p99 (µs)"),
            [(s.host, s.address, f"{s.summary['objects']}/{result.objects}", s.summary["lost"],
              s.summary["skipped"], "yes" if s.ok else "no", us(s.summary["delay"]["p50_us"]),
              us(s.summary["delay"]["p99_us"])) for s in result.subscribers],
            as_json=False,
            title=(f"Lab {result.lab}: {result.publisher} -> {result.relay} (MoQT draft-14, "
                   f"{'--crypto ' + result.crypto if result.crypto else 'standard QUIC'}, "
                   f"{'eBPF fast path' if result.fastpath else 'userspace path'}) -> subscribers"),
        )
    counters = result.relay_stats.get("counters", {})
    delivered = sum(s.summary["objects"] for s in result.subscribers)
    share = result.kernel_share
    delays = sorted(d for s in result.subscribers for d in
                    (s.summary["delay"]["p50_us"], s.summary["delay"]["p99_us"]) if d is not None)
    progress(f"relay: {counters.get('objects_in', '?')} objects in, {delivered} delivered to "
             f"{len(result.subscribers)} subscribers"
             + (f"; the kernel sent {share:.1%} of the bytes to subscribers" if share is not None
                else "; all of it sent by userspace")
             + (f"; delay p50 {us(min(delays))}-{us(max(delays))} µs" if delays else "")
             + f"; lab {result.lab} is down again")
    if not result.complete:
        raise typer.Exit(1)
