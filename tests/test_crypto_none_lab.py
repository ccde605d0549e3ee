"""`--crypto=none` in the lab: publisher -> relay -> subscriber in their own namespaces, a
capture on the subscriber's wire. The object payload marker is in clear with `none` and
nowhere without `--crypto`."""

from __future__ import annotations

import json
import os
import select
import socket
import time
from pathlib import Path

import pytest
from pyroute2 import netns

from hw.lab import Lab
from relay.bench.paths import FASTRELAY, PATHS, PORT, BenchPath
from relay.media import PAYLOAD_MAGIC

pytestmark = pytest.mark.root

OBJECTS = 40
ETH_P_ALL = 0x0003


# The relay as users start it: the `fastrelay --crypto none ...` shorthand, or plain standard QUIC.
RELAYS = {
    "none": BenchPath("shorthand-none", "fastrelay --crypto none",
                      [*FASTRELAY, "--crypto", "none", "--listen", f"0.0.0.0:{PORT}"],
                      client_args=["--crypto", "none"]),
    None: PATHS["userspace"],
}


def capture_run(tmp_path: Path, crypto: str | None) -> tuple[dict[str, object], list[bytes]]:
    """Run relay, subscriber and publisher in a fresh lab; return the summary and the frames."""
    env = dict(os.environ, NO_COLOR="1")
    python = FASTRELAY
    with Lab.up("default") as lab:
        relay = RELAYS[crypto].start(lab, tmp_path, env)
        sub_host, pub_host = lab.subscribers[0], lab.publishers[0]
        sniffer = netns.create_socket(lab.netns(sub_host), socket.AF_PACKET, socket.SOCK_RAW,
                                      socket.htons(ETH_P_ALL))
        sniffer.bind((lab.interface(sub_host, lab.relay), 0))
        sniffer.setblocking(False)
        common = ["--namespace", "lab/cam", "--track", "video", *relay.client_args]
        with open(tmp_path / "sub.out", "w") as out, open(tmp_path / "sub.err", "w") as err:
            sub = lab.popen(sub_host, [
                *python, "subscribe", "--url", f"moqt://{lab.address(lab.relay, sub_host)}:{PORT}/x",
                *common, "--expect-objects", str(OBJECTS), "--duration", "30", "--json"],
                stdout=out, stderr=err, env=env)
        with open(tmp_path / "pub.out", "w") as out, open(tmp_path / "pub.err", "w") as err:
            pub = lab.popen(pub_host, [
                *python, "publish", "--url", f"moqt://{lab.address(lab.relay, pub_host)}:{PORT}/x",
                *common, "--objects", str(OBJECTS), "--rate", "100", "--wait-subscriber", "15",
                "--layout", "single"],
                stdout=out, stderr=err, env=env)
        frames: list[bytes] = []
        deadline = time.monotonic() + 40
        while sub.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([sniffer], [], [], 0.1)
            while ready and len(frames) < 100_000:
                try:
                    frames.append(sniffer.recv(65535))
                except BlockingIOError:
                    break
        sniffer.close()
        sub.wait(timeout=5)
        pub.wait(timeout=15)
        text = (tmp_path / "sub.out").read_text()
        assert text.strip(), (tmp_path / "sub.err").read_text()
        return json.loads(text), frames


def test_none_payload_visible_on_the_subscribers_wire(tmp_path: Path) -> None:
    summary, frames = capture_run(tmp_path, "none")
    assert summary["objects"] == OBJECTS and summary["ok"], json.dumps(summary)
    in_clear = sum(frame.count(PAYLOAD_MAGIC) for frame in frames)
    assert in_clear >= OBJECTS, f"{in_clear} payload markers in {len(frames)} frames"


def test_standard_quic_hides_the_payload(tmp_path: Path) -> None:
    summary, frames = capture_run(tmp_path, None)
    assert summary["objects"] == OBJECTS and summary["ok"], json.dumps(summary)
    assert frames and not any(PAYLOAD_MAGIC in frame for frame in frames)
