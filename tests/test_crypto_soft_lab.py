"""`--crypto soft` in the lab, fast path off: the relay's kernel shim carries its connections.

Relay (`fastrelay --crypto soft`) in the relay namespace; our publisher (`--crypto soft`:
standard QUIC offering ChaCha20-Poly1305 only); three unmodified standard QUIC subscribers:
a `fastrelay subscribe` without --crypto (stock aioquic AEAD), moq-rs (quinn/rustls) and an
aioquic client offering AES-128-GCM only (served by the relay's userspace crypto, counted).
Every sender's TX checksum offload is off (the topology says so), so every UDP checksum the
shim fixed is verified by a receiving stack.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import sys
import time
from pathlib import Path

import pytest
from pyroute2 import netns

from hw.lab import Lab
from relay.bench.paths import FASTRELAY, MOQ_RS, PORT, BenchPath
from relay.media import PAYLOAD_MAGIC
from relay.paths import TOPOLOGY_DIR
from tests.kernel.packets import Udp

pytestmark = pytest.mark.root

OBJECTS = 60
GROUP_LENGTH = 10
NAMESPACE, TRACK = "lab/cam", "video"
ETH_P_ALL = 0x0003
SUBSCRIBE_WAIT = 20.0
CONNECTED_FRAMES = 12
RUN_WAIT = 40.0

def soft_relay(family: int) -> BenchPath:
    listen = f"0.0.0.0:{PORT}" if family == 4 else f"[::]:{PORT}"
    return BenchPath("soft", "fastrelay --crypto soft (fast path off)",
                     [*FASTRELAY, "--crypto", "soft", "--fastpath", "off", "--listen", listen,
                      "-v"])


def topology_without_tx_checksum(tmp_path: Path) -> Path:
    """The default lab with every sender's TX checksum offload off (full checksums on the wire)."""
    text = (TOPOLOGY_DIR / "default.toml").read_text()
    text = re.sub(r"^\[\[link\]\]$", "[[link]]\ntx_checksum = false", text, flags=re.M)
    path = tmp_path / "default-no-tx-csum.toml"
    path.write_text(text)
    return path


def in_csum_errors(lab: Lab, host: str) -> int:
    """UDP InCsumErrors of the host's namespace, IPv4 (/proc/net/snmp) plus IPv6 (snmp6)."""
    v4 = lab.run(host, ["cat", "/proc/net/snmp"], capture_output=True, text=True,
                 check=True).stdout
    header, values = [line.split() for line in v4.splitlines() if line.startswith("Udp:")][:2]
    v6 = lab.run(host, ["cat", "/proc/net/snmp6"], capture_output=True, text=True,
                 check=True).stdout
    errors6 = [int(line.split()[1]) for line in v6.splitlines()
               if line.split()[:1] == ["Udp6InCsumErrors"]]
    return int(values[header.index("InCsumErrors")]) + sum(errors6)


def udp_checksums(frames: list[bytes]) -> tuple[int, int]:
    """(UDP frames, of which with a wrong checksum) among captured Ethernet frames."""
    checked = bad = 0
    for frame in frames:
        ethertype = int.from_bytes(frame[12:14], "big")
        if ethertype == 0x0800 and len(frame) >= 42 and frame[14] == 0x45 and frame[23] == 17:
            udp = Udp(socket.inet_ntop(socket.AF_INET, frame[26:30]),
                      socket.inet_ntop(socket.AF_INET, frame[30:34]), 0, 0)
        elif ethertype == 0x86DD and len(frame) >= 62 and frame[20] == 17:
            udp = Udp(socket.inet_ntop(socket.AF_INET6, frame[22:38]),
                      socket.inet_ntop(socket.AF_INET6, frame[38:54]), 0, 0)
        else:
            continue
        checked += 1
        zero = frame[udp.l4_offset + 6:udp.l4_offset + 8] == b"\x00\x00"  # none computed
        bad += zero or not udp.udp_checksum_ok(frame)
    return checked, bad


def shim_filters(lab: Lab, host: str) -> str:
    """What tc shows on the host's hooks after the relay stopped (should be nothing of ours)."""
    out = []
    for iface in lab.host(host).interfaces:
        for hook in ("ingress", "egress"):
            done = lab.run(host, ["tc", "filter", "show", "dev", iface.name, hook],
                           capture_output=True, text=True)
            out.append(done.stdout.strip())
        done = lab.run(host, ["tc", "qdisc", "show", "dev", iface.name],
                       capture_output=True, text=True)
        out.append("clsact" if "clsact" in done.stdout else "")
    return "".join(out)


def text_of(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def last_json(path: Path) -> dict[str, object]:
    """fastrelay's --json summary (one indented object) or moq-rs's last JSON line."""
    text = text_of(path)
    try:
        return json.loads(text)
    except ValueError:
        lines = [ln for ln in text.splitlines() if ln.startswith("{")]
        return json.loads(lines[-1]) if lines else {}


def drain(sniffers: list[socket.socket], frames: dict[int, list[bytes]], timeout: float) -> None:
    ready, _, _ = select.select(sniffers, [], [], timeout)
    for sock in ready:
        for _ in range(10_000):
            try:
                frames[sock.fileno()].append(sock.recv(65535))
            except BlockingIOError:
                break


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_soft_relay_serves_standard_peers(tmp_path: Path, family: int) -> None:
    env = dict(os.environ, NO_COLOR="1")
    relay_path = soft_relay(family)
    with Lab.up(topology_without_tx_checksum(tmp_path)) as lab:
        assert not any(i.tx_checksum for h in lab.hosts.values() for i in h.interfaces)
        relay_host = lab.relay
        fr_host, rs_host, aes_host = lab.subscribers[:3]
        pub_host = lab.publishers[0]
        hosts = [relay_host, fr_host, rs_host, aes_host]
        csum_before = {h: in_csum_errors(lab, h) for h in hosts}
        relay = relay_path.start(lab, tmp_path, env)
        sniffers: list[socket.socket] = []
        try:
            sniffed = (fr_host, rs_host, aes_host)
            for host in sniffed:
                sock = netns.create_socket(lab.netns(host), socket.AF_PACKET, socket.SOCK_RAW,
                                           socket.htons(ETH_P_ALL))
                sock.bind((lab.interface(host, relay_host), 0))
                sock.setblocking(False)
                sniffers.append(sock)
            frames: dict[int, list[bytes]] = {s.fileno(): [] for s in sniffers}

            def url(host: str) -> str:
                address = lab.address(relay_host, host, family)
                return f"moqt://{address if family == 4 else f'[{address}]'}:{PORT}/x"

            def spawn(name: str, host: str, argv: list[str]):  # type: ignore[no-untyped-def]
                with open(tmp_path / f"{name}.out", "w") as out, \
                        open(tmp_path / f"{name}.err", "w") as err:
                    return lab.popen(host, argv, stdout=out, stderr=err, env=env)

            subs = {
                "fr_sub": spawn("fr_sub", fr_host, [
                    *FASTRELAY, "subscribe", "--url", url(fr_host), "--namespace", NAMESPACE,
                    "--track", TRACK, "--insecure", "--expect-objects", str(OBJECTS),
                    "--duration", str(RUN_WAIT), "--json"]),
                "rs_sub": spawn("rs_sub", rs_host, [
                    *MOQ_RS, "subscribe", "--url", url(rs_host), "--broadcast", NAMESPACE,
                    "--track", TRACK, "--insecure", "--expect-objects", str(OBJECTS),
                    "--duration", str(RUN_WAIT), "--log-level", "warn"]),
                "aes_sub": spawn("aes_sub", aes_host, [
                    sys.executable, "-m", "tests.aes_only_subscriber", url(aes_host), NAMESPACE,
                    TRACK, str(OBJECTS), str(RUN_WAIT)]),
            }
            # Connected = traffic on its wire (the relay refuses SUBSCRIBE until the track
            # exists and the subscribers retry), so all three are there when objects start.
            deadline = time.monotonic() + SUBSCRIBE_WAIT
            while time.monotonic() < deadline and \
                    min(len(f) for f in frames.values()) < CONNECTED_FRAMES:
                if any(p.poll() is not None for p in subs.values()):
                    break
                drain(sniffers, frames, 0.1)
            seen = {host: len(frames[s.fileno()]) for host, s in zip(sniffed, sniffers)}
            assert min(seen.values()) >= CONNECTED_FRAMES, (
                seen, {n: text_of(tmp_path / f"{n}.err")[-1500:] for n in subs})

            # moq-rs accepts one subgroup per group: --layout single.
            pub = spawn("pub", pub_host, [
                *FASTRELAY, "publish", "--url", url(pub_host), "--namespace", NAMESPACE,
                "--track", TRACK, "--insecure", "--crypto", "soft", "--objects", str(OBJECTS),
                "--group-length", str(GROUP_LENGTH), "--rate", "100", "--layout", "single",
                "--wait-subscriber", "15", "--start-delay", "1.0", "--json"])
            deadline = time.monotonic() + RUN_WAIT
            while time.monotonic() < deadline and any(p.poll() is None for p in subs.values()):
                drain(sniffers, frames, 0.1)
            for proc in [pub, *subs.values()]:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            for sock in sniffers:
                sock.close()
            status = relay.stop()
        stats = relay_path.stats(relay)
        leftovers = shim_filters(lab, relay_host)
        csum_after = {h: in_csum_errors(lab, h) for h in hosts}

    relay_err = text_of(tmp_path / "relay.err")[-3000:]
    assert status == 0, relay_err
    for name in ("fr_sub", "rs_sub", "aes_sub"):
        summary = last_json(tmp_path / f"{name}.out")
        assert subs[name].returncode == 0, (name, summary, text_of(tmp_path / f"{name}.err")[-2000:])
        assert summary.get("ok") is True and summary.get("objects") == OBJECTS, (name, summary)
        assert (summary["lost"], summary["gaps"], summary["integrity_failures"]) == (0, 0, 0), \
            (name, summary)
    assert pub.returncode == 0, text_of(tmp_path / "pub.err")[-2000:]

    # Encrypted on the subscribers' wires (by the shim, and by aioquic for the AES client):
    # the payload marker is never in clear.
    for sock_frames in frames.values():
        assert len(sock_frames) >= OBJECTS
        assert not any(PAYLOAD_MAGIC in frame for frame in sock_frames)
        # Every UDP checksum on the wire is complete and right (offload off, shim fixed it).
        checked, bad = udp_checksums(sock_frames)
        assert checked >= OBJECTS and bad == 0, (checked, bad)

    assert stats is not None, relay_err
    crypto = stats["crypto"]
    print("relay crypto:", json.dumps(crypto, sort_keys=True))
    shim = crypto["shim"]
    # publisher, fastrelay subscriber and moq-rs offloaded; the AES-only client is not.
    assert crypto["connections_offloaded"] == 3, crypto
    assert crypto["connections_not_offloaded"] == 1, crypto
    assert crypto["not_offloaded_reasons"] == {"peer negotiated AES_128_GCM_SHA256": 1}, crypto
    assert shim["ingress_decrypted"] >= OBJECTS, shim  # the publisher's objects at least
    assert shim["egress_encrypted"] >= 2 * OBJECTS, shim  # to two offloaded subscribers
    drops = {k: v for k, v in shim.items() if "drop" in k and v}
    assert not drops, shim
    # Checksums the shim fixed were verified by every receiving stack.
    assert csum_after == csum_before, (csum_before, csum_after)
    # Detached and unloaded: nothing of the shim on the relay's interfaces.
    assert leftovers == "", leftovers
