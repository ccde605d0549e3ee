"""What `fastrelay bench` reads from the machine: cheap, side-effect-free counters.

- whole-machine CPU: /proc/stat "cpu" line (USER_HZ ticks), busy = user+nice+system+irq+softirq
  (guest time is inside user); idle, iowait and steal are not busy.
- a process's CPU: /proc/PID/stat utime+stime (the whole thread group, so moq-rs's Rust
  worker threads count too).
- packets the relay sent: /proc/PID/net/dev of a process inside the relay's namespace is that
  namespace's interface table, so reading it costs no fork and no netlink round trip.
- eBPF program run time: with kernel.bpf_stats_enabled=1 the kernel keeps run_time_ns and
  run_cnt per program; /proc/PID/fdinfo/FD of a program fd shows them (no bpftool).
- the machine description (CPU model, cores, kernel, memory, load).
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

USER_HZ = os.sysconf("SC_CLK_TCK")
BPF_STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")


@dataclass(frozen=True)
class CpuTimes:
    busy: int
    """Ticks spent working (user, nice, system, irq, softirq)."""
    total: int
    """Every tick (busy, idle, iowait, steal)."""
    steal: int


def machine_cpu() -> CpuTimes:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    fields += [0] * (8 - len(fields))
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    busy = user + nice + system + irq + softirq
    return CpuTimes(busy=busy, total=busy + idle + iowait + steal, steal=steal)


def process_cpu_ticks(pid: int) -> int | None:
    """utime + stime of the whole process, in ticks; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    rest = text[text.rindex(")") + 2:].split()
    return int(rest[11]) + int(rest[12])  # fields 14 and 15


def interface_counters(pid: int) -> dict[str, tuple[int, int, int, int]]:
    """{interface: (rx_bytes, rx_packets, tx_bytes, tx_packets)} as seen from `pid`'s namespace."""
    out: dict[str, tuple[int, int, int, int]] = {}
    try:
        with open(f"/proc/{pid}/net/dev") as f:
            lines = f.readlines()[2:]
    except OSError:
        return out
    for line in lines:
        name, _, data = line.partition(":")
        v = data.split()
        out[name.strip()] = (int(v[0]), int(v[1]), int(v[8]), int(v[9]))
    return out


@dataclass(frozen=True)
class Sample:
    """One look at the counters, taken every sampling interval while a scenario runs."""

    t: float
    machine: CpuTimes
    relay_ticks: int | None
    tx_packets: int
    """Packets the relay namespace sent on its subscriber-facing interfaces."""
    tx_bytes: int
    rx_packets: int
    """Packets the relay namespace received on its subscriber-facing interfaces."""
    lab_ticks: int = 0
    """CPU of every process the bench started (relay, publisher, subscribers), in ticks."""


class ProcessGroupCpu:
    """Summed utime+stime of a set of processes; one that has exited keeps its last value."""

    def __init__(self) -> None:
        self.last: dict[int, int] = {}

    def add(self, pid: int) -> None:
        self.last.setdefault(pid, process_cpu_ticks(pid) or 0)

    def ticks(self) -> int:
        for pid in self.last:
            t = process_cpu_ticks(pid)
            if t is not None:
                self.last[pid] = t
        return sum(self.last.values())


def take_sample(relay_pid: int, subscriber_ifaces: frozenset[str],
                lab: ProcessGroupCpu | None = None) -> Sample:
    counters = interface_counters(relay_pid)
    tx_p = tx_b = rx_p = 0
    for name in subscriber_ifaces:
        c = counters.get(name)
        if c is not None:
            tx_b += c[2]
            tx_p += c[3]
            rx_p += c[1]
    return Sample(t=time.monotonic(), machine=machine_cpu(),
                  relay_ticks=process_cpu_ticks(relay_pid), tx_packets=tx_p, tx_bytes=tx_b,
                  rx_packets=rx_p, lab_ticks=lab.ticks() if lab is not None else 0)


# --- eBPF program statistics -------------------------------------------------------------


def bpf_stats_enabled() -> bool | None:
    try:
        return BPF_STATS_SYSCTL.read_text().strip() == "1"
    except OSError:
        return None


def set_bpf_stats(enabled: bool) -> None:
    BPF_STATS_SYSCTL.write_text("1\n" if enabled else "0\n")


def bpf_prog_stats(pid: int) -> dict[int, tuple[int, int]]:
    """{prog_id: (run_time_ns, run_cnt)} of every BPF program `pid` holds an fd of."""
    out: dict[int, tuple[int, int]] = {}
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = list(fd_dir.iterdir())
    except OSError:
        return out
    for fd in fds:
        try:
            if os.readlink(fd) != "anon_inode:bpf-prog":
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        try:
            prog_id = int(fields["prog_id"])
        except (KeyError, ValueError):
            continue
        out[prog_id] = (int(fields.get("run_time_ns", 0)), int(fields.get("run_cnt", 0)))
    return out


# --- the machine ---------------------------------------------------------------------------


def machine_description() -> dict[str, object]:
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
                break
    except OSError:
        pass
    try:
        load = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        load = []
    return {
        "cpu_model": model or platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "memory_gib": round(mem_kb / 2**20, 1) if mem_kb else None,
        "python": platform.python_version(),
        "hostname": platform.node(),
        "loadavg_at_start": load,
    }
