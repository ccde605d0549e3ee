"""Runs `fastrelay bench` scenarios: for each path and subscriber count, a fresh lab, the relay
of that path in the relay namespace, the subscribers, then the publisher; counters sampled
while the objects flow; everything torn down.

The measured window: the relay namespace's packets to subscribers are sampled every
SAMPLE_INTERVAL; the window runs from the sample where 10% of the scenario's delivered
packets had gone out to the one where 90% had, so start-up (Python imports, handshakes,
SUBSCRIBE retries) and the drain at the end stay outside it, the same way for every path.
Whole-machine CPU, relay process CPU and eBPF run time are deltas over that window.

Delay is one way, publisher send (time.time_ns in the payload) to subscriber receive, per
object, from every subscriber's raw list (`fastrelay subscribe --delays-file`); all namespaces
share one clock. Percentiles are taken over all subscribers' objects together.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from hw.topology import Topology, parse_topology
from relay.bench import measure
from relay.bench.paths import ANCHOR, FASTRELAY, PATHS, PORT, USERSPACE, BenchPath, PathUnavailable
from relay.errors import FastrelayError

NAMESPACE = "bench/live"
TRACK = "video"
SAMPLE_INTERVAL = 0.1
WINDOW = (0.10, 0.90)
#: A subscriber has connected and asked for the track once the relay's interface towards it
#: received this much since the relay started: a QUIC client's first datagram alone is padded to
#: 1200 bytes, far above the few IPv6 multicast listener reports a new link carries.
READY_PACKETS = 3
READY_BYTES = 1500
#: Whole-machine busy above this share of every core: the machine, not the relay, was the limit.
MACHINE_LIMIT = 0.90


@dataclass
class BenchConfig:
    subscribers: list[int]
    paths: list[str]
    object_size: int = 1000
    rate: float = 100.0
    duration: float = 10.0
    group_length: int = 30
    start_delay: float = 1.0
    """Seconds the publisher waits after the first SUBSCRIBE (the rest subscribe on announce)."""
    background_s: float = 1.0
    """Seconds of whole-machine CPU sampled before the publisher starts (other work)."""
    out: Path = Path("bench-results")

    @property
    def objects(self) -> int:
        """rate × duration, rounded up to whole groups (a short last group would look like a
        group with missing objects to a subscriber that sees its stream end)."""
        wanted = max(1, int(round(self.rate * self.duration)))
        return -(-wanted // self.group_length) * self.group_length


Progress = Callable[[str], None]


def bench_topology(subscribers: int) -> Topology:
    """1 publisher, the relay, N subscribers. No GSO towards subscribers: every QUIC packet
    leaves the relay as its own frame (quinn would otherwise batch with UDP_SEGMENT and the
    interface would count super-packets), so both QUIC stacks are counted alike."""
    return parse_topology({
        "name": "bench",
        "description": f"bench: 1 publisher, 1 relay, {subscribers} subscribers",
        "addressing": {"ipv4": "10.200.0.0/16", "ipv6": "fd00:fa57::/48"},
        "host": [{"name": "pub1", "role": "publisher"}, {"name": "relay", "role": "relay"},
                 {"name": "sub", "role": "subscriber", "count": subscribers}],
        "link": [{"hosts": ["relay", "pub1"]}, {"hosts": ["relay", "sub"], "gso": False}],
    }, source="bench")


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def delay_figures(delays_ns: list[int]) -> dict[str, float | int] | None:
    if not delays_ns:
        return None
    d = sorted(delays_ns)
    return {"count": len(d), "p50_us": round(percentile(d, 50) / 1000, 1),
            "p90_us": round(percentile(d, 90) / 1000, 1),
            "p99_us": round(percentile(d, 99) / 1000, 1), "max_us": round(d[-1] / 1000, 1),
            "min_us": round(d[0] / 1000, 1), "mean_us": round(sum(d) / len(d) / 1000, 1)}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["NO_COLOR"] = "1"
    env.pop("RUST_LOG", None)
    return env


@dataclass
class Run:
    """One path at one subscriber count: every figure, raw counters included."""

    path: str
    subscribers: int
    available: bool
    reason: str | None = None
    error: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    delays_ns: list[int] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("delays_ns")
        return out


def _window(samples: list[measure.Sample], start: int) -> tuple[int, int] | None:
    """Indexes of the samples bounding the 10%..90% part of the delivered packets."""
    base = samples[start].tx_packets
    total = samples[-1].tx_packets - base
    if total <= 0:
        return None
    lo, hi = base + WINDOW[0] * total, base + WINDOW[1] * total
    i0 = next(i for i in range(start, len(samples)) if samples[i].tx_packets >= lo)
    i1 = next(i for i in range(i0, len(samples)) if samples[i].tx_packets >= hi)
    if i1 <= i0:
        return None
    return i0, i1


class Scenario:
    def __init__(self, path: BenchPath, subscribers: int, cfg: BenchConfig, logs: Path,
                 say: Progress) -> None:
        self.path = path
        self.n = subscribers
        self.cfg = cfg
        self.logs = logs
        self.say = say
        self.env = _env()

    def run(self) -> Run:
        from hw.lab import Lab

        run = Run(self.path.name, self.n, available=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.say("lab up")
        with Lab.up(bench_topology(self.n)) as lab:
            handle = self.path.start(lab, self.logs, self.env)
            try:
                self._measure(lab, handle, run)
            finally:
                handle.stop()
            stats = self.path.stats(handle)
            run.raw["relay_stats"] = stats
            run.figures["kernel_bytes_share"] = self.path.kernel_bytes_share(stats)
            self.say("lab down")
        return run

    def _subscriber_argv(self, lab: Any, sub: str, client_args: list[str]) -> list[str]:
        url = f"moqt://{lab.address('relay', sub)}:{PORT}/bench"
        return [*FASTRELAY, "subscribe", "--url", url, "--namespace", NAMESPACE, "--track", TRACK,
                *client_args, "--expect-objects", str(self.cfg.objects), "--duration", "3600",
                "--json", "--delays-file", str(self.logs / f"{sub}.delays")]

    def _publisher_argv(self, lab: Any, client_args: list[str]) -> list[str]:
        pub = lab.publishers[0]
        url = f"moqt://{lab.address('relay', pub)}:{PORT}/bench"
        c = self.cfg
        return [*FASTRELAY, "publish", "--url", url, "--namespace", NAMESPACE, "--track", TRACK,
                *client_args, "--rate", f"{c.rate:g}", "--object-size", str(c.object_size),
                "--group-length", str(c.group_length), "--objects", str(c.objects),
                "--layout", "single", "--wait-subscriber", "60", "--start-delay",
                f"{c.start_delay:g}", "--json"]

    def _spawn(self, lab: Any, host: str, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.out", "wb") as o, open(self.logs / f"{name}.err", "wb") as e:
            return lab.popen(host, argv, stdout=o, stderr=e, env=self.env)

    def _measure(self, lab: Any, handle: Any, run: Run) -> None:
        cfg = self.cfg
        subs = lab.subscribers
        ifaces = {s: lab.interface(lab.relay, s) for s in subs}
        sub_ifaces = frozenset(ifaces.values())
        before = measure.interface_counters(handle.pid)
        self.say(f"starting {self.n} subscriber(s)")
        procs = {s: self._spawn(lab, s, self._subscriber_argv(lab, s, handle.client_args), s)
                 for s in subs}
        # every subscriber connected and asked for the track (relay-agnostic: packets it got)
        deadline = time.monotonic() + 30 + 1.5 * self.n
        while True:
            counters = measure.interface_counters(handle.pid)
            ready = 0
            for s in subs:
                rx0, rxp0, _, _ = before.get(ifaces[s], (0, 0, 0, 0))
                rx1, rxp1, _, _ = counters.get(ifaces[s], (0, 0, 0, 0))
                ready += rx1 - rx0 >= READY_BYTES and rxp1 - rxp0 >= READY_PACKETS
            if ready == len(subs):
                break
            dead = [s for s, p in procs.items() if p.poll() is not None]
            if dead or handle.proc.poll() is not None or time.monotonic() > deadline:
                who = f"subscriber {dead[0]} exited" if dead else \
                    "the relay exited" if handle.proc.poll() is not None else \
                    f"only {ready}/{len(subs)} subscribers connected in time"
                raise FastrelayError(f"{who} before the publisher started "
                                     f"(logs: {self.logs})")
            time.sleep(0.1)
        # the machine just before the publisher starts: all of it, and what is not the lab's
        # processes (other people's work, or the kernel outside our processes)
        group = measure.ProcessGroupCpu()
        group.add(handle.pid)
        for p in procs.values():
            group.add(p.pid)
        b0, g0 = measure.machine_cpu(), group.ticks()
        time.sleep(cfg.background_s)
        b1, g1 = measure.machine_cpu(), group.ticks()
        total = max(1, b1.total - b0.total)
        background = ((b1.busy - b0.busy) / total, max(0, b1.busy - b0.busy - (g1 - g0)) / total)
        self.say(f"publishing {cfg.objects} objects of {cfg.object_size} B at {cfg.rate:g}/s")
        bpf = self.path.kernel_path
        samples = [measure.take_sample(handle.pid, sub_ifaces, group)]
        bpf_samples = [measure.bpf_prog_stats(handle.pid)] if bpf else []
        pub = self._spawn(lab, lab.publishers[0], self._publisher_argv(lab, handle.client_args),
                          "publisher")
        group.add(pub.pid)
        send_time = cfg.objects / cfg.rate if cfg.rate else cfg.duration
        pub_deadline = time.monotonic() + 60 + cfg.start_delay + 2 * send_time
        grace_end: float | None = None
        while True:
            time.sleep(SAMPLE_INTERVAL)
            samples.append(measure.take_sample(handle.pid, sub_ifaces, group))
            if bpf:
                bpf_samples.append(measure.bpf_prog_stats(handle.pid))
            now = time.monotonic()
            if pub.poll() is not None and grace_end is None:
                grace_end = now + 5.0  # stragglers: objects still in flight, retransmissions
            if all(p.poll() is not None for p in procs.values()) and pub.poll() is not None:
                break
            if grace_end is not None and now > grace_end:
                for p in procs.values():
                    if p.poll() is None:
                        p.terminate()
                for p in procs.values():
                    try:
                        p.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        p.kill()
                break
            if now > pub_deadline:
                pub.terminate()
                try:
                    pub.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pub.kill()
        self._collect(run, samples, bpf_samples, background, procs, pub)

    def _collect(self, run: Run, samples: list[measure.Sample],
                 bpf_samples: list[dict[int, tuple[int, int]]],
                 background: tuple[float, float],
                 procs: dict[str, subprocess.Popen[bytes]],
                 pub: subprocess.Popen[bytes]) -> None:
        cfg = self.cfg
        summaries: dict[str, dict[str, Any]] = {}
        delays: list[int] = []
        for s in procs:
            try:
                summaries[s] = json.loads((self.logs / f"{s}.out").read_text())
            except (OSError, ValueError):
                summaries[s] = {"ok": False, "objects": 0, "lost": cfg.objects,
                                "errors": [self._last_line(f"{s}.err")]}
            try:
                delays.extend(int(x) for x in (self.logs / f"{s}.delays").read_text().split())
            except OSError:
                pass
        try:
            publisher = json.loads((self.logs / "publisher.out").read_text())
        except (OSError, ValueError):
            raise FastrelayError(f"the publisher printed no summary: "
                                 f"{self._last_line('publisher.err')}") from None
        run.delays_ns = delays
        delivered = sum(int(v.get("objects", 0)) for v in summaries.values())
        lost = sum(int(v.get("lost", 0)) for v in summaries.values())
        f = run.figures
        f["objects_sent"] = publisher.get("objects")
        f["objects_expected"] = cfg.objects * self.n
        f["objects_delivered"] = delivered
        f["objects_lost"] = lost
        f["subscribers_ok"] = sum(1 for v in summaries.values() if v.get("ok"))
        f["publisher_ok"] = bool(publisher.get("ok"))
        f["publisher_max_lateness_us"] = publisher.get("max_lateness_us")
        f["delay"] = delay_figures(delays)
        f["background_busy_share"] = round(background[0], 4)
        f["background_non_lab_share"] = round(background[1], 4)
        window = _window(samples, 0)
        run.raw["samples"] = {
            "columns": ["t_s", "machine_busy_ticks", "machine_total_ticks", "machine_steal_ticks",
                        "relay_cpu_ticks", "tx_packets", "tx_bytes", "rx_packets",
                        "lab_processes_cpu_ticks"],
            "user_hz": measure.USER_HZ,
            "rows": [[round(x.t - samples[0].t, 3), x.machine.busy, x.machine.total,
                      x.machine.steal, x.relay_ticks, x.tx_packets, x.tx_bytes, x.rx_packets,
                      x.lab_ticks]
                     for x in samples]}
        run.raw["subscriber_summaries"] = summaries
        run.raw["publisher_summary"] = publisher
        if window is None:
            raise FastrelayError("the relay sent no packets to subscribers")
        i0, i1 = window
        a, b = samples[i0], samples[i1]
        pkts = b.tx_packets - a.tx_packets
        secs = b.t - a.t
        busy = b.machine.busy - a.machine.busy
        total = b.machine.total - a.machine.total
        relay_ticks = (b.relay_ticks or 0) - (a.relay_ticks or 0)
        busy_share = busy / total if total else 0.0
        f["window"] = {"start_s": round(a.t - samples[0].t, 3), "seconds": round(secs, 3),
                       "first_sample": i0, "last_sample": i1}
        f["delivered_packets"] = pkts
        f["delivered_bytes"] = b.tx_bytes - a.tx_bytes
        f["delivered_pps"] = round(pkts / secs, 1)
        f["machine_busy_share"] = round(busy_share, 4)
        lab_ticks = b.lab_ticks - a.lab_ticks
        f["machine_non_lab_share"] = round(max(0, busy - lab_ticks) / total, 4) if total else None
        f["machine_busy_cores"] = round(busy / measure.USER_HZ / secs, 3)
        f["machine_cpu_us_per_packet"] = round(busy / measure.USER_HZ / pkts * 1e6, 2)
        f["machine_steal_ticks"] = b.machine.steal - a.machine.steal
        f["lab_processes_cpu_us_per_packet"] = round(lab_ticks / measure.USER_HZ / pkts * 1e6, 2)
        f["relay_cpu_us_per_packet"] = round(relay_ticks / measure.USER_HZ / pkts * 1e6, 2)
        f["relay_cpu_cores"] = round(relay_ticks / measure.USER_HZ / secs, 3)
        f["packets_per_s_per_relay_core"] = round(pkts / (relay_ticks / measure.USER_HZ)) \
            if relay_ticks else None
        f["machine_limited"] = busy_share > MACHINE_LIMIT
        if bpf_samples:
            s0, s1 = bpf_samples[i0], bpf_samples[i1]
            ns = sum(v[0] - s0.get(k, (0, 0))[0] for k, v in s1.items())
            cnt = sum(v[1] - s0.get(k, (0, 0))[1] for k, v in s1.items())
            f["ebpf"] = {"programs": sorted(s1), "run_time_ns": ns, "run_cnt": cnt,
                         "us_per_packet": round(ns / 1000 / pkts, 3) if pkts else None,
                         "stats_enabled": measure.bpf_stats_enabled()}
        else:
            f["ebpf"] = None  # n/a: no eBPF program on this path

    def _last_line(self, name: str) -> str:
        try:
            lines = (self.logs / name).read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no output"
        return lines[-1] if lines else "no output"


def add_ratios(runs: list[Run]) -> None:
    """Each measured run against the userspace path and the anchor at the same subscriber count."""
    by = {(r.path, r.subscribers): r for r in runs if r.figures.get("delay") and not r.error}
    keys = (("machine_cpu_us_per_packet", None), ("relay_cpu_us_per_packet", None),
            ("p50_us", "delay"), ("p99_us", "delay"))
    for r in by.values():
        ratios: dict[str, dict[str, float | None]] = {}
        for base_name in (USERSPACE, ANCHOR):
            base = by.get((base_name, r.subscribers))
            if base is None:
                continue
            out: dict[str, float | None] = {}
            for key, sub in keys:
                mine = (r.figures[sub] or {}).get(key) if sub else r.figures.get(key)
                theirs = (base.figures[sub] or {}).get(key) if sub else base.figures.get(key)
                out[key] = round(mine / theirs, 3) if mine is not None and theirs else None
            ratios[f"vs_{base_name.replace('-', '_')}"] = out
        r.figures["ratios"] = ratios


def run_bench(cfg: BenchConfig, say: Progress) -> list[Run]:
    runs: list[Run] = []
    plan: list[tuple[BenchPath, int]] = []
    for name in cfg.paths:
        path = PATHS[name]
        reason = path.unavailable()
        if reason is not None:
            for n in cfg.subscribers:
                runs.append(Run(name, n, available=False, reason=reason))
            say(f"{name}: not available ({reason})")
            continue
        plan.extend((path, n) for n in cfg.subscribers)
    restore_bpf_stats: bool | None = None
    if any(p.kernel_path for p, _ in plan):
        restore_bpf_stats = measure.bpf_stats_enabled()
        if restore_bpf_stats is False:
            measure.set_bpf_stats(True)
    try:
        for index, (path, n) in enumerate(plan, 1):
            label = f"[{index}/{len(plan)}] {path.name}, {n} subscriber{'s' if n != 1 else ''}"
            started = time.monotonic()
            scenario = Scenario(path, n, cfg, cfg.out / "logs" / f"{path.name}-{n}",
                                lambda m, label=label: say(f"{label}: {m}"))
            try:
                run = scenario.run()
            except PathUnavailable as exc:
                run = Run(path.name, n, available=False, reason=str(exc))
            except FastrelayError as exc:
                run = Run(path.name, n, available=True, error=str(exc))
            run.raw["scenario_seconds"] = round(time.monotonic() - started, 1)
            if run.delays_ns:
                (cfg.out / "delays").mkdir(parents=True, exist_ok=True)
                name = f"{path.name}-{n}.txt"
                (cfg.out / "delays" / name).write_text(
                    "".join(f"{d}\n" for d in run.delays_ns))
                run.raw["delays_file"] = f"delays/{name}"
            d = run.figures.get("delay")
            if run.error:
                say(f"{label}: FAILED: {run.error}")
            elif d:
                say(f"{label}: p50 {d['p50_us']} µs, p99 {d['p99_us']} µs, "
                    f"{run.figures['machine_cpu_us_per_packet']} µs machine CPU/packet")
            runs.append(run)
    finally:
        if restore_bpf_stats is False:
            measure.set_bpf_stats(False)
    order = {name: i for i, name in enumerate(cfg.paths)}
    runs.sort(key=lambda r: (order[r.path], r.subscribers))
    add_ratios(runs)
    return runs
