"""The main job shown in the README: a lab, a publisher, the relay, several subscribers.

Every party is a real `fastrelay` process in its own network namespace: the relay in the
relay host, one subscriber per subscriber host (each verifies every object and measures
its one-way delay; all namespaces share one clock), then the publisher. Until the relay
drives the eBPF fast path, the relay runs its userspace path.
"""

from __future__ import annotations

import json
import os
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
    objects: int
    subscribers: list[SubscriberResult]
    relay_stats: dict[str, Any]

    @property
    def complete(self) -> bool:
        return all(s.ok and s.summary.get("objects") == self.objects for s in self.subscribers)


def _json_summary(path: Path, who: str) -> dict[str, Any]:
    text = path.read_text().strip()
    if not text:
        err = path.with_suffix(".err").read_text().strip()
        raise FastrelayError(f"{who} printed no summary: {err[-300:] or 'no output'}")
    return json.loads(text)


def relay_path(crypto: str | None) -> BenchPath:
    """How the demo starts its relay: the benchmark's userspace path, with --crypto if asked."""
    if crypto is None:
        return PATHS["userspace"]
    return BenchPath(f"userspace-{crypto}", f"fastrelay relay, userspace, --crypto {crypto}",
                     [*FASTRELAY, "relay", "--listen", f"0.0.0.0:{PORT}", "--crypto", crypto],
                     client_args=["--crypto", crypto])


def run_demo(topology: Topology, *, objects: int = 300, rate: float = 100.0,
             object_size: int = 1000, group_length: int = 30, crypto: str | None = None,
             lab_name: str | None = None, timeout: float = 60.0) -> DemoResult:
    """Bring a lab up, run relay, subscribers and publisher in it, bring it down."""
    path = relay_path(crypto)
    with tempfile.TemporaryDirectory(prefix="fastrelay-demo-") as tmp, \
            Lab.up(topology, name=lab_name) as lab:
        folder = Path(tmp)

        def start(host: str, name: str, argv: list[str]) -> Any:
            with open(folder / f"{name}.out", "w") as out, open(folder / f"{name}.err", "w") as err:
                return lab.popen(host, [*FASTRELAY, *argv], stdout=out, stderr=err)

        relay = path.start(lab, folder, dict(os.environ))
        common = ["--namespace", NAMESPACE, "--track", TRACK, *relay.client_args]
        subs = {host: start(host, host, [
            "subscribe", "--url", f"moqt://{lab.address(lab.relay, host)}:{PORT}/demo",
            *common, "--expect-objects", str(objects), "--duration", str(timeout), "--json"])
            for host in lab.subscribers}
        publisher = lab.publishers[0]
        pub = start(publisher, "publisher", [
            "publish", "--url", f"moqt://{lab.address(lab.relay, publisher)}:{PORT}/demo",
            *common, "--objects", str(objects), "--rate", str(rate), "--object-size",
            str(object_size), "--group-length", str(group_length), "--layout", "single",
            # every subscriber process is up and subscribed before the first object
            "--wait-subscriber", "20", "--start-delay", "2", "--json"])
        deadline = time.monotonic() + timeout + 30
        for proc in (*subs.values(), pub):
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        relay.stop()
        results = [SubscriberResult(host, lab.address(host, lab.relay),
                                    _json_summary(folder / f"{host}.out", host))
                   for host in lab.subscribers]
        return DemoResult(lab=lab.name, publisher=publisher, relay=lab.relay, crypto=crypto,
                          objects=objects, subscribers=results,
                          relay_stats=path.stats(relay) or {})
