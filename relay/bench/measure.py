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
- the soft crypto shim's cost per packet (BPF_PROG_TEST_RUN on crafted frames, no lab).
"""

from __future__ import annotations

import os
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay import bpfload
from relay.frames import Udp

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


def per_program(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]],
                packets: int) -> dict[str, dict[str, float | int | None]]:
    """Each program's share of a bpf_prog_stats window, by the name it was loaded under (the
    fast path's and the soft shim's hooks apart): runs, ns per run, runs per delivered packet.
    Programs of one name (the same hook on several interfaces) are added up."""
    out: dict[str, dict[str, float | int | None]] = {}
    for prog_id, (ns1, cnt1) in after.items():
        ns0, cnt0 = before.get(prog_id, (0, 0))
        name = bpfload.prog_name(prog_id) or f"id {prog_id}"
        entry = out.setdefault(name, {"run_time_ns": 0, "run_cnt": 0})
        entry["run_time_ns"] = int(entry["run_time_ns"] or 0) + ns1 - ns0
        entry["run_cnt"] = int(entry["run_cnt"] or 0) + cnt1 - cnt0
    for entry in out.values():
        ns, cnt = int(entry["run_time_ns"] or 0), int(entry["run_cnt"] or 0)
        entry["ns_per_run"] = round(ns / cnt, 1) if cnt else None
        entry["runs_per_packet"] = round(cnt / packets, 2) if packets else None
    return dict(sorted(out.items()))


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


# --- the soft crypto shim's cost per packet --------------------------------------------------
#
# BPF_PROG_TEST_RUN on crafted frames (no lab, a few seconds, most of it compiling the shim):
# the egress program seals a plaintext layout, the ingress program opens the same packet
# protected by the `cryptography` package. Single runs only: each BPF_PROG_TEST_RUN call
# copies the frame in afresh, while `repeat` would hand the ingress program its own
# decrypted output from the second repeat on (a tag failure, not the cost of opening).

#: QUIC packet sizes (header + payload + tag) the cost is measured at.
SHIM_SIZES = (64, 512, 1200, 1400)
#: Single runs per size and direction; the minimum is the figure (the machine is shared and
#: anything else running only adds), the median shows the spread.
SHIM_RUNS = 300
SHIM_DCID_LEN = 8
SHIM_PN = 1000
SHIM_PN_LEN = 2
_SHIM_LOCAL = ("10.0.0.1", 4433)
_SHIM_PEER = ("10.0.0.2", 50000)
_TAG = 16


@dataclass(frozen=True)
class ShimCost:
    """The shim's cost for one packet size and direction (ns per packet)."""

    size: int
    """QUIC packet bytes (short header, payload, 16-byte tag)."""
    direction: str
    """"seal" (egress: encrypt, tag, header protection) or "open" (ingress)."""
    min_ns: int
    median_ns: int
    runs: int


def _shim_material(direction: Any, secret: bytes) -> Any:
    from aioquic.quic.crypto import derive_key_iv_hp
    from aioquic.tls import CipherSuite

    from crypto_backends.base import KeyMaterial, KeyTrigger, PhaseKeys

    suite = CipherSuite.CHACHA20_POLY1305_SHA256
    key, iv, hp = derive_key_iv_hp(cipher_suite=suite, secret=secret, version=1)
    phase = PhaseKeys(0, secret, key, iv)
    return KeyMaterial(connection=1, direction=direction, trigger=KeyTrigger.INSTALL,
                       cipher_suite=suite, version=1, hp_key=hp, current=phase,
                       next=PhaseKeys(1, secret, key, iv))


def _single_runs(prog_fd: int, frame: bytes, runs: int, want: int) -> list[int]:
    durations = []
    for _ in range(runs):
        result = bpfload.prog_test_run(prog_fd, frame)
        if result.retval != want:
            raise RuntimeError(f"the shim returned {result.retval:#x}, not {want:#x}")
        durations.append(result.duration_ns)
    return sorted(durations)


def shim_cost(sizes: tuple[int, ...] = SHIM_SIZES, runs: int = SHIM_RUNS) -> list[ShimCost]:
    """The soft shim's per-packet cost, seal and open, per size: loads bpf/crypto_shim.c (as
    `fastrelay relay --crypto soft` does), installs keys for one IPv4 peer, and times single
    BPF_PROG_TEST_RUN calls. Raises FastrelayError subclasses when the shim cannot be
    loaded here (not root, no bcc), RuntimeError when it did not protect every packet."""
    from crypto_backends.base import Direction
    from crypto_backends.soft_shim import SoftShim, protect

    tc_act_unspec = 0xFFFFFFFF
    rng = random.Random(1)
    shim = SoftShim()
    try:
        send = _shim_material(Direction.SEND, rng.randbytes(32))
        recv = _shim_material(Direction.RECV, rng.randbytes(32))
        out: list[ShimCost] = []
        for size in sizes:
            header = bytes([0x40 | (SHIM_PN_LEN - 1)]) + rng.randbytes(SHIM_DCID_LEN) \
                + (SHIM_PN & 0xFFFF).to_bytes(SHIM_PN_LEN, "big")
            plain = header + rng.randbytes(size - len(header) - _TAG) + bytes(_TAG)
            wire = protect(header, plain[len(header):-_TAG], SHIM_PN, recv.current, recv.hp_key,
                           pn_offset=1 + SHIM_DCID_LEN)
            out_udp = Udp(_SHIM_LOCAL[0], _SHIM_PEER[0], _SHIM_LOCAL[1], _SHIM_PEER[1])
            cases = (("seal", shim.egress.fd, send, out_udp.frame(plain)),
                     ("open", shim.ingress.fd, recv, out_udp.reversed().frame(wire)))
            for direction, fd, material, frame in cases:
                shim.install(_SHIM_LOCAL, _SHIM_PEER, material, dcid_len=SHIM_DCID_LEN,
                             next_pn=SHIM_PN)
                d = _single_runs(fd, frame, runs, tc_act_unspec)
                out.append(ShimCost(size=size, direction=direction, min_ns=d[0],
                                    median_ns=d[len(d) // 2], runs=runs))
        stats = shim.stats()
        if stats["ingress_decrypted"] != len(sizes) * runs or \
                stats["egress_encrypted"] != len(sizes) * runs:
            raise RuntimeError(f"the shim did not protect every packet: {stats}")
        return out
    finally:
        shim.close()


#: bpf/crypto_cost.c: the shim's primitives alone.
PRIMITIVES_SOURCE = "crypto_cost.c"
#: Byte counts each primitive is timed at; the difference removes the fixed cost.
PRIMITIVE_LENGTHS = (256, 1280)
CHACHA20_BLOCK = 64
POLY1305_BLOCK = 16
#: Additions in cost_clock (COST_CLOCK_ADDS): one cycle each.
CLOCK_ADDS = 100_000


@dataclass(frozen=True)
class CryptoPrimitives:
    """What one block of each primitive costs in the shim's code on this machine."""

    chacha20_block_ns: float
    """One 64-byte ChaCha20 keystream block XORed into the data."""
    poly1305_block_ns: float
    """One 16-byte Poly1305 block."""
    clock_ghz: float
    """Dependent 32-bit additions per ns: the clock the programs ran at."""
    runs: int


def _slope(fd: int, unit: int, runs: int) -> float:
    """ns per @unit bytes: minimum time at the longer length minus at the shorter one."""
    short, long = PRIMITIVE_LENGTHS
    best = [_single_runs(fd, bytes(14 + n), runs, 0)[0] for n in PRIMITIVE_LENGTHS]
    return (best[1] - best[0]) / ((long - short) / unit)


def crypto_primitives(runs: int = SHIM_RUNS) -> CryptoPrimitives:
    """Time the shim's ChaCha20 and Poly1305 per block and the clock, each from the code the
    shim inlines (bpf/crypto_cost.c), with single BPF_PROG_TEST_RUN calls (minimum of
    @runs). Raises FastrelayError subclasses when it cannot be loaded here."""
    bpf = bpfload.compile_program(PRIMITIVES_SOURCE, cflags=("-fno-strict-aliasing",))
    try:
        fds = {name: bpfload.load_sched_cls(bpf, name).fd
               for name in ("cost_chacha20", "cost_poly1305", "cost_clock")}
        clock_ns = _single_runs(fds["cost_clock"], bytes(64), max(runs // 10, 5), 0)[0]
        return CryptoPrimitives(
            chacha20_block_ns=_slope(fds["cost_chacha20"], CHACHA20_BLOCK, runs),
            poly1305_block_ns=_slope(fds["cost_poly1305"], POLY1305_BLOCK, runs),
            clock_ghz=CLOCK_ADDS / clock_ns, runs=runs)
    finally:
        bpf.cleanup()


def shim_blocks(size: int) -> tuple[int, int]:
    """(ChaCha20 blocks, Poly1305 blocks) one shim run computes for a QUIC packet of @size
    bytes as shim_cost builds it: the payload's keystream, the Poly1305 key block and the
    header-protection block; the header (AAD), the ciphertext and the lengths block."""
    header = 1 + SHIM_DCID_LEN + SHIM_PN_LEN
    ciphertext = size - header - _TAG
    chacha = -(-ciphertext // CHACHA20_BLOCK) + 2
    poly = -(-header // POLY1305_BLOCK) + -(-ciphertext // POLY1305_BLOCK) + 1
    return chacha, poly
