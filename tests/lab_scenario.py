"""Scenarios in the lab for the fast path's end-to-end tests: a relay in the relay host,
fastrelay publishers and verifying subscribers in theirs, every process ended by PID and
the lab removed even when a test fails; after the relay stopped, no fastpath_/shim_ TC
filter may be left in its namespace."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from hw.lab import Lab
from relay.bench.paths import FASTRELAY, PATHS, PORT, BenchPath, RelayHandle
from tests.children import stop_child

FASTPATH = PATHS["fastpath-none"]
NAMESPACE = "lab/cam"
ENV = dict(os.environ, NO_COLOR="1")


@dataclass
class Party:
    name: str
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    def summary(self) -> dict[str, Any]:
        text = self.out.read_text()
        assert text.strip(), f"{self.name}: no summary; stderr: {self.err.read_text()[-2000:]}"
        return json.loads(text)


@dataclass
class Scenario:
    lab: Lab
    relay: RelayHandle
    logs: Path
    parties: list[Party] = field(default_factory=list)

    def url(self, host: str) -> str:
        return f"moqt://{self.lab.address(self.lab.relay, host)}:{PORT}/x"

    def spawn(self, name: str, host: str, argv: list[str]) -> Party:
        """Any command inside `host`, its output in the scenario's logs, ended with it."""
        out, err = self.logs / f"{name}.out", self.logs / f"{name}.err"
        with open(out, "w") as o, open(err, "w") as e:
            proc = self.lab.popen(host, argv, stdout=o, stderr=e, env=ENV)
        party = Party(name, proc, out, err)
        self.parties.append(party)
        return party

    def _spawn(self, name: str, host: str, args: list[str]) -> Party:
        """`fastrelay ARGS` inside `host`."""
        return self.spawn(name, host, [*FASTRELAY, *args])

    def subscribe(self, host: str, *extra: str, track: str = "video", name: str | None = None
                  ) -> Party:
        return self._spawn(name or f"{host}-{track}", host, [
            "subscribe", "--url", self.url(host), "--namespace", NAMESPACE, "--track", track,
            *self.relay.client_args, "--json", *extra])

    def publish(self, host: str, objects: int, *extra: str, track: str = "video",
                namespace: str = NAMESPACE) -> Party:
        return self._spawn(f"{host}-pub-{track}", host, [
            "publish", "--url", self.url(host), "--namespace", namespace, "--track", track,
            *self.relay.client_args, "--objects", str(objects), "--json", *extra])

    def relay_stats(self) -> dict[str, Any]:
        """The running relay's counters over its control socket (`fastrelay stats`)."""
        result = subprocess.run([*FASTRELAY, "stats", "--pid", str(self.relay.pid), "--json"],
                                capture_output=True, text=True, timeout=30, env=ENV)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["stats"]


def run(tmp_path: Path, topo: Path, body: Any, relay_path: BenchPath = FASTPATH
        ) -> tuple[Scenario, dict[str, Any]]:
    """Lab up, relay with the fast path, `body(scenario)`, relay stopped; returns the scenario
    and the relay's final stats. Asserts the relay left no TC filter behind."""
    with Lab.up(topo) as lab:
        relay = relay_path.start(lab, tmp_path, ENV)
        scenario = Scenario(lab, relay, tmp_path)
        try:
            assert "fastpath on: " in relay.stdout.read_text(), relay.stdout.read_text()
            body(scenario)
        finally:
            for party in scenario.parties:
                stop_child(party.proc)
            status = relay.stop()
        assert status == 0, relay.stderr.read_text()[-3000:]
        stats = relay_path.stats(relay)
        assert stats is not None, relay.stdout.read_text()[-2000:]
        with IPRoute(netns=lab.netns(lab.relay)) as ipr:
            left = [f.get_attr("TCA_BPF_NAME") for link in ipr.get_links()
                    for parent in (0xFFFFFFF2, 0xFFFFFFF3)
                    for f in ipr.get_filters(index=link["index"], parent=parent)
                    if f.get_attr("TCA_BPF_NAME")]
        assert not [n for n in left if n.startswith(("fastpath_", "shim_"))], left
    return scenario, stats


def start_when_subscribed(publisher: Party, subscribers: list[Party]) -> None:
    """Let the publisher (started with --start-on-signal) go once every subscriber is in."""
    wait_subscribed(subscribers)
    publisher.proc.send_signal(signal.SIGUSR1)


def wait_subscribed(parties: list[Party], timeout: float = 60.0) -> None:
    """Until every subscriber's SUBSCRIBE was answered (it says so on stderr), so that all
    of them see the track from its first object."""
    deadline = time.monotonic() + timeout
    for party in parties:
        while "subscribed" not in party.err.read_text():
            assert party.proc.poll() is None, party.err.read_text()[-2000:]
            assert time.monotonic() < deadline, f"{party.name} did not subscribe in {timeout:g} s"
            time.sleep(0.05)


def wait_all(parties: list[Party], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for party in parties:
        party.proc.wait(timeout=max(1.0, deadline - time.monotonic()))


def assert_intact(summary: dict[str, Any], objects: int | None = None) -> None:
    assert summary["ok"], json.dumps(summary)
    assert summary["duplicates"] == 0 and summary["integrity_failures"] == 0, summary
    if objects is not None:
        assert summary["objects"] == objects, summary
