"""The main job shown in the README: a lab, the probe, traffic publisher -> relay -> subscribers.

Until the MoQ relay and the fast path exist, the relay host runs a plain userspace UDP
fan-out: every datagram the publisher sends is copied to every subscriber. Each datagram
carries its sequence number and send time, so each subscriber's losses and one-way delays
(all namespaces share one clock) are measured per packet.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from hw.lab import Lab
from hw.topology import Topology

DEMO_PORT = 4443
#: sequence number, send time (CLOCK_MONOTONIC ns); the rest of a datagram is filler.
_STAMP = struct.Struct("!QQ")


@dataclass
class SubscriberResult:
    host: str
    address: str
    received: int = 0
    duplicates: int = 0
    delays_ns: list[int] = field(default_factory=list)

    def lost(self, sent: int) -> int:
        return sent - self.received

    def delay_percentile_us(self, q: float) -> float | None:
        if not self.delays_ns:
            return None
        ordered = sorted(self.delays_ns)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000


@dataclass
class DemoResult:
    lab: str
    publisher: str
    relay: str
    sent: int
    forwarded: int
    subscribers: list[SubscriberResult]

    @property
    def complete(self) -> bool:
        return all(s.received == self.sent for s in self.subscribers)


def _fan_out(sock: socket.socket, targets: list[tuple[str, int]], stop: threading.Event,
             counter: list[int]) -> None:
    sock.settimeout(0.05)
    while not stop.is_set():
        try:
            data = sock.recv(65535)
        except socket.timeout:
            continue
        for target in targets:
            sock.sendto(data, target)
        counter[0] += 1


def run_demo(topology: Topology, *, packets: int = 200, size: int = 1200,
             interval_s: float = 0.001, lab_name: str | None = None) -> DemoResult:
    """Bring a lab up, relay `packets` datagrams through the relay host, bring it down."""
    if size < _STAMP.size:
        raise ValueError(f"datagram size must be at least {_STAMP.size} bytes")
    with Lab.up(topology, name=lab_name) as lab:
        relay = lab.relay
        publisher = lab.publishers[0]
        subscribers = lab.subscribers
        relay_in = lab.address(relay, publisher)

        fanout_sock = lab.socket(relay, socket.AF_INET, socket.SOCK_DGRAM)
        fanout_sock.bind((relay_in, DEMO_PORT))
        results: dict[int, SubscriberResult] = {}
        sub_socks: list[socket.socket] = []
        selector = selectors.DefaultSelector()
        targets = []
        for host in subscribers:
            address = lab.address(host, relay)
            sock = lab.socket(host, socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.bind((address, DEMO_PORT))
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
            results[sock.fileno()] = SubscriberResult(host=host, address=address)
            sub_socks.append(sock)
            targets.append((address, DEMO_PORT))
        pub_sock = lab.socket(publisher, socket.AF_INET, socket.SOCK_DGRAM)

        stop = threading.Event()
        forwarded = [0]
        relay_thread = threading.Thread(target=_fan_out, args=(fanout_sock, targets, stop, forwarded),
                                        name="demo-fanout", daemon=True)
        relay_thread.start()
        seen: dict[int, set[int]] = {fd: set() for fd in results}
        filler = bytes(size - _STAMP.size)
        try:
            next_send = time.monotonic()
            sent = 0
            deadline = time.monotonic() + packets * interval_s + 5.0
            while time.monotonic() < deadline:
                now = time.monotonic()
                if sent < packets and now >= next_send:
                    pub_sock.sendto(_STAMP.pack(sent, time.monotonic_ns()) + filler, (relay_in, DEMO_PORT))
                    sent += 1
                    next_send += interval_s
                for key, _ in selector.select(timeout=0.001):
                    _drain(key.fileobj, results[key.fd], seen[key.fd])  # type: ignore[arg-type]
                if sent == packets and all(len(s) == packets for s in seen.values()):
                    break
        finally:
            stop.set()
            relay_thread.join(timeout=2)
            for sock in (fanout_sock, pub_sock, *sub_socks):
                sock.close()
            selector.close()
        return DemoResult(lab=lab.name, publisher=publisher, relay=relay, sent=packets,
                          forwarded=forwarded[0], subscribers=list(results.values()))


def _drain(sock: socket.socket, result: SubscriberResult, seen: set[int]) -> None:
    for _ in range(1024):  # bounded: the selector calls again while data remains
        try:
            data = sock.recv(65535)
        except BlockingIOError:
            return
        received_ns = time.monotonic_ns()
        sequence, sent_ns = _STAMP.unpack_from(data)
        if sequence in seen:
            result.duplicates += 1
            continue
        seen.add(sequence)
        result.received += 1
        result.delays_ns.append(received_ns - sent_ns)
