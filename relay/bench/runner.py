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

The rate sweep (`--rates`) runs the same scenario at rising publisher rates for one subscriber
count and stops a path at the first rate it does not sustain: an object lost or not delivered
in time, a growing delay (GROWING_DELAY below), or a publisher that could not send at the rate
(then the bench, not the relay, was the limit; the sweep of that path ends there too).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from hw.topology import Topology, parse_topology
from relay.bench import measure
from relay.bench.paths import (
    ANCHOR,
    FASTRELAY,
    PAIRED,
    PATHS,
    PORT,
    USERSPACE,
    BenchPath,
    PairedFastPath,
    PathUnavailable,
)
from relay.errors import FastrelayError
from relay.fastpath.runtime import USERSPACE_PEER_REASON

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
#: "Growing delay", the sweep's second stop condition: each subscriber's delays in the order it
#: received the objects are cut in thirds; the delay grows when the p99 of the last thirds (all
#: subscribers together) is above GROWTH_FACTOR x the p99 of the first thirds and at least
#: GROWTH_FLOOR_US above it (jitter of a few ms does not count), or when the run's p99 is
#: above DELAY_BOUND_US whatever its trend (a queue already full from the first third).
GROWTH_FACTOR = 2.0
GROWTH_FLOOR_US = 20_000.0
DELAY_BOUND_US = 500_000.0
GROWING_DELAY = (f"p99 of the last third of each subscriber's objects > {GROWTH_FACTOR:g}x the "
                 f"first third's and > it + {GROWTH_FLOOR_US / 1000:g} ms, or p99 over the run > "
                 f"{DELAY_BOUND_US / 1000:g} ms")
#: The publisher kept the rate when it sent at least this share of it (Python, one core).
PUBLISHER_KEPT_RATE = 0.95


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
    rates: list[float] = field(default_factory=list)
    """The rate sweep (objects/s, ascending); empty: no sweep."""
    sweep_subscribers: int = 4
    sweep_duration: float = 3.0
    paired: list[int] = field(default_factory=list)
    """Subscriber counts (even) of the paired scenario: half on each path of one relay."""

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


def delay_trend(per_subscriber_ns: list[list[int]]) -> dict[str, Any] | None:
    """First and last third of each subscriber's delays (receive order), and whether the delay
    grew over the run (GROWING_DELAY)."""
    first: list[int] = []
    last: list[int] = []
    for delays in per_subscriber_ns:
        third = len(delays) // 3
        if third:
            first.extend(delays[:third])
            last.extend(delays[-third:])
    if not first:
        return None
    p_first = percentile(sorted(first), 99) / 1000
    p_last = percentile(sorted(last), 99) / 1000
    p_all = percentile(sorted(d for ds in per_subscriber_ns for d in ds), 99) / 1000
    growing = (p_last > GROWTH_FACTOR * p_first and p_last - p_first >= GROWTH_FLOOR_US) \
        or p_all > DELAY_BOUND_US
    return {"first_third_p99_us": round(p_first, 1), "last_third_p99_us": round(p_last, 1),
            "growing": growing}


ObjectDelays = dict[tuple[int, int], int]
"""One subscriber's delays by object: (group id, object id) -> ns."""


def read_object_delays(text: str) -> ObjectDelays:
    """A `fastrelay subscribe --delays-file`: a line per object, group id, object id, delay ns."""
    out: ObjectDelays = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 3:
            out[(int(fields[0]), int(fields[1]))] = int(fields[2])
    return out


def _median(values: list[int]) -> float:
    v = sorted(values)
    mid = len(v) // 2
    return float(v[mid]) if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def common_objects(subscribers: list[ObjectDelays]) -> set[tuple[int, int]]:
    """The objects every one of these subscribers received."""
    return set.intersection(*(set(d) for d in subscribers)) if subscribers else set()


def paired_figures(kernel: list[ObjectDelays], userspace: list[ObjectDelays]) -> dict[str, Any] | None:
    """The same objects through both paths of one relay at once: for every object every
    subscriber received, the median delay of the kernel-path subscribers minus the median of
    the userspace-path ones (negative: the kernel copy arrived first). None when no object
    reached every subscriber."""
    if not kernel or not userspace:
        return None
    common = common_objects([*kernel, *userspace])
    if not common:
        return None
    diffs = sorted(_median([d[o] for d in kernel]) - _median([d[o] for d in userspace])
                   for o in common)

    def us(q: float) -> float:
        return round(percentile(diffs, q) / 1000, 1)  # type: ignore[arg-type]

    return {
        "objects_paired": len(common),
        "kernel": delay_figures([d[o] for d in kernel for o in common]),
        "userspace": delay_figures([d[o] for d in userspace for o in common]),
        "difference_us": {"p10": us(10), "p50": us(50), "p90": us(90),
                          "mean": round(sum(diffs) / len(diffs) / 1000, 1)},
        "kernel_earlier_share": round(sum(1 for x in diffs if x < 0) / len(diffs), 4),
    }


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
    rate: float | None = None
    """Objects/s the publisher was asked for (every run of a sweep has its own)."""
    error: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    delays_ns: list[int] = field(default_factory=list, repr=False)
    paired_delays_ns: dict[str, list[int]] = field(default_factory=dict, repr=False)
    """Paired runs: the paired objects' delays of each half ("kernel", "userspace"), for plots."""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("delays_ns")
        out.pop("paired_delays_ns")
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
        #: Each subscriber's delays by object, filled by _collect.
        self.object_delays: dict[str, ObjectDelays] = {}

    def run(self) -> Run:
        from hw.lab import Lab

        run = Run(self.path.name, self.n, available=True, rate=self.cfg.rate)
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
            run.figures["catchup_us_per_forwarded_packet"] = self.path.catchup_us_per_packet(stats)
            if isinstance(self.path, PairedFastPath):
                self._paired(lab, stats, run)
            self.say("lab down")
        return run

    def _paired(self, lab: Any, stats: dict[str, Any] | None, run: Run) -> None:
        """Kernel-path against userspace-path subscribers of this one relay, object by object,
        with the relay's own word on who was served where."""
        held = set(PairedFastPath.held(lab.subscribers))
        kernel = [d for s, d in self.object_delays.items() if s not in held]
        userspace = [d for s, d in self.object_delays.items() if s in held]
        figures = run.figures["paired"] = paired_figures(kernel, userspace)
        if figures is None:
            return
        common = common_objects([*kernel, *userspace])
        run.paired_delays_ns = {"kernel": [d[o] for d in kernel for o in common],
                                "userspace": [d[o] for d in userspace for o in common]}
        fp = (stats or {}).get("fastpath") or {}
        figures["kernel_subscribers"] = len(kernel)
        figures["userspace_subscribers"] = len(userspace)
        figures["relay_offloaded_subscribers"] = (fp.get("counters") or {}).get(
            "subscribers_offloaded")
        figures["relay_held_subscribers"] = (fp.get("refused") or {}).get(USERSPACE_PEER_REASON)

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
        per_subscriber: list[list[int]] = []
        for s in procs:
            try:
                summaries[s] = json.loads((self.logs / f"{s}.out").read_text())
            except (OSError, ValueError):
                summaries[s] = {"ok": False, "objects": 0, "lost": cfg.objects,
                                "errors": [self._last_line(f"{s}.err")]}
            try:
                by_object = read_object_delays((self.logs / f"{s}.delays").read_text())
            except OSError:
                by_object = {}
            self.object_delays[s] = by_object
            mine = list(by_object.values())  # receive order (dicts keep insertion order)
            per_subscriber.append(mine)
            delays.extend(mine)
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
        f["publisher_rate"] = publisher.get("rate")
        f["delay"] = delay_figures(delays)
        f["delay_trend"] = delay_trend(per_subscriber)
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
                         "ns_per_run": round(ns / cnt, 1) if cnt else None,
                         "runs_per_packet": round(cnt / pkts, 2) if pkts else None,
                         "per_program": measure.per_program(s0, s1, pkts),
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
        # userspace-none: the like-for-like baseline of fastpath-none (JSON only)
        for base_name in (USERSPACE, "userspace-none", ANCHOR):
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


def sustained(run: Run) -> tuple[bool, str | None]:
    """Whether a run kept up with its rate: (True, None) or (False, why). The reasons are the
    sweep's stop conditions (module docstring)."""
    f = run.figures
    if not run.available:
        return False, f"not available: {run.reason}"
    if run.error:
        return False, f"failed: {run.error}"
    lost = f.get("objects_lost") or 0
    missing = (f.get("objects_expected") or 0) - (f.get("objects_delivered") or 0)
    if lost or missing > 0:
        return False, f"{max(lost, missing):,} objects lost or not delivered in time"
    sent_rate = f.get("publisher_rate")
    if run.rate and isinstance(sent_rate, (int, float)) and \
            sent_rate < PUBLISHER_KEPT_RATE * run.rate:
        return False, f"publisher sent only {sent_rate:g}/s (the bench, not the relay, was the limit)"
    trend = f.get("delay_trend")
    if trend and trend["growing"]:
        return False, (f"growing delay: p99 {trend['first_third_p99_us'] / 1000:.1f} ms in the "
                       f"first third, {trend['last_third_p99_us'] / 1000:.1f} ms in the last")
    return True, None


class _Plan:
    """Runs scenarios one after the other with a progress label each, writing delay files."""

    def __init__(self, cfg: BenchConfig, say: Progress, total: int) -> None:
        self.cfg, self.say, self.total, self.index = cfg, say, total, 0

    def run(self, path: BenchPath, n: int, cfg: BenchConfig, tag: str = "") -> Run:
        self.index += 1
        label = (f"[{self.index}/{self.total}] {path.name}, {n} subscriber{'s' if n != 1 else ''}"
                 f"{tag}")
        started = time.monotonic()
        stem = f"{path.name}-{n}" + (f"-r{cfg.rate:g}" if tag else "")
        scenario = Scenario(path, n, cfg, cfg.out / "logs" / stem,
                            lambda m, label=label: self.say(f"{label}: {m}"))
        try:
            run = scenario.run()
        except PathUnavailable as exc:
            run = Run(path.name, n, available=False, reason=str(exc), rate=cfg.rate)
        except FastrelayError as exc:
            run = Run(path.name, n, available=True, error=str(exc), rate=cfg.rate)
        run.raw["scenario_seconds"] = round(time.monotonic() - started, 1)
        if run.delays_ns:
            (cfg.out / "delays").mkdir(parents=True, exist_ok=True)
            name = f"{stem}.txt"
            (cfg.out / "delays" / name).write_text("".join(f"{d}\n" for d in run.delays_ns))
            run.raw["delays_file"] = f"delays/{name}"
        d = run.figures.get("delay")
        if run.error:
            self.say(f"{label}: FAILED: {run.error}")
        elif d:
            self.say(f"{label}: p50 {d['p50_us']} µs, p99 {d['p99_us']} µs, "
                     f"{run.figures['machine_cpu_us_per_packet']} µs machine CPU/packet")
        return run


def _available(cfg: BenchConfig, say: Progress) -> tuple[list[BenchPath], list[Run]]:
    paths, unavailable = [], []
    for name in cfg.paths:
        path = PATHS[name]
        reason = path.unavailable()
        if reason is None:
            paths.append(path)
            continue
        unavailable.extend(Run(name, n, available=False, reason=reason, rate=cfg.rate)
                           for n in cfg.subscribers)
        say(f"{name}: not available ({reason})")
    return paths, unavailable


def run_bench(cfg: BenchConfig, say: Progress) -> tuple[list[Run], list[Run], list[Run]]:
    """The subscriber scenarios, the rate sweep, then the paired scenarios:
    (runs, sweep runs, paired runs)."""
    paths, runs = _available(cfg, say)
    paired_reason = PAIRED.unavailable() if cfg.paired else None
    paired: list[Run] = [Run(PAIRED.name, n, available=False, reason=paired_reason,
                             rate=cfg.rate) for n in cfg.paired] if paired_reason else []
    if paired_reason:
        say(f"{PAIRED.name}: not available ({paired_reason})")
    total = len(paths) * (len(cfg.subscribers) + len(cfg.rates)) + \
        (0 if paired_reason else len(cfg.paired))
    plan = _Plan(cfg, say, total)
    restore_bpf_stats: bool | None = None
    if any(p.kernel_path for p in paths) or (cfg.paired and not paired_reason):
        restore_bpf_stats = measure.bpf_stats_enabled()
        if restore_bpf_stats is False:
            measure.set_bpf_stats(True)
    sweep: list[Run] = []
    try:
        for path in paths:
            for n in cfg.subscribers:
                runs.append(plan.run(path, n, cfg))
        sweep_cfg = replace(cfg, duration=cfg.sweep_duration)
        for path in paths:
            for rate in cfg.rates:
                run = plan.run(path, cfg.sweep_subscribers, replace(sweep_cfg, rate=rate),
                               f" at {rate:g} objects/s")
                ok, why = sustained(run)
                run.figures["sustained"] = ok
                run.figures["stop_reason"] = why
                sweep.append(run)
                if not ok:
                    say(f"{path.name}: stops at {rate:g} objects/s ({why})")
                    plan.total -= len(cfg.rates) - cfg.rates.index(rate) - 1
                    break
        if not paired_reason:
            paired.extend(plan.run(PAIRED, n, cfg) for n in cfg.paired)
    finally:
        if restore_bpf_stats is False:
            measure.set_bpf_stats(False)
    order = {name: i for i, name in enumerate(cfg.paths)}
    runs.sort(key=lambda r: (order[r.path], r.subscribers))
    add_ratios(runs)
    return runs, sweep, paired


def highest_sustained(cfg: BenchConfig, sweep: list[Run]) -> list[dict[str, Any]]:
    """One entry per path of the sweep: the highest rate it sustained and what stopped it."""
    out = []
    for name in cfg.paths:
        path = PATHS[name]
        mine = [r for r in sweep if r.path == name]
        reason = path.unavailable()
        if reason is not None:
            out.append({"path": name, "available": False, "reason": reason})
            continue
        if not mine:
            continue
        good = [r for r in mine if r.figures.get("sustained")]
        best = good[-1] if good else None
        stop = next((r for r in mine if not r.figures.get("sustained")), None)
        out.append({
            "path": name, "available": True, "subscribers": cfg.sweep_subscribers,
            "rates_run": [r.rate for r in mine],
            "highest_sustained_rate": best.rate if best else None,
            "delivered_pps": best.figures.get("delivered_pps") if best else None,
            "p99_us": (best.figures.get("delay") or {}).get("p99_us") if best else None,
            "machine_busy_share": best.figures.get("machine_busy_share") if best else None,
            "stopped_at_rate": stop.rate if stop else None,
            "stop_reason": stop.figures.get("stop_reason") if stop else
            "sustained every rate swept (the limit is higher)",
            "stop_machine_limited": stop.figures.get("machine_limited") if stop else None,
        })
    return out


# --- the soft crypto shim's cost per packet ------------------------------------------------

SHIM_METHOD = (f"BPF_PROG_TEST_RUN of the soft shim's programs (bpf/crypto_shim.c) on crafted "
               f"IPv4 frames, {measure.SHIM_RUNS} single runs per size and direction, min and "
               f"median; seal = egress (encrypt, tag, header protection), open = ingress "
               f"(header protection removal, tag check, decrypt); QUIC short header with an "
               f"{measure.SHIM_DCID_LEN}-byte DCID and a {measure.SHIM_PN_LEN}-byte packet "
               f"number; each figure is the program's run time as the kernel reports it for "
               f"one BPF_PROG_TEST_RUN call; the primitives (bpf/crypto_cost.c, the same "
               f"inlined code) per block from the minimum at {measure.PRIMITIVE_LENGTHS[0]} and "
               f"{measure.PRIMITIVE_LENGTHS[1]} bytes, the clock from {measure.CLOCK_ADDS} "
               f"dependent additions")


def measure_shim_cost(say: Progress) -> dict[str, Any]:
    """The `shim_cost` section: the soft shim's per-packet cost per size, both directions, or
    why it could not be measured here (the rest of the bench goes on either way)."""
    say(f"shim cost: {measure.SHIM_RUNS} BPF_PROG_TEST_RUN runs per size "
        f"({','.join(map(str, measure.SHIM_SIZES))} B) and direction")
    section: dict[str, Any] = {"available": False, "reason": None, "method": SHIM_METHOD,
                               "sizes": list(measure.SHIM_SIZES), "costs": []}
    try:
        costs = measure.shim_cost()
        primitives = measure.crypto_primitives()
    except (FastrelayError, RuntimeError, OSError) as exc:
        section["reason"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return section
    section["available"] = True
    section["costs"] = [asdict(c) for c in costs]
    section["primitives"] = asdict(primitives)
    section["blocks"] = {size: dict(zip(("chacha20", "poly1305"), measure.shim_blocks(size)))
                         for size in measure.SHIM_SIZES}
    return section
