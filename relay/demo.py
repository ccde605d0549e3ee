"""The main job shown in the README: a lab, a publisher, the relay, several subscribers.

Every party is a real `fastrelay` process in its own network namespace: the relay in the
relay host, one subscriber per subscriber host (each verifies every object and measures
its one-way delay; all namespaces share one clock), then the publisher, which starts once
every subscriber is in. By default the relay forwards with the eBPF fast path and
`--crypto none` (as the original research did); `fastpath=False` shows the userspace path.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hw.lab import Lab
from hw.topology import Topology
from relay.bench.paths import FASTRELAY, PATHS, PORT, BenchPath
from relay.errors import FastrelayError

NAMESPACE = "demo/cam"
TRACK = "video"


@dataclass(frozen=True)
class SubscriberResult:
    host: str
    address: str
    summary: dict[str, Any]

    @property
    def ok(self) -> bool:
        return bool(self.summary.get("ok"))


@dataclass(frozen=True)
class DemoResult:
    lab: str
    publisher: str
    relay: str
    crypto: str | None
    fastpath: bool
    objects: int
    subscribers: list[SubscriberResult]
    relay_stats: dict[str, Any]

    @property
    def complete(self) -> bool:
        return all(s.ok and s.summary.get("objects") == self.objects for s in self.subscribers)

    @property
    def kernel_share(self) -> float | None:
        """Share of the bytes to subscribers the kernel sent (None: no fast path)."""
        return (self.relay_stats.get("fastpath") or {}).get("kernel_bytes_share")


def _json_summary(path: Path, who: str) -> dict[str, Any]:
    text = path.read_text().strip()
    if not text:
        err = path.with_suffix(".err").read_text().strip()
        raise FastrelayError(f"{who} printed no summary: {err[-300:] or 'no output'}")
    return json.loads(text)


def relay_path(crypto: str | None, fastpath: bool) -> BenchPath:
    """How the demo starts its relay: a benchmark path (fast path, or userspace with
    --crypto if asked)."""
    if fastpath:
        return PATHS[f"fastpath-{crypto}"]
    if crypto is None:
        return PATHS["userspace"]
    return BenchPath(f"userspace-{crypto}", f"fastrelay relay, userspace, --crypto {crypto}",
                     [*FASTRELAY, "relay", "--listen", f"0.0.0.0:{PORT}", "--crypto", crypto,
                      "--fastpath", "off"], client_args=["--crypto", crypto])


def _wait_subscribed(folder: Path, hosts: list[str], procs: dict[str, Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for host in hosts:
        while "subscribed" not in (folder / f"{host}.err").read_text():
            if procs[host].poll() is not None or time.monotonic() > deadline:
                return  # its summary will say why
            time.sleep(0.05)


def run_demo(topology: Topology, *, objects: int = 300, rate: float = 100.0,
             object_size: int = 1000, group_length: int = 30, crypto: str | None = "none",
             fastpath: bool = True, lab_name: str | None = None,
             timeout: float = 60.0) -> DemoResult:
    """Bring a lab up, run relay, subscribers and publisher in it, bring it down."""
    path = relay_path(crypto, fastpath)
    unavailable = path.unavailable()
    if unavailable:
        raise FastrelayError(f"{path.name}: {unavailable}")
    with tempfile.TemporaryDirectory(prefix="fastrelay-demo-") as tmp, \
            Lab.up(topology, name=lab_name) as lab:
        folder = Path(tmp)

        def start(host: str, name: str, argv: list[str]) -> Any:
            with open(folder / f"{name}.out", "w") as out, open(folder / f"{name}.err", "w") as err:
                return lab.popen(host, [*FASTRELAY, *argv], stdout=out, stderr=err)

        relay = path.start(lab, folder, dict(os.environ))
        common = ["--namespace", NAMESPACE, "--track", TRACK, *relay.client_args]
        publisher = lab.publishers[0]
        pub = start(publisher, "publisher", [
            "publish", "--url", f"moqt://{lab.address(lab.relay, publisher)}:{PORT}/demo",
            *common, "--objects", str(objects), "--rate", str(rate), "--object-size",
            str(object_size), "--group-length", str(group_length), "--layout", "single",
            "--wait-subscriber", str(timeout), "--start-on-signal", "--json"])
        subs = {host: start(host, host, [
            "subscribe", "--url", f"moqt://{lab.address(lab.relay, host)}:{PORT}/demo",
            *common, "--expect-objects", str(objects), "--duration", str(timeout), "--json"])
            for host in lab.subscribers}
        # every subscriber is subscribed before the first object
        _wait_subscribed(folder, lab.subscribers, subs, timeout)
        pub.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout + 30
        for proc in (*subs.values(), pub):
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        relay.stop()
        results = [SubscriberResult(host, lab.address(host, lab.relay),
                                    _json_summary(folder / f"{host}.out", host))
                   for host in lab.subscribers]
        return DemoResult(lab=lab.name, publisher=publisher, relay=lab.relay, crypto=crypto,
                          fastpath=fastpath, objects=objects, subscribers=results,
                          relay_stats=path.stats(relay) or {})
