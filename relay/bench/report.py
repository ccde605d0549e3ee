"""What `fastrelay bench` shows and writes: the table, the JSON document, the PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from relay.bench.paths import ANCHOR, PATHS, USERSPACE
from relay.bench.runner import BenchConfig, Run

NOTES = [
    "machine CPU/packet (the headline) is whole-machine busy time from /proc/stat over the "
    "measured window divided by the UDP packets the relay namespace sent to subscribers "
    "(interface counters, GSO off, so both QUIC stacks are counted alike); it includes the "
    "publisher, every subscriber, the kernel, and any other work on the machine",
    "relay CPU/packet (/proc/PID/stat utime+stime) and eBPF run time/packet (kernel BPF "
    "statistics) are a breakdown that overlaps the headline: never add them up",
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
]


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
           "Pkts/s per\nrelay core", "Kernel\nbytes", "Limit", "vs userspace\nCPU/p50",
           "vs moq-rs\nCPU/p50", "Note")


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


def document(cfg: BenchConfig, runs: list[Run], *, machine: dict[str, Any], command: str,
             started: str, finished: str, files: dict[str, str]) -> dict[str, Any]:
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
                       "start_delay_s": cfg.start_delay, "window": "10%..90% of delivered packets"},
        "paths": {name: {"description": PATHS[name].description,
                         "available": PATHS[name].unavailable() is None,
                         "reason": PATHS[name].unavailable()} for name in cfg.paths},
        "notes": NOTES,
        "files": files,
        "runs": [r.to_json() for r in runs],
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


def write_json(doc: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


def load_runs(out: Path) -> list[Run]:
    """The runs of an earlier `fastrelay bench` (results.json and its delay files), e.g. to
    draw its plots again: `write_plots(load_runs(d), d)`."""
    doc = json.loads((out / "results.json").read_text())
    runs = []
    for item in doc["runs"]:
        run = Run(**item)
        name = run.raw.get("delays_file")
        if name:
            run.delays_ns = [int(x) for x in (out / name).read_text().split()]
        runs.append(run)
    return runs
