"""What `fastrelay bench` shows and writes: the table, the JSON document, the PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from relay.bench.paths import ANCHOR, PATHS, USERSPACE
from relay.bench.runner import GROWING_DELAY, BenchConfig, Run
from relay.errors import FastrelayError

NOTES = [
    "machine CPU/packet (the headline) is whole-machine busy time from /proc/stat over the "
    "measured window divided by the UDP packets the relay namespace sent to subscribers "
    "(interface counters, GSO off, so both QUIC stacks are counted alike); it includes the "
    "publisher, every subscriber, the kernel, and any other work on the machine",
    "relay CPU/packet (/proc/PID/stat utime+stime), eBPF run time/packet (kernel BPF "
    "statistics: run_time_ns of the relay's top-level programs over the window) and catch-up/"
    "fwd pkt are a breakdown that overlaps the headline: never add them up",
    "catch-up/fwd pkt = the relay's userspace catch-up time (ring-buffer records, shadow "
    "writes, state pushes) per packet the kernel forwarded, from the relay's own stats at exit "
    "(fastpath.catchup_us_per_forwarded_packet, the relay's whole life, not only the window); "
    "it is inside relay CPU, not beside it; n/a on paths without eBPF",
    "kernel bytes = share of the bytes to subscribers the kernel (eBPF) sent, from the relay's "
    "stats at exit (fastpath.kernel_bytes_share); 0% on userspace paths",
    "packets/s per relay core = 1 / relay CPU per packet: the capacity the relay process alone "
    "would have, as the subscribers cost more than the relay on a small machine",
    "delay is one-way, per object, publisher send to subscriber receive (one clock), "
    "percentiles over every subscriber's raw delays together",
    "busy = whole-machine busy share during the window; (not lab) = the part of it not spent "
    "in the processes the bench started: other work on the machine plus kernel work outside "
    "those processes (softirq); when it is high the headline includes other people's work. "
    "The JSON also has both shares for the second before the publisher started "
    "(background_busy_share, background_non_lab_share)",
    "lab procs CPU/packet = utime+stime of every process the bench started (relay, publisher, "
    "subscribers): not disturbed by other work on the machine, but without the kernel work "
    "done outside those processes (softirq elsewhere, eBPF on other CPUs)",
    "vs userspace / vs moq-rs = ratio of machine CPU per packet / of p50 delay against that "
    "path at the same subscriber count (below 1: better)",
    "limit 'machine' = whole-machine busy above 90% during the window",
    "same objects through each path: each path runs in its own scenario (a fresh lab, its relay "
    "alone on the machine) with the same workload: the same publisher command, object count, "
    "sizes, rate, group layout and subscribers; the objects are deterministic (self-verifying "
    "payload by group/object), so every path carries the same objects, but not at the same "
    "moment: these rows compare delays as distributions; the paired table (--paired) has the "
    "same objects through the kernel and the userspace path at the same moment",
]

PAIRED_NOTES = [
    "paired: one relay with the fast path (crypto none) serving the first half of the "
    "subscribers from the kernel and holding the second half on the userspace path "
    "(--userspace-peer), one publisher: every object reaches both halves at the same moment. "
    "Per object that every subscriber received: median delay of the kernel-path subscribers "
    "minus the median of the userspace-path ones (negative: the kernel copy arrived first); "
    "difference p10/p50/p90 over the objects, 'kernel first' = share of objects with a negative "
    "difference. Offloaded/held = the relay's own counts of subscribers it handed to the kernel "
    "and kept in userspace",
]

SWEEP_NOTES = [
    "highest sustainable rate: the same scenario at rising publisher rates (objects/s, one "
    "object = one packet per subscriber) for one subscriber count; a path stops at the first "
    "rate where an object is lost or not delivered in time, the delay grows (" + GROWING_DELAY
    + "), or the publisher could not send at the rate (then the bench was the limit); "
    "'machine' = the machine was above 90% busy at the stopping rate, so the machine (the "
    "subscribers), not the relay, may have been the limit",
]


def notes(cfg: BenchConfig) -> list[str]:
    return NOTES + (SWEEP_NOTES if cfg.rates else []) + (PAIRED_NOTES if cfg.paired else [])


def _num(value: Any) -> str:
    """Compact figures: no decimals from 100 up, one below."""
    if value is None:
        return "–"
    if isinstance(value, (int, float)):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}"
    return str(value)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.0f}%"


def _ratio(run: Run, base: str) -> str:
    r = (run.figures.get("ratios") or {}).get(f"vs_{base.replace('-', '_')}")
    if not r or run.path == base:
        return "–"
    cpu, p50 = r.get("machine_cpu_us_per_packet"), r.get("p50_us")
    return f"{'–' if cpu is None else f'{cpu:.2f}'}/{'–' if p50 is None else f'{p50:.2f}'}"


COLUMNS = ("Path", "Subs", "Objects", "Delay µs\np50/p99/max", "Machine CPU\nµs/pkt",
           "Busy\n(not lab)", "Lab procs\nµs/pkt", "Relay CPU\nµs/pkt", "eBPF\nµs/pkt",
           "Catch-up\nµs/fwd pkt", "Pkts/s per\nrelay core", "Kernel\nbytes", "Limit",
           "vs userspace\nCPU/p50", "vs moq-rs\nCPU/p50", "Note")


def table_rows(runs: list[Run]) -> list[list[str]]:
    rows = []
    for r in runs:
        f = r.figures
        if not r.available or r.error or not f.get("delay"):
            why = r.reason if not r.available else (r.error or "no objects delivered")
            rows.append([r.path, str(r.subscribers)] + [""] * (len(COLUMNS) - 3) +
                        [("not available: " if not r.available else "failed: ") + why])
            continue
        d = f["delay"]
        ebpf = f.get("ebpf")
        share = f.get("kernel_bytes_share")
        rows.append([
            r.path, str(r.subscribers),
            f"{f['objects_delivered']:,}/{f['objects_expected']:,}",
            f"{_num(d['p50_us'])}/{_num(d['p99_us'])}/{_num(d['max_us'])}",
            _num(f["machine_cpu_us_per_packet"]),
            f"{f['machine_busy_share'] * 100:.0f}% ({_pct(f.get('machine_non_lab_share'))})",
            _num(f.get("lab_processes_cpu_us_per_packet")),
            _num(f["relay_cpu_us_per_packet"]),
            "n/a" if ebpf is None else _num(ebpf.get("us_per_packet")),
            "n/a" if not PATHS[r.path].kernel_path else
            _num(f.get("catchup_us_per_forwarded_packet")),
            _num(f["packets_per_s_per_relay_core"]),
            "–" if share is None else f"{share * 100:.0f}%",
            "machine" if f["machine_limited"] else "–",
            _ratio(r, USERSPACE), _ratio(r, ANCHOR),
            "" if f["objects_lost"] == 0 else
            f"{f['objects_lost']:,} objects lost or not delivered in time",
        ])
    return rows


def markdown_table(runs: list[Run]) -> str:
    lines = ["| " + " | ".join(c.replace("\n", " ") for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |"
              for row in table_rows(runs)]
    return "\n".join(lines)


SWEEP_COLUMNS = ("Path", "Subs", "Rates run\nobjects/s", "Highest sustained\nobjects/s",
                 "Delivered\npkts/s", "p99 µs\nthere", "Busy\nthere", "Stopped at\nobjects/s",
                 "Limit", "Stopped by")


def sweep_rows(capacity: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for c in capacity:
        if not c["available"]:
            rows.append([c["path"], ""] + [""] * (len(SWEEP_COLUMNS) - 3) +
                        [f"not available: {c['reason']}"])
            continue
        rows.append([
            c["path"], str(c["subscribers"]), ",".join(f"{r:g}" for r in c["rates_run"]),
            "none" if c["highest_sustained_rate"] is None else f"{c['highest_sustained_rate']:g}",
            _num(c["delivered_pps"]), _num(c["p99_us"]), _pct(c["machine_busy_share"]),
            "–" if c["stopped_at_rate"] is None else f"{c['stopped_at_rate']:g}",
            "machine" if c["stop_machine_limited"] else "–", c["stop_reason"] or "",
        ])
    return rows


SHIM_COLUMNS = ("QUIC packet\nbytes", "Seal (egress)\nµs min/median",
                "Open (ingress)\nµs min/median", "of which ChaCha20 +\nPoly1305 µs (blocks)")


def shim_rows(shim: dict[str, Any]) -> list[list[str]]:
    """One row per packet size of the `shim_cost` section (empty when it was not measured)."""
    by = {(c["size"], c["direction"]): c for c in shim.get("costs") or []}

    def cell(size: int, direction: str) -> str:
        c = by.get((size, direction))
        return "–" if c is None else f"{c['min_ns'] / 1000:.2f}/{c['median_ns'] / 1000:.2f}"

    sizes = sorted({c["size"] for c in shim.get("costs") or []})
    prim, blocks = shim.get("primitives"), shim.get("blocks") or {}

    def crypto(size: int) -> str:
        b = blocks.get(size) or blocks.get(str(size))  # str keys after a JSON round trip
        if prim is None or b is None:
            return "–"
        ns = b["chacha20"] * prim["chacha20_block_ns"] + b["poly1305"] * prim["poly1305_block_ns"]
        return f"{ns / 1000:.2f} ({b['chacha20']} + {b['poly1305']})"

    return [[str(n), cell(n, "seal"), cell(n, "open"), crypto(n)] for n in sizes]


def shim_primitives_line(shim: dict[str, Any]) -> str:
    """The per-block costs under the shim's table, with cycles, or "" when not measured."""
    prim = shim.get("primitives")
    if not prim:
        return ""
    ghz = prim["clock_ghz"]
    return (f"Per block, in the shim's own code (min of {prim['runs']} runs): ChaCha20 "
            f"{prim['chacha20_block_ns']:.0f} ns per 64 bytes "
            f"({prim['chacha20_block_ns'] * ghz:.0f} cycles at {ghz:.2f} GHz), Poly1305 "
            f"{prim['poly1305_block_ns']:.1f} ns per 16 bytes "
            f"({prim['poly1305_block_ns'] * ghz:.0f} cycles); the rest of a packet's time is "
            f"parsing, the connection lookup, copying and the UDP checksum.")


def markdown_shim_table(shim: dict[str, Any]) -> str:
    """The shim's cost for a Markdown document (BENCHMARKS.md), or why it is missing."""
    if not shim.get("available"):
        return f"Soft crypto shim per packet: not measured: {shim.get('reason')}"
    lines = ["| " + " | ".join(c.replace("\n", " ") for c in SHIM_COLUMNS) + " |",
             "|" + "---|" * len(SHIM_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in shim_rows(shim)]
    if shim_primitives_line(shim):
        lines += ["", shim_primitives_line(shim)]
    return "\n".join(lines)


def markdown_sweep_table(capacity: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(c.replace("\n", " ") for c in SWEEP_COLUMNS) + " |",
             "|" + "---|" * len(SWEEP_COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |"
              for row in sweep_rows(capacity)]
    return "\n".join(lines)


def ebpf_programs_table(runs: list[Run]) -> str:
    """Markdown: each eBPF program's ns per run and runs per delivered packet over the measured
    window, from the kernel's per-program statistics (fast path and soft shim apart); empty
    when no run had eBPF programs."""
    rows = [r for r in runs if (r.figures.get("ebpf") or {}).get("per_program")]
    if not rows:
        return ""
    names = sorted({n for r in rows for n in r.figures["ebpf"]["per_program"]})
    lines = ["| Path | Subs | " + " | ".join(f"{n} ns/run (runs/pkt)" for n in names) + " |",
             "|" + "---|" * (len(names) + 2)]
    for r in rows:
        per = r.figures["ebpf"]["per_program"]
        cells = [f"{_num(per[n]['ns_per_run'])} ({_num(per[n]['runs_per_packet'])})"
                 if n in per else "–" for n in names]
        lines.append(f"| {r.path} | {r.subscribers} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PAIRED_COLUMNS = ("Subs\nkernel+user", "Objects\npaired", "Kernel path µs\np50/p99",
                  "Userspace path µs\np50/p99", "Difference µs\np10/p50/p90", "Kernel\nfirst",
                  "Offloaded/\nheld", "Note")


def paired_rows(paired: list[Run]) -> list[list[str]]:
    rows = []
    for r in paired:
        p = r.figures.get("paired")
        if not r.available or r.error or not p:
            why = r.reason if not r.available else (r.error or "no object reached every subscriber")
            rows.append([str(r.subscribers)] + [""] * (len(PAIRED_COLUMNS) - 2) +
                        [("not available: " if not r.available else "failed: ") + why])
            continue
        k, u, d = p["kernel"], p["userspace"], p["difference_us"]
        lost = r.figures.get("objects_lost") or 0
        rows.append([
            f"{p['kernel_subscribers']}+{p['userspace_subscribers']}",
            f"{p['objects_paired']:,}",
            f"{_num(k['p50_us'])}/{_num(k['p99_us'])}",
            f"{_num(u['p50_us'])}/{_num(u['p99_us'])}",
            f"{_num(d['p10'])}/{_num(d['p50'])}/{_num(d['p90'])}",
            _pct(p["kernel_earlier_share"]),
            "/".join("–" if p.get(k) is None else str(p[k])
                     for k in ("relay_offloaded_subscribers", "relay_held_subscribers")),
            "" if not lost else f"{lost:,} objects lost or not delivered in time",
        ])
    return rows


def markdown_paired_table(paired: list[Run]) -> str:
    lines = ["| " + " | ".join(c.replace("\n", " ") for c in PAIRED_COLUMNS) + " |",
             "|" + "---|" * len(PAIRED_COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |"
              for row in paired_rows(paired)]
    return "\n".join(lines)


def document(cfg: BenchConfig, runs: list[Run], *, machine: dict[str, Any], command: str,
             started: str, finished: str, files: dict[str, str],
             sweep: list[Run] | None = None,
             capacity: list[dict[str, Any]] | None = None,
             paired: list[Run] | None = None,
             shim: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "tool": "fastrelay bench",
        "command": command,
        "started": started,
        "finished": finished,
        "machine": machine,
        "parameters": {"subscribers": cfg.subscribers, "paths": cfg.paths,
                       "object_size": cfg.object_size, "rate": cfg.rate,
                       "duration_s": cfg.duration, "objects": cfg.objects,
                       "group_length": cfg.group_length, "layout": "single",
                       "start_delay_s": cfg.start_delay, "window": "10%..90% of delivered packets",
                       "rates": cfg.rates, "sweep_subscribers": cfg.sweep_subscribers,
                       "sweep_duration_s": cfg.sweep_duration, "growing_delay": GROWING_DELAY,
                       "paired_subscribers": cfg.paired},
        "paths": {name: {"description": PATHS[name].description,
                         "available": PATHS[name].unavailable() is None,
                         "reason": PATHS[name].unavailable()} for name in cfg.paths},
        "notes": notes(cfg),
        "files": files,
        "runs": [r.to_json() for r in runs],
        "capacity": capacity or [],
        "sweep": [r.to_json() for r in sweep or []],
        "paired": [r.to_json() for r in paired or []],
        "shim_cost": shim,
    }


def write_plots(runs: list[Run], out: Path) -> dict[str, str]:
    """PNG plots into `out`; {name: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in runs if r.delays_ns and r.figures.get("machine_cpu_us_per_packet")]
    paths = list(dict.fromkeys(r.path for r in runs))
    colours = {p: f"C{i}" for i, p in enumerate(paths)}
    counts = sorted({r.subscribers for r in runs})
    files: dict[str, str] = {}

    # 1. delay distribution per path, one panel per subscriber count
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ncols = min(3, len(counts))
    nrows = -(-len(counts) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(6.5, 4.4 * ncols), 3.6 * nrows + 0.5),
                             squeeze=False, sharey=True)
    panels = [ax for row in axes for ax in row]
    for ax in panels[len(counts):]:
        ax.set_visible(False)
    for ax, n in zip(panels, counts):
        if not any(r.subscribers == n for r in measured):
            ax.text(0.5, 0.5, "nothing measured", ha="center", transform=ax.transAxes)
        for r in (r for r in measured if r.subscribers == n):
            d = sorted(x / 1e6 for x in r.delays_ns)
            ax.plot(d, [(i + 1) / len(d) for i in range(len(d))], color=colours[r.path],
                    label=r.path)
        for r in (r for r in runs if r.subscribers == n and not r.delays_ns):
            ax.plot([], [], color=colours[r.path], linestyle=":", label=f"{r.path} (n/a)")
        if any(r.subscribers == n for r in measured):
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{n} subscriber{'s' if n != 1 else ''}")
        ax.set_xlabel("one-way delay (ms)")
        ax.grid(True, which="both", alpha=0.3)
    for row in axes:
        row[0].set_ylabel("share of objects (CDF)")
    panels[len(counts) - 1].legend(loc="lower right", fontsize="small")
    fig.suptitle("Per-object one-way delay (all subscribers' objects)")
    fig.tight_layout()
    fig.savefig(out / "delay_distribution.png", dpi=110)
    plt.close(fig)
    files["delay_distribution"] = "delay_distribution.png"

    # 2. CPU per delivered packet and 3. delay versus subscribers
    for name, title, series, ylabel in (
        ("cpu_vs_subscribers", "CPU per delivered packet",
         (("machine_cpu_us_per_packet", None, "-", "machine"),
          ("lab_processes_cpu_us_per_packet", None, ":", "lab processes"),
          ("relay_cpu_us_per_packet", None, "--", "relay process")), "µs per delivered packet"),
        ("delay_vs_subscribers", "One-way delay",
         (("p50_us", "delay", "-", "p50"), ("p99_us", "delay", "--", "p99")), "µs"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for path in paths:
            rs = sorted((r for r in measured if r.path == path), key=lambda r: r.subscribers)
            if not rs:
                ax.plot([], [], color=colours[path], linestyle=":", label=f"{path}: not available")
                continue
            for key, sub, style, what in series:
                ys = [(r.figures[sub] or {}).get(key) if sub else r.figures.get(key) for r in rs]
                ax.plot([r.subscribers for r in rs], ys, style, marker="o", color=colours[path],
                        label=f"{path}, {what}")
        if measured:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "nothing measured", ha="center", transform=ax.transAxes)
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.set_xlabel("subscribers")
        ax.set_ylabel(ylabel)
        ax.set_title(title + " vs subscribers")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
        files[name] = f"{name}.png"
    return files


def write_sweep_plot(cfg: BenchConfig, sweep: list[Run], capacity: list[dict[str, Any]],
                     out: Path) -> dict[str, str]:
    """One PNG: delivered packets/s and p99 delay against the offered rate, per path, the
    highest sustained rate marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = list(dict.fromkeys(cfg.paths))
    colours = {p: f"C{i}" for i, p in enumerate(paths)}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    best = {c["path"]: c.get("highest_sustained_rate") for c in capacity if c["available"]}
    for path in paths:
        rs = [r for r in sweep if r.path == path and r.figures.get("delay")]
        if not rs:
            for ax in (ax1, ax2):
                ax.plot([], [], color=colours[path], linestyle=":", label=f"{path}: not measured")
            continue
        xs = [r.rate for r in rs]
        ax1.plot(xs, [r.figures.get("delivered_pps") for r in rs], "-o", color=colours[path],
                 label=path)
        ax2.plot(xs, [r.figures["delay"]["p99_us"] / 1000 for r in rs], "-o",
                 color=colours[path], label=path)
        for r in rs:
            if not r.figures.get("sustained"):
                ax1.plot([r.rate], [r.figures.get("delivered_pps")], "x", color=colours[path],
                         markersize=12)
                ax2.plot([r.rate], [r.figures["delay"]["p99_us"] / 1000], "x",
                         color=colours[path], markersize=12)
        if best.get(path):
            ax1.axvline(best[path], color=colours[path], alpha=0.3, linestyle="--")
    rates = sorted({r.rate for r in sweep if r.rate})
    for ax, ylabel in ((ax1, "delivered packets/s (relay → subscribers)"),
                       (ax2, "p99 one-way delay (ms)")):
        if rates:
            ax.set_xscale("log", base=2)
            ax.set_xticks(rates, [f"{r:g}" for r in rates])
        ax.set_yscale("log")
        ax.set_xlabel("publisher rate (objects/s)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"Rate sweep, {cfg.sweep_subscribers} subscriber(s): x = not sustained "
                 f"(loss, growing delay or publisher limit); dashed = highest sustained")
    fig.tight_layout()
    fig.savefig(out / "rate_sweep.png", dpi=110)
    plt.close(fig)
    return {"rate_sweep": "rate_sweep.png"}


def write_paired_plot(paired: list[Run], out: Path) -> dict[str, str]:
    """One PNG per paired run, side by side: the delay CDF of each half of the subscribers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in paired if r.figures.get("paired") and r.paired_delays_ns]
    if not measured:
        return {}
    fig, axes = plt.subplots(1, len(measured), figsize=(5.5 * len(measured), 4.2), squeeze=False,
                             sharey=True)
    for ax, r in zip(axes[0], measured):
        for (name, delays), colour in zip(r.paired_delays_ns.items(), ("C2", "C0")):
            d = sorted(x / 1e6 for x in delays)
            ax.plot(d, [(i + 1) / len(d) for i in range(len(d))], color=colour,
                    label=f"{name} path")
        p = r.figures["paired"]
        ax.set_title(f"{p['kernel_subscribers']}+{p['userspace_subscribers']} subscribers, "
                     f"{p['objects_paired']:,} objects")
        ax.set_xscale("log")
        ax.set_xlabel("one-way delay (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
    axes[0][0].set_ylabel("share of objects (CDF)")
    fig.suptitle("The same objects through both paths of one relay at once")
    fig.tight_layout()
    fig.savefig(out / "paired_delay.png", dpi=110)
    plt.close(fig)
    return {"paired_delay": "paired_delay.png"}


DOC_START = "<!-- fastrelay bench: start (generated by --doc, do not edit by hand) -->"
DOC_END = "<!-- fastrelay bench: end -->"


def markdown_block(doc: dict[str, Any], runs: list[Run], capacity: list[dict[str, Any]],
                   plots: str, paired: list[Run] | None = None) -> str:
    """The latest run for a Markdown document: when, the command, the machine and its load,
    the tables, the plots (`plots`: their directory relative to the document)."""
    m = doc["machine"]
    load = m.get("loadavg_at_start") or []
    lines = [
        DOC_START,
        f"{doc['started']} – {doc['finished']}: `{doc['command']}`",
        "",
        f"Machine: {m.get('cpu_model')}, {m.get('cores')} vCPUs, {m.get('memory_gib')} GiB, "
        f"kernel {m.get('kernel')}, Python {m.get('python')}; load average at the start "
        f"{', '.join(f'{x:g}' for x in load)}, at the end "
        f"{', '.join(f'{x:g}' for x in doc.get('loadavg_at_end') or [])}.",
        "",
        markdown_table(runs),
    ]
    if capacity:
        p = doc["parameters"]
        lines += ["", f"Highest sustainable rate ({p['sweep_subscribers']} subscribers, "
                      f"{p['sweep_duration_s']:g} s per rate, rates "
                      f"{','.join(f'{r:g}' for r in p['rates'])} objects/s):", "",
                  markdown_sweep_table(capacity)]
    programs = ebpf_programs_table(runs)
    if programs:
        lines += ["", "eBPF programs, kernel statistics over each window (the fast path and the "
                      "soft shim apart; one run per packet and hook it passes):", "", programs]
    if paired:
        lines += ["", "The same objects through both paths of one relay at once (--paired):", "",
                  markdown_paired_table(paired)]
    shim = doc.get("shim_cost")
    if shim:
        lines += ["", f"Soft crypto shim, cost per packet ({shim['method']}):", "",
                  markdown_shim_table(shim)]
    lines += [""] + [f"- {n}" for n in doc["notes"]] + [""]
    for key, title in (("delay_distribution", "per-object delay distribution per path"),
                       ("cpu_vs_subscribers", "CPU per delivered packet vs subscribers"),
                       ("delay_vs_subscribers", "delay vs subscribers"),
                       ("rate_sweep", "rate sweep: delivered packets/s and p99 vs rate"),
                       ("paired_delay", "paired: the same objects through both paths at once")):
        if key in doc["files"]:
            lines += [f"![{title}]({plots}/{doc['files'][key]})", ""]
    lines.append(DOC_END)
    return "\n".join(lines)


def update_document(path: Path, block: str) -> None:
    """Replace the generated block of a Markdown file (between DOC_START and DOC_END)."""
    text = path.read_text()
    start, end = text.find(DOC_START), text.find(DOC_END)
    if start < 0 or end < start:
        raise FastrelayError(f"--doc {path}: no generated block to replace (a line "
                             f"'{DOC_START}' followed by '{DOC_END}')")
    path.write_text(text[:start] + block + text[end + len(DOC_END):])


def write_json(doc: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


def load_runs(out: Path) -> list[Run]:
    """The runs of an earlier `fastrelay bench` (results.json and its delay files), e.g. to
    draw its plots again: `write_plots(load_runs(d), d)`."""
    doc = json.loads((out / "results.json").read_text())
    runs = []
    for item in doc["runs"] + doc.get("sweep", []):
        run = Run(**item)
        name = run.raw.get("delays_file")
        if name:
            run.delays_ns = [int(x) for x in (out / name).read_text().split()]
        runs.append(run)
    return runs
